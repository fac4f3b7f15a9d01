//! The model's shape and hyper-parameters, read from `config.json`.

use serde_json::Value;

use crate::{Error, ModelIndex, Result};

/// Llama 3 RoPE frequency scaling (`rope_scaling.rope_type == "llama3"`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Llama3Scaling {
    /// `factor`.
    pub factor: f64,
    /// `low_freq_factor`.
    pub low_freq_factor: f64,
    /// `high_freq_factor`.
    pub high_freq_factor: f64,
    /// `original_max_position_embeddings`.
    pub original_max_positions: f64,
}

/// What the forward pass needs to know about a Qwen2 or Llama model.
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
    /// RoPE base.
    pub rope_theta: f64,
    /// Llama 3 frequency scaling, when configured.
    pub rope_scaling: Option<Llama3Scaling>,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f32,
    /// `tie_word_embeddings`.
    pub tie_word_embeddings: bool,
    /// `max_position_embeddings`.
    pub max_positions: usize,
    /// Token ids that end generation (`eos_token_id` of generation_config.json
    /// and config.json; may be several).
    pub eos_token_ids: Vec<u32>,
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

    /// Parses a `config.json` value; the error says which key is wrong.
    pub fn from_json(v: &Value) -> std::result::Result<ModelConfig, String> {
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
        let get = |k: &str| -> std::result::Result<usize, String> {
            v.get(k)
                .and_then(Value::as_u64)
                .filter(|&n| n > 0)
                .map(|n| n as usize)
                .ok_or_else(|| format!("config.json: {k} is missing or not a positive integer"))
        };
        let hidden = get("hidden_size")?;
        let heads = get("num_attention_heads")?;
        let kv_heads = match v.get("num_key_value_heads") {
            Some(Value::Null) | None => heads,
            Some(_) => get("num_key_value_heads")?,
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
            Some(_) => get("head_dim")?,
        };
        if head_dim % 2 != 0 || head_dim > 512 {
            return Err(format!(
                "config.json: head_dim {head_dim} must be even and at most 512"
            ));
        }
        // transformers 5 writes `rope_parameters` {rope_type, rope_theta, ...}
        // where older versions wrote `rope_theta` and `rope_scaling`.
        let rope_params = v.get("rope_parameters").filter(|p| p.is_object());
        let rope_theta = v
            .get("rope_theta")
            .and_then(Value::as_f64)
            .or_else(|| {
                rope_params
                    .and_then(|p| p.get("rope_theta"))
                    .and_then(Value::as_f64)
            })
            .unwrap_or(10000.0);
        let scaling = match v.get("rope_scaling") {
            None | Some(Value::Null) => rope_params,
            Some(s) => Some(s),
        };
        let rope_scaling = match scaling {
            None => None,
            Some(s) => {
                let kind = s
                    .get("rope_type")
                    .or_else(|| s.get("type"))
                    .and_then(Value::as_str)
                    .unwrap_or("");
                match kind {
                    "" | "default" => None,
                    "llama3" => {
                        let f = |k: &str| {
                            s.get(k)
                                .and_then(Value::as_f64)
                                .ok_or_else(|| format!("config.json: rope_scaling.{k} is missing"))
                        };
                        Some(Llama3Scaling {
                            factor: f("factor")?,
                            low_freq_factor: f("low_freq_factor")?,
                            high_freq_factor: f("high_freq_factor")?,
                            original_max_positions: f("original_max_position_embeddings")?,
                        })
                    }
                    other => {
                        return Err(format!(
                        "config.json: rope_scaling type {other:?} is not supported (only llama3)"
                    ))
                    }
                }
            }
        };
        Ok(ModelConfig {
            model_type,
            hidden,
            intermediate: get("intermediate_size")?,
            layers: get("num_hidden_layers")?,
            heads,
            kv_heads,
            head_dim,
            vocab: get("vocab_size")?,
            rope_theta,
            rope_scaling,
            rms_norm_eps: v
                .get("rms_norm_eps")
                .and_then(Value::as_f64)
                .unwrap_or(1e-6) as f32,
            tie_word_embeddings: v
                .get("tie_word_embeddings")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            max_positions: v
                .get("max_position_embeddings")
                .and_then(Value::as_u64)
                .unwrap_or(4096) as usize,
            eos_token_ids: token_ids(v.get("eos_token_id")),
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
    /// computes them in f32, with Llama 3 scaling applied when configured.
    pub fn inv_freq(&self) -> Vec<f32> {
        let half = self.head_dim / 2;
        (0..half)
            .map(|i| {
                let exp = (2 * i) as f32 / self.head_dim as f32;
                let f = 1.0f32 / (self.rope_theta as f32).powf(exp);
                match &self.rope_scaling {
                    None => f,
                    Some(s) => llama3_scale(f, s),
                }
            })
            .collect()
    }

    /// RoPE cosines and sines for positions `0..len`: two `[len, head_dim/2]`
    /// row-major f32 tables.
    pub fn rope_tables(&self, len: usize) -> (Vec<f32>, Vec<f32>) {
        let inv = self.inv_freq();
        let half = inv.len();
        let mut cos = Vec::with_capacity(len * half);
        let mut sin = Vec::with_capacity(len * half);
        for p in 0..len {
            for &f in &inv {
                let a = p as f32 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        (cos, sin)
    }
}

/// transformers' `_compute_llama3_parameters`, for one frequency.
fn llama3_scale(inv_freq: f32, s: &Llama3Scaling) -> f32 {
    let low_wavelen = s.original_max_positions / s.low_freq_factor;
    let high_wavelen = s.original_max_positions / s.high_freq_factor;
    let f = inv_freq as f64;
    let wavelen = 2.0 * std::f64::consts::PI / f;
    let out = if wavelen > low_wavelen {
        f / s.factor
    } else if wavelen < high_wavelen {
        f
    } else {
        let smooth = (s.original_max_positions / wavelen - s.low_freq_factor)
            / (s.high_freq_factor - s.low_freq_factor);
        (1.0 - smooth) * f / s.factor + smooth * f
    };
    out as f32
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
}
