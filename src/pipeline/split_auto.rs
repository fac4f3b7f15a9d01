//! `cpu_share auto`: the share of the streamed layers' rows for a
//! one-token pass ([`crate::cpu::plan_pass::share_for`]), from what is
//! measured when the streamer is built:
//!
//! - the CPU's products on the stored types of the weights the split
//!   divides (on the pool the model will compute with), and page-locked
//!   copies to the device, each alone and both side by side. The plan takes
//!   each side halfway between its two rates: in a pass the copies wait on
//!   free slots part of the time (a quarter of a 7B bf16 pass on an H200
//!   host), and the CPU reads alone meanwhile. The CPU's rows of that pass
//!   ran at 60 GB/s against 78.7 alone and 52.5 beside copies (a plan on
//!   the rates alone took share 0.665 and left the CPU the slower side: 8.15
//!   tokens/s); another pass ran its CPU rows at 54.7–58.6 GB/s against 47.5
//!   beside copies (a plan on the rates side by side took 0.463: 7.35
//!   tokens/s, against 8.34 at 0.55 and 9.35 at 0.6 on another day).
//! - the device's time for a layer's products ([`device_layer_seconds`]),
//!   which the resident layers take while the CPU waits;
//! - a meeting of the two sides ([`meeting_seconds`]), twice per group of
//!   divided weights in every layer.
//!
//! Larger passes hand CPU rows back to the device pass by pass (the CUDA
//! forward pass's upload), so one share at build serves every batch.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::backend::Backend;
use super::split_device::{device_layer_seconds, meeting_seconds};
use super::StreamerConfig;
use crate::checkpoint::{Layer, ModelIndex};
use crate::cpu::calibrate::{Calibration, CpuRates};
use crate::cpu::plan::{divided_tensors, layer_cost, SplitInputs};
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
    /// The CPU's bytes per second on that layer's divided weights while
    /// copies run.
    pub cpu_bps: f64,
    /// The same alone.
    pub cpu_alone_bps: f64,
    /// Page-locked host-to-device bytes per second while the CPU computes.
    pub pcie_bps: f64,
    /// Page-locked host-to-device bytes per second alone.
    pub pcie_alone_bps: f64,
    /// Seconds a layer's meetings of the two sides take beyond their
    /// products (copies of the inputs and outputs, waits, the pool's
    /// wake-up).
    pub join_s: f64,
    /// The planner's seconds for a one-token pass at `share`.
    pub pass_s: f64,
}

impl std::fmt::Display for AutoShare {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "cpu share auto {:.3}: device {:.3} ms a layer, meetings {:.3} ms a layer; \
             CPU {:.1} GB/s alone, {:.1} beside copies at {:.1} GB/s ({:.1} alone); \
             one-token pass bound {:.2} ms",
            self.share,
            self.device_layer_s * 1e3,
            self.join_s * 1e3,
            self.cpu_alone_bps / 1e9,
            self.cpu_bps / 1e9,
            self.pcie_bps / 1e9,
            self.pcie_alone_bps / 1e9,
            self.pass_s * 1e3
        )
    }
}

/// The CPU share for the layers of `model` that stream (`resident[i]`
/// false) when the split divides the weights `only` names (every weight the
/// CPU reads when `None`), or `None` where a split does not pay: on the
/// host backend (the device is the CPU already) or with every layer
/// resident.
pub(crate) fn auto_share(
    model: &ModelIndex,
    (cfg, only): (&StreamerConfig, Option<&[String]>),
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
    let side = side_by_side(model, cfg, backend, ctx, largest, only)?;
    let device_layer_s = device_layer_seconds(ctx, dequant.as_deref(), largest, cfg)?;
    let per_byte = device_layer_s / largest.data_bytes.max(1) as f64;
    // Each side between its rate alone and side by side: in a pass the
    // copies wait on free slots part of the time, and the CPU reads alone
    // meanwhile (module docs).
    let planned = between(&side.alone, &side.beside);
    let layers = (model.layers().iter())
        .map(|l| layer_cost(model, &planned, l, only, per_byte * l.data_bytes as f64))
        .collect::<Result<Vec<_>>>()?;
    let join_s = side.meeting_s * meetings(largest, only) as f64;
    let inputs = SplitInputs {
        layers,
        pcie_bps: (side.pcie_alone_bps + side.pcie_bps) / 2.0,
        join_s,
        // The cache is placed: the planner only picks the share.
        vram_budget: u64::MAX,
        slots: 1,
    };
    let rate = |rates: &CpuRates| -> Result<f64> {
        let cost = layer_cost(model, rates, largest, only, device_layer_s)?;
        Ok(cost.bytes as f64 / cost.cpu_s)
    };
    let (cpu_alone_bps, cpu_bps) = (rate(&side.alone)?, rate(&side.beside)?);
    let (share, pass_s) = share_for(&inputs, None, resident)?;
    Ok(Some(AutoShare {
        share,
        device_layer_s,
        cpu_bps,
        cpu_alone_bps,
        pcie_bps: side.pcie_bps,
        pcie_alone_bps: side.pcie_alone_bps,
        join_s,
        pass_s,
    }))
}

/// The meetings of the two sides in one layer: two for each group of
/// divided weights (the key's part before the weight's own name, as
/// `mlp` of `mlp.up_proj.weight`), one for the input and one for the
/// output of a group's products.
fn meetings(layer: &Layer, only: Option<&[String]>) -> usize {
    let mut groups: Vec<&str> = (layer.tensors.iter())
        .zip(divided_tensors(layer, only))
        .filter(|(_, d)| d.is_some())
        .map(|(t, _)| t.key.rsplitn(3, '.').nth(2).unwrap_or(""))
        .collect();
    groups.sort_unstable();
    groups.dedup();
    2 * groups.len()
}

/// Rates halfway between `a`'s and `b`'s, type by type (`a`'s types).
fn between(a: &CpuRates, b: &CpuRates) -> CpuRates {
    let by_type = (a.by_type.iter())
        .map(|&(ty, r)| (ty, b.rate(ty).map_or(r, |q| (r + q) / 2.0)))
        .collect();
    CpuRates {
        tokens: a.tokens,
        by_type,
        read_bps: None,
    }
}

/// What [`side_by_side`] measured.
struct SideBySide {
    /// The CPU's rates alone.
    alone: CpuRates,
    /// The CPU's rates while copies run.
    beside: CpuRates,
    pcie_bps: f64,
    pcie_alone_bps: f64,
    meeting_s: f64,
}

/// The CPU's rates on the stored types of `model`'s divided weights alone
/// and while page-locked copies run, the copies' rate meanwhile and alone,
/// and a meeting's seconds for `largest`'s inputs.
fn side_by_side(
    model: &ModelIndex,
    cfg: &StreamerConfig,
    backend: &Backend,
    ctx: &Context,
    largest: &Layer,
    only: Option<&[String]>,
) -> Result<SideBySide> {
    let mut types: Vec<QuantType> = (model.layers().iter())
        .flat_map(|l| divided_tensors(l, only))
        .flatten()
        .collect();
    types.sort_by_key(|t| t.ggml_type_id());
    types.dedup();
    let pool = CpuPool::new(&CpuPoolOptions {
        exclude: cfg.cpu_affinity.clone().unwrap_or_default(),
        ..CpuPoolOptions::default()
    })?;
    let mut host = backend.pinned(COPY_BYTES)?;
    let dev = DeviceBuffer::alloc(ctx, COPY_BYTES)?;
    let k = (largest.tensors.iter().zip(divided_tensors(largest, only)))
        .filter(|(_, d)| d.is_some())
        .map(|(t, _)| t.info.shape[1])
        .max()
        .unwrap_or(0);
    let meeting_s = meeting_seconds(ctx, &pool, host.buf.as_mut_slice(), k)?;
    // SAFETY: `pinned` made COPY_BYTES of page-locked memory, written by
    // nobody while `src` lives.
    let src = unsafe { std::slice::from_raw_parts(host.ptr(), COPY_BYTES) };
    let pcie_alone_bps = h2d_rate(ctx, src, &dev)?;
    let cal = Calibration::new(&pool, &types, 32 << 20)?;
    let alone = cal.products(&pool, 1, 2)?;
    let (beside, pcie_bps) = while_copying(ctx, src, &dev, || cal.products(&pool, 1, 2))?;
    Ok(SideBySide {
        alone,
        beside,
        pcie_bps,
        pcie_alone_bps,
        meeting_s,
    })
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

#[cfg(test)]
#[path = "split_auto_tests.rs"]
mod tests;
