//! One thread's share of a product: output rows `r0..r1` for every token,
//! dispatched to the kernels of one [`Isa`].

use super::{HostMatrix, Isa};
use crate::quant::{self, QuantType};

/// Tokens that share one read of a weight row.
const TOKEN_BLOCK: usize = 4;

/// Elements of a quantized row decoded at a time: one K-quant block, eight
/// 32-element blocks; small enough to stay in L1.
const TILE: usize = 256;

/// Elements of a row multiplied at a time when several tokens share it: the
/// tokens' stretches of `x` (4 × 2 KiB per group) stay in L1 across the rows
/// of a task instead of streaming from L2 for every row. A multiple of every
/// block size and of [`TILE`].
const K_BLOCK: usize = 512;

/// Rows that go through their stretches together.
const ROW_BLOCK: usize = 16;

/// Writes `y[t * w.rows() + r]` for `r` in `rows` and every token `t` of `x`
/// (`tokens` rows of `w.cols()` floats) through `put(t, r, value, add)`:
/// with `add`, the value is a further partial sum to add to the element,
/// else the element's first.
///
/// `isa` must be available on this CPU ([`Isa::is_available`]); the pool
/// checks that once when it is built.
pub(super) fn rows_into(
    isa: Isa,
    w: &HostMatrix<'_>,
    x: &[f32],
    tokens: usize,
    rows: std::ops::Range<usize>,
    mut put: impl FnMut(usize, usize, f32, bool),
) {
    let k = w.cols();
    debug_assert!(isa.is_available() && x.len() == tokens * k);
    // One token reads each weight once whatever the order: whole rows.
    let kb = if tokens > 1 { K_BLOCK } else { k.max(1) };
    let (be, bb) = (w.ty().block_elems() as usize, w.ty().block_bytes() as usize);
    let mut r0 = rows.start;
    while r0 < rows.end {
        // A few rows at a time: each streams through memory in order while
        // the tokens' stretches of `x` are reused from L1.
        let block = r0..(r0 + ROW_BLOCK).min(rows.end);
        let mut k0 = 0;
        loop {
            let n = kb.min(k - k0);
            let bytes = k0 / be * bb..(k0 + n) / be * bb;
            for r in block.clone() {
                let row = &w.row(r)[bytes.clone()];
                let mut t0 = 0;
                while t0 < tokens {
                    let g = (tokens - t0).min(TOKEN_BLOCK);
                    let x_at = |j: usize| &x[(t0 + j) * k + k0..(t0 + j) * k + k0 + n];
                    let mut emit = |v: &[f32]| {
                        for (j, &v) in v.iter().enumerate() {
                            put(t0 + j, r, v, k0 > 0);
                        }
                    };
                    match g {
                        1 => emit(&dot(isa, w.ty(), row, &[x_at(0)])),
                        2 => emit(&dot(isa, w.ty(), row, &[x_at(0), x_at(1)])),
                        3 => emit(&dot(isa, w.ty(), row, &[x_at(0), x_at(1), x_at(2)])),
                        _ => emit(&dot(
                            isa,
                            w.ty(),
                            row,
                            &[x_at(0), x_at(1), x_at(2), x_at(3)],
                        )),
                    }
                    t0 += g;
                }
            }
            k0 += n;
            if k0 >= k {
                break;
            }
        }
        r0 = block.end;
    }
}

/// One stored row against `N` token rows.
fn dot<const N: usize>(isa: Isa, ty: QuantType, row: &[u8], xs: &[&[f32]; N]) -> [f32; N] {
    if !ty.is_quantized() {
        return plain(isa, ty, row, xs);
    }
    // Decode a tile of the row into L1, then run the f32 kernel over it.
    let (be, bb) = (ty.block_elems() as usize, ty.block_bytes() as usize);
    let tile_blocks = (TILE / be).max(1);
    let mut buf = [0f32; TILE];
    let mut acc = [0f32; N];
    for (i, blocks) in row.chunks(tile_blocks * bb).enumerate() {
        let n = blocks.len() / bb * be;
        let tile = &mut buf[..n];
        decode(isa, ty, blocks, tile);
        let at = i * tile_blocks * be;
        let xt: [&[f32]; N] = std::array::from_fn(|j| &xs[j][at..at + n]);
        let part = plain(isa, QuantType::F32, bytemuck::cast_slice(tile), &xt);
        for (a, p) in acc.iter_mut().zip(part) {
            *a += p;
        }
    }
    acc
}

/// Decodes whole blocks of `ty` into `out` (exactly their elements), with
/// the vector decoder where `isa` has one: the same bits either way.
pub(super) fn decode(isa: Isa, ty: QuantType, blocks: &[u8], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if isa != Isa::Scalar && super::x86_decode::has_decoder(ty) {
        debug_assert!(isa.is_available());
        // SAFETY: AVX-512F machines have AVX2, FMA and F16C too, and `isa`
        // is available (checked when the pool was built); `blocks` are whole
        // blocks whose elements `out` holds (the tile of a checked row).
        unsafe { super::x86_decode::decode(ty, blocks, out) };
        return;
    }
    let _ = isa;
    if let Err(e) = quant::dequantize_f32(ty, blocks, out) {
        // HostMatrix::new checked that rows are whole blocks.
        unreachable!("a row of a checked {ty} matrix: {e}");
    }
}

/// A row of F32, F16 or BF16 against `N` token rows.
fn plain<const N: usize>(isa: Isa, ty: QuantType, w: &[u8], xs: &[&[f32]; N]) -> [f32; N] {
    match isa {
        Isa::Scalar => super::scalar::plain(ty, w, xs),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => {
            use super::x86::{plain_avx2, tag, BF16, F16, F32};
            // SAFETY: `isa` is available (checked when the pool was built) and
            // `w` is one row of `xs[t].len()` elements of `ty` (HostMatrix).
            unsafe {
                match tag(ty) {
                    F32 => plain_avx2::<F32, N>(w, xs),
                    F16 => plain_avx2::<F16, N>(w, xs),
                    _ => plain_avx2::<BF16, N>(w, xs),
                }
            }
        }
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => {
            use super::x86::{plain_avx512, tag, BF16, F16, F32};
            // SAFETY: as for AVX2.
            unsafe {
                match tag(ty) {
                    F32 => plain_avx512::<F32, N>(w, xs),
                    F16 => plain_avx512::<F16, N>(w, xs),
                    _ => plain_avx512::<BF16, N>(w, xs),
                }
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        Isa::Avx2 | Isa::Avx512 => super::scalar::plain(ty, w, xs),
    }
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};

    use super::*;

    #[test]
    fn vector_decoders_write_the_dequantizers_bits() {
        let seed: u64 = std::env::var("LS_SEED")
            .map(|s| s.parse().expect("LS_SEED must be a u64"))
            .unwrap_or_else(|_| rand::random());
        eprintln!("random seed {seed} (replay with LS_SEED={seed})");
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        for ty in QuantType::ALL.into_iter().filter(|t| t.is_quantized()) {
            let (bb, be) = (ty.block_bytes() as usize, ty.block_elems() as usize);
            let n = rng.gen_range(1..9);
            let mut src = vec![0u8; n * bb];
            rng.fill(&mut src[..]);
            // No NaN or infinite f16 fields: clear a random bit of any
            // all-ones exponent (the fields sit at 0, 2 or 208).
            for b in src.chunks_exact_mut(bb) {
                for at in [0, 2, 208].into_iter().filter(|&a| a + 1 < bb) {
                    if b[at + 1] & 0x7c == 0x7c {
                        b[at + 1] &= !(4 << rng.gen_range(0..5));
                    }
                }
            }
            let mut want = vec![0f32; n * be];
            quant::dequantize_f32(ty, &src, &mut want).unwrap();
            for isa in Isa::ALL.into_iter().filter(|i| i.is_available()) {
                let mut got = vec![f32::NAN; n * be];
                decode(isa, ty, &src, &mut got);
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert_eq!(
                        g.to_bits(),
                        w.to_bits(),
                        "{ty} on {isa}: element {i}: {g} vs {w}"
                    );
                }
            }
        }
    }
}
