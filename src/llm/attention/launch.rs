//! The launches of one layer's attention: grid, block, shared memory and
//! the argument list of each kernel, as pure functions of the shape, the
//! pass's plan and the device addresses, so that the arguments can be
//! checked against the kernels' PTX signatures without a GPU.

use super::plan::{self, AttentionShape, Plan, PREFILL_ROWS, SPLIT_WARPS};
use crate::llm::gpu_kernels::Arg;

/// Threads per block of the cache write and combine kernels.
pub(crate) const ROW_BLOCK: u32 = 128;

/// Which kernel a [`Launch`] is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kernel {
    CacheWrite,
    Prefill,
    Split,
    Combine,
}

/// One kernel launch.
pub(crate) struct Launch {
    pub(crate) kernel: Kernel,
    pub(crate) grid: (u32, u32),
    pub(crate) block: u32,
    pub(crate) shared: u32,
    pub(crate) args: Vec<Arg>,
}

/// Device addresses of one layer's attention.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Ptrs {
    pub(crate) q: u64,
    pub(crate) k_cache: u64,
    pub(crate) v_cache: u64,
    pub(crate) seq: u64,
    pub(crate) pos: u64,
    /// The prefill items; the split-KV tokens follow at `split_tokens`.
    pub(crate) items: u64,
    pub(crate) split_tokens: u64,
    pub(crate) partial: u64,
    pub(crate) hi: u64,
    pub(crate) lo: u64,
}

/// The cache write's arguments (kernels/attention.cu `attention_cache_write`):
/// `io` is q, k, v, the three biases, cos, sin, seq, pos, the K and V caches.
pub(crate) fn cache_write(
    sh: &AttentionShape,
    io: [u64; 12],
    tokens: usize,
    kinds: (u64, u64),
    interleaved: bool,
) -> Launch {
    let mut args: Vec<Arg> = io.iter().map(|&p| Arg::U(p)).collect();
    args.extend(
        [
            tokens,
            sh.heads,
            sh.kv_heads,
            sh.head_dim,
            sh.max_len,
            kinds.0 as usize,
            kinds.1 as usize,
            interleaved as usize,
        ]
        .map(|x| Arg::U(x as u64)),
    );
    Launch {
        kernel: Kernel::CacheWrite,
        grid: (tokens.clamp(1, 65535) as u32, 1),
        block: ROW_BLOCK,
        shared: 0,
        args,
    }
}

/// The attention launches of a pass with plan `p`, in order: the prefill
/// kernel, then the split-KV kernel and its combine; each only when it has
/// tokens. `kinds` are the output and cache element kinds.
pub(crate) fn attention(sh: &AttentionShape, p: &Plan, x: &Ptrs, kinds: (u64, u64)) -> Vec<Launch> {
    let scale = 1.0 / (sh.head_dim as f32).sqrt();
    let u = |v: usize| Arg::U(v as u64);
    let common = [x.q, x.k_cache, x.v_cache, x.seq, x.pos].map(Arg::U);
    let mut out = Vec::new();
    if p.prefill_len() > 0 {
        let chunks = sh.group().div_ceil(p.prefill_heads);
        let mut args = common.to_vec();
        args.extend([Arg::U(x.items), Arg::U(x.hi), Arg::U(x.lo)]);
        args.extend([
            u(sh.heads),
            u(sh.kv_heads),
            u(sh.max_len),
            u(p.prefill_heads),
        ]);
        args.extend([Arg::F(scale), Arg::U(kinds.0)]);
        out.push(Launch {
            kernel: Kernel::Prefill,
            grid: (p.prefill_len() as u32, (sh.kv_heads * chunks) as u32),
            block: (PREFILL_ROWS / 16 * 32) as u32,
            shared: 0,
            args,
        });
    }
    let n = p.split_tokens.len();
    if n == 0 {
        return out;
    }
    let l = p.split;
    let mut args = common.to_vec();
    args.extend([Arg::U(x.split_tokens), Arg::U(x.partial)]);
    args.extend([u(sh.heads), u(sh.kv_heads), u(sh.head_dim), u(sh.max_len)]);
    args.extend([
        u(l.heads_per_block),
        u(l.chunk_len),
        Arg::F(scale),
        Arg::U(kinds.1),
    ]);
    out.push(Launch {
        kernel: Kernel::Split,
        grid: ((n * sh.kv_heads * l.head_chunks) as u32, l.splits as u32),
        block: (SPLIT_WARPS * 32) as u32,
        shared: plan::split_shared_bytes(l.heads_per_block, sh.head_dim) as u32,
        args,
    });
    let mut args = [x.partial, x.split_tokens, x.hi, x.lo].map(Arg::U).to_vec();
    args.extend([u(sh.heads), u(sh.head_dim), u(l.splits), Arg::U(kinds.0)]);
    out.push(Launch {
        kernel: Kernel::Combine,
        grid: ((n * sh.heads) as u32, 1),
        block: ROW_BLOCK,
        shared: 0,
        args,
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The parameter types ('U' for .u64, 'F' for .f32) of entry `name` in
    /// the embedded attention PTX.
    fn ptx_params(name: &str) -> Vec<char> {
        let ptx = crate::kernels::PTX_MODULES
            .iter()
            .find(|(n, _)| *n == "attention")
            .map(|(_, p)| *p)
            .expect("attention PTX embedded");
        let start = ptx
            .find(&format!(".visible .entry {name}("))
            .unwrap_or_else(|| panic!("no entry {name}"));
        let body = &ptx[start..];
        let end = body.find(')').unwrap();
        body[..end]
            .lines()
            .filter(|l| l.contains(".param"))
            .map(|l| {
                if l.contains(".f32") {
                    'F'
                } else {
                    assert!(l.contains(".u64"), "{l}");
                    'U'
                }
            })
            .collect()
    }

    fn kinds(args: &[Arg]) -> Vec<char> {
        args.iter()
            .map(|a| match a {
                Arg::U(_) => 'U',
                Arg::F(_) => 'F',
            })
            .collect()
    }

    #[test]
    fn every_launch_matches_its_kernels_ptx_signature() {
        let sh = AttentionShape {
            heads: 8,
            kv_heads: 2,
            head_dim: 128,
            max_seqs: 2,
            max_len: 4096,
        };
        let (mut seq, mut pos) = (vec![0u32; 20], (0..20).collect::<Vec<u32>>());
        seq.push(1);
        pos.push(4000);
        let p = plan::plan(&sh, &seq, &pos, true, 8 * 64).unwrap();
        let x = Ptrs {
            q: 1,
            k_cache: 2,
            v_cache: 3,
            seq: 4,
            pos: 5,
            items: 6,
            split_tokens: 7,
            partial: 8,
            hi: 9,
            lo: 10,
        };
        let launches = attention(&sh, &p, &x, (0, 0));
        let names: Vec<Kernel> = launches.iter().map(|l| l.kernel).collect();
        assert_eq!(names, [Kernel::Prefill, Kernel::Split, Kernel::Combine]);
        let mut checked = 0;
        for l in launches
            .iter()
            .chain([&cache_write(&sh, [0; 12], 21, (0, 0), false)])
        {
            let entries: &[&str] = match l.kernel {
                Kernel::CacheWrite => &["attention_cache_write"],
                Kernel::Prefill => &[
                    "attention_prefill_bf16_d64",
                    "attention_prefill_bf16_d128",
                    "attention_prefill_f16_d64",
                    "attention_prefill_f16_d128",
                ],
                Kernel::Split => &["attention_split"],
                Kernel::Combine => &["attention_combine"],
            };
            for e in entries {
                assert_eq!(kinds(&l.args), ptx_params(e), "{e}");
                checked += 1;
            }
            assert!(l.shared as usize <= plan::MAX_SHARED && l.grid.0 >= 1 && l.grid.1 >= 1);
        }
        assert_eq!(checked, 7);
    }
}
