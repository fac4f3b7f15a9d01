//! Everything a streamer allocates once, at build time: open files, slots,
//! caches, streams, events and rings. Passes borrow it; nothing here is
//! allocated per pass or per layer.

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

/// A free device slot and the layer that last used it (whose compute must
/// finish before the slot is overwritten).
#[derive(Debug, Clone, Copy)]
pub(crate) struct FreeSlot {
    pub(crate) slot: u32,
    pub(crate) last_layer: Option<u32>,
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
            });
        }
    }
}

/// Per-layer events, recorded every pass.
pub(crate) struct LayerEvents {
    pub(crate) h2d_start: EventH,
    pub(crate) h2d_end: EventH,
    pub(crate) compute_start: EventH,
    pub(crate) compute_end: EventH,
    /// Whether this pass transferred the layer (so `h2d_*` are fresh).
    pub(crate) transferred: AtomicBool,
}

/// The streamer's allocations.
pub(crate) struct Resources {
    pub(crate) backend: Backend,
    pub(crate) model: ModelIndex,
    pub(crate) files: Vec<DirectFile>,
    pub(crate) plans: Vec<LayerPlan>,
    pub(crate) cpu_slots: Vec<AlignedBuf>,
    pub(crate) cpu_ptrs: Vec<SlotPtr>,
    pub(crate) pinned_slots: Vec<PinnedBuf>,
    pub(crate) pinned_ptrs: Vec<SlotPtr>,
    /// Per pinned slot: recorded after the copy that reads it.
    pub(crate) pinned_done: Vec<EventH>,
    /// The transfer thread's own pinned buffer when there is no pinned ring.
    pub(crate) staging: Option<(PinnedBuf, SlotPtr, EventH)>,
    /// Owns the memory behind `pinned_cache_ptrs`.
    pub(crate) _pinned_cache: Vec<PinnedBuf>,
    pub(crate) pinned_cache_ptrs: Vec<SlotPtr>,
    pub(crate) pinned_filled: Vec<AtomicBool>,
    pub(crate) gpu_slots: Vec<DevMem>,
    pub(crate) gpu_cache: Vec<DevMem>,
    pub(crate) gpu_filled: Vec<AtomicBool>,
    pub(crate) events: Vec<LayerEvents>,
    pub(crate) transfer: StreamH,
}
