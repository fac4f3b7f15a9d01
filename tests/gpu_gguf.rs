//! A real GGUF model on CUDA: SmolLM2-135M-Instruct as a Q4_1 file
//! (`scripts/test-env smollm2`), dequantized on the device into f16
//! (`LlamaModel::cuda_dtype`), against what Hugging Face transformers
//! computes from the same file (`tests/fixtures/reference/smollm2-q4_1`): the
//! logits of the prompt and of 16 teacher-forced steps within 2e-2 relative
//! L2 with 95 % argmax agreement in both precisions, and the chat answer.
//! Skips without a driver unless `LS_REQUIRE_GPU=1`.

mod common;

use layer_streamer::llm::reference::{check, Reference};
use layer_streamer::llm::{
    generate, GenerateParams, LlamaModel, ModelOptions, Precision, Tokenizer,
};
use layer_streamer::{DType, Device, LayerStreamer, ModelIndex};

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
    let mut s = LayerStreamer::builder(&index)
        .device(Device::Cuda(0))
        .dtype(dtype)
        .build()
        .unwrap();
    let len = reference.prompt_ids.len() + reference.greedy_ids.len() + 1;
    for precision in [Precision::Exact, Precision::Fast] {
        let opts = ModelOptions {
            max_batch: 1,
            max_len: len.max(64),
            max_tokens: len.max(64),
            precision,
        };
        let mut model = LlamaModel::load(&s, opts).unwrap();
        let rep = check(&mut model, &mut s, &reference, 1).unwrap();
        eprintln!(
            "{test} {precision}: max rel_l2 {:.3e}, argmax agreement {:.1}%",
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
        eprintln!("{test} {precision}: answer {answer:?}");
        assert!(answer.contains("Paris"), "{precision}: {answer:?}");
    }
}
