//! [`ModelIndex::from_parts`]: an index from explicitly given files, offsets
//! and tensors, for callers who do not have a Hugging Face directory.

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;

use super::layers::LayerStructure;
use super::{ModelIndex, ShardFile, TensorInfo};
use crate::{DType, Error, Result};

/// One tensor of [`ModelParts`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartTensor {
    /// Index into [`ModelParts::files`].
    pub file: usize,
    /// Offset of its first byte inside the file's data section.
    pub offset: u64,
    /// Shape.
    pub shape: Vec<usize>,
    /// Element type.
    pub dtype: DType,
}

/// Everything [`ModelIndex::from_parts`] needs, given explicitly.
#[derive(Debug, Clone, Default)]
pub struct ModelParts {
    /// The files holding the tensors.
    pub files: Vec<PathBuf>,
    /// For each file, where its data section starts (8 + header length for safetensors).
    pub data_offsets: Vec<u64>,
    /// Every tensor by full name.
    pub tensors: BTreeMap<String, PartTensor>,
    /// The keys of one layer, e.g. `mlp.up_proj.weight`: every layer `i` has
    /// a tensor `<layer_prefix>.<i>.<key>` for each.
    pub layer_keys: Vec<String>,
    /// E.g. `model.layers`.
    pub layer_prefix: String,
    /// Number of layers.
    pub num_layers: usize,
    /// `config.json`'s contents, if any.
    pub config: Option<serde_json::Value>,
}

/// [`ModelIndex::from_parts`].
pub(super) fn build(parts: ModelParts) -> Result<ModelIndex> {
    if parts.files.len() != parts.data_offsets.len() {
        return Err(Error::Input(format!(
            "{} files but {} data offsets",
            parts.files.len(),
            parts.data_offsets.len()
        )));
    }
    if parts.num_layers == 0 || parts.layer_keys.is_empty() || parts.layer_prefix.is_empty() {
        return Err(Error::Input(
            "model parts need a layer prefix, at least one layer and at least one layer key".into(),
        ));
    }
    let files = shard_files(&parts)?;
    let dir = parts
        .files
        .first()
        .and_then(|p| p.parent())
        .map(PathBuf::from)
        .unwrap_or_default();
    let tensors = parts
        .tensors
        .iter()
        .map(|(name, t)| place_tensor(name, t, &files))
        .collect::<Result<Vec<_>>>()?;
    check_overlaps(&files, &tensors)?;
    let names: HashSet<&str> = parts.tensors.keys().map(String::as_str).collect();
    for i in 0..parts.num_layers {
        for key in &parts.layer_keys {
            let name = format!("{}.{i}.{key}", parts.layer_prefix);
            if !names.contains(name.as_str()) {
                return Err(Error::UnknownTensor(name));
            }
        }
    }
    let structure = LayerStructure {
        prefix: parts.layer_prefix.clone(),
        num_layers: parts.num_layers,
        keys: Some(parts.layer_keys.clone()),
    };
    ModelIndex::assemble(dir, files, tensors, &structure, parts.config)
}

/// The files with their lengths; each data offset must lie within its file.
fn shard_files(parts: &ModelParts) -> Result<Vec<ShardFile>> {
    let mut files = Vec::with_capacity(parts.files.len());
    for (path, &data_offset) in parts.files.iter().zip(&parts.data_offsets) {
        let len = std::fs::metadata(path)
            .map_err(|e| Error::io("reading the metadata of", path, None, e))?
            .len();
        if data_offset > len {
            return Err(Error::model(
                path,
                format!("data offset {data_offset} is past the end of the file ({len} bytes)"),
            ));
        }
        files.push(ShardFile {
            path: path.clone(),
            len,
            data_offset,
        });
    }
    Ok(files)
}

/// Tensor `name`'s extent in its file: in bounds, without overflow, and at
/// an offset that suits its dtype's alignment.
fn place_tensor(name: &str, t: &PartTensor, files: &[ShardFile]) -> Result<TensorInfo> {
    let Some(f) = files.get(t.file) else {
        return Err(Error::Input(format!(
            "tensor {name}: file index {} but only {} files",
            t.file,
            files.len()
        )));
    };
    let numel = t
        .shape
        .iter()
        .try_fold(1u64, |a, &d| a.checked_mul(d as u64));
    let len = numel.and_then(|n| n.checked_mul(t.dtype.size() as u64));
    let start = f.data_offset.checked_add(t.offset);
    let end = len.zip(start).and_then(|(l, s)| s.checked_add(l));
    let (Some(len), Some(start), Some(end)) = (len, start, end) else {
        return Err(Error::model(
            &f.path,
            format!("tensor {name}: size or offset overflows"),
        ));
    };
    if end > f.len {
        return Err(Error::model(
            &f.path,
            format!(
                "tensor {name}: bytes [{start}, {end}) run past the end of the file ({} bytes)",
                f.len
            ),
        ));
    }
    let align = t.dtype.size() as u64;
    if start % align != 0 {
        return Err(Error::model(
            &f.path,
            format!(
                "tensor {name}: its {} data starts at file offset {start}, which is not a \
                 multiple of {align}",
                t.dtype
            ),
        ));
    }
    Ok(TensorInfo {
        name: name.to_string(),
        dtype: t.dtype,
        shape: t.shape.clone(),
        file: t.file,
        file_offset: start,
        len,
        quant: None,
        scale: None,
    })
}

/// Tensors of one file must not share bytes.
fn check_overlaps(files: &[ShardFile], tensors: &[TensorInfo]) -> Result<()> {
    let mut order: Vec<&TensorInfo> = tensors.iter().collect();
    order.sort_by_key(|t| (t.file, t.file_offset, t.len));
    for w in order.windows(2) {
        let (a, b) = (w[0], w[1]);
        if a.file == b.file && b.file_offset < a.file_offset + a.len && b.len > 0 {
            return Err(Error::model(
                &files[a.file].path,
                format!(
                    "tensors {} [{}, {}) and {} [{}, {}) overlap",
                    a.name,
                    a.file_offset,
                    a.file_offset + a.len,
                    b.name,
                    b.file_offset,
                    b.file_offset + b.len
                ),
            ));
        }
    }
    Ok(())
}
