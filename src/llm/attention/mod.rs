//! Attention over the KV cache on CUDA (`kernels/attention.cu`): the cache
//! write (biases, RoPE, store in the cache's dtype), a tiled online-softmax
//! prefill kernel on tensor cores, and a split-KV kernel (flash-decoding)
//! whose partial results a small kernel combines.
//!
//! A 16-bit cache (bf16, or f16 for f16 models) serves the prefill kernel for
//! runs of at least [`PREFILL_MIN_TOKENS`] tokens of one sequence when
//! head_dim is 64 or 128; the split-KV kernel takes the other tokens, and every
//! token of an f32 cache (rounding K and V to 16 bits for the tensor cores
//! would undo what the f32 cache is for). The split-KV kernel spreads one
//! token's keys over several blocks, so that a single sequence with a long
//! cache fills the GPU.
//!
//! ```no_run
//! # use layer_streamer::cuda::{Context, Stream};
//! # use layer_streamer::llm::attention::{Attention, AttentionShape};
//! # fn f(ctx: &Context, s: &Stream, q: u64, kc: u64, vc: u64, seq_d: u64, pos_d: u64,
//! #      out: u64) -> layer_streamer::Result<()> {
//! let shape = AttentionShape { heads: 32, kv_heads: 8, head_dim: 128, max_seqs: 4, max_len: 32768 };
//! let dtype = layer_streamer::DType::BF16;
//! let mut attn = Attention::new(ctx, dtype, dtype, shape, 2048)?;
//! attn.prepare(&[0, 0, 1], &[0, 1, 700])?; // once per pass
//! // SAFETY: q, the caches, seq/pos and out are device buffers of the sizes
//! // `Attention::run` documents, live until the stream has run the kernels.
//! unsafe { attn.run(s, q, kc, vc, seq_d, pos_d, out, 0)? }; // once per layer
//! # Ok(()) }
//! ```

mod launch;
pub(crate) mod plan;

pub use plan::{AttentionShape, PREFILL_MIN_TOKENS};

use crate::cuda::{Context, DeviceBuffer, Function, Module, Stream};
use crate::llm::gpu_kernels::launch;
use crate::llm::Precision;
use crate::{DType, Error, Result};
use launch::Kernel;
use plan::{Plan, MAX_SPLITS};

/// The dtype of the KV cache for weights of `weights` (bf16 or f16):
/// the weights' own 16-bit type in [`Precision::Fast`], f32 in
/// [`Precision::Exact`].
pub fn kv_cache_dtype(weights: DType, precision: Precision) -> DType {
    match precision {
        Precision::Fast => weights,
        Precision::Exact => DType::F32,
    }
}

/// The attention kernels loaded into a context, with the workspace of one
/// pass (its plan and the split-KV partial results).
pub struct Attention {
    shape: AttentionShape,
    /// 16-bit type of the outputs and biases: 0 bf16, 1 f16.
    kind: u64,
    /// Cache element type: 0 bf16, 1 f16, 2 f32.
    ckind: u64,
    cache_write: Function,
    /// The prefill variant for this dtype and head_dim, if any.
    prefill: Option<Function>,
    split: Function,
    combine: Function,
    max_tokens: usize,
    /// u32s: the prefill items (2 × max_tokens), then the split-KV tokens.
    items: DeviceBuffer,
    /// (token, head, split) partial results of head_dim + 2 f32s.
    partial: DeviceBuffer,
    partial_capacity: usize,
    plan: Plan,
    tokens: usize,
    _module: Module,
}

impl Attention {
    /// Loads the kernels for outputs of `weights` (bf16 or f16) and a cache of
    /// `cache` (bf16, f16 or f32; a 16-bit cache must be the weights' dtype),
    /// with a workspace for passes of up to `max_tokens` tokens.
    pub fn new(
        ctx: &Context,
        weights: DType,
        cache: DType,
        shape: AttentionShape,
        max_tokens: usize,
    ) -> Result<Attention> {
        shape.check()?;
        let kind = match weights {
            DType::BF16 => 0,
            DType::F16 => 1,
            other => {
                return Err(Error::config(format!(
                    "attention outputs are bf16 or f16, not {other}"
                )))
            }
        };
        let ckind = match cache {
            DType::F32 => 2,
            c if c == weights => kind,
            other => {
                return Err(Error::config(format!(
                    "a KV cache of {other} with {weights} weights: the cache is f32 or the \
                     weights' dtype"
                )))
            }
        };
        let ws = Workspace::bytes(&shape, max_tokens)?;
        let ptx = crate::kernels::PTX_MODULES
            .iter()
            .find(|(name, _)| *name == "attention")
            .map(|(_, p)| *p)
            .ok_or_else(|| Error::Pipeline("the attention kernels' PTX is not embedded".into()))?;
        let module = Module::load_ptx(ctx, ptx)?;
        let prefill = match (ckind, shape.head_dim) {
            (2, _) => None,
            (k, d) if plan::prefill_head_dim(d) => {
                let t = if k == 0 { "bf16" } else { "f16" };
                Some(module.function(&format!("attention_prefill_{t}_d{d}"))?)
            }
            _ => None,
        };
        Ok(Attention {
            shape,
            kind,
            ckind,
            cache_write: module.function("attention_cache_write")?,
            prefill,
            split: module.function("attention_split")?,
            combine: module.function("attention_combine")?,
            max_tokens,
            items: DeviceBuffer::alloc(ctx, ws.items)?,
            partial: DeviceBuffer::alloc(ctx, ws.partial)?,
            partial_capacity: ws.capacity,
            plan: Plan::default(),
            tokens: 0,
            _module: module,
        })
    }

    /// Device bytes of the workspace [`new`](Self::new) allocates.
    pub fn workspace_bytes(shape: &AttentionShape, max_tokens: usize) -> Result<u64> {
        let w = Workspace::bytes(shape, max_tokens)?;
        Ok((w.items + w.partial) as u64)
    }

    /// Plans the next passes' attention for tokens at `(seq[t], pos[t])`
    /// (each sequence's tokens consecutive) and uploads the plan; every
    /// following [`run`](Self::run) uses it. Waits for the device copy, so
    /// call it between passes, not while a previous plan's kernels may run.
    pub fn prepare(&mut self, seq: &[u32], pos: &[u32]) -> Result<()> {
        if seq.len() > self.max_tokens {
            return Err(Error::Input(format!(
                "attention: {} tokens in one pass, more than the {} the workspace was made for",
                seq.len(),
                self.max_tokens
            )));
        }
        let tc = self.prefill.is_some();
        let p = plan::plan(&self.shape, seq, pos, tc, self.partial_capacity)?;
        let bytes = |v: &[u32]| -> Vec<u8> { v.iter().flat_map(|x| x.to_le_bytes()).collect() };
        self.items.copy_from_host(0, &bytes(&p.prefill_items))?;
        self.items
            .copy_from_host(self.split_offset(), &bytes(&p.split_tokens))?;
        self.plan = p;
        self.tokens = seq.len();
        Ok(())
    }

    fn split_offset(&self) -> usize {
        self.max_tokens * 2 * 4
    }

    /// Adds the q/k/v biases (each 0 or a 16-bit vector of its projection's
    /// width), rotates q and k by RoPE at each token's position (`interleaved`:
    /// GPT-J pairs, else neox halves), and writes k and v into the caches.
    ///
    /// # Safety
    /// `q` is `tokens × heads × head_dim` f32 (rotated in place), `k`/`v`
    /// `tokens × kv_heads × head_dim` f32; `cos`/`sin` `max_len × head_dim/2`
    /// f32; `seq`/`pos` `tokens` u32s within the shape; the caches
    /// `max_seqs × kv_heads × max_len × head_dim` of the cache dtype. All live
    /// until the stream has run the kernel.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn write_cache(
        &self,
        s: &Stream,
        q: u64,
        k: u64,
        v: u64,
        biases: [u64; 3],
        rope: (u64, u64),
        seq: u64,
        pos: u64,
        caches: (u64, u64),
        tokens: usize,
        interleaved: bool,
    ) -> Result<()> {
        let io = [
            q, k, v, biases[0], biases[1], biases[2], rope.0, rope.1, seq, pos, caches.0, caches.1,
        ];
        let kinds = (self.kind, self.ckind);
        self.launch(
            s,
            launch::cache_write(&self.shape, io, tokens, kinds, interleaved),
        )
    }

    /// Causal attention of the prepared tokens against the caches, into
    /// `out [tokens, heads × head_dim]` of the weights' 16-bit type: `hi`,
    /// and when `lo` is not 0 the rounding remainder `lo` (split GEMM input).
    ///
    /// # Safety
    /// `q` is `tokens × heads × head_dim` f32 (RoPE applied), `seq`/`pos` the
    /// device copies of the lists given to [`prepare`](Self::prepare), the
    /// caches as in [`write_cache`](Self::write_cache) with every position
    /// `0..=pos[t]` of each token's sequence written, `hi` (and `lo` unless 0)
    /// `tokens × heads × head_dim` 16-bit values. All live until the stream
    /// has run the kernels.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn run(
        &self,
        s: &Stream,
        q: u64,
        k_cache: u64,
        v_cache: u64,
        seq: u64,
        pos: u64,
        hi: u64,
        lo: u64,
    ) -> Result<()> {
        let x = launch::Ptrs {
            q,
            k_cache,
            v_cache,
            seq,
            pos,
            items: self.items.ptr(),
            split_tokens: self.items.ptr() + self.split_offset() as u64,
            partial: self.partial.ptr(),
            hi,
            lo,
        };
        let kinds = (self.kind, self.ckind);
        for l in launch::attention(&self.shape, &self.plan, &x, kinds) {
            self.launch(s, l)?;
        }
        Ok(())
    }

    /// Queues `l` with its kernel.
    fn launch(&self, s: &Stream, l: launch::Launch) -> Result<()> {
        let f = match l.kernel {
            Kernel::CacheWrite => &self.cache_write,
            Kernel::Prefill => self.prefill.as_ref().ok_or_else(|| {
                Error::Pipeline("a prefill launch without a prefill kernel".into())
            })?,
            Kernel::Split => &self.split,
            Kernel::Combine => &self.combine,
        };
        launch(f, l.grid, l.block, l.shared, s, &l.args)
    }

    /// Tokens of the prepared plan.
    pub fn prepared_tokens(&self) -> usize {
        self.tokens
    }

    /// Whether runs of [`PREFILL_MIN_TOKENS`] or more tokens of one sequence
    /// go to the tensor-core prefill kernel (a 16-bit cache and head_dim 64
    /// or 128); the split-KV kernel takes every other token.
    pub fn tensor_cores(&self) -> bool {
        self.prefill.is_some()
    }
}

/// Sizes of the workspace for passes of `max_tokens` tokens.
struct Workspace {
    items: usize,
    partial: usize,
    /// (token, head, split) triples `partial` holds.
    capacity: usize,
}

impl Workspace {
    fn bytes(shape: &AttentionShape, max_tokens: usize) -> Result<Workspace> {
        let too_big = || {
            Error::config(format!(
                "attention workspace for {max_tokens} tokens per pass of {shape:?} overflows \
                 the kernels' grid (lower max_tokens)"
            ))
        };
        // Grids: split-KV blocks and combine blocks per pass in grid.x.
        let blocks = max_tokens.checked_mul(shape.heads).ok_or_else(too_big)?;
        if max_tokens == 0 || blocks > i32::MAX as usize || shape.heads > 65535 {
            return Err(too_big());
        }
        let capacity = shape.heads * max_tokens.max(MAX_SPLITS);
        let partial = capacity
            .checked_mul((shape.head_dim + 2) * 4)
            .ok_or_else(too_big)?;
        Ok(Workspace {
            items: max_tokens * 3 * 4,
            partial,
            capacity,
        })
    }
}
