//! A GGUF model: one file or every part of a split set, checked together.

use std::collections::HashMap;
use std::path::Path;

use super::{gguf_parts, GgufFile, GgufTensor, MetaArray, MetaValue};
use crate::error::{Error, Result};

/// The parsed files of one GGUF model. The metadata is the first part's (as
/// llama.cpp's `gguf-split` writes it); tensors may sit in any part.
#[derive(Debug, Clone)]
pub struct GgufModel {
    /// The parts in order (one for an unsplit model).
    pub parts: Vec<GgufFile>,
    /// Tensor name to (part, index in that part's tensors).
    index: HashMap<String, (usize, usize)>,
}

impl GgufModel {
    /// Opens the model at `path` (a file, a split part, or a directory; see
    /// [`gguf_parts`]) and parses every part. A split set's `split.no` and
    /// `split.count`, where present, must match the file names, and a tensor
    /// name may appear in only one part.
    pub fn open(path: impl AsRef<Path>) -> Result<GgufModel> {
        let paths = gguf_parts(path.as_ref())?;
        let parts = paths
            .iter()
            .map(GgufFile::open)
            .collect::<Result<Vec<_>>>()?;
        GgufModel::from_parts(parts)
    }

    /// A model of already parsed parts, in order, checked as [`GgufModel::open`] does.
    pub fn from_parts(parts: Vec<GgufFile>) -> Result<GgufModel> {
        if parts.is_empty() {
            return Err(Error::Input("a GGUF model needs at least one file".into()));
        }
        let count = parts.len() as u64;
        let mut index = HashMap::new();
        for (p, f) in parts.iter().enumerate() {
            check_split_key(f, "split.no", p as u64)?;
            check_split_key(f, "split.count", count)?;
            for (i, t) in f.tensors.iter().enumerate() {
                if let Some((q, _)) = index.insert(t.name.clone(), (p, i)) {
                    return Err(Error::model(
                        &f.path,
                        format!("tensor {}: also in {}", t.name, parts[q].path.display()),
                    ));
                }
            }
        }
        Ok(GgufModel { parts, index })
    }

    /// The first part: where the metadata is.
    pub fn first(&self) -> &GgufFile {
        &self.parts[0]
    }

    /// The metadata value of `key`.
    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.first().get(key)
    }

    /// `general.architecture`.
    pub fn architecture(&self) -> Result<&str> {
        self.metadata_str("general.architecture")
    }

    fn meta<'a, T>(
        &'a self,
        key: &str,
        expected: &str,
        f: impl FnOnce(&'a MetaValue) -> Option<T>,
    ) -> Result<T> {
        let path = &self.first().path;
        let v = self
            .get(key)
            .ok_or_else(|| Error::model(path, format!("metadata {key} is missing")))?;
        f(v).ok_or_else(|| {
            Error::model(
                path,
                format!(
                    "metadata {key}: expected {expected}, found a {} value",
                    v.value_type()
                ),
            )
        })
    }

    /// `key` as a non-negative integer of any width; an error naming the file
    /// and key when it is missing or of another type.
    pub fn metadata_u64(&self, key: &str) -> Result<u64> {
        self.meta(key, "a non-negative integer", MetaValue::as_u64)
    }

    /// `key` as a float (f32 or f64).
    pub fn metadata_f64(&self, key: &str) -> Result<f64> {
        self.meta(key, "a float", MetaValue::as_f64)
    }

    /// `key` as a string.
    pub fn metadata_str(&self, key: &str) -> Result<&str> {
        self.meta(key, "a string", MetaValue::as_str)
    }

    /// `key` as an array.
    pub fn metadata_array(&self, key: &str) -> Result<&MetaArray> {
        self.meta(key, "an array", MetaValue::as_array)
    }

    /// The tensor named `name` and the index of the part holding it.
    pub fn tensor(&self, name: &str) -> Option<(usize, &GgufTensor)> {
        let &(p, i) = self.index.get(name)?;
        Some((p, &self.parts[p].tensors[i]))
    }

    /// Every tensor with the index of its part, part by part in file order.
    pub fn tensors(&self) -> impl Iterator<Item = (usize, &GgufTensor)> {
        self.parts
            .iter()
            .enumerate()
            .flat_map(|(p, f)| f.tensors.iter().map(move |t| (p, t)))
    }
}

/// A split key, where present, must be the integer `want`.
fn check_split_key(f: &GgufFile, key: &str, want: u64) -> Result<()> {
    match f.get(key) {
        None => Ok(()),
        Some(v) if v.as_u64() == Some(want) => Ok(()),
        Some(v) => Err(Error::model(
            &f.path,
            format!("metadata {key} is {v:?}, but the file names say {want}"),
        )),
    }
}
