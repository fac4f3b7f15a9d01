//! `layer-streamer synth`.

use std::path::PathBuf;

use indicatif::{ProgressBar, ProgressStyle};
use layer_streamer::pipeline::parse_size;
use layer_streamer::quant::QuantType;
use layer_streamer::synth::{
    write_gguf, write_model_with_progress, Arch, Shape, SynthGgufSpec, SynthReport, SynthSpec,
};
use layer_streamer::{DType, Error, Result};

/// Arguments of `synth`.
#[derive(clap::Args)]
pub struct Args {
    /// Directory to write the model into (created if missing); with `--format gguf`, the
    /// `.gguf` file to write (a path without that extension is a directory that gets
    /// `model.gguf`).
    dir: PathBuf,
    /// Architecture: qwen2 or llama (default: llama for the 70b preset, else qwen2).
    #[arg(long)]
    arch: Option<String>,
    /// Size preset: tiny, small, 1.5b, 7b (Qwen2 7B shapes) or 70b (Llama 3 70B shapes).
    #[arg(long, default_value = "tiny")]
    preset: String,
    /// Output: safetensors (a Hugging Face directory) or gguf (one file of random blocks of
    /// `--type`, with the tokenizer in its metadata).
    #[arg(long, default_value = "safetensors")]
    format: String,
    /// Block type of a GGUF model's weight matrices: q8_0, q4_0, q4_1, q5_0, q5_1, q4_k, q5_k
    /// or q6_k (embedding and output q6_k, q8_0 in a q8_0 file; norms f32).
    #[arg(long = "type")]
    ty: Option<String>,
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
    let arch_name = a
        .arch
        .clone()
        .unwrap_or_else(|| if a.preset == "70b" { "llama" } else { "qwen2" }.to_string());
    let arch = Arch::parse(&arch_name).ok_or_else(|| {
        Error::Input(format!(
            "unknown --arch {arch_name:?}: expected qwen2 or llama"
        ))
    })?;
    let shape = Shape::preset(&a.preset).ok_or_else(|| {
        Error::Input(format!(
            "unknown --preset {:?}: expected {}",
            a.preset,
            Shape::PRESETS.join(", ")
        ))
    })?;
    match (a.format.as_str(), &a.ty) {
        ("safetensors", None) => safetensors(&a, arch, shape),
        ("safetensors", Some(_)) => Err(Error::Input(
            "--type is for --format gguf; safetensors weights take --dtype".into(),
        )),
        ("gguf", ty) => {
            let name = ty.as_deref().unwrap_or("");
            let ty = QuantType::parse(name)
                .filter(|t| t.is_quantized())
                .ok_or_else(|| {
                    Error::Input(format!(
                        "--format gguf needs --type: one of q8_0, q4_0, q4_1, q5_0, q5_1, q4_k, \
                         q5_k, q6_k, not {name:?}"
                    ))
                })?;
            gguf(&a, arch, shape, ty)
        }
        (other, _) => Err(Error::Input(format!(
            "unknown --format {other:?}: expected safetensors or gguf"
        ))),
    }
}

fn bar(total: u64) -> ProgressBar {
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar
}

fn gguf(a: &Args, arch: Arch, shape: Shape, ty: QuantType) -> Result<()> {
    let path = if a.dir.extension().is_some_and(|e| e == "gguf") {
        a.dir.clone()
    } else {
        a.dir.join("model.gguf")
    };
    let spec = SynthGgufSpec {
        arch,
        shape,
        ty,
        tie: a.tie,
        seed: a.seed,
    };
    let bar = bar(0);
    let report = write_gguf(&path, &spec, &mut |done, total| {
        bar.set_length(total);
        bar.set_position(done);
    })?;
    bar.finish_and_clear();
    summary(
        &report,
        &format!(
            "{} {} {ty}, {} layers",
            arch.model_type(),
            a.preset,
            shape.layers
        ),
    );
    Ok(())
}

fn safetensors(a: &Args, arch: Arch, shape: Shape) -> Result<()> {
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
    let bar = bar((elems * dtype.size()) as u64);
    let report = write_model_with_progress(&a.dir, &spec, &|n| bar.inc(n))?;
    bar.finish_and_clear();
    let shards = report
        .files
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .count();
    summary(
        &report,
        &format!(
            "{} {} {}, {} layers, {} shard{}",
            arch.model_type(),
            a.preset,
            dtype,
            shape.layers,
            shards,
            if shards == 1 { "" } else { "s" }
        ),
    );
    Ok(())
}

fn summary(report: &SynthReport, what: &str) {
    let first = report.files.first().cloned().unwrap_or_default();
    let place = if first.extension().is_some_and(|e| e == "gguf") {
        first
    } else {
        first.parent().map(PathBuf::from).unwrap_or_default()
    };
    println!(
        "wrote {} ({what}): {:.2} GB in {:.2} s, {:.2} GB/s",
        place.display(),
        report.bytes as f64 / 1e9,
        report.seconds,
        report.bytes as f64 / 1e9 / report.seconds.max(1e-9)
    );
    for f in &report.files {
        println!("  {}", f.display());
    }
}
