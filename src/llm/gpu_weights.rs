//! A layer's weights as the CUDA forward pass reads them: 16-bit matrices of
//! the model's dtype, either in the layer's device slot or, when the
//! streamer hands quantized weights over as stored ([`Dequant::Use`]),
//! dequantized at use into one scratch that every layer shares.
//!
//! Dequantizing at use keeps only the stored bytes in the slots and the GPU
//! cache (a 70B Q4_K layer is 0.48 GB stored, 1.71 GB in f16), at the cost
//! of running the dequantization kernels on the compute stream, just before
//! each GEMM; they write each weight once per pass, as the slot's
//! dequantization did.
//!
//! [`Dequant::Use`]: crate::Dequant::Use

use std::sync::Arc;

use crate::cuda::{Context, DeviceBuffer, Stream};
use crate::llm::config::ModelConfig;
use crate::quant::device::DequantKernels;
use crate::quant::fp8::Fp8Layout;
use crate::{DType, Error, LayerStreamer, LayerWeights, Result, TensorView};

/// The scratch weights stored as blocks are dequantized into before their
/// GEMM, and the kernels that do it.
pub(crate) struct AtUse {
    kernels: DequantKernels,
    scratch: DeviceBuffer,
    /// Capacity of `scratch` in 16-bit elements.
    elems: usize,
}

/// 16-bit elements of the largest operand the forward pass dequantizes at
/// once: the gate and up projections side by side, or any other weight.
pub(crate) fn scratch_elems(cfg: &ModelConfig) -> usize {
    let (h, inter) = (cfg.hidden, cfg.intermediate);
    [2 * inter * h, cfg.q_dim() * h, cfg.kv_dim() * h]
        .into_iter()
        .max()
        .unwrap_or(0)
}

impl AtUse {
    /// The scratch for `streamer`'s layers when they reach the layer
    /// function as stored blocks, else `None` (nothing is allocated).
    pub(crate) fn for_streamer(
        ctx: &Context,
        streamer: &LayerStreamer,
        cfg: &ModelConfig,
    ) -> Result<Option<Arc<AtUse>>> {
        let keeps = streamer.config().dequant.keeps_blocks() && streamer.config().dtype.is_some();
        if !(keeps && streamer.model().has_quantized_layers()) {
            return Ok(None);
        }
        let elems = scratch_elems(cfg);
        let scratch = DeviceBuffer::alloc(ctx, (elems * 2).max(4)).map_err(|e| {
            Error::config(format!(
                "the scratch that quantized weights are dequantized into at use \
                 ({elems} 16-bit values, the gate and up projections) does not fit: {e}"
            ))
        })?;
        Ok(Some(Arc::new(AtUse {
            kernels: DequantKernels::load(ctx)?,
            scratch,
            elems,
        })))
    }
}

/// A layer's weights in its device slot, each read as a 16-bit matrix of
/// the model's dtype.
pub(crate) struct SlotWeights<'a, 'w> {
    pub(crate) w: &'a LayerWeights<'w>,
    pub(crate) dtype: DType,
    pub(crate) at_use: Option<Arc<AtUse>>,
}

impl SlotWeights<'_, '_> {
    /// The device address of tensor `key`, checking its dtype.
    pub(crate) fn ptr(&self, key: &str) -> Result<u64> {
        self.view(key).map(|v| v.ptr())
    }

    /// Tensor `key`, checking its dtype.
    pub(crate) fn view(&self, key: &str) -> Result<TensorView<'_>> {
        let v = self.w.tensor(key)?;
        if v.dtype() != self.dtype {
            return Err(Error::config(format!(
                "{} is {} on the device but the embedding is {}; build the streamer \
                 with LlamaModel::streamer_config",
                v.name(),
                v.dtype(),
                self.dtype
            )));
        }
        Ok(v)
    }

    /// Whether tensor `key` is handed over as stored blocks (a ggml block
    /// type or FP8), to be dequantized at use.
    pub(crate) fn stored(&self, key: &str) -> Result<bool> {
        let v = self.w.tensor(key)?;
        Ok(v.quant().is_some() || v.fp8_scale().is_some())
    }

    /// The device address of weight `key` as a 16-bit matrix of the model's
    /// dtype: where it lies in the slot, or, when it is stored as blocks,
    /// `at` elements into the scratch after queueing its dequantization
    /// there on `s`. What was dequantized into the scratch before is
    /// overwritten: a caller uses one weight's address before asking for the
    /// next at an overlapping place (work on `s` is ordered).
    pub(crate) fn matrix(&self, key: &str, at: usize, s: &Stream) -> Result<u64> {
        let v = self.w.tensor(key)?;
        if v.quant().is_none() && v.fp8_scale().is_none() {
            return self.view(key).map(|v| v.ptr());
        }
        let Some(u) = &self.at_use else {
            return Err(Error::config(format!(
                "{} reaches the forward pass as stored {} blocks, but the model was loaded \
                 for a streamer that dequantizes in the slots",
                v.name(),
                v.quant()
                    .map_or_else(|| v.dtype().to_string(), |q| q.to_string()),
            )));
        };
        let n = v.numel();
        if at.checked_add(n).is_none_or(|end| end > u.elems) {
            return Err(Error::Pipeline(format!(
                "{} ({n} elements at {at}) does not fit the dequantization scratch of {}",
                v.name(),
                u.elems
            )));
        }
        let dst = u.scratch.ptr() + 2 * at as u64;
        // SAFETY: the view's bytes are the stored tensor in the live slot
        // (`n` elements' blocks, or an FP8 weight and its scale tensor of the
        // same layer, checked against its layout); `dst` has room for `n`
        // 16-bit values (checked above) and does not overlap the slot; work
        // on `s` that reads the scratch was queued before and completes
        // first.
        unsafe {
            match (v.quant(), v.fp8_scale()) {
                (Some(q), _) => u
                    .kernels
                    .dequantize(q, self.dtype, v.ptr(), dst, n as u64, s)?,
                (None, Some(scale)) => {
                    let layout = Fp8Layout::of(v.dtype(), v.shape(), scale)
                        .map_err(|e| Error::Input(format!("tensor {}: {e}", v.name())))?;
                    let sv = self.scale_view(&scale.tensor, layout.scale_bytes(), v.name())?;
                    u.kernels
                        .dequantize_fp8(&layout, self.dtype, v.ptr(), sv, dst, s)?
                }
                (None, None) => unreachable!("checked above"),
            }
        }
        Ok(dst)
    }

    /// The device address of the FP8 scale tensor `name` of `bytes` bytes,
    /// a tensor of the same layer as weight `weight`.
    fn scale_view(&self, name: &str, bytes: u64, weight: &str) -> Result<u64> {
        let found = self.w.tensors().find(|t| t.name() == name);
        match found {
            Some(t) if t.bytes() == bytes => Ok(t.ptr()),
            Some(t) => Err(Error::Input(format!(
                "the scale {name} of FP8 weight {weight} holds {} bytes, expected {bytes}",
                t.bytes()
            ))),
            None => Err(Error::UnknownTensor(format!(
                "{name} (the scale of FP8 weight {weight})"
            ))),
        }
    }
}
