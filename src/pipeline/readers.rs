//! The reader threads: a pool that claims chunks of consecutive layers, so
//! that the disk's queue stays full across layer boundaries, and publishes
//! each layer downstream, in layer order, once all its chunks are read.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Mutex;
use std::time::Instant;

use super::plan::Home;
use super::resources::{Job, SlotPtr, Src};
use super::stages::{Halt, PassCtx, StopOnUnwind};
use super::stats::StageStats;
use crate::checkpoint::Layer;
use crate::ring::{Consumer, Producer, Waiter};
use crate::{Error, Result};

/// One read request: a chunk of one of a layer's read ops.
struct Chunk {
    layer: u32,
    file: usize,
    offset: u64,
    len: u64,
    dest: SlotPtr,
    required_end: u64,
}

/// Position inside the layer being split into chunks.
struct Cursor {
    layer: u32,
    dest: SlotPtr,
    read: usize,
    off: u64,
}

/// The readers' shared claim state: which layer and chunk comes next, and the
/// free destination slots. Guarded by a mutex, so the free ring has one consumer.
/// It lives as long as the streamer; each pass [`start`](Claim::start)s it with
/// that pass's ring end and [`finish`](Claim::finish)es it.
pub(crate) struct Claim {
    next_layer: usize,
    cur: Option<Cursor>,
    free: Option<Consumer<'static, u32>>,
    /// Whether the destination slots are pinned (`true`) or CPU slots.
    pinned: bool,
}

impl Claim {
    pub(crate) fn new() -> Claim {
        Claim {
            next_layer: 0,
            cur: None,
            free: None,
            pinned: false,
        }
    }

    /// Starts a pass: layer 0 next, free destination slots from `free`.
    pub(crate) fn start(&mut self, free: Consumer<'static, u32>, pinned: bool) {
        self.next_layer = 0;
        self.cur = None;
        self.free = Some(free);
        self.pinned = pinned;
    }

    /// Ends a pass: drops the ring end.
    pub(crate) fn finish(&mut self) {
        self.free = None;
        self.cur = None;
    }
}

struct Entry {
    job: Job,
    remaining: usize,
}

/// Layers whose chunks are being read, in layer order; completed layers are
/// published downstream in order.
/// Like [`Claim`], it lives as long as the streamer and holds one pass's
/// ring end at a time.
pub(crate) struct InFlight {
    entries: VecDeque<Entry>,
    out: Option<Producer<'static, Job>>,
    batch: usize,
    unpublished: usize,
}

impl InFlight {
    pub(crate) fn new(capacity: usize, batch: usize) -> InFlight {
        InFlight {
            entries: VecDeque::with_capacity(capacity + 1),
            out: None,
            batch: batch.max(1),
            unpublished: 0,
        }
    }

    /// Starts a pass that publishes to `out`, handing over `batch` layers at once.
    pub(crate) fn start(&mut self, out: Producer<'static, Job>, batch: usize) {
        self.entries.clear();
        self.out = Some(out);
        self.batch = batch.max(1);
        self.unpublished = 0;
    }

    /// Ends a pass: drops the ring end and any layer left half read.
    pub(crate) fn finish(&mut self) {
        self.entries.clear();
        self.out = None;
    }

    fn push(&mut self, ctx: &PassCtx, job: Job, remaining: usize) {
        self.entries.push_back(Entry { job, remaining });
        self.drain(ctx);
    }

    fn complete(&mut self, ctx: &PassCtx, layer: u32) {
        if let Some(front) = self.entries.front() {
            let i = (layer - front.job.layer) as usize;
            if let Some(e) = self.entries.get_mut(i) {
                e.remaining -= 1;
            }
        }
        self.drain(ctx);
    }

    fn drain(&mut self, ctx: &PassCtx) {
        while self.entries.front().is_some_and(|e| e.remaining == 0) {
            let Some(e) = self.entries.pop_front() else {
                break;
            };
            if let Src::PinnedCache(c) = e.job.src {
                // Release: a later pass's claim (Acquire) sees the bytes.
                ctx.res.pinned_cache[c as usize]
                    .filled
                    .store(true, Ordering::Release);
            }
            // The output ring holds one item per layer, so it never fills;
            // outside a pass (no ring end) nothing is in flight.
            if let Some(out) = &mut self.out {
                let _ = out.write(e.job);
            }
            self.unpublished += 1;
            if self.unpublished >= self.batch {
                self.flush();
            }
        }
        if self.entries.is_empty() {
            self.flush();
        }
    }

    fn flush(&mut self) {
        if let Some(out) = &mut self.out {
            out.publish();
        }
        self.unpublished = 0;
    }
}

fn chunks_of(layer: &Layer, chunk: u64) -> usize {
    layer
        .reads
        .iter()
        .map(|r| r.len.div_ceil(chunk) as usize)
        .sum()
}

impl Claim {
    /// The next chunk to read, claiming a destination slot for a new layer
    /// when needed; `None` when every layer has been handed out.
    fn next(
        &mut self,
        ctx: &PassCtx,
        inflight: &Mutex<InFlight>,
        stats: &mut StageStats,
    ) -> Result<Option<Chunk>, Halt> {
        let res = &ctx.res;
        loop {
            if let Some(cur) = &mut self.cur {
                let layer = &ctx.layers()[cur.layer as usize];
                if let Some(r) = layer.reads.get(cur.read) {
                    let len = ctx.read_chunk.min(r.len - cur.off);
                    let offset = r.file_offset + cur.off;
                    let chunk = Chunk {
                        layer: cur.layer,
                        file: r.file,
                        offset,
                        len,
                        // SAFETY (of the later write): the slot holds
                        // `slot_bytes` ≥ r.slot_offset + r.len bytes.
                        dest: SlotPtr(cur.dest.0.wrapping_add((r.slot_offset + cur.off) as usize)),
                        required_end: r.required_end.min(offset + len),
                    };
                    cur.off += len;
                    if cur.off >= r.len {
                        cur.read += 1;
                        cur.off = 0;
                    }
                    return Ok(Some(chunk));
                }
                self.cur = None;
            }
            if self.next_layer >= ctx.layers().len() {
                return Ok(None);
            }
            let i = self.next_layer;
            self.next_layer += 1;
            let layer = i as u32;
            let (src, dest) = match res.plans[i].home {
                Home::Gpu(g) if res.gpu_cache[g].filled.load(Ordering::Acquire) => {
                    lock(inflight).push(
                        ctx,
                        Job {
                            layer,
                            src: Src::Resident(g as u32),
                        },
                        0,
                    );
                    continue;
                }
                Home::Pinned(c) if res.pinned_cache[c].filled.load(Ordering::Acquire) => {
                    lock(inflight).push(
                        ctx,
                        Job {
                            layer,
                            src: Src::PinnedCache(c as u32),
                        },
                        0,
                    );
                    continue;
                }
                Home::Pinned(c) => (Src::PinnedCache(c as u32), res.pinned_cache[c].ptr),
                _ => self.free_slot(ctx, inflight, stats)?,
            };
            let n = chunks_of(&ctx.layers()[i], ctx.read_chunk);
            stats.items += 1;
            lock(inflight).push(ctx, Job { layer, src }, n);
            self.cur = Some(Cursor {
                layer,
                dest,
                read: 0,
                off: 0,
            });
        }
    }
}

impl Claim {
    /// Claims a free destination slot for a streamed layer, waiting for one.
    fn free_slot(
        &mut self,
        ctx: &PassCtx,
        inflight: &Mutex<InFlight>,
        stats: &mut StageStats,
    ) -> Result<(Src, SlotPtr), Halt> {
        let res = &ctx.res;
        let free = self
            .free
            .as_mut()
            .ok_or_else(|| Error::Pipeline("the readers have no free-slot ring".into()))?;
        // Publish what is done before blocking on a free slot.
        lock(inflight).flush();
        let t = Instant::now();
        let slot = Waiter::new(&ctx.stop)
            .until(|| free.pop())
            .map_err(|_| Halt::Stopped)?;
        stats.stalled += t.elapsed();
        Ok(if self.pinned {
            let pinned = &res.pinned_slots[slot as usize];
            pinned.buf.begin_fill();
            (Src::Pinned(slot), pinned.ptr)
        } else {
            (Src::Cpu(slot), res.cpu_slots[slot as usize].ptr)
        })
    }
}

fn lock<'m, T>(m: &'m Mutex<T>) -> std::sync::MutexGuard<'m, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Reads one chunk into its destination.
fn read_chunk(ctx: &PassCtx, c: &Chunk) -> Result<()> {
    let file = &ctx.res.files[c.file];
    // SAFETY: `dest` points into the slot claimed for this chunk's layer, which
    // this pass's reader threads own until the layer is published; chunks of a
    // layer are disjoint ranges of the slot, and the slot is at least as long as
    // the layer's reads (see `Claim::next`).
    let dst = unsafe { std::slice::from_raw_parts_mut(c.dest.0, c.len as usize) };
    file.read_aligned(c.offset, dst, c.required_end)
}

/// A reader thread: claims chunks and reads them until none are left.
pub(crate) fn reader(ctx: &PassCtx) -> StageStats {
    let (claim, inflight) = (&ctx.claim, &ctx.inflight);
    let _guard = StopOnUnwind(&ctx.stop);
    let mut stats = StageStats::default();
    loop {
        if ctx.stop.load(Ordering::Acquire) {
            break;
        }
        let chunk = match lock(claim).next(ctx, inflight, &mut stats) {
            Ok(Some(c)) => c,
            Ok(None) => break,
            Err(h) => {
                ctx.halt(h);
                break;
            }
        };
        let t = Instant::now();
        if let Err(e) = read_chunk(ctx, &chunk) {
            ctx.fail(e);
            break;
        }
        stats.busy += t.elapsed();
        stats.bytes += chunk.len;
        lock(inflight).complete(ctx, chunk.layer);
    }
    stats
}

/// Reads a whole layer into `dest` on the calling thread (no reader threads).
pub(crate) fn read_layer_inline(ctx: &PassCtx, layer: usize, dest: SlotPtr) -> Result<u64> {
    let l = &ctx.layers()[layer];
    let mut bytes = 0;
    for r in &l.reads {
        let mut off = 0;
        while off < r.len {
            let len = ctx.read_chunk.min(r.len - off);
            let offset = r.file_offset + off;
            read_chunk(
                ctx,
                &Chunk {
                    layer: layer as u32,
                    file: r.file,
                    offset,
                    len,
                    dest: SlotPtr(dest.0.wrapping_add((r.slot_offset + off) as usize)),
                    required_end: r.required_end.min(offset + len),
                },
            )?;
            off += len;
            bytes += len;
        }
    }
    Ok(bytes)
}
