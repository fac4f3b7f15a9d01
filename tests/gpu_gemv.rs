//! The fused dequantize-and-multiply of a few tokens (`gemv_<type>_t<n>` in
//! `kernels/dequant.cu`) against an f64 product of the host's dequantized
//! weights rounded to bf16 or f16, for every block type, random shapes and
//! token counts, inputs with and without their low half, f32 outputs
//! written or accumulated and 16-bit outputs; and a quantized model whose
//! decoding passes (1 and 3 tokens) take the fused product, against the
//! same model with the weights dequantized in the slots (GEMMs). Skips
//! without a driver unless `LS_REQUIRE_GPU=1`.

mod common;
#[path = "common/quant_blocks.rs"]
mod quant_blocks;

use half::{bf16, f16};
use layer_streamer::cuda::{Context, DeviceBuffer, Stream};
use layer_streamer::llm::reference::rel_l2;
use layer_streamer::llm::{LlamaModel, ModelOptions, Precision};
use layer_streamer::quant::device::{DequantKernels, Gemv, GEMV_MAX_TOKENS};
use layer_streamer::quant::{self, QuantType};
use layer_streamer::{DType, Dequant, Device, LayerStreamer, ModelIndex, StreamerConfig};
use rand::rngs::StdRng;
use rand::Rng;

/// Bytes past every output, checked untouched.
const SLACK: usize = 64;

/// `n` random blocks of `ty` with moderate f16 scales, so that products
/// and sums stay far from the 16-bit ranges.
fn moderate_blocks(ty: QuantType, n: usize, rng: &mut StdRng) -> Vec<u8> {
    let mut b = quant_blocks::random_blocks(ty, n, rng);
    let bb = ty.block_bytes() as usize;
    for block in b.chunks_exact_mut(bb) {
        for &at in quant_blocks::f16_fields(ty) {
            let v = rng.gen_range(1e-3f32..2e-2) * if rng.gen_bool(0.5) { -1.0 } else { 1.0 };
            block[at..at + 2].copy_from_slice(&f16::from_f32(v).to_le_bytes());
        }
    }
    b
}

/// The host's dequantization of `blocks` rounded to `dtype`, widened.
fn host_weights(ty: QuantType, dtype: DType, blocks: &[u8], n: usize) -> Vec<f64> {
    if dtype == DType::F16 {
        let mut out = vec![f16::ZERO; n];
        quant::dequantize_f16(ty, blocks, &mut out).unwrap();
        out.iter().map(|x| x.to_f64()).collect()
    } else {
        let mut out = vec![bf16::ZERO; n];
        quant::dequantize_bf16(ty, blocks, &mut out).unwrap();
        out.iter().map(|x| x.to_f64()).collect()
    }
}

/// `x` rounded to `dtype`: its bits and its value.
fn to_16(x: f32, dtype: DType) -> (u16, f32) {
    if dtype == DType::F16 {
        let h = f16::from_f32(x);
        (h.to_bits(), h.to_f32())
    } else {
        let h = bf16::from_f32(x);
        (h.to_bits(), h.to_f32())
    }
}

fn from_16(bits: u16, dtype: DType) -> f64 {
    if dtype == DType::F16 {
        f16::from_bits(bits).to_f64()
    } else {
        bf16::from_bits(bits).to_f64()
    }
}

/// `bytes` in a fresh device buffer at byte offset `off`, with slack.
fn upload(ctx: &Context, bytes: &[u8], off: usize) -> DeviceBuffer {
    let buf = DeviceBuffer::alloc(ctx, off + bytes.len() + SLACK).unwrap();
    let mut host = vec![0xEEu8; buf.len()];
    host[off..off + bytes.len()].copy_from_slice(bytes);
    buf.copy_from_host(0, &host).unwrap();
    buf
}

/// One product's output form: f32 written (beta 0), f32 accumulated
/// (beta 1), or 16-bit of the model dtype.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Out {
    Write,
    Accumulate,
    Half,
}

/// One random product: its shape, tokens, dtype, input halves and output
/// form, the host's rounded weights `w` (`[rows, k]`) and inputs `x`
/// (`[t, k]`, hi + lo), and the output before the product (`y_init`, whose
/// f32 values are `y0` when the product accumulates).
struct Case {
    ty: QuantType,
    dtype: DType,
    out: Out,
    lo: bool,
    rows: usize,
    k: usize,
    t: usize,
    ldy: usize,
    w: Vec<f64>,
    x: Vec<f64>,
    y0: Vec<f32>,
    y_init: Vec<u8>,
}

impl Case {
    /// Bytes per output.
    fn ye(&self) -> usize {
        if self.out == Out::Half {
            2
        } else {
            4
        }
    }

    fn name(&self) -> String {
        let (ty, dtype, out, lo) = (self.ty, self.dtype, self.out, self.lo);
        let (rows, k, t, ldy) = (self.rows, self.k, self.t, self.ldy);
        format!("{ty} {dtype} {out:?} lo={lo} rows {rows} k {k} t {t} ldy {ldy}")
    }
}

/// More rows than one launch has warps (the device's rows then stride
/// over them, several to a warp).
const TALL: std::ops::Range<usize> = 17_000..18_000;

/// A random case of `ty` with `out` and `lo`, and what the device reads:
/// the blocks and x's halves as little-endian bytes. Rows of up to 10240
/// elements (40 blocks of 256 or 320 of 32) span several of a warp's
/// 2 KiB tiles; a `tall` case has a block or two a row and [`TALL`] rows.
fn random_case(
    ty: QuantType,
    out: Out,
    lo: bool,
    tall: bool,
    rng: &mut StdRng,
) -> (Case, [Vec<u8>; 3]) {
    let dtype = [DType::BF16, DType::F16][rng.gen_range(0..2)];
    let be = ty.block_elems() as usize;
    let (rows, k) = if tall {
        (rng.gen_range(TALL), be * rng.gen_range(1..=2))
    } else {
        (rng.gen_range(1..300), be * rng.gen_range(1..=10240 / be))
    };
    let t = rng.gen_range(1..=GEMV_MAX_TOKENS as usize);
    let ldy = rows + rng.gen_range(0..3);
    let blocks = moderate_blocks(ty, rows * k / be, rng);
    let w = host_weights(ty, dtype, &blocks, rows * k);
    // x = hi (+ lo): the rounded value and, with lo, the rounded rest.
    let (mut hi, mut lo_bytes, mut x) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..t * k {
        let v: f32 = rng.gen_range(-2.0..2.0);
        let (h, hv) = to_16(v, dtype);
        let (l, lv) = if lo { to_16(v - hv, dtype) } else { (0, 0.0) };
        hi.extend(h.to_le_bytes());
        lo_bytes.extend(l.to_le_bytes());
        x.push(hv as f64 + lv as f64);
    }
    // y: random f32 values to accumulate onto, else NaN bytes that a
    // product with beta 0 must not read.
    let y0: Vec<f32> = (0..t * ldy).map(|_| rng.gen_range(-4.0..4.0)).collect();
    let y_init: Vec<u8> = match out {
        Out::Accumulate => y0.iter().flat_map(|v| v.to_le_bytes()).collect(),
        Out::Half => vec![0xFF; 2 * t * ldy],
        Out::Write => vec![0xFF; 4 * t * ldy],
    };
    let case = Case {
        ty,
        dtype,
        out,
        lo,
        rows,
        k,
        t,
        ldy,
        w,
        x,
        y0,
        y_init,
    };
    (case, [blocks, hi, lo_bytes])
}

/// The device's product of `c`, inputs at random offsets (x 16-byte
/// aligned or not; the weights 16-byte aligned when `c.lo`, else at any
/// other byte, so that the aligned path of a type and its general path
/// are both taken): the output buffer's bytes.
fn device_product(
    ctx: &Context,
    k: &DequantKernels,
    c: &Case,
    inputs: &[Vec<u8>; 3],
    rng: &mut StdRng,
) -> Vec<u8> {
    let s = Stream::new(ctx).unwrap();
    let w_off = if c.lo { 0 } else { rng.gen_range(1..16) };
    let x_off = 2 * rng.gen_range(0..2);
    let wb = upload(ctx, &inputs[0], w_off);
    let xh = upload(ctx, &inputs[1], x_off);
    let xl = upload(ctx, &inputs[2], x_off);
    let yb = upload(ctx, &c.y_init, 0);
    let g = Gemv {
        ty: c.ty,
        dtype: c.dtype,
        w: wb.ptr() + w_off as u64,
        x_hi: xh.ptr() + x_off as u64,
        x_lo: if c.lo { xl.ptr() + x_off as u64 } else { 0 },
        y: yb.ptr(),
        y_dtype: if c.out == Out::Half {
            c.dtype
        } else {
            DType::F32
        },
        beta: if c.out == Out::Accumulate { 1.0 } else { 0.0 },
        rows: c.rows as u64,
        k: c.k as u64,
        t: c.t as u64,
        ldy: c.ldy as u64,
    };
    // SAFETY: wb holds `rows` rows of blocks at w_off, xh and xl t * k
    // 16-bit values at x_off, yb t rows of ldy outputs; all live until the
    // synchronize below.
    unsafe { k.gemv(&g, &s).unwrap() };
    s.synchronize().unwrap();
    let mut got = vec![0u8; yb.len()];
    yb.copy_to_host(0, &mut got).unwrap();
    got
}

/// Output `i` (token b, row r) of `got` against the f64 product.
fn check_output(c: &Case, got: &[u8], b: usize, r: usize) {
    let (i, ye, k) = (b * c.ldy + r, c.ye(), c.k);
    let at = &got[ye * i..ye * (i + 1)];
    let (row, xs) = (&c.w[r * k..(r + 1) * k], &c.x[b * k..(b + 1) * k]);
    let mut want: f64 = row.iter().zip(xs).map(|(a, x)| a * x).sum();
    let mut size: f64 = row.iter().zip(xs).map(|(a, x)| (a * x).abs()).sum();
    if c.out == Out::Accumulate {
        want += c.y0[i] as f64;
        size += (c.y0[i] as f64).abs();
    }
    let (got, half_ulp) = match c.out {
        Out::Half => {
            let bits = u16::from_le_bytes([at[0], at[1]]);
            let rel = if c.dtype == DType::F16 {
                2f64.powi(-11)
            } else {
                2f64.powi(-8)
            };
            (from_16(bits, c.dtype), want.abs() * rel + 2f64.powi(-25))
        }
        _ => (f32::from_le_bytes([at[0], at[1], at[2], at[3]]) as f64, 0.0),
    };
    // f32 accumulation of up to 10240 products, about 320 in a row on each
    // of 32 lanes (x = hi + lo summed in f32), then the output's rounding.
    let tol = 1e-5 * size + half_ulp + 1e-30;
    assert!(
        (got - want).abs() <= tol,
        "{}: token {b} row {r}: device {got} host {want} (tolerance {tol:.3e})",
        c.name()
    );
}

/// One random case of `ty`: every output against the f64 reference, and
/// the gaps between token rows and the bytes past the output untouched.
fn check_case(
    ctx: &Context,
    k: &DequantKernels,
    ty: QuantType,
    out: Out,
    lo: bool,
    tall: bool,
    rng: &mut StdRng,
) {
    let (c, inputs) = random_case(ty, out, lo, tall, rng);
    let got = device_product(ctx, k, &c, &inputs, rng);
    let (ye, y_len) = (c.ye(), (c.t - 1) * c.ldy + c.rows);
    let untouched = |i: usize| c.y_init.get(i).copied().unwrap_or(0xEE);
    for (i, byte) in got.iter().enumerate().skip(ye * y_len) {
        assert_eq!(*byte, untouched(i), "{}: byte {i} written", c.name());
    }
    for b in 0..c.t {
        for r in 0..c.ldy {
            if r < c.rows {
                check_output(&c, &got, b, r);
            } else {
                let i = ye * (b * c.ldy + r);
                let gap = (i..i + ye).all(|j| got[j] == untouched(j));
                assert!(gap, "{}: gap {b} {r} written", c.name());
            }
        }
    }
}

#[test]
fn gemv_matches_the_host_product_of_the_rounded_weights() {
    let test = "gemv_matches_the_host_product_of_the_rounded_weights";
    let Some(ctx) = common::gpu(test) else { return };
    let mut rng = common::rng(test);
    let kernels = DequantKernels::load(&ctx).unwrap();
    let block_types = QuantType::ALL.into_iter().filter(|t| t.is_quantized());
    for ty in block_types {
        for out in [Out::Write, Out::Accumulate, Out::Half] {
            for lo in [false, true] {
                let tall = out == Out::Write && !lo;
                check_case(&ctx, &kernels, ty, out, lo, tall, &mut rng);
            }
        }
    }
}

/// The logits of every pass of `passes` (one slice of tokens per sequence
/// each) through a CUDA streamer with `dequant`.
fn run(
    index: &ModelIndex,
    dequant: Dequant,
    opts: ModelOptions,
    passes: &[Vec<Vec<u32>>],
) -> Vec<Vec<Vec<f32>>> {
    let cfg = StreamerConfig {
        device: Device::Cuda(0),
        dequant,
        ..StreamerConfig::default()
    };
    let cfg = LlamaModel::streamer_config(index, cfg);
    let mut s = LayerStreamer::builder(index).config(cfg).build().unwrap();
    let mut m = LlamaModel::load(&s, opts).unwrap();
    passes
        .iter()
        .map(|p| {
            let inputs: Vec<&[u32]> = p.iter().map(Vec::as_slice).collect();
            m.forward(&mut s, &inputs).unwrap()
        })
        .collect()
}

/// Decoding with the weights dequantized at use, where passes of up to 8
/// tokens take the fused product, gives the logits of the weights
/// dequantized in the slots (every pass a GEMM over the same f16 weights):
/// a prompt of more than 8 tokens, then single-token steps for 1 and 3
/// sequences.
#[test]
fn gpu_decoding_through_the_fused_gemv_matches_the_gemms() {
    let test = "gpu_decoding_through_the_fused_gemv_matches_the_gemms";
    let Some(_ctx) = common::gpu(test) else {
        return;
    };
    let mut rng = common::rng(test);
    let dir = common::tempdir();
    for ty in common::models::block_types(&mut rng, 3) {
        // Hidden 256: k is a whole number of blocks of every type.
        let index = common::models::small_gguf(dir.path(), ty, (2, 512, 384), &mut rng);
        for batch in [1usize, 3] {
            let precision = [Precision::Fast, Precision::Exact][rng.gen_range(0..2)];
            let opts = ModelOptions {
                max_batch: batch,
                max_len: 32,
                max_tokens: 48,
                precision,
                kv_offload: false,
            };
            // The prompts (9 or more tokens in all), then 5 decoding steps.
            let token = |rng: &mut StdRng| rng.gen_range(0..384u32);
            let per = if batch == 1 { 9..16 } else { 3..8 };
            let prompt: Vec<Vec<u32>> = (0..batch)
                .map(|_| {
                    (0..rng.gen_range(per.clone()))
                        .map(|_| token(&mut rng))
                        .collect()
                })
                .collect();
            let mut passes = vec![prompt];
            for _ in 0..5 {
                passes.push((0..batch).map(|_| vec![token(&mut rng)]).collect());
            }
            let gemm = run(&index, Dequant::Slot, opts, &passes);
            let fused = run(&index, Dequant::Use, opts, &passes);
            for (p, (a, b)) in gemm.iter().zip(&fused).enumerate() {
                for (q, (x, y)) in a.iter().zip(b).enumerate() {
                    let err = rel_l2(y, x);
                    eprintln!(
                        "{test}: {ty} {precision} batch {batch} pass {p} seq {q}: rel_l2 {err:.2e}"
                    );
                    assert!(
                        err <= 1e-3,
                        "{ty} {precision} batch {batch} pass {p} seq {q}: {err}"
                    );
                }
            }
        }
    }
}
