//! How much of each layer the CPU computes: the share of rows that makes the
//! CPU side and the GPU side of a layer finish together.
//!
//! Both sides work on the same layer at once and meet at its end, so a
//! layer's time is the slower side's. At CPU share `s`:
//!
//! - the CPU reads `s` of the layer's bytes from host RAM: `s · cpu_s`, plus
//!   `join_s` for meeting the GPU side (only when `s > 0`);
//! - the GPU side computes `1 - s` of the layer: `(1 - s) · gpu_s`; for a
//!   streamed layer its rows also cross PCIe, and since the next layer's copy
//!   overlaps this layer's compute the side takes
//!   `(1 - s) · max(bytes / pcie, gpu_s)`; a resident layer crosses nothing.
//!
//! Both lines are linear in `s`, so the balance is
//! `s* = (G - join_s) / (cpu_s + G)` with `G` the GPU side's time at `s = 0`,
//! clamped to `[0, 1]`; where `s*` would not beat the GPU alone (the join
//! costs more than it saves: prefill, large batches) the share is 0.
//!
//! Which layers are resident depends on the shares too: a streamed layer's
//! device slot holds only its GPU rows, so a smaller slot leaves more of the
//! VRAM budget for resident layers. [`plan_split`] finds the resident count
//! and the shares together.

use super::calibrate::CpuRates;
use crate::checkpoint::ModelIndex;
use crate::error::{Error, Result};

/// The cost of one layer at the batch size at hand.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LayerCost {
    /// Stored bytes of the layer's weights (what a whole layer streams).
    pub bytes: u64,
    /// Seconds the CPU takes for the whole layer (its bytes over the CPU's
    /// GB/s for their stored types at this batch size).
    pub cpu_s: f64,
    /// Seconds the GPU computes the whole layer at this batch size.
    pub gpu_s: f64,
}

/// What the planner knows about the machine and the model.
#[derive(Debug, Clone, PartialEq)]
pub struct SplitInputs {
    /// Every layer, in order.
    pub layers: Vec<LayerCost>,
    /// Host-to-device bytes per second.
    pub pcie_bps: f64,
    /// Seconds one layer's two meetings of the sides cost (0 when unknown).
    pub join_s: f64,
    /// Device bytes for layers: the streaming slots plus resident layers.
    pub vram_budget: u64,
    /// Streaming slots on the device (the pipeline's `n_gpu + 1`).
    pub slots: usize,
}

/// The planner's answer.
#[derive(Debug, Clone, PartialEq)]
pub struct SplitPlan {
    /// The CPU share of each layer, in `[0, 1]`.
    pub shares: Vec<f64>,
    /// Layers `0..resident` stay on the device (the GPU cache fills from the first).
    pub resident: usize,
    /// Seconds of each layer at its share: the slower side.
    pub layer_s: Vec<f64>,
    /// Seconds of a pass at these shares (the bound the split should reach).
    pub pass_s: f64,
    /// Seconds of a pass with no CPU share and as many resident layers as the
    /// budget holds at full slots: what the split is measured against.
    pub gpu_only_pass_s: f64,
}

/// The share of one layer and its time, `resident` or streamed.
pub fn layer_share(l: &LayerCost, resident: bool, pcie_bps: f64, join_s: f64) -> (f64, f64) {
    let xfer = if resident {
        0.0
    } else {
        l.bytes as f64 / pcie_bps
    };
    let gpu = xfer.max(l.gpu_s);
    let s = ((gpu - join_s) / (l.cpu_s + gpu)).clamp(0.0, 1.0);
    let split = (s * l.cpu_s + join_s).max((1.0 - s) * gpu);
    if s > 0.0 && split < gpu {
        (s, split)
    } else {
        (0.0, gpu)
    }
}

/// Shares and time with layers `0..resident` on the device.
fn with_resident(inp: &SplitInputs, resident: usize, cpu: bool) -> (Vec<f64>, Vec<f64>) {
    inp.layers
        .iter()
        .enumerate()
        .map(|(i, l)| {
            let r = i < resident;
            if cpu {
                layer_share(l, r, inp.pcie_bps, inp.join_s)
            } else {
                (
                    0.0,
                    l.gpu_s.max(if r {
                        0.0
                    } else {
                        l.bytes as f64 / inp.pcie_bps
                    }),
                )
            }
        })
        .unzip()
}

/// Device bytes that `resident` layers and the slots of the streamed ones
/// take, each slot sized for the largest GPU share among them.
pub(super) fn vram_used(inp: &SplitInputs, resident: usize, shares: &[f64]) -> u64 {
    let kept: u64 = inp.layers[..resident].iter().map(|l| l.bytes).sum();
    let slot = inp.layers[resident..]
        .iter()
        .zip(&shares[resident..])
        .map(|(l, s)| ((1.0 - s) * l.bytes as f64).ceil() as u64)
        .max()
        .unwrap_or(0);
    kept + slot * inp.slots as u64
}

/// The most resident layers that fit the budget, and their shares.
fn best_fit(inp: &SplitInputs, cpu: bool) -> (usize, Vec<f64>, Vec<f64>) {
    // Residency only helps (a resident layer skips PCIe), so take the most
    // that fit; shares change slot sizes, so the fit is checked with them.
    (0..=inp.layers.len())
        .rev()
        .map(|r| {
            let (s, t) = with_resident(inp, r, cpu);
            (r, s, t)
        })
        .find(|(r, s, _)| vram_used(inp, *r, s) <= inp.vram_budget)
        .unwrap_or_else(|| {
            let (s, t) = with_resident(inp, 0, cpu);
            (0, s, t)
        })
}

/// Rejects rates and times that would make the arithmetic meaningless.
pub(super) fn validate(inp: &SplitInputs) -> Result<()> {
    let bad = |what: String, v: f64| {
        Error::Input(format!(
            "cpu share planner: {what} is {v}, not a finite positive number"
        ))
    };
    if !(inp.pcie_bps.is_finite() && inp.pcie_bps > 0.0) {
        return Err(bad("the PCIe rate".into(), inp.pcie_bps));
    }
    if !(inp.join_s.is_finite() && inp.join_s >= 0.0) {
        return Err(bad("the join time".into(), inp.join_s));
    }
    for (i, l) in inp.layers.iter().enumerate() {
        if !(l.cpu_s.is_finite() && l.cpu_s > 0.0) {
            return Err(bad(format!("layer {i}'s CPU time"), l.cpu_s));
        }
        if !(l.gpu_s.is_finite() && l.gpu_s >= 0.0) {
            return Err(bad(format!("layer {i}'s GPU time"), l.gpu_s));
        }
    }
    Ok(())
}

/// The CPU share of every layer; see the [module docs](self). An error when
/// a rate or time is not a finite positive number (a GPU time may be 0).
pub fn plan_split(inp: &SplitInputs) -> Result<SplitPlan> {
    validate(inp)?;
    let (resident, shares, layer_s) = best_fit(inp, true);
    let (_, _, gpu_only) = best_fit(inp, false);
    Ok(SplitPlan {
        pass_s: layer_s.iter().sum(),
        gpu_only_pass_s: gpu_only.iter().sum(),
        shares,
        resident,
        layer_s,
    })
}

/// The cost of every layer of `model` at the batch `rates` was measured at,
/// with `gpu_s(layer)` the GPU's time for the whole layer at that batch.
pub fn layer_costs(
    model: &ModelIndex,
    rates: &CpuRates,
    gpu_s: impl Fn(usize) -> f64,
) -> Result<Vec<LayerCost>> {
    model
        .layers()
        .iter()
        .map(|l| {
            Ok(LayerCost {
                bytes: l.data_bytes,
                cpu_s: rates.layer_seconds(model, l)?,
                gpu_s: gpu_s(l.index),
            })
        })
        .collect()
}

/// Rows of a tensor of `rows` rows that the CPU computes at share `s`,
/// rounded to a multiple of `multiple` (a head's rows, say) and at most `rows`.
pub fn cpu_rows(rows: usize, s: f64, multiple: usize) -> usize {
    let m = multiple.max(1);
    let want = (s.clamp(0.0, 1.0) * rows as f64).round() as usize;
    (want.div_ceil(m) * m).min(rows)
}

#[cfg(test)]
#[path = "plan_tests.rs"]
mod tests;
