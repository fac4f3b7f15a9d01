//! The forward pass on CUDA: cuBLAS GEMMs (bf16 or f16 operands, as the
//! weights are; f32 accumulation)
//! for every projection, the kernels of `kernels/model.cu` for the rest.
//!
//! The residual stream stays f32 on the device. GEMM inputs (RMSNorm,
//! attention and SwiGLU outputs) are written as two 16-bit matrices `hi + lo`
//! and multiplied with two GEMMs, which keeps about 16 mantissa bits of each
//! activation: plain bf16 activations move the logits of small random models
//! enough to flip argmaxes against an f32 reference, and the second GEMM is
//! cheap next to the weights' transfer. The q/k/v projections write f32,
//! which RoPE rotates before k and v go into the f32 KV cache (a 16-bit cache
//! alone moves the logits by about 1e-3, enough to flip near-tied argmaxes); o_proj and
//! down_proj accumulate straight into the residual stream (beta = 1). Every buffer is allocated once in
//! [`CudaModel::load`]; a pass queues all of its work on the compute stream
//! and synchronizes once, to read the logits (or, when the tokens are chosen
//! on the device, only their ids).

use crate::cuda::cublas::{Cublas, GemmType};
use crate::cuda::{DeviceBuffer, Event, Stream};
use crate::llm::config::ModelConfig;
use crate::llm::gpu_kernels::{ModelKernels, Split, MAX_ATTENTION_LEN};
use crate::llm::gpu_sampling::{ids_from_bytes, spec_bytes, SamplingKernel, SPEC_BYTES};
use crate::llm::layout::static_names;
use crate::llm::llama::{ModelOptions, PassBatch};
use crate::llm::sampling::TokenDraw;
use crate::{DType, DeviceTensor, Error, LayerStreamer, LayerWeights, Result};

/// A split GEMM input (see `kernels/model.cu`): two 16-bit buffers.
struct SplitBuf {
    hi: DeviceBuffer,
    lo: DeviceBuffer,
}

impl SplitBuf {
    fn new(ctx: &crate::cuda::Context, elems: usize) -> Result<SplitBuf> {
        Ok(SplitBuf {
            hi: DeviceBuffer::alloc(ctx, (elems * 2).max(4))?,
            lo: DeviceBuffer::alloc(ctx, (elems * 2).max(4))?,
        })
    }

    fn split(&self) -> Split {
        Split {
            hi: self.hi.ptr(),
            lo: self.lo.ptr(),
        }
    }
}

/// `Y (+)= (hi + lo) · Wᵀ` as two GEMMs, the second accumulating; `x`'s
/// halves and `w` are of type `xw`.
///
/// # Safety
/// As for [`Cublas::linear`], for both halves of `x`.
#[allow(clippy::too_many_arguments)]
unsafe fn linear_split(
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
        blas.linear(x.lo, w, xw, y, yt, rows, n, k, 1.0)
    }
}

/// Device buffers of one pass, sized for `max_tokens` tokens.
struct Workspace {
    x: DeviceBuffer,
    xn: SplitBuf,
    q: DeviceBuffer,
    k: DeviceBuffer,
    v: DeviceBuffer,
    attn: SplitBuf,
    gate: DeviceBuffer,
    up: DeviceBuffer,
    act: SplitBuf,
    last: SplitBuf,
    logits: DeviceBuffer,
    ids: DeviceBuffer,
    seq: DeviceBuffer,
    pos: DeviceBuffer,
    rows: DeviceBuffer,
    /// Each output row's sampling rule (`SPEC_BYTES` each).
    specs: DeviceBuffer,
    /// The token chosen for each output row.
    out_ids: DeviceBuffer,
}

/// Everything the CUDA forward pass keeps between passes.
pub(crate) struct CudaModel {
    kernels: ModelKernels,
    sampling: SamplingKernel,
    /// The weights' dtype (bf16 or f16), shared by the GEMM inputs.
    dtype: DType,
    blas: Cublas,
    embed: DeviceTensor,
    norm: DeviceTensor,
    lm_head: Option<DeviceTensor>,
    k_cache: Vec<DeviceBuffer>,
    v_cache: Vec<DeviceBuffer>,
    cos: DeviceBuffer,
    sin: DeviceBuffer,
    ws: Workspace,
    max_len: usize,
    timing: (Event, Event),
    /// (tokens, TFLOP/s) of the pass with the most tokens so far.
    gemm_tflops: Option<(usize, f64)>,
}

fn bytes_of(v: &[u32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn need_dtype(t: &DeviceTensor, dtype: DType) -> Result<()> {
    if t.dtype() != dtype {
        return Err(Error::config(format!(
            "tensor {} is {} on the device but the embedding is {dtype}; the CUDA forward pass \
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
        if opts.max_len > MAX_ATTENTION_LEN {
            return Err(Error::Input(format!(
                "maximum length {} exceeds the {} positions the attention kernel supports",
                opts.max_len, MAX_ATTENTION_LEN
            )));
        }
        if let Some(why) = unimplemented_on_cuda(cfg) {
            return Err(Error::config(why));
        }
        let (embed, norm, head) = static_names(streamer.model(), cfg);
        let embed = streamer.load_static(&embed)?;
        let norm = streamer.load_static(&norm)?;
        let lm_head = head.map(|h| streamer.load_static(&h)).transpose()?;
        let dtype = embed.dtype();
        need_dtype(&norm, dtype)?;
        if let Some(h) = &lm_head {
            need_dtype(h, dtype)?;
        }
        let (t, b) = (opts.max_tokens, opts.max_batch);
        let alloc = |bytes: usize| DeviceBuffer::alloc(ctx, bytes.max(4));
        let cache_bytes = b * cfg.kv_dim() * opts.max_len * 4;
        let (cos, sin) = cfg.rope_tables(opts.max_len);
        let cos_d = alloc(cos.len() * 4)?;
        cos_d.copy_from_host(0, &f32_bytes(&cos))?;
        let sin_d = alloc(sin.len() * 4)?;
        sin_d.copy_from_host(0, &f32_bytes(&sin))?;
        let ws = Workspace {
            x: alloc(t * cfg.hidden * 4)?,
            xn: SplitBuf::new(ctx, t * cfg.hidden)?,
            q: alloc(t * cfg.q_dim() * 4)?,
            k: alloc(t * cfg.kv_dim() * 4)?,
            v: alloc(t * cfg.kv_dim() * 4)?,
            attn: SplitBuf::new(ctx, t * cfg.q_dim())?,
            gate: alloc(t * cfg.intermediate * 4)?,
            up: alloc(t * cfg.intermediate * 4)?,
            act: SplitBuf::new(ctx, t * cfg.intermediate)?,
            last: SplitBuf::new(ctx, b * cfg.hidden)?,
            logits: alloc(b * cfg.vocab * 4)?,
            ids: alloc(t * 4)?,
            seq: alloc(t * 4)?,
            pos: alloc(t * 4)?,
            rows: alloc(b * 4)?,
            specs: alloc(b * SPEC_BYTES)?,
            out_ids: alloc(b * 4)?,
        };
        let mut k_cache = Vec::with_capacity(cfg.layers);
        let mut v_cache = Vec::with_capacity(cfg.layers);
        for _ in 0..cfg.layers {
            k_cache.push(alloc(cache_bytes)?);
            v_cache.push(alloc(cache_bytes)?);
        }
        Ok(CudaModel {
            kernels: ModelKernels::load(ctx, dtype)?,
            sampling: SamplingKernel::load(ctx)?,
            dtype,
            blas: Cublas::new(ctx)?,
            embed,
            norm,
            lm_head,
            k_cache,
            v_cache,
            cos: cos_d,
            sin: sin_d,
            ws,
            max_len: opts.max_len,
            timing: (Event::new(ctx, true)?, Event::new(ctx, true)?),
            gemm_tflops: None,
        })
    }

    fn gemm_type(&self) -> GemmType {
        if self.dtype == DType::F16 {
            GemmType::F16
        } else {
            GemmType::BF16
        }
    }

    pub(crate) fn last_gemm_tflops(&self) -> Option<f64> {
        self.gemm_tflops.map(|(_, t)| t)
    }

    /// One pass over every layer for the tokens of `b`; returns the logits of
    /// its output rows, `[out_rows, vocab]`.
    pub(crate) fn pass(
        &mut self,
        streamer: &mut LayerStreamer,
        cfg: &ModelConfig,
        b: &PassBatch,
    ) -> Result<Vec<f32>> {
        let timed = self.queue_pass(streamer, cfg, b)?;
        self.finish_pass(streamer, cfg, b, timed)?;
        let mut out = vec![0u8; b.out_rows.len() * cfg.vocab * 4];
        self.ws.logits.copy_to_host(0, &mut out)?;
        Ok(out
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
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
        let t = b.tokens.len();
        let ws = &self.ws;
        ws.ids.copy_from_host(0, &bytes_of(&b.tokens))?;
        ws.seq.copy_from_host(0, &bytes_of(&b.seq))?;
        ws.pos.copy_from_host(0, &bytes_of(&b.pos))?;
        ws.rows.copy_from_host(0, &bytes_of(&b.out_rows))?;
        {
            let s = cuda_stream(streamer)?;
            self.blas.set_stream(s)?;
            // SAFETY: the embedding is [vocab, hidden] bf16 and every id was
            // checked against vocab; ids and x are sized for max_tokens >= t.
            unsafe {
                self.kernels
                    .embed(s, self.embed.ptr(), ws.ids.ptr(), ws.x.ptr(), t, cfg.hidden)?;
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
            me.layer(cfg, b, w, layer, s)?;
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
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        let hw = self.gemm_type();
        let (last, h) = (ws.last.split(), cfg.hidden);
        // SAFETY: rows index tokens of this pass; last holds max_batch rows and
        // logits max_batch * vocab f32; the head is [vocab, hidden] of the
        // model's 16-bit dtype (shapes checked at load).
        unsafe {
            let (x, norm, rows) = (ws.x.ptr(), self.norm.ptr(), ws.rows.ptr());
            let eps = cfg.rms_norm_eps;
            self.kernels
                .rms_norm(s, x, norm, rows, last, n_out, h, eps)?;
            let (f, logits) = (GemmType::F32, ws.logits.ptr());
            linear_split(
                &mut self.blas,
                hw,
                last,
                head.ptr(),
                logits,
                f,
                n_out,
                cfg.vocab,
                h,
                0.0,
            )
        }
    }

    /// Keeps the GEMM throughput of layer 0's timed work when this pass has
    /// the most tokens so far.
    fn record_tflops(&mut self, cfg: &ModelConfig, t: usize) -> Result<()> {
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
        };
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
        let (ws, hw, f) = (&self.ws, self.gemm_type(), GemmType::F32);
        let (blas, k) = (&mut self.blas, &self.kernels);
        let (xn, attn) = (ws.xn.split(), ws.attn.split());
        let (kc, vc) = (self.k_cache[layer].ptr(), self.v_cache[layer].ptr());
        let bias = |key: &str| if cfg.qkv_bias { w.ptr(key) } else { Ok(0) };
        let biases = [
            bias("self_attn.q_proj.bias")?,
            bias("self_attn.k_proj.bias")?,
            bias("self_attn.v_proj.bias")?,
        ];
        let (n, kv) = (cfg.heads, cfg.kv_heads);
        let (seq, pos) = (ws.seq.ptr(), ws.pos.ptr());
        // SAFETY: every weight pointer is a 16-bit tensor of its projection's
        // shape (checked against config.json at load) in the layer's device
        // slot, live during this layer function; every workspace buffer was
        // sized for max_tokens >= t tokens; the caches hold max_batch
        // sequences of max_len positions and every (seq, pos) of the pass is
        // within them (checked in LlamaModel::forward).
        unsafe {
            let norm = w.ptr("input_layernorm.weight")?;
            k.rms_norm(s, ws.x.ptr(), norm, 0, xn, t, h, cfg.rms_norm_eps)?;
            let q_w = w.ptr("self_attn.q_proj.weight")?;
            linear_split(blas, hw, xn, q_w, ws.q.ptr(), f, t, qd, h, 0.0)?;
            let k_w = w.ptr("self_attn.k_proj.weight")?;
            linear_split(blas, hw, xn, k_w, ws.k.ptr(), f, t, kvd, h, 0.0)?;
            let v_w = w.ptr("self_attn.v_proj.weight")?;
            linear_split(blas, hw, xn, v_w, ws.v.ptr(), f, t, kvd, h, 0.0)?;
            let (q, kp, vp) = (ws.q.ptr(), ws.k.ptr(), ws.v.ptr());
            let (cos, sin) = (self.cos.ptr(), self.sin.ptr());
            let (hd, ml) = (cfg.head_dim, self.max_len);
            k.bias_rope_cache(
                s,
                q,
                kp,
                vp,
                biases,
                cos,
                sin,
                seq,
                pos,
                kc,
                vc,
                t,
                n,
                kv,
                hd,
                ml,
                cfg.rope_interleaved,
            )?;
            k.attention(s, q, kc, vc, seq, pos, attn, t, n, kv, hd, ml)?;
            // o_proj accumulates into the residual stream (beta = 1).
            let o_w = w.ptr("self_attn.o_proj.weight")?;
            linear_split(blas, hw, attn, o_w, ws.x.ptr(), f, t, h, qd, 1.0)
        }
    }

    /// RMSNorm, gate and up projections, SwiGLU and down_proj into the
    /// residual stream, for `t` tokens.
    fn mlp(
        &mut self,
        cfg: &ModelConfig,
        t: usize,
        w: &SlotWeights<'_, '_>,
        s: &Stream,
    ) -> Result<()> {
        let (h, inter) = (cfg.hidden, cfg.intermediate);
        let (ws, hw, f) = (&self.ws, self.gemm_type(), GemmType::F32);
        let (blas, k) = (&mut self.blas, &self.kernels);
        let (xn, act) = (ws.xn.split(), ws.act.split());
        // SAFETY: as in `attention`: weights of their configured shapes in
        // the live slot, workspaces sized for max_tokens >= t tokens.
        unsafe {
            let post = w.ptr("post_attention_layernorm.weight")?;
            k.rms_norm(s, ws.x.ptr(), post, 0, xn, t, h, cfg.rms_norm_eps)?;
            let g_w = w.ptr("mlp.gate_proj.weight")?;
            linear_split(blas, hw, xn, g_w, ws.gate.ptr(), f, t, inter, h, 0.0)?;
            let u_w = w.ptr("mlp.up_proj.weight")?;
            linear_split(blas, hw, xn, u_w, ws.up.ptr(), f, t, inter, h, 0.0)?;
            k.swiglu(s, ws.gate.ptr(), ws.up.ptr(), act, t * inter)?;
            // down_proj accumulates into the residual stream (beta = 1).
            let d_w = w.ptr("mlp.down_proj.weight")?;
            linear_split(blas, hw, act, d_w, ws.x.ptr(), f, t, h, inter, 1.0)
        }
    }
}

/// A layer's weights in its device slot, all of the model's 16-bit dtype.
struct SlotWeights<'a, 'w> {
    w: &'a LayerWeights<'w>,
    dtype: DType,
}

impl SlotWeights<'_, '_> {
    /// The device address of tensor `key`, checking its dtype.
    fn ptr(&self, key: &str) -> Result<u64> {
        let v = self.w.tensor(key)?;
        if v.dtype() != self.dtype {
            return Err(Error::config(format!(
                "{} is {} on the device but the embedding is {}; build the streamer \
                 with LlamaModel::cuda_dtype",
                v.name(),
                v.dtype(),
                self.dtype
            )));
        }
        Ok(v.ptr())
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
