//! Writing GGUF (version 3) files: metadata, tensor infos, aligned data.
//!
//! Declare the metadata and the tensors first, then [`GgufWriter::create`]
//! writes the header and returns a [`GgufDataWriter`] that takes each
//! tensor's bytes in the declared order, so a converter streams tensors one
//! at a time. Each tensor's data starts at a multiple of the alignment, as
//! llama.cpp and the `gguf` Python package require.

use std::collections::HashSet;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use super::parse::{MAGIC, MAX_DIMS};
use super::value::MetaValue;
use super::{GgufTensor, DEFAULT_ALIGNMENT, LIMITS};
use crate::error::{Error, Result};
use crate::quant::QuantType;

/// Tensor names must be shorter than this for llama.cpp (`GGML_MAX_NAME`).
const MAX_NAME: usize = 64;

/// The header of a GGUF file being assembled.
#[derive(Debug, Clone)]
pub struct GgufWriter {
    alignment: u64,
    metadata: Vec<(String, MetaValue)>,
    keys: HashSet<String>,
    tensors: Vec<GgufTensor>,
    data_len: u64,
}

impl Default for GgufWriter {
    fn default() -> Self {
        GgufWriter::new()
    }
}

impl GgufWriter {
    /// An empty header with the default alignment (32).
    pub fn new() -> GgufWriter {
        GgufWriter {
            alignment: DEFAULT_ALIGNMENT,
            metadata: Vec::new(),
            keys: HashSet::new(),
            tensors: Vec::new(),
            data_len: 0,
        }
    }

    /// Adds metadata `key = value`. A `general.alignment` (a u32 power of two)
    /// sets the alignment; it must come before any tensor. Keys are unique and
    /// an array's elements must all be of its element type.
    pub fn metadata(&mut self, key: impl Into<String>, value: MetaValue) -> Result<&mut Self> {
        let key = key.into();
        check_value(&key, &value, 0)?;
        if key == "general.alignment" {
            match value {
                MetaValue::U32(a) if a.is_power_of_two() && self.tensors.is_empty() => {
                    self.alignment = a.into()
                }
                _ => {
                    return Err(Error::Input(format!(
                        "GGUF general.alignment must be a u32 power of two set before any tensor, not {value:?}"
                    )))
                }
            }
        }
        if !self.keys.insert(key.clone()) {
            return Err(Error::Input(format!("GGUF metadata key {key} added twice")));
        }
        self.metadata.push((key, value));
        Ok(self)
    }

    /// Declares a tensor of type `ty` with `dims` innermost first (GGUF
    /// order; `[cols, rows]` for a matrix). The row must be whole blocks.
    pub fn tensor(
        &mut self,
        name: impl Into<String>,
        ty: QuantType,
        dims: &[u64],
    ) -> Result<&mut Self> {
        let name = name.into();
        if name.len() >= MAX_NAME {
            return Err(Error::Input(format!(
                "GGUF tensor {name}: names of {MAX_NAME} bytes or more are refused by llama.cpp"
            )));
        }
        if dims.len() > MAX_DIMS as usize {
            return Err(Error::Input(format!(
                "GGUF tensor {name}: {} dimensions (at most {MAX_DIMS})",
                dims.len()
            )));
        }
        if self.tensors.iter().any(|t| t.name == name) {
            return Err(Error::Input(format!("GGUF tensor {name} added twice")));
        }
        let (elems, len) = ty
            .tensor_size(dims)
            .map_err(|e| Error::Input(format!("GGUF tensor {name}: {e}")))?;
        let offset = self.data_len;
        self.data_len = offset
            .checked_add(len)
            .and_then(|end| end.checked_next_multiple_of(self.alignment))
            .ok_or_else(|| Error::Input(format!("GGUF tensor {name}: data size overflows")))?;
        self.tensors.push(GgufTensor {
            name,
            ty,
            dims: dims.to_vec(),
            elems,
            offset,
            file_offset: 0,
            len,
        });
        Ok(self)
    }

    /// The header bytes, padded to the alignment: what precedes the data.
    pub fn header_bytes(&self) -> Vec<u8> {
        let mut h = Vec::new();
        h.extend_from_slice(MAGIC);
        h.extend(3u32.to_le_bytes());
        h.extend((self.tensors.len() as u64).to_le_bytes());
        h.extend((self.metadata.len() as u64).to_le_bytes());
        for (k, v) in &self.metadata {
            put_str(&mut h, k);
            h.extend((v.value_type() as u32).to_le_bytes());
            put_value(&mut h, v);
        }
        for t in &self.tensors {
            put_str(&mut h, &t.name);
            h.extend((t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                h.extend(d.to_le_bytes());
            }
            h.extend(t.ty.ggml_type_id().to_le_bytes());
            h.extend(t.offset.to_le_bytes());
        }
        h.resize(
            (h.len() as u64).next_multiple_of(self.alignment) as usize,
            0,
        );
        h
    }

    /// Creates `path`, writes the header and returns the writer of the
    /// tensors' data.
    pub fn create(self, path: impl AsRef<Path>) -> Result<GgufDataWriter> {
        let path = path.as_ref().to_path_buf();
        let file = File::create(&path).map_err(|e| Error::io("creating", &path, None, e))?;
        let mut out = BufWriter::with_capacity(1 << 20, file);
        let header = self.header_bytes();
        out.write_all(&header)
            .map_err(|e| Error::io("writing the GGUF header to", &path, Some(0), e))?;
        Ok(GgufDataWriter {
            path,
            out,
            written: header.len() as u64,
            next: 0,
            partial: 0,
            header: self,
        })
    }
}

/// Writes the tensors' data after the header, one tensor at a time in the
/// order they were declared.
#[derive(Debug)]
pub struct GgufDataWriter {
    path: PathBuf,
    out: BufWriter<File>,
    written: u64,
    /// Index of the tensor being written.
    next: usize,
    /// Bytes of tensor `next` already written (less than its length).
    partial: u64,
    header: GgufWriter,
}

impl GgufDataWriter {
    /// The next tensor to write, if any is left.
    pub fn next_tensor(&self) -> Option<&GgufTensor> {
        self.header.tensors.get(self.next)
    }

    /// Writes the data of the next declared tensor (exactly its size in
    /// bytes) and pads it to the alignment.
    pub fn write_tensor(&mut self, data: &[u8]) -> Result<()> {
        let t = self.current()?;
        if self.partial != 0 || data.len() as u64 != t.len {
            return Err(Error::Input(format!(
                "{}: tensor {} ({} {:?}) takes {} bytes, got {}{}",
                self.path.display(),
                t.name,
                t.ty,
                t.dims,
                t.len,
                data.len(),
                if self.partial != 0 {
                    format!(" after {} written in parts", self.partial)
                } else {
                    String::new()
                }
            )));
        }
        self.write_tensor_part(data)
    }

    /// Writes the next `data.len()` bytes of the current tensor: a tensor
    /// may arrive in several parts (rows at a time) whose lengths add up to
    /// its size; the last part pads it to the alignment and moves on to the
    /// next tensor.
    pub fn write_tensor_part(&mut self, data: &[u8]) -> Result<()> {
        let t = self.current()?.clone();
        let left = t.len - self.partial;
        if data.len() as u64 > left {
            return Err(Error::Input(format!(
                "{}: tensor {} ({} {:?}) has {left} of its {} bytes left to write, got {}",
                self.path.display(),
                t.name,
                t.ty,
                t.dims,
                t.len,
                data.len()
            )));
        }
        let done = data.len() as u64 == left;
        let pad = if done {
            (t.len.next_multiple_of(self.header.alignment) - t.len) as usize
        } else {
            0
        };
        let at = self.written;
        self.out
            .write_all(data)
            .and_then(|()| self.out.write_all(&vec![0u8; pad]))
            .map_err(|e| {
                Error::io(
                    format!("writing tensor {} to", t.name),
                    &self.path,
                    Some(at),
                    e,
                )
            })?;
        self.written += (data.len() + pad) as u64;
        self.partial += data.len() as u64;
        if done {
            self.partial = 0;
            self.next += 1;
        }
        Ok(())
    }

    fn current(&self) -> Result<&GgufTensor> {
        self.header.tensors.get(self.next).ok_or_else(|| {
            Error::Input(format!(
                "{}: all {} declared tensors are already written",
                self.path.display(),
                self.header.tensors.len()
            ))
        })
    }

    /// Checks that every declared tensor was written and flushes the file.
    pub fn finish(self) -> Result<()> {
        if let Some(t) = self.header.tensors.get(self.next) {
            return Err(Error::Input(format!(
                "{}: tensor {} was declared but not written ({} of {} bytes)",
                self.path.display(),
                t.name,
                self.partial,
                t.len
            )));
        }
        let file = self
            .out
            .into_inner()
            .map_err(|e| Error::io("writing", &self.path, None, e.into_error()))?;
        file.sync_all()
            .map_err(|e| Error::io("syncing", &self.path, None, e))
    }
}

fn put_str(h: &mut Vec<u8>, s: &str) {
    h.extend((s.len() as u64).to_le_bytes());
    h.extend_from_slice(s.as_bytes());
}

fn put_value(h: &mut Vec<u8>, v: &MetaValue) {
    match v {
        MetaValue::U8(x) => h.push(*x),
        MetaValue::I8(x) => h.push(*x as u8),
        MetaValue::U16(x) => h.extend(x.to_le_bytes()),
        MetaValue::I16(x) => h.extend(x.to_le_bytes()),
        MetaValue::U32(x) => h.extend(x.to_le_bytes()),
        MetaValue::I32(x) => h.extend(x.to_le_bytes()),
        MetaValue::F32(x) => h.extend(x.to_le_bytes()),
        MetaValue::Bool(x) => h.push(u8::from(*x)),
        MetaValue::String(s) => put_str(h, s),
        MetaValue::Array(a) => {
            h.extend((a.elem as u32).to_le_bytes());
            h.extend((a.items.len() as u64).to_le_bytes());
            for item in &a.items {
                put_value(h, item);
            }
        }
        MetaValue::U64(x) => h.extend(x.to_le_bytes()),
        MetaValue::I64(x) => h.extend(x.to_le_bytes()),
        MetaValue::F64(x) => h.extend(x.to_le_bytes()),
    }
}

/// Every array's elements are of its element type, all the way down, and
/// arrays nest no deeper than readers accept.
fn check_value(key: &str, v: &MetaValue, depth: u32) -> Result<()> {
    if let MetaValue::Array(a) = v {
        if depth >= LIMITS.array_depth {
            return Err(Error::Input(format!(
                "GGUF metadata {key}: arrays nested deeper than {}",
                LIMITS.array_depth
            )));
        }
        for item in &a.items {
            if item.value_type() != a.elem {
                return Err(Error::Input(format!(
                    "GGUF metadata {key}: a {} in an array of {}",
                    item.value_type(),
                    a.elem
                )));
            }
            check_value(key, item, depth + 1)?;
        }
    }
    Ok(())
}
