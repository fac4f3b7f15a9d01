//! `Cublas::linear` through cuBLASLt and through `cublasGemmEx`, against an
//! f64 host reference, on a GPU: 16-bit inputs, f32 or 16-bit outputs,
//! `beta` 0 and 1, odd shapes and operands at addresses that are not
//! 256-byte aligned. Skips without a driver unless `LS_REQUIRE_GPU=1`.

mod common;

use half::{bf16, f16};
use layer_streamer::cuda::cublas::{Cublas, GemmType};
use layer_streamer::cuda::{Context, DeviceBuffer, Stream};
use rand::Rng;

/// Host values of a 16-bit operand (already rounded to its type) and its bytes.
fn operand(rng: &mut impl Rng, t: GemmType, n: usize) -> (Vec<f64>, Vec<u8>) {
    let mut vals = Vec::with_capacity(n);
    let mut bytes = Vec::with_capacity(n * 2);
    for _ in 0..n {
        let v: f32 = rng.gen_range(-2.0..2.0);
        let (f, b) = match t {
            GemmType::BF16 => {
                let h = bf16::from_f32(v);
                (h.to_f64(), h.to_le_bytes())
            }
            GemmType::F16 => {
                let h = f16::from_f32(v);
                (h.to_f64(), h.to_le_bytes())
            }
            GemmType::F32 => unreachable!("inputs are 16-bit"),
        };
        vals.push(f);
        bytes.extend_from_slice(&b);
    }
    (vals, bytes)
}

fn decode(t: GemmType, bytes: &[u8]) -> Vec<f64> {
    match t {
        GemmType::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
            .collect(),
        GemmType::BF16 => bytes
            .chunks_exact(2)
            .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f64())
            .collect(),
        GemmType::F16 => bytes
            .chunks_exact(2)
            .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f64())
            .collect(),
    }
}

/// A device buffer holding `bytes` at byte `offset`.
fn upload(ctx: &Context, bytes: &[u8], offset: usize) -> DeviceBuffer {
    let mut host = vec![0u8; offset + bytes.len()];
    host[offset..].copy_from_slice(bytes);
    let buf = DeviceBuffer::alloc(ctx, host.len()).unwrap();
    buf.copy_from_host(0, &host).unwrap();
    buf
}

struct Case {
    xw: GemmType,
    yt: GemmType,
    rows: usize,
    n: usize,
    k: usize,
    beta: f32,
    /// Byte offset of every operand from its allocation (256-aligned).
    offset: usize,
    /// Byte offset of the weight alone (a weight in a slot sits where the
    /// checkpoint put it).
    w_offset: usize,
    /// Outputs checked: all, or this many at random.
    sample: Option<usize>,
}

/// Runs `case` with cuBLASLt on or off and checks every output against f64.
fn check(ctx: &Context, stream: &Stream, blas: &mut Cublas, rng: &mut impl Rng, c: &Case) {
    let (x, xb) = operand(rng, c.xw, c.rows * c.k);
    let (w, wb) = operand(rng, c.xw, c.n * c.k);
    let (y0, y0b) = match c.yt {
        GemmType::F32 => {
            let v: Vec<f32> = (0..c.rows * c.n)
                .map(|_| rng.gen_range(-4.0..4.0))
                .collect();
            let b = v.iter().flat_map(|f| f.to_le_bytes()).collect();
            (v.iter().map(|&f| f as f64).collect(), b)
        }
        t => operand(rng, t, c.rows * c.n),
    };
    let (dx, dw, dy) = (
        upload(ctx, &xb, c.offset),
        upload(ctx, &wb, c.w_offset),
        upload(ctx, &y0b, c.offset),
    );
    let at = |b: &DeviceBuffer| b.ptr() + c.offset as u64;
    let w_at = dw.ptr() + c.w_offset as u64;
    // SAFETY: the buffers hold the case's shapes at their offsets, in this
    // context, and stay alive past the synchronize below.
    unsafe {
        blas.linear(at(&dx), w_at, c.xw, at(&dy), c.yt, c.rows, c.n, c.k, c.beta)
            .unwrap()
    };
    stream.synchronize().unwrap();
    let mut out = vec![0u8; c.offset + y0b.len()];
    dy.copy_to_host(0, &mut out).unwrap();
    let got = decode(c.yt, &out[c.offset..]);
    let out_ulp = if c.yt == GemmType::F32 {
        0.0
    } else {
        1.0 / 128.0
    };
    let picks: Vec<(usize, usize)> = match c.sample {
        None => (0..c.rows)
            .flat_map(|r| (0..c.n).map(move |j| (r, j)))
            .collect(),
        Some(m) => (0..m)
            .map(|_| (rng.gen_range(0..c.rows), rng.gen_range(0..c.n)))
            .collect(),
    };
    for (r, j) in picks {
        let (mut want, mut mag) = (c.beta as f64 * y0[r * c.n + j], 0f64);
        for i in 0..c.k {
            let p = x[r * c.k + i] * w[j * c.k + i];
            want += p;
            mag += p.abs();
        }
        mag += (c.beta as f64 * y0[r * c.n + j]).abs();
        let tol = 1e-5 * mag + out_ulp * want.abs() + 1e-30;
        let g = got[r * c.n + j];
        assert!(
            (g - want).abs() <= tol,
            "{:?}->{:?} {}x{}x{} beta {} offsets {}/{} lt {}: y[{r},{j}] = {g}, want {want} (tol {tol})",
            c.xw, c.yt, c.rows, c.n, c.k, c.beta, c.offset, c.w_offset, blas.uses_cublaslt()
        );
    }
}

#[test]
fn linear_matches_f64_through_cublaslt_and_gemm_ex() {
    let Some(ctx) = common::gpu("linear_matches_f64_through_cublaslt_and_gemm_ex") else {
        return;
    };
    let mut rng = common::rng("linear_matches_f64_through_cublaslt_and_gemm_ex");
    let stream = Stream::new(&ctx).unwrap();
    let mut blas = Cublas::new(&ctx).unwrap();
    blas.set_stream(&stream).unwrap();
    // On a machine with a GPU the Hopper path must be there: cuBLASLt loads
    // next to cuBLAS in every CUDA release this crate supports.
    assert!(
        blas.uses_cublaslt() || std::env::var("LS_CUBLASLT").is_ok_and(|v| v == "0"),
        "cuBLASLt did not load next to cuBLAS"
    );
    let shapes = [(1, 96, 64), (7, 130, 72), (33, 257, 136), (300, 512, 384)];
    let types = [
        (GemmType::BF16, GemmType::F32),
        (GemmType::F16, GemmType::F32),
        (GemmType::BF16, GemmType::BF16),
        (GemmType::F16, GemmType::F16),
    ];
    for lt in [true, false] {
        blas.set_cublaslt(lt);
        for &(rows, n, k) in &shapes {
            for &(xw, yt) in &types {
                // 16-bit outputs only overwrite (a 16-bit C may be rounded
                // before the sum; the model accumulates into f32 only).
                let betas: &[f32] = if yt == GemmType::F32 {
                    &[0.0, 1.0]
                } else {
                    &[0.0]
                };
                for &beta in betas {
                    // Activations are the model's own (aligned) buffers; a
                    // weight sits where its file put it: 8-byte aligned as
                    // safetensors writes, or 2 after an odd-length tensor
                    // (cuBLASLt's path copies it; cublasGemmEx refuses it).
                    let offset = [0, 16, 256][rng.gen_range(0..3)];
                    let w_offset = if lt {
                        [offset, 8, 2][rng.gen_range(0..3)]
                    } else {
                        [offset, 8][rng.gen_range(0..2)]
                    };
                    let case = Case {
                        xw,
                        yt,
                        rows,
                        n,
                        k,
                        beta,
                        offset,
                        w_offset,
                        sample: None,
                    };
                    check(&ctx, &stream, &mut blas, &mut rng, &case);
                }
            }
        }
    }
}

/// A GEMM large enough for the aligned copy of a misaligned weight (an
/// 8-byte aligned weight, as safetensors places them), in several chunks of
/// weight rows, accumulating into f32: sampled outputs against f64.
#[test]
fn large_gemm_with_a_misaligned_weight_matches_f64() {
    let Some(ctx) = common::gpu("large_gemm_with_a_misaligned_weight_matches_f64") else {
        return;
    };
    let mut rng = common::rng("large_gemm_with_a_misaligned_weight_matches_f64");
    let stream = Stream::new(&ctx).unwrap();
    let mut blas = Cublas::new(&ctx).unwrap();
    blas.set_stream(&stream).unwrap();
    // k = 16384 makes a 64 MiB chunk 2048 rows, so 4100 rows take three.
    let mut failed = Vec::new();
    for (rows, n, k) in [(1024, 4100, 16384), (1500, 1000, 4096)] {
        for w_offset in [8, 0] {
            for beta in [1.0, 0.0] {
                let case = Case {
                    xw: GemmType::BF16,
                    yt: GemmType::F32,
                    rows,
                    n,
                    k,
                    beta,
                    offset: 0,
                    w_offset,
                    sample: Some(3000),
                };
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    check(&ctx, &stream, &mut blas, &mut rng, &case)
                }));
                if r.is_err() {
                    failed.push((rows, n, k, w_offset, beta));
                }
            }
        }
    }
    assert!(
        failed.is_empty(),
        "failed (rows, n, k, w_offset, beta): {failed:?}"
    );
}
