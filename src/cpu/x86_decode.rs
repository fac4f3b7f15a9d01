//! AVX2 decoders of ggml blocks into f32, bit for bit what the host
//! dequantizer ([`crate::quant::dequantize_f32`]) writes: the same products
//! and sums, each one f32 operation in the same order, never fused. The
//! quantized kernels decode a tile of a row with these into L1 and run the
//! f32 dot product over it.

use std::arch::x86_64::*;

use half::f16;

use crate::quant::QuantType;

/// Whether [`decode`] has a vector decoder for `ty`.
pub(super) fn has_decoder(ty: QuantType) -> bool {
    matches!(
        ty,
        QuantType::Q8_0 | QuantType::Q4_0 | QuantType::Q4_1 | QuantType::Q4_K | QuantType::Q6_K
    )
}

fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[at], b[at + 1]])).to_f32()
}

/// How the 8 integers of a group become floats.
#[derive(Clone, Copy)]
enum Affine {
    /// `d * (q - off)`.
    Scale(f32, i32),
    /// `d * q + m`.
    ScaleAdd(f32, f32),
    /// `d * q - m`.
    ScaleSub(f32, f32),
}

/// Widens 8 integers `q` (i32 lanes) to f32 by `a` into `out[..8]`.
///
/// # Safety
/// The CPU has AVX2; `out` is valid for 8 writes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn put8(q: __m256i, a: Affine, out: *mut f32) {
    let v = match a {
        Affine::Scale(d, off) => _mm256_mul_ps(
            _mm256_set1_ps(d),
            _mm256_cvtepi32_ps(_mm256_sub_epi32(q, _mm256_set1_epi32(off))),
        ),
        Affine::ScaleAdd(d, m) => _mm256_add_ps(
            _mm256_mul_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(q)),
            _mm256_set1_ps(m),
        ),
        Affine::ScaleSub(d, m) => _mm256_sub_ps(
            _mm256_mul_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(q)),
            _mm256_set1_ps(m),
        ),
    };
    // SAFETY: the caller guarantees 8 writable floats at `out`.
    unsafe { _mm256_storeu_ps(out, v) }
}

/// 16 unsigned bytes to `out[..16]` by `a`.
///
/// # Safety
/// As for [`put8`], with 16 writes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn put16_u8(q: __m128i, a: Affine, out: *mut f32) {
    // SAFETY: forwarded; the second group lands 8 floats on.
    unsafe {
        put8(_mm256_cvtepu8_epi32(q), a, out);
        put8(_mm256_cvtepu8_epi32(_mm_srli_si128::<8>(q)), a, out.add(8));
    }
}

/// Decodes whole blocks of `ty` (one of [`has_decoder`]'s) from `src` into
/// `dst`.
///
/// # Safety
/// The CPU has AVX2, FMA and F16C; `src` is whole blocks of `ty` and `dst`
/// holds exactly their elements.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn decode(ty: QuantType, src: &[u8], dst: &mut [f32]) {
    let (bb, be) = (ty.block_bytes() as usize, ty.block_elems() as usize);
    debug_assert_eq!(
        (src.len() / bb * bb, src.len() / bb * be),
        (src.len(), dst.len())
    );
    for (b, o) in src.chunks_exact(bb).zip(dst.chunks_exact_mut(be)) {
        let out = o.as_mut_ptr();
        // SAFETY: `b` is one whole block of `ty` and `o` its `be` elements;
        // every load below reads inside `b`, every store writes inside `o`.
        unsafe {
            match ty {
                QuantType::Q8_0 => q8_0(b, out),
                QuantType::Q4_0 => q4(b, 2, Affine::Scale(f16_at(b, 0), 8), out),
                QuantType::Q4_1 => q4(b, 4, Affine::ScaleAdd(f16_at(b, 0), f16_at(b, 2)), out),
                QuantType::Q4_K => q4_k(b, out),
                QuantType::Q6_K => q6_k(b, out),
                _ => unreachable!("decode is called for has_decoder types only"),
            }
        }
    }
}

/// # Safety
/// AVX2; `b` is a Q8_0 block (34 bytes), `out` 32 writable floats.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q8_0(b: &[u8], out: *mut f32) {
    let d = f16_at(b, 0);
    for g in 0..4 {
        // SAFETY: bytes 2 + 8g .. 10 + 8g are inside the 34-byte block;
        // floats 8g .. 8g + 8 inside the 32.
        unsafe {
            let q = _mm_loadl_epi64(b.as_ptr().add(2 + 8 * g).cast());
            // ggml's `q * d`: the same single product as `d * q`.
            put8(_mm256_cvtepi8_epi32(q), Affine::Scale(d, 0), out.add(8 * g));
        }
    }
}

/// Q4_0 and Q4_1: 16 bytes of nibbles at `at`; low nibbles are elements
/// 0..16, high nibbles 16..32.
///
/// # Safety
/// AVX2; `b` holds 16 bytes at `at`, `out` 32 writable floats.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4(b: &[u8], at: usize, a: Affine, out: *mut f32) {
    // SAFETY: the 16 bytes at `at` are inside the block; 32 floats out.
    unsafe {
        let v = _mm_loadu_si128(b.as_ptr().add(at).cast());
        let mask = _mm_set1_epi8(0x0f);
        put16_u8(_mm_and_si128(v, mask), a, out);
        put16_u8(_mm_and_si128(_mm_srli_epi16::<4>(v), mask), a, out.add(16));
    }
}

/// # Safety
/// AVX2; `b` is a Q4_K block (144 bytes), `out` 256 writable floats.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_k(b: &[u8], out: *mut f32) {
    let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
    let s = &b[4..16];
    let mask = _mm_set1_epi8(0x0f);
    for j in 0..8 {
        let (sc, m) = if j < 4 {
            (s[j] & 63, s[j + 4] & 63)
        } else {
            (
                (s[j + 4] & 0x0f) | ((s[j - 4] >> 6) << 4),
                (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
            )
        };
        let a = Affine::ScaleSub(d * sc as f32, dmin * m as f32);
        for h in 0..2 {
            // SAFETY: bytes 16 + 32(j/2) + 16h .. +16 are inside the 144;
            // floats 32j + 16h .. +16 inside the 256.
            unsafe {
                let v = _mm_loadu_si128(b.as_ptr().add(16 + (j / 2) * 32 + 16 * h).cast());
                let v = if j % 2 == 1 {
                    _mm_srli_epi16::<4>(v)
                } else {
                    v
                };
                put16_u8(_mm_and_si128(v, mask), a, out.add(j * 32 + 16 * h));
            }
        }
    }
}

/// # Safety
/// AVX2; `b` is a Q6_K block (210 bytes), `out` 256 writable floats.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q6_k(b: &[u8], out: *mut f32) {
    let d = f16_at(b, 208);
    let low4 = _mm_set1_epi8(0x0f);
    let low2 = _mm_set1_epi8(0x03);
    // Elements 128·half + 32·group + l: low nibble from ql[64·half + 32·(group % 2) + l]
    // (high nibble for groups 2, 3), two high bits from qh[32·half + l] >> 2·group.
    for half in 0..2 {
        for group in 0..4 {
            for h in 0..2 {
                let e = 128 * half + 32 * group + 16 * h;
                let ds = d * b[192 + e / 16] as i8 as f32;
                // SAFETY: ql bytes 64·half + 32·(group % 2) + 16h .. +16 lie in
                // 0..128, qh bytes 128 + 32·half + 16h .. +16 in 128..192;
                // floats e .. e + 16 inside the 256.
                unsafe {
                    let ql = _mm_loadu_si128(
                        b.as_ptr().add(64 * half + 32 * (group % 2) + 16 * h).cast(),
                    );
                    let qh = _mm_loadu_si128(b.as_ptr().add(128 + 32 * half + 16 * h).cast());
                    let lo = if group >= 2 {
                        _mm_srli_epi16::<4>(ql)
                    } else {
                        ql
                    };
                    let hi = match group {
                        0 => qh,
                        1 => _mm_srli_epi16::<2>(qh),
                        2 => _mm_srli_epi16::<4>(qh),
                        _ => _mm_srli_epi16::<6>(qh),
                    };
                    let q = _mm_or_si128(
                        _mm_and_si128(lo, low4),
                        _mm_slli_epi16::<4>(_mm_and_si128(hi, low2)),
                    );
                    put16_u8(q, Affine::Scale(ds, 32), out.add(e));
                }
            }
        }
    }
}
