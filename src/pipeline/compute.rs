//! The compute side of a pass, on the caller's thread: takes each layer off
//! the device ring in order, makes the compute stream wait for its transfer,
//! calls the layer function, and hands the slot back once its compute-done
//! event is recorded.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::plan::LayerWeights;
use super::resources::{Dev, FreeSlot, Ready};
use super::stages::{Halt, PassCtx};
use super::{Backend, DevMem, StreamH};
use crate::ring::{Consumer, Producer, Waiter};
use crate::{cuda, Error, Result};

/// The stream the layer function launches its work on.
pub struct ComputeStream {
    pub(crate) inner: StreamH,
}

impl ComputeStream {
    /// The CUDA stream; `None` on the host backend.
    pub fn cuda(&self) -> Option<&cuda::Stream> {
        match &self.inner {
            StreamH::Cuda(s) => Some(s),
            StreamH::Host(_) => None,
        }
    }

    /// The raw `CUstream`; null on the host backend.
    pub fn raw(&self) -> cudarc::driver::sys::CUstream {
        match &self.inner {
            StreamH::Cuda(s) => s.raw(),
            StreamH::Host(_) => std::ptr::null_mut(),
        }
    }

    /// Whether this is the host backend's (synchronous) stream.
    pub fn is_host(&self) -> bool {
        matches!(self.inner, StreamH::Host(_))
    }

    /// Waits until the work queued on the stream has finished.
    pub fn synchronize(&self) -> Result<()> {
        self.inner.synchronize()
    }
}

/// The compute side's ring ends for one pass.
pub(crate) struct ComputeEnds {
    pub(crate) ready: Consumer<'static, Ready>,
    pub(crate) free: Producer<'static, FreeSlot>,
}

/// Runs the layer function over every layer; returns the final state and
/// the time spent waiting for layers.
pub(crate) fn consume<S, F>(
    ctx: &PassCtx,
    compute: &ComputeStream,
    mut ends: ComputeEnds,
    mut state: S,
    layer_fn: &mut F,
    progress: Option<&indicatif::ProgressBar>,
) -> Result<(S, Duration), Halt>
where
    F: FnMut(S, &LayerWeights<'_>, usize, &ComputeStream) -> Result<S>,
{
    let mut stalled = Duration::ZERO;
    for _ in 0..ctx.res.model.num_layers() {
        let item = match ends.ready.pop() {
            Some(item) => item,
            None => {
                let t = Instant::now();
                let item = Waiter::new(&ctx.stop).until(|| ends.ready.pop());
                stalled += t.elapsed();
                item.map_err(|_| Halt::Stopped)?
            }
        };
        #[cfg(test)]
        let early = ctx.faults.release_early.load(Ordering::Relaxed);
        #[cfg(not(test))]
        let early = false;
        if early {
            if let Dev::Slot(slot) = item.dev {
                let _ = ends.free.push(FreeSlot {
                    slot,
                    last_layer: Some(item.layer),
                    held: false,
                });
            }
        }
        state = call_layer(ctx, compute, item, state, layer_fn).map_err(|e| {
            // The layer function's (or the compute side's) own error
            // becomes the pass's error, and stops the other stages.
            ctx.fail(e);
            Halt::Stopped
        })?;
        if let (Dev::Slot(slot), false) = (item.dev, early) {
            // The free ring has room for every device slot.
            let _ = ends.free.push(FreeSlot {
                slot,
                last_layer: Some(item.layer),
                held: ctx.res.events[item.layer as usize]
                    .held
                    .load(Ordering::Relaxed),
            });
        }
        if let Some(pb) = progress {
            pb.inc(1);
        }
    }
    Ok((state, stalled))
}

/// Calls the layer function for one layer between its events.
fn call_layer<S, F>(
    ctx: &PassCtx,
    compute: &ComputeStream,
    item: Ready,
    state: S,
    layer_fn: &mut F,
) -> Result<S>
where
    F: FnMut(S, &LayerWeights<'_>, usize, &ComputeStream) -> Result<S>,
{
    let res = &ctx.res;
    let stream = &compute.inner;
    let layer = item.layer as usize;
    let ev = &res.events[layer];
    stream.wait_event(&ev.h2d_end)?;
    let (mem, release): (&DevMem, _) = match item.dev {
        Dev::Slot(s) => (&res.gpu_slots[s as usize], Some(&ev.release)),
        Dev::Cache(g) => (&res.gpu_cache[g as usize].mem, None),
    };
    stream.record(&ev.compute_start)?;
    if let Backend::Cuda { ctx, .. } = &res.backend {
        // The layer function runs with the streamer's context current, so
        // that driver calls without an explicit context use it.
        ctx.bind()?;
    }
    let weights = LayerWeights {
        layer,
        base: mem.ptr() + res.plans[layer].shift,
        plan: &res.plans[layer],
        host_len: res
            .backend
            .is_host()
            .then(|| mem.len().saturating_sub(res.plans[layer].shift as usize)),
        release,
        held: AtomicBool::new(false),
        split: res.split.as_ref(),
    };
    mem.set_in_use(true);
    let out = layer_fn(state, &weights, layer, compute);
    mem.set_in_use(false);
    let state = out.map_err(|e| Error::LayerFn {
        layer,
        source: Box::new(e),
    })?;
    stream.record(&ev.compute_end)?;
    if weights.held.load(Ordering::Relaxed) {
        // Relaxed: read on this thread (the next pass's start, or drop);
        // the transfer thread learns it through the free ring's token.
        ev.held.store(true, Ordering::Relaxed);
    }
    Ok(state)
}
