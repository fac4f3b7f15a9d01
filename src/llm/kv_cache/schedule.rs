//! The order of an offloaded cache's work: which slot each layer takes, and
//! the copies, event records and waits to queue on the copy and compute
//! streams around each layer's attention, as a pure function of the layers
//! seen so far. [`KvOffload`](super::offload::KvOffload) runs the steps on
//! CUDA; the tests run them on a model of two in-order streams with events,
//! in random interleavings, against a resident cache.

use crate::{Error, Result};

/// One step of the offloaded cache's work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum KvStep {
    /// The compute stream records the pass-start event.
    RecordPassStart,
    /// The copy stream waits for the latest pass-start record: a new pass's
    /// copies start after all compute work queued before it, that of a pass
    /// that failed half-way included.
    CopyWaitsPassStart,
    /// The copy stream waits for the slot's latest `done` record.
    CopyWaitsDone(usize),
    /// The layer's cached prefixes go host → slot, on the copy stream.
    ToSlot { layer: usize, slot: usize },
    /// The copy stream records the slot's `ready`.
    RecordReady(usize),
    /// The compute stream waits for the slot's latest `ready` record.
    ComputeWaitsReady(usize),
    /// The compute stream records the slot's `done`.
    RecordDone(usize),
    /// The layer's new positions go slot → host, on the copy stream.
    ToHost { layer: usize, slot: usize },
}

/// Which layer each slot holds (or is being filled with) in this pass: layer
/// `l` takes slot `l % slots`.
#[derive(Debug, Clone)]
pub(crate) struct KvSchedule {
    /// Per slot, the layer staged into it in this pass.
    staged: Vec<Option<usize>>,
    layers: usize,
}

impl KvSchedule {
    /// The schedule of a model of `layers` layers over `slots >= 1` slots.
    pub(crate) fn new(layers: usize, slots: usize) -> KvSchedule {
        KvSchedule {
            staged: vec![None; slots.max(1)],
            layers,
        }
    }

    /// The slot of `layer`.
    pub(crate) fn slot(&self, layer: usize) -> usize {
        layer % self.staged.len()
    }

    /// Whether `layer`'s copy into its slot is queued in this pass.
    pub(crate) fn holds(&self, layer: usize) -> bool {
        self.staged[self.slot(layer)] == Some(layer)
    }

    /// A new pass (whose positions differ): forgets every slot's layer, and
    /// stages layer 0 (so that its copy overlaps the pass's start) once the
    /// compute work queued so far has run.
    pub(crate) fn begin(&mut self, steps: &mut Vec<KvStep>) {
        self.staged.iter_mut().for_each(|s| *s = None);
        steps.extend([KvStep::RecordPassStart, KvStep::CopyWaitsPassStart]);
        if self.layers > 0 {
            self.stage(0, steps);
        }
    }

    /// The steps before `layer`'s cache write: its copy unless staged, the
    /// next layer's into the other slot (overlapping this layer's compute),
    /// then the compute stream's wait for this one. Returns its slot.
    pub(crate) fn attend(&mut self, layer: usize, steps: &mut Vec<KvStep>) -> Result<usize> {
        self.check(layer)?;
        if !self.holds(layer) {
            self.stage(layer, steps);
        }
        let next = layer + 1;
        if next < self.layers && self.slot(next) != self.slot(layer) && !self.holds(next) {
            self.stage(next, steps);
        }
        let slot = self.slot(layer);
        steps.push(KvStep::ComputeWaitsReady(slot));
        Ok(slot)
    }

    /// The steps once `layer`'s attention is queued: the compute stream
    /// marks the slot done, and the copy stream copies the new positions back
    /// after that.
    pub(crate) fn attended(&mut self, layer: usize, steps: &mut Vec<KvStep>) -> Result<()> {
        self.check(layer)?;
        if !self.holds(layer) {
            return Err(Error::Pipeline(format!(
                "KV layer {layer} finished its attention without a slot"
            )));
        }
        let slot = self.slot(layer);
        steps.extend([
            KvStep::RecordDone(slot),
            KvStep::CopyWaitsDone(slot),
            KvStep::ToHost { layer, slot },
        ]);
        Ok(())
    }

    fn check(&self, layer: usize) -> Result<()> {
        if layer < self.layers {
            return Ok(());
        }
        Err(Error::Pipeline(format!(
            "KV layer {layer} of a cache of {} layers",
            self.layers
        )))
    }

    /// The copy of `layer` into its slot: after the attention that used the
    /// slot before has read it (its copy back, queued earlier on the same
    /// stream, then runs first too).
    fn stage(&mut self, layer: usize, steps: &mut Vec<KvStep>) {
        let slot = self.slot(layer);
        self.staged[slot] = Some(layer);
        steps.extend([
            KvStep::CopyWaitsDone(slot),
            KvStep::ToSlot { layer, slot },
            KvStep::RecordReady(slot),
        ]);
    }
}

#[cfg(test)]
#[path = "schedule_tests.rs"]
mod tests;
