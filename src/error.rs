//! The crate's one error type.
//!
//! Every error says what was being done and to what: the file and offset of a
//! failed read, the tensor whose header entry is invalid, the driver call that
//! failed and the driver's own name for the error, the limit that a
//! configuration does not fit under.

use std::path::PathBuf;

/// Result with the crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in layer-streamer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No usable CUDA driver: `libcuda` could not be loaded or `cuInit` failed.
    #[error("CUDA is not available: {0}")]
    CudaUnavailable(String),

    /// A CUDA driver call returned an error.
    #[error("{call} failed: {name} ({code}): {message}")]
    Cuda {
        /// The driver function, e.g. `cuMemHostRegister`.
        call: &'static str,
        /// The raw `CUresult` value.
        code: u32,
        /// The driver's name for the error, e.g. `CUDA_ERROR_OUT_OF_MEMORY`.
        name: String,
        /// The driver's description of the error.
        message: String,
    },

    /// An I/O operation on a file failed.
    #[error("{op} {path}{}: {source}", offset_suffix(*.offset))]
    Io {
        /// What was being done, e.g. "reading 4096 bytes from".
        op: String,
        /// The file.
        path: PathBuf,
        /// The byte offset in the file, where one applies.
        offset: Option<u64>,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },

    /// A model directory, safetensors header, index or config is invalid.
    #[error("{}: {msg}", path.display())]
    Model {
        /// The file (or directory) at fault.
        path: PathBuf,
        /// What is wrong, naming the tensor where there is one.
        msg: String,
    },

    /// A configuration is invalid or inconsistent.
    #[error("invalid configuration: {0}")]
    Config(String),

    /// A resource limit would be exceeded.
    #[error("{what}: asked for {asked} bytes but only {available} are available{}", hint_suffix(.hint))]
    Limit {
        /// The resource: "pinned memory (RLIMIT_MEMLOCK)", "GPU memory", ...
        what: String,
        /// Bytes asked for.
        asked: u64,
        /// Bytes available under the limit.
        available: u64,
        /// How to raise the limit or shrink the request.
        hint: String,
    },

    /// A tensor was asked for by a name the model does not have.
    #[error("no tensor named {0:?} in the model")]
    UnknownTensor(String),

    /// The caller's per-layer function returned an error.
    #[error("layer function failed at layer {layer}: {source}")]
    LayerFn {
        /// The layer whose call failed.
        layer: usize,
        /// The caller's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync + 'static>,
    },

    /// A pipeline stage stopped unexpectedly or detected a broken invariant.
    #[error("pipeline: {0}")]
    Pipeline(String),

    /// A command-line or other user input is invalid.
    #[error("{0}")]
    Input(String),
}

fn offset_suffix(offset: Option<u64>) -> String {
    match offset {
        Some(o) => format!(" at offset {o}"),
        None => String::new(),
    }
}

fn hint_suffix(hint: &str) -> String {
    if hint.is_empty() {
        String::new()
    } else {
        format!(" ({hint})")
    }
}

impl Error {
    /// An [`Error::Io`] for `op` on `path`, optionally at `offset`.
    pub fn io(
        op: impl Into<String>,
        path: impl Into<PathBuf>,
        offset: Option<u64>,
        source: std::io::Error,
    ) -> Self {
        Error::Io {
            op: op.into(),
            path: path.into(),
            offset,
            source,
        }
    }

    /// An [`Error::Model`] about `path`.
    pub fn model(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Model {
            path: path.into(),
            msg: msg.into(),
        }
    }

    /// An [`Error::Config`].
    pub fn config(msg: impl Into<String>) -> Self {
        Error::Config(msg.into())
    }
}
