//! One Python exception class per kind of [`layer_streamer::Error`], all
//! under `LayerStreamerError`, each raised with the Rust message and a `kind`
//! attribute (the tuner's stable name for the kind: `oom`, `limit`, ...).

use layer_streamer::Error;
use pyo3::prelude::*;
use pyo3::{create_exception, exceptions::PyRuntimeError};

create_exception!(
    layer_streamer,
    LayerStreamerError,
    PyRuntimeError,
    "Base class of every error layer_streamer raises; `kind` names the kind."
);
create_exception!(
    layer_streamer,
    CudaUnavailableError,
    LayerStreamerError,
    "No usable CUDA driver."
);
create_exception!(
    layer_streamer,
    CudaError,
    LayerStreamerError,
    "A CUDA driver call failed; the message names the call and the driver's error."
);
create_exception!(
    layer_streamer,
    IoError,
    LayerStreamerError,
    "Reading a model file failed; the message names the file and offset."
);
create_exception!(
    layer_streamer,
    ModelError,
    LayerStreamerError,
    "The model directory, a safetensors header, index or config is invalid."
);
create_exception!(
    layer_streamer,
    ConfigError,
    LayerStreamerError,
    "A streamer option is invalid or the options are inconsistent."
);
create_exception!(
    layer_streamer,
    LimitError,
    LayerStreamerError,
    "A memory limit (RAM, RLIMIT_MEMLOCK, VRAM) would be exceeded."
);
create_exception!(
    layer_streamer,
    UnknownTensorError,
    LayerStreamerError,
    "No tensor of that name in the model."
);
create_exception!(
    layer_streamer,
    LayerFnError,
    LayerStreamerError,
    "The layer function failed inside the Rust pipeline."
);
create_exception!(
    layer_streamer,
    PipelineError,
    LayerStreamerError,
    "A pipeline stage stopped or found a broken invariant."
);
create_exception!(
    layer_streamer,
    InputError,
    LayerStreamerError,
    "An argument is invalid."
);
create_exception!(
    layer_streamer,
    StaleTensorError,
    LayerStreamerError,
    "A weight view was used after its layer function returned, or after the \
     streamer was closed."
);

/// The Python exception for a Rust error: its class, the Rust message, and
/// `kind` set to [`layer_streamer::tuner::ErrorKind`].
pub fn to_py(e: Error) -> PyErr {
    let msg = e.to_string();
    let err = match &e {
        Error::CudaUnavailable(_) => CudaUnavailableError::new_err(msg),
        Error::Cuda { .. } => CudaError::new_err(msg),
        Error::Io { .. } => IoError::new_err(msg),
        Error::Model { .. } => ModelError::new_err(msg),
        Error::Config(_) => ConfigError::new_err(msg),
        Error::Limit { .. } => LimitError::new_err(msg),
        Error::UnknownTensor(_) => UnknownTensorError::new_err(msg),
        Error::LayerFn { .. } => LayerFnError::new_err(msg),
        Error::Pipeline(_) => PipelineError::new_err(msg),
        Error::Input(_) => InputError::new_err(msg),
        _ => LayerStreamerError::new_err(msg),
    };
    let kind = layer_streamer::tuner::ErrorKind::of(&e).to_string();
    Python::attach(|py| {
        // Best effort: an exception instance always takes a new attribute.
        let _ = err.value(py).setattr("kind", kind);
    });
    err
}

/// Extension trait: `.py()?` turns a crate result into a Python one.
pub trait PyResultExt<T> {
    /// The result with its error converted by [`to_py`].
    fn py_err(self) -> PyResult<T>;
}

impl<T> PyResultExt<T> for layer_streamer::Result<T> {
    fn py_err(self) -> PyResult<T> {
        self.map_err(to_py)
    }
}

/// Adds every exception class to the module.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("LayerStreamerError", py.get_type::<LayerStreamerError>())?;
    m.add(
        "CudaUnavailableError",
        py.get_type::<CudaUnavailableError>(),
    )?;
    m.add("CudaError", py.get_type::<CudaError>())?;
    m.add("IoError", py.get_type::<IoError>())?;
    m.add("ModelError", py.get_type::<ModelError>())?;
    m.add("ConfigError", py.get_type::<ConfigError>())?;
    m.add("LimitError", py.get_type::<LimitError>())?;
    m.add("UnknownTensorError", py.get_type::<UnknownTensorError>())?;
    m.add("LayerFnError", py.get_type::<LayerFnError>())?;
    m.add("PipelineError", py.get_type::<PipelineError>())?;
    m.add("InputError", py.get_type::<InputError>())?;
    m.add("StaleTensorError", py.get_type::<StaleTensorError>())?;
    Ok(())
}
