//! The CPU share's kernels against an f64 reference: every stored type, every
//! instruction set this CPU has (each forced in turn), odd sizes, 1 to 9
//! tokens, on random data.

mod common;
#[path = "common/quant_blocks.rs"]
mod quant_blocks;

use layer_streamer::cpu::{CpuPool, CpuPoolOptions, HostMatrix, Isa};
use layer_streamer::quant::{self, QuantType};
use layer_streamer::Error;
use rand::rngs::StdRng;
use rand::Rng;

/// Random `rows × k` weights of `ty` as stored, and their values as the host
/// dequantizer decodes them.
fn weights(rng: &mut StdRng, ty: QuantType, rows: usize, k: usize) -> (Vec<u8>, Vec<f32>) {
    let scale: f32 = rng.gen_range(0.01..4.0);
    let src: Vec<f32> = (0..rows * k)
        .map(|_| rng.gen_range(-scale..scale))
        .collect();
    let bytes = quant::quantize(ty, &src).expect("quantize");
    let mut vals = vec![0f32; rows * k];
    quant::dequantize_f32(ty, &bytes, &mut vals).expect("dequantize");
    (bytes, vals)
}

/// Checks `pool.matmul` on one shape against the f64 sum. The bound is that
/// of f32 summation in lanes of at least eight: (k/8 + 40) roundings of the
/// sum of magnitudes; one element missed or read twice is far above it.
fn check(pool: &CpuPool, rng: &mut StdRng, ty: QuantType, rows: usize, k: usize, tokens: usize) {
    let (bytes, vals) = weights(rng, ty, rows, k);
    check_weights(pool, rng, ty, (&bytes, &vals), rows, k, tokens);
}

/// [`check`] on given weights: `bytes` as stored, `vals` as decoded.
fn check_weights(
    pool: &CpuPool,
    rng: &mut StdRng,
    ty: QuantType,
    (bytes, vals): (&[u8], &[f32]),
    rows: usize,
    k: usize,
    tokens: usize,
) {
    let x: Vec<f32> = (0..tokens * k).map(|_| rng.gen_range(-2.0..2.0)).collect();
    let w = HostMatrix::new(ty, bytes, rows, k).expect("matrix");
    let mut y = vec![f32::NAN; tokens * rows];
    pool.matmul(&w, &x, tokens, &mut y).expect("matmul");
    let bound_ulps = (k / 8 + 40) as f64 * f32::EPSILON as f64;
    let bits = pool.isa().activation_bits(ty);
    for t in 0..tokens {
        let xt = &as_read(&x[t * k..(t + 1) * k], bits)[..];
        for r in 0..rows {
            let wr = &vals[r * k..(r + 1) * k];
            let exact: f64 = wr.iter().zip(xt).map(|(&a, &b)| a as f64 * b as f64).sum();
            let mag: f64 = wr
                .iter()
                .zip(xt)
                .map(|(&a, &b)| (a as f64 * b as f64).abs())
                .sum();
            let got = y[t * rows + r] as f64;
            assert!(
                (got - exact).abs() <= bound_ulps * mag + 1e-30,
                "{ty} on {} rows={rows} k={k} tokens={tokens}: y[{t},{r}] = {got}, f64 sum {exact} (Σ|w·x| {mag})",
                pool.isa()
            );
        }
    }
}

/// One token's activations `x` as a kernel that rounds them to `bits`-bit
/// codes reads them ([`Isa::activation_bits`]): each 256 elements share the
/// step `largest / (2^(bits-1) − 1)` and take the nearest code (ties to
/// even); `x` itself where `bits` is `None`. Against these the kernel's sums
/// are held to the f32 bound, so the rounding is exactly the documented one.
fn as_read(x: &[f32], bits: Option<u32>) -> Vec<f32> {
    let Some(bits) = bits else {
        return x.to_vec();
    };
    let top = ((1u32 << (bits - 1)) - 1) as f32;
    x.chunks(256)
        .flat_map(|b| {
            let big = b.iter().fold(0f32, |m, v| m.max(v.abs()));
            let (step, inv) = (big / top, top / big);
            b.iter().map(move |v| (v * inv).round_ties_even() * step)
        })
        .collect()
}

fn pools() -> Vec<CpuPool> {
    let mut out = Vec::new();
    for isa in Isa::ALL {
        if !isa.is_available() {
            eprintln!("{isa}: not on this CPU, not tested here");
            continue;
        }
        let opts = CpuPoolOptions {
            threads: Some(3),
            ..Default::default()
        };
        out.push(CpuPool::new(&opts).unwrap().with_isa(isa).unwrap());
    }
    out
}

#[test]
fn plain_types_match_f64_on_every_isa() {
    let mut rng = common::rng("plain_types_match_f64_on_every_isa");
    for pool in pools() {
        for ty in [QuantType::BF16, QuantType::F16, QuantType::F32] {
            for k in [1, 7, 8, 15, 16, 17, 31, 33, 47, 100, 257, 1031] {
                let rows = rng.gen_range(1..40);
                let tokens = rng.gen_range(1..10);
                check(&pool, &mut rng, ty, rows, k, tokens);
            }
            let tokens = rng.gen_range(1..10);
            let k = 4096 + 8 * rng.gen_range(0..64);
            check(&pool, &mut rng, ty, 67, k, tokens);
        }
    }
}

#[test]
fn block_types_match_f64_on_every_isa() {
    let mut rng = common::rng("block_types_match_f64_on_every_isa");
    let types = [
        QuantType::Q8_0,
        QuantType::Q4_0,
        QuantType::Q4_1,
        QuantType::Q5_0,
        QuantType::Q5_1,
        QuantType::Q4_K,
        QuantType::Q5_K,
        QuantType::Q6_K,
    ];
    for pool in pools() {
        for ty in types {
            let be = ty.block_elems() as usize;
            for blocks in [1, 3, 9, 17] {
                let rows = rng.gen_range(1..24);
                let tokens = rng.gen_range(1..10);
                check(&pool, &mut rng, ty, rows, blocks * be, tokens);
            }
        }
    }
}

#[test]
fn every_token_count_uses_the_right_rows() {
    // Distinct tokens in groups of 1..=4 and a remainder: a token row read
    // for the wrong output shows up as a wrong value.
    let mut rng = common::rng("every_token_count_uses_the_right_rows");
    for pool in pools() {
        for tokens in 1..=9 {
            check(&pool, &mut rng, QuantType::BF16, 13, 40, tokens);
            // Rows longer than the stretch several tokens share at a time.
            check(&pool, &mut rng, QuantType::BF16, 5, 1100, tokens);
            // No inputs: every output is an empty sum.
            let m = HostMatrix::new(QuantType::BF16, &[], 3, 0).unwrap();
            let mut y = vec![f32::NAN; 3 * tokens];
            pool.matmul(&m, &[], tokens, &mut y).unwrap();
            assert!(y.iter().all(|&v| v == 0.0), "{y:?}");
        }
    }
}

#[test]
fn bad_shapes_and_options_are_errors() {
    let w = vec![0u8; 2 * 3 * 2];
    let e = HostMatrix::new(QuantType::BF16, &w, 2, 4).unwrap_err();
    assert!(
        matches!(&e, Error::Input(m) if m.contains("takes 16 bytes, 12 were given")),
        "{e}"
    );
    let e = HostMatrix::new(QuantType::Q4_K, &[0u8; 144], 1, 100).unwrap_err();
    assert!(
        matches!(&e, Error::Input(m) if m.contains("not a multiple of Q4_K")),
        "{e}"
    );

    let pool = CpuPool::new(&CpuPoolOptions {
        threads: Some(2),
        ..Default::default()
    })
    .unwrap();
    let m = HostMatrix::new(QuantType::BF16, &w, 2, 3).unwrap();
    let mut y = [0f32; 4];
    let e = pool.matmul(&m, &[0.0; 5], 2, &mut y).unwrap_err();
    assert!(
        matches!(&e, Error::Input(m) if m.contains("x has 5 floats")),
        "{e}"
    );
    let e = pool.matmul(&m, &[0.0; 6], 2, &mut y[..3]).unwrap_err();
    assert!(
        matches!(&e, Error::Input(m) if m.contains("y has room for 3")),
        "{e}"
    );

    let all: Vec<usize> = (0..4096).collect();
    let e = CpuPool::new(&CpuPoolOptions {
        exclude: all,
        ..Default::default()
    })
    .unwrap_err();
    assert!(
        matches!(&e, Error::Config(m) if m.contains("is excluded")),
        "{e}"
    );
    if !Isa::Avx512.is_available() {
        let e = pool.with_isa(Isa::Avx512).unwrap_err();
        assert!(
            e.to_string().contains("lacks the features of the avx512"),
            "{e}"
        );
    }
}

#[test]
fn workers_keep_off_excluded_cpus() {
    let pool = CpuPool::new(&CpuPoolOptions::default()).unwrap();
    let first = pool.cpus()[0];
    if pool.cpus().len() < 2 {
        eprintln!("one CPU: nothing to exclude");
        return;
    }
    let pool = CpuPool::new(&CpuPoolOptions {
        exclude: vec![first],
        ..Default::default()
    })
    .unwrap();
    assert!(!pool.cpus().contains(&first));
    let seen: Vec<i32> = pool.install(|| {
        use rayon::prelude::*;
        (0..64)
            .into_par_iter()
            // SAFETY: sched_getcpu has no preconditions.
            .map(|_| unsafe { libc::sched_getcpu() })
            .collect()
    });
    assert!(
        seen.iter().all(|&c| c >= 0 && c as usize != first),
        "{seen:?} ran on {first}"
    );
}

#[test]
fn raw_blocks_with_extreme_scales_match_f64_for_every_token_count() {
    // Random payloads (every nibble, 6-bit scale and min) under extreme f16
    // scales; rows that are not a multiple of the row block; rows of several
    // blocks, for K-quants longer than the stretch several tokens share.
    let mut rng = common::rng("raw_blocks_with_extreme_scales_match_f64_for_every_token_count");
    let types = [
        QuantType::Q8_0,
        QuantType::Q4_0,
        QuantType::Q4_1,
        QuantType::Q4_K,
        QuantType::Q6_K,
        QuantType::Q5_K,
    ];
    for pool in pools() {
        for ty in types {
            let be = ty.block_elems() as usize;
            for tokens in 1..=9 {
                let blocks = if be == 256 {
                    rng.gen_range(1..6)
                } else {
                    rng.gen_range(1..40)
                };
                let rows = 16 * rng.gen_range(0..3) + rng.gen_range(1..16);
                let k = blocks * be;
                let bytes = quant_blocks::random_blocks(ty, rows * blocks, &mut rng);
                let mut vals = vec![0f32; rows * k];
                quant::dequantize_f32(ty, &bytes, &mut vals).expect("dequantize");
                check_weights(&pool, &mut rng, ty, (&bytes, &vals), rows, k, tokens);
            }
        }
    }
}

#[test]
fn a_non_finite_activation_makes_its_tokens_sums_non_finite() {
    // The 16-bit activation path rounds a block to codes with one step: a NaN
    // or an infinity must not vanish into a code, on any path.
    let mut rng = common::rng("a_non_finite_activation_makes_its_tokens_sums_non_finite");
    for pool in pools() {
        for ty in [
            QuantType::Q4_K,
            QuantType::Q6_K,
            QuantType::Q8_0,
            QuantType::BF16,
        ] {
            for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                let (rows, k, tokens) = (rng.gen_range(1..20), 512, 3);
                let (bytes, _) = weights(&mut rng, ty, rows, k);
                let mut x: Vec<f32> = (0..tokens * k).map(|_| rng.gen_range(-2.0..2.0)).collect();
                let t_bad = rng.gen_range(0..tokens);
                x[t_bad * k + rng.gen_range(0..k)] = bad;
                let w = HostMatrix::new(ty, &bytes, rows, k).expect("matrix");
                let mut y = vec![0f32; tokens * rows];
                pool.matmul(&w, &x, tokens, &mut y).expect("matmul");
                for (i, v) in y.iter().enumerate() {
                    let what = format!(
                        "{ty} on {} with {bad}: y[{}, {}] = {v}",
                        pool.isa(),
                        i / rows,
                        i % rows
                    );
                    assert_eq!(v.is_finite(), i / rows != t_bad, "{what}");
                }
            }
        }
    }
}

#[test]
fn activations_near_the_bottom_of_f32_multiply_like_the_others() {
    // A block whose largest activation is tiny would make the 16-bit path's
    // step times a weight block's scale subnormal (a 1.7 % error was seen):
    // such products are multiplied in f32, on every path.
    let mut rng = common::rng("activations_near_the_bottom_of_f32_multiply_like_the_others");
    for pool in pools() {
        for ty in [QuantType::Q4_K, QuantType::Q6_K, QuantType::Q8_0] {
            let (rows, k) = (rng.gen_range(1..20), 512);
            let (bytes, vals) = weights(&mut rng, ty, rows, k);
            let scale = 1e-36 * rng.gen_range(0.5..2.0f32);
            let x: Vec<f32> = (0..k).map(|_| rng.gen_range(-1.0..1.0) * scale).collect();
            let w = HostMatrix::new(ty, &bytes, rows, k).expect("matrix");
            let mut y = vec![f32::NAN; rows];
            pool.matmul(&w, &x, 1, &mut y).expect("matmul");
            for r in 0..rows {
                let wr = &vals[r * k..(r + 1) * k];
                let exact: f64 = wr.iter().zip(&x).map(|(&a, &b)| a as f64 * b as f64).sum();
                let mag: f64 = wr
                    .iter()
                    .zip(&x)
                    .map(|(&a, &b)| (a as f64 * b as f64).abs())
                    .sum();
                // f32 sums (k/8 + 40 roundings of the magnitudes), and f32's
                // subnormal spacing where the products fall below it.
                let bound = mag * (k / 8 + 40) as f64 * f32::EPSILON as f64 + 1e-44 * k as f64;
                let got = y[r] as f64;
                assert!(
                    (got - exact).abs() <= bound,
                    "{ty} on {}: y[{r}] = {got:e}, f64 {exact:e}",
                    pool.isa()
                );
            }
        }
    }
}
