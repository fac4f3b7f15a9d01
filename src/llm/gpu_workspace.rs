//! The device buffers of the CUDA forward pass, allocated once for passes
//! of up to `max_tokens` tokens and `max_batch` output rows.

use crate::cuda::{Context, DeviceBuffer};
use crate::llm::config::ModelConfig;
use crate::llm::gpu_gemm::SplitBuf;
use crate::llm::gpu_sampling::SPEC_BYTES;
use crate::llm::llama::Precision;
use crate::Result;

/// Device buffers of one pass, sized for `max_tokens` tokens.
pub(crate) struct Workspace {
    pub(crate) x: DeviceBuffer,
    pub(crate) xn: SplitBuf,
    pub(crate) q: DeviceBuffer,
    pub(crate) k: DeviceBuffer,
    pub(crate) v: DeviceBuffer,
    pub(crate) attn: SplitBuf,
    /// `[t, 2 * inter]` f32 or 16-bit values (see `CudaModel::gate_up_16`):
    /// `[gate | up]` rows from one fused GEMM, or the gate matrix
    /// `[t, inter]` followed by the up matrix.
    pub(crate) gate_up: DeviceBuffer,
    pub(crate) act: SplitBuf,
    pub(crate) last: SplitBuf,
    pub(crate) logits: DeviceBuffer,
    pub(crate) ids: DeviceBuffer,
    pub(crate) seq: DeviceBuffer,
    pub(crate) pos: DeviceBuffer,
    pub(crate) rows: DeviceBuffer,
    /// Each output row's sampling rule (`SPEC_BYTES` each).
    pub(crate) specs: DeviceBuffer,
    /// The token chosen for each output row.
    pub(crate) out_ids: DeviceBuffer,
}

impl Workspace {
    /// The buffers of passes of up to `t` tokens and `b` output rows;
    /// `gate_up_16`: the gate and up products may be 16-bit (fast precision
    /// without a CPU share).
    pub(crate) fn new(
        ctx: &Context,
        cfg: &ModelConfig,
        (t, b): (usize, usize),
        p: Precision,
        gate_up_16: bool,
    ) -> Result<Workspace> {
        let alloc = |bytes: usize| DeviceBuffer::alloc(ctx, bytes.max(4));
        let gate_up_bytes = if gate_up_16 && p == Precision::Fast {
            2
        } else {
            4
        };
        Ok(Workspace {
            x: alloc(t * cfg.hidden * 4)?,
            xn: SplitBuf::new(ctx, t * cfg.hidden, p)?,
            q: alloc(t * cfg.q_dim() * 4)?,
            k: alloc(t * cfg.kv_dim() * 4)?,
            v: alloc(t * cfg.kv_dim() * 4)?,
            attn: SplitBuf::new(ctx, t * cfg.q_dim(), p)?,
            gate_up: alloc(t * 2 * cfg.intermediate * gate_up_bytes)?,
            act: SplitBuf::new(ctx, t * cfg.intermediate, p)?,
            last: SplitBuf::new(ctx, b * cfg.hidden, p)?,
            logits: alloc(b * cfg.vocab * 4)?,
            ids: alloc(t * 4)?,
            seq: alloc(t * 4)?,
            pos: alloc(t * 4)?,
            rows: alloc(b * 4)?,
            specs: alloc(b * SPEC_BYTES)?,
            out_ids: alloc(b * 4)?,
        })
    }
}
