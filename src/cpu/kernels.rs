//! One thread's share of a product: output rows `r0..r1` for every token,
//! dispatched to the kernels of one [`Isa`].

use super::{HostMatrix, Isa};
use crate::quant::{self, QuantType};

/// Tokens that share one read of a weight row.
const TOKEN_BLOCK: usize = 4;

/// Tokens that share one decode of a row of ggml blocks on AVX-512: twice as
/// many weights per decode, and 32 registers hold their accumulators.
const TOKEN_BLOCK_FUSED: usize = 8;

/// Tokens that share a read of rows of `ty` on `isa`.
fn token_block(isa: Isa, ty: QuantType) -> usize {
    #[cfg(target_arch = "x86_64")]
    if matches!(isa, Isa::Avx512 | Isa::Avx512Vnni) && super::x86_q256::has_kernel(ty) {
        return TOKEN_BLOCK_FUSED;
    }
    let _ = (isa, ty);
    TOKEN_BLOCK
}

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

/// The activations of a product as its kernels read them: `tokens` rows of
/// `k` elements, taken a stretch at a time.
pub(super) trait Activations: Sync {
    /// One token's stretch, as a kernel takes it.
    type Stretch<'s>: Copy
    where
        Self: 's;

    /// Token `t`'s elements `k0..k0 + n` (`k0` and `n` whole blocks of the
    /// weights).
    fn stretch(&self, t: usize, k0: usize, n: usize) -> Self::Stretch<'_>;

    /// One stored row of `ty` against `N` tokens' stretches of its length.
    fn dot<const N: usize>(
        &self,
        isa: Isa,
        ty: QuantType,
        row: &[u8],
        xs: &[Self::Stretch<'_>; N],
    ) -> [f32; N];
}

/// Activations in f32, `k` a row.
pub(super) struct F32Rows<'a> {
    /// `tokens × k` floats.
    pub(super) x: &'a [f32],
    /// Elements per token.
    pub(super) k: usize,
}

impl Activations for F32Rows<'_> {
    type Stretch<'s>
        = &'s [f32]
    where
        Self: 's;

    fn stretch(&self, t: usize, k0: usize, n: usize) -> &[f32] {
        &self.x[t * self.k + k0..t * self.k + k0 + n]
    }

    fn dot<const N: usize>(
        &self,
        isa: Isa,
        ty: QuantType,
        row: &[u8],
        xs: &[&[f32]; N],
    ) -> [f32; N] {
        dot(isa, ty, row, xs)
    }
}

#[cfg(target_arch = "x86_64")]
impl Activations for super::x86_vnni::Q16 {
    type Stretch<'s> = super::x86_vnni::Q16Row<'s>;

    fn stretch(&self, t: usize, k0: usize, n: usize) -> Self::Stretch<'_> {
        self.row(t, k0, n)
    }

    fn dot<const N: usize>(
        &self,
        isa: Isa,
        ty: QuantType,
        row: &[u8],
        xs: &[Self::Stretch<'_>; N],
    ) -> [f32; N] {
        assert!(isa == Isa::Avx512Vnni && super::x86_vnni::has_kernel(ty));
        debug_assert!(isa.is_available());
        // SAFETY: the pool checked when it was built that its instruction
        // set, AVX-512 VNNI, is available (with AVX-512F/BW, AVX2, FMA and
        // F16C); `row` is whole blocks of `ty`, a stretch of a checked row
        // cut at block boundaries, and every `xs[t]` covers its elements.
        unsafe { super::x86_vnni::dot(ty, row, xs) }
    }
}

/// Writes `y[t * w.rows() + r]` for `r` in `rows` and every token `t` of `x`
/// (`tokens` rows of `w.cols()` elements) through `put(t, r, value, add)`:
/// with `add`, the value is a further partial sum to add to the element,
/// else the element's first.
///
/// `isa` must be available on this CPU ([`Isa::is_available`]); the pool
/// checks that once when it is built.
pub(super) fn rows_into<A: Activations>(
    isa: Isa,
    w: &HostMatrix<'_>,
    x: &A,
    tokens: usize,
    rows: std::ops::Range<usize>,
    mut put: impl FnMut(usize, usize, f32, bool),
) {
    let k = w.cols();
    debug_assert!(isa.is_available());
    // One token reads each weight once whatever the order: whole rows.
    let kb = if tokens > 1 { K_BLOCK } else { k.max(1) };
    let (be, bb) = (w.ty().block_elems() as usize, w.ty().block_bytes() as usize);
    let tb = token_block(isa, w.ty());
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
                    let g = (tokens - t0).min(tb);
                    let xs = |j: usize| x.stretch(t0 + j, k0, n);
                    group(isa, w.ty(), row, g, x, xs, |j, v| put(t0 + j, r, v, k0 > 0));
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

/// One stored row against `g` (1..=8) tokens' stretches `xs(0..g)` of `x`:
/// each sum goes to `emit(j, value)`.
fn group<'x, A: Activations>(
    isa: Isa,
    ty: QuantType,
    row: &[u8],
    g: usize,
    x: &'x A,
    xs: impl Fn(usize) -> A::Stretch<'x>,
    mut emit: impl FnMut(usize, f32),
) {
    macro_rules! run {
        ($n:literal) => {{
            let xs: [A::Stretch<'x>; $n] = std::array::from_fn(&xs);
            for (j, v) in x.dot(isa, ty, row, &xs).into_iter().enumerate() {
                emit(j, v);
            }
        }};
    }
    match g {
        1 => run!(1),
        2 => run!(2),
        3 => run!(3),
        4 => run!(4),
        5 => run!(5),
        6 => run!(6),
        7 => run!(7),
        _ => run!(8),
    }
}

/// One stored row against `N` token rows.
fn dot<const N: usize>(isa: Isa, ty: QuantType, row: &[u8], xs: &[&[f32]; N]) -> [f32; N] {
    if !ty.is_quantized() {
        return plain(isa, ty, row, xs);
    }
    #[cfg(target_arch = "x86_64")]
    if isa != Isa::Scalar && super::x86_q256::has_kernel(ty) {
        debug_assert!(isa.is_available());
        // SAFETY: `isa` is available (checked when the pool was built), and
        // AVX-512F machines have AVX2, FMA and F16C too; `row` is whole
        // blocks of `ty` whose elements every `xs[t]` holds (a stretch of a
        // checked row, cut at block boundaries by `rows_into`).
        return unsafe {
            match isa {
                Isa::Avx512 | Isa::Avx512Vnni => super::x86_q512::dot(ty, row, xs),
                _ => super::x86_q256::dot(ty, row, xs),
            }
        };
    }
    // Decode a tile of the row into L1, then run the f32 kernel over it.
    let (be, bb) = (ty.block_elems() as usize, ty.block_bytes() as usize);
    let tile_blocks = (TILE / be).max(1);
    let mut buf = [0f32; TILE];
    let mut acc = [0f32; N];
    for (i, blocks) in row.chunks(tile_blocks * bb).enumerate() {
        let n = blocks.len() / bb * be;
        let tile = &mut buf[..n];
        if let Err(e) = quant::dequantize_f32(ty, blocks, tile) {
            // HostMatrix::new checked that rows are whole blocks.
            unreachable!("a row of a checked {ty} matrix: {e}");
        }
        let at = i * tile_blocks * be;
        let xt: [&[f32]; N] = std::array::from_fn(|j| &xs[j][at..at + n]);
        let part = plain(isa, QuantType::F32, bytemuck::cast_slice(tile), &xt);
        for (a, p) in acc.iter_mut().zip(part) {
            *a += p;
        }
    }
    acc
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
        Isa::Avx512 | Isa::Avx512Vnni => {
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
        Isa::Avx2 | Isa::Avx512 | Isa::Avx512Vnni => super::scalar::plain(ty, w, xs),
    }
}
