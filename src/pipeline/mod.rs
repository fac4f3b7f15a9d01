//! The pipelined prefetch: configuration, backends, slot pools, stage threads
//! and statistics. [`LayerStreamer`](crate::streamer::LayerStreamer) puts them
//! together.

mod backend;
pub mod config;
pub(crate) mod host;
pub(crate) mod plan;
pub(crate) mod readers;
pub(crate) mod resources;
pub(crate) mod stages;
pub mod stats;

pub(crate) use backend::{Backend, DevMem, EventH, StreamH};
pub use config::{parse_size, Budget, Device, StreamerConfig};
pub use plan::{LayerWeights, TensorView};
pub use stats::{gbps as gbps_of, PassStats, Stage, StageStats};
