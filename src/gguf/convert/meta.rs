//! What a converted file declares: the `<arch>.*` metadata from a Hugging
//! Face `config.json` (or a GGUF source's own metadata), and each tensor's
//! stored type.

use std::path::Path;

use serde_json::{Map, Value};

use crate::gguf::MetaValue;
use crate::quant::QuantType;
use crate::{Error, Result};

/// The block types `quantize` writes.
pub const TARGET_TYPES: [QuantType; 5] = [
    QuantType::Q8_0,
    QuantType::Q4_0,
    QuantType::Q4_1,
    QuantType::Q4_K,
    QuantType::Q6_K,
];

/// `general.file_type` (llama.cpp's `llama_ftype`) of a file whose matrices
/// are `ty` by [`tensor_type`]'s rule: with the embedding and output in
/// Q6_K, a Q4_K file is what llama.cpp calls Q4_K_M (Q5_K: Q5_K_M).
pub fn file_type(ty: QuantType) -> u32 {
    match ty {
        QuantType::F32 => 0,
        QuantType::F16 => 1,
        QuantType::Q4_0 => 2,
        QuantType::Q4_1 => 3,
        QuantType::Q8_0 => 7,
        QuantType::Q5_0 => 8,
        QuantType::Q5_1 => 9,
        QuantType::Q4_K => 15,
        QuantType::Q5_K => 17,
        QuantType::Q6_K => 18,
        QuantType::BF16 => 32,
    }
}

/// The stored type of tensor `name` (GGUF name, `dims` innermost first) in a
/// file quantized to `base`, and a note when a row that is not whole blocks
/// forced another type.
///
/// 1-D tensors (norms, biases) stay F32. The token embedding and the output
/// projection take Q6_K (Q8_0 in a Q8_0 file), as llama.cpp's Q4_K_M does for
/// the output: they are the tensors most sensitive to rounding. A row that is
/// not whole blocks falls back as llama.cpp's quantizer does: Q4_K to Q5_0,
/// Q6_K to Q8_0, and a 32-element type to F16.
pub fn tensor_type(base: QuantType, name: &str, dims: &[u64]) -> (QuantType, Option<String>) {
    if dims.len() <= 1 {
        return (QuantType::F32, None);
    }
    let mut ty = match name {
        "token_embd.weight" | "output.weight" if base != QuantType::Q8_0 => QuantType::Q6_K,
        _ => base,
    };
    let row = dims[0];
    let first = ty;
    while !row.is_multiple_of(ty.block_elems()) {
        ty = match ty {
            QuantType::Q4_K => QuantType::Q5_0,
            QuantType::Q5_K => QuantType::Q5_1,
            QuantType::Q6_K => QuantType::Q8_0,
            _ => QuantType::F16,
        };
    }
    let note = (ty != first).then(|| {
        format!(
            "{name}: rows of {row} elements are not whole {first} blocks of {}; stored as {ty}",
            first.block_elems()
        )
    });
    (ty, note)
}

/// A GGUF source's metadata to carry over: all but what describes the old
/// file's encoding (file type, quantization version, alignment, split).
pub(super) fn carried_over(key: &str) -> bool {
    !matches!(
        key,
        "general.file_type" | "general.quantization_version" | "general.alignment"
    ) && !key.starts_with("split.")
}

/// The Hugging Face `config.json` keys that become `<arch>.*` metadata
/// (`path` names the config in errors).
pub fn arch_metadata(
    path: &Path,
    arch: &str,
    cfg: &Map<String, Value>,
) -> Result<Vec<(String, MetaValue)>> {
    let int = |k: &str| -> Result<u64> {
        cfg.get(k)
            .and_then(Value::as_u64)
            .ok_or_else(|| Error::model(path, format!("{k} is missing or not an unsigned integer")))
    };
    let float = |k: &str, default: f64| cfg.get(k).and_then(Value::as_f64).unwrap_or(default);
    let hidden = int("hidden_size")?;
    let heads = int("num_attention_heads")?;
    let kv_heads = cfg
        .get("num_key_value_heads")
        .and_then(Value::as_u64)
        .unwrap_or(heads);
    let head_dim = cfg
        .get("head_dim")
        .and_then(Value::as_u64)
        .unwrap_or(hidden / heads.max(1));
    let key = |k: &str| format!("{arch}.{k}");
    let u32v = |v: u64, k: &str| {
        u32::try_from(v)
            .map(MetaValue::U32)
            .map_err(|_| Error::model(path, format!("{k} = {v} does not fit GGUF's u32")))
    };
    let mut meta = vec![
        (
            key("context_length"),
            u32v(
                int("max_position_embeddings").unwrap_or(4096),
                "max_position_embeddings",
            )?,
        ),
        (key("embedding_length"), u32v(hidden, "hidden_size")?),
        (
            key("block_count"),
            u32v(int("num_hidden_layers")?, "num_hidden_layers")?,
        ),
        (
            key("feed_forward_length"),
            u32v(int("intermediate_size")?, "intermediate_size")?,
        ),
        (
            key("attention.head_count"),
            u32v(heads, "num_attention_heads")?,
        ),
        (
            key("attention.head_count_kv"),
            u32v(kv_heads, "num_key_value_heads")?,
        ),
        (
            key("rope.freq_base"),
            MetaValue::F32(float("rope_theta", 10000.0) as f32),
        ),
        (
            key("attention.layer_norm_rms_epsilon"),
            MetaValue::F32(float("rms_norm_eps", 1e-6) as f32),
        ),
        (key("vocab_size"), u32v(int("vocab_size")?, "vocab_size")?),
        (key("rope.dimension_count"), u32v(head_dim, "head_dim")?),
    ];
    if head_dim * heads != hidden {
        meta.push((key("attention.key_length"), u32v(head_dim, "head_dim")?));
        meta.push((key("attention.value_length"), u32v(head_dim, "head_dim")?));
    }
    meta.extend(rope_scaling(path, arch, cfg)?);
    Ok(meta)
}

/// The `<arch>.rope.scaling.*` metadata of config.json's `rope_scaling`
/// (linear only; none for absent or default scaling).
fn rope_scaling(
    path: &Path,
    arch: &str,
    cfg: &Map<String, Value>,
) -> Result<Vec<(String, MetaValue)>> {
    let s = match cfg.get("rope_scaling") {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(s) => s,
    };
    let ty = s
        .get("rope_type")
        .or_else(|| s.get("type"))
        .and_then(Value::as_str);
    let factor = s.get("factor").and_then(Value::as_f64);
    match (ty, factor) {
        (Some("linear"), Some(f)) => Ok(vec![
            (
                format!("{arch}.rope.scaling.type"),
                MetaValue::String("linear".into()),
            ),
            (
                format!("{arch}.rope.scaling.factor"),
                MetaValue::F32(f as f32),
            ),
        ]),
        (Some("default"), _) => Ok(Vec::new()),
        _ => Err(Error::model(
            path,
            format!("rope_scaling {s} is not supported (linear is)"),
        )),
    }
}
