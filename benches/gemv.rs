//! The fused dequantize-and-multiply on the device (`DequantKernels::gemv`,
//! the decode product of weights kept as ggml blocks), in GB/s of stored
//! weights, next to the device's memory read rate measured in the same run
//! (a device-to-device copy of the same bytes, which reads and writes
//! each: its ceiling). One `[18944, 3584]` matrix (a 7B model's gate
//! projection) and one `[3584, 18944]` (its down projection) per type and
//! model dtype (f16, what a quantized model computes in, and bf16), one
//! token, launches queued back to back on one stream and timed by events,
//! so the rate is the kernel's alone, with no host work in between.
//!
//! Without a CUDA driver or device the bench says why and exits
//! successfully (`LS_REQUIRE_GPU=1` makes that a failure). Under
//! `cargo test --benches` (no `--bench` argument) each case runs once on a
//! small matrix.
//!
//! ```text
//! cargo bench --bench gemv
//! ```

mod common;

use layer_streamer::cuda::{memcpy_dtod_async, Context, DeviceBuffer, Event, Stream};
use layer_streamer::quant::device::{DequantKernels, Gemv};
use layer_streamer::quant::QuantType;
use layer_streamer::DType;

const TYPES: [QuantType; 5] = [
    QuantType::Q4_K,
    QuantType::Q6_K,
    QuantType::Q8_0,
    QuantType::Q4_0,
    QuantType::Q5_K,
];

/// Seconds per call of `f` queued `reps` times on `s`, by events.
fn time(ctx: &Context, s: &Stream, reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    let (a, b) = (
        Event::new(ctx, true).unwrap(),
        Event::new(ctx, true).unwrap(),
    );
    a.record(s).unwrap();
    for _ in 0..reps {
        f();
    }
    b.record(s).unwrap();
    b.synchronize().unwrap();
    Event::elapsed_ms(&a, &b).unwrap() as f64 * 1e-3 / reps as f64
}

fn main() {
    let Some(ctx) = common::gpu("gemv") else {
        return;
    };
    let benching = std::env::args().any(|a| a == "--bench");
    let (scale, reps) = if benching { (1, 50) } else { (16, 1) };
    let s = Stream::new(&ctx).unwrap();
    let kernels = DequantKernels::load(&ctx).unwrap();
    println!("gemv: 1 token, f32 outputs; GB/s of stored weights");
    println!(
        "{:<6} {:<5} {:>12} {:>10} {:>10} {:>10}",
        "type", "dtype", "shape", "gemv GB/s", "copy GB/s", "of copy"
    );
    // f16: what a quantized model computes in (`LlamaModel::cuda_dtype`).
    for dtype in [DType::F16, DType::BF16] {
        for ty in TYPES {
            for (rows, k) in [(18944 / scale, 3584), (3584 / scale, 18944)] {
                let (gemv, copy) = measure(&ctx, &s, &kernels, (ty, dtype, rows, k), reps);
                let shape = format!("{rows}x{k}");
                let of = 100.0 * gemv / copy;
                println!(
                    "{:<6} {:<5} {shape:>12} {gemv:>10.1} {copy:>10.1} {of:>9.0}%",
                    ty.name(),
                    dtype.to_string()
                );
            }
        }
    }
}

/// GB/s of the product of one `[rows, k]` matrix of `ty` with one token
/// of `dtype` (`case`), and of a device-to-device copy of the same bytes.
fn measure(
    ctx: &Context,
    s: &Stream,
    kernels: &DequantKernels,
    case: (QuantType, DType, usize, usize),
    reps: usize,
) -> (f64, f64) {
    let (ty, dtype, rows, k) = case;
    let k = k / 256 * 256;
    let bytes = ty.row_bytes(k as u64).unwrap() as usize * rows;
    // Small positive scales and quants: the values do not change the work
    // a block takes.
    let w = DeviceBuffer::alloc(ctx, bytes).unwrap();
    w.copy_from_host(0, &vec![0x11u8; bytes]).unwrap();
    let copy = DeviceBuffer::alloc(ctx, bytes).unwrap();
    let x = DeviceBuffer::alloc(ctx, k * 2).unwrap();
    x.copy_from_host(0, &vec![0x3fu8; k * 2]).unwrap();
    let y = DeviceBuffer::alloc(ctx, rows * 4).unwrap();
    let g = Gemv {
        ty,
        dtype,
        w: w.ptr(),
        x_hi: x.ptr(),
        x_lo: 0,
        y: y.ptr(),
        y_dtype: DType::F32,
        beta: 0.0,
        rows: rows as u64,
        k: k as u64,
        t: 1,
        ldy: rows as u64,
    };
    // SAFETY: `w` holds `rows` rows of `k` values' blocks, `x` k 16-bit
    // values, `y` rows f32s, all on the stream's context and alive until
    // the stream is synchronized (in `time`).
    let gemv_s = time(ctx, s, reps, || unsafe { kernels.gemv(&g, s).unwrap() });
    // SAFETY: both buffers hold `bytes`, alive until synchronized.
    let copy_s = time(ctx, s, reps, || unsafe {
        memcpy_dtod_async(copy.ptr(), w.ptr(), bytes, s).unwrap()
    });
    (bytes as f64 / gemv_s / 1e9, bytes as f64 / copy_s / 1e9)
}
