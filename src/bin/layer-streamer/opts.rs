//! Streamer options shared by the subcommands that build a streamer.

use layer_streamer::io::OpenMode;
use layer_streamer::pipeline::parse_size;
use layer_streamer::{Budget, DType, Device, Error, Result, StreamerConfig};

/// How the streamer is configured from the command line.
#[derive(clap::Args, Debug, Clone)]
pub struct StreamerOpts {
    /// Device: cuda, cuda:N, or host (the host backend: no GPU needed).
    #[arg(long, default_value = "cuda:0")]
    pub device: String,
    /// Compute dtype (f16/f32 weights are cast on the device), or "file" to keep file
    /// dtypes; the model commands choose it from the checkpoint.
    #[arg(long, default_value = "bf16")]
    pub dtype: String,
    /// GPU prefetch depth: n_gpu + 1 device slots.
    #[arg(long, default_value_t = 2)]
    pub n_gpu: usize,
    /// Pinned host slots (0: the transfer thread stages through one buffer).
    #[arg(long, default_value_t = 4)]
    pub n_cpu_pinned: usize,
    /// Unpinned CPU slots (0: readers fill pinned slots directly).
    #[arg(long, default_value_t = 0)]
    pub n_cpu: usize,
    /// Items the transfer thread hands over at once.
    #[arg(long, default_value_t = 1)]
    pub batch_gpu: usize,
    /// Items handed over from the pinned ring at once.
    #[arg(long, default_value_t = 1)]
    pub batch_cpu_pinned: usize,
    /// Items handed over from the CPU ring at once.
    #[arg(long, default_value_t = 1)]
    pub batch_cpu: usize,
    /// Reader threads.
    #[arg(long, default_value_t = 8)]
    pub reader_threads: usize,
    /// Bytes per read request.
    #[arg(long, default_value = "16MiB")]
    pub read_chunk: String,
    /// How files are opened: auto (O_DIRECT, buffered where refused), direct, buffered.
    #[arg(long, default_value = "auto")]
    pub io: String,
    /// Pinned-RAM cache across passes: none, auto, or a size (e.g. 12GB).
    #[arg(long, default_value = "auto")]
    pub pinned_cache: String,
    /// Device-resident cache: none, auto, or a size.
    #[arg(long, default_value = "none")]
    pub gpu_cache: String,
    /// CPUs to pin the stage threads to, e.g. 2,3,4,5.
    #[arg(long, value_delimiter = ',')]
    pub cpu_affinity: Option<Vec<usize>>,
    /// Show a progress bar per pass.
    #[arg(long)]
    pub progress: bool,
}

impl StreamerOpts {
    /// The configuration these options describe.
    pub fn config(&self) -> Result<StreamerConfig> {
        let cfg = StreamerConfig {
            device: Device::parse(&self.device)?,
            dtype: parse_compute_dtype(&self.dtype)?,
            n_gpu: self.n_gpu,
            n_cpu_pinned: self.n_cpu_pinned,
            n_cpu: self.n_cpu,
            batch_gpu: self.batch_gpu,
            batch_cpu_pinned: self.batch_cpu_pinned,
            batch_cpu: self.batch_cpu,
            reader_threads: self.reader_threads,
            read_chunk: parse_size(&self.read_chunk)?,
            io_mode: OpenMode::parse(&self.io)?,
            pinned_cache: Budget::parse(&self.pinned_cache)?,
            gpu_cache: Budget::parse(&self.gpu_cache)?,
            cpu_affinity: self.cpu_affinity.clone(),
            progress: self.progress,
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

/// Parses a compute dtype: `bf16`, `f16`, `f32`, or `file` (keep file dtypes).
pub fn parse_compute_dtype(s: &str) -> Result<Option<DType>> {
    match s {
        "file" | "none" => Ok(None),
        s => DType::parse(s)
            .map(Some)
            .ok_or_else(|| Error::Input(format!("unknown dtype {s:?}: bf16, f16, f32 or file"))),
    }
}
