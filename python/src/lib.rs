//! `layer_streamer._native`: the Python extension over the layer-streamer
//! crate. The Python package `layer_streamer` wraps it (PyTorch streams,
//! typed signatures, the tuner's child); see `python/layer_streamer/`.
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs)]
#![warn(clippy::undocumented_unsafe_blocks)]

use pyo3::prelude::*;

mod config;
mod errors;
mod stats;
mod streamer;
mod tensor;
mod tune;

/// The module: `Streamer`, `Tensor`, the exception classes, `tune`.
#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<streamer::Streamer>()?;
    m.add_class::<tensor::Tensor>()?;
    errors::register(m)?;
    tune::register(m)?;
    m.add("OPTIONS", config::OPTIONS.to_vec())?;
    Ok(())
}
