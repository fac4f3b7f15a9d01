//! The CUDA forward pass against the host backend's, on a GPU: every
//! architecture variant of the tiny preset, bf16 and f16 checkpoints, a
//! batch of three. Skips without a driver unless `LS_REQUIRE_GPU=1`.

use std::path::Path;

use layer_streamer::llm::reference::{rel_l2, teacher_forced};
use layer_streamer::llm::{LlamaModel, ModelOptions};
use layer_streamer::synth::{write_model, Arch, Shape, SynthSpec};
use layer_streamer::{DType, Device, LayerStreamer, ModelIndex};

mod common;

fn logits(
    dir: &Path,
    device: Device,
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
    let opts = ModelOptions {
        max_batch: prompts.len(),
        max_len: 64,
        max_tokens: 128,
        ..ModelOptions::default()
    };
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
        let host = logits(dir.path(), Device::Host, &prompts, &forced);
        let gpu = logits(dir.path(), Device::Cuda(0), &prompts, &forced);
        let mut worst = 0.0f64;
        for (h, g) in host.iter().flatten().zip(gpu.iter().flatten()) {
            worst = worst.max(rel_l2(g, h));
        }
        eprintln!("{arch:?} tie={tie} {dtype}: worst rel_l2 {worst:.3e}");
        assert!(worst < 1e-2, "{arch:?} tie={tie} {dtype}: {worst}");
    }
}
