//! The forward pass with a CPU/GPU row split on the host backend: the CPU
//! pool computes its rows of every matrix, the host math the streamed rows,
//! and the logits equal those of the unsplit pass up to the order of f32
//! sums, for Qwen2 (q/k/v biases) and Llama with GQA, batches of mixed
//! lengths, the real SmolLM2 GGUF (Q4_1 blocks on both sides) and Q4_K, Q5_K
//! and Q6_K models (whose CPU rows may multiply 16-bit activations).

mod common;

use common::models::{small_gguf, synth};
use layer_streamer::llm::reference::{check, Reference};
use layer_streamer::llm::{LlamaModel, ModelOptions};
use layer_streamer::quant::QuantType;
use layer_streamer::synth::Arch;
use layer_streamer::{CpuShare, DType, Device, LayerStreamer, ModelIndex, StreamerConfig};
use rand::Rng;

/// Logits of the split and unsplit passes differ only in the order of f32
/// sums (both sides read the same stored weights): a relative L2 distance
/// far below the 2e-2 the model is held to against transformers (measured:
/// about 5e-7 on the tiny models; over SmolLM2's 30 layers mostly below
/// 1.5e-5, with a rare prompt above 1e-4). Activations rounded to 16 bits
/// for the CPU's K-quant rows (AVX-512 VNNI) move each by at most 2^-16 of
/// its block's largest.
const SAME_SUMS_REL_L2: f64 = 1e-3;

fn streamer(index: &ModelIndex, share: f64, dtype: Option<DType>) -> LayerStreamer {
    let cfg = StreamerConfig {
        device: Device::Host,
        dtype,
        cpu_share: CpuShare::fraction(share).unwrap(),
        reader_threads: 1,
        ..StreamerConfig::default()
    };
    LayerStreamer::builder(index).config(cfg).build().unwrap()
}

fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let d: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let n: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (d / n.max(f64::MIN_POSITIVE)).sqrt()
}

/// The logits of a prefill of `prompts` (mixed lengths, in one pass) and
/// of one decode step after it, at CPU share `share`.
fn logits(
    index: &ModelIndex,
    share: f64,
    dtype: Option<DType>,
    prompts: &[Vec<u32>],
    next: &[u32],
) -> Vec<Vec<f32>> {
    let mut s = streamer(index, share, dtype);
    let opts = ModelOptions {
        max_batch: prompts.len(),
        max_len: 32,
        max_tokens: 64,
        ..ModelOptions::default()
    };
    let mut model = LlamaModel::load(&s, opts).unwrap();
    let inputs: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
    let mut out = model.forward(&mut s, &inputs).unwrap();
    let st = s.last_pass_stats();
    assert_eq!(st.cpu_share, share);
    if share > 0.0 {
        assert!(st.cpu.bytes > 0 && !st.cpu.busy.is_zero(), "{st}");
    }
    let steps: Vec<[u32; 1]> = next.iter().map(|&t| [t]).collect();
    let inputs: Vec<&[u32]> = steps.iter().map(|s| &s[..]).collect();
    out.extend(model.forward(&mut s, &inputs).unwrap());
    out
}

fn same_logits_at_every_share(index: &ModelIndex, dtype: Option<DType>, vocab: u32, seed: &str) {
    let mut rng = common::rng(seed);
    let prompts: Vec<Vec<u32>> = [rng.gen_range(4..9), 1, rng.gen_range(2..5)]
        .iter()
        .map(|&n| (0..n).map(|_| rng.gen_range(0..vocab)).collect())
        .collect();
    let next: Vec<u32> = (0..prompts.len())
        .map(|_| rng.gen_range(0..vocab))
        .collect();
    let whole = logits(index, 0.0, dtype, &prompts, &next);
    for share in [0.3, 1.0] {
        let split = logits(index, share, dtype, &prompts, &next);
        for (i, (a, b)) in split.iter().zip(&whole).enumerate() {
            let d = rel_l2(a, b);
            println!("share {share}, row {i}: rel L2 {d:.3e}");
            assert!(
                d < SAME_SUMS_REL_L2,
                "share {share}, row {i}: rel L2 {d:.3e}"
            );
        }
    }
}

#[test]
fn qwen2_with_biases_gives_the_same_logits_at_shares_0_0_3_and_1() {
    let mut rng = common::rng("qwen2_split_seed");
    let dir = common::tempdir();
    let tie = rng.gen();
    synth(
        dir.path(),
        Arch::Qwen2,
        "tiny",
        DType::BF16,
        tie,
        4_000_000_000,
        rng.gen(),
    );
    let index = ModelIndex::open(dir.path()).unwrap();
    same_logits_at_every_share(&index, Some(DType::BF16), 1024, "qwen2_split");
}

#[test]
fn llama_gqa_in_f32_gives_the_same_logits_at_shares_0_0_3_and_1() {
    let mut rng = common::rng("llama_split_seed");
    let dir = common::tempdir();
    let tie = rng.gen();
    synth(
        dir.path(),
        Arch::Llama,
        "tiny",
        DType::F32,
        tie,
        4_000_000_000,
        rng.gen(),
    );
    let index = ModelIndex::open(dir.path()).unwrap();
    same_logits_at_every_share(&index, None, 1024, "llama_split");
}

#[test]
fn k_quant_models_give_the_same_logits_at_shares_0_0_3_and_1() {
    let mut rng = common::rng("k_quant_split_seed");
    let dir = common::tempdir();
    for ty in [QuantType::Q4_K, QuantType::Q5_K, QuantType::Q6_K] {
        let index = small_gguf(dir.path(), ty, (2, 512, 1024), &mut rng);
        same_logits_at_every_share(&index, None, 1024, &format!("k_quant_split_{ty}"));
    }
}

#[test]
fn smollm2_gguf_split_matches_unsplit_and_transformers() {
    let gguf = common::assets::test_env("smollm2");
    let index = ModelIndex::open(&gguf).unwrap();
    same_logits_at_every_share(&index, None, 49152, "smollm2_split");
    let reference = Reference::load(&common::reference::dir("smollm2-q4_1")).unwrap();
    let mut s = streamer(&index, 0.5, None);
    let len = reference.prompt_ids.len() + reference.greedy_ids.len() + 1;
    let opts = ModelOptions {
        max_batch: 1,
        max_len: len.max(64),
        max_tokens: len.max(64),
        ..ModelOptions::default()
    };
    let mut model = LlamaModel::load(&s, opts).unwrap();
    let rep = check(&mut model, &mut s, &reference, 1).unwrap();
    assert!(rep.passed(2e-2, 0.95), "{:?}", rep.rel_l2);
}
