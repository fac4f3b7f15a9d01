//! The stage threads of a pass: readers, the pin thread, the transfer thread.
//! The compute side runs on the caller's thread (see `streamer.rs`).
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
use super::plan::Home;
use super::readers::read_layer_inline;
use super::resources::{Dev, FreeSlot, Job, Ready, Resources, Src};
use super::stats::StageStats;
use crate::checkpoint::Layer;
use crate::ring::{Consumer, Producer, Waiter};
use crate::{Error, Result};

/// State shared by every thread of one pass.
pub(crate) struct PassCtx<'r> {
    pub(crate) res: &'r Resources,
    pub(crate) stop: AtomicBool,
    error: Mutex<Option<Error>>,
    pub(crate) read_chunk: u64,
}

impl<'r> PassCtx<'r> {
    pub(crate) fn new(res: &'r Resources, read_chunk: u64) -> PassCtx<'r> {
        PassCtx {
            res,
            stop: AtomicBool::new(false),
            error: Mutex::new(None),
            read_chunk,
        }
    }

    /// Records the first error of the pass and stops every stage.
    pub(crate) fn fail(&self, e: Error) {
        let mut slot = self.error.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some(e);
        }
        self.stop.store(true, Ordering::Release);
    }

    pub(crate) fn stop(&self) {
        self.stop.store(true, Ordering::Release);
    }

    pub(crate) fn take_error(&self) -> Option<Error> {
        self.error.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    pub(crate) fn layers(&self) -> &'r [Layer] {
        self.res.model.layers()
    }

    pub(crate) fn stopped(&self) -> Error {
        Error::Pipeline("stopped".into())
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
    let Some(cpus) = cpus else { return };
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
    ctx: &PassCtx<'_>,
    c: &mut Consumer<'_, T>,
    stall: &mut Duration,
    mut idle: impl FnMut() -> Result<()>,
) -> Result<T> {
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
            break Err(ctx.stopped());
        }
    };
    *stall += t.elapsed();
    r
}

/// The pin thread: copies filled CPU slots into free pinned slots.
pub(crate) fn pin_stage(
    ctx: &PassCtx<'_>,
    mut input: Consumer<'_, Job>,
    mut cpu_free: Producer<'_, u32>,
    mut pin_free: Consumer<'_, u32>,
    mut out: Producer<'_, Job>,
    batch: usize,
) -> StageStats {
    let _guard = StopOnUnwind(&ctx.stop);
    let mut stats = StageStats::default();
    let res = ctx.res;
    let batch = batch.max(1);
    let mut run = || -> Result<()> {
        for _ in 0..ctx.layers().len() {
            out.publish();
            let job = pop_wait(ctx, &mut input, &mut stats.stalled, || Ok(()))?;
            let src = match job.src {
                Src::Cpu(k) => {
                    out.publish();
                    let j = pop_wait(ctx, &mut pin_free, &mut stats.stalled, || Ok(()))?;
                    let t = Instant::now();
                    let len = res.plans[job.layer as usize].copy_bytes as usize;
                    res.pinned_slots[j as usize].begin_fill();
                    // SAFETY: this thread holds the tokens of CPU slot `k`
                    // (filled) and pinned slot `j` (free); both hold at least
                    // `max_copy` ≥ `len` bytes and are distinct allocations.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            res.cpu_ptrs[k as usize].0,
                            res.pinned_ptrs[j as usize].0,
                            len,
                        )
                    };
                    stats.busy += t.elapsed();
                    stats.bytes += len as u64;
                    stats.items += 1;
                    // The free ring has room for every CPU slot.
                    let _ = cpu_free.push(k);
                    Src::Pinned(j)
                }
                other => other,
            };
            let _ = out.write(Job {
                layer: job.layer,
                src,
            });
            if out.unpublished() >= batch {
                out.publish();
            }
        }
        out.publish();
        Ok(())
    };
    if let Err(e) = run() {
        ctx.fail(e);
    }
    stats
}

/// The transfer thread's rings on the host side.
pub(crate) struct H2dInput<'a> {
    /// Filled slots from upstream; `None` when the transfer thread reads
    /// each layer itself (no reader threads).
    pub(crate) full: Option<Consumer<'a, Job>>,
    /// Where pinned slots go back once their copy has completed.
    pub(crate) pin_free: Option<Producer<'a, u32>>,
    /// Where CPU slots go back once staged.
    pub(crate) cpu_free: Option<Producer<'a, u32>>,
}

/// Returns pinned slots whose copies have completed to their free ring.
fn return_pinned(
    res: &Resources,
    pending: &mut VecDeque<u32>,
    free: &mut Option<Producer<'_, u32>>,
) -> Result<()> {
    if let Some(free) = free {
        while let Some(&j) = pending.front() {
            if !res.pinned_done[j as usize].query()? {
                break;
            }
            pending.pop_front();
            // The free ring has room for every pinned slot.
            let _ = free.push(j);
        }
    }
    Ok(())
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

/// The transfer thread.
pub(crate) fn h2d_stage(
    ctx: &PassCtx<'_>,
    mut input: H2dInput<'_>,
    mut gpu_free: Consumer<'_, FreeSlot>,
    mut out: Producer<'_, Ready>,
    batch: usize,
) -> H2dThreadStats {
    let _guard = StopOnUnwind(&ctx.stop);
    let mut st = H2dThreadStats::default();
    let res = ctx.res;
    let batch = batch.max(1);
    let kernels = res.backend.kernels();
    // Pinned slots whose copies are in flight, oldest first.
    let mut pending: VecDeque<u32> = VecDeque::with_capacity(res.pinned_slots.len());

    let mut run = || -> Result<()> {
        for i in 0..ctx.layers().len() {
            out.publish();
            let job = match &mut input.full {
                Some(full) => pop_wait(ctx, full, &mut st.stalled, || {
                    return_pinned(res, &mut pending, &mut input.pin_free)
                })?,
                None => inline_job(ctx, i, &mut st)?,
            };
            return_pinned(res, &mut pending, &mut input.pin_free)?;
            let layer = job.layer as usize;
            let plan = &res.plans[layer];
            let (src_ptr, release): (*const u8, Release) = match job.src {
                Src::Resident(g) => {
                    let _ = out.write(Ready {
                        layer: job.layer,
                        dev: Dev::Cache(g),
                    });
                    if out.unpublished() >= batch {
                        out.publish();
                    }
                    continue;
                }
                Src::Pinned(j) => (res.pinned_ptrs[j as usize].0, Release::Pinned(j)),
                Src::PinnedCache(c) => (res.pinned_cache_ptrs[c as usize].0, Release::None),
                Src::Staging => match &res.staging {
                    Some((_, sptr, _)) => (sptr.0 as *const u8, Release::Staging),
                    None => return Err(Error::Pipeline("no staging buffer".into())),
                },
                Src::Cpu(k) => {
                    let Some((staging, sptr, sdone)) = &res.staging else {
                        return Err(Error::Pipeline("no staging buffer for CPU slots".into()));
                    };
                    let t = Instant::now();
                    sdone.synchronize()?;
                    staging.begin_fill();
                    // SAFETY: this thread holds CPU slot `k`'s token; the
                    // staging buffer's previous copy has completed (synchronized
                    // above); both hold at least `copy_bytes`.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            res.cpu_ptrs[k as usize].0,
                            sptr.0,
                            plan.copy_bytes as usize,
                        )
                    };
                    st.pin.busy += t.elapsed();
                    st.pin.bytes += plan.copy_bytes;
                    st.pin.items += 1;
                    if let Some(free) = &mut input.cpu_free {
                        // The free ring has room for every CPU slot.
                        let _ = free.push(k);
                    }
                    (sptr.0 as *const u8, Release::Staging)
                }
            };
            let (dst, dev) = match plan.home {
                Home::Gpu(g) => (&res.gpu_cache[g], Dev::Cache(g as u32)),
                _ => {
                    let free = pop_wait(ctx, &mut gpu_free, &mut st.stalled, || {
                        return_pinned(res, &mut pending, &mut input.pin_free)
                    })?;
                    if let Some(last) = free.last_layer {
                        // The slot's previous layer must be done on the compute
                        // stream before this copy overwrites it.
                        res.transfer
                            .wait_event(&res.events[last as usize].compute_end)?;
                    }
                    (&res.gpu_slots[free.slot as usize], Dev::Slot(free.slot))
                }
            };
            let ev = &res.events[layer];
            res.transfer.record(&ev.h2d_start)?;
            let gen = match release {
                Release::Pinned(j) => Some((
                    &res.pinned_slots[j as usize].gen,
                    PinnedSource { slot: j, layer },
                )),
                _ => None,
            };
            // SAFETY: the source is pinned memory of at least `copy_bytes`
            // (a pinned slot or cache buffer this thread holds, or the staging
            // buffer), which is not rewritten until `pinned_done`/the staging
            // event recorded below completes; the destination was sized to the
            // largest layer's `device_bytes`.
            unsafe {
                res.transfer
                    .copy_htod(dst, 0, src_ptr, plan.copy_bytes as usize, gen)?;
            }
            for c in &plan.casts {
                // SAFETY: `src`/`dst` offsets were laid out by `LayerPlan::new`
                // inside `device_bytes`, which the destination holds.
                unsafe {
                    res.transfer.cast(
                        kernels,
                        c.from,
                        c.to,
                        dst.ptr() + c.src,
                        dst.ptr() + c.dst,
                        c.n,
                    )?;
                }
            }
            res.transfer.record(&ev.h2d_end)?;
            ev.transferred.store(true, Ordering::Relaxed);
            match release {
                Release::Pinned(j) => {
                    res.transfer.record(&res.pinned_done[j as usize])?;
                    pending.push_back(j);
                }
                Release::Staging => {
                    if let Some((_, _, done)) = &res.staging {
                        res.transfer.record(done)?;
                    }
                }
                Release::None => {}
            }
            if let (Home::Gpu(g), Dev::Cache(_)) = (plan.home, dev) {
                res.gpu_filled[g].store(true, Ordering::Release);
            }
            st.bytes += plan.copy_bytes;
            st.items += 1;
            let _ = out.write(Ready {
                layer: job.layer,
                dev,
            });
            if out.unpublished() >= batch {
                out.publish();
            }
            res.transfer.check()?;
        }
        out.publish();
        Ok(())
    };
    if let Err(e) = run() {
        ctx.fail(e);
    }
    st
}

enum Release {
    Pinned(u32),
    Staging,
    None,
}

/// With no reader threads: the job for layer `i`, reading it first if needed.
fn inline_job(ctx: &PassCtx<'_>, i: usize, st: &mut H2dThreadStats) -> Result<Job> {
    let res = ctx.res;
    let layer = i as u32;
    let src = match res.plans[i].home {
        Home::Gpu(g) if res.gpu_filled[g].load(Ordering::Acquire) => Src::Resident(g as u32),
        Home::Pinned(c) if res.pinned_filled[c].load(Ordering::Acquire) => {
            Src::PinnedCache(c as u32)
        }
        Home::Pinned(c) => {
            let t = Instant::now();
            st.read.bytes += read_layer_inline(ctx, i, res.pinned_cache_ptrs[c])?;
            st.read.busy += t.elapsed();
            st.read.items += 1;
            res.pinned_filled[c].store(true, Ordering::Release);
            Src::PinnedCache(c as u32)
        }
        _ => {
            let Some((staging, sptr, sdone)) = &res.staging else {
                return Err(Error::Pipeline("no staging buffer for inline reads".into()));
            };
            sdone.synchronize()?;
            staging.begin_fill();
            let t = Instant::now();
            st.read.bytes += read_layer_inline(ctx, i, *sptr)?;
            st.read.busy += t.elapsed();
            st.read.items += 1;
            Src::Staging
        }
    };
    Ok(Job { layer, src })
}
