use super::*;
use rand::seq::SliceRandom;
use rand::Rng;

use crate::test_rng::rng;

fn random_geometry(rng: &mut impl Rng) -> Geometry {
    Geometry {
        max_batch: rng.gen_range(1..7),
        max_len: rng.gen_range(1..40),
        kv_heads: rng.gen_range(1..4),
        pos_bytes: 2 * rng.gen_range(1..9),
    }
}

/// A pass over a random subset of the sequences, in random order, each with
/// a random cached prefix and a random number of new positions; with
/// `same`, every sequence has the same prefix and count (a decode step or a
/// prefill of equal prompts).
fn random_pass(rng: &mut impl Rng, g: &Geometry, same: bool) -> (Vec<u32>, Vec<u32>) {
    let mut seqs: Vec<usize> = (0..g.max_batch).collect();
    seqs.shuffle(rng);
    seqs.truncate(rng.gen_range(1..=g.max_batch));
    let shared_start = rng.gen_range(0..g.max_len);
    let shared_len = rng.gen_range(1..=g.max_len - shared_start);
    let (mut seq, mut pos) = (Vec::new(), Vec::new());
    for s in seqs {
        let (start, len) = if same {
            (shared_start, shared_len)
        } else {
            let start = rng.gen_range(0..g.max_len);
            (start, rng.gen_range(1..=g.max_len - start))
        };
        for p in start..start + len {
            seq.push(s as u32);
            pos.push(p as u32);
        }
    }
    (seq, pos)
}

/// What a 2-D copy does, on host byte arrays.
fn apply(r: &Rect2d, src: &[u8], dst: &mut [u8]) {
    for row in 0..r.height {
        let at = r.offset + row * r.pitch;
        dst[at..at + r.width].copy_from_slice(&src[at..at + r.width]);
    }
}

/// The byte range of (seq, head, positions) in a layer's K.
fn cell(
    g: &Geometry,
    seq: usize,
    head: usize,
    p: std::ops::Range<usize>,
) -> std::ops::Range<usize> {
    let row = (seq * g.kv_heads + head) * g.pitch();
    row + p.start * g.pos_bytes..row + p.end * g.pos_bytes
}

#[test]
fn the_copies_move_each_cached_prefix_in_and_only_the_new_positions_back() {
    let mut rng = rng();
    for _ in 0..300 {
        let g = random_geometry(&mut rng);
        let same = rng.gen();
        let (seq, pos) = random_pass(&mut rng, &g, same);
        let runs = seq_runs(&seq, &pos, &g).unwrap();
        let lb = g.layer_bytes();
        let host_before: Vec<u8> = (0..2 * lb).map(|_| rng.gen()).collect();
        let mut host = host_before.clone();
        let mut slot: Vec<u8> = (0..2 * lb).map(|_| rng.gen()).collect();
        let into = prefix_rects(&runs, &g);
        for half in [0, lb] {
            for r in &into {
                assert!(r.end().unwrap() <= lb, "{r:?} past {lb}");
                apply(r, &host[half..], &mut slot[half..]);
            }
        }
        // The cache write: fresh bytes at each new position of the slot.
        let mut written = vec![false; 2 * lb];
        for half in [0, lb] {
            for run in &runs {
                for h in 0..g.kv_heads {
                    let c = cell(&g, run.seq, h, run.start..run.start + run.len);
                    for i in c.start + half..c.end + half {
                        slot[i] = rng.gen();
                        written[i] = true;
                    }
                }
            }
        }
        let back = new_rects(&runs, &g);
        for half in [0, lb] {
            for r in &back {
                apply(r, &slot[half..], &mut host[half..]);
            }
        }
        let mut moved_in = 0;
        for half in [0, lb] {
            for run in &runs {
                for h in 0..g.kv_heads {
                    // Attention reads positions 0..start + len of the slot:
                    // the host's prefix, then the new positions.
                    let c = cell(&g, run.seq, h, 0..run.start);
                    let c = c.start + half..c.end + half;
                    assert_eq!(slot[c.clone()], host_before[c.clone()]);
                    moved_in += c.len();
                }
            }
        }
        let bytes = |rs: &[Rect2d]| 2 * rs.iter().map(Rect2d::bytes).sum::<usize>();
        assert_eq!(bytes(&into), moved_in, "only the prefixes are copied in");
        // The host holds the new positions and nothing else changed.
        for i in 0..2 * lb {
            let want = if written[i] { slot[i] } else { host_before[i] };
            assert_eq!(host[i], want, "host byte {i} of {g:?}, runs {runs:?}");
        }
        assert_eq!(bytes(&back), written.iter().filter(|&&w| w).count());
    }
}

#[test]
fn consecutive_sequences_with_the_same_prefix_take_one_copy() {
    let mut rng = rng();
    for _ in 0..100 {
        let mut g = random_geometry(&mut rng);
        g.max_len = g.max_len.max(2);
        let first = rng.gen_range(0..g.max_batch);
        let n = rng.gen_range(1..=g.max_batch - first);
        let start = rng.gen_range(1..g.max_len);
        let (mut seq, mut pos) = (Vec::new(), Vec::new());
        // Decode order need not be the sequences' order.
        let mut order: Vec<usize> = (first..first + n).collect();
        order.shuffle(&mut rng);
        for s in order {
            seq.push(s as u32);
            pos.push(start as u32);
        }
        let runs = seq_runs(&seq, &pos, &g).unwrap();
        let into = prefix_rects(&runs, &g);
        let back = new_rects(&runs, &g);
        assert_eq!(into.len(), 1, "{into:?}");
        assert_eq!(back.len(), 1, "{back:?}");
        assert_eq!(into[0].height, n * g.kv_heads);
        assert_eq!(into[0].width, start * g.pos_bytes);
        assert_eq!(back[0].offset, cell(&g, first, 0, start..start + 1).start);
    }
}

#[test]
fn tokens_out_of_order_or_outside_the_cache_are_refused_naming_them() {
    let g = Geometry {
        max_batch: 3,
        max_len: 10,
        kv_heads: 2,
        pos_bytes: 8,
    };
    for (seq, pos, words) in [
        (vec![3], vec![0], "sequence 3, position 0"),
        (vec![0, 1], vec![2, 10], "sequence 1, position 10"),
        (vec![1, 0, 1], vec![4, 0, 5], "sequence 1's tokens"),
        (vec![2, 2], vec![4, 6], "sequence 2's tokens"),
    ] {
        let e = seq_runs(&seq, &pos, &g).unwrap_err().to_string();
        assert!(e.contains(words), "{words}: {e}");
    }
    let runs = seq_runs(&[2, 2, 0], &[7, 8, 0], &g).unwrap();
    let want = [
        SeqRun {
            seq: 0,
            start: 0,
            len: 1,
        },
        SeqRun {
            seq: 2,
            start: 7,
            len: 2,
        },
    ];
    assert_eq!(runs, want);
}
