//! Model discovery: shards, safetensors headers, the repeated block structure
//! and each block's read plan.
//!
//! [`ModelIndex::open`] takes a Hugging Face model directory as shipped
//! (`model.safetensors.index.json` with its shards, one `model.safetensors`,
//! or several `*.safetensors`), validates every header against the files on
//! disk, finds the `<prefix>.<i>.<key>` block structure without knowing the
//! architecture, and plans each block's reads: its tensors' byte ranges
//! widened to [`READ_ALIGN`] and coalesced, so a block stored contiguously is
//! one read.
//!
//! ```no_run
//! use layer_streamer::checkpoint::ModelIndex;
//! let index = ModelIndex::open("models/qwen2-7b")?;
//! println!("{} layers under {:?}", index.num_layers(), index.layer_prefix());
//! for op in &index.layers()[0].reads {
//!     println!("file {} [{}, +{}) -> slot {}", op.file, op.file_offset, op.len, op.slot_offset);
//! }
//! # Ok::<(), layer_streamer::Error>(())
//! ```

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::DType;

mod fp8;
mod gguf;
pub mod gguf_hf;
mod gguf_spm;
mod header;
mod index;
mod layers;
mod parts;

pub(crate) use gguf::is_gguf;
pub use header::{parse_header_bytes, read_header, HeaderTensor, ShardHeader, MAX_HEADER_BYTES};
pub use index::{parse_index_json, INDEX_FILE, SINGLE_FILE};
pub use layers::{discover_layers, plan_reads, LayerStructure};
pub use parts::{ModelParts, PartTensor};

/// Alignment of every [`ReadOp`]'s `file_offset`, `len` and `slot_offset`.
pub const READ_ALIGN: u64 = 4096;

/// One safetensors file of a model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardFile {
    /// Where it is.
    pub path: PathBuf,
    /// Its length in bytes.
    pub len: u64,
    /// Where its data section starts: 8 + the header's length.
    pub data_offset: u64,
}

/// Where one tensor's bytes are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    /// Full name, e.g. `model.layers.7.mlp.up_proj.weight`.
    pub name: String,
    /// Element type as stored.
    pub dtype: DType,
    /// Shape, row-major.
    pub shape: Vec<usize>,
    /// Index into [`ModelIndex::files`].
    pub file: usize,
    /// Absolute offset of its first byte in the file.
    pub file_offset: u64,
    /// Its length in bytes (elements × dtype size, or whole blocks of `quant`).
    pub len: u64,
    /// The ggml block type of a tensor stored quantized (GGUF); `dtype` is
    /// then [`DType::U8`]. `None` for plain element types.
    pub quant: Option<crate::quant::QuantType>,
    /// The scale of an FP8 weight (`dtype` [`DType::F8E4M3`] or
    /// [`DType::F8E5M2`]): the companion tensor and how it covers the
    /// weight. `None` for every other tensor.
    pub scale: Option<crate::quant::fp8::Fp8Scale>,
}

impl TensorInfo {
    /// The stored type's name: the ggml block type of a quantized tensor
    /// (`q4_k`), an FP8 weight's format and scales (`f8_e4m3 128x128
    /// blocks`), else the dtype (`bf16`).
    pub fn stored_type(&self) -> String {
        match (self.quant, &self.scale) {
            (Some(q), _) => q.to_string(),
            (None, Some(s)) => format!("{} {}", self.dtype, s.layout),
            (None, None) => self.dtype.to_string(),
        }
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// A tensor of one layer and where it lands in the layer's slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerTensor {
    /// Name relative to `<prefix>.<i>.`, e.g. `mlp.up_proj.weight`.
    pub key: String,
    /// Where its bytes are on disk.
    pub info: TensorInfo,
    /// Offset of its first byte inside the layer's slot.
    pub slot_offset: u64,
}

/// One read of a layer: file bytes `[file_offset, file_offset + len)` into
/// slot bytes `[slot_offset, slot_offset + len)`. All three are multiples of
/// [`READ_ALIGN`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadOp {
    /// Index into [`ModelIndex::files`].
    pub file: usize,
    /// Absolute, aligned start in the file.
    pub file_offset: u64,
    /// Aligned length; `file_offset + len` may pass the end of the file.
    pub len: u64,
    /// Aligned destination offset inside the layer's slot.
    pub slot_offset: u64,
    /// Absolute file offset where the tensor data this read must deliver
    /// ends; end of file at or after it is not an error. Slot bytes that map
    /// past the end of the file hold unspecified values after the read.
    pub required_end: u64,
}

/// One repeated block (transformer layer): its tensors and read plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layer {
    /// Position in the stack, 0-based.
    pub index: usize,
    /// Its tensors, in file order.
    pub tensors: Vec<LayerTensor>,
    /// Its reads, in file order, packed into the slot one after another.
    pub reads: Vec<ReadOp>,
    /// Sum of the reads' lengths: every read lands in `[0, slot_bytes)`.
    pub slot_bytes: u64,
    /// Sum of the tensors' lengths.
    pub data_bytes: u64,
}

/// Where a named tensor is kept inside a [`ModelIndex`].
#[derive(Debug, Clone, Copy)]
enum TensorRef {
    Static(usize),
    Layer(usize, usize),
}

/// A model's files, tensors and layer read plans, validated against the disk.
#[derive(Debug, Clone)]
pub struct ModelIndex {
    dir: PathBuf,
    files: Vec<ShardFile>,
    prefix: String,
    layers: Vec<Layer>,
    statics: Vec<TensorInfo>,
    by_name: HashMap<String, TensorRef>,
    config: Option<serde_json::Value>,
    embedded: Option<Embedded>,
}

/// What a single-file checkpoint (GGUF) carries beside its tensors.
#[derive(Debug, Clone)]
pub(crate) struct Embedded {
    /// `tokenizer.json`'s contents, built from the file's vocabulary.
    pub(crate) tokenizer: Option<serde_json::Value>,
    /// The chat template, with the text of the BOS and EOS tokens it may use.
    pub(crate) chat_template: Option<(String, String, String)>,
    /// Whether the q/k projection rows are stored in llama.cpp's order for
    /// interleaved RoPE (llama-architecture GGUF files).
    pub(crate) rope_interleaved: bool,
}

impl ModelIndex {
    /// Opens a Hugging Face model directory: `model.safetensors.index.json`
    /// with its shards, or `model.safetensors`, or every `*.safetensors` in
    /// it; plus `config.json` where present. Every header is validated
    /// against its file; errors are [`crate::Error::Model`] naming the file
    /// and tensor.
    ///
    /// A `*.gguf` file (or a split set's part, or a directory holding a GGUF
    /// model and no safetensors) opens as the same index: tensors under their
    /// Hugging Face names with their stored types, `config.json` and the
    /// tokenizer made from its metadata.
    pub fn open(dir: impl AsRef<Path>) -> crate::Result<ModelIndex> {
        let path = dir.as_ref();
        if gguf::is_gguf(path) {
            return gguf::open(path);
        }
        index::open(path)
    }

    /// Builds an index from explicit parts (files, data offsets, tensors and
    /// the layer keys), validated like [`open`](Self::open).
    pub fn from_parts(parts: ModelParts) -> crate::Result<ModelIndex> {
        parts::build(parts)
    }

    /// Assembles an index from validated files and tensors and a structure.
    pub(crate) fn assemble(
        dir: PathBuf,
        files: Vec<ShardFile>,
        tensors: Vec<TensorInfo>,
        structure: &LayerStructure,
        config: Option<serde_json::Value>,
    ) -> crate::Result<ModelIndex> {
        let (layers, statics) = layers::build_layers(&files, tensors, structure)?;
        let mut by_name = HashMap::new();
        for (i, t) in statics.iter().enumerate() {
            by_name.insert(t.name.clone(), TensorRef::Static(i));
        }
        for (l, layer) in layers.iter().enumerate() {
            for (i, t) in layer.tensors.iter().enumerate() {
                by_name.insert(t.info.name.clone(), TensorRef::Layer(l, i));
            }
        }
        Ok(ModelIndex {
            dir,
            files,
            prefix: structure.prefix.clone(),
            layers,
            statics,
            by_name,
            config,
            embedded: None,
        })
    }

    /// The model directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The safetensors files, in the order [`TensorInfo::file`] indexes.
    pub fn files(&self) -> &[ShardFile] {
        &self.files
    }

    /// The layers, in order.
    pub fn layers(&self) -> &[Layer] {
        &self.layers
    }

    /// Number of layers.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// The name prefix of the layers, e.g. `model.layers`.
    pub fn layer_prefix(&self) -> &str {
        &self.prefix
    }

    /// Tensors outside the layers (embedding, final norm, `lm_head`, ...), in file order.
    pub fn statics(&self) -> &[TensorInfo] {
        &self.statics
    }

    /// Any tensor by its full name, static or in a layer.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        match *self.by_name.get(name)? {
            TensorRef::Static(i) => self.statics.get(i),
            TensorRef::Layer(l, i) => Some(&self.layers.get(l)?.tensors.get(i)?.info),
        }
    }

    /// `tokenizer.json` built from the checkpoint itself (a GGUF file's
    /// vocabulary); `None` for a directory, whose `tokenizer.json` is a file.
    pub fn embedded_tokenizer(&self) -> Option<&serde_json::Value> {
        self.embedded.as_ref()?.tokenizer.as_ref()
    }

    /// The chat template the checkpoint itself carries (GGUF
    /// `tokenizer.chat_template`), with the text of its BOS and EOS tokens.
    pub fn embedded_chat_template(&self) -> Option<(&str, &str, &str)> {
        let (t, b, e) = self.embedded.as_ref()?.chat_template.as_ref()?;
        Some((t, b, e))
    }

    /// Whether the q/k projections are stored for interleaved (GPT-J style)
    /// RoPE, as llama.cpp permutes them in llama-architecture GGUF files.
    pub fn rope_interleaved(&self) -> bool {
        self.embedded.as_ref().is_some_and(|e| e.rope_interleaved)
    }

    /// `config.json`, where the directory has one (for a GGUF file, the
    /// one its metadata describes).
    pub fn config(&self) -> Option<&serde_json::Value> {
        self.config.as_ref()
    }

    /// The same model with other read plans for its layers: the same
    /// tensors in the same order, with shapes and extents that may cover
    /// fewer rows (the device's part of a CPU/GPU row split).
    pub(crate) fn with_layers(&self, layers: Vec<Layer>) -> ModelIndex {
        debug_assert!(layers
            .iter()
            .zip(&self.layers)
            .all(|(a, b)| a.tensors.len() == b.tensors.len()));
        ModelIndex {
            layers,
            ..self.clone()
        }
    }

    /// The largest layer's [`Layer::slot_bytes`]: the size a slot must have.
    pub fn max_slot_bytes(&self) -> u64 {
        self.layers.iter().map(|l| l.slot_bytes).max().unwrap_or(0)
    }

    /// Sum of every layer's [`Layer::data_bytes`]: the bytes one pass streams.
    pub fn total_layer_bytes(&self) -> u64 {
        self.layers.iter().map(|l| l.data_bytes).sum()
    }

    /// Sum of the static tensors' lengths.
    pub fn total_static_bytes(&self) -> u64 {
        self.statics.iter().map(|t| t.len).sum()
    }

    /// Whether any layer tensor is quantized: ggml blocks or an FP8 weight
    /// with its scale.
    pub fn has_quantized_layers(&self) -> bool {
        let mut tensors = self.layers.iter().flat_map(|l| &l.tensors);
        tensors.any(|t| t.info.quant.is_some() || t.info.scale.is_some())
    }

    /// Whether any layer tensor is an FP8 weight with its scale.
    pub fn has_fp8_layers(&self) -> bool {
        let mut tensors = self.layers.iter().flat_map(|l| &l.tensors);
        tensors.any(|t| t.info.scale.is_some())
    }

    /// The distinct element types of all tensors, sorted.
    pub fn dtypes(&self) -> Vec<DType> {
        let mut v: Vec<DType> = self
            .statics
            .iter()
            .chain(
                self.layers
                    .iter()
                    .flat_map(|l| l.tensors.iter().map(|t| &t.info)),
            )
            .map(|t| t.dtype)
            .collect();
        v.sort();
        v.dedup();
        v
    }
}
