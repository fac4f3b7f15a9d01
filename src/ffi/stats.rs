//! The statistics and memory use a streamer reports through the C API.

use crate::pipeline::StageStats;
use crate::streamer::MemoryUse;
use crate::PassStats;

/// One stage's share of a pass.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ls_stage_stats {
    /// Bytes the stage moved.
    pub bytes: u64,
    /// Seconds the stage spent working.
    pub busy_seconds: f64,
    /// Seconds the stage spent waiting for input or for a free slot.
    pub stalled_seconds: f64,
    /// Layers the stage handled.
    pub items: u64,
}

impl From<&StageStats> for ls_stage_stats {
    fn from(s: &StageStats) -> Self {
        ls_stage_stats {
            bytes: s.bytes,
            busy_seconds: s.busy.as_secs_f64(),
            stalled_seconds: s.stalled.as_secs_f64(),
            items: s.items as u64,
        }
    }
}

/// Statistics of one pass.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ls_pass_stats {
    /// Which pass of the streamer (1 = the first; 0 = none completed yet).
    pub pass: u64,
    /// Wall time of the pass in seconds.
    pub wall_seconds: f64,
    /// Layers processed.
    pub layers: u64,
    /// Bytes of weights the callback received.
    pub layer_bytes: u64,
    /// Reader threads: disk to host slots.
    pub read: ls_stage_stats,
    /// Pin thread: unpinned to pinned slots.
    pub pin: ls_stage_stats,
    /// Host to device copies (device time).
    pub h2d: ls_stage_stats,
    /// The callback's work on the compute stream (device time).
    pub compute: ls_stage_stats,
    /// Layers served from the pinned cache.
    pub pinned_cache_hits: u64,
    /// Layers served from the device cache.
    pub gpu_cache_hits: u64,
    /// Device time in seconds of the casts and dequantization on their own
    /// stream (overlapping `h2d`); 0 when the model needs none.
    pub convert_seconds: f64,
    /// The CPU's rows of a row split: their bytes, and the busy and stalled
    /// time the layer function reported; zero without a split.
    pub cpu: ls_stage_stats,
    /// The share of each split weight's rows the CPU computed (0: none).
    pub cpu_share: f64,
}

impl From<&PassStats> for ls_pass_stats {
    fn from(s: &PassStats) -> Self {
        ls_pass_stats {
            pass: s.pass,
            wall_seconds: s.wall.as_secs_f64(),
            layers: s.layers as u64,
            layer_bytes: s.layer_bytes,
            read: (&s.read).into(),
            pin: (&s.pin).into(),
            h2d: (&s.h2d).into(),
            compute: (&s.compute).into(),
            cpu: (&s.cpu).into(),
            cpu_share: s.cpu_share,
            pinned_cache_hits: s.pinned_cache_hits as u64,
            gpu_cache_hits: s.gpu_cache_hits as u64,
            convert_seconds: s.convert.as_secs_f64(),
        }
    }
}

/// What a streamer allocated.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ls_memory_use {
    /// Size of one device slot.
    pub gpu_slot_size: u64,
    /// Device slots.
    pub gpu_slots: u64,
    /// Bytes of device cache.
    pub gpu_cache_bytes: u64,
    /// Layers resident on the device.
    pub gpu_cache_layers: u64,
    /// Size of one host slot (unpinned or pinned).
    pub host_slot_size: u64,
    /// Unpinned host slots.
    pub cpu_slots: u64,
    /// Pinned host slots.
    pub pinned_slots: u64,
    /// Bytes of pinned cache.
    pub pinned_cache_bytes: u64,
    /// Layers kept in the pinned cache.
    pub pinned_cache_layers: u64,
    /// Device bytes in all.
    pub device_bytes: u64,
    /// Pinned host bytes in all.
    pub pinned_bytes: u64,
}

impl From<&MemoryUse> for ls_memory_use {
    fn from(m: &MemoryUse) -> Self {
        ls_memory_use {
            gpu_slot_size: m.gpu_slot_size,
            gpu_slots: m.gpu_slots as u64,
            gpu_cache_bytes: m.gpu_cache_bytes,
            gpu_cache_layers: m.gpu_cache_layers as u64,
            host_slot_size: m.host_slot_size,
            cpu_slots: m.cpu_slots as u64,
            pinned_slots: m.pinned_slots as u64,
            pinned_cache_bytes: m.pinned_cache_bytes,
            pinned_cache_layers: m.pinned_cache_layers as u64,
            device_bytes: m.device_bytes(),
            pinned_bytes: m.pinned_bytes(),
        }
    }
}
