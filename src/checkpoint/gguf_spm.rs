//! SentencePiece vocabularies of GGUF files (`tokenizer.ggml.model ==
//! "llama"`: tokens, scores, token types) as a `tokenizers` BPE with byte
//! fallback that encodes and decodes as llama.cpp's SPM tokenizer does.
//!
//! llama.cpp's tokenizer starts from the characters of the text (spaces
//! replaced by `▁`, one `▁` prepended), repeatedly merges the adjacent pair
//! whose concatenation is the vocabulary's highest-scoring token, and spells
//! a character missing from the vocabulary as its UTF-8 bytes (`<0xNN>`
//! tokens). A BPE whose merges are every split of every normal token, ranked
//! by that token's score, does the same (as Hugging Face's converter of
//! SentencePiece models builds them).

use std::collections::HashMap;

use serde_json::{json, Map, Value};

use super::gguf_hf::{added_tokens, vocab, Metadata};
use crate::{Error, Result};

/// GGUF token types: 1 normal, 2 unknown.
const TOKEN_NORMAL: i64 = 1;
const TOKEN_UNKNOWN: i64 = 2;

/// The `tokenizer.json` of a SentencePiece (`llama`) vocabulary.
pub(super) fn spm_tokenizer_json(meta: &Metadata<'_>) -> Result<Value> {
    let (tokens, types) = vocab(meta)?;
    let scores = scores(meta, tokens.len())?;
    let vocab: Map<String, Value> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.to_string(), json!(i)))
        .collect();
    let unk = meta
        .opt_u64("tokenizer.ggml.unknown_token_id")?
        .map(|id| id as usize)
        .or_else(|| types.iter().position(|&t| t == TOKEN_UNKNOWN))
        .and_then(|id| tokens.get(id).copied());
    // llama.cpp adds a BOS to SentencePiece vocabularies unless told not to.
    let add_bos = meta
        .get("tokenizer.ggml.add_bos_token")
        .and_then(Value::as_bool)
        .unwrap_or(true);
    let post = match (add_bos, meta.opt_u64("tokenizer.ggml.bos_token_id")?) {
        (true, Some(bos)) => {
            let bos_tok = tokens.get(bos as usize).copied().ok_or_else(|| {
                Error::Input(format!(
                    "{}: tokenizer.ggml.bos_token_id {bos} is past the {} tokens",
                    meta.file(),
                    tokens.len()
                ))
            })?;
            let special = json!({"SpecialToken": {"id": bos_tok, "type_id": 0}});
            json!({"type": "TemplateProcessing",
                "single": [special, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [special, {"Sequence": {"id": "A", "type_id": 0}},
                         special, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {bos_tok: {"id": bos_tok, "ids": [bos], "tokens": [bos_tok]}}})
        }
        _ => Value::Null,
    };
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added_tokens(&tokens, &types),
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "▁"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]},
        "pre_tokenizer": null,
        "post_processor": post,
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true,
            "ignore_merges": false, "vocab": vocab, "merges": merges(&tokens, &types, &scores),
        },
    }))
}

/// `tokenizer.ggml.scores`: one number per token.
fn scores(meta: &Metadata<'_>, n: usize) -> Result<Vec<f64>> {
    let key = "tokenizer.ggml.scores";
    let a = meta.opt_array(key)?.ok_or_else(|| {
        Error::Input(format!(
            "{}: metadata key {key} is missing (a SentencePiece vocabulary needs it)",
            meta.file()
        ))
    })?;
    let scores: Vec<f64> = a.iter().filter_map(Value::as_f64).collect();
    if scores.len() != a.len() || scores.len() != n {
        return Err(Error::Input(format!(
            "{}: metadata key {key} has {} numbers for {n} tokens",
            meta.file(),
            scores.len()
        )));
    }
    Ok(scores)
}

/// Every split of every normal token into two normal tokens, as `[left,
/// right]` pairs (a piece may hold a space), the highest-scoring token's first; splits of one token keep a
/// shorter left part first, and equal scores keep the lower id first.
fn merges(tokens: &[&str], types: &[i64], scores: &[f64]) -> Vec<Value> {
    let normal: HashMap<&str, usize> = tokens
        .iter()
        .enumerate()
        .filter(|(i, _)| types[*i] == TOKEN_NORMAL)
        .map(|(i, t)| (*t, i))
        .collect();
    let mut out: Vec<(f64, usize, usize, Value)> = Vec::new();
    for (&t, &id) in &normal {
        for (cut, _) in t.char_indices().skip(1) {
            let (l, r) = t.split_at(cut);
            if normal.contains_key(l) && normal.contains_key(r) {
                out.push((scores[id], id, cut, json!([l, r])));
            }
        }
    }
    out.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    out.into_iter().map(|m| m.3).collect()
}
