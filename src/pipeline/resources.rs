//! Everything a streamer allocates once, at build time: open files, slots,
//! caches, streams, events and rings. Passes share it; nothing here is
//! allocated per pass or per layer. Each slot is one value that bundles its
//! memory, its pointer and the events and flags that guard it.

use std::sync::atomic::AtomicBool;

use super::backend::{Backend, DevMem, EventH, PinnedBuf, StreamH};
use super::plan::LayerPlan;
use crate::checkpoint::ModelIndex;
use crate::io::{AlignedBuf, DirectFile};
use crate::ring::Ring;

/// What a host-side slot token refers to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Src {
    /// CPU (unpinned) slot.
    Cpu(u32),
    /// Pinned ring slot.
    Pinned(u32),
    /// Pinned cache buffer.
    PinnedCache(u32),
    /// Already resident in device cache buffer; nothing to transfer.
    Resident(u32),
    /// The transfer thread's own staging buffer (inline reads).
    Staging,
}

/// A layer on its way from the readers to the transfer thread.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Job {
    pub(crate) layer: u32,
    pub(crate) src: Src,
}

/// Where a layer's weights are on the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dev {
    /// A recycled device slot.
    Slot(u32),
    /// A device cache buffer.
    Cache(u32),
}

/// A layer ready on the device.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Ready {
    pub(crate) layer: u32,
    pub(crate) dev: Dev,
}

/// A free device slot and the layer that last used it (whose compute, and
/// any work the layer function held the slot for, must finish before the
/// slot is overwritten).
#[derive(Debug, Clone, Copy)]
pub(crate) struct FreeSlot {
    pub(crate) slot: u32,
    pub(crate) last_layer: Option<u32>,
    /// Whether the last layer's function held the slot past the compute
    /// stream (its `release` event was recorded on another stream).
    pub(crate) held: bool,
}

/// A raw pointer to slot memory that may cross threads: which thread may use
/// it is decided by who holds the slot's token.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SlotPtr(pub(crate) *mut u8);
// SAFETY: a `SlotPtr` is only dereferenced by the thread that holds the
// token of its slot; tokens move between threads through the rings, whose
// release/acquire ordering makes the previous holder's writes visible.
unsafe impl Send for SlotPtr {}
// SAFETY: as above; shared references only copy the address.
unsafe impl Sync for SlotPtr {}

/// The rings that join the stages (see `DESIGN.md`, "The data path").
pub(crate) struct Rings {
    /// Free CPU slots: pin stage (or transfer thread) → readers.
    pub(crate) cpu_free: Ring<u32>,
    /// Filled CPU slots (and cache tokens): readers → pin stage (or transfer thread).
    pub(crate) cpu_full: Ring<Job>,
    /// Free pinned slots: transfer thread → readers (or pin stage).
    pub(crate) pin_free: Ring<u32>,
    /// Filled pinned slots (and cache tokens): readers (or pin stage) → transfer thread.
    pub(crate) pin_full: Ring<Job>,
    /// Free device slots: compute side → transfer thread.
    pub(crate) gpu_free: Ring<FreeSlot>,
    /// Layers on the device: transfer thread → compute side.
    pub(crate) gpu_full: Ring<Ready>,
}

impl Rings {
    pub(crate) fn new(n_cpu: usize, n_pinned: usize, n_gpu_slots: usize, layers: usize) -> Rings {
        Rings {
            cpu_free: Ring::new(n_cpu),
            cpu_full: Ring::new(layers + 1),
            pin_free: Ring::new(n_pinned),
            pin_full: Ring::new(layers + 1),
            gpu_free: Ring::new(n_gpu_slots),
            gpu_full: Ring::new(layers + 1),
        }
    }

    /// Empties every ring and puts every slot back on its free ring.
    pub(crate) fn reset(&mut self, n_cpu: usize, n_pinned: usize, n_gpu_slots: usize) {
        self.cpu_free.clear();
        self.cpu_full.clear();
        self.pin_free.clear();
        self.pin_full.clear();
        self.gpu_free.clear();
        self.gpu_full.clear();
        // The rings' capacities equal the slot counts, so these pushes fit.
        let (mut p, _) = self.cpu_free.split();
        for i in 0..n_cpu {
            let _ = p.push(i as u32);
        }
        let (mut p, _) = self.pin_free.split();
        for i in 0..n_pinned {
            let _ = p.push(i as u32);
        }
        let (mut p, _) = self.gpu_free.split();
        for i in 0..n_gpu_slots {
            let _ = p.push(FreeSlot {
                slot: i as u32,
                last_layer: None,
                held: false,
            });
        }
    }
}

/// Per-layer events, recorded every pass.
pub(crate) struct LayerEvents {
    pub(crate) h2d_start: EventH,
    /// Recorded on the transfer stream after the copy, when the layer's casts
    /// run on the convert stream (which waits for it).
    pub(crate) copied: EventH,
    /// The layer is usable on the device: after its copy, and its casts.
    pub(crate) h2d_end: EventH,
    pub(crate) compute_start: EventH,
    pub(crate) compute_end: EventH,
    /// Recorded by the layer function on a stream of its own when it queues
    /// work there that reads the slot (see `LayerWeights::release_after`).
    pub(crate) release: EventH,
    /// Whether this pass transferred the layer (so `h2d_*` are fresh).
    pub(crate) transferred: AtomicBool,
    /// Whether this pass ran the layer's casts on the convert stream (so
    /// `copied` is fresh).
    pub(crate) converted: AtomicBool,
    /// Whether the layer function recorded `release` this pass: the next
    /// pass's transfers wait for it, and so does dropping the streamer.
    pub(crate) held: AtomicBool,
}

/// An unpinned host slot (readers fill it, the pin stage copies it out).
pub(crate) struct CpuSlot {
    /// Owns the memory behind `ptr`.
    pub(crate) _buf: AlignedBuf,
    pub(crate) ptr: SlotPtr,
}

/// A pinned host slot: a ring slot, or the transfer thread's staging buffer.
pub(crate) struct PinnedSlot {
    /// The memory, and the generation the host backend checks copies against.
    pub(crate) buf: PinnedBuf,
    pub(crate) ptr: SlotPtr,
    /// Recorded on the transfer stream after the copy that reads the slot.
    pub(crate) done: EventH,
}

/// A pinned cache buffer: one layer, kept across passes.
pub(crate) struct PinnedCacheEntry {
    /// Owns the memory behind `ptr`.
    pub(crate) _buf: PinnedBuf,
    pub(crate) ptr: SlotPtr,
    /// Set (Release) once the layer's bytes are in; read with Acquire.
    pub(crate) filled: AtomicBool,
}

/// A device cache buffer: one layer, resident across passes.
pub(crate) struct DeviceCacheEntry {
    pub(crate) mem: DevMem,
    /// Set (Release) once the layer's copy is queued; read with Acquire.
    pub(crate) filled: AtomicBool,
}

/// The streamer's allocations.
pub(crate) struct Resources {
    pub(crate) backend: Backend,
    pub(crate) model: ModelIndex,
    pub(crate) files: Vec<DirectFile>,
    pub(crate) plans: Vec<LayerPlan>,
    pub(crate) cpu_slots: Vec<CpuSlot>,
    pub(crate) pinned_slots: Vec<PinnedSlot>,
    /// The transfer thread's own pinned buffer when there is no pinned ring.
    pub(crate) staging: Option<PinnedSlot>,
    pub(crate) pinned_cache: Vec<PinnedCacheEntry>,
    /// Recycled device slots (`n_gpu + 1` of them, or none when every layer
    /// is resident).
    pub(crate) gpu_slots: Vec<DevMem>,
    pub(crate) gpu_cache: Vec<DeviceCacheEntry>,
    pub(crate) events: Vec<LayerEvents>,
    pub(crate) transfer: StreamH,
    /// Where casts and dequantization run when the model has any: a stream
    /// of its own, so that the next layer's copy overlaps this layer's
    /// conversion instead of waiting behind it.
    pub(crate) convert: Option<StreamH>,
    /// The CPU/GPU row split, when the CPU computes a share of the rows:
    /// `model` is then the device's part.
    pub(crate) split: Option<super::split::RowSplit>,
}

impl Resources {
    /// Waits for every queued copy and conversion.
    pub(crate) fn synchronize_transfers(&self) -> crate::Result<()> {
        let copies = self.transfer.synchronize();
        let converts = match &self.convert {
            Some(c) => c.synchronize(),
            None => Ok(()),
        };
        copies.and(converts)
    }
}
