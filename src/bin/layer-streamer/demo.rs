//! `layer-streamer demo`: generation from a synthetic model, with the
//! speed it reaches against what the transfer allows.

use std::path::PathBuf;

use layer_streamer::llm::{generate, GenerateParams, ModelOptions};
use layer_streamer::synth::{write_model, Arch, Shape, SynthSpec};
use layer_streamer::{DType, Result};

use crate::stream_args::{open_model, StreamArgs};

/// Arguments of `demo`.
#[derive(clap::Args)]
pub struct Args {
    /// A model directory to use instead of a synthetic one.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Preset of the synthetic model: tiny, small, 1.5b or 7b.
    #[arg(long, default_value = "small")]
    pub preset: String,
    /// New tokens to generate.
    #[arg(long, default_value_t = 32)]
    pub new_tokens: usize,
    #[command(flatten)]
    pub stream: StreamArgs,
}

/// The model to run: `--model`, or a synthetic one of `--preset`, written to
/// the temporary directory once.
fn model_dir(a: &Args) -> Result<std::path::PathBuf> {
    if let Some(d) = &a.model {
        return Ok(d.clone());
    }
    let tmp = std::env::temp_dir().join(format!("layer-streamer-demo-{}", a.preset));
    let shape = Shape::preset(&a.preset)
        .ok_or_else(|| layer_streamer::Error::Input(format!("unknown preset {:?}", a.preset)))?;
    if !tmp.join("config.json").exists() {
        eprintln!(
            "writing a synthetic qwen2 {} model to {}",
            a.preset,
            tmp.display()
        );
        let spec = SynthSpec {
            arch: Arch::Qwen2,
            shape,
            dtype: DType::BF16,
            tie: false,
            shard_size: 4_000_000_000,
            seed: 0,
            threads: 0,
        };
        write_model(&tmp, &spec)?;
    }
    Ok(tmp)
}

/// Runs `demo`.
pub fn run(mut a: Args) -> Result<()> {
    let dir = model_dir(&a)?;
    if a.stream.device()? != layer_streamer::Device::Host {
        if let Err(e) = layer_streamer::cuda::check_available() {
            eprintln!("{e}; using the host backend (f32 math on the CPU)");
            a.stream.opts.config.device = layer_streamer::Device::Host;
        }
    }
    let prompt: Vec<u32> = (0..16u32).map(|i| 100 + 7 * i).collect();
    let opts = ModelOptions {
        max_batch: 1,
        max_len: prompt.len() + a.new_tokens,
        max_tokens: prompt.len(),
        precision: a.stream.precision,
        kv_offload: a.stream.kv_offload,
    };
    let (index, mut streamer, mut model) = open_model(&dir, &a.stream, opts)?;
    let params = GenerateParams {
        max_new_tokens: a.new_tokens,
        sampling: Default::default(),
        seed: 0,
        stop_ids: Vec::new(),
    };
    // A first pass warms the caches; the second is the one measured.
    generate(
        &mut model,
        &mut streamer,
        std::slice::from_ref(&prompt),
        &params,
        |_, _| Ok(()),
    )?;
    let g = generate(&mut model, &mut streamer, &[prompt], &params, |_, _| Ok(()))?;
    println!(
        "{}: {} layers, {:.2} GB streamed per pass, device {}",
        index.dir().display(),
        index.num_layers(),
        g.pass_bytes as f64 / 1e9,
        a.stream.opts.config.device
    );
    println!("generated ids: {:?}", g.tokens[0]);
    crate::generate::report(&g, &streamer, model.last_gemm_tflops());
    let st = streamer.last_pass_stats();
    let h2d = st.h2d.bytes as f64 / st.h2d.busy.as_secs_f64().max(1e-9) / 1e9;
    if !streamer.is_host() && st.h2d.bytes > 0 {
        println!(
            "transfer bound: {:.2} tokens/s at the measured {:.1} GB/s host-to-device; reached {:.2} tokens/s",
            h2d * 1e9 / g.pass_bytes.max(1) as f64,
            h2d,
            g.decode_tokens_per_s()
        );
    }
    Ok(())
}
