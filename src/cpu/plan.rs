//! How much of each layer the CPU computes: the share of rows that makes the
//! CPU side and the GPU side of a layer finish together.
//!
//! Both sides work on the same layer at once and meet at its end, so a
//! layer's time is the slower side's. A split divides some of a layer's
//! weights (`bytes`: the MLP's, say); the rest (`whole_bytes`) streams whole.
//! At CPU share `s`, with `d = bytes / (bytes + whole_bytes)`:
//!
//! - the CPU reads `s` of the divided bytes from host RAM: `s · cpu_s`, plus
//!   `join_s` for meeting the GPU side (only when `s > 0`);
//! - the GPU side computes the rest: `(1 - s·d) · gpu_s`; for a streamed
//!   layer those rows also cross PCIe, and since the next layer's copy
//!   overlaps this layer's compute the side takes `(1 - s·d) · G` with
//!   `G = max((bytes + whole_bytes) / pcie, gpu_s)`; a resident layer
//!   crosses nothing (`G = gpu_s`).
//!
//! Both lines are linear in `s`, so the balance is
//! `s* = (G - join_s) / (cpu_s + d·G)`, clamped to `[0, 1]`; where `s*`
//! would not beat the GPU alone (the join costs more than it saves:
//! prefill, large batches) the share is 0.
//!
//! Which layers are resident depends on the shares too: a streamed layer's
//! device slot holds only its GPU rows, so a smaller slot leaves more of the
//! VRAM budget for resident layers. [`plan_split`] finds the resident count
//! and the shares together.

use std::collections::HashSet;

use super::calibrate::CpuRates;
use crate::checkpoint::{Layer, ModelIndex};
use crate::error::{Error, Result};
use crate::quant::QuantType;

/// The cost of one layer at the batch size at hand.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LayerCost {
    /// Stored bytes of the weights the split divides (their rows go to the
    /// CPU at a share).
    pub bytes: u64,
    /// Stored bytes of the rest of the layer, which streams whole at any
    /// share: norms, biases, weights the CPU kernels do not read, and those
    /// a split leaves out (attention's, where only the MLP's are split).
    pub whole_bytes: u64,
    /// Seconds the CPU takes for all of `bytes` (over the CPU's GB/s for
    /// their stored types at this batch size).
    pub cpu_s: f64,
    /// Seconds the GPU computes the whole layer at this batch size.
    pub gpu_s: f64,
}

impl LayerCost {
    /// Bytes a whole layer streams.
    pub fn total_bytes(&self) -> u64 {
        self.bytes + self.whole_bytes
    }

    /// The part of the layer a share `s` takes off the device side: its
    /// copy and its products shrink by `s` of the divided bytes.
    fn divided(&self) -> f64 {
        self.bytes as f64 / self.total_bytes().max(1) as f64
    }

    /// Bytes the layer streams at share `s`.
    pub fn streamed_at(&self, s: f64) -> f64 {
        (1.0 - s) * self.bytes as f64 + self.whole_bytes as f64
    }

    /// Seconds the device computes its part of the layer at share `s`
    /// (products in proportion to bytes).
    pub fn gpu_at(&self, s: f64) -> f64 {
        (1.0 - s * self.divided()) * self.gpu_s
    }
}

/// Which of `layer`'s tensors a row split divides, and their stored types:
/// 2-D tensors the CPU kernels read (not FP8 weights or their scales) whose
/// keys end with one of `only` (every such tensor when `None`).
pub fn divided_tensors(layer: &Layer, only: Option<&[String]>) -> Vec<Option<QuantType>> {
    let scales: HashSet<&str> = (layer.tensors.iter())
        .filter_map(|t| t.info.scale.as_ref().map(|s| s.tensor.as_str()))
        .collect();
    (layer.tensors.iter())
        .map(|t| {
            let info = &t.info;
            let chosen = only.is_none_or(|o| o.iter().any(|s| t.key.ends_with(s.as_str())));
            if !chosen
                || info.shape.len() != 2
                || info.scale.is_some()
                || scales.contains(info.name.as_str())
            {
                return None;
            }
            info.quant.or_else(|| QuantType::from_dtype(info.dtype))
        })
        .collect()
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
        l.total_bytes() as f64 / pcie_bps
    };
    // The device side at share `s` is `gpu · (1 - s · divided)`.
    let gpu = xfer.max(l.gpu_s);
    let shrink = gpu * l.divided();
    let s = ((gpu - join_s) / (l.cpu_s + shrink)).clamp(0.0, 1.0);
    let split = (s * l.cpu_s + join_s).max(gpu - s * shrink);
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
                        l.total_bytes() as f64 / inp.pcie_bps
                    }),
                )
            }
        })
        .unzip()
}

/// Device bytes that `resident` layers and the slots of the streamed ones
/// take, each slot sized for the largest GPU share among them.
pub(super) fn vram_used(inp: &SplitInputs, resident: usize, shares: &[f64]) -> u64 {
    let kept: u64 = inp.layers[..resident].iter().map(|l| l.total_bytes()).sum();
    let slot = inp.layers[resident..]
        .iter()
        .zip(&shares[resident..])
        .map(|(l, &s)| l.streamed_at(s).ceil() as u64)
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
/// with the tensors `only` names divided ([`divided_tensors`]) and
/// `gpu_s(layer)` the GPU's time for the whole layer at that batch.
pub fn layer_costs(
    model: &ModelIndex,
    rates: &CpuRates,
    only: Option<&[String]>,
    gpu_s: impl Fn(usize) -> f64,
) -> Result<Vec<LayerCost>> {
    (model.layers().iter())
        .map(|l| layer_cost(model, rates, l, only, gpu_s(l.index)))
        .collect()
}

/// The cost of `layer` of `model` ([`layer_costs`]). An error names a
/// divided tensor whose stored type `rates` has no rate for.
pub fn layer_cost(
    model: &ModelIndex,
    rates: &CpuRates,
    layer: &Layer,
    only: Option<&[String]>,
    gpu_s: f64,
) -> Result<LayerCost> {
    let (mut bytes, mut cpu_s) = (0u64, 0.0);
    for (t, ty) in layer.tensors.iter().zip(divided_tensors(layer, only)) {
        let Some(ty) = ty else { continue };
        let rate = (rates.rate(ty)).map_err(|e| {
            let file = model.files().get(t.info.file).map(|f| f.path.display());
            let file = file.map(|f| format!(" of {f}")).unwrap_or_default();
            Error::Config(format!("tensor {}{file}: {e}", t.info.name))
        })?;
        bytes += t.info.len;
        cpu_s += t.info.len as f64 / rate;
    }
    Ok(LayerCost {
        bytes,
        whole_bytes: layer.data_bytes.saturating_sub(bytes),
        // A layer with nothing divided: the CPU has no rows to compute.
        cpu_s: cpu_s.max(f64::MIN_POSITIVE),
        gpu_s,
    })
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
