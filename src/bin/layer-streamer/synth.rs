//! `layer-streamer synth`.

use std::path::PathBuf;

use indicatif::{ProgressBar, ProgressStyle};
use layer_streamer::pipeline::parse_size;
use layer_streamer::synth::{write_model_with_progress, Arch, Shape, SynthSpec};
use layer_streamer::{DType, Error, Result};

/// Arguments of `synth`.
#[derive(clap::Args)]
pub struct Args {
    /// Directory to write the model into (created if missing).
    dir: PathBuf,
    /// Architecture: qwen2 or llama.
    #[arg(long, default_value = "qwen2")]
    arch: String,
    /// Size preset: tiny, small, 1.5b or 7b.
    #[arg(long, default_value = "tiny")]
    preset: String,
    /// Element type of the weights: bf16, f16 or f32.
    #[arg(long, default_value = "bf16")]
    dtype: String,
    /// Tie lm_head to the embedding (no lm_head.weight is written).
    #[arg(long)]
    tie: bool,
    /// Largest shard: 4GB, 500MB (powers of 1000), 2G or 2GiB (powers of 1024) or a byte
    /// count; one model.safetensors if all fits.
    #[arg(long, default_value = "4GB")]
    shard_size: String,
    /// Seed of the random weights.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Generator threads (0: two per CPU).
    #[arg(long, default_value_t = 0)]
    threads: usize,
}

/// Runs `synth`.
pub fn run(a: Args) -> Result<()> {
    let arch = Arch::parse(&a.arch).ok_or_else(|| {
        Error::Input(format!(
            "unknown --arch {:?}: expected qwen2 or llama",
            a.arch
        ))
    })?;
    let shape = Shape::preset(&a.preset).ok_or_else(|| {
        Error::Input(format!(
            "unknown --preset {:?}: expected tiny, small, 1.5b or 7b",
            a.preset
        ))
    })?;
    let dtype = DType::parse(&a.dtype)
        .filter(|d| matches!(d, DType::BF16 | DType::F16 | DType::F32))
        .ok_or_else(|| {
            Error::Input(format!(
                "unknown --dtype {:?}: expected bf16, f16 or f32",
                a.dtype
            ))
        })?;
    let shard_size = parse_size(&a.shard_size)
        .ok()
        .filter(|&n| n > 0)
        .ok_or_else(|| {
            Error::Input(format!(
                "invalid --shard-size {:?}: expected a positive size, e.g. 4GB (4·10⁹ bytes) or 2G (2 GiB)",
                a.shard_size
            ))
        })?;
    let spec = SynthSpec {
        arch,
        shape,
        dtype,
        tie: a.tie,
        shard_size,
        seed: a.seed,
        threads: a.threads,
    };
    let elems: usize = layer_streamer::synth::tensor_specs(arch, &shape, a.tie)
        .iter()
        .map(|(_, s)| s.iter().product::<usize>())
        .sum();
    let bar = ProgressBar::new((elems * dtype.size()) as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let report = write_model_with_progress(&a.dir, &spec, &|n| bar.inc(n))?;
    bar.finish_and_clear();
    let shards = report
        .files
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .count();
    println!(
        "wrote {} ({} {} {}, {} layers, {} shard{}): {:.2} GB in {:.2} s, {:.2} GB/s",
        a.dir.display(),
        arch.model_type(),
        a.preset,
        dtype,
        shape.layers,
        shards,
        if shards == 1 { "" } else { "s" },
        report.bytes as f64 / 1e9,
        report.seconds,
        report.bytes as f64 / 1e9 / report.seconds.max(1e-9)
    );
    for f in &report.files {
        println!("  {}", f.display());
    }
    Ok(())
}
