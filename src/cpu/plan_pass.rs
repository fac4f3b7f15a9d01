//! The split planned over a whole pass rather than layer by layer.
//!
//! [`plan_split`](super::plan::plan_split) makes each streamed layer's two
//! sides finish together, as if a layer's copy could only overlap its own
//! compute. In a pass the transfer stage runs ahead into free slots while
//! earlier layers compute, resident ones included, and the CPU idles while a
//! resident layer computes. So a pass has two budgets, and a third where the
//! host's memory is measured:
//!
//! - the copies: `Σ ((1 − s)·bytes + whole) / pcie` over the streamed
//!   layers (`bytes` the weights the split divides, `whole` the rest);
//! - the serial side: `Σ gpu_s` over the resident layers, plus
//!   `Σ max(s·cpu_s + join, (1 − s·d)·gpu_s)` over the streamed ones, `d`
//!   the divided part of a layer's bytes;
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

/// What a pass's time knows of the host's memory.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Host {
    /// Nothing: the CPU's rates and the copies' are all there is.
    Unknown,
    /// The host's read rate ([`plan_pass`]): every streamed byte is read at
    /// it, and the CPU gets what the copies leave of it.
    Read(f64),
    /// The rate at which the CPU and the copies together read the host's
    /// memory ([`share_for`]): every streamed byte is read at it, and each
    /// side runs at its own rate otherwise.
    Shared(f64),
}

/// Seconds of a pass with the layers `resident` names resident and share
/// `s` of every streamed layer on the CPU, and each layer's time on the
/// serial side.
pub(super) fn pass_time(
    inp: &SplitInputs,
    host: Host,
    resident: impl Fn(usize) -> bool,
    s: f64,
) -> (f64, Vec<f64>) {
    let cpu_bps = match host {
        Host::Read(r) => Some(cpu_read_while_copying(r, inp.pcie_bps)),
        _ => None,
    };
    let (mut copy, mut streamed_bytes) = (0.0, 0.0);
    let serial: Vec<f64> = (inp.layers.iter().enumerate())
        .map(|(i, l)| {
            if resident(i) {
                return l.gpu_s;
            }
            copy += l.streamed_at(s) / inp.pcie_bps;
            streamed_bytes += l.total_bytes() as f64;
            let cpu_s = cpu_bps.map_or(l.cpu_s, |r| l.cpu_s.max(l.bytes as f64 / r));
            let gpu = l.gpu_at(s);
            if s > 0.0 {
                (s * cpu_s + inp.join_s).max(gpu)
            } else {
                gpu
            }
        })
        .collect();
    let memory = match host {
        Host::Read(r) | Host::Shared(r) => streamed_bytes / r,
        Host::Unknown => 0.0,
    };
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
fn best_at(inp: &SplitInputs, read: Host, s: f64) -> (f64, usize, Vec<f64>) {
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
    let host = host_read_bps.map_or(Host::Unknown, Host::Read);
    let at = |s: f64| {
        let (t, r, serial) = best_at(inp, host, s);
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

/// Passes within this fraction of the shortest count as the shortest in
/// [`share_for`].
pub const NEAR_BEST: f64 = 0.02;

/// The share of the streamed layers for a pass when the layers `resident[i]`
/// names stay on the device (the GPU cache has placed them, and slots sized
/// for whole layers hold any share), and the pass's seconds at it.
/// `shared_bps`, where measured, is the rate at which the CPU and the
/// copies together read the host's memory; the layers' CPU times and
/// `pcie_bps` are then each side's rate alone.
///
/// Of the shares whose pass comes within [`NEAR_BEST`] of the shortest,
/// the middle of the range around the shortest: when the host's memory
/// bounds the pass, a range of shares leaves both sides room, and how the
/// two divide the memory in a pass is not what a rate measured at build
/// says; the middle leaves each side the most room. Errors as for
/// [`plan_pass`], and when `resident` does not name every layer.
pub fn share_for(
    inp: &SplitInputs,
    shared_bps: Option<f64>,
    resident: &[bool],
) -> Result<(f64, f64)> {
    validate(inp)?;
    validate_read(shared_bps)?;
    if resident.len() != inp.layers.len() {
        return Err(Error::Input(format!(
            "cpu share planner: {} resident flags for {} layers",
            resident.len(),
            inp.layers.len()
        )));
    }
    let host = shared_bps.map_or(Host::Unknown, Host::Shared);
    let times: Vec<f64> = (0..=SHARE_STEPS)
        .map(|k| pass_time(inp, host, |i| resident[i], k as f64 / SHARE_STEPS as f64).0)
        .collect();
    let (lo, hi) = near_best(&times);
    let k = (lo + hi) / 2;
    Ok((k as f64 / SHARE_STEPS as f64, times[k]))
}

/// The first and last index of the run of `times` within [`NEAR_BEST`] of
/// the least that holds the first least.
pub(super) fn near_best(times: &[f64]) -> (usize, usize) {
    let best = (0..times.len())
        .min_by(|&a, &b| times[a].total_cmp(&times[b]).then(a.cmp(&b)))
        .unwrap_or(0);
    let Some(&least) = times.get(best) else {
        return (0, 0);
    };
    let near = |i: &usize| times[*i] <= least * (1.0 + NEAR_BEST);
    let lo = (0..=best).rev().take_while(near).last().unwrap_or(best);
    let hi = (best..times.len()).take_while(near).last().unwrap_or(best);
    (lo, hi)
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
