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

use half::{bf16, f16};
use layer_streamer::cuda::{Context, DeviceBuffer, Stream};
use layer_streamer::llm::attention::{Attention, AttentionShape, PREFILL_MIN_TOKENS};
use layer_streamer::DType;
use rand::Rng;

/// Byte written around every output so stray writes show.
const SENTINEL: u8 = 0xAB;
/// Spare bytes after every output.
const SLACK: usize = 64;

struct Gpu {
    ctx: Context,
    stream: Stream,
}

fn gpu(test: &str) -> Option<Gpu> {
    let ctx = common::gpu(test)?;
    let stream = Stream::new(&ctx).unwrap();
    Some(Gpu { ctx, stream })
}

impl Gpu {
    fn upload(&self, bytes: &[u8]) -> DeviceBuffer {
        let buf = DeviceBuffer::alloc(&self.ctx, bytes.len().max(4)).unwrap();
        buf.copy_from_host(0, bytes).unwrap();
        buf
    }

    fn read(&self, buf: &DeviceBuffer) -> Vec<u8> {
        self.stream.synchronize().unwrap();
        let mut host = vec![0u8; buf.len()];
        buf.copy_to_host(0, &mut host).unwrap();
        host
    }
}

fn u32_bytes(v: &[u32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// One pass: tokens at `(seq[t], pos[t])` over a cache of `shape`.
struct Case {
    name: String,
    shape: AttentionShape,
    seq: Vec<u32>,
    pos: Vec<u32>,
}

impl Case {
    fn new(name: impl Into<String>, shape: AttentionShape, runs: &[(u32, usize, usize)]) -> Case {
        let (mut seq, mut pos) = (Vec::new(), Vec::new());
        for &(s, p0, n) in runs {
            seq.extend(std::iter::repeat(s).take(n));
            pos.extend((p0..p0 + n).map(|p| p as u32));
        }
        Case {
            name: name.into(),
            shape,
            seq,
            pos,
        }
    }

    /// Length of the run of one sequence's tokens that token `t` is in.
    fn run_len(&self, t: usize) -> usize {
        let s = self.seq[t];
        let before = self.seq[..t].iter().rev().take_while(|&&x| x == s).count();
        let after = self.seq[t..].iter().take_while(|&&x| x == s).count();
        before + after
    }
}

fn shape(
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    seqs: usize,
    len: usize,
) -> AttentionShape {
    AttentionShape {
        heads,
        kv_heads,
        head_dim,
        max_seqs: seqs,
        max_len: len,
    }
}

/// Random values in [-1, 1] rounded to `dtype`: (values, stored bytes).
fn random_cache(rng: &mut impl Rng, n: usize, dtype: DType) -> (Vec<f32>, Vec<u8>) {
    let mut vals = Vec::with_capacity(n);
    let mut bytes = Vec::with_capacity(n * dtype.size());
    for _ in 0..n {
        let x: f32 = rng.gen_range(-1.0..1.0);
        match dtype {
            DType::BF16 => {
                let h = bf16::from_f32(x);
                vals.push(h.to_f32());
                bytes.extend(h.to_bits().to_le_bytes());
            }
            DType::F16 => {
                let h = f16::from_f32(x);
                vals.push(h.to_f32());
                bytes.extend(h.to_bits().to_le_bytes());
            }
            _ => {
                vals.push(x);
                bytes.extend(x.to_le_bytes());
            }
        }
    }
    (vals, bytes)
}

fn round_to(x: f32, dtype: Option<DType>) -> f64 {
    match dtype {
        Some(DType::BF16) => bf16::from_f32(x).to_f64(),
        Some(DType::F16) => f16::from_f32(x).to_f64(),
        _ => x as f64,
    }
}

fn half_to_f64(bits: u16, dtype: DType) -> f64 {
    if dtype == DType::F16 {
        f16::from_bits(bits).to_f64()
    } else {
        bf16::from_bits(bits).to_f64()
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

/// Output and cache dtypes: 16-bit caches of each weight dtype, and f32.
const DTYPES: &[(DType, DType)] = &[
    (DType::BF16, DType::BF16),
    (DType::F16, DType::F16),
    (DType::BF16, DType::F32),
];

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

/// Adds the bias to `x` and rotates it by (cos, sin) per pair, neox halves
/// or interleaved neighbours; `bias` holds 16-bit values of `w`.
fn rope_ref(x: &[f32], bias: &[u16], w: DType, cs: (&[f32], &[f32]), il: bool) -> Vec<f64> {
    let half = x.len() / 2;
    let mut out = vec![0.0; x.len()];
    for j in 0..half {
        let (ia, ib) = if il {
            (2 * j, 2 * j + 1)
        } else {
            (j, j + half)
        };
        let a = x[ia] as f64 + half_to_f64(bias[ia], w);
        let b = x[ib] as f64 + half_to_f64(bias[ib], w);
        let (c, s) = (cs.0[j] as f64, cs.1[j] as f64);
        out[ia] = a * c - b * s;
        out[ib] = b * c + a * s;
    }
    out
}

/// Host inputs of the cache write: q, k, v, their biases, the RoPE tables.
struct WriteInputs {
    qkv: [Vec<f32>; 3],
    bias: [Vec<u16>; 3],
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl WriteInputs {
    fn random(rng: &mut impl Rng, s: &AttentionShape, tokens: usize, w: DType) -> WriteInputs {
        let mut f = |n: usize| -> Vec<f32> { (0..n).map(|_| rng.gen_range(-2.0..2.0)).collect() };
        let (nq, nkv) = (s.heads * s.head_dim, s.kv_heads * s.head_dim);
        let qkv = [f(tokens * nq), f(tokens * nkv), f(tokens * nkv)];
        let angles = f(s.max_len * s.head_dim / 2);
        let mut bias = |n: usize| -> Vec<u16> {
            let b = random_cache(rng, n, w).1;
            b.chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
                .collect()
        };
        WriteInputs {
            bias: [bias(nq), bias(nkv), bias(nkv)],
            qkv,
            cos: angles.iter().map(|a| a.cos()).collect(),
            sin: angles.iter().map(|a| a.sin()).collect(),
        }
    }
}

/// Runs the cache write of `c` with inputs `x` into sentinel-filled caches;
/// returns q after it and both caches' bytes.
fn run_cache_write(
    g: &Gpu,
    attn: &Attention,
    c: &Case,
    x: &WriteInputs,
    cache: DType,
    il: bool,
) -> (Vec<f32>, [Vec<u8>; 2]) {
    let s = &c.shape;
    let u16b = |v: &[u16]| -> Vec<u8> { v.iter().flat_map(|x| x.to_le_bytes()).collect() };
    let cache_bytes = s.max_seqs * s.kv_heads * s.max_len * s.head_dim * cache.size();
    let d = [
        g.upload(&f32_bytes(&x.qkv[0])),
        g.upload(&f32_bytes(&x.qkv[1])),
        g.upload(&f32_bytes(&x.qkv[2])),
        g.upload(&u16b(&x.bias[0])),
        g.upload(&u16b(&x.bias[1])),
        g.upload(&u16b(&x.bias[2])),
        g.upload(&f32_bytes(&x.cos)),
        g.upload(&f32_bytes(&x.sin)),
        g.upload(&u32_bytes(&c.seq)),
        g.upload(&u32_bytes(&c.pos)),
        g.upload(&vec![SENTINEL; cache_bytes]),
        g.upload(&vec![SENTINEL; cache_bytes]),
    ];
    let p = |i: usize| d[i].ptr();
    // SAFETY: every buffer holds what write_cache documents for the case's
    // tokens and shape, and lives past the reads, which synchronize.
    unsafe {
        let (b, rope, caches) = ([p(3), p(4), p(5)], (p(6), p(7)), (p(10), p(11)));
        attn.write_cache(
            &g.stream,
            p(0),
            p(1),
            p(2),
            b,
            rope,
            p(8),
            p(9),
            caches,
            c.seq.len(),
            il,
        )
    }
    .unwrap();
    let q = g
        .read(&d[0])
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    (q, [g.read(&d[10]), g.read(&d[11])])
}

/// Element `e` of a cache of `dtype`.
fn cache_value(bytes: &[u8], e: usize, dtype: DType) -> f64 {
    if dtype == DType::F32 {
        let b = &bytes[e * 4..e * 4 + 4];
        f32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64
    } else {
        half_to_f64(u16::from_le_bytes([bytes[e * 2], bytes[e * 2 + 1]]), dtype)
    }
}

/// Checks q and the caches after the cache write against [`rope_ref`], and
/// that no cache element outside the tokens' rows was written.
fn check_cache_write(
    c: &Case,
    x: &WriteInputs,
    out: &(Vec<f32>, [Vec<u8>; 2]),
    w: DType,
    cache: DType,
    il: bool,
) {
    let s = &c.shape;
    let (hd, half) = (s.head_dim, s.head_dim / 2);
    let what = format!("{w} out, {cache} cache, interleaved {il}");
    // The kernel rounds its f32 result to the cache dtype (unit roundoff u).
    let u = match cache {
        DType::F32 => 1e-6,
        DType::F16 => 2f64.powi(-11),
        _ => 2f64.powi(-8),
    };
    let mut written = vec![false; out.1[0].len() / cache.size()];
    let (ones, zeros) = (vec![1.0f32; half], vec![0.0f32; half]);
    for (t, &p) in c.pos.iter().enumerate() {
        let p = p as usize;
        let cs = (
            &x.cos[p * half..(p + 1) * half],
            &x.sin[p * half..(p + 1) * half],
        );
        for h in 0..s.heads {
            let r = (t * s.heads + h) * hd;
            let want = rope_ref(
                &x.qkv[0][r..r + hd],
                &x.bias[0][h * hd..(h + 1) * hd],
                w,
                cs,
                il,
            );
            for (i, wv) in want.iter().enumerate() {
                let got = out.0[r + i] as f64;
                assert!(
                    (got - wv).abs() <= 1e-5 * (1.0 + wv.abs()),
                    "{what}: q token {t} head {h} dim {i}: {got} vs {wv}"
                );
            }
        }
        for kvh in 0..s.kv_heads {
            let r = (t * s.kv_heads + kvh) * hd;
            let row = ((c.seq[t] as usize * s.kv_heads + kvh) * s.max_len + p) * hd;
            let b = |i: usize| &x.bias[i][kvh * hd..(kvh + 1) * hd];
            // v takes its bias only: a rotation by angle 0.
            let wants = [
                rope_ref(&x.qkv[1][r..r + hd], b(1), w, cs, il),
                rope_ref(&x.qkv[2][r..r + hd], b(2), w, (&ones, &zeros), il),
            ];
            for (which, want) in wants.iter().enumerate() {
                for (i, wv) in want.iter().enumerate() {
                    written[row + i] = true;
                    let got = cache_value(&out.1[which], row + i, cache);
                    assert!(
                        (got - wv).abs() <= u * wv.abs() + 1e-5,
                        "{what}: {} cache token {t} kv head {kvh} dim {i}: {got} vs {wv}",
                        ["k", "v"][which]
                    );
                }
            }
        }
    }
    for (which, bytes) in out.1.iter().enumerate() {
        let es = cache.size();
        let stray = written
            .iter()
            .enumerate()
            .find(|(e, &ok)| !ok && bytes[e * es..(e + 1) * es].iter().any(|&b| b != SENTINEL));
        assert!(
            stray.is_none(),
            "{what}: {} cache element {:?} written but no token is there",
            ["k", "v"][which],
            stray
        );
    }
}

#[test]
fn cache_write_adds_biases_rotates_and_stores_in_the_cache_dtype() {
    let name = "cache_write_adds_biases_rotates_and_stores_in_the_cache_dtype";
    let Some(g) = gpu(name) else {
        return;
    };
    let mut rng = common::rng(name);
    let s = shape(4, 2, 64, 3, 50);
    let c = Case::new("cache write", s, &[(2, 10, 5), (0, 0, 3), (1, 49, 1)]);
    for &(w, cache) in DTYPES {
        let attn = Attention::new(&g.ctx, w, cache, s, c.seq.len()).unwrap();
        for il in [false, true] {
            let x = WriteInputs::random(&mut rng, &s, c.seq.len(), w);
            let out = run_cache_write(&g, &attn, &c, &x, cache, il);
            check_cache_write(&c, &x, &out, w, cache, il);
        }
    }
}
