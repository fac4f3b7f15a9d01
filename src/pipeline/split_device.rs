//! The device's seconds for one token through a layer, which `cpu_share
//! auto` plans the pass with: while a resident layer computes, the CPU
//! waits and the copies run ahead (see [`crate::cpu::plan_pass`]).
//!
//! What is timed is the layer's matrix products for one token, one after
//! another, with the kernels the crate's forward pass uses: the fused
//! block GEMV ([`DequantKernels::gemv`]) for block-quantized weights the
//! layer function dequantizes at use ([`Dequant::Use`]), cuBLAS for
//! 16-bit weights. The weights are zeros in one buffer of at most
//! [`MAX_BUFFER`] bytes, each product reading where the last one stopped,
//! so that a layer larger than the device's L2 reads from memory as in a
//! pass. A matrix larger than the buffer is timed on the rows that fit and
//! its time scaled to all its rows. Norms, attention and the meetings of a
//! split are not timed: the result is what the layer's products take at
//! the least.

use super::config::Dequant;
use super::StreamerConfig;
use crate::checkpoint::Layer;
use crate::cuda::cublas::{self, Cublas, GemmType};
use crate::cuda::{memcpy_dtoh_async, memcpy_htod_async, Context, DeviceBuffer, Event, Stream};
use crate::quant::device::{DequantKernels, Gemv};
use crate::{DType, Result};

/// The most bytes of weights the timing allocates on the device.
pub(crate) const MAX_BUFFER: usize = 256 << 20;

/// Timed repetitions of the layer's products (the best counts).
const REPS: usize = 3;

/// One product of the layer: its rows, row length, and how the device
/// reads it.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Product {
    rows: usize,
    k: usize,
    kind: Kind,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    /// Stored blocks through the fused GEMV in the model's 16-bit dtype.
    Blocks(crate::quant::QuantType, DType),
    /// Plain values of this GEMM type through cuBLAS.
    Dense(GemmType),
}

impl Product {
    fn row_bytes(&self) -> usize {
        match self.kind {
            Kind::Blocks(ty, _) => ty.row_bytes(self.k as u64).unwrap_or(0) as usize,
            Kind::Dense(GemmType::F32) => 4 * self.k,
            Kind::Dense(_) => 2 * self.k,
        }
    }
}

/// The 16-bit dtype the forward pass computes a model in: f16 for f16,
/// else bf16.
fn model_dtype(cfg: &StreamerConfig) -> DType {
    if cfg.dtype == Some(DType::F16) {
        DType::F16
    } else {
        DType::BF16
    }
}

/// The products of `layer`'s matrices as the device would compute them
/// with `cfg` (blocks at use only with `Dequant::Use` and the kernels
/// loaded).
fn products(layer: &Layer, cfg: &StreamerConfig, blocks_at_use: bool) -> Vec<Product> {
    let dtype = model_dtype(cfg);
    (layer.tensors.iter())
        .filter(|t| t.info.shape.len() == 2)
        .map(|t| {
            let (rows, k) = (t.info.shape[0], t.info.shape[1]);
            let kind = match t.info.quant {
                Some(ty) if blocks_at_use && ty.is_quantized() => Kind::Blocks(ty, dtype),
                _ if cfg.dtype == Some(DType::F32) => Kind::Dense(GemmType::F32),
                _ => Kind::Dense(GemmType::half_of(dtype)),
            };
            Product { rows, k, kind }
        })
        .filter(|p| p.rows > 0 && p.k > 0 && p.row_bytes() > 0)
        .collect()
}

/// Seconds of one token through `layer`'s products on the device (module
/// docs); 0 when there is nothing to time or cuBLAS is missing for 16-bit
/// weights (the forward pass could not run them either).
pub(crate) fn device_layer_seconds(
    ctx: &Context,
    dequant: Option<&DequantKernels>,
    layer: &Layer,
    cfg: &StreamerConfig,
) -> Result<f64> {
    let blocks_at_use = cfg.dequant == Dequant::Use && dequant.is_some();
    let all = products(layer, cfg, blocks_at_use);
    let dense = all.iter().any(|p| matches!(p.kind, Kind::Dense(_)));
    if all.is_empty() || (dense && !cublas::is_available()) {
        return Ok(0.0);
    }
    let weight_bytes: usize = all.iter().map(|p| p.rows * p.row_bytes()).sum();
    let w = DeviceBuffer::alloc(ctx, weight_bytes.clamp(1, MAX_BUFFER))?;
    w.memset_zero()?;
    let k_max = all.iter().map(|p| p.k).max().unwrap_or(1);
    let rows_max = all.iter().map(|p| p.rows).max().unwrap_or(1);
    let x = DeviceBuffer::alloc(ctx, 4 * k_max)?;
    x.memset_zero()?;
    let y = DeviceBuffer::alloc(ctx, 4 * rows_max)?;
    let s = Stream::new(ctx)?;
    let mut blas = if dense { Some(Cublas::new(ctx)?) } else { None };
    if let Some(b) = blas.as_mut() {
        b.set_stream(&s)?;
    }
    let (start, end) = (Event::new(ctx, true)?, Event::new(ctx, true)?);
    let mut best = f64::MAX;
    // The first run loads the kernels and warms cuBLAS: not counted.
    for rep in 0..=REPS {
        start.record(&s)?;
        let scale = queue_products(&all, (&w, &x, &y), dequant, blas.as_mut(), &s)?;
        end.record(&s)?;
        end.synchronize()?;
        let secs = f64::from(Event::elapsed_ms(&start, &end)?) / 1e3;
        if rep > 0 {
            best = best.min(secs * scale);
        }
    }
    Ok(best)
}

/// Queues every product once on `s`, each at the buffer's next offset (from
/// the start where the rest of it is too short), and returns the factor
/// from the rows timed to all the rows (1 unless a matrix exceeded the
/// buffer).
fn queue_products(
    all: &[Product],
    (w, x, y): (&DeviceBuffer, &DeviceBuffer, &DeviceBuffer),
    dequant: Option<&DequantKernels>,
    mut blas: Option<&mut Cublas>,
    s: &Stream,
) -> Result<f64> {
    let (mut offset, mut timed, mut total) = (0usize, 0usize, 0usize);
    for p in all {
        let row = p.row_bytes();
        let rows = p.rows.min(w.len() / row).max(1);
        if offset + rows * row > w.len() {
            offset = 0;
        }
        let at = w.ptr() + offset as u64;
        offset += rows * row;
        timed += rows * row;
        total += p.rows * row;
        match (p.kind, dequant, blas.as_deref_mut()) {
            (Kind::Blocks(ty, dtype), Some(kernels), _) => {
                let g = Gemv {
                    ty,
                    dtype,
                    w: at,
                    x_hi: x.ptr(),
                    x_lo: 0,
                    y: y.ptr(),
                    y_dtype: DType::F32,
                    beta: 0.0,
                    rows: rows as u64,
                    k: p.k as u64,
                    t: 1,
                    ldy: rows as u64,
                };
                // SAFETY: `rows` rows of `p.k` values' blocks lie at `at`
                // inside `w`; `x` holds `k_max >= p.k` values of 4 bytes and
                // `y` `rows_max >= rows` f32s; all three outlive the
                // stream's synchronization in the caller.
                unsafe { kernels.gemv(&g, s)? };
            }
            (Kind::Dense(gt), _, Some(b)) => {
                // SAFETY: `x` holds one row of `p.k` values of `gt` (at most
                // 4 bytes each), `at` `rows` rows of them inside `w`, `y`
                // `rows` f32s; cuBLAS runs on `s`, synchronized by the
                // caller before the buffers drop.
                unsafe { b.linear(x.ptr(), at, gt, y.ptr(), GemmType::F32, 1, rows, p.k, 0.0)? };
            }
            _ => {}
        }
    }
    Ok(total as f64 / timed.max(1) as f64)
}

/// Round trips timed for [`meeting_seconds`] (the median counts).
const MEETING_REPS: usize = 21;

/// Seconds of one meeting of the two sides of a split beyond their
/// products: a `k`-wide 16-bit input copied to page-locked `staging`, an
/// event waited for, the CPU pool woken on every thread, and a `k`-wide f32
/// result copied back and waited for. The median of [`MEETING_REPS`].
pub(crate) fn meeting_seconds(
    ctx: &Context,
    pool: &crate::cpu::CpuPool,
    staging: &mut [u8],
    k: usize,
) -> Result<f64> {
    let bytes = (4 * k).clamp(4, staging.len());
    let dev = DeviceBuffer::alloc(ctx, bytes)?;
    dev.memset_zero()?;
    let s = Stream::new(ctx)?;
    let ready = Event::new(ctx, false)?;
    let mut times = Vec::with_capacity(MEETING_REPS);
    for _ in 0..MEETING_REPS {
        let t0 = std::time::Instant::now();
        // SAFETY: `staging` holds `bytes` and is page-locked by the caller;
        // nothing else touches it, and both copies are waited for before
        // the next round or the end of the borrow.
        unsafe { memcpy_dtoh_async(staging.as_mut_ptr(), dev.ptr(), bytes / 2, &s)? };
        ready.record(&s)?;
        ready.synchronize()?;
        pool.install(|| rayon::broadcast(|_| std::hint::black_box(())));
        // SAFETY: as above.
        unsafe { memcpy_htod_async(dev.ptr(), staging.as_ptr(), bytes, &s)? };
        s.synchronize()?;
        times.push(t0.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::{LayerTensor, TensorInfo};
    use crate::quant::QuantType;

    fn tensor(key: &str, shape: Vec<usize>, dtype: DType, quant: Option<QuantType>) -> LayerTensor {
        LayerTensor {
            key: key.into(),
            info: TensorInfo {
                name: key.into(),
                dtype,
                shape,
                file: 0,
                file_offset: 0,
                len: 0,
                quant,
                scale: None,
            },
            slot_offset: 0,
        }
    }

    #[test]
    fn blocks_are_timed_as_stored_only_when_the_layer_function_dequantizes_at_use() {
        let mut rng = crate::test_rng::rng();
        use rand::Rng;
        let rows = 256 * rng.gen_range(1..8);
        let k = 256 * rng.gen_range(1..8);
        let layer = Layer {
            index: 0,
            tensors: vec![
                tensor("w", vec![rows, k], DType::U8, Some(QuantType::Q4_K)),
                tensor("b", vec![rows], DType::F32, None),
                tensor("d", vec![k, rows], DType::BF16, None),
            ],
            reads: vec![],
            slot_bytes: 0,
            data_bytes: 0,
        };
        let mut cfg = StreamerConfig::default();
        let used = products(&layer, &cfg, true);
        assert_eq!(used.len(), 2, "the 1-D bias is no product");
        assert_eq!(used[0].kind, Kind::Blocks(QuantType::Q4_K, DType::BF16));
        assert_eq!(used[0].row_bytes(), k / 256 * 144);
        assert_eq!(used[1].kind, Kind::Dense(GemmType::BF16));
        assert_eq!(used[1].row_bytes(), 2 * rows);
        let slot = products(&layer, &cfg, false);
        assert_eq!(slot[0].kind, Kind::Dense(GemmType::BF16));
        cfg.dtype = Some(DType::F16);
        assert_eq!(
            products(&layer, &cfg, true)[0].kind,
            Kind::Blocks(QuantType::Q4_K, DType::F16)
        );
        assert_eq!(
            products(&layer, &cfg, false)[1].kind,
            Kind::Dense(GemmType::F16)
        );
    }
}
