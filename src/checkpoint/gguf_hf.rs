//! A GGUF model seen as a Hugging Face checkpoint: tensor names mapped to the
//! Hugging Face ones, the architecture's metadata turned into the `config.json`
//! the forward pass reads, and the `tokenizer.ggml.*` vocabulary turned into a
//! `tokenizer.json`. GGUF metadata arrives here as JSON (strings, numbers,
//! booleans and arrays), so this module does not depend on the container parser.

use serde_json::{json, Map, Value};

use crate::{Error, Result};

/// Architectures whose GGUF files this crate runs.
pub const SUPPORTED_ARCHS: &[&str] = &["llama", "qwen2"];

/// Whole-model tensors: (GGUF name, Hugging Face name).
const STATIC_NAMES: [(&str, &str); 3] = [
    ("token_embd.weight", "model.embed_tokens.weight"),
    ("output_norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
];

/// Per-layer tensors: (GGUF stem after `blk.N.`, Hugging Face stem after
/// `model.layers.N.`), each with a `.weight` or `.bias` suffix.
const LAYER_NAMES: [(&str, &str); 9] = [
    ("attn_norm", "input_layernorm"),
    ("ffn_norm", "post_attention_layernorm"),
    ("attn_q", "self_attn.q_proj"),
    ("attn_k", "self_attn.k_proj"),
    ("attn_v", "self_attn.v_proj"),
    ("attn_output", "self_attn.o_proj"),
    ("ffn_gate", "mlp.gate_proj"),
    ("ffn_up", "mlp.up_proj"),
    ("ffn_down", "mlp.down_proj"),
];

/// The Hugging Face name of a GGUF tensor (`blk.3.attn_q.weight` →
/// `model.layers.3.self_attn.q_proj.weight`); `None` for a name this crate
/// does not know.
pub fn hf_tensor_name(gguf: &str) -> Option<String> {
    if let Some((_, hf)) = STATIC_NAMES.iter().find(|(g, _)| *g == gguf) {
        return Some(hf.to_string());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, key) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (stem, suffix) = key.rsplit_once('.')?;
    if suffix != "weight" && suffix != "bias" {
        return None;
    }
    let (_, hf) = LAYER_NAMES.iter().find(|(g, _)| *g == stem)?;
    Some(format!("model.layers.{layer}.{hf}.{suffix}"))
}

/// The llama.cpp name of a Hugging Face tensor
/// (`model.layers.3.self_attn.q_proj.weight` → `blk.3.attn_q.weight`), the
/// inverse of [`hf_tensor_name`]; `None` for a name without one.
pub fn gguf_tensor_name(hf: &str) -> Option<String> {
    if let Some((g, _)) = STATIC_NAMES.iter().find(|(_, h)| *h == hf) {
        return Some(g.to_string());
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, key) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (stem, suffix) = key.rsplit_once('.')?;
    if suffix != "weight" && suffix != "bias" {
        return None;
    }
    let (g, _) = LAYER_NAMES.iter().find(|(_, h)| *h == stem)?;
    Some(format!("blk.{layer}.{g}.{suffix}"))
}

/// Reads GGUF metadata keys for one file, naming the file in every error.
pub struct Metadata<'a> {
    file: &'a str,
    map: &'a Map<String, Value>,
}

impl<'a> Metadata<'a> {
    /// Metadata `map` of the GGUF file `file` (used in error messages).
    pub fn new(file: &'a str, map: &'a Map<String, Value>) -> Metadata<'a> {
        Metadata { file, map }
    }

    /// The file's name, for error messages.
    pub fn file(&self) -> &'a str {
        self.file
    }

    /// A key's value, if present.
    pub fn get(&self, key: &str) -> Option<&'a Value> {
        self.map.get(key)
    }

    fn missing(&self, key: &str) -> Error {
        Error::Input(format!("{}: metadata key {key} is missing", self.file))
    }

    fn wrong(&self, key: &str, what: &str) -> Error {
        Error::Input(format!("{}: metadata key {key} is not {what}", self.file))
    }

    /// A required string.
    pub fn str(&self, key: &str) -> Result<&'a str> {
        let v = self.get(key).ok_or_else(|| self.missing(key))?;
        v.as_str().ok_or_else(|| self.wrong(key, "a string"))
    }

    /// An optional unsigned integer.
    pub fn opt_u64(&self, key: &str) -> Result<Option<u64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(Some)
                .ok_or_else(|| self.wrong(key, "an unsigned integer")),
        }
    }

    /// A required unsigned integer.
    pub fn u64(&self, key: &str) -> Result<u64> {
        self.opt_u64(key)?.ok_or_else(|| self.missing(key))
    }

    /// An optional number.
    pub fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.wrong(key, "a number")),
        }
    }

    /// An optional array.
    pub fn opt_array(&self, key: &str) -> Result<Option<&'a Vec<Value>>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_array()
                .map(Some)
                .ok_or_else(|| self.wrong(key, "an array")),
        }
    }

    /// A required array of strings.
    pub fn strings(&self, key: &str) -> Result<Vec<&'a str>> {
        let a = self.opt_array(key)?.ok_or_else(|| self.missing(key))?;
        a.iter()
            .map(|v| {
                v.as_str()
                    .ok_or_else(|| self.wrong(key, "an array of strings"))
            })
            .collect()
    }

    /// `general.architecture`, checked against [`SUPPORTED_ARCHS`].
    pub fn arch(&self) -> Result<&'a str> {
        let arch = self.str("general.architecture")?;
        if !SUPPORTED_ARCHS.contains(&arch) {
            return Err(Error::Input(format!(
                "{}: general.architecture {arch:?} is not supported (supported: {})",
                self.file,
                SUPPORTED_ARCHS.join(", ")
            )));
        }
        Ok(arch)
    }
}

/// The Hugging Face `config.json` for a GGUF model: `has_output` says whether
/// the file has its own `output.weight` (else the embedding is tied).
pub fn hf_config(meta: &Metadata<'_>, has_output: bool) -> Result<Value> {
    let arch = meta.arch()?;
    let key = |k: &str| format!("{arch}.{k}");
    let hidden = meta.u64(&key("embedding_length"))?;
    let heads = meta.u64(&key("attention.head_count"))?;
    let kv_heads = meta
        .opt_u64(&key("attention.head_count_kv"))?
        .unwrap_or(heads);
    if heads == 0 || kv_heads == 0 || heads % kv_heads != 0 {
        return Err(Error::Input(format!(
            "{}: {heads} attention heads cannot share {kv_heads} key/value heads",
            meta.file
        )));
    }
    let head_dim = match meta.opt_u64(&key("attention.key_length"))? {
        Some(d) => d,
        None => hidden / heads,
    };
    let vocab = match meta.opt_u64(&key("vocab_size"))? {
        Some(v) => v,
        None => meta.strings("tokenizer.ggml.tokens")?.len() as u64,
    };
    let mut cfg = json!({
        "architectures": [if arch == "qwen2" { "Qwen2ForCausalLM" } else { "LlamaForCausalLM" }],
        "model_type": arch,
        "hidden_size": hidden,
        "intermediate_size": meta.u64(&key("feed_forward_length"))?,
        "num_hidden_layers": meta.u64(&key("block_count"))?,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "vocab_size": vocab,
        "rope_theta": meta.opt_f64(&key("rope.freq_base"))?.unwrap_or(10000.0),
        "rms_norm_eps": meta.opt_f64(&key("attention.layer_norm_rms_epsilon"))?.unwrap_or(1e-6),
        "max_position_embeddings": meta.opt_u64(&key("context_length"))?.unwrap_or(4096),
        "tie_word_embeddings": !has_output,
        "hidden_act": "silu",
    });
    if let Some(scaling) = rope_scaling(meta, arch)? {
        cfg["rope_scaling"] = scaling;
    }
    for (k, v) in [
        ("bos_token_id", "tokenizer.ggml.bos_token_id"),
        ("eos_token_id", "tokenizer.ggml.eos_token_id"),
    ] {
        if let Some(id) = meta.opt_u64(v)? {
            cfg[k] = json!(id);
        }
    }
    Ok(cfg)
}

/// `rope_scaling` from `<arch>.rope.scaling.*`; a type the forward pass does
/// not implement is refused rather than ignored.
fn rope_scaling(meta: &Metadata<'_>, arch: &str) -> Result<Option<Value>> {
    let ty = match meta.get(&format!("{arch}.rope.scaling.type")) {
        None => return Ok(None),
        Some(v) => v.as_str().unwrap_or(""),
    };
    match ty {
        "none" | "" => Ok(None),
        "linear" => {
            let factor = meta
                .opt_f64(&format!("{arch}.rope.scaling.factor"))?
                .unwrap_or(1.0);
            Ok(Some(json!({"rope_type": "linear", "factor": factor})))
        }
        other => Err(Error::Input(format!(
            "{}: {arch}.rope.scaling.type {other:?} is not supported",
            meta.file
        ))),
    }
}

/// The token strings of the vocabulary and their GGUF token types.
pub(super) fn vocab<'a>(meta: &Metadata<'a>) -> Result<(Vec<&'a str>, Vec<i64>)> {
    let tokens = meta.strings("tokenizer.ggml.tokens")?;
    let types = match meta.opt_array("tokenizer.ggml.token_type")? {
        None => vec![1; tokens.len()],
        Some(a) => a.iter().map(|v| v.as_i64().unwrap_or(1)).collect(),
    };
    if types.len() != tokens.len() {
        return Err(Error::Input(format!(
            "{}: tokenizer.ggml.token_type has {} entries for {} tokens",
            meta.file,
            types.len(),
            tokens.len()
        )));
    }
    Ok((tokens, types))
}

/// GGUF token types: 3 is a control token, 4 user-defined.
const TOKEN_CONTROL: i64 = 3;
const TOKEN_USER_DEFINED: i64 = 4;

pub(super) fn added_tokens(tokens: &[&str], types: &[i64]) -> Vec<Value> {
    tokens
        .iter()
        .zip(types)
        .enumerate()
        .filter(|(_, (_, &t))| t == TOKEN_CONTROL || t == TOKEN_USER_DEFINED)
        .map(|(id, (content, &t))| {
            json!({
                "id": id, "content": content, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": t != TOKEN_CONTROL, "special": t == TOKEN_CONTROL,
            })
        })
        .collect()
}

/// The `tokenizer.json` of a GGUF file's `tokenizer.ggml.*` vocabulary
/// (`gpt2`: byte-level BPE with its merges; `llama`: SentencePiece, see
/// [`super::gguf_spm`]).
pub fn tokenizer_json(meta: &Metadata<'_>) -> Result<Value> {
    let model = meta.str("tokenizer.ggml.model")?;
    if model == "llama" {
        return super::gguf_spm::spm_tokenizer_json(meta);
    }
    if model != "gpt2" {
        return Err(Error::Input(format!(
            "{}: tokenizer.ggml.model {model:?} is not supported (byte-level BPE, \"gpt2\", \
             and SentencePiece, \"llama\", are); give token ids instead",
            meta.file
        )));
    }
    let (tokens, types) = vocab(meta)?;
    let merges = meta.strings("tokenizer.ggml.merges")?;
    let vocab: Map<String, Value> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.to_string(), json!(i)))
        .collect();
    let add_bos = meta
        .get("tokenizer.ggml.add_bos_token")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let post = match (add_bos, meta.opt_u64("tokenizer.ggml.bos_token_id")?) {
        (true, Some(bos)) => {
            let bos_tok = tokens.get(bos as usize).copied().unwrap_or_default();
            json!({"type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": bos_tok, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": bos_tok, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                         {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {bos_tok: {"id": bos_tok, "ids": [bos], "tokens": [bos_tok]}}})
        }
        _ => {
            json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": true})
        }
    };
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added_tokens(&tokens, &types),
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": post,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": merges,
        },
    }))
}

/// `tokenizer.chat_template`, where the file has one.
pub fn chat_template(meta: &Metadata<'_>) -> Option<String> {
    meta.get("tokenizer.chat_template")
        .and_then(Value::as_str)
        .map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_every_llama_tensor_name() {
        let cases = [
            ("token_embd.weight", "model.embed_tokens.weight"),
            ("output_norm.weight", "model.norm.weight"),
            ("output.weight", "lm_head.weight"),
            (
                "blk.0.attn_norm.weight",
                "model.layers.0.input_layernorm.weight",
            ),
            (
                "blk.12.ffn_norm.weight",
                "model.layers.12.post_attention_layernorm.weight",
            ),
            (
                "blk.3.attn_q.weight",
                "model.layers.3.self_attn.q_proj.weight",
            ),
            ("blk.3.attn_q.bias", "model.layers.3.self_attn.q_proj.bias"),
            (
                "blk.3.attn_k.weight",
                "model.layers.3.self_attn.k_proj.weight",
            ),
            ("blk.3.attn_v.bias", "model.layers.3.self_attn.v_proj.bias"),
            (
                "blk.3.attn_output.weight",
                "model.layers.3.self_attn.o_proj.weight",
            ),
            (
                "blk.7.ffn_gate.weight",
                "model.layers.7.mlp.gate_proj.weight",
            ),
            ("blk.7.ffn_up.weight", "model.layers.7.mlp.up_proj.weight"),
            (
                "blk.7.ffn_down.weight",
                "model.layers.7.mlp.down_proj.weight",
            ),
        ];
        for (g, hf) in cases {
            assert_eq!(hf_tensor_name(g).as_deref(), Some(hf), "{g}");
            assert_eq!(gguf_tensor_name(hf).as_deref(), Some(g), "{hf}");
        }
        for bad in [
            "model.layers.x.self_attn.q_proj.weight",
            "model.layers.1.self_attn.rotary_emb.inv_freq",
            "model.embed_tokens",
        ] {
            assert_eq!(gguf_tensor_name(bad), None, "{bad}");
        }
        for bad in [
            "blk.x.attn_q.weight",
            "blk.1.attn_q.scale",
            "rope_freqs.weight",
            "blk.1",
        ] {
            assert_eq!(hf_tensor_name(bad), None, "{bad}");
        }
    }

    fn meta_map(pairs: &[(&str, Value)]) -> Map<String, Value> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect()
    }

    #[test]
    fn config_from_llama_metadata() {
        let m = meta_map(&[
            ("general.architecture", json!("llama")),
            ("llama.embedding_length", json!(576)),
            ("llama.feed_forward_length", json!(1536)),
            ("llama.block_count", json!(30)),
            ("llama.attention.head_count", json!(9)),
            ("llama.attention.head_count_kv", json!(3)),
            ("llama.rope.freq_base", json!(100000.0)),
            ("llama.attention.layer_norm_rms_epsilon", json!(1e-5)),
            ("llama.context_length", json!(8192)),
            ("llama.vocab_size", json!(49152)),
            ("tokenizer.ggml.eos_token_id", json!(2)),
        ]);
        let cfg = hf_config(&Metadata::new("m.gguf", &m), false).unwrap();
        assert_eq!(cfg["hidden_size"], 576);
        assert_eq!(cfg["num_key_value_heads"], 3);
        assert_eq!(cfg["head_dim"], 64);
        assert_eq!(cfg["tie_word_embeddings"], true);
        assert_eq!(cfg["eos_token_id"], 2);
        assert_eq!(cfg["rope_theta"], 100000.0);
    }

    #[test]
    fn refuses_what_it_cannot_run() {
        let mut m = meta_map(&[("general.architecture", json!("gemma3"))]);
        let e = hf_config(&Metadata::new("g.gguf", &m), true).unwrap_err();
        assert!(
            e.to_string().contains("g.gguf") && e.to_string().contains("gemma3"),
            "{e}"
        );
        m.insert("general.architecture".into(), json!("llama"));
        let e = hf_config(&Metadata::new("g.gguf", &m), true).unwrap_err();
        assert!(e.to_string().contains("llama.embedding_length"), "{e}");
        m.insert("tokenizer.ggml.model".into(), json!("bert"));
        let e = tokenizer_json(&Metadata::new("g.gguf", &m)).unwrap_err();
        assert!(e.to_string().contains("tokenizer.ggml.model"), "{e}");
    }
}
