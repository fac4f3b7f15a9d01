//! The fused dequantize-and-multiply of a few tokens (decoding) on the
//! device: `gemv_<type>_t<n>` in `kernels/dequant.cu`, launched by
//! [`DequantKernels::gemv`].

use std::ffi::c_void;

use super::{output_index, DequantKernels, MAX_GRID};
use crate::cuda::Stream;
use crate::error::{Error, Result};
use crate::quant::QuantType;
use crate::DType;

/// Most tokens one [`DequantKernels::gemv`] multiplies.
pub const GEMV_MAX_TOKENS: u64 = 8;

/// The token counts of the gemv entry points: `{name}_t{n}` (`name` from
/// [`gemv_kernel_name`]) multiplies up to `n` tokens, its loops over them
/// unrolled; a launch takes the least that covers its tokens.
pub const GEMV_TOKEN_COUNTS: [u64; 4] = [1, 2, 4, 8];

/// Threads per block of the gemv kernels: `GEMV_WARPS` warps in
/// `kernels/dequant.cu`, whose shared tiles are sized for it.
const GEMV_BLOCK: u32 = 256;

/// The stem of the kernel entry points that multiply a matrix of `ty`
/// blocks with a few tokens ([`DequantKernels::gemv`], one entry point per
/// [`GEMV_TOKEN_COUNTS`]); `None` for plain floats.
pub const fn gemv_kernel_name(ty: QuantType) -> Option<&'static str> {
    Some(match ty {
        QuantType::Q8_0 => "gemv_q8_0",
        QuantType::Q4_0 => "gemv_q4_0",
        QuantType::Q4_1 => "gemv_q4_1",
        QuantType::Q5_0 => "gemv_q5_0",
        QuantType::Q5_1 => "gemv_q5_1",
        QuantType::Q4_K => "gemv_q4_k",
        QuantType::Q5_K => "gemv_q5_k",
        QuantType::Q6_K => "gemv_q6_k",
        QuantType::F32 | QuantType::F16 | QuantType::BF16 => return None,
    })
}

/// The operands of [`DequantKernels::gemv`]: for `b < t` and `r < rows`,
/// `y[b * ldy + r] = beta * y[b * ldy + r] + Σ_c W[r, c] · x[b, c]` over
/// `c < k`, where `W` is a `[rows, k]` matrix of `ty` blocks whose values
/// are rounded to `dtype` first, exactly as [`DequantKernels::dequantize`]
/// writes them.
#[derive(Clone, Copy, Debug)]
pub struct Gemv {
    /// The block type of `w`.
    pub ty: QuantType,
    /// The model dtype, bf16 or f16: of `x`, of the weights' rounding and
    /// of a 16-bit `y`.
    pub dtype: DType,
    /// `rows` rows of `k / ty.block_elems()` blocks each, back to back.
    pub w: u64,
    /// `[t, k]` row-major values of `dtype`.
    pub x_hi: u64,
    /// 0, or `[t, k]` values of `dtype` added to `x_hi` in f32.
    pub x_lo: u64,
    /// `t` rows of `ldy` values of `y_dtype`, of which the first `rows` of
    /// each are written.
    pub y: u64,
    /// F32, or `dtype` (then rounded to nearest).
    pub y_dtype: DType,
    /// 0 (`y` is only written) or 1 (f32 `y` accumulates).
    pub beta: f32,
    /// Rows of `W` and outputs per token.
    pub rows: u64,
    /// Elements of a row of `W` and of `x`: a multiple of the block.
    pub k: u64,
    /// Tokens, 1 to [`GEMV_MAX_TOKENS`].
    pub t: u64,
    /// Elements from one token's outputs to the next's, at least `rows`.
    pub ldy: u64,
}

/// Flags of the gemv kernels (`kernels/dequant.cu`).
const GEMV_F16: u64 = 1;
const GEMV_Y16: u64 = 2;
const GEMV_ACCUMULATE: u64 = 4;

impl Gemv {
    /// The kernel's flags for these operands, or why they are refused.
    pub fn flags(&self) -> Result<u64> {
        let what = format!("gemv of {}", self.ty);
        let bad = |m: String| Err(Error::Input(format!("{what}: {m}")));
        if !self.ty.is_quantized() {
            return bad("only block types are multiplied on the device".into());
        }
        let f16 = match output_index(self.dtype, &what)? {
            0 => 0,
            _ => GEMV_F16,
        };
        if !(1..=GEMV_MAX_TOKENS).contains(&self.t) {
            return bad(format!("{} tokens, not 1 to {GEMV_MAX_TOKENS}", self.t));
        }
        self.ty
            .row_bytes(self.k)
            .map_err(|e| Error::Input(format!("{what}: {e}")))?;
        if self.ldy < self.rows {
            return bad(format!(
                "rows of {} outputs cannot hold {}",
                self.ldy, self.rows
            ));
        }
        let y16 = if self.y_dtype == DType::F32 {
            0
        } else if self.y_dtype == self.dtype {
            GEMV_Y16
        } else {
            return bad(format!("y is f32 or {}, not {}", self.dtype, self.y_dtype));
        };
        let acc = if self.beta == 0.0 {
            0
        } else if self.beta == 1.0 && y16 == 0 {
            GEMV_ACCUMULATE
        } else {
            return bad(format!("beta {} into {} y", self.beta, self.y_dtype));
        };
        let y_align = if y16 == 0 { 4 } else { 2 };
        if !self.y.is_multiple_of(y_align)
            || !self.x_hi.is_multiple_of(2)
            || !self.x_lo.is_multiple_of(2)
        {
            return bad(format!(
                "y = {:#x} must be {y_align}-byte aligned, x = {:#x} / {:#x} 2-byte aligned",
                self.y, self.x_hi, self.x_lo
            ));
        }
        Ok(f16 | y16 | acc)
    }
}

impl DequantKernels {
    /// Queues the product described by `g` ([`Gemv`]): one warp per output
    /// row decodes the row's blocks and multiplies them with every token,
    /// reading the weights once, instead of dequantizing them into a
    /// scratch for a GEMM. Returns without waiting; nothing is launched for
    /// `rows == 0`.
    ///
    /// # Safety
    /// `g.w` must be device memory of the stream's context holding
    /// `g.rows * g.ty.row_bytes(g.k)` bytes, `g.x_hi` (and `g.x_lo` unless
    /// 0) `g.t * g.k` 16-bit values, and `g.y` room for `g.t` rows of
    /// `g.ldy` values of `g.y_dtype` (the last needs only `g.rows`), not
    /// overlapping the inputs; all must stay allocated, the inputs
    /// unmodified and `y` otherwise untouched, until the queued kernel
    /// completes.
    pub unsafe fn gemv(&self, g: &Gemv, stream: &Stream) -> Result<()> {
        let flags = g.flags()?;
        let at = QuantType::ALL.iter().position(|&t| t == g.ty).unwrap_or(0);
        let n = GEMV_TOKEN_COUNTS.iter().position(|&n| g.t <= n);
        let Some(f) = (self.gemv.get(at).and_then(Option::as_ref))
            .zip(n)
            .map(|(f, n)| &f[n])
        else {
            return Err(Error::Input(format!(
                "gemv of {} x {}: no kernel",
                g.ty, g.t
            )));
        };
        if g.rows == 0 {
            return Ok(());
        }
        let mut args = [g.w, g.x_hi, g.x_lo, g.y, g.rows, g.k, g.t, g.ldy, flags];
        let mut params: Vec<*mut c_void> =
            args.iter_mut().map(|a| (a as *mut u64).cast()).collect();
        // One warp per row, GEMV_BLOCK / 32 rows a block; the kernel's rows
        // stride over the grid's warps.
        let grid = g.rows.div_ceil(GEMV_BLOCK as u64 / 32).clamp(1, MAX_GRID) as u32;
        // SAFETY: every gemv kernel takes (const uint8_t*, const uint16_t*,
        // const uint16_t*, void*, u64 x 5), passed as nine 64-bit values that
        // `params` points to for the call; the device ranges are the
        // caller's contract above.
        unsafe { f.launch((grid, 1, 1), (GEMV_BLOCK, 1, 1), 0, stream, &mut params) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;

    /// A valid product of `t` tokens into f32 with random addresses.
    fn gemv(t: u64) -> Gemv {
        let mut rng = crate::test_rng::rng();
        let mut addr = |a: u64| (rng.gen_range(1u64..1 << 40)) * a;
        let (w, x_hi, y) = (addr(1), addr(2), addr(4));
        let rows = rng.gen_range(1..5000);
        Gemv {
            ty: QuantType::Q4_K,
            dtype: DType::BF16,
            w,
            x_hi,
            x_lo: 0,
            y,
            y_dtype: DType::F32,
            beta: 0.0,
            rows,
            k: 256 * rng.gen_range(1..20),
            t,
            ldy: rows + rng.gen_range(0..3),
        }
    }

    /// The flags of `g` after `change`.
    fn flags(g: Gemv, change: impl FnOnce(&mut Gemv)) -> Result<u64> {
        let mut g = g;
        change(&mut g);
        g.flags()
    }

    #[test]
    fn every_token_count_has_one_least_entry_point() {
        assert_eq!(GEMV_TOKEN_COUNTS.last(), Some(&GEMV_MAX_TOKENS));
        assert!(GEMV_TOKEN_COUNTS.windows(2).all(|w| w[0] < w[1]));
        // The shared tiles of the kernels are sized for GEMV_BLOCK threads.
        let ptx = super::super::PTX;
        let entries = ptx.matches(".entry gemv_").count();
        let bounded = format!(".maxntid {GEMV_BLOCK}, 1, 1");
        assert_eq!(entries, 8 * GEMV_TOKEN_COUNTS.len());
        assert_eq!(ptx.matches(&bounded).count(), entries, "{bounded}");
    }

    #[test]
    fn gemv_flags_name_the_dtype_the_output_and_beta() {
        for t in 1..=GEMV_MAX_TOKENS {
            let g = gemv(t);
            assert_eq!(g.flags().unwrap(), 0);
            let acc = flags(g, |g| (g.beta, g.dtype) = (1.0, DType::F16));
            assert_eq!(acc.unwrap(), GEMV_F16 | GEMV_ACCUMULATE);
            let y16 = flags(g, |g| (g.y, g.y_dtype) = (g.y + 2, DType::BF16));
            assert_eq!(y16.unwrap(), GEMV_Y16);
            let x = flags(g, |g| (g.x_hi, g.x_lo) = (g.x_hi + 2, g.x_hi + 4096));
            assert_eq!(x.unwrap(), 0);
        }
    }

    #[test]
    fn gemv_refuses_bad_operands_naming_them() {
        let g = gemv(1);
        type Change = fn(&mut Gemv);
        let refused: [(Change, &str); 13] = [
            (|g| g.t = 0, "0 tokens"),
            (|g| g.t = GEMV_MAX_TOKENS + 1, "9 tokens"),
            (|g| g.k += 32, "block of 256"),
            (|g| g.ty = QuantType::F16, "only block types"),
            (|g| g.dtype = DType::F32, "bf16 or f16"),
            (|g| g.y_dtype = DType::F16, "y is f32 or bf16, not f16"),
            (|g| g.beta = 0.5, "beta 0.5"),
            (
                |g| (g.beta, g.y_dtype) = (1.0, DType::BF16),
                "beta 1 into bf16",
            ),
            (|g| g.y += 2, "4-byte aligned"),
            (
                |g| (g.y, g.y_dtype) = (g.y + 1, DType::BF16),
                "2-byte aligned",
            ),
            (|g| g.x_hi += 1, "2-byte aligned"),
            (|g| g.x_lo = 3, "2-byte aligned"),
            (|g| g.ldy = g.rows - 1, "cannot hold"),
        ];
        for (change, why) in refused {
            let e = flags(g, change).unwrap_err();
            assert!(
                matches!(e, Error::Input(ref m) if m.contains(why)),
                "{why}: {e}"
            );
        }
    }
}
