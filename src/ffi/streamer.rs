//! `ls_streamer`: build a streamer, run passes with a C callback, read the
//! statistics and memory use.

use std::cell::{Cell, UnsafeCell};
use std::ffi::{c_char, c_int, c_void};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use super::config::{ls_config, ls_dtype};
use super::error::{boundary, guard, ls_result, Failure};
use super::model::{ls_model, write_out, ModelMeta};
use super::stats::{ls_memory_use, ls_pass_stats};
use crate::pipeline::LayerWeights;
use crate::streamer::ComputeStream;
use crate::{Error, LayerStreamer};

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
///
/// On CUDA the streamer's device's primary context is current on the
/// calling thread during the call (the runtime API's device of that ordinal
/// uses the same context).
///
/// The device slot holding the weights is reused once the work queued on
/// `stream` by the time the callback returns has finished. Work queued on
/// any other stream that reads the weights is not covered: announce it with
/// [`ls_layer_release_after`].
///
/// The callback must return normally: it must not unwind through the
/// library (a C++ exception, `longjmp`, a Rust panic); catch them inside.
/// Unwinding or jumping across the call is undefined behaviour.
pub type ls_layer_fn = Option<
    unsafe extern "C" fn(
        user: *mut c_void,
        layer: u32,
        weights: *const ls_layer_weights,
        stream: ls_cuda_stream,
    ) -> c_int,
>;

/// A streamer: slots, caches, streams, open files and stage threads for one
/// model. Opaque; created by [`ls_streamer_new`], freed by
/// [`ls_streamer_free`].
///
/// A handle is used by one thread at a time (any thread, one after the
/// other). Calls made on it while it runs a pass, from its own callback or
/// from another thread, fail with `LS_INVALID_ARGUMENT` (except
/// [`ls_streamer_free`], which is deferred); that check is a safety net, not
/// a license to share a handle between threads.
pub struct ls_streamer {
    /// Set while a call has the inner state: it makes a call from the
    /// streamer's own callback, or from a second thread, an error instead of
    /// a second mutable borrow.
    busy: AtomicBool,
    /// Set by [`ls_streamer_free`] while the streamer is busy: the call that
    /// holds it frees it when it is done.
    free_requested: AtomicBool,
    inner: UnsafeCell<StreamerInner>,
}

pub(crate) struct StreamerInner {
    pub(crate) streamer: LayerStreamer,
    /// The strings `views` point into.
    _meta: Arc<ModelMeta>,
    /// The device shapes `views` point into (with a row split, fewer rows
    /// than the model's tensors).
    _shapes: Vec<Vec<Vec<u64>>>,
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
pub(crate) struct CurrentLayer {
    weights: *const ls_layer_weights,
    stream: *const ComputeStream,
    /// The Rust view of the same layer (lifetime erased: used only during
    /// the callback, while the `LayerWeights` it points to is alive).
    pub(crate) layer: *const LayerWeights<'static>,
}

thread_local! {
    static CURRENT: Cell<Option<CurrentLayer>> = const { Cell::new(None) };
}

/// Marks a layer as current for the duration of a callback; restores the
/// previous one (a callback may run a pass of another streamer) on drop.
struct Enter(Option<CurrentLayer>);

impl Enter {
    fn new(weights: &ls_layer_weights, stream: &ComputeStream, layer: &LayerWeights<'_>) -> Enter {
        let layer = (layer as *const LayerWeights<'_>).cast::<LayerWeights<'static>>();
        let current = CurrentLayer {
            weights,
            stream,
            layer,
        };
        Enter(CURRENT.with(|c| c.replace(Some(current))))
    }
}

/// The layer the running callback on this thread received as `weights`.
pub(crate) fn current(
    weights: *const ls_layer_weights,
    what: &str,
) -> Result<CurrentLayer, Failure> {
    CURRENT
        .with(Cell::get)
        .filter(|c| std::ptr::eq(c.weights, weights))
        .ok_or_else(|| {
            Failure::invalid(format!(
                "{what} is only valid inside the callback that received these weights"
            ))
        })
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
        let shapes: Vec<Vec<Vec<u64>>> = streamer
            .device_layers()
            .iter()
            .map(|l| {
                let shape = |t: &crate::checkpoint::LayerTensor| {
                    t.info.shape.iter().map(|&d| d as u64).collect()
                };
                l.tensors.iter().map(shape).collect()
            })
            .collect();
        let views = meta
            .layers
            .iter()
            .zip(streamer.device_layers())
            .zip(&shapes)
            .map(|((metas, layer), shapes)| {
                metas
                    .iter()
                    .zip(&layer.tensors)
                    .zip(shapes)
                    .map(|((m, t), shape)| ls_tensor_view {
                        key: m.key.as_ptr(),
                        name: m.name.as_ptr(),
                        ptr: 0,
                        dtype: t.info.dtype as u32,
                        ndim: shape.len() as u32,
                        shape: shape.as_ptr(),
                        bytes: t.info.len,
                    })
                    .collect()
            })
            .collect();
        let s = Box::new(ls_streamer {
            busy: AtomicBool::new(false),
            free_requested: AtomicBool::new(false),
            inner: UnsafeCell::new(StreamerInner {
                streamer,
                _meta: meta,
                _shapes: shapes,
                views,
            }),
        });
        // SAFETY: as above.
        unsafe { out.write(Box::into_raw(s)) };
        Ok(())
    })
}

/// Frees a streamer after the device has finished with its memory, and
/// joins its stage threads; NULL is a no-op. Static tensors loaded from it
/// stay valid.
///
/// Called while the streamer runs a pass (from its own callback), the free
/// is deferred: the pass goes on, and the streamer is freed when
/// [`ls_streamer_run_pass`] returns. The handle must not be used after that.
///
/// # Safety
/// `streamer` must be NULL or a pointer from `ls_streamer_new` not yet freed.
#[no_mangle]
pub unsafe extern "C" fn ls_streamer_free(streamer: *mut ls_streamer) {
    guard((), || {
        if streamer.is_null() {
            return;
        }
        // SAFETY: live, by this function's contract.
        match unsafe { claim(streamer) } {
            Ok(claim) => {
                // The claim borrows the streamer: release it before the box goes.
                std::mem::forget(claim);
                // SAFETY: from Box::into_raw in ls_streamer_new, freed once by
                // this function's contract, and not in use: the claim above
                // succeeded, so no pass or other call holds it.
                drop(unsafe { Box::from_raw(streamer) });
            }
            Err(_) => {
                // SAFETY: live, by this function's contract; only the atomic
                // flag is touched.
                let s = unsafe { &*streamer };
                // Relaxed: read by the call that holds the streamer, on this
                // thread (the callback runs on the thread of the pass).
                s.free_requested.store(true, Ordering::Relaxed);
            }
        }
    })
}

/// Frees the streamer on drop if [`ls_streamer_free`] asked for it while a
/// call held it. Declared before the call's claim, so it drops after it.
struct FreeIfRequested(*mut ls_streamer);

impl Drop for FreeIfRequested {
    fn drop(&mut self) {
        // SAFETY: `self.0` is NULL or live (the contract of the call that
        // made this guard); the claim of that call has been released.
        let Some(s) = (unsafe { self.0.as_ref() }) else {
            return;
        };
        if s.free_requested.load(Ordering::Relaxed) {
            // SAFETY: from Box::into_raw in ls_streamer_new; the caller asked
            // for it to be freed, and the call that held it is done with it.
            drop(unsafe { Box::from_raw(self.0) });
        }
    }
}

/// Runs one pass: calls `callback(user, layer, weights, stream)` for every
/// layer in order, on the calling thread, with the layer's weights on the
/// device. Work the callback queues on `stream` is finished when this returns.
///
/// A non-zero return from the callback ends the pass with `LS_CALLBACK`; the
/// message names the value and the layer. A read or CUDA error ends it with
/// its own code. In every case the streamer stays usable for the next pass.
/// The callback must not call functions on this streamer (they fail with
/// `LS_INVALID_ARGUMENT`), except [`ls_layer_copy_to_host`],
/// [`ls_layer_release_after`] and [`ls_streamer_free`] (deferred until this
/// returns: then the handle is gone).
///
/// # Safety
/// `streamer` must be NULL or a live streamer; `callback` must be safe to
/// call with `user` and the arguments described at [`ls_layer_fn`], and must
/// not unwind.
#[no_mangle]
pub unsafe extern "C" fn ls_streamer_run_pass(
    streamer: *mut ls_streamer,
    callback: ls_layer_fn,
    user: *mut c_void,
) -> ls_result {
    let _free = FreeIfRequested(streamer);
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
            let _current = Enter::new(&weights, stream, w);
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
        let current = current(weights, "ls_layer_copy_to_host")?;
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

/// Keeps the device slot of the layer being processed from being reused
/// until the work queued on `stream` so far has finished: call it from the
/// callback after queuing work on a stream other than the pass's that reads
/// `weights`. A later call for the same layer replaces an earlier one (join
/// several streams into one first). On the host backend `stream` must be
/// NULL and the call does nothing.
///
/// Only valid inside the callback that received `weights` (else
/// `LS_INVALID_ARGUMENT`).
///
/// # Safety
/// `weights` must be the pointer the running callback received; `stream` a
/// live `CUstream` of the streamer's context, or NULL.
#[no_mangle]
pub unsafe extern "C" fn ls_layer_release_after(
    weights: *const ls_layer_weights,
    stream: ls_cuda_stream,
) -> ls_result {
    boundary(|| {
        if weights.is_null() {
            return Err(Failure::null("weights"));
        }
        let current = current(weights, "ls_layer_release_after")?;
        // SAFETY: set by the running callback's `Enter`, which outlives the
        // callback; the `LayerWeights` it points to lives on the pass's stack
        // for the whole callback.
        let layer = unsafe { &*current.layer };
        // SAFETY: the caller guarantees `stream` (this function's contract).
        unsafe { layer.release_after_raw(stream.cast()) }?;
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

#[cfg(test)]
#[path = "streamer_tests.rs"]
mod tests;
