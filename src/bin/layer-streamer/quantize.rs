//! `layer-streamer quantize`.

use std::path::PathBuf;

use indicatif::{ProgressBar, ProgressStyle};
use layer_streamer::synth::quantize_fp8;
use layer_streamer::tuner::format_bytes;
use layer_streamer::{Error, Result};

/// Arguments of `quantize`.
#[derive(clap::Args)]
pub struct Args {
    /// The model to quantize: a safetensors model directory (bf16, f16 or f32).
    src: PathBuf,
    /// Directory to write the quantized model into (created if missing).
    dst: PathBuf,
    /// Quantization: fp8 (E4M3 weights with 128x128 block scales, as the official FP8
    /// releases store them).
    #[arg(long = "type")]
    ty: String,
}

/// Runs `quantize`.
pub fn run(a: Args) -> Result<()> {
    if !a.ty.eq_ignore_ascii_case("fp8") {
        return Err(Error::Input(format!(
            "unknown --type {:?}: expected fp8",
            a.ty
        )));
    }
    let pb = ProgressBar::new(0);
    if let Ok(style) = ProgressStyle::with_template(
        "quantizing [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} {elapsed_precise}",
    ) {
        pb.set_style(style.progress_chars("=> "));
    }
    let report = quantize_fp8(&a.src, &a.dst, &mut |done, total| {
        pb.set_length(total);
        pb.set_position(done);
    })?;
    pb.finish_and_clear();
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
