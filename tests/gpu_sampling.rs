//! Token choice on the device (`kernels/sampling.cu`) on a GPU: against the
//! rule it implements and the host sampler on random rows, per-row rules
//! in one launch, run-to-run determinism, and through the CUDA forward pass
//! (`forward_sample`): greedy ids equal to the argmax of `forward`'s logits,
//! and a sequence's greedy tokens the same alone and in batches of other
//! sizes. Skips without a driver unless `LS_REQUIRE_GPU=1`.

use std::path::Path;

use layer_streamer::cuda::Context;
use layer_streamer::llm::sampling::argmax;
use layer_streamer::llm::{sample_draw, sample_on_device, LlamaModel, ModelOptions, TokenDraw};
use layer_streamer::{Device, LayerStreamer, ModelIndex};
use rand::rngs::StdRng;
use rand::Rng;

mod common;

/// The tokens `d` admits from `row` with their probabilities, as
/// sampling.cu defines them: logits at least the top_k-th largest, then the
/// largest logits whose mass first reaches top_p of that (ties kept).
fn admitted(row: &[f32], d: &TokenDraw) -> Vec<(usize, f64)> {
    let mut sorted: Vec<f32> = row.iter().copied().filter(|v| !v.is_nan()).collect();
    sorted.sort_by(|a, b| b.total_cmp(a));
    let max = sorted[0];
    let kth = if d.top_k > 0 && d.top_k < row.len() {
        sorted[d.top_k - 1]
    } else {
        f32::NEG_INFINITY
    };
    let w = |v: f32| (((v - max) / d.temperature) as f64).exp();
    let total: f64 = sorted.iter().filter(|&&v| v >= kth).map(|&v| w(v)).sum();
    let mut floor = kth;
    if d.top_p < 1.0 {
        let mut mass = 0.0;
        for &v in sorted.iter().filter(|&&v| v >= kth) {
            mass += w(v);
            if mass >= d.top_p.max(0.0) as f64 * total {
                floor = v;
                break;
            }
        }
    }
    let kept: Vec<usize> = (0..row.len())
        .filter(|&i| row[i] >= floor && w(row[i]) > 0.0)
        .collect();
    let sum: f64 = kept.iter().map(|&i| w(row[i])).sum();
    kept.into_iter().map(|i| (i, w(row[i]) / sum)).collect()
}

fn random_row(rng: &mut StdRng, vocab: usize) -> Vec<f32> {
    let scale = rng.gen_range(0.5..20.0);
    let mut row: Vec<f32> = (0..vocab).map(|_| rng.gen_range(-scale..scale)).collect();
    for _ in 0..rng.gen_range(0..3) {
        let at = rng.gen_range(0..vocab);
        row[at] = f32::NEG_INFINITY; // a masked token
    }
    let top = rng.gen_range(0..vocab);
    row[top] = scale + 1.0; // a finite maximum
    row
}

fn random_rule(rng: &mut StdRng, vocab: usize) -> TokenDraw {
    TokenDraw {
        temperature: rng.gen_range(0.2..2.5),
        top_k: if rng.gen_bool(0.5) {
            rng.gen_range(1..vocab.min(100) + 1)
        } else {
            0
        },
        top_p: if rng.gen_bool(0.6) {
            rng.gen_range(0.05..1.0)
        } else {
            1.0
        },
        uniform: 0.0,
    }
}

/// `n` stratified draws of `rule` on `row` on the device: with the draw
/// walking the kept mass in id order, token `i` comes back about `n * p_i`
/// times (within the strata's rounding).
fn check_rule(ctx: &Context, rng: &mut StdRng, row: &[f32], rule: TokenDraw, n: usize) {
    let vocab = row.len();
    let want = admitted(row, &rule);
    let draws: Vec<TokenDraw> = (0..n)
        .map(|j| TokenDraw {
            uniform: (j as f64 + 0.5) / n as f64,
            ..rule
        })
        .collect();
    let logits: Vec<f32> = (0..n).flat_map(|_| row.iter().copied()).collect();
    let ids = sample_on_device(ctx, &logits, vocab, &draws).unwrap();
    let mut counts = vec![0usize; vocab];
    for &id in &ids {
        counts[id as usize] += 1;
    }
    let mut in_set = vec![false; vocab];
    for &(i, p) in &want {
        in_set[i] = true;
        let expect = p * n as f64;
        let got = counts[i] as f64;
        assert!(
            (got - expect).abs() <= 2.0,
            "token {i} drawn {got} times of {n}, expected {expect:.2} ({rule:?}, vocab {vocab})"
        );
    }
    for (i, &c) in counts.iter().enumerate() {
        assert!(
            c == 0 || in_set[i],
            "token {i} is outside the admitted set ({rule:?})"
        );
    }
    // The host sampler admits the same tokens.
    for _ in 0..50 {
        let d = TokenDraw {
            uniform: rng.gen(),
            ..rule
        };
        let id = sample_draw(row, &d) as usize;
        assert!(
            in_set[id],
            "the host picked {id}, outside the set ({rule:?})"
        );
    }
}

#[test]
fn device_sampling_follows_the_rule_and_the_host_sampler() {
    let test = "device_sampling_follows_the_rule_and_the_host_sampler";
    let Some(ctx) = common::gpu(test) else {
        return;
    };
    let mut rng = common::rng(test);
    for round in 0..24 {
        let vocab = if round == 0 {
            152_064
        } else {
            rng.gen_range(2..3000)
        };
        let row = random_row(&mut rng, vocab);
        let rule = random_rule(&mut rng, vocab);
        let n = if vocab > 10_000 { 256 } else { 2000 };
        check_rule(&ctx, &mut rng, &row, rule, n);
    }
}

#[test]
fn device_greedy_is_the_host_argmax_ties_to_the_lowest_id() {
    let test = "device_greedy_is_the_host_argmax_ties_to_the_lowest_id";
    let Some(ctx) = common::gpu(test) else {
        return;
    };
    let mut rng = common::rng(test);
    let vocab = rng.gen_range(1000..200_000);
    let rows = 40;
    let mut logits = Vec::with_capacity(rows * vocab);
    for r in 0..rows {
        let mut row: Vec<f32> = (0..vocab).map(|_| rng.gen_range(-8.0..8.0)).collect();
        let best = argmax(&row) as usize;
        for _ in 0..r % 4 {
            let at = rng.gen_range(0..vocab);
            row[at] = row[best]; // ties, before and after the first maximum
        }
        if r % 5 == 1 {
            row[rng.gen_range(0..vocab)] = f32::NAN;
        }
        if r == 7 {
            row.iter_mut().for_each(|v| *v = f32::NEG_INFINITY);
        }
        logits.extend(row);
    }
    let draws = vec![TokenDraw::greedy(); rows];
    let ids = sample_on_device(&ctx, &logits, vocab, &draws).unwrap();
    for (r, row) in logits.chunks_exact(vocab).enumerate() {
        assert_eq!(ids[r], argmax(row), "row {r}");
    }
}

#[test]
fn each_row_keeps_its_own_rule_and_runs_repeat() {
    let test = "each_row_keeps_its_own_rule_and_runs_repeat";
    let Some(ctx) = common::gpu(test) else {
        return;
    };
    let mut rng = common::rng(test);
    let vocab = rng.gen_range(500..40_000);
    let rows = 64;
    let logits: Vec<f32> = (0..rows)
        .flat_map(|_| random_row(&mut rng, vocab))
        .collect();
    let draws: Vec<TokenDraw> = (0..rows)
        .map(|r| {
            if r % 3 == 0 {
                TokenDraw::greedy()
            } else {
                TokenDraw {
                    uniform: rng.gen(),
                    ..random_rule(&mut rng, vocab)
                }
            }
        })
        .collect();
    let together = sample_on_device(&ctx, &logits, vocab, &draws).unwrap();
    let again = sample_on_device(&ctx, &logits, vocab, &draws).unwrap();
    assert_eq!(
        together, again,
        "the same rows and draws give the same tokens"
    );
    for (r, (row, d)) in logits.chunks_exact(vocab).zip(&draws).enumerate() {
        let alone = sample_on_device(&ctx, row, vocab, std::slice::from_ref(d)).unwrap();
        assert_eq!(alone[0], together[r], "row {r} alone and among {rows}");
        assert!(
            d.is_greedy()
                || admitted(row, d)
                    .iter()
                    .any(|&(i, _)| i == alone[0] as usize)
        );
    }
}

fn cuda_model(dir: &Path, max_batch: usize, max_tokens: usize) -> (LayerStreamer, LlamaModel) {
    let index = ModelIndex::open(dir).unwrap();
    let s = LayerStreamer::builder(&index)
        .device(Device::Cuda(0))
        .dtype(LlamaModel::cuda_dtype(&index))
        .build()
        .unwrap();
    let opts = ModelOptions {
        max_batch,
        max_len: 96,
        max_tokens,
        ..ModelOptions::default()
    };
    let model = LlamaModel::load(&s, opts).unwrap();
    (s, model)
}

/// Decodes `prompts` in slots `0..` with `draws[i]`'s rule and the uniforms
/// of generator `seeds[i]`, `steps` tokens each.
fn decode(
    s: &mut LayerStreamer,
    model: &mut LlamaModel,
    prompts: &[Vec<u32>],
    rules: &[TokenDraw],
    seeds: &[u64],
    steps: usize,
) -> Vec<Vec<u32>> {
    use rand::SeedableRng;
    model.reset();
    let mut gens: Vec<StdRng> = seeds.iter().map(|&s| StdRng::seed_from_u64(s)).collect();
    let next = |gens: &mut [StdRng]| -> Vec<Option<TokenDraw>> {
        rules
            .iter()
            .zip(gens.iter_mut())
            .map(|(r, g)| {
                Some(TokenDraw {
                    uniform: g.gen(),
                    ..*r
                })
            })
            .collect()
    };
    let mut out: Vec<Vec<u32>> = vec![Vec::new(); prompts.len()];
    let mut inputs: Vec<Vec<u32>> = prompts.to_vec();
    for _ in 0..steps {
        let refs: Vec<&[u32]> = inputs.iter().map(Vec::as_slice).collect();
        let draws = next(&mut gens);
        let ids = model.forward_sample(s, &refs, &draws).unwrap();
        for (i, id) in ids.into_iter().enumerate() {
            let id = id.expect("every sequence has input and a draw");
            out[i].push(id);
            inputs[i] = vec![id];
        }
    }
    out
}

fn synth(dir: &Path, rng: &mut StdRng) {
    common::models::random_tiny(dir, rng);
}

#[test]
fn cuda_forward_sample_greedy_alone_equals_batched() {
    let test = "cuda_forward_sample_greedy_alone_equals_batched";
    if common::gpu(test).is_none() {
        return;
    }
    let mut rng = common::rng(test);
    let dir = common::tempdir();
    synth(dir.path(), &mut rng);
    let n = 8;
    let steps = 10;
    let (mut s, mut model) = cuda_model(dir.path(), n, 64);
    let vocab = model.config().vocab as u32;
    let prompts: Vec<Vec<u32>> = (0..n)
        .map(|_| {
            (0..rng.gen_range(1..40))
                .map(|_| rng.gen_range(0..vocab))
                .collect()
        })
        .collect();
    // Greedy ids from the device are the argmax of the logits forward gives.
    let refs: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
    let logits = model.forward(&mut s, &refs).unwrap();
    model.reset();
    let greedy = vec![Some(TokenDraw::greedy()); n];
    let ids = model.forward_sample(&mut s, &refs, &greedy).unwrap();
    for i in 0..n {
        assert_eq!(ids[i], Some(argmax(&logits[i])), "sequence {i}");
    }
    let rules = vec![TokenDraw::greedy(); n];
    let seeds = vec![0u64; n];
    let alone: Vec<Vec<u32>> = (0..n)
        .map(|i| {
            let p = std::slice::from_ref(&prompts[i]);
            decode(&mut s, &mut model, p, &rules[..1], &seeds[..1], steps).remove(0)
        })
        .collect();
    for size in [2, 3, 5, n] {
        let first = rng.gen_range(0..n);
        let chosen: Vec<usize> = (0..size).map(|j| (first + j) % n).collect();
        let batch: Vec<Vec<u32>> = chosen.iter().map(|&i| prompts[i].clone()).collect();
        let got = decode(
            &mut s,
            &mut model,
            &batch,
            &rules[..size],
            &seeds[..size],
            steps,
        );
        for (&i, g) in chosen.iter().zip(&got) {
            assert_eq!(g, &alone[i], "sequence {i} alone and in a batch of {size}");
        }
    }
}

#[test]
fn cuda_forward_sample_repeats_with_the_same_seeds() {
    let test = "cuda_forward_sample_repeats_with_the_same_seeds";
    if common::gpu(test).is_none() {
        return;
    }
    let mut rng = common::rng(test);
    let dir = common::tempdir();
    synth(dir.path(), &mut rng);
    let n = 6;
    let (mut s, mut model) = cuda_model(dir.path(), n, 64);
    let vocab = model.config().vocab;
    let prompts: Vec<Vec<u32>> = (0..n)
        .map(|_| {
            (0..rng.gen_range(1..30))
                .map(|_| rng.gen_range(0..vocab as u32))
                .collect()
        })
        .collect();
    let rules: Vec<TokenDraw> = (0..n).map(|_| random_rule(&mut rng, vocab)).collect();
    let seeds: Vec<u64> = (0..n).map(|_| rng.gen()).collect();
    let a = decode(&mut s, &mut model, &prompts, &rules, &seeds, 12);
    let b = decode(&mut s, &mut model, &prompts, &rules, &seeds, 12);
    assert_eq!(a, b, "the same seeds and batch give the same tokens");
    assert!(a.iter().flatten().all(|&t| (t as usize) < vocab));
}
