//! The work of one pass's attention, computed on the host from its packed
//! `(seq, pos)` lists: which tokens go to the tensor-core prefill kernel (in
//! items of consecutive tokens of one sequence) and which to the split-KV
//! kernel, and the launch shapes of both. Pure functions, tested on the CPU.

use crate::{Error, Result};

/// Query rows (token × q head pairs) of one prefill block: 4 warps of 16.
pub(crate) const PREFILL_ROWS: usize = 64;
/// Shortest run of one sequence's tokens that goes to the prefill kernel.
/// Shorter runs (decode steps) leave most of its 64-row tile empty and have
/// too few blocks to spread a long cache over the GPU; the split-KV kernel
/// takes them.
pub const PREFILL_MIN_TOKENS: usize = 8;
/// Warps of a split-KV block (kernels/attention.cu `SK_WARPS`).
pub(crate) const SPLIT_WARPS: usize = 4;
/// Most q heads one split-KV block handles (`SK_MAX_HEADS`).
pub(crate) const SPLIT_MAX_HEADS: usize = 16;
/// Largest head_dim of the split-KV kernel (32 lanes × `SK_PER_LANE`).
pub(crate) const SPLIT_MAX_HEAD_DIM: usize = 256;
/// Most splits of one token's keys.
pub(crate) const MAX_SPLITS: usize = 64;
/// Fewest keys per split (4 per warp), below which splitting costs more
/// than it spreads. A warp takes its keys one after another, each a chain
/// of shuffles and exponentials per head, so short splits pay: a 7B
/// model's attention phase (cache write, splits and combine) for one
/// decode token over 540 keys took 57 µs in splits of 16 keys against
/// 121 µs in splits of 64 (H200).
pub(crate) const MIN_CHUNK: usize = 16;
/// Blocks the split-KV kernel aims for: several per SM of the largest GPUs
/// (132 SMs on an H100/H200), so that one decode token fills the device.
pub(crate) const TARGET_BLOCKS: usize = 512;
/// Dynamic shared memory a block may use without opting in.
pub(crate) const MAX_SHARED: usize = 48 * 1024;

/// The attention geometry of a model and its KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionShape {
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (`heads` is a multiple of it: GQA, MQA with 1).
    pub kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// Sequences (KV cache slots).
    pub max_seqs: usize,
    /// Positions per sequence.
    pub max_len: usize,
}

impl AttentionShape {
    /// Q heads per KV head.
    pub fn group(&self) -> usize {
        self.heads / self.kv_heads.max(1)
    }

    /// Checks what the kernels need, naming the limit that fails.
    pub fn check(&self) -> Result<()> {
        let s = self;
        if s.heads == 0 || s.kv_heads == 0 || s.max_seqs == 0 || s.max_len == 0 {
            return Err(Error::config(format!(
                "attention needs positive sizes: {s:?}"
            )));
        }
        if !s.heads.is_multiple_of(s.kv_heads) {
            return Err(Error::config(format!(
                "{} attention heads are not a multiple of {} key/value heads",
                s.heads, s.kv_heads
            )));
        }
        if s.head_dim == 0 || !s.head_dim.is_multiple_of(8) || s.head_dim > SPLIT_MAX_HEAD_DIM {
            return Err(Error::config(format!(
                "head_dim {} is not supported by the CUDA attention kernels (a multiple of 8, \
                 at most {SPLIT_MAX_HEAD_DIM})",
                s.head_dim
            )));
        }
        if s.max_len > u32::MAX as usize || s.max_seqs > u32::MAX as usize {
            return Err(Error::config(format!(
                "max_len {} and max_batch {} must fit in 32 bits",
                s.max_len, s.max_seqs
            )));
        }
        Ok(())
    }
}

/// Whether the prefill kernel has a variant for `head_dim`.
pub(crate) fn prefill_head_dim(head_dim: usize) -> bool {
    matches!(head_dim, 64 | 128)
}

/// Q heads of one KV group per prefill block: the whole group when it fits
/// the block's rows.
pub(crate) fn prefill_heads_per_block(group: usize) -> usize {
    group.clamp(1, PREFILL_ROWS)
}

/// Bytes of dynamic shared memory of a split-KV block of `hpb` heads.
pub(crate) fn split_shared_bytes(hpb: usize, head_dim: usize) -> usize {
    (hpb * head_dim * (1 + SPLIT_WARPS) + SPLIT_WARPS * hpb * 2) * 4
}

/// Q heads of one KV group per split-KV block: as many as the register
/// state and shared memory allow.
pub(crate) fn split_heads_per_block(group: usize, head_dim: usize) -> usize {
    let mut hpb = group.clamp(1, SPLIT_MAX_HEADS);
    while hpb > 1 && split_shared_bytes(hpb, head_dim) > MAX_SHARED {
        hpb -= 1;
    }
    hpb
}

/// The split-KV launch of one pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct SplitLaunch {
    /// Q heads per block.
    pub(crate) heads_per_block: usize,
    /// Blocks per (token, KV head): `ceil(group / heads_per_block)`.
    pub(crate) head_chunks: usize,
    /// Splits of each token's keys (grid.y).
    pub(crate) splits: usize,
    /// Keys per split.
    pub(crate) chunk_len: usize,
}

/// Splits of the keys and keys per split for `items` tokens whose longest
/// key range is `max_keys`, with `blocks_per_split` blocks per split and room
/// for `capacity` (token, head, split) partial results of `heads` heads.
///
/// Aims at [`TARGET_BLOCKS`] blocks, keeps at least [`MIN_CHUNK`] keys per
/// split and at most [`MAX_SPLITS`] splits, and never leaves a split empty
/// for the longest token.
pub(crate) fn split_count(
    items: usize,
    heads: usize,
    blocks_per_split: usize,
    max_keys: usize,
    capacity: usize,
) -> (usize, usize) {
    let max_keys = max_keys.max(1);
    let want = TARGET_BLOCKS.div_ceil(blocks_per_split.max(1));
    let by_keys = max_keys.div_ceil(MIN_CHUNK);
    let by_room = capacity / (items * heads).max(1);
    let splits = want.min(by_keys).min(MAX_SPLITS).min(by_room).max(1);
    let chunk_len = max_keys.div_ceil(splits);
    (max_keys.div_ceil(chunk_len), chunk_len)
}

/// What the attention kernels do in one pass.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Plan {
    /// Prefill work items, flattened pairs (first token, token count).
    pub(crate) prefill_items: Vec<u32>,
    /// Q heads per prefill block.
    pub(crate) prefill_heads: usize,
    /// Tokens of the split-KV kernel.
    pub(crate) split_tokens: Vec<u32>,
    /// The split-KV launch (meaningful when `split_tokens` is not empty).
    pub(crate) split: SplitLaunch,
}

impl Plan {
    /// Prefill items.
    pub(crate) fn prefill_len(&self) -> usize {
        self.prefill_items.len() / 2
    }
}

/// Plans the attention of tokens at `(seq[t], pos[t])`; `tensor_cores` when
/// the prefill kernel can run (16-bit cache, a head_dim it has); `capacity`
/// (token, head, split) partial results fit the workspace.
///
/// Runs of consecutive tokens of one sequence of at least
/// [`PREFILL_MIN_TOKENS`] become prefill items of at most
/// `PREFILL_ROWS / heads per block` tokens, the longest key ranges first;
/// the other tokens go to the split-KV kernel.
pub(crate) fn plan(
    shape: &AttentionShape,
    seq: &[u32],
    pos: &[u32],
    tensor_cores: bool,
    capacity: usize,
) -> Result<Plan> {
    check_tokens(shape, seq, pos)?;
    let group = shape.group();
    let gh = prefill_heads_per_block(group);
    let per_item = PREFILL_ROWS / gh;
    let mut p = Plan {
        prefill_heads: gh,
        ..Plan::default()
    };
    let mut start = 0;
    while start < seq.len() {
        let end = start
            + seq[start..]
                .iter()
                .take_while(|&&s| s == seq[start])
                .count();
        if tensor_cores && end - start >= PREFILL_MIN_TOKENS {
            // Later tokens see more keys: queue them first.
            let mut first = start;
            let mut items = Vec::new();
            while first < end {
                let n = per_item.min(end - first);
                items.push([first as u32, n as u32]);
                first += n;
            }
            p.prefill_items.extend(items.iter().rev().flatten());
        } else {
            p.split_tokens.extend(start as u32..end as u32);
        }
        start = end;
    }
    if !p.split_tokens.is_empty() {
        let hpb = split_heads_per_block(group, shape.head_dim);
        let head_chunks = group.div_ceil(hpb);
        let n = p.split_tokens.len();
        let max_keys = p
            .split_tokens
            .iter()
            .map(|&t| pos[t as usize] as usize + 1)
            .max()
            .unwrap_or(1);
        let blocks = n * shape.kv_heads * head_chunks;
        let (splits, chunk_len) = split_count(n, shape.heads, blocks, max_keys, capacity);
        p.split = SplitLaunch {
            heads_per_block: hpb,
            head_chunks,
            splits,
            chunk_len,
        };
    }
    Ok(p)
}

/// Every `(seq, pos)` within the cache, as many positions as sequences.
fn check_tokens(shape: &AttentionShape, seq: &[u32], pos: &[u32]) -> Result<()> {
    if seq.len() != pos.len() {
        return Err(Error::Input(format!(
            "attention: {} sequence ids but {} positions",
            seq.len(),
            pos.len()
        )));
    }
    for (t, (&s, &p)) in seq.iter().zip(pos).enumerate() {
        if s as usize >= shape.max_seqs || p as usize >= shape.max_len {
            return Err(Error::Input(format!(
                "attention: token {t} is at sequence {s} position {p}, outside the KV cache of \
                 {} sequences of {} positions",
                shape.max_seqs, shape.max_len
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;

    fn shape(heads: usize, kv_heads: usize, head_dim: usize) -> AttentionShape {
        AttentionShape {
            heads,
            kv_heads,
            head_dim,
            max_seqs: 8,
            max_len: 1 << 16,
        }
    }

    use crate::test_rng::rng;

    /// A random packed pass: runs of random lengths of distinct sequences.
    fn random_pass(rng: &mut impl Rng, s: &AttentionShape) -> (Vec<u32>, Vec<u32>) {
        let (mut seq, mut pos) = (Vec::new(), Vec::new());
        let mut slots: Vec<u32> = (0..s.max_seqs as u32).collect();
        let runs = rng.gen_range(1..=s.max_seqs);
        for _ in 0..runs {
            let slot = slots.swap_remove(rng.gen_range(0..slots.len()));
            let n = if rng.gen_bool(0.5) {
                1
            } else {
                rng.gen_range(1..300)
            };
            let p0 = rng.gen_range(0..s.max_len - n);
            for i in 0..n {
                seq.push(slot);
                pos.push((p0 + i) as u32);
            }
        }
        (seq, pos)
    }

    #[test]
    fn every_token_is_planned_once_by_one_kernel() {
        let mut rng = rng();
        for _ in 0..200 {
            let group = [1, 2, 3, 7, 8, 16, 48, 80][rng.gen_range(0..8)];
            let kv = rng.gen_range(1..5);
            let s = shape(group * kv, kv, [64, 80, 128][rng.gen_range(0..3)]);
            let (seq, pos) = random_pass(&mut rng, &s);
            let tc = rng.gen_bool(0.7);
            let p = plan(&s, &seq, &pos, tc, s.heads * 4096).unwrap();
            let mut seen = vec![0u32; seq.len()];
            let gh = prefill_heads_per_block(group);
            for it in p.prefill_items.chunks_exact(2) {
                let (first, n) = (it[0] as usize, it[1] as usize);
                assert!(tc && n >= 1 && n * gh <= PREFILL_ROWS, "{it:?} gh {gh}");
                assert!(seq[first..first + n].iter().all(|&x| x == seq[first]));
                seen[first..first + n].iter_mut().for_each(|c| *c += 1);
            }
            for &t in &p.split_tokens {
                seen[t as usize] += 1;
            }
            assert!(seen.iter().all(|&c| c == 1), "{seen:?}");
            if !p.split_tokens.is_empty() {
                let l = p.split;
                let max_keys = p
                    .split_tokens
                    .iter()
                    .map(|&t| pos[t as usize] as usize + 1)
                    .max()
                    .unwrap();
                assert!(l.splits >= 1 && l.splits <= MAX_SPLITS);
                // Every key of the longest token lies in exactly one split,
                // and its last split is not empty.
                assert!(l.splits * l.chunk_len >= max_keys);
                assert!((l.splits - 1) * l.chunk_len < max_keys);
                assert!(p.split_tokens.len() * s.heads * l.splits <= s.heads * 4096);
                assert!(l.heads_per_block * l.head_chunks >= group);
                assert!(l.heads_per_block <= SPLIT_MAX_HEADS);
                assert!(split_shared_bytes(l.heads_per_block, s.head_dim) <= MAX_SHARED);
            }
        }
    }

    #[test]
    fn long_decode_spreads_over_the_gpu_and_prefill_takes_long_runs() {
        // Batch 1, 32k cache, 8 KV heads of 4 q heads: one block per KV
        // head would use 8 SMs; the split fills the target.
        let s = shape(32, 8, 128);
        let p = plan(&s, &[3], &[32767], true, 32 * 2048).unwrap();
        assert!(p.prefill_items.is_empty());
        assert_eq!(p.split_tokens, vec![0]);
        assert_eq!(p.split.splits, MAX_SPLITS);
        assert_eq!(p.split.chunk_len, 32768 / MAX_SPLITS);
        // A short cache is not split below MIN_CHUNK keys per split.
        let p = plan(&s, &[0], &[99], true, 32 * 2048).unwrap();
        assert_eq!(p.split.splits, 100usize.div_ceil(MIN_CHUNK));
        // A 100-token prompt: items of 16 tokens × 4 heads, last first.
        let seq = vec![1; 100];
        let pos: Vec<u32> = (0..100).collect();
        let p = plan(&s, &seq, &pos, true, 32 * 2048).unwrap();
        assert!(p.split_tokens.is_empty());
        assert_eq!(&p.prefill_items[..2], &[96, 4]);
        assert_eq!(p.prefill_len(), 7);
        // Without tensor cores (f32 cache) everything is split-KV.
        let p = plan(&s, &seq, &pos, false, 32 * 2048).unwrap();
        assert_eq!(p.split_tokens.len(), 100);
        assert_eq!(p.split.splits, 1);
    }

    #[test]
    fn split_heads_fit_shared_memory() {
        assert_eq!(split_heads_per_block(7, 128), 7);
        assert_eq!(split_heads_per_block(64, 128), SPLIT_MAX_HEADS);
        let h = split_heads_per_block(64, 256);
        assert!(h < SPLIT_MAX_HEADS && split_shared_bytes(h, 256) <= MAX_SHARED);
        assert!(split_shared_bytes(h + 1, 256) > MAX_SHARED);
    }

    #[test]
    fn bad_shapes_and_tokens_are_refused_naming_the_limit() {
        let e = shape(6, 4, 64).check().unwrap_err().to_string();
        assert!(
            e.contains("6 attention heads") && e.contains("4 key/value"),
            "{e}"
        );
        let e = shape(4, 4, 260).check().unwrap_err().to_string();
        assert!(e.contains("head_dim 260"), "{e}");
        assert!(shape(4, 4, 96).check().is_ok());
        let s = shape(4, 2, 64);
        let e = plan(&s, &[8], &[0], true, 1024).unwrap_err().to_string();
        assert!(e.contains("sequence 8") && e.contains("8 sequences"), "{e}");
        let e = plan(&s, &[0], &[1 << 16], true, 1024)
            .unwrap_err()
            .to_string();
        assert!(e.contains("position 65536"), "{e}");
        let e = plan(&s, &[0, 0], &[1], true, 1024).unwrap_err().to_string();
        assert!(e.contains("2 sequence ids but 1 positions"), "{e}");
    }
}
