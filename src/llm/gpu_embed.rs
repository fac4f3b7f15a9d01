//! The embedding of the CUDA forward pass, held so that it costs little
//! VRAM (in 16 bits, a 70B model's is 2.1 GB; see also
//! [`gpu_output`](super::gpu_output)).
//!
//! An untied embedding stays in host memory as stored (its ggml blocks or
//! floats), in page-aligned memory registered with the driver and mapped
//! into the device's address space. Each pass the device reads its tokens'
//! rows in place, over the bus, with no host work: a kernel dequantizes the
//! rows of ggml blocks
//! ([`gather_rows_f32`](crate::quant::device::DequantKernels::gather_rows_f32)),
//! and a stored type equal to the model's 16-bit dtype is widened by the
//! lookup kernel of a device matrix. Where the device cannot read the rows
//! (another float type, such as an f32 embedding of a bf16 model; an
//! `RLIMIT_MEMLOCK` too low to pin the embedding; a driver refusing to map
//! it; or [`HOST_GATHER_ENV`]`=1`), the host dequantizes the rows of each
//! pass into the model's 16-bit dtype, rounded exactly as the device's
//! dequantization and cast kernels round, widens them to f32 and uploads
//! them through a pinned staging buffer. Either way the residual stream
//! receives the values the device lookup of a 16-bit matrix gives. The path
//! is chosen at load ([`EmbeddingLookup`]).
//!
//! A tied embedding is the output matrix too, which the device needs, so it
//! stays there, once: as the output's stored blocks when quantized (looked
//! up by the same gather kernel), else in the 16-bit dtype.

use std::os::unix::fs::FileExt;

use half::{bf16, f16};
use rayon::prelude::*;

use crate::checkpoint::TensorInfo;
use crate::cuda::{memcpy_htod_async, Context, Event, HostRegistration, Stream};
use crate::io::AlignedBuf;
use crate::llm::gpu_io::StagingBuf;
use crate::llm::gpu_kernels::ModelKernels;
use crate::llm::gpu_output::OutputHead;
use crate::quant::device::{gather_kernel_name, DequantKernels};
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
    let mut out = vec![0u8; stored_len(index, info)?];
    read_stored_into(index, info, &mut out)?;
    Ok(out)
}

/// [`read_stored`] into page-aligned memory (its length rounded up to
/// whole pages, the tail zero).
fn read_stored_aligned(index: &ModelIndex, info: &TensorInfo) -> Result<AlignedBuf> {
    let len = stored_len(index, info)?;
    let mut out = AlignedBuf::new(len)?;
    read_stored_into(index, info, &mut out.as_mut_slice()[..len])?;
    Ok(out)
}

/// The bytes of tensor `info` in its file.
fn stored_len(index: &ModelIndex, info: &TensorInfo) -> Result<usize> {
    let path = &index.files()[info.file].path;
    usize::try_from(info.len)
        .map_err(|_| Error::model(path, format!("tensor {} of {} bytes", info.name, info.len)))
}

/// Reads the stored bytes of `info` into `out`, exactly as long.
fn read_stored_into(index: &ModelIndex, info: &TensorInfo, out: &mut [u8]) -> Result<()> {
    let path = &index.files()[info.file].path;
    let f = std::fs::File::open(path).map_err(|e| Error::io("opening", path, None, e))?;
    f.read_exact_at(out, info.file_offset).map_err(|e| {
        let op = format!("reading {} bytes of tensor {}", out.len(), info.name);
        Error::io(op, path, Some(info.file_offset), e)
    })
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

/// The environment variable that, set to `1` when a model loads, keeps
/// the lookup of an untied embedding on the host even where the device
/// could read the rows in place ([`EmbeddingLookup::HostGather`]): the
/// same values, more slowly, for comparisons.
pub const HOST_GATHER_ENV: &str = "LS_EMBED_HOST_GATHER";

/// How the CUDA forward pass looks up the embedding rows of a pass's
/// tokens ([`LlamaModel::embedding_lookup`](crate::llm::LlamaModel::embedding_lookup)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EmbeddingLookup {
    /// Tied: in the embedding's 16-bit matrix on the device, or in the
    /// output matrix's blocks there.
    Device,
    /// Untied, in host memory mapped into the device's address space: a
    /// kernel reads (and dequantizes) the tokens' rows in place.
    Mapped,
    /// Untied, in host memory: the host dequantizes the tokens' rows and
    /// uploads them. Chosen at load when the device cannot read them: a
    /// float type other than the model's dtype, an `RLIMIT_MEMLOCK` too low
    /// to pin the embedding, a driver refusing to map it, or
    /// [`HOST_GATHER_ENV`]`=1`.
    HostGather,
}

/// Whether [`HOST_GATHER_ENV`] asks for the host gather.
fn host_gather_forced() -> bool {
    std::env::var_os(HOST_GATHER_ENV).is_some_and(|v| v == "1")
}

/// Whether the device looks up rows of `ty` for a forward pass in `dtype`
/// itself: ggml blocks (dequantized by a gather kernel into `dtype`), or
/// the 16-bit `dtype` itself (widened). Other floats are rounded on the
/// host.
fn device_reads(ty: QuantType, dtype: DType) -> bool {
    let widened = matches!(dtype, DType::BF16 | DType::F16);
    gather_kernel_name(ty).is_some() || (widened && QuantType::from_dtype(dtype) == Some(ty))
}

/// How an untied embedding's rows reach the device.
enum Gather {
    /// The device reads them from the stored bytes, registered and mapped.
    Mapped {
        reg: HostRegistration,
        /// The gather kernels of ggml blocks; `None` when the stored type
        /// is the model's 16-bit dtype (the lookup kernel widens it).
        blocks: Option<DequantKernels>,
    },
    /// The host dequantizes them into `max_tokens × hidden` f32s and
    /// uploads those.
    Host(StagingBuf),
}

impl Gather {
    /// The mapped path when the device reads `ty` rows for a model in
    /// `dtype`, `bytes` can be pinned and mapped, and [`HOST_GATHER_ENV`]
    /// does not ask for the host; else the host path with a staging buffer
    /// of `staging` bytes.
    fn choose(
        ctx: &Context,
        ty: QuantType,
        dtype: DType,
        bytes: &mut AlignedBuf,
        staging: usize,
    ) -> Result<Gather> {
        if device_reads(ty, dtype) && !host_gather_forced() {
            let (ptr, len) = (bytes.as_mut_ptr(), bytes.len());
            // SAFETY: `bytes` is a page-aligned mapping of `len` bytes that
            // the embedding owns and drops after the registration, written
            // only before it; nothing else registers it. The embedding waits
            // for its last queued lookup before the registration is dropped
            // (`HostEmbedding`'s Drop).
            match unsafe { HostRegistration::register_mapped(ctx, ptr, len) } {
                Ok(reg) => {
                    let blocks = gather_kernel_name(ty).is_some();
                    let blocks = blocks.then(|| DequantKernels::load(ctx)).transpose()?;
                    return Ok(Gather::Mapped { reg, blocks });
                }
                // Too little RLIMIT_MEMLOCK, or a driver that does not map
                // the range: the host path gives the same values.
                Err(Error::Limit { .. } | Error::Cuda { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(Gather::Host(StagingBuf::new(ctx, staging)?))
    }
}

/// An untied embedding in host memory, gathered per pass.
pub(crate) struct HostEmbedding {
    ty: QuantType,
    hidden: usize,
    dtype: DType,
    /// Rows of the stored matrix.
    rows: usize,
    /// Chosen once every other buffer of the model is allocated
    /// ([`Embedding::choose_lookup`]): required pinned memory, such as an
    /// offloaded KV cache's, comes first. Declared before `bytes`, so that
    /// it is dropped (unregistered) first.
    gather: Option<Gather>,
    /// Recorded after the last queued work that reads host memory of the
    /// embedding: the device lookup, or the upload out of the staging
    /// buffer.
    done: Event,
    /// Whether that work may still be running.
    pending: bool,
    /// The stored bytes (then zeros up to a whole page).
    bytes: AlignedBuf,
    /// Length of the stored bytes.
    len: usize,
    /// Tokens of the largest pass.
    max_tokens: usize,
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
        let rb = row_bytes(ty, hidden, &info.name)?;
        let len = stored_len(index, info)?;
        Ok(HostEmbedding {
            ty,
            hidden,
            dtype,
            rows: len / rb.max(1),
            gather: None,
            done: Event::new(ctx, false)?,
            pending: false,
            bytes: read_stored_aligned(index, info)?,
            len,
            max_tokens,
        })
    }

    /// Chooses how the rows are looked up ([`Gather::choose`]).
    fn choose(&mut self, ctx: &Context) -> Result<()> {
        if self.gather.is_none() {
            let staging = self.max_tokens * self.hidden * 4;
            let g = Gather::choose(ctx, self.ty, self.dtype, &mut self.bytes, staging)?;
            self.gather = Some(g);
        }
        Ok(())
    }

    /// How the rows are looked up.
    fn lookup(&self) -> EmbeddingLookup {
        match self.gather {
            Some(Gather::Mapped { .. }) => EmbeddingLookup::Mapped,
            Some(Gather::Host(_)) | None => EmbeddingLookup::HostGather,
        }
    }

    /// Queues `tokens`' rows, as f32, to `x` on `s`.
    ///
    /// # Safety
    /// `ids` holds `tokens` on the device (queued on `s` before); `x` has
    /// room for `max_tokens >= tokens.len()` rows of `hidden` f32s.
    unsafe fn queue(
        &mut self,
        s: &Stream,
        kernels: &ModelKernels,
        ids: u64,
        tokens: &[u32],
        x: u64,
    ) -> Result<()> {
        if let Some(&tok) = tokens.iter().find(|&&t| t as usize >= self.rows) {
            return Err(Error::Input(format!(
                "token {tok} is outside the embedding of {} rows",
                self.rows
            )));
        }
        let (n, hidden) = (tokens.len(), self.hidden);
        let Some(gather) = &mut self.gather else {
            return Err(Error::Pipeline(
                "the embedding's lookup was not chosen at load".into(),
            ));
        };
        match gather {
            // SAFETY: the mapped range holds every row of the matrix, and
            // each token was checked against the rows above; the
            // registration lives until `done` has completed (Drop). The
            // rest is the caller's contract.
            Gather::Mapped { reg, blocks } => unsafe {
                let src = mapped_ptr(reg)?;
                match blocks {
                    Some(k) => {
                        let (t, h) = (n as u64, hidden as u64);
                        k.gather_rows_f32(self.ty, self.dtype, src, ids, x, t, h, s)?
                    }
                    None => kernels.embed(s, src, ids, x, n, hidden)?,
                }
            },
            Gather::Host(staging) => {
                if self.pending {
                    // The last upload (of a pass that may have failed before
                    // its final synchronize) must be done reading the
                    // staging buffer.
                    self.done.synchronize()?;
                    self.pending = false;
                }
                let bytes = &self.bytes.as_slice()[..self.len];
                let (ty, dtype) = (self.ty, self.dtype);
                // SAFETY: forwarded from the caller; `done` is recorded
                // right after.
                unsafe { upload_rows(staging, bytes, ty, hidden, dtype, tokens, x, s)? }
            }
        }
        if let Err(e) = self.done.record(s) {
            // Without the event, wait for the work here before the host
            // memory it reads can be written or freed (the error is the one
            // to report).
            let _ = s.synchronize();
            return Err(e);
        }
        self.pending = true;
        Ok(())
    }
}

impl Drop for HostEmbedding {
    fn drop(&mut self) {
        if self.pending {
            // A pass that failed before its final synchronize may have left
            // a lookup reading the mapped range or the staging buffer. An
            // error here has been or will be reported by the stream's work.
            let _ = self.done.synchronize();
        }
    }
}

/// The device address of a mapped registration.
fn mapped_ptr(reg: &HostRegistration) -> Result<u64> {
    reg.device_ptr()
        .ok_or_else(|| Error::Pipeline("the embedding's host memory is not mapped".into()))
}

/// Gathers `tokens`' rows of the `[rows, hidden]` matrix of `ty` in
/// `bytes` into `staging` as f32 ([`gather_rows`]) and queues their upload
/// to `x` on `s`.
///
/// # Safety
/// The staging buffer is not read by queued work (its last upload has
/// completed), and is not written again before this upload has; `x` has
/// room for the staging buffer's rows, device memory of the stream's
/// context.
#[allow(clippy::too_many_arguments)]
unsafe fn upload_rows(
    staging: &mut StagingBuf,
    bytes: &[u8],
    ty: QuantType,
    hidden: usize,
    dtype: DType,
    tokens: &[u32],
    x: u64,
    s: &Stream,
) -> Result<()> {
    let len = tokens.len() * hidden * 4;
    let staged = staging.buf.as_mut_slice().get_mut(..len);
    let floats = staged
        .and_then(|b| bytemuck::try_cast_slice_mut::<u8, f32>(b).ok())
        .ok_or_else(|| {
            Error::Pipeline(format!(
                "{} embedding rows do not fit the staging buffer",
                tokens.len()
            ))
        })?;
    gather_rows(bytes, ty, hidden, dtype, tokens, floats)?;
    // SAFETY: the first `len` bytes of the staging buffer were written
    // above and stay unwritten until the copy completes (the caller's
    // contract); `x` holds max_tokens rows of `hidden` f32s, and the staging
    // buffer was sized for as many.
    unsafe { memcpy_htod_async(x, staging.buf.as_ptr(), len, s) }
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

    /// Chooses how an untied embedding's rows are looked up: mapped for
    /// the device when it reads them and `RLIMIT_MEMLOCK` has room, else
    /// gathered on the host through a staging buffer. Called once every
    /// other buffer of the model is allocated, so that the embedding pins
    /// only what they leave.
    pub(crate) fn choose_lookup(&mut self, ctx: &Context) -> Result<()> {
        match self {
            Embedding::Host(h) => h.choose(ctx),
            Embedding::Device(_) | Embedding::Blocks => Ok(()),
        }
    }

    /// How the rows of a pass's tokens are looked up.
    pub(crate) fn lookup(&self) -> EmbeddingLookup {
        match self {
            Embedding::Device(_) | Embedding::Blocks => EmbeddingLookup::Device,
            Embedding::Host(h) => h.lookup(),
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
            // SAFETY: forwarded from the caller.
            Embedding::Host(h) => unsafe { h.queue(s, kernels, ids, tokens, x) },
            // SAFETY: forwarded from the caller.
            Embedding::Blocks => unsafe { head.gather(s, ids, x, tokens.len()) },
        }
    }
}

#[cfg(test)]
#[path = "gpu_embed_tests.rs"]
mod tests;
