//! The embedding of the CUDA forward pass, held so that it costs little
//! VRAM (in 16 bits, a 70B model's is 2.1 GB; see also
//! [`gpu_output`](super::gpu_output)).
//!
//! An untied embedding stays in host memory as stored (its
//! ggml blocks or floats). Each pass dequantizes the rows of its tokens on
//! the host into the model's 16-bit dtype, rounded exactly as the device's
//! dequantization and cast kernels round, widens them to f32 and uploads
//! them into the residual stream through a pinned staging buffer: the same
//! values the device lookup of a 16-bit matrix gives. A tied embedding is
//! the output matrix too, which the device needs, so it stays there, once:
//! as the output's stored blocks when quantized (looked up by a kernel that
//! dequantizes the tokens' rows, see
//! [`gather_rows_f32`](crate::quant::device::DequantKernels::gather_rows_f32)),
//! else in the 16-bit dtype.

use std::os::unix::fs::FileExt;

use half::{bf16, f16};
use rayon::prelude::*;

use crate::checkpoint::TensorInfo;
use crate::cuda::{memcpy_htod_async, Context, Event, Stream};
use crate::llm::gpu_io::StagingBuf;
use crate::llm::gpu_kernels::ModelKernels;
use crate::llm::gpu_output::OutputHead;
use crate::quant::{self, QuantType};
use crate::{DType, DeviceTensor, Error, LayerStreamer, ModelIndex, Result};

/// The type the host reads a static tensor's stored bytes as: its ggml
/// block type or plain float. FP8 statics are refused, as in
/// [`LayerStreamer::load_static`].
pub(crate) fn stored_type(index: &ModelIndex, info: &TensorInfo) -> Result<QuantType> {
    let file = || index.files()[info.file].path.clone();
    if info.scale.is_some() {
        return Err(Error::model(
            file(),
            format!(
                "static tensor {} is an FP8 weight; the embedding and output load from \
                 floats or ggml blocks",
                info.name
            ),
        ));
    }
    info.quant
        .or_else(|| QuantType::from_dtype(info.dtype))
        .ok_or_else(|| {
            Error::model(
                file(),
                format!(
                    "static tensor {} is {}, not a float or ggml block type",
                    info.name, info.dtype
                ),
            )
        })
}

/// A static tensor's stored bytes, read from its file.
pub(crate) fn read_stored(index: &ModelIndex, info: &TensorInfo) -> Result<Vec<u8>> {
    let path = &index.files()[info.file].path;
    let len = usize::try_from(info.len)
        .map_err(|_| Error::model(path, format!("tensor {} of {} bytes", info.name, info.len)))?;
    let f = std::fs::File::open(path).map_err(|e| Error::io("opening", path, None, e))?;
    let mut out = vec![0u8; len];
    f.read_exact_at(&mut out, info.file_offset).map_err(|e| {
        let op = format!("reading {len} bytes of tensor {}", info.name);
        Error::io(op, path, Some(info.file_offset), e)
    })?;
    Ok(out)
}

/// Bytes of one row of `hidden` elements of `ty`.
pub(crate) fn row_bytes(ty: QuantType, hidden: usize, what: &str) -> Result<usize> {
    ty.row_bytes(hidden as u64)
        .map(|b| b as usize)
        .map_err(|e| Error::Input(format!("{what}: rows of {hidden}: {e}")))
}

/// Rows `tokens` of a `[rows, hidden]` matrix stored as `ty` in `bytes`,
/// each dequantized to `dtype` (bf16 or f16, rounded as the device kernels
/// round: [`quant::dequantize_bf16`], [`quant::dequantize_f16`]) and widened
/// to f32 into `out` (`tokens.len() * hidden` values).
pub(crate) fn gather_rows(
    bytes: &[u8],
    ty: QuantType,
    hidden: usize,
    dtype: DType,
    tokens: &[u32],
    out: &mut [f32],
) -> Result<()> {
    let rb = row_bytes(ty, hidden, "embedding")?;
    if out.len() != tokens.len() * hidden {
        return Err(Error::Pipeline(format!(
            "{} embedding rows of {hidden} do not fit {} values",
            tokens.len(),
            out.len()
        )));
    }
    if !matches!(dtype, DType::BF16 | DType::F16) {
        return Err(Error::config(format!(
            "the CUDA forward pass runs in bf16 or f16, not {dtype}"
        )));
    }
    // Rows in parallel: a prefill pass gathers thousands of them, ahead of
    // its first layer.
    out.par_chunks_mut(hidden.max(1))
        .zip(tokens.par_iter())
        .try_for_each_init(
            || (vec![bf16::ZERO; hidden], vec![f16::ZERO; hidden]),
            |(b, h), (row, &tok)| {
                let at = (tok as usize).checked_mul(rb);
                let src = at
                    .and_then(|a| bytes.get(a..a.checked_add(rb)?))
                    .ok_or_else(|| {
                        Error::Input(format!(
                            "token {tok} is outside the embedding of {} rows",
                            bytes.len() / rb.max(1)
                        ))
                    })?;
                if dtype == DType::BF16 {
                    quant::dequantize_bf16(ty, src, b)?;
                    row.iter_mut()
                        .zip(b.iter())
                        .for_each(|(o, v)| *o = v.to_f32());
                } else {
                    quant::dequantize_f16(ty, src, h)?;
                    row.iter_mut()
                        .zip(h.iter())
                        .for_each(|(o, v)| *o = v.to_f32());
                }
                Ok(())
            },
        )
}

/// The dtype the CUDA forward pass computes in: the streamer's compute
/// dtype, or in file dtypes the embedding's.
pub(crate) fn model_dtype(streamer: &LayerStreamer, embed: &str) -> Result<DType> {
    match streamer.config().dtype {
        Some(d) => Ok(d),
        None => streamer
            .model()
            .tensor(embed)
            .map(|t| t.dtype)
            .ok_or_else(|| Error::UnknownTensor(embed.to_string())),
    }
}

/// An untied embedding in host memory, gathered per pass.
pub(crate) struct HostEmbedding {
    bytes: Vec<u8>,
    ty: QuantType,
    hidden: usize,
    dtype: DType,
    /// `max_tokens × hidden` f32 rows on their way to the device.
    staging: StagingBuf,
    /// Recorded after the upload out of `staging`.
    copied: Event,
    /// Whether an upload may still read `staging`.
    pending: bool,
}

impl HostEmbedding {
    fn load(
        ctx: &Context,
        index: &ModelIndex,
        info: &TensorInfo,
        dtype: DType,
        hidden: usize,
        max_tokens: usize,
    ) -> Result<HostEmbedding> {
        let ty = stored_type(index, info)?;
        row_bytes(ty, hidden, &info.name)?;
        Ok(HostEmbedding {
            bytes: read_stored(index, info)?,
            ty,
            hidden,
            dtype,
            staging: StagingBuf::new(ctx, max_tokens * hidden * 4)?,
            copied: Event::new(ctx, false)?,
            pending: false,
        })
    }

    /// Queues the upload of `tokens`' rows, as f32, to `x` on `s`.
    fn queue(&mut self, s: &Stream, tokens: &[u32], x: u64) -> Result<()> {
        if self.pending {
            // The last upload (of a pass that may have failed before its
            // final synchronize) must be done reading the staging buffer.
            self.copied.synchronize()?;
            self.pending = false;
        }
        let bytes = tokens.len() * self.hidden * 4;
        let staged = self.staging.buf.as_mut_slice().get_mut(..bytes);
        let floats = staged
            .and_then(|b| bytemuck::try_cast_slice_mut::<u8, f32>(b).ok())
            .ok_or_else(|| {
                Error::Pipeline(format!(
                    "{} embedding rows do not fit the staging buffer",
                    tokens.len()
                ))
            })?;
        gather_rows(
            &self.bytes,
            self.ty,
            self.hidden,
            self.dtype,
            tokens,
            floats,
        )?;
        // SAFETY: the first `bytes` bytes of the staging buffer were written
        // above and are not written again before `copied` (recorded right
        // after) has completed (`pending`); `x` holds max_tokens rows of
        // `hidden` f32s, and the staging buffer was sized for as many.
        unsafe { memcpy_htod_async(x, self.staging.buf.as_ptr(), bytes, s)? };
        if let Err(e) = self.copied.record(s) {
            // Without the event, wait for the copy here before the buffer
            // can be written again (the error is the one to report).
            let _ = s.synchronize();
            return Err(e);
        }
        self.pending = true;
        Ok(())
    }
}

/// Where the embedding is looked up.
pub(crate) enum Embedding {
    /// Tied: the 16-bit `[vocab, hidden]` matrix on the device, which the
    /// output GEMM reads too.
    Device(DeviceTensor),
    /// Untied: the stored bytes in host memory.
    Host(Box<HostEmbedding>),
    /// Tied and quantized: the output matrix's blocks on the device
    /// ([`OutputHead::Chunked`]).
    Blocks,
}

impl Embedding {
    /// The embedding `name` for a forward pass in `dtype`: on the device
    /// when `tied`, else in host memory.
    pub(crate) fn load(
        streamer: &LayerStreamer,
        name: &str,
        tied: bool,
        dtype: DType,
        hidden: usize,
        max_tokens: usize,
    ) -> Result<Embedding> {
        if tied {
            return Ok(Embedding::Device(streamer.load_static(name)?));
        }
        let ctx = streamer
            .context()
            .ok_or_else(|| Error::Pipeline("the CUDA model needs a CUDA streamer".into()))?;
        let index = streamer.model();
        let info = index
            .tensor(name)
            .ok_or_else(|| Error::UnknownTensor(name.to_string()))?;
        let h = HostEmbedding::load(ctx, index, info, dtype, hidden, max_tokens)?;
        Ok(Embedding::Host(Box::new(h)))
    }

    /// The device matrix of a tied embedding.
    pub(crate) fn device_matrix(&self) -> Option<&DeviceTensor> {
        match self {
            Embedding::Device(t) => Some(t),
            Embedding::Host(_) | Embedding::Blocks => None,
        }
    }

    /// Queues `x[i] = f32(embedding[tokens[i]])` on `s`; `head` is the
    /// model's output matrix (whose blocks a tied quantized embedding is).
    ///
    /// # Safety
    /// `ids` holds `tokens` on the device (queued on `s` before), each below
    /// the embedding's rows; `x` has room for `max_tokens >= tokens.len()`
    /// rows of `hidden` f32s.
    #[allow(clippy::too_many_arguments)]
    pub(crate) unsafe fn queue(
        &mut self,
        s: &Stream,
        kernels: &ModelKernels,
        head: &OutputHead,
        ids: u64,
        x: u64,
        tokens: &[u32],
        hidden: usize,
    ) -> Result<()> {
        match self {
            // SAFETY: forwarded from the caller; the matrix is [vocab,
            // hidden] of the model's 16-bit dtype.
            Embedding::Device(t) => unsafe {
                kernels.embed(s, t.ptr(), ids, x, tokens.len(), hidden)
            },
            Embedding::Host(h) => h.queue(s, tokens, x),
            // SAFETY: forwarded from the caller.
            Embedding::Blocks => unsafe { head.gather(s, ids, x, tokens.len()) },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;

    use crate::test_rng::rng;

    /// A random `[rows, hidden]` matrix stored as `ty`.
    fn stored(ty: QuantType, rows: usize, hidden: usize, rng: &mut impl Rng) -> Vec<u8> {
        let x: Vec<f32> = (0..rows * hidden)
            .map(|_| rng.gen_range(-3.0f32..3.0) * 10f32.powi(rng.gen_range(-3..5)))
            .collect();
        match ty {
            QuantType::F32 => x.iter().flat_map(|v| v.to_le_bytes()).collect(),
            QuantType::F16 => x
                .iter()
                .flat_map(|v| f16::from_f32(*v).to_le_bytes())
                .collect(),
            QuantType::BF16 => x
                .iter()
                .flat_map(|v| bf16::from_f32(*v).to_le_bytes())
                .collect(),
            _ => quant::quantize(ty, &x).unwrap(),
        }
    }

    #[test]
    fn gathered_rows_are_the_matrix_rounded_to_the_dtype_and_widened() {
        let mut rng = rng();
        for ty in QuantType::ALL {
            let hidden = ty.block_elems() as usize * rng.gen_range(1..4);
            let rows = rng.gen_range(1..40);
            let bytes = stored(ty, rows, hidden, &mut rng);
            let mut wide = vec![0f32; rows * hidden];
            quant::dequantize_f32(ty, &bytes, &mut wide).unwrap();
            let tokens: Vec<u32> = (0..rng.gen_range(0..20))
                .map(|_| rng.gen_range(0..rows as u32))
                .collect();
            for dtype in [DType::BF16, DType::F16] {
                let mut got = vec![f32::NAN; tokens.len() * hidden];
                gather_rows(&bytes, ty, hidden, dtype, &tokens, &mut got).unwrap();
                for (i, &tok) in tokens.iter().enumerate() {
                    for j in 0..hidden {
                        let x = wide[tok as usize * hidden + j];
                        let want = match (dtype, ty) {
                            (DType::F16, QuantType::F16) => x,
                            (DType::F16, _) => quant::f32_to_f16_sat(x).to_f32(),
                            _ => bf16::from_f32(x).to_f32(),
                        };
                        let g = got[i * hidden + j];
                        assert_eq!(
                            g.to_bits(),
                            want.to_bits(),
                            "{ty} {dtype} token {tok} [{j}]"
                        );
                    }
                }
            }
            let mut out = vec![0f32; hidden];
            let e =
                gather_rows(&bytes, ty, hidden, DType::F16, &[rows as u32], &mut out).unwrap_err();
            assert!(e.to_string().contains("outside the embedding"), "{e}");
            let e = gather_rows(&bytes, ty, hidden, DType::F32, &[0], &mut out).unwrap_err();
            assert!(e.to_string().contains("bf16 or f16"), "{e}");
        }
    }
}
