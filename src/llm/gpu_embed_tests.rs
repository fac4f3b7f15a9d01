//! Unit tests of the embedding lookup: the host gather's rounding and the
//! choice of the device lookup.

use super::*;
use rand::Rng;

use crate::test_rng::rng;

/// A random `[rows, hidden]` matrix stored as `ty`.
fn stored(ty: QuantType, rows: usize, hidden: usize, rng: &mut impl Rng) -> Vec<u8> {
    let x: Vec<f32> = (0..rows * hidden)
        .map(|_| rng.gen_range(-3.0f32..3.0) * 10f32.powi(rng.gen_range(-3..5)))
        .collect();
    match ty {
        QuantType::F32 => x.iter().flat_map(|v| v.to_le_bytes()).collect(),
        QuantType::F16 => x
            .iter()
            .flat_map(|v| f16::from_f32(*v).to_le_bytes())
            .collect(),
        QuantType::BF16 => x
            .iter()
            .flat_map(|v| bf16::from_f32(*v).to_le_bytes())
            .collect(),
        _ => quant::quantize(ty, &x).unwrap(),
    }
}

#[test]
fn the_device_reads_blocks_and_the_model_dtype_and_the_host_rounds_other_floats() {
    for ty in QuantType::ALL {
        for dtype in [DType::BF16, DType::F16, DType::F32] {
            let want = if ty.is_quantized() {
                true
            } else {
                dtype != DType::F32 && ty.dtype() == Some(dtype)
            };
            assert_eq!(device_reads(ty, dtype), want, "{ty} in {dtype}");
        }
    }
}

#[test]
fn gathered_rows_are_the_matrix_rounded_to_the_dtype_and_widened() {
    let mut rng = rng();
    for ty in QuantType::ALL {
        let hidden = ty.block_elems() as usize * rng.gen_range(1..4);
        let rows = rng.gen_range(1..40);
        let bytes = stored(ty, rows, hidden, &mut rng);
        let mut wide = vec![0f32; rows * hidden];
        quant::dequantize_f32(ty, &bytes, &mut wide).unwrap();
        let tokens: Vec<u32> = (0..rng.gen_range(0..20))
            .map(|_| rng.gen_range(0..rows as u32))
            .collect();
        for dtype in [DType::BF16, DType::F16] {
            let mut got = vec![f32::NAN; tokens.len() * hidden];
            gather_rows(&bytes, ty, hidden, dtype, &tokens, &mut got).unwrap();
            for (i, &tok) in tokens.iter().enumerate() {
                for j in 0..hidden {
                    let x = wide[tok as usize * hidden + j];
                    let want = match (dtype, ty) {
                        (DType::F16, QuantType::F16) => x,
                        (DType::F16, _) => quant::f32_to_f16_sat(x).to_f32(),
                        _ => bf16::from_f32(x).to_f32(),
                    };
                    let g = got[i * hidden + j];
                    assert_eq!(
                        g.to_bits(),
                        want.to_bits(),
                        "{ty} {dtype} token {tok} [{j}]"
                    );
                }
            }
        }
        let mut out = vec![0f32; hidden];
        let e = gather_rows(&bytes, ty, hidden, DType::F16, &[rows as u32], &mut out).unwrap_err();
        assert!(e.to_string().contains("outside the embedding"), "{e}");
        let e = gather_rows(&bytes, ty, hidden, DType::F32, &[0], &mut out).unwrap_err();
        assert!(e.to_string().contains("bf16 or f16"), "{e}");
    }
}
