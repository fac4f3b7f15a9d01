//! The `layer-streamer` command-line tool.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod bench_generate;
mod check_reference;
mod demo;
mod generate;
mod inspect;
mod stream_args;
mod synth;

/// Stream transformer weights from disk to the GPU, layer by layer.
#[derive(Parser)]
#[command(name = "layer-streamer", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Describe a model directory: files, dtypes, layers, extents.
    Inspect(inspect::Args),
    /// Write a random-weight model directory in the Hugging Face layout.
    Synth(synth::Args),
    /// Generate text with a Qwen2/Llama model.
    Generate(generate::Args),
    /// Generate from a synthetic model and report the speed.
    Demo(demo::Args),
    /// Check the forward pass against Hugging Face reference logits.
    CheckReference(check_reference::Args),
    /// Measure prefill and decode speed.
    BenchGenerate(bench_generate::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Inspect(a) => inspect::run(a),
        Command::Synth(a) => synth::run(a),
        Command::Generate(a) => generate::run(a),
        Command::Demo(a) => demo::run(a),
        Command::CheckReference(a) => check_reference::run(a),
        Command::BenchGenerate(a) => bench_generate::run(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                eprintln!("  caused by: {s}");
                src = s.source();
            }
            ExitCode::FAILURE
        }
    }
}
