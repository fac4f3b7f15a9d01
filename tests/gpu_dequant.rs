//! The device dequantization kernels (`kernels/dequant.cu`) against the host
//! dequantizer: random blocks of every type with extreme f16 scales must give
//! bit-identical bf16, with nothing written outside the output. Skips without
//! a driver unless `LS_REQUIRE_GPU=1`.

mod common;
#[path = "common/quant_blocks.rs"]
mod quant_blocks;

use half::bf16;
use layer_streamer::cuda::{DeviceBuffer, Stream};
use layer_streamer::quant::device::DequantKernels;
use layer_streamer::quant::{self, QuantType};
use layer_streamer::Error;
use rand::Rng;

const SENTINEL: u8 = 0xAB;
const SLACK: usize = 64;

#[test]
fn device_dequantization_is_bit_exact_with_the_host() {
    let test = "device_dequantization_is_bit_exact_with_the_host";
    let Some(ctx) = common::gpu(test) else { return };
    let mut rng = common::rng(test);
    let stream = Stream::new(&ctx).unwrap();
    let kernels = DequantKernels::load(&ctx).unwrap();
    for ty in QuantType::ALL {
        // A large case (more elements than one launch has threads, so the
        // grid-stride loop wraps) and a small one at an odd source offset.
        for (n_blocks, src_off) in [
            ((1usize << 21) / ty.block_elems() as usize, 0usize),
            (rng.gen_range(1..40), 1 + 2 * rng.gen_range(0..8)),
        ] {
            let blocks = quant_blocks::random_blocks(ty, n_blocks, &mut rng);
            let n = n_blocks * ty.block_elems() as usize;
            let mut want = vec![bf16::ZERO; n];
            quant::dequantize_bf16(ty, &blocks, &mut want).unwrap();

            let mut host_src = vec![SENTINEL; src_off + blocks.len() + SLACK];
            host_src[src_off..src_off + blocks.len()].copy_from_slice(&blocks);
            let src = DeviceBuffer::alloc(&ctx, host_src.len()).unwrap();
            src.copy_from_host(0, &host_src).unwrap();
            let dst_off = 2 * rng.gen_range(0..8);
            let dst = DeviceBuffer::alloc(&ctx, dst_off + 2 * n + SLACK).unwrap();
            dst.copy_from_host(0, &vec![SENTINEL; dst.len()]).unwrap();
            // SAFETY: src holds n_blocks whole blocks at src_off, dst has room
            // for n bf16 at dst_off; both live until the synchronize below.
            unsafe {
                kernels
                    .dequantize_bf16(
                        ty,
                        src.ptr() + src_off as u64,
                        dst.ptr() + dst_off as u64,
                        n as u64,
                        &stream,
                    )
                    .unwrap()
            };
            stream.synchronize().unwrap();
            let mut out = vec![0u8; dst.len()];
            dst.copy_to_host(0, &mut out).unwrap();
            let outside = out[..dst_off].iter().chain(&out[dst_off + 2 * n..]);
            assert!(
                outside.into_iter().all(|&b| b == SENTINEL),
                "{ty}: stray write"
            );
            for (i, (w, g)) in want.iter().zip(out[dst_off..].chunks_exact(2)).enumerate() {
                let got = u16::from_le_bytes([g[0], g[1]]);
                assert_eq!(
                    got,
                    w.to_bits(),
                    "{ty}: element {i} of {n} (block {}): device {} host {}",
                    i / ty.block_elems() as usize,
                    bf16::from_bits(got),
                    w
                );
            }
        }
    }
}

#[test]
fn partial_blocks_and_misaligned_outputs_are_refused() {
    let test = "partial_blocks_and_misaligned_outputs_are_refused";
    let Some(ctx) = common::gpu(test) else { return };
    let stream = Stream::new(&ctx).unwrap();
    let kernels = DequantKernels::load(&ctx).unwrap();
    let buf = DeviceBuffer::alloc(&ctx, 4096).unwrap();
    // SAFETY: each call is refused before anything is launched; the one with
    // n = 0 launches nothing.
    unsafe {
        let e = kernels
            .dequantize_bf16(QuantType::Q4_K, buf.ptr(), buf.ptr(), 255, &stream)
            .unwrap_err();
        assert!(
            matches!(e, Error::Input(ref m) if m.contains("block of 256")),
            "{e}"
        );
        let e = kernels
            .dequantize_bf16(QuantType::Q8_0, buf.ptr(), buf.ptr() + 1, 32, &stream)
            .unwrap_err();
        assert!(e.to_string().contains("not 2-byte aligned"), "{e}");
        kernels
            .dequantize_bf16(QuantType::Q8_0, buf.ptr(), buf.ptr(), 0, &stream)
            .unwrap();
    }
    stream.synchronize().unwrap();
}
