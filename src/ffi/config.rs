//! `ls_config`: the C mirror of [`StreamerConfig`], its defaults, and the
//! element-type, I/O-mode and cache-budget values.
//!
//! The enumerations that C passes in are plain `uint32_t`s with named
//! values, so that an out-of-range value is an error code rather than an
//! invalid Rust enum.

use super::error::Failure;
use crate::io::OpenMode;
use crate::pipeline::config::streamer_options;
use crate::{Budget, CpuShare, DType, Dequant, Device, StreamerConfig};

/// Element type of a tensor: one of the `LS_DTYPE_*` values.
pub type ls_dtype = u32;
/// bfloat16.
pub const LS_DTYPE_BF16: ls_dtype = 0;
/// IEEE half precision.
pub const LS_DTYPE_F16: ls_dtype = 1;
/// IEEE single precision.
pub const LS_DTYPE_F32: ls_dtype = 2;
/// IEEE double precision.
pub const LS_DTYPE_F64: ls_dtype = 3;
/// Signed 8-bit integer.
pub const LS_DTYPE_I8: ls_dtype = 4;
/// Unsigned 8-bit integer.
pub const LS_DTYPE_U8: ls_dtype = 5;
/// Signed 16-bit integer.
pub const LS_DTYPE_I16: ls_dtype = 6;
/// Signed 32-bit integer.
pub const LS_DTYPE_I32: ls_dtype = 7;
/// Signed 64-bit integer.
pub const LS_DTYPE_I64: ls_dtype = 8;
/// Boolean, one byte.
pub const LS_DTYPE_BOOL: ls_dtype = 9;
/// 8-bit float, e4m3.
pub const LS_DTYPE_F8_E4M3: ls_dtype = 10;
/// 8-bit float, e5m2.
pub const LS_DTYPE_F8_E5M2: ls_dtype = 11;
/// In [`ls_config::dtype`]: keep every tensor in its file dtype (no casts).
pub const LS_DTYPE_FILE: ls_dtype = 255;

/// How model files are opened: one of the `LS_IO_*` values.
pub type ls_io_mode = u32;
/// `O_DIRECT`, falling back to buffered reads where the filesystem refuses it.
pub const LS_IO_AUTO: ls_io_mode = 0;
/// `O_DIRECT` only: refusal is an error.
pub const LS_IO_DIRECT: ls_io_mode = 1;
/// Buffered reads through the page cache.
pub const LS_IO_BUFFERED: ls_io_mode = 2;

/// Where quantized layer weights become the compute dtype: one of the
/// `LS_DEQUANT_*` values.
pub type ls_dequant = u32;
/// `LS_DEQUANT_SLOT` for a layer function of one's own (the model API takes
/// `LS_DEQUANT_USE`).
pub const LS_DEQUANT_AUTO: ls_dequant = 0;
/// Dequantized into each device slot before the layer function runs.
pub const LS_DEQUANT_SLOT: ls_dequant = 1;
/// Handed to the layer function as stored blocks (`ls_tensor` says the
/// quant type), which dequantizes at use; slots hold only the stored bytes.
pub const LS_DEQUANT_USE: ls_dequant = 2;

/// Kind of a cache budget: one of the `LS_BUDGET_*` values.
pub type ls_budget_kind = u32;
/// No cache.
pub const LS_BUDGET_NONE: ls_budget_kind = 0;
/// As much as fits safely (a share of available RAM and the memlock limit
/// for the pinned cache; free device memory less a reserve for the GPU cache).
pub const LS_BUDGET_AUTO: ls_budget_kind = 1;
/// Up to [`ls_budget::bytes`] bytes.
pub const LS_BUDGET_BYTES: ls_budget_kind = 2;

/// In [`ls_config::cpu_share`]: the share is chosen per batch size from
/// measured rates.
pub const LS_CPU_SHARE_AUTO: f64 = -1.0;

/// How much memory a cache may take.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ls_budget {
    /// `LS_BUDGET_NONE`, `LS_BUDGET_AUTO` or `LS_BUDGET_BYTES`.
    pub kind: ls_budget_kind,
    /// The budget in bytes, for `LS_BUDGET_BYTES`; ignored otherwise.
    pub bytes: u64,
}

/// Everything that shapes a streamer; start from [`ls_config_default`] and
/// change fields. A stage count of 0 switches that stage off.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ls_config {
    /// CUDA device ordinal, or -1 for the host backend (device pointers are
    /// host addresses; no GPU needed).
    pub device: i32,
    /// Compute dtype: f16/f32 tensors are cast to it on the device.
    /// `LS_DTYPE_FILE` keeps every tensor's file dtype.
    pub dtype: ls_dtype,
    /// GPU prefetch depth: the device holds `n_gpu + 1` layer slots.
    pub n_gpu: u32,
    /// Pinned host slots between the readers and the transfer thread.
    pub n_cpu_pinned: u32,
    /// Unpinned CPU slots the readers fill before a pin thread copies them.
    pub n_cpu: u32,
    /// Items the transfer thread hands over at once.
    pub batch_gpu: u32,
    /// Items handed over from the pinned ring at once.
    pub batch_cpu_pinned: u32,
    /// Items handed over from the CPU ring at once.
    pub batch_cpu: u32,
    /// Reader threads.
    pub reader_threads: u32,
    /// Bytes per read request: a positive multiple of 4096.
    pub read_chunk: u64,
    /// `LS_IO_AUTO`, `LS_IO_DIRECT` or `LS_IO_BUFFERED`.
    pub io_mode: ls_io_mode,
    /// Layers kept pinned in host RAM across passes.
    pub pinned_cache: ls_budget,
    /// Layers kept resident on the device.
    pub gpu_cache: ls_budget,
    /// Non-zero: draw a progress bar on stderr during each pass.
    pub progress: u8,
    /// Share of the rows of the 2-D weights of each streamed layer the CPU
    /// computes from host memory (layers the GPU cache keeps stay whole): 0
    /// (off, the default), a fraction in (0, 1], or `LS_CPU_SHARE_AUTO`
    /// (balanced against PCIe from rates measured at build).
    pub cpu_share: f64,
    /// `LS_DEQUANT_AUTO`, `LS_DEQUANT_SLOT` or `LS_DEQUANT_USE`.
    pub dequant: ls_dequant,
}

/// A type of a [`StreamerConfig`] field and the type of its `ls_config` field.
trait CField: Sized {
    type C;
    fn to_c(&self) -> Self::C;
    /// The Rust value; an unknown enum value is `LS_INVALID_ARGUMENT`
    /// naming `field`, while values the streamer rejects are left to its
    /// validation (`LS_CONFIG`).
    fn from_c(c: Self::C, field: &str) -> Result<Self, Failure>;
}

impl CField for Device {
    type C = i32;
    fn to_c(&self) -> i32 {
        match *self {
            Device::Host => -1,
            Device::Cuda(n) => i32::try_from(n).unwrap_or(i32::MAX),
        }
    }
    fn from_c(c: i32, field: &str) -> Result<Device, Failure> {
        match c {
            -1 => Ok(Device::Host),
            n if n >= 0 => Ok(Device::Cuda(n as usize)),
            n => Err(Failure::invalid(format!(
                "{field} is {n}: use a CUDA device ordinal or -1 for the host backend"
            ))),
        }
    }
}

impl CField for Option<DType> {
    type C = ls_dtype;
    fn to_c(&self) -> ls_dtype {
        self.map_or(LS_DTYPE_FILE, |d| d as u32)
    }
    fn from_c(c: ls_dtype, field: &str) -> Result<Option<DType>, Failure> {
        match c {
            LS_DTYPE_FILE => Ok(None),
            d => dtype_from_c(d).map(Some).ok_or_else(|| {
                Failure::invalid(format!("{field} is {d}, not an LS_DTYPE_* value"))
            }),
        }
    }
}

impl CField for OpenMode {
    type C = ls_io_mode;
    fn to_c(&self) -> ls_io_mode {
        match self {
            OpenMode::Auto => LS_IO_AUTO,
            OpenMode::Direct => LS_IO_DIRECT,
            OpenMode::Buffered => LS_IO_BUFFERED,
        }
    }
    fn from_c(c: ls_io_mode, field: &str) -> Result<OpenMode, Failure> {
        match c {
            LS_IO_AUTO => Ok(OpenMode::Auto),
            LS_IO_DIRECT => Ok(OpenMode::Direct),
            LS_IO_BUFFERED => Ok(OpenMode::Buffered),
            m => Err(Failure::invalid(format!(
                "{field} is {m}, not one of LS_IO_AUTO, LS_IO_DIRECT, LS_IO_BUFFERED"
            ))),
        }
    }
}

impl CField for Budget {
    type C = ls_budget;
    fn to_c(&self) -> ls_budget {
        let (kind, bytes) = match *self {
            Budget::None => (LS_BUDGET_NONE, 0),
            Budget::Auto => (LS_BUDGET_AUTO, 0),
            Budget::Bytes(bytes) => (LS_BUDGET_BYTES, bytes),
        };
        ls_budget { kind, bytes }
    }
    fn from_c(b: ls_budget, field: &str) -> Result<Budget, Failure> {
        match b.kind {
            LS_BUDGET_NONE => Ok(Budget::None),
            LS_BUDGET_AUTO => Ok(Budget::Auto),
            LS_BUDGET_BYTES => Ok(Budget::Bytes(b.bytes)),
            k => Err(Failure::invalid(format!(
                "{field}.kind is {k}, not one of LS_BUDGET_NONE, LS_BUDGET_AUTO, LS_BUDGET_BYTES"
            ))),
        }
    }
}

/// A CPU share is a `double`: `LS_CPU_SHARE_AUTO`, 0 for off, else the
/// fraction (which the streamer's validation checks).
impl CField for CpuShare {
    type C = f64;
    fn to_c(&self) -> f64 {
        match *self {
            CpuShare::Auto => LS_CPU_SHARE_AUTO,
            CpuShare::Off => 0.0,
            CpuShare::Fixed(f) => f,
        }
    }
    fn from_c(c: f64, _field: &str) -> Result<CpuShare, Failure> {
        Ok(if c == LS_CPU_SHARE_AUTO {
            CpuShare::Auto
        } else if c == 0.0 {
            CpuShare::Off
        } else {
            CpuShare::Fixed(c)
        })
    }
}

/// Counts are `uint32_t` in C; a larger Rust count saturates (and fails validation).
impl CField for usize {
    type C = u32;
    fn to_c(&self) -> u32 {
        u32::try_from(*self).unwrap_or(u32::MAX)
    }
    fn from_c(c: u32, _field: &str) -> Result<usize, Failure> {
        Ok(c as usize)
    }
}

impl CField for u64 {
    type C = u64;
    fn to_c(&self) -> u64 {
        *self
    }
    fn from_c(c: u64, _field: &str) -> Result<u64, Failure> {
        Ok(c)
    }
}

impl CField for Dequant {
    type C = ls_dequant;
    fn to_c(&self) -> ls_dequant {
        match self {
            Dequant::Auto => LS_DEQUANT_AUTO,
            Dequant::Slot => LS_DEQUANT_SLOT,
            Dequant::Use => LS_DEQUANT_USE,
        }
    }
    fn from_c(c: ls_dequant, field: &str) -> Result<Dequant, Failure> {
        match c {
            LS_DEQUANT_AUTO => Ok(Dequant::Auto),
            LS_DEQUANT_SLOT => Ok(Dequant::Slot),
            LS_DEQUANT_USE => Ok(Dequant::Use),
            d => Err(Failure::invalid(format!(
                "{field} is {d}, not an LS_DEQUANT_* value"
            ))),
        }
    }
}

/// A switch is a `uint8_t`, non-zero for on.
impl CField for bool {
    type C = u8;
    fn to_c(&self) -> u8 {
        u8::from(*self)
    }
    fn from_c(c: u8, _field: &str) -> Result<bool, Failure> {
        Ok(c != 0)
    }
}

/// The element type with this value, if there is one.
pub(crate) fn dtype_from_c(d: ls_dtype) -> Option<DType> {
    DType::ALL.into_iter().find(|t| *t as u32 == d)
}

/// `ls_config::from_rust` and `to_rust`, from the option table's `fixed`
/// and `searched` rows: every one of them is a field of `ls_config` of the
/// type its [`CField`] names (the compiler checks both ways).
macro_rules! define_c_mapping {
    (
        fixed { $(
            $(#[doc = $fdoc:literal])*
            $f:ident : $fty:ty = $fdef:expr, parse $fparse:path, flag $fflag:literal
            $(, cli $fcli:expr)?;
        )* }
        searched { $(
            $(#[doc = $sdoc:literal])*
            $s:ident : $sty:ty = $sdef:expr, parse $sparse:path, flag $sflag:literal,
            axis $variant:ident $title:literal [$($tune:expr),*] $(, cli $scli:expr)?;
        )* }
        not_in_c { $($rest:tt)* }
    ) => {
        impl ls_config {
            /// The C view of a Rust configuration (the `not_in_c` options,
            /// such as the CPU affinity, are not carried).
            pub(crate) fn from_rust(c: &StreamerConfig) -> ls_config {
                ls_config {
                    $($f: CField::to_c(&c.$f),)*
                    $($s: CField::to_c(&c.$s),)*
                }
            }

            /// The Rust configuration; unknown enum values are
            /// `LS_INVALID_ARGUMENT`, while values the streamer rejects are left
            /// to its validation (`LS_CONFIG`). Options C does not carry keep
            /// their defaults.
            pub(crate) fn to_rust(self) -> Result<StreamerConfig, Failure> {
                Ok(StreamerConfig {
                    $($f: CField::from_c(self.$f, stringify!($f))?,)*
                    $($s: CField::from_c(self.$s, stringify!($s))?,)*
                    ..StreamerConfig::default()
                })
            }
        }
    };
}

streamer_options!(define_c_mapping);

/// The default configuration, returned by value: CUDA device 0, compute
/// dtype bf16, `n_gpu` 2, `n_cpu_pinned` 4, `n_cpu` 0, batches of 1, 4
/// reader threads, 16 MiB reads, `LS_IO_AUTO`, no caches, no progress bar,
/// no CPU share.
#[no_mangle]
pub extern "C" fn ls_config_default() -> ls_config {
    ls_config::from_rust(&StreamerConfig::default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_round_trips() {
        let c = ls_config_default();
        assert_eq!(c.to_rust().unwrap(), StreamerConfig::default());
        let host = ls_config {
            device: -1,
            dtype: LS_DTYPE_FILE,
            io_mode: LS_IO_BUFFERED,
            pinned_cache: ls_budget {
                kind: LS_BUDGET_BYTES,
                bytes: 1 << 20,
            },
            gpu_cache: ls_budget {
                kind: LS_BUDGET_AUTO,
                bytes: 7,
            },
            progress: 1,
            cpu_share: LS_CPU_SHARE_AUTO,
            dequant: LS_DEQUANT_USE,
            ..c
        };
        let r = host.to_rust().unwrap();
        assert_eq!(r.dequant, Dequant::Use);
        assert_eq!(r.device, Device::Host);
        assert_eq!(r.dtype, None);
        assert_eq!(r.pinned_cache, Budget::Bytes(1 << 20));
        assert_eq!(r.gpu_cache, Budget::Auto);
        assert_eq!(r.cpu_share, CpuShare::Auto);
        let half = ls_config {
            cpu_share: 0.5,
            ..c
        };
        assert_eq!(half.to_rust().unwrap().cpu_share, CpuShare::Fixed(0.5));
        assert_eq!(
            ls_config::from_rust(&r),
            ls_config {
                gpu_cache: ls_budget {
                    kind: LS_BUDGET_AUTO,
                    bytes: 0
                },
                ..host
            }
        );
    }

    #[test]
    fn unknown_values_are_invalid_arguments() {
        let c = ls_config_default();
        for bad in [
            ls_config { dtype: 99, ..c },
            ls_config { io_mode: 3, ..c },
            ls_config { dequant: 3, ..c },
            ls_config { device: -2, ..c },
            ls_config {
                gpu_cache: ls_budget { kind: 9, bytes: 0 },
                ..c
            },
        ] {
            let f = bad.to_rust().unwrap_err();
            assert_eq!(
                f.code,
                super::super::ls_result::LS_INVALID_ARGUMENT,
                "{}",
                f.message
            );
        }
    }

    #[test]
    fn dtype_values_match_the_crate() {
        let all = [
            LS_DTYPE_BF16,
            LS_DTYPE_F16,
            LS_DTYPE_F32,
            LS_DTYPE_F64,
            LS_DTYPE_I8,
            LS_DTYPE_U8,
            LS_DTYPE_I16,
            LS_DTYPE_I32,
            LS_DTYPE_I64,
            LS_DTYPE_BOOL,
            LS_DTYPE_F8_E4M3,
            LS_DTYPE_F8_E5M2,
        ];
        for v in all {
            assert_eq!(dtype_from_c(v).map(|d| d as u32), Some(v));
        }
        assert_eq!(dtype_from_c(LS_DTYPE_F8_E5M2), Some(DType::F8E5M2));
        assert_eq!(dtype_from_c(LS_DTYPE_BF16), Some(DType::BF16));
        assert_eq!(dtype_from_c(LS_DTYPE_FILE), None);
    }
}
