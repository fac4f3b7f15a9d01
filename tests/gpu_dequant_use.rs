//! Quantized weights dequantized at use on CUDA (`dequant use`, the model
//! commands' choice): the slots and the GPU cache hold only the stored bytes
//! and each GEMM's weight is dequantized into one shared scratch just before
//! it, a chunk of rows at a time (a random chunk here). The logits equal those of the weights dequantized in the slots
//! (`dequant slot`) for ggml block types and FP8, tied and untied, with and
//! without layers resident in the GPU cache, in both precisions; the slots
//! and the GPU cache take less. Every pass here has more than 8 tokens, so
//! that the weights at use go through the same GEMMs (passes of fewer take
//! the fused GEMV, checked in tests/gpu_gemv.rs). Skips without a driver
//! unless `LS_REQUIRE_GPU=1`.

mod common;

use common::models::{small_fp8, small_gguf};
use layer_streamer::llm::{LlamaModel, ModelOptions, Precision};
use layer_streamer::{Budget, DType, Dequant, Device, LayerStreamer, ModelIndex, StreamerConfig};
use rand::Rng;

/// The logits of `prompts` through a CUDA streamer with `dequant`, and the
/// device bytes of its slots and cache; `chunk`: the bytes of the scratch
/// weights are dequantized into at use.
fn logits(
    index: &ModelIndex,
    (dequant, chunk): (Dequant, Option<usize>),
    gpu_cache: Budget,
    opts: ModelOptions,
    prompts: &[&[u32]],
) -> (Vec<Vec<f32>>, u64) {
    let cfg = StreamerConfig {
        device: Device::Cuda(0),
        dequant,
        gpu_cache,
        ..StreamerConfig::default()
    };
    let cfg = LlamaModel::streamer_config(index, cfg);
    assert_eq!(cfg.dtype, Some(DType::F16));
    let mut s = LayerStreamer::builder(index).config(cfg).build().unwrap();
    let mut m = LlamaModel::load(&s, opts).unwrap();
    if let Some(bytes) = chunk {
        m.set_weight_chunk_bytes(bytes).unwrap();
    }
    let mut out = Vec::new();
    for _ in 0..2 {
        m.reset();
        out = m.forward(&mut s, prompts).unwrap();
    }
    assert_eq!(s.last_pass_stats().layer_bytes, index.total_layer_bytes());
    // Layer 0's phases were timed in the pass (every pass here has the
    // prompts' tokens).
    let p = m.last_layer_phases().expect("layer 0's phases on CUDA");
    let tokens: usize = prompts.iter().map(|p| p.len()).sum();
    assert_eq!(p.tokens, tokens);
    assert!(
        p.gemm_s > 0.0 && p.attention_s > 0.0 && p.other_s > 0.0,
        "{p:?}"
    );
    (out, s.memory().device_bytes())
}

#[test]
fn gpu_dequantized_at_use_equals_dequantized_in_the_slots() {
    let test = "gpu_dequantized_at_use_equals_dequantized_in_the_slots";
    let Some(_ctx) = common::gpu(test) else {
        return;
    };
    let mut rng = common::rng(test);
    let dir = common::tempdir();
    let mut models = Vec::new();
    for ty in common::models::block_types(&mut rng, 4) {
        let dims = (3, 512, 384);
        models.push((ty.to_string(), small_gguf(dir.path(), ty, dims, &mut rng)));
    }
    models.push(("fp8".into(), small_fp8(dir.path(), &mut rng, 3)));
    for (name, index) in &models {
        let vocab = index.config().and_then(|c| c["vocab_size"].as_u64());
        let vocab = vocab.unwrap_or(384) as u32;
        // 3 prompts of 3 or more tokens: one pass of more than 8.
        let prompts: Vec<Vec<u32>> = (0..3)
            .map(|_| {
                (0..rng.gen_range(3..12))
                    .map(|_| rng.gen_range(0..vocab))
                    .collect()
            })
            .collect();
        let inputs: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
        let precision = [Precision::Fast, Precision::Exact][rng.gen_range(0..2)];
        let opts = ModelOptions {
            max_batch: 3,
            max_len: 32,
            max_tokens: 48,
            precision,
            kv_offload: false,
        };
        // Resident layers hold what the slots hold: stored bytes under `use`.
        let cache = [Budget::None, Budget::Auto][rng.gen_range(0..2)];
        // At use, ggml blocks are dequantized a chunk of rows at a time: a
        // random chunk of 1 to 40 rows of 512 (FP8 weights stay whole).
        let chunk = rng.gen_range(1..41) * 512 * 2;
        let (slot, slot_bytes) = logits(index, (Dequant::Slot, None), cache, opts, &inputs);
        let (used, use_bytes) = logits(index, (Dequant::Auto, Some(chunk)), cache, opts, &inputs);
        assert!(
            use_bytes < slot_bytes,
            "{name}: slots {use_bytes} vs {slot_bytes}"
        );
        // The same f16 weights; only a different reduction order (narrower
        // GEMMs, one per chunk of rows) may move a logit: by a few f32 ulps
        // in exact precision, and in fast precision, where gate and up come
        // out of their GEMMs in 16 bits, by a 16-bit output rounded the
        // other way (a 2^-11 step, carried through the layers). A column
        // in the wrong place moves it by the whole logit.
        let tol = match precision {
            Precision::Exact => 1e-5,
            Precision::Fast => 2e-3,
        };
        let what = format!("{test}: {name} {precision} cache {cache:?} chunk {chunk} bytes");
        let sides = ("dequantized in the slots", "at use");
        common::reference::assert_rows_close(&slot, &used, tol, &what, sides);
    }
}
