//! AVX-512 VNNI products of rows of Q4_K, Q5_K and Q6_K blocks with activations
//! rounded to 16-bit integers: the integer products of a whole block go
//! through `vpdpwssd` (32 products an instruction, summed exactly in 32-bit
//! lanes) and the block's scales apply once, in f32.
//!
//! Each token's activations are rounded once per product ([`Q16`]): every
//! [`X_BLOCK`] elements share one f32 step, the block's largest magnitude
//! over 32767, so an activation moves by at most half a step (one part in
//! 65534 of the block's largest), about what the device's f16 activations
//! lose. A sub-block's 6-bit (Q4_K, Q5_K) or 8-bit (Q6_K) scale multiplies
//! its 16-bit codes before the products (`vpmullw`; `sc·q` fits 16 bits), so
//! a block's eight sub-blocks sum into one accumulator: Q4_K's `sc·q` is at
//! most 945, Q5_K's 1953 and Q6_K's `|sc·(q − 32)|` 4096, and sixteen products
//! of those with `|x| ≤ 32767` stay below 2³¹. The K-quants' mins multiply
//! the sums of the sub-blocks' activations, taken when they are rounded.
//!
//! Against the f32 kernels of [`super::x86_q512`] this takes about half the
//! instructions a weight, which is what a core's share of the memory
//! bandwidth asked for: those ran at half the read rate on 16 cores.

use std::arch::x86_64::*;

use super::x86_q256::hsum8;
use super::x86_q512::{f16_splat, q4_k_scales, PREFETCH};
use crate::quant::QuantType;

/// Activations that share one step: a K-quant block.
pub(super) const X_BLOCK: usize = 256;

/// Elements of a Q4_K sub-block, whose activations' sum its min multiplies.
const SUB: usize = 32;

/// The largest code of a rounded activation.
const CODE_MAX: f32 = 32767.0;

/// The least largest magnitude of a block of activations that is rounded
/// (2^-80): its step times the smallest f16 scale of a weight block stays a
/// normal f32.
pub(super) const TINY: f32 = 8.271806e-25;

/// Whether this module's kernels take rows of `ty`.
pub(super) fn has_kernel(ty: QuantType) -> bool {
    matches!(ty, QuantType::Q4_K | QuantType::Q5_K | QuantType::Q6_K)
}

/// `tokens` rows of `k` activations (`k` a multiple of [`X_BLOCK`]) rounded
/// to 16-bit codes, one f32 step per [`X_BLOCK`] elements: element `i` of
/// token `t` is about `q[t·k + i] · step[(t·k + i) / X_BLOCK]`.
#[derive(Default)]
pub(super) struct Q16 {
    k: usize,
    q: Vec<i16>,
    step: Vec<f32>,
    /// `step · Σ q` over each [`SUB`] elements.
    sums: Vec<f32>,
}

/// One token's stretch of a [`Q16`]: codes from a block boundary on, their
/// steps and their sub-block sums.
#[derive(Clone, Copy)]
pub(super) struct Q16Row<'a> {
    q: &'a [i16],
    step: &'a [f32],
    sums: &'a [f32],
}

impl Q16 {
    /// Rounds `x` (`tokens × k` floats, `k` a multiple of [`X_BLOCK`]) into
    /// this buffer, whose allocations are kept from one product to the next.
    /// A block holding a NaN or an infinity gets a NaN step, so that the
    /// products it enters are NaN as the f32 kernels' would be. `false` when
    /// a block's largest magnitude is above 0 and below [`TINY`]: its step
    /// times a weight block's scale could fall among f32's subnormals, where
    /// precision goes; such products go to the f32 kernels.
    pub(super) fn fill(&mut self, x: &[f32], tokens: usize, k: usize) -> bool {
        debug_assert!(k.is_multiple_of(X_BLOCK) && x.len() == tokens * k);
        self.k = k;
        self.q.resize(x.len(), 0);
        self.step.resize(x.len() / X_BLOCK, 0.0);
        self.sums.resize(x.len() / SUB, 0.0);
        let parts = x
            .chunks_exact(X_BLOCK)
            .zip(self.q.chunks_exact_mut(X_BLOCK))
            .zip(self.step.iter_mut())
            .zip(self.sums.chunks_exact_mut(X_BLOCK / SUB));
        for (((xb, qb), step), sums) in parts {
            // SAFETY: Q16 is filled only where the pool's instruction set is
            // AVX-512 VNNI (which has AVX-512F); the slices are one block.
            *step = unsafe { round_block(xb, qb, sums) };
            if *step > 0.0 && *step * CODE_MAX < TINY {
                return false;
            }
        }
        true
    }

    /// Token `t`'s elements `k0..k0 + n` (`k0` and `n` multiples of
    /// [`X_BLOCK`]).
    pub(super) fn row(&self, t: usize, k0: usize, n: usize) -> Q16Row<'_> {
        let at = t * self.k + k0;
        Q16Row {
            q: &self.q[at..at + n],
            step: &self.step[at / X_BLOCK..(at + n) / X_BLOCK],
            sums: &self.sums[at / SUB..(at + n) / SUB],
        }
    }
}

/// Rounds one block `x` into `q` and the sub-blocks' scaled sums into
/// `sums`; returns the step.
///
/// # Safety
/// The CPU has AVX-512F; the slices hold [`X_BLOCK`] elements (`sums`
/// `X_BLOCK / SUB`).
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn round_block(x: &[f32], q: &mut [i16], sums: &mut [f32]) -> f32 {
    debug_assert!(x.len() == X_BLOCK && q.len() == X_BLOCK && sums.len() == X_BLOCK / SUB);
    // SAFETY: 256 floats, sixteen vectors.
    let big = unsafe {
        let (mut m, mut odd) = (_mm512_setzero_ps(), 0u16);
        for v in 0..X_BLOCK / 16 {
            let v = _mm512_loadu_ps(x.as_ptr().add(16 * v));
            m = _mm512_max_ps(m, _mm512_abs_ps(v));
            odd |= _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v);
        }
        if odd != 0 {
            f32::NAN
        } else {
            _mm512_reduce_max_ps(m)
        }
    };
    if !big.is_finite() {
        q.fill(0);
        sums.fill(f32::NAN);
        return f32::NAN;
    }
    if big == 0.0 {
        q.fill(0);
        sums.fill(0.0);
        return 0.0;
    }
    let (step, inv) = (big / CODE_MAX, CODE_MAX / big);
    for ((xs, qs), sum) in x.chunks_exact(SUB).zip(q.chunks_exact_mut(SUB)).zip(sums) {
        // SAFETY: 32 floats in and 32 i16 out, two vectors of 16 each.
        let s = unsafe {
            let inv = _mm512_set1_ps(inv);
            let mut s = _mm512_setzero_si512();
            for h in 0..2 {
                let v = _mm512_mul_ps(_mm512_loadu_ps(xs.as_ptr().add(16 * h)), inv);
                // Nearest, ties to even; |v| ≤ 32767 (plus a rounding).
                let c = _mm512_cvtps_epi32(v);
                s = _mm512_add_epi32(s, c);
                _mm256_storeu_si256(
                    qs.as_mut_ptr().add(16 * h).cast(),
                    _mm512_cvtsepi32_epi16(c),
                );
            }
            _mm512_reduce_add_epi32(s)
        };
        *sum = step * s as f32;
    }
    step
}

/// Every token's running sum (f32) and, for Q4_K and Q5_K, the sum of the
/// mins' products (f32, eight sub-blocks a lane); a block's exact i32 sums
/// live in [`block_products`].
struct Acc<const N: usize> {
    sum: [__m512; N],
    mins: [__m256; N],
}

/// `[Σ_i w[i]·x[t][i]; N]` for a row of whole blocks of `ty` (one of
/// [`has_kernel`]'s types), `x[t]` the activations `xs[t]` stand for.
///
/// # Safety
/// The CPU has AVX-512F, AVX-512BW, AVX-512 VNNI, AVX2, FMA and F16C; `row`
/// is whole blocks of `ty` and every `xs[t]` holds exactly their elements.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
pub(super) unsafe fn dot<const N: usize>(
    ty: QuantType,
    row: &[u8],
    xs: &[Q16Row<'_>; N],
) -> [f32; N] {
    let bb = ty.block_bytes() as usize;
    let blocks = row.len() / bb;
    debug_assert!(xs
        .iter()
        .all(|x| x.q.len() == blocks * X_BLOCK && x.step.len() == blocks));
    let mut acc = Acc {
        sum: [_mm512_setzero_ps(); N],
        mins: [_mm256_setzero_ps(); N],
    };
    for i in 0..blocks {
        // SAFETY: block `i` is the `bb` bytes at `i·bb` of `row`; its
        // activations are elements `i·X_BLOCK..` of every `xs[t]` (checked
        // above); a prefetch reads nothing and may point anywhere.
        unsafe {
            let b = row.as_ptr().add(i * bb);
            _mm_prefetch::<_MM_HINT_T0>(b.wrapping_add(PREFETCH).cast());
            match ty {
                QuantType::Q4_K => q4_k(b, &mut acc, xs, i),
                QuantType::Q5_K => q5_k(b, &mut acc, xs, i),
                _ => q6_k(b, &mut acc, xs, i),
            }
        }
    }
    std::array::from_fn(|t| _mm512_reduce_add_ps(acc.sum[t]) - hsum8(acc.mins[t]))
}

/// The 32 bytes at `p`, zero-extended to 16-bit lanes.
///
/// # Safety
/// The CPU has AVX-512BW; `p` points to 32 readable bytes.
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn bytes32(p: *const u8) -> __m512i {
    // SAFETY: the caller guarantees 32 readable bytes.
    _mm512_cvtepu8_epi16(unsafe { _mm256_loadu_si256(p.cast()) })
}

/// Adds block `blk`'s products of the 16-bit weights `w(j)` (`j` the block's
/// 32-element pieces, in order) into every token's sum, scaled by `scale`
/// and the token's step.
///
/// # Safety
/// AVX-512F/BW/VNNI; every `xs[t]` holds block `blk`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
unsafe fn block_products<const N: usize>(
    acc: &mut Acc<N>,
    xs: &[Q16Row<'_>; N],
    blk: usize,
    scale: __m512,
    w: impl Fn(usize) -> __m512i,
) {
    let mut dots = [_mm512_setzero_si512(); N];
    for j in 0..X_BLOCK / 32 {
        let wj = w(j);
        for (d, x) in dots.iter_mut().zip(xs) {
            // SAFETY: 32 codes at `blk·X_BLOCK + 32·j` lie in the block.
            let xj = unsafe { _mm512_loadu_si512(x.q.as_ptr().add(blk * X_BLOCK + 32 * j).cast()) };
            *d = _mm512_dpwssd_epi32(*d, wj, xj);
        }
    }
    for ((s, d), x) in acc.sum.iter_mut().zip(dots).zip(xs) {
        let f = _mm512_mul_ps(scale, _mm512_set1_ps(x.step[blk]));
        *s = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), f, *s);
    }
}

/// A block with Q4_K's header (f16 `d`, f16 `dmin`, twelve bytes of 6-bit
/// scales and mins at `b + 4`): sub-block `j`'s element is
/// `d·sc_j·q − dmin·m_j`, `q` the 32 codes `codes(j)` gives.
///
/// # Safety
/// As for [`block_products`]; `b` points to the block's header and `codes`
/// reads only the block.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
unsafe fn k_quant<const N: usize>(
    b: *const u8,
    acc: &mut Acc<N>,
    xs: &[Q16Row<'_>; N],
    blk: usize,
    codes: impl Fn(usize) -> __m512i,
) {
    // SAFETY: the reads lie in the header; the activations in block `blk`.
    unsafe {
        let sm = q4_k_scales(b.add(4));
        let sm = _mm_loadu_si128(sm.as_ptr().cast());
        let mut sc = [0i16; 16];
        _mm256_storeu_si256(sc.as_mut_ptr().cast(), _mm256_cvtepu8_epi16(sm));
        let sc = std::hint::black_box(&sc);
        let scaled = |j: usize| _mm512_mullo_epi16(codes(j), _mm512_set1_epi16(sc[j]));
        block_products(acc, xs, blk, f16_splat(b), scaled);
        // The mins: dmin·m_j times the sub-blocks' sums.
        let m = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128::<8>(sm)));
        let m = _mm256_mul_ps(m, _mm512_castps512_ps256(f16_splat(b.add(2))));
        for (a, x) in acc.mins.iter_mut().zip(xs) {
            let s = _mm256_loadu_ps(x.sums.as_ptr().add(blk * (X_BLOCK / SUB)));
            *a = _mm256_fmadd_ps(m, s, *a);
        }
    }
}

/// Sub-block `j`'s 4-bit codes from the 128 bytes of nibbles at `qs`: each
/// 32 bytes hold two sub-blocks, low nibbles then high.
///
/// # Safety
/// AVX-512BW; `qs` points to 128 readable bytes.
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn nibbles(qs: *const u8, j: usize) -> __m512i {
    // SAFETY: the 32 bytes of sub-blocks `j` and `j ^ 1` lie in the 128.
    let v = unsafe { bytes32(qs.add(32 * (j / 2))) };
    if j.is_multiple_of(2) {
        _mm512_and_si512(v, _mm512_set1_epi16(0x0f))
    } else {
        _mm512_srli_epi16::<4>(v)
    }
}

/// A Q4_K block (the header, 128 bytes of nibbles).
///
/// # Safety
/// As for [`block_products`]; `b` points to the block's 144 bytes.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
unsafe fn q4_k<const N: usize>(b: *const u8, acc: &mut Acc<N>, xs: &[Q16Row<'_>; N], blk: usize) {
    // SAFETY: the nibbles are the 128 bytes at 16.
    unsafe { k_quant(b, acc, xs, blk, |j| nibbles(b.add(16), j)) }
}

/// A Q5_K block (the header, 32 bytes of fifth bits, 128 bytes of nibbles):
/// element `l` of sub-block `j` has bit `j` of `qh[l]` as its fifth bit.
///
/// # Safety
/// As for [`block_products`]; `b` points to the block's 176 bytes.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
unsafe fn q5_k<const N: usize>(b: *const u8, acc: &mut Acc<N>, xs: &[Q16Row<'_>; N], blk: usize) {
    let fifth = _mm512_set1_epi16(0x10);
    let codes = |j: usize| {
        // SAFETY: the fifth bits are the 32 bytes at 16, the nibbles the
        // 128 at 48.
        let (qh, lo) = unsafe { (bytes32(b.add(16)), nibbles(b.add(48), j)) };
        // Bit j of each byte to bit 4: lo | ((qh >> j) << 4 & 0x10).
        let hi = _mm512_slli_epi16::<4>(_mm512_srl_epi16(qh, _mm_cvtsi32_si128(j as i32)));
        _mm512_ternarylogic_epi32::<0xf8>(lo, hi, fifth)
    };
    // SAFETY: the header is the block's first 16 bytes.
    unsafe { k_quant(b, acc, xs, blk, codes) }
}

/// Lane indices that put scale `j` in lanes 0..16 and `j + 1` in 16..32 of a
/// `vpermw` of the sixteen scales, for even `j`.
const PAIR_IDX: [[i16; 32]; 8] = {
    let mut t = [[0i16; 32]; 8];
    let mut p = 0;
    while p < 8 {
        let mut l = 0;
        while l < 32 {
            t[p][l] = (2 * p + l / 16) as i16;
            l += 1;
        }
        p += 1;
    }
    t
};

/// A Q6_K block (128 bytes of low nibbles, 64 of high bit pairs, 16 i8
/// scales, f16 `d`): element `e` is `d·sc_{e/16}·(q − 32)`.
///
/// # Safety
/// As for [`block_products`]; `b` points to the block's 210 bytes.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
unsafe fn q6_k<const N: usize>(b: *const u8, acc: &mut Acc<N>, xs: &[Q16Row<'_>; N], blk: usize) {
    // SAFETY: the reads lie in the 210 bytes; the activations in block `blk`.
    unsafe {
        let sc = _mm512_castsi256_si512(_mm256_cvtepi8_epi16(_mm_loadu_si128(b.add(192).cast())));
        let (low4, bits45, off) = (
            _mm512_set1_epi16(0x0f),
            _mm512_set1_epi16(0x30),
            _mm512_set1_epi16(32),
        );
        // Piece j = 4·half + g is elements 128·half + 32·g + l: low nibble
        // from ql[64·half + 32·(g % 2) + l] (high nibble for g ≥ 2), high
        // bits from qh[32·half + l] >> 2g.
        let piece = |j: usize| {
            let (half, g) = (j / 4, j % 4);
            let ql = bytes32(b.add(64 * half + 32 * (g % 2)));
            let qh = bytes32(b.add(128 + 32 * half));
            let lo = if g < 2 {
                _mm512_and_si512(ql, low4)
            } else {
                _mm512_srli_epi16::<4>(ql)
            };
            let hi = match g {
                0 => _mm512_slli_epi16::<4>(qh),
                1 => _mm512_slli_epi16::<2>(qh),
                2 => qh,
                _ => _mm512_srli_epi16::<2>(qh),
            };
            // lo | (hi & 0x30), less 32.
            let q = _mm512_sub_epi16(_mm512_ternarylogic_epi32::<0xf8>(lo, hi, bits45), off);
            let idx = _mm512_loadu_si512(PAIR_IDX[j].as_ptr().cast());
            _mm512_mullo_epi16(q, _mm512_permutexvar_epi16(idx, sc))
        };
        block_products(acc, xs, blk, f16_splat(b.add(208)), piece);
    }
}
