//! A real GGUF model on CUDA: SmolLM2-135M-Instruct as a Q4_1 file
//! (`scripts/test-env smollm2`), dequantized on the device into f16
//! (`LlamaModel::cuda_dtype`) in the slots and at use, against what Hugging Face transformers
//! computes from the same file (`tests/fixtures/reference/smollm2-q4_1`): the
//! logits of the prompt and of 16 teacher-forced steps within 2e-2 relative
//! L2 with 95 % argmax agreement in both precisions, and the chat answer.
//! Skips without a driver unless `LS_REQUIRE_GPU=1`.

mod common;

use layer_streamer::llm::reference::{check, Reference};
use layer_streamer::llm::{
    generate, GenerateParams, LlamaModel, ModelOptions, Precision, Tokenizer,
};
use layer_streamer::{DType, Dequant, Device, LayerStreamer, ModelIndex, StreamerConfig};

#[test]
fn gpu_smollm2_matches_transformers_in_both_precisions() {
    let test = "gpu_smollm2_matches_transformers_in_both_precisions";
    let Some(_ctx) = common::gpu(test) else {
        return;
    };
    let gguf = common::assets::test_env("smollm2");
    let dir = common::reference::dir("smollm2-q4_1");
    let reference = Reference::load(&dir).unwrap();
    let index = ModelIndex::open(&gguf).unwrap();
    let dtype = LlamaModel::cuda_dtype(&index);
    assert_eq!(dtype, DType::F16, "a Q4_1 model computes in f16 on CUDA");
    let len = reference.prompt_ids.len() + reference.greedy_ids.len() + 1;
    // Dequantized in the slots, and at use (the model commands' choice).
    for (dequant, precision) in [
        (Dequant::Slot, Precision::Exact),
        (Dequant::Slot, Precision::Fast),
        (Dequant::Use, Precision::Exact),
        (Dequant::Use, Precision::Fast),
    ] {
        let cfg = StreamerConfig {
            device: Device::Cuda(0),
            dequant,
            ..StreamerConfig::default()
        };
        let cfg = LlamaModel::streamer_config(&index, cfg);
        let mut s = LayerStreamer::builder(&index).config(cfg).build().unwrap();
        let opts = ModelOptions {
            max_batch: 1,
            max_len: len.max(64),
            max_tokens: len.max(64),
            precision,
            kv_offload: false,
        };
        let mut model = LlamaModel::load(&s, opts).unwrap();
        let rep = check(&mut model, &mut s, &reference, 1).unwrap();
        eprintln!(
            "{test} {dequant:?} {precision}: max rel_l2 {:.3e}, argmax agreement {:.1}%",
            rep.max_rel_l2(),
            100.0 * rep.argmax_agreement()
        );
        assert!(rep.passed(2e-2, 0.95), "{precision}: {:?}", rep.rel_l2);
        assert_eq!(s.last_pass_stats().layer_bytes, index.total_layer_bytes());

        let params = GenerateParams {
            max_new_tokens: 12,
            sampling: Default::default(),
            seed: 0,
            stop_ids: model.config().eos_token_ids.clone(),
        };
        model.reset();
        let prompt = reference.prompt_ids.clone();
        let out = generate(&mut model, &mut s, &[prompt], &params, |_, _| Ok(())).unwrap();
        let answer = Tokenizer::for_model(&index)
            .unwrap()
            .decode(&out.tokens[0])
            .unwrap();
        eprintln!("{test} {dequant:?} {precision}: answer {answer:?}");
        assert!(answer.contains("Paris"), "{precision}: {answer:?}");
    }
}

/// A random quantized GGUF model on CUDA in f16, its output matrix kept on
/// the device as blocks (tied: the same blocks serve the embedding lookup;
/// untied: the embedding stays in host memory), for a batch of more
/// sequences than the fused GEMV takes: the logits with the output and the
/// layer weights dequantized in several chunks equal those with one chunk
/// (to the bit where cuBLAS keeps its reduction order), those of three of
/// the sequences alone (their logits from the GEMV on the blocks) match,
/// and all match the host backend's.
#[test]
fn gpu_quantized_output_in_chunks_gives_the_same_logits() {
    use layer_streamer::quant::QuantType;
    use layer_streamer::synth::{write_gguf, Arch, Shape, SynthGgufSpec};
    use rand::Rng;

    let test = "gpu_quantized_output_in_chunks_gives_the_same_logits";
    let Some(_ctx) = common::gpu(test) else {
        return;
    };
    let mut rng = common::rng(test);
    let dir = common::tempdir();
    let types = [
        QuantType::Q4_K,
        QuantType::Q8_0,
        QuantType::Q4_1,
        QuantType::Q6_K,
    ];
    for tie in [false, true] {
        let ty = types[rng.gen_range(0..types.len())];
        let (hidden, vocab) = (256, 384 + 32 * rng.gen_range(0..8));
        let spec = SynthGgufSpec {
            arch: Arch::Llama,
            shape: Shape {
                hidden,
                intermediate: 512,
                layers: 2,
                heads: 4,
                kv_heads: 2,
                vocab,
            },
            ty,
            tie,
            seed: rng.gen(),
        };
        let path = dir.path().join(format!("{ty}-{tie}.gguf"));
        write_gguf(&path, &spec, &mut |_, _| {}).unwrap();
        let index = ModelIndex::open(&path).unwrap();
        let n = 9 + rng.gen_range(0..3);
        let opts = ModelOptions {
            max_batch: n,
            max_len: 32,
            max_tokens: 8 * n,
            precision: Precision::Exact,
            kv_offload: false,
        };
        let prompts: Vec<Vec<u32>> = (0..n)
            .map(|_| {
                (0..rng.gen_range(1..9))
                    .map(|_| rng.gen_range(0..vocab as u32))
                    .collect()
            })
            .collect();
        let inputs: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
        let mut s = LayerStreamer::builder(&index)
            .device(Device::Cuda(0))
            .dtype(LlamaModel::cuda_dtype(&index))
            .build()
            .unwrap();
        let mut m = LlamaModel::load(&s, opts).unwrap();
        let one = m.forward(&mut s, &inputs).unwrap();
        // Chunks of 17..64 rows: several, the last one short.
        let rows = rng.gen_range(17..64);
        m.set_output_chunk_bytes(rows * hidden * 2).unwrap();
        let w_rows = rng.gen_range(17..64);
        m.set_weight_chunk_bytes(w_rows * hidden * 2).unwrap();
        m.reset();
        let chunked = m.forward(&mut s, &inputs).unwrap();
        // The same products and f32 sums: bit-identical unless cuBLAS picks
        // another reduction order for the narrower GEMMs (split-K), which
        // moves a logit by a few f32 ulps of the row's largest; a column
        // landing in the wrong place moves it by the whole logit.
        let what = format!("{test}: {ty} tie={tie}");
        let chunks = format!("in chunks of {rows} output and {w_rows}·{hidden} weight values");
        common::reference::assert_rows_close(
            &one,
            &chunked,
            1e-5,
            &what,
            ("in one chunk", &chunks),
        );
        m.reset();
        let few = m.forward(&mut s, &inputs[..3]).unwrap();
        let sides = ("in the batch", "alone (output GEMV)");
        common::reference::assert_rows_close(&one[..3], &few, 1e-4, &what, sides);
        assert_near_host(&index, opts, &inputs, &one, &what);
    }
}

/// The host backend's logits of `inputs` are within 2e-2 rel-L2 of `gpu`'s.
fn assert_near_host(
    index: &ModelIndex,
    opts: ModelOptions,
    inputs: &[&[u32]],
    gpu: &[Vec<f32>],
    what: &str,
) {
    use layer_streamer::llm::reference::rel_l2;
    let mut h = LayerStreamer::builder(index)
        .device(Device::Host)
        .file_dtype()
        .build()
        .unwrap();
    let mut host = LlamaModel::load(&h, opts).unwrap();
    let want = host.forward(&mut h, inputs).unwrap();
    for (g, w) in gpu.iter().zip(&want) {
        let err = rel_l2(g, w);
        eprintln!("{what}: GPU (f16) against host rel_l2 {err:.2e}");
        assert!(err < 2e-2, "{what}: rel_l2 {err}");
    }
}
