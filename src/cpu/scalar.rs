//! The portable kernels: eight f32 accumulators per token, summed pairwise,
//! so that their rounding matches the SIMD paths' order of magnitude.

use crate::quant::QuantType;

/// Lanes per token.
const LANES: usize = 8;

/// `[Σ_i w[i]·xs[t][i]; N]` for a row `w` of `F32`, `F16` or `BF16`
/// (little-endian bytes, any alignment) and `N` token rows of equal length.
pub(super) fn plain<const N: usize>(ty: QuantType, w: &[u8], xs: &[&[f32]; N]) -> [f32; N] {
    match ty {
        QuantType::F32 => run(w, xs, 4, |b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        QuantType::F16 => run(w, xs, 2, |b| {
            half::f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32()
        }),
        QuantType::BF16 => run(w, xs, 2, |b| {
            f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16)
        }),
        _ => unreachable!("plain kernels take F32, F16 and BF16 rows only"),
    }
}

fn run<const N: usize>(
    w: &[u8],
    xs: &[&[f32]; N],
    size: usize,
    widen: impl Fn(&[u8]) -> f32,
) -> [f32; N] {
    let k = xs.first().map_or(0, |x| x.len());
    debug_assert_eq!(w.len(), k * size);
    let mut acc = [[0f32; LANES]; N];
    for (i, wb) in w.chunks_exact(size).enumerate() {
        let wv = widen(wb);
        for (a, x) in acc.iter_mut().zip(xs) {
            a[i % LANES] += wv * x[i];
        }
    }
    acc.map(reduce)
}

/// Pairwise sum of the lanes.
fn reduce(mut a: [f32; LANES]) -> f32 {
    let mut n = LANES;
    while n > 1 {
        n /= 2;
        for i in 0..n {
            a[i] += a[i + n];
        }
    }
    a[0]
}
