//! A small byte-level BPE tokenizer for synthetic models, in the Hugging Face
//! `tokenizers` format, with the architecture's special tokens and chat
//! template.
//!
//! The 256 byte tokens come first (GPT-2's byte-to-unicode map, in its
//! order), then merges of letters into longer pieces until the vocabulary
//! plus the special tokens fill the model's vocabulary exactly; the special
//! tokens take the last ids.

use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};

use super::{write_json, Arch};
use crate::{Error, Result};

/// The Qwen2 ChatML template (as shipped with Qwen2-Instruct).
pub const QWEN2_CHAT_TEMPLATE: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// The Llama 3 Instruct chat template.
pub const LLAMA3_CHAT_TEMPLATE: &str = "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}";

/// Ids of the special tokens a synthetic tokenizer defines, and its files.
#[derive(Debug, Clone)]
pub struct SpecialIds {
    /// Beginning of sequence (`<|endoftext|>` for Qwen2, `<|begin_of_text|>` for Llama).
    pub bos: u32,
    /// End of a turn (`<|im_end|>`, `<|eot_id|>`): config.json's `eos_token_id`.
    pub eos: u32,
    /// Every token that ends generation (generation_config.json's `eos_token_id`).
    pub stop: Vec<u32>,
    /// The files written.
    pub files: Vec<PathBuf>,
}

fn specials(arch: Arch) -> &'static [&'static str] {
    match arch {
        Arch::Qwen2 => &["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        Arch::Llama => &[
            "<|begin_of_text|>",
            "<|end_of_text|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|eot_id|>",
        ],
    }
}

/// GPT-2's map from bytes to printable characters, in its order: the
/// printable bytes first, then the rest mapped to U+0100 onward.
pub fn byte_to_unicode() -> Vec<(u8, char)> {
    let mut out: Vec<(u8, char)> = (b'!'..=b'~')
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .map(|b| (b, char::from(b)))
        .collect();
    let mut n = 0u32;
    for b in 0..=255u8 {
        if !out.iter().any(|&(x, _)| x == b) {
            out.push((b, char::from_u32(256 + n).unwrap_or('?')));
            n += 1;
        }
    }
    out
}

/// Merges that build lowercase pieces ("Ġt", "th", "the", ...), as many as asked.
fn merges(count: usize) -> Vec<(String, String)> {
    const LETTERS: &str = "etaoinshrdlcumwfgypbvkjxqz";
    let mut out = Vec::with_capacity(count);
    let mut level: Vec<String> = std::iter::once("Ġ".to_string())
        .chain(LETTERS.chars().map(String::from))
        .collect();
    while out.len() < count {
        let mut next = Vec::new();
        'outer: for left in &level {
            for c in LETTERS.chars() {
                if out.len() == count {
                    break 'outer;
                }
                out.push((left.clone(), c.to_string()));
                next.push(format!("{left}{c}"));
            }
        }
        level = next;
    }
    out
}

/// A synthetic tokenizer's files as JSON values, and its special ids.
#[derive(Debug, Clone)]
pub struct TokenizerFiles {
    /// `tokenizer.json`.
    pub tokenizer: Value,
    /// `tokenizer_config.json` (with the chat template).
    pub config: Value,
    /// `generation_config.json`.
    pub generation: Value,
    /// Beginning of sequence.
    pub bos: u32,
    /// End of a turn: config.json's `eos_token_id`.
    pub eos: u32,
    /// Every token that ends generation.
    pub stop: Vec<u32>,
}

/// Writes `tokenizer.json`, `tokenizer_config.json` and
/// `generation_config.json` for a vocabulary of `vocab` ids.
pub fn write_tokenizer(dir: &Path, arch: Arch, vocab: usize) -> Result<SpecialIds> {
    let t = tokenizer_files(arch, vocab)?;
    let files = vec![
        write_json(&dir.join("tokenizer.json"), &t.tokenizer)?,
        write_json(&dir.join("tokenizer_config.json"), &t.config)?,
        write_json(&dir.join("generation_config.json"), &t.generation)?,
    ];
    Ok(SpecialIds {
        bos: t.bos,
        eos: t.eos,
        stop: t.stop,
        files,
    })
}

/// The tokenizer files of a vocabulary of `vocab` ids for `arch`.
pub fn tokenizer_files(arch: Arch, vocab: usize) -> Result<TokenizerFiles> {
    let special = specials(arch);
    if vocab < 256 + special.len() || vocab > u32::MAX as usize {
        return Err(Error::Input(format!(
            "a byte-level tokenizer needs a vocabulary of at least {} ids, not {vocab}",
            256 + special.len()
        )));
    }
    let first_special = (vocab - special.len()) as u32;
    let id = |s: &str| first_special + special.iter().position(|x| *x == s).unwrap_or(0) as u32;
    let mut vocab_map = Map::new();
    for (i, (_, c)) in byte_to_unicode().into_iter().enumerate() {
        vocab_map.insert(c.to_string(), json!(i));
    }
    let merge_list = merges(first_special as usize - 256);
    for (i, (a, b)) in merge_list.iter().enumerate() {
        vocab_map.insert(format!("{a}{b}"), json!(256 + i));
    }
    let added: Vec<Value> = special
        .iter()
        .map(|s| {
            json!({ "id": id(s), "content": s, "single_word": false, "lstrip": false,
                    "rstrip": false, "normalized": false, "special": true })
        })
        .collect();
    let byte_level = |prefix: bool| json!({ "type": "ByteLevel", "add_prefix_space": prefix, "trim_offsets": true, "use_regex": true });
    let (bos, eos, stop, post) = post_processor(arch, &id);
    let tokenizer = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": byte_level(false),
        "post_processor": post,
        "decoder": byte_level(false),
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab_map,
            "merges": merge_list.iter().map(|(a, b)| format!("{a} {b}")).collect::<Vec<_>>(),
        }
    });
    let decoder: Map<String, Value> = added
        .iter()
        .map(|t| {
            let mut t = t.clone();
            let key = t["id"].to_string();
            if let Value::Object(m) = &mut t {
                m.remove("id");
            }
            (key, t)
        })
        .collect();
    let config = tokenizer_config(arch, decoder);
    let mut generation = json!({
        "bos_token_id": bos, "eos_token_id": stop, "do_sample": false,
        "transformers_version": "4.51.3",
    });
    if arch == Arch::Qwen2 {
        generation["pad_token_id"] = json!(bos);
    }
    Ok(TokenizerFiles {
        tokenizer,
        config,
        generation,
        bos,
        eos,
        stop,
    })
}

/// The architecture's (bos, eos, stop ids, post-processor) for special ids
/// given by `id`.
fn post_processor(arch: Arch, id: &dyn Fn(&str) -> u32) -> (u32, u32, Vec<u32>, Value) {
    match arch {
        Arch::Qwen2 => {
            let eot = id("<|endoftext|>");
            let post = json!({ "type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true });
            (eot, id("<|im_end|>"), vec![id("<|im_end|>"), eot], post)
        }
        Arch::Llama => {
            let b = id("<|begin_of_text|>");
            let bos_tok = json!({ "SpecialToken": { "id": "<|begin_of_text|>", "type_id": 0 } });
            let template = json!({
                "type": "TemplateProcessing",
                "single": [bos_tok, { "Sequence": { "id": "A", "type_id": 0 } }],
                "pair": [bos_tok, { "Sequence": { "id": "A", "type_id": 0 } },
                         { "SpecialToken": { "id": "<|begin_of_text|>", "type_id": 1 } },
                         { "Sequence": { "id": "B", "type_id": 1 } }],
                "special_tokens": { "<|begin_of_text|>": { "id": "<|begin_of_text|>", "ids": [b], "tokens": ["<|begin_of_text|>"] } }
            });
            let post = json!({ "type": "Sequence", "processors": [
                { "type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true },
                template ] });
            (
                b,
                id("<|eot_id|>"),
                vec![id("<|end_of_text|>"), id("<|eot_id|>")],
                post,
            )
        }
    }
}

/// tokenizer_config.json, with the added tokens' `decoder` map.
fn tokenizer_config(arch: Arch, decoder: Map<String, Value>) -> Value {
    match arch {
        Arch::Qwen2 => json!({
            "add_bos_token": false, "add_prefix_space": false, "added_tokens_decoder": decoder,
            "additional_special_tokens": ["<|im_start|>", "<|im_end|>"], "bos_token": null,
            "chat_template": QWEN2_CHAT_TEMPLATE, "clean_up_tokenization_spaces": false,
            "eos_token": "<|im_end|>", "errors": "replace", "model_max_length": 4096,
            "pad_token": "<|endoftext|>", "split_special_tokens": false,
            "tokenizer_class": "Qwen2Tokenizer", "unk_token": null,
        }),
        Arch::Llama => json!({
            "added_tokens_decoder": decoder, "bos_token": "<|begin_of_text|>",
            "chat_template": LLAMA3_CHAT_TEMPLATE, "clean_up_tokenization_spaces": true,
            "eos_token": "<|eot_id|>", "model_input_names": ["input_ids", "attention_mask"],
            "model_max_length": 4096, "tokenizer_class": "PreTrainedTokenizerFast",
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_map_is_a_bijection() {
        let m = byte_to_unicode();
        assert_eq!(m.len(), 256);
        let mut bytes: Vec<u8> = m.iter().map(|x| x.0).collect();
        bytes.sort();
        bytes.dedup();
        assert_eq!(bytes.len(), 256);
        assert_eq!(m[0], (b'!', '!'));
        assert!(m.contains(&(b' ', 'Ġ')));
    }

    #[test]
    fn merges_are_distinct_and_built_from_known_pieces() {
        let ms = merges(20_000);
        let mut seen: std::collections::HashSet<String> = byte_to_unicode()
            .into_iter()
            .map(|(_, c)| c.to_string())
            .collect();
        for (a, b) in &ms {
            assert!(seen.contains(a) && seen.contains(b), "{a} {b}");
            assert!(seen.insert(format!("{a}{b}")), "duplicate {a}{b}");
        }
    }
}
