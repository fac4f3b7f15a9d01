//! GGUF files (versions 2 and 3): header, metadata and tensor infos, parsed
//! strictly; split files; a writer.
//!
//! Every count, string and array length read from a file is capped
//! ([`LIMITS`]) and checked against the bytes left in the file before anything
//! is allocated; tensor types must be ones [`QuantType`] knows, rows must be
//! whole blocks, and tensor data must lie inside the file, aligned, without
//! overlaps. Each error is an [`Error::Model`] naming the file, the field or
//! tensor, and the offset.
//!
//! No crate was used for the container: the GGUF crates we looked at (`ggus`,
//! `gguf-rs`) decode the layout but leave the checks above (extents against
//! the file, overlaps, block divisibility, allocation caps, errors that name
//! the field) to the caller, and those checks are most of a parser.
//!
//! ```no_run
//! use layer_streamer::gguf::GgufModel;
//!
//! # fn main() -> layer_streamer::Result<()> {
//! let model = GgufModel::open("SmolLM2-135M-Instruct.Q4_1.gguf")?; // or a split set, or a directory
//! let blocks = model.metadata_u64("llama.block_count")?;
//! for (part, t) in model.tensors() {
//!     println!("{} {} {:?} at {} of part {part}", t.name, t.ty, t.shape(), t.file_offset);
//! }
//! # let _ = blocks; Ok(()) }
//! ```

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::quant::QuantType;

pub mod convert;
mod model;
mod parse;
mod split;
mod value;
mod write;

pub use model::GgufModel;
pub use split::{gguf_parts, split_name};
pub use value::{MetaArray, MetaValue, ValueType};
pub use write::{GgufDataWriter, GgufWriter};

/// Alignment of tensor data when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;

/// Caps on what a GGUF header may declare, checked before allocating.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Most tensors in one file.
    pub tensors: u64,
    /// Most metadata keys in one file.
    pub metadata_keys: u64,
    /// Most metadata values in one file, counting every array element.
    pub metadata_values: u64,
    /// Longest string (key, tensor name or value), in bytes.
    pub string_bytes: u64,
    /// Deepest nesting of arrays in arrays.
    pub array_depth: u32,
}

/// The limits every file is parsed under: far above real models (a 256k-token
/// vocabulary with its merges and types is under a million values).
pub const LIMITS: Limits = Limits {
    tensors: 1 << 20,
    metadata_keys: 1 << 16,
    metadata_values: 1 << 24,
    string_bytes: 1 << 26,
    array_depth: 4,
};

/// One tensor's info: its type, dimensions and where its data is.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufTensor {
    /// The GGUF name, e.g. `blk.3.attn_q.weight`.
    pub name: String,
    /// The stored type.
    pub ty: QuantType,
    /// Dimensions as GGUF stores them: innermost (the row) first.
    pub dims: Vec<u64>,
    /// Number of elements.
    pub elems: u64,
    /// Offset of the data from the start of the data section, as stored.
    pub offset: u64,
    /// Offset of the data in the file.
    pub file_offset: u64,
    /// Bytes of data (whole blocks of `ty`).
    pub len: u64,
}

impl GgufTensor {
    /// Dimensions outermost first, as safetensors and PyTorch write them.
    pub fn shape(&self) -> Vec<u64> {
        self.dims.iter().rev().copied().collect()
    }

    /// Elements per row (`dims[0]`; 1 for a scalar).
    pub fn row_elems(&self) -> u64 {
        self.dims.first().copied().unwrap_or(1)
    }
}

/// One parsed GGUF file.
#[derive(Debug, Clone)]
pub struct GgufFile {
    /// The file.
    pub path: PathBuf,
    /// Format version: 2 or 3.
    pub version: u32,
    /// The file's size in bytes.
    pub file_len: u64,
    /// Alignment of tensor data (`general.alignment`, else 32).
    pub alignment: u64,
    /// Where the data section starts.
    pub data_offset: u64,
    /// Metadata in file order; keys are unique.
    pub metadata: Vec<(String, MetaValue)>,
    /// Tensor infos in file order; names are unique.
    pub tensors: Vec<GgufTensor>,
}

impl GgufFile {
    /// Opens and parses `path` over a memory map: only the header's pages are
    /// read.
    pub fn open(path: impl AsRef<Path>) -> Result<GgufFile> {
        let path = path.as_ref();
        let file = std::fs::File::open(path).map_err(|e| Error::io("opening", path, None, e))?;
        // SAFETY: the map is read-only and private to this call; the file is a
        // model the caller trusts not to be truncated while it is parsed (as
        // for safetensors headers), and only the parsed copy outlives the map.
        let map = unsafe { memmap2::Mmap::map(&file) }
            .map_err(|e| Error::io("memory-mapping", path, None, e))?;
        parse::parse(path, &map)
    }

    /// Parses a whole GGUF file held in `bytes`; `path` only names it in errors.
    pub fn parse(path: impl AsRef<Path>, bytes: &[u8]) -> Result<GgufFile> {
        parse::parse(path.as_ref(), bytes)
    }

    /// The metadata value of `key`.
    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// The tensor named `name`.
    pub fn tensor(&self, name: &str) -> Option<&GgufTensor> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// `general.architecture`, e.g. "llama" or "qwen2".
    pub fn architecture(&self) -> Option<&str> {
        self.get("general.architecture").and_then(MetaValue::as_str)
    }

    /// Bytes of all tensor data.
    pub fn data_bytes(&self) -> u64 {
        self.tensors.iter().map(|t| t.len).sum()
    }
}
