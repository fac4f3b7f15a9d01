//! Host dequantization of whole tensors (or rows) to f32, bf16 and f16.

use half::{bf16, f16};

use super::{blocks, QuantType};
use crate::error::{Error, Result};

/// A block decoder: `block_bytes` in, `block_elems` f32 out.
type BlockFn = fn(&[u8], &mut [f32]);

fn block_fn(ty: QuantType) -> Option<BlockFn> {
    Some(match ty {
        QuantType::Q8_0 => blocks::q8_0,
        QuantType::Q4_0 => blocks::q4_0,
        QuantType::Q4_1 => blocks::q4_1,
        QuantType::Q5_0 => blocks::q5_0,
        QuantType::Q5_1 => blocks::q5_1,
        QuantType::Q4_K => blocks::q4_k,
        QuantType::Q5_K => blocks::q5_k,
        QuantType::Q6_K => blocks::q6_k,
        QuantType::F32 | QuantType::F16 | QuantType::BF16 => return None,
    })
}

/// Checks that `src` is whole blocks of `ty` decoding to exactly `dst_len`
/// elements; returns the number of blocks.
fn check_lengths(ty: QuantType, src: usize, dst_len: usize, what: &str) -> Result<usize> {
    let bb = ty.block_bytes() as usize;
    let be = ty.block_elems() as usize;
    if !src.is_multiple_of(bb) {
        return Err(Error::Input(format!(
            "{what}: {src} bytes of {ty} are not whole blocks of {bb} bytes"
        )));
    }
    let n = src / bb;
    if n.checked_mul(be) != Some(dst_len) {
        return Err(Error::Input(format!(
            "{what}: {n} blocks of {ty} hold {} elements, the output has room for {dst_len}",
            n.saturating_mul(be)
        )));
    }
    Ok(n)
}

/// Decodes `src` (whole blocks of `ty`, as stored) into `dst`, which must hold
/// exactly the blocks' elements. Plain types are widened exactly.
pub fn dequantize_f32(ty: QuantType, src: &[u8], dst: &mut [f32]) -> Result<()> {
    check_lengths(ty, src.len(), dst.len(), "dequantize_f32")?;
    match block_fn(ty) {
        Some(f) => {
            let bb = ty.block_bytes() as usize;
            let be = ty.block_elems() as usize;
            for (b, o) in src.chunks_exact(bb).zip(dst.chunks_exact_mut(be)) {
                f(b, o);
            }
        }
        None => plain_to_f32(ty, src, dst),
    }
    Ok(())
}

/// Like [`dequantize_f32`], each value then rounded to bf16 (nearest even),
/// exactly as the device kernels do.
pub fn dequantize_bf16(ty: QuantType, src: &[u8], dst: &mut [bf16]) -> Result<()> {
    check_lengths(ty, src.len(), dst.len(), "dequantize_bf16")?;
    dequantize_rounded(
        ty,
        src,
        dst,
        (QuantType::BF16, bf16::from_bits),
        bf16::from_f32,
    );
    Ok(())
}

/// Decodes `src` into `dst` (lengths checked by the caller) a block at a time
/// through a small f32 buffer, rounding each value with `round`; a tensor of
/// the output type itself (`same.0`) is copied as stored (`same.1` of its
/// bits).
fn dequantize_rounded<T>(
    ty: QuantType,
    src: &[u8],
    dst: &mut [T],
    same: (QuantType, fn(u16) -> T),
    round: fn(f32) -> T,
) {
    if ty == same.0 {
        for (o, b) in dst.iter_mut().zip(src.chunks_exact(2)) {
            *o = same.1(u16::from_le_bytes([b[0], b[1]]));
        }
        return;
    }
    // No allocation per call beyond the buffer, no full f32 copy of the tensor.
    let be = ty.block_elems() as usize;
    let bb = ty.block_bytes() as usize;
    let mut tmp = [0f32; 256];
    for (b, o) in src.chunks_exact(bb).zip(dst.chunks_exact_mut(be)) {
        let t = &mut tmp[..be];
        match block_fn(ty) {
            Some(f) => f(b, t),
            None => plain_to_f32(ty, b, t),
        }
        for (d, &x) in o.iter_mut().zip(t.iter()) {
            *d = round(x);
        }
    }
}

/// Largest finite f16 magnitude.
pub const F16_MAX: f32 = 65504.0;

/// f32 → f16 as the dequantizers round: nearest even, saturating (finite
/// values beyond ±65504 and infinities become ±65504, as PTX's `.satfinite`
/// does), every NaN `0x7e00`.
///
/// Saturating rather than refusing: a block's f16 scale times a large code
/// leaves f16's range only for scales far above any trained model's (Q8_0
/// needs `|d| > 515`), the kernels cannot report per-value errors without a
/// device round trip per layer, and an inf would turn a whole row of logits
/// into NaN, where the largest f16 keeps the rest of the row usable.
pub fn f32_to_f16_sat(x: f32) -> f16 {
    if x.is_nan() {
        f16::from_bits(0x7e00)
    } else {
        f16::from_f32(x.clamp(-F16_MAX, F16_MAX))
    }
}

/// Like [`dequantize_f32`], each value then rounded to f16 with
/// [`f32_to_f16_sat`], exactly as the device kernels do; F16 is copied as
/// stored.
pub fn dequantize_f16(ty: QuantType, src: &[u8], dst: &mut [f16]) -> Result<()> {
    check_lengths(ty, src.len(), dst.len(), "dequantize_f16")?;
    dequantize_rounded(
        ty,
        src,
        dst,
        (QuantType::F16, f16::from_bits),
        f32_to_f16_sat,
    );
    Ok(())
}

/// F32, F16 and BF16 bytes (little-endian) widened to f32.
fn plain_to_f32(ty: QuantType, src: &[u8], dst: &mut [f32]) {
    match ty {
        QuantType::F32 => {
            for (o, b) in dst.iter_mut().zip(src.chunks_exact(4)) {
                *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        QuantType::F16 => {
            for (o, b) in dst.iter_mut().zip(src.chunks_exact(2)) {
                *o = f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
            }
        }
        QuantType::BF16 => {
            for (o, b) in dst.iter_mut().zip(src.chunks_exact(2)) {
                *o = bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
            }
        }
        _ => unreachable!("plain_to_f32 is only called for plain types"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_that_are_not_whole_blocks_are_errors() {
        let mut out = vec![0f32; 32];
        let e = dequantize_f32(QuantType::Q8_0, &[0u8; 33], &mut out).unwrap_err();
        assert!(e.to_string().contains("33 bytes of Q8_0"), "{e}");
        let e = dequantize_f32(QuantType::Q8_0, &[0u8; 68], &mut out).unwrap_err();
        assert!(e.to_string().contains("hold 64 elements"), "{e}");
    }

    #[test]
    fn q8_0_is_scale_times_value() {
        let d = f16::from_f32(0.5);
        let mut b = d.to_bits().to_le_bytes().to_vec();
        b.extend((0..32).map(|i| (i as i8 - 16) as u8));
        let mut out = vec![0f32; 32];
        dequantize_f32(QuantType::Q8_0, &b, &mut out).unwrap();
        for (i, x) in out.iter().enumerate() {
            assert_eq!(*x, (i as f32 - 16.0) * 0.5);
        }
    }
}
