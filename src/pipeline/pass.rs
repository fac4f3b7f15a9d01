//! A pass in one place: the stage threads, which live as long as the
//! streamer and park between passes; the rings that join them, wired anew
//! for each pass; and the pass itself: prepare, wire, start the stages, run
//! the compute side on the caller's thread, collect the stages, add up the
//! statistics.
//!
//! # Why the ring ends are `'static`
//! A [`Ring`](crate::ring::Ring) lends its ends for as long as it is mutably
//! borrowed. The stage threads outlive any borrow of one pass, so the rings
//! sit at a fixed heap address ([`RingHome`]) for the streamer's lifetime and
//! each pass's ends are made `'static`. That is sound because of one protocol,
//! kept by [`Pipeline::run`]: every end of a pass is dropped before the pass
//! returns (each stage thread drops its task before it posts its outcome, and
//! `run` waits for every outcome), so at the start of the next pass, when the
//! rings are cleared and split again through `&mut`, no end is alive; and
//! [`Pipeline`]'s `Drop` joins every thread before the rings are freed.

use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::ptr::NonNull;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::compute::{consume, ComputeEnds, ComputeStream};
use super::plan::LayerWeights;
use super::readers;
use super::resources::{Job, Resources, Rings};
use super::stages::{self, H2dEnds, H2dThreadStats, Halt, PassCtx, PinEnds};
use super::stats::{PassStats, StageStats};
use super::{EventH, StreamerConfig};
use crate::ring::{Consumer, Producer};
use crate::{Error, Result};

/// The readers' ring ends for one pass.
struct ReaderEnds {
    free: Consumer<'static, u32>,
    out: Producer<'static, Job>,
    /// Whether the readers fill pinned slots (no pin stage) or CPU slots.
    pinned: bool,
    batch: usize,
}

/// Which ring ends each stage gets in one pass (see `DESIGN.md`, "The data
/// path"); ends a configuration does not use are dropped.
struct Wiring {
    readers: Option<ReaderEnds>,
    pin: Option<PinEnds>,
    h2d: H2dEnds,
    compute: ComputeEnds,
}

/// The rings, at a fixed heap address for the streamer's lifetime.
struct RingHome {
    rings: NonNull<Rings>,
    n_cpu: usize,
    n_pinned: usize,
    n_gpu: usize,
}

// SAFETY: `RingHome` owns the rings (a `Box` turned into a pointer); `Rings`
// is `Send`, and the pointer is only dereferenced by its owner.
unsafe impl Send for RingHome {}
// SAFETY: through `&RingHome` nothing reaches the rings: the pointer is
// dereferenced only in `wire` (`&mut self`) and in `drop`.
unsafe impl Sync for RingHome {}

impl RingHome {
    fn new(res: &Resources) -> RingHome {
        let (n_cpu, n_pinned, n_gpu) = (
            res.cpu_slots.len(),
            res.pinned_slots.len(),
            res.gpu_slots.len(),
        );
        let rings = Rings::new(n_cpu, n_pinned, n_gpu, res.model.num_layers());
        RingHome {
            rings: NonNull::from(Box::leak(Box::new(rings))),
            n_cpu,
            n_pinned,
            n_gpu,
        }
    }

    /// Empties the rings, puts every slot on its free ring, and hands out
    /// the ends for one pass.
    ///
    /// # Safety
    /// No end handed out by an earlier call is alive, and the ends returned
    /// are dropped before the next call and before `self` is dropped.
    unsafe fn wire(&mut self, batch_cpu: usize, batch_cpu_pinned: usize) -> Wiring {
        // SAFETY: the pointer is from `Box::leak` and stays valid until
        // `drop`; no end borrows the rings (this function's contract), so
        // this is the only reference.
        let r: &'static mut Rings = unsafe { &mut *self.rings.as_ptr() };
        r.reset(self.n_cpu, self.n_pinned, self.n_gpu);
        let (cpu_free_p, cpu_free_c) = r.cpu_free.split();
        let (cpu_full_p, cpu_full_c) = r.cpu_full.split();
        let (pin_free_p, pin_free_c) = r.pin_free.split();
        let (pin_full_p, pin_full_c) = r.pin_full.split();
        let (gpu_free_p, gpu_free_c) = r.gpu_free.split();
        let (gpu_full_p, gpu_full_c) = r.gpu_full.split();
        let h2d = |full, pin_free, cpu_free| H2dEnds {
            full,
            pin_free,
            cpu_free,
            gpu_free: gpu_free_c,
            out: gpu_full_p,
        };
        let reader = |free, out, pinned, batch| ReaderEnds {
            free,
            out,
            pinned,
            batch,
        };
        let (readers, pin, h2d) = match (self.n_cpu > 0, self.n_pinned > 0) {
            (true, true) => (
                Some(reader(cpu_free_c, cpu_full_p, false, batch_cpu)),
                Some(PinEnds {
                    input: cpu_full_c,
                    cpu_free: cpu_free_p,
                    pin_free: pin_free_c,
                    out: pin_full_p,
                }),
                h2d(Some(pin_full_c), Some(pin_free_p), None),
            ),
            (true, false) => (
                Some(reader(cpu_free_c, cpu_full_p, false, batch_cpu)),
                None,
                h2d(Some(cpu_full_c), None, Some(cpu_free_p)),
            ),
            (false, true) => (
                Some(reader(pin_free_c, pin_full_p, true, batch_cpu_pinned)),
                None,
                h2d(Some(pin_full_c), Some(pin_free_p), None),
            ),
            (false, false) => (None, None, h2d(None, None, None)),
        };
        Wiring {
            readers,
            pin,
            h2d,
            compute: ComputeEnds {
                ready: gpu_full_c,
                free: gpu_free_p,
            },
        }
    }
}

impl Drop for RingHome {
    fn drop(&mut self) {
        // SAFETY: from `Box::leak` in `new`, freed once; no end is alive
        // (the contract of `wire`, and `Pipeline` joins its threads first).
        drop(unsafe { Box::from_raw(self.rings.as_ptr()) });
    }
}

/// What a stage thread is asked to do in one pass.
enum Task {
    Read,
    Pin(PinEnds),
    H2d(H2dEnds),
}

/// What a stage thread reports at the end of a pass.
enum Outcome {
    Stage(StageStats),
    H2d(H2dThreadStats),
    /// The stage panicked; the pass's error says so.
    Panicked,
}

/// A stage thread's side of the hand-over: the caller's thread posts a task,
/// the stage thread takes it, runs it and posts the outcome.
enum Mail {
    Idle,
    Task(Task),
    Running,
    Done(Outcome),
    Quit,
}

/// One mutex and condition variable per stage thread. The mutex orders
/// everything the caller's thread wrote before posting a task (the rearmed
/// stop flag, the reset rings and slots) before the stage's reads, and
/// everything the stage wrote before posting its outcome before the caller's
/// reads after taking it: the same release/acquire edges a thread spawn and
/// join gave.
struct Mailbox {
    mail: Mutex<Mail>,
    changed: Condvar,
}

impl Mailbox {
    fn lock(&self) -> MutexGuard<'_, Mail> {
        self.mail.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn post(&self, mail: Mail) {
        *self.lock() = mail;
        self.changed.notify_all();
    }

    /// The stage thread waits for its next task; `None` when told to quit.
    fn next_task(&self) -> Option<Task> {
        let mut m = self.lock();
        loop {
            match std::mem::replace(&mut *m, Mail::Running) {
                Mail::Task(t) => return Some(t),
                Mail::Quit => return None,
                other => *m = other,
            }
            m = self.changed.wait(m).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// The caller's thread waits for the outcome of the task it posted.
    fn outcome(&self) -> Outcome {
        let mut m = self.lock();
        loop {
            match std::mem::replace(&mut *m, Mail::Idle) {
                Mail::Done(o) => return o,
                other => *m = other,
            }
            m = self.changed.wait(m).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// A stage thread that lives as long as the streamer.
struct StageThread {
    name: &'static str,
    mailbox: Arc<Mailbox>,
    handle: Option<JoinHandle<()>>,
}

impl StageThread {
    fn spawn(
        ctx: &Arc<PassCtx>,
        name: &'static str,
        thread_name: String,
        affinity: Option<Vec<usize>>,
        cpu: usize,
    ) -> Result<StageThread> {
        let mailbox = Arc::new(Mailbox {
            mail: Mutex::new(Mail::Idle),
            changed: Condvar::new(),
        });
        let (ctx, mb) = (Arc::clone(ctx), Arc::clone(&mailbox));
        let handle = std::thread::Builder::new()
            .name(thread_name)
            .spawn(move || {
                stages::pin_thread(affinity.as_deref(), cpu);
                stage_main(&ctx, &mb, name)
            })
            .map_err(|e| Error::Pipeline(format!("cannot start the {name} thread: {e}")))?;
        Ok(StageThread {
            name,
            mailbox,
            handle: Some(handle),
        })
    }
}

/// A stage thread's life: a task per pass until told to quit. A panic in a
/// task ends that pass with an error; the thread lives on for the next.
fn stage_main(ctx: &PassCtx, mailbox: &Mailbox, name: &str) {
    while let Some(task) = mailbox.next_task() {
        // The task (and so its ring ends) is moved into the closure and
        // dropped inside it, also when it unwinds, before the outcome is posted.
        let outcome = catch_unwind(AssertUnwindSafe(move || match task {
            Task::Read => Outcome::Stage(readers::reader(ctx)),
            Task::Pin(ends) => Outcome::Stage(stages::pin_stage(ctx, ends)),
            Task::H2d(ends) => Outcome::H2d(stages::h2d_stage(ctx, ends)),
        }));
        let outcome = outcome.unwrap_or_else(|_| {
            ctx.fail(Error::Pipeline(format!("the {name} thread panicked")));
            Outcome::Panicked
        });
        mailbox.post(Mail::Done(outcome));
    }
}

/// The stage threads' outcomes of one pass.
#[derive(Default)]
struct Collected {
    read: StageStats,
    pin: StageStats,
    h2d: H2dThreadStats,
}

/// The stage threads and rings of a streamer.
pub(crate) struct Pipeline {
    pub(crate) ctx: Arc<PassCtx>,
    readers: Vec<StageThread>,
    pin: Option<StageThread>,
    h2d: StageThread,
    rings: RingHome,
    passes: u64,
}

impl Pipeline {
    /// Starts the stage threads this configuration runs; they park until the first pass.
    pub(crate) fn start(res: Resources, cfg: &StreamerConfig) -> Result<Pipeline> {
        let rings = RingHome::new(&res);
        let batches = stages::Batches {
            cpu: cfg.batch_cpu,
            cpu_pinned: cfg.batch_cpu_pinned,
            gpu: cfg.batch_gpu,
        };
        let (has_readers, has_pin) = (
            rings.n_cpu > 0 || rings.n_pinned > 0,
            rings.n_cpu > 0 && rings.n_pinned > 0,
        );
        let ctx = Arc::new(PassCtx::new(res, cfg.read_chunk, batches));
        let aff = || cfg.cpu_affinity.clone();
        let h2d = StageThread::spawn(&ctx, "transfer", "ls-h2d".into(), aff(), 0)?;
        let mut p = Pipeline {
            ctx,
            readers: Vec::new(),
            pin: None,
            h2d,
            rings,
            passes: 0,
        };
        if has_pin {
            p.pin = Some(StageThread::spawn(
                &p.ctx,
                "pin",
                "ls-pin".into(),
                aff(),
                1,
            )?);
        }
        if has_readers {
            for t in 0..cfg.reader_threads {
                let name = format!("ls-read-{t}");
                let th = StageThread::spawn(&p.ctx, "reader", name, aff(), 2 + t)?;
                p.readers.push(th);
            }
        }
        Ok(p)
    }

    pub(crate) fn res(&self) -> &Resources {
        &self.ctx.res
    }

    fn threads(&self) -> impl Iterator<Item = &StageThread> {
        self.readers.iter().chain(&self.pin).chain([&self.h2d])
    }

    /// Runs one pass; see `LayerStreamer::run_pass`.
    pub(crate) fn run<S, F>(
        &mut self,
        compute: &ComputeStream,
        state: S,
        layer_fn: &mut F,
        progress: Option<&indicatif::ProgressBar>,
    ) -> Result<(S, PassStats)>
    where
        F: FnMut(S, &LayerWeights<'_>, usize, &ComputeStream) -> Result<S>,
    {
        self.check_threads()?;
        let (pinned_hits, gpu_hits) = self.prepare()?;
        if let Some(split) = &self.ctx.res.split {
            // A failed pass may have left times behind.
            split.take_times();
        }
        let t0 = Instant::now();
        // SAFETY: the previous pass's ends are all gone: `collect` waited
        // for every stage thread, each of which drops its ends before it
        // posts its outcome, and the compute ends were consumed by `consume`.
        let w = unsafe {
            self.rings
                .wire(self.ctx.batches.cpu, self.ctx.batches.cpu_pinned)
        };
        self.dispatch(w.readers, w.pin, w.h2d);
        let ctx = &*self.ctx;
        // Nothing between dispatch and collect may unwind past collect: the
        // stage threads still hold ring ends.
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            consume(ctx, compute, w.compute, state, layer_fn, progress)
        }));
        if !matches!(outcome, Ok(Ok(_))) {
            ctx.stop();
        }
        let collected = self.collect();
        // Every copy and every layer's work must be done before the slots are
        // touched again, whatever happened.
        let synced = compute
            .inner
            .synchronize()
            .and(self.ctx.res.synchronize_transfers());
        let wall = t0.elapsed();
        let (state, consumer_stall) = match outcome {
            Err(panic) => resume_unwind(panic),
            Ok(result) => match (self.ctx.take_error(), result) {
                (Some(e), _) => return Err(e),
                (None, Err(Halt::Failed(e))) => return Err(e),
                (None, Err(Halt::Stopped)) => {
                    return Err(Error::Pipeline("the pass stopped without an error".into()))
                }
                (None, Ok(done)) => done,
            },
        };
        synced?;
        self.passes += 1;
        let mut st = self.stats(collected, wall, consumer_stall)?;
        st.pinned_cache_hits = pinned_hits;
        st.gpu_cache_hits = gpu_hits;
        Ok((state, st))
    }

    /// A stage thread that is gone cannot run a pass.
    fn check_threads(&self) -> Result<()> {
        match self
            .threads()
            .find(|t| t.handle.as_ref().is_none_or(|h| h.is_finished()))
        {
            Some(t) => Err(Error::Pipeline(format!(
                "the {} thread has exited; the streamer cannot run passes any more",
                t.name
            ))),
            None => Ok(()),
        }
    }

    /// Resets the pass's flags (every stage thread is parked); returns the
    /// cache hits the pass will have.
    fn prepare(&mut self) -> Result<(usize, usize)> {
        let ctx = &self.ctx;
        ctx.rearm();
        let res = &ctx.res;
        for ev in &res.events {
            ev.transferred.store(false, Ordering::Relaxed);
            ev.converted.store(false, Ordering::Relaxed);
            if ev.held.swap(false, Ordering::Relaxed) {
                // Work the last pass's layer function held its slot for may
                // still be reading it; every slot starts this pass free.
                res.transfer.wait_event(&ev.release)?;
            }
        }
        for m in &res.gpu_slots {
            m.set_in_use(false);
        }
        let pinned = res.pinned_cache.iter();
        let gpu = res.gpu_cache.iter();
        Ok((
            pinned.filter(|c| c.filled.load(Ordering::Acquire)).count(),
            gpu.filter(|c| c.filled.load(Ordering::Acquire)).count(),
        ))
    }

    /// Hands each stage thread its task for the pass.
    fn dispatch(&mut self, readers: Option<ReaderEnds>, pin: Option<PinEnds>, h2d: H2dEnds) {
        if let Some(r) = readers {
            let layers = self.ctx.res.model.num_layers();
            debug_assert!(layers > 0);
            lock(&self.ctx.claim).start(r.free, r.pinned);
            lock(&self.ctx.inflight).start(r.out, r.batch);
            for t in &self.readers {
                t.mailbox.post(Mail::Task(Task::Read));
            }
        }
        if let (Some(t), Some(ends)) = (&self.pin, pin) {
            t.mailbox.post(Mail::Task(Task::Pin(ends)));
        }
        self.h2d.mailbox.post(Mail::Task(Task::H2d(h2d)));
    }

    /// Waits for every stage thread's outcome, and takes the readers' ring
    /// ends back.
    fn collect(&mut self) -> Collected {
        let mut c = Collected::default();
        let n_readers = self.readers.len().max(1) as u32;
        for t in &self.readers {
            if let Outcome::Stage(st) = t.mailbox.outcome() {
                c.read.bytes += st.bytes;
                c.read.busy += st.busy / n_readers;
                c.read.stalled += st.stalled / n_readers;
                c.read.items += st.items;
            }
        }
        lock(&self.ctx.claim).finish();
        lock(&self.ctx.inflight).finish();
        if let Some(t) = &self.pin {
            if let Outcome::Stage(st) = t.mailbox.outcome() {
                c.pin = st;
            }
        }
        if let Outcome::H2d(st) = self.h2d.mailbox.outcome() {
            c.h2d = st;
        }
        c
    }

    /// The statistics of a completed pass.
    fn stats(&self, c: Collected, wall: Duration, consumer_stall: Duration) -> Result<PassStats> {
        let res = &self.ctx.res;
        let mut st = PassStats {
            pass: self.passes,
            wall,
            layers: res.model.num_layers(),
            layer_bytes: res.model.total_layer_bytes(),
            read: if c.read.bytes == 0 {
                c.h2d.read
            } else {
                c.read
            },
            pin: if c.pin.bytes == 0 { c.h2d.pin } else { c.pin },
            ..Default::default()
        };
        st.h2d.bytes = c.h2d.bytes;
        st.h2d.items = c.h2d.items;
        st.h2d.stalled = c.h2d.stalled;
        for ev in &res.events {
            if ev.converted.load(Ordering::Relaxed) {
                st.h2d.busy += EventH::elapsed(&ev.h2d_start, &ev.copied)?;
                st.convert += EventH::elapsed(&ev.copied, &ev.h2d_end)?;
            } else if ev.transferred.load(Ordering::Relaxed) {
                st.h2d.busy += EventH::elapsed(&ev.h2d_start, &ev.h2d_end)?;
            }
            st.compute.busy += EventH::elapsed(&ev.compute_start, &ev.compute_end)?;
        }
        st.compute.items = st.layers;
        st.compute.bytes = st.layer_bytes;
        st.compute.stalled = consumer_stall;
        if let Some(split) = &res.split {
            let (busy, stalled) = split.take_times();
            st.cpu = StageStats {
                bytes: split.pass_bytes(),
                busy,
                stalled,
                items: st.layers,
            };
            st.cpu_share = split.share;
        }
        Ok(st)
    }

    /// Waits for work that layer functions held their slots for.
    pub(crate) fn wait_held(&self) -> Result<()> {
        for ev in &self.ctx.res.events {
            if ev.held.load(Ordering::Relaxed) {
                ev.release.synchronize()?;
            }
        }
        Ok(())
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        // Parked threads take `Quit` at once; none is running a task, since
        // `run` collects every outcome before it returns or unwinds.
        for t in self.readers.iter().chain(&self.pin).chain([&self.h2d]) {
            t.mailbox.post(Mail::Quit);
        }
        let handles = self
            .readers
            .iter_mut()
            .chain(&mut self.pin)
            .chain([&mut self.h2d])
            .filter_map(|t| t.handle.take());
        for h in handles {
            let _ = h.join();
        }
        // `rings` is dropped after this, with every end gone.
    }
}

#[cfg(test)]
#[path = "pass_tests.rs"]
mod tests;
