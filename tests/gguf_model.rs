//! A real GGUF model end to end on the host backend: SmolLM2-135M-Instruct
//! as a Q4_1 file (`scripts/test-env smollm2`), against what Hugging Face
//! transformers computes from the same file
//! (`tests/fixtures/reference/smollm2-q4_1`, made by scripts/gguf-reference.py):
//! the tokenizer and chat template from the file's metadata, the logits of the
//! prompt and of 16 teacher-forced steps, and the chat answer.

mod common;

use std::path::PathBuf;

use layer_streamer::llm::reference::{check, Reference};
use layer_streamer::llm::{
    generate, ChatTemplate, GenerateParams, LlamaModel, Message, ModelOptions, Tokenizer,
};
use layer_streamer::{Device, LayerStreamer, ModelIndex};

fn smollm2() -> PathBuf {
    common::assets::test_env("smollm2")
}

fn fixture() -> (PathBuf, serde_json::Value) {
    let dir = common::reference::dir("smollm2-q4_1");
    let text = std::fs::read_to_string(dir.join("reference.json")).unwrap();
    (dir, serde_json::from_str(&text).unwrap())
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    serde_json::from_value(v.clone()).unwrap()
}

#[test]
fn tokenizer_and_chat_template_come_from_the_file() {
    let index = ModelIndex::open(smollm2()).unwrap();
    let (_, r) = fixture();
    let tok = Tokenizer::for_model(&index).unwrap();
    for probe in r["tokenizer_probes"].as_array().unwrap() {
        let text = probe["text"].as_str().unwrap();
        assert_eq!(
            tok.encode(text, false).unwrap(),
            ids(&probe["ids"]),
            "{text:?}"
        );
    }
    let template = ChatTemplate::for_model(&index)
        .unwrap()
        .expect("the file has a template");
    let messages = [Message {
        role: "user".into(),
        content: r["question"].as_str().unwrap().into(),
    }];
    let prompt = template.render(&messages, true).unwrap();
    assert_eq!(prompt, r["prompt_text"].as_str().unwrap());
    assert_eq!(tok.encode(&prompt, false).unwrap(), ids(&r["prompt_ids"]));
    let cfg = index.config().unwrap();
    assert_eq!(cfg["num_hidden_layers"], r["config"]["num_hidden_layers"]);
    assert_eq!(
        cfg["num_key_value_heads"],
        r["config"]["num_key_value_heads"]
    );
    assert!(index.rope_interleaved());
}

#[test]
fn logits_match_transformers_and_the_answer_is_paris() {
    let gguf = smollm2();
    let (dir, r) = fixture();
    let reference = Reference::load(&dir).unwrap();
    let index = ModelIndex::open(&gguf).unwrap();
    let stored: u64 = index.total_layer_bytes();
    let mut streamer = LayerStreamer::builder(&index)
        .device(Device::Host)
        .file_dtype()
        .build()
        .unwrap();
    let len = reference.prompt_ids.len() + reference.greedy_ids.len() + 1;
    let opts = ModelOptions {
        max_batch: 1,
        max_len: len.max(64),
        max_tokens: len.max(64),
        ..ModelOptions::default()
    };
    let mut model = LlamaModel::load(&streamer, opts).unwrap();
    let rep = check(&mut model, &mut streamer, &reference, 1).unwrap();
    println!(
        "max rel_l2 {:.3e}, argmax agreement {:.1}%",
        rep.max_rel_l2(),
        100.0 * rep.argmax_agreement()
    );
    assert!(rep.passed(2e-2, 0.95), "{:?}", rep.rel_l2);
    // The pass streamed the stored blocks, not dequantized weights.
    assert_eq!(streamer.last_pass_stats().layer_bytes, stored);

    let tok = Tokenizer::for_model(&index).unwrap();
    let params = GenerateParams {
        max_new_tokens: 12,
        sampling: Default::default(),
        seed: 0,
        stop_ids: model.config().eos_token_ids.clone(),
    };
    let prompt = ids(&r["prompt_ids"]);
    let out = generate(&mut model, &mut streamer, &[prompt], &params, |_, _| Ok(())).unwrap();
    let answer = tok.decode(&out.tokens[0]).unwrap();
    println!("answer: {answer:?}");
    assert!(answer.contains("Paris"), "{answer:?}");
}
