//! The compute side of a pass, on the caller's thread: takes each layer off
//! the device ring in order, makes the compute stream wait for its transfer,
//! calls the layer function, and hands the slot back once its compute-done
//! event is recorded.

use std::time::{Duration, Instant};

use super::ComputeStream;
use crate::pipeline::plan::LayerWeights;
use crate::pipeline::resources::{Dev, FreeSlot, Ready};
use crate::pipeline::stages::PassCtx;
use crate::pipeline::DevMem;
use crate::ring::{Consumer, Producer};
use crate::{Error, Result};

/// The compute side: runs on the caller's thread.
pub(crate) fn consume<S, F>(
    ctx: &PassCtx<'_>,
    compute: &ComputeStream,
    mut ready: Consumer<'_, Ready>,
    mut free: Producer<'_, FreeSlot>,
    mut state: S,
    layer_fn: &mut F,
    progress: Option<&indicatif::ProgressBar>,
) -> Result<(S, Duration)>
where
    F: FnMut(S, &LayerWeights<'_>, usize, &ComputeStream) -> Result<S>,
{
    let res = ctx.res;
    let stream = &compute.inner;
    let mut stalled = Duration::ZERO;
    let result = (|| {
        for _ in 0..res.model.num_layers() {
            let item = match ready.pop() {
                Some(item) => item,
                None => {
                    let t = Instant::now();
                    let item = crate::ring::Waiter::new(&ctx.stop).until(|| ready.pop());
                    stalled += t.elapsed();
                    match item {
                        Ok(item) => item,
                        Err(_) => return Err(stopped()),
                    }
                }
            };
            let layer = item.layer as usize;
            let ev = &res.events[layer];
            stream.wait_event(&ev.h2d_end)?;
            let mem: &DevMem = match item.dev {
                Dev::Slot(s) => &res.gpu_slots[s as usize],
                Dev::Cache(g) => &res.gpu_cache[g as usize],
            };
            stream.record(&ev.compute_start)?;
            let weights = LayerWeights {
                layer,
                base: mem.ptr(),
                plan: &res.plans[layer],
                host_len: res.backend.is_host().then(|| mem.len()),
            };
            mem.set_in_use(true);
            let out = layer_fn(state, &weights, layer, compute);
            mem.set_in_use(false);
            state = out.map_err(|e| Error::LayerFn {
                layer,
                source: Box::new(e),
            })?;
            stream.record(&ev.compute_end)?;
            if let Dev::Slot(slot) = item.dev {
                // The free ring has room for every device slot.
                let _ = free.push(FreeSlot {
                    slot,
                    last_layer: Some(item.layer),
                });
            }
            if let Some(pb) = progress {
                pb.inc(1);
            }
        }
        Ok(state)
    })();
    match result {
        Ok(state) => Ok((state, stalled)),
        Err(e) if is_stopped(&e) => Err(e),
        Err(e) => {
            // The layer function's (or the compute side's) own error becomes
            // the pass's error, and stops the other stages.
            ctx.fail(e);
            Err(stopped())
        }
    }
}

fn stopped() -> Error {
    Error::Pipeline("stopped".into())
}

fn is_stopped(e: &Error) -> bool {
    matches!(e, Error::Pipeline(m) if m == "stopped")
}
