//! Writing an FP8 checkpoint from a bf16/f16/f32 one: every matrix of the
//! decoder layers quantized to E4M3 with one f32 `weight_scale_inv` per
//! 128×128 block (the layout of the official FP8 releases and of
//! transformers' fine-grained FP8), everything else (embedding, norms,
//! biases, lm_head) copied as stored; `config.json` gains the
//! `quantization_config` that says so, and the tokenizer files are copied.
//!
//! Tensors are converted one at a time, so memory holds one tensor and its
//! codes, not the model.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use super::{header_bytes, write_json};
use crate::checkpoint::{TensorInfo, INDEX_FILE, SINGLE_FILE};
use crate::quant::fp8::{self, Fp8Layout, ScaleLayout};
use crate::quant::QuantType;
use crate::{DType, Error, ModelIndex, Result};

/// Largest output shard in bytes.
const SHARD_BYTES: u64 = 4_000_000_000;

/// Files copied beside the weights when the source has them.
const COPIED: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "generation_config.json",
    "chat_template.jinja",
    "chat_template.json",
];

/// What [`quantize_fp8`] wrote.
#[derive(Debug, Clone)]
pub struct Fp8Report {
    /// The safetensors files, in order.
    pub shards: Vec<PathBuf>,
    /// Tensors quantized to FP8.
    pub quantized: usize,
    /// Tensors copied as stored.
    pub copied: usize,
    /// Bytes of tensor data read from the source.
    pub source_bytes: u64,
    /// Bytes of tensor data written.
    pub written_bytes: u64,
}

/// One tensor of the output, in file order.
struct Out<'a> {
    name: String,
    dtype: DType,
    shape: Vec<usize>,
    len: u64,
    what: Source<'a>,
}

enum Source<'a> {
    /// The source tensor's bytes as they are.
    Copy(&'a TensorInfo),
    /// The E4M3 codes of the source matrix.
    Codes(&'a TensorInfo),
    /// The f32 block scales of the source matrix.
    Scales(&'a TensorInfo),
}

/// Writes an FP8 copy of the safetensors model directory `src` into `dst`
/// (created if missing; its earlier model files are replaced). `progress` is
/// called with the bytes written so far and the total, after each tensor.
pub fn quantize_fp8(
    src: &Path,
    dst: &Path,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Fp8Report> {
    let index = ModelIndex::open(src)?;
    if !src.is_dir() || index.embedded_tokenizer().is_some() {
        return Err(Error::model(
            src,
            "quantize --type fp8 reads a safetensors model directory (not a GGUF file)",
        ));
    }
    let config = index
        .config()
        .cloned()
        .ok_or_else(|| Error::model(src, "no config.json: cannot write the FP8 model's config"))?;
    if config.get("quantization_config").is_some() {
        return Err(Error::model(
            src.join("config.json"),
            "the model is already quantized (quantization_config is set)",
        ));
    }
    prepare_dst(src, dst)?;
    let plan = plan(&index)?;
    let shards = split(&plan);
    let total: u64 = plan.iter().map(|t| t.len).sum();
    let mut done = 0u64;
    let mut paths = Vec::new();
    let mut weight_map = BTreeMap::new();
    for (i, range) in shards.iter().enumerate() {
        let name = if shards.len() == 1 {
            SINGLE_FILE.to_string()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", i + 1, shards.len())
        };
        let path = dst.join(&name);
        let tensors = &plan[range.clone()];
        write_shard(&index, &path, tensors, &mut |n| {
            done += n;
            progress(done, total);
        })?;
        for t in tensors {
            weight_map.insert(t.name.clone(), name.clone());
        }
        paths.push(path);
    }
    if shards.len() > 1 {
        let idx = json!({ "metadata": { "total_size": total }, "weight_map": weight_map });
        write_json(&dst.join(INDEX_FILE), &idx)?;
    }
    write_json(&dst.join("config.json"), &fp8_config(config))?;
    copy_tokenizer(src, dst)?;
    let quantized = plan
        .iter()
        .filter(|t| matches!(t.what, Source::Codes(_)))
        .count();
    Ok(Fp8Report {
        shards: paths,
        quantized,
        copied: plan.len() - 2 * quantized,
        source_bytes: index.total_layer_bytes() + index.total_static_bytes(),
        written_bytes: total,
    })
}

/// Creates `dst` and removes the model files an earlier run left there;
/// refuses to write into `src`.
fn prepare_dst(src: &Path, dst: &Path) -> Result<()> {
    std::fs::create_dir_all(dst).map_err(|e| Error::io("creating", dst, None, e))?;
    let same = |a: &Path, b: &Path| matches!((a.canonicalize(), b.canonicalize()), (Ok(x), Ok(y)) if x == y);
    if same(src, dst) {
        return Err(Error::model(
            dst,
            "the output directory is the source directory",
        ));
    }
    let entries = std::fs::read_dir(dst).map_err(|e| Error::io("listing", dst, None, e))?;
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.ends_with(".safetensors") || name == INDEX_FILE {
            std::fs::remove_file(e.path())
                .map_err(|err| Error::io("removing", e.path(), None, err))?;
        }
    }
    Ok(())
}

/// The output tensors: each layer matrix becomes its codes and scales,
/// every other tensor is copied.
fn plan(index: &ModelIndex) -> Result<Vec<Out<'_>>> {
    let layer_tensors = index
        .layers()
        .iter()
        .flat_map(|l| l.tensors.iter().map(|t| &t.info));
    let mut out = Vec::new();
    let mut all: Vec<(&TensorInfo, bool)> = index.statics().iter().map(|t| (t, false)).collect();
    all.extend(layer_tensors.map(|t| (t, true)));
    all.sort_by_key(|(t, _)| (t.file, t.file_offset));
    for (info, in_layer) in all {
        if info.quant.is_some() || info.scale.is_some() {
            return Err(Error::model(
                &index.files()[info.file].path,
                format!(
                    "tensor {} is already quantized ({})",
                    info.name,
                    info.stored_type()
                ),
            ));
        }
        let matrix = in_layer && info.shape.len() == 2 && info.dtype.is_castable_float();
        if !matrix {
            out.push(Out {
                name: info.name.clone(),
                dtype: info.dtype,
                shape: info.shape.clone(),
                len: info.len,
                what: Source::Copy(info),
            });
            continue;
        }
        let layout = layout_of(info)?;
        out.push(Out {
            name: info.name.clone(),
            dtype: DType::F8E4M3,
            shape: info.shape.clone(),
            len: layout.elems(),
            what: Source::Codes(info),
        });
        let (gr, gc) = ScaleLayout::BLOCK_128.grid(layout.rows, layout.cols);
        out.push(Out {
            name: format!("{}_scale_inv", info.name),
            dtype: DType::F32,
            shape: vec![gr as usize, gc as usize],
            len: layout.scale_bytes(),
            what: Source::Scales(info),
        });
    }
    Ok(out)
}

fn layout_of(info: &TensorInfo) -> Result<Fp8Layout> {
    Fp8Layout::new(
        DType::F8E4M3,
        info.shape[0] as u64,
        info.shape[1] as u64,
        DType::F32,
        ScaleLayout::BLOCK_128,
    )
}

/// Consecutive runs of the plan, each at most [`SHARD_BYTES`] (or one tensor).
fn split(plan: &[Out<'_>]) -> Vec<std::ops::Range<usize>> {
    let mut shards = Vec::new();
    let (mut start, mut size) = (0, 0u64);
    for (i, t) in plan.iter().enumerate() {
        if i > start && size + t.len > SHARD_BYTES {
            shards.push(start..i);
            (start, size) = (i, 0);
        }
        size += t.len;
    }
    shards.push(start..plan.len());
    shards
}

/// Writes one safetensors file; `wrote` is called with each tensor's bytes.
fn write_shard(
    index: &ModelIndex,
    path: &Path,
    tensors: &[Out<'_>],
    wrote: &mut dyn FnMut(u64),
) -> Result<()> {
    let file = File::create(path).map_err(|e| Error::io("creating", path, None, e))?;
    let mut w = BufWriter::with_capacity(1 << 22, file);
    let header = header_bytes(
        None,
        tensors
            .iter()
            .map(|t| (t.name.as_str(), t.dtype, t.shape.as_slice(), t.len)),
    );
    let io = |e| Error::io("writing", path, None, e);
    w.write_all(&header).map_err(io)?;
    // A matrix's codes and scales come from one quantization: keep the
    // scales of the last matrix for the entry that follows its codes.
    let mut pending: Option<Vec<f32>> = None;
    for t in tensors {
        let bytes = match t.what {
            Source::Copy(info) => read_tensor(index, info)?,
            Source::Codes(info) => {
                let (codes, scales) = quantize(index, info)?;
                pending = Some(scales);
                codes
            }
            Source::Scales(info) => {
                let scales = match pending.take() {
                    Some(s) => s,
                    None => quantize(index, info)?.1,
                };
                scales.iter().flat_map(|s| s.to_le_bytes()).collect()
            }
        };
        debug_assert_eq!(bytes.len() as u64, t.len, "{}", t.name);
        w.write_all(&bytes).map_err(io)?;
        wrote(t.len);
    }
    w.flush().map_err(io)
}

/// The E4M3 codes and f32 block scales of a source matrix.
fn quantize(index: &ModelIndex, info: &TensorInfo) -> Result<(Vec<u8>, Vec<f32>)> {
    let bytes = read_tensor(index, info)?;
    let ty = QuantType::from_dtype(info.dtype).ok_or_else(|| {
        Error::Input(format!(
            "tensor {} of dtype {} cannot be quantized",
            info.name, info.dtype
        ))
    })?;
    let mut values = vec![0f32; info.numel()];
    crate::quant::dequantize_f32(ty, &bytes, &mut values)?;
    fp8::quantize_e4m3(&values, &layout_of(info)?)
        .map_err(|e| Error::Input(format!("tensor {}: {e}", info.name)))
}

/// A tensor's stored bytes, read with plain I/O.
fn read_tensor(index: &ModelIndex, info: &TensorInfo) -> Result<Vec<u8>> {
    let path = &index.files()[info.file].path;
    let f = File::open(path).map_err(|e| Error::io("opening", path, None, e))?;
    let mut buf = vec![0u8; info.len as usize];
    f.read_exact_at(&mut buf, info.file_offset)
        .map_err(|e| Error::io("reading", path, Some(info.file_offset), e))?;
    Ok(buf)
}

/// The source config with the quantization_config transformers writes for
/// fine-grained FP8.
fn fp8_config(mut config: Value) -> Value {
    if let Value::Object(c) = &mut config {
        c.insert(
            "quantization_config".into(),
            json!({
                "quant_method": "fp8",
                "activation_scheme": "dynamic",
                "fmt": "e4m3",
                "weight_block_size": [128, 128],
                "modules_to_not_convert": ["lm_head"],
            }),
        );
    }
    config
}

fn copy_tokenizer(src: &Path, dst: &Path) -> Result<()> {
    for name in COPIED {
        let from = src.join(name);
        if from.is_file() {
            let to = dst.join(name);
            std::fs::copy(&from, &to).map_err(|e| Error::io("copying", &from, None, e))?;
        }
    }
    Ok(())
}
