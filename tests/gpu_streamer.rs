//! The pipeline on the CUDA backend: the bytes on the device are the file's
//! bytes (or their bf16 cast) in every configuration; a long run keeps device
//! memory flat.

mod common;

use common::models::{expected_layers, small_model};
use common::tempdir;
use half::{bf16, f16};
use layer_streamer::cuda;
use layer_streamer::{Budget, DType, Device, LayerStreamer, ModelIndex, StreamerConfig};

/// Copies a device range back to the host, ordered on `stream`.
fn device_bytes(stream: &cuda::Stream, ptr: u64, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    // SAFETY: `ptr` is a live device range of `len` bytes (a tensor view of
    // the layer being processed); `out` outlives the synchronize below.
    unsafe { cuda::memcpy_dtoh_async(out.as_mut_ptr(), ptr, len, stream).unwrap() };
    stream.synchronize().unwrap();
    out
}

fn to_bf16(raw: &[u8], from: DType) -> Vec<u8> {
    match from {
        DType::F16 => raw
            .chunks_exact(2)
            .flat_map(|c| bf16::from_f32(f16::from_le_bytes([c[0], c[1]]).to_f32()).to_le_bytes())
            .collect(),
        DType::F32 => raw
            .chunks_exact(4)
            .flat_map(|c| {
                bf16::from_f32(f32::from_le_bytes([c[0], c[1], c[2], c[3]])).to_le_bytes()
            })
            .collect(),
        _ => raw.to_vec(),
    }
}

fn check_passes(model: &ModelIndex, cfg: StreamerConfig, passes: usize, file_dtype: DType) {
    let expected = expected_layers(model);
    let mut s = LayerStreamer::builder(model)
        .config(cfg.clone())
        .build()
        .unwrap_or_else(|e| panic!("{cfg:?}: {e}"));
    for pass in 0..passes {
        let n = s
            .run_pass(0usize, |n, w, layer, stream| {
                assert_eq!(layer, n);
                let cs = stream.cuda().expect("a CUDA stream");
                for (key, raw) in &expected[layer] {
                    let v = w.tensor(key)?;
                    let got = device_bytes(cs, v.ptr(), v.bytes() as usize);
                    let want = if cfg.dtype == Some(DType::BF16) {
                        to_bf16(raw, file_dtype)
                    } else {
                        raw.clone()
                    };
                    assert!(
                        got == want,
                        "pass {pass} layer {layer} {key}: device bytes differ ({cfg:?})"
                    );
                }
                Ok(n + 1)
            })
            .unwrap_or_else(|e| panic!("{cfg:?}: {e}"));
        assert_eq!(n, model.num_layers());
    }
}

#[test]
fn gpu_device_bytes_match_the_files_in_several_configurations() {
    let Some(_ctx) = common::gpu("gpu_device_bytes_match_the_files") else {
        return;
    };
    let mut rng = common::rng("gpu_device_bytes_match_the_files");
    let dir = tempdir();
    let model = small_model(dir.path(), &mut rng, 6, DType::BF16);
    let base = StreamerConfig {
        device: Device::Cuda(0),
        dtype: None,
        read_chunk: 8192,
        ..StreamerConfig::default()
    };
    let configs = [
        (0, 4, 2, false),
        (2, 2, 1, false),
        (3, 0, 2, false),
        (0, 0, 1, false),
        (1, 1, 0, true),
        (0, 2, 4, true),
    ];
    for (n_cpu, n_pinned, n_gpu, caches) in configs {
        let cfg = StreamerConfig {
            n_cpu,
            n_cpu_pinned: n_pinned,
            n_gpu,
            reader_threads: 1 + n_gpu % 3,
            pinned_cache: if caches {
                Budget::Bytes(200_000)
            } else {
                Budget::None
            },
            gpu_cache: if caches {
                Budget::Bytes(200_000)
            } else {
                Budget::None
            },
            ..base.clone()
        };
        check_passes(&model, cfg, 3, DType::BF16);
    }
}

#[test]
fn gpu_f16_and_f32_weights_are_cast_to_bf16_on_the_device() {
    let Some(_ctx) = common::gpu("gpu_f16_and_f32_weights_are_cast") else {
        return;
    };
    let mut rng = common::rng("gpu_f16_and_f32_weights_are_cast");
    for dtype in [DType::F16, DType::F32] {
        let dir = tempdir();
        let model = small_model(dir.path(), &mut rng, 3, dtype);
        let cfg = StreamerConfig {
            device: Device::Cuda(0),
            dtype: Some(DType::BF16),
            ..StreamerConfig::default()
        };
        check_passes(&model, cfg.clone(), 2, dtype);
        let s = LayerStreamer::builder(&model).config(cfg).build().unwrap();
        for info in model.statics() {
            let t = s.load_static(&info.name).unwrap();
            let raw = common::models::read_tensor(&model, info);
            assert_eq!(t.to_host().unwrap(), to_bf16(&raw, dtype), "{}", info.name);
        }
    }
}

#[test]
fn gpu_a_thousand_passes_keep_device_memory_flat() {
    let Some(ctx) = common::gpu("gpu_a_thousand_passes_keep_device_memory_flat") else {
        return;
    };
    let mut rng = common::rng("gpu_a_thousand_passes");
    let dir = tempdir();
    let model = small_model(dir.path(), &mut rng, 4, DType::BF16);
    let mut s = LayerStreamer::builder(&model)
        .device(Device::Cuda(0))
        .file_dtype()
        .n_gpu(1)
        .n_cpu_pinned(2)
        .pinned_cache(Budget::Bytes(model.max_slot_bytes() + 4096))
        .build()
        .unwrap();
    let mut sum = 0usize;
    for _ in 0..10 {
        sum += s.run_pass(0, |n, w, _, _| Ok(n + w.len())).unwrap();
    }
    let (free_before, _) = ctx.mem_info().unwrap();
    for _ in 0..1000 {
        sum += s.run_pass(0, |n, w, _, _| Ok(n + w.len())).unwrap();
    }
    let (free_after, _) = ctx.mem_info().unwrap();
    assert!(sum > 0);
    assert_eq!(
        free_before, free_after,
        "device memory changed over 1000 passes"
    );
    let st = s.last_pass_stats();
    assert!(st.pinned_cache_hits > 0, "{st}");
}

/// Pinned host memory for asynchronous device-to-host copies.
struct PinnedHost {
    _reg: cuda::HostRegistration,
    buf: layer_streamer::io::AlignedBuf,
}

#[test]
fn gpu_release_after_keeps_a_slot_for_another_streams_work() {
    let Some(ctx) = common::gpu("gpu_release_after_keeps_a_slot") else {
        return;
    };
    let mut rng = common::rng("gpu_release_after_keeps_a_slot");
    let dir = tempdir();
    let model = small_model(dir.path(), &mut rng, 6, DType::BF16);
    let expected = expected_layers(&model);
    let mut s = LayerStreamer::builder(&model)
        .device(Device::Cuda(0))
        .file_dtype()
        .n_gpu(0)
        .build()
        .unwrap();
    let side = cuda::Stream::new(&ctx).unwrap();
    // Busy work for the side stream, so that its read of the slot runs well
    // after the layer function has returned.
    let busy = cuda::DeviceBuffer::alloc(&ctx, 256 << 20).unwrap();
    let mut copies: Vec<PinnedHost> = expected
        .iter()
        .map(|l| {
            let mut buf = layer_streamer::io::AlignedBuf::new(l[0].1.len()).unwrap();
            // SAFETY: `buf` is page-aligned and outlives the registration
            // (field order of `PinnedHost`).
            let reg =
                unsafe { cuda::HostRegistration::register(&ctx, buf.as_mut_ptr(), buf.len()) }
                    .unwrap();
            PinnedHost { _reg: reg, buf }
        })
        .collect();
    let dst: Vec<u64> = copies
        .iter_mut()
        .map(|c| c.buf.as_mut_ptr() as u64)
        .collect();
    for _ in 0..3 {
        s.run_pass((), |(), w, layer, _| {
            let v = w.tensor(&expected[layer][0].0)?;
            for _ in 0..40 {
                busy.memset_async(layer as u8, &side)?;
            }
            // SAFETY: `v` is a live device range of `bytes` bytes, which
            // release_after below keeps unwritten until this copy is done;
            // `dst[layer]` is pinned host memory of that size that outlives
            // the synchronize after the pass.
            unsafe {
                cuda::memcpy_dtoh_async(dst[layer] as *mut u8, v.ptr(), v.bytes() as usize, &side)?
            };
            w.release_after_cuda(&side)?;
            Ok(())
        })
        .unwrap();
        side.synchronize().unwrap();
        for (layer, (c, want)) in copies.iter().zip(&expected).enumerate() {
            assert!(
                c.buf.as_slice()[..want[0].1.len()] == want[0].1[..],
                "layer {layer}: the side stream read a slot that was overwritten"
            );
        }
    }
}
