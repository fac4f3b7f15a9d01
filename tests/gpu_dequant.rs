//! The device dequantization kernels (`kernels/dequant.cu`) against the host
//! dequantizer: random blocks of every type with extreme f16 scales, and
//! random FP8 weights of both formats with extreme scales in every layout,
//! must give bit-identical bf16 and f16 (saturated where past f16's range),
//! with nothing written outside the output; an
//! FP8 model through the CUDA pipeline and forward pass. Skips without a
//! driver unless `LS_REQUIRE_GPU=1`.

mod common;
#[path = "common/quant_blocks.rs"]
mod quant_blocks;

use half::{bf16, f16};
use layer_streamer::cuda::{Context, DeviceBuffer, Stream};
use layer_streamer::llm::reference::rel_l2;
use layer_streamer::llm::{LlamaModel, ModelOptions};
use layer_streamer::quant::device::DequantKernels;
use layer_streamer::quant::fp8::{self, Fp8Layout, ScaleLayout};
use layer_streamer::quant::{self, QuantType};
use layer_streamer::synth::{quantize_fp8, Arch};
use layer_streamer::{DType, Device, Error, LayerStreamer, ModelIndex};
use rand::Rng;

const SENTINEL: u8 = 0xAB;
const SLACK: usize = 64;

/// The host's dequantization of `blocks` of `ty` into `to`, as 16-bit
/// patterns.
fn host_blocks(ty: QuantType, to: DType, blocks: &[u8], n: usize) -> Vec<u16> {
    if to == DType::F16 {
        let mut out = vec![f16::ZERO; n];
        quant::dequantize_f16(ty, blocks, &mut out).unwrap();
        out.iter().map(|x| x.to_bits()).collect()
    } else {
        let mut out = vec![bf16::ZERO; n];
        quant::dequantize_bf16(ty, blocks, &mut out).unwrap();
        out.iter().map(|x| x.to_bits()).collect()
    }
}

/// The host's dequantization of an FP8 weight into `to`, as 16-bit patterns.
fn host_fp8(l: &Fp8Layout, to: DType, weights: &[u8], scales: &[u8]) -> Vec<u16> {
    let n = l.elems() as usize;
    if to == DType::F16 {
        let mut out = vec![f16::ZERO; n];
        fp8::dequantize_f16(l, weights, scales, &mut out).unwrap();
        out.iter().map(|x| x.to_bits()).collect()
    } else {
        let mut out = vec![bf16::ZERO; n];
        fp8::dequantize_bf16(l, weights, scales, &mut out).unwrap();
        out.iter().map(|x| x.to_bits()).collect()
    }
}

#[test]
fn device_dequantization_is_bit_exact_with_the_host() {
    let test = "device_dequantization_is_bit_exact_with_the_host";
    let Some(ctx) = common::gpu(test) else { return };
    let mut rng = common::rng(test);
    let stream = Stream::new(&ctx).unwrap();
    let kernels = DequantKernels::load(&ctx).unwrap();
    for (ty, to) in QuantType::ALL
        .into_iter()
        .flat_map(|t| [(t, DType::BF16), (t, DType::F16)])
    {
        // A large case (more elements than one launch has threads, so the
        // grid-stride loop wraps) into a 16-byte aligned output, one block
        // and a few blocks at an odd source offset into outputs 2 bytes past
        // a 16-byte boundary and at a random even offset (the kernels store
        // 16, 4 or 2 bytes at a time by the output's alignment).
        for (n_blocks, src_off, dst_off) in [
            ((1usize << 21) / ty.block_elems() as usize, 0usize, 0usize),
            (1, 1 + 2 * rng.gen_range(0..8), 2),
            (
                rng.gen_range(2..40),
                1 + 2 * rng.gen_range(0..8),
                2 * rng.gen_range(0..8),
            ),
        ] {
            let blocks = quant_blocks::random_blocks(ty, n_blocks, &mut rng);
            let n = n_blocks * ty.block_elems() as usize;
            let want = host_blocks(ty, to, &blocks, n);

            let mut host_src = vec![SENTINEL; src_off + blocks.len() + SLACK];
            host_src[src_off..src_off + blocks.len()].copy_from_slice(&blocks);
            let src = DeviceBuffer::alloc(&ctx, host_src.len()).unwrap();
            src.copy_from_host(0, &host_src).unwrap();
            let dst = DeviceBuffer::alloc(&ctx, dst_off + 2 * n + SLACK).unwrap();
            dst.copy_from_host(0, &vec![SENTINEL; dst.len()]).unwrap();
            // SAFETY: src holds n_blocks whole blocks at src_off, dst has room
            // for n 16-bit values at dst_off; both live until the synchronize
            // below.
            unsafe {
                kernels
                    .dequantize(
                        ty,
                        to,
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
                "{ty} to {to}: stray write"
            );
            for (i, (w, g)) in want.iter().zip(out[dst_off..].chunks_exact(2)).enumerate() {
                let got = u16::from_le_bytes([g[0], g[1]]);
                assert_eq!(
                    got,
                    *w,
                    "{ty} to {to}: element {i} of {n} (block {}): device {got:#06x} host \
                     {w:#06x}",
                    i / ty.block_elems() as usize,
                );
            }
        }
    }
}

/// Rows `ids` of the `[_, hidden]` matrix of `ty` blocks, dequantized on
/// the host into `to` and widened to f32, one after another.
fn host_rows_widened(
    ty: QuantType,
    to: DType,
    blocks: &[u8],
    ids: &[u32],
    hidden: usize,
) -> Vec<f32> {
    let row_bytes = ty.row_bytes(hidden as u64).unwrap() as usize;
    let mut want = Vec::with_capacity(ids.len() * hidden);
    for &id in ids {
        let row = &blocks[id as usize * row_bytes..(id as usize + 1) * row_bytes];
        let bits = host_blocks(ty, to, row, hidden);
        want.extend(bits.iter().map(|&b| match to {
            DType::F16 => f16::from_bits(b).to_f32(),
            _ => bf16::from_bits(b).to_f32(),
        }));
    }
    want
}

/// A gather of a plain float type, and of rows that are not whole blocks,
/// are refused before anything is launched.
fn gathers_of_plain_floats_and_broken_rows_are_refused(
    ctx: &Context,
    kernels: &DequantKernels,
    stream: &Stream,
) {
    // SAFETY: refused before anything is launched.
    unsafe {
        let buf = DeviceBuffer::alloc(ctx, 4096).unwrap();
        let e = kernels
            .gather_rows_f32(
                QuantType::F16,
                DType::F16,
                buf.ptr(),
                buf.ptr(),
                buf.ptr(),
                1,
                32,
                stream,
            )
            .unwrap_err();
        assert!(e.to_string().contains("only block types"), "{e}");
        let e = kernels
            .gather_rows_f32(
                QuantType::Q4_K,
                DType::F16,
                buf.ptr(),
                buf.ptr(),
                buf.ptr(),
                1,
                100,
                stream,
            )
            .unwrap_err();
        assert!(e.to_string().contains("block of 256"), "{e}");
    }
}

/// The embedding lookup in a quantized matrix on the device: rows gathered
/// by random ids (repeats included) are the host's dequantization of those
/// rows into bf16 or f16, widened to f32, bit for bit, with nothing written
/// past the output.
#[test]
fn gathered_rows_are_the_host_rows_rounded_and_widened() {
    let test = "gathered_rows_are_the_host_rows_rounded_and_widened";
    let Some(ctx) = common::gpu(test) else { return };
    let mut rng = common::rng(test);
    let stream = Stream::new(&ctx).unwrap();
    let kernels = DequantKernels::load(&ctx).unwrap();
    let block_types = QuantType::ALL.into_iter().filter(|t| t.is_quantized());
    for (ty, to) in block_types.flat_map(|t| [(t, DType::BF16), (t, DType::F16)]) {
        let be = ty.block_elems() as usize;
        let (rows, hidden) = (rng.gen_range(1..200), be * rng.gen_range(1..12));
        let blocks = quant_blocks::random_blocks(ty, rows * hidden / be, &mut rng);
        let tokens = rng.gen_range(1..300);
        let ids: Vec<u32> = (0..tokens).map(|_| rng.gen_range(0..rows as u32)).collect();
        let want = host_rows_widened(ty, to, &blocks, &ids, hidden);
        let src = upload(&ctx, &blocks, 0);
        let id_bytes: Vec<u8> = ids.iter().flat_map(|i| i.to_le_bytes()).collect();
        let idb = upload(&ctx, &id_bytes, 0);
        let n = tokens * hidden;
        // Outputs 16-byte aligned or not (the kernels store 16 or 4 bytes
        // at a time by the output's alignment).
        let off = 4 * rng.gen_range(0..4);
        let dst = DeviceBuffer::alloc(&ctx, off + 4 * n + SLACK).unwrap();
        dst.copy_from_host(0, &vec![SENTINEL; dst.len()]).unwrap();
        // SAFETY: src holds `rows` rows of blocks and every id is below
        // rows; idb holds the ids, dst room for n f32s at off; all live until the
        // synchronize below.
        unsafe {
            kernels
                .gather_rows_f32(
                    ty,
                    to,
                    src.ptr(),
                    idb.ptr(),
                    dst.ptr() + off as u64,
                    tokens as u64,
                    hidden as u64,
                    &stream,
                )
                .unwrap()
        };
        stream.synchronize().unwrap();
        let mut out = vec![0u8; dst.len()];
        dst.copy_to_host(0, &mut out).unwrap();
        assert!(
            out[..off]
                .iter()
                .chain(&out[off + 4 * n..])
                .all(|&b| b == SENTINEL),
            "{ty} to {to}: stray write"
        );
        for (i, (w, g)) in want.iter().zip(out[off..].chunks_exact(4)).enumerate() {
            let got = f32::from_le_bytes([g[0], g[1], g[2], g[3]]);
            assert_eq!(
                got.to_bits(),
                w.to_bits(),
                "{ty} to {to}: token {} (row {}) element {}: device {got} host {w}",
                i / hidden,
                ids[i / hidden],
                i % hidden
            );
        }
    }
    gathers_of_plain_floats_and_broken_rows_are_refused(&ctx, &kernels, &stream);
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
        let e = kernels
            .dequantize(
                QuantType::Q8_0,
                DType::F32,
                buf.ptr(),
                buf.ptr(),
                32,
                &stream,
            )
            .unwrap_err();
        assert!(e.to_string().contains("bf16 or f16, not f32"), "{e}");
    }
    stream.synchronize().unwrap();
}

/// Random scales of `dtype`, extremes included (zero, negative, tiny, huge,
/// infinity), as little-endian bytes.
fn random_fp8_scales(rng: &mut impl Rng, dtype: DType, n: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 * n);
    for _ in 0..n {
        let v: f32 = match rng.gen_range(0..12) {
            // Finite scales that take E4M3 and E5M2 values past f16's range.
            11 => rng.gen_range(150.0f32..60000.0),
            0 => 0.0,
            1 => -rng.gen_range(0.001f32..2.0),
            2 => 1e-38,
            3 => 3e38,
            4 => f32::INFINITY,
            _ => 2f32.powf(rng.gen_range(-12.0..4.0)),
        };
        match dtype {
            DType::F32 => out.extend(v.to_le_bytes()),
            DType::BF16 => out.extend(bf16::from_f32(v).to_le_bytes()),
            _ => out.extend(half::f16::from_f32(v).to_le_bytes()),
        }
    }
    out
}

/// Uploads `bytes` at `off` into a buffer framed by sentinels.
fn upload(ctx: &layer_streamer::cuda::Context, bytes: &[u8], off: usize) -> DeviceBuffer {
    let mut host = vec![SENTINEL; off + bytes.len() + SLACK];
    host[off..off + bytes.len()].copy_from_slice(bytes);
    let buf = DeviceBuffer::alloc(ctx, host.len()).unwrap();
    buf.copy_from_host(0, &host).unwrap();
    buf
}

#[test]
fn device_fp8_dequantization_is_bit_exact_with_the_host() {
    let test = "device_fp8_dequantization_is_bit_exact_with_the_host";
    let Some(ctx) = common::gpu(test) else { return };
    let mut rng = common::rng(test);
    let stream = Stream::new(&ctx).unwrap();
    let kernels = DequantKernels::load(&ctx).unwrap();
    for (format, to) in [DType::F8E4M3, DType::F8E5M2]
        .into_iter()
        .flat_map(|f| [(f, DType::BF16), (f, DType::F16)])
    {
        for scale_dtype in [DType::F32, DType::BF16, DType::F16] {
            for layout in [
                ScaleLayout::BLOCK_128,
                ScaleLayout::PerChannel,
                ScaleLayout::PerTensor,
            ] {
                // A wide matrix (more columns than a launch's 64 × 256 threads
                // and more rows than its 264 blocks of rows cover, so both
                // strides wrap) and a small one at odd offsets.
                for (rows, cols, off) in [
                    (rng.gen_range(300..400), rng.gen_range(16_400..17_000), 0),
                    (
                        rng.gen_range(1..300),
                        rng.gen_range(1..300),
                        1 + 2 * rng.gen_range(0..8),
                    ),
                ] {
                    let l = Fp8Layout::new(format, rows, cols, scale_dtype, layout).unwrap();
                    let n = l.elems() as usize;
                    let weights = common::bytes(&mut rng, n);
                    let scales = random_fp8_scales(&mut rng, scale_dtype, l.scale_count() as usize);
                    let want = host_fp8(&l, to, &weights, &scales);

                    let src = upload(&ctx, &weights, off);
                    let sc = upload(&ctx, &scales, off + 2);
                    let dst_off = 2 * rng.gen_range(0..8);
                    let dst = DeviceBuffer::alloc(&ctx, dst_off + 2 * n + SLACK).unwrap();
                    dst.copy_from_host(0, &vec![SENTINEL; dst.len()]).unwrap();
                    // SAFETY: src holds the n codes at off, sc the scales at
                    // off + 2, dst room for n 16-bit values at dst_off; all
                    // live until the synchronize below.
                    unsafe {
                        kernels
                            .dequantize_fp8(
                                &l,
                                to,
                                src.ptr() + off as u64,
                                sc.ptr() + off as u64 + 2,
                                dst.ptr() + dst_off as u64,
                                &stream,
                            )
                            .unwrap()
                    };
                    stream.synchronize().unwrap();
                    let mut out = vec![0u8; dst.len()];
                    dst.copy_to_host(0, &mut out).unwrap();
                    let what = format!("{format} {layout} {scale_dtype} [{rows}, {cols}] to {to}");
                    let outside = out[..dst_off].iter().chain(&out[dst_off + 2 * n..]);
                    assert!(
                        outside.into_iter().all(|&b| b == SENTINEL),
                        "{what}: stray write"
                    );
                    for (i, (w, g)) in want.iter().zip(out[dst_off..].chunks_exact(2)).enumerate() {
                        let got = u16::from_le_bytes([g[0], g[1]]);
                        assert_eq!(
                            got, *w,
                            "{what}: element {i} (code {:#04x}): device {got:#06x} host {w:#06x}",
                            weights[i],
                        );
                    }
                }
            }
        }
    }
}

/// An FP8 model (quantized from a random bf16 one) through the CUDA
/// pipeline in bf16 and in f16: each FP8 weight arrives in its slot as the
/// host dequantization of its stored bytes, and the pass moves the stored
/// bytes; the forward pass on the GPU matches the host backend's logits.
#[test]
fn gpu_fp8_model_is_dequantized_in_the_pipeline() {
    let test = "gpu_fp8_model_is_dequantized_in_the_pipeline";
    let Some(_ctx) = common::gpu(test) else {
        return;
    };
    let mut rng = common::rng(test);
    let (src, dst) = (common::tempdir(), common::tempdir());
    common::models::synth(
        src.path(),
        Arch::Llama,
        "tiny",
        DType::BF16,
        rng.gen_bool(0.5),
        4_000_000_000,
        rng.gen(),
    );
    quantize_fp8(src.path(), dst.path(), &mut |_, _| {}).unwrap();
    let index = ModelIndex::open(dst.path()).unwrap();
    assert_eq!(LlamaModel::cuda_dtype(&index), DType::F16);
    for dtype in [DType::BF16, DType::F16] {
        check_fp8_model(test, &index, dtype, &mut rng);
    }
}

/// One FP8 model through the CUDA pipeline and forward pass in `dtype`.
fn check_fp8_model(test: &str, index: &ModelIndex, dtype: DType, rng: &mut impl Rng) {
    let mut s = LayerStreamer::builder(index)
        .device(Device::Cuda(0))
        .dtype(dtype)
        .build()
        .unwrap();
    let mut checked = 0;
    s.run_pass((), |(), w, layer, stream| {
        let cs = stream.cuda().expect("a CUDA stream");
        for t in &index.layers()[layer].tensors {
            let Some(scale) = &t.info.scale else { continue };
            let l = Fp8Layout::of(t.info.dtype, &t.info.shape, scale).unwrap();
            let codes = common::models::read_tensor(index, &t.info);
            let scales = common::models::read_tensor(index, index.tensor(&scale.tensor).unwrap());
            let want = host_fp8(&l, dtype, &codes, &scales);
            let v = w.tensor(&t.key)?;
            assert_eq!((v.dtype(), v.bytes()), (dtype, 2 * l.elems()));
            let mut got = vec![0u8; v.bytes() as usize];
            // SAFETY: the view is a live device range of `bytes` bytes while
            // the layer function runs; `got` outlives the synchronize.
            unsafe {
                layer_streamer::cuda::memcpy_dtoh_async(got.as_mut_ptr(), v.ptr(), got.len(), cs)?
            };
            cs.synchronize()?;
            let want: Vec<u8> = want.iter().flat_map(|x| x.to_le_bytes()).collect();
            assert!(
                got == want,
                "layer {layer} {}: device {dtype} differs from the host's",
                t.key
            );
            checked += 1;
        }
        Ok(())
    })
    .unwrap();
    assert_eq!(checked, 7 * index.num_layers());
    assert_eq!(s.last_pass_stats().layer_bytes, index.total_layer_bytes());

    let opts = ModelOptions {
        max_batch: 1,
        max_len: 64,
        max_tokens: 64,
        ..ModelOptions::default()
    };
    let prompt: Vec<u32> = (0..12).map(|_| rng.gen_range(0..1000)).collect();
    let mut gpu = LlamaModel::load(&s, opts).unwrap();
    let got = gpu.forward(&mut s, &[&prompt]).unwrap().remove(0);
    let mut h = LayerStreamer::builder(index)
        .device(Device::Host)
        .dtype(DType::BF16)
        .build()
        .unwrap();
    let mut host = LlamaModel::load(&h, opts).unwrap();
    let want = host.forward(&mut h, &[&prompt]).unwrap().remove(0);
    let err = rel_l2(&got, &want);
    eprintln!("{test}: GPU ({dtype}) against host logits rel_l2 {err:.2e}");
    assert!(err < 2e-2, "rel_l2 {err}");
}
