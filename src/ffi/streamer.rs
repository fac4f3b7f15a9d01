//! `ls_streamer`: build a streamer, run passes with a C callback, read the
//! statistics and memory use.

use std::cell::{Cell, UnsafeCell};
use std::ffi::{c_char, c_int, c_void};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use super::config::{ls_config, ls_dtype};
use super::error::{boundary, guard, ls_result, Failure};
use super::model::{ls_model, write_out, ModelMeta};
use crate::pipeline::StageStats;
use crate::streamer::{ComputeStream, MemoryUse};
use crate::{Error, LayerStreamer, PassStats};

/// A `CUstream` (`void *`); NULL on the host backend.
pub type ls_cuda_stream = *mut c_void;

/// One tensor of a layer as the callback sees it. The strings and shape are
/// owned by the streamer and valid until it is freed; `ptr` is valid only
/// during the callback that received it.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct ls_tensor_view {
    /// Name inside the layer, e.g. `mlp.up_proj.weight`.
    pub key: *const c_char,
    /// Full name, e.g. `model.layers.3.mlp.up_proj.weight`.
    pub name: *const c_char,
    /// Device address of the first element (a host address on the host backend).
    pub ptr: u64,
    /// Element type at `ptr` (the compute dtype for cast tensors).
    pub dtype: ls_dtype,
    /// Number of dimensions: the length of `shape`.
    pub ndim: u32,
    /// Shape, outermost first.
    pub shape: *const u64,
    /// Bytes at `ptr`.
    pub bytes: u64,
}

/// The weights of one layer, on the device, during the callback.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct ls_layer_weights {
    /// The layer's index.
    pub layer: u32,
    /// Number of tensors in `tensors`.
    pub num_tensors: u32,
    /// The layer's tensors, in file order.
    pub tensors: *const ls_tensor_view,
}

/// The per-layer function of a pass: called on the thread that called
/// [`ls_streamer_run_pass`], once per layer in order, with the layer's
/// weights on the device and the stream to launch work on. `weights` and
/// everything it points to are valid only during the call. Return 0 to go
/// on; any other value ends the pass with `LS_CALLBACK`.
pub type ls_layer_fn = Option<
    unsafe extern "C" fn(
        user: *mut c_void,
        layer: u32,
        weights: *const ls_layer_weights,
        stream: ls_cuda_stream,
    ) -> c_int,
>;

/// One stage's share of a pass.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ls_stage_stats {
    /// Bytes the stage moved.
    pub bytes: u64,
    /// Seconds the stage spent working.
    pub busy_seconds: f64,
    /// Seconds the stage spent waiting for input or for a free slot.
    pub stalled_seconds: f64,
    /// Layers the stage handled.
    pub items: u64,
}

impl From<&StageStats> for ls_stage_stats {
    fn from(s: &StageStats) -> Self {
        ls_stage_stats {
            bytes: s.bytes,
            busy_seconds: s.busy.as_secs_f64(),
            stalled_seconds: s.stalled.as_secs_f64(),
            items: s.items as u64,
        }
    }
}

/// Statistics of one pass.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ls_pass_stats {
    /// Which pass of the streamer (1 = the first; 0 = none completed yet).
    pub pass: u64,
    /// Wall time of the pass in seconds.
    pub wall_seconds: f64,
    /// Layers processed.
    pub layers: u64,
    /// Bytes of weights the callback received.
    pub layer_bytes: u64,
    /// Reader threads: disk to host slots.
    pub read: ls_stage_stats,
    /// Pin thread: unpinned to pinned slots.
    pub pin: ls_stage_stats,
    /// Host to device copies (device time).
    pub h2d: ls_stage_stats,
    /// The callback's work on the compute stream (device time).
    pub compute: ls_stage_stats,
    /// Layers served from the pinned cache.
    pub pinned_cache_hits: u64,
    /// Layers served from the device cache.
    pub gpu_cache_hits: u64,
}

impl From<&PassStats> for ls_pass_stats {
    fn from(s: &PassStats) -> Self {
        ls_pass_stats {
            pass: s.pass,
            wall_seconds: s.wall.as_secs_f64(),
            layers: s.layers as u64,
            layer_bytes: s.layer_bytes,
            read: (&s.read).into(),
            pin: (&s.pin).into(),
            h2d: (&s.h2d).into(),
            compute: (&s.compute).into(),
            pinned_cache_hits: s.pinned_cache_hits as u64,
            gpu_cache_hits: s.gpu_cache_hits as u64,
        }
    }
}

/// What a streamer allocated.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ls_memory_use {
    /// Size of one device slot.
    pub gpu_slot_size: u64,
    /// Device slots.
    pub gpu_slots: u64,
    /// Bytes of device cache.
    pub gpu_cache_bytes: u64,
    /// Layers resident on the device.
    pub gpu_cache_layers: u64,
    /// Size of one host slot (unpinned or pinned).
    pub host_slot_size: u64,
    /// Unpinned host slots.
    pub cpu_slots: u64,
    /// Pinned host slots.
    pub pinned_slots: u64,
    /// Bytes of pinned cache.
    pub pinned_cache_bytes: u64,
    /// Layers kept in the pinned cache.
    pub pinned_cache_layers: u64,
    /// Device bytes in all.
    pub device_bytes: u64,
    /// Pinned host bytes in all.
    pub pinned_bytes: u64,
}

impl From<&MemoryUse> for ls_memory_use {
    fn from(m: &MemoryUse) -> Self {
        ls_memory_use {
            gpu_slot_size: m.gpu_slot_size,
            gpu_slots: m.gpu_slots as u64,
            gpu_cache_bytes: m.gpu_cache_bytes,
            gpu_cache_layers: m.gpu_cache_layers as u64,
            host_slot_size: m.host_slot_size,
            cpu_slots: m.cpu_slots as u64,
            pinned_slots: m.pinned_slots as u64,
            pinned_cache_bytes: m.pinned_cache_bytes,
            pinned_cache_layers: m.pinned_cache_layers as u64,
            device_bytes: m.device_bytes(),
            pinned_bytes: m.pinned_bytes(),
        }
    }
}

/// A streamer: slots, caches, streams and open files for one model.
/// Opaque; created by [`ls_streamer_new`], freed by [`ls_streamer_free`].
pub struct ls_streamer {
    /// Set while a call has the inner state: it makes a call from the
    /// streamer's own callback, or from a second thread, an error instead of
    /// a second mutable borrow.
    busy: AtomicBool,
    inner: UnsafeCell<StreamerInner>,
}

pub(crate) struct StreamerInner {
    pub(crate) streamer: LayerStreamer,
    /// The strings and shapes `views` point into.
    _meta: Arc<ModelMeta>,
    /// Per layer, the views handed to the callback, built once: each call
    /// fills in the pointers of that pass.
    views: Vec<Vec<ls_tensor_view>>,
}

/// Exclusive access to a streamer's inner state for one call.
pub(crate) struct Claim<'a> {
    s: &'a ls_streamer,
}

impl Claim<'_> {
    pub(crate) fn inner(&mut self) -> &mut StreamerInner {
        // SAFETY: `busy` was false and this claim set it (Acquire), so no
        // other reference to the inner state exists until the claim drops.
        unsafe { &mut *self.s.inner.get() }
    }
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        // Release: the next claimer sees every write made under this claim.
        self.s.busy.store(false, Ordering::Release);
    }
}

/// Claims a streamer handle for one call.
///
/// # Safety
/// `s` is NULL or a live pointer from `ls_streamer_new`.
pub(crate) unsafe fn claim<'a>(s: *const ls_streamer) -> Result<Claim<'a>, Failure> {
    // SAFETY: NULL or live by the caller's contract; only the atomic flag
    // and the UnsafeCell are reached through this shared reference.
    let s = unsafe { s.as_ref() }.ok_or_else(|| Failure::null("streamer"))?;
    // Acquire: pairs with the Release in Claim::drop.
    if s.busy
        .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
        .is_err()
    {
        return Err(Failure::invalid(
            "the streamer is busy: it is running a pass, and may not be called from its own \
             callback or from two threads at once",
        ));
    }
    Ok(Claim { s })
}

/// The layer being handed to a callback on this thread, for
/// [`ls_layer_copy_to_host`].
#[derive(Clone, Copy)]
struct CurrentLayer {
    weights: *const ls_layer_weights,
    stream: *const ComputeStream,
}

thread_local! {
    static CURRENT: Cell<Option<CurrentLayer>> = const { Cell::new(None) };
}

/// Marks a layer as current for the duration of a callback; restores the
/// previous one (a callback may run a pass of another streamer) on drop.
struct Enter(Option<CurrentLayer>);

impl Enter {
    fn new(weights: &ls_layer_weights, stream: &ComputeStream) -> Enter {
        Enter(CURRENT.with(|c| c.replace(Some(CurrentLayer { weights, stream }))))
    }
}

impl Drop for Enter {
    fn drop(&mut self) {
        CURRENT.with(|c| c.set(self.0));
    }
}

/// Builds a streamer for `model` with `config`: allocates every slot, cache
/// and stream and opens every file.
///
/// On success `*out` receives a new streamer the caller owns and frees with
/// [`ls_streamer_free`]; the model may be freed before it. On failure `*out`
/// is set to NULL: `LS_CONFIG` for an invalid configuration (e.g. a
/// `read_chunk` that is not a multiple of 4096), `LS_LIMIT` when the slots
/// do not fit, `LS_CUDA_UNAVAILABLE` for a CUDA device without a driver.
///
/// # Safety
/// `model` must be NULL or a live model; `config` NULL or valid for reads;
/// `out` valid for a write.
#[no_mangle]
pub unsafe extern "C" fn ls_streamer_new(
    model: *const ls_model,
    config: *const ls_config,
    out: *mut *mut ls_streamer,
) -> ls_result {
    boundary(|| {
        if out.is_null() {
            return Err(Failure::null("out"));
        }
        // SAFETY: non-NULL and writable by this function's contract.
        unsafe { out.write(std::ptr::null_mut()) };
        // SAFETY: NULL or live by this function's contract.
        let model = unsafe { model.as_ref() }.ok_or_else(|| Failure::null("model"))?;
        // SAFETY: NULL or readable by this function's contract.
        let config = unsafe { config.as_ref() }.ok_or_else(|| Failure::null("config"))?;
        let cfg = config.to_rust()?;
        let streamer = LayerStreamer::builder(&model.index).config(cfg).build()?;
        let meta = Arc::clone(&model.meta);
        let views = meta
            .layers
            .iter()
            .zip(model.index.layers())
            .map(|(metas, layer)| {
                metas
                    .iter()
                    .zip(&layer.tensors)
                    .map(|(m, t)| ls_tensor_view {
                        key: m.key.as_ptr(),
                        name: m.name.as_ptr(),
                        ptr: 0,
                        dtype: t.info.dtype as u32,
                        ndim: m.shape.len() as u32,
                        shape: m.shape.as_ptr(),
                        bytes: t.info.len,
                    })
                    .collect()
            })
            .collect();
        let s = Box::new(ls_streamer {
            busy: AtomicBool::new(false),
            inner: UnsafeCell::new(StreamerInner {
                streamer,
                _meta: meta,
                views,
            }),
        });
        // SAFETY: as above.
        unsafe { out.write(Box::into_raw(s)) };
        Ok(())
    })
}

/// Frees a streamer after the device has finished with its memory; NULL is
/// a no-op. Static tensors loaded from it stay valid. A streamer that is
/// running a pass (a call from its own callback) is not freed: it would
/// free the memory the pass is using.
///
/// # Safety
/// `streamer` must be NULL or a pointer from `ls_streamer_new` not yet freed.
#[no_mangle]
pub unsafe extern "C" fn ls_streamer_free(streamer: *mut ls_streamer) {
    guard((), || {
        // SAFETY: NULL or live, by this function's contract.
        let Ok(claim) = (unsafe { claim(streamer) }) else {
            return;
        };
        // The claim borrows the streamer: release it before the box goes.
        std::mem::forget(claim);
        // SAFETY: from Box::into_raw in ls_streamer_new, freed once by this
        // function's contract, and not in use: the claim above succeeded, so
        // no pass or other call holds it.
        drop(unsafe { Box::from_raw(streamer) });
    })
}

/// Runs one pass: calls `callback(user, layer, weights, stream)` for every
/// layer in order, on the calling thread, with the layer's weights on the
/// device. Work the callback queues on `stream` is finished when this returns.
///
/// A non-zero return from the callback ends the pass with `LS_CALLBACK`; the
/// message names the value and the layer. A read or CUDA error ends it with
/// its own code. In every case the streamer stays usable for the next pass.
/// The callback must not call functions on this streamer (they fail with
/// `LS_INVALID_ARGUMENT`), except [`ls_layer_copy_to_host`].
///
/// # Safety
/// `streamer` must be NULL or a live streamer; `callback` must be safe to
/// call with `user` and the arguments described at [`ls_layer_fn`].
#[no_mangle]
pub unsafe extern "C" fn ls_streamer_run_pass(
    streamer: *mut ls_streamer,
    callback: ls_layer_fn,
    user: *mut c_void,
) -> ls_result {
    boundary(|| {
        // SAFETY: forwarded from this function's contract.
        let mut claim = unsafe { claim(streamer) }?;
        let callback = callback.ok_or_else(|| Failure::null("callback"))?;
        let StreamerInner {
            streamer, views, ..
        } = claim.inner();
        streamer.run_pass((), |(), w, layer, stream| {
            let views = &mut views[layer];
            // Both follow the layer's tensors in file order.
            debug_assert_eq!(views.len(), w.len());
            for (v, t) in views.iter_mut().zip(w.tensors()) {
                v.ptr = t.ptr();
                v.dtype = t.dtype() as u32;
                v.bytes = t.bytes();
            }
            let weights = ls_layer_weights {
                layer: layer as u32,
                num_tensors: views.len() as u32,
                tensors: views.as_ptr(),
            };
            let _current = Enter::new(&weights, stream);
            // SAFETY: the caller guarantees `callback` may be called with
            // `user`; `weights` and the views it points to outlive the call.
            let rc =
                unsafe { callback(user, layer as u32, &weights, stream.raw() as ls_cuda_stream) };
            match rc {
                0 => Ok(()),
                rc => Err(Error::Input(format!("callback returned {rc}"))),
            }
        })?;
        Ok(())
    })
}

/// Copies tensor `index` of the layer being processed into host memory:
/// `dst` receives the tensor's `bytes` bytes, after the work already queued
/// on the pass's stream. Only valid inside the callback that received
/// `weights` (else `LS_INVALID_ARGUMENT`); synchronous. It lets a CUDA
/// caller check the bytes without CUDA headers.
///
/// Returns `LS_INVALID_ARGUMENT` when `index` is out of range or `dst_len`
/// is smaller than the tensor.
///
/// # Safety
/// `weights` must be the pointer the running callback received; `dst` must
/// be valid for writes of `dst_len` bytes.
#[no_mangle]
pub unsafe extern "C" fn ls_layer_copy_to_host(
    weights: *const ls_layer_weights,
    index: u32,
    dst: *mut c_void,
    dst_len: u64,
) -> ls_result {
    boundary(|| {
        if weights.is_null() {
            return Err(Failure::null("weights"));
        }
        if dst.is_null() {
            return Err(Failure::null("dst"));
        }
        let current = CURRENT
            .with(Cell::get)
            .filter(|c| std::ptr::eq(c.weights, weights))
            .ok_or_else(|| {
                Failure::invalid(
                    "ls_layer_copy_to_host is only valid inside the callback that received these weights",
                )
            })?;
        // SAFETY: `current` was set by the running callback's `Enter`, which
        // outlives the callback; `weights` and `stream` point to its live
        // stack values and views.
        let (w, stream) = unsafe { (&*current.weights, &*current.stream) };
        if index >= w.num_tensors {
            return Err(Failure::invalid(format!(
                "tensor {index} is out of range: layer {} has {} tensors",
                w.layer, w.num_tensors
            )));
        }
        // SAFETY: `tensors` has `num_tensors` views and `index` is below it.
        let view = unsafe { &*w.tensors.add(index as usize) };
        if dst_len < view.bytes {
            return Err(Failure::invalid(format!(
                "dst_len is {dst_len} but tensor {index} of layer {} has {} bytes",
                w.layer, view.bytes
            )));
        }
        let len = view.bytes as usize;
        match stream.cuda() {
            None => {
                // SAFETY: on the host backend `ptr` is a host address inside
                // the layer's slot, holding `bytes` bytes that the pipeline
                // does not write during the callback; `dst` is valid for
                // `dst_len >= len` bytes and is caller memory, not the slot.
                unsafe {
                    std::ptr::copy_nonoverlapping(view.ptr as *const u8, dst.cast::<u8>(), len)
                };
            }
            Some(s) => {
                // SAFETY: `[ptr, ptr + len)` is the tensor in the layer's
                // device slot, which stays allocated and unwritten during the
                // callback; `dst` is valid for `len` bytes and not touched by
                // the host until the synchronize below completes the copy.
                unsafe { crate::cuda::memcpy_dtoh_async(dst.cast::<u8>(), view.ptr, len, s) }?;
                s.synchronize()?;
            }
        }
        Ok(())
    })
}

/// Writes the statistics of the last completed pass into `*out` (all zero
/// before the first pass).
///
/// # Safety
/// `streamer` must be NULL or a live streamer; `out` valid for a write.
#[no_mangle]
pub unsafe extern "C" fn ls_streamer_last_pass_stats(
    streamer: *const ls_streamer,
    out: *mut ls_pass_stats,
) -> ls_result {
    boundary(|| {
        // SAFETY: forwarded from this function's contract.
        let mut claim = unsafe { claim(streamer) }?;
        let stats = ls_pass_stats::from(claim.inner().streamer.last_pass_stats());
        // SAFETY: forwarded from this function's contract.
        unsafe { write_out(out, stats, "out") }
    })
}

/// Writes what the streamer allocated into `*out`.
///
/// # Safety
/// `streamer` must be NULL or a live streamer; `out` valid for a write.
#[no_mangle]
pub unsafe extern "C" fn ls_streamer_memory(
    streamer: *const ls_streamer,
    out: *mut ls_memory_use,
) -> ls_result {
    boundary(|| {
        // SAFETY: forwarded from this function's contract.
        let mut claim = unsafe { claim(streamer) }?;
        let mem = ls_memory_use::from(claim.inner().streamer.memory());
        // SAFETY: forwarded from this function's contract.
        unsafe { write_out(out, mem, "out") }
    })
}

/// The stream callbacks run on (a `CUstream` owned by the streamer, valid
/// until it is freed), for work before and after a pass. NULL on the host
/// backend, for NULL, and while the streamer is busy.
///
/// # Safety
/// `streamer` must be NULL or a live streamer.
#[no_mangle]
pub unsafe extern "C" fn ls_streamer_compute_stream(
    streamer: *const ls_streamer,
) -> ls_cuda_stream {
    guard(std::ptr::null_mut(), || {
        // SAFETY: forwarded from this function's contract.
        match unsafe { claim(streamer) } {
            Ok(mut c) => c.inner().streamer.compute_stream().raw() as ls_cuda_stream,
            Err(_) => std::ptr::null_mut(),
        }
    })
}
