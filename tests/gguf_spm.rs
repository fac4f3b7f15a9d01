//! SentencePiece (`tokenizer.ggml.model == "llama"`) vocabularies from GGUF:
//! a random but valid vocabulary (byte tokens, pieces with scores, controls)
//! in a small GGUF model; its tokenizer encodes as llama.cpp's SPM algorithm
//! (written out below: merge the best-scoring adjacent pair until none is
//! in the vocabulary, bytes for unknown characters) and decodes back to the
//! text, unicode and byte fallback included.

mod common;

use std::collections::HashMap;

use layer_streamer::gguf::{GgufWriter, MetaArray, MetaValue, ValueType};
use layer_streamer::llm::Tokenizer;
use layer_streamer::quant::QuantType;
use layer_streamer::ModelIndex;
use rand::seq::SliceRandom;
use rand::Rng;

const ALPHABET: &[&str] = &[
    "a", "b", "c", "d", "e", "h", "l", "o", "r", "s", "t", "w", "é", "ß", "▁",
];

/// Tokens (unk, bos, eos, 256 bytes, the alphabet, random pieces made of
/// it), their types and distinct scores.
fn random_vocab(rng: &mut impl Rng) -> (Vec<String>, Vec<i32>, Vec<f32>) {
    let mut tokens: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
    let mut types = vec![2, 3, 3];
    for b in 0..=255u8 {
        tokens.push(format!("<0x{b:02X}>"));
        types.push(6);
    }
    let mut pieces: Vec<String> = ALPHABET.iter().map(|s| s.to_string()).collect();
    while pieces.len() < 300 {
        let a = pieces.choose(rng).unwrap().clone();
        let b = pieces.choose(rng).unwrap().clone();
        let p = format!("{a}{b}");
        if p.chars().count() <= 8 && !pieces.contains(&p) {
            pieces.push(p);
        }
    }
    for p in pieces {
        tokens.push(p);
        types.push(1);
    }
    let mut scores: Vec<f32> = (0..tokens.len()).map(|i| -(i as f32)).collect();
    scores[259..].shuffle(rng);
    (tokens, types, scores)
}

/// llama.cpp's SPM tokenizer (llm_tokenizer_spm), with a BOS; an empty
/// text is the BOS alone.
fn llama_cpp_encode(text: &str, tokens: &[String], scores: &[f32]) -> Vec<u32> {
    if text.is_empty() {
        return vec![1];
    }
    let id: HashMap<&str, usize> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.as_str(), i))
        .collect();
    let text = format!("▁{}", text.replace(' ', "▁"));
    let mut sym: Vec<String> = text.chars().map(String::from).collect();
    loop {
        let mut best: Option<(f32, usize)> = None;
        for i in 0..sym.len().saturating_sub(1) {
            let joined = format!("{}{}", sym[i], sym[i + 1]);
            if let Some(&t) = id.get(joined.as_str()) {
                if best.is_none_or(|(s, _)| scores[t] > s) {
                    best = Some((scores[t], i));
                }
            }
        }
        let Some((_, i)) = best else { break };
        let right = sym.remove(i + 1);
        sym[i].push_str(&right);
    }
    let mut out = vec![1u32];
    for s in sym {
        match id.get(s.as_str()) {
            Some(&t) => out.push(t as u32),
            None => out.extend(
                s.bytes()
                    .map(|b| id[format!("<0x{b:02X}>").as_str()] as u32),
            ),
        }
    }
    out
}

fn write_model(path: &std::path::Path, tokens: &[String], types: &[i32], scores: &[f32]) {
    let mut w = GgufWriter::new();
    let meta = [
        ("general.architecture", MetaValue::String("llama".into())),
        ("llama.embedding_length", MetaValue::U32(32)),
        ("llama.feed_forward_length", MetaValue::U32(64)),
        ("llama.block_count", MetaValue::U32(2)),
        ("llama.attention.head_count", MetaValue::U32(4)),
        ("tokenizer.ggml.model", MetaValue::String("llama".into())),
        (
            "tokenizer.ggml.tokens",
            MetaValue::strings(tokens.iter().cloned()),
        ),
        (
            "tokenizer.ggml.scores",
            MetaValue::Array(MetaArray {
                elem: ValueType::F32,
                items: scores.iter().map(|&s| MetaValue::F32(s)).collect(),
            }),
        ),
        (
            "tokenizer.ggml.token_type",
            MetaValue::Array(MetaArray {
                elem: ValueType::I32,
                items: types.iter().map(|&t| MetaValue::I32(t)).collect(),
            }),
        ),
        ("tokenizer.ggml.bos_token_id", MetaValue::U32(1)),
        ("tokenizer.ggml.eos_token_id", MetaValue::U32(2)),
        ("tokenizer.ggml.unknown_token_id", MetaValue::U32(0)),
    ];
    for (k, v) in meta {
        w.metadata(k, v).unwrap();
    }
    let n = tokens.len() as u64;
    w.tensor("token_embd.weight", QuantType::F32, &[32, n])
        .unwrap();
    for l in 0..2 {
        w.tensor(format!("blk.{l}.attn_norm.weight"), QuantType::F32, &[32])
            .unwrap();
    }
    let mut out = w.create(path).unwrap();
    out.write_tensor(&vec![0u8; 32 * 4 * n as usize]).unwrap();
    out.write_tensor(&[0u8; 128]).unwrap();
    out.write_tensor(&[0u8; 128]).unwrap();
    out.finish().unwrap();
}

#[test]
fn sentencepiece_vocabularies_encode_like_llama_cpp_and_round_trip() {
    let mut rng = common::rng("sentencepiece_vocabularies_encode_like_llama_cpp");
    let dir = common::tempdir();
    let (tokens, types, scores) = random_vocab(&mut rng);
    let path = dir.path().join("spm.gguf");
    write_model(&path, &tokens, &types, &scores);
    let tok = Tokenizer::for_model(&ModelIndex::open(&path).unwrap()).unwrap();
    let words = [
        "hello", "world", "best", "ça", "中文", "🦀", "straße", "café", "\n", "x!",
    ];
    for _ in 0..300 {
        let mut text = String::new();
        for _ in 0..rng.gen_range(1..8) {
            let w: String = if rng.gen_bool(0.5) {
                words.choose(&mut rng).unwrap().to_string()
            } else {
                (0..rng.gen_range(1..6))
                    .map(|_| *ALPHABET[..14].choose(&mut rng).unwrap())
                    .collect()
            };
            text.push_str(&w);
            text.push_str(if rng.gen_bool(0.8) { " " } else { "  " });
        }
        let text = text.trim_end().to_string();
        let ids = tok.encode(&text, true).unwrap();
        assert_eq!(ids, llama_cpp_encode(&text, &tokens, &scores), "{text:?}");
        assert_eq!(tok.decode(&ids).unwrap(), text, "{ids:?}");
    }
    // Characters outside the vocabulary are spelled in bytes.
    let ids = tok.encode("中", false).unwrap();
    let want: Vec<u32> = "▁中"
        .chars()
        .flat_map(|c| {
            let s = c.to_string();
            match tokens.iter().position(|t| *t == s) {
                Some(i) => vec![i as u32],
                None => s.bytes().map(|b| 3 + b as u32).collect(),
            }
        })
        .collect();
    assert_eq!(ids, want);
}
