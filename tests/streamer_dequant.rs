//! Where quantized weights become the compute dtype, on the host backend:
//! with `dequant use` every ggml-block and FP8 weight (and each FP8 scale)
//! reaches the layer function as its file's bytes with its quant type or
//! scale named, while plain floats are still cast; with `dequant slot` (and
//! `auto`) they arrive dequantized, equal to the host's dequantizers; `use`
//! needs smaller slots. Bad values are errors naming the option.

mod common;

use common::models::{read_tensor, small_fp8, small_gguf};
use common::tempdir;
use half::f16;
use layer_streamer::quant::{self, fp8, QuantType};
use layer_streamer::{DType, Dequant, Device, LayerStreamer, ModelIndex, StreamerConfig};
use rand::Rng;

fn streamer(model: &ModelIndex, dequant: Dequant, rng: &mut impl Rng) -> LayerStreamer {
    let cfg = StreamerConfig {
        device: Device::Host,
        dtype: Some(DType::F16),
        dequant,
        n_gpu: rng.gen_range(1..3),
        reader_threads: 2,
        ..StreamerConfig::default()
    };
    LayerStreamer::builder(model).config(cfg).build().unwrap()
}

fn f16_bytes(v: &[f16]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// What `dequant slot` makes of `info`'s stored bytes in f16.
fn dequantized(model: &ModelIndex, layer: usize, key: &str) -> Vec<u8> {
    let l = &model.layers()[layer];
    let t = l.tensors.iter().find(|t| t.key == key).unwrap();
    let stored = read_tensor(model, &t.info);
    let n = t.info.shape.iter().product::<usize>();
    let mut out = vec![f16::ZERO; n];
    match &t.info.scale {
        Some(scale) => {
            let s = l
                .tensors
                .iter()
                .find(|s| s.info.name == scale.tensor)
                .unwrap();
            let layout = fp8::Fp8Layout::of(t.info.dtype, &t.info.shape, scale).unwrap();
            let scales = read_tensor(model, &s.info);
            fp8::dequantize_f16(&layout, &stored, &scales, &mut out).unwrap();
        }
        None => {
            let ty = t.info.quant.or_else(|| QuantType::from_dtype(t.info.dtype));
            quant::dequantize_f16(ty.unwrap(), &stored, &mut out).unwrap();
        }
    }
    f16_bytes(&out)
}

/// Checks every view of two passes against the file: stored weights as
/// stored under `use`, dequantized under `slot`; everything else in f16.
fn check_views(model: &ModelIndex, s: &mut LayerStreamer, keep: bool) -> usize {
    let mut kept = 0;
    for _ in 0..2 {
        kept = s
            .run_pass(0usize, |mut kept, w, layer, _| {
                let scales: Vec<&str> = model.layers()[layer]
                    .tensors
                    .iter()
                    .filter_map(|t| t.info.scale.as_ref().map(|s| s.tensor.as_str()))
                    .collect();
                for t in &model.layers()[layer].tensors {
                    let v = w.tensor(&t.key)?;
                    let got = w.host_bytes(&v).expect("host backend bytes");
                    let info = &t.info;
                    let blocks = info.quant.is_some() || info.scale.is_some();
                    let stored_scale = scales.contains(&info.name.as_str());
                    assert_eq!(v.shape(), &info.shape[..], "{}", info.name);
                    if keep && (blocks || stored_scale) {
                        assert!(got == &read_tensor(model, info)[..], "{}: bytes", info.name);
                        assert_eq!(v.dtype(), info.dtype, "{}", info.name);
                        assert_eq!(v.quant(), info.quant, "{}", info.name);
                        assert_eq!(v.fp8_scale(), info.scale.as_ref(), "{}", info.name);
                        kept += 1;
                    } else if blocks || info.dtype != DType::F32 {
                        assert_eq!(v.dtype(), DType::F16, "{}", info.name);
                        assert!(v.quant().is_none() && v.fp8_scale().is_none());
                        let want = dequantized(model, layer, &t.key);
                        assert!(got == &want[..], "{}: f16 values", info.name);
                    } else {
                        assert_eq!(v.dtype(), DType::F16, "{}: a plain float", info.name);
                    }
                }
                Ok(kept)
            })
            .unwrap();
    }
    kept
}

#[test]
fn use_hands_over_stored_blocks_and_slot_dequantizes_them() {
    let mut rng = common::rng("use_hands_over_stored_blocks_and_slot_dequantizes_them");
    let dir = tempdir();
    let mut models: Vec<ModelIndex> = QuantType::ALL
        .into_iter()
        .filter(|t| t.is_quantized())
        .map(|ty| {
            let inter = 256 * rng.gen_range(1..3);
            small_gguf(dir.path(), ty, (2, inter, 320), &mut rng)
        })
        .collect();
    models.push(small_fp8(dir.path(), &mut rng, 2));
    for model in &models {
        let mut slots = Vec::new();
        for dequant in Dequant::ALL {
            let mut s = streamer(model, dequant, &mut rng);
            let kept = check_views(model, &mut s, dequant == Dequant::Use);
            assert_eq!(kept > 0, dequant == Dequant::Use, "{dequant:?}");
            assert_eq!(s.config().dequant, dequant);
            assert_eq!(s.last_pass_stats().layer_bytes, model.total_layer_bytes());
            slots.push(s.memory().gpu_slot_size);
        }
        // auto is slot to the streamer; use needs no room for f16 copies.
        assert_eq!(slots[0], slots[1]);
        assert!(slots[2] < slots[1], "slot sizes {slots:?}");
    }
}

#[test]
fn bad_dequant_values_are_errors_naming_the_option() {
    for ok in Dequant::ALL {
        assert_eq!(Dequant::parse(&ok.name().to_uppercase()).unwrap(), ok);
    }
    let mut cfg = StreamerConfig::default();
    let opt = StreamerConfig::OPTIONS
        .iter()
        .find(|o| o.flag == "dequant")
        .expect("a --dequant option");
    for bad in ["", "gpu", "slots", "1"] {
        let e = (opt.set)(&mut cfg, bad).unwrap_err().to_string();
        assert!(
            e.contains("dequant") && e.contains(&format!("{bad:?}")),
            "{e}"
        );
    }
    (opt.set)(&mut cfg, "use").unwrap();
    assert_eq!(cfg.dequant, Dequant::Use);
    assert_eq!((opt.get)(&cfg), "use");
}
