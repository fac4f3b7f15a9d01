//! The GEMM side of the CUDA forward pass: GEMM inputs in one or two 16-bit
//! buffers (by [`Precision`]), the products over them, and whether a slot
//! holds the gate and up projections as one `[2 * inter, hidden]` matrix.

use crate::cuda::cublas::{Cublas, GemmType};
use crate::cuda::{Context, DeviceBuffer};
use crate::llm::gpu_kernels::Split;
use crate::llm::llama::Precision;
use crate::{Result, TensorView};

/// A GEMM input: `hi`, plus `lo` in [`Precision::Exact`] (see
/// `kernels/model.cu`'s `store_split`).
pub(crate) struct SplitBuf {
    hi: DeviceBuffer,
    /// Allocated only in [`Precision::Exact`].
    lo: Option<DeviceBuffer>,
}

impl SplitBuf {
    /// Buffers for `elems` 16-bit values: one, or two in exact precision.
    pub(crate) fn new(ctx: &Context, elems: usize, precision: Precision) -> Result<SplitBuf> {
        let alloc = || DeviceBuffer::alloc(ctx, (elems * 2).max(4));
        Ok(SplitBuf {
            hi: alloc()?,
            lo: match precision {
                Precision::Exact => Some(alloc()?),
                Precision::Fast => None,
            },
        })
    }

    /// The device addresses the kernels and GEMMs take (`lo == 0` in fast
    /// precision).
    pub(crate) fn split(&self) -> Split {
        Split {
            hi: self.hi.ptr(),
            lo: self.lo.as_ref().map_or(0, DeviceBuffer::ptr),
        }
    }
}

/// `Y (+)= (hi + lo) · Wᵀ`: one GEMM on `hi` alone when `x.lo == 0`, else
/// two, the second accumulating; `x`'s halves and `w` are of type `xw`.
///
/// # Safety
/// As for [`Cublas::linear`], for `x.hi` and (unless 0) `x.lo`.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn linear_split(
    blas: &mut Cublas,
    xw: GemmType,
    x: Split,
    w: u64,
    y: u64,
    yt: GemmType,
    rows: usize,
    n: usize,
    k: usize,
    beta: f32,
) -> Result<()> {
    // SAFETY: forwarded from the caller.
    unsafe {
        blas.linear(x.hi, w, xw, y, yt, rows, n, k, beta)?;
        if x.lo != 0 {
            blas.linear(x.lo, w, xw, y, yt, rows, n, k, 1.0)?;
        }
    }
    Ok(())
}

/// Whether `up` starts right where `gate` ends in the slot, with the same
/// dtype and shape and no block quantization, so that the two are one
/// row-major `[2 * inter, hidden]` matrix `[gate | up]` and one GEMM
/// computes both (its output rows are `[gate(inter) | up(inter)]`).
///
/// Checkpoints written in key order (the Hugging Face writers sort a
/// layer's tensors by name) keep `mlp.gate_proj` and `mlp.up_proj` next to
/// each other, as do the on-device casts, which land in file order.
pub(crate) fn gate_up_adjacent(gate: &TensorView<'_>, up: &TensorView<'_>) -> bool {
    let dense = |v: &TensorView<'_>| {
        v.quant().is_none() && v.bytes() == (v.numel() * v.dtype().size()) as u64
    };
    dense(gate)
        && dense(up)
        && gate.dtype() == up.dtype()
        && gate.shape() == up.shape()
        && gate.ptr().checked_add(gate.bytes()) == Some(up.ptr())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synth::{write_model, Arch, Shape, SynthSpec};
    use crate::{DType, LayerStreamer, ModelIndex};

    /// Every layer's gate/up adjacency in a host pass over a synthetic model
    /// of `dtype`, streamed in `compute` (None: the file dtypes).
    fn adjacency(dtype: DType, compute: Option<DType>, seed: u64) -> Vec<bool> {
        let dir = tempfile::tempdir().unwrap();
        let spec = SynthSpec {
            arch: Arch::Llama,
            shape: Shape::preset("tiny").unwrap(),
            dtype,
            tie: false,
            shard_size: 4_000_000_000,
            seed,
            threads: 1,
        };
        write_model(dir.path(), &spec).unwrap();
        let index = ModelIndex::open(dir.path()).unwrap();
        let b = LayerStreamer::builder(&index).device(crate::Device::Host);
        let b = match compute {
            Some(d) => b.dtype(d),
            None => b.file_dtype(),
        };
        let mut s = b.build().unwrap();
        s.run_pass(Vec::new(), |mut seen, w, _, _| {
            let g = w.tensor("mlp.gate_proj.weight")?;
            let u = w.tensor("mlp.up_proj.weight")?;
            let d = w.tensor("mlp.down_proj.weight")?;
            // A control: down_proj has another shape, so never fuses.
            assert!(!gate_up_adjacent(&g, &d) && !gate_up_adjacent(&u, &g));
            seen.push(gate_up_adjacent(&g, &u));
            Ok(seen)
        })
        .unwrap()
    }

    #[test]
    fn gate_and_up_are_one_matrix_in_slots_of_checkpoints_and_casts() {
        let seed = crate::test_rng::seed();
        // Stored as is, and cast on the device (f32 -> bf16 in the slot's
        // conversion area).
        for (dtype, compute) in [
            (DType::BF16, None),
            (DType::F16, None),
            (DType::F32, Some(DType::BF16)),
        ] {
            let seen = adjacency(dtype, compute, seed);
            assert!(!seen.is_empty());
            assert!(seen.iter().all(|&a| a), "{dtype} -> {compute:?}: {seen:?}");
        }
    }
}
