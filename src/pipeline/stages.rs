//! The work of the stage threads in one pass: the pin stage and the transfer
//! stage (the readers are in [`readers`](super::readers), the compute side in
//! [`compute`](super::compute)); the threads themselves live in
//! [`pass`](super::pass).
//!
//! Every blocking wait checks the pass's stop flag, so that the first error
//! (or a panic) anywhere ends every stage promptly. Before a stage blocks it
//! publishes what it has written, so that batching never holds back an item
//! another stage is waiting for.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::host::PinnedSource;
use super::plan::{Home, LayerPlan};
use super::readers::{read_layer_inline, Claim, InFlight};
use super::resources::{Dev, FreeSlot, Job, Ready, Resources, Src};
use super::stats::StageStats;
use super::{DevMem, StreamH};
use crate::checkpoint::Layer;
use crate::ring::{Consumer, Producer, Waiter};
use crate::{Error, Result};

/// Why a stage gave up: the pass was stopped (someone else recorded the
/// reason), or this stage failed.
#[derive(Debug)]
pub(crate) enum Halt {
    /// The stop flag was raised; the error, if any, is already recorded.
    Stopped,
    /// This stage's own error, to be recorded as the pass's.
    Failed(Error),
}

impl From<Error> for Halt {
    fn from(e: Error) -> Halt {
        Halt::Failed(e)
    }
}

/// Hand-over sizes of the stages.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Batches {
    pub(crate) cpu: usize,
    pub(crate) cpu_pinned: usize,
    pub(crate) gpu: usize,
}

/// State shared by the stage threads and the caller's thread, for the
/// streamer's lifetime; reset between passes.
pub(crate) struct PassCtx {
    pub(crate) res: Resources,
    /// Raised by the first failure (or by the compute side when it ends
    /// early); every wait of every stage checks it.
    pub(crate) stop: AtomicBool,
    error: Mutex<Option<Error>>,
    pub(crate) read_chunk: u64,
    pub(crate) batches: Batches,
    /// The reader threads' shared claim state and in-order publisher. Each
    /// pass installs its ring ends here before the readers start and removes
    /// them after every reader has finished.
    pub(crate) claim: Mutex<Claim>,
    pub(crate) inflight: Mutex<InFlight>,
    /// Faults the pipeline's own tests inject.
    #[cfg(test)]
    pub(crate) faults: Faults,
}

/// Faults injected by tests, to show that a panicking stage and a slot
/// recycled too early are caught.
#[cfg(test)]
#[derive(Default)]
pub(crate) struct Faults {
    /// The transfer thread panics at this layer (`usize::MAX`: never).
    pub(crate) h2d_panic_at: std::sync::atomic::AtomicUsize,
    /// The compute side hands each device slot back before its layer
    /// function runs instead of after.
    pub(crate) release_early: AtomicBool,
}

impl PassCtx {
    pub(crate) fn new(res: Resources, read_chunk: u64, batches: Batches) -> PassCtx {
        let layers = res.model.num_layers();
        PassCtx {
            res,
            stop: AtomicBool::new(false),
            error: Mutex::new(None),
            read_chunk,
            batches,
            claim: Mutex::new(Claim::new()),
            inflight: Mutex::new(InFlight::new(layers, batches.cpu)),
            #[cfg(test)]
            faults: Faults {
                h2d_panic_at: usize::MAX.into(),
                ..Faults::default()
            },
        }
    }

    /// Records the first error of the pass and stops every stage.
    pub(crate) fn fail(&self, e: Error) {
        let mut slot = self.error.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some(e);
        }
        // Release: a stage that sees the flag also sees the recorded error.
        self.stop.store(true, Ordering::Release);
    }

    /// Records a stage's halt: its own error, or nothing when it was stopped.
    pub(crate) fn halt(&self, h: Halt) {
        if let Halt::Failed(e) = h {
            self.fail(e);
        }
    }

    pub(crate) fn stop(&self) {
        self.stop.store(true, Ordering::Release);
    }

    pub(crate) fn take_error(&self) -> Option<Error> {
        self.error.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    /// Clears the stop flag and any error, before a pass starts. Called by
    /// the caller's thread while every stage thread is parked; the mailbox
    /// hand-over that starts each stage orders it before their reads.
    pub(crate) fn rearm(&self) {
        self.stop.store(false, Ordering::Relaxed);
        self.take_error();
    }

    pub(crate) fn layers(&self) -> &[Layer] {
        self.res.model.layers()
    }
}

/// Raises the stop flag if the thread unwinds, so a panicking stage does not
/// leave the others waiting forever.
pub(crate) struct StopOnUnwind<'a>(pub(crate) &'a AtomicBool);

impl Drop for StopOnUnwind<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.store(true, Ordering::Release);
        }
    }
}

/// Pins the calling thread to one CPU of `cpus` (the `index`-th, cyclically).
pub(crate) fn pin_thread(cpus: Option<&[usize]>, index: usize) {
    let Some(cpus) = cpus.filter(|c| !c.is_empty()) else {
        return;
    };
    let cpu = cpus[index % cpus.len()];
    let mut set = nix::sched::CpuSet::new();
    if set.set(cpu).is_ok() {
        // Failure (an offline CPU, a restricted cgroup) leaves the thread
        // unpinned, which is only slower.
        let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set);
    }
}

/// Waits for an item from `c`, calling `idle` between attempts; counts the wait as a stall.
fn pop_wait<T>(
    ctx: &PassCtx,
    c: &mut Consumer<'_, T>,
    stall: &mut Duration,
    mut idle: impl FnMut() -> Result<()>,
) -> Result<T, Halt> {
    if let Some(v) = c.pop() {
        return Ok(v);
    }
    let t = Instant::now();
    let mut w = Waiter::new(&ctx.stop);
    let r = loop {
        if let Some(v) = c.pop() {
            break Ok(v);
        }
        idle()?;
        if w.wait().is_err() {
            break Err(Halt::Stopped);
        }
    };
    *stall += t.elapsed();
    r
}

/// The pin stage's ring ends for one pass.
pub(crate) struct PinEnds {
    pub(crate) input: Consumer<'static, Job>,
    pub(crate) cpu_free: Producer<'static, u32>,
    pub(crate) pin_free: Consumer<'static, u32>,
    pub(crate) out: Producer<'static, Job>,
}

/// The pin stage: copies filled CPU slots into free pinned slots.
pub(crate) fn pin_stage(ctx: &PassCtx, mut e: PinEnds) -> StageStats {
    let _guard = StopOnUnwind(&ctx.stop);
    let mut stats = StageStats::default();
    let res = &ctx.res;
    let batch = ctx.batches.cpu_pinned.max(1);
    let mut run = || -> Result<(), Halt> {
        for _ in 0..ctx.layers().len() {
            e.out.publish();
            let job = pop_wait(ctx, &mut e.input, &mut stats.stalled, || Ok(()))?;
            let src = match job.src {
                Src::Cpu(k) => {
                    e.out.publish();
                    let j = pop_wait(ctx, &mut e.pin_free, &mut stats.stalled, || Ok(()))?;
                    let t = Instant::now();
                    let len = res.plans[job.layer as usize].copy_bytes as usize;
                    let pinned = &res.pinned_slots[j as usize];
                    pinned.buf.begin_fill();
                    // SAFETY: this thread holds the tokens of CPU slot `k`
                    // (filled) and pinned slot `j` (free); both hold at least
                    // the largest streamed layer's `copy_bytes` ≥ `len` bytes
                    // and are distinct allocations.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            res.cpu_slots[k as usize].ptr.0,
                            pinned.ptr.0,
                            len,
                        )
                    };
                    stats.busy += t.elapsed();
                    stats.bytes += len as u64;
                    stats.items += 1;
                    // The free ring has room for every CPU slot.
                    let _ = e.cpu_free.push(k);
                    Src::Pinned(j)
                }
                other => other,
            };
            let _ = e.out.write(Job {
                layer: job.layer,
                src,
            });
            if e.out.unpublished() >= batch {
                e.out.publish();
            }
        }
        e.out.publish();
        Ok(())
    };
    if let Err(h) = run() {
        ctx.halt(h);
    }
    stats
}

/// The transfer stage's ring ends for one pass.
pub(crate) struct H2dEnds {
    /// Filled slots from upstream; `None` when the transfer thread reads
    /// each layer itself (no reader threads).
    pub(crate) full: Option<Consumer<'static, Job>>,
    /// Where pinned slots go back once their copy has completed.
    pub(crate) pin_free: Option<Producer<'static, u32>>,
    /// Where CPU slots go back once staged.
    pub(crate) cpu_free: Option<Producer<'static, u32>>,
    pub(crate) gpu_free: Consumer<'static, FreeSlot>,
    pub(crate) out: Producer<'static, Ready>,
}

/// Statistics the transfer thread gathers: its staging copies (pin) and its waits.
#[derive(Default)]
pub(crate) struct H2dThreadStats {
    pub(crate) pin: StageStats,
    pub(crate) read: StageStats,
    pub(crate) stalled: Duration,
    pub(crate) bytes: u64,
    pub(crate) items: usize,
}

/// The transfer stage's state during one pass.
struct H2d<'c> {
    ctx: &'c PassCtx,
    e: H2dEnds,
    /// Pinned slots whose copies are in flight, oldest first.
    pending: VecDeque<u32>,
    st: H2dThreadStats,
}

/// What must happen to the copy's source once the copy has completed.
enum Release {
    Pinned(u32),
    Staging,
    None,
}

/// The transfer stage: copies each layer into a device slot (or its device
/// cache buffer) and hands it to the compute side.
pub(crate) fn h2d_stage(ctx: &PassCtx, e: H2dEnds) -> H2dThreadStats {
    let _guard = StopOnUnwind(&ctx.stop);
    let mut h = H2d {
        ctx,
        e,
        pending: VecDeque::with_capacity(ctx.res.pinned_slots.len()),
        st: H2dThreadStats::default(),
    };
    let batch = ctx.batches.gpu.max(1);
    let mut run = || -> Result<(), Halt> {
        for i in 0..ctx.layers().len() {
            h.e.out.publish();
            #[cfg(test)]
            if ctx.faults.h2d_panic_at.load(Ordering::Relaxed) == i {
                panic!("injected: the transfer thread panics at layer {i}");
            }
            let ready = h.layer(i)?;
            let _ = h.e.out.write(ready);
            if h.e.out.unpublished() >= batch {
                h.e.out.publish();
            }
            ctx.res.transfer.check()?;
        }
        h.e.out.publish();
        Ok(())
    };
    if let Err(halt) = run() {
        ctx.halt(halt);
    }
    h.st
}

/// Returns pinned slots whose copies have completed to their free ring.
fn return_pinned(
    res: &Resources,
    pending: &mut VecDeque<u32>,
    free: &mut Option<Producer<'static, u32>>,
) -> Result<()> {
    if let Some(free) = free {
        while let Some(&j) = pending.front() {
            if !res.pinned_slots[j as usize].done.query()? {
                break;
            }
            pending.pop_front();
            // The free ring has room for every pinned slot.
            let _ = free.push(j);
        }
    }
    Ok(())
}

impl<'c> H2d<'c> {
    /// Moves layer `i` (the `i`-th to arrive) onto the device.
    fn layer(&mut self, i: usize) -> Result<Ready, Halt> {
        let ctx = self.ctx;
        let res = &ctx.res;
        let job = match &mut self.e.full {
            Some(full) => pop_wait(ctx, full, &mut self.st.stalled, || {
                return_pinned(res, &mut self.pending, &mut self.e.pin_free)
            })?,
            None => inline_job(ctx, i, &mut self.st)?,
        };
        return_pinned(res, &mut self.pending, &mut self.e.pin_free)?;
        let plan = &res.plans[job.layer as usize];
        let (src, release) = match job.src {
            Src::Resident(g) => {
                return Ok(Ready {
                    layer: job.layer,
                    dev: Dev::Cache(g),
                })
            }
            src => self.source(src, plan)?,
        };
        let (dst, dev) = self.destination(plan)?;
        self.copy(job.layer as usize, src, dst, &release)?;
        if let (Home::Gpu(g), Dev::Cache(_)) = (plan.home, dev) {
            // Release: a later pass's claim (Acquire) sees the layer as cached.
            res.gpu_cache[g].filled.store(true, Ordering::Release);
        }
        self.st.bytes += plan.copy_bytes;
        self.st.items += 1;
        Ok(Ready {
            layer: job.layer,
            dev,
        })
    }

    /// The host memory a layer is copied from.
    fn source(&mut self, src: Src, plan: &LayerPlan) -> Result<(*const u8, Release)> {
        let res = &self.ctx.res;
        let no_staging = || Error::Pipeline("no staging buffer for CPU slots".into());
        Ok(match src {
            Src::Pinned(j) => (res.pinned_slots[j as usize].ptr.0, Release::Pinned(j)),
            Src::PinnedCache(c) => (res.pinned_cache[c as usize].ptr.0, Release::None),
            Src::Staging => {
                let staging = res.staging.as_ref().ok_or_else(no_staging)?;
                (staging.ptr.0 as *const u8, Release::Staging)
            }
            Src::Cpu(k) => {
                let staging = res.staging.as_ref().ok_or_else(no_staging)?;
                let t = Instant::now();
                staging.done.synchronize()?;
                staging.buf.begin_fill();
                // SAFETY: this thread holds CPU slot `k`'s token; the
                // staging buffer's previous copy has completed (synchronized
                // above); both hold at least `copy_bytes`.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        res.cpu_slots[k as usize].ptr.0,
                        staging.ptr.0,
                        plan.copy_bytes as usize,
                    )
                };
                self.st.pin.busy += t.elapsed();
                self.st.pin.bytes += plan.copy_bytes;
                self.st.pin.items += 1;
                if let Some(free) = &mut self.e.cpu_free {
                    // The free ring has room for every CPU slot.
                    let _ = free.push(k);
                }
                (staging.ptr.0 as *const u8, Release::Staging)
            }
            Src::Resident(_) => {
                return Err(Error::Pipeline("a resident layer has no source".into()))
            }
        })
    }

    /// The device memory a layer goes to: its cache buffer, or a free slot
    /// once everything that may still read the slot is ordered before the copy.
    fn destination(&mut self, plan: &LayerPlan) -> Result<(&'c DevMem, Dev), Halt> {
        let ctx = self.ctx;
        let res = &ctx.res;
        if let Home::Gpu(g) = plan.home {
            return Ok((&res.gpu_cache[g].mem, Dev::Cache(g as u32)));
        }
        let free = pop_wait(ctx, &mut self.e.gpu_free, &mut self.st.stalled, || {
            return_pinned(res, &mut self.pending, &mut self.e.pin_free)
        })?;
        if let Some(last) = free.last_layer {
            let ev = &res.events[last as usize];
            // The slot's previous layer must be done on the compute stream,
            // and on the stream its function held the slot for, before this
            // copy overwrites it.
            res.transfer.wait_event(&ev.compute_end)?;
            if free.held {
                res.transfer.wait_event(&ev.release)?;
            }
        }
        Ok((&res.gpu_slots[free.slot as usize], Dev::Slot(free.slot)))
    }

    /// Queues the copy of `layer` from `src` to `dst`, its casts and its
    /// events, and the hand-back of the source once the copy is done.
    fn copy(
        &mut self,
        layer: usize,
        src: *const u8,
        dst: &DevMem,
        release: &Release,
    ) -> Result<()> {
        let res = &self.ctx.res;
        let plan = &res.plans[layer];
        let ev = &res.events[layer];
        res.transfer.record(&ev.h2d_start)?;
        let gen = match *release {
            Release::Pinned(j) => Some((
                &res.pinned_slots[j as usize].buf.gen,
                PinnedSource { slot: j, layer },
            )),
            _ => None,
        };
        // SAFETY: the source is pinned memory of at least `copy_bytes` (a
        // pinned slot or cache buffer this thread holds, or the staging
        // buffer), which is not rewritten until the `done` event recorded
        // below completes; the destination was sized to the largest layer's
        // `device_bytes`, and nothing reads it any more (see `destination`).
        unsafe {
            res.transfer
                .copy_htod(dst, plan.shift as usize, src, plan.copy_bytes as usize, gen)?;
        }
        // Casts on a stream of their own: the source is handed back as soon
        // as the copy is done, and the next copy need not wait for them.
        let convert = res.convert.as_ref().filter(|_| !plan.casts.is_empty());
        if let Some(conv) = convert {
            res.transfer.record(&ev.copied)?;
            ev.converted.store(true, Ordering::Relaxed);
            self.hand_back(release)?;
            conv.wait_event(&ev.copied)?;
            queue_casts(res, conv, plan, dst)?;
            conv.record(&ev.h2d_end)?;
        } else {
            queue_casts(res, &res.transfer, plan, dst)?;
            res.transfer.record(&ev.h2d_end)?;
            self.hand_back(release)?;
        }
        ev.transferred.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// Records, on the transfer stream, when the copy's source may be
    /// refilled.
    fn hand_back(&mut self, release: &Release) -> Result<()> {
        let res = &self.ctx.res;
        match *release {
            Release::Pinned(j) => {
                res.transfer.record(&res.pinned_slots[j as usize].done)?;
                self.pending.push_back(j);
            }
            Release::Staging => {
                if let Some(staging) = &res.staging {
                    res.transfer.record(&staging.done)?;
                }
            }
            Release::None => {}
        }
        Ok(())
    }
}

/// Queues `plan`'s casts and dequantizations of the layer copied into `dst`
/// on `stream`.
fn queue_casts(res: &Resources, stream: &StreamH, plan: &LayerPlan, dst: &DevMem) -> Result<()> {
    let kernels = res.backend.kernels();
    let base = dst.ptr() + plan.shift;
    for c in &plan.casts {
        let (src, out) = (base + c.src, base + c.dst);
        // SAFETY: `src`/`dst` offsets were laid out by `LayerPlan::new`
        // inside `device_bytes`, which the destination holds: the stored
        // tensor (`n` elements, or `n` elements' blocks) at `src`, its
        // conversion at `dst`; an FP8 weight's scale tensor at its own offset
        // in the same slot; `stream` is ordered after the copy that fills
        // `src` (same stream, or it waits for the `copied` event).
        unsafe {
            let dq = res.backend.dequant_kernels();
            match (c.quant, &c.fp8) {
                (Some(q), _) => stream.dequant(dq, q, c.to, src, out, c.n)?,
                (None, Some((l, scale))) => {
                    stream.dequant_fp8(dq, l, c.to, src, base + scale, out)?
                }
                (None, None) => stream.cast(kernels, c.from, c.to, src, out, c.n)?,
            }
        }
    }
    Ok(())
}

/// With no reader threads: the job for layer `i`, reading it first if needed.
fn inline_job(ctx: &PassCtx, i: usize, st: &mut H2dThreadStats) -> Result<Job> {
    let res = &ctx.res;
    let layer = i as u32;
    let src = match res.plans[i].home {
        Home::Gpu(g) if res.gpu_cache[g].filled.load(Ordering::Acquire) => Src::Resident(g as u32),
        Home::Pinned(c) if res.pinned_cache[c].filled.load(Ordering::Acquire) => {
            Src::PinnedCache(c as u32)
        }
        Home::Pinned(c) => {
            let t = Instant::now();
            st.read.bytes += read_layer_inline(ctx, i, res.pinned_cache[c].ptr)?;
            st.read.busy += t.elapsed();
            st.read.items += 1;
            res.pinned_cache[c].filled.store(true, Ordering::Release);
            Src::PinnedCache(c as u32)
        }
        _ => {
            let Some(staging) = &res.staging else {
                return Err(Error::Pipeline("no staging buffer for inline reads".into()));
            };
            staging.done.synchronize()?;
            staging.buf.begin_fill();
            let t = Instant::now();
            st.read.bytes += read_layer_inline(ctx, i, staging.ptr)?;
            st.read.busy += t.elapsed();
            st.read.items += 1;
            Src::Staging
        }
    };
    Ok(Job { layer, src })
}
