//! The reader threads: a pool that claims chunks of consecutive layers, so
//! that the disk's queue stays full across layer boundaries, and publishes
//! each layer downstream, in layer order, once all its chunks are read.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Mutex;
use std::time::Instant;

use super::plan::Home;
use super::resources::{Job, SlotPtr, Src};
use super::stages::{PassCtx, StopOnUnwind};
use super::stats::StageStats;
use crate::checkpoint::Layer;
use crate::ring::{Consumer, Producer, Waiter};
use crate::Result;

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
pub(crate) struct Claim<'a> {
    next_layer: usize,
    cur: Option<Cursor>,
    free: Consumer<'a, u32>,
    /// Whether the destination slots are pinned (`true`) or CPU slots.
    pinned: bool,
}

impl<'a> Claim<'a> {
    pub(crate) fn new(free: Consumer<'a, u32>, pinned: bool) -> Claim<'a> {
        Claim {
            next_layer: 0,
            cur: None,
            free,
            pinned,
        }
    }
}

struct Entry {
    job: Job,
    remaining: usize,
}

/// Layers whose chunks are being read, in layer order; completed layers are
/// published downstream in order.
pub(crate) struct InFlight<'a> {
    entries: VecDeque<Entry>,
    out: Producer<'a, Job>,
    batch: usize,
    unpublished: usize,
}

impl<'a> InFlight<'a> {
    pub(crate) fn new(out: Producer<'a, Job>, capacity: usize, batch: usize) -> InFlight<'a> {
        InFlight {
            entries: VecDeque::with_capacity(capacity + 1),
            out,
            batch: batch.max(1),
            unpublished: 0,
        }
    }

    fn push(&mut self, ctx: &PassCtx<'_>, job: Job, remaining: usize) {
        self.entries.push_back(Entry { job, remaining });
        self.drain(ctx);
    }

    fn complete(&mut self, ctx: &PassCtx<'_>, layer: u32) {
        if let Some(front) = self.entries.front() {
            let i = (layer - front.job.layer) as usize;
            if let Some(e) = self.entries.get_mut(i) {
                e.remaining -= 1;
            }
        }
        self.drain(ctx);
    }

    fn drain(&mut self, ctx: &PassCtx<'_>) {
        while self.entries.front().is_some_and(|e| e.remaining == 0) {
            let Some(e) = self.entries.pop_front() else {
                break;
            };
            if let Src::PinnedCache(c) = e.job.src {
                ctx.res.pinned_filled[c as usize].store(true, Ordering::Release);
            }
            // The output ring holds one item per layer, so it never fills.
            let _ = self.out.write(e.job);
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
        self.out.publish();
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

impl Claim<'_> {
    /// The next chunk to read, claiming a destination slot for a new layer
    /// when needed; `None` when every layer has been handed out.
    fn next(
        &mut self,
        ctx: &PassCtx<'_>,
        inflight: &Mutex<InFlight<'_>>,
        stats: &mut StageStats,
    ) -> Result<Option<Chunk>> {
        let res = ctx.res;
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
                Home::Gpu(g) if res.gpu_filled[g].load(Ordering::Acquire) => {
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
                Home::Pinned(c) if res.pinned_filled[c].load(Ordering::Acquire) => {
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
                Home::Pinned(c) => (Src::PinnedCache(c as u32), res.pinned_cache_ptrs[c]),
                _ => {
                    // Publish what is done before blocking on a free slot.
                    lock(inflight).flush();
                    let t = Instant::now();
                    let slot = Waiter::new(&ctx.stop)
                        .until(|| self.free.pop())
                        .map_err(|_| ctx.stopped())?;
                    stats.stalled += t.elapsed();
                    if self.pinned {
                        res.pinned_slots[slot as usize].begin_fill();
                        (Src::Pinned(slot), res.pinned_ptrs[slot as usize])
                    } else {
                        (Src::Cpu(slot), res.cpu_ptrs[slot as usize])
                    }
                }
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

fn lock<'m, T>(m: &'m Mutex<T>) -> std::sync::MutexGuard<'m, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Reads one chunk into its destination.
fn read_chunk(ctx: &PassCtx<'_>, c: &Chunk) -> Result<()> {
    let file = &ctx.res.files[c.file];
    // SAFETY: `dest` points into the slot claimed for this chunk's layer, which
    // this pass's reader threads own until the layer is published; chunks of a
    // layer are disjoint ranges of the slot, and the slot is at least as long as
    // the layer's reads (see `Claim::next`).
    let dst = unsafe { std::slice::from_raw_parts_mut(c.dest.0, c.len as usize) };
    file.read_aligned(c.offset, dst, c.required_end)
}

/// A reader thread: claims chunks and reads them until none are left.
pub(crate) fn reader(
    ctx: &PassCtx<'_>,
    claim: &Mutex<Claim<'_>>,
    inflight: &Mutex<InFlight<'_>>,
) -> StageStats {
    let _guard = StopOnUnwind(&ctx.stop);
    let mut stats = StageStats::default();
    loop {
        if ctx.stop.load(Ordering::Acquire) {
            break;
        }
        let chunk = match lock(claim).next(ctx, inflight, &mut stats) {
            Ok(Some(c)) => c,
            Ok(None) => break,
            Err(e) => {
                ctx.fail(e);
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
pub(crate) fn read_layer_inline(ctx: &PassCtx<'_>, layer: usize, dest: SlotPtr) -> Result<u64> {
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
