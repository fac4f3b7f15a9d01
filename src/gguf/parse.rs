//! The strict GGUF parser: every count, length and offset read from the file
//! is checked against what is left of it before anything is allocated.

use std::collections::HashSet;
use std::path::Path;

use super::value::{MetaArray, MetaValue, ValueType};
use super::{GgufFile, GgufTensor, DEFAULT_ALIGNMENT, LIMITS};
use crate::error::{Error, Result};
use crate::quant::QuantType;

/// The magic at offset 0: "GGUF".
pub(super) const MAGIC: &[u8; 4] = b"GGUF";
/// Most dimensions a tensor may have (ggml's `GGML_MAX_DIMS`).
pub(super) const MAX_DIMS: u32 = 4;

/// Reads little-endian values from the file's bytes, naming the file and
/// offset in every error.
struct Cursor<'a> {
    path: &'a Path,
    bytes: &'a [u8],
    pos: usize,
    /// Values allocated for metadata so far, against `LIMITS.metadata_values`.
    values: u64,
}

impl<'a> Cursor<'a> {
    fn err(&self, what: &str, msg: impl std::fmt::Display) -> Error {
        Error::model(self.path, format!("{what} (at offset {}): {msg}", self.pos))
    }

    fn left(&self) -> u64 {
        (self.bytes.len() - self.pos) as u64
    }

    fn take(&mut self, n: u64, what: &str) -> Result<&'a [u8]> {
        if n > self.left() {
            return Err(self.err(
                what,
                format!(
                    "needs {n} bytes but the file ends {} bytes later (truncated?)",
                    self.left()
                ),
            ));
        }
        let s = &self.bytes[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let s = self.take(N as u64, what)?;
        Ok(s.try_into().expect("take returned N bytes"))
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A count of items of at least `min_size` bytes each: at most `cap`, and
    /// no more than the rest of the file can hold.
    fn count(&mut self, what: &str, min_size: u64, cap: u64) -> Result<u64> {
        let n = self.u64(what)?;
        if n > cap {
            return Err(self.err(what, format!("{n} is over the limit of {cap}")));
        }
        if n.saturating_mul(min_size) > self.left() {
            return Err(self.err(
                what,
                format!(
                    "{n} items of at least {min_size} bytes do not fit in the {} bytes left",
                    self.left()
                ),
            ));
        }
        Ok(n)
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let len = self.u64(what)?;
        if len > LIMITS.string_bytes {
            return Err(self.err(
                what,
                format!(
                    "string length {len} is over the limit of {}",
                    LIMITS.string_bytes
                ),
            ));
        }
        let start = self.pos;
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|e| {
            Error::model(
                self.path,
                format!("{what} (at offset {start}): string is not UTF-8: {e}"),
            )
        })
    }

    fn value(&mut self, ty: ValueType, what: &str, depth: u32) -> Result<MetaValue> {
        self.values += 1;
        if self.values > LIMITS.metadata_values {
            return Err(self.err(
                what,
                format!(
                    "more than {} metadata values in the file",
                    LIMITS.metadata_values
                ),
            ));
        }
        Ok(match ty {
            ValueType::U8 => MetaValue::U8(self.array::<1>(what)?[0]),
            ValueType::I8 => MetaValue::I8(self.array::<1>(what)?[0] as i8),
            ValueType::U16 => MetaValue::U16(u16::from_le_bytes(self.array(what)?)),
            ValueType::I16 => MetaValue::I16(i16::from_le_bytes(self.array(what)?)),
            ValueType::U32 => MetaValue::U32(self.u32(what)?),
            ValueType::I32 => MetaValue::I32(i32::from_le_bytes(self.array(what)?)),
            ValueType::F32 => MetaValue::F32(f32::from_le_bytes(self.array(what)?)),
            ValueType::U64 => MetaValue::U64(self.u64(what)?),
            ValueType::I64 => MetaValue::I64(i64::from_le_bytes(self.array(what)?)),
            ValueType::F64 => MetaValue::F64(f64::from_le_bytes(self.array(what)?)),
            ValueType::Bool => match self.array::<1>(what)?[0] {
                0 => MetaValue::Bool(false),
                1 => MetaValue::Bool(true),
                b => {
                    self.pos -= 1;
                    return Err(self.err(what, format!("bool byte {b} is neither 0 nor 1")));
                }
            },
            ValueType::String => MetaValue::String(self.string(what)?),
            ValueType::Array => MetaValue::Array(self.array_value(what, depth)?),
        })
    }

    fn array_value(&mut self, what: &str, depth: u32) -> Result<MetaArray> {
        if depth >= LIMITS.array_depth {
            return Err(self.err(
                what,
                format!("arrays nested deeper than {}", LIMITS.array_depth),
            ));
        }
        let elem = self.value_type(what)?;
        // The cap leaves room for the values read so far, so that nothing is
        // allocated past the limit.
        let room = LIMITS.metadata_values.saturating_sub(self.values);
        let n = self.count(what, elem.min_size(), room)?;
        let mut items = Vec::with_capacity(n as usize);
        // Elements' errors name the key and give the element's offset (no
        // string formatted per element).
        for _ in 0..n {
            items.push(self.value(elem, what, depth + 1)?);
        }
        Ok(MetaArray { elem, items })
    }

    fn value_type(&mut self, what: &str) -> Result<ValueType> {
        let id = self.u32(what)?;
        ValueType::from_id(id).ok_or_else(|| {
            self.pos -= 4;
            self.err(what, format!("unknown value type {id}"))
        })
    }
}

/// Parses the GGUF file whose bytes are `bytes`; `path` names it in errors.
pub(super) fn parse(path: &Path, bytes: &[u8]) -> Result<GgufFile> {
    let mut c = Cursor {
        path,
        bytes,
        pos: 0,
        values: 0,
    };
    let magic = c.array::<4>("header: magic")?;
    if &magic != MAGIC {
        c.pos = 0;
        return Err(c.err(
            "header: magic",
            format!("{magic:02x?} is not \"GGUF\" (not a GGUF file)"),
        ));
    }
    let version = c.u32("header: version")?;
    if version != 2 && version != 3 {
        c.pos -= 4;
        return Err(c.err(
            "header: version",
            format!("version {version} is not supported (only 2 and 3; big-endian files are not)"),
        ));
    }
    let n_tensors = c.count("header: tensor count", 24, LIMITS.tensors)?;
    let n_kv = c.count("header: metadata count", 12, LIMITS.metadata_keys)?;
    let metadata = parse_metadata(&mut c, n_kv)?;
    let alignment = alignment(path, &metadata)?;
    let mut tensors = Vec::with_capacity(n_tensors as usize);
    let mut names = HashSet::with_capacity(n_tensors as usize);
    for i in 0..n_tensors {
        let t = parse_tensor_info(&mut c, i, alignment)?;
        if !names.insert(t.name.clone()) {
            return Err(Error::model(
                path,
                format!("tensor {}: the name appears twice", t.name),
            ));
        }
        tensors.push(t);
    }
    let data_offset = (c.pos as u64).next_multiple_of(alignment);
    let file = GgufFile {
        path: path.to_path_buf(),
        version,
        file_len: bytes.len() as u64,
        alignment,
        data_offset,
        metadata,
        tensors,
    };
    place_tensors(file)
}

fn parse_metadata(c: &mut Cursor<'_>, n: u64) -> Result<Vec<(String, MetaValue)>> {
    let mut metadata = Vec::with_capacity(n as usize);
    let mut keys = HashSet::with_capacity(n as usize);
    for i in 0..n {
        let key = c.string(&format!("metadata key #{i}"))?;
        let what = format!("metadata {key}");
        let ty = c.value_type(&what)?;
        let value = c.value(ty, &what, 0)?;
        if !keys.insert(key.clone()) {
            return Err(c.err(&what, "the key appears twice"));
        }
        metadata.push((key, value));
    }
    Ok(metadata)
}

/// `general.alignment`: a u32 power of two, 32 when absent.
fn alignment(path: &Path, metadata: &[(String, MetaValue)]) -> Result<u64> {
    match metadata.iter().find(|(k, _)| k == "general.alignment") {
        None => Ok(DEFAULT_ALIGNMENT),
        Some((_, MetaValue::U32(a))) if a.is_power_of_two() => Ok(u64::from(*a)),
        Some((_, v)) => Err(Error::model(
            path,
            format!("metadata general.alignment: {v:?} is not a u32 power of two"),
        )),
    }
}

fn parse_tensor_info(c: &mut Cursor<'_>, i: u64, alignment: u64) -> Result<GgufTensor> {
    let name = c.string(&format!("tensor info #{i}: name"))?;
    let what = format!("tensor {name}");
    let n_dims = c.u32(&format!("{what}: dimension count"))?;
    if n_dims > MAX_DIMS {
        c.pos -= 4;
        return Err(c.err(
            &format!("{what}: dimension count"),
            format!("{n_dims} dimensions (at most {MAX_DIMS})"),
        ));
    }
    let mut dims = Vec::with_capacity(n_dims as usize);
    for d in 0..n_dims {
        dims.push(c.u64(&format!("{what}: dimension {d}"))?);
    }
    let type_id = c.u32(&format!("{what}: type"))?;
    let ty = QuantType::from_ggml_type_id(type_id).ok_or_else(|| {
        c.pos -= 4;
        c.err(
            &format!("{what}: type"),
            format!(
                "unknown or unsupported tensor type id {type_id} (supported: {})",
                QuantType::ALL.map(|t| t.name()).join(", ")
            ),
        )
    })?;
    let offset = c.u64(&format!("{what}: data offset"))?;
    let (elems, len) = ty
        .tensor_size(&dims)
        .map_err(|e| Error::model(c.path, format!("{what}: {e}")))?;
    if elems > i64::MAX as u64 {
        return Err(Error::model(
            c.path,
            format!("{what}: {elems} elements (dimensions {dims:?}) is more than ggml allows"),
        ));
    }
    if offset % alignment != 0 {
        return Err(Error::model(
            c.path,
            format!("{what}: data offset {offset} is not a multiple of the alignment {alignment}"),
        ));
    }
    Ok(GgufTensor {
        name,
        ty,
        dims,
        elems,
        offset,
        file_offset: 0,
        len,
    })
}

/// Sets each tensor's file offset and checks that every extent lies inside
/// the file and that no two overlap.
fn place_tensors(mut f: GgufFile) -> Result<GgufFile> {
    let path = f.path.clone();
    for t in &mut f.tensors {
        let end = f
            .data_offset
            .checked_add(t.offset)
            .and_then(|o| o.checked_add(t.len));
        match end {
            Some(end) if end <= f.file_len => t.file_offset = f.data_offset + t.offset,
            _ => {
                return Err(Error::model(
                    &path,
                    format!(
                        "tensor {}: data [{} + {}, +{} bytes) runs past the end of the file ({} bytes; truncated?)",
                        t.name, f.data_offset, t.offset, t.len, f.file_len
                    ),
                ))
            }
        }
    }
    let mut order: Vec<&GgufTensor> = f.tensors.iter().collect();
    order.sort_by_key(|t| (t.offset, t.len));
    for w in order.windows(2) {
        if w[0].offset + w[0].len > w[1].offset {
            return Err(Error::model(
                &path,
                format!(
                    "tensor {}: data at offset {} (+{} bytes) overlaps tensor {} at offset {}",
                    w[0].name, w[0].offset, w[0].len, w[1].name, w[1].offset
                ),
            ));
        }
    }
    Ok(f)
}
