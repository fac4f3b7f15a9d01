//! config.json options on the host backend: each one the forward pass
//! implements against a plain f64 reference computed here, and each one it
//! does not (or a checkpoint that disagrees with the config) refused at load
//! with an error naming the key and the tensor.

use std::collections::BTreeMap;
use std::path::Path;

use layer_streamer::llm::reference::rel_l2;
use layer_streamer::llm::{LlamaModel, ModelOptions, Precision};
use layer_streamer::{Device, LayerStreamer, ModelIndex};
use rand::rngs::StdRng;
use rand::Rng;
use serde_json::{json, Value};

mod common;

/// The model's sizes and options, as the test writes them into config.json.
#[derive(Clone)]
struct Spec {
    llama: bool,
    hidden: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    inter: usize,
    vocab: usize,
    layers: usize,
    attention_bias: bool,
    mlp_bias: bool,
    tie: bool,
    rope: Value,
}

impl Spec {
    fn llama() -> Spec {
        Spec {
            llama: true,
            hidden: 64,
            heads: 4,
            kv_heads: 2,
            head_dim: 16,
            inter: 96,
            vocab: 128,
            layers: 2,
            attention_bias: false,
            mlp_bias: false,
            tie: false,
            rope: Value::Null,
        }
    }

    fn config(&self) -> Value {
        json!({
            "model_type": if self.llama { "llama" } else { "qwen2" },
            "architectures": [if self.llama { "LlamaForCausalLM" } else { "Qwen2ForCausalLM" }],
            "hidden_size": self.hidden, "intermediate_size": self.inter,
            "num_hidden_layers": self.layers, "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads, "head_dim": self.head_dim,
            "vocab_size": self.vocab, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "rope_scaling": self.rope, "max_position_embeddings": 64,
            "hidden_act": "silu", "tie_word_embeddings": self.tie,
            "attention_bias": self.attention_bias, "mlp_bias": self.mlp_bias,
        })
    }

    /// Every tensor and its shape, written independently of the library's list.
    fn tensors(&self) -> Vec<(String, Vec<usize>)> {
        let (h, q, kv, i) = (
            self.hidden,
            self.heads * self.head_dim,
            self.kv_heads * self.head_dim,
            self.inter,
        );
        let mut v = vec![("model.embed_tokens.weight".to_string(), vec![self.vocab, h])];
        let qkv_bias = !self.llama || self.attention_bias;
        for l in 0..self.layers {
            let mut add = |k: &str, s: Vec<usize>| v.push((format!("model.layers.{l}.{k}"), s));
            add("input_layernorm.weight", vec![h]);
            add("post_attention_layernorm.weight", vec![h]);
            for (p, rows) in [("q", q), ("k", kv), ("v", kv)] {
                add(&format!("self_attn.{p}_proj.weight"), vec![rows, h]);
                if qkv_bias {
                    add(&format!("self_attn.{p}_proj.bias"), vec![rows]);
                }
            }
            add("self_attn.o_proj.weight", vec![h, q]);
            add("mlp.gate_proj.weight", vec![i, h]);
            add("mlp.up_proj.weight", vec![i, h]);
            add("mlp.down_proj.weight", vec![h, i]);
            if self.llama && self.attention_bias {
                add("self_attn.o_proj.bias", vec![h]);
            }
            if self.llama && self.mlp_bias {
                add("mlp.gate_proj.bias", vec![i]);
                add("mlp.up_proj.bias", vec![i]);
                add("mlp.down_proj.bias", vec![h]);
            }
        }
        v.push(("model.norm.weight".to_string(), vec![h]));
        if !self.tie {
            v.push(("lm_head.weight".to_string(), vec![self.vocab, h]));
        }
        v
    }
}

type Weights = BTreeMap<String, (Vec<usize>, Vec<f32>)>;

/// Random f32 weights: norms near 1, biases up to ±0.5, matrices scaled by
/// their input width.
fn weights(spec: &Spec, rng: &mut StdRng) -> Weights {
    spec.tensors()
        .into_iter()
        .map(|(name, shape)| {
            let n: usize = shape.iter().product();
            let vals: Vec<f32> = if name.contains("norm") {
                (0..n).map(|_| 1.0 + rng.gen_range(-0.1..0.1)).collect()
            } else if name.ends_with(".bias") {
                (0..n).map(|_| rng.gen_range(-0.5..0.5)).collect()
            } else {
                let s = 1.7 / (shape[1] as f32).sqrt();
                (0..n).map(|_| rng.gen_range(-s..s)).collect()
            };
            (name, (shape, vals))
        })
        .collect()
}

fn write(dir: &Path, config: &Value, w: &Weights) {
    let bytes: BTreeMap<&str, Vec<u8>> = w
        .iter()
        .map(|(k, (_, v))| (k.as_str(), v.iter().flat_map(|x| x.to_le_bytes()).collect()))
        .collect();
    let views: Vec<(&str, safetensors::tensor::TensorView<'_>)> = w
        .iter()
        .map(|(k, (shape, _))| {
            let view = safetensors::tensor::TensorView::new(
                safetensors::Dtype::F32,
                shape.clone(),
                &bytes[k.as_str()],
            )
            .unwrap();
            (k.as_str(), view)
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
}

fn streamer(dir: &Path) -> LayerStreamer {
    let index = ModelIndex::open(dir).unwrap();
    LayerStreamer::builder(&index)
        .device(Device::Host)
        .file_dtype()
        .reader_threads(1)
        .build()
        .unwrap()
}

const OPTS: ModelOptions = ModelOptions {
    max_batch: 1,
    max_len: 16,
    max_tokens: 16,
    precision: Precision::Fast,
    kv_offload: false,
};

/// Loads the model in `dir`, expecting an error whose text has every word.
fn expect_load_error(dir: &Path, max_len: usize, words: &[&str]) {
    let s = streamer(dir);
    let opts = ModelOptions { max_len, ..OPTS };
    let e = match LlamaModel::load(&s, opts) {
        Ok(_) => panic!("loading should fail with {words:?}"),
        Err(e) => e.to_string(),
    };
    for w in words {
        assert!(e.contains(w), "{w:?} missing from: {e}");
    }
}

#[path = "models_config/reference.rs"]
mod reference;

/// The host forward pass against the reference: a prompt, then two tokens
/// through the KV cache.
fn matches_reference(test: &str, spec: &Spec) {
    let mut rng = common::rng(test);
    let dir = common::tempdir();
    let w = weights(spec, &mut rng);
    let config = spec.config();
    write(dir.path(), &config, &w);
    let mut s = streamer(dir.path());
    let mut model = LlamaModel::load(&s, OPTS).unwrap();
    let ids: Vec<u32> = (0..7)
        .map(|_| rng.gen_range(0..spec.vocab as u32))
        .collect();
    for (from, to) in [(0, 5), (5, 6), (6, 7)] {
        let got = model.forward(&mut s, &[&ids[from..to]]).unwrap().remove(0);
        let want = reference::logits(&config, &w, &ids[..to]);
        let e = rel_l2(&got, &want);
        assert!(e < 1e-4, "{test}: {to} tokens: rel_l2 {e}");
    }
}

#[test]
fn llama_attention_and_mlp_biases_head_dim_and_linear_rope() {
    let spec = Spec {
        head_dim: 24,
        attention_bias: true,
        mlp_bias: true,
        rope: json!({"rope_type": "linear", "factor": 2.5}),
        ..Spec::llama()
    };
    matches_reference(
        "llama_attention_and_mlp_biases_head_dim_and_linear_rope",
        &spec,
    );
}

#[test]
fn llama3_rope_and_tied_embeddings() {
    let spec = Spec {
        tie: true,
        rope: json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
        ..Spec::llama()
    };
    matches_reference("llama3_rope_and_tied_embeddings", &spec);
}

#[test]
fn qwen2_qkv_biases_and_mha() {
    let spec = Spec {
        llama: false,
        kv_heads: 4,
        ..Spec::llama()
    };
    matches_reference("qwen2_qkv_biases_and_mha", &spec);
}

/// A model whose config.json is edited after writing.
fn edited(spec: &Spec, rng: &mut StdRng, edit: impl FnOnce(&mut Value)) -> tempfile::TempDir {
    let dir = common::tempdir();
    let w = weights(spec, rng);
    let mut config = spec.config();
    edit(&mut config);
    write(dir.path(), &config, &w);
    dir
}

#[test]
fn shapes_that_disagree_with_the_config_are_refused_at_load() {
    let mut rng = common::rng("shapes_that_disagree_with_the_config_are_refused_at_load");
    let spec = Spec::llama();
    let dir = edited(&spec, &mut rng, |c| c["intermediate_size"] = json!(100));
    expect_load_error(
        dir.path(),
        16,
        &[
            "model.layers.0.mlp.gate_proj.weight",
            "[96, 64]",
            "[100, 64]",
            "intermediate_size",
        ],
    );
    let dir = edited(&spec, &mut rng, |c| c["num_attention_heads"] = json!(8));
    expect_load_error(
        dir.path(),
        16,
        &[
            "model.layers.0.self_attn.q_proj.weight",
            "[64, 64]",
            "[128, 64]",
            "num_attention_heads",
        ],
    );
    let dir = edited(&spec, &mut rng, |c| c["vocab_size"] = json!(200));
    expect_load_error(
        dir.path(),
        16,
        &["model.embed_tokens.weight", "[200, 64]", "vocab_size"],
    );
}

#[test]
fn biases_and_lm_head_must_match_the_config() {
    let mut rng = common::rng("biases_and_lm_head_must_match_the_config");
    let plain = Spec::llama();
    let dir = edited(&plain, &mut rng, |c| c["mlp_bias"] = json!(true));
    expect_load_error(
        dir.path(),
        16,
        &["model.layers.0.mlp.gate_proj.bias", "missing", "mlp_bias"],
    );
    let biased = Spec {
        attention_bias: true,
        ..Spec::llama()
    };
    let dir = edited(&biased, &mut rng, |c| c["attention_bias"] = json!(false));
    expect_load_error(
        dir.path(),
        16,
        &["_proj.bias", "attention_bias", "disagree"],
    );
    let tied = Spec {
        tie: true,
        ..Spec::llama()
    };
    let dir = edited(&tied, &mut rng, |c| c["tie_word_embeddings"] = json!(false));
    expect_load_error(
        dir.path(),
        16,
        &["lm_head.weight", "missing", "tie_word_embeddings"],
    );
}

#[test]
fn options_not_implemented_are_refused_naming_the_key() {
    let mut rng = common::rng("options_not_implemented_are_refused_naming_the_key");
    let spec = Spec::llama();
    let refused: [(&str, Value, &str); 4] = [
        ("hidden_act", json!("gelu_pytorch_tanh"), "hidden_act"),
        (
            "attn_logit_softcapping",
            json!(50.0),
            "attn_logit_softcapping",
        ),
        (
            "rope_scaling",
            json!({"rope_type": "yarn", "factor": 4.0}),
            "yarn",
        ),
        ("partial_rotary_factor", json!(0.5), "partial_rotary_factor"),
    ];
    for (key, value, word) in refused {
        let dir = edited(&spec, &mut rng, |c| c[key] = value);
        expect_load_error(dir.path(), 16, &["config.json", word]);
    }
    // Sliding windows and dynamic RoPE: fine while sequences stay short enough.
    let qwen = Spec {
        llama: false,
        ..Spec::llama()
    };
    let window = |c: &mut Value| {
        c["use_sliding_window"] = json!(true);
        c["sliding_window"] = json!(12);
        c["max_window_layers"] = json!(1);
    };
    let dir = edited(&qwen, &mut rng, window);
    expect_load_error(dir.path(), 16, &["use_sliding_window", "sliding_window 12"]);
    LlamaModel::load(
        &streamer(dir.path()),
        ModelOptions {
            max_len: 12,
            ..OPTS
        },
    )
    .unwrap();
    let dir = edited(&spec, &mut rng, |c| {
        c["rope_scaling"] = json!({"rope_type": "dynamic", "factor": 2.0});
        c["max_position_embeddings"] = json!(10);
    });
    expect_load_error(dir.path(), 16, &["dynamic", "max_position_embeddings 10"]);
    LlamaModel::load(
        &streamer(dir.path()),
        ModelOptions {
            max_len: 10,
            ..OPTS
        },
    )
    .unwrap();
}
