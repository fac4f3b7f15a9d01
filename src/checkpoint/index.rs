//! Opening a model directory: the index file, the shards, `config.json`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Component, Path, PathBuf};

use serde_json::Value;

use super::header::read_header;
use super::layers::discover_layers;
use super::{ModelIndex, ShardFile, TensorInfo};
use crate::{Error, Result};

/// Name of the sharded checkpoint's index file.
pub const INDEX_FILE: &str = "model.safetensors.index.json";
/// Name of a single-file checkpoint.
pub const SINGLE_FILE: &str = "model.safetensors";

/// Parses a `model.safetensors.index.json`'s bytes into its weight map
/// (tensor name → shard file name). Shard names must be relative paths that
/// stay inside the model directory.
pub fn parse_index_json(path: &Path, bytes: &[u8]) -> Result<BTreeMap<String, String>> {
    let value: Value = serde_json::from_slice(bytes)
        .map_err(|e| Error::model(path, format!("not valid JSON: {e}")))?;
    let map = value
        .get("weight_map")
        .and_then(Value::as_object)
        .ok_or_else(|| Error::model(path, "no \"weight_map\" object"))?;
    let mut out = BTreeMap::new();
    for (tensor, shard) in map {
        let shard = shard.as_str().ok_or_else(|| {
            Error::model(
                path,
                format!("tensor {tensor}: shard name {shard} is not a string"),
            )
        })?;
        let p = Path::new(shard);
        let inside = !shard.is_empty() && p.components().all(|c| matches!(c, Component::Normal(_)));
        if !inside {
            return Err(Error::model(
                path,
                format!("tensor {tensor}: shard name {shard:?} is not a file inside the model directory"),
            ));
        }
        out.insert(tensor.clone(), shard.to_string());
    }
    Ok(out)
}

/// [`ModelIndex::open`].
pub(super) fn open(dir: &Path) -> Result<ModelIndex> {
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return Err(Error::model(dir, "not a directory")),
        Err(e) => {
            return Err(Error::model(
                dir,
                format!("cannot open model directory: {e}"),
            ))
        }
    }
    let config = read_config(dir)?;
    let index_path = dir.join(INDEX_FILE);
    let (files, mut tensors) = if index_path.is_file() {
        open_indexed(dir, &index_path)?
    } else if dir.join(SINGLE_FILE).is_file() {
        open_unindexed(&[dir.join(SINGLE_FILE)])?
    } else {
        let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| Error::model(dir, format!("cannot list directory: {e}")))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors") && p.is_file())
            .collect();
        found.sort();
        if found.is_empty() {
            return Err(Error::model(
                dir,
                format!(
                    "no {INDEX_FILE}, {SINGLE_FILE} or other *.safetensors file in the directory"
                ),
            ));
        }
        open_unindexed(&found)?
    };
    super::fp8::attach_scales(dir, config.as_ref(), &files, &mut tensors)?;
    let weights = tensors.iter().map(|t| (t.name.as_str(), t.len));
    let structure = discover_layers(weights).map_err(|msg| Error::model(dir, msg))?;
    ModelIndex::assemble(dir.to_path_buf(), files, tensors, &structure, config)
}

fn read_config(dir: &Path) -> Result<Option<Value>> {
    let path = dir.join("config.json");
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| Error::model(&path, format!("not valid JSON: {e}"))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io("reading", &path, None, e)),
    }
}

/// Reads the index, then each shard it names; keeps the tensors it names.
fn open_indexed(dir: &Path, index_path: &Path) -> Result<(Vec<ShardFile>, Vec<TensorInfo>)> {
    let bytes = std::fs::read(index_path).map_err(|e| Error::io("reading", index_path, None, e))?;
    let weight_map = parse_index_json(index_path, &bytes)?;
    if weight_map.is_empty() {
        return Err(Error::model(index_path, "the weight map names no tensors"));
    }
    let shard_names: BTreeSet<&str> = weight_map.values().map(String::as_str).collect();
    let shard_of: HashMap<&str, usize> = shard_names
        .iter()
        .enumerate()
        .map(|(i, s)| (*s, i))
        .collect();
    let mut files = Vec::new();
    let mut headers = Vec::new();
    for name in &shard_names {
        let path = dir.join(name);
        if !path.is_file() {
            let example = weight_map.iter().find(|(_, s)| s == name).map(|(t, _)| t);
            return Err(Error::model(
                index_path,
                format!(
                    "shard {name} (holding tensor {}) does not exist",
                    example.map_or("?", |s| s.as_str())
                ),
            ));
        }
        let h = read_header(&path)?;
        files.push(ShardFile {
            path,
            len: h.file_len,
            data_offset: h.data_offset,
        });
        headers.push(h);
    }
    let mut by_shard: Vec<HashMap<&str, usize>> = headers
        .iter()
        .map(|h| {
            h.tensors
                .iter()
                .enumerate()
                .map(|(i, t)| (t.name.as_str(), i))
                .collect()
        })
        .collect();
    let mut tensors = Vec::with_capacity(weight_map.len());
    for (name, shard) in &weight_map {
        let f = shard_of[shard.as_str()];
        let Some(i) = by_shard[f].remove(name.as_str()) else {
            return Err(Error::model(
                index_path,
                format!("tensor {name} is mapped to shard {shard}, whose header does not have it"),
            ));
        };
        let t = &headers[f].tensors[i];
        tensors.push(TensorInfo {
            name: name.clone(),
            dtype: t.dtype,
            shape: t.shape.clone(),
            file: f,
            file_offset: files[f].data_offset + t.begin,
            len: t.end - t.begin,
            quant: None,
            scale: None,
        });
    }
    Ok((files, tensors))
}

/// Reads every given file's header; a tensor name in two files is an error.
fn open_unindexed(paths: &[PathBuf]) -> Result<(Vec<ShardFile>, Vec<TensorInfo>)> {
    let mut files = Vec::new();
    let mut tensors = Vec::new();
    let mut seen: HashMap<String, usize> = HashMap::new();
    for (f, path) in paths.iter().enumerate() {
        let h = read_header(path)?;
        for t in &h.tensors {
            if let Some(&other) = seen.get(&t.name) {
                return Err(Error::model(
                    path,
                    format!(
                        "tensor {} is also in {} (no {INDEX_FILE} says which to use)",
                        t.name,
                        paths[other].display()
                    ),
                ));
            }
            seen.insert(t.name.clone(), f);
            tensors.push(TensorInfo {
                name: t.name.clone(),
                dtype: t.dtype,
                shape: t.shape.clone(),
                file: f,
                file_offset: h.data_offset + t.begin,
                len: t.end - t.begin,
                quant: None,
                scale: None,
            });
        }
        files.push(ShardFile {
            path: path.clone(),
            len: h.file_len,
            data_offset: h.data_offset,
        });
    }
    Ok((files, tensors))
}
