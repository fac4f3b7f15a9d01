//! AVX-512F products of rows of ggml blocks (Q8_0, Q4_0, Q4_1, Q4_K, Q6_K)
//! with f32 activations, the blocks decoded in registers.
//!
//! Each block's integers are widened to 32-bit lanes straight from memory
//! (`vpmovzxbd`/`vpmovsxbd`), converted to f32, scaled with the block's
//! (sub-block's) factors in one fused multiply-add, and multiplied into every
//! token's accumulators: a weight is decoded once per group of tokens and never
//! stored. Sixteen lanes are sixteen consecutive elements, so the per-16 and
//! per-32 scales are broadcasts. Two accumulators per token (the two halves
//! of each 32 elements) hide the FMA latency.
//!
//! The weight values are those of the host dequantizer to the rounding of
//! one product (Q8_0, Q4_0 and Q6_K to the bit: `d·(q − o)` is computed as
//! `d·q − d·o` with `d·o` exact); the sums differ only in their order.

use std::arch::x86_64::*;

use crate::quant::QuantType;

/// Bytes ahead of the block being decoded that are prefetched: a single
/// thread decodes too slowly for the hardware prefetcher alone to keep the
/// row's next bytes in L1 (a third to half of the 1-token rate was lost to
/// misses). Past the row's end this is the next row (rows lie back to back);
/// the hint never faults.
pub(super) const PREFETCH: usize = 1024;

/// Every token's two accumulators.
type Acc<const N: usize> = [[__m512; 2]; N];

/// The f16 at `p` (unaligned), widened, in every lane. (A broadcast of
/// the bits, not a scalar load: the compiler merges scalar loads into some
/// register's upper lanes, which can chain every block to an accumulator.)
///
/// # Safety
/// The CPU has AVX-512F and F16C; `p` points to 2 readable bytes.
#[inline]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
pub(super) unsafe fn f16_splat(p: *const u8) -> __m512 {
    // SAFETY: the caller guarantees 2 readable bytes at `p`.
    let bits = unsafe { p.cast::<i16>().read_unaligned() };
    _mm512_cvtph_ps(_mm256_set1_epi16(bits))
}

/// `f`, kept in memory: its elements are then broadcast by loads (which
/// take no vector ALU port) rather than by shuffles out of the register the
/// compiler would otherwise keep it in.
#[inline(always)]
pub(super) fn in_memory(f: &mut [f32; 16]) -> &[f32; 16] {
    std::hint::black_box(f)
}

/// The 16 bytes at `p`, zero-extended to 32-bit lanes.
///
/// # Safety
/// The CPU has AVX-512F; `p` points to 16 readable bytes.
#[inline]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn bytes16(p: *const u8) -> __m512i {
    // SAFETY: the caller guarantees 16 readable bytes.
    _mm512_cvtepu8_epi32(unsafe { _mm_loadu_si128(p.cast()) })
}

/// `acc[t][h] += w · xs[t][at..at + 16]` for every token.
///
/// # Safety
/// The CPU has AVX-512F; every `xs[t]` points to `at + 16` readable floats.
#[inline]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn fma16<const N: usize>(
    acc: &mut Acc<N>,
    h: usize,
    w: __m512,
    xs: &[*const f32; N],
    at: usize,
) {
    for (a, &x) in acc.iter_mut().zip(xs) {
        // SAFETY: the caller guarantees the 16 floats at `at`.
        a[h] = _mm512_fmadd_ps(w, unsafe { _mm512_loadu_ps(x.add(at)) }, a[h]);
    }
}

/// `d·q − o` for 16 integers `q`.
#[inline]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
fn scaled(q: __m512i, d: __m512, o: __m512) -> __m512 {
    _mm512_fmsub_ps(_mm512_cvtepi32_ps(q), d, o)
}

/// `[Σ_i w[i]·xs[t][i]; N]` for a row of whole blocks of `ty` (one of
/// [`super::x86_q256::has_kernel`]'s types).
///
/// # Safety
/// The CPU has AVX-512F, AVX2, FMA and F16C; `row` is whole blocks of `ty`
/// and every `xs[t]` holds exactly their elements.
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
pub(super) unsafe fn dot<const N: usize>(ty: QuantType, row: &[u8], xs: &[&[f32]; N]) -> [f32; N] {
    let (bb, be) = (ty.block_bytes() as usize, ty.block_elems() as usize);
    let blocks = row.len() / bb;
    debug_assert!(row.len() == blocks * bb && xs.iter().all(|x| x.len() == blocks * be));
    let xp: [*const f32; N] = std::array::from_fn(|t| xs[t].as_ptr());
    let mut acc = [[_mm512_setzero_ps(); 2]; N];
    // One or two tokens: a second set of accumulators for odd blocks, so
    // that consecutive blocks' sums do not wait on each other.
    let mut odd = [[_mm512_setzero_ps(); 2]; N];
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
            a[0] = _mm512_add_ps(a[0], o[0]);
            a[1] = _mm512_add_ps(a[1], o[1]);
        }
    }
    let acc = acc.map(|a| _mm512_add_ps(a[0], a[1]));
    if N < 4 {
        return acc.map(|a| _mm512_reduce_add_ps(a));
    }
    let sums = sums8(std::array::from_fn(|t| {
        acc.get(t).copied().unwrap_or(_mm512_setzero_ps())
    }));
    std::array::from_fn(|t| sums[t])
}

/// The 128-bit lanes of `p` and `q` folded in half: `[p0 + p2, p1 + p3,
/// q0 + q2, q1 + q3]`.
#[inline]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
fn fold_halves(p: __m512, q: __m512) -> __m512 {
    _mm512_add_ps(
        _mm512_shuffle_f32x4::<0b01_00_01_00>(p, q),
        _mm512_shuffle_f32x4::<0b11_10_11_10>(p, q),
    )
}

/// The 128-bit lanes of two [`fold_halves`] results folded again: lane `i`
/// holds four partial sums of vector `i` of the four folded.
#[inline]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
fn fold_quarters(u: __m512, v: __m512) -> __m512 {
    _mm512_add_ps(
        _mm512_shuffle_f32x4::<0b10_00_10_00>(u, v),
        _mm512_shuffle_f32x4::<0b11_01_11_01>(u, v),
    )
}

/// The horizontal sums of eight vectors, together (a third of the shuffles
/// of eight separate reductions).
#[inline]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
fn sums8(v: [__m512; 8]) -> [f32; 8] {
    let a = fold_quarters(fold_halves(v[0], v[1]), fold_halves(v[2], v[3]));
    let b = fold_quarters(fold_halves(v[4], v[5]), fold_halves(v[6], v[7]));
    // Per lane i: [a_i0 + a_i1, a_i2 + a_i3, b_i0 + b_i1, b_i2 + b_i3].
    let c = _mm512_add_ps(
        _mm512_shuffle_ps::<0b10_00_10_00>(a, b),
        _mm512_shuffle_ps::<0b11_01_11_01>(a, b),
    );
    // Element 4i: the sum of v[i]; element 4i + 2: that of v[4 + i].
    let d = _mm512_add_ps(c, _mm512_shuffle_ps::<0b10_11_00_01>(c, c));
    let mut out = [0f32; 16];
    // SAFETY: `out` holds 16 floats.
    unsafe { _mm512_storeu_ps(out.as_mut_ptr(), d) };
    std::array::from_fn(|t| out[4 * (t % 4) + 2 * (t / 4)])
}

/// A Q8_0 block (f16 `d`, 32 × i8): `d·q`.
///
/// # Safety
/// AVX-512F; `b` points to the 34 bytes of a block, every `xs[t]` to its 32
/// elements at `at`.
#[inline]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn q8_0<const N: usize>(b: *const u8, acc: &mut Acc<N>, xs: &[*const f32; N], at: usize) {
    // SAFETY: the reads lie in the 34 bytes, the floats in the 32.
    unsafe {
        let d = f16_splat(b);
        for h in 0..2 {
            let q = _mm512_cvtepi8_epi32(_mm_loadu_si128(b.add(2 + 16 * h).cast()));
            fma16(
                acc,
                h,
                _mm512_mul_ps(_mm512_cvtepi32_ps(q), d),
                xs,
                at + 16 * h,
            );
        }
    }
}

/// A Q4_0 block (f16 `d`, 16 bytes of nibbles: low for elements 0..16, high
/// for 16..32): `d·(q − 8)`.
///
/// # Safety
/// As for [`q8_0`], with an 18-byte block.
#[inline]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn q4_0<const N: usize>(b: *const u8, acc: &mut Acc<N>, xs: &[*const f32; N], at: usize) {
    // SAFETY: the reads lie in the 18 bytes, the floats in the 32.
    unsafe {
        let d = f16_splat(b);
        let o = _mm512_mul_ps(d, _mm512_set1_ps(8.0));
        let v = bytes16(b.add(2));
        let lo = _mm512_and_si512(v, _mm512_set1_epi32(0x0f));
        fma16(acc, 0, scaled(lo, d, o), xs, at);
        fma16(acc, 1, scaled(_mm512_srli_epi32::<4>(v), d, o), xs, at + 16);
    }
}

/// A Q4_1 block (f16 `d`, f16 `m`, nibbles as in Q4_0): `d·q + m`.
///
/// # Safety
/// As for [`q8_0`], with a 20-byte block.
#[inline]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn q4_1<const N: usize>(b: *const u8, acc: &mut Acc<N>, xs: &[*const f32; N], at: usize) {
    // SAFETY: the reads lie in the 20 bytes, the floats in the 32.
    unsafe {
        let d = f16_splat(b);
        let o = _mm512_sub_ps(_mm512_setzero_ps(), f16_splat(b.add(2)));
        let v = bytes16(b.add(4));
        let lo = _mm512_and_si512(v, _mm512_set1_epi32(0x0f));
        fma16(acc, 0, scaled(lo, d, o), xs, at);
        fma16(acc, 1, scaled(_mm512_srli_epi32::<4>(v), d, o), xs, at + 16);
    }
}

/// The eight 6-bit scales (bytes 0..8) and mins (8..16) of a Q4_K block's
/// twelve scale bytes at `s`, as ggml unpacks them.
///
/// # Safety
/// `s` points to 12 readable bytes.
#[inline]
pub(super) unsafe fn q4_k_scales(s: *const u8) -> [u32; 4] {
    const LOW6: u32 = 0x3f3f_3f3f;
    const LOW4: u32 = 0x0f0f_0f0f;
    const LOW2: u32 = 0x0303_0303;
    // SAFETY: the caller guarantees 12 readable bytes.
    let u: [u32; 3] =
        std::array::from_fn(|i| unsafe { s.add(4 * i).cast::<u32>().read_unaligned() });
    [
        u[0] & LOW6,
        (u[2] & LOW4) | (((u[0] >> 6) & LOW2) << 4),
        u[1] & LOW6,
        ((u[2] >> 4) & LOW4) | (((u[1] >> 6) & LOW2) << 4),
    ]
}

/// A Q4_K block (f16 `d`, f16 `dmin`, 12 scale bytes, 128 bytes of nibbles;
/// each 32 bytes hold two sub-blocks, low nibbles then high): sub-block `j`'s
/// element is `(d·sc_j)·q − dmin·m_j`.
///
/// # Safety
/// As for [`q8_0`], with a 144-byte block of 256 elements.
#[inline]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn q4_k<const N: usize>(b: *const u8, acc: &mut Acc<N>, xs: &[*const f32; N], at: usize) {
    // SAFETY: the reads lie in the 144 bytes, the floats in the 256.
    unsafe {
        let sm = q4_k_scales(b.add(4));
        let sm = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(sm.as_ptr().cast())));
        let (d, dmin) = (f16_splat(b), f16_splat(b.add(2)));
        // Lanes 0..8: d·sc_j; 8..16: dmin·m_j.
        let mut f = [0f32; 16];
        _mm512_storeu_ps(
            f.as_mut_ptr(),
            _mm512_mul_ps(sm, _mm512_mask_mov_ps(d, 0xff00, dmin)),
        );
        let f = in_memory(&mut f);
        let mask = _mm512_set1_epi32(0x0f);
        for c in 0..4 {
            let q = b.add(16 + 32 * c);
            let (v0, v1) = (bytes16(q), bytes16(q.add(16)));
            let (d0, m0) = (_mm512_set1_ps(f[2 * c]), _mm512_set1_ps(f[8 + 2 * c]));
            let (d1, m1) = (_mm512_set1_ps(f[2 * c + 1]), _mm512_set1_ps(f[9 + 2 * c]));
            let e = at + 64 * c;
            fma16(acc, 0, scaled(_mm512_and_si512(v0, mask), d0, m0), xs, e);
            fma16(
                acc,
                1,
                scaled(_mm512_and_si512(v1, mask), d0, m0),
                xs,
                e + 16,
            );
            fma16(
                acc,
                0,
                scaled(_mm512_srli_epi32::<4>(v0), d1, m1),
                xs,
                e + 32,
            );
            fma16(
                acc,
                1,
                scaled(_mm512_srli_epi32::<4>(v1), d1, m1),
                xs,
                e + 48,
            );
        }
    }
}

/// A Q6_K block (128 bytes of low nibbles, 64 of high bit pairs, 16 i8
/// scales, f16 `d`): element `e` is `(d·sc_{e/16})·(q − 32)`.
///
/// # Safety
/// As for [`q8_0`], with a 210-byte block of 256 elements.
#[inline]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn q6_k<const N: usize>(b: *const u8, acc: &mut Acc<N>, xs: &[*const f32; N], at: usize) {
    // SAFETY: the reads lie in the 210 bytes, the floats in the 256.
    unsafe {
        let sc = _mm512_cvtepi8_epi32(_mm_loadu_si128(b.add(192).cast()));
        let ds = _mm512_mul_ps(_mm512_cvtepi32_ps(sc), f16_splat(b.add(208)));
        let (mut f, mut o) = ([0f32; 16], [0f32; 16]);
        _mm512_storeu_ps(f.as_mut_ptr(), ds);
        _mm512_storeu_ps(o.as_mut_ptr(), _mm512_mul_ps(ds, _mm512_set1_ps(32.0)));
        let (f, o) = (in_memory(&mut f), in_memory(&mut o));
        let (low4, bits45) = (_mm512_set1_epi32(0x0f), _mm512_set1_epi32(0x30));
        // Element 128·half + 32·g + 16·h + l: low nibble from
        // ql[64·half + 32·(g % 2) + 16·h + l] (high nibble for g ≥ 2), high
        // bits from qh[32·half + 16·h + l] >> 2g.
        for half in 0..2 {
            for h in 0..2 {
                let ql0 = bytes16(b.add(64 * half + 16 * h));
                let ql1 = bytes16(b.add(64 * half + 32 + 16 * h));
                let qh = bytes16(b.add(128 + 32 * half + 16 * h));
                let lows = [
                    _mm512_and_si512(ql0, low4),
                    _mm512_and_si512(ql1, low4),
                    _mm512_srli_epi32::<4>(ql0),
                    _mm512_srli_epi32::<4>(ql1),
                ];
                let highs = [
                    _mm512_slli_epi32::<4>(qh),
                    _mm512_slli_epi32::<2>(qh),
                    qh,
                    _mm512_srli_epi32::<2>(qh),
                ];
                for g in 0..4 {
                    // lo | (high & 0x30).
                    let q = _mm512_ternarylogic_epi32::<0xf8>(lows[g], highs[g], bits45);
                    let s = 8 * half + 2 * g + h;
                    let w = scaled(q, _mm512_set1_ps(f[s]), _mm512_set1_ps(o[s]));
                    fma16(acc, h, w, xs, at + 128 * half + 32 * g + 16 * h);
                }
            }
        }
    }
}
