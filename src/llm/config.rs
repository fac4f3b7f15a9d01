//! The model's shape and hyper-parameters, read from `config.json`.

use serde_json::Value;

pub use crate::llm::rope::Llama3Scaling;
use crate::llm::rope::{self, RopeScaling};
use crate::{Error, ModelIndex, Result};

/// What the forward pass needs to know about a Qwen2 or Llama model.
///
/// Every `config.json` key that changes the math is either read into a
/// field here and implemented, or refused naming the key:
/// - implemented: the sizes (with `head_dim` free of `hidden_size /
///   num_attention_heads`), `rope_theta` (transformers' default 10000 when
///   absent), `rope_scaling` types `default`, `linear`, `llama3`, and
///   `dynamic` up to `max_position_embeddings`, `rms_norm_eps`,
///   `tie_word_embeddings` (when true the embedding is the head, as in
///   transformers, whatever `lm_head.weight` holds), Llama's
///   `attention_bias` and `mlp_bias` (host backend only; the CUDA model
///   refuses them at load), Qwen2's q/k/v biases;
/// - refused by [`ModelConfig::from_json`]: `hidden_act` other than silu,
///   other `rope_scaling` types (yarn, longrope, ...),
///   `partial_rotary_factor` below 1, `attn_logit_softcapping`,
///   `final_logit_softcapping`;
/// - refused at load for the sizes asked for
///   ([`ModelConfig::check_max_len`]): Qwen2's sliding window
///   (`use_sliding_window`, `sliding_window`, `max_window_layers`,
///   `layer_types`) when `max_len` exceeds it, `dynamic` RoPE past
///   `max_position_embeddings`;
/// - checked at load against the checkpoint: every tensor's shape, and
///   which biases and `lm_head.weight` exist (see [`crate::llm::layout`]).
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// `model_type`: `qwen2` or `llama`.
    pub model_type: String,
    /// Model width.
    pub hidden: usize,
    /// MLP width.
    pub intermediate: usize,
    /// Decoder layers.
    pub layers: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (GQA when fewer than `heads`, MQA when 1).
    pub kv_heads: usize,
    /// Width of one head (`head_dim`, else `hidden / heads`).
    pub head_dim: usize,
    /// Vocabulary size.
    pub vocab: usize,
    /// RoPE base (`rope_theta`; transformers' default 10000 when absent).
    pub rope_theta: f64,
    /// RoPE frequency scaling (`rope_scaling` or `rope_parameters`).
    pub rope_scaling: RopeScaling,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f32,
    /// `tie_word_embeddings`.
    pub tie_word_embeddings: bool,
    /// `max_position_embeddings`.
    pub max_positions: usize,
    /// Token ids that end generation (`eos_token_id` of generation_config.json
    /// and config.json; may be several).
    pub eos_token_ids: Vec<u32>,
    /// The q/k/v projections have biases (always for Qwen2; `attention_bias`
    /// for Llama).
    pub qkv_bias: bool,
    /// The output projection has a bias (`attention_bias` for Llama).
    pub o_bias: bool,
    /// The gate/up/down projections have biases (`mlp_bias` for Llama).
    pub mlp_bias: bool,
    /// Sliding-window attention on some layer (`use_sliding_window` with
    /// `sliding_window` and `max_window_layers`, or `layer_types`): the
    /// window. Not implemented: the model refuses a `max_len` past it.
    pub sliding_window: Option<usize>,
    /// RoPE pairs neighbouring elements of a head (GPT-J style) instead of
    /// its two halves: the q/k rows of a llama-architecture GGUF file are
    /// stored in that order ([`ModelIndex::rope_interleaved`]).
    pub rope_interleaved: bool,
}

impl ModelConfig {
    /// Reads the configuration of the model in `index` (its `config.json`, and
    /// `generation_config.json` for end-of-sequence ids when present).
    pub fn from_model(index: &ModelIndex) -> Result<ModelConfig> {
        let path = index.dir().join("config.json");
        let v = index
            .config()
            .ok_or_else(|| Error::model(&path, "config.json is missing or unreadable"))?;
        let mut cfg = ModelConfig::from_json(v).map_err(|m| Error::model(&path, m))?;
        cfg.rope_interleaved = index.rope_interleaved();
        let gen_path = index.dir().join("generation_config.json");
        if let Ok(text) = std::fs::read_to_string(&gen_path) {
            if let Ok(g) = serde_json::from_str::<Value>(&text) {
                for id in token_ids(g.get("eos_token_id")) {
                    if !cfg.eos_token_ids.contains(&id) {
                        cfg.eos_token_ids.push(id);
                    }
                }
            }
        }
        Ok(cfg)
    }

    /// Parses a `config.json` value; the error says which key is wrong,
    /// including keys that change the math in a way the forward pass does
    /// not implement.
    pub fn from_json(v: &Value) -> std::result::Result<ModelConfig, String> {
        let model_type = check_architecture(v)?;
        refuse_unimplemented(v)?;
        let (heads, kv_heads, head_dim) = attention_shape(v)?;
        let (rope_theta, rope_scaling) = rope(v)?;
        let llama = model_type == "llama";
        let flag = |k: &str| flag(v, k);
        let layers = positive(v, "num_hidden_layers")?;
        Ok(ModelConfig {
            hidden: positive(v, "hidden_size")?,
            intermediate: positive(v, "intermediate_size")?,
            layers,
            heads,
            kv_heads,
            head_dim,
            vocab: positive(v, "vocab_size")?,
            rope_theta,
            rope_scaling,
            rms_norm_eps: number(v, "rms_norm_eps")?.unwrap_or(1e-6) as f32,
            tie_word_embeddings: flag("tie_word_embeddings")?,
            max_positions: match v.get("max_position_embeddings") {
                None | Some(Value::Null) => 4096,
                Some(_) => positive(v, "max_position_embeddings")?,
            },
            eos_token_ids: token_ids(v.get("eos_token_id")),
            qkv_bias: !llama || flag("attention_bias")?,
            o_bias: llama && flag("attention_bias")?,
            mlp_bias: llama && flag("mlp_bias")?,
            sliding_window: if llama {
                None
            } else {
                sliding_window(v, layers)?
            },
            model_type,
            rope_interleaved: false,
        })
    }

    /// FLOPs of one token through every layer's projections (q, k, v, o and
    /// the three MLP matrices), two per multiply-add; attention and the
    /// lm_head are not counted.
    pub fn projection_flops_per_token(&self) -> f64 {
        let per_layer = self.hidden * (self.q_dim() + 2 * self.kv_dim())
            + self.q_dim() * self.hidden
            + 3 * self.hidden * self.intermediate;
        2.0 * per_layer as f64 * self.layers as f64
    }

    /// Width of the query projection's output.
    pub fn q_dim(&self) -> usize {
        self.heads * self.head_dim
    }

    /// Width of the key (and value) projection's output.
    pub fn kv_dim(&self) -> usize {
        self.kv_heads * self.head_dim
    }

    /// RoPE inverse frequencies (`head_dim / 2` of them), as transformers
    /// computes them in f32, with the configured scaling applied.
    pub fn inv_freq(&self) -> Vec<f32> {
        rope::inv_freq(self.head_dim, self.rope_theta, &self.rope_scaling)
    }

    /// RoPE cosines and sines for positions `0..len`: two `[len, head_dim/2]`
    /// row-major f32 tables.
    pub fn rope_tables(&self, len: usize) -> (Vec<f32>, Vec<f32>) {
        rope::tables(&self.inv_freq(), len)
    }

    /// Checks what the configuration allows against the sizes a model is
    /// loaded for: sliding-window attention and dynamic RoPE scaling are only
    /// implemented where they do not change the math (sequences no longer
    /// than the window, or than the original context).
    pub fn check_max_len(&self, max_len: usize) -> std::result::Result<(), String> {
        if let Some(w) = self.sliding_window.filter(|&w| max_len > w) {
            return Err(format!(
                "config.json: use_sliding_window with sliding_window {w}: sliding-window \
                 attention is not implemented, and sequences of max_len {max_len} would reach \
                 past the window (load with max_len <= {w})"
            ));
        }
        if matches!(self.rope_scaling, RopeScaling::Dynamic { .. }) && max_len > self.max_positions
        {
            return Err(format!(
                "config.json: rope_scaling.rope_type \"dynamic\" changes the frequencies past \
                 max_position_embeddings {}, which is not implemented (load with max_len <= {})",
                self.max_positions, self.max_positions
            ));
        }
        Ok(())
    }
}

/// `model_type` and `architectures`: Llama or Qwen2.
fn check_architecture(v: &Value) -> std::result::Result<String, String> {
    let model_type = v
        .get("model_type")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    if !matches!(model_type.as_str(), "llama" | "qwen2") {
        return Err(format!(
            "unsupported architecture: model_type {model_type:?} (supported: llama, qwen2)"
        ));
    }
    if let Some(archs) = v.get("architectures").and_then(Value::as_array) {
        let ok = archs.iter().filter_map(Value::as_str).any(|a| {
            matches!(
                a,
                "LlamaForCausalLM" | "Qwen2ForCausalLM" | "MistralForCausalLM"
            )
        });
        if !ok {
            return Err(format!(
                "unsupported architecture {archs:?}: expected LlamaForCausalLM or Qwen2ForCausalLM"
            ));
        }
    }
    Ok(model_type)
}

/// Refuses keys whose values change the math in ways not implemented.
fn refuse_unimplemented(v: &Value) -> std::result::Result<(), String> {
    for key in ["hidden_act", "hidden_activation"] {
        match v.get(key) {
            None | Some(Value::Null) => {}
            Some(Value::String(a)) if a == "silu" || a == "swish" => {}
            Some(other) => {
                return Err(format!(
                    "config.json: {key} {other} is not implemented (only silu)"
                ))
            }
        }
    }
    for key in ["attn_logit_softcapping", "final_logit_softcapping"] {
        if let Some(x) = v.get(key).filter(|x| !x.is_null()) {
            return Err(format!("config.json: {key} {x} is not implemented"));
        }
    }
    let params = v.get("rope_parameters");
    for p in [Some(v), v.get("rope_scaling"), params]
        .into_iter()
        .flatten()
    {
        if let Some(f) = p.get("partial_rotary_factor").filter(|f| !f.is_null()) {
            if f.as_f64() != Some(1.0) {
                return Err(format!(
                    "config.json: partial_rotary_factor {f} is not implemented (only 1)"
                ));
            }
        }
    }
    Ok(())
}

/// `(num_attention_heads, num_key_value_heads, head_dim)`.
fn attention_shape(v: &Value) -> std::result::Result<(usize, usize, usize), String> {
    let hidden = positive(v, "hidden_size")?;
    let heads = positive(v, "num_attention_heads")?;
    let kv_heads = match v.get("num_key_value_heads") {
        Some(Value::Null) | None => heads,
        Some(_) => positive(v, "num_key_value_heads")?,
    };
    if heads % kv_heads != 0 {
        return Err(format!(
            "config.json: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}"
        ));
    }
    let head_dim = match v.get("head_dim") {
        Some(Value::Null) | None => {
            if hidden % heads != 0 {
                return Err(format!(
                    "config.json: hidden_size {hidden} is not a multiple of num_attention_heads {heads}"
                ));
            }
            hidden / heads
        }
        Some(_) => positive(v, "head_dim")?,
    };
    if head_dim % 2 != 0 || head_dim > 512 {
        return Err(format!(
            "config.json: head_dim {head_dim} must be even and at most 512"
        ));
    }
    Ok((heads, kv_heads, head_dim))
}

/// `rope_theta` and the scaling. transformers 5 writes `rope_parameters`
/// {rope_type, rope_theta, ...} where older versions wrote `rope_theta` and
/// `rope_scaling`.
fn rope(v: &Value) -> std::result::Result<(f64, RopeScaling), String> {
    let params = v.get("rope_parameters").filter(|p| p.is_object());
    let theta = match number(v, "rope_theta")? {
        Some(t) => Some(t),
        None => params
            .map(|p| number(p, "rope_theta"))
            .transpose()?
            .flatten(),
    }
    .unwrap_or(10000.0);
    if !(theta > 0.0 && theta.is_finite()) {
        return Err(format!(
            "config.json: rope_theta {theta} is not a positive number"
        ));
    }
    let scaling = match v.get("rope_scaling") {
        None | Some(Value::Null) => params,
        Some(s) => Some(s),
    };
    let scaling = match scaling {
        None => RopeScaling::None,
        Some(s) if s.is_object() => RopeScaling::parse(s)?,
        Some(other) => {
            return Err(format!(
                "config.json: rope_scaling {other} is not an object"
            ))
        }
    };
    Ok((theta, scaling))
}

/// Qwen2's sliding window, when any layer uses it.
fn sliding_window(v: &Value, layers: usize) -> std::result::Result<Option<usize>, String> {
    let window = match v.get("sliding_window") {
        None | Some(Value::Null) => return Ok(None),
        Some(_) => positive(v, "sliding_window")?,
    };
    let used = match v.get("layer_types").and_then(Value::as_array) {
        Some(types) => types
            .iter()
            .any(|t| t.as_str() == Some("sliding_attention")),
        None => {
            let first = match v.get("max_window_layers") {
                None | Some(Value::Null) => 28,
                Some(_) => positive(v, "max_window_layers")?,
            };
            flag(v, "use_sliding_window")? && first < layers
        }
    };
    Ok(used.then_some(window))
}

/// A positive integer key.
fn positive(v: &Value, k: &str) -> std::result::Result<usize, String> {
    v.get(k)
        .and_then(Value::as_u64)
        .filter(|&n| n > 0)
        .map(|n| n as usize)
        .ok_or_else(|| format!("config.json: {k} is missing or not a positive integer"))
}

/// An optional number key (absent or null: `None`).
fn number(v: &Value, k: &str) -> std::result::Result<Option<f64>, String> {
    match v.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => x
            .as_f64()
            .map(Some)
            .ok_or_else(|| format!("config.json: {k} {x} is not a number")),
    }
}

/// An optional boolean key (absent or null: false).
fn flag(v: &Value, k: &str) -> std::result::Result<bool, String> {
    match v.get(k) {
        None | Some(Value::Null) => Ok(false),
        Some(x) => x
            .as_bool()
            .ok_or_else(|| format!("config.json: {k} {x} is not true or false")),
    }
}

/// An `eos_token_id`-style value: a number, a list of numbers, or nothing.
fn token_ids(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|n| vec![n as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(Value::as_u64)
            .map(|n| n as u32)
            .collect(),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn base() -> Value {
        json!({
            "model_type": "llama", "architectures": ["LlamaForCausalLM"],
            "hidden_size": 256, "intermediate_size": 704, "num_hidden_layers": 3,
            "num_attention_heads": 4, "num_key_value_heads": 1, "vocab_size": 1024,
            "rope_theta": 500000.0, "eos_token_id": [5, 6]
        })
    }

    #[test]
    fn parses_gqa_and_defaults() {
        let c = ModelConfig::from_json(&base()).unwrap();
        assert_eq!((c.heads, c.kv_heads, c.head_dim), (4, 1, 64));
        assert_eq!(c.eos_token_ids, vec![5, 6]);
        assert!(!c.tie_word_embeddings);
        let mut v = base();
        v["head_dim"] = json!(32);
        assert_eq!(ModelConfig::from_json(&v).unwrap().q_dim(), 128);
    }

    #[test]
    fn rejects_other_architectures() {
        let mut v = base();
        v["model_type"] = json!("gpt2");
        assert!(ModelConfig::from_json(&v)
            .unwrap_err()
            .contains("unsupported architecture"));
        let mut v = base();
        v["architectures"] = json!(["LlamaForSequenceClassification"]);
        assert!(ModelConfig::from_json(&v).is_err());
    }

    #[test]
    fn llama3_scaling_divides_low_frequencies() {
        let mut v = base();
        v["rope_scaling"] = json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192});
        let c = ModelConfig::from_json(&v).unwrap();
        // The transformers 5 spelling of the same configuration.
        let mut v5 = base();
        v5.as_object_mut().unwrap().remove("rope_theta");
        v5["rope_parameters"] = json!({"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192});
        assert_eq!(ModelConfig::from_json(&v5).unwrap(), c);
        let plain = ModelConfig::from_json(&base()).unwrap().inv_freq();
        let scaled = c.inv_freq();
        assert_eq!(scaled[0], plain[0]);
        let last = plain.len() - 1;
        assert!((scaled[last] - plain[last] / 8.0).abs() < 1e-12);
    }

    #[test]
    fn keys_that_change_the_math_are_read_or_refused_by_name() {
        let refused = [
            ("hidden_act", json!("gelu"), "hidden_act \"gelu\""),
            ("hidden_activation", json!("relu"), "hidden_activation"),
            (
                "attn_logit_softcapping",
                json!(50.0),
                "attn_logit_softcapping 50",
            ),
            (
                "final_logit_softcapping",
                json!(30.0),
                "final_logit_softcapping",
            ),
            (
                "partial_rotary_factor",
                json!(0.5),
                "partial_rotary_factor 0.5",
            ),
            (
                "rope_scaling",
                json!({"rope_type": "yarn", "factor": 4.0}),
                "\"yarn\"",
            ),
            (
                "rope_scaling",
                json!({"rope_type": "longrope"}),
                "\"longrope\"",
            ),
            ("rope_theta", json!("big"), "rope_theta"),
            ("attention_bias", json!("yes"), "attention_bias"),
        ];
        for (key, value, words) in refused {
            let mut v = base();
            v[key] = value.clone();
            let e = ModelConfig::from_json(&v).unwrap_err();
            assert!(e.contains(words), "{key} = {value}: {e}");
        }
        let mut v = base();
        v["hidden_act"] = json!("silu");
        v["attn_logit_softcapping"] = Value::Null;
        v["partial_rotary_factor"] = json!(1.0);
        ModelConfig::from_json(&v).unwrap();
    }

    #[test]
    fn biases_follow_the_architecture_and_its_flags() {
        let c = ModelConfig::from_json(&base()).unwrap();
        assert_eq!((c.qkv_bias, c.o_bias, c.mlp_bias), (false, false, false));
        let mut v = base();
        v["attention_bias"] = json!(true);
        v["mlp_bias"] = json!(true);
        let c = ModelConfig::from_json(&v).unwrap();
        assert_eq!((c.qkv_bias, c.o_bias, c.mlp_bias), (true, true, true));
        // Qwen2 has q/k/v biases whatever the flags say (transformers ignores them).
        v["model_type"] = json!("qwen2");
        v["architectures"] = json!(["Qwen2ForCausalLM"]);
        let c = ModelConfig::from_json(&v).unwrap();
        assert_eq!((c.qkv_bias, c.o_bias, c.mlp_bias), (true, false, false));
    }

    #[test]
    fn sliding_window_and_dynamic_rope_bound_max_len() {
        let mut v = base();
        v["model_type"] = json!("qwen2");
        v["architectures"] = json!(["Qwen2ForCausalLM"]);
        v["sliding_window"] = json!(64);
        v["max_window_layers"] = json!(1);
        v["use_sliding_window"] = json!(false);
        assert_eq!(ModelConfig::from_json(&v).unwrap().sliding_window, None);
        v["use_sliding_window"] = json!(true);
        let c = ModelConfig::from_json(&v).unwrap();
        assert_eq!(c.sliding_window, Some(64));
        c.check_max_len(64).unwrap();
        let e = c.check_max_len(65).unwrap_err();
        assert!(
            e.contains("use_sliding_window") && e.contains("sliding_window 64"),
            "{e}"
        );
        // Every layer below max_window_layers: full attention throughout.
        v["max_window_layers"] = json!(3);
        assert_eq!(ModelConfig::from_json(&v).unwrap().sliding_window, None);
        v["layer_types"] = json!(["full_attention", "sliding_attention", "full_attention"]);
        assert_eq!(ModelConfig::from_json(&v).unwrap().sliding_window, Some(64));

        let mut v = base();
        v["max_position_embeddings"] = json!(128);
        v["rope_scaling"] = json!({"type": "dynamic", "factor": 2.0});
        let c = ModelConfig::from_json(&v).unwrap();
        assert_eq!(
            c.inv_freq(),
            ModelConfig::from_json(&base()).unwrap().inv_freq()
        );
        c.check_max_len(128).unwrap();
        let e = c.check_max_len(129).unwrap_err();
        assert!(
            e.contains("\"dynamic\"") && e.contains("max_position_embeddings 128"),
            "{e}"
        );
    }
}
