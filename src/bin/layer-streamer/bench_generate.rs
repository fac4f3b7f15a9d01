//! `layer-streamer bench-generate`: prefill and decode speed for given
//! prompt lengths and batch sizes, on random prompts, each batch next to the
//! ceilings it is judged against.
//!
//! First table. `prefill_TFLOP/s` is the projections' FLOPs of every prompt
//! token through every layer (two per multiply-add; attention and lm_head
//! not counted) over the prefill's wall time; `xfer_bound_s` is the bytes a
//! decode pass copies host to device at the pinned H2D bandwidth measured in
//! this run (on the host backend: the rate the last pass measured), and
//! `bound_tok/s` the decode rate that allows; `layer_TFLOP/s` is the
//! projections' FLOP count for one layer over that layer's device time,
//! timed on the latest pass with the most tokens.
//!
//! Second table (`bounds`): the decode rate against the transfer bound
//! (`bound_tok/s` above) and the compute bound (the model's FLOPs per decode
//! token, projections, lm_head and attention over the mean context, at the
//! bf16 GEMM peak cuBLAS reaches in this run at a large square size), which
//! of the two limits the batch and the share of it reached; the prefill's
//! model FLOPs (causal attention and the lm_head row included) per second
//! next to that peak.
//!
//! With `--kv-offload`, a third table (`kv-offload`): the KV bytes the last
//! decode pass copied host to device and back, the time the host-to-device
//! part adds at the measured pinned H2D bandwidth next to the weights' (the
//! two share the link), and the decode rate both together allow.
//!
//! With `--cpu-share`, a last table (`split`): per batch, the decode rate,
//! the share, each side's busy and stalled seconds in the last decode pass,
//! and the planner's share, resident layers and bound: the pass time
//! `cpu::plan_pass::plan_pass` gives from the CPU rates and the host's read
//! rate calibrated here at the batch size, the H2D bandwidth, the device's
//! time for a layer (at one token the measured time of layer 0 in a decode
//! pass, else its GEMMs at the peak; 0 on the host) and the VRAM the
//! streamer holds.
//!
//! Each batch size's prefill runs once unmeasured first (a new shape's first
//! GEMMs pay for cuBLAS choosing its kernels), so the tables show the steady
//! state.

use std::path::PathBuf;

use layer_streamer::cpu::calibrate::calibrate;
use layer_streamer::cpu::plan::{divided_tensors, layer_costs, SplitInputs};
use layer_streamer::cpu::plan_pass::plan_pass;
use layer_streamer::cpu::{CpuPool, CpuPoolOptions};
use layer_streamer::llm::{
    generate, GenerateParams, KvTransfer, LayerPhases, LlamaModel, ModelConfig, ModelOptions,
};
use layer_streamer::quant::QuantType;
use layer_streamer::{LayerStreamer, Result};

use crate::stream_args::{open_model, parse_list, StreamArgs};

/// Square size of the GEMM whose throughput is the compute ceiling.
const PEAK_GEMM_N: usize = 8192;
/// Bytes of each copy that measures the pinned H2D bandwidth.
const H2D_PROBE_BYTES: usize = 256 << 20;

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
    /// Batch sizes to measure, comma-separated (e.g. 1,8,32,128,256).
    #[arg(long, default_value = "1,8")]
    pub batch: String,
    /// Most tokens per pass; default: the prompts of the largest batch in
    /// one pass, up to DEFAULT_PASS_TOKENS (16384). A pass streams the whole
    /// model, so fewer tokens a pass leave prefill bound by the copies.
    #[arg(long)]
    pub max_tokens: Option<usize>,
    #[command(flatten)]
    pub stream: StreamArgs,
}

/// FLOPs of one token through the model with `ctx` positions to attend to:
/// the projections, the lm_head, and per layer `q·kᵀ` and `p·v` over `ctx`
/// keys (two FLOPs per multiply-add).
pub fn token_flops(cfg: &ModelConfig, ctx: f64) -> f64 {
    let attention = 4.0 * (cfg.layers * cfg.q_dim()) as f64 * ctx;
    cfg.projection_flops_per_token() + 2.0 * (cfg.hidden * cfg.vocab) as f64 + attention
}

/// Model FLOPs of prefilling `batch` prompts of `len` tokens: every token's
/// projections, causal attention (token `i` attends to `i + 1` positions),
/// and one lm_head row per sequence (the pass computes logits only there).
pub fn prefill_flops(cfg: &ModelConfig, batch: usize, len: usize) -> f64 {
    let n = len as f64;
    let per_seq = n * cfg.projection_flops_per_token()
        + 4.0 * (cfg.layers * cfg.q_dim()) as f64 * n * (n + 1.0) / 2.0
        + 2.0 * (cfg.hidden * cfg.vocab) as f64;
    batch as f64 * per_seq
}

/// Decode rates (tokens/s over the batch) that the transfer alone and the
/// compute alone allow.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bounds {
    /// The batch's tokens per pass over the time to copy a pass's bytes.
    pub transfer: f64,
    /// Tokens per second at the GEMM peak; `None` where it was not measured.
    pub compute: Option<f64>,
}

impl Bounds {
    /// The bounds of a decode pass of `batch` tokens that copies
    /// `pass_bytes` at `h2d_bytes_per_s` and costs `token_flops` per token,
    /// on a device that reaches `peak_flops_per_s` (when measured).
    pub fn new(
        batch: usize,
        pass_bytes: f64,
        h2d_bytes_per_s: f64,
        token_flops: f64,
        peak_flops_per_s: Option<f64>,
    ) -> Bounds {
        // `count` units of `work` each per `work / rate` seconds.
        let per_s = |count: f64, work: f64, rate: f64| {
            if work <= 0.0 {
                f64::INFINITY
            } else {
                count * rate / work
            }
        };
        Bounds {
            // One pass copies the layers once for the whole batch.
            transfer: per_s(batch as f64, pass_bytes, h2d_bytes_per_s),
            // Every token costs its own FLOPs, whatever the batch.
            compute: peak_flops_per_s.map(|p| per_s(1.0, token_flops, p)),
        }
    }

    /// The lower bound and its name (`transfer` or `compute`).
    pub fn limit(&self) -> (&'static str, f64) {
        match self.compute {
            Some(c) if c < self.transfer => ("compute", c),
            _ => ("transfer", self.transfer),
        }
    }

    /// `tokens_per_s` as a share of the lower bound.
    pub fn share(&self, tokens_per_s: f64) -> f64 {
        tokens_per_s / self.limit().1
    }
}

/// What an offloaded KV cache adds to a decode pass's transfer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KvBound {
    /// Seconds the pass's KV bytes to the device take at the H2D bandwidth.
    pub kv_s: f64,
    /// Seconds the pass's weight bytes take at the same bandwidth.
    pub weights_s: f64,
    /// The batch's tokens per second the two transfers together allow.
    pub tokens_per_s: f64,
}

impl KvBound {
    /// The bound of a decode pass of `batch` tokens that copies
    /// `weight_bytes` and `kv.h2d_bytes` host to device at `h2d_bytes_per_s`.
    pub fn new(batch: usize, kv: &KvTransfer, weight_bytes: f64, h2d_bytes_per_s: f64) -> Self {
        let rate = h2d_bytes_per_s.max(1.0);
        let (kv_s, weights_s) = (kv.h2d_bytes as f64 / rate, weight_bytes / rate);
        let total = kv_s + weights_s;
        KvBound {
            kv_s,
            weights_s,
            tokens_per_s: if total > 0.0 {
                batch as f64 / total
            } else {
                f64::INFINITY
            },
        }
    }
}

/// One row of the `kv-offload` table.
fn kv_row(b: usize, kv: &KvTransfer, x: &KvBound) -> String {
    format!(
        "{b:>5}  {:>9.2}  {:>9.2}  {:>10.4}  {:>15.4}  {:>19.2}",
        kv.h2d_bytes as f64 / 1e6,
        kv.d2h_bytes as f64 / 1e6,
        x.kv_s,
        x.weights_s,
        x.tokens_per_s
    )
}

/// Prints the `kv-offload` table (with `--kv-offload`).
fn print_kv_rows(rows: &[String]) {
    println!("kv-offload (per decode pass):");
    println!("batch  kv_h2d_MB  kv_d2h_MB  kv_bound_s  weights_bound_s  bound_with_kv_tok/s");
    if rows.is_empty() {
        println!("(none: the host backend keeps its KV cache in RAM)");
    }
    rows.iter().for_each(|r| println!("{r}"));
}

/// The ceilings of this run: the bf16 GEMM peak (FLOP/s) and the pinned H2D
/// bandwidth (bytes/s) of `device`; `None` each on the host backend or where
/// it could not be measured (said on stderr). Measured before the model
/// loads, their buffers freed after, so that they add nothing to the device
/// memory the model's run holds.
fn measure_ceilings(device: layer_streamer::Device) -> (Option<f64>, Option<f64>) {
    let layer_streamer::Device::Cuda(ordinal) = device else {
        return (None, None);
    };
    let ctx = match layer_streamer::cuda::Context::new(ordinal) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("the ceilings were not measured: {e}");
            return (None, None);
        }
    };
    let peak = layer_streamer::bench::gemm_peak_tflops(&ctx, PEAK_GEMM_N, 10)
        .map(|t| t * 1e12)
        .map_err(|e| eprintln!("the GEMM peak was not measured: {e}"))
        .ok();
    let h2d = layer_streamer::bench::h2d_bandwidth(&ctx, H2D_PROBE_BYTES, 5)
        .map(|r| r.pinned_gbps * 1e9)
        .map_err(|e| eprintln!("the pinned H2D bandwidth was not measured: {e}"))
        .ok();
    (peak, h2d)
}

fn fmt_opt(v: Option<f64>, digits: usize) -> String {
    v.map_or("-".to_string(), |x| format!("{x:.digits$}"))
}

/// Prints what is measured and the ceilings measured in this run: the bf16
/// GEMM peak (FLOP/s) and the pinned H2D bandwidth (B/s).
fn header(
    a: &Args,
    index: &layer_streamer::ModelIndex,
    streamer: &layer_streamer::LayerStreamer,
    (peak, pinned_h2d): (Option<f64>, Option<f64>),
) {
    println!(
        "{}: {} layers, {:.2} GB per pass, device {}, precision {}{}",
        a.model.display(),
        index.num_layers(),
        index.total_layer_bytes() as f64 / 1e9,
        a.stream.opts.config.device,
        a.stream.precision,
        if a.stream.kv_offload {
            ", KV cache in host RAM (--kv-offload)"
        } else {
            ""
        }
    );
    let mem = streamer.memory().device_bytes();
    let at_use = streamer.config().dequant.keeps_blocks();
    if let Ok(m) = layer_streamer::llm::StaticsMemory::for_model(index, at_use) {
        println!(
            "device memory: {:.2} GB of slots and caches, {:.2} GB for the embedding, output and \
             scratches ({:.2} GB output, {:.2} GB output scratch, {:.2} GB weight scratch); \
             {:.2} GB of embedding in host memory",
            mem as f64 / 1e9,
            m.device_bytes() as f64 / 1e9,
            m.output_device as f64 / 1e9,
            m.output_scratch as f64 / 1e9,
            m.weight_scratch as f64 / 1e9,
            m.embedding_host as f64 / 1e9
        );
    }
    println!(
        "ceilings: bf16 GEMM peak {} TFLOP/s (cuBLAS, {PEAK_GEMM_N}³), pinned H2D {} GB/s",
        fmt_opt(peak.map(|p| p / 1e12), 1),
        fmt_opt(pinned_h2d.map(|b| b / 1e9), 2)
    );
}

/// The `split` table's row of batch `b` decoding at `decode` tokens/s: the
/// CPU side of the last (decode) pass and the planner's bound (see the
/// module docs); `peak` in FLOP/s.
fn split_row(
    streamer: &LayerStreamer,
    cfg: &ModelConfig,
    (b, decode): (usize, f64),
    h2d_bps: f64,
    (peak, decode_layer_s): (Option<f64>, Option<f64>),
) -> Result<String> {
    let st = streamer.last_pass_stats();
    let model = streamer.model();
    // The weights the model commands split.
    let only: Vec<String> = LlamaModel::SPLIT_WEIGHTS.map(String::from).to_vec();
    let mut types: Vec<QuantType> = (model.layers().iter())
        .flat_map(|l| divided_tensors(l, Some(&only)))
        .flatten()
        .collect();
    types.sort_by_key(|t| t.ggml_type_id());
    types.dedup();
    let exclude = streamer.config().cpu_affinity.clone().unwrap_or_default();
    let pool = CpuPool::new(&CpuPoolOptions {
        exclude,
        ..CpuPoolOptions::default()
    })?;
    let rates = calibrate(&pool, &types, b, 64 << 20, 3)?;
    let layer_flops = cfg.projection_flops_per_token() / cfg.layers.max(1) as f64 * b as f64;
    let gpu_s = match decode_layer_s {
        Some(t) if b == 1 => t,
        _ => peak.map_or(0.0, |p| layer_flops / p.max(1.0)),
    };
    let mem = streamer.memory();
    let inputs = SplitInputs {
        layers: layer_costs(model, &rates, Some(&only), |_| gpu_s)?,
        pcie_bps: h2d_bps,
        join_s: 0.0,
        vram_budget: mem.gpu_slot_size * mem.gpu_slots as u64 + mem.gpu_cache_bytes,
        slots: mem.gpu_slots,
    };
    let plan = plan_pass(&inputs, rates.read_bps)?;
    let share = plan.shares.iter().copied().fold(0.0, f64::max);
    eprintln!("batch {b}, last decode pass:\n{st}");
    let s = |d: std::time::Duration| d.as_secs_f64();
    Ok(format!(
        "{b:>5}  {decode:>12.2}  {:>9.3}  {:>10.6}  {:>13.6}  {:>10.6}  {:>13.6}  {share:>10.3}  \
         {:>13}  {:>16.2}",
        st.cpu_share,
        s(st.cpu.busy),
        s(st.cpu.stalled),
        s(st.compute.busy),
        s(st.compute.stalled),
        plan.resident,
        b as f64 / plan.pass_s.max(1e-9),
    ))
}

/// `b` prompts of `len` deterministic ids below `vocab`, different per sequence.
fn synthetic_prompts(b: usize, len: usize, vocab: u32) -> Vec<Vec<u32>> {
    (0..b)
        .map(|s| {
            (0..len)
                .map(|i| ((i * 7919 + s * 104729 + 13) as u32) % vocab)
                .collect()
        })
        .collect()
}

/// One row of the bounds table.
fn bounds_row(
    b: usize,
    decode: f64,
    bounds: &Bounds,
    at: &str,
    prefill_tflops: f64,
    peak: Option<f64>,
) -> String {
    format!(
        "{b:>5}  {decode:>12.2}  {:>16.2}  {:>19}  {at:>8}  {:>7.1}%  {prefill_tflops:>21.2}  {:>17}  {:>7}",
        bounds.transfer,
        fmt_opt(bounds.compute, 2),
        100.0 * bounds.share(decode),
        fmt_opt(peak.map(|p| p / 1e12), 1),
        peak.map_or("-".to_string(), |p| format!(
            "{:.1}%",
            100.0 * prefill_tflops * 1e12 / p
        )),
    )
}

/// Runs `bench-generate`.
/// What every batch's measurement shares.
struct Measure<'a> {
    a: &'a Args,
    cfg: ModelConfig,
    params: GenerateParams,
    /// Two new tokens: the unmeasured first run of each shape.
    short: GenerateParams,
    /// Model FLOPs of one decode token.
    decode_flops: f64,
    peak: Option<f64>,
    pinned_h2d: Option<f64>,
}

/// The rows of the tables printed after the main one.
#[derive(Default)]
struct Tables {
    bounds: Vec<String>,
    kv: Vec<String>,
    split: Vec<String>,
}

impl Measure<'_> {
    /// Prefills and decodes batch `b` (after one unmeasured run of the
    /// shape), prints its row and adds its rows to `t`.
    fn batch(
        &self,
        model: &mut LlamaModel,
        streamer: &mut LayerStreamer,
        b: usize,
        t: &mut Tables,
    ) -> Result<()> {
        let (a, cfg) = (self.a, &self.cfg);
        let prompts = synthetic_prompts(b, a.prompt_len, cfg.vocab as u32);
        // A first pass of a new shape pays for cuBLAS choosing its kernels:
        // run the same prefill once before measuring the steady state.
        generate(model, streamer, &prompts, &self.short, |_, _| Ok(()))?;
        let g = generate(model, streamer, &prompts, &self.params, |_, _| Ok(()))?;
        // The bytes the last (decode) pass copied to the device, at the
        // pinned H2D bandwidth (or, without one, the rate that pass saw).
        let st = streamer.last_pass_stats();
        let pass_rate = st.h2d.bytes as f64 / st.h2d.busy.as_secs_f64().max(1e-9);
        let h2d_rate = self.pinned_h2d.unwrap_or(pass_rate).max(1.0);
        let bytes = st.h2d.bytes as f64;
        let bounds = Bounds::new(b, bytes, h2d_rate, self.decode_flops, self.peak);
        let prefill_s = g.prefill.as_secs_f64().max(1e-9);
        let decode = g.decode_tokens_per_s();
        println!(
            "{b:>5}  {:>6}  {:>9.3}  {:>13.1}  {:>15.1}  {:>12.2}  {:>11.2}  {:>12.3}  {:>11.2}  {}",
            a.prompt_len,
            g.prefill.as_secs_f64(),
            g.prompt_tokens as f64 / prefill_s,
            cfg.projection_flops_per_token() * g.prompt_tokens as f64 / prefill_s / 1e12,
            decode,
            g.decode_gb_per_s(),
            bytes / h2d_rate,
            bounds.transfer,
            fmt_opt(model.last_gemm_tflops(), 1)
        );
        if streamer.cpu_share() > 0.0 {
            let layer_s = model.decode_layer_phases().map(|p| p.total_s());
            match split_row(streamer, cfg, (b, decode), h2d_rate, (self.peak, layer_s)) {
                Ok(row) => t.split.push(row),
                Err(e) => eprintln!("the planner's bound was not computed: {e}"),
            }
        }
        let (at, _) = bounds.limit();
        let prefill_tflops = prefill_flops(cfg, b, a.prompt_len) / prefill_s / 1e12;
        t.bounds.push(bounds_row(
            b,
            decode,
            &bounds,
            at,
            prefill_tflops,
            self.peak,
        ));
        if let Some(kv) = model.last_kv_transfer() {
            let x = KvBound::new(b, &kv, bytes, h2d_rate);
            t.kv.push(kv_row(b, &kv, &x));
        }
        Ok(())
    }
}

/// Prints the tables after the main one.
fn print_tables(t: &Tables, kv_offload: bool) {
    println!("bounds:");
    println!(
        "batch  decode_tok/s  xfer_bound_tok/s  compute_bound_tok/s     bound  of_bound  prefill_model_TFLOP/s  gemm_peak_TFLOP/s  of_peak"
    );
    t.bounds.iter().for_each(|r| println!("{r}"));
    if kv_offload {
        print_kv_rows(&t.kv);
    }
    if !t.split.is_empty() {
        println!("split:");
        println!(
            "batch  decode_tok/s  cpu_share  cpu_busy_s  cpu_stalled_s  dev_busy_s  \
             dev_stalled_s  plan_share  plan_resident  plan_bound_tok/s"
        );
        t.split.iter().for_each(|r| println!("{r}"));
    }
}

/// Where layer 0's time went in the pass with the most tokens: its GEMMs
/// (with their rate in projection FLOPs), attention, and norms with SwiGLU.
pub fn phases_line(p: &LayerPhases, cfg: &ModelConfig) -> String {
    let share = |s: f64| 100.0 * s / p.total_s().max(1e-12);
    let flops = cfg.projection_flops_per_token() / cfg.layers as f64 * p.tokens as f64;
    format!(
        "layer 0 of a {}-token pass: {:.3} ms; GEMMs {:.3} ms ({:.1} %, {:.1} TFLOP/s), attention \
         {:.3} ms ({:.1} %), norms and SwiGLU {:.3} ms ({:.1} %)",
        p.tokens,
        p.total_s() * 1e3,
        p.gemm_s * 1e3,
        share(p.gemm_s),
        flops / p.gemm_s.max(1e-12) / 1e12,
        p.attention_s * 1e3,
        share(p.attention_s),
        p.other_s * 1e3,
        share(p.other_s)
    )
}

/// Most tokens a pass takes by default: the prefill of 32 prompts of 512
/// tokens in one pass, which keeps a 7B model's pass compute-bound on an
/// H200 (its workspace is about 2.7 GB).
pub const DEFAULT_PASS_TOKENS: usize = 16384;

/// Tokens per pass: `max_tokens` when given, else the prompts of the
/// largest batch (`max_b × prompt_len`) up to [`DEFAULT_PASS_TOKENS`]; never
/// fewer than `max_b` (a decode pass holds a token of every sequence).
pub fn pass_tokens(max_tokens: Option<usize>, max_b: usize, prompt_len: usize) -> usize {
    let auto = || (max_b * prompt_len).min(DEFAULT_PASS_TOKENS);
    max_tokens.unwrap_or_else(auto).max(max_b).max(1)
}

/// Runs `bench-generate`: each batch size's prefill and decode, then the tables.
pub fn run(a: Args) -> Result<()> {
    let batches = parse_list(&a.batch, "batch size")?;
    let max_b = *batches.iter().max().unwrap_or(&1);
    let opts = ModelOptions {
        max_batch: max_b,
        max_len: a.prompt_len + a.new_tokens,
        max_tokens: pass_tokens(a.max_tokens, max_b, a.prompt_len),
        precision: a.stream.precision,
        kv_offload: a.stream.kv_offload,
    };
    let (peak, pinned_h2d) = measure_ceilings(a.stream.opts.config.device);
    let (index, mut streamer, mut model) = open_model(&a.model, &a.stream, opts)?;
    let vocab = model.config().vocab as u32;
    let params = GenerateParams {
        max_new_tokens: a.new_tokens,
        sampling: Default::default(),
        seed: 0,
        stop_ids: Vec::new(),
    };
    header(&a, &index, &streamer, (peak, pinned_h2d));
    let notes = [streamer.split_rows_note(), model.split_note()];
    notes
        .into_iter()
        .flatten()
        .for_each(|n| println!("split: {n}"));
    let short = GenerateParams {
        max_new_tokens: 2,
        ..params.clone()
    };
    // Warm-up: fills the caches so the measured passes stream from them.
    let warm: Vec<u32> = (0..8).map(|i| (i * 31) % vocab).collect();
    generate(&mut model, &mut streamer, &[warm], &short, |_, _| Ok(()))?;
    println!(
        "batch  prompt  prefill_s  prefill_tok/s  prefill_TFLOP/s  decode_tok/s  decode_GB/s  xfer_bound_s  bound_tok/s  layer_TFLOP/s"
    );
    let cfg = model.config().clone();
    let m = Measure {
        a: &a,
        // Decode tokens attend to the prompt plus, on average, half the new ones.
        decode_flops: token_flops(&cfg, a.prompt_len as f64 + a.new_tokens as f64 / 2.0),
        cfg,
        params,
        short,
        peak,
        pinned_h2d,
    };
    let mut tables = Tables::default();
    for &b in &batches {
        m.batch(&mut model, &mut streamer, b, &mut tables)?;
    }
    print_tables(&tables, a.stream.kv_offload);
    if let Some(p) = model.last_layer_phases() {
        println!("{}", phases_line(&p, model.config()));
    }
    if let Some(p) = model.decode_layer_phases() {
        // One token reads each weight once: its products run at the rate
        // the layer's stored bytes are read.
        let bytes = index.layers().first().map_or(0, |l| l.data_bytes) as f64;
        let rate = bytes / p.gemm_s.max(1e-12) / 1e9;
        let line = phases_line(&p, model.config());
        println!("{line}; the products read its weights at {rate:.0} GB/s");
    }
    if let Some((free, total)) = streamer.context().and_then(|c| c.mem_info().ok()) {
        // What the model and its streamer hold (with the CUDA context; the
        // ceilings' buffers were freed before the model loaded), as
        // nvidia-smi counts it.
        println!(
            "device memory in use after the run: {} MiB of {} MiB (every process, CUDA context included)",
            (total - free) >> 20,
            total >> 20
        );
    }
    println!("last pass: {}", streamer.last_pass_stats());
    Ok(())
}

#[cfg(test)]
#[path = "bench_generate_tests.rs"]
mod tests;
