//! Streamer options shared by the model commands.

use layer_streamer::llm::{LlamaModel, ModelOptions, Precision};
use layer_streamer::{Device, Error, LayerStreamer, ModelIndex, Result};

use crate::opts::StreamerOpts;

/// Where and how the weights stream: the shared streamer options, with the
/// compute dtype chosen from the checkpoint.
#[derive(clap::Args, Clone, Debug)]
pub struct StreamArgs {
    #[command(flatten)]
    pub opts: StreamerOpts,
    /// Arithmetic of the CUDA forward pass: fast (each GEMM input rounded to
    /// 16 bits, one GEMM) or exact (split into two 16-bit halves, two GEMMs).
    /// The host backend computes in f32 either way.
    #[arg(long, default_value = "fast", value_parser = parse_precision)]
    pub precision: Precision,
    /// Keep the KV cache in page-locked host RAM and copy each layer's
    /// positions in use through two device slots with the layer (for batches
    /// whose cache exceeds the GPU's memory). The host backend keeps its cache
    /// in RAM either way.
    #[arg(long)]
    pub kv_offload: bool,
}

fn parse_precision(s: &str) -> std::result::Result<Precision, String> {
    s.parse().map_err(|e: Error| e.to_string())
}

impl StreamArgs {
    /// The parsed device.
    pub fn device(&self) -> Result<Device> {
        Ok(self.opts.config.device)
    }

    /// Builds a streamer over `index` with [`LlamaModel::streamer_config`]:
    /// on CUDA in [`LlamaModel::cuda_dtype`] (whatever `--dtype` says), on
    /// the host in the file dtypes.
    pub fn build(&self, index: &ModelIndex) -> Result<LayerStreamer> {
        let cfg = self.opts.config()?;
        if let Device::Cuda(_) = cfg.device {
            layer_streamer::cuda::check_available()?;
        }
        let cfg = LlamaModel::streamer_config(index, cfg);
        (LayerStreamer::builder(index).config(cfg))
            .split_only(&LlamaModel::SPLIT_WEIGHTS)
            .build()
    }
}

/// Opens `dir`, builds the streamer and loads the model for these sizes.
pub fn open_model(
    dir: &std::path::Path,
    args: &StreamArgs,
    opts: ModelOptions,
) -> Result<(ModelIndex, LayerStreamer, LlamaModel)> {
    load_model(ModelIndex::open(dir)?, args, opts)
}

/// Builds the streamer over an opened `index` and loads the model for these sizes.
pub fn load_model(
    index: ModelIndex,
    args: &StreamArgs,
    opts: ModelOptions,
) -> Result<(ModelIndex, LayerStreamer, LlamaModel)> {
    // Check the architecture before anything is allocated.
    layer_streamer::llm::ModelConfig::from_model(&index)?;
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
