//! AVX2 (+FMA, F16C) and AVX-512F kernels for rows of F32, F16 and BF16.
//!
//! Each loads a stretch of the weight row, widens it to f32 in registers
//! (bf16: a 16-bit shift; f16: `vcvtph2ps`) and multiplies it into every
//! token's accumulators, so a row is read from memory once per group of up to
//! four tokens. Two accumulators per token hide the FMA latency. Loads are
//! unaligned: rows sit at any offset of a file or a pinned slot.
//!
//! AVX512_BF16's `vdpbf16ps` would need the activations rounded to bf16; the
//! widening path keeps them f32 and is bound by memory bandwidth anyway.
//!
//! The AVX-512 intrinsics are stable in `std::arch` since Rust 1.89, later
//! than the crate's declared `rust-version`; the lint that says so is allowed
//! on those functions alone.

use std::arch::x86_64::*;

use crate::quant::QuantType;

/// `TY` of the const-generic kernels: the stored element type.
pub(super) const F32: u8 = 0;
/// See [`F32`].
pub(super) const F16: u8 = 1;
/// See [`F32`].
pub(super) const BF16: u8 = 2;

/// The const tag of a plain type.
pub(super) fn tag(ty: QuantType) -> u8 {
    match ty {
        QuantType::F32 => F32,
        QuantType::F16 => F16,
        QuantType::BF16 => BF16,
        _ => unreachable!("plain kernels take F32, F16 and BF16 rows only"),
    }
}

const fn elem_size(ty: u8) -> usize {
    if ty == F32 {
        4
    } else {
        2
    }
}

/// Eight elements of type `TY` at `p`, widened to f32.
///
/// # Safety
/// The CPU has AVX2, FMA and F16C; `p` points to `8 * elem_size(TY)` readable bytes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn load8<const TY: u8>(p: *const u8) -> __m256 {
    // SAFETY: the caller guarantees the bytes are readable; every load here
    // is unaligned.
    unsafe {
        match TY {
            F32 => _mm256_loadu_ps(p.cast()),
            F16 => _mm256_cvtph_ps(_mm_loadu_si128(p.cast())),
            _ => _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(
                _mm_loadu_si128(p.cast()),
            ))),
        }
    }
}

/// Horizontal sum of eight lanes.
///
/// # Safety
/// The CPU has AVX2.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn hsum8(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

/// `[Σ_i w[i]·xs[t][i]; N]` on AVX2 for a row `w` of `TY`.
///
/// # Safety
/// The CPU has AVX2, FMA and F16C ([`super::Isa::Avx2`] is available);
/// `w.len() == xs[t].len() * elem_size(TY)` for every `t`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn plain_avx2<const TY: u8, const N: usize>(
    w: &[u8],
    xs: &[&[f32]; N],
) -> [f32; N] {
    let k = xs.first().map_or(0, |x| x.len());
    debug_assert!(xs.iter().all(|x| x.len() == k) && w.len() == k * elem_size(TY));
    let es = elem_size(TY);
    let mut acc = [[_mm256_setzero_ps(); 2]; N];
    let mut i = 0;
    while i + 16 <= k {
        for h in 0..2 {
            // SAFETY: i + 8h + 8 <= k, so the 8 elements at i + 8h lie inside
            // `w` (k · es bytes) and inside each `x` (k floats).
            unsafe {
                let wv = load8::<TY>(w.as_ptr().add((i + 8 * h) * es));
                for (a, x) in acc.iter_mut().zip(xs) {
                    let xv = _mm256_loadu_ps(x.as_ptr().add(i + 8 * h));
                    a[h] = _mm256_fmadd_ps(wv, xv, a[h]);
                }
            }
        }
        i += 16;
    }
    if i + 8 <= k {
        // SAFETY: as above, with i + 8 <= k.
        unsafe {
            let wv = load8::<TY>(w.as_ptr().add(i * es));
            for (a, x) in acc.iter_mut().zip(xs) {
                a[0] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x.as_ptr().add(i)), a[0]);
            }
        }
        i += 8;
    }
    let mut out = [0f32; N];
    for ((o, a), x) in out.iter_mut().zip(&acc).zip(xs) {
        // SAFETY: this function's caller guarantees AVX2.
        let s = unsafe { hsum8(_mm256_add_ps(a[0], a[1])) };
        *o = s + tail::<TY>(&w[i * es..], &x[i..]);
    }
    out
}

/// Sixteen elements of type `TY` at `p`, widened to f32.
///
/// # Safety
/// The CPU has AVX-512F, AVX2, FMA and F16C; `p` points to `16 * elem_size(TY)`
/// readable bytes.
#[inline]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn load16<const TY: u8>(p: *const u8) -> __m512 {
    // SAFETY: the caller guarantees the bytes are readable; every load here
    // is unaligned.
    unsafe {
        match TY {
            F32 => _mm512_loadu_ps(p.cast()),
            F16 => _mm512_cvtph_ps(_mm256_loadu_si256(p.cast())),
            _ => _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(
                _mm256_loadu_si256(p.cast()),
            ))),
        }
    }
}

/// `[Σ_i w[i]·xs[t][i]; N]` on AVX-512F for a row `w` of `TY`.
///
/// # Safety
/// The CPU has AVX-512F, AVX2, FMA and F16C ([`super::Isa::Avx512`] is
/// available); `w.len() == xs[t].len() * elem_size(TY)` for every `t`.
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
pub(super) unsafe fn plain_avx512<const TY: u8, const N: usize>(
    w: &[u8],
    xs: &[&[f32]; N],
) -> [f32; N] {
    let k = xs.first().map_or(0, |x| x.len());
    debug_assert!(xs.iter().all(|x| x.len() == k) && w.len() == k * elem_size(TY));
    let es = elem_size(TY);
    let mut acc = [[_mm512_setzero_ps(); 2]; N];
    let mut i = 0;
    while i + 32 <= k {
        for h in 0..2 {
            // SAFETY: i + 16h + 16 <= k, so the 16 elements at i + 16h lie
            // inside `w` (k · es bytes) and inside each `x` (k floats).
            unsafe {
                let wv = load16::<TY>(w.as_ptr().add((i + 16 * h) * es));
                for (a, x) in acc.iter_mut().zip(xs) {
                    let xv = _mm512_loadu_ps(x.as_ptr().add(i + 16 * h));
                    a[h] = _mm512_fmadd_ps(wv, xv, a[h]);
                }
            }
        }
        i += 32;
    }
    if i + 16 <= k {
        // SAFETY: as above, with i + 16 <= k.
        unsafe {
            let wv = load16::<TY>(w.as_ptr().add(i * es));
            for (a, x) in acc.iter_mut().zip(xs) {
                a[0] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x.as_ptr().add(i)), a[0]);
            }
        }
        i += 16;
    }
    let mut out = [0f32; N];
    for ((o, a), x) in out.iter_mut().zip(&acc).zip(xs) {
        let s = _mm512_reduce_add_ps(_mm512_add_ps(a[0], a[1]));
        *o = s + tail::<TY>(&w[i * es..], &x[i..]);
    }
    out
}

/// The last few (fewer than one vector of) elements, one at a time.
fn tail<const TY: u8>(w: &[u8], x: &[f32]) -> f32 {
    let es = elem_size(TY);
    let mut s = 0f32;
    for (b, &xv) in w.chunks_exact(es).zip(x) {
        let wv = match TY {
            F32 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            F16 => half::f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32(),
            _ => f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16),
        };
        s += wv * xv;
    }
    s
}
