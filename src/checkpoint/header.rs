//! safetensors headers: read over a memory map (only the header's pages are
//! touched), validated strictly by the `safetensors` crate, with our own pass
//! over a rejected header to say which tensor is at fault.

use std::fs::File;
use std::path::Path;

use memmap2::Mmap;
use safetensors::SafeTensors;
use serde_json::Value;

use crate::{DType, Error, Result};

/// The largest header accepted, in bytes (the `safetensors` crate's own cap).
pub const MAX_HEADER_BYTES: u64 = 100_000_000;

/// One tensor entry of a safetensors header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderTensor {
    /// Full name.
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Shape.
    pub shape: Vec<usize>,
    /// `[begin, end)` relative to the data section.
    pub begin: u64,
    /// End of the tensor's bytes, relative to the data section.
    pub end: u64,
}

/// A validated safetensors header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardHeader {
    /// Length of the JSON header in bytes.
    pub header_len: u64,
    /// Where the data section starts: 8 + `header_len`.
    pub data_offset: u64,
    /// The file's length.
    pub file_len: u64,
    /// The tensors, ordered by offset.
    pub tensors: Vec<HeaderTensor>,
}

/// Reads and validates the header of the safetensors file at `path`.
pub fn read_header(path: &Path) -> Result<ShardHeader> {
    let file = File::open(path).map_err(|e| Error::io("opening", path, None, e))?;
    let len = file
        .metadata()
        .map_err(|e| Error::io("reading the metadata of", path, None, e))?
        .len();
    if len < 8 {
        return Err(too_short(path, len));
    }
    // SAFETY: the mapping is read-only and private to this call; only the
    // header pages are read. A file truncated by another process while mapped
    // would fault, as it would for any reader of a memory-mapped checkpoint;
    // model files are not modified while being opened.
    let map =
        unsafe { Mmap::map(&file) }.map_err(|e| Error::io("memory-mapping", path, None, e))?;
    parse_header_bytes(path, &map)
}

fn too_short(path: &Path, len: u64) -> Error {
    Error::model(
        path,
        format!("file is {len} bytes, too short for a safetensors header (truncated?)"),
    )
}

/// Validates a whole safetensors file's bytes (`bytes` is the complete file,
/// typically a memory map; only the header is read) and returns its header.
/// Errors name `path` and, where there is one, the tensor at fault.
pub fn parse_header_bytes(path: &Path, bytes: &[u8]) -> Result<ShardHeader> {
    let file_len = bytes.len() as u64;
    let Some(prefix) = bytes.get(..8) else {
        return Err(too_short(path, file_len));
    };
    let mut n8 = [0u8; 8];
    n8.copy_from_slice(prefix);
    let n = u64::from_le_bytes(n8);
    if n > MAX_HEADER_BYTES {
        return Err(Error::model(
            path,
            format!("header length {n} exceeds the {MAX_HEADER_BYTES}-byte cap"),
        ));
    }
    if n > file_len - 8 {
        return Err(Error::model(
            path,
            format!("header length {n} runs past the end of the file (file is {file_len} bytes; truncated?)"),
        ));
    }
    let data_offset = 8 + n;
    let data_len = file_len - data_offset;
    let header_bytes = &bytes[8..data_offset as usize];
    let meta = match SafeTensors::read_metadata(bytes) {
        Ok((_, meta)) => meta,
        Err(e) => {
            let why = diagnose(header_bytes, data_len)
                .unwrap_or_else(|| format!("invalid safetensors header: {e}"));
            return Err(Error::model(path, why));
        }
    };
    let mut tensors = Vec::with_capacity(meta.tensors().len());
    for name in meta.offset_keys() {
        let Some(info) = meta.info(&name) else {
            continue;
        };
        let st = format!("{:?}", info.dtype);
        let dtype = DType::parse(&st).ok_or_else(|| {
            Error::model(path, format!("tensor {name}: dtype {st} is not supported"))
        })?;
        let begin = info.data_offsets.0 as u64;
        check_alignment(path, &name, dtype, data_offset, begin)?;
        tensors.push(HeaderTensor {
            name,
            dtype,
            shape: info.shape.clone(),
            begin,
            end: info.data_offsets.1 as u64,
        });
    }
    Ok(ShardHeader {
        header_len: n,
        data_offset,
        file_len,
        tensors,
    })
}

/// Fails unless tensor `name`, of `dtype`, starting `begin` bytes into the
/// data section at `data_offset`, sits at a file offset that is a multiple of
/// its element size. Reads keep a tensor's offset modulo the block size, so a
/// tensor misaligned in the file would be misaligned in every slot (and its
/// device pointer unfit for the kernels and GEMMs).
fn check_alignment(
    path: &Path,
    name: &str,
    dtype: DType,
    data_offset: u64,
    begin: u64,
) -> Result<()> {
    let align = dtype.size() as u64;
    let at = data_offset.saturating_add(begin);
    if at.is_multiple_of(align) {
        return Ok(());
    }
    Err(Error::model(
        path,
        format!(
            "tensor {name}: its {dtype} data starts at file offset {at}, which is not a multiple \
             of {align} (the header is {} bytes, not padded to a multiple of 8 as safetensors \
             writers do); re-save the file with a current safetensors",
            data_offset - 8
        ),
    ))
}

/// Finds what is wrong with a header the `safetensors` crate rejected, naming
/// the tensor; `None` when no specific fault is found.
fn diagnose(header: &[u8], data_len: u64) -> Option<String> {
    let text = match std::str::from_utf8(header) {
        Ok(t) => t,
        Err(e) => return Some(format!("header is not UTF-8: {e}")),
    };
    let value: Value = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(e) => return Some(format!("header is not valid JSON: {e}")),
    };
    let Value::Object(map) = value else {
        return Some("header is not a JSON object".into());
    };
    let mut spans: Vec<(u64, u64, &str)> = Vec::new();
    for (name, entry) in &map {
        if name == "__metadata__" {
            if !entry.is_object() || entry.as_object()?.values().any(|v| !v.is_string()) {
                return Some("__metadata__ is not an object of strings".into());
            }
            continue;
        }
        let (b, e) = match check_entry(name, entry) {
            Ok(span) => span,
            Err(msg) => return Some(msg),
        };
        spans.push((b, e, name));
    }
    spans.sort();
    // The first tensor, in file order, that the data section does not hold.
    if let Some(&(b, e, name)) = spans.iter().find(|s| s.1 > data_len) {
        return Some(format!(
            "tensor {name}: data_offsets [{b}, {e}] run past the end of the data section \
             ({data_len} bytes; truncated?)"
        ));
    }
    let mut prev: Option<(u64, u64, &str)> = None;
    for &(b, e, name) in &spans {
        match prev {
            None if b != 0 => {
                return Some(format!(
                    "tensor {name}: data_offsets [{b}, {e}] leave a gap of {b} bytes at the start of the data section"
                ))
            }
            Some((pb, pe, pn)) if b < pe => {
                return Some(format!(
                    "tensors {pn} [{pb}, {pe}] and {name} [{b}, {e}] overlap"
                ))
            }
            Some((pb, pe, pn)) if b > pe => {
                return Some(format!(
                    "gap of {} bytes between tensor {pn} [{pb}, {pe}] and tensor {name} [{b}, {e}]",
                    b - pe
                ))
            }
            _ => {}
        }
        prev = Some((b, e, name));
    }
    let end = prev.map_or(0, |p| p.1);
    if end != data_len {
        return Some(format!(
            "the tensors end at data offset {end} but the data section has {data_len} bytes"
        ));
    }
    None
}

/// Checks one header entry: dtype, shape and offsets agree. Returns its span.
fn check_entry(name: &str, entry: &Value) -> std::result::Result<(u64, u64), String> {
    let bad = |what: &str| format!("tensor {name}: {what}");
    let dtype_name = entry
        .get("dtype")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("missing or non-string \"dtype\""))?;
    let elem_bits: u64 = match dtype_name {
        "F4" => 4,
        "F6_E2M3" | "F6_E3M2" => 6,
        "F8_E8M0" => 8,
        "U16" => 16,
        "U32" => 32,
        "U64" => 64,
        other => match DType::parse(other) {
            Some(d) if d.safetensors_name() == other => d.size() as u64 * 8,
            _ => return Err(bad(&format!("unknown dtype {other:?}"))),
        },
    };
    let shape = entry
        .get("shape")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("missing or non-array \"shape\""))?;
    let mut numel: u64 = 1;
    for d in shape {
        let d = d
            .as_u64()
            .ok_or_else(|| bad(&format!("shape entry {d} is not a non-negative integer")))?;
        numel = numel
            .checked_mul(d)
            .ok_or_else(|| bad("the shape's element count overflows"))?;
    }
    let offs = entry
        .get("data_offsets")
        .and_then(Value::as_array)
        .filter(|a| a.len() == 2)
        .ok_or_else(|| bad("\"data_offsets\" is not a pair"))?;
    let (Some(b), Some(e)) = (offs[0].as_u64(), offs[1].as_u64()) else {
        return Err(bad("\"data_offsets\" are not non-negative integers"));
    };
    if e < b {
        return Err(bad(&format!(
            "data_offsets [{b}, {e}] end before they begin"
        )));
    }
    let bits = numel
        .checked_mul(elem_bits)
        .ok_or_else(|| bad("the tensor's size overflows"))?;
    if bits % 8 != 0 || bits / 8 != e - b {
        return Err(bad(&format!(
            "data_offsets [{b}, {e}] hold {} bytes but dtype {dtype_name} x shape {} needs {} bytes",
            e - b,
            Value::Array(shape.clone()),
            bits as f64 / 8.0
        )));
    }
    Ok((b, e))
}
