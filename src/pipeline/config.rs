//! The streamer's configuration: which stages run, how deep each ring is,
//! how many reader threads, and how much memory the caches may take.

use crate::{DType, Error, Result};

mod values;

pub use values::{
    format_bytes, parse_compute_dtype, parse_count, parse_cpu_list, parse_size, parse_switch,
    Dequant, OptionText,
};

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

/// The share of each layer's rows the CPU computes (see [`crate::cpu::plan`]).
///
/// Equality is that of the fractions (every constructor checks that a
/// fraction lies in `[0, 1]`, so none is NaN).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum CpuShare {
    /// The share that balances a streamed layer's CPU and PCIe time when
    /// decoding, from rates measured at build (`auto`; see
    /// `pipeline::split_auto`); none on the host backend.
    Auto,
    /// This fraction of the rows of every 2-D weight of the layers that
    /// stream, in `[0, 1]` (layers the GPU cache keeps stay whole); `0`
    /// streams whole layers (the default). On CUDA, passes of many tokens
    /// hand CPU rows back to the device (see `LS_SPLIT_UPLOAD`).
    Fixed(f64),
    /// No CPU share: whole layers stream to the device.
    #[default]
    Off,
}

impl Eq for CpuShare {}

impl CpuShare {
    /// Parses `auto`, `off`, or a fraction in `[0, 1]` (`0` is `off`).
    pub fn parse(s: &str) -> Result<CpuShare> {
        let t = s.trim();
        if t.eq_ignore_ascii_case("auto") {
            return Ok(CpuShare::Auto);
        }
        if t.eq_ignore_ascii_case("off") || t.eq_ignore_ascii_case("none") {
            return Ok(CpuShare::Off);
        }
        match t.parse::<f64>() {
            Ok(f) => CpuShare::fraction(f),
            Err(_) => Err(Error::Input(format!(
                "invalid CPU share {s:?}: expected auto, off or a fraction in [0, 1]"
            ))),
        }
    }

    /// The share of a fraction: `off` for 0, an error outside `[0, 1]`.
    pub fn fraction(f: f64) -> Result<CpuShare> {
        if !(0.0..=1.0).contains(&f) {
            return Err(Error::Input(format!(
                "invalid CPU share {f}: expected auto, off or a fraction in [0, 1]"
            )));
        }
        Ok(if f == 0.0 {
            CpuShare::Off
        } else {
            CpuShare::Fixed(f)
        })
    }

    /// The fixed fraction (0 for `off`); `None` for `auto`.
    pub fn fixed(self) -> Option<f64> {
        match self {
            CpuShare::Auto => None,
            CpuShare::Fixed(f) => Some(f),
            CpuShare::Off => Some(0.0),
        }
    }
}

/// The streamer's options, each listed once: field, type, library default,
/// parser, documentation, command-line flag (with the command line's own
/// default where it differs), and for the options a search varies, the
/// tuner's parameter, its column title and the values its default grid
/// tries. Everything else is derived from this table: [`StreamerConfig`]
/// with its docs and defaults, [`StreamerConfig::OPTIONS`] (the command line
/// and the tuner's child requests), the tuner's `Param` and `Candidate`, and
/// the mapping to and from the C `ls_config` (whose struct is written out in
/// `src/ffi/config.rs`, the one other place a new option goes).
///
/// Invoked with the name of a macro, it calls that macro with the table:
/// `fixed { rows }` (not searched), `searched { rows }` (tuner axes) and
/// `not_in_c { rows }` (options the C struct does not carry).
macro_rules! streamer_options {
    ($then:ident) => {
        $then! {
            fixed {
                /// Where the weights go: `cuda`, `cuda:N`, or `host` (the host
                /// backend: device memory is host memory; no GPU needed).
                device: $crate::Device = $crate::Device::Cuda(0),
                    parse $crate::Device::parse, flag "device";
                /// Compute dtype (`bf16`, `f16`, `f32`): f16 and f32 tensors are cast
                /// to it on the device; `file` (`None`) keeps each tensor's file dtype.
                dtype: Option<$crate::DType> = Some($crate::DType::BF16),
                    parse $crate::pipeline::config::parse_compute_dtype, flag "dtype";
                /// Where quantized layer weights (ggml blocks, FP8) become `dtype`:
                /// `slot` (dequantized into each device slot before the layer function
                /// runs), `use` (handed over as stored, for a layer function that
                /// dequantizes at use: slots and the GPU cache hold only the stored
                /// bytes), or `auto` (`slot`; the model commands take `use`).
                dequant: $crate::pipeline::config::Dequant =
                    $crate::pipeline::config::Dequant::Auto,
                    parse $crate::pipeline::config::Dequant::parse, flag "dequant";
                /// How files are opened: `auto` (O_DIRECT, buffered where refused),
                /// `direct` or `buffered`.
                io_mode: $crate::io::OpenMode = $crate::io::OpenMode::Auto,
                    parse $crate::io::OpenMode::parse, flag "io";
                /// Show a progress bar per pass.
                progress: bool = false, parse $crate::pipeline::config::parse_switch, flag "progress";
            }
            searched {
                /// GPU prefetch depth: the device holds `n_gpu + 1` layer slots.
                n_gpu: usize = 2, parse $crate::pipeline::config::parse_count, flag "n-gpu",
                    axis NGpu "n_gpu" [1, 2, 4];
                /// Pinned host slots between the readers and the transfer thread
                /// (`0`: the transfer thread stages each layer through one pinned buffer).
                n_cpu_pinned: usize = 4, parse $crate::pipeline::config::parse_count,
                    flag "n-cpu-pinned", axis NCpuPinned "n_pin" [2, 4];
                /// Unpinned page-aligned slots the readers fill before a pin thread
                /// copies them into pinned slots (`0`: readers fill pinned slots).
                n_cpu: usize = 0, parse $crate::pipeline::config::parse_count, flag "n-cpu",
                    axis NCpu "n_cpu" [0];
                /// Items the transfer thread hands to the compute side at once.
                batch_gpu: usize = 1, parse $crate::pipeline::config::parse_count,
                    flag "batch-gpu", axis BatchGpu "b_gpu" [1];
                /// Items handed from the pinned ring at once.
                batch_cpu_pinned: usize = 1, parse $crate::pipeline::config::parse_count,
                    flag "batch-cpu-pinned", axis BatchCpuPinned "b_pin" [1];
                /// Items handed from the CPU ring at once.
                batch_cpu: usize = 1, parse $crate::pipeline::config::parse_count,
                    flag "batch-cpu", axis BatchCpu "b_cpu" [1];
                /// Reader threads issuing `pread`s.
                reader_threads: usize = 4, parse $crate::pipeline::config::parse_count,
                    flag "reader-threads", axis ReaderThreads "readers" [4, 8], cli 8;
                /// Size of one read request, a multiple of 4096 (`16MiB`, `4M`, `8388608`).
                read_chunk: u64 = 16 << 20, parse $crate::pipeline::config::parse_size,
                    flag "read-chunk", axis ReadChunk "chunk" [16 << 20];
                /// Layers kept pinned in host RAM across passes: `none`, `auto`, or a
                /// size (`12GB`).
                pinned_cache: $crate::Budget = $crate::Budget::None,
                    parse $crate::Budget::parse, flag "pinned-cache",
                    axis PinnedCache "pin_cache" [$crate::Budget::None, $crate::Budget::Auto],
                    cli $crate::Budget::Auto;
                /// Layers kept resident on the device: `none`, `auto`, or a size.
                gpu_cache: $crate::Budget = $crate::Budget::None,
                    parse $crate::Budget::parse, flag "gpu-cache",
                    axis GpuCache "gpu_cache" [$crate::Budget::None];
                /// Share of the rows of the 2-D weights of each streamed layer that
                /// the CPU computes from host memory while the rest streams to the
                /// device (layers the GPU cache keeps stay whole): `off` (`0`), a
                /// fraction in `[0, 1]`, or `auto` (balances the CPU against PCIe,
                /// from rates measured at build; off on the host backend).
                cpu_share: $crate::pipeline::config::CpuShare =
                    $crate::pipeline::config::CpuShare::Off,
                    parse $crate::pipeline::config::CpuShare::parse, flag "cpu-share",
                    axis CpuShare "share" [$crate::pipeline::config::CpuShare::Off];
            }
            not_in_c {
                /// CPUs to pin the stage threads to (transfer, pin, readers, in
                /// turn), e.g. `2,3,4,5`.
                cpu_affinity: Option<Vec<usize>> = None,
                    parse $crate::pipeline::config::parse_cpu_list, flag "cpu-affinity";
            }
        }
    };
}
pub(crate) use streamer_options;

/// The last of its arguments: a row's command-line default where it has one.
macro_rules! last {
    ($first:expr) => {
        $first
    };
    ($first:expr, $second:expr) => {
        $second
    };
}

/// Whether a group of the table is the one the tuner searches.
macro_rules! is_searched {
    (searched) => {
        true
    };
    ($other:ident) => {
        false
    };
}

/// One option of [`StreamerConfig`] as text: how the command line and the
/// tuner's child requests name, parse and print it.
#[derive(Clone, Copy)]
pub struct OptionSpec {
    /// The field of [`StreamerConfig`], e.g. `io_mode`.
    pub name: &'static str,
    /// The command-line flag without its dashes, e.g. `io`.
    pub flag: &'static str,
    /// What the option does: the field's documentation.
    pub doc: &'static str,
    /// A flag without a value on the command line (`--progress`).
    pub switch: bool,
    /// Whether the tuner varies it (it is a `tuner::Param`).
    pub searched: bool,
    /// Parses a value and stores it; the error names the option.
    pub set: fn(&mut StreamerConfig, &str) -> Result<()>,
    /// The value, as text that `set` reads back.
    pub get: fn(&StreamerConfig) -> String,
}

impl std::fmt::Debug for OptionSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OptionSpec")
            .field("name", &self.name)
            .field("flag", &self.flag)
            .finish_non_exhaustive()
    }
}

macro_rules! define_config {
    ($(
        $group:ident { $(
            $(#[doc = $doc:literal])*
            $name:ident : $ty:ty = $default:expr, parse $parse:path, flag $flag:literal
            $(, axis $variant:ident $title:literal [$($tune:expr),*])? $(, cli $cli:expr)?;
        )* }
    )*) => {
        /// Everything that shapes a streamer. Built with
        /// [`LayerStreamerBuilder`](crate::streamer::LayerStreamerBuilder); the
        /// stage fields keep the meaning they have in the Python package this
        /// replaces: `0` switches a stage off. Each field's default is
        /// [`StreamerConfig::default`]'s.
        #[derive(Debug, Clone, PartialEq)]
        pub struct StreamerConfig {
            $($(
                $(#[doc = $doc])*
                pub $name: $ty,
            )*)*
        }

        impl Default for StreamerConfig {
            fn default() -> Self {
                StreamerConfig { $($($name: $default,)*)* }
            }
        }

        impl StreamerConfig {
            /// The defaults of the `layer-streamer` command-line tool, which
            /// favour speed over leaving memory to other programs: the library's
            /// defaults except 8 reader threads and an `auto` pinned cache.
            pub fn cli_default() -> StreamerConfig {
                StreamerConfig { $($($name: last!($default $(, $cli)?),)*)* }
            }

            /// Every option, in the order of the fields.
            pub const OPTIONS: &'static [OptionSpec] = &[$($(OptionSpec {
                name: stringify!($name),
                flag: $flag,
                doc: concat!($($doc, "\n",)*),
                switch: <$ty as OptionText>::SWITCH,
                searched: is_searched!($group),
                set: |cfg, text| {
                    cfg.$name = $parse(text).map_err(|e| {
                        Error::Input(format!("{}: {e}", stringify!($name)))
                    })?;
                    Ok(())
                },
                get: |cfg| OptionText::text(&cfg.$name),
            },)*)*];
        }
    };
}

streamer_options!(define_config);

impl StreamerConfig {
    /// Checks the fields that do not depend on the model or the machine.
    pub fn validate(&self) -> Result<()> {
        if self.reader_threads == 0 || self.reader_threads > 256 {
            return Err(Error::config(format!(
                "reader_threads must be in 1..=256, got {}",
                self.reader_threads
            )));
        }
        if self.read_chunk == 0 || !self.read_chunk.is_multiple_of(4096) {
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
        if let CpuShare::Fixed(f) = self.cpu_share {
            if !(f > 0.0 && f <= 1.0) {
                return Err(Error::config(format!(
                    "cpu_share must be auto, off or a fraction in [0, 1], got {f}"
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

    fn random_config(rng: &mut impl rand::Rng) -> StreamerConfig {
        let budget = |rng: &mut dyn rand::RngCore| match rng.next_u32() % 3 {
            0 => Budget::None,
            1 => Budget::Auto,
            _ => Budget::Bytes(rng.next_u64() >> 8),
        };
        StreamerConfig {
            device: [Device::Host, Device::Cuda(rng.gen_range(0..8))][rng.gen_range(0..2)],
            dtype: [None, Some(DType::BF16), Some(DType::F16), Some(DType::F32)]
                [rng.gen_range(0..4)],
            io_mode: [
                crate::io::OpenMode::Auto,
                crate::io::OpenMode::Direct,
                crate::io::OpenMode::Buffered,
            ][rng.gen_range(0..3)],
            progress: rng.gen(),
            dequant: Dequant::ALL[rng.gen_range(0..3)],
            cpu_share: [
                CpuShare::Auto,
                CpuShare::Off,
                CpuShare::Fixed(rng.gen_range(0.0..1.0f64).max(f64::MIN_POSITIVE)),
            ][rng.gen_range(0..3)],
            n_gpu: rng.gen_range(0..64),
            n_cpu_pinned: rng.gen_range(0..64),
            n_cpu: rng.gen_range(0..64),
            batch_gpu: rng.gen_range(0..64),
            batch_cpu_pinned: rng.gen_range(0..64),
            batch_cpu: rng.gen_range(0..64),
            reader_threads: rng.gen_range(0..64),
            read_chunk: rng.gen_range(1..1 << 20) * 4096,
            pinned_cache: budget(rng),
            gpu_cache: budget(rng),
            cpu_affinity: rng.gen::<bool>().then(|| {
                (0..rng.gen_range(1..6))
                    .map(|_| rng.gen_range(0..128))
                    .collect()
            }),
        }
    }

    #[test]
    fn every_option_reads_back_what_it_prints() {
        let seed: u64 = std::env::var("LS_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(rand::random);
        eprintln!("seed {seed} (LS_SEED replays it)");
        let mut rng = <rand::rngs::SmallRng as rand::SeedableRng>::seed_from_u64(seed);
        for _ in 0..200 {
            let cfg = random_config(&mut rng);
            let mut back = StreamerConfig::default();
            for o in StreamerConfig::OPTIONS {
                (o.set)(&mut back, &(o.get)(&cfg)).unwrap();
            }
            assert_eq!(back, cfg);
        }
        let names: std::collections::HashSet<_> =
            StreamerConfig::OPTIONS.iter().map(|o| o.name).collect();
        let flags: std::collections::HashSet<_> =
            StreamerConfig::OPTIONS.iter().map(|o| o.flag).collect();
        assert_eq!(names.len(), StreamerConfig::OPTIONS.len());
        assert_eq!(flags.len(), StreamerConfig::OPTIONS.len());
        let chunk = StreamerConfig::OPTIONS
            .iter()
            .find(|o| o.flag == "read-chunk")
            .unwrap();
        let e = (chunk.set)(&mut StreamerConfig::default(), "4 parsecs").unwrap_err();
        assert!(e.to_string().starts_with("read_chunk: invalid size"), "{e}");
    }

    #[test]
    fn the_tools_defaults_differ_in_readers_and_pinned_cache_only() {
        let cli = StreamerConfig::cli_default();
        assert_eq!((cli.reader_threads, cli.pinned_cache), (8, Budget::Auto));
        assert_eq!(
            StreamerConfig {
                reader_threads: 4,
                pinned_cache: Budget::None,
                ..cli
            },
            StreamerConfig::default()
        );
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
    fn cpu_shares_parse_and_bad_ones_name_the_option() {
        assert_eq!(CpuShare::parse("auto").unwrap(), CpuShare::Auto);
        assert_eq!(CpuShare::parse("0").unwrap(), CpuShare::Off);
        assert_eq!(CpuShare::parse("off").unwrap(), CpuShare::Off);
        assert_eq!(CpuShare::parse(" 0.25 ").unwrap(), CpuShare::Fixed(0.25));
        assert_eq!(CpuShare::parse("1").unwrap(), CpuShare::Fixed(1.0));
        let spec = StreamerConfig::OPTIONS
            .iter()
            .find(|o| o.flag == "cpu-share")
            .unwrap();
        for bad in ["1.5", "-0.1", "NaN", "inf", "half", ""] {
            let e = (spec.set)(&mut StreamerConfig::default(), bad).unwrap_err();
            assert!(
                e.to_string().starts_with("cpu_share: invalid CPU share"),
                "{e}"
            );
        }
        for f in [f64::NAN, 2.0, -1.0, 0.0] {
            let c = StreamerConfig {
                cpu_share: CpuShare::Fixed(f),
                ..Default::default()
            };
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains("cpu_share"), "{e}");
        }
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
