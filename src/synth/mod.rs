//! Synthetic models: random weights in the Hugging Face layout of
//! `Qwen2ForCausalLM` / `LlamaForCausalLM`, with config, tokenizer and chat
//! template, written fast enough that a 7B model is bound by the disk.
//!
//! Weights are drawn like the reference script does: 1-D tensors
//! `1 + 0.1·N(0,1)`, matrices `N(0, 1/in_features)`, with a fast approximate
//! normal (the sum of four 16-bit uniforms). Each element is a function of the
//! seed, the tensor and its position, so the output is the same for a seed
//! whatever the thread count or shard size.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde_json::{json, Value};

use crate::checkpoint::{INDEX_FILE, SINGLE_FILE};
pub use fp8::{quantize_fp8, Fp8Report};
pub use weights::{fill_normal, tensor_key};
use weights::{write_shards, PlacedTensor, ShardPlan};

mod fp8;
mod gguf;
mod tokenizer;
mod weights;

pub use gguf::{write_gguf, SynthGgufSpec};

use crate::{DType, Error, Result};
pub use tokenizer::{
    byte_to_unicode, tokenizer_files, write_tokenizer, SpecialIds, TokenizerFiles,
    LLAMA3_CHAT_TEMPLATE, QWEN2_CHAT_TEMPLATE,
};

/// Model architecture of a synthetic model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// `Qwen2ForCausalLM`: q/k/v projections with biases, rope_theta 1e6.
    Qwen2,
    /// `LlamaForCausalLM` (Llama 3 style): no biases, rope_theta 500000.
    Llama,
}

impl Arch {
    /// Parses `qwen2` or `llama`.
    pub fn parse(s: &str) -> Option<Arch> {
        match s.to_ascii_lowercase().as_str() {
            "qwen2" => Some(Arch::Qwen2),
            "llama" => Some(Arch::Llama),
            _ => None,
        }
    }

    /// `model_type` in config.json.
    pub fn model_type(self) -> &'static str {
        match self {
            Arch::Qwen2 => "qwen2",
            Arch::Llama => "llama",
        }
    }
}

/// Sizes of a decoder-only transformer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    /// Model width.
    pub hidden: usize,
    /// MLP width.
    pub intermediate: usize,
    /// Number of decoder layers.
    pub layers: usize,
    /// Attention heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Vocabulary size.
    pub vocab: usize,
}

impl Shape {
    /// The names of the presets.
    pub const PRESETS: [&'static str; 5] = ["tiny", "small", "1.5b", "7b", "70b"];

    /// A named preset: `tiny`, `small`, `1.5b`, `7b` (Qwen2 shapes) or `70b`
    /// (Llama 3 70B shapes).
    pub fn preset(name: &str) -> Option<Shape> {
        let (hidden, intermediate, layers, heads, kv_heads, vocab) = match name {
            "tiny" => (256, 704, 3, 4, 2, 1024),
            "small" => (1024, 2816, 8, 16, 4, 8192),
            "1.5b" => (1536, 8960, 28, 12, 2, 151936),
            "7b" => (3584, 18944, 28, 28, 4, 152064),
            "70b" => (8192, 28672, 80, 64, 8, 128256),
            _ => return None,
        };
        Some(Shape {
            hidden,
            intermediate,
            layers,
            heads,
            kv_heads,
            vocab,
        })
    }

    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.hidden / self.heads
    }
}

/// What [`write_model`] writes.
#[derive(Debug, Clone)]
pub struct SynthSpec {
    /// Architecture.
    pub arch: Arch,
    /// Sizes.
    pub shape: Shape,
    /// Element type of every tensor: bf16, f16 or f32.
    pub dtype: DType,
    /// Tie `lm_head` to the embedding (no `lm_head.weight` is written).
    pub tie: bool,
    /// Largest shard in bytes; one `model.safetensors` if everything fits.
    pub shard_size: u64,
    /// Seed of the weights.
    pub seed: u64,
    /// Generator threads (0: two per available CPU).
    pub threads: usize,
}

/// What [`write_model`] wrote.
#[derive(Debug, Clone)]
pub struct SynthReport {
    /// Every file written, safetensors first.
    pub files: Vec<PathBuf>,
    /// Bytes of safetensors written (headers included).
    pub bytes: u64,
    /// Seconds spent writing the weights.
    pub seconds: f64,
}

/// Tensor names and shapes in the order transformers' `state_dict()` lists them.
pub fn tensor_specs(arch: Arch, s: &Shape, tie: bool) -> Vec<(String, Vec<usize>)> {
    let (h, hd) = (s.hidden, s.head_dim());
    let (q, kv) = (s.heads * hd, s.kv_heads * hd);
    let mut v = vec![("model.embed_tokens.weight".to_string(), vec![s.vocab, h])];
    for i in 0..s.layers {
        let p = |k: &str| format!("model.layers.{i}.{k}");
        for (name, rows) in [("q_proj", q), ("k_proj", kv), ("v_proj", kv)] {
            v.push((p(&format!("self_attn.{name}.weight")), vec![rows, h]));
            if arch == Arch::Qwen2 {
                v.push((p(&format!("self_attn.{name}.bias")), vec![rows]));
            }
        }
        v.push((p("self_attn.o_proj.weight"), vec![h, q]));
        v.push((p("mlp.gate_proj.weight"), vec![s.intermediate, h]));
        v.push((p("mlp.up_proj.weight"), vec![s.intermediate, h]));
        v.push((p("mlp.down_proj.weight"), vec![h, s.intermediate]));
        v.push((p("input_layernorm.weight"), vec![h]));
        v.push((p("post_attention_layernorm.weight"), vec![h]));
    }
    v.push(("model.norm.weight".to_string(), vec![h]));
    if !tie {
        v.push(("lm_head.weight".to_string(), vec![s.vocab, h]));
    }
    v
}

/// A tensor placed in a shard.
struct Placed {
    /// Position in [`tensor_specs`] order: part of its random key.
    id: usize,
    name: String,
    shape: Vec<usize>,
    shard: usize,
    /// Absolute file offset of its first byte.
    offset: u64,
}

/// Writes a complete model directory: weights, config, tokenizer.
pub fn write_model(dir: &Path, spec: &SynthSpec) -> Result<SynthReport> {
    write_model_with_progress(dir, spec, &|_| {})
}

/// [`write_model`], calling `progress` with the number of weight bytes just written.
pub fn write_model_with_progress(
    dir: &Path,
    spec: &SynthSpec,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<SynthReport> {
    if !matches!(spec.dtype, DType::BF16 | DType::F16 | DType::F32) {
        return Err(Error::Input(format!(
            "synthetic weights are bf16, f16 or f32, not {}",
            spec.dtype
        )));
    }
    let s = &spec.shape;
    check_shape(s)?;
    std::fs::create_dir_all(dir).map_err(|e| Error::io("creating directory", dir, None, e))?;
    remove_stale(dir)?;
    let specs = tensor_specs(spec.arch, s, spec.tie);
    let esize = spec.dtype.size() as u64;
    let shard_of = assign_shards(&specs, esize, spec.shard_size);
    let n_shards = shard_of.last().map_or(1, |s| s + 1);
    let names: Vec<PathBuf> = (0..n_shards)
        .map(|i| {
            dir.join(if n_shards == 1 {
                SINGLE_FILE.to_string()
            } else {
                format!("model-{:05}-of-{:05}.safetensors", i + 1, n_shards)
            })
        })
        .collect();
    let (placed, headers) = place_tensors(&specs, &shard_of, n_shards, spec.dtype);
    let plans = shard_plans(&names, &headers, &placed, spec.seed, esize);
    let threads = match spec.threads {
        // Two per CPU, so that one thread's generation overlaps another's write.
        0 => 2 * std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    let start = Instant::now();
    write_shards(&plans, spec.dtype, threads, progress)?;
    let seconds = start.elapsed().as_secs_f64();
    let bytes: u64 = headers.iter().map(|h| h.1).sum();
    let mut written = names.clone();
    if n_shards > 1 {
        written.push(write_weight_map(dir, &names, &placed, &specs, esize)?);
    }
    let ids = write_tokenizer(dir, spec.arch, s.vocab)?;
    written.extend(ids.files.iter().cloned());
    written.push(write_json(
        &dir.join("config.json"),
        &config_json(spec, &ids),
    )?);
    Ok(SynthReport {
        files: written,
        bytes,
        seconds,
    })
}

/// Heads must divide the width and key/value heads the heads.
fn check_shape(s: &Shape) -> Result<()> {
    if s.heads == 0
        || s.kv_heads == 0
        || !s.hidden.is_multiple_of(s.heads)
        || !s.heads.is_multiple_of(s.kv_heads)
    {
        return Err(Error::Input(format!(
            "inconsistent shape {s:?}: heads must divide hidden and kv_heads heads"
        )));
    }
    Ok(())
}

/// Each tensor's shard, in state-dict order: a new shard starts when the
/// next tensor would overflow this one.
fn assign_shards(specs: &[(String, Vec<usize>)], esize: u64, shard_size: u64) -> Vec<usize> {
    let mut shard_of = Vec::with_capacity(specs.len());
    let (mut shard, mut fill) = (0usize, 0u64);
    for (_, shape) in specs {
        let bytes = shape.iter().product::<usize>() as u64 * esize;
        if fill > 0 && fill + bytes > shard_size {
            shard += 1;
            fill = 0;
        }
        fill += bytes;
        shard_of.push(shard);
    }
    shard_of
}

/// Places the tensors in their shards (within a shard sorted by name, as
/// safetensors serialises them); returns them and each shard's (header,
/// total length).
fn place_tensors(
    specs: &[(String, Vec<usize>)],
    shard_of: &[usize],
    n_shards: usize,
    dtype: DType,
) -> (Vec<Placed>, Vec<(Vec<u8>, u64)>) {
    let esize = dtype.size() as u64;
    let bytes_of = |shape: &[usize]| shape.iter().product::<usize>() as u64 * esize;
    let mut placed: Vec<Placed> = Vec::with_capacity(specs.len());
    let mut headers = Vec::with_capacity(n_shards);
    for sh in 0..n_shards {
        let mut members: Vec<usize> = (0..specs.len()).filter(|&i| shard_of[i] == sh).collect();
        members.sort_by(|&a, &b| specs[a].0.cmp(&specs[b].0));
        let header = header_bytes(
            Some(json!({ "format": "pt" })),
            members.iter().map(|&i| {
                let (name, shape) = &specs[i];
                (name.as_str(), dtype, shape.as_slice(), bytes_of(shape))
            }),
        );
        let mut off = header.len() as u64;
        for &i in &members {
            placed.push(Placed {
                id: i,
                name: specs[i].0.clone(),
                shape: specs[i].1.clone(),
                shard: sh,
                offset: off,
            });
            off += bytes_of(&specs[i].1);
        }
        headers.push((header, off));
    }
    (placed, headers)
}

/// What each shard's writer generates: 1-D tensors `1 + 0.1·N(0,1)`,
/// matrices `N(0, 1/in_features)`.
fn shard_plans(
    names: &[PathBuf],
    headers: &[(Vec<u8>, u64)],
    placed: &[Placed],
    seed: u64,
    esize: u64,
) -> Vec<ShardPlan> {
    let tensor = |p: &Placed| {
        let (mean, std) = if p.shape.len() == 1 {
            (1.0, 0.1)
        } else {
            (0.0, 1.0 / (*p.shape.last().unwrap_or(&1) as f32).sqrt())
        };
        PlacedTensor {
            key: tensor_key(seed, p.id as u64),
            offset: p.offset,
            bytes: p.shape.iter().product::<usize>() as u64 * esize,
            mean,
            std,
        }
    };
    names
        .iter()
        .zip(headers)
        .enumerate()
        .map(|(sh, (path, (header, total)))| ShardPlan {
            path: path.clone(),
            header: header.clone(),
            len: *total,
            tensors: placed
                .iter()
                .filter(|p| p.shard == sh)
                .map(tensor)
                .collect(),
        })
        .collect()
}

/// Writes `model.safetensors.index.json` for a sharded model.
fn write_weight_map(
    dir: &Path,
    names: &[PathBuf],
    placed: &[Placed],
    specs: &[(String, Vec<usize>)],
    esize: u64,
) -> Result<PathBuf> {
    let weight_map: BTreeMap<&str, String> = placed
        .iter()
        .map(|p| {
            let file = names[p.shard].file_name().unwrap_or_default();
            (p.name.as_str(), file.to_string_lossy().into_owned())
        })
        .collect();
    let total: u64 = specs
        .iter()
        .map(|(_, sh)| sh.iter().product::<usize>() as u64 * esize)
        .sum();
    let index = json!({ "metadata": { "total_size": total }, "weight_map": weight_map });
    write_json(&dir.join(INDEX_FILE), &index)
}

/// Removes checkpoint files a previous run may have left, so the directory
/// holds exactly one checkpoint.
fn remove_stale(dir: &Path) -> Result<()> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io("listing", dir, None, e))?;
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let shard = name.starts_with("model") && name.ends_with(".safetensors");
        if shard || name == INDEX_FILE {
            std::fs::remove_file(e.path())
                .map_err(|err| Error::io("removing", e.path(), None, err))?;
        }
    }
    Ok(())
}

/// A safetensors header (length prefix included) for tensors stored back to
/// back in the given order, padded with spaces to a multiple of 8 bytes as the
/// safetensors serialiser does. Each entry is (name, dtype, shape, bytes).
fn header_bytes<'a>(
    metadata: Option<Value>,
    entries: impl IntoIterator<Item = (&'a str, DType, &'a [usize], u64)>,
) -> Vec<u8> {
    let mut map = serde_json::Map::new();
    if let Some(m) = metadata {
        map.insert("__metadata__".into(), m);
    }
    let mut off = 0u64;
    for (name, dtype, shape, len) in entries {
        map.insert(
            name.to_string(),
            json!({ "dtype": dtype.safetensors_name(), "shape": shape, "data_offsets": [off, off + len] }),
        );
        off += len;
    }
    let mut text = Value::Object(map).to_string().into_bytes();
    while !text.len().is_multiple_of(8) {
        text.push(b' ');
    }
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&text);
    out
}

/// Writes raw tensors into one safetensors file (for tests and tools).
/// Each tuple is (name, dtype, shape, little-endian bytes).
pub fn write_safetensors(
    path: &Path,
    tensors: &[(String, DType, Vec<usize>, Vec<u8>)],
) -> Result<()> {
    let mut out = header_bytes(
        None,
        tensors
            .iter()
            .map(|(n, d, shape, b)| (n.as_str(), *d, shape.as_slice(), b.len() as u64)),
    );
    for (_, _, _, bytes) in tensors {
        out.extend_from_slice(bytes);
    }
    std::fs::write(path, out).map_err(|e| Error::io("writing", path, None, e))
}

/// config.json as transformers writes it for the architecture.
fn config_json(spec: &SynthSpec, ids: &SpecialIds) -> Value {
    let s = &spec.shape;
    let torch_dtype = match spec.dtype {
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        _ => "float32",
    };
    let mut c = json!({
        "architectures": [match spec.arch { Arch::Qwen2 => "Qwen2ForCausalLM", Arch::Llama => "LlamaForCausalLM" }],
        "model_type": spec.arch.model_type(),
        "attention_dropout": 0.0,
        "bos_token_id": ids.bos,
        "eos_token_id": ids.eos,
        "hidden_act": "silu",
        "hidden_size": s.hidden,
        "initializer_range": 0.02,
        "intermediate_size": s.intermediate,
        "max_position_embeddings": 4096,
        "num_attention_heads": s.heads,
        "num_hidden_layers": s.layers,
        "num_key_value_heads": s.kv_heads,
        "rms_norm_eps": 1e-6,
        "rope_scaling": null,
        "tie_word_embeddings": spec.tie,
        "torch_dtype": torch_dtype,
        "transformers_version": "4.51.3",
        "use_cache": true,
        "vocab_size": s.vocab,
    });
    let extra = match spec.arch {
        Arch::Qwen2 => json!({
            "rope_theta": 1_000_000.0,
            "max_window_layers": s.layers,
            "sliding_window": 4096,
            "use_sliding_window": false,
        }),
        Arch::Llama => json!({
            "rope_theta": 500_000.0,
            "attention_bias": false,
            "head_dim": s.head_dim(),
            "mlp_bias": false,
            "pretraining_tp": 1,
        }),
    };
    if let (Value::Object(c), Value::Object(extra)) = (&mut c, extra) {
        c.extend(extra);
    }
    c
}

/// Writes pretty-printed JSON with a trailing newline; returns the path.
pub(super) fn write_json(path: &Path, value: &Value) -> Result<PathBuf> {
    let mut text = serde_json::to_string_pretty(value).unwrap_or_default();
    text.push('\n');
    std::fs::write(path, text).map_err(|e| Error::io("writing", path, None, e))?;
    Ok(path.to_path_buf())
}
