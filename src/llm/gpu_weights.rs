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
//! A pass of at most
//! [`GEMV_MAX_TOKENS`](crate::quant::device::GEMV_MAX_TOKENS) tokens (decoding) multiplies a
//! weight stored as ggml blocks without the scratch: one fused kernel
//! ([`DequantKernels::gemv`]) decodes each row and multiplies it with the
//! tokens, reading the stored bytes once instead of writing and reading
//! the dequantized matrix and launching a GEMM ([`SlotWeights::linear`]).
//! A larger pass dequantizes such a weight a chunk of rows at a time
//! ([`blocks_product`]), so the scratch stays at
//! [`BLOCKS_SCRATCH_BYTES`](super::BLOCKS_SCRATCH_BYTES); only FP8 weights,
//! whose scales span blocks of rows, are dequantized whole.
//!
//! [`Dequant::Use`]: crate::Dequant::Use

use std::sync::Arc;

use crate::cuda::cublas::{Cublas, GemmType};
use crate::cuda::{Context, DeviceBuffer, Stream};
use crate::llm::config::ModelConfig;
use crate::llm::gpu_blocks::{blocks_product, Blocks, Scratch, Shape, BLOCKS_SCRATCH_BYTES};
use crate::llm::gpu_gemm::linear_split;
use crate::llm::gpu_kernels::Split;
use crate::quant::device::DequantKernels;
use crate::quant::fp8::Fp8Layout;
use crate::quant::QuantType;
use crate::{DType, Error, LayerStreamer, LayerWeights, Result, TensorView};

/// The scratch weights stored as blocks are dequantized into before their
/// GEMM, and the kernels that do it.
pub(crate) struct AtUse {
    kernels: DequantKernels,
    scratch: DeviceBuffer,
    /// Capacity of `scratch` in 16-bit elements.
    elems: usize,
    /// The least capacity that serves every weight: a row of the widest
    /// one, or with FP8 weights (dequantized whole) the largest one.
    least: usize,
}

/// 16-bit elements of the at-use scratch: a chunk of
/// [`BLOCKS_SCRATCH_BYTES`] (ggml blocks are dequantized a chunk of rows at
/// a time), no more than the largest weight; with `fp8` weights, which are
/// dequantized whole, the largest weight.
pub(crate) fn scratch_elems(cfg: &ModelConfig, fp8: bool) -> usize {
    let (h, inter) = (cfg.hidden, cfg.intermediate);
    let largest = [inter * h, cfg.q_dim() * h, cfg.kv_dim() * h]
        .into_iter()
        .max()
        .unwrap_or(0);
    if fp8 {
        largest
    } else {
        (BLOCKS_SCRATCH_BYTES / 2).min(largest)
    }
}

impl AtUse {
    /// The scratch as [`blocks_product`] takes it.
    fn scratch(&self) -> Scratch {
        Scratch {
            ptr: self.scratch.ptr(),
            elems: self.elems,
        }
    }

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
        let fp8 = streamer.model().has_fp8_layers();
        let widest = cfg.hidden.max(cfg.intermediate).max(cfg.q_dim());
        let least = if fp8 {
            scratch_elems(cfg, true)
        } else {
            widest
        };
        let elems = scratch_elems(cfg, fp8);
        Ok(Some(Arc::new(AtUse::with_elems(ctx, elems, least)?)))
    }

    /// The kernels and a scratch of `elems` 16-bit values.
    fn with_elems(ctx: &Context, elems: usize, least: usize) -> Result<AtUse> {
        Ok(AtUse {
            kernels: DequantKernels::load(ctx)?,
            scratch: alloc_scratch(ctx, elems)?,
            elems,
            least,
        })
    }

    /// A scratch of `bytes` (at least [`least`](Self::least) values), the
    /// kernels kept. The old scratch is freed first, since the new one may
    /// not fit beside it; if the new one can't be had, the scratch holds
    /// nothing and every product that needs it is an error.
    pub(crate) fn resize(this: &mut Arc<AtUse>, bytes: usize) -> Result<()> {
        let me = Arc::get_mut(this).ok_or_else(|| {
            Error::Pipeline("the dequantization scratch is in use by a pass".into())
        })?;
        let elems = (bytes / 2).max(me.least);
        let ctx = me.scratch.context().clone();
        me.elems = 0;
        me.scratch = DeviceBuffer::alloc(&ctx, 4)?;
        me.scratch = alloc_scratch(&ctx, elems)?;
        me.elems = elems;
        Ok(())
    }
}

/// The at-use scratch of `elems` 16-bit values.
fn alloc_scratch(ctx: &Context, elems: usize) -> Result<DeviceBuffer> {
    DeviceBuffer::alloc(ctx, (elems * 2).max(4)).map_err(|e| {
        Error::config(format!(
            "the scratch that quantized weights are dequantized into at use \
             ({elems} 16-bit values) does not fit: {e}"
        ))
    })
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
        self.checked(self.w.tensor(key)?)
    }

    /// `v`, when it is of the model's dtype.
    fn checked<'v>(&self, v: TensorView<'v>) -> Result<TensorView<'v>> {
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
    /// the scratch after queueing its dequantization there on `s`. What was
    /// dequantized into the scratch before is overwritten: a caller uses
    /// one weight's address before asking for the next (work on `s` is
    /// ordered).
    pub(crate) fn matrix(&self, key: &str, s: &Stream) -> Result<u64> {
        let v = self.w.tensor(key)?;
        if v.quant().is_none() && v.fp8_scale().is_none() {
            return self.checked(v).map(|v| v.ptr());
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
        if n > u.elems {
            return Err(Error::Pipeline(format!(
                "{} ({n} elements) does not fit the dequantization scratch of {}",
                v.name(),
                u.elems
            )));
        }
        let dst = u.scratch.ptr();
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

impl SlotWeights<'_, '_> {
    /// Queues `y = beta · y + x · Wᵀ` on `s` for weight `key` (`[n, k]`),
    /// `t` tokens of `x` (`[t, k]`, `hi + lo`, of the model's dtype) and
    /// `y` (`[t, n]` of `yt`): ggml blocks through [`blocks_product`] (the
    /// fused GEMV for a few tokens, else chunks of rows dequantized into the
    /// scratch), anything else as the weight's [`matrix`](Self::matrix)
    /// through [`linear_split`]. Every path multiplies the same rounded
    /// weights.
    ///
    /// # Safety
    /// As for [`linear_split`] with `w` the weight: `x` and `y` device
    /// memory of the stream's context for those shapes, live until the
    /// queued work completes; cuBLAS's stream is `s`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) unsafe fn linear(
        &self,
        blas: &mut Cublas,
        key: &str,
        x: Split,
        (y, yt): (u64, GemmType),
        (t, n, k): (usize, usize, usize),
        beta: f32,
        s: &Stream,
    ) -> Result<()> {
        let xw = GemmType::half_of(self.dtype);
        let v = self.w.tensor(key)?;
        let (Some(ty), Some(u)) = (v.quant().filter(|q| q.is_quantized()), &self.at_use) else {
            let w = self.matrix(key, s)?;
            // SAFETY: `w` is the weight as an [n, k] matrix of the model's
            // dtype (in the slot or the scratch, queued on `s`); the rest
            // is the caller's contract.
            return unsafe { linear_split(blas, xw, x, w, y, yt, t, n, k, beta) };
        };
        let bytes = ty.row_bytes(k as u64).ok().map(|b| b * n as u64);
        if v.numel() != n * k || bytes != Some(v.bytes()) {
            return Err(Error::Pipeline(format!(
                "{} holds {} elements in {} bytes, not [{n}, {k}] of {ty}",
                v.name(),
                v.numel(),
                v.bytes()
            )));
        }
        let b = Blocks { ty, w: v.ptr() };
        let sh = Shape {
            t,
            rows: n,
            k,
            ldy: n,
        };
        // SAFETY: the view's bytes are the weight's n rows of k / block
        // elements' blocks in the live slot (their size checked above); the
        // scratch is read only by work this queues; x and y are the
        // caller's contract.
        unsafe {
            blocks_product(
                blas,
                &u.kernels,
                u.scratch(),
                self.dtype,
                b,
                x,
                (y, yt),
                sh,
                beta,
                s,
            )
        }
    }
}

/// Where the rows of a weight lie on the device for [`rows_product`].
#[derive(Debug, Clone, Copy)]
pub(crate) enum RowsSrc {
    /// A 16-bit matrix of the model's dtype.
    Plain(u64),
    /// Stored ggml blocks of this type, whole rows back to back.
    Blocks(QuantType, u64),
}

impl SlotWeights<'_, '_> {
    /// Weight `key` in the slot as [`rows_product`] reads it: stored blocks
    /// as they are, anything else as the 16-bit matrix [`matrix`](Self::matrix)
    /// gives (FP8 dequantized into the scratch on `s`).
    pub(crate) fn rows_src(&self, key: &str, s: &Stream) -> Result<RowsSrc> {
        let v = self.w.tensor(key)?;
        match v.quant() {
            Some(q) if q.is_quantized() && self.at_use.is_some() => Ok(RowsSrc::Blocks(q, v.ptr())),
            _ => self.matrix(key, s).map(RowsSrc::Plain),
        }
    }
}

/// Queues `y[:, ..rows] = beta · y + x · Wᵀ` on `s` for `rows` rows of a
/// weight (`k` elements each) at `src`: f32 `y` rows `ldy` apart, `t`
/// tokens of `x` (`hi + lo` of `dtype`). Blocks go through
/// [`blocks_product`].
///
/// # Safety
/// `src` holds those rows (of `dtype`, or whole blocks of its type) on the
/// device, `x` `t × k` and `y` `t` rows of `ldy >= rows` f32, live until
/// the queued work completes; cuBLAS's stream is `s`; no queued work still
/// reads the scratch unless ordered before on `s`.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn rows_product(
    blas: &mut Cublas,
    (dtype, at_use): (DType, Option<&AtUse>),
    src: RowsSrc,
    x: Split,
    y: u64,
    (t, rows, k, ldy): (usize, usize, usize, usize),
    beta: f32,
    s: &Stream,
) -> Result<()> {
    let hw = GemmType::half_of(dtype);
    let f = GemmType::F32;
    let w = match src {
        RowsSrc::Plain(w) => w,
        RowsSrc::Blocks(ty, w) => {
            let u = at_use.ok_or_else(|| {
                Error::Pipeline(format!(
                    "{ty} rows reached the split without the at-use kernels"
                ))
            })?;
            let (b, sh) = (Blocks { ty, w }, Shape { t, rows, k, ldy });
            // SAFETY: the caller's contract: whole blocks of `rows` rows at
            // `w`, `x` and `y` of those shapes; the scratch is ordered on `s`.
            return unsafe {
                blocks_product(
                    blas,
                    &u.kernels,
                    u.scratch(),
                    dtype,
                    b,
                    x,
                    (y, f),
                    sh,
                    beta,
                    s,
                )
            };
        }
    };
    // SAFETY: `w` is `rows × k` of `dtype` on the device; `x`, `y` are the
    // caller's contract.
    unsafe {
        blas.linear_ld(x.hi, w, hw, y, f, t, rows, k, beta, ldy)?;
        if x.lo != 0 {
            blas.linear_ld(x.lo, w, hw, y, f, t, rows, k, 1.0, ldy)?;
        }
    }
    Ok(())
}
