//! Random ggml blocks for the dequantization tests: random payloads with
//! extreme f16 scales, free of NaN and infinity.
#![allow(dead_code)]

use layer_streamer::quant::QuantType;
use rand::rngs::StdRng;
use rand::Rng;

/// An f16 scale: half of the time one of the extremes (largest, smallest
/// normal, subnormals, zeros, either sign), else any finite value.
fn f16_scale(rng: &mut StdRng) -> u16 {
    const EXTREMES: [u16; 9] = [
        0x7bff, 0xfbff, 0x0400, 0x8400, 0x0001, 0x03ff, 0x8001, 0x0000, 0x8000,
    ];
    if rng.gen_bool(0.5) {
        return EXTREMES[rng.gen_range(0..EXTREMES.len())];
    }
    loop {
        let h: u16 = rng.gen();
        if h & 0x7c00 != 0x7c00 {
            return h;
        }
    }
}

/// Byte offsets of a block's f16 fields.
pub fn f16_fields(ty: QuantType) -> &'static [usize] {
    match ty {
        QuantType::Q8_0 | QuantType::Q4_0 | QuantType::Q5_0 => &[0],
        QuantType::Q4_1 | QuantType::Q5_1 | QuantType::Q4_K | QuantType::Q5_K => &[0, 2],
        QuantType::Q6_K => &[208],
        _ => &[],
    }
}

/// `n` random blocks of `ty`: random payload bytes, f16 scales from
/// [`f16_scale`], and no NaN or infinity anywhere.
pub fn random_blocks(ty: QuantType, n: usize, rng: &mut StdRng) -> Vec<u8> {
    let bb = ty.block_bytes() as usize;
    let mut b = vec![0u8; n * bb];
    rng.fill(&mut b[..]);
    for block in b.chunks_exact_mut(bb) {
        match ty {
            QuantType::F16 => block.copy_from_slice(&f16_scale(rng).to_le_bytes()),
            QuantType::BF16 => {
                while block[1] & 0x7f == 0x7f && block[0] & 0x80 != 0 {
                    rng.fill(&mut block[..]);
                }
            }
            QuantType::F32 => {
                while block[3] & 0x7f == 0x7f && block[2] & 0x80 != 0 {
                    rng.fill(&mut block[..]);
                }
            }
            _ => {
                for &at in f16_fields(ty) {
                    block[at..at + 2].copy_from_slice(&f16_scale(rng).to_le_bytes());
                }
            }
        }
    }
    b
}
