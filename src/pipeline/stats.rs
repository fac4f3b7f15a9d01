//! What a pass did, stage by stage: bytes moved, time busy, time stalled.

use std::fmt;
use std::time::Duration;

/// The stages of the pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stage {
    /// Reader threads: disk → CPU or pinned slots.
    Read,
    /// Pin thread: CPU slots → pinned slots (or the transfer thread's staging copy).
    Pin,
    /// Transfer: pinned memory → device slots (device time of the copies).
    H2d,
    /// The layer function's work on the compute stream.
    Compute,
    /// The CPU's share of the rows, computed from host memory (as the layer
    /// function reports it with
    /// [`LayerWeights::note_cpu_side`](crate::LayerWeights::note_cpu_side)).
    Cpu,
}

impl Stage {
    /// Every stage, in data-path order.
    pub const ALL: [Stage; 5] = [
        Stage::Read,
        Stage::Pin,
        Stage::H2d,
        Stage::Compute,
        Stage::Cpu,
    ];

    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            Stage::Read => "read",
            Stage::Pin => "pin",
            Stage::H2d => "h2d",
            Stage::Compute => "compute",
            Stage::Cpu => "cpu",
        }
    }
}

/// One stage's share of a pass.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StageStats {
    /// Bytes the stage moved.
    pub bytes: u64,
    /// Time the stage spent working. For reader threads, the sum over threads
    /// divided by the number of threads; for the transfer and compute stages,
    /// device time measured with events.
    pub busy: Duration,
    /// Time the stage spent waiting for input or for a free output slot.
    pub stalled: Duration,
    /// Items (layers) the stage handled.
    pub items: usize,
}

impl StageStats {
    /// Throughput while busy, in GB/s (10^9 bytes per second).
    pub fn busy_gbps(&self) -> f64 {
        gbps(self.bytes, self.busy)
    }
}

/// Bytes over a duration, in GB/s; zero for an empty duration.
pub fn gbps(bytes: u64, d: Duration) -> f64 {
    let s = d.as_secs_f64();
    if s > 0.0 {
        bytes as f64 / s / 1e9
    } else {
        0.0
    }
}

/// Statistics of one pass.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PassStats {
    /// Which pass of this streamer (1 = the first).
    pub pass: u64,
    /// Wall time of the pass, from the call until every layer's work finished.
    pub wall: Duration,
    /// Layers processed.
    pub layers: usize,
    /// Bytes of weights the layer function received (the model's bytes per pass).
    pub layer_bytes: u64,
    /// Per stage: read, pin, h2d, compute.
    pub read: StageStats,
    /// See [`Stage::Pin`].
    pub pin: StageStats,
    /// See [`Stage::H2d`].
    pub h2d: StageStats,
    /// See [`Stage::Compute`]: the device side of a row split.
    pub compute: StageStats,
    /// See [`Stage::Cpu`]: the bytes of the CPU's rows, and the time the
    /// layer function reported for them; zero without a row split.
    pub cpu: StageStats,
    /// The share of each split weight's rows the CPU computed (0: none).
    pub cpu_share: f64,
    /// Layers served from the pinned cache (no disk read).
    pub pinned_cache_hits: usize,
    /// Layers served from the device cache (no read, no transfer).
    pub gpu_cache_hits: usize,
    /// Device time of the casts and dequantization when they run on a
    /// stream of their own, overlapping the copies (then `h2d` is the copies
    /// alone); zero when the model needs none.
    pub convert: Duration,
}

impl PassStats {
    /// The stats of one stage.
    pub fn stage(&self, s: Stage) -> &StageStats {
        match s {
            Stage::Read => &self.read,
            Stage::Pin => &self.pin,
            Stage::H2d => &self.h2d,
            Stage::Compute => &self.compute,
            Stage::Cpu => &self.cpu,
        }
    }

    /// Layer bytes over wall time, in GB/s.
    pub fn gbps(&self) -> f64 {
        gbps(self.layer_bytes, self.wall)
    }

    /// The stage that was busy longest: the one that bounds the pass.
    pub fn bound_by(&self) -> Stage {
        Stage::ALL
            .into_iter()
            .filter(|s| *s != Stage::Cpu || self.cpu_share > 0.0)
            .max_by_key(|s| self.stage(*s).busy)
            .unwrap_or(Stage::Read)
    }
}

impl fmt::Display for PassStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "pass {}: {} layers, {:.3} GB in {:.3} s = {:.2} GB/s (bound by {}; cache hits: {} pinned, {} gpu)",
            self.pass,
            self.layers,
            self.layer_bytes as f64 / 1e9,
            self.wall.as_secs_f64(),
            self.gbps(),
            self.bound_by().name(),
            self.pinned_cache_hits,
            self.gpu_cache_hits,
        )?;
        for s in Stage::ALL {
            let st = self.stage(s);
            if s == Stage::Cpu && self.cpu_share == 0.0 {
                continue;
            }
            writeln!(
                f,
                "  {:<8} {:>9.3} GB  busy {:>8.3} s ({:>6.2} GB/s)  stalled {:>8.3} s  items {}",
                s.name(),
                st.bytes as f64 / 1e9,
                st.busy.as_secs_f64(),
                st.busy_gbps(),
                st.stalled.as_secs_f64(),
                st.items
            )?;
        }
        if self.cpu_share > 0.0 {
            writeln!(
                f,
                "  cpu share {:.3} of each split weight's rows",
                self.cpu_share
            )?;
        }
        if !self.convert.is_zero() {
            writeln!(
                f,
                "  convert  busy {:>8.3} s ({:.3} ms per layer, overlapping h2d)",
                self.convert.as_secs_f64(),
                self.convert.as_secs_f64() * 1e3 / self.h2d.items.max(1) as f64
            )?;
        }
        Ok(())
    }
}
