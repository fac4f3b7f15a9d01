//! Host dequantization into f16 (`quant::dequantize_f16`,
//! `quant::fp8::dequantize_f16`) against the f32 dequantization rounded to
//! f16 here, independently: random blocks of every type with extreme f16
//! scales (so that values past f16's range occur and must saturate), and
//! random FP8 weights of both formats with extreme scales in every layout.

mod common;
#[path = "common/quant_blocks.rs"]
mod quant_blocks;

use half::f16;
use layer_streamer::quant::fp8::{self, Fp8Layout, ScaleLayout};
use layer_streamer::quant::{self, QuantType};
use layer_streamer::DType;
use rand::Rng;

/// The f16 bits the dequantizers must give for the f32 value `x`: NaN is
/// `0x7e00`; beyond ±65504 (infinities too) the largest finite f16 of that
/// sign; else `x` rounded to nearest even.
fn want_bits(x: f32) -> u16 {
    if x.is_nan() {
        0x7e00
    } else if x > 65504.0 {
        0x7bff
    } else if x < -65504.0 {
        0xfbff
    } else {
        f16::from_f32(x).to_bits()
    }
}

#[test]
fn every_type_dequantizes_to_f16_as_its_f32_values_rounded() {
    let mut rng = common::rng("every_type_dequantizes_to_f16_as_its_f32_values_rounded");
    for ty in QuantType::ALL {
        let n_blocks = rng.gen_range(64..128);
        let blocks = quant_blocks::random_blocks(ty, n_blocks, &mut rng);
        let n = n_blocks * ty.block_elems() as usize;
        let mut wide = vec![0f32; n];
        quant::dequantize_f32(ty, &blocks, &mut wide).unwrap();
        let mut got = vec![f16::ZERO; n];
        quant::dequantize_f16(ty, &blocks, &mut got).unwrap();
        let mut saturated = 0;
        for (i, (x, g)) in wide.iter().zip(&got).enumerate() {
            let want = if ty == QuantType::F16 {
                u16::from_le_bytes([blocks[2 * i], blocks[2 * i + 1]])
            } else {
                want_bits(*x)
            };
            assert_eq!(
                g.to_bits(),
                want,
                "{ty} element {i} (block {}): f32 {x}, f16 {g}",
                i / ty.block_elems() as usize
            );
            assert!(!g.is_infinite(), "{ty} element {i}: {x} became {g}");
            saturated += usize::from(x.abs() > 65504.0);
        }
        // Scales of 65504 times codes of magnitude > 1 leave f16's range in
        // every block type and in f32 and bf16; the check above must have
        // seen some of them.
        if !matches!(ty, QuantType::F16) {
            assert!(saturated > 0, "{ty}: no value beyond f16's range was drawn");
        }
    }
}

#[test]
fn nan_and_infinite_inputs_are_canonical_nan_and_saturated() {
    let vals = [
        f32::from_bits(0x7fc1_2345),
        f32::from_bits(0xffa0_0001),
        f32::INFINITY,
        f32::NEG_INFINITY,
        65519.0,
        65520.0,
        -1e30,
        5.9604645e-8,
        2.9e-8,
    ];
    let bytes: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
    let mut got = vec![f16::ZERO; vals.len()];
    quant::dequantize_f16(QuantType::F32, &bytes, &mut got).unwrap();
    let bits: Vec<u16> = got.iter().map(|g| g.to_bits()).collect();
    // 65519 rounds to 65504 anyway; 65520 would round to inf; 2^-24 is the
    // smallest subnormal and 2.9e-8 (just under half of it) rounds to zero.
    assert_eq!(
        bits,
        [0x7e00, 0x7e00, 0x7bff, 0xfbff, 0x7bff, 0x7bff, 0xfbff, 0x0001, 0x0000]
    );
    let e = quant::dequantize_f16(QuantType::Q4_K, &[0; 144], &mut got).unwrap_err();
    assert!(e.to_string().contains("dequantize_f16"), "{e}");
}

/// Random scales of `dtype`, extremes included (zero, negative, tiny, huge,
/// infinity), as little-endian bytes.
fn random_fp8_scales(rng: &mut impl Rng, dtype: DType, n: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 * n);
    for _ in 0..n {
        let v: f32 = match rng.gen_range(0..10) {
            0 => 0.0,
            1 => -rng.gen_range(0.001f32..2.0),
            2 => 1e-38,
            3 => 3e38,
            4 => f32::INFINITY,
            5 => rng.gen_range(150.0f32..60000.0),
            _ => 2f32.powf(rng.gen_range(-12.0..4.0)),
        };
        match dtype {
            DType::F32 => out.extend(v.to_le_bytes()),
            DType::BF16 => out.extend(half::bf16::from_f32(v).to_le_bytes()),
            _ => out.extend(f16::from_f32(v).to_le_bytes()),
        }
    }
    out
}

#[test]
fn fp8_dequantizes_to_f16_as_its_f32_values_rounded() {
    let mut rng = common::rng("fp8_dequantizes_to_f16_as_its_f32_values_rounded");
    for format in [DType::F8E4M3, DType::F8E5M2] {
        for scale_dtype in [DType::F32, DType::BF16, DType::F16] {
            for layout in [
                ScaleLayout::BLOCK_128,
                ScaleLayout::Blocks { rows: 1, cols: 32 },
                ScaleLayout::PerChannel,
                ScaleLayout::PerTensor,
            ] {
                let (rows, cols) = (rng.gen_range(1..300), rng.gen_range(1..300));
                let l = Fp8Layout::new(format, rows, cols, scale_dtype, layout).unwrap();
                let n = l.elems() as usize;
                let weights = common::bytes(&mut rng, n);
                let scales = random_fp8_scales(&mut rng, scale_dtype, l.scale_count() as usize);
                let mut wide = vec![0f32; n];
                fp8::dequantize_f32(&l, &weights, &scales, &mut wide).unwrap();
                let mut got = vec![f16::ZERO; n];
                fp8::dequantize_f16(&l, &weights, &scales, &mut got).unwrap();
                let what = format!("{format} {layout} {scale_dtype} [{rows}, {cols}]");
                for (i, (x, g)) in wide.iter().zip(&got).enumerate() {
                    assert_eq!(
                        g.to_bits(),
                        want_bits(*x),
                        "{what}: element {i} (code {:#04x}): f32 {x}, f16 {g}",
                        weights[i]
                    );
                }
            }
        }
    }
}

/// The host's f16 of a tensor's stored bytes: block types and plain floats
/// through [`quant::dequantize_f16`].
fn stored_to_f16(info: &layer_streamer::checkpoint::TensorInfo, bytes: &[u8]) -> Vec<u8> {
    let ty = info
        .quant
        .or_else(|| QuantType::from_dtype(info.dtype))
        .unwrap();
    let n: usize = info.shape.iter().product();
    let mut out = vec![f16::ZERO; n];
    quant::dequantize_f16(ty, bytes, &mut out).unwrap();
    out.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// A quantized GGUF model asks for an f16 forward on CUDA; streamed (on the
/// host backend, which runs the same plan) in f16, every tensor of every
/// layer and every static is the host's f16 of its stored bytes, and the
/// pass still moves the stored bytes. bf16 checkpoints keep bf16, and a
/// compute dtype other than bf16 or f16 is refused naming the tensor.
#[test]
fn quantized_gguf_models_stream_in_f16() {
    use layer_streamer::llm::LlamaModel;
    use layer_streamer::synth::Arch;
    use layer_streamer::{Device, LayerStreamer, ModelIndex};

    let mut rng = common::rng("quantized_gguf_models_stream_in_f16");
    let dir = common::tempdir();
    let ty = common::models::block_types(&mut rng, 1)[0];
    let index = common::models::small_gguf(dir.path(), ty, (2, 512, 384), &mut rng);
    assert_eq!(LlamaModel::cuda_dtype(&index), DType::F16, "{ty}");

    let mut s = LayerStreamer::builder(&index)
        .device(Device::Host)
        .dtype(DType::F16)
        .build()
        .unwrap();
    let mut checked = 0;
    s.run_pass((), |(), w, layer, _| {
        for t in &index.layers()[layer].tensors {
            let v = w.tensor(&t.key)?;
            assert_eq!(v.dtype(), DType::F16, "{ty} {}", t.info.name);
            let want = stored_to_f16(&t.info, &common::models::read_tensor(&index, &t.info));
            let got = w.host_bytes(&v).unwrap();
            assert!(got == want, "{ty} layer {layer} {}", t.key);
            checked += 1;
        }
        Ok(())
    })
    .unwrap();
    assert_eq!(
        checked,
        index
            .layers()
            .iter()
            .map(|l| l.tensors.len())
            .sum::<usize>()
    );
    assert_eq!(s.last_pass_stats().layer_bytes, index.total_layer_bytes());
    for info in index.statics() {
        let t = s.load_static(&info.name).unwrap();
        assert_eq!(t.dtype(), DType::F16, "{}", info.name);
        let want = stored_to_f16(info, &common::models::read_tensor(&index, info));
        assert!(t.to_host().unwrap() == want, "{ty} {}", info.name);
    }

    let e = LayerStreamer::builder(&index)
        .device(Device::Host)
        .dtype(DType::F32)
        .build()
        .err()
        .expect("f32 is not a dequantization target");
    assert!(e.to_string().contains("bf16 or f16 only"), "{e}");

    let st = dir.path().join("bf16");
    common::models::synth(
        &st,
        Arch::Llama,
        "tiny",
        DType::BF16,
        false,
        1 << 40,
        rng.gen(),
    );
    let bf16_model = ModelIndex::open(&st).unwrap();
    assert_eq!(LlamaModel::cuda_dtype(&bf16_model), DType::BF16);
}
