//! `cpu_share auto`: the share of a streamed layer's rows that makes its two
//! sides finish together when decoding one token, from rates measured when
//! the streamer is built: the CPU's products on the layer's stored types
//! (on the pool the model will compute with), no faster than the host's read
//! rate less the copies' (the two share the memory), and a page-locked copy
//! to the device. [`crate::cpu::plan::layer_share`] balances them. Larger passes
//! hand CPU rows back to the device pass by pass (the CUDA forward pass's
//! upload), so one share at build serves every batch.

use std::time::Instant;

use super::backend::Backend;
use super::StreamerConfig;
use crate::checkpoint::ModelIndex;
use crate::cpu::calibrate::calibrate;
use crate::cpu::plan::{layer_share, LayerCost};
use crate::cpu::plan_pass::cpu_read_while_copying;
use crate::cpu::{CpuPool, CpuPoolOptions};
use crate::cuda::{memcpy_htod_async, DeviceBuffer, Stream};
use crate::quant::QuantType;
use crate::Result;

/// Bytes of the copy that measures the PCIe rate.
const COPY_BYTES: usize = 64 << 20;

/// The CPU share for the layers of `model` that stream (`resident[i]`
/// false), or 0 where a split does not pay: on the host backend (the
/// device is the CPU already) or with every layer resident.
pub(crate) fn auto_share(
    model: &ModelIndex,
    cfg: &StreamerConfig,
    backend: &Backend,
    resident: &[bool],
) -> Result<f64> {
    let Backend::Cuda { ctx, .. } = backend else {
        return Ok(0.0);
    };
    let streamed = model.layers().iter().zip(resident).filter(|(_, r)| !**r);
    let Some((layer, _)) = streamed.max_by_key(|(l, _)| l.data_bytes) else {
        return Ok(0.0);
    };
    let mut types: Vec<QuantType> = (layer.tensors.iter())
        .filter(|t| t.info.shape.len() == 2)
        .filter_map(|t| t.info.quant.or_else(|| QuantType::from_dtype(t.info.dtype)))
        .collect();
    types.sort_by_key(|t| t.ggml_type_id());
    types.dedup();
    let pool = CpuPool::new(&CpuPoolOptions {
        exclude: cfg.cpu_affinity.clone().unwrap_or_default(),
        ..CpuPoolOptions::default()
    })?;
    let rates = calibrate(&pool, &types, 1, 32 << 20, 2)?;
    let pcie = copy_rate(ctx, backend)?;
    // While the copies run the CPU reads no faster than what their DMA
    // leaves of the host's memory.
    let left = cpu_read_while_copying(rates.read_bps, pcie);
    let cpu_s = rates
        .layer_seconds(model, layer)?
        .max(layer.data_bytes as f64 / left);
    let cost = LayerCost {
        bytes: layer.data_bytes,
        cpu_s,
        gpu_s: 0.0,
    };
    Ok(layer_share(&cost, false, pcie, 0.0).0)
}

/// Bytes per second of a page-locked host-to-device copy of `COPY_BYTES`.
fn copy_rate(ctx: &crate::cuda::Context, backend: &Backend) -> Result<f64> {
    let host = backend.pinned(COPY_BYTES)?;
    let dev = DeviceBuffer::alloc(ctx, COPY_BYTES)?;
    // SAFETY: `pinned` made COPY_BYTES of page-locked memory, written by
    // nobody while `host` lives.
    let src = unsafe { std::slice::from_raw_parts(host.ptr(), COPY_BYTES) };
    h2d_rate(ctx, src, &dev)
}

/// Bytes per second of copying `src` (page-locked) into `dst` (at least as
/// long): the best of three copies, each waited for on a stream of its own.
pub(crate) fn h2d_rate(ctx: &crate::cuda::Context, src: &[u8], dst: &DeviceBuffer) -> Result<f64> {
    let len = src.len().min(dst.len());
    let s = Stream::new(ctx)?;
    let mut best = f64::MAX;
    for _ in 0..3 {
        let t0 = Instant::now();
        // SAFETY: `len` bytes of `src` into `dst`, which holds them; the
        // stream is synchronized before either can be dropped.
        unsafe { memcpy_htod_async(dst.ptr(), src.as_ptr(), len, &s)? };
        s.synchronize()?;
        best = best.min(t0.elapsed().as_secs_f64());
    }
    Ok(len as f64 / best.max(1e-9))
}
