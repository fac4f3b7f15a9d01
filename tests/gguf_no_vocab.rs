//! A GGUF file with weights and no vocabulary, as llama.cpp writes one
//! (`tokenizer.ggml.model` `none`, the vocabulary size in
//! `<arch>.vocab_size`): it opens with that vocabulary size and no
//! tokenizer, so the model takes token ids; any other unknown tokenizer
//! model stays an error naming the file.

mod common;

use layer_streamer::gguf::{GgufWriter, MetaValue};
use layer_streamer::llm::Tokenizer;
use layer_streamer::quant::QuantType;
use layer_streamer::ModelIndex;
use rand::Rng;

fn write_model(path: &std::path::Path, tokenizer: &str, vocab: u64) {
    let mut w = GgufWriter::new();
    let meta = [
        ("general.architecture", MetaValue::String("qwen2".into())),
        ("qwen2.embedding_length", MetaValue::U32(32)),
        ("qwen2.feed_forward_length", MetaValue::U32(64)),
        ("qwen2.block_count", MetaValue::U32(2)),
        ("qwen2.attention.head_count", MetaValue::U32(4)),
        ("qwen2.vocab_size", MetaValue::U32(vocab as u32)),
        ("tokenizer.ggml.model", MetaValue::String(tokenizer.into())),
    ];
    for (k, v) in meta {
        w.metadata(k, v).unwrap();
    }
    w.tensor("token_embd.weight", QuantType::F32, &[32, vocab])
        .unwrap();
    for l in 0..2 {
        w.tensor(format!("blk.{l}.attn_norm.weight"), QuantType::F32, &[32])
            .unwrap();
    }
    let mut out = w.create(path).unwrap();
    out.write_tensor(&vec![0u8; 32 * 4 * vocab as usize])
        .unwrap();
    out.write_tensor(&[0u8; 128]).unwrap();
    out.write_tensor(&[0u8; 128]).unwrap();
    out.finish().unwrap();
}

#[test]
fn a_gguf_with_no_vocabulary_opens_for_token_ids() {
    let mut rng = common::rng("a_gguf_with_no_vocabulary_opens_for_token_ids");
    let dir = common::tempdir();
    let vocab = rng.gen_range(40..400);
    let path = dir.path().join("weights.gguf");
    write_model(&path, "none", vocab);
    let index = ModelIndex::open(&path).unwrap();
    assert!(index.embedded_tokenizer().is_none());
    let cfg = index.config().expect("a config from the metadata");
    assert_eq!(cfg["vocab_size"].as_u64(), Some(vocab));
    assert!(Tokenizer::for_model(&index).is_err());

    let bad = dir.path().join("bad.gguf");
    write_model(&bad, "bpe-of-some-kind", vocab);
    let Err(e) = ModelIndex::open(&bad) else {
        panic!("an unknown tokenizer model opened");
    };
    let msg = e.to_string();
    assert!(
        msg.contains("bad.gguf") && msg.contains("bpe-of-some-kind"),
        "{msg}"
    );
}
