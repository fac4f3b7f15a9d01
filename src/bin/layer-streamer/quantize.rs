//! `layer-streamer quantize`.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::PathBuf;

use indicatif::{ProgressBar, ProgressStyle};
use layer_streamer::gguf::convert::{quantize_to_gguf, QuantizeOptions, TARGET_TYPES};
use layer_streamer::quant::QuantType;
use layer_streamer::synth::quantize_fp8;
use layer_streamer::tuner::format_bytes;
use layer_streamer::{Error, Result};

/// Arguments of `quantize`.
#[derive(clap::Args)]
pub struct Args {
    /// The source: a Hugging Face safetensors directory (bf16, f16, f32) or a GGUF model.
    src: PathBuf,
    /// The file to write (a GGUF file), or for fp8 the directory (created if missing).
    dst: PathBuf,
    /// Block type of the weight matrices: q8_0, q4_0, q4_1, q4_k or q6_k (a GGUF file; the
    /// embedding and output take q6_k, q8_0 in a q8_0 file, norms and biases f32), or fp8
    /// (a safetensors directory: E4M3 layer weights with 128x128 block scales, as the
    /// official FP8 releases store them; the source must be a safetensors directory).
    #[arg(long = "type")]
    ty: String,
    /// Quantizer threads (0: one per CPU).
    #[arg(long, default_value_t = 0)]
    threads: usize,
}

/// What the output is.
enum Target {
    /// A GGUF file with weight matrices in this block type.
    Gguf(QuantType),
    /// FP8 safetensors (E4M3 weights, 128x128 `weight_scale_inv` blocks).
    Fp8,
}

fn parse_target(s: &str) -> Result<Target> {
    if s.eq_ignore_ascii_case("fp8") {
        return Ok(Target::Fp8);
    }
    match QuantType::parse(s) {
        Some(ty) if TARGET_TYPES.contains(&ty) => Ok(Target::Gguf(ty)),
        _ => Err(Error::Input(format!(
            "unknown --type {s:?}: expected {} or fp8",
            TARGET_TYPES
                .map(|t| t.name().to_ascii_lowercase())
                .join(", ")
        ))),
    }
}

/// Runs `quantize`.
pub fn run(a: Args) -> Result<()> {
    match parse_target(&a.ty)? {
        Target::Gguf(ty) => gguf(&a, ty),
        Target::Fp8 => fp8(&a),
    }
}

/// A progress bar on a terminal; hidden for logs and pipes.
fn progress_bar() -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar
}

fn fp8(a: &Args) -> Result<()> {
    let bar = progress_bar();
    let report = quantize_fp8(&a.src, &a.dst, &mut |done, total| {
        bar.set_length(total);
        bar.set_position(done);
    });
    bar.finish_and_clear();
    let report = report?;
    println!(
        "wrote {} ({} files): {} tensors quantized to f8_e4m3, {} copied; {} -> {}",
        a.dst.display(),
        report.shards.len(),
        report.quantized,
        report.copied,
        format_bytes(report.source_bytes),
        format_bytes(report.written_bytes),
    );
    Ok(())
}

fn gguf(a: &Args, ty: QuantType) -> Result<()> {
    let bar = progress_bar();
    let opts = QuantizeOptions {
        ty,
        threads: a.threads,
    };
    let report = quantize_to_gguf(&a.src, &a.dst, &opts, &mut |done, total| {
        bar.set_length(total);
        bar.set_position(done);
    });
    bar.finish_and_clear();
    let report = report?;
    for note in &report.notes {
        eprintln!("note: {note}");
    }
    let mut by_type: BTreeMap<QuantType, usize> = BTreeMap::new();
    for t in &report.tensors {
        *by_type.entry(t.ty).or_default() += 1;
    }
    let types: Vec<String> = by_type.iter().map(|(t, n)| format!("{n} {t}")).collect();
    println!(
        "wrote {} ({}, {} tensors: {}): {:.2} GB",
        a.dst.display(),
        report.arch,
        report.tensors.len(),
        types.join(", "),
        report.bytes as f64 / 1e9
    );
    Ok(())
}
