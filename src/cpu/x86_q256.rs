//! AVX2 (+FMA, F16C) products of rows of ggml blocks with f32 activations,
//! the blocks decoded in registers: the eight-lane counterpart of
//! [`super::x86_q512`], which says how.

use std::arch::x86_64::*;

use super::x86_q512::{in_memory, q4_k_scales, PREFETCH};
use crate::quant::QuantType;

/// Whether the fused kernels (this module's and [`super::x86_q512`]'s)
/// take rows of `ty`.
pub(super) fn has_kernel(ty: QuantType) -> bool {
    matches!(
        ty,
        QuantType::Q8_0 | QuantType::Q4_0 | QuantType::Q4_1 | QuantType::Q4_K | QuantType::Q6_K
    )
}

/// Every token's two accumulators.
type Acc<const N: usize> = [[__m256; 2]; N];

/// The f16 at `p` (unaligned), widened, in every lane (a broadcast, for
/// the reason [`super::x86_q512`]'s says).
///
/// # Safety
/// The CPU has AVX2 and F16C; `p` points to 2 readable bytes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn f16_splat(p: *const u8) -> __m256 {
    // SAFETY: the caller guarantees 2 readable bytes at `p`.
    let bits = unsafe { p.cast::<i16>().read_unaligned() };
    _mm256_cvtph_ps(_mm_set1_epi16(bits))
}

/// The 8 bytes at `p`, zero-extended to 32-bit lanes.
///
/// # Safety
/// The CPU has AVX2; `p` points to 8 readable bytes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn bytes8(p: *const u8) -> __m256i {
    // SAFETY: the caller guarantees 8 readable bytes.
    _mm256_cvtepu8_epi32(unsafe { _mm_loadl_epi64(p.cast()) })
}

/// `acc[t][h] += w · xs[t][at..at + 8]` for every token.
///
/// # Safety
/// The CPU has AVX2 and FMA; every `xs[t]` points to `at + 8` readable floats.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn fma8<const N: usize>(
    acc: &mut Acc<N>,
    h: usize,
    w: __m256,
    xs: &[*const f32; N],
    at: usize,
) {
    for (a, &x) in acc.iter_mut().zip(xs) {
        // SAFETY: the caller guarantees the 8 floats at `at`.
        a[h] = _mm256_fmadd_ps(w, unsafe { _mm256_loadu_ps(x.add(at)) }, a[h]);
    }
}

/// `d·q − o` for 8 integers `q`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn scaled(q: __m256i, d: __m256, o: __m256) -> __m256 {
    _mm256_fmsub_ps(_mm256_cvtepi32_ps(q), d, o)
}

/// Horizontal sum of eight lanes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn hsum8(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

/// `[Σ_i w[i]·xs[t][i]; N]` for a row of whole blocks of `ty` (one of
/// [`has_kernel`]'s types).
///
/// # Safety
/// The CPU has AVX2, FMA and F16C; `row` is whole blocks of `ty` and every
/// `xs[t]` holds exactly their elements.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn dot<const N: usize>(ty: QuantType, row: &[u8], xs: &[&[f32]; N]) -> [f32; N] {
    let (bb, be) = (ty.block_bytes() as usize, ty.block_elems() as usize);
    let blocks = row.len() / bb;
    debug_assert!(row.len() == blocks * bb && xs.iter().all(|x| x.len() == blocks * be));
    let xp: [*const f32; N] = std::array::from_fn(|t| xs[t].as_ptr());
    let mut acc = [[_mm256_setzero_ps(); 2]; N];
    // One or two tokens: a second set of accumulators for odd blocks, so
    // that consecutive blocks' sums do not wait on each other.
    let mut odd = [[_mm256_setzero_ps(); 2]; N];
    macro_rules! each_block {
        ($f:ident) => {{
            let mut i = 0;
            while i < blocks {
                // SAFETY: block `i` is the `bb` bytes at `i·bb` of `row`, and
                // so is block `i + 1 < blocks`; their elements are the `be`
                // floats at `i·be` of every `xs[t]`; a prefetch reads nothing
                // and may point anywhere.
                unsafe {
                    let b = row.as_ptr().add(i * bb);
                    _mm_prefetch::<_MM_HINT_T0>(b.wrapping_add(PREFETCH).cast());
                    $f(b, &mut acc, &xp, i * be);
                    if N <= 2 && i + 1 < blocks {
                        $f(b.add(bb), &mut odd, &xp, (i + 1) * be);
                        i += 1;
                    }
                }
                i += 1;
            }
        }};
    }
    match ty {
        QuantType::Q8_0 => each_block!(q8_0),
        QuantType::Q4_0 => each_block!(q4_0),
        QuantType::Q4_1 => each_block!(q4_1),
        QuantType::Q4_K => each_block!(q4_k),
        QuantType::Q6_K => each_block!(q6_k),
        _ => unreachable!("fused kernels take has_kernel types only"),
    }
    if N <= 2 {
        for (a, o) in acc.iter_mut().zip(odd) {
            a[0] = _mm256_add_ps(a[0], o[0]);
            a[1] = _mm256_add_ps(a[1], o[1]);
        }
    }
    acc.map(|a| hsum8(_mm256_add_ps(a[0], a[1])))
}

/// A Q8_0 block: `d·q`.
///
/// # Safety
/// AVX2, FMA, F16C; `b` points to the 34 bytes of a block, every `xs[t]` to
/// its 32 elements at `at`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q8_0<const N: usize>(b: *const u8, acc: &mut Acc<N>, xs: &[*const f32; N], at: usize) {
    // SAFETY: the reads lie in the 34 bytes, the floats in the 32.
    unsafe {
        let d = f16_splat(b);
        for g in 0..4 {
            let q = _mm256_cvtepi8_epi32(_mm_loadl_epi64(b.add(2 + 8 * g).cast()));
            fma8(
                acc,
                g % 2,
                _mm256_mul_ps(_mm256_cvtepi32_ps(q), d),
                xs,
                at + 8 * g,
            );
        }
    }
}

/// The 32 nibbles of a Q4_0/Q4_1 block at `q` as `d·q − o`.
///
/// # Safety
/// As for [`q8_0`], with 16 bytes at `q`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn nibbles<const N: usize>(
    q: *const u8,
    (d, o): (__m256, __m256),
    acc: &mut Acc<N>,
    xs: &[*const f32; N],
    at: usize,
) {
    // SAFETY: the reads lie in the 16 bytes, the floats in the 32.
    unsafe {
        let (v0, v1) = (bytes8(q), bytes8(q.add(8)));
        let mask = _mm256_set1_epi32(0x0f);
        fma8(acc, 0, scaled(_mm256_and_si256(v0, mask), d, o), xs, at);
        fma8(acc, 1, scaled(_mm256_and_si256(v1, mask), d, o), xs, at + 8);
        fma8(
            acc,
            0,
            scaled(_mm256_srli_epi32::<4>(v0), d, o),
            xs,
            at + 16,
        );
        fma8(
            acc,
            1,
            scaled(_mm256_srli_epi32::<4>(v1), d, o),
            xs,
            at + 24,
        );
    }
}

/// A Q4_0 block: `d·(q − 8)`.
///
/// # Safety
/// As for [`q8_0`], with an 18-byte block.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_0<const N: usize>(b: *const u8, acc: &mut Acc<N>, xs: &[*const f32; N], at: usize) {
    // SAFETY: the block's nibbles are its bytes 2..18.
    unsafe {
        let d = f16_splat(b);
        let f = (d, _mm256_mul_ps(d, _mm256_set1_ps(8.0)));
        nibbles(b.add(2), f, acc, xs, at);
    }
}

/// A Q4_1 block: `d·q + m`.
///
/// # Safety
/// As for [`q8_0`], with a 20-byte block.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_1<const N: usize>(b: *const u8, acc: &mut Acc<N>, xs: &[*const f32; N], at: usize) {
    // SAFETY: `d` and `m` are bytes 0..4, the nibbles 4..20.
    unsafe {
        let m = f16_splat(b.add(2));
        let f = (f16_splat(b), _mm256_sub_ps(_mm256_setzero_ps(), m));
        nibbles(b.add(4), f, acc, xs, at);
    }
}

/// A Q4_K block: sub-block `j`'s element is `(d·sc_j)·q − dmin·m_j`.
///
/// # Safety
/// As for [`q8_0`], with a 144-byte block of 256 elements.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_k<const N: usize>(b: *const u8, acc: &mut Acc<N>, xs: &[*const f32; N], at: usize) {
    // SAFETY: the reads lie in the 144 bytes, the floats in the 256.
    unsafe {
        let sm = q4_k_scales(b.add(4));
        let sm = sm.as_ptr().cast::<u8>();
        // f[j] = d·sc_j, f[8 + j] = dmin·m_j.
        let mut f = [0f32; 16];
        for (i, at) in [0, 8].into_iter().enumerate() {
            let s = _mm256_cvtepi32_ps(bytes8(sm.add(at)));
            let d = f16_splat(b.add(2 * i));
            _mm256_storeu_ps(f.as_mut_ptr().add(at), _mm256_mul_ps(s, d));
        }
        let f = in_memory(&mut f);
        let mask = _mm256_set1_epi32(0x0f);
        for c in 0..4 {
            let q = b.add(16 + 32 * c);
            let (d0, m0) = (_mm256_set1_ps(f[2 * c]), _mm256_set1_ps(f[8 + 2 * c]));
            let (d1, m1) = (_mm256_set1_ps(f[2 * c + 1]), _mm256_set1_ps(f[9 + 2 * c]));
            for i in 0..4 {
                let v = bytes8(q.add(8 * i));
                let e = at + 64 * c + 8 * i;
                fma8(acc, i % 2, scaled(_mm256_and_si256(v, mask), d0, m0), xs, e);
                let hi = _mm256_srli_epi32::<4>(v);
                fma8(acc, i % 2, scaled(hi, d1, m1), xs, e + 32);
            }
        }
    }
}

/// A Q6_K block: element `e` is `(d·sc_{e/16})·(q − 32)`.
///
/// # Safety
/// As for [`q8_0`], with a 210-byte block of 256 elements.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q6_k<const N: usize>(b: *const u8, acc: &mut Acc<N>, xs: &[*const f32; N], at: usize) {
    // SAFETY: the reads lie in the 210 bytes, the floats in the 256.
    unsafe {
        let d = f16_splat(b.add(208));
        let (mut f, mut o) = ([0f32; 16], [0f32; 16]);
        for at in [0, 8] {
            let sc = _mm256_cvtepi8_epi32(_mm_loadl_epi64(b.add(192 + at).cast()));
            let ds = _mm256_mul_ps(_mm256_cvtepi32_ps(sc), d);
            _mm256_storeu_ps(f.as_mut_ptr().add(at), ds);
            let ds32 = _mm256_mul_ps(ds, _mm256_set1_ps(32.0));
            _mm256_storeu_ps(o.as_mut_ptr().add(at), ds32);
        }
        let (f, o) = (in_memory(&mut f), in_memory(&mut o));
        let (low4, bits45) = (_mm256_set1_epi32(0x0f), _mm256_set1_epi32(0x30));
        // As in the AVX-512 kernel, eight elements `l` at a time.
        for half in 0..2 {
            for quarter in 0..4 {
                let l = 8 * quarter;
                let ql0 = bytes8(b.add(64 * half + l));
                let ql1 = bytes8(b.add(64 * half + 32 + l));
                let qh = bytes8(b.add(128 + 32 * half + l));
                let lows = [
                    _mm256_and_si256(ql0, low4),
                    _mm256_and_si256(ql1, low4),
                    _mm256_srli_epi32::<4>(ql0),
                    _mm256_srli_epi32::<4>(ql1),
                ];
                let highs = [
                    _mm256_slli_epi32::<4>(qh),
                    _mm256_slli_epi32::<2>(qh),
                    qh,
                    _mm256_srli_epi32::<2>(qh),
                ];
                for g in 0..4 {
                    let q = _mm256_or_si256(lows[g], _mm256_and_si256(highs[g], bits45));
                    let s = 8 * half + 2 * g + quarter / 2;
                    let w = scaled(q, _mm256_set1_ps(f[s]), _mm256_set1_ps(o[s]));
                    fma8(acc, quarter % 2, w, xs, at + 128 * half + 32 * g + l);
                }
            }
        }
    }
}
