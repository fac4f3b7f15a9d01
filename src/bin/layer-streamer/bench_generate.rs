//! `layer-streamer bench-generate`: prefill and decode speed for given
//! prompt lengths and batch sizes, on random prompts.
//!
//! Columns: `prefill_TFLOP/s` is the projections' FLOPs of every prompt token
//! through every layer (two per multiply-add; attention and lm_head not
//! counted) over the prefill's wall time; `xfer_bound_s` is a pass's bytes at
//! the host-to-device rate the last pass measured, and `bound_tok/s` the
//! decode rate that allows; `layer_TFLOP/s` is the same FLOP count for one
//! layer over that layer's device time, timed on the latest pass with the
//! most tokens. Each batch size's prefill runs once unmeasured first (a new
//! shape's first GEMMs pay for cuBLAS choosing its kernels), so the table
//! shows the steady state.

use std::path::PathBuf;

use layer_streamer::llm::{generate, GenerateParams, ModelOptions};
use layer_streamer::Result;

use crate::stream_args::{open_model, parse_list, StreamArgs};

/// Arguments of `bench-generate`.
#[derive(clap::Args)]
pub struct Args {
    /// The model directory.
    #[arg(long)]
    pub model: PathBuf,
    /// Prompt length per sequence.
    #[arg(long, default_value_t = 512)]
    pub prompt_len: usize,
    /// New tokens per sequence.
    #[arg(long, default_value_t = 16)]
    pub new_tokens: usize,
    /// Batch sizes to measure, comma-separated.
    #[arg(long, default_value = "1,8")]
    pub batch: String,
    /// Most tokens per pass.
    #[arg(long, default_value_t = 4096)]
    pub max_tokens: usize,
    #[command(flatten)]
    pub stream: StreamArgs,
}

/// Runs `bench-generate`.
pub fn run(a: Args) -> Result<()> {
    let batches = parse_list(&a.batch, "batch size")?;
    let max_b = *batches.iter().max().unwrap_or(&1);
    let opts = ModelOptions {
        max_batch: max_b,
        max_len: a.prompt_len + a.new_tokens,
        max_tokens: a.max_tokens.max(max_b),
        ..ModelOptions::default()
    };
    let (index, mut streamer, mut model) = open_model(&a.model, &a.stream, opts)?;
    let vocab = model.config().vocab as u32;
    let params = GenerateParams {
        max_new_tokens: a.new_tokens,
        sampling: Default::default(),
        seed: 0,
        stop_ids: Vec::new(),
    };
    println!(
        "{}: {} layers, {:.2} GB per pass, device {}",
        a.model.display(),
        index.num_layers(),
        index.total_layer_bytes() as f64 / 1e9,
        a.stream.opts.config.device
    );
    // Warm-up: fills the caches so the measured passes stream from them.
    let warm: Vec<u32> = (0..8).map(|i| (i * 31) % vocab).collect();
    let short = GenerateParams {
        max_new_tokens: 2,
        ..params.clone()
    };
    generate(&mut model, &mut streamer, &[warm], &short, |_, _| Ok(()))?;
    println!(
        "batch  prompt  prefill_s  prefill_tok/s  prefill_TFLOP/s  decode_tok/s  decode_GB/s  xfer_bound_s  bound_tok/s  layer_TFLOP/s"
    );
    for &b in &batches {
        let prompts: Vec<Vec<u32>> = (0..b)
            .map(|s| {
                (0..a.prompt_len)
                    .map(|i| ((i * 7919 + s * 104729 + 13) as u32) % vocab)
                    .collect()
            })
            .collect();
        // A first pass of a new shape pays for cuBLAS choosing its kernels:
        // run the same prefill once before measuring the steady state.
        generate(&mut model, &mut streamer, &prompts, &short, |_, _| Ok(()))?;
        let g = generate(&mut model, &mut streamer, &prompts, &params, |_, _| Ok(()))?;
        // What the transfer alone allows: a pass's bytes at the host-to-device
        // rate the last pass measured.
        let st = streamer.last_pass_stats();
        let h2d_rate = st.h2d.bytes as f64 / st.h2d.busy.as_secs_f64().max(1e-9);
        let bound_s = g.pass_bytes as f64 / h2d_rate.max(1.0);
        println!(
            "{b:>5}  {:>6}  {:>9.3}  {:>13.1}  {:>15.1}  {:>12.2}  {:>11.2}  {:>12.3}  {:>11.2}  {}",
            a.prompt_len,
            g.prefill.as_secs_f64(),
            g.prompt_tokens as f64 / g.prefill.as_secs_f64().max(1e-9),
            model.config().projection_flops_per_token() * g.prompt_tokens as f64
                / g.prefill.as_secs_f64().max(1e-9)
                / 1e12,
            g.decode_tokens_per_s(),
            g.decode_gb_per_s(),
            bound_s,
            b as f64 / bound_s.max(1e-9),
            model
                .last_gemm_tflops()
                .map_or("-".to_string(), |t| format!("{t:.1}"))
        );
    }
    println!("last pass: {}", streamer.last_pass_stats());
    Ok(())
}
