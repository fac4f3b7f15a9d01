//! [`ModelIndex`] over a GGUF model (one file, a split set, or a directory
//! holding one): tensors under their Hugging Face names with their stored
//! (possibly block-quantized) types, `config.json` and `tokenizer.json` made
//! from the metadata. The rest of the pipeline reads it like a safetensors
//! directory and moves the stored bytes.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use super::gguf_hf::{chat_template, hf_config, hf_tensor_name, tokenizer_json, Metadata};
use super::layers::discover_layers;
use super::{Embedded, ModelIndex, ShardFile, TensorInfo};
use crate::gguf::{GgufModel, GgufTensor, MetaArray, MetaValue};
use crate::{DType, Error, Result};

/// Whether `path` names a GGUF model: a `*.gguf` file, or a directory with a
/// `*.gguf` file and no safetensors.
pub(crate) fn is_gguf(path: &Path) -> bool {
    let has_ext = |p: &Path, ext: &str| {
        p.extension()
            .is_some_and(|x| x.to_string_lossy().eq_ignore_ascii_case(ext))
    };
    if path.is_file() {
        return has_ext(path, "gguf");
    }
    let Ok(entries) = std::fs::read_dir(path) else {
        return false;
    };
    let files: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    files.iter().any(|p| has_ext(p, "gguf")) && !files.iter().any(|p| has_ext(p, "safetensors"))
}

/// Opens the GGUF model at `path` (see [`GgufModel::open`]).
pub(crate) fn open(path: &Path) -> Result<ModelIndex> {
    let model = GgufModel::open(path)?;
    let first = &model.first().path;
    let file_name = first.display().to_string();
    let meta_json = metadata_json(&model);
    let meta = Metadata::new(&file_name, &meta_json);
    let arch = meta.arch()?;
    let files: Vec<ShardFile> = model
        .parts
        .iter()
        .map(|p| ShardFile {
            path: p.path.clone(),
            len: p.file_len,
            data_offset: p.data_offset,
        })
        .collect();
    let tensors = model
        .tensors()
        .map(|(part, t)| tensor_info(part, t, &model.parts[part].path))
        .collect::<Result<Vec<_>>>()?;
    let has_output = tensors.iter().any(|t| t.name == "lm_head.weight");
    let config = hf_config(&meta, has_output)?;
    let embedded = Embedded {
        // llama.cpp writes "none" for a file with no vocabulary (its vocab
        // size then comes from `<arch>.vocab_size`): token ids only.
        tokenizer: match meta.get("tokenizer.ggml.model") {
            Some(m) if m.as_str() == Some("none") => None,
            Some(_) => Some(tokenizer_json(&meta)?),
            None => None,
        },
        chat_template: chat_template(&meta).map(|t| {
            let token = |key: &str| {
                let id = meta.opt_u64(key).ok().flatten()?;
                let tokens = meta.opt_array("tokenizer.ggml.tokens").ok().flatten()?;
                tokens
                    .get(usize::try_from(id).ok()?)?
                    .as_str()
                    .map(str::to_string)
            };
            let bos = token("tokenizer.ggml.bos_token_id").unwrap_or_default();
            let eos = token("tokenizer.ggml.eos_token_id").unwrap_or_default();
            (t, bos, eos)
        }),
        // llama.cpp's converter permutes q/k rows for llama only; qwen2 uses
        // NeoX RoPE on the rows as Hugging Face stores them.
        rope_interleaved: arch == "llama",
    };
    let weights = tensors.iter().map(|t| (t.name.as_str(), t.len));
    let structure = discover_layers(weights).map_err(|msg| Error::model(first, msg))?;
    let dir = first.parent().map(Path::to_path_buf).unwrap_or_default();
    let mut index = ModelIndex::assemble(dir, files, tensors, &structure, Some(config))?;
    index.embedded = Some(embedded);
    Ok(index)
}

/// One GGUF tensor as the index keeps it: the Hugging Face name where one
/// exists (else the GGUF name), the shape outermost first.
fn tensor_info(part: usize, t: &GgufTensor, path: &Path) -> Result<TensorInfo> {
    let shape = t
        .shape()
        .into_iter()
        .map(usize::try_from)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|_| Error::model(path, format!("tensor {}: shape too large", t.name)))?;
    let (dtype, quant) = match t.ty.dtype() {
        Some(d) if !t.ty.is_quantized() => (d, None),
        _ => (DType::U8, Some(t.ty)),
    };
    Ok(TensorInfo {
        name: hf_tensor_name(&t.name).unwrap_or_else(|| t.name.clone()),
        dtype,
        shape,
        file: part,
        file_offset: t.file_offset,
        len: t.len,
        quant,
        scale: None,
    })
}

/// The first part's metadata as JSON values.
fn metadata_json(model: &GgufModel) -> Map<String, Value> {
    model
        .first()
        .metadata
        .iter()
        .map(|(k, v)| (k.clone(), value_json(v)))
        .collect()
}

fn value_json(v: &MetaValue) -> Value {
    match v {
        MetaValue::Bool(b) => Value::Bool(*b),
        MetaValue::String(s) => Value::String(s.clone()),
        MetaValue::F32(x) => {
            serde_json::Number::from_f64(f64::from(*x)).map_or(Value::Null, Value::Number)
        }
        MetaValue::F64(x) => serde_json::Number::from_f64(*x).map_or(Value::Null, Value::Number),
        MetaValue::Array(a) => array_json(a),
        other => match (other.as_u64(), other.as_i64()) {
            (Some(u), _) => Value::from(u),
            (None, Some(i)) => Value::from(i),
            _ => Value::Null,
        },
    }
}

fn array_json(a: &MetaArray) -> Value {
    Value::Array(a.items.iter().map(value_json).collect())
}
