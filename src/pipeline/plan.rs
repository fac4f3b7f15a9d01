//! Per-layer plans computed once at build time: where each tensor sits in a
//! device slot, which tensors are cast to the compute dtype and where the
//! casts land, and the views handed to the layer function.

use std::sync::atomic::{AtomicBool, Ordering};

use super::backend::EventH;
use super::compute::ComputeStream;
use super::split::{HostRows, RowSplit};
use crate::checkpoint::{Layer, LayerTensor, ModelIndex, TensorInfo};
use crate::quant::fp8::{Fp8Layout, Fp8Scale};
use crate::quant::QuantType;
use crate::{cuda, DType, Error, Result};

/// Alignment of tensors in a slot's conversion area.
const CAST_ALIGN: u64 = 256;

/// One tensor of a layer, as the layer function sees it.
///
/// The fields are private so that a view can only come from the layer it
/// describes: [`LayerWeights::host_bytes`] trusts `ptr` and `bytes`.
#[derive(Debug, Clone, Copy)]
pub struct TensorView<'a> {
    key: &'a str,
    name: &'a str,
    ptr: u64,
    dtype: DType,
    shape: &'a [usize],
    bytes: u64,
    quant: Option<QuantType>,
    scale: Option<&'a Fp8Scale>,
}

impl<'a> TensorView<'a> {
    /// The scale of an FP8 weight handed over as stored (the streamer in
    /// file dtypes): `dtype` is then [`DType::F8E4M3`] or [`DType::F8E5M2`]
    /// and the scale tensor (named by [`Fp8Scale::tensor`]) is another
    /// tensor of the same layer. `None` for every other tensor, and for FP8
    /// weights dequantized on the device into the compute dtype.
    pub fn fp8_scale(&self) -> Option<&'a Fp8Scale> {
        self.scale
    }

    /// The ggml block type of a tensor handed over as stored blocks (a
    /// quantized GGUF tensor with the streamer in file dtypes): `dtype` is
    /// then [`DType::U8`], `shape` the logical shape and `bytes` the blocks'
    /// size. `None` for plain element types, and for quantized tensors
    /// dequantized on the device into the compute dtype.
    pub fn quant(&self) -> Option<QuantType> {
        self.quant
    }

    /// The key inside the layer, e.g. `mlp.up_proj.weight`.
    pub fn key(&self) -> &'a str {
        self.key
    }

    /// The full tensor name, e.g. `model.layers.3.mlp.up_proj.weight`.
    pub fn name(&self) -> &'a str {
        self.name
    }

    /// Device address of the first element (a host address on the host backend).
    pub fn ptr(&self) -> u64 {
        self.ptr
    }

    /// Element type on the device (the compute dtype for cast tensors).
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Shape, outermost first.
    pub fn shape(&self) -> &'a [usize] {
        self.shape
    }

    /// Bytes at [`ptr`](Self::ptr).
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// A cast of one tensor inside a slot.
#[derive(Debug, Clone)]
pub(crate) struct CastOp {
    /// The stored type when the dequantization kernels convert the tensor
    /// (see [`dequant_source`]): a block type (`from` is then the stored
    /// byte type), or a plain float going to f16.
    pub(crate) quant: Option<QuantType>,
    /// An FP8 weight's decode and the offset of its scale tensor in the
    /// slot, when this is an FP8 dequantization (into bf16 or f16).
    pub(crate) fp8: Option<(Fp8Layout, u64)>,
    pub(crate) from: DType,
    pub(crate) to: DType,
    /// Offset of the raw tensor in the slot.
    pub(crate) src: u64,
    /// Offset of the converted tensor in the slot.
    pub(crate) dst: u64,
    pub(crate) n: usize,
}

#[derive(Debug, Clone)]
pub(crate) struct ViewPlan {
    pub(crate) key: String,
    pub(crate) name: String,
    pub(crate) offset: u64,
    pub(crate) dtype: DType,
    pub(crate) shape: Vec<usize>,
    pub(crate) bytes: u64,
    pub(crate) quant: Option<QuantType>,
    pub(crate) scale: Option<Fp8Scale>,
}

impl ViewPlan {
    /// The view of `t` converted to `dtype`, `bytes` bytes at `offset`.
    fn cast(t: &LayerTensor, offset: u64, dtype: DType, bytes: u64) -> ViewPlan {
        ViewPlan {
            key: t.key.clone(),
            name: t.info.name.clone(),
            offset,
            dtype,
            shape: t.info.shape.clone(),
            bytes,
            quant: None,
            scale: None,
        }
    }
}

/// Where a layer lives between passes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Home {
    /// Read from disk every pass.
    Stream,
    /// Kept in pinned cache buffer `.0` once read.
    Pinned(usize),
    /// Kept in device cache buffer `.0` once transferred.
    Gpu(usize),
}

#[derive(Debug, Clone)]
pub(crate) struct LayerPlan {
    /// Bytes copied host → device: the layer's slot bytes.
    pub(crate) copy_bytes: u64,
    /// Bytes a device slot needs for this layer: the shift, raw bytes and
    /// conversions.
    pub(crate) device_bytes: u64,
    /// Where in its slot the layer's bytes start (below [`CAST_ALIGN`]):
    /// chosen so that the most bytes of tensors used as stored start
    /// [`CAST_ALIGN`]-aligned, as the fastest GEMM kernels want, though a
    /// file aligns them to 8 bytes or less. Every offset in `views` and
    /// `casts` counts from the slot's start plus this shift.
    pub(crate) shift: u64,
    pub(crate) casts: Vec<CastOp>,
    pub(crate) views: Vec<ViewPlan>,
    pub(crate) home: Home,
}

impl LayerPlan {
    /// The plan of `layer` for the compute dtype `dtype` (`None`: the file
    /// dtypes); with `keep_blocks`, quantized weights and FP8 scales travel
    /// as stored while plain floats are still cast.
    pub(crate) fn new(
        model: &ModelIndex,
        layer: &Layer,
        dtype: Option<DType>,
        keep_blocks: bool,
    ) -> Result<LayerPlan> {
        let scales = fp8_scales(layer);
        let casts_of = |t: &LayerTensor| match keep_blocks && is_blocks(t, &scales) {
            true => Ok(None),
            false => cast_target(model, &t.info, dtype),
        };
        let shift = layer_shift(layer, |t| casts_of(t).is_ok_and(|c| c.is_none()));
        // Conversions land CAST_ALIGN-aligned in the slot: offsets count from
        // `shift`, so the first is aligned up from the raw bytes' end there.
        let raw_end = (shift + layer.slot_bytes).div_ceil(CAST_ALIGN) * CAST_ALIGN - shift;
        let mut conv = raw_end;
        let mut casts = Vec::new();
        let mut views = Vec::with_capacity(layer.tensors.len());
        for t in &layer.tensors {
            let info = &t.info;
            let fp8 = fp8_source(model, layer, t)?;
            let target = casts_of(t)?;
            match target {
                // A tensor whose rows all went to the CPU: nothing to cast.
                Some(to) if info.len == 0 => views.push(ViewPlan::cast(t, 0, to, 0)),
                Some(to) => {
                    let n = info.shape.iter().product::<usize>();
                    let out_bytes = (n * to.size()) as u64;
                    casts.push(CastOp {
                        quant: dequant_source(info, to),
                        fp8,
                        from: info.dtype,
                        to,
                        src: t.slot_offset,
                        dst: conv,
                        n,
                    });
                    views.push(ViewPlan::cast(t, conv, to, out_bytes));
                    conv += out_bytes.div_ceil(CAST_ALIGN) * CAST_ALIGN;
                }
                None => views.push(ViewPlan {
                    offset: t.slot_offset,
                    dtype: info.dtype,
                    bytes: info.len,
                    quant: info.quant,
                    scale: info.scale.clone(),
                    ..ViewPlan::cast(t, 0, info.dtype, 0)
                }),
            }
        }
        Ok(LayerPlan {
            copy_bytes: layer.slot_bytes,
            device_bytes: shift
                + if casts.is_empty() {
                    layer.slot_bytes
                } else {
                    conv
                },
            shift,
            casts,
            views,
            home: Home::Stream,
        })
    }
}

/// The names of the FP8 scale tensors of `layer`'s weights.
fn fp8_scales(layer: &Layer) -> Vec<&str> {
    let scales = layer.tensors.iter().filter_map(|t| t.info.scale.as_ref());
    scales.map(|s| s.tensor.as_str()).collect()
}

/// Whether `t` is a quantized weight (ggml blocks or FP8) or one of the FP8
/// scales `scales`: what travels as stored when the layer function
/// dequantizes at use.
fn is_blocks(t: &LayerTensor, scales: &[&str]) -> bool {
    let info = &t.info;
    info.quant.is_some() || info.scale.is_some() || scales.contains(&info.name.as_str())
}

/// The shift (below [`CAST_ALIGN`]) that puts the most bytes of `layer`'s
/// tensors used as stored (`as_stored`) at [`CAST_ALIGN`]-aligned slot
/// offsets; ties go to the smaller shift.
fn layer_shift(layer: &Layer, as_stored: impl Fn(&LayerTensor) -> bool) -> u64 {
    let mut bytes_by_shift = std::collections::BTreeMap::<u64, u64>::new();
    for t in layer.tensors.iter().filter(|t| as_stored(t)) {
        let need = (CAST_ALIGN - t.slot_offset % CAST_ALIGN) % CAST_ALIGN;
        *bytes_by_shift.entry(need).or_default() += t.info.len;
    }
    bytes_by_shift
        .into_iter()
        .max_by_key(|&(shift, bytes)| (bytes, std::cmp::Reverse(shift)))
        .map_or(0, |(shift, _)| shift)
}

/// The dtype a tensor is converted to on the device for the compute dtype
/// `dtype`, or `None` when it travels as stored. Block-quantized and FP8
/// weights dequantize to bf16 or f16 only.
pub(crate) fn cast_target(
    model: &ModelIndex,
    info: &TensorInfo,
    dtype: Option<DType>,
) -> Result<Option<DType>> {
    let file = || model.files()[info.file].path.display();
    let stored = if info.quant.is_some() || info.scale.is_some() {
        Some(info.stored_type())
    } else {
        None
    };
    Ok(match (dtype, stored) {
        (Some(d @ (DType::BF16 | DType::F16)), Some(_)) => Some(d),
        (Some(d), Some(ty)) => {
            return Err(Error::config(format!(
                "tensor {} of {} is {ty}, which dequantizes to bf16 or f16 only, not the \
                 compute dtype {d}",
                info.name,
                file(),
            )))
        }
        (None, _) => None,
        (Some(d), None) if d != info.dtype && info.dtype.is_castable_float() => Some(d),
        (Some(d), None) if d != info.dtype && is_float(info.dtype) => {
            return Err(Error::config(format!(
                "tensor {} of {} is {}, which cannot be cast to the compute dtype {d}",
                info.name,
                file(),
                info.dtype
            )))
        }
        _ => None,
    })
}

/// The type the dequantization kernels read when `info` is converted to
/// `to`: its block type, or, for a plain float going to f16, that float
/// (the cast kernels write bf16 only; the dequantization kernels write both,
/// saturating at f16's range). `None` when the cast kernels (into bf16) or
/// the FP8 kernels do the conversion.
pub(crate) fn dequant_source(info: &TensorInfo, to: DType) -> Option<QuantType> {
    match info.quant {
        Some(q) => Some(q),
        None if to == DType::F16 && info.scale.is_none() => QuantType::from_dtype(info.dtype),
        None => None,
    }
}

/// An FP8 weight's decode and the slot offset of its scale tensor, which
/// must be a tensor of the same layer; `None` for other tensors.
fn fp8_source(
    model: &ModelIndex,
    layer: &Layer,
    t: &LayerTensor,
) -> Result<Option<(Fp8Layout, u64)>> {
    let Some(scale) = &t.info.scale else {
        return Ok(None);
    };
    let file = &model.files()[t.info.file].path;
    let found = layer.tensors.iter().find(|s| s.info.name == scale.tensor);
    let Some(s) = found else {
        return Err(Error::model(
            file,
            format!(
                "the scale {} of FP8 weight {} is not a tensor of layer {}",
                scale.tensor, t.info.name, layer.index
            ),
        ));
    };
    let layout = Fp8Layout::of(t.info.dtype, &t.info.shape, scale)
        .map_err(|e| Error::model(file, format!("tensor {}: {e}", t.info.name)))?;
    if s.info.len != layout.scale_bytes() {
        return Err(Error::model(
            file,
            format!(
                "the scale {} of FP8 weight {} holds {} bytes, expected {}",
                scale.tensor,
                t.info.name,
                s.info.len,
                layout.scale_bytes()
            ),
        ));
    }
    Ok(Some((layout, s.slot_offset)))
}

fn is_float(d: DType) -> bool {
    matches!(
        d,
        DType::BF16 | DType::F16 | DType::F32 | DType::F64 | DType::F8E4M3 | DType::F8E5M2
    )
}

/// The weights of one layer, on the device, as the layer function sees them.
///
/// # How long the weights stay
/// The layer's device slot is recycled once the work queued on the pass's
/// compute stream up to the layer function's return has finished: the next
/// copy into the slot waits for it on the device. Work the layer function
/// queues on *another* stream is not covered; call
/// [`release_after`](Self::release_after) (or
/// [`release_after_cuda`](Self::release_after_cuda)) after queuing it, and
/// the slot is not overwritten until that stream's work up to the call has
/// finished too.
pub struct LayerWeights<'a> {
    pub(crate) layer: usize,
    pub(crate) base: u64,
    pub(crate) plan: &'a LayerPlan,
    /// Length of the host memory at `base` on the host backend.
    pub(crate) host_len: Option<usize>,
    /// The layer's release event; `None` where the weights cannot be held
    /// (a device cache buffer, which is never recycled, or a test).
    pub(crate) release: Option<&'a EventH>,
    /// Set once the release event has been recorded on another stream.
    pub(crate) held: AtomicBool,
    /// The streamer's row split, when the CPU computes a share of the rows.
    pub(crate) split: Option<&'a RowSplit>,
}

impl<'a> LayerWeights<'a> {
    /// The layer's index.
    pub fn layer(&self) -> usize {
        self.layer
    }

    /// The tensor with this key (e.g. `self_attn.q_proj.weight`).
    pub fn get(&self, key: &str) -> Option<TensorView<'a>> {
        self.plan
            .views
            .iter()
            .find(|v| v.key == key)
            .map(|v| self.view(v))
    }

    /// Like [`get`](Self::get), with an error naming the missing key.
    pub fn tensor(&self, key: &str) -> crate::Result<TensorView<'a>> {
        self.get(key).ok_or_else(|| {
            Error::UnknownTensor(format!(
                "layer {} has no tensor with key {key:?}",
                self.layer
            ))
        })
    }

    /// Every tensor of the layer, in file order.
    pub fn tensors(&self) -> impl Iterator<Item = TensorView<'a>> + '_ {
        self.plan.views.iter().map(|v| self.view(v))
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.plan.views.len()
    }

    /// Whether the layer has no tensors.
    pub fn is_empty(&self) -> bool {
        self.plan.views.is_empty()
    }

    /// On the host backend, the bytes of a tensor; `None` on CUDA, where the
    /// bytes live on the device.
    pub fn host_bytes(&self, view: &TensorView<'_>) -> Option<&'a [u8]> {
        let len = self.host_len?;
        // Checked: a view of another layer (or of another streamer) must not
        // wrap around to an in-bounds-looking range.
        let off = usize::try_from(view.ptr.checked_sub(self.base)?).ok()?;
        let n = usize::try_from(view.bytes).ok()?;
        if off.checked_add(n)? > len {
            return None;
        }
        // SAFETY: on the host backend `base` is the start of a live host
        // allocation of `len` bytes (the slot), the range is inside it, and
        // the pipeline does not write the slot while this `LayerWeights`
        // (and so the layer function that holds it) is alive.
        Some(unsafe { std::slice::from_raw_parts(view.ptr as *const u8, n) })
    }

    /// The CPU's rows of the weight with this key, in host memory, when the
    /// streamer splits rows (a `cpu_share` above 0): the device view
    /// ([`get`](Self::get)) then holds rows `0 .. first_row` of the tensor
    /// and these the rest. `None` for a tensor that is not split (1-D
    /// tensors, FP8 weights, or no split at all): the device view has every
    /// row. The bytes stay valid as long as the streamer.
    pub fn host_rows(&self, key: &str) -> Option<HostRows<'a>> {
        self.split?.rows(self.layer, key)
    }

    /// Keys of the tensors with [`host_rows`](Self::host_rows), in file order.
    pub fn host_row_keys(&self) -> impl Iterator<Item = &'a str> + '_ {
        self.split.into_iter().flat_map(|s| s.keys(self.layer))
    }

    /// The CPU share the streamer splits rows at (0 without a split).
    pub fn cpu_share(&self) -> f64 {
        self.split.map_or(0.0, |s| s.share)
    }

    /// Adds to the pass's CPU-side statistics ([`PassStats::cpu`]): time the
    /// CPU spent computing its rows of this layer, and time it waited for
    /// the device side. A no-op without a split.
    ///
    /// [`PassStats::cpu`]: crate::PassStats::cpu
    pub fn note_cpu_side(&self, busy: std::time::Duration, stalled: std::time::Duration) {
        if let Some(s) = self.split {
            s.note(busy, stalled);
        }
    }

    /// Keeps this layer's device slot from being overwritten until the work
    /// queued on `stream` so far (a stream other than the pass's compute
    /// stream) has finished. Call it after queuing work there that reads the
    /// weights; a later call replaces an earlier one, so with several
    /// streams, join them into one first. Without it, a slot is recycled as
    /// soon as the compute stream's work is done.
    pub fn release_after(&self, stream: &ComputeStream) -> Result<()> {
        if let Some(ev) = self.release {
            stream.inner.record(ev)?;
            // Relaxed: read by the compute side on this thread after the
            // layer function returns.
            self.held.store(true, Ordering::Relaxed);
        }
        Ok(())
    }

    /// [`release_after`](Self::release_after) for a CUDA stream of the caller's.
    pub fn release_after_cuda(&self, stream: &cuda::Stream) -> Result<()> {
        match self.release {
            Some(EventH::Cuda(ev)) => {
                ev.record(stream)?;
                self.held.store(true, Ordering::Relaxed);
                Ok(())
            }
            Some(EventH::Host(_)) => Err(Error::config(
                "release_after_cuda on the host backend: there is no CUDA stream to wait for",
            )),
            None => Ok(()),
        }
    }

    /// [`release_after`](Self::release_after) for a raw `CUstream`.
    ///
    /// # Safety
    /// `stream` is a live stream of the streamer's CUDA context (or null, the
    /// legacy default stream).
    pub(crate) unsafe fn release_after_raw(
        &self,
        stream: cudarc::driver::sys::CUstream,
    ) -> Result<()> {
        match self.release {
            Some(ev @ EventH::Cuda(_)) => {
                // SAFETY: forwarded from this function's contract.
                unsafe { ev.record_raw(stream)? };
                self.held.store(true, Ordering::Relaxed);
                Ok(())
            }
            Some(EventH::Host(_)) if stream.is_null() => Ok(()),
            Some(EventH::Host(_)) => Err(Error::config(
                "a CUDA stream was given on the host backend, which has none",
            )),
            None => Ok(()),
        }
    }

    fn view(&self, v: &'a ViewPlan) -> TensorView<'a> {
        TensorView {
            key: &v.key,
            name: &v.name,
            ptr: self.base + v.offset,
            dtype: v.dtype,
            shape: &v.shape,
            bytes: v.bytes,
            quant: v.quant,
            scale: v.scale.as_ref(),
        }
    }
}

#[cfg(test)]
#[path = "plan_tests.rs"]
mod tests;
