//! The CPU/GPU row split on the host backend: the device view of each 2-D
//! weight holds its first rows and the host view the rest, both exactly the
//! file's bytes, for every stored type; slots shrink with the share; bad
//! shares are errors naming the option.

mod common;

use common::models::{read_tensor, small_gguf, small_model};
use common::tempdir;
use layer_streamer::pipeline::ROW_MULTIPLE;
use layer_streamer::quant::QuantType;
use layer_streamer::synth::{write_model, Arch, Shape, SynthSpec};
use layer_streamer::{Budget, CpuShare, DType, Device, LayerStreamer, ModelIndex, StreamerConfig};
use rand::Rng;

fn config(share: f64, rng: &mut impl Rng) -> StreamerConfig {
    StreamerConfig {
        device: Device::Host,
        dtype: None,
        cpu_share: CpuShare::fraction(share).unwrap(),
        n_gpu: rng.gen_range(0..3),
        n_cpu: rng.gen_range(0..2),
        n_cpu_pinned: rng.gen_range(1..3),
        reader_threads: 2,
        pinned_cache: [Budget::None, Budget::Auto][rng.gen_range(0..2)],
        gpu_cache: [Budget::None, Budget::Bytes(1 << 20)][rng.gen_range(0..2)],
        ..StreamerConfig::default()
    }
}

/// Runs two passes and checks, for every tensor, that the device view and
/// the host view together are the file's bytes, and that the layers the
/// GPU cache keeps are whole; returns the host bytes of one pass.
fn check_split(model: &ModelIndex, s: &mut LayerStreamer, share: f64) -> u64 {
    let resident = s.resident_layers();
    let all_resident = resident.len() == model.num_layers();
    assert_eq!(s.cpu_share(), if all_resident { 0.0 } else { share });
    let mut host_total = 0;
    for _ in 0..2 {
        host_total = s
            .run_pass(0u64, |mut total, w, layer, _| {
                assert_eq!(w.cpu_share(), if all_resident { 0.0 } else { share });
                for t in &model.layers()[layer].tensors {
                    let want = read_tensor(model, &t.info);
                    let dev = w.tensor(&t.key)?;
                    let dev_bytes = w.host_bytes(&dev).expect("host backend bytes");
                    let Some(h) = w.host_rows(&t.key) else {
                        let whole = t.info.shape.len() != 2 || resident.contains(&layer);
                        assert!(whole, "layer {layer} {}: a 2-D weight not split", t.key);
                        assert!(dev_bytes == &want[..], "layer {layer} {}: bytes", t.key);
                        continue;
                    };
                    let rows = t.info.shape[0];
                    assert_eq!(dev.shape(), &[h.first_row(), h.cols()][..]);
                    assert_eq!(h.first_row() + h.rows(), rows, "{}", t.key);
                    assert_eq!(h.cols(), t.info.shape[1]);
                    assert!(h.rows() > 0);
                    assert!(
                        !resident.contains(&layer),
                        "layer {layer} is resident and split"
                    );
                    assert!(
                        h.rows() % ROW_MULTIPLE == 0 || h.first_row() == 0,
                        "{}: {} CPU rows of {rows}",
                        t.key,
                        h.rows()
                    );
                    let want_cpu = (share * rows as f64).round() as usize;
                    assert!(h.rows().abs_diff(want_cpu) < ROW_MULTIPLE, "{}", t.key);
                    let ty = t.info.quant.or_else(|| QuantType::from_dtype(t.info.dtype));
                    assert_eq!(Some(h.ty()), ty);
                    assert_eq!(h.matrix()?.rows(), h.rows());
                    let cut = dev_bytes.len();
                    assert_eq!(cut + h.bytes().len(), want.len(), "{}", t.key);
                    assert!(
                        dev_bytes == &want[..cut],
                        "layer {layer} {}: device rows",
                        t.key
                    );
                    assert!(
                        h.bytes() == &want[cut..],
                        "layer {layer} {}: CPU rows",
                        t.key
                    );
                    total += h.bytes().len() as u64;
                }
                let keys: Vec<&str> = w.host_row_keys().collect();
                assert_eq!(
                    keys.len(),
                    w.tensors()
                        .filter(|v| w.host_rows(v.key()).is_some())
                        .count()
                );
                Ok(total)
            })
            .unwrap_or_else(|e| panic!("share {share}: {e}"));
        let st = s.last_pass_stats();
        assert_eq!(st.cpu.bytes, host_total);
        assert_eq!(st.cpu_share, s.cpu_share());
        assert_eq!(st.layers, model.num_layers());
        assert_eq!(st.layer_bytes + host_total, model.total_layer_bytes());
    }
    host_total
}

#[test]
fn both_views_are_the_files_rows_for_every_stored_type() {
    let mut rng = common::rng("both_views_are_the_files_rows_for_every_stored_type");
    let dir = tempdir();
    let mut models = Vec::new();
    for dtype in [DType::BF16, DType::F16, DType::F32] {
        let d = dir.path().join(dtype.to_string());
        std::fs::create_dir(&d).unwrap();
        models.push(small_model(&d, &mut rng, 3, dtype));
    }
    for ty in QuantType::ALL.into_iter().filter(|t| t.is_quantized()) {
        models.push(small_gguf(dir.path(), ty, (2, 512, 384), &mut rng));
    }
    for model in &models {
        let share = [rng.gen_range(0.05..0.95), 0.5, 1.0][rng.gen_range(0..3)];
        let cfg = config(share, &mut rng);
        let mut s = LayerStreamer::builder(model)
            .config(cfg.clone())
            .build()
            .unwrap();
        assert_eq!(s.model().total_layer_bytes(), model.total_layer_bytes());
        let host = check_split(model, &mut s, share);
        let streams = s.resident_layers().len() < model.num_layers();
        assert_eq!(host > 0, streams, "share {share}: CPU rows {host}");
    }
}

#[test]
fn shares_zero_half_and_one_stream_less_as_the_share_grows() {
    let mut rng = common::rng("shares_zero_half_and_one_stream_less_as_the_share_grows");
    let dir = tempdir();
    // Tensors whose CPU rows span more than two 4096-byte read units: the
    // reads of a layer are widened to them, so the rows of smaller tensors
    // share the device's reads and their slot does not shrink.
    let spec = SynthSpec {
        arch: [Arch::Llama, Arch::Qwen2][rng.gen_range(0..2)],
        shape: Shape {
            hidden: 256,
            intermediate: 512,
            layers: 4,
            heads: 4,
            kv_heads: 2,
            vocab: 320,
        },
        dtype: DType::BF16,
        tie: rng.gen_bool(0.5),
        shard_size: rng.gen_range(300_000..2_000_000),
        seed: rng.gen(),
        threads: 1,
    };
    write_model(dir.path(), &spec).unwrap();
    let model = ModelIndex::open(dir.path()).unwrap();
    let mut slot = Vec::new();
    for share in [0.0, 0.5, 1.0] {
        let cfg = StreamerConfig {
            gpu_cache: Budget::None,
            ..config(share, &mut rng)
        };
        let mut s = LayerStreamer::builder(&model).config(cfg).build().unwrap();
        let host = if share == 0.0 {
            let n = s.run_pass(0, |n, w, _, _| {
                assert!(w.host_row_keys().next().is_none());
                assert!(w.tensors().all(|v| w.host_rows(v.key()).is_none()));
                Ok(n + 1)
            });
            assert_eq!(n.unwrap(), model.num_layers());
            assert_eq!(s.last_pass_stats().cpu.bytes, 0);
            0
        } else {
            check_split(&model, &mut s, share)
        };
        let matrices: u64 = model
            .layers()
            .iter()
            .flat_map(|l| &l.tensors)
            .filter(|t| t.info.shape.len() == 2)
            .map(|t| t.info.len)
            .sum();
        if share == 1.0 {
            assert_eq!(host, matrices, "share 1 leaves every matrix on the CPU");
        }
        slot.push(s.memory().gpu_slot_size);
    }
    assert!(
        slot[0] > slot[1] && slot[1] > slot[2],
        "slot sizes {slot:?}"
    );
}

#[test]
fn bad_shares_are_errors_naming_the_option() {
    let mut rng = common::rng("bad_shares_are_errors_naming_the_option");
    let dir = tempdir();
    let model = small_model(dir.path(), &mut rng, 2, DType::BF16);
    for bad in [f64::NAN, -0.5, 1.5, f64::INFINITY] {
        let e = LayerStreamer::builder(&model)
            .device(Device::Host)
            .cpu_share(CpuShare::Fixed(bad))
            .build()
            .err()
            .expect("a bad share builds no streamer");
        assert!(e.to_string().contains("cpu_share"), "{bad}: {e}");
        let e = CpuShare::fraction(bad).unwrap_err();
        assert!(e.to_string().contains("CPU share"), "{bad}: {e}");
    }
    // On the host backend the device is the CPU: `auto` splits nothing.
    let s = LayerStreamer::builder(&model)
        .device(Device::Host)
        .cpu_share(CpuShare::Auto)
        .build()
        .unwrap();
    assert_eq!(s.cpu_share(), 0.0);
}
