//! The pipelined prefetch: configuration, placement and allocation of the
//! slot pools, backends, stage threads, the pass that wires them, and
//! statistics. [`LayerStreamer`](crate::streamer::LayerStreamer) builds one
//! and runs its passes.

pub(crate) mod alloc;
mod backend;
pub(crate) mod compute;
pub mod config;
pub(crate) mod host;
pub(crate) mod pass;
pub(crate) mod placement;
pub(crate) mod plan;
pub(crate) mod readers;
pub(crate) mod resources;
pub(crate) mod split;
pub(crate) mod split_auto;
pub(crate) mod split_device;
pub(crate) mod stages;
pub mod stats;

pub(crate) use backend::{Backend, DevMem, EventH, StreamH};
pub use config::{parse_size, Budget, CpuShare, Dequant, Device, StreamerConfig};
pub use plan::{LayerWeights, TensorView};
pub use split::{HostRows, ROW_MULTIPLE};
pub use split_auto::AutoShare;
pub use stats::{gbps as gbps_of, PassStats, Stage, StageStats};
