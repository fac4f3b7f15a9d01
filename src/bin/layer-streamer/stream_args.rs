//! Streamer options shared by the model commands.

use layer_streamer::models::{LlamaModel, ModelOptions};
use layer_streamer::{Budget, Device, Error, LayerStreamer, ModelIndex, Result};

/// Where and how the weights stream.
#[derive(clap::Args, Clone, Debug)]
pub struct StreamArgs {
    /// Device: cuda:N, cuda or host (f32 math on the CPU).
    #[arg(long, default_value = "cuda:0")]
    pub device: String,
    /// GPU prefetch depth (n_gpu + 1 layer slots on the device).
    #[arg(long, default_value_t = 2)]
    pub n_gpu: usize,
    /// Pinned host slots.
    #[arg(long, default_value_t = 4)]
    pub n_cpu_pinned: usize,
    /// Unpinned CPU slots (0: readers fill pinned slots directly).
    #[arg(long, default_value_t = 0)]
    pub n_cpu: usize,
    /// Reader threads.
    #[arg(long, default_value_t = 4)]
    pub reader_threads: usize,
    /// Layers kept pinned in RAM across passes: none, auto or a size (e.g. 16GB).
    #[arg(long, default_value = "auto")]
    pub pinned_cache: String,
    /// Layers kept resident on the GPU: none, auto or a size.
    #[arg(long, default_value = "none")]
    pub gpu_cache: String,
    /// Show a progress bar per pass.
    #[arg(long)]
    pub progress: bool,
}

impl StreamArgs {
    /// The parsed device.
    pub fn device(&self) -> Result<Device> {
        Device::parse(&self.device)
    }

    /// Builds a streamer over `index`: on CUDA with [`LlamaModel::cuda_dtype`],
    /// on the host in the file dtypes.
    pub fn build(&self, index: &ModelIndex) -> Result<LayerStreamer> {
        let device = self.device()?;
        if let Device::Cuda(_) = device {
            layer_streamer::cuda::check_available()?;
        }
        let b = LayerStreamer::builder(index)
            .device(device)
            .n_gpu(self.n_gpu)
            .n_cpu_pinned(self.n_cpu_pinned)
            .n_cpu(self.n_cpu)
            .reader_threads(self.reader_threads)
            .pinned_cache(Budget::parse(&self.pinned_cache)?)
            .gpu_cache(Budget::parse(&self.gpu_cache)?)
            .progress(self.progress);
        let b = match device {
            Device::Host => b.file_dtype(),
            Device::Cuda(_) => b.dtype(LlamaModel::cuda_dtype(index)),
        };
        b.build()
    }
}

/// Opens `dir`, builds the streamer and loads the model for these sizes.
pub fn open_model(
    dir: &std::path::Path,
    args: &StreamArgs,
    opts: ModelOptions,
) -> Result<(ModelIndex, LayerStreamer, LlamaModel)> {
    let index = ModelIndex::open(dir)?;
    // Check the architecture before anything is allocated.
    layer_streamer::models::ModelConfig::from_model(&index)?;
    let streamer = args.build(&index)?;
    let model = LlamaModel::load(&streamer, opts)?;
    Ok((index, streamer, model))
}

/// Parses `1,2,3`.
pub fn parse_ids(s: &str) -> Result<Vec<u32>> {
    s.split(',')
        .filter(|x| !x.trim().is_empty())
        .map(|x| {
            x.trim()
                .parse::<u32>()
                .map_err(|_| Error::Input(format!("invalid token id {x:?} in --prompt-ids")))
        })
        .collect()
}

/// Parses `1,8`.
pub fn parse_list(s: &str, what: &str) -> Result<Vec<usize>> {
    s.split(',')
        .map(|x| {
            x.trim()
                .parse::<usize>()
                .ok()
                .filter(|&n| n > 0)
                .ok_or_else(|| Error::Input(format!("invalid {what} {x:?}")))
        })
        .collect()
}
