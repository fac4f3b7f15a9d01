//! Element types of checkpoint tensors and of the compute.

use std::fmt;

/// Element type of a tensor, as stored in a safetensors file or used for compute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u32)]
pub enum DType {
    /// bfloat16.
    BF16 = 0,
    /// IEEE half precision.
    F16 = 1,
    /// IEEE single precision.
    F32 = 2,
    /// IEEE double precision.
    F64 = 3,
    /// Signed 8-bit integer.
    I8 = 4,
    /// Unsigned 8-bit integer.
    U8 = 5,
    /// Signed 16-bit integer.
    I16 = 6,
    /// Signed 32-bit integer.
    I32 = 7,
    /// Signed 64-bit integer.
    I64 = 8,
    /// Boolean, one byte.
    Bool = 9,
    /// 8-bit float, e4m3.
    F8E4M3 = 10,
    /// 8-bit float, e5m2.
    F8E5M2 = 11,
}

impl DType {
    /// Every dtype, in the order of their `#[repr(u32)]` values.
    pub const ALL: [DType; 12] = [
        DType::BF16,
        DType::F16,
        DType::F32,
        DType::F64,
        DType::I8,
        DType::U8,
        DType::I16,
        DType::I32,
        DType::I64,
        DType::Bool,
        DType::F8E4M3,
        DType::F8E5M2,
    ];

    /// Bytes per element.
    pub const fn size(self) -> usize {
        match self {
            DType::BF16 | DType::F16 | DType::I16 => 2,
            DType::F32 | DType::I32 => 4,
            DType::F64 | DType::I64 => 8,
            DType::I8 | DType::U8 | DType::Bool | DType::F8E4M3 | DType::F8E5M2 => 1,
        }
    }

    /// Whether this is a floating-point type that can be cast to bf16 on the GPU.
    pub const fn is_castable_float(self) -> bool {
        matches!(self, DType::BF16 | DType::F16 | DType::F32)
    }

    /// The name safetensors uses in its headers ("BF16", "F16", ...).
    pub const fn safetensors_name(self) -> &'static str {
        match self {
            DType::BF16 => "BF16",
            DType::F16 => "F16",
            DType::F32 => "F32",
            DType::F64 => "F64",
            DType::I8 => "I8",
            DType::U8 => "U8",
            DType::I16 => "I16",
            DType::I32 => "I32",
            DType::I64 => "I64",
            DType::Bool => "BOOL",
            DType::F8E4M3 => "F8_E4M3",
            DType::F8E5M2 => "F8_E5M2",
        }
    }

    /// Parses a short user-facing name: `bf16`, `f16`, `f32` (case-insensitive),
    /// or a safetensors name.
    pub fn parse(s: &str) -> Option<DType> {
        let lower = s.to_ascii_lowercase();
        DType::ALL.into_iter().find(|d| {
            d.safetensors_name().eq_ignore_ascii_case(s)
                || lower == d.safetensors_name().to_ascii_lowercase().replace('_', "")
                || (lower == "float16" && *d == DType::F16)
                || (lower == "bfloat16" && *d == DType::BF16)
                || (lower == "float32" && *d == DType::F32)
        })
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.safetensors_name().to_ascii_lowercase())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_round_trips_every_safetensors_name() {
        for d in [
            DType::BF16,
            DType::F16,
            DType::F32,
            DType::I64,
            DType::F8E4M3,
        ] {
            assert_eq!(DType::parse(d.safetensors_name()), Some(d));
            assert_eq!(DType::parse(&d.to_string()), Some(d));
        }
        assert_eq!(DType::parse("bfloat16"), Some(DType::BF16));
        assert_eq!(DType::parse("q4"), None);
    }

    #[test]
    fn all_lists_every_dtype_at_its_value() {
        for (i, d) in DType::ALL.into_iter().enumerate() {
            assert_eq!(d as u32 as usize, i, "{d}");
        }
    }
}
