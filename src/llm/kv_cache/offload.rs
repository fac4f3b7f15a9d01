//! The KV cache in page-locked host RAM, streamed with its layer.
//!
//! Each layer's K and V sit in one registered host buffer (K, then V), laid
//! out as the resident cache is (`[max_batch][kv_heads][max_len][head_dim]`),
//! and so does each device slot: the attention kernels and the cache write
//! run on a slot exactly as on a resident layer, with the same strides. The
//! slots are allocated once, each for a whole layer, because any pass may
//! hold `max_batch` sequences near `max_len`; a pass copies only what it uses.
//!
//! Per pass, from its tokens' sequences and positions: before layer `l`'s
//! attention, every sequence's cached prefix (positions `0..start`, one row of
//! each of its KV heads: a 2-D copy, consecutive sequences with the same
//! prefix merged into one) goes host → slot; after it, only the new positions
//! (`start..start + len`) go slot → host. Ordering, all on the device, as the
//! weight slots are recycled:
//!
//! - the copy into slot `i` waits (on the copy stream) for the `done` event of
//!   the attention that used the slot before, and records `ready`;
//! - the compute stream waits for `ready` before the layer's cache write and
//!   records `done` after its attention;
//! - the copy back waits for `done`, on the same copy stream, so the next copy
//!   into the slot (queued after it) cannot overtake it, and a later pass's
//!   copy of the same layer from the host reads what it wrote;
//! - a pass's copies wait for an event the compute stream records when it
//!   begins, so that no work of an earlier pass (one that failed half-way,
//!   without its copies back) still uses a slot.
//!
//! Layer `l + 1`'s copy is queued when layer `l`'s attention is, into the
//! other slot, so it overlaps layer `l`'s compute; layer 0's when the pass
//! begins. [`KvSchedule`] decides these steps; this module runs them.

use super::schedule::{KvSchedule, KvStep};
use super::KvTransfer;
use crate::cuda::{
    max_copy_pitch, memcpy_2d_dtoh_async, memcpy_2d_htod_async, Context, DeviceBuffer, Event,
    HostRegistration, Rect2d, Stream,
};
use crate::io::AlignedBuf;
use crate::llm::config::ModelConfig;
use crate::llm::llama::ModelOptions;
use crate::{DType, Error, Result};

/// Byte layout of one layer's K (or V) cache, the same on the host and in a
/// slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Geometry {
    pub(crate) max_batch: usize,
    pub(crate) max_len: usize,
    pub(crate) kv_heads: usize,
    /// Bytes of one position of one head: head_dim × the element size.
    pub(crate) pos_bytes: usize,
}

impl Geometry {
    /// The layout for `cfg` and `opts` in `dtype`, or an error naming the
    /// sizes when a layer's bytes overflow.
    pub(crate) fn new(cfg: &ModelConfig, opts: &ModelOptions, dtype: DType) -> Result<Geometry> {
        let bytes = super::layer_bytes(cfg, opts, dtype)?;
        bytes
            .checked_mul(2)
            .and_then(|b| b.checked_add(256))
            .and_then(|b| usize::try_from(b).ok())
            .ok_or_else(|| Error::config(format!("a KV layer of {bytes} bytes overflows usize")))?;
        Ok(Geometry {
            max_batch: opts.max_batch,
            max_len: opts.max_len,
            kv_heads: cfg.kv_heads,
            pos_bytes: cfg.head_dim * dtype.size(),
        })
    }

    /// Bytes from one (sequence, head) row to the next: `max_len` positions.
    pub(crate) fn pitch(&self) -> usize {
        self.max_len * self.pos_bytes
    }

    /// Bytes of one layer's K (or V).
    pub(crate) fn layer_bytes(&self) -> usize {
        self.max_batch * self.kv_heads * self.pitch()
    }

    /// Where V starts after K in a host layer or a slot: K's bytes rounded up
    /// to 256, the alignment of a device allocation, which a resident V has.
    pub(crate) fn v_offset(&self) -> usize {
        self.layer_bytes().next_multiple_of(256)
    }

    /// Bytes of a host layer or a slot: K, then V at [`v_offset`](Self::v_offset).
    pub(crate) fn kv_bytes(&self) -> usize {
        self.v_offset() + self.layer_bytes()
    }
}

/// One sequence's new tokens in a pass: positions `start..start + len`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SeqRun {
    pub(crate) seq: usize,
    pub(crate) start: usize,
    pub(crate) len: usize,
}

/// The runs of a pass's tokens at `(seq[t], pos[t])`, sorted by sequence.
/// Fails, naming the token, unless each sequence's tokens are consecutive,
/// at consecutive positions, and within the layout.
pub(crate) fn seq_runs(seq: &[u32], pos: &[u32], g: &Geometry) -> Result<Vec<SeqRun>> {
    if seq.len() != pos.len() {
        return Err(Error::Pipeline(format!(
            "{} sequence ids for {} positions",
            seq.len(),
            pos.len()
        )));
    }
    let mut runs: Vec<SeqRun> = Vec::new();
    for (t, (&s, &p)) in seq.iter().zip(pos).enumerate() {
        let (s, p) = (s as usize, p as usize);
        if s >= g.max_batch || p >= g.max_len {
            return Err(Error::Pipeline(format!(
                "token {t} at sequence {s}, position {p} is outside the KV cache of {} \
                 sequences × {} positions",
                g.max_batch, g.max_len
            )));
        }
        match runs.last_mut() {
            Some(r) if r.seq == s && r.start + r.len == p => r.len += 1,
            _ => runs.push(SeqRun {
                seq: s,
                start: p,
                len: 1,
            }),
        }
    }
    runs.sort_by_key(|r| r.seq);
    if let Some(w) = runs.windows(2).find(|w| w[0].seq == w[1].seq) {
        return Err(Error::Pipeline(format!(
            "sequence {}'s tokens in a pass are not consecutive at consecutive positions \
             (runs from positions {} and {})",
            w[0].seq, w[0].start, w[1].start
        )));
    }
    Ok(runs)
}

/// The rectangles of `parts` — per sequence (sorted), the first byte of its
/// rows and the bytes of each — merging consecutive sequences with the same
/// two into one rectangle; empty parts are left out.
fn rects(parts: impl Iterator<Item = (usize, usize, usize)>, g: &Geometry) -> Vec<Rect2d> {
    let mut out: Vec<Rect2d> = Vec::new();
    for (seq, x, width) in parts.filter(|p| p.2 > 0) {
        let offset = seq * g.kv_heads * g.pitch() + x;
        match out.last_mut() {
            // Rows follow on (x < pitch, so the same x and the next sequence).
            Some(r) if r.width == width && r.offset + r.height * g.pitch() == offset => {
                r.height += g.kv_heads
            }
            _ => out.push(Rect2d {
                offset,
                width,
                height: g.kv_heads,
                pitch: g.pitch(),
            }),
        }
    }
    out
}

/// The copies of each run's cached prefix (positions `0..start`), the same
/// rectangles in the host layer and in a slot.
pub(crate) fn prefix_rects(runs: &[SeqRun], g: &Geometry) -> Vec<Rect2d> {
    rects(runs.iter().map(|r| (r.seq, 0, r.start * g.pos_bytes)), g)
}

/// The copies of each run's new positions (`start..start + len`).
pub(crate) fn new_rects(runs: &[SeqRun], g: &Geometry) -> Vec<Rect2d> {
    let part = |r: &SeqRun| (r.seq, r.start * g.pos_bytes, r.len * g.pos_bytes);
    rects(runs.iter().map(part), g)
}

/// One layer's K and V in page-locked host memory.
struct HostLayer {
    /// Declared before `buf`, so that it is unregistered before the memory is
    /// unmapped.
    _reg: HostRegistration,
    /// K, then V at `v_offset`.
    buf: AlignedBuf,
}

/// A device slot of one layer's K and V with its events.
struct KvSlot {
    /// K, then V at `v_offset`.
    mem: DeviceBuffer,
    /// Recorded on the copy stream after the copy into the slot.
    ready: Event,
    /// Recorded on the compute stream after the attention that used it.
    done: Event,
}

/// The offloaded cache: host layers, device slots, the copy stream and the
/// current pass's copies.
pub(crate) struct KvOffload {
    geom: Geometry,
    host: Vec<HostLayer>,
    slots: Vec<KvSlot>,
    schedule: KvSchedule,
    /// The steps being queued (kept to reuse its allocation).
    steps: Vec<KvStep>,
    /// Every copy between host and slots, in queue order.
    copy: Stream,
    /// Recorded on the compute stream when a pass begins.
    pass_start: Event,
    into_slot: Vec<Rect2d>,
    back: Vec<Rect2d>,
    moved: KvTransfer,
}

impl KvOffload {
    /// Allocates `slots` device slots and `layers` pinned host layers of
    /// `geom`. The caller has checked the device and host limits.
    pub(crate) fn alloc(
        ctx: &Context,
        geom: Geometry,
        layers: usize,
        slots: usize,
    ) -> Result<KvOffload> {
        let max = max_copy_pitch(ctx)?;
        if geom.pitch() as u64 > max {
            return Err(Error::Limit {
                what: format!(
                    "the row pitch of the --kv-offload copies ({} positions × {} bytes)",
                    geom.max_len, geom.pos_bytes
                ),
                asked: geom.pitch() as u64,
                available: max,
                hint: "lower --max-len".into(),
            });
        }
        let bytes = geom.kv_bytes().max(4);
        let slots = (0..slots)
            .map(|_| {
                Ok(KvSlot {
                    mem: DeviceBuffer::alloc(ctx, bytes)?,
                    ready: Event::new(ctx, false)?,
                    done: Event::new(ctx, false)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let host = (0..layers)
            .map(|_| {
                let mut buf = AlignedBuf::new(bytes)?;
                let (ptr, len) = (buf.as_mut_ptr(), buf.len());
                // SAFETY: `buf` is a live page-aligned mapping of `len` bytes
                // that the HostLayer owns and unmaps after the registration
                // (field order); nothing else registered it (just mapped).
                let reg = unsafe { HostRegistration::register(ctx, ptr, len)? };
                Ok(HostLayer { _reg: reg, buf })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(KvOffload {
            geom,
            host,
            schedule: KvSchedule::new(layers, slots.len()),
            steps: Vec::new(),
            slots,
            copy: Stream::new(ctx)?,
            pass_start: Event::new(ctx, false)?,
            into_slot: Vec::new(),
            back: Vec::new(),
            moved: KvTransfer::default(),
        })
    }

    /// Plans the next pass's copies from its tokens' sequences and positions,
    /// and queues layer 0's, which then overlaps the embedding and the wait
    /// for the first weights.
    pub(crate) fn begin_pass(&mut self, seq: &[u32], pos: &[u32], s: &Stream) -> Result<()> {
        let runs = seq_runs(seq, pos, &self.geom)?;
        let into_slot = prefix_rects(&runs, &self.geom);
        let back = new_rects(&runs, &self.geom);
        let lb = self.geom.layer_bytes();
        if let Some(r) = into_slot
            .iter()
            .chain(&back)
            .find(|r| r.end().is_none_or(|e| e > lb))
        {
            return Err(Error::Pipeline(format!(
                "a KV copy {r:?} runs past the {lb}-byte layer"
            )));
        }
        self.into_slot = into_slot;
        self.back = back;
        self.moved = KvTransfer::default();
        let mut steps = std::mem::take(&mut self.steps);
        steps.clear();
        self.schedule.begin(&mut steps);
        let out = self.run(&steps, s);
        self.steps = steps;
        out
    }

    /// The slot addresses (K, V) for `layer`'s attention on the compute
    /// stream `s`; queues the copies it and the next layer still need and
    /// the wait for its own (see the module docs).
    pub(crate) fn attend(&mut self, layer: usize, s: &Stream) -> Result<(u64, u64)> {
        let mut steps = std::mem::take(&mut self.steps);
        steps.clear();
        let out = self
            .schedule
            .attend(layer, &mut steps)
            .and_then(|slot| self.run(&steps, s).map(|()| slot));
        self.steps = steps;
        let k = self.slots[out?].mem.ptr();
        Ok((k, k + self.geom.v_offset() as u64))
    }

    /// Queues, once `layer`'s attention is queued on `s`, the copy of its new
    /// positions back to the host.
    pub(crate) fn attended(&mut self, layer: usize, s: &Stream) -> Result<()> {
        let mut steps = std::mem::take(&mut self.steps);
        steps.clear();
        let out = self
            .schedule
            .attended(layer, &mut steps)
            .and_then(|()| self.run(&steps, s));
        self.steps = steps;
        out
    }

    /// Queues `steps`, the compute stream's on `s`.
    fn run(&mut self, steps: &[KvStep], s: &Stream) -> Result<()> {
        for &step in steps {
            match step {
                KvStep::RecordPassStart => self.pass_start.record(s)?,
                KvStep::CopyWaitsPassStart => self.copy.wait_event(&self.pass_start)?,
                KvStep::CopyWaitsDone(i) => self.copy.wait_event(&self.slots[i].done)?,
                KvStep::ToSlot { layer, slot } => self.copy_in(layer, slot)?,
                KvStep::RecordReady(i) => self.slots[i].ready.record(&self.copy)?,
                KvStep::ComputeWaitsReady(i) => s.wait_event(&self.slots[i].ready)?,
                KvStep::RecordDone(i) => self.slots[i].done.record(s)?,
                KvStep::ToHost { layer, slot } => self.copy_back(layer, slot)?,
            }
        }
        Ok(())
    }

    /// Queues the copy of `layer`'s cached prefixes into `slot` on the copy
    /// stream.
    fn copy_in(&mut self, layer: usize, slot: usize) -> Result<()> {
        let dst = self.slots[slot].mem.ptr();
        let src = self.host[layer].buf.as_ptr();
        for half in [0, self.geom.v_offset()] {
            for &r in &self.into_slot {
                // SAFETY: `r` lies within a layer's K (begin_pass checked
                // r.end() <= layer_bytes), so from `half` (0 or v_offset) it
                // lies in the host buffer and the slot, each of kv_bytes, live
                // until the copy stream is synchronized in Drop; the buffer is
                // registered and the host never touches it; the pitch was
                // checked at alloc.
                unsafe {
                    memcpy_2d_htod_async(dst + half as u64, src.wrapping_add(half), r, &self.copy)?;
                }
                self.moved.h2d_bytes += r.bytes() as u64;
            }
        }
        Ok(())
    }

    /// Queues the copy of `layer`'s new positions from `slot` back to the
    /// host on the copy stream.
    fn copy_back(&mut self, layer: usize, slot: usize) -> Result<()> {
        let src = self.slots[slot].mem.ptr();
        let dst = self.host[layer].buf.as_mut_ptr();
        for half in [0, self.geom.v_offset()] {
            for &r in &self.back {
                // SAFETY: as in `copy_in`, with the host buffer written: the
                // host never reads or writes it, and later copies from it are
                // queued after this one on the same stream.
                unsafe {
                    memcpy_2d_dtoh_async(dst.wrapping_add(half), src + half as u64, r, &self.copy)?;
                }
                self.moved.d2h_bytes += r.bytes() as u64;
            }
        }
        Ok(())
    }

    /// The bytes the latest pass copied (so far).
    pub(crate) fn transfer(&self) -> KvTransfer {
        self.moved
    }
}

impl Drop for KvOffload {
    fn drop(&mut self) {
        // No copy may still read or write the host layers or the slots when
        // they are freed. A copy that failed leaves the context in error,
        // which its next driver call reports.
        let _ = self.copy.synchronize();
    }
}

#[cfg(test)]
#[path = "offload_tests.rs"]
mod tests;
