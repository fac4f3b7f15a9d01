//! A Hugging Face tokenizer (`tokenizer.json`, `tokenizer_config.json`,
//! `config.json`, the chat template) as GGUF `tokenizer.ggml.*` metadata, the
//! way llama.cpp's converter writes a byte-level BPE ("gpt2") vocabulary.

use std::path::Path;

use serde_json::Value;

use crate::gguf::{MetaArray, MetaValue, ValueType};
use crate::{Error, Result};

/// GGUF token types (llama.cpp's `llama_token_type`).
const NORMAL: i32 = 1;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const UNUSED: i32 = 5;

/// The pre-tokenizer regexes llama.cpp knows by name (`tokenizer.ggml.pre`).
const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Reads `dir/NAME` as JSON; `None` when the file does not exist.
pub(super) fn read_json(dir: &Path, name: &str) -> Result<Option<Value>> {
    let path = dir.join(name);
    match std::fs::read_to_string(&path) {
        Ok(text) => serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| Error::model(&path, format!("invalid JSON: {e}"))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io("reading", &path, None, e)),
    }
}

/// The `tokenizer.ggml.*` and `tokenizer.chat_template` metadata of the
/// tokenizer in `dir`, with the vocabulary padded to `vocab_size` ids
/// (`[PAD<id>]`, unused) where the model's embedding has more rows.
pub(super) fn tokenizer_metadata(
    dir: &Path,
    config: &Value,
    vocab_size: usize,
) -> Result<Vec<(String, MetaValue)>> {
    let path = dir.join("tokenizer.json");
    let tok = read_json(dir, "tokenizer.json")?.ok_or_else(|| {
        Error::model(&path, "missing: the GGUF file needs the model's vocabulary")
    })?;
    let tok_cfg = read_json(dir, "tokenizer_config.json")?.unwrap_or(Value::Null);
    let template = chat_template(&tok_cfg)
        .or_else(|| std::fs::read_to_string(dir.join("chat_template.jinja")).ok());
    let files = TokenizerJson {
        path: &path,
        tokenizer: &tok,
        tokenizer_config: &tok_cfg,
        config,
    };
    tokenizer_metadata_of(&files, template, vocab_size)
}

/// A Hugging Face tokenizer as JSON values.
pub struct TokenizerJson<'a> {
    /// Where `tokenizer.json` is (named in errors).
    pub path: &'a Path,
    /// `tokenizer.json`.
    pub tokenizer: &'a Value,
    /// `tokenizer_config.json` (`Null` when absent).
    pub tokenizer_config: &'a Value,
    /// `config.json` (special token ids where the tokenizer config has none).
    pub config: &'a Value,
}

/// [`tokenizer_metadata`] of a tokenizer held in memory, with its chat
/// template.
pub fn tokenizer_metadata_of(
    files: &TokenizerJson<'_>,
    template: Option<String>,
    vocab_size: usize,
) -> Result<Vec<(String, MetaValue)>> {
    let (path, tok, tok_cfg, config) = (
        files.path,
        files.tokenizer,
        files.tokenizer_config,
        files.config,
    );
    let model = &tok["model"];
    let byte_level = tok["pre_tokenizer"].to_string().contains("\"ByteLevel\"");
    if model["type"] != "BPE" || !byte_level || model["byte_fallback"] == true {
        return Err(Error::model(
            path,
            "only byte-level BPE vocabularies (model BPE with a ByteLevel pre-tokenizer, \
             llama.cpp's \"gpt2\") can be written to GGUF",
        ));
    }
    let (tokens, types) = vocab(path, tok, vocab_size)?;
    let merges = merges(path, &model["merges"])?;
    let id_of = |text: &str| tokens.iter().position(|t| t == text).map(|i| i as u32);
    let special = |key: &str, cfg_key: &str| -> Option<u32> {
        token_text(tok_cfg.get(key))
            .and_then(|t| id_of(&t))
            .or_else(|| first_id(config.get(cfg_key)))
    };
    let mut meta = vec![
        ("tokenizer.ggml.model".to_string(), str_value("gpt2")),
        ("tokenizer.ggml.pre".into(), str_value(pre_name(tok))),
        (
            "tokenizer.ggml.tokens".into(),
            MetaValue::strings(tokens.iter().cloned()),
        ),
        (
            "tokenizer.ggml.token_type".into(),
            MetaValue::Array(MetaArray {
                elem: ValueType::I32,
                items: types.into_iter().map(MetaValue::I32).collect(),
            }),
        ),
        ("tokenizer.ggml.merges".into(), MetaValue::strings(merges)),
    ];
    let bos = special("bos_token", "bos_token_id");
    for (key, id) in [
        ("bos_token_id", bos),
        ("eos_token_id", special("eos_token", "eos_token_id")),
        ("padding_token_id", special("pad_token", "pad_token_id")),
    ] {
        if let Some(id) = id {
            meta.push((format!("tokenizer.ggml.{key}"), MetaValue::U32(id)));
        }
    }
    let add_bos = match tok_cfg.get("add_bos_token").and_then(Value::as_bool) {
        Some(b) => b,
        None => adds_leading_special(&tok["post_processor"]),
    };
    meta.push((
        "tokenizer.ggml.add_bos_token".into(),
        MetaValue::Bool(add_bos && bos.is_some()),
    ));
    if let Some(t) = template {
        meta.push(("tokenizer.chat_template".into(), str_value(&t)));
    }
    Ok(meta)
}

fn str_value(s: &str) -> MetaValue {
    MetaValue::String(s.to_string())
}

/// Token strings by id and their GGUF types: the model's vocabulary, the
/// added tokens (special ones are control tokens), then padding.
fn vocab(path: &Path, tok: &Value, vocab_size: usize) -> Result<(Vec<String>, Vec<i32>)> {
    let bad = |what: String| Error::model(path, what);
    let map = tok["model"]["vocab"]
        .as_object()
        .ok_or_else(|| bad("model.vocab is not an object of token ids".into()))?;
    let mut entries: Vec<(usize, String, i32)> = Vec::with_capacity(map.len());
    for (t, id) in map {
        let id = id
            .as_u64()
            .ok_or_else(|| bad(format!("model.vocab: token {t:?} has no integer id")))?;
        entries.push((id as usize, t.clone(), NORMAL));
    }
    for a in tok["added_tokens"].as_array().into_iter().flatten() {
        let (Some(id), Some(content)) = (a["id"].as_u64(), a["content"].as_str()) else {
            return Err(bad(format!("added_tokens: entry {a} has no id or content")));
        };
        let ty = if a["special"] == true {
            CONTROL
        } else {
            USER_DEFINED
        };
        entries.push((id as usize, content.to_string(), ty));
    }
    let n = entries
        .iter()
        .map(|e| e.0 + 1)
        .max()
        .unwrap_or(0)
        .max(vocab_size);
    if n > vocab_size {
        return Err(bad(format!(
            "the tokenizer has ids up to {} but the model's vocabulary (embedding rows) is {vocab_size}",
            n - 1
        )));
    }
    let mut tokens: Vec<Option<String>> = vec![None; n];
    let mut types = vec![UNUSED; n];
    for (id, t, ty) in entries {
        tokens[id] = Some(t);
        types[id] = ty;
    }
    let tokens = tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| t.unwrap_or_else(|| format!("[PAD{i}]")))
        .collect();
    Ok((tokens, types))
}

/// Merges as "left right" strings (tokenizer.json writes either that or a
/// two-element array).
fn merges(path: &Path, v: &Value) -> Result<Vec<String>> {
    let list = v
        .as_array()
        .ok_or_else(|| Error::model(path, "model.merges is not a list"))?;
    list.iter()
        .map(|m| match m {
            Value::String(s) => Ok(s.clone()),
            Value::Array(pair) if pair.len() == 2 => match (pair[0].as_str(), pair[1].as_str()) {
                (Some(a), Some(b)) => Ok(format!("{a} {b}")),
                _ => Err(Error::model(path, format!("model.merges: bad entry {m}"))),
            },
            _ => Err(Error::model(path, format!("model.merges: bad entry {m}"))),
        })
        .collect()
}

/// llama.cpp's name for the pre-tokenizer: the regex decides.
fn pre_name(tok: &Value) -> &'static str {
    let text = tok["pre_tokenizer"].to_string();
    if text.contains(&serde_json::to_string(LLAMA3_REGEX).unwrap_or_default()) {
        "llama-bpe"
    } else if text.contains(&serde_json::to_string(QWEN2_REGEX).unwrap_or_default()) {
        "qwen2"
    } else if tok["pre_tokenizer"]["type"] == "ByteLevel" {
        "gpt-2"
    } else {
        "default"
    }
}

/// Whether a post-processor puts a special token first (a BOS).
fn adds_leading_special(post: &Value) -> bool {
    match post["type"].as_str() {
        Some("TemplateProcessing") => post["single"]
            .get(0)
            .is_some_and(|p| p.get("SpecialToken").is_some()),
        Some("Sequence") => post["processors"]
            .as_array()
            .is_some_and(|ps| ps.iter().any(adds_leading_special)),
        _ => false,
    }
}

/// A token given as a string or as an added-token object.
fn token_text(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

/// A token id given as a number or a list (the first).
fn first_id(v: Option<&Value>) -> Option<u32> {
    match v? {
        Value::Array(a) => a.first()?.as_u64(),
        other => other.as_u64(),
    }
    .and_then(|id| u32::try_from(id).ok())
}

/// The chat template of `tokenizer_config.json`: a string, or the "default"
/// of a list.
fn chat_template(tok_cfg: &Value) -> Option<String> {
    match tok_cfg.get("chat_template") {
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Array(a)) => a
            .iter()
            .find(|t| t["name"] == "default")
            .and_then(|t| t["template"].as_str())
            .map(str::to_string),
        _ => None,
    }
}
