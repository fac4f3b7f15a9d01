//! The pipeline on the host backend: every configuration delivers exactly the
//! file's bytes for each layer, in layer order; faults end a pass cleanly.

mod common;

use std::panic::{catch_unwind, AssertUnwindSafe};

use common::models::{expected_layers, small_model};
use common::tempdir;
use half::{bf16, f16};
use layer_streamer::{Budget, DType, Device, Error, LayerStreamer, ModelIndex, StreamerConfig};
use rand::seq::SliceRandom;
use rand::Rng;

/// Runs a pass and checks every layer's bytes against the files.
fn check_pass(s: &mut LayerStreamer, expected: &[Vec<(String, Vec<u8>)>]) {
    let next = s
        .run_pass(0usize, |next, w, layer, stream| {
            assert!(stream.is_host());
            assert_eq!(layer, next, "layers out of order");
            assert_eq!(w.layer(), layer);
            let want = &expected[layer];
            assert_eq!(w.len(), want.len(), "layer {layer}: tensor count");
            for (key, bytes) in want {
                let v = w.tensor(key)?;
                let got = w.host_bytes(&v).expect("host bytes");
                assert!(
                    got == &bytes[..],
                    "layer {layer} tensor {key}: bytes differ"
                );
            }
            Ok(next + 1)
        })
        .unwrap_or_else(|e| panic!("pass failed: {e}"));
    assert_eq!(next, expected.len());
}

fn config(
    n_cpu: usize,
    n_pinned: usize,
    n_gpu: usize,
    batch: usize,
    caches: bool,
) -> StreamerConfig {
    StreamerConfig {
        device: Device::Host,
        dtype: None,
        n_gpu,
        n_cpu_pinned: n_pinned,
        n_cpu,
        batch_gpu: batch,
        batch_cpu_pinned: batch,
        batch_cpu: batch,
        reader_threads: 1 + (n_cpu + n_pinned + n_gpu) % 3,
        read_chunk: 8192,
        pinned_cache: if caches {
            Budget::Bytes(300_000)
        } else {
            Budget::None
        },
        gpu_cache: if caches {
            Budget::Bytes(150_000)
        } else {
            Budget::None
        },
        ..StreamerConfig::default()
    }
}

#[test]
fn every_stage_combination_sees_the_files_bytes() {
    let mut rng = common::rng("every_stage_combination_sees_the_files_bytes");
    let dir = tempdir();
    let model = small_model(dir.path(), &mut rng, 7, DType::BF16);
    let expected = expected_layers(&model);
    let mut configs = 0;
    for n_cpu in [0, 1, 3] {
        for n_pinned in [0, 1, 4] {
            for n_gpu in [1, 2, 4] {
                for batch in [0, 1, 2] {
                    for caches in [false, true] {
                        let cfg = config(n_cpu, n_pinned, n_gpu, batch, caches);
                        let mut s = LayerStreamer::builder(&model)
                            .config(cfg.clone())
                            .build()
                            .unwrap_or_else(|e| panic!("{cfg:?}: {e}"));
                        for _ in 0..2 {
                            check_pass(&mut s, &expected);
                        }
                        configs += 1;
                    }
                }
            }
        }
    }
    assert_eq!(configs, 162);
}

#[test]
fn n_gpu_zero_means_one_device_slot() {
    let mut rng = common::rng("n_gpu_zero_means_one_device_slot");
    let dir = tempdir();
    let model = small_model(dir.path(), &mut rng, 4, DType::BF16);
    let mut s = LayerStreamer::builder(&model)
        .config(config(0, 2, 0, 1, false))
        .build()
        .unwrap();
    assert_eq!(s.memory().gpu_slots, 1);
    check_pass(&mut s, &expected_layers(&model));
}

#[test]
fn caches_that_hold_everything_stop_all_io_after_the_first_pass() {
    let mut rng = common::rng("caches_that_hold_everything_stop_all_io");
    let dir = tempdir();
    let model = small_model(dir.path(), &mut rng, 6, DType::BF16);
    let expected = expected_layers(&model);
    let per_layer = model.max_slot_bytes() + 4096;
    let half = per_layer * 3;
    let mut s = LayerStreamer::builder(&model)
        .device(Device::Host)
        .file_dtype()
        .gpu_cache(Budget::Bytes(half))
        .pinned_cache(Budget::Bytes(per_layer * 6))
        .read_chunk(16384)
        .build()
        .unwrap();
    let mem = s.memory().clone();
    assert!(
        mem.gpu_cache_layers >= 1 && mem.gpu_cache_layers < 6,
        "{mem:?}"
    );
    assert_eq!(mem.gpu_cache_layers + mem.pinned_cache_layers, 6, "{mem:?}");
    check_pass(&mut s, &expected);
    let first = s.last_pass_stats().clone();
    let slot_bytes: u64 = model.layers().iter().map(|l| l.slot_bytes).sum();
    assert_eq!(
        first.read.bytes, slot_bytes,
        "pass 1 reads every layer once"
    );
    assert_eq!(
        first.h2d.bytes, slot_bytes,
        "pass 1 transfers every layer once"
    );
    check_pass(&mut s, &expected);
    let second = s.last_pass_stats().clone();
    assert_eq!(second.read.bytes, 0, "pass 2 reads nothing");
    assert_eq!(second.gpu_cache_hits, mem.gpu_cache_layers);
    assert_eq!(second.pinned_cache_hits, mem.pinned_cache_layers);
    let resident = s.resident_layers();
    assert_eq!(resident.len(), mem.gpu_cache_layers);
    let pinned_bytes: u64 = model
        .layers()
        .iter()
        .filter(|l| !resident.contains(&l.index))
        .map(|l| l.slot_bytes)
        .sum();
    assert_eq!(
        second.h2d.bytes, pinned_bytes,
        "only pinned-cache layers move"
    );

    // Everything on the "device": the second pass moves no bytes at all.
    let mut s = LayerStreamer::builder(&model)
        .device(Device::Host)
        .file_dtype()
        .gpu_cache(Budget::Auto)
        .build()
        .unwrap();
    check_pass(&mut s, &expected);
    check_pass(&mut s, &expected);
    let st = s.last_pass_stats();
    assert_eq!((st.read.bytes, st.h2d.bytes), (0, 0), "{st}");
    assert_eq!(s.memory().gpu_slots, 0);
}

#[test]
fn f16_and_f32_weights_are_cast_to_bf16() {
    let mut rng = common::rng("f16_and_f32_weights_are_cast_to_bf16");
    for dtype in [DType::F16, DType::F32] {
        let dir = tempdir();
        let model = small_model(dir.path(), &mut rng, 3, dtype);
        let expected = expected_layers(&model);
        let mut s = LayerStreamer::builder(&model)
            .device(Device::Host)
            .dtype(DType::BF16)
            .build()
            .unwrap();
        // Several passes: the casts run on a stream of their own while the
        // next layers' copies reuse the slots.
        for _ in 0..3 {
            s.run_pass((), |(), w, layer, _| {
                for (key, raw) in &expected[layer] {
                    let v = w.tensor(key)?;
                    assert_eq!(v.dtype(), DType::BF16);
                    let got = w.host_bytes(&v).unwrap();
                    let want: Vec<u8> = match dtype {
                        DType::F16 => raw
                            .chunks_exact(2)
                            .flat_map(|c| {
                                let x = f16::from_le_bytes([c[0], c[1]]);
                                bf16::from_f32(x.to_f32()).to_le_bytes()
                            })
                            .collect(),
                        _ => raw
                            .chunks_exact(4)
                            .flat_map(|c| {
                                bf16::from_f32(f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                                    .to_le_bytes()
                            })
                            .collect(),
                    };
                    assert!(got == &want[..], "layer {layer} {key}: cast bytes differ");
                }
                Ok(())
            })
            .unwrap();
            let st = s.last_pass_stats();
            assert_eq!(st.h2d.items, expected.len());
            assert!(!st.convert.is_zero(), "the casts ran on their own stream");
        }
        // Statics are cast the same way.
        let name = &model.statics()[0].name;
        let t = s.load_static(name).unwrap();
        assert_eq!(t.dtype(), DType::BF16);
        assert_eq!(
            t.bytes() as usize,
            model.statics()[0].shape.iter().product::<usize>() * 2
        );
    }
}

#[test]
fn load_static_returns_the_files_bytes() {
    let mut rng = common::rng("load_static_returns_the_files_bytes");
    let dir = tempdir();
    let model = small_model(dir.path(), &mut rng, 2, DType::BF16);
    let s = LayerStreamer::builder(&model)
        .device(Device::Host)
        .build()
        .unwrap();
    for info in model.statics() {
        let t = s.load_static(&info.name).unwrap();
        assert_eq!(t.shape(), &info.shape[..]);
        assert_eq!(
            t.to_host().unwrap(),
            common::models::read_tensor(&model, info)
        );
    }
    match s.load_static("model.no_such.weight") {
        Err(Error::UnknownTensor(n)) => assert!(n.contains("no_such")),
        Err(e) => panic!("wrong error {e}"),
        Ok(_) => panic!("loaded a tensor that does not exist"),
    }
}

fn streamer(model: &ModelIndex, rng: &mut impl Rng) -> LayerStreamer {
    let n_cpu = *[0, 2].choose(rng).unwrap();
    LayerStreamer::builder(model)
        .config(config(n_cpu, 2, 2, 1, false))
        .build()
        .unwrap()
}

#[test]
fn a_layer_fn_error_ends_the_pass_and_the_next_pass_works() {
    let mut rng = common::rng("a_layer_fn_error_ends_the_pass");
    let dir = tempdir();
    let model = small_model(dir.path(), &mut rng, 8, DType::BF16);
    let expected = expected_layers(&model);
    let mut s = streamer(&model, &mut rng);
    for _ in 0..5 {
        let bad = rng.gen_range(0..8);
        let err = s
            .run_pass((), |(), _, layer, _| {
                if layer == bad {
                    Err(Error::Input(format!("planted failure at {layer}")))
                } else {
                    Ok(())
                }
            })
            .unwrap_err();
        match err {
            Error::LayerFn { layer, source } => {
                assert_eq!(layer, bad);
                assert!(source.to_string().contains("planted failure"));
            }
            e => panic!("wrong error: {e}"),
        }
        check_pass(&mut s, &expected);
    }
}

#[test]
fn a_layer_fn_panic_resumes_on_the_caller_and_the_next_pass_works() {
    let mut rng = common::rng("a_layer_fn_panic_resumes");
    let dir = tempdir();
    let model = small_model(dir.path(), &mut rng, 6, DType::BF16);
    let expected = expected_layers(&model);
    let mut s = streamer(&model, &mut rng);
    let bad = rng.gen_range(0..6);
    let r = catch_unwind(AssertUnwindSafe(|| {
        s.run_pass((), |(), _, layer, _| {
            if layer == bad {
                panic!("planted panic");
            }
            Ok(())
        })
    }));
    let payload = r.expect_err("the panic must reach the caller");
    assert_eq!(payload.downcast_ref::<&str>(), Some(&"planted panic"));
    check_pass(&mut s, &expected);
}

#[test]
fn a_shard_truncated_between_passes_is_a_read_error_naming_the_file() {
    let mut rng = common::rng("a_shard_truncated_between_passes");
    let dir = tempdir();
    let model = small_model(dir.path(), &mut rng, 6, DType::BF16);
    let expected = expected_layers(&model);
    let mut s = streamer(&model, &mut rng);
    check_pass(&mut s, &expected);
    // Truncate the file holding the last layer's last tensor.
    let last = model.layers().last().unwrap().tensors.last().unwrap();
    let path = model.files()[last.info.file].path.clone();
    let original = std::fs::read(&path).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(last.info.file_offset + last.info.len / 2)
        .unwrap();
    let err = s.run_pass((), |(), _, _, _| Ok(())).unwrap_err();
    let name = path.file_name().unwrap().to_string_lossy().to_string();
    assert!(matches!(err, Error::Io { .. }), "{err}");
    assert!(err.to_string().contains(&name), "{err}");
    std::fs::write(&path, &original).unwrap();
    check_pass(&mut s, &expected);
}

#[test]
fn configurations_that_cannot_work_are_refused() {
    let mut rng = common::rng("configurations_that_cannot_work");
    let dir = tempdir();
    let model = small_model(dir.path(), &mut rng, 2, DType::BF16);
    let err = LayerStreamer::builder(&model)
        .device(Device::Host)
        .read_chunk(1000)
        .build()
        .err()
        .unwrap();
    assert!(matches!(err, Error::Config(_)) && err.to_string().contains("read_chunk"));
    for (cfg, field) in [
        (config(0, 5000, 1, 1, false), "n_cpu_pinned"),
        (config(0, 1, 1, 2000, false), "batch_gpu"),
        (
            StreamerConfig {
                reader_threads: 0,
                ..config(0, 1, 1, 1, false)
            },
            "reader_threads",
        ),
        (
            StreamerConfig {
                dtype: Some(DType::I8),
                ..config(0, 1, 1, 1, false)
            },
            "compute dtype",
        ),
    ] {
        let err = LayerStreamer::builder(&model)
            .config(cfg)
            .build()
            .err()
            .unwrap();
        assert!(matches!(err, Error::Config(_)), "{err}");
        assert!(err.to_string().contains(field), "{err} should name {field}");
    }
}

#[test]
fn auto_caches_leave_the_reserve_free() {
    let mut rng = common::rng("auto_caches_leave_the_reserve_free");
    let dir = tempdir();
    let model = small_model(dir.path(), &mut rng, 4, DType::BF16);
    let build = |reserve: u64| {
        LayerStreamer::builder(&model)
            .device(Device::Host)
            .file_dtype()
            .gpu_cache(Budget::Auto)
            .pinned_cache(Budget::Auto)
            .reserve(reserve)
            .build()
            .unwrap()
    };
    // A few MB of model: everything is cached without a reserve.
    let all = build(0);
    assert_eq!(all.memory().gpu_cache_layers, model.num_layers());
    let mut seen = 0;
    let mut s = all;
    s.run_pass((), |(), _, _, _| {
        seen += 1;
        Ok(())
    })
    .unwrap();
    assert_eq!(seen, model.num_layers());
    // A reserve of all the RAM there is leaves nothing for either cache.
    let ram = layer_streamer::host_memory::mem_available().expect("MemAvailable");
    let none = build(ram);
    assert_eq!(none.memory().gpu_cache_layers, 0);
    assert_eq!(none.memory().pinned_cache_layers, 0);
    assert_eq!(
        none.memory().gpu_cache_bytes + none.memory().pinned_cache_bytes,
        0
    );
}
