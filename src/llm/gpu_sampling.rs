//! The next token of every output row, chosen on the device
//! (`kernels/sampling.cu`): the CUDA forward pass keeps its logits on the
//! GPU and brings back one id per sequence instead of `vocab` floats.

use std::ffi::c_void;

use crate::cuda::{Context, DeviceBuffer, Function, Module, Stream};
use crate::llm::sampling::TokenDraw;
use crate::{Error, Result};

/// Threads per block (one block per row).
const THREADS: u32 = 512;
/// Bytes of one row's rule on the device (`RowSpec` in sampling.cu).
pub(crate) const SPEC_BYTES: usize = 16;
/// Largest vocabulary: the kernel's 40-bit fixed-point weights of a row must
/// sum to under 2^64.
pub(crate) const MAX_VOCAB: usize = (1 << 24) - 1;

/// The sampling module loaded into a context.
pub(crate) struct SamplingKernel {
    _module: Module,
    sample_rows: Function,
}

impl SamplingKernel {
    /// Loads the embedded `sampling` PTX into `ctx`.
    pub(crate) fn load(ctx: &Context) -> Result<SamplingKernel> {
        let ptx = crate::kernels::PTX_MODULES
            .iter()
            .find(|(name, _)| *name == "sampling")
            .map(|(_, p)| *p)
            .ok_or_else(|| Error::Pipeline("the sampling kernel's PTX is not embedded".into()))?;
        let module = Module::load_ptx(ctx, ptx)?;
        Ok(SamplingKernel {
            sample_rows: module.function("sample_rows")?,
            _module: module,
        })
    }

    /// Queues `ids[r] =` the token `specs[r]` picks from row `r` of
    /// `logits`, for `rows` rows of `vocab` f32s.
    ///
    /// # Safety
    /// `logits` holds `rows * vocab` f32s, `specs` `rows` rules as
    /// [`spec_bytes`] writes them and `ids` `rows` u32s, all device memory of
    /// the stream's context that stays allocated until the work completes.
    pub(crate) unsafe fn launch(
        &self,
        s: &Stream,
        logits: u64,
        specs: u64,
        ids: u64,
        rows: usize,
        vocab: usize,
    ) -> Result<()> {
        if rows == 0 {
            return Ok(());
        }
        if vocab == 0 || vocab > MAX_VOCAB {
            return Err(Error::Input(format!(
                "sampling on the device: a vocabulary of {vocab} ids (1 to {MAX_VOCAB} supported)"
            )));
        }
        let mut vals = [logits, specs, ids, rows as u64, vocab as u64];
        let mut params: Vec<*mut c_void> =
            vals.iter_mut().map(|v| (v as *mut u64).cast()).collect();
        let grid = rows.min(65535) as u32;
        // SAFETY: sample_rows takes (logits, specs, ids, rows, vocab) as five
        // 64-bit values, which `params` points at (alive for the call); a
        // block of THREADS (a multiple of 32, at most 1024) is what it
        // requires; the device ranges are the caller's contract.
        unsafe {
            self.sample_rows
                .launch((grid, 1, 1), (THREADS, 1, 1), 0, s, &mut params)
        }
    }
}

/// The device encoding of `draws` (`RowSpec` in sampling.cu): temperature,
/// top_p, top_k (0 for none, as for `top_k >= vocab`) and the uniform.
pub(crate) fn spec_bytes(draws: &[TokenDraw], vocab: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(draws.len() * SPEC_BYTES);
    for d in draws {
        let top_k = if d.top_k >= vocab { 0 } else { d.top_k as u32 };
        out.extend_from_slice(&d.temperature.to_le_bytes());
        out.extend_from_slice(&d.top_p.to_le_bytes());
        out.extend_from_slice(&top_k.to_le_bytes());
        out.extend_from_slice(&(d.uniform as f32).to_le_bytes());
    }
    out
}

/// Picks a token for each row of `logits` (`draws.len()` rows of `vocab`
/// f32s, on the host) with the kernel the CUDA forward pass samples with, on
/// `ctx`'s device; for checking it against [`sample_draw`](super::sample_draw).
/// Copies the rows in and the ids out and waits for both.
pub fn sample_on_device(
    ctx: &Context,
    logits: &[f32],
    vocab: usize,
    draws: &[TokenDraw],
) -> Result<Vec<u32>> {
    if logits.len() != draws.len() * vocab {
        return Err(Error::Input(format!(
            "sample_on_device: {} logits are not {} rows of {vocab}",
            logits.len(),
            draws.len()
        )));
    }
    if draws.is_empty() {
        return Ok(Vec::new());
    }
    let kernel = SamplingKernel::load(ctx)?;
    let stream = Stream::new(ctx)?;
    let rows = draws.len();
    let d_logits = DeviceBuffer::alloc(ctx, logits.len() * 4)?;
    d_logits.copy_from_host(0, bytemuck::cast_slice(logits))?;
    let d_specs = DeviceBuffer::alloc(ctx, rows * SPEC_BYTES)?;
    d_specs.copy_from_host(0, &spec_bytes(draws, vocab))?;
    let d_ids = DeviceBuffer::alloc(ctx, rows * 4)?;
    // SAFETY: the three buffers hold rows * vocab f32s, rows specs and rows
    // u32s, and live until the synchronize below.
    unsafe {
        kernel.launch(
            &stream,
            d_logits.ptr(),
            d_specs.ptr(),
            d_ids.ptr(),
            rows,
            vocab,
        )?
    };
    stream.synchronize()?;
    let mut ids = vec![0u8; rows * 4];
    d_ids.copy_to_host(0, &mut ids)?;
    Ok(ids_from_bytes(&ids))
}

/// Little-endian u32s.
pub(crate) fn ids_from_bytes(bytes: &[u8]) -> Vec<u32> {
    bytes
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;

    #[test]
    fn specs_are_sixteen_bytes_with_top_k_past_the_vocabulary_as_none() {
        let mut rng = rand::thread_rng();
        let vocab = rng.gen_range(2..1000);
        let draws: Vec<TokenDraw> = (0..rng.gen_range(1..9))
            .map(|_| TokenDraw {
                temperature: rng.gen_range(0.0..2.0),
                top_k: rng.gen_range(0..2 * vocab),
                top_p: rng.gen_range(0.0..1.5),
                uniform: rng.gen(),
            })
            .collect();
        let bytes = spec_bytes(&draws, vocab);
        assert_eq!(bytes.len(), draws.len() * SPEC_BYTES);
        for (d, b) in draws.iter().zip(bytes.chunks_exact(SPEC_BYTES)) {
            let f = |o: usize| f32::from_le_bytes(b[o..o + 4].try_into().unwrap());
            let k = u32::from_le_bytes(b[8..12].try_into().unwrap());
            assert_eq!(f(0), d.temperature);
            assert_eq!(f(4), d.top_p);
            assert_eq!(k as usize, if d.top_k >= vocab { 0 } else { d.top_k });
            assert_eq!(f(12), d.uniform as f32);
        }
    }
}
