//! The forward pass on the host backend: plain f32 math over the weights'
//! host bytes. Slow but exact enough to serve as a reference, and the way
//! the whole generation path is tested without a GPU.

use std::borrow::Cow;
use std::sync::Arc;

use crate::cpu::CpuPool;
use crate::llm::config::ModelConfig;
use crate::llm::layout::static_names;
use crate::llm::llama::{ModelOptions, PassBatch};
use crate::llm::ops;
use crate::quant::fp8::{self, Fp8Layout};
use crate::quant::QuantType;
use crate::{Error, LayerStreamer, LayerWeights, Result};

/// A static tensor's bytes on the host.
struct HostTensor {
    bytes: Vec<u8>,
    ty: QuantType,
}

fn load(streamer: &LayerStreamer, name: &str) -> Result<HostTensor> {
    let t = streamer.load_static(name)?;
    Ok(HostTensor {
        bytes: t.to_host()?,
        ty: ops::weight_type(t.dtype(), t.quant())?,
    })
}

/// Host weights that stay loaded, the KV cache and the RoPE tables.
pub(crate) struct HostModel {
    embed: HostTensor,
    norm: Vec<f32>,
    /// `None`: tied to the embedding.
    lm_head: Option<HostTensor>,
    /// Per layer, `[max_batch][kv_heads][max_len][head_dim]`.
    k_cache: Vec<Vec<f32>>,
    v_cache: Vec<Vec<f32>>,
    cos: Vec<f32>,
    sin: Vec<f32>,
    max_len: usize,
    /// The CPU side of a row split (the streamer's `cpu_share` above 0).
    pool: Option<Arc<CpuPool>>,
}

impl HostModel {
    pub(crate) fn load(
        streamer: &LayerStreamer,
        cfg: &ModelConfig,
        opts: &ModelOptions,
    ) -> Result<HostModel> {
        let (embed, norm, head) = static_names(streamer.model(), cfg);
        let embed = load(streamer, &embed)?;
        let norm = load(streamer, &norm)?;
        let cache = opts.max_batch * cfg.kv_dim() * opts.max_len;
        let (cos, sin) = cfg.rope_tables(opts.max_len);
        Ok(HostModel {
            norm: ops::to_f32(&norm.bytes, norm.ty)?,
            lm_head: head.map(|h| load(streamer, &h)).transpose()?,
            embed,
            k_cache: vec![vec![0.0; cache]; cfg.layers],
            v_cache: vec![vec![0.0; cache]; cfg.layers],
            cos,
            sin,
            max_len: opts.max_len,
            pool: crate::llm::split::pool_for(streamer)?.map(Arc::new),
        })
    }

    /// One pass over every layer for the tokens of `b`; returns the logits of
    /// its output rows, `[out_rows, vocab]`.
    pub(crate) fn pass(
        &mut self,
        streamer: &mut LayerStreamer,
        cfg: &ModelConfig,
        b: &PassBatch,
    ) -> Result<Vec<f32>> {
        let (h, t) = (cfg.hidden, b.tokens.len());
        let row_bytes = self
            .embed
            .ty
            .row_bytes(h as u64)
            .map_err(|e| Error::Input(format!("embedding rows of {h}: {e}")))?
            as usize;
        let mut x = vec![0.0f32; t * h];
        for (row, &tok) in x.chunks_exact_mut(h).zip(&b.tokens) {
            let off = tok as usize * row_bytes;
            let bytes = self
                .embed
                .bytes
                .get(off..off + row_bytes)
                .ok_or_else(|| Error::Input(format!("token {tok} is outside the embedding")))?;
            ops::to_f32_into(bytes, self.embed.ty, row)?;
        }
        let me = &mut *self;
        let x = streamer.run_pass(x, |x, w, layer, _| me.layer(cfg, b, x, w, layer))?;
        let rows: Vec<f32> = b
            .out_rows
            .iter()
            .flat_map(|&r| x[r as usize * h..(r as usize + 1) * h].iter().copied())
            .collect();
        let mut normed = vec![0.0; rows.len()];
        ops::rms_norm(&rows, &self.norm, cfg.rms_norm_eps, &mut normed);
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        let mut logits = vec![0.0; b.out_rows.len() * cfg.vocab];
        ops::linear(
            &normed,
            b.out_rows.len(),
            &head.bytes,
            head.ty,
            cfg.vocab,
            None,
            &mut logits,
            false,
        )?;
        Ok(logits)
    }

    /// One decoder layer: `x` plus attention, plus the MLP.
    fn layer(
        &mut self,
        cfg: &ModelConfig,
        b: &PassBatch,
        mut x: Vec<f32>,
        w: &LayerWeights<'_>,
        layer: usize,
    ) -> Result<Vec<f32>> {
        let pool = self.pool.clone();
        let w = Weights {
            w,
            cfg,
            rows: b.tokens.len(),
            pool: pool.as_deref(),
        };
        let mut xn = vec![0.0; x.len()];
        ops::rms_norm(
            &x,
            &w.f32("input_layernorm.weight")?,
            cfg.rms_norm_eps,
            &mut xn,
        );
        let attn = self.attention(&w, b, &xn, layer)?;
        let o_bias = w.bias("self_attn.o_proj.bias", cfg.o_bias)?;
        w.linear(
            "self_attn.o_proj.weight",
            &attn,
            cfg.hidden,
            o_bias.as_deref(),
            &mut x,
            true,
        )?;

        let post = w.f32("post_attention_layernorm.weight")?;
        ops::rms_norm(&x, &post, cfg.rms_norm_eps, &mut xn);
        let inter = cfg.intermediate;
        let mut gate = vec![0.0; w.rows * inter];
        let mut up = vec![0.0; w.rows * inter];
        let mb = |key| w.bias(key, cfg.mlp_bias);
        let (bg, bu, bd) = (
            mb("mlp.gate_proj.bias")?,
            mb("mlp.up_proj.bias")?,
            mb("mlp.down_proj.bias")?,
        );
        w.linear(
            "mlp.gate_proj.weight",
            &xn,
            inter,
            bg.as_deref(),
            &mut gate,
            false,
        )?;
        w.linear(
            "mlp.up_proj.weight",
            &xn,
            inter,
            bu.as_deref(),
            &mut up,
            false,
        )?;
        ops::swiglu(&mut gate, &up);
        w.linear(
            "mlp.down_proj.weight",
            &gate,
            cfg.hidden,
            bd.as_deref(),
            &mut x,
            true,
        )?;
        Ok(x)
    }

    /// q/k/v projections, RoPE, the KV-cache write and causal attention of
    /// the normed `xn`; returns the heads' outputs `[tokens, q_dim]`.
    fn attention(
        &mut self,
        w: &Weights<'_, '_>,
        b: &PassBatch,
        xn: &[f32],
        layer: usize,
    ) -> Result<Vec<f32>> {
        let cfg = w.cfg;
        let (t, hd, qd, kvd) = (w.rows, cfg.head_dim, cfg.q_dim(), cfg.kv_dim());
        let mut q = vec![0.0; t * qd];
        let mut k = vec![0.0; t * kvd];
        let mut v = vec![0.0; t * kvd];
        let qb = |key| w.bias(key, cfg.qkv_bias);
        let (bq, bk, bv) = (
            qb("self_attn.q_proj.bias")?,
            qb("self_attn.k_proj.bias")?,
            qb("self_attn.v_proj.bias")?,
        );
        w.linear(
            "self_attn.q_proj.weight",
            xn,
            qd,
            bq.as_deref(),
            &mut q,
            false,
        )?;
        w.linear(
            "self_attn.k_proj.weight",
            xn,
            kvd,
            bk.as_deref(),
            &mut k,
            false,
        )?;
        w.linear(
            "self_attn.v_proj.weight",
            xn,
            kvd,
            bv.as_deref(),
            &mut v,
            false,
        )?;
        self.rope_into_cache(cfg, b, &mut q, &mut k, &v, layer);
        let (kc, vc) = (&self.k_cache[layer], &self.v_cache[layer]);
        let slot = |s: usize, g: usize| (s * cfg.kv_heads + g) * self.max_len * hd;
        let mut attn = vec![0.0; t * qd];
        let mut scores = Vec::new();
        let group = cfg.heads / cfg.kv_heads;
        for i in 0..t {
            let (s, p) = (b.seq[i] as usize, b.pos[i] as usize);
            for head in 0..cfg.heads {
                let base = slot(s, head / group);
                let qo = i * qd + head * hd;
                let (keys, values) = (
                    &kc[base..base + (p + 1) * hd],
                    &vc[base..base + (p + 1) * hd],
                );
                ops::attend(
                    &q[qo..qo + hd],
                    keys,
                    values,
                    p + 1,
                    &mut scores,
                    &mut attn[qo..qo + hd],
                );
            }
        }
        Ok(attn)
    }
}

impl HostModel {
    /// Rotates `q` and `k` of every token of `b` and writes `k` and `v` into
    /// the layer's cache at the tokens' (sequence, position).
    fn rope_into_cache(
        &mut self,
        cfg: &ModelConfig,
        b: &PassBatch,
        q: &mut [f32],
        k: &mut [f32],
        v: &[f32],
        layer: usize,
    ) {
        let (hd, qd, kvd) = (cfg.head_dim, cfg.q_dim(), cfg.kv_dim());
        let half = hd / 2;
        let (kc, vc) = (&mut self.k_cache[layer], &mut self.v_cache[layer]);
        let ml = self.max_len;
        for i in 0..b.tokens.len() {
            let p = b.pos[i] as usize;
            let (c, sn) = (
                &self.cos[p * half..(p + 1) * half],
                &self.sin[p * half..(p + 1) * half],
            );
            ops::rope(
                &mut q[i * qd..(i + 1) * qd],
                hd,
                c,
                sn,
                cfg.rope_interleaved,
            );
            ops::rope(
                &mut k[i * kvd..(i + 1) * kvd],
                hd,
                c,
                sn,
                cfg.rope_interleaved,
            );
            let s = b.seq[i] as usize;
            for g in 0..cfg.kv_heads {
                let dst = ((s * cfg.kv_heads + g) * ml + p) * hd;
                let src = i * kvd + g * hd;
                kc[dst..dst + hd].copy_from_slice(&k[src..src + hd]);
                vc[dst..dst + hd].copy_from_slice(&v[src..src + hd]);
            }
        }
    }
}

/// One layer's weights as the host math reads them.
struct Weights<'a, 'w> {
    w: &'a LayerWeights<'w>,
    cfg: &'a ModelConfig,
    /// Tokens of the pass.
    rows: usize,
    /// The CPU side of a row split.
    pool: Option<&'a CpuPool>,
}

impl Weights<'_, '_> {
    /// Tensor `key` converted to f32.
    fn f32(&self, key: &str) -> Result<Vec<f32>> {
        let (bytes, ty) = weight_bytes(self.w, key)?;
        ops::to_f32(&bytes, ty)
    }

    /// Bias `key` in f32 when the configuration enables it (`on`).
    fn bias(&self, key: &str, on: bool) -> Result<Option<Vec<f32>>> {
        on.then(|| self.f32(key)).transpose()
    }

    /// `out (+)= inp · W(key)ᵀ (+ bias)` over the pass's rows.
    fn linear(
        &self,
        key: &str,
        inp: &[f32],
        n: usize,
        bias: Option<&[f32]>,
        out: &mut [f32],
        accumulate: bool,
    ) -> Result<()> {
        let (bytes, ty) = weight_bytes(self.w, key)?;
        match (self.w.host_rows(key), self.pool) {
            (Some(h), Some(pool)) => crate::llm::split::linear(
                self.w,
                pool,
                key,
                inp,
                self.rows,
                (&bytes, ty),
                &h,
                n,
                bias,
                out,
                accumulate,
            ),
            (Some(_), None) => Err(Error::Pipeline(format!(
                "layer {} tensor {key} is split but the model has no CPU pool",
                self.w.layer()
            ))),
            (None, _) => ops::linear(inp, self.rows, &bytes, ty, n, bias, out, accumulate),
        }
    }
}

/// Tensor `key`'s bytes and the type the host math reads them in: as stored,
/// except an FP8 weight handed over as stored (file dtypes), which is
/// dequantized with its scale tensor into bf16 first, the values the
/// pipeline's dequantization gives in bf16 mode.
fn weight_bytes<'a>(w: &LayerWeights<'a>, key: &str) -> Result<(Cow<'a, [u8]>, QuantType)> {
    let v = w.tensor(key)?;
    let bytes = host_bytes(w, key)?;
    let Some(scale) = v.fp8_scale() else {
        return Ok((
            Cow::Borrowed(bytes),
            ops::weight_type(v.dtype(), v.quant())?,
        ));
    };
    let scales = w
        .tensors()
        .find(|t| t.name() == scale.tensor)
        .and_then(|t| w.host_bytes(&t))
        .ok_or_else(|| {
            Error::Pipeline(format!(
                "the scale {} of FP8 weight {} is not in layer {}",
                scale.tensor,
                v.name(),
                w.layer()
            ))
        })?;
    let layout = Fp8Layout::of(v.dtype(), v.shape(), scale)?;
    let mut out = vec![half::bf16::ZERO; layout.elems() as usize];
    fp8::dequantize_bf16(&layout, bytes, scales, &mut out)
        .map_err(|e| Error::Input(format!("tensor {}: {e}", v.name())))?;
    let bytes = out.iter().flat_map(|x| x.to_bits().to_le_bytes()).collect();
    Ok((Cow::Owned(bytes), QuantType::BF16))
}

fn host_bytes<'a>(w: &LayerWeights<'a>, key: &str) -> Result<&'a [u8]> {
    let v = w.tensor(key)?;
    w.host_bytes(&v)
        .ok_or_else(|| Error::Pipeline(format!("tensor {} has no host bytes", v.name())))
}
