//! Products with a weight stored as ggml blocks on the device, in bounded
//! memory: a pass of at most [`GEMV_MAX_TOKENS`] tokens runs the fused GEMV
//! on the blocks; a larger one dequantizes a chunk of rows at a time into a
//! scratch and runs one GEMM per chunk, each writing its own columns of the
//! output. The scratch holds a few tens of MB however large the weight, so
//! the device memory it takes stays with the cache (a 7B model's gate and
//! up projections side by side would need 0.27 GB).

use crate::cuda::cublas::{Cublas, GemmType};
use crate::cuda::Stream;
use crate::llm::gpu_kernels::Split;
use crate::quant::device::{DequantKernels, Gemv, GEMV_MAX_TOKENS};
use crate::quant::QuantType;
use crate::{DType, Error, Result};

/// Default size of a scratch that weights stored as blocks are dequantized
/// into, a chunk of rows at a time (4681 rows of 3584 values in 16 bits).
pub const BLOCKS_SCRATCH_BYTES: usize = 32 << 20;

/// A 16-bit scratch on the device: its address and capacity in elements.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Scratch {
    pub(crate) ptr: u64,
    pub(crate) elems: usize,
}

/// A `[rows, k]` weight of `ty` blocks at `w`, whole rows back to back.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Blocks {
    pub(crate) ty: QuantType,
    pub(crate) w: u64,
}

/// The shape of a product: `t` tokens, `rows` outputs written into rows of
/// `y` that are `ldy` apart, `k` inputs.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Shape {
    pub(crate) t: usize,
    pub(crate) rows: usize,
    pub(crate) k: usize,
    pub(crate) ldy: usize,
}

/// The rows of a chunk when `scratch` holds `elems` values and a row `k`:
/// an error naming both when not even one row fits.
/// `what` names the weight, made only for the error.
pub(crate) fn chunk_rows(elems: usize, k: usize, what: impl Fn() -> String) -> Result<usize> {
    match elems.checked_div(k) {
        Some(r) if r > 0 => Ok(r),
        _ => Err(Error::Pipeline(format!(
            "{}: a row of {k} values does not fit the dequantization scratch of {elems}",
            what()
        ))),
    }
}

/// Queues `y[b, ..rows] = beta · y + Σ_c W[r, c] · (x.hi + x.lo)[b, c]` on
/// `s`: the GEMV for at most [`GEMV_MAX_TOKENS`] tokens of a block type
/// when `yt` is f32 or `dtype`, else chunk by chunk through `scratch` (the
/// path of plain f32 and f16 rows too). The values multiplied
/// are the blocks' rounded to `dtype` either way, as
/// [`DequantKernels::dequantize`] writes them.
///
/// # Safety
/// `b.w` holds `rows` rows of `k` values' blocks of `b.ty`; `x` (and
/// `x.lo` unless 0) `t × k` values of `dtype`; `y` `t` rows of `ldy >=
/// rows` values of `yt`; `scratch` is `elems` 16-bit values that no work
/// queued on `s` reads after this is queued except through it; all on
/// `s`'s context and live until the queued work completes; cuBLAS's
/// stream is `s`.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn blocks_product(
    blas: &mut Cublas,
    kernels: &DequantKernels,
    scratch: Scratch,
    dtype: DType,
    b: Blocks,
    x: Split,
    (y, yt): (u64, GemmType),
    sh: Shape,
    beta: f32,
    s: &Stream,
) -> Result<()> {
    let y_dtype = match yt {
        GemmType::F32 => Some(DType::F32),
        GemmType::F16 if dtype == DType::F16 => Some(DType::F16),
        GemmType::BF16 if dtype == DType::BF16 => Some(DType::BF16),
        _ => None,
    };
    let few = (1..=GEMV_MAX_TOKENS).contains(&(sh.t as u64));
    if let (true, true, Some(y_dtype)) = (few, b.ty.is_quantized(), y_dtype) {
        let g = Gemv {
            ty: b.ty,
            dtype,
            w: b.w,
            x_hi: x.hi,
            x_lo: x.lo,
            y,
            y_dtype,
            beta,
            rows: sh.rows as u64,
            k: sh.k as u64,
            t: sh.t as u64,
            ldy: sh.ldy as u64,
        };
        // SAFETY: the caller's contract: whole blocks of `rows` rows at
        // `w`, `x` and `y` of those shapes.
        return unsafe { kernels.gemv(&g, s) };
    }
    // SAFETY: forwarded from the caller.
    unsafe { chunked(blas, kernels, scratch, dtype, b, x, (y, yt), sh, beta, s) }
}

/// The GEMM half of [`blocks_product`]: a chunk of rows at a time.
///
/// # Safety
/// As for [`blocks_product`].
#[allow(clippy::too_many_arguments)]
unsafe fn chunked(
    blas: &mut Cublas,
    kernels: &DequantKernels,
    scratch: Scratch,
    dtype: DType,
    b: Blocks,
    x: Split,
    (y, yt): (u64, GemmType),
    sh: Shape,
    beta: f32,
    s: &Stream,
) -> Result<()> {
    let hw = GemmType::half_of(dtype);
    let what = || format!("a [{}, {}] {} weight", sh.rows, sh.k, b.ty);
    let row_bytes =
        b.ty.row_bytes(sh.k as u64)
            .map_err(|e| Error::Pipeline(format!("{}: {e}", what())))? as usize;
    let step = chunk_rows(scratch.elems, sh.k, what)?;
    let y_elem: u64 = match yt {
        GemmType::F32 => 4,
        GemmType::F16 | GemmType::BF16 => 2,
    };
    for first in (0..sh.rows).step_by(step) {
        let rows = step.min(sh.rows - first);
        let src = b.w + (first * row_bytes) as u64;
        let yc = y + first as u64 * y_elem;
        // SAFETY: rows first..first + rows are whole blocks inside the
        // weight; the scratch holds step >= rows rows of k values; work on
        // `s` is ordered, so the previous chunk's GEMMs have read the
        // scratch before this dequantization overwrites it; `yc`'s rows
        // hold columns first..first + rows of `y` (ldy >= rows apart).
        unsafe {
            let n = (rows * sh.k) as u64;
            kernels.dequantize(b.ty, dtype, src, scratch.ptr, n, s)?;
            blas.linear_ld(
                x.hi,
                scratch.ptr,
                hw,
                yc,
                yt,
                sh.t,
                rows,
                sh.k,
                beta,
                sh.ldy,
            )?;
            if x.lo != 0 {
                blas.linear_ld(x.lo, scratch.ptr, hw, yc, yt, sh.t, rows, sh.k, 1.0, sh.ldy)?;
            }
        }
    }
    Ok(())
}
