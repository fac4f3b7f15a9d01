//! The split planned over a whole pass rather than layer by layer.
//!
//! [`plan_split`](super::plan::plan_split) makes each streamed layer's two
//! sides finish together, as if a layer's copy could only overlap its own
//! compute. In a pass the transfer stage runs ahead into free slots while
//! earlier layers compute, resident ones included, and the CPU idles while a
//! resident layer computes. So a pass has two budgets, and a third where the
//! host's memory is measured:
//!
//! - the copies: `Σ (1 − s)·bytes / pcie` over the streamed layers;
//! - the serial side: `Σ gpu_s` over the resident layers, plus
//!   `Σ max(s·cpu_s + join, (1 − s)·gpu_s)` over the streamed ones;
//! - the host's memory: `Σ bytes / host_read` over the streamed layers (the
//!   CPU's reads and the copies' DMA come out of one memory).
//!
//! The pass takes the largest. While the copies run, the CPU gets no more
//! than what the copies leave of the host's read rate: its time per layer is
//! at least `s·bytes / (host_read − pcie)`. [`plan_pass`] picks the one share
//! of the streamed layers (in steps of 1/[`SHARE_STEPS`]) and the resident
//! count that make the pass shortest within the VRAM budget.

use super::plan::{validate, vram_used, SplitInputs, SplitPlan};
use crate::error::{Error, Result};

/// Shares tried between 0 and 1.
pub const SHARE_STEPS: usize = 400;

/// The share of the host's read rate the CPU keeps at least while the
/// copies run (so that a copy rate above the measured read rate does not
/// make the CPU's time infinite).
const CPU_READ_FLOOR: f64 = 0.1;

/// Bytes per second the CPU can read while copies at `pcie_bps` run: what
/// they leave of the host's read rate `host_read_bps`, at least
/// [`CPU_READ_FLOOR`] of it.
pub fn cpu_read_while_copying(host_read_bps: f64, pcie_bps: f64) -> f64 {
    (host_read_bps - pcie_bps).max(CPU_READ_FLOOR * host_read_bps)
}

/// Seconds of a pass with the layers `resident` names resident and share
/// `s` of every streamed layer on the CPU, and each layer's time on the
/// serial side.
pub(super) fn pass_time(
    inp: &SplitInputs,
    host_read_bps: Option<f64>,
    resident: impl Fn(usize) -> bool,
    s: f64,
) -> (f64, Vec<f64>) {
    let cpu_bps = host_read_bps.map(|r| cpu_read_while_copying(r, inp.pcie_bps));
    let (mut copy, mut streamed_bytes) = (0.0, 0.0);
    let serial: Vec<f64> = (inp.layers.iter().enumerate())
        .map(|(i, l)| {
            if resident(i) {
                return l.gpu_s;
            }
            let bytes = l.bytes as f64;
            copy += (1.0 - s) * bytes / inp.pcie_bps;
            streamed_bytes += bytes;
            let cpu_s = cpu_bps.map_or(l.cpu_s, |r| l.cpu_s.max(bytes / r));
            let gpu = (1.0 - s) * l.gpu_s;
            if s > 0.0 {
                (s * cpu_s + inp.join_s).max(gpu)
            } else {
                gpu
            }
        })
        .collect();
    let memory = host_read_bps.map_or(0.0, |r| streamed_bytes / r);
    (serial.iter().sum::<f64>().max(copy).max(memory), serial)
}

/// Whether layers `0..r` and the slots of the others at share `s` fit the
/// budget.
fn fits(inp: &SplitInputs, r: usize, s: f64) -> bool {
    let shares: Vec<f64> = (0..inp.layers.len())
        .map(|i| if i < r { 0.0 } else { s })
        .collect();
    vram_used(inp, r, &shares) <= inp.vram_budget
}

/// The shortest pass at share `s`: its time, resident count and serial
/// times. Every resident count that fits is tried, not only the largest: a
/// streamed layer whose rows the two sides share can finish sooner than a
/// resident one when the copies have time to spare. Nothing fitting, the
/// pass streams every layer (the streamer then says what does not fit).
fn best_at(inp: &SplitInputs, read: Option<f64>, s: f64) -> (f64, usize, Vec<f64>) {
    (0..=inp.layers.len())
        .filter(|&r| fits(inp, r, s))
        .map(|r| {
            let (t, serial) = pass_time(inp, read, |i| i < r, s);
            (t, r, serial)
        })
        .min_by(|a, b| a.0.total_cmp(&b.0).then(b.1.cmp(&a.1)))
        .unwrap_or_else(|| {
            let (t, serial) = pass_time(inp, read, |_| false, s);
            (t, 0, serial)
        })
}

/// One share for every streamed layer and the resident count that make the
/// pass shortest (module docs); `host_read_bps`, where measured, is the
/// host's memory read rate. An error when a rate or time is not a finite
/// positive number (a GPU time may be 0).
pub fn plan_pass(inp: &SplitInputs, host_read_bps: Option<f64>) -> Result<SplitPlan> {
    validate(inp)?;
    validate_read(host_read_bps)?;
    let at = |s: f64| {
        let (t, r, serial) = best_at(inp, host_read_bps, s);
        (t, r, s, serial)
    };
    let (gpu_only, ..) = at(0.0);
    let best = (0..=SHARE_STEPS)
        .map(|k| at(k as f64 / SHARE_STEPS as f64))
        .min_by(|a, b| a.0.total_cmp(&b.0))
        .unwrap_or_else(|| at(0.0));
    let (pass_s, resident, s, layer_s) = best;
    let n = inp.layers.len();
    Ok(SplitPlan {
        shares: (0..n).map(|i| if i < resident { 0.0 } else { s }).collect(),
        resident,
        layer_s,
        pass_s,
        gpu_only_pass_s: gpu_only,
    })
}

/// The one share of the streamed layers that makes the pass shortest when
/// the layers `resident[i]` names stay on the device (the GPU cache has
/// placed them, and slots sized for whole layers hold any share), and the
/// pass's seconds at it. The smallest such share where several tie. Errors
/// as for [`plan_pass`], and when `resident` does not name every layer.
pub fn share_for(
    inp: &SplitInputs,
    host_read_bps: Option<f64>,
    resident: &[bool],
) -> Result<(f64, f64)> {
    validate(inp)?;
    validate_read(host_read_bps)?;
    if resident.len() != inp.layers.len() {
        return Err(Error::Input(format!(
            "cpu share planner: {} resident flags for {} layers",
            resident.len(),
            inp.layers.len()
        )));
    }
    let at = |k: usize| {
        let s = k as f64 / SHARE_STEPS as f64;
        (pass_time(inp, host_read_bps, |i| resident[i], s).0, s)
    };
    let best = (0..=SHARE_STEPS)
        .map(at)
        .min_by(|a, b| a.0.total_cmp(&b.0).then(a.1.total_cmp(&b.1)))
        .unwrap_or((0.0, 0.0));
    Ok((best.1, best.0))
}

/// An error when the host's read rate is given and is not a finite
/// positive number.
fn validate_read(host_read_bps: Option<f64>) -> Result<()> {
    match host_read_bps.filter(|r| !(r.is_finite() && *r > 0.0)) {
        Some(r) => Err(Error::Input(format!(
            "cpu share planner: the host's read rate is {r}, not a finite positive number"
        ))),
        None => Ok(()),
    }
}

#[cfg(test)]
#[path = "plan_pass_tests.rs"]
mod tests;
