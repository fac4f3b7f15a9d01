//! The CUDA forward pass against the host backend's, on a GPU: every
//! architecture variant of the tiny preset, bf16 and f16 checkpoints, a
//! batch of three, both precisions (a 16-bit and an f32 KV cache), and a
//! long prompt fed in chunks through the tensor-core prefill. Skips without a
//! driver unless `LS_REQUIRE_GPU=1`.

use std::path::Path;

use layer_streamer::llm::reference::{rel_l2, teacher_forced};
use layer_streamer::llm::{LlamaModel, ModelOptions, Precision};
use layer_streamer::synth::{write_model, Arch, Shape, SynthSpec};
use layer_streamer::{DType, Device, LayerStreamer, ModelIndex};

mod common;

fn logits(
    dir: &Path,
    device: Device,
    opts: ModelOptions,
    prompts: &[Vec<u32>],
    forced: &[Vec<u32>],
) -> Vec<Vec<Vec<f32>>> {
    let index = ModelIndex::open(dir).unwrap();
    let b = LayerStreamer::builder(&index).device(device);
    let b = if device == Device::Host {
        b.file_dtype()
    } else {
        b.dtype(LlamaModel::cuda_dtype(&index))
    };
    let mut s = b.build().unwrap();
    let mut model = LlamaModel::load(&s, opts).unwrap();
    teacher_forced(&mut model, &mut s, prompts, forced).unwrap()
}

#[test]
fn cuda_forward_matches_the_host_backend() {
    if common::gpu("cuda_forward_matches_the_host_backend").is_none() {
        return;
    }
    let prompts = vec![
        (0..12u32).map(|i| (i * 37 + 5) % 1000).collect::<Vec<_>>(),
        vec![3, 4, 5],
        (0..7u32).map(|i| i * 101 % 1000).collect(),
    ];
    let forced: Vec<Vec<u32>> = (0..3)
        .map(|s| (0..6u32).map(|i| (i * 13 + s * 7) % 1000).collect())
        .collect();
    for (arch, tie, dtype) in [
        (Arch::Qwen2, false, DType::BF16),
        (Arch::Llama, true, DType::BF16),
        (Arch::Qwen2, true, DType::F16),
        (Arch::Llama, false, DType::F16),
    ] {
        let dir = tiny_model(arch, tie, dtype);
        let mut opts = ModelOptions {
            max_batch: prompts.len(),
            max_len: 64,
            max_tokens: 128,
            ..ModelOptions::default()
        };
        let host = logits(dir.path(), Device::Host, opts, &prompts, &forced);
        for precision in [Precision::Fast, Precision::Exact] {
            opts.precision = precision;
            let gpu = logits(dir.path(), Device::Cuda(0), opts, &prompts, &forced);
            let worst = worst_rel_l2(&host, &gpu);
            eprintln!("{arch:?} tie={tie} {dtype} {precision:?}: worst rel_l2 {worst:.3e}");
            assert!(
                worst < 1e-2,
                "{arch:?} tie={tie} {dtype} {precision:?}: {worst}"
            );
        }
    }
}

fn tiny_model(arch: Arch, tie: bool, dtype: DType) -> tempfile::TempDir {
    let dir = common::tempdir();
    write_model(
        dir.path(),
        &SynthSpec {
            arch,
            shape: Shape::preset("tiny").unwrap(),
            dtype,
            tie,
            shard_size: 4_000_000_000,
            seed: 11,
            threads: 2,
        },
    )
    .unwrap();
    dir
}

fn worst_rel_l2(host: &[Vec<Vec<f32>>], gpu: &[Vec<Vec<f32>>]) -> f64 {
    let mut worst = 0.0f64;
    for (h, g) in host.iter().flatten().zip(gpu.iter().flatten()) {
        worst = worst.max(rel_l2(g, h));
    }
    worst
}

/// A 700-token prompt next to a short one, fed 256 tokens per pass: prefill
/// chunks over a cached prefix, many key tiles, then decode steps.
#[test]
fn long_prompt_in_chunks_matches_the_host_backend() {
    if common::gpu("long_prompt_in_chunks_matches_the_host_backend").is_none() {
        return;
    }
    let prompts = vec![
        (0..700u32)
            .map(|i| (i * 53 + 11) % 1000)
            .collect::<Vec<_>>(),
        vec![9, 8, 7, 6, 5],
    ];
    let forced: Vec<Vec<u32>> = (0..2)
        .map(|s| (0..4u32).map(|i| (i * 17 + s * 3) % 1000).collect())
        .collect();
    let dir = tiny_model(Arch::Llama, false, DType::BF16);
    let mut opts = ModelOptions {
        max_batch: 2,
        max_len: 800,
        max_tokens: 256,
        ..ModelOptions::default()
    };
    let host = logits(dir.path(), Device::Host, opts, &prompts, &forced);
    for precision in [Precision::Fast, Precision::Exact] {
        opts.precision = precision;
        let gpu = logits(dir.path(), Device::Cuda(0), opts, &prompts, &forced);
        let worst = worst_rel_l2(&host, &gpu);
        eprintln!("700-token prompt {precision:?}: worst rel_l2 {worst:.3e}");
        assert!(worst < 1e-2, "700-token prompt {precision:?}: {worst}");
    }
}
