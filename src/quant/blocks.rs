//! One block of each quantized type decoded to f32 (the ggml block layouts).
//!
//! Each product and sum is one f32 operation in the order ggml's reference and
//! the `gguf` Python package use (`d * q`, `d * q + m`, `(d * sc) * q - dmin * m`),
//! never fused, so the host, the device kernels and those references agree to
//! the bit.

use half::f16;

/// The f16 at `b[at..at + 2]` (little-endian), widened exactly.
#[inline]
pub(super) fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[at], b[at + 1]])).to_f32()
}

/// Sub-block `j` (0..8) of a Q4_K/Q5_K block's twelve scale bytes: its 6-bit
/// scale and 6-bit min.
#[inline]
pub(super) fn scale_min_k4(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0x0f) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    }
}

/// Q8_0: f16 `d`, 32 × i8.
pub(super) fn q8_0(b: &[u8], out: &mut [f32]) {
    let d = f16_at(b, 0);
    for (o, &q) in out.iter_mut().zip(&b[2..34]) {
        *o = q as i8 as f32 * d;
    }
}

/// Q4_0: f16 `d`, 16 bytes; low nibbles are elements 0..16, high nibbles 16..32.
pub(super) fn q4_0(b: &[u8], out: &mut [f32]) {
    let d = f16_at(b, 0);
    for (j, &q) in b[2..18].iter().enumerate() {
        out[j] = d * ((q & 0x0f) as i32 - 8) as f32;
        out[j + 16] = d * ((q >> 4) as i32 - 8) as f32;
    }
}

/// Q4_1: f16 `d`, f16 `m`, 16 bytes of nibbles as in Q4_0.
pub(super) fn q4_1(b: &[u8], out: &mut [f32]) {
    let (d, m) = (f16_at(b, 0), f16_at(b, 2));
    for (j, &q) in b[4..20].iter().enumerate() {
        out[j] = d * (q & 0x0f) as f32 + m;
        out[j + 16] = d * (q >> 4) as f32 + m;
    }
}

/// The 5-bit values of a Q5_0/Q5_1 block: `qh` (a little-endian u32) holds
/// bit 4 of element `i` at bit `i`; `qs` the nibbles as in Q4_0.
#[inline]
fn q5_values(qh: &[u8], qs: &[u8]) -> [u8; 32] {
    let h = u32::from_le_bytes([qh[0], qh[1], qh[2], qh[3]]);
    let mut v = [0u8; 32];
    for (j, &q) in qs.iter().enumerate() {
        v[j] = (q & 0x0f) | ((((h >> j) & 1) as u8) << 4);
        v[j + 16] = (q >> 4) | ((((h >> (j + 16)) & 1) as u8) << 4);
    }
    v
}

/// Q5_0: f16 `d`, 4 bytes of high bits, 16 bytes of nibbles; `x = d * (q - 16)`.
pub(super) fn q5_0(b: &[u8], out: &mut [f32]) {
    let d = f16_at(b, 0);
    for (o, q) in out.iter_mut().zip(q5_values(&b[2..6], &b[6..22])) {
        *o = d * (q as i32 - 16) as f32;
    }
}

/// Q5_1: f16 `d`, f16 `m`, 4 bytes of high bits, 16 bytes of nibbles.
pub(super) fn q5_1(b: &[u8], out: &mut [f32]) {
    let (d, m) = (f16_at(b, 0), f16_at(b, 2));
    for (o, q) in out.iter_mut().zip(q5_values(&b[4..8], &b[8..24])) {
        *o = d * q as f32 + m;
    }
}

/// Q4_K: f16 `d`, f16 `dmin`, 12 scale bytes, 128 bytes of nibbles. Each 32
/// bytes of nibbles hold two sub-blocks of 32: low nibbles, then high.
pub(super) fn q4_k(b: &[u8], out: &mut [f32]) {
    let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
    let scales = &b[4..16];
    let qs = &b[16..144];
    for j in 0..8 {
        let (sc, m) = scale_min_k4(j, scales);
        let (dl, ml) = (d * sc as f32, dmin * m as f32);
        let chunk = &qs[(j / 2) * 32..(j / 2) * 32 + 32];
        let shift = 4 * (j % 2);
        for (l, &q) in chunk.iter().enumerate() {
            out[j * 32 + l] = dl * ((q >> shift) & 0x0f) as f32 - ml;
        }
    }
}

/// Q5_K: like Q4_K, with 32 bytes of fifth bits before the nibbles: bit `j`
/// of byte `l` belongs to element `l` of sub-block `j`.
pub(super) fn q5_k(b: &[u8], out: &mut [f32]) {
    let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
    let scales = &b[4..16];
    let qh = &b[16..48];
    let qs = &b[48..176];
    for j in 0..8 {
        let (sc, m) = scale_min_k4(j, scales);
        let (dl, ml) = (d * sc as f32, dmin * m as f32);
        let chunk = &qs[(j / 2) * 32..(j / 2) * 32 + 32];
        let shift = 4 * (j % 2);
        for l in 0..32 {
            let q = ((chunk[l] >> shift) & 0x0f) | (((qh[l] >> j) & 1) << 4);
            out[j * 32 + l] = dl * q as f32 - ml;
        }
    }
}

/// The 6-bit value (0..64) of element `e` (0..256) of a Q6_K block.
#[inline]
pub(super) fn q6_k_value(ql: &[u8], qh: &[u8], e: usize) -> u8 {
    let (half, r) = (e / 128, e % 128);
    let (group, l) = (r / 32, r % 32);
    let low = if r < 64 {
        ql[half * 64 + r] & 0x0f
    } else {
        ql[half * 64 + r - 64] >> 4
    };
    let high = (qh[half * 32 + l] >> (2 * group)) & 3;
    low | (high << 4)
}

/// Q6_K: 128 bytes of low nibbles, 64 bytes of high bit pairs, 16 signed
/// scales (one per 16 elements), f16 `d`; `x = (d * scale) * (q - 32)`.
pub(super) fn q6_k(b: &[u8], out: &mut [f32]) {
    let (ql, qh, scales) = (&b[0..128], &b[128..192], &b[192..208]);
    let d = f16_at(b, 208);
    for (s, (&sc, o)) in scales.iter().zip(out.chunks_exact_mut(16)).enumerate() {
        let ds = d * sc as i8 as f32;
        for (k, x) in o.iter_mut().enumerate() {
            *x = ds * (q6_k_value(ql, qh, s * 16 + k) as i32 - 32) as f32;
        }
    }
}
