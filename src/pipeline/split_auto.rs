//! `cpu_share auto`: the one share of the streamed layers' rows that makes
//! a one-token pass shortest ([`crate::cpu::plan_pass::share_for`]), from
//! what is measured when the streamer is built:
//!
//! - the CPU's products on the layers' stored types (on the pool the model
//!   will compute with) **while page-locked copies to the device run**, and
//!   the copies' rate meanwhile: in a pass the two read the host's memory
//!   at once. (A 7B bf16 pass on an H200 host read its CPU rows at 58.5
//!   GB/s beside copies at 52.7, the CPU's 68.5 alone; the host's read rate
//!   less the copies', 37 GB/s, was too little: that plan gave 6.73
//!   tokens/s against 7.65 at share 0.5.)
//! - the device's time for a layer's products ([`device_layer_seconds`]),
//!   which the resident layers take while the CPU waits.
//!
//! Larger passes hand CPU rows back to the device pass by pass (the CUDA
//! forward pass's upload), so one share at build serves every batch.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::backend::Backend;
use super::split_device::device_layer_seconds;
use super::StreamerConfig;
use crate::checkpoint::{Layer, ModelIndex};
use crate::cpu::calibrate::{calibrate_products, CpuRates};
use crate::cpu::plan::{LayerCost, SplitInputs};
use crate::cpu::plan_pass::share_for;
use crate::cpu::{CpuPool, CpuPoolOptions};
use crate::cuda::{memcpy_htod_async, Context, DeviceBuffer, Stream};
use crate::quant::QuantType;
use crate::{Error, Result};

/// Bytes of the copy that measures the PCIe rate.
const COPY_BYTES: usize = 64 << 20;

/// The share `cpu_share auto` picked and what it picked it from
/// ([`LayerStreamer::auto_share`](crate::LayerStreamer::auto_share)).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AutoShare {
    /// The CPU share of the streamed layers.
    pub share: f64,
    /// The device's seconds for one token through the largest streamed layer.
    pub device_layer_s: f64,
    /// The CPU's bytes per second on that layer while copies run.
    pub cpu_bps: f64,
    /// Page-locked host-to-device bytes per second while the CPU computes.
    pub pcie_bps: f64,
    /// Page-locked host-to-device bytes per second alone.
    pub pcie_alone_bps: f64,
    /// The planner's seconds for a one-token pass at `share`.
    pub pass_s: f64,
}

impl std::fmt::Display for AutoShare {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "cpu share auto {:.3}: device {:.3} ms a layer; CPU {:.1} GB/s and PCIe {:.1} GB/s \
             side by side (PCIe {:.1} alone); one-token pass bound {:.2} ms",
            self.share,
            self.device_layer_s * 1e3,
            self.cpu_bps / 1e9,
            self.pcie_bps / 1e9,
            self.pcie_alone_bps / 1e9,
            self.pass_s * 1e3
        )
    }
}

/// The CPU share for the layers of `model` that stream (`resident[i]`
/// false), or `None` where a split does not pay: on the host backend (the
/// device is the CPU already) or with every layer resident.
pub(crate) fn auto_share(
    model: &ModelIndex,
    cfg: &StreamerConfig,
    backend: &Backend,
    resident: &[bool],
) -> Result<Option<AutoShare>> {
    let Backend::Cuda { ctx, dequant, .. } = backend else {
        return Ok(None);
    };
    let streamed = model.layers().iter().zip(resident).filter(|(_, r)| !**r);
    let Some((largest, _)) = streamed.max_by_key(|(l, _)| l.data_bytes) else {
        return Ok(None);
    };
    let (rates, pcie_bps, pcie_alone_bps) = side_by_side(model, cfg, backend, ctx)?;
    let device_layer_s = device_layer_seconds(ctx, dequant.as_deref(), largest, cfg)?;
    let inputs = SplitInputs {
        layers: costs(model, &rates, (largest, device_layer_s))?,
        pcie_bps,
        join_s: 0.0,
        // The cache is placed: the planner only picks the share.
        vram_budget: u64::MAX,
        slots: 1,
    };
    // The rates were measured side by side: the host's memory is in them.
    let (share, pass_s) = share_for(&inputs, None, resident)?;
    Ok(Some(AutoShare {
        share,
        device_layer_s,
        cpu_bps: largest.data_bytes as f64 / rates.layer_seconds(model, largest)?.max(1e-12),
        pcie_bps,
        pcie_alone_bps,
        pass_s,
    }))
}

/// Each layer's bytes, CPU seconds at `rates` and device seconds, those
/// of `largest` scaled by bytes.
fn costs(
    model: &ModelIndex,
    rates: &CpuRates,
    (largest, device_s): (&Layer, f64),
) -> Result<Vec<LayerCost>> {
    let per_byte = device_s / largest.data_bytes.max(1) as f64;
    (model.layers().iter())
        .map(|l| {
            Ok(LayerCost {
                bytes: l.data_bytes,
                cpu_s: rates.layer_seconds(model, l)?.max(f64::MIN_POSITIVE),
                gpu_s: per_byte * l.data_bytes as f64,
            })
        })
        .collect()
}

/// The CPU's rates on `model`'s stored types while page-locked copies run,
/// the copies' rate meanwhile, and their rate alone.
fn side_by_side(
    model: &ModelIndex,
    cfg: &StreamerConfig,
    backend: &Backend,
    ctx: &Context,
) -> Result<(CpuRates, f64, f64)> {
    let mut types: Vec<QuantType> = (model.layers().iter())
        .flat_map(|l| &l.tensors)
        .filter(|t| t.info.shape.len() == 2)
        .filter_map(|t| t.info.quant.or_else(|| QuantType::from_dtype(t.info.dtype)))
        .collect();
    types.sort_by_key(|t| t.ggml_type_id());
    types.dedup();
    let pool = CpuPool::new(&CpuPoolOptions {
        exclude: cfg.cpu_affinity.clone().unwrap_or_default(),
        ..CpuPoolOptions::default()
    })?;
    let host = backend.pinned(COPY_BYTES)?;
    let dev = DeviceBuffer::alloc(ctx, COPY_BYTES)?;
    // SAFETY: `pinned` made COPY_BYTES of page-locked memory, written by
    // nobody while `host` lives.
    let src = unsafe { std::slice::from_raw_parts(host.ptr(), COPY_BYTES) };
    let alone = h2d_rate(ctx, src, &dev)?;
    let (rates, beside) = while_copying(ctx, src, &dev, || {
        calibrate_products(&pool, &types, 1, 32 << 20, 2)
    })?;
    Ok((rates, beside, alone))
}

/// Sets its flag when dropped.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Copies of `src` into `dst` in flight at a time.
const COPIES_IN_FLIGHT: usize = 4;

/// `f`'s result, with page-locked copies of `src` into `dst` running back
/// to back on a thread and stream of their own meanwhile, and their bytes
/// per second.
fn while_copying<T>(
    ctx: &Context,
    src: &[u8],
    dst: &DeviceBuffer,
    f: impl FnOnce() -> Result<T>,
) -> Result<(T, f64)> {
    let len = src.len().min(dst.len());
    let stop = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let copier = scope.spawn(|| -> Result<f64> {
            ctx.bind()?;
            let s = Stream::new(ctx)?;
            let (t0, mut bytes) = (Instant::now(), 0u64);
            while !stop.load(Ordering::Relaxed) {
                for _ in 0..COPIES_IN_FLIGHT {
                    // SAFETY: `len` bytes of `src` into `dst`, which holds
                    // them; the stream is synchronized before the loop goes
                    // on, and so before either can be dropped.
                    unsafe { memcpy_htod_async(dst.ptr(), src.as_ptr(), len, &s)? };
                }
                s.synchronize()?;
                bytes += (COPIES_IN_FLIGHT * len) as u64;
            }
            Ok(bytes as f64 / t0.elapsed().as_secs_f64().max(1e-9))
        });
        // Stops the copies however `f` ends (a panic included).
        let _stop = StopOnDrop(&stop);
        // The copies under way before the CPU starts.
        std::thread::sleep(Duration::from_millis(5));
        let out = f();
        stop.store(true, Ordering::Relaxed);
        let bps = copier
            .join()
            .map_err(|_| Error::Pipeline("cpu share auto: the copying thread panicked".into()))??;
        Ok((out?, bps))
    })
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
