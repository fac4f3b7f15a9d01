//! The tensors a Qwen2/Llama checkpoint must hold and the shapes
//! `config.json` gives them, checked once at load so that a wrong
//! `intermediate_size` or `num_attention_heads` is an error naming the
//! tensor and the key, not a GEMM size error (on the host) or a read past a
//! slot (on the GPU) in the middle of a pass.

use crate::checkpoint::TensorInfo;
use crate::llm::config::ModelConfig;
use crate::{Error, ModelIndex, Result};

/// One tensor the configuration calls for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expected {
    /// Name within a layer (`self_attn.q_proj.weight`) or full static name.
    pub key: String,
    /// Shape the configuration gives it.
    pub shape: Vec<usize>,
    /// The config.json keys the shape (or the tensor's presence) derives from.
    pub from: &'static str,
}

fn expected(key: &str, shape: Vec<usize>, from: &'static str) -> Expected {
    Expected {
        key: key.to_string(),
        shape,
        from,
    }
}

/// The tensors of every decoder layer, in the order of a forward pass.
pub fn layer_tensors(cfg: &ModelConfig) -> Vec<Expected> {
    let (h, q, kv, i) = (cfg.hidden, cfg.q_dim(), cfg.kv_dim(), cfg.intermediate);
    const Q: &str = "num_attention_heads, head_dim, hidden_size";
    const KV: &str = "num_key_value_heads, head_dim, hidden_size";
    const MLP: &str = "intermediate_size, hidden_size";
    let mut v = vec![
        expected("input_layernorm.weight", vec![h], "hidden_size"),
        expected("self_attn.q_proj.weight", vec![q, h], Q),
        expected("self_attn.k_proj.weight", vec![kv, h], KV),
        expected("self_attn.v_proj.weight", vec![kv, h], KV),
    ];
    if cfg.qkv_bias {
        let from = if cfg.model_type == "qwen2" {
            "model_type qwen2 (q/k/v biases), num_attention_heads, num_key_value_heads, head_dim"
        } else {
            "attention_bias, num_attention_heads, num_key_value_heads, head_dim"
        };
        v.push(expected("self_attn.q_proj.bias", vec![q], from));
        v.push(expected("self_attn.k_proj.bias", vec![kv], from));
        v.push(expected("self_attn.v_proj.bias", vec![kv], from));
    }
    v.push(expected("self_attn.o_proj.weight", vec![h, q], Q));
    if cfg.o_bias {
        v.push(expected(
            "self_attn.o_proj.bias",
            vec![h],
            "attention_bias, hidden_size",
        ));
    }
    v.push(expected(
        "post_attention_layernorm.weight",
        vec![h],
        "hidden_size",
    ));
    v.push(expected("mlp.gate_proj.weight", vec![i, h], MLP));
    v.push(expected("mlp.up_proj.weight", vec![i, h], MLP));
    v.push(expected("mlp.down_proj.weight", vec![h, i], MLP));
    if cfg.mlp_bias {
        let from = "mlp_bias, intermediate_size, hidden_size";
        v.push(expected("mlp.gate_proj.bias", vec![i], from));
        v.push(expected("mlp.up_proj.bias", vec![i], from));
        v.push(expected("mlp.down_proj.bias", vec![h], from));
    }
    v
}

/// Bias keys a layer may hold, and the flag that decides whether it does.
const BIASES: &[(&str, &str)] = &[
    ("self_attn.q_proj.bias", "attention_bias"),
    ("self_attn.k_proj.bias", "attention_bias"),
    ("self_attn.v_proj.bias", "attention_bias"),
    ("self_attn.o_proj.bias", "attention_bias"),
    ("mlp.gate_proj.bias", "mlp_bias"),
    ("mlp.up_proj.bias", "mlp_bias"),
    ("mlp.down_proj.bias", "mlp_bias"),
];

/// The names of the static tensors: embedding, final norm, lm_head (None
/// when tied).
pub fn static_names(index: &ModelIndex, cfg: &ModelConfig) -> (String, String, Option<String>) {
    let first = |names: [&str; 2]| {
        names
            .into_iter()
            .find(|n| index.tensor(n).is_some())
            .unwrap_or(names[0])
            .to_string()
    };
    let embed = first(["model.embed_tokens.weight", "embed_tokens.weight"]);
    let norm = first(["model.norm.weight", "norm.weight"]);
    let head = (!cfg.tie_word_embeddings).then(|| "lm_head.weight".to_string());
    (embed, norm, head)
}

/// Checks that every layer holds exactly the tensors `cfg` calls for (other
/// tensors, such as a stored `rotary_emb.inv_freq`, are ignored; a bias the
/// configuration does not enable is an error), each of the shape `cfg`
/// gives it, and that the statics are there with their shapes.
pub fn check(index: &ModelIndex, cfg: &ModelConfig) -> Result<()> {
    let want = layer_tensors(cfg);
    let prefix = index.layer_prefix();
    for layer in index.layers() {
        let name = |key: &str| format!("{prefix}.{}.{key}", layer.index);
        for e in &want {
            let found = layer.tensors.iter().find(|t| t.key == e.key);
            match found {
                Some(t) => check_shape(index, &t.info, e)?,
                None => return Err(missing(index, &name(&e.key), e.from)),
            }
        }
        if let Some(t) = layer.tensors.iter().find(|t| {
            BIASES.iter().any(|(k, _)| *k == t.key) && !want.iter().any(|e| e.key == t.key)
        }) {
            let flag = BIASES.iter().find(|(k, _)| *k == t.key).map_or("", |b| b.1);
            return Err(Error::model(
                file_of(index, &t.info),
                format!(
                    "tensor {} is in the checkpoint but config.json does not enable it ({flag} \
                     is false or absent{}): the config and the weights disagree",
                    t.info.name,
                    if cfg.model_type == "qwen2" {
                        "; Qwen2 has q/k/v biases only"
                    } else {
                        ""
                    }
                ),
            ));
        }
    }
    check_statics(index, cfg)
}

fn check_statics(index: &ModelIndex, cfg: &ModelConfig) -> Result<()> {
    let (embed, norm, head) = static_names(index, cfg);
    let (v, h) = (cfg.vocab, cfg.hidden);
    let mut statics = vec![
        (embed, expected("", vec![v, h], "vocab_size, hidden_size")),
        (norm, expected("", vec![h], "hidden_size")),
    ];
    if let Some(head) = head {
        statics.push((
            head,
            expected(
                "",
                vec![v, h],
                "tie_word_embeddings false, vocab_size, hidden_size",
            ),
        ));
    }
    for (name, e) in &statics {
        match index.tensor(name) {
            Some(info) => check_shape(index, info, e)?,
            None => return Err(missing(index, name, e.from)),
        }
    }
    Ok(())
}

fn file_of<'a>(index: &'a ModelIndex, info: &TensorInfo) -> &'a std::path::Path {
    index
        .files()
        .get(info.file)
        .map_or(index.dir(), |f| f.path.as_path())
}

fn check_shape(index: &ModelIndex, info: &TensorInfo, e: &Expected) -> Result<()> {
    if info.shape == e.shape {
        return Ok(());
    }
    Err(Error::model(
        file_of(index, info),
        format!(
            "tensor {} has shape {:?} but config.json gives {:?} (from {})",
            info.name, info.shape, e.shape, e.from
        ),
    ))
}

fn missing(index: &ModelIndex, name: &str, from: &str) -> Error {
    Error::model(
        index.dir(),
        format!("tensor {name} is missing from the checkpoint (config.json: {from})"),
    )
}
