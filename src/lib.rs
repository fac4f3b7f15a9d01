//! layer-streamer: transformer inference on a GPU with far less memory than the
//! model's weights.
//!
//! Each forward pass streams every transformer block's weights from safetensors
//! files on disk to the GPU just ahead of the compute that needs them:
//! disk → page-aligned buffers (`O_DIRECT`) → pinned host ring → GPU slots, each
//! stage its own OS thread, joined by lock-free SPSC rings, with GPU slots
//! recycled through CUDA events.
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs)]
#![warn(clippy::undocumented_unsafe_blocks)]

pub mod cuda;
pub mod dtype;
pub mod error;
pub mod io;
pub mod kernels;
pub mod model;
pub mod models;
pub mod pipeline;
pub mod ring;
pub mod streamer;

pub use dtype::DType;
pub use error::{Error, Result};
pub use model::ModelIndex;
pub use pipeline::{Budget, Device, LayerWeights, PassStats, StreamerConfig, TensorView};
pub use streamer::{ComputeStream, DeviceTensor, LayerStreamer, LayerStreamerBuilder};
