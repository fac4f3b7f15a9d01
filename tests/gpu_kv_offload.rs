//! `ModelOptions::kv_offload` on a GPU: the KV cache in pinned host RAM,
//! streamed through two device slots, gives the very bits of the resident
//! cache (the same kernels read the same values at the same strides): the
//! logits of a batch of mixed prompt lengths, prefilled in chunks and then
//! decoded step by step with sequences dropping out, then a new prompt in a
//! reset sequence's slot next to decode steps of the others; and the tokens of
//! greedy and sampled generation; in both precisions, both 16-bit weight types
//! and models of 1, 3 and 5 layers (one slot, and a ring recycled in a pass).
//! Also checks that a pass copies exactly the cached prefixes in and the new
//! positions out, and that a host cache beyond `MemAvailable` is refused at
//! load, naming its sizes. Skips without a driver unless `LS_REQUIRE_GPU=1`.

use std::path::Path;

use layer_streamer::llm::attention::kv_cache_dtype;
use layer_streamer::llm::reference::teacher_forced;
use layer_streamer::llm::{
    generate, GenerateParams, KvTransfer, LlamaModel, ModelOptions, Precision, SamplingParams,
};
use layer_streamer::synth::{write_model, Arch, Shape, SynthSpec};
use layer_streamer::{DType, Device, LayerStreamer, ModelIndex};
use rand::Rng;

mod common;

fn tiny_model(arch: Arch, shape: Shape, dtype: DType, seed: u64) -> tempfile::TempDir {
    let dir = common::tempdir();
    let spec = SynthSpec {
        arch,
        shape,
        dtype,
        tie: false,
        shard_size: 4_000_000_000,
        seed,
        threads: 2,
    };
    write_model(dir.path(), &spec).unwrap();
    dir
}

fn load(dir: &Path, opts: ModelOptions) -> (LayerStreamer, LlamaModel) {
    let index = ModelIndex::open(dir).unwrap();
    let s = LayerStreamer::builder(&index)
        .device(Device::Cuda(0))
        .dtype(LlamaModel::cuda_dtype(&index))
        .build()
        .unwrap();
    let model = LlamaModel::load(&s, opts).unwrap();
    (s, model)
}

/// What one model run gives: teacher-forced logits, the KV bytes of its last
/// pass, the lengths after it, the logits of a pass with a new prompt in
/// sequence 1, and generated tokens (greedy, then sampled).
struct Run {
    logits: Vec<Vec<Vec<f32>>>,
    reused: Vec<Vec<Vec<f32>>>,
    last_kv: Option<KvTransfer>,
    lens: Vec<usize>,
    greedy: Vec<Vec<u32>>,
    sampled: Vec<Vec<u32>>,
}

fn run(
    dir: &Path,
    opts: ModelOptions,
    prompts: &[Vec<u32>],
    forced: &[Vec<u32>],
    fresh: &[u32],
) -> Run {
    let (mut s, mut model) = load(dir, opts);
    let logits = teacher_forced(&mut model, &mut s, prompts, forced).unwrap();
    let (last_kv, lens) = (model.last_kv_transfer(), model.lengths().to_vec());
    // Sequence 1's slot starts over (its host rows keep the old positions)
    // while sequences 0 and 2 decode one more token.
    model.reset_sequence(1).unwrap();
    let inputs: Vec<&[u32]> = vec![&forced[0][..1], fresh, &forced[2][..1]];
    let reused = model.forward(&mut s, &inputs).unwrap();
    let reused = reused.into_iter().map(|r| vec![r]).collect();
    let mut gen = |sampling: SamplingParams, seed: u64| {
        model.reset();
        let params = GenerateParams {
            max_new_tokens: 6,
            sampling,
            seed,
            stop_ids: Vec::new(),
        };
        generate(&mut model, &mut s, prompts, &params, |_, _| Ok(()))
            .unwrap()
            .tokens
    };
    let greedy = gen(SamplingParams::default(), 0);
    let sampled = gen(
        SamplingParams {
            temperature: 0.9,
            top_k: 50,
        },
        17,
    );
    Run {
        logits,
        reused,
        last_kv,
        lens,
        greedy,
        sampled,
    }
}

fn same_bits(got: &[Vec<Vec<f32>>], want: &[Vec<Vec<f32>>], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    let mut rows = 0;
    for (s, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(g.len(), w.len(), "{what}: sequence {s}");
        for (step, (gr, wr)) in g.iter().zip(w).enumerate() {
            assert_eq!(gr.len(), wr.len());
            let diff = gr
                .iter()
                .zip(wr)
                .position(|(a, b)| a.to_bits() != b.to_bits());
            if let Some(i) = diff {
                panic!(
                    "{what}: sequence {s}, row {step}, logit {i}: {} offloaded, {} resident",
                    gr[i], wr[i]
                );
            }
            rows += 1;
        }
    }
    assert!(rows > 0, "{what}: no rows compared");
}

#[test]
fn offloaded_kv_cache_gives_the_resident_caches_bits_and_tokens() {
    let test = "offloaded_kv_cache_gives_the_resident_caches_bits_and_tokens";
    if common::gpu(test).is_none() {
        return;
    }
    let mut rng = common::rng(test);
    let tiny = Shape::preset("tiny").unwrap();
    let vocab = tiny.vocab as u32;
    // Mixed lengths: a long prompt prefilled in chunks of max_tokens (some of
    // them tensor-core runs over a cached prefix), a one-token prompt, and one
    // that shares a chunk with the long one; the forced tokens end at
    // different steps, so later decode passes leave sequences out.
    let lens = [rng.gen_range(150..300), 1, rng.gen_range(20..70)];
    let seed: u64 = rng.gen();
    let max_tokens = rng.gen_range(48..112);
    let mut ids = |n: usize| -> Vec<u32> { (0..n).map(|_| rng.gen_range(0..vocab)).collect() };
    let prompts: Vec<Vec<u32>> = lens.iter().map(|&n| ids(n)).collect();
    let forced: Vec<Vec<u32>> = [5, 2, 7].iter().map(|&n| ids(n)).collect();
    let fresh = ids(40);
    for (arch, dtype, layers) in [
        (Arch::Llama, DType::BF16, 3),
        (Arch::Qwen2, DType::F16, 3),
        (Arch::Qwen2, DType::BF16, 1),
        (Arch::Llama, DType::F16, 5),
    ] {
        let shape = Shape { layers, ..tiny };
        let dir = tiny_model(arch, shape, dtype, seed);
        for precision in Precision::ALL {
            let opts = ModelOptions {
                max_batch: prompts.len(),
                max_len: 400,
                max_tokens,
                precision,
                kv_offload: false,
            };
            let what = format!(
                "{arch:?} {dtype} {layers} layers {precision}, {max_tokens} tokens per pass"
            );
            let resident = run(dir.path(), opts, &prompts, &forced, &fresh);
            let offloaded = run(
                dir.path(),
                ModelOptions {
                    kv_offload: true,
                    ..opts
                },
                &prompts,
                &forced,
                &fresh,
            );
            same_bits(&offloaded.logits, &resident.logits, &what);
            same_bits(
                &offloaded.reused,
                &resident.reused,
                &format!("{what}, reused slot"),
            );
            assert_eq!(offloaded.greedy, resident.greedy, "{what}: greedy tokens");
            assert_eq!(
                offloaded.sampled, resident.sampled,
                "{what}: sampled tokens"
            );
            assert!(offloaded.greedy.iter().all(|t| t.len() == 6), "{what}");
            assert_eq!(resident.last_kv, None, "{what}: nothing to copy");
            // The last forced step holds only sequence 2's token, at
            // position len - 1: its prefix in, one position out, per layer.
            let elt = kv_cache_dtype(dtype, precision).size() as u64;
            let per_pos = 2 * (shape.kv_heads * shape.hidden / shape.heads) as u64 * elt;
            let layers = shape.layers as u64;
            let start = offloaded.lens[2] as u64 - 1;
            let want = KvTransfer {
                h2d_bytes: layers * per_pos * start,
                d2h_bytes: layers * per_pos,
            };
            assert_eq!(
                offloaded.last_kv,
                Some(want),
                "{what}: KV bytes of the last pass"
            );
            eprintln!("{what}: identical bits; last pass moved {want:?}");
        }
    }
}

/// A host cache larger than the RAM available is refused at load, naming
/// the cache's sizes, while its two device slots alone would fit the GPU.
#[test]
fn an_offloaded_cache_beyond_the_hosts_memory_is_refused_naming_its_sizes() {
    let test = "an_offloaded_cache_beyond_the_hosts_memory_is_refused_naming_its_sizes";
    let Some(ctx) = common::gpu(test) else {
        return;
    };
    let Some(avail) = layer_streamer::host_memory::mem_available() else {
        eprintln!("skipping {test}: MemAvailable cannot be read");
        return;
    };
    let mut rng = common::rng(test);
    let shape = Shape {
        layers: 12,
        ..Shape::preset("tiny").unwrap()
    };
    // bf16 K and V of every layer: 4 × kv_dim bytes per position and layer.
    let per_pos = 4 * (shape.kv_heads * shape.hidden / shape.heads) as u64;
    let batch = 256u64;
    let host_len = |len: u64| shape.layers as u64 * batch * len * per_pos;
    let max_len = (avail + avail / 4) / host_len(1) + 1;
    let slots = 2 * batch * max_len * per_pos;
    let (free, _) = ctx.mem_info().unwrap();
    if slots + (4 << 30) > free {
        eprintln!("skipping {test}: {slots} bytes of KV slots do not fit {free} free bytes");
        return;
    }
    let dir = tiny_model(Arch::Llama, shape, DType::BF16, rng.gen());
    let index = ModelIndex::open(dir.path()).unwrap();
    let s = LayerStreamer::builder(&index)
        .device(Device::Cuda(0))
        .dtype(DType::BF16)
        .build()
        .unwrap();
    let opts = ModelOptions {
        max_batch: batch as usize,
        max_len: max_len as usize,
        max_tokens: 64,
        precision: Precision::Fast,
        kv_offload: true,
    };
    let e = LlamaModel::load(&s, opts)
        .err()
        .expect("a cache beyond the host's RAM");
    match &e {
        layer_streamer::Error::Limit { asked, .. } => assert_eq!(*asked, host_len(max_len)),
        other => panic!("{other}"),
    }
    let msg = e.to_string();
    for part in [
        "host memory (MemAvailable)".to_string(),
        "--kv-offload".to_string(),
        format!("{} layers", shape.layers),
        format!("{batch} sequences"),
        format!("{max_len} positions"),
    ] {
        assert!(msg.contains(&part), "{part} missing: {msg}");
    }
    eprintln!("{test}: {msg}");
}
