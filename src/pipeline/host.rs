//! The host backend's streams and events.
//!
//! A [`HostStream`] behaves like a CUDA stream whose "device" is host memory:
//! operations are queued and executed in order by the stream's own thread, so
//! copies really are asynchronous to the thread that issued them, and a slot
//! recycled without waiting on the right event really can be overwritten
//! while someone still reads it. Each device slot carries an in-use flag that
//! the consumer raises while its layer function may read the slot; a copy
//! that lands on a slot whose flag is raised is a *violation*, reported as a
//! pipeline error. Likewise each pinned slot carries a generation counter that
//! its writer bumps before refilling it; a queued copy whose source slot's
//! generation changed before the copy ran read a slot that was recycled too
//! early.
//!
//! An *immediate* stream runs operations on the calling thread; the compute
//! side uses one, since the caller's layer function reads host "device"
//! memory directly.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use half::{bf16, f16};

use crate::quant::fp8::Fp8Layout;
use crate::quant::QuantType;
use crate::{DType, Error, Result};

/// An event of the host backend.
#[derive(Clone, Default)]
pub(crate) struct HostEvent {
    inner: Arc<HostEventInner>,
}

#[derive(Default)]
struct HostEventInner {
    /// Sequence number of the last `record`.
    recorded: AtomicU64,
    /// Sequence number of the last record that the stream has reached.
    completed: AtomicU64,
    /// When `completed` last advanced.
    at: Mutex<Option<Instant>>,
}

impl HostEvent {
    pub(crate) fn new() -> HostEvent {
        HostEvent::default()
    }

    pub(crate) fn query(&self) -> bool {
        self.inner.completed.load(Ordering::Acquire) >= self.inner.recorded.load(Ordering::Acquire)
    }

    fn reached(&self, seq: u64) -> bool {
        self.inner.completed.load(Ordering::Acquire) >= seq
    }

    pub(crate) fn synchronize(&self) {
        let target = self.inner.recorded.load(Ordering::Acquire);
        wait_until(|| self.reached(target));
    }

    fn complete(&self, seq: u64) {
        *self.inner.at.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
        self.inner.completed.fetch_max(seq, Ordering::AcqRel);
    }

    /// The instant the event last completed.
    pub(crate) fn completed_at(&self) -> Option<Instant> {
        *self.inner.at.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn wait_until(mut f: impl FnMut() -> bool) {
    let backoff = crossbeam_utils::Backoff::new();
    let mut nap = Duration::from_micros(2);
    while !f() {
        if backoff.is_completed() {
            std::thread::sleep(nap);
            nap = (nap * 2).min(Duration::from_micros(200));
        } else {
            backoff.snooze();
        }
    }
}

/// What a queued copy must check when it runs.
#[derive(Clone, Default)]
pub(crate) struct CopyGuard {
    /// The destination device slot's in-use flag and a name for messages.
    pub(crate) dst_in_use: Option<(Arc<AtomicBool>, Arc<str>)>,
    /// The source pinned slot's generation when the copy was issued.
    /// Messages name the pinned slot and the layer copied from it.
    pub(crate) src_gen: Option<(Arc<AtomicU64>, u64, PinnedSource)>,
}

/// The pinned slot a copy reads and the layer it holds, for messages.
#[derive(Clone, Copy)]
pub(crate) struct PinnedSource {
    pub(crate) slot: u32,
    pub(crate) layer: usize,
}

enum Op {
    Copy {
        dst: usize,
        src: usize,
        len: usize,
        guard: CopyGuard,
    },
    Cast {
        from: DType,
        to: DType,
        src: usize,
        dst: usize,
        n: usize,
    },
    Dequant {
        ty: QuantType,
        to: DType,
        src: usize,
        dst: usize,
        n: usize,
    },
    DequantFp8 {
        layout: Fp8Layout,
        to: DType,
        src: usize,
        scale: usize,
        dst: usize,
    },
    Record(HostEvent, u64),
    Wait(HostEvent, u64),
    /// Tests: work that takes this long.
    #[cfg(test)]
    Delay(Duration),
    Exit,
}

struct Queue {
    ops: Mutex<VecDeque<Op>>,
    ready: Condvar,
    /// Ops queued and not yet finished.
    pending: AtomicU64,
    /// The first violation the stream detected.
    violation: Mutex<Option<String>>,
}

/// A stream of the host backend.
pub(crate) struct HostStream {
    queue: Arc<Queue>,
    worker: Option<JoinHandle<()>>,
}

impl HostStream {
    /// A stream with its own worker thread.
    pub(crate) fn spawn(name: &str) -> Result<HostStream> {
        let queue = Arc::new(Queue {
            ops: Mutex::new(VecDeque::with_capacity(64)),
            ready: Condvar::new(),
            pending: AtomicU64::new(0),
            violation: Mutex::new(None),
        });
        let q = queue.clone();
        let worker = std::thread::Builder::new()
            .name(format!("ls-host-{name}"))
            .spawn(move || run_worker(&q))
            .map_err(|e| Error::Pipeline(format!("cannot start host stream thread: {e}")))?;
        Ok(HostStream {
            queue,
            worker: Some(worker),
        })
    }

    /// A stream that runs each operation on the calling thread.
    pub(crate) fn immediate() -> HostStream {
        HostStream {
            queue: Arc::new(Queue {
                ops: Mutex::new(VecDeque::new()),
                ready: Condvar::new(),
                pending: AtomicU64::new(0),
                violation: Mutex::new(None),
            }),
            worker: None,
        }
    }

    fn submit(&self, op: Op) {
        if self.worker.is_none() {
            execute(&self.queue, op);
            return;
        }
        self.queue.pending.fetch_add(1, Ordering::AcqRel);
        self.queue
            .ops
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push_back(op);
        self.queue.ready.notify_one();
    }

    /// Queues a copy of `len` bytes from host address `src` to `dst`.
    ///
    /// # Safety
    /// `src` and `dst` are valid for `len` bytes until the copy has run (an
    /// event recorded after it has completed), and nothing else writes `dst`
    /// meanwhile.
    pub(crate) unsafe fn copy(&self, dst: u64, src: *const u8, len: usize, guard: CopyGuard) {
        self.submit(Op::Copy {
            dst: dst as usize,
            src: src as usize,
            len,
            guard,
        });
    }

    /// Queues an element-wise conversion of `n` elements.
    ///
    /// # Safety
    /// As for [`copy`](Self::copy), for `n` elements of each type.
    pub(crate) unsafe fn cast(&self, from: DType, to: DType, src: u64, dst: u64, n: usize) {
        self.submit(Op::Cast {
            from,
            to,
            src: src as usize,
            dst: dst as usize,
            n,
        });
    }

    /// Queues the dequantization of `n` elements of `ty` blocks into `to`
    /// (bf16 or f16).
    ///
    /// # Safety
    /// `src` holds `ty.tensor_size(&[n])` bytes and `dst` room for `n` 16-bit
    /// values, valid until the op has run (as for [`copy`](Self::copy)).
    pub(crate) unsafe fn dequant(&self, ty: QuantType, to: DType, src: u64, dst: u64, n: usize) {
        self.submit(Op::Dequant {
            ty,
            to,
            src: src as usize,
            dst: dst as usize,
            n,
        });
    }

    /// Queues the dequantization of an FP8 weight (with its scales) into
    /// `to` (bf16 or f16).
    ///
    /// # Safety
    /// `src` holds `layout.elems()` bytes, `scale` `layout.scale_bytes()`
    /// bytes and `dst` room for `layout.elems()` 16-bit values, valid until
    /// the op has run (as for [`copy`](Self::copy)).
    pub(crate) unsafe fn dequant_fp8(
        &self,
        layout: Fp8Layout,
        to: DType,
        src: u64,
        scale: u64,
        dst: u64,
    ) {
        self.submit(Op::DequantFp8 {
            layout,
            to,
            src: src as usize,
            scale: scale as usize,
            dst: dst as usize,
        });
    }

    /// Queues work that takes `d` (tests: a slow kernel on another stream).
    #[cfg(test)]
    pub(crate) fn delay(&self, d: Duration) {
        self.submit(Op::Delay(d));
    }

    pub(crate) fn record(&self, ev: &HostEvent) {
        let seq = ev.inner.recorded.fetch_add(1, Ordering::AcqRel) + 1;
        self.submit(Op::Record(ev.clone(), seq));
    }

    /// Makes later work on this stream wait for `ev`'s current record. On an
    /// immediate stream this blocks the caller until then.
    pub(crate) fn wait_event(&self, ev: &HostEvent) {
        let seq = ev.inner.recorded.load(Ordering::Acquire);
        self.submit(Op::Wait(ev.clone(), seq));
    }

    pub(crate) fn synchronize(&self) -> Result<()> {
        wait_until(|| self.queue.pending.load(Ordering::Acquire) == 0);
        self.check()
    }

    /// The first violation this stream detected, as an error.
    pub(crate) fn check(&self) -> Result<()> {
        match &*self
            .queue
            .violation
            .lock()
            .unwrap_or_else(|e| e.into_inner())
        {
            Some(v) => Err(Error::Pipeline(format!("host backend: {v}"))),
            None => Ok(()),
        }
    }
}

impl Drop for HostStream {
    fn drop(&mut self) {
        if let Some(w) = self.worker.take() {
            self.queue.pending.fetch_add(1, Ordering::AcqRel);
            self.queue
                .ops
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push_back(Op::Exit);
            self.queue.ready.notify_one();
            let _ = w.join();
        }
    }
}

fn run_worker(q: &Queue) {
    loop {
        let op = {
            let mut ops = q.ops.lock().unwrap_or_else(|e| e.into_inner());
            loop {
                if let Some(op) = ops.pop_front() {
                    break op;
                }
                ops = q.ready.wait(ops).unwrap_or_else(|e| e.into_inner());
            }
        };
        let exit = matches!(op, Op::Exit);
        execute(q, op);
        q.pending.fetch_sub(1, Ordering::AcqRel);
        if exit {
            return;
        }
    }
}

fn violation(q: &Queue, msg: String) {
    let mut v = q.violation.lock().unwrap_or_else(|e| e.into_inner());
    if v.is_none() {
        *v = Some(msg);
    }
}

fn execute(q: &Queue, op: Op) {
    match op {
        Op::Copy {
            dst,
            src,
            len,
            guard,
        } => {
            if let Some((flag, name)) = &guard.dst_in_use {
                if flag.load(Ordering::Acquire) {
                    violation(
                        q,
                        format!(
                            "{name} was overwritten while a layer function could still read it"
                        ),
                    );
                }
            }
            // SAFETY: the issuer of the copy guarantees both ranges are valid
            // for `len` bytes until this op has run (see `HostStream::copy`).
            unsafe { std::ptr::copy_nonoverlapping(src as *const u8, dst as *mut u8, len) };
            if let Some((gen, expected, PinnedSource { slot, layer })) = &guard.src_gen {
                if gen.load(Ordering::Acquire) != *expected {
                    violation(
                        q,
                        format!(
                            "pinned slot {slot} (layer {layer}) was refilled before its copy \
                             to the device had run"
                        ),
                    );
                }
            }
        }
        Op::Cast {
            from,
            to,
            src,
            dst,
            n,
        } => {
            if let Err(e) = host_cast(from, to, src, dst, n) {
                violation(q, e);
            }
        }
        Op::Dequant {
            ty,
            to,
            src,
            dst,
            n,
        } => {
            if let Err(e) = host_dequant(ty, to, src, dst, n) {
                violation(q, e);
            }
        }
        Op::DequantFp8 {
            layout,
            to,
            src,
            scale,
            dst,
        } => {
            if let Err(e) = host_dequant_fp8(&layout, to, src, scale, dst) {
                violation(q, e);
            }
        }
        Op::Record(ev, seq) => ev.complete(seq),
        Op::Wait(ev, seq) => wait_until(|| ev.reached(seq)),
        #[cfg(test)]
        Op::Delay(d) => std::thread::sleep(d),
        Op::Exit => {}
    }
}

fn host_dequant(ty: QuantType, to: DType, src: usize, dst: usize, n: usize) -> Result<(), String> {
    let len = ty
        .tensor_size(&[n as u64])
        .map_err(|e| format!("dequantizing {n} elements of {ty}: {e}"))?
        .1 as usize;
    // SAFETY: the issuer guarantees `src` holds `len` bytes, live and not
    // written by anyone else until this op has run (see
    // `HostStream::dequant`).
    let blocks = unsafe { std::slice::from_raw_parts(src as *const u8, len) };
    let r = match to {
        // SAFETY: the issuer guarantees room for `n` bf16 values at `dst`,
        // not read or written by anyone else until this op has run; 2-byte
        // alignment comes from the plan's conversion area (256-aligned
        // offsets in a page-aligned slot).
        DType::BF16 => crate::quant::dequantize_bf16(ty, blocks, unsafe {
            std::slice::from_raw_parts_mut(dst as *mut half::bf16, n)
        }),
        // SAFETY: as for bf16, with room for `n` f16 values.
        DType::F16 => crate::quant::dequantize_f16(ty, blocks, unsafe {
            std::slice::from_raw_parts_mut(dst as *mut half::f16, n)
        }),
        _ => return Err(format!("cannot dequantize {ty} into {to}")),
    };
    r.map_err(|e| e.to_string())
}

fn host_dequant_fp8(
    l: &Fp8Layout,
    to: DType,
    src: usize,
    scale: usize,
    dst: usize,
) -> Result<(), String> {
    let n = l.elems() as usize;
    // SAFETY: the issuer guarantees `src` holds `n` bytes and `scale` the
    // layout's scale bytes, live and not written by anyone else until this
    // op has run (see `HostStream::dequant_fp8`).
    let (weights, scales) = unsafe {
        (
            std::slice::from_raw_parts(src as *const u8, n),
            std::slice::from_raw_parts(scale as *const u8, l.scale_bytes() as usize),
        )
    };
    let r = match to {
        // SAFETY: the issuer guarantees room for `n` bf16 values at `dst`,
        // untouched by anyone else until this op has run; `dst` is
        // 256-aligned in the conversion area.
        DType::BF16 => crate::quant::fp8::dequantize_bf16(l, weights, scales, unsafe {
            std::slice::from_raw_parts_mut(dst as *mut half::bf16, n)
        }),
        // SAFETY: as for bf16, with room for `n` f16 values.
        DType::F16 => crate::quant::fp8::dequantize_f16(l, weights, scales, unsafe {
            std::slice::from_raw_parts_mut(dst as *mut half::f16, n)
        }),
        _ => return Err(format!("cannot dequantize FP8 into {to}")),
    };
    r.map_err(|e| e.to_string())
}

fn host_cast(from: DType, to: DType, src: usize, dst: usize, n: usize) -> Result<(), String> {
    let read = |i: usize| -> f32 {
        // SAFETY: the issuer guarantees `src` holds `n` elements of `from`
        // (see `HostStream::cast`); unaligned reads are used since tensors
        // sit at arbitrary offsets in their file.
        unsafe {
            match from {
                DType::F16 => f16::from_bits((src as *const u16).add(i).read_unaligned()).to_f32(),
                DType::BF16 => {
                    bf16::from_bits((src as *const u16).add(i).read_unaligned()).to_f32()
                }
                _ => (src as *const f32).add(i).read_unaligned(),
            }
        }
    };
    if !matches!(from, DType::F16 | DType::BF16 | DType::F32) {
        return Err(format!("cannot cast {from} to {to}"));
    }
    for i in 0..n {
        let x = read(i);
        // SAFETY: `dst` holds `n` elements of `to` (see `HostStream::cast`).
        unsafe {
            match to {
                DType::BF16 => (dst as *mut u16)
                    .add(i)
                    .write_unaligned(bf16::from_f32(x).to_bits()),
                DType::F16 => (dst as *mut u16)
                    .add(i)
                    .write_unaligned(f16::from_f32(x).to_bits()),
                DType::F32 => (dst as *mut f32).add(i).write_unaligned(x),
                _ => return Err(format!("cannot cast {from} to {to}")),
            }
        }
    }
    Ok(())
}

#[cfg(test)]
#[path = "host_tests.rs"]
mod tests;
