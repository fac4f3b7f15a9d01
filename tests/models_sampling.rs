//! `LlamaModel::forward_sample` on the host backend: the tokens are those
//! `sample_draw` picks from `forward`'s logits, sequences without a draw get
//! none, prompts split over passes change nothing, and greedy decoding gives
//! a sequence the same tokens alone or in any batch.

use std::path::Path;

use layer_streamer::llm::{sample_draw, LlamaModel, ModelOptions, TokenDraw};
use layer_streamer::{Device, Error, LayerStreamer, ModelIndex};
use rand::rngs::StdRng;
use rand::Rng;

mod common;

fn synth(dir: &Path, rng: &mut StdRng) {
    common::models::random_tiny(dir, rng);
}

fn load(dir: &Path, max_batch: usize, max_tokens: usize) -> (LayerStreamer, LlamaModel) {
    let index = ModelIndex::open(dir).unwrap();
    let s = LayerStreamer::builder(&index)
        .device(Device::Host)
        .file_dtype()
        .reader_threads(1)
        .build()
        .unwrap();
    let opts = ModelOptions {
        max_batch,
        max_len: 64,
        max_tokens,
        ..ModelOptions::default()
    };
    let model = LlamaModel::load(&s, opts).unwrap();
    (s, model)
}

fn random_draw(rng: &mut StdRng) -> TokenDraw {
    match rng.gen_range(0..4) {
        0 => TokenDraw::greedy(),
        1 => TokenDraw {
            temperature: rng.gen_range(0.3..2.0),
            top_k: rng.gen_range(0..40),
            top_p: 1.0,
            uniform: rng.gen(),
        },
        _ => TokenDraw {
            temperature: rng.gen_range(0.3..2.0),
            top_k: rng.gen_range(0..40),
            top_p: rng.gen_range(0.05..1.0),
            uniform: rng.gen(),
        },
    }
}

#[test]
fn forward_sample_picks_what_sample_draw_picks_from_the_logits() {
    let test = "forward_sample_picks_what_sample_draw_picks_from_the_logits";
    let mut rng = common::rng(test);
    let dir = common::tempdir();
    synth(dir.path(), &mut rng);
    let batch = 5;
    // Few tokens per pass: long prompts end in a later pass than short ones.
    let (mut s, mut model) = load(dir.path(), batch, 12);
    let vocab = model.config().vocab as u32;
    let prompts: Vec<Vec<u32>> = (0..batch)
        .map(|i| {
            let n = if i == 2 { 0 } else { rng.gen_range(1..20) };
            (0..n).map(|_| rng.gen_range(0..vocab)).collect()
        })
        .collect();
    let draws: Vec<Option<TokenDraw>> = (0..batch)
        .map(|i| (i != 3).then(|| random_draw(&mut rng)))
        .collect();
    let inputs: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
    let ids = model.forward_sample(&mut s, &inputs, &draws).unwrap();
    let lens = model.lengths().to_vec();
    model.reset();
    let logits = model.forward(&mut s, &inputs).unwrap();
    assert_eq!(model.lengths(), lens, "both advance every sequence alike");
    for i in 0..batch {
        let want = match (&draws[i], prompts[i].is_empty()) {
            (Some(d), false) => Some(sample_draw(&logits[i], d)),
            _ => None,
        };
        assert_eq!(ids[i], want, "sequence {i}: draw {:?}", draws[i]);
    }
    assert_eq!(ids[2], None, "no input, no token");
    assert_eq!(ids[3], None, "no draw, no token");
    // One draw per sequence, or an error that says so.
    let e = model
        .forward_sample(&mut s, &inputs, &draws[..batch - 1])
        .unwrap_err();
    assert!(
        matches!(&e, Error::Input(m) if m.contains("draws") && m.contains(&batch.to_string())),
        "{e}"
    );
}

/// Greedy decoding of `prompts` in slots `0..`, `steps` tokens each.
fn decode_greedy(
    s: &mut LayerStreamer,
    model: &mut LlamaModel,
    prompts: &[Vec<u32>],
    steps: usize,
) -> Vec<Vec<u32>> {
    model.reset();
    let greedy = vec![Some(TokenDraw::greedy()); prompts.len()];
    let inputs: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
    let mut last: Vec<u32> = model
        .forward_sample(s, &inputs, &greedy)
        .unwrap()
        .into_iter()
        .map(Option::unwrap)
        .collect();
    let mut out: Vec<Vec<u32>> = last.iter().map(|&t| vec![t]).collect();
    for _ in 1..steps {
        let step: Vec<[u32; 1]> = last.iter().map(|&t| [t]).collect();
        let inputs: Vec<&[u32]> = step.iter().map(|t| &t[..]).collect();
        let ids = model.forward_sample(s, &inputs, &greedy).unwrap();
        last = ids.into_iter().map(Option::unwrap).collect();
        for (o, &t) in out.iter_mut().zip(&last) {
            o.push(t);
        }
    }
    out
}

#[test]
fn greedy_tokens_are_the_same_alone_and_in_any_batch() {
    let test = "greedy_tokens_are_the_same_alone_and_in_any_batch";
    let mut rng = common::rng(test);
    let dir = common::tempdir();
    synth(dir.path(), &mut rng);
    let n = 6;
    let steps = 8;
    let (mut s, mut model) = load(dir.path(), n, 20);
    let vocab = model.config().vocab as u32;
    let prompts: Vec<Vec<u32>> = (0..n)
        .map(|_| {
            (0..rng.gen_range(1..30))
                .map(|_| rng.gen_range(0..vocab))
                .collect()
        })
        .collect();
    let alone: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| decode_greedy(&mut s, &mut model, std::slice::from_ref(p), steps).remove(0))
        .collect();
    for size in [2, 3, n] {
        let mut order: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            order.swap(i, rng.gen_range(0..=i));
        }
        for chunk in order.chunks(size) {
            let batch: Vec<Vec<u32>> = chunk.iter().map(|&i| prompts[i].clone()).collect();
            let got = decode_greedy(&mut s, &mut model, &batch, steps);
            for (&i, g) in chunk.iter().zip(&got) {
                assert_eq!(g, &alone[i], "sequence {i} in a batch of {}", chunk.len());
            }
        }
    }
}
