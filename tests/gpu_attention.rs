//! The attention kernels (`llm::attention`) against an f64 host reference of
//! causal GQA attention on random data, on a GPU: prefill runs of 1, 15, 16,
//! 17, 100 and 1000 tokens, a mixed batch of sequences at different
//! positions, decode over caches of 1, 4097 and 32768 positions; bf16, f16
//! and f32 caches; head_dim 128 (GQA), 64 (MQA) and 80 (no tensor-core
//! variant: the generic path). Skips without a driver unless
//! `LS_REQUIRE_GPU=1`.
//!
//! Tolerances, in units of max |v| (V is uniform in [-1, 1]):
//! - tokens of the tensor-core prefill kernel: the reference rounds q · scale
//!   to the 16-bit type as the kernel does, so scores differ only by f32
//!   accumulation; the kernel also rounds each probability to 16 bits
//!   (relative error at most u = 2^-8 for bf16, 2^-11 for f16) but
//!   normalises by the unrounded sum, which moves an output by at most
//!   u · Σ w |v| <= u. Tolerance u + 1e-4.
//! - tokens of the split-KV kernel: f32 arithmetic throughout, whose rounding
//!   errors on these sizes are about 1e-6. Tolerance 1e-4: a hundred times
//!   that, while a wrong key, mask, scale or split moves the outputs of the
//!   short sequences every case holds by far more.
mod common;

use common::attention::*;
use half::{bf16, f16};
use layer_streamer::cuda::DeviceBuffer;
use layer_streamer::llm::attention::{Attention, PREFILL_MIN_TOKENS};
use layer_streamer::DType;
use rand::Rng;

fn round_to(x: f32, dtype: Option<DType>) -> f64 {
    match dtype {
        Some(DType::BF16) => bf16::from_f32(x).to_f64(),
        Some(DType::F16) => f16::from_f32(x).to_f64(),
        _ => x as f64,
    }
}

/// Causal attention of token `t`, head `h` in f64, with q · scale rounded to
/// `round_q` first (as the tensor-core kernel does).
fn reference(
    c: &Case,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    t: usize,
    h: usize,
    round_q: Option<DType>,
) -> Vec<f64> {
    let s = &c.shape;
    let hd = s.head_dim;
    let scale = 1.0 / (hd as f32).sqrt();
    let qv: Vec<f64> = (0..hd)
        .map(|d| round_to(q[(t * s.heads + h) * hd + d] * scale, round_q))
        .collect();
    let g = h / (s.heads / s.kv_heads);
    let base = (c.seq[t] as usize * s.kv_heads + g) * s.max_len;
    let n = c.pos[t] as usize + 1;
    let scores: Vec<f64> = (0..n)
        .map(|j| {
            let row = &k[(base + j) * hd..(base + j + 1) * hd];
            qv.iter().zip(row).map(|(a, &b)| a * b as f64).sum()
        })
        .collect();
    let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let w: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
    let sum: f64 = w.iter().sum();
    let mut out = vec![0.0; hd];
    for (j, wj) in w.iter().enumerate() {
        let row = &v[(base + j) * hd..(base + j + 1) * hd];
        for (o, &x) in out.iter_mut().zip(row) {
            *o += wj * x as f64;
        }
    }
    out.iter().map(|o| o / sum).collect()
}

/// Output bytes of one run of the kernels, with `lo` or without.
fn run_kernels(
    g: &Gpu,
    attn: &Attention,
    bufs: &[DeviceBuffer; 5],
    c: &Case,
    lo: bool,
) -> (Vec<u8>, Vec<u8>) {
    let len = c.seq.len() * c.shape.heads * c.shape.head_dim * 2;
    let hi_d = g.upload(&vec![SENTINEL; len + SLACK]);
    let lo_d = g.upload(&vec![SENTINEL; len + SLACK]);
    let [q, k, v, seq, pos] = bufs;
    let lo_ptr = if lo { lo_d.ptr() } else { 0 };
    // SAFETY: q holds tokens × heads × head_dim f32, the caches max_seqs ×
    // kv_heads × max_len × head_dim of the cache dtype (every row filled),
    // seq/pos the lists given to prepare, hi/lo room for the output; all live
    // past the reads below, which synchronize the stream.
    unsafe {
        attn.run(
            &g.stream,
            q.ptr(),
            k.ptr(),
            v.ptr(),
            seq.ptr(),
            pos.ptr(),
            hi_d.ptr(),
            lo_ptr,
        )
    }
    .unwrap();
    let (hi, lo_b) = (g.read(&hi_d), g.read(&lo_d));
    assert!(
        hi[len..].iter().all(|&b| b == SENTINEL) && lo_b[len..].iter().all(|&b| b == SENTINEL),
        "{}: a kernel wrote past the output",
        c.name
    );
    if !lo {
        assert!(
            lo_b.iter().all(|&b| b == SENTINEL),
            "{}: lo = 0 but lo written",
            c.name
        );
    }
    (hi[..len].to_vec(), lo_b[..len].to_vec())
}

/// Runs `c` with outputs of `weights` and a cache of `cache` and checks
/// every output against [`reference`]; returns the worst error.
fn check(g: &Gpu, c: &Case, weights: DType, cache: DType, rng: &mut impl Rng) -> f64 {
    let s = c.shape;
    let (tokens, hd) = (c.seq.len(), s.head_dim);
    let q: Vec<f32> = (0..tokens * s.heads * hd)
        .map(|_| rng.gen_range(-3.0..3.0))
        .collect();
    let n_cache = s.max_seqs * s.kv_heads * s.max_len * hd;
    let (k, k_bytes) = random_cache(rng, n_cache, cache);
    let (v, v_bytes) = random_cache(rng, n_cache, cache);
    let bufs = [
        g.upload(&f32_bytes(&q)),
        g.upload(&k_bytes),
        g.upload(&v_bytes),
        g.upload(&u32_bytes(&c.seq)),
        g.upload(&u32_bytes(&c.pos)),
    ];
    let mut attn = Attention::new(&g.ctx, weights, cache, s, tokens + 3).unwrap();
    attn.prepare(&c.seq, &c.pos).unwrap();
    let (hi, lo) = run_kernels(g, &attn, &bufs, c, true);
    let (hi_only, _) = run_kernels(g, &attn, &bufs, c, false);
    assert!(hi == hi_only, "{}: hi differs when lo is 0", c.name);
    let half =
        |b: &[u8], i: usize| half_to_f64(u16::from_le_bytes([b[2 * i], b[2 * i + 1]]), weights);
    let u = if weights == DType::F16 {
        2f64.powi(-11)
    } else {
        2f64.powi(-8)
    };
    let mut worst = 0.0f64;
    for t in 0..tokens {
        let prefill = attn.tensor_cores() && c.run_len(t) >= PREFILL_MIN_TOKENS;
        let (round_q, tol) = if prefill {
            (Some(weights), u + 1e-4)
        } else {
            (None, 1e-4)
        };
        for h in 0..s.heads {
            let want = reference(c, &q, &k, &v, t, h, round_q);
            for (d, w) in want.iter().enumerate() {
                let i = (t * s.heads + h) * hd + d;
                let got = half(&hi, i) + half(&lo, i);
                let err = (got - w).abs();
                worst = worst.max(err);
                assert!(
                    err <= tol,
                    "{} ({weights} out, {cache} cache, {} kernel): token {t} (seq {} pos {}) head {h} dim {d}: got {got} want {w} (error {err:.2e} > {tol:.2e})",
                    c.name,
                    if prefill { "prefill" } else { "split-KV" },
                    c.seq[t],
                    c.pos[t]
                );
            }
        }
    }
    eprintln!(
        "{} ({weights} out, {cache} cache): worst error {worst:.2e}",
        c.name
    );
    worst
}

#[test]
fn prefill_matches_f64_reference() {
    let Some(g) = gpu("prefill_matches_f64_reference") else {
        return;
    };
    let mut rng = common::rng("prefill_matches_f64_reference");
    let mut cases = Vec::new();
    for n in [1, 15, 16, 17, 100, 1000] {
        // A prompt from position 0, and one after a cached prefix.
        let p0 = if n == 1000 { 0 } else { rng.gen_range(1..300) };
        let gqa = shape(8, 2, 128, 2, p0 + n + 5);
        cases.push(Case::new(
            format!("gqa prefill {n} from 0"),
            gqa,
            &[(1, 0, n)],
        ));
        let mqa = shape(6, 1, 64, 3, p0 + n + 5);
        cases.push(Case::new(
            format!("mqa prefill {n} from {p0}"),
            mqa,
            &[(2, p0, n)],
        ));
    }
    for n in [17, 100] {
        let generic = shape(4, 4, 80, 1, n + 40);
        cases.push(Case::new(
            format!("head_dim 80 prefill {n}"),
            generic,
            &[(0, 33, n)],
        ));
    }
    for c in &cases {
        for &(w, kv) in DTYPES {
            check(&g, c, w, kv, &mut rng);
        }
    }
}

#[test]
fn mixed_batch_matches_f64_reference() {
    let Some(g) = gpu("mixed_batch_matches_f64_reference") else {
        return;
    };
    let mut rng = common::rng("mixed_batch_matches_f64_reference");
    // Decode tokens, prompts and chunks of several sequences in one pass, in
    // no particular slot order; runs just under and over PREFILL_MIN_TOKENS.
    let runs = [
        (3, 4096, 1),
        (0, 0, 17),
        (5, 250, 100),
        (1, 0, 1),
        (2, 40, PREFILL_MIN_TOKENS),
        (4, 7, PREFILL_MIN_TOKENS - 1),
    ];
    let cases = [
        Case::new("mixed gqa", shape(8, 2, 128, 6, 4100), &runs),
        Case::new("mixed mqa", shape(6, 1, 64, 6, 4100), &runs),
        Case::new("mixed mha", shape(4, 4, 64, 6, 4100), &runs),
    ];
    for c in &cases {
        for &(w, kv) in DTYPES {
            check(&g, c, w, kv, &mut rng);
        }
    }
}

#[test]
fn long_decode_matches_f64_reference() {
    let Some(g) = gpu("long_decode_matches_f64_reference") else {
        return;
    };
    let mut rng = common::rng("long_decode_matches_f64_reference");
    let mut cases = Vec::new();
    for len in [1, 4097] {
        cases.push(Case::new(
            format!("gqa decode at {len}"),
            shape(8, 2, 128, 2, len),
            &[(1, len - 1, 1)],
        ));
        cases.push(Case::new(
            format!("mqa decode at {len}"),
            shape(6, 1, 64, 1, len),
            &[(0, len - 1, 1)],
        ));
    }
    // 32k positions, 16 heads over 4 KV heads, and a batch of two decodes.
    let long = shape(16, 4, 128, 2, 32768);
    cases.push(Case::new("gqa decode at 32768", long, &[(0, 32767, 1)]));
    cases.push(Case::new(
        "gqa decode at 32768 and 20000",
        long,
        &[(1, 19999, 1), (0, 32767, 1)],
    ));
    for c in &cases {
        for &(w, kv) in DTYPES {
            check(&g, c, w, kv, &mut rng);
        }
    }
}
