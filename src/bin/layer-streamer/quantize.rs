//! `layer-streamer quantize`.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::PathBuf;

use indicatif::{ProgressBar, ProgressStyle};
use layer_streamer::gguf::convert::{quantize_to_gguf, QuantizeOptions, TARGET_TYPES};
use layer_streamer::quant::QuantType;
use layer_streamer::{Error, Result};

/// Arguments of `quantize`.
#[derive(clap::Args)]
pub struct Args {
    /// The source: a Hugging Face safetensors directory (bf16, f16, f32) or a GGUF model.
    src: PathBuf,
    /// The file to write.
    dst: PathBuf,
    /// Block type of the weight matrices: q8_0, q4_0, q4_1, q4_k or q6_k (a GGUF file). The
    /// embedding and output take q6_k (q8_0 in a q8_0 file), norms and biases f32.
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
}

fn parse_target(s: &str) -> Result<Target> {
    match QuantType::parse(s) {
        Some(ty) if TARGET_TYPES.contains(&ty) => Ok(Target::Gguf(ty)),
        _ => Err(Error::Input(format!(
            "unknown --type {s:?}: expected {}",
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
    }
}

fn gguf(a: &Args, ty: QuantType) -> Result<()> {
    // A bar only on a terminal: logs and pipes get the summary alone.
    let bar = if std::io::stderr().is_terminal() {
        let bar = ProgressBar::new(0);
        bar.set_style(
            ProgressStyle::with_template(
                "{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar
    } else {
        ProgressBar::hidden()
    };
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
