//! layer-streamer: transformer inference on a GPU with far less memory than the
//! model's weights.
//!
//! Each forward pass streams every transformer block's weights from safetensors
//! files on disk to the GPU just ahead of the compute that needs them:
//! disk → page-aligned buffers (`O_DIRECT`) → pinned host ring → GPU slots, each
//! stage its own OS thread, joined by lock-free SPSC rings, with GPU slots
//! recycled through CUDA events.
//!
//! ```no_run
//! use layer_streamer::{Budget, DType, Device, LayerStreamer, ModelIndex};
//!
//! # fn main() -> layer_streamer::Result<()> {
//! // A Hugging Face model directory: sharded or single safetensors, config.json.
//! let model = ModelIndex::open("./my-model")?;
//! println!("{} layers, {} bytes per pass", model.num_layers(), model.total_layer_bytes());
//!
//! let mut streamer = LayerStreamer::builder(&model)
//!     .device(Device::Cuda(0))        // or Device::Host: the same pipeline, no GPU
//!     .dtype(DType::BF16)             // f16/f32 weights are cast on the device
//!     .n_gpu(2)                       // 3 device slots
//!     .n_cpu_pinned(4)                // readers fill 4 pinned slots directly
//!     .reader_threads(8)
//!     .pinned_cache(Budget::Auto)     // from pass 2 on, no disk reads
//!     .build()?;
//!
//! // Static tensors stay on the device.
//! let embed = streamer.load_static("model.embed_tokens.weight")?;
//!
//! // One pass: the closure runs on this thread for every layer in order, with
//! // the layer's weights already on the device; it queues work on `stream`.
//! let state = streamer.run_pass(embed.ptr(), |activations, w, layer, stream| {
//!     let up = w.tensor("mlp.up_proj.weight")?;
//!     assert_eq!(up.dtype(), DType::BF16);
//!     let _ = (layer, up.ptr(), up.shape(), stream.raw()); // launch kernels here
//!     Ok(activations)
//! })?;
//! let _ = state;
//! println!("{}", streamer.last_pass_stats()); // bytes, busy and stalled time per stage
//! # Ok(()) }
//! ```
//!
//! The modules, from the bottom up: [`cuda`] (the driver API), [`kernels`]
//! (PTX and launchers), [`io`] (aligned buffers, `O_DIRECT` reads), [`checkpoint`]
//! (model directories, read plans), [`synth`] (synthetic models), [`ring`] (the SPSC
//! ring), [`cpu`] (the CPU share of a layer: kernels, pool, split planner),
//! [`pipeline`] (configuration, stages, statistics), [`streamer`]
//! ([`LayerStreamer`]), [`tuner`] (configuration search), [`bench`]
//! (ceilings), [`ffi`] (the C ABI).
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs)]
#![warn(clippy::undocumented_unsafe_blocks)]

pub mod bench;
pub mod checkpoint;
pub mod cpu;
pub mod cuda;
pub mod dtype;
pub mod error;
pub mod ffi;
pub mod gguf;
pub mod host_memory;
pub mod io;
pub mod kernels;
pub mod llm;
pub mod pipeline;
pub mod quant;
pub mod ring;
#[cfg(feature = "serve")]
pub mod serve;
pub mod streamer;
pub mod synth;
#[cfg(test)]
mod test_rng;
pub mod tuner;

pub use checkpoint::ModelIndex;
pub use dtype::DType;
pub use error::{Error, Result};
pub use pipeline::{
    AutoShare, Budget, CpuShare, Dequant, Device, HostRows, LayerWeights, PassStats,
    StreamerConfig, TensorView,
};
pub use streamer::{ComputeStream, DeviceTensor, LayerStreamer, LayerStreamerBuilder};
