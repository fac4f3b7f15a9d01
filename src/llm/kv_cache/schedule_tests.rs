//! The schedule run on a model of the two streams: each in order, a wait
//! blocks its stream until the event's latest record queued before it has
//! run, and otherwise the streams interleave at random. A resident cache
//! written in program order is the reference every attention's reads are
//! checked against, over passes of which some fail half-way.

use std::collections::{HashMap, VecDeque};

use super::*;
use crate::cuda::Rect2d;
use crate::llm::kv_cache::offload::{new_rects, prefix_rects, seq_runs, Geometry, SeqRun};
use rand::seq::SliceRandom;
use rand::Rng;

use crate::test_rng::rng;

/// An event: ('r', slot) for `ready`, ('d', slot) for `done`, ('p', 0) for
/// the pass start.
type EventId = (char, usize);
/// Bytes at an offset of a layer's K.
type Cells = Vec<(usize, Vec<u8>)>;

const COPY: usize = 0;
const COMPUTE: usize = 1;

#[derive(Debug)]
enum Op {
    Record(EventId),
    /// Waits until the event's `n`-th record has run.
    Wait(EventId, usize),
    ToSlot {
        layer: usize,
        slot: usize,
        pass: usize,
    },
    ToHost {
        layer: usize,
        slot: usize,
        pass: usize,
    },
    /// The cache write of the pass's new positions into the slot.
    Write {
        slot: usize,
        cells: Cells,
    },
    /// The attention's reads: the slot must hold these bytes.
    Read {
        slot: usize,
        what: String,
        cells: Cells,
    },
}

/// Host layers, slots, and the two streams' queues.
struct Sim {
    queues: [VecDeque<Op>; 2],
    queued: HashMap<EventId, usize>,
    ran: HashMap<EventId, usize>,
    host: Vec<Vec<u8>>,
    slots: Vec<Vec<u8>>,
    /// Per pass, the copies in and back.
    rects: Vec<(Vec<Rect2d>, Vec<Rect2d>)>,
}

impl Sim {
    /// `layers` zeroed host layers (like their fresh mappings) and `n_slots`
    /// slots of random bytes, nothing queued.
    fn new(rng: &mut impl Rng, g: &Geometry, layers: usize, n_slots: usize) -> Sim {
        let lb = g.layer_bytes();
        Sim {
            queues: [VecDeque::new(), VecDeque::new()],
            queued: HashMap::new(),
            ran: HashMap::new(),
            host: vec![vec![0; lb]; layers],
            slots: (0..n_slots)
                .map(|_| (0..lb).map(|_| rng.gen()).collect())
                .collect(),
            rects: Vec::new(),
        }
    }

    /// Queues a layer's cache write of fresh bytes at the new positions of
    /// `runs` into `slot`, and its attention's reads of every position in use,
    /// on the compute stream; the resident cache `cache` gets the same write.
    fn queue_attention(
        &mut self,
        rng: &mut impl Rng,
        g: &Geometry,
        runs: &[SeqRun],
        cache: &mut [u8],
        slot: usize,
        what: String,
    ) {
        let new = |r: &SeqRun| r.start..r.start + r.len;
        for (at, bytes) in cells(g, runs, cache, new) {
            let fresh: Vec<u8> = bytes.iter().map(|_| rng.gen()).collect();
            cache[at..at + fresh.len()].copy_from_slice(&fresh);
        }
        let cells_new = cells(g, runs, cache, new);
        self.queues[COMPUTE].push_back(Op::Write {
            slot,
            cells: cells_new,
        });
        let read = cells(g, runs, cache, |r| 0..r.start + r.len);
        self.queues[COMPUTE].push_back(Op::Read {
            slot,
            what,
            cells: read,
        });
    }

    /// Queues the schedule's steps as the CUDA side does.
    fn queue(&mut self, steps: &[KvStep], pass: usize) {
        for &step in steps {
            let on_compute = matches!(
                step,
                KvStep::ComputeWaitsReady(_) | KvStep::RecordDone(_) | KvStep::RecordPassStart
            );
            let stream = if on_compute { COMPUTE } else { COPY };
            let op = match step {
                KvStep::RecordPassStart => self.record(('p', 0)),
                KvStep::CopyWaitsPassStart => self.wait(('p', 0)),
                KvStep::CopyWaitsDone(i) => self.wait(('d', i)),
                KvStep::ComputeWaitsReady(i) => self.wait(('r', i)),
                KvStep::RecordReady(i) => self.record(('r', i)),
                KvStep::RecordDone(i) => self.record(('d', i)),
                KvStep::ToSlot { layer, slot } => Op::ToSlot { layer, slot, pass },
                KvStep::ToHost { layer, slot } => Op::ToHost { layer, slot, pass },
            };
            self.queues[stream].push_back(op);
        }
    }

    fn wait(&self, e: EventId) -> Op {
        Op::Wait(e, self.queued.get(&e).copied().unwrap_or(0))
    }

    fn record(&mut self, e: EventId) -> Op {
        *self.queued.entry(e).or_default() += 1;
        Op::Record(e)
    }

    fn runnable(&self, stream: usize) -> bool {
        match self.queues[stream].front() {
            None => false,
            Some(Op::Wait(e, n)) => self.ran.get(e).copied().unwrap_or(0) >= *n,
            Some(_) => true,
        }
    }

    /// Runs ops in a random interleaving until `stream` (or, with `None`,
    /// both) is empty.
    fn run_until_empty(&mut self, rng: &mut impl Rng, stream: Option<usize>) {
        loop {
            let done = match stream {
                Some(s) => self.queues[s].is_empty(),
                None => self.queues.iter().all(VecDeque::is_empty),
            };
            if done {
                return;
            }
            let ready: Vec<usize> = (0..2).filter(|&s| self.runnable(s)).collect();
            let s = *ready
                .choose(rng)
                .unwrap_or_else(|| panic!("the streams wait on each other: {:?}", self.queues));
            let op = self.queues[s].pop_front().unwrap();
            self.execute(op);
        }
    }

    fn execute(&mut self, op: Op) {
        match op {
            Op::Record(e) => *self.ran.entry(e).or_default() += 1,
            Op::Wait(..) => {}
            Op::ToSlot { layer, slot, pass } => {
                for r in &self.rects[pass].0 {
                    apply(r, &self.host[layer], &mut self.slots[slot]);
                }
            }
            Op::ToHost { layer, slot, pass } => {
                for r in &self.rects[pass].1 {
                    apply(r, &self.slots[slot], &mut self.host[layer]);
                }
            }
            Op::Write { slot, cells } => {
                for (at, bytes) in cells {
                    self.slots[slot][at..at + bytes.len()].copy_from_slice(&bytes);
                }
            }
            Op::Read { slot, what, cells } => {
                for (at, bytes) in cells {
                    assert_eq!(
                        self.slots[slot][at..at + bytes.len()],
                        bytes[..],
                        "{what}: bytes at {at}"
                    );
                }
            }
        }
    }
}

/// What a 2-D copy does, on host byte arrays.
fn apply(r: &Rect2d, src: &[u8], dst: &mut [u8]) {
    for row in 0..r.height {
        let at = r.offset + row * r.pitch;
        dst[at..at + r.width].copy_from_slice(&src[at..at + r.width]);
    }
}

/// Each (sequence, head) row's bytes of `positions(run)` in `cache`.
fn cells(
    g: &Geometry,
    runs: &[SeqRun],
    cache: &[u8],
    positions: impl Fn(&SeqRun) -> std::ops::Range<usize>,
) -> Cells {
    let mut out = Vec::new();
    for run in runs {
        let p = positions(run);
        for h in 0..g.kv_heads {
            let row = (run.seq * g.kv_heads + h) * g.pitch();
            let r = row + p.start * g.pos_bytes..row + p.end * g.pos_bytes;
            out.push((r.start, cache[r].to_vec()));
        }
    }
    out
}

/// A pass's sequences and positions: some sequences with one or more new
/// tokens each after what they hold, a full or unlucky one started over.
fn random_pass(rng: &mut impl Rng, g: &Geometry, lens: &mut [usize]) -> (Vec<u32>, Vec<u32>) {
    let mut seqs: Vec<usize> = (0..g.max_batch).collect();
    seqs.shuffle(rng);
    seqs.truncate(rng.gen_range(1..=g.max_batch));
    let (mut seq, mut pos) = (Vec::new(), Vec::new());
    for s in seqs {
        if lens[s] == g.max_len || rng.gen_ratio(1, 10) {
            lens[s] = 0;
        }
        let n = rng.gen_range(1..=(g.max_len - lens[s]).min(4));
        for p in lens[s]..lens[s] + n {
            seq.push(s as u32);
            pos.push(p as u32);
        }
        lens[s] += n;
    }
    (seq, pos)
}

#[test]
fn every_attention_reads_the_resident_caches_bytes_in_any_stream_interleaving() {
    let mut rng = rng();
    for _ in 0..500 {
        let g = Geometry {
            max_batch: rng.gen_range(1..5),
            max_len: rng.gen_range(2..24),
            kv_heads: rng.gen_range(1..3),
            pos_bytes: rng.gen_range(1..5),
        };
        let layers = rng.gen_range(1..7);
        let n_slots = rng.gen_range(2..4).min(layers);
        let mut sim = Sim::new(&mut rng, &g, layers, n_slots);
        let mut resident = vec![vec![0u8; g.layer_bytes()]; layers];
        let mut schedule = KvSchedule::new(layers, n_slots);
        let mut lens = vec![0usize; g.max_batch];
        for pass in 0..rng.gen_range(1..8) {
            let (seq, pos) = random_pass(&mut rng, &g, &mut lens);
            let runs = seq_runs(&seq, &pos, &g).unwrap();
            sim.rects
                .push((prefix_rects(&runs, &g), new_rects(&runs, &g)));
            let mut steps = Vec::new();
            schedule.begin(&mut steps);
            sim.queue(&steps, pass);
            // Now and then a layer function fails after queueing its
            // attention: the pass stops there, without its sync.
            let failed = rng.gen_ratio(1, 6).then(|| rng.gen_range(0..layers));
            for (layer, cache) in resident.iter_mut().enumerate() {
                steps.clear();
                let slot = schedule.attend(layer, &mut steps).unwrap();
                assert_eq!(slot, layer % n_slots);
                sim.queue(&steps, pass);
                let what = format!("pass {pass} layer {layer} of {layers}, {n_slots} slots");
                sim.queue_attention(&mut rng, &g, &runs, cache, slot, what);
                if failed == Some(layer) {
                    break;
                }
                steps.clear();
                schedule.attended(layer, &mut steps).unwrap();
                sim.queue(&steps, pass);
            }
            if failed.is_some() {
                // The sequences keep their lengths from before the pass.
                runs.iter().for_each(|r| lens[r.seq] = r.start);
            } else {
                // The pass ends by synchronizing the compute stream only.
                sim.run_until_empty(&mut rng, Some(COMPUTE));
            }
        }
        sim.run_until_empty(&mut rng, None);
        // The host holds what the resident cache does at every position
        // still in use.
        let runs: Vec<SeqRun> = (0..g.max_batch)
            .filter(|&s| lens[s] > 0)
            .map(|s| SeqRun {
                seq: s,
                start: 0,
                len: lens[s],
            })
            .collect();
        let used = |r: &SeqRun| 0..r.len;
        for (layer, (host, cache)) in sim.host.iter().zip(&resident).enumerate() {
            assert_eq!(
                cells(&g, &runs, host, used),
                cells(&g, &runs, cache, used),
                "host layer {layer}"
            );
        }
    }
}

#[test]
fn a_layer_outside_the_model_or_without_a_slot_is_an_error() {
    let mut s = KvSchedule::new(3, 2);
    let mut steps = Vec::new();
    s.begin(&mut steps);
    assert_eq!(
        steps,
        [
            KvStep::RecordPassStart,
            KvStep::CopyWaitsPassStart,
            KvStep::CopyWaitsDone(0),
            KvStep::ToSlot { layer: 0, slot: 0 },
            KvStep::RecordReady(0)
        ]
    );
    let e = s.attend(3, &mut steps).unwrap_err().to_string();
    assert!(e.contains("layer 3") && e.contains("3 layers"), "{e}");
    let e = s.attended(1, &mut steps).unwrap_err().to_string();
    assert!(e.contains("layer 1") && e.contains("without a slot"), "{e}");
}
