//! `layer-streamer synth`.

use std::path::PathBuf;

use indicatif::{ProgressBar, ProgressStyle};
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
    /// Largest shard, e.g. 4GB, 500MB, 2GiB or a byte count; one model.safetensors if all fits.
    #[arg(long, default_value = "4GB")]
    shard_size: String,
    /// Seed of the random weights.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Generator threads (0: two per CPU).
    #[arg(long, default_value_t = 0)]
    threads: usize,
}

/// Parses a size: a byte count, or a number with KB/MB/GB (powers of 10) or KiB/MiB/GiB (of 2).
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let num: f64 = num.parse().ok()?;
    let mult = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kb" | "k" => 1e3,
        "mb" | "m" => 1e6,
        "gb" | "g" => 1e9,
        "tb" | "t" => 1e12,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        _ => return None,
    };
    let v = num * mult;
    (1.0..1.8e19).contains(&v).then_some(v as u64)
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
    let shard_size = parse_size(&a.shard_size).ok_or_else(|| {
        Error::Input(format!(
            "invalid --shard-size {:?}: expected e.g. 4GB",
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

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4GB"), Some(4_000_000_000));
        assert_eq!(parse_size("2GiB"), Some(2 << 30));
        assert_eq!(parse_size("1.5MB"), Some(1_500_000));
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("0"), None);
        assert_eq!(parse_size("4 parsecs"), None);
    }
}
