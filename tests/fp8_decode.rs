//! FP8 decoding, encoding and dequantization (`quant::fp8`) checked bit for
//! bit against ml_dtypes (an independent float8 implementation, pinned in
//! scripts/test-requirements.txt) through scripts/fp8_reference.py: every
//! code of both formats, and random weights (NaN, infinities, subnormals,
//! zeros included) with random scales of every dtype and layout, extremes
//! included.

mod common;

use std::path::Path;

use half::{bf16, f16};
use layer_streamer::quant::fp8::{self, Fp8Layout, ScaleLayout};
use layer_streamer::DType;
use rand::Rng;

/// Runs scripts/fp8_reference.py with `args` in the test venv.
fn reference(args: &[&str]) {
    common::assets::python_script("fp8_reference.py", args);
}

fn read_f32(path: &Path) -> Vec<f32> {
    std::fs::read(path)
        .unwrap()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

#[test]
fn every_code_decodes_as_ml_dtypes_does() {
    let dir = common::tempdir();
    for (fmt, decode) in [
        ("e4m3", fp8::e4m3_to_f32 as fn(u8) -> f32),
        ("e5m2", fp8::e5m2_to_f32),
    ] {
        let out = dir.path().join(fmt);
        reference(&["decode", fmt, out.to_str().unwrap()]);
        let want = read_f32(&out);
        assert_eq!(want.len(), 256);
        for (b, w) in want.iter().enumerate() {
            let got = decode(b as u8);
            if w.is_nan() {
                assert!(got.is_nan(), "{fmt} {b:#04x}: {got} is not NaN");
            } else {
                assert_eq!(got.to_bits(), w.to_bits(), "{fmt} {b:#04x}: {got} vs {w}");
            }
        }
    }
}

#[test]
fn e4m3_encoding_matches_ml_dtypes() {
    let mut rng = common::rng("e4m3_encoding_matches_ml_dtypes");
    let dir = common::tempdir();
    // Magnitudes across the whole range (subnormals too), exact codes, and
    // the midpoints between neighbouring codes (ties to even).
    let mut x: Vec<f32> = (0..20_000)
        .map(|_| {
            let m = 2f32.powf(rng.gen_range(-13.0..8.8)).min(447.9);
            if rng.gen_bool(0.5) {
                -m
            } else {
                m
            }
        })
        .collect();
    for b in 0..0x7eu8 {
        let (lo, hi) = (fp8::e4m3_to_f32(b), fp8::e4m3_to_f32(b + 1));
        x.extend([lo, -lo, (lo + hi) / 2.0, -(lo + hi) / 2.0]);
    }
    let (src, dst) = (dir.path().join("x"), dir.path().join("codes"));
    let bytes: Vec<u8> = x.iter().flat_map(|v| v.to_le_bytes()).collect();
    std::fs::write(&src, bytes).unwrap();
    reference(&["encode", src.to_str().unwrap(), dst.to_str().unwrap()]);
    let want = std::fs::read(&dst).unwrap();
    for (v, w) in x.iter().zip(&want) {
        assert_eq!(fp8::f32_to_e4m3(*v), *w, "{v:e}");
    }
}

/// `n` scales of `dtype`, most near 1/448 … 10, some extreme: zero,
/// negative, the smallest and largest finite values, infinity.
fn random_scales(rng: &mut impl Rng, dtype: DType, n: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for _ in 0..n {
        let v: f32 = match rng.gen_range(0..12) {
            0 => 0.0,
            1 => -rng.gen_range(0.001f32..2.0),
            2 => 1e-38,
            3 => 3e38,
            4 => f32::INFINITY,
            _ => 2f32.powf(rng.gen_range(-12.0..4.0)),
        };
        match dtype {
            DType::F32 => out.extend(v.to_le_bytes()),
            DType::BF16 => out.extend(bf16::from_f32(v).to_bits().to_le_bytes()),
            _ => out.extend(f16::from_f32(v).to_bits().to_le_bytes()),
        }
    }
    out
}

#[test]
fn dequantization_is_bit_exact_against_ml_dtypes() {
    let mut rng = common::rng("dequantization_is_bit_exact_against_ml_dtypes");
    let dir = common::tempdir();
    let path = |n: &str| dir.path().join(n).to_str().unwrap().to_string();
    for format in [DType::F8E4M3, DType::F8E5M2] {
        for scale_dtype in [DType::F32, DType::BF16, DType::F16] {
            for layout in [
                ScaleLayout::BLOCK_128,
                ScaleLayout::PerChannel,
                ScaleLayout::PerTensor,
            ] {
                // Not multiples of 128, so that edge tiles are partial.
                let (rows, cols) = (rng.gen_range(1..300u64), rng.gen_range(1..400u64));
                let l = Fp8Layout::new(format, rows, cols, scale_dtype, layout).unwrap();
                let weights = common::bytes(&mut rng, l.elems() as usize);
                let scales = random_scales(&mut rng, scale_dtype, l.scale_count() as usize);
                std::fs::write(path("w"), &weights).unwrap();
                std::fs::write(path("s"), &scales).unwrap();
                let (tr, tc) = l.tile();
                let fmt = if format == DType::F8E4M3 {
                    "e4m3"
                } else {
                    "e5m2"
                };
                let sdt = match scale_dtype {
                    DType::F32 => "f32",
                    DType::BF16 => "bf16",
                    _ => "f16",
                };
                let dims = [rows, cols, tr, tc].map(|d| d.to_string());
                let mut args = vec!["dequant", fmt];
                args.extend(dims.iter().map(String::as_str));
                let (w, s, o) = (path("w"), path("s"), path("out"));
                args.extend([sdt, &w, &s, &o]);
                reference(&args);
                let want: Vec<u16> = std::fs::read(path("out"))
                    .unwrap()
                    .chunks_exact(2)
                    .map(|b| u16::from_le_bytes([b[0], b[1]]))
                    .collect();
                let mut got = vec![bf16::ZERO; l.elems() as usize];
                fp8::dequantize_bf16(&l, &weights, &scales, &mut got).unwrap();
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert_eq!(
                        g.to_bits(),
                        *w,
                        "{format} {layout} {scale_dtype} [{rows}, {cols}] element {i} \
                         (code {:#04x}): ours {g}, ml_dtypes {}",
                        weights[i],
                        bf16::from_bits(*w)
                    );
                }
                // The f32 path rounds to the same bf16.
                let mut wide = vec![0f32; l.elems() as usize];
                fp8::dequantize_f32(&l, &weights, &scales, &mut wide).unwrap();
                for (x, g) in wide.iter().zip(&got) {
                    assert!(x.is_nan() && g.is_nan() || bf16::from_f32(*x) == *g);
                }
            }
        }
    }
}
