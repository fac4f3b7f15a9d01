//! Host quantization of f32 rows into ggml blocks.
//!
//! The 32-element types follow ggml's reference rounding (bit-exact with the
//! `gguf` Python package's `quants.quantize`); the K types use a
//! direct min/max fit per sub-block (no iterative search), which is simpler
//! and a little less accurate than llama.cpp's `quantize`, and writes blocks
//! of the same layout that any reader decodes.

use half::{bf16, f16};

use super::QuantType;
use crate::error::{Error, Result};

/// Quantizes `src` into blocks of `ty`. `src.len()` must be a multiple of the
/// type's block and, for quantized types, every value finite.
pub fn quantize(ty: QuantType, src: &[f32]) -> Result<Vec<u8>> {
    let be = ty.block_elems() as usize;
    if !src.len().is_multiple_of(be) {
        return Err(Error::Input(format!(
            "quantize: {} elements are not a multiple of {ty}'s block of {be}",
            src.len()
        )));
    }
    if ty.is_quantized() {
        if let Some((i, x)) = src.iter().enumerate().find(|(_, x)| !x.is_finite()) {
            return Err(Error::Input(format!(
                "quantize to {ty}: element {i} is {x}, not a finite number"
            )));
        }
    }
    let mut out = Vec::with_capacity(src.len() / be * ty.block_bytes() as usize);
    let block: fn(&[f32], &mut Vec<u8>) = match ty {
        QuantType::F32 => |x, o| x.iter().for_each(|v| o.extend(v.to_le_bytes())),
        QuantType::F16 => |x, o| {
            x.iter()
                .for_each(|v| o.extend(f16::from_f32(*v).to_bits().to_le_bytes()))
        },
        QuantType::BF16 => |x, o| {
            x.iter()
                .for_each(|v| o.extend(bf16::from_f32(*v).to_bits().to_le_bytes()))
        },
        QuantType::Q8_0 => q8_0,
        QuantType::Q4_0 => |x, o| q_sym(x, o, 4),
        QuantType::Q5_0 => |x, o| q_sym(x, o, 5),
        QuantType::Q4_1 => |x, o| q_affine(x, o, 4),
        QuantType::Q5_1 => |x, o| q_affine(x, o, 5),
        QuantType::Q4_K => |x, o| q_k(x, o, 4),
        QuantType::Q5_K => |x, o| q_k(x, o, 5),
        QuantType::Q6_K => q6_k,
    };
    for x in src.chunks_exact(be) {
        block(x, &mut out);
    }
    debug_assert_eq!(out.len(), src.len() / be * ty.block_bytes() as usize);
    Ok(out)
}

fn push_f16(o: &mut Vec<u8>, x: f32) {
    o.extend(f16::from_f32(x).to_bits().to_le_bytes());
}

/// The reciprocal of `d`, or 0 for a zero scale (an all-zero block).
fn inverse(d: f32) -> f32 {
    if d == 0.0 {
        0.0
    } else {
        1.0 / d
    }
}

fn q8_0(x: &[f32], o: &mut Vec<u8>) {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = inverse(d);
    push_f16(o, d);
    o.extend(x.iter().map(|v| (v * id).round() as i8 as u8));
}

/// The first element of largest magnitude, with its sign (a zero block's
/// first element keeps its sign of zero, as in ggml).
fn signed_absmax(x: &[f32]) -> f32 {
    x.iter()
        .skip(1)
        .fold(x[0], |m, &v| if v.abs() > m.abs() { v } else { m })
}

/// Q4_0 / Q5_0: `d = max / -2^(bits-1)`, values offset by `2^(bits-1)`.
/// `x * id + offset + 0.5` is rounded once (in f64), as ggml's reference
/// does with a fused multiply-add and the `gguf` Python package in f64.
fn q_sym(x: &[f32], o: &mut Vec<u8>, bits: u32) {
    let half = (1u32 << (bits - 1)) as f32;
    let top = (1u8 << bits) - 1;
    let d = signed_absmax(x) / -half;
    let id = inverse(d) as f64;
    push_f16(o, d);
    let bias = half as f64 + 0.5;
    let q: Vec<u8> = x
        .iter()
        .map(|&v| ((v as f64 * id + bias).trunc() as f32 as u8).min(top))
        .collect();
    push_nibbles_and_high(o, &q, bits);
}

/// Q4_1 / Q5_1: `d = (max - min) / (2^bits - 1)`, `m = min`.
fn q_affine(x: &[f32], o: &mut Vec<u8>, bits: u32) {
    let top = (1u8 << bits) - 1;
    // Strict comparisons keep the first of equal values (signed zeros), as ggml.
    let min = x
        .iter()
        .fold(f32::INFINITY, |m, &v| if v < m { v } else { m });
    let max = x
        .iter()
        .fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m });
    let d = (max - min) / top as f32;
    let id = inverse(d);
    push_f16(o, d);
    push_f16(o, min);
    let q: Vec<u8> = x
        .iter()
        .map(|v| (((v - min) * id + 0.5) as u8).min(top))
        .collect();
    push_nibbles_and_high(o, &q, bits);
}

/// The Q4_x/Q5_x payload: for 5 bits a little-endian u32 of fifth bits, then
/// 16 bytes whose low nibbles are elements 0..16 and high nibbles 16..32.
fn push_nibbles_and_high(o: &mut Vec<u8>, q: &[u8], bits: u32) {
    if bits == 5 {
        let h = q
            .iter()
            .enumerate()
            .fold(0u32, |h, (i, &v)| h | (((v >> 4) as u32 & 1) << i));
        o.extend(h.to_le_bytes());
    }
    o.extend((0..16).map(|j| (q[j] & 0x0f) | ((q[j + 16] & 0x0f) << 4)));
}

/// Q4_K / Q5_K: per sub-block of 32 a scale and a min (6 bits each, relative
/// to the block's f16 `d` and `dmin`), `x = (d * sc) * q - dmin * m`.
fn q_k(x: &[f32], o: &mut Vec<u8>, bits: u32) {
    let top = ((1u32 << bits) - 1) as f32;
    let mut scale = [0f32; 8];
    let mut min = [0f32; 8];
    for (j, sub) in x.chunks_exact(32).enumerate() {
        let lo = sub.iter().fold(0f32, |m, &v| m.min(v));
        let hi = sub.iter().fold(lo, |m, &v| m.max(v));
        scale[j] = (hi - lo) / top;
        min[j] = -lo;
    }
    let d = f16::from_f32(scale.iter().fold(0f32, |m, &v| m.max(v)) / 63.0);
    let dmin = f16::from_f32(min.iter().fold(0f32, |m, &v| m.max(v)) / 63.0);
    // Scales round up so that a sub-block's range never saturates; mins round
    // to nearest.
    let six_bits = |v: f32| v.clamp(0.0, 63.0) as u8;
    let sc: Vec<u8> = scale
        .iter()
        .map(|&s| six_bits((s * inverse(d.to_f32())).ceil()))
        .collect();
    let mn: Vec<u8> = min
        .iter()
        .map(|&m| six_bits((m * inverse(dmin.to_f32())).round()))
        .collect();
    o.extend(d.to_bits().to_le_bytes());
    o.extend(dmin.to_bits().to_le_bytes());
    o.extend(pack_scales_k4(&sc, &mn));
    let mut qh = [0u8; 32];
    let mut qs = [0u8; 128];
    for (j, sub) in x.chunks_exact(32).enumerate() {
        let dl = d.to_f32() * sc[j] as f32;
        let ml = dmin.to_f32() * mn[j] as f32;
        for (l, &v) in sub.iter().enumerate() {
            let q = ((v + ml) * inverse(dl)).round().clamp(0.0, top) as u8;
            qs[(j / 2) * 32 + l] |= (q & 0x0f) << (4 * (j % 2));
            qh[l] |= ((q >> 4) & 1) << j;
        }
    }
    if bits == 5 {
        o.extend(qh);
    }
    o.extend(qs);
}

/// The twelve scale bytes of Q4_K/Q5_K: six bits of each scale and min, the
/// inverse of `blocks::scale_min_k4`.
fn pack_scales_k4(sc: &[u8], mn: &[u8]) -> [u8; 12] {
    let mut s = [0u8; 12];
    for j in 0..8 {
        if j < 4 {
            s[j] |= sc[j] & 63;
            s[j + 4] |= mn[j] & 63;
        } else {
            s[j + 4] = (sc[j] & 0x0f) | ((mn[j] & 0x0f) << 4);
            s[j - 4] |= (sc[j] >> 4) << 6;
            s[j] |= (mn[j] >> 4) << 6;
        }
    }
    s
}

/// Q6_K: per 16 elements a signed 8-bit scale relative to the block's f16
/// `d`; values 0..64 offset by 32.
fn q6_k(x: &[f32], o: &mut Vec<u8>) {
    let mut scale = [0f32; 16];
    for (s, sub) in x.chunks_exact(16).enumerate() {
        scale[s] = signed_absmax(sub) / -32.0;
    }
    // 127, not 128: sub-blocks of either sign then fit the i8 scales unclamped.
    let d = f16::from_f32(signed_absmax(&scale) / -127.0);
    let id = inverse(d.to_f32());
    // Scales round away from zero, so that a sub-block's extreme value does
    // not saturate its 6-bit range.
    let sc: Vec<i8> = scale
        .iter()
        .map(|&s| {
            let v = s * id;
            (v.abs().ceil() * v.signum()).clamp(-128.0, 127.0) as i8
        })
        .collect();
    let mut ql = [0u8; 128];
    let mut qh = [0u8; 64];
    for (e, &v) in x.iter().enumerate() {
        let ds = d.to_f32() * sc[e / 16] as f32;
        let q = ((v * inverse(ds)).round().clamp(-32.0, 31.0) as i32 + 32) as u8;
        let (half, r) = (e / 128, e % 128);
        if r < 64 {
            ql[half * 64 + r] |= q & 0x0f;
        } else {
            ql[half * 64 + r - 64] |= (q & 0x0f) << 4;
        }
        qh[half * 32 + r % 32] |= (q >> 4) << (2 * (r / 32));
    }
    o.extend(ql);
    o.extend(qh);
    o.extend(sc.iter().map(|&s| s as u8));
    o.extend(d.to_bits().to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::dequantize_f32;
    use rand::{Rng, SeedableRng};

    /// Every type round-trips random rows within an error bound that its bits
    /// allow; the bound is relative to the row's largest magnitude.
    #[test]
    fn round_trip_error_is_within_each_types_resolution() {
        let seed: u64 = std::env::var("LS_SEED")
            .map(|s| s.parse().expect("LS_SEED must be a u64"))
            .unwrap_or_else(|_| rand::random());
        eprintln!("random seed {seed} (replay with LS_SEED={seed})");
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let n = 256 * 8;
        for ty in QuantType::ALL {
            let x: Vec<f32> = (0..n).map(|_| rng.gen_range(-2.0f32..2.0)).collect();
            let q = quantize(ty, &x).unwrap();
            assert_eq!(q.len() as u64, ty.row_bytes(n as u64).unwrap(), "{ty}");
            let mut y = vec![0f32; n];
            dequantize_f32(ty, &q, &mut y).unwrap();
            let worst = x
                .iter()
                .zip(&y)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            let bound = match ty {
                QuantType::F32 => 0.0,
                QuantType::F16 => 2e-3,
                QuantType::BF16 => 1.6e-2,
                QuantType::Q8_0 => 0.01,
                QuantType::Q6_K => 0.07,
                QuantType::Q5_1 | QuantType::Q5_K => 0.1,
                QuantType::Q4_1 | QuantType::Q4_K => 0.17,
                // Offsets of -8 and -16 leave one step short on the side
                // opposite the largest magnitude (ggml's design).
                QuantType::Q5_0 => 0.135,
                QuantType::Q4_0 => 0.26,
            };
            assert!(worst <= bound, "{ty}: worst error {worst} > {bound}");
        }
    }

    #[test]
    fn non_finite_input_and_partial_blocks_are_refused() {
        let e = quantize(QuantType::Q4_K, &[0.0; 255]).unwrap_err();
        assert!(e.to_string().contains("block of 256"), "{e}");
        let mut x = vec![0f32; 32];
        x[7] = f32::NAN;
        let e = quantize(QuantType::Q8_0, &x).unwrap_err();
        assert!(e.to_string().contains("element 7 is NaN"), "{e}");
    }
}
