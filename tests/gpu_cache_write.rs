//! The KV-cache write (`Attention::write_cache`: biases, RoPE in both pair
//! layouts, the store in each cache dtype) against a host reference, on a
//! GPU; and nothing written outside the tokens' cache rows. Skips without a
//! driver unless `LS_REQUIRE_GPU=1`.

mod common;

use common::attention::*;
use layer_streamer::llm::attention::{Attention, AttentionShape};
use layer_streamer::DType;
use rand::Rng;

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
