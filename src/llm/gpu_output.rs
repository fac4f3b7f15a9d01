//! The output matrix (lm_head) of the CUDA forward pass and the logits GEMM
//! over it.
//!
//! A quantized output matrix stays on the device as its stored blocks (a
//! 70B Q4_K_M model's Q6_K output is 0.86 GB, against 2.1 GB in 16 bits).
//! The logits of a few rows come from the fused GEMV on the blocks; more
//! rows dequantize the matrix in chunks of rows into a bounded 16-bit
//! scratch ([`OUTPUT_CHUNK_BYTES`] by default), one GEMM per chunk writing
//! its columns of the logits ([`blocks_product`]). A tied quantized
//! embedding is such an output matrix too, and the embedding lookup
//! gathers its rows from the blocks. A plain output matrix is a 16-bit
//! static, and a tied plain one the embedding's device matrix.

use crate::cuda::cublas::{Cublas, GemmType};
use crate::cuda::{DeviceBuffer, Stream};
use crate::llm::gpu_blocks::{blocks_product, Blocks, Scratch, Shape};
use crate::llm::gpu_embed::{read_stored, row_bytes, stored_type, Embedding};
use crate::llm::gpu_gemm::linear_split;
use crate::llm::gpu_kernels::Split;
use crate::quant::device::DequantKernels;
use crate::quant::QuantType;
use crate::{DType, DeviceTensor, Error, LayerStreamer, ModelIndex, Result};

/// Default bound of the 16-bit scratch a quantized output matrix is
/// dequantized into, one chunk of rows at a time (2048 rows of a 70B model).
pub const OUTPUT_CHUNK_BYTES: usize = 32 << 20;

/// Rows of `hidden` 16-bit values that fit `bytes` (at least one, at most
/// `vocab`).
pub(crate) fn chunk_rows(bytes: usize, hidden: usize, vocab: usize) -> usize {
    (bytes / (2 * hidden).max(1)).clamp(1, vocab.max(1))
}

/// The embedding `embed` and the output matrix `head` (`None`: tied) of a
/// forward pass in `dtype` for passes of up to `max_tokens` tokens and
/// `max_batch` output rows of `vocab` logits.
#[allow(clippy::too_many_arguments)]
pub(crate) fn load_embedding_and_output(
    streamer: &LayerStreamer,
    embed: &str,
    head: Option<&str>,
    dtype: DType,
    vocab: usize,
    hidden: usize,
    max_tokens: usize,
    max_batch: usize,
) -> Result<(Embedding, OutputHead)> {
    let index = streamer.model();
    let quantized = index.tensor(embed).is_some_and(|t| t.quant.is_some());
    let (t, b) = (max_tokens, max_batch);
    Ok(match head {
        None if quantized => {
            let head = OutputHead::load(streamer, Some(embed), dtype, vocab, hidden, b)?;
            (Embedding::Blocks, head)
        }
        None => {
            let e = Embedding::load(streamer, embed, true, dtype, hidden, t)?;
            (e, OutputHead::Tied)
        }
        Some(h) => (
            Embedding::load(streamer, embed, false, dtype, hidden, t)?,
            OutputHead::load(streamer, Some(h), dtype, vocab, hidden, b)?,
        ),
    })
}

/// The output matrix as the forward pass holds it.
pub(crate) enum OutputHead {
    /// Tied to the embedding, whose device matrix it is.
    Tied,
    /// A 16-bit `[vocab, hidden]` static.
    Dense(DeviceTensor),
    /// Stored blocks, dequantized chunk by chunk.
    Chunked(Box<ChunkedHead>),
}

impl OutputHead {
    /// The output matrix `name` (`None`: tied) for a forward pass in
    /// `dtype` with up to `max_batch` output rows of `vocab` logits.
    pub(crate) fn load(
        streamer: &LayerStreamer,
        name: Option<&str>,
        dtype: DType,
        vocab: usize,
        hidden: usize,
        max_batch: usize,
    ) -> Result<OutputHead> {
        let Some(name) = name else {
            return Ok(OutputHead::Tied);
        };
        let index = streamer.model();
        let info = index
            .tensor(name)
            .ok_or_else(|| Error::UnknownTensor(name.to_string()))?;
        if info.quant.is_none() {
            return Ok(OutputHead::Dense(streamer.load_static(name)?));
        }
        let head = ChunkedHead::load(streamer, index, name, dtype, vocab, hidden, max_batch)?;
        Ok(OutputHead::Chunked(Box::new(head)))
    }

    /// The 16-bit device matrix the GEMM reads, when there is one.
    pub(crate) fn dense<'a>(&'a self, embed: &'a Embedding) -> Option<&'a DeviceTensor> {
        match self {
            OutputHead::Tied => embed.device_matrix(),
            OutputHead::Dense(t) => Some(t),
            OutputHead::Chunked(_) => None,
        }
    }

    /// Bounds the dequantization scratch of a quantized output matrix to
    /// `bytes` (at least one row); nothing for other output matrices.
    pub(crate) fn set_chunk_bytes(&mut self, bytes: usize) -> Result<()> {
        match self {
            OutputHead::Chunked(h) => h.set_chunk_bytes(bytes),
            _ => Ok(()),
        }
    }

    /// Queues the embedding lookup of a tied quantized embedding, whose
    /// blocks this output matrix holds: `x[i] = f32(row ids[i])` for
    /// `tokens` ids; an error for other output matrices.
    ///
    /// # Safety
    /// `ids` holds `tokens` u32s on the device, each below the matrix's rows;
    /// `x` room for `tokens` rows of `hidden` f32s; both live until the
    /// queued work completes.
    pub(crate) unsafe fn gather(&self, s: &Stream, ids: u64, x: u64, tokens: usize) -> Result<()> {
        let OutputHead::Chunked(c) = self else {
            return Err(Error::Pipeline(
                "the embedding is looked up in the output's blocks, but the output is not \
                 kept as blocks"
                    .into(),
            ));
        };
        let (ty, to, hidden) = (c.ty, c.dtype, c.hidden as u64);
        // SAFETY: `blocks` holds every row of the matrix; the rest is the
        // caller's contract.
        unsafe {
            c.kernels
                .gather_rows_f32(ty, to, c.blocks.ptr(), ids, x, tokens as u64, hidden, s)
        }
    }

    /// Queues `logits[n_out, vocab] = last · headᵀ` (f32) on `s`, the
    /// handle's stream.
    ///
    /// # Safety
    /// `last` holds `n_out` rows of `hidden` 16-bit values of type `hw`,
    /// `logits` room for `n_out × vocab` f32s, both device memory of the
    /// stream's context live until the queued work completes; `blas` is
    /// bound to `s`; a tied embedding is a `[vocab, hidden]` device matrix.
    #[allow(clippy::too_many_arguments)]
    pub(crate) unsafe fn queue(
        &self,
        embed: &Embedding,
        blas: &mut Cublas,
        hw: GemmType,
        last: Split,
        logits: u64,
        n_out: usize,
        vocab: usize,
        hidden: usize,
        s: &Stream,
    ) -> Result<()> {
        let (f, h) = (GemmType::F32, hidden);
        if let OutputHead::Chunked(c) = self {
            // SAFETY: forwarded from the caller.
            return unsafe { c.queue(blas, last, logits, n_out, s) };
        }
        let w = self.dense(embed).ok_or_else(|| {
            Error::Pipeline("a tied output matrix needs the embedding on the device".into())
        })?;
        // SAFETY: forwarded from the caller; `w` is [vocab, hidden] of the
        // model's 16-bit dtype (checked at load).
        unsafe { linear_split(blas, hw, last, w.ptr(), logits, f, n_out, vocab, h, 0.0) }
    }
}

/// A quantized output matrix on the device as stored, with the scratch its
/// chunks are dequantized into.
pub(crate) struct ChunkedHead {
    /// The stored blocks, `[rows >= vocab, hidden]`.
    blocks: DeviceBuffer,
    ty: QuantType,
    dtype: DType,
    vocab: usize,
    hidden: usize,
    max_batch: usize,
    kernels: DequantKernels,
    /// `chunk_rows × hidden` values of `dtype`.
    scratch: DeviceBuffer,
    chunk_rows: usize,
}

impl ChunkedHead {
    fn load(
        streamer: &LayerStreamer,
        index: &ModelIndex,
        name: &str,
        dtype: DType,
        vocab: usize,
        hidden: usize,
        max_batch: usize,
    ) -> Result<ChunkedHead> {
        let ctx = streamer
            .context()
            .ok_or_else(|| Error::Pipeline("the CUDA model needs a CUDA streamer".into()))?;
        let info = index
            .tensor(name)
            .ok_or_else(|| Error::UnknownTensor(name.to_string()))?;
        let ty = stored_type(index, info)?;
        // A row must be whole blocks.
        row_bytes(ty, hidden, name)?;
        if info.shape.len() != 2 || info.shape[0] < vocab || info.shape[1] != hidden {
            return Err(Error::model(
                &index.files()[info.file].path,
                format!(
                    "output matrix {name} has shape {:?}, expected [{vocab}, {hidden}]",
                    info.shape
                ),
            ));
        }
        let bytes = read_stored(index, info)?;
        let blocks = DeviceBuffer::alloc(ctx, bytes.len().max(4))?;
        blocks.copy_from_host(0, &bytes)?;
        let mut head = ChunkedHead {
            blocks,
            ty,
            dtype,
            vocab,
            hidden,
            max_batch,
            kernels: DequantKernels::load(ctx)?,
            scratch: DeviceBuffer::alloc(ctx, 4)?,
            chunk_rows: 0,
        };
        head.set_chunk_bytes(OUTPUT_CHUNK_BYTES)?;
        Ok(head)
    }

    fn set_chunk_bytes(&mut self, bytes: usize) -> Result<()> {
        let rows = chunk_rows(bytes, self.hidden, self.vocab);
        let ctx = self.blocks.context();
        // Free the old scratch first: the new one may not fit beside it.
        // Until it is allocated, no chunk fits.
        self.chunk_rows = 0;
        self.scratch = DeviceBuffer::alloc(ctx, 4)?;
        self.scratch = DeviceBuffer::alloc(ctx, rows * self.hidden * 2)?;
        self.chunk_rows = rows;
        Ok(())
    }

    /// As [`OutputHead::queue`].
    ///
    /// # Safety
    /// As for [`OutputHead::queue`].
    unsafe fn queue(
        &self,
        blas: &mut Cublas,
        last: Split,
        logits: u64,
        n_out: usize,
        s: &Stream,
    ) -> Result<()> {
        if n_out > self.max_batch {
            return Err(Error::Pipeline(format!(
                "{n_out} output rows for a model loaded for {}",
                self.max_batch
            )));
        }
        let (h, vocab, f) = (self.hidden, self.vocab, GemmType::F32);
        let scratch = Scratch {
            ptr: self.scratch.ptr(),
            elems: self.chunk_rows * h,
        };
        let b = Blocks {
            ty: self.ty,
            w: self.blocks.ptr(),
        };
        let sh = Shape {
            t: n_out,
            rows: vocab,
            k: h,
            ldy: vocab,
        };
        // SAFETY: `blocks` holds rows >= vocab whole rows of `ty`; the
        // scratch holds chunk_rows rows of `dtype` and is read only by the
        // work this queues; the rest is the caller's contract.
        unsafe {
            blocks_product(
                blas,
                &self.kernels,
                scratch,
                self.dtype,
                b,
                last,
                (logits, f),
                sh,
                0.0,
                s,
            )
        }
    }
}

/// What the CUDA forward pass holds for the embedding and the output
/// matrix, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StaticsMemory {
    /// The embedding on the device: a tied 16-bit one (a tied quantized one
    /// is the output's blocks, counted in `output_device`).
    pub embedding_device: u64,
    /// The embedding in host memory (untied embeddings), as stored.
    pub embedding_host: u64,
    /// The output matrix on the device: 16-bit, or its stored blocks.
    pub output_device: u64,
    /// The dequantization scratch of a quantized output matrix and the
    /// logits of one chunk.
    pub output_scratch: u64,
    /// The scratch that quantized layer weights are dequantized into at use
    /// ([`Dequant::Use`](crate::Dequant::Use), the model commands' choice),
    /// counted by [`for_model`](Self::for_model) for quantized layers when
    /// asked.
    pub weight_scratch: u64,
}

impl StaticsMemory {
    /// Device bytes in all.
    pub fn device_bytes(&self) -> u64 {
        self.embedding_device + self.output_device + self.output_scratch + self.weight_scratch
    }

    /// What the CUDA forward pass of `index` (its `config.json`, its
    /// embedding and output tensors) holds with the default scratch,
    /// [`OUTPUT_CHUNK_BYTES`]; with `at_use`
    /// (quantized layer weights dequantized at use, the model commands'
    /// choice) the weight scratch too.
    pub fn for_model(index: &ModelIndex, at_use: bool) -> Result<StaticsMemory> {
        let cfg = crate::llm::ModelConfig::from_model(index)?;
        let (embed, _, head) = crate::llm::layout::static_names(index, &cfg);
        let chunk = OUTPUT_CHUNK_BYTES;
        let mut m = StaticsMemory::of(index, &embed, head.as_deref(), cfg.vocab, chunk)?;
        if at_use && index.has_quantized_layers() {
            m.weight_scratch =
                2 * crate::llm::gpu_weights::scratch_elems(&cfg, index.has_fp8_layers()) as u64;
        }
        Ok(m)
    }

    /// What the forward pass in a 16-bit dtype holds for the
    /// embedding `embed` and output `output` (`None`: tied) of `index`,
    /// with a dequantization scratch of `chunk_bytes`.
    pub fn of(
        index: &ModelIndex,
        embed: &str,
        output: Option<&str>,
        vocab: usize,
        chunk_bytes: usize,
    ) -> Result<StaticsMemory> {
        let tensor = |n: &str| {
            index
                .tensor(n)
                .ok_or_else(|| Error::UnknownTensor(n.to_string()))
        };
        let e = tensor(embed)?;
        let elems = |t: &crate::checkpoint::TensorInfo| t.shape.iter().product::<usize>() as u64;
        let o = match output {
            Some(n) => tensor(n)?,
            // Tied and quantized: the output's blocks serve both.
            None if e.quant.is_some() => e,
            None => {
                return Ok(StaticsMemory {
                    embedding_device: 2 * elems(e),
                    ..StaticsMemory::default()
                })
            }
        };
        let mut m = StaticsMemory {
            embedding_host: if output.is_some() { e.len } else { 0 },
            ..StaticsMemory::default()
        };
        if o.quant.is_none() {
            m.output_device = 2 * elems(o);
            return Ok(m);
        }
        let hidden = o.shape.get(1).copied().unwrap_or(1);
        let rows = chunk_rows(chunk_bytes, hidden, vocab);
        m.output_device = o.len;
        m.output_scratch = (rows * hidden * 2) as u64;
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;

    use crate::test_rng::rng;

    #[test]
    fn chunk_rows_stay_within_the_bound() {
        let mut rng = rng();
        for _ in 0..200 {
            let vocab = rng.gen_range(1..100_000);
            let hidden = rng.gen_range(1..9000);
            let bytes = rng.gen_range(0..(1usize << 28));
            let rows = chunk_rows(bytes, hidden, vocab);
            assert!(rows >= 1 && rows <= vocab, "{rows} of {vocab}");
            assert!(
                rows == 1 || rows * hidden * 2 <= bytes,
                "{rows} rows of {hidden}"
            );
            assert!(rows == vocab || (rows + 1) * hidden * 2 > bytes);
        }
    }
}
