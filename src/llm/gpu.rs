//! The forward pass on CUDA: cuBLAS GEMMs (bf16 or f16 operands, as the
//! weights are; f32 accumulation) for every projection (a fused GEMV for
//! weights stored as ggml blocks in passes of at most 8 tokens, see
//! [`gpu_weights`](super::gpu_weights)), the kernels of `kernels/model.cu` for the rest.
//!
//! The residual stream stays f32 on the device. GEMM inputs (RMSNorm,
//! attention and SwiGLU outputs) are 16-bit: in [`Fast`](crate::llm::Precision::Fast) each is
//! rounded once and multiplied with one GEMM, as serving engines do; in
//! [`Exact`](crate::llm::Precision::Exact) each is written as two 16-bit matrices `hi + lo` and
//! multiplied with two GEMMs, which keeps about 16 mantissa bits of each
//! activation (plain bf16 activations move the logits of small random models
//! enough to flip near-tied argmaxes against an f32 reference). The q/k/v
//! projections write f32, which RoPE rotates before k and v go into the KV
//! cache (16-bit with `Fast`; f32 with `Exact`, since a 16-bit cache alone
//! moves the logits by about 1e-3; see [`attention`](crate::llm::attention)).
//! The gate and up projections are one GEMM when the slot (or the scratch
//! of weights dequantized at use, see [`gpu_weights`](super::gpu_weights))
//! holds them as one matrix; with `Fast` it writes the weights' 16-bit
//! dtype, as serving engines do, which halves the traffic of the largest
//! activation and of the SwiGLU kernel that reads it. o_proj and down_proj accumulate straight into the residual
//! stream (beta = 1), so the residual add costs no kernel. Every buffer is
//! allocated once in
//! [`CudaModel::load`]; a pass queues all of its work on the compute stream
//! and synchronizes once, to read the logits (or, when the tokens are chosen
//! on the device, only their ids).

use std::sync::Arc;

use crate::cuda::cublas::{Cublas, GemmType};
use crate::cuda::{DeviceBuffer, Event, Stream};
use crate::llm::attention::{kv_cache_dtype, Attention, AttentionShape};
use crate::llm::config::ModelConfig;
use crate::llm::gpu_embed::{model_dtype, Embedding, EmbeddingLookup};
use crate::llm::gpu_gemm::{gate_up_adjacent, linear_split};
use crate::llm::gpu_io::PassIo;
use crate::llm::gpu_kernels::ModelKernels;
use crate::llm::gpu_output::{load_embedding_and_output, OutputHead};
use crate::llm::gpu_phases::Phases;
use crate::llm::gpu_sampling::{ids_from_bytes, spec_bytes, SamplingKernel};
use crate::llm::gpu_weights::{AtUse, SlotWeights};
use crate::llm::gpu_workspace::Workspace;
use crate::llm::kv_cache::{KvCache, KvTransfer};
use crate::llm::layout::static_names;
use crate::llm::llama::{ModelOptions, PassBatch, Precision};
use crate::llm::sampling::TokenDraw;
use crate::{DType, DeviceTensor, Error, LayerStreamer, LayerWeights, Result};

#[path = "gpu_split.rs"]
mod split;

/// Everything the CUDA forward pass keeps between passes.
pub(crate) struct CudaModel {
    kernels: ModelKernels,
    sampling: SamplingKernel,
    /// The weights' dtype (bf16 or f16), shared by the GEMM inputs.
    dtype: DType,
    blas: Cublas,
    embed: Embedding,
    norm: DeviceTensor,
    head: OutputHead,
    attn: Attention,
    kv: KvCache,
    cos: DeviceBuffer,
    sin: DeviceBuffer,
    ws: Workspace,
    timing: (Event, Event),
    /// Pinned staging of each pass's inputs and logits.
    io: PassIo,
    /// (tokens, TFLOP/s) of the pass with the most tokens so far.
    gemm_tflops: Option<(usize, f64)>,
    /// The CPU side when the streamer splits rows (`cpu_share` above 0).
    split: Option<Box<split::GpuSplit>>,
    /// Whether the gate and up GEMMs write the weights' 16-bit dtype (fast
    /// precision) rather than f32 (exact).
    gate_up_16: bool,
    /// The scratch of weights dequantized at use, when the streamer hands
    /// them over as stored blocks.
    at_use: Option<Arc<AtUse>>,
    /// Events between the phases of layer 0.
    phases: Phases,
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn need_dtype(t: &DeviceTensor, dtype: DType) -> Result<()> {
    if t.dtype() != dtype {
        return Err(Error::config(format!(
            "tensor {} is {} on the device but the model computes in {dtype}; the CUDA forward pass \
             needs every weight in one 16-bit dtype (build the streamer with \
             LlamaModel::cuda_dtype)",
            t.name(),
            t.dtype()
        )));
    }
    Ok(())
}

impl CudaModel {
    pub(crate) fn load(
        streamer: &LayerStreamer,
        cfg: &ModelConfig,
        opts: &ModelOptions,
    ) -> Result<CudaModel> {
        let ctx = streamer
            .context()
            .ok_or_else(|| Error::Pipeline("the CUDA model needs a CUDA streamer".into()))?;
        if let Some(why) = unimplemented_on_cuda(cfg) {
            return Err(Error::config(why));
        }
        let (t, b, p) = (opts.max_tokens, opts.max_batch, opts.precision);
        let (embed, norm, head) = static_names(streamer.model(), cfg);
        let dtype = model_dtype(streamer, &embed)?;
        let (v, h) = (cfg.vocab, cfg.hidden);
        let (embed, head) =
            load_embedding_and_output(streamer, &embed, head.as_deref(), dtype, v, h, t, b)?;
        let norm = streamer.load_static(&norm)?;
        need_dtype(&norm, dtype)?;
        if let Some(m) = head.dense(&embed) {
            need_dtype(m, dtype)?;
        }
        let alloc = |bytes: usize| DeviceBuffer::alloc(ctx, bytes.max(4));
        let (cos, sin) = cfg.rope_tables(opts.max_len);
        let cos_d = alloc(cos.len() * 4)?;
        cos_d.copy_from_host(0, &f32_bytes(&cos))?;
        let sin_d = alloc(sin.len() * 4)?;
        sin_d.copy_from_host(0, &f32_bytes(&sin))?;
        // The CPU share's meetings read f32 gate and up products.
        let split_pool = crate::llm::split::pool_for(streamer)?;
        let ws = Workspace::new(ctx, cfg, (t, b), p, split_pool.is_none())?;
        let shape = AttentionShape {
            heads: cfg.heads,
            kv_heads: cfg.kv_heads,
            head_dim: cfg.head_dim,
            max_seqs: b,
            max_len: opts.max_len,
        };
        let cache_dtype = kv_cache_dtype(dtype, opts.precision);
        let attn = Attention::new(ctx, dtype, cache_dtype, shape, t)?;
        // Every other buffer is allocated: the free memory counts them.
        let at_use = AtUse::for_streamer(ctx, streamer, cfg)?;
        let how = (t, dtype, at_use.is_some());
        let split = split_pool
            .map(|pool| split::GpuSplit::new(ctx, streamer, pool, cfg, how).map(Box::new))
            .transpose()?;
        let kv = KvCache::alloc(ctx, cfg, opts, cache_dtype, 0)?;
        let mut m = CudaModel {
            kernels: ModelKernels::load(ctx, dtype)?,
            sampling: SamplingKernel::load(ctx)?,
            dtype,
            blas: Cublas::new(ctx)?,
            embed,
            norm,
            head,
            attn,
            kv,
            cos: cos_d,
            sin: sin_d,
            ws,
            timing: (Event::new(ctx, true)?, Event::new(ctx, true)?),
            io: PassIo::new(ctx, t, b, cfg.vocab)?,
            gemm_tflops: None,
            split,
            gate_up_16: p == Precision::Fast,
            at_use,
            phases: Phases::new(ctx)?,
        };
        m.embed.choose_lookup(ctx)?;
        Ok(m)
    }

    fn gemm_type(&self) -> GemmType {
        GemmType::half_of(self.dtype)
    }

    /// See [`LlamaModel::embedding_lookup`](crate::llm::LlamaModel::embedding_lookup).
    pub(crate) fn embedding_lookup(&self) -> EmbeddingLookup {
        self.embed.lookup()
    }

    /// See [`LlamaModel::set_weight_chunk_bytes`](crate::llm::LlamaModel::set_weight_chunk_bytes).
    pub(crate) fn set_weight_chunk_bytes(&mut self, bytes: usize) -> Result<()> {
        match self.at_use.as_mut() {
            Some(u) => AtUse::resize(u, bytes),
            None => Ok(()),
        }
    }

    /// See [`LlamaModel::set_output_chunk_bytes`](crate::llm::LlamaModel::set_output_chunk_bytes).
    pub(crate) fn set_output_chunk_bytes(&mut self, bytes: usize) -> Result<()> {
        self.head.set_chunk_bytes(bytes)
    }

    pub(crate) fn last_layer_phases(&self) -> Option<crate::llm::LayerPhases> {
        self.phases.best()
    }

    pub(crate) fn decode_layer_phases(&self) -> Option<crate::llm::LayerPhases> {
        self.phases.one()
    }

    pub(crate) fn last_gemm_tflops(&self) -> Option<f64> {
        self.gemm_tflops.map(|(_, t)| t)
    }

    pub(crate) fn last_kv_transfer(&self) -> Option<KvTransfer> {
        self.kv.last_transfer()
    }

    /// Runs one pass and returns the logits of `b.out_rows`, one vector
    /// each.
    pub(crate) fn pass(
        &mut self,
        streamer: &mut LayerStreamer,
        cfg: &ModelConfig,
        b: &PassBatch,
    ) -> Result<Vec<Vec<f32>>> {
        let timed = self.queue_pass(streamer, cfg, b)?;
        let s = cuda_stream(streamer)?;
        let rows = self
            .io
            .download(s, self.ws.logits.ptr(), b.out_rows.len(), cfg.vocab)?;
        if timed {
            self.record_tflops(cfg, b.tokens.len())?;
        }
        Ok(rows)
    }

    /// One pass like [`pass`](Self::pass), then the token `draws[r]` picks
    /// from each output row `r`, chosen on the device: only the ids come
    /// back.
    pub(crate) fn pass_sample(
        &mut self,
        streamer: &mut LayerStreamer,
        cfg: &ModelConfig,
        b: &PassBatch,
        draws: &[TokenDraw],
    ) -> Result<Vec<u32>> {
        let n_out = b.out_rows.len();
        if draws.len() != n_out {
            return Err(Error::Pipeline(format!(
                "{} draws for {n_out} output rows",
                draws.len()
            )));
        }
        self.ws
            .specs
            .copy_from_host(0, &spec_bytes(draws, cfg.vocab))?;
        let timed = self.queue_pass(streamer, cfg, b)?;
        let ws = &self.ws;
        // SAFETY: logits holds n_out <= max_batch rows of vocab f32s written
        // by queue_pass on this stream, specs n_out rules (copied above) and
        // ids max_batch u32s; all live in the workspace.
        unsafe {
            self.sampling.launch(
                cuda_stream(streamer)?,
                ws.logits.ptr(),
                ws.specs.ptr(),
                ws.out_ids.ptr(),
                n_out,
                cfg.vocab,
            )?;
        }
        self.finish_pass(streamer, cfg, b, timed)?;
        let mut ids = vec![0u8; n_out * 4];
        self.ws.out_ids.copy_to_host(0, &mut ids)?;
        Ok(ids_from_bytes(&ids))
    }

    /// Uploads the pass's tokens and queues the embedding, every layer, and
    /// the logits of the output rows on the compute stream. Returns whether
    /// layer 0 was timed.
    fn queue_pass(
        &mut self,
        streamer: &mut LayerStreamer,
        cfg: &ModelConfig,
        b: &PassBatch,
    ) -> Result<bool> {
        self.attn.prepare(&b.seq, &b.pos)?;
        {
            let s = cuda_stream(streamer)?;
            self.kv.begin_pass(&b.seq, &b.pos, s)?;
            let ws = &self.ws;
            let dst = [ws.ids.ptr(), ws.seq.ptr(), ws.pos.ptr(), ws.rows.ptr()];
            self.io.upload(s, b, dst)?;
            self.blas.set_stream(s)?;
            // SAFETY: the ids were queued on `s` above and every one was
            // checked against vocab; ids and x are sized for max_tokens, at
            // least the pass's tokens.
            unsafe {
                let (ids, x) = (ws.ids.ptr(), ws.x.ptr());
                let (k, head) = (&self.kernels, &self.head);
                self.embed
                    .queue(s, k, head, ids, x, &b.tokens, cfg.hidden)?;
            }
        }
        let me = &mut *self;
        let mut timed = false;
        streamer.run_pass((), |(), w, layer, stream| {
            let s = stream
                .cuda()
                .ok_or_else(|| Error::Pipeline("not a CUDA stream".into()))?;
            if layer == 0 {
                me.timing.0.record(s)?;
            }
            me.phases.time_layer(layer == 0);
            me.layer(cfg, b, w, layer, s)?;
            me.phases.time_layer(false);
            if layer == 0 {
                me.timing.1.record(s)?;
                timed = true;
            }
            Ok(())
        })?;
        let n_out = b.out_rows.len();
        if n_out > 0 {
            self.queue_logits(cuda_stream(streamer)?, cfg, n_out)?;
        }
        Ok(timed)
    }

    /// Waits for the pass's work and keeps its GEMM throughput.
    fn finish_pass(
        &mut self,
        streamer: &LayerStreamer,
        cfg: &ModelConfig,
        b: &PassBatch,
        timed: bool,
    ) -> Result<()> {
        cuda_stream(streamer)?.synchronize()?;
        if timed {
            self.record_tflops(cfg, b.tokens.len())?;
        }
        Ok(())
    }

    /// Queues the final norm of the output rows and the lm_head GEMM into
    /// `ws.logits`.
    fn queue_logits(&mut self, s: &Stream, cfg: &ModelConfig, n_out: usize) -> Result<()> {
        let ws = &self.ws;
        let hw = self.gemm_type();
        let (last, h) = (ws.last.split(), cfg.hidden);
        // SAFETY: rows index tokens of this pass; last holds max_batch rows and
        // logits max_batch * vocab f32; the head is [vocab, hidden] (shapes
        // checked at load); cuBLAS is bound to `s` (queue_pass).
        unsafe {
            let (x, norm, rows) = (ws.x.ptr(), self.norm.ptr(), ws.rows.ptr());
            let eps = cfg.rms_norm_eps;
            self.kernels
                .rms_norm(s, x, norm, rows, last, n_out, h, eps)?;
            let (blas, logits, v) = (&mut self.blas, ws.logits.ptr(), cfg.vocab);
            self.head
                .queue(&self.embed, blas, hw, last, logits, n_out, v, h, s)
        }
    }

    /// Keeps the GEMM throughput of layer 0's timed work when this pass has
    /// the most tokens so far.
    fn record_tflops(&mut self, cfg: &ModelConfig, t: usize) -> Result<()> {
        self.phases.finish(t)?;
        let ms = Event::elapsed_ms(&self.timing.0, &self.timing.1)? as f64;
        let per_token = 2.0
            * (cfg.hidden * (cfg.q_dim() + 2 * cfg.kv_dim())
                + cfg.q_dim() * cfg.hidden
                + 3 * cfg.hidden * cfg.intermediate) as f64;
        if !matches!(self.gemm_tflops, Some((best, _)) if best > t) {
            self.gemm_tflops = Some((t, per_token * t as f64 / (ms.max(1e-6) * 1e-3) / 1e12));
        }
        Ok(())
    }

    /// One decoder layer on the compute stream: attention, then the MLP,
    /// each added to the residual stream `ws.x`.
    fn layer(
        &mut self,
        cfg: &ModelConfig,
        b: &PassBatch,
        w: &LayerWeights<'_>,
        layer: usize,
        s: &Stream,
    ) -> Result<()> {
        let w = SlotWeights {
            w,
            dtype: self.dtype,
            at_use: self.at_use.clone(),
        };
        // A layer the GPU cache keeps is whole: no rows on the CPU.
        if self.split.is_some() && w.w.host_row_keys().next().is_some() {
            return self.split_layer(cfg, b, &w, layer, s);
        }
        self.attention(cfg, b, &w, layer, s)?;
        self.mlp(cfg, b.tokens.len(), &w, s)
    }

    /// RMSNorm, the q/k/v projections, biases, RoPE and the KV-cache write,
    /// causal attention and o_proj into the residual stream.
    fn attention(
        &mut self,
        cfg: &ModelConfig,
        b: &PassBatch,
        w: &SlotWeights<'_, '_>,
        layer: usize,
        s: &Stream,
    ) -> Result<()> {
        let t = b.tokens.len();
        let (h, qd, kvd) = (cfg.hidden, cfg.q_dim(), cfg.kv_dim());
        let (ws, f) = (&self.ws, GemmType::F32);
        let (blas, k) = (&mut self.blas, &self.kernels);
        let (xn, attn) = (ws.xn.split(), ws.attn.split());
        let bias = |key: &str| if cfg.qkv_bias { w.ptr(key) } else { Ok(0) };
        let biases = [
            bias("self_attn.q_proj.bias")?,
            bias("self_attn.k_proj.bias")?,
            bias("self_attn.v_proj.bias")?,
        ];
        let (seq, pos) = (ws.seq.ptr(), ws.pos.ptr());
        // SAFETY: every weight pointer is a 16-bit tensor of its projection's
        // shape (checked against config.json at load) in the layer's device
        // slot, live during this layer function; every workspace buffer was
        // sized for max_tokens >= t tokens; the caches (the layer's, or an
        // offload slot of the same size) hold max_batch sequences of max_len
        // positions and every (seq, pos) of the pass is within them (checked
        // in LlamaModel::forward).
        unsafe {
            let norm = w.ptr("input_layernorm.weight")?;
            self.phases.mark(s)?;
            k.rms_norm(s, ws.x.ptr(), norm, 0, xn, t, h, cfg.rms_norm_eps)?;
            self.phases.mark(s)?;
            // y (+)= x · Wᵀ for [n, k] weight `key`: a fused GEMV or a GEMM.
            let mut linear = |key: &str, x, y, (n, kk), beta| {
                w.linear(blas, key, x, (y, f), (t, n, kk), beta, s)
            };
            linear("self_attn.q_proj.weight", xn, ws.q.ptr(), (qd, h), 0.0)?;
            linear("self_attn.k_proj.weight", xn, ws.k.ptr(), (kvd, h), 0.0)?;
            linear("self_attn.v_proj.weight", xn, ws.v.ptr(), (kvd, h), 0.0)?;
            self.phases.mark(s)?;
            let (q, kp, vp) = (ws.q.ptr(), ws.k.ptr(), ws.v.ptr());
            let rope = (self.cos.ptr(), self.sin.ptr());
            let a = &self.attn;
            let il = cfg.rope_interleaved;
            // Offloaded, the stream waits here (not before the projections)
            // for the copy of the layer's cached positions.
            let (kc, vc) = self.kv.attend(layer, s)?;
            a.write_cache(s, q, kp, vp, biases, rope, seq, pos, (kc, vc), t, il)?;
            a.run(s, q, kc, vc, seq, pos, attn.hi, attn.lo)?;
            self.kv.attended(layer, s)?;
            self.phases.mark(s)?;
            // o_proj accumulates into the residual stream (beta = 1).
            linear("self_attn.o_proj.weight", attn, ws.x.ptr(), (h, qd), 1.0)?;
            self.phases.mark(s)
        }
    }

    /// RMSNorm, gate and up projections (one GEMM when the slot holds them
    /// as one matrix, see [`gate_up_adjacent`]), SwiGLU and down_proj into
    /// the residual stream, for `t` tokens.
    fn mlp(
        &mut self,
        cfg: &ModelConfig,
        t: usize,
        w: &SlotWeights<'_, '_>,
        s: &Stream,
    ) -> Result<()> {
        let (h, inter) = (cfg.hidden, cfg.intermediate);
        let (ws, hw, f) = (&self.ws, self.gemm_type(), GemmType::F32);
        // The gate and up products in 16 bits (fast) or f32 (exact).
        let (gt, in16) = match self.gate_up_16 {
            true => (hw, true),
            false => (f, false),
        };
        let e = if in16 { 2 } else { 4 };
        let (blas, k) = (&mut self.blas, &self.kernels);
        let (xn, act, gu) = (ws.xn.split(), ws.act.split(), ws.gate_up.ptr());
        let (gk, uk) = ("mlp.gate_proj.weight", "mlp.up_proj.weight");
        // Plain weights side by side in the slot are one GEMM; stored ones
        // are multiplied each into its own [t, inter] half.
        let plain = !w.stored(gk)? && !w.stored(uk)?;
        let fused = plain && gate_up_adjacent(&w.view(gk)?, &w.view(uk)?);
        // SAFETY: as in `attention`: weights of their configured shapes in
        // the live slot or the scratch (gate and up as one [2 * inter, h]
        // matrix in the slot when `fused`), workspaces sized for
        // max_tokens >= t tokens (gate_up holds t * 2 * inter f32s either
        // way).
        unsafe {
            let post = w.ptr("post_attention_layernorm.weight")?;
            k.rms_norm(s, ws.x.ptr(), post, 0, xn, t, h, cfg.rms_norm_eps)?;
            self.phases.mark(s)?;
            if fused {
                let g_w = w.matrix(gk, s)?;
                linear_split(blas, hw, xn, g_w, gu, gt, t, 2 * inter, h, 0.0)?;
                self.phases.mark(s)?;
                let up = gu + e * inter as u64;
                k.swiglu(s, (gu, up, in16), act, t, inter, 2 * inter)?;
            } else {
                let up = gu + e * (t * inter) as u64;
                w.linear(blas, gk, xn, (gu, gt), (t, inter, h), 0.0, s)?;
                w.linear(blas, uk, xn, (up, gt), (t, inter, h), 0.0, s)?;
                self.phases.mark(s)?;
                k.swiglu(s, (gu, up, in16), act, t, inter, inter)?;
            }
            self.phases.mark(s)?;
            // down_proj accumulates into the residual stream (beta = 1).
            let (d, ds) = ("mlp.down_proj.weight", (t, h, inter));
            w.linear(blas, d, act, (ws.x.ptr(), f), ds, 1.0, s)?;
            self.phases.mark(s)
        }
    }
}

/// What the CUDA forward pass does not implement that `cfg` asks for (the
/// host backend implements it).
pub(crate) fn unimplemented_on_cuda(cfg: &ModelConfig) -> Option<String> {
    let key = if cfg.o_bias {
        "attention_bias true (an o_proj bias)"
    } else if cfg.mlp_bias {
        "mlp_bias true"
    } else {
        return None;
    };
    Some(format!(
        "config.json: {key} is not implemented by the CUDA forward pass (the host backend, \
         Device::Host, implements it)"
    ))
}

fn cuda_stream(streamer: &LayerStreamer) -> Result<&Stream> {
    streamer
        .compute_stream()
        .cuda()
        .ok_or_else(|| Error::Pipeline("the CUDA model needs a CUDA streamer".into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn output_and_mlp_biases_are_refused_naming_the_key() {
        let base = json!({
            "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 1, "num_attention_heads": 2, "vocab_size": 32
        });
        let cfg = ModelConfig::from_json(&base).unwrap();
        assert_eq!(unimplemented_on_cuda(&cfg), None);
        for (key, words) in [
            ("attention_bias", "attention_bias true"),
            ("mlp_bias", "mlp_bias true"),
        ] {
            let mut v = base.clone();
            v[key] = json!(true);
            let cfg = ModelConfig::from_json(&v).unwrap();
            let e = unimplemented_on_cuda(&cfg).unwrap();
            assert!(e.contains(words) && e.contains("CUDA"), "{e}");
        }
    }
}
