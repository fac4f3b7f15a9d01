//! `ls_config`: the C mirror of [`StreamerConfig`], its defaults, and the
//! element-type, I/O-mode and cache-budget values.
//!
//! The enumerations that C passes in are plain `uint32_t`s with named
//! values, so that an out-of-range value is an error code rather than an
//! invalid Rust enum.

use super::error::Failure;
use crate::io::OpenMode;
use crate::{Budget, DType, Device, StreamerConfig};

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

/// Kind of a cache budget: one of the `LS_BUDGET_*` values.
pub type ls_budget_kind = u32;
/// No cache.
pub const LS_BUDGET_NONE: ls_budget_kind = 0;
/// As much as fits safely (a share of available RAM and the memlock limit
/// for the pinned cache; free device memory less a reserve for the GPU cache).
pub const LS_BUDGET_AUTO: ls_budget_kind = 1;
/// Up to [`ls_budget::bytes`] bytes.
pub const LS_BUDGET_BYTES: ls_budget_kind = 2;

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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
}

fn budget_to_c(b: Budget) -> ls_budget {
    match b {
        Budget::None => ls_budget {
            kind: LS_BUDGET_NONE,
            bytes: 0,
        },
        Budget::Auto => ls_budget {
            kind: LS_BUDGET_AUTO,
            bytes: 0,
        },
        Budget::Bytes(bytes) => ls_budget {
            kind: LS_BUDGET_BYTES,
            bytes,
        },
    }
}

fn budget_from_c(b: ls_budget, field: &str) -> Result<Budget, Failure> {
    match b.kind {
        LS_BUDGET_NONE => Ok(Budget::None),
        LS_BUDGET_AUTO => Ok(Budget::Auto),
        LS_BUDGET_BYTES => Ok(Budget::Bytes(b.bytes)),
        k => Err(Failure::invalid(format!(
            "{field}.kind is {k}, not one of LS_BUDGET_NONE, LS_BUDGET_AUTO, LS_BUDGET_BYTES"
        ))),
    }
}

/// The element type with this value, if there is one.
pub(crate) fn dtype_from_c(d: ls_dtype) -> Option<DType> {
    DType::ALL.into_iter().find(|t| *t as u32 == d)
}

fn count(v: usize) -> u32 {
    u32::try_from(v).unwrap_or(u32::MAX)
}

impl ls_config {
    /// The C view of a Rust configuration (CPU affinity is not carried).
    pub(crate) fn from_rust(c: &StreamerConfig) -> ls_config {
        ls_config {
            device: match c.device {
                Device::Host => -1,
                Device::Cuda(n) => i32::try_from(n).unwrap_or(i32::MAX),
            },
            dtype: c.dtype.map_or(LS_DTYPE_FILE, |d| d as u32),
            n_gpu: count(c.n_gpu),
            n_cpu_pinned: count(c.n_cpu_pinned),
            n_cpu: count(c.n_cpu),
            batch_gpu: count(c.batch_gpu),
            batch_cpu_pinned: count(c.batch_cpu_pinned),
            batch_cpu: count(c.batch_cpu),
            reader_threads: count(c.reader_threads),
            read_chunk: c.read_chunk,
            io_mode: match c.io_mode {
                OpenMode::Auto => LS_IO_AUTO,
                OpenMode::Direct => LS_IO_DIRECT,
                OpenMode::Buffered => LS_IO_BUFFERED,
            },
            pinned_cache: budget_to_c(c.pinned_cache),
            gpu_cache: budget_to_c(c.gpu_cache),
            progress: u8::from(c.progress),
        }
    }

    /// The Rust configuration; unknown enum values are `LS_INVALID_ARGUMENT`,
    /// while values the streamer rejects are left to its validation
    /// (`LS_CONFIG`).
    pub(crate) fn to_rust(self) -> Result<StreamerConfig, Failure> {
        let device = match self.device {
            -1 => Device::Host,
            n if n >= 0 => Device::Cuda(n as usize),
            n => {
                return Err(Failure::invalid(format!(
                    "device is {n}: use a CUDA device ordinal or -1 for the host backend"
                )))
            }
        };
        let dtype = match self.dtype {
            LS_DTYPE_FILE => None,
            d => Some(dtype_from_c(d).ok_or_else(|| {
                Failure::invalid(format!("dtype is {d}, not an LS_DTYPE_* value"))
            })?),
        };
        let io_mode = match self.io_mode {
            LS_IO_AUTO => OpenMode::Auto,
            LS_IO_DIRECT => OpenMode::Direct,
            LS_IO_BUFFERED => OpenMode::Buffered,
            m => {
                return Err(Failure::invalid(format!(
                    "io_mode is {m}, not one of LS_IO_AUTO, LS_IO_DIRECT, LS_IO_BUFFERED"
                )))
            }
        };
        Ok(StreamerConfig {
            device,
            dtype,
            n_gpu: self.n_gpu as usize,
            n_cpu_pinned: self.n_cpu_pinned as usize,
            n_cpu: self.n_cpu as usize,
            batch_gpu: self.batch_gpu as usize,
            batch_cpu_pinned: self.batch_cpu_pinned as usize,
            batch_cpu: self.batch_cpu as usize,
            reader_threads: self.reader_threads as usize,
            read_chunk: self.read_chunk,
            io_mode,
            pinned_cache: budget_from_c(self.pinned_cache, "pinned_cache")?,
            gpu_cache: budget_from_c(self.gpu_cache, "gpu_cache")?,
            cpu_affinity: None,
            progress: self.progress != 0,
        })
    }
}

/// The default configuration, returned by value: CUDA device 0, compute
/// dtype bf16, `n_gpu` 2, `n_cpu_pinned` 4, `n_cpu` 0, batches of 1, 4
/// reader threads, 16 MiB reads, `LS_IO_AUTO`, no caches, no progress bar.
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
            ..c
        };
        let r = host.to_rust().unwrap();
        assert_eq!(r.device, Device::Host);
        assert_eq!(r.dtype, None);
        assert_eq!(r.pinned_cache, Budget::Bytes(1 << 20));
        assert_eq!(r.gpu_cache, Budget::Auto);
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
