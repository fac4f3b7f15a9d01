//! The `layer-streamer` command-line tool.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod bench;
mod bench_generate;
mod check_reference;
mod demo;
mod generate;
mod inspect;
mod opts;
mod quantize;
#[cfg(feature = "serve")]
mod serve;
mod stream_args;
mod synth;
mod tune;

/// Stream transformer weights from disk to the GPU, layer by layer.
#[derive(Parser)]
#[command(name = "layer-streamer", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Measure the streamer against the disk and PCIe ceilings of this machine.
    Bench(Box<bench::Args>),
    /// Describe a model directory: files, dtypes, layers, extents.
    Inspect(inspect::Args),
    /// Write a random-weight model directory in the Hugging Face layout.
    Synth(synth::Args),
    /// Quantize a model: into a GGUF file that llama.cpp reads, or into FP8 safetensors.
    Quantize(quantize::Args),
    /// Find the fastest streamer configuration for a workload (one child process per configuration).
    Tune(Box<tune::Args>),
    /// Generate text with a Qwen2/Llama model.
    Generate(Box<generate::Args>),
    /// Generate from a synthetic model and report the speed.
    Demo(Box<demo::Args>),
    /// Check the forward pass against Hugging Face reference logits.
    CheckReference(Box<check_reference::Args>),
    /// Measure prefill and decode speed.
    BenchGenerate(Box<bench_generate::Args>),
    /// Serve the model over an OpenAI-compatible HTTP API, batching concurrent requests.
    #[cfg(feature = "serve")]
    Serve(Box<serve::Args>),
}

fn main() -> ExitCode {
    // A `tune` child runs its configuration here and exits.
    layer_streamer::tuner::worker_main(&layer_streamer::tuner::Workloads::builtin());
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Bench(a) => bench::run(*a),
        Command::Inspect(a) => inspect::run(a),
        Command::Synth(a) => synth::run(a),
        Command::Quantize(a) => quantize::run(a),
        Command::Tune(a) => tune::run(*a),
        Command::Generate(a) => generate::run(*a),
        Command::Demo(a) => demo::run(*a),
        Command::CheckReference(a) => check_reference::run(*a),
        Command::BenchGenerate(a) => bench_generate::run(*a),
        #[cfg(feature = "serve")]
        Command::Serve(a) => serve::run(*a),
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The streamer options of a model command.
    fn stream_args(c: &Command) -> Option<&stream_args::StreamArgs> {
        match c {
            Command::Generate(a) => Some(&a.stream),
            Command::Demo(a) => Some(&a.stream),
            Command::CheckReference(a) => Some(&a.stream),
            Command::BenchGenerate(a) => Some(&a.stream),
            #[cfg(feature = "serve")]
            Command::Serve(a) => Some(&a.stream),
            _ => None,
        }
    }

    #[test]
    fn every_model_command_takes_kv_offload_and_leaves_it_off_by_default() {
        let mut commands = vec![
            vec!["generate", "--model", "m", "--prompt", "hi"],
            vec!["demo"],
            vec!["check-reference", "d"],
            vec!["bench-generate", "--model", "m"],
        ];
        if cfg!(feature = "serve") {
            commands.push(vec!["serve", "--model", "m"]);
        }
        for args in commands {
            for on in [false, true] {
                let mut argv = vec!["layer-streamer"];
                argv.extend(&args);
                if on {
                    argv.push("--kv-offload");
                }
                let cli = Cli::try_parse_from(&argv).unwrap_or_else(|e| panic!("{argv:?}: {e}"));
                let s = stream_args(&cli.command).expect("a model command");
                assert_eq!(s.kv_offload, on, "{argv:?}");
            }
        }
    }
}
