//! FP8 weights as safetensors checkpoints store them: `F8_E4M3` (or
//! `F8_E5M2`) elements of a `[rows, cols]` matrix and, in a companion tensor,
//! f32/bf16/f16 scales, one per tile of the matrix. A weight decodes as
//! `w[r][c] = fp8(q[r][c]) * scale[r / tile_rows][c / tile_cols]`.
//!
//! The tiles are 128×128 blocks in the official FP8 releases and in
//! transformers' fine-grained FP8 (`weight_scale_inv`), and one row or the
//! whole matrix in compressed-tensors checkpoints (`weight_scale`). The
//! product is one f32 multiplication, rounded to bf16 (or f16, saturating)
//! to nearest even; a NaN result is the canonical NaN (`0x7fc0`, `0x7e00`),
//! so that the host and the device kernels (`dequant_fp8_bf16`,
//! `dequant_fp8_f16` in `kernels/dequant.cu`) agree to the bit whatever NaN
//! payload their multipliers produce.
//!
//! ```
//! use layer_streamer::quant::fp8::{self, Fp8Layout, ScaleLayout};
//! use layer_streamer::DType;
//!
//! let (rows, cols) = (3, 200);
//! let w: Vec<f32> = (0..rows * cols).map(|i| (i as f32 * 0.37).sin()).collect();
//! let layout = Fp8Layout::new(
//!     DType::F8E4M3, rows as u64, cols as u64, DType::F32, ScaleLayout::BLOCK_128,
//! ).unwrap();
//! let (q, scales) = fp8::quantize_e4m3(&w, &layout).unwrap();
//! let scale_bytes: Vec<u8> = scales.iter().flat_map(|s| s.to_le_bytes()).collect();
//! let mut back = vec![0f32; rows * cols];
//! fp8::dequantize_f32(&layout, &q, &scale_bytes, &mut back).unwrap();
//! assert!(w.iter().zip(&back).all(|(a, b)| (a - b).abs() <= 0.07 * a.abs().max(0.02)));
//! ```

use std::fmt;

use half::{bf16, f16};

use crate::{DType, Error, Result};

/// Largest finite E4M3 (`fn` variant, no infinities) magnitude.
pub const E4M3_MAX: f32 = 448.0;

/// How an FP8 weight's scales cover it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ScaleLayout {
    /// One scale per tile of `rows × cols` elements: a scale tensor of shape
    /// `[ceil(R / rows), ceil(C / cols)]` for an `[R, C]` weight.
    Blocks {
        /// Weight rows per tile.
        rows: u64,
        /// Weight columns per tile.
        cols: u64,
    },
    /// One scale per weight row (`[R, 1]` or `[R]`).
    PerChannel,
    /// One scale for the whole weight (`[]` or `[1]`).
    PerTensor,
}

impl ScaleLayout {
    /// 128×128 blocks, as the official FP8 releases store them.
    pub const BLOCK_128: ScaleLayout = ScaleLayout::Blocks {
        rows: 128,
        cols: 128,
    };

    /// Rows and columns of the tile one scale covers in a `[rows, cols]` weight.
    pub fn tile(self, rows: u64, cols: u64) -> (u64, u64) {
        match self {
            ScaleLayout::Blocks { rows, cols } => (rows, cols),
            ScaleLayout::PerChannel => (1, cols.max(1)),
            ScaleLayout::PerTensor => (rows.max(1), cols.max(1)),
        }
    }

    /// Rows and columns of the scale grid for a `[rows, cols]` weight.
    pub fn grid(self, rows: u64, cols: u64) -> (u64, u64) {
        let (tr, tc) = self.tile(rows, cols);
        (rows.div_ceil(tr.max(1)), cols.div_ceil(tc.max(1)))
    }
}

impl fmt::Display for ScaleLayout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ScaleLayout::Blocks { rows, cols } => write!(f, "{rows}x{cols} blocks"),
            ScaleLayout::PerChannel => f.write_str("per channel"),
            ScaleLayout::PerTensor => f.write_str("per tensor"),
        }
    }
}

/// The scale of an FP8 weight: the tensor that holds it and how it covers
/// the weight. [`TensorInfo::scale`](crate::checkpoint::TensorInfo::scale)
/// carries it; the scale tensor is a tensor of the same layer (or a static
/// beside a static weight).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Fp8Scale {
    /// Full name of the scale tensor (`…weight_scale_inv`, `…weight_scale`).
    pub tensor: String,
    /// Its element type: f32, bf16 or f16.
    pub dtype: DType,
    /// How its values cover the weight.
    pub layout: ScaleLayout,
}

/// Everything needed to decode one FP8 weight, small enough to travel with
/// a kernel launch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fp8Layout {
    /// Element format: [`DType::F8E4M3`] or [`DType::F8E5M2`].
    pub format: DType,
    /// Weight rows.
    pub rows: u64,
    /// Weight columns (elements per row).
    pub cols: u64,
    /// Element type of the scales: f32, bf16 or f16.
    pub scale_dtype: DType,
    /// How the scales cover the weight.
    pub layout: ScaleLayout,
}

impl Fp8Layout {
    /// Checks the formats and the tile (no zero-sized tile).
    pub fn new(
        format: DType,
        rows: u64,
        cols: u64,
        scale_dtype: DType,
        layout: ScaleLayout,
    ) -> Result<Fp8Layout> {
        if !matches!(format, DType::F8E4M3 | DType::F8E5M2) {
            return Err(Error::Input(format!(
                "{format} is not an FP8 format (f8_e4m3 or f8_e5m2)"
            )));
        }
        if !matches!(scale_dtype, DType::F32 | DType::BF16 | DType::F16) {
            return Err(Error::Input(format!(
                "FP8 scales of dtype {scale_dtype} are not supported (f32, bf16 or f16)"
            )));
        }
        if let ScaleLayout::Blocks { rows: 0, .. } | ScaleLayout::Blocks { cols: 0, .. } = layout {
            return Err(Error::Input(format!("FP8 scale tiles of {layout}")));
        }
        if rows.checked_mul(cols).is_none() {
            return Err(Error::Input(format!(
                "an FP8 weight of [{rows}, {cols}] overflows a 64-bit size"
            )));
        }
        Ok(Fp8Layout {
            format,
            rows,
            cols,
            scale_dtype,
            layout,
        })
    }

    /// The layout of a weight of `shape` (2-D) whose scale is `scale`.
    pub fn of(format: DType, shape: &[usize], scale: &Fp8Scale) -> Result<Fp8Layout> {
        let &[rows, cols] = shape else {
            return Err(Error::Input(format!(
                "an FP8 weight must be a matrix, not of shape {shape:?}"
            )));
        };
        Fp8Layout::new(format, rows as u64, cols as u64, scale.dtype, scale.layout)
    }

    /// Number of weight elements (and bytes).
    pub fn elems(&self) -> u64 {
        self.rows * self.cols
    }

    /// Rows and columns of one scale's tile.
    pub fn tile(&self) -> (u64, u64) {
        self.layout.tile(self.rows, self.cols)
    }

    /// Number of scales.
    pub fn scale_count(&self) -> u64 {
        let (r, c) = self.layout.grid(self.rows, self.cols);
        r * c
    }

    /// Bytes of the scale tensor.
    pub fn scale_bytes(&self) -> u64 {
        self.scale_count() * self.scale_dtype.size() as u64
    }

    /// Scale `i` of `scales` (little-endian, [`scale_dtype`](Self::scale_dtype)).
    fn scale_at(&self, scales: &[u8], i: usize) -> f32 {
        match self.scale_dtype {
            DType::F32 => {
                let b = &scales[4 * i..4 * i + 4];
                f32::from_le_bytes([b[0], b[1], b[2], b[3]])
            }
            DType::BF16 => {
                bf16::from_bits(u16::from_le_bytes([scales[2 * i], scales[2 * i + 1]])).to_f32()
            }
            _ => f16::from_bits(u16::from_le_bytes([scales[2 * i], scales[2 * i + 1]])).to_f32(),
        }
    }

    /// Checks the lengths of a weight's bytes, its scales and the output.
    fn check(&self, weights: usize, scales: usize, out: usize) -> Result<()> {
        if weights as u64 != self.elems() || out as u64 != self.elems() {
            return Err(Error::Input(format!(
                "FP8 weight [{}, {}]: {weights} bytes of {} and room for {out} outputs, \
                 expected {} of each",
                self.rows,
                self.cols,
                self.format,
                self.elems()
            )));
        }
        if scales as u64 != self.scale_bytes() {
            return Err(Error::Input(format!(
                "FP8 weight [{}, {}] with {}: {scales} bytes of scales, expected {} ({} {})",
                self.rows,
                self.cols,
                self.layout,
                self.scale_bytes(),
                self.scale_count(),
                self.scale_dtype
            )));
        }
        Ok(())
    }

    /// Calls `f(i, x)` with each element's index and decoded f32 value.
    fn decode_each(&self, weights: &[u8], scales: &[u8], mut f: impl FnMut(usize, f32)) {
        let (tr, tc) = self.tile();
        let (rows, cols) = (self.rows as usize, self.cols as usize);
        let (tr, tc) = (tr as usize, tc as usize);
        let grid_cols = cols.div_ceil(tc);
        let decode = decoder(self.format);
        for r in 0..rows {
            let row = &weights[r * cols..(r + 1) * cols];
            for (t, chunk) in row.chunks(tc).enumerate() {
                let s = self.scale_at(scales, (r / tr) * grid_cols + t);
                for (j, &q) in chunk.iter().enumerate() {
                    f(r * cols + t * tc + j, decode(q) * s);
                }
            }
        }
    }
}

/// The element decoder of an FP8 format.
fn decoder(format: DType) -> fn(u8) -> f32 {
    match format {
        DType::F8E5M2 => e5m2_to_f32,
        _ => e4m3_to_f32,
    }
}

/// An E4M3 (`float8_e4m3fn`: bias 7, no infinities, `S.1111.111` is NaN)
/// value widened exactly to f32.
pub fn e4m3_to_f32(b: u8) -> f32 {
    let sign = ((b & 0x80) as u32) << 24;
    let (e, m) = (((b >> 3) & 0x0f) as u32, (b & 7) as u32);
    if e == 15 && m == 7 {
        return f32::from_bits(sign | 0x7fc0_0000);
    }
    if e == 0 {
        // Subnormal: m · 2⁻⁹, exact in f32.
        return f32::from_bits((m as f32 * (1.0 / 512.0)).to_bits() | sign);
    }
    f32::from_bits(sign | ((e + 120) << 23) | (m << 20))
}

/// An E5M2 value (IEEE-like: bias 15, infinities and NaNs) widened exactly
/// to f32: it is the top byte of an f16.
pub fn e5m2_to_f32(b: u8) -> f32 {
    f16::from_bits((b as u16) << 8).to_f32()
}

/// `x` rounded to the nearest E4M3 value (ties to even), saturating at
/// ±[`E4M3_MAX`]; NaN becomes `0x7f`.
pub fn f32_to_e4m3(x: f32) -> u8 {
    if x.is_nan() {
        return 0x7f;
    }
    let sign = if x.is_sign_negative() { 0x80u8 } else { 0 };
    let a = x.abs();
    if a >= E4M3_MAX {
        return sign | 0x7e;
    }
    // Below the smallest normal (2⁻⁶) the step is 2⁻⁹; a rounded-up 8 is the
    // code of 2⁻⁶ itself.
    if a < 1.0 / 64.0 {
        return sign | (a * 512.0).round_ties_even() as u8;
    }
    let e = ((a.to_bits() >> 23) & 0xff) as i32 - 127;
    let frac = a / f32::from_bits(((e + 127) as u32) << 23);
    let m = ((frac - 1.0) * 8.0).round_ties_even() as i32;
    let code = ((e + 7) << 3) + m;
    sign | code.min(0x7e) as u8
}

/// Decodes `weights` (stored FP8 of `layout`) with their `scales` into `out`.
pub fn dequantize_f32(
    layout: &Fp8Layout,
    weights: &[u8],
    scales: &[u8],
    out: &mut [f32],
) -> Result<()> {
    layout.check(weights.len(), scales.len(), out.len())?;
    layout.decode_each(weights, scales, |i, x| out[i] = x);
    Ok(())
}

/// Like [`dequantize_f32`], each value then rounded to bf16 (nearest even,
/// NaN as `0x7fc0`), exactly as the device kernel does.
pub fn dequantize_bf16(
    layout: &Fp8Layout,
    weights: &[u8],
    scales: &[u8],
    out: &mut [bf16],
) -> Result<()> {
    layout.check(weights.len(), scales.len(), out.len())?;
    layout.decode_each(weights, scales, |i, x| out[i] = to_bf16(x));
    Ok(())
}

/// Like [`dequantize_f32`], each value then rounded to f16 with
/// [`f32_to_f16_sat`](super::f32_to_f16_sat) (nearest even, saturating at
/// ±65504, NaN as `0x7e00`), exactly as the device kernel does. An E4M3
/// value (at most 448) times a scale above about 146 leaves f16's range.
pub fn dequantize_f16(
    layout: &Fp8Layout,
    weights: &[u8],
    scales: &[u8],
    out: &mut [f16],
) -> Result<()> {
    layout.check(weights.len(), scales.len(), out.len())?;
    layout.decode_each(weights, scales, |i, x| out[i] = super::f32_to_f16_sat(x));
    Ok(())
}

/// f32 → bf16 as the dequantizers round: nearest even, one canonical NaN.
fn to_bf16(x: f32) -> bf16 {
    if x.is_nan() {
        bf16::from_bits(0x7fc0)
    } else {
        bf16::from_f32(x)
    }
}

/// Quantizes `values` (`[rows, cols]` of an E4M3 `layout`) to E4M3 codes and
/// one f32 scale per tile: the tile's largest magnitude over [`E4M3_MAX`]
/// (1 for an all-zero tile), each value divided by it and rounded. Returns
/// the codes (row-major) and the scales (row-major over the grid).
pub fn quantize_e4m3(values: &[f32], layout: &Fp8Layout) -> Result<(Vec<u8>, Vec<f32>)> {
    if layout.format != DType::F8E4M3 || values.len() as u64 != layout.elems() {
        return Err(Error::Input(format!(
            "quantize_e4m3: {} values for an {} weight of [{}, {}]",
            values.len(),
            layout.format,
            layout.rows,
            layout.cols
        )));
    }
    if let Some(bad) = values.iter().position(|v| !v.is_finite()) {
        return Err(Error::Input(format!(
            "quantize_e4m3: element {bad} ({}) is not finite",
            values[bad]
        )));
    }
    let (rows, cols) = (layout.rows as usize, layout.cols as usize);
    let (tr, tc) = layout.tile();
    let (tr, tc) = (tr as usize, tc as usize);
    let (gr, gc) = (rows.div_ceil(tr), cols.div_ceil(tc));
    let mut amax = vec![0f32; gr * gc];
    for r in 0..rows {
        for (c, v) in values[r * cols..(r + 1) * cols].iter().enumerate() {
            let a = &mut amax[(r / tr) * gc + c / tc];
            *a = a.max(v.abs());
        }
    }
    let scales: Vec<f32> = amax
        .iter()
        .map(|&a| if a > 0.0 { a / E4M3_MAX } else { 1.0 })
        .collect();
    let mut codes = vec![0u8; values.len()];
    for r in 0..rows {
        for c in 0..cols {
            let s = scales[(r / tr) * gc + c / tc];
            codes[r * cols + c] = f32_to_e4m3(values[r * cols + c] / s);
        }
    }
    Ok((codes, scales))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e4m3_codes_decode_to_their_values() {
        assert_eq!(e4m3_to_f32(0x00), 0.0);
        assert!(e4m3_to_f32(0x80).is_sign_negative());
        assert_eq!(e4m3_to_f32(0x01), 2f32.powi(-9));
        assert_eq!(e4m3_to_f32(0x08), 2f32.powi(-6));
        assert_eq!(e4m3_to_f32(0x38), 1.0);
        assert_eq!(e4m3_to_f32(0x7e), 448.0);
        assert_eq!(e4m3_to_f32(0xfe), -448.0);
        assert!(e4m3_to_f32(0x7f).is_nan() && e4m3_to_f32(0xff).is_nan());
        assert_eq!(e5m2_to_f32(0x7c), f32::INFINITY);
        assert_eq!(e5m2_to_f32(0x3c), 1.0);
    }

    #[test]
    fn e4m3_encoding_inverts_decoding_and_saturates() {
        for b in 0..=255u8 {
            if b & 0x7f == 0x7f {
                continue;
            }
            let x = e4m3_to_f32(b);
            // -0 encodes as 0x80, +0 as 0x00: both decode to zero.
            assert_eq!(f32_to_e4m3(x), b, "{b:#04x} = {x}");
        }
        assert_eq!(f32_to_e4m3(1e6), 0x7e);
        assert_eq!(f32_to_e4m3(-1e6), 0xfe);
        assert_eq!(f32_to_e4m3(f32::NAN), 0x7f);
        // Halfway between 1.0 (m = 0) and 1.125 (m = 1): ties to even.
        assert_eq!(f32_to_e4m3(1.0625), 0x38);
        assert_eq!(f32_to_e4m3(1.1875), 0x3a);
    }

    #[test]
    fn lengths_are_checked_and_nan_is_canonical() {
        let l = Fp8Layout::new(DType::F8E4M3, 2, 3, DType::F32, ScaleLayout::PerChannel).unwrap();
        let mut out = vec![bf16::ZERO; 6];
        let e = dequantize_bf16(&l, &[0; 6], &[0; 4], &mut out).unwrap_err();
        assert!(e.to_string().contains("expected 8 (2 f32)"), "{e}");
        let w = [0x7f, 0xff, 0x38, 0x38, 0x40, 0xb8];
        let s: Vec<u8> = [2.0f32, f32::INFINITY]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        dequantize_bf16(&l, &w, &s, &mut out).unwrap();
        let bits: Vec<u16> = out.iter().map(|v| v.to_bits()).collect();
        assert_eq!(bits[..3], [0x7fc0, 0x7fc0, bf16::from_f32(2.0).to_bits()]);
        assert_eq!(out[3], bf16::INFINITY);
        assert_eq!(out[5], bf16::NEG_INFINITY);
        assert!(Fp8Layout::new(DType::BF16, 1, 1, DType::F32, ScaleLayout::PerTensor).is_err());
        assert!(Fp8Layout::new(DType::F8E4M3, 1, 1, DType::I8, ScaleLayout::PerTensor).is_err());
    }
}
