//! The CPU/GPU row split on the CUDA backend: each split weight's device
//! view holds its first rows (as stored, or cast to bf16) and the host view
//! the rest, exactly the file's bytes, in several pipeline configurations
//! and for a block-quantized model; layers the GPU cache keeps are whole.
//! Skips without a driver.

mod common;

use common::models::{read_tensor, small_model};
use common::tempdir;
use half::bf16;
use layer_streamer::quant::QuantType;
use layer_streamer::synth::{write_gguf, Arch, Shape, SynthGgufSpec};
use layer_streamer::StreamerConfig;
use layer_streamer::{cuda, Budget, CpuShare, DType, Device, LayerStreamer, ModelIndex};
use rand::Rng;

/// Copies a device range back to the host, ordered on `stream`.
fn device_bytes(stream: &cuda::Stream, ptr: u64, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    // SAFETY: `ptr` is a live device range of `len` bytes (a tensor view of
    // the layer being processed); `out` outlives the synchronize below.
    unsafe { cuda::memcpy_dtoh_async(out.as_mut_ptr(), ptr, len, stream).unwrap() };
    stream.synchronize().unwrap();
    out
}

fn f32_to_bf16(raw: &[u8]) -> Vec<u8> {
    raw.chunks_exact(4)
        .flat_map(|c| bf16::from_f32(f32::from_le_bytes([c[0], c[1], c[2], c[3]])).to_le_bytes())
        .collect()
}

/// Two passes; every tensor's device rows and host rows against the file.
fn check_split(model: &ModelIndex, cfg: StreamerConfig) {
    let mut s = LayerStreamer::builder(model)
        .config(cfg.clone())
        .build()
        .unwrap_or_else(|e| panic!("{cfg:?}: {e}"));
    let cast = cfg.dtype == Some(DType::BF16);
    let resident = s.resident_layers();
    for pass in 0..2 {
        s.run_pass((), |(), w, layer, stream| {
            let cs = stream.cuda().expect("a CUDA stream");
            for t in &model.layers()[layer].tensors {
                let file = read_tensor(model, &t.info);
                let v = w.tensor(&t.key)?;
                let dev = device_bytes(cs, v.ptr(), v.bytes() as usize);
                let cut = match w.host_rows(&t.key) {
                    Some(_) if resident.contains(&layer) => {
                        panic!("layer {layer} {}: split, but the GPU cache keeps it", t.key)
                    }
                    Some(h) => {
                        assert_eq!(v.shape(), &[h.first_row(), h.cols()][..], "{}", t.key);
                        let cut = file.len() - h.bytes().len();
                        assert!(
                            h.bytes() == &file[cut..],
                            "pass {pass} {}: host rows",
                            t.key
                        );
                        cut
                    }
                    None => file.len(),
                };
                let want = if cast && t.info.dtype == DType::F32 {
                    f32_to_bf16(&file[..cut])
                } else {
                    file[..cut].to_vec()
                };
                assert!(
                    dev == want,
                    "pass {pass} layer {layer} {}: device rows ({cfg:?})",
                    t.key
                );
            }
            Ok(())
        })
        .unwrap_or_else(|e| panic!("{cfg:?}: {e}"));
        let st = s.last_pass_stats();
        assert_eq!(st.layer_bytes + st.cpu.bytes, model.total_layer_bytes());
    }
}

#[test]
fn gpu_device_rows_and_host_rows_are_the_files_bytes() {
    let Some(_ctx) = common::gpu("gpu_device_rows_and_host_rows") else {
        return;
    };
    let mut rng = common::rng("gpu_device_rows_and_host_rows");
    let dir = tempdir();
    let sub = |name: &str| {
        let d = dir.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        d
    };
    let bf16_model = small_model(&sub("bf16"), &mut rng, 4, DType::BF16);
    let f32_model = small_model(&sub("f32"), &mut rng, 4, DType::F32);
    let gguf = dir.path().join("q4_k.gguf");
    let spec = SynthGgufSpec {
        arch: Arch::Llama,
        shape: Shape {
            hidden: 256,
            intermediate: 512,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            vocab: 384,
        },
        ty: QuantType::Q4_K,
        tie: false,
        seed: rng.gen(),
    };
    write_gguf(&gguf, &spec, &mut |_, _| {}).unwrap();
    let gguf_model = ModelIndex::open(&gguf).unwrap();
    let base = StreamerConfig {
        device: Device::Cuda(0),
        dtype: None,
        reader_threads: 2,
        ..StreamerConfig::default()
    };
    for share in [0.5, rng.gen_range(0.05..0.95), 1.0] {
        let cpu_share = CpuShare::fraction(share).unwrap();
        for (model, dtype) in [
            (&bf16_model, None),
            (&f32_model, Some(DType::BF16)),
            (&gguf_model, None),
        ] {
            for (n_cpu, pinned, gpu) in [
                (0, Budget::None, Budget::None),
                (1, Budget::Auto, Budget::None),
                (0, Budget::Auto, Budget::Bytes(1 << 20)),
            ] {
                let cfg = StreamerConfig {
                    cpu_share,
                    dtype,
                    n_cpu,
                    pinned_cache: pinned,
                    gpu_cache: gpu,
                    ..base.clone()
                };
                check_split(model, cfg);
            }
        }
    }
}
