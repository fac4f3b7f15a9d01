//! The streamer's configuration: which stages run, how deep each ring is,
//! how many reader threads, and how much memory the caches may take.

use crate::io::OpenMode;
use crate::{DType, Error, Result};

/// Where layer weights go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    /// A CUDA device, by ordinal.
    Cuda(usize),
    /// The host backend: "device" memory is host memory and transfers are
    /// memcpys on a stream thread. A dry run that needs no GPU, and the way the
    /// pipeline is tested without one.
    Host,
}

impl Device {
    /// Parses `cuda`, `cuda:N`, `host`, or a bare ordinal (`-1` is the host).
    pub fn parse(s: &str) -> Result<Device> {
        let s = s.trim();
        match s {
            "host" | "cpu" | "-1" => return Ok(Device::Host),
            "cuda" | "gpu" => return Ok(Device::Cuda(0)),
            _ => {}
        }
        let n = s
            .strip_prefix("cuda:")
            .or_else(|| s.strip_prefix("gpu:"))
            .unwrap_or(s);
        n.parse::<usize>()
            .map(Device::Cuda)
            .map_err(|_| Error::Input(format!("unknown device {s:?}: use host, cuda or cuda:N")))
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cuda(n) => write!(f, "cuda:{n}"),
            Device::Host => f.write_str("host"),
        }
    }
}

/// How much memory a cache may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Budget {
    /// No cache.
    #[default]
    None,
    /// As much as fits safely: for the pinned cache, a share of the RAM
    /// available and the memlock limit; for the GPU cache, free device memory
    /// less a reserve.
    Auto,
    /// Up to this many bytes.
    Bytes(u64),
}

impl Budget {
    /// Parses `none`/`0`, `auto`, or a size such as `12GB`, `512MiB`, `4096`.
    pub fn parse(s: &str) -> Result<Budget> {
        match s.trim().to_ascii_lowercase().as_str() {
            "none" | "off" | "0" => Ok(Budget::None),
            "auto" | "all" => Ok(Budget::Auto),
            other => parse_size(other).map(Budget::Bytes),
        }
    }
}

/// Parses a byte size: a number with an optional unit (K, M, G, T; KB/MB/GB/TB
/// are decimal, KiB/MiB/GiB/TiB binary, a bare letter is binary).
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let num: f64 = num.parse().map_err(|_| {
        Error::Input(format!(
            "invalid size {s:?}: expected e.g. 4GB, 512MiB or 1048576"
        ))
    })?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kib" => 1024.0,
        "m" | "mib" => 1024.0 * 1024.0,
        "g" | "gib" => 1024.0 * 1024.0 * 1024.0,
        "t" | "tib" => 1024.0f64.powi(4),
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        u => return Err(Error::Input(format!("invalid size unit {u:?} in {s:?}"))),
    };
    Ok((num * mult).round() as u64)
}

/// Everything that shapes a streamer. Built with
/// [`LayerStreamerBuilder`](crate::streamer::LayerStreamerBuilder); the
/// stage fields keep the meaning they have in the Python package this
/// replaces: `0` switches a stage off.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamerConfig {
    /// Where the weights go.
    pub device: Device,
    /// Compute dtype: f16 and f32 tensors are cast to it on the device.
    /// `None` keeps each tensor's file dtype.
    pub dtype: Option<DType>,
    /// GPU prefetch depth: the device holds `n_gpu + 1` layer slots.
    pub n_gpu: usize,
    /// Pinned host slots between the readers and the transfer thread.
    /// `0`: the transfer thread stages each layer through one pinned buffer itself.
    pub n_cpu_pinned: usize,
    /// Unpinned page-aligned slots the readers fill before a pin thread copies
    /// them into pinned slots. `0` (the default): readers fill pinned slots.
    pub n_cpu: usize,
    /// Items the transfer thread hands to the compute side at once.
    pub batch_gpu: usize,
    /// Items handed from the pinned ring at once.
    pub batch_cpu_pinned: usize,
    /// Items handed from the CPU ring at once.
    pub batch_cpu: usize,
    /// Reader threads issuing `pread`s.
    pub reader_threads: usize,
    /// Size of one read request, a multiple of 4096.
    pub read_chunk: u64,
    /// How files are opened.
    pub io_mode: OpenMode,
    /// Layers kept pinned in host RAM across passes.
    pub pinned_cache: Budget,
    /// Layers kept resident on the device.
    pub gpu_cache: Budget,
    /// CPUs to pin the stage threads to (transfer, pin, readers, in turn).
    pub cpu_affinity: Option<Vec<usize>>,
    /// Show a progress bar per pass.
    pub progress: bool,
}

impl Default for StreamerConfig {
    fn default() -> Self {
        StreamerConfig {
            device: Device::Cuda(0),
            dtype: Some(DType::BF16),
            n_gpu: 2,
            n_cpu_pinned: 4,
            n_cpu: 0,
            batch_gpu: 1,
            batch_cpu_pinned: 1,
            batch_cpu: 1,
            reader_threads: 4,
            read_chunk: 16 << 20,
            io_mode: OpenMode::Auto,
            pinned_cache: Budget::None,
            gpu_cache: Budget::None,
            cpu_affinity: None,
            progress: false,
        }
    }
}

impl StreamerConfig {
    /// Checks the fields that do not depend on the model or the machine.
    pub fn validate(&self) -> Result<()> {
        if self.reader_threads == 0 || self.reader_threads > 256 {
            return Err(Error::config(format!(
                "reader_threads must be in 1..=256, got {}",
                self.reader_threads
            )));
        }
        if self.read_chunk == 0 || self.read_chunk % 4096 != 0 {
            return Err(Error::config(format!(
                "read_chunk must be a positive multiple of 4096 bytes, got {}",
                self.read_chunk
            )));
        }
        for (name, v) in [
            ("n_gpu", self.n_gpu),
            ("n_cpu_pinned", self.n_cpu_pinned),
            ("n_cpu", self.n_cpu),
        ] {
            if v > 1024 {
                return Err(Error::config(format!(
                    "{name} must be at most 1024, got {v}"
                )));
            }
        }
        for (name, v) in [
            ("batch_gpu", self.batch_gpu),
            ("batch_cpu_pinned", self.batch_cpu_pinned),
            ("batch_cpu", self.batch_cpu),
        ] {
            if v > 1024 {
                return Err(Error::config(format!(
                    "{name} must be at most 1024, got {v}"
                )));
            }
        }
        if let Some(d) = self.dtype {
            if !matches!(d, DType::BF16 | DType::F16 | DType::F32) {
                return Err(Error::config(format!(
                    "compute dtype must be bf16, f16 or f32, got {d}"
                )));
            }
        }
        if let Some(cpus) = &self.cpu_affinity {
            if cpus.is_empty() {
                return Err(Error::config("cpu_affinity is an empty list"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_budgets_parse() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("4GB").unwrap(), 4_000_000_000);
        assert_eq!(parse_size("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_size("1.5M").unwrap(), 3 << 19);
        assert!(parse_size("12 parsecs").is_err());
        assert_eq!(Budget::parse("auto").unwrap(), Budget::Auto);
        assert_eq!(Budget::parse("none").unwrap(), Budget::None);
        assert_eq!(Budget::parse("1MiB").unwrap(), Budget::Bytes(1 << 20));
    }

    #[test]
    fn devices_parse() {
        assert_eq!(Device::parse("host").unwrap(), Device::Host);
        assert_eq!(Device::parse("-1").unwrap(), Device::Host);
        assert_eq!(Device::parse("cuda:3").unwrap(), Device::Cuda(3));
        assert_eq!(Device::parse("1").unwrap(), Device::Cuda(1));
        assert!(Device::parse("tpu").is_err());
    }

    #[test]
    fn validation_names_the_field() {
        let c = StreamerConfig {
            read_chunk: 1000,
            ..Default::default()
        };
        assert!(c.validate().unwrap_err().to_string().contains("read_chunk"));
        let c = StreamerConfig {
            reader_threads: 0,
            ..Default::default()
        };
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("reader_threads"));
    }
}
