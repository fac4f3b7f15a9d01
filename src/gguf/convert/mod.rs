//! Quantizing a model into one GGUF file that llama.cpp reads: a Hugging
//! Face safetensors directory (f32, f16, bf16) or a GGUF model as the
//! source, every weight matrix in a ggml block type.
//!
//! The output has llama.cpp's names (`token_embd`, `blk.N.attn_q`, ...,
//! `output_norm`, `output`), the `<arch>.*` metadata of `llama` or `qwen2`,
//! the tokenizer as `tokenizer.ggml.*` (byte-level BPE) with the chat
//! template, and the q/k rows of a llama model in llama.cpp's order for
//! interleaved RoPE. Which type each tensor gets is [`tensor_type`]'s rule.
//! Tensors are converted one at a time, a few rows at once, so memory stays
//! far below the model's size; the file is written as `DST.part` and renamed
//! when complete.
//!
//! ```no_run
//! use layer_streamer::gguf::convert::{quantize_to_gguf, QuantizeOptions};
//! use layer_streamer::quant::QuantType;
//!
//! # fn main() -> layer_streamer::Result<()> {
//! let opts = QuantizeOptions { ty: QuantType::Q4_K, threads: 0 };
//! let report = quantize_to_gguf("Qwen2-7B-Instruct".as_ref(), "q4_k.gguf".as_ref(), &opts, &mut |_, _| {})?;
//! for note in &report.notes {
//!     eprintln!("{note}");
//! }
//! # Ok(()) }
//! ```

use std::collections::hash_map::{Entry, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::checkpoint::gguf_hf::{gguf_tensor_name, hf_tensor_name, SUPPORTED_ARCHS};
use crate::checkpoint::TensorInfo;
use crate::gguf::{GgufModel, GgufWriter, MetaValue};
use crate::quant::QuantType;
use crate::{Error, ModelIndex, Result};

mod meta;
mod rows;
mod vocab;

pub use meta::arch_metadata;
pub use meta::{file_type, tensor_type, TARGET_TYPES};
use rows::RowShape;
pub use vocab::{tokenizer_metadata_of, TokenizerJson};

/// Elements converted at once per tensor (64 MiB of f32).
const CHUNK_ELEMS: u64 = 16 << 20;

/// How to quantize.
#[derive(Debug, Clone)]
pub struct QuantizeOptions {
    /// The block type of the weight matrices: one of [`TARGET_TYPES`].
    pub ty: QuantType,
    /// Quantizer threads (0: one per available CPU).
    pub threads: usize,
}

/// One tensor of the output.
#[derive(Debug, Clone, PartialEq)]
pub struct WrittenTensor {
    /// Its GGUF name.
    pub name: String,
    /// Its stored type.
    pub ty: QuantType,
    /// Dimensions, innermost first.
    pub dims: Vec<u64>,
}

/// What [`quantize_to_gguf`] wrote.
#[derive(Debug, Clone)]
pub struct QuantizeReport {
    /// `general.architecture`.
    pub arch: String,
    /// Every tensor, in file order.
    pub tensors: Vec<WrittenTensor>,
    /// Tensors whose rows forced another type than the rule's, and source
    /// tensors left out, one line each.
    pub notes: Vec<String>,
    /// Size of the file written.
    pub bytes: u64,
}

/// One tensor to convert.
struct Planned<'a> {
    info: &'a TensorInfo,
    shape: RowShape,
    out: WrittenTensor,
    /// Rows to put in llama.cpp's interleaved order, in heads of this many.
    interleave: Option<usize>,
}

/// Converts the model at `src` (a Hugging Face directory or a GGUF model)
/// into the GGUF file `dst`. `progress(done, total)` is called with source
/// bytes as they are converted.
pub fn quantize_to_gguf(
    src: &Path,
    dst: &Path,
    opts: &QuantizeOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<QuantizeReport> {
    if !TARGET_TYPES.contains(&opts.ty) {
        return Err(Error::Input(format!(
            "quantize --type {}: expected one of {}",
            opts.ty.name().to_ascii_lowercase(),
            TARGET_TYPES
                .map(|t| t.name().to_ascii_lowercase())
                .join(", ")
        )));
    }
    let index = ModelIndex::open(src)?;
    let from_gguf = crate::checkpoint::is_gguf(src);
    let cfg_path = index.dir().join("config.json");
    let cfg = index
        .config()
        .and_then(Value::as_object)
        .ok_or_else(|| Error::model(&cfg_path, "missing: the model's config is needed"))?;
    let arch = cfg.get("model_type").and_then(Value::as_str).unwrap_or("");
    if !SUPPORTED_ARCHS.contains(&arch) {
        return Err(Error::model(
            &cfg_path,
            format!(
                "model_type {arch:?} is not supported (supported: {})",
                SUPPORTED_ARCHS.join(", ")
            ),
        ));
    }
    let mut notes = Vec::new();
    let plan = plan_tensors(&index, arch, from_gguf, opts.ty, &mut notes)?;
    let mut w = GgufWriter::new();
    w.metadata("general.architecture", MetaValue::String(arch.into()))?;
    for (k, v) in metadata(src, &index, arch, from_gguf)? {
        w.metadata(k, v)?;
    }
    w.metadata("general.file_type", MetaValue::U32(file_type(opts.ty)))?;
    w.metadata("general.quantization_version", MetaValue::U32(2))?;
    for p in &plan {
        w.tensor(&p.out.name, p.out.ty, &p.out.dims)?;
    }
    let part = part_path(dst);
    let result = write_data(&index, w, &part, &plan, opts, progress).and_then(|()| {
        std::fs::rename(&part, dst).map_err(|e| Error::io("renaming", &part, None, e))
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&part);
    }
    result?;
    let bytes = std::fs::metadata(dst)
        .map_err(|e| Error::io("reading the size of", dst, None, e))?
        .len();
    Ok(QuantizeReport {
        arch: arch.to_string(),
        tensors: plan.into_iter().map(|p| p.out).collect(),
        notes,
        bytes,
    })
}

fn part_path(dst: &Path) -> PathBuf {
    let mut name = dst.file_name().unwrap_or_default().to_os_string();
    name.push(".part");
    dst.with_file_name(name)
}

/// The metadata besides the architecture and the file type: a GGUF source's
/// own, or what a Hugging Face directory's config and tokenizer describe.
fn metadata(
    src: &Path,
    index: &ModelIndex,
    arch: &str,
    from_gguf: bool,
) -> Result<Vec<(String, MetaValue)>> {
    if from_gguf {
        let model = GgufModel::open(src)?;
        return Ok(model
            .first()
            .metadata
            .iter()
            .filter(|(k, _)| meta::carried_over(k) && k != "general.architecture")
            .cloned()
            .collect());
    }
    let dir = index.dir();
    let cfg = index.config().cloned().unwrap_or(Value::Null);
    let name = dir
        .canonicalize()
        .ok()
        .and_then(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_default();
    let mut out = vec![("general.name".to_string(), MetaValue::String(name))];
    let empty = serde_json::Map::new();
    out.extend(meta::arch_metadata(
        &dir.join("config.json"),
        arch,
        cfg.as_object().unwrap_or(&empty),
    )?);
    let vocab_rows = index
        .tensor("model.embed_tokens.weight")
        .and_then(|t| t.shape.first().copied())
        .ok_or_else(|| Error::model(dir, "no model.embed_tokens.weight tensor"))?;
    out.extend(vocab::tokenizer_metadata(dir, &cfg, vocab_rows)?);
    Ok(out)
}

/// Every tensor of the output in file order (the embedding, the layers,
/// the rest), with its name, type and row order.
fn plan_tensors<'a>(
    index: &'a ModelIndex,
    arch: &str,
    from_gguf: bool,
    base: QuantType,
    notes: &mut Vec<String>,
) -> Result<Vec<Planned<'a>>> {
    let cfg = index.config().cloned().unwrap_or(Value::Null);
    let head_dim = cfg["head_dim"].as_u64().or_else(|| {
        Some(cfg["hidden_size"].as_u64()? / cfg["num_attention_heads"].as_u64()?.max(1))
    });
    let statics = index.statics();
    let (first, rest): (Vec<&TensorInfo>, Vec<&TensorInfo>) = statics
        .iter()
        .partition(|t| t.name == "model.embed_tokens.weight");
    let layers = index
        .layers()
        .iter()
        .flat_map(|l| l.tensors.iter().map(|t| &t.info));
    let mut plan = Vec::new();
    for info in first.into_iter().chain(layers).chain(rest) {
        let path = &index.files()[info.file].path;
        let name = match gguf_tensor_name(&info.name) {
            Some(n) => n,
            // A GGUF source keeps names this crate does not map (rope_freqs).
            None if from_gguf && hf_tensor_name(&info.name).is_none() => info.name.clone(),
            None if info.name.ends_with("rotary_emb.inv_freq") => {
                notes.push(format!(
                    "{}: left out (RoPE frequencies are recomputed)",
                    info.name
                ));
                continue;
            }
            None => {
                return Err(Error::model(
                    path,
                    format!("tensor {}: no llama.cpp name for it", info.name),
                ))
            }
        };
        let shape = RowShape::of(path, info)?;
        let dims: Vec<u64> = info.shape.iter().rev().map(|&d| d as u64).collect();
        let (ty, note) = meta::tensor_type(base, &name, &dims);
        notes.extend(note);
        let is_qk = name.contains(".attn_q.") || name.contains(".attn_k.");
        let interleave = match (arch == "llama" && !from_gguf && is_qk, head_dim) {
            (false, _) => None,
            (true, Some(hd)) if hd % 2 == 0 && dims.last().is_some_and(|r| r % hd == 0) => {
                Some(hd as usize)
            }
            (true, _) => {
                return Err(Error::model(
                    path,
                    format!(
                        "tensor {}: its rows are not whole heads of {head_dim:?}",
                        info.name
                    ),
                ))
            }
        };
        plan.push(Planned {
            info,
            shape,
            out: WrittenTensor { name, ty, dims },
            interleave,
        });
    }
    Ok(plan)
}

/// Creates `path` with `header` and converts each planned tensor into it.
fn write_data(
    index: &ModelIndex,
    header: GgufWriter,
    path: &Path,
    plan: &[Planned<'_>],
    opts: &QuantizeOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<()> {
    let threads = match opts.threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    let total: u64 = plan.iter().map(|p| p.info.len).sum();
    let mut done = 0;
    let mut files: HashMap<usize, File> = HashMap::new();
    let mut out = header.create(path)?;
    let (mut buf, mut x) = (Vec::new(), Vec::new());
    for p in plan {
        let src = &index.files()[p.info.file].path;
        let file = match files.entry(p.info.file) {
            Entry::Occupied(f) => f.into_mut(),
            Entry::Vacant(v) => {
                v.insert(File::open(src).map_err(|e| Error::io("opening", src, None, e))?)
            }
        };
        let cols = p.shape.cols as usize;
        // 1-D tensors are one row; a llama bias is interleaved as a column.
        let (icols, step) = match (p.interleave, p.out.dims.len()) {
            (Some(_), 1) => (1, p.shape.rows),
            (Some(hd), _) => (
                cols,
                ((CHUNK_ELEMS / p.shape.cols).max(1)).next_multiple_of(hd as u64),
            ),
            (None, _) => (cols, (CHUNK_ELEMS / p.shape.cols).max(1)),
        };
        let mut row = 0;
        while row < p.shape.rows {
            let n = step.min(p.shape.rows - row);
            rows::read_rows_f32(file, src, p.info, p.shape, (row, n), &mut buf, &mut x)?;
            if let Some(hd) = p.interleave {
                rows::interleave_heads(&mut x, hd, icols);
            }
            let blocks = rows::quantize_rows(p.out.ty, &x, cols, threads)
                .map_err(|e| Error::model(src, format!("tensor {}: {e}", p.info.name)))?;
            out.write_tensor_part(&blocks)?;
            row += n;
            done += n * p.shape.row_bytes;
            progress(done, total);
        }
    }
    out.finish()
}
