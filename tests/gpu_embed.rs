//! The untied embedding on CUDA, looked up by the device in mapped host
//! memory, against the host gather that `LS_EMBED_HOST_GATHER=1` forces:
//! the logits of a mixed batch (token ids at the first and last rows of the
//! vocabulary included) and of a decode step after it are bit-identical,
//! for bf16 and f16 checkpoints and for GGUF files whose embedding is Q6_K
//! or Q8_0 blocks. An f32 embedding of a bf16 model keeps the host gather.
//! Skips without a driver unless `LS_REQUIRE_GPU=1`.

mod common;

use std::sync::Mutex;

use layer_streamer::llm::layout::static_names;
use layer_streamer::llm::{
    EmbeddingLookup, LlamaModel, ModelConfig, ModelOptions, Precision, HOST_GATHER_ENV,
};
use layer_streamer::quant::QuantType;
use layer_streamer::synth::{write_gguf, Arch, Shape, SynthGgufSpec};
use layer_streamer::{DType, Device, LayerStreamer, ModelIndex};
use rand::Rng;

/// Held while the environment variable is set or a model reads it, so that
/// the tests of this binary do not see each other's setting.
static ENV: Mutex<()> = Mutex::new(());

/// A model loaded with the host gather forced (`host`) or not.
fn load(s: &LayerStreamer, opts: ModelOptions, host: bool) -> LlamaModel {
    let _guard = ENV.lock().unwrap_or_else(|p| p.into_inner());
    if host {
        std::env::set_var(HOST_GATHER_ENV, "1");
    }
    let m = LlamaModel::load(s, opts);
    std::env::remove_var(HOST_GATHER_ENV);
    m.unwrap()
}

/// The stored type of the model's embedding.
fn embedding_type(index: &ModelIndex) -> QuantType {
    let cfg = ModelConfig::from_model(index).unwrap();
    let (embed, _, head) = static_names(index, &cfg);
    assert!(head.is_some(), "the model is untied");
    let t = index.tensor(&embed).unwrap();
    t.quant
        .or_else(|| QuantType::from_dtype(t.dtype))
        .unwrap_or_else(|| panic!("{embed} is {}", t.dtype))
}

/// Three prompts of mixed lengths, with ids 0 and `vocab - 1` among them.
fn prompts(rng: &mut impl Rng, vocab: u32) -> Vec<Vec<u32>> {
    let mut p: Vec<Vec<u32>> = [rng.gen_range(2..12), 1, rng.gen_range(3..9)]
        .iter()
        .map(|&n| (0..n).map(|_| rng.gen_range(0..vocab)).collect())
        .collect();
    let i = rng.gen_range(0..p[0].len());
    p[0][i] = 0;
    let i = rng.gen_range(0..p[2].len());
    p[2][i] = vocab - 1;
    p[1][0] = if rng.gen_bool(0.5) { 0 } else { vocab - 1 };
    p
}

/// Runs a prefill of mixed lengths and a decode step on the model at `path`
/// with the host gather and with the lookup chosen at load, which must be
/// `want`; every logit must agree to the bit.
fn same_logits(path: &std::path::Path, want: EmbeddingLookup, rng: &mut impl Rng, what: &str) {
    let index = ModelIndex::open(path).unwrap();
    let ty = embedding_type(&index);
    let mut s = LayerStreamer::builder(&index)
        .device(Device::Cuda(0))
        .dtype(LlamaModel::cuda_dtype(&index))
        .build()
        .unwrap();
    let precision = if rng.gen_bool(0.5) {
        Precision::Fast
    } else {
        Precision::Exact
    };
    let opts = ModelOptions {
        max_batch: 3,
        max_len: 32,
        max_tokens: 32,
        precision,
        kv_offload: false,
    };
    let mut host = load(&s, opts, true);
    let mut chosen = load(&s, opts, false);
    assert_eq!(host.embedding_lookup(), Some(EmbeddingLookup::HostGather));
    assert_eq!(
        chosen.embedding_lookup(),
        Some(want),
        "{what}: embedding stored as {ty} (a mapped lookup needs RLIMIT_MEMLOCK room for it)"
    );
    let vocab = host.config().vocab as u32;
    let first = prompts(rng, vocab);
    let step: Vec<Vec<u32>> = (0..3)
        .map(|i| vec![[0, vocab - 1, rng.gen_range(0..vocab)][i]])
        .collect();
    for (pass, batch) in [first, step].iter().enumerate() {
        let inputs: Vec<&[u32]> = batch.iter().map(Vec::as_slice).collect();
        let a = host.forward(&mut s, &inputs).unwrap();
        let b = chosen.forward(&mut s, &inputs).unwrap();
        assert_eq!(a.len(), b.len());
        for (r, (x, y)) in a.iter().zip(&b).enumerate() {
            assert_eq!(x.len(), y.len());
            assert!(x.iter().all(|v| v.is_finite()), "{what}: row {r}");
            let diff = x
                .iter()
                .zip(y)
                .position(|(p, q)| p.to_bits() != q.to_bits());
            assert!(
                diff.is_none(),
                "{what} ({ty}, {precision}) pass {pass} row {r}: logit {diff:?} is {} with the \
                 host gather, {} with the {want:?} lookup",
                x[diff.unwrap()],
                y[diff.unwrap()]
            );
        }
        eprintln!(
            "{what}: {ty} embedding, {precision}, pass {pass}: {} rows bit-identical",
            a.len()
        );
    }
}

#[test]
fn mapped_embedding_of_a_float_checkpoint_gives_the_host_gather_logits() {
    let test = "mapped_embedding_of_a_float_checkpoint_gives_the_host_gather_logits";
    let Some(_ctx) = common::gpu(test) else {
        return;
    };
    let mut rng = common::rng(test);
    for (dtype, want) in [
        (DType::BF16, EmbeddingLookup::Mapped),
        (DType::F16, EmbeddingLookup::Mapped),
        // Computed in bf16: the device has no kernel that rounds f32 rows.
        (DType::F32, EmbeddingLookup::HostGather),
    ] {
        let dir = common::tempdir();
        let arch = if rng.gen_bool(0.5) {
            Arch::Qwen2
        } else {
            Arch::Llama
        };
        let seed = rng.gen();
        common::models::synth(dir.path(), arch, "tiny", dtype, false, u64::MAX, seed);
        same_logits(dir.path(), want, &mut rng, &format!("{dtype} {arch:?}"));
    }
}

#[test]
fn mapped_embedding_of_ggml_blocks_gives_the_host_gather_logits() {
    let test = "mapped_embedding_of_ggml_blocks_gives_the_host_gather_logits";
    let Some(_ctx) = common::gpu(test) else {
        return;
    };
    let mut rng = common::rng(test);
    let dir = common::tempdir();
    // Q4_K layers keep a Q6_K embedding; Q8_0 layers a Q8_0 one.
    for (ty, embedded) in [
        (QuantType::Q4_K, QuantType::Q6_K),
        (QuantType::Q8_0, QuantType::Q8_0),
    ] {
        let vocab = 384 + 32 * rng.gen_range(0..8);
        let spec = SynthGgufSpec {
            arch: Arch::Llama,
            shape: Shape {
                hidden: 256,
                intermediate: 512,
                layers: 2,
                heads: 4,
                kv_heads: 2,
                vocab,
            },
            ty,
            tie: false,
            seed: rng.gen(),
        };
        let path = dir.path().join(format!("{ty}.gguf"));
        write_gguf(&path, &spec, &mut |_, _| {}).unwrap();
        let index = ModelIndex::open(&path).unwrap();
        assert_eq!(embedding_type(&index), embedded);
        same_logits(
            &path,
            EmbeddingLookup::Mapped,
            &mut rng,
            &format!("{ty} GGUF"),
        );
    }
}
