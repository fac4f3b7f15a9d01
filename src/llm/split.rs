//! The forward pass with a CPU/GPU row split (a streamer built with a
//! `cpu_share`): of every split weight, the device side computes the output
//! columns of its streamed rows and the CPU pool those of its host rows,
//! from the same activations; the outputs are joined column-wise. The split
//! changes where sums happen, not what is summed: both sides read the
//! weights in their stored type and keep activations and sums in f32.
//!
//! # Where the sides meet
//! Per layer, in order (`xn` the normed activations, `x` the residual):
//! 1. after q/k/v: both sides project `xn`; the CPU's q/k/v columns go to
//!    the device, which adds the biases, applies RoPE, writes the KV cache
//!    and computes attention for every head (heads and their cache stay on
//!    the device);
//! 2. after attention: the heads' output goes to the host, and both sides
//!    compute their columns of `o_proj`; the CPU's columns go back and are
//!    added into `x` with the device's;
//! 3. after gate/up: both sides project the normed `x`; the CPU's gate and
//!    up columns go to the device, which applies SwiGLU to every column;
//! 4. after down: the product goes to the host, both sides compute their
//!    columns of `down_proj` from all of it, and the CPU's columns, added
//!    to the residual's, go back into `x`.
//!
//! The CPU reads the GEMM inputs as the device multiplies them (16-bit,
//! `hi + lo` in exact precision) and the weights as stored; only the
//! order of the f32 sums differs from a whole-layer pass.
//!
//! On the host backend the device side is the host math of
//! [`super::host`], so the meetings are plain copies; this module is that
//! stand-in, and the tests compare its logits across shares.

use std::time::Instant;

use crate::cpu::{CpuPool, CpuPoolOptions};
use crate::llm::ops;
use crate::quant::QuantType;
use crate::{Error, HostRows, LayerWeights, Result};

/// The CPU pool of a model whose streamer splits rows, on every allowed
/// CPU but those the stage threads are pinned to; `None` without a split.
pub(crate) fn pool_for(streamer: &crate::LayerStreamer) -> Result<Option<CpuPool>> {
    if streamer.cpu_share() == 0.0 {
        return Ok(None);
    }
    let exclude = streamer.config().cpu_affinity.clone().unwrap_or_default();
    CpuPool::new(&CpuPoolOptions {
        exclude,
        ..CpuPoolOptions::default()
    })
    .map(Some)
}

/// `y (+)= x · Wᵀ (+ bias)` for a weight split between the device rows
/// `dev` (`host.first_row()` rows of type `dev_ty`) and the CPU's rows
/// `host`: `y` is `tokens × n` with `n` the tensor's rows.
#[allow(clippy::too_many_arguments)]
pub(crate) fn linear(
    w: &LayerWeights<'_>,
    pool: &CpuPool,
    key: &str,
    x: &[f32],
    tokens: usize,
    (dev, dev_ty): (&[u8], QuantType),
    host: &HostRows<'_>,
    n: usize,
    bias: Option<&[f32]>,
    y: &mut [f32],
    accumulate: bool,
) -> Result<()> {
    let g = host.first_row();
    if g + host.rows() != n {
        return Err(Error::Pipeline(format!(
            "layer {} tensor {key}: {g} device rows and {} host rows, but {n} outputs",
            w.layer(),
            host.rows()
        )));
    }
    let (bias_dev, bias_cpu) = match bias {
        Some(b) if b.len() == n => (Some(&b[..g]), Some(&b[g..])),
        Some(b) => {
            return Err(Error::Input(format!(
                "layer {} tensor {key}: a bias of {} for {n} outputs",
                w.layer(),
                b.len()
            )))
        }
        None => (None, None),
    };
    let mut part_dev = vec![0.0f32; tokens * g];
    if g > 0 {
        ops::linear(x, tokens, dev, dev_ty, g, bias_dev, &mut part_dev, false)?;
    }
    let c = host.rows();
    let mut part_cpu = vec![0.0f32; tokens * c];
    let t0 = Instant::now();
    pool.matmul(&host.matrix()?, x, tokens, &mut part_cpu)?;
    w.note_cpu_side(t0.elapsed(), std::time::Duration::ZERO);
    if let Some(b) = bias_cpu {
        for row in part_cpu.chunks_exact_mut(c) {
            row.iter_mut().zip(b).for_each(|(v, b)| *v += b);
        }
    }
    join_columns(y, n, &part_dev, g, &part_cpu, accumulate);
    Ok(())
}

/// Writes (or adds) the device's first `g` columns and the CPU's last
/// columns of each row into `y`, rows of `n`.
fn join_columns(y: &mut [f32], n: usize, dev: &[f32], g: usize, cpu: &[f32], add: bool) {
    let c = n - g;
    for (t, row) in y.chunks_exact_mut(n).enumerate() {
        let (row_dev, row_cpu) = row.split_at_mut(g);
        let parts = [
            (row_dev, &dev[t * g..(t + 1) * g]),
            (row_cpu, &cpu[t * c..(t + 1) * c]),
        ];
        for (dst, src) in parts {
            if add {
                dst.iter_mut().zip(src).for_each(|(d, s)| *d += s);
            } else {
                dst.copy_from_slice(src);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_join_in_place_and_add() {
        let (t, n, g) = (3, 5, 2);
        let dev: Vec<f32> = (0..t * g).map(|i| i as f32).collect();
        let cpu: Vec<f32> = (0..t * (n - g)).map(|i| 100.0 + i as f32).collect();
        let mut y = vec![1.0; t * n];
        join_columns(&mut y, n, &dev, g, &cpu, false);
        assert_eq!(&y[5..10], &[2.0, 3.0, 103.0, 104.0, 105.0]);
        join_columns(&mut y, n, &dev, g, &cpu, true);
        assert_eq!(&y[10..15], &[8.0, 10.0, 212.0, 214.0, 216.0]);
    }
}
