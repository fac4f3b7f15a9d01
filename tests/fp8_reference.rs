//! An FP8 checkpoint that transformers wrote itself (fine-grained FP8), with
//! the logits of its float32 dequantization, made on the GPU machine by
//! scripts/fp8-reference.py: the directory it wrote is named by
//! `LS_FP8_FIXTURE`. Without it the tests say why and skip, unless
//! `LS_REQUIRE_FP8_FIXTURE=1`, where a missing fixture is a failure. The host backend
//! and (where there is a GPU) the CUDA backend, in the dtype
//! `LlamaModel::cuda_dtype` picks (f16) and in both precisions, must match
//! within 2e-2 relative L2 with 95 % argmax agreement, streaming the stored
//! bytes.

mod common;

use std::path::PathBuf;

use layer_streamer::llm::reference::{check, Reference};
use layer_streamer::llm::{LlamaModel, ModelOptions, Precision};
use layer_streamer::{DType, Device, LayerStreamer, ModelIndex};

/// The fixture directory, or `None` (after saying why) when it is not set.
fn fixture(test: &str) -> Option<PathBuf> {
    match std::env::var_os("LS_FP8_FIXTURE") {
        Some(d) => Some(PathBuf::from(d)),
        None if std::env::var("LS_REQUIRE_FP8_FIXTURE").is_ok_and(|v| v == "1") => panic!(
            "{test}: LS_REQUIRE_FP8_FIXTURE=1 but LS_FP8_FIXTURE names no fixture (run \
             scripts/fp8-reference.py OUT on the GPU machine)"
        ),
        None => {
            eprintln!(
                "skipping {test}: LS_FP8_FIXTURE is not set (scripts/fp8-reference.py writes \
                 the fixture on a GPU machine; LS_REQUIRE_FP8_FIXTURE=1 makes this a failure)"
            );
            None
        }
    }
}

fn run(dir: PathBuf, device: Device, precision: Precision) {
    let reference = Reference::load(&dir).unwrap();
    let index = ModelIndex::open(dir.join("model")).unwrap();
    let fp8 = index
        .layers()
        .iter()
        .flat_map(|l| &l.tensors)
        .filter(|t| t.info.scale.is_some())
        .count();
    assert_eq!(fp8, 7 * index.num_layers(), "every layer matrix is FP8");
    let dtype = match device {
        Device::Host => DType::BF16,
        Device::Cuda(_) => LlamaModel::cuda_dtype(&index),
    };
    let mut s = LayerStreamer::builder(&index)
        .device(device)
        .dtype(dtype)
        .build()
        .unwrap();
    let len = reference.prompt_ids.len() + reference.greedy_ids.len() + 1;
    let opts = ModelOptions {
        max_batch: 1,
        max_len: len,
        max_tokens: len,
        precision,
        kv_offload: false,
    };
    let mut model = LlamaModel::load(&s, opts).unwrap();
    let rep = check(&mut model, &mut s, &reference, 1).unwrap();
    eprintln!(
        "{device:?} {dtype} {precision}: max rel_l2 {:.3e}, argmax agreement {:.1}%",
        rep.max_rel_l2(),
        100.0 * rep.argmax_agreement()
    );
    assert!(rep.passed(2e-2, 0.95), "{precision}: {:?}", rep.rel_l2);
    assert_eq!(s.last_pass_stats().layer_bytes, index.total_layer_bytes());
}

#[test]
fn transformers_fp8_checkpoint_matches_on_the_host() {
    let test = "transformers_fp8_checkpoint_matches_on_the_host";
    if let Some(dir) = fixture(test) {
        run(dir, Device::Host, Precision::default());
    }
}

#[test]
fn gpu_transformers_fp8_checkpoint_matches() {
    let test = "gpu_transformers_fp8_checkpoint_matches";
    let Some(_ctx) = common::gpu(test) else {
        return;
    };
    if let Some(dir) = fixture(test) {
        assert_eq!(
            LlamaModel::cuda_dtype(&ModelIndex::open(dir.join("model")).unwrap()),
            DType::F16
        );
        for precision in [Precision::Exact, Precision::Fast] {
            run(dir.clone(), Device::Cuda(0), precision);
        }
    }
}
