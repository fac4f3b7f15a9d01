//! Tensor element types as GGUF stores them: plain floats and ggml's block
//! quantizations.
//!
//! A [`QuantType`] is an element type with a block size and bytes per block:
//! a row of `n` elements takes `n / block_elems * block_bytes` bytes and `n`
//! must be a multiple of `block_elems`. Plain floats are blocks of one element.
//!
//! [`QuantType`] lives beside [`DType`] rather than inside it: `DType` is the
//! safetensors element type with a per-element size, its values are part of the
//! C ABI, and the pipeline sizes tensors with [`DType::size`]. The three plain
//! types map both ways ([`QuantType::dtype`], [`QuantType::from_dtype`]).
//!
//! ```
//! use layer_streamer::quant::{self, QuantType};
//!
//! let x: Vec<f32> = (0..512).map(|i| (i as f32 * 0.37).sin()).collect();
//! let blocks = quant::quantize(QuantType::Q4_K, &x).unwrap();
//! assert_eq!(blocks.len() as u64, QuantType::Q4_K.row_bytes(512).unwrap());
//! let mut back = vec![0f32; 512];
//! quant::dequantize_f32(QuantType::Q4_K, &blocks, &mut back).unwrap();
//! ```

use std::fmt;

use crate::dtype::DType;

mod blocks;
mod dequant;
pub mod device;
pub mod fp8;
mod quantize;

pub use dequant::{dequantize_bf16, dequantize_f16, dequantize_f32, f32_to_f16_sat, F16_MAX};
pub use quantize::quantize;

/// A GGUF tensor type: a plain float or a ggml block quantization.
///
/// The discriminant is ggml's type id (`ggml_type`), as stored in GGUF tensor
/// infos.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u32)]
#[allow(non_camel_case_types)]
pub enum QuantType {
    /// IEEE single precision.
    F32 = 0,
    /// IEEE half precision.
    F16 = 1,
    /// 32 elements: an f16 scale `d` and 4-bit values, `x = d * (q - 8)`.
    Q4_0 = 2,
    /// 32 elements: f16 `d` and `m`, 4-bit values, `x = d * q + m`.
    Q4_1 = 3,
    /// 32 elements: f16 `d`, 5-bit values (a high-bit word and nibbles), `x = d * (q - 16)`.
    Q5_0 = 6,
    /// 32 elements: f16 `d` and `m`, 5-bit values, `x = d * q + m`.
    Q5_1 = 7,
    /// 32 elements: an f16 scale and 32 signed bytes, `x = d * q`.
    Q8_0 = 8,
    /// 256 elements: f16 `d`, `dmin`, eight 6-bit scales and mins, 4-bit values.
    Q4_K = 12,
    /// 256 elements: like Q4_K with a fifth bit per value.
    Q5_K = 13,
    /// 256 elements: 6-bit values, sixteen signed 8-bit scales, an f16 `d`.
    Q6_K = 14,
    /// bfloat16.
    BF16 = 30,
}

/// Why a row or tensor size is invalid for a [`QuantType`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SizeError {
    /// The row length is not a multiple of the type's block.
    NotMultiple {
        /// The type.
        ty: QuantType,
        /// Elements per row.
        row_elems: u64,
    },
    /// The element or byte count does not fit in 64 bits.
    Overflow {
        /// The type.
        ty: QuantType,
        /// The dimensions, innermost first.
        dims: Vec<u64>,
    },
}

impl fmt::Display for SizeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SizeError::NotMultiple { ty, row_elems } => write!(
                f,
                "{row_elems} elements per row is not a multiple of {ty}'s block of {}",
                ty.block_elems()
            ),
            SizeError::Overflow { ty, dims } => {
                write!(
                    f,
                    "{ty} tensor of dimensions {dims:?} overflows a 64-bit size"
                )
            }
        }
    }
}

impl std::error::Error for SizeError {}

impl QuantType {
    /// Every supported type, in the order of their ggml ids.
    pub const ALL: [QuantType; 11] = [
        QuantType::F32,
        QuantType::F16,
        QuantType::Q4_0,
        QuantType::Q4_1,
        QuantType::Q5_0,
        QuantType::Q5_1,
        QuantType::Q8_0,
        QuantType::Q4_K,
        QuantType::Q5_K,
        QuantType::Q6_K,
        QuantType::BF16,
    ];

    /// ggml's id of this type (`ggml_type`), as GGUF tensor infos store it.
    pub const fn ggml_type_id(self) -> u32 {
        self as u32
    }

    /// The type with ggml id `id`, or `None` for ids this crate does not read.
    pub fn from_ggml_type_id(id: u32) -> Option<QuantType> {
        QuantType::ALL.into_iter().find(|t| t.ggml_type_id() == id)
    }

    /// ggml's name: "F32", "Q4_K", ...
    pub const fn name(self) -> &'static str {
        match self {
            QuantType::F32 => "F32",
            QuantType::F16 => "F16",
            QuantType::Q4_0 => "Q4_0",
            QuantType::Q4_1 => "Q4_1",
            QuantType::Q5_0 => "Q5_0",
            QuantType::Q5_1 => "Q5_1",
            QuantType::Q8_0 => "Q8_0",
            QuantType::Q4_K => "Q4_K",
            QuantType::Q5_K => "Q5_K",
            QuantType::Q6_K => "Q6_K",
            QuantType::BF16 => "BF16",
        }
    }

    /// Parses a name case-insensitively: `q4_k`, `Q8_0`, `bf16`, ...
    pub fn parse(s: &str) -> Option<QuantType> {
        QuantType::ALL
            .into_iter()
            .find(|t| t.name().eq_ignore_ascii_case(s))
    }

    /// Elements per block (1 for plain floats).
    pub const fn block_elems(self) -> u64 {
        match self {
            QuantType::F32 | QuantType::F16 | QuantType::BF16 => 1,
            QuantType::Q4_0
            | QuantType::Q4_1
            | QuantType::Q5_0
            | QuantType::Q5_1
            | QuantType::Q8_0 => 32,
            QuantType::Q4_K | QuantType::Q5_K | QuantType::Q6_K => 256,
        }
    }

    /// Bytes per block.
    pub const fn block_bytes(self) -> u64 {
        match self {
            QuantType::F32 => 4,
            QuantType::F16 | QuantType::BF16 => 2,
            QuantType::Q4_0 => 18,
            QuantType::Q4_1 => 20,
            QuantType::Q5_0 => 22,
            QuantType::Q5_1 => 24,
            QuantType::Q8_0 => 34,
            QuantType::Q4_K => 144,
            QuantType::Q5_K => 176,
            QuantType::Q6_K => 210,
        }
    }

    /// Whether this is a block quantization (not a plain float).
    pub const fn is_quantized(self) -> bool {
        self.block_elems() > 1
    }

    /// The plain dtype of F32, F16 and BF16; `None` for quantized types.
    pub const fn dtype(self) -> Option<DType> {
        match self {
            QuantType::F32 => Some(DType::F32),
            QuantType::F16 => Some(DType::F16),
            QuantType::BF16 => Some(DType::BF16),
            _ => None,
        }
    }

    /// The GGUF type of a plain dtype (f32, f16, bf16), else `None`.
    pub const fn from_dtype(d: DType) -> Option<QuantType> {
        match d {
            DType::F32 => Some(QuantType::F32),
            DType::F16 => Some(QuantType::F16),
            DType::BF16 => Some(QuantType::BF16),
            _ => None,
        }
    }

    /// Bytes of one row of `row_elems` elements: an error unless `row_elems` is
    /// a multiple of the block or when the size overflows.
    pub fn row_bytes(self, row_elems: u64) -> Result<u64, SizeError> {
        if !row_elems.is_multiple_of(self.block_elems()) {
            return Err(SizeError::NotMultiple {
                ty: self,
                row_elems,
            });
        }
        (row_elems / self.block_elems())
            .checked_mul(self.block_bytes())
            .ok_or(SizeError::Overflow {
                ty: self,
                dims: vec![row_elems],
            })
    }

    /// Elements and bytes of a tensor of `dims`, innermost (row) first as
    /// GGUF stores them. The row (`dims[0]`) must be a multiple of the block;
    /// no dimensions is a scalar.
    pub fn tensor_size(self, dims: &[u64]) -> Result<(u64, u64), SizeError> {
        let overflow = || SizeError::Overflow {
            ty: self,
            dims: dims.to_vec(),
        };
        let row = dims.first().copied().unwrap_or(1);
        let row_bytes = self.row_bytes(row).map_err(|e| match e {
            SizeError::Overflow { .. } => overflow(),
            other => other,
        })?;
        let mut elems = row;
        let mut bytes = row_bytes;
        for &d in dims.iter().skip(1) {
            elems = elems.checked_mul(d).ok_or_else(overflow)?;
            bytes = bytes.checked_mul(d).ok_or_else(overflow)?;
        }
        Ok((elems, bytes))
    }
}

impl fmt::Display for QuantType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_names_and_blocks_are_consistent() {
        for t in QuantType::ALL {
            assert_eq!(QuantType::from_ggml_type_id(t.ggml_type_id()), Some(t));
            assert_eq!(QuantType::parse(&t.name().to_ascii_lowercase()), Some(t));
            assert_eq!(t.is_quantized(), t.dtype().is_none(), "{t}");
            if let Some(d) = t.dtype() {
                assert_eq!(QuantType::from_dtype(d), Some(t));
                assert_eq!(d.size() as u64, t.block_bytes());
            }
        }
        for id in [4, 5, 9, 10, 11, 15, 16, 29, 31, u32::MAX] {
            assert_eq!(QuantType::from_ggml_type_id(id), None, "{id}");
        }
    }

    #[test]
    fn row_and_tensor_sizes_are_checked() {
        assert_eq!(QuantType::Q4_K.row_bytes(512), Ok(288));
        assert_eq!(QuantType::Q8_0.tensor_size(&[64, 3]), Ok((192, 204)));
        assert_eq!(QuantType::F32.tensor_size(&[]), Ok((1, 4)));
        let e = QuantType::Q4_K.row_bytes(4097).unwrap_err();
        assert_eq!(
            e.to_string(),
            "4097 elements per row is not a multiple of Q4_K's block of 256"
        );
        let e = QuantType::F32.tensor_size(&[1 << 40, 1 << 30]).unwrap_err();
        assert!(matches!(e, SizeError::Overflow { .. }), "{e}");
    }
}
