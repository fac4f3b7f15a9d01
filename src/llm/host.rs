//! The forward pass on the host backend: plain f32 math over the weights'
//! host bytes. Slow but exact enough to serve as a reference, and the way
//! the whole generation path is tested without a GPU.

use crate::llm::config::ModelConfig;
use crate::llm::llama::{ModelOptions, PassBatch};
use crate::llm::ops;
use crate::{DType, Error, LayerStreamer, LayerWeights, Result};

/// A static tensor's bytes on the host.
struct HostTensor {
    bytes: Vec<u8>,
    dtype: DType,
}

fn load(streamer: &LayerStreamer, name: &str) -> Result<HostTensor> {
    let t = streamer.load_static(name)?;
    Ok(HostTensor {
        bytes: t.to_host()?,
        dtype: t.dtype(),
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
}

/// The names of the static tensors: embedding, final norm, lm_head (None when tied).
pub(crate) fn static_names(
    streamer: &LayerStreamer,
    cfg: &ModelConfig,
) -> (String, String, Option<String>) {
    let m = streamer.model();
    let embed = ["model.embed_tokens.weight", "embed_tokens.weight"]
        .into_iter()
        .find(|n| m.tensor(n).is_some())
        .unwrap_or("model.embed_tokens.weight");
    let norm = ["model.norm.weight", "norm.weight"]
        .into_iter()
        .find(|n| m.tensor(n).is_some())
        .unwrap_or("model.norm.weight");
    let head = (!cfg.tie_word_embeddings && m.tensor("lm_head.weight").is_some())
        .then(|| "lm_head.weight".to_string());
    (embed.to_string(), norm.to_string(), head)
}

impl HostModel {
    pub(crate) fn load(
        streamer: &LayerStreamer,
        cfg: &ModelConfig,
        opts: &ModelOptions,
    ) -> Result<HostModel> {
        let (embed, norm, head) = static_names(streamer, cfg);
        let embed = load(streamer, &embed)?;
        let norm = load(streamer, &norm)?;
        let cache = opts.max_batch * cfg.kv_dim() * opts.max_len;
        let (cos, sin) = cfg.rope_tables(opts.max_len);
        Ok(HostModel {
            norm: ops::to_f32(&norm.bytes, norm.dtype)?,
            lm_head: head.map(|h| load(streamer, &h)).transpose()?,
            embed,
            k_cache: vec![vec![0.0; cache]; cfg.layers],
            v_cache: vec![vec![0.0; cache]; cfg.layers],
            cos,
            sin,
            max_len: opts.max_len,
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
        let esize = self.embed.dtype.size();
        let mut x = vec![0.0f32; t * h];
        for (row, &tok) in x.chunks_exact_mut(h).zip(&b.tokens) {
            let off = tok as usize * h * esize;
            let bytes = self
                .embed
                .bytes
                .get(off..off + h * esize)
                .ok_or_else(|| Error::Input(format!("token {tok} is outside the embedding")))?;
            ops::to_f32_into(bytes, self.embed.dtype, row)?;
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
            head.dtype,
            cfg.vocab,
            None,
            &mut logits,
            false,
        )?;
        Ok(logits)
    }

    fn layer(
        &mut self,
        cfg: &ModelConfig,
        b: &PassBatch,
        mut x: Vec<f32>,
        w: &LayerWeights<'_>,
        layer: usize,
    ) -> Result<Vec<f32>> {
        let (h, t, hd) = (cfg.hidden, b.tokens.len(), cfg.head_dim);
        let (qd, kvd) = (cfg.q_dim(), cfg.kv_dim());
        let f32_of = |key: &str| -> Result<Vec<f32>> {
            let v = w.tensor(key)?;
            ops::to_f32(host_bytes(w, key)?, v.dtype())
        };
        let bias = |key: &str| -> Result<Option<Vec<f32>>> {
            match w.get(key) {
                Some(v) => Ok(Some(ops::to_f32(host_bytes(w, key)?, v.dtype())?)),
                None => Ok(None),
            }
        };
        let lin = |key: &str, inp: &[f32], n: usize, bias: Option<&[f32]>, out: &mut [f32], acc| {
            let v = w.tensor(key)?;
            ops::linear(inp, t, host_bytes(w, key)?, v.dtype(), n, bias, out, acc)
        };

        let mut xn = vec![0.0; t * h];
        ops::rms_norm(
            &x,
            &f32_of("input_layernorm.weight")?,
            cfg.rms_norm_eps,
            &mut xn,
        );
        let mut q = vec![0.0; t * qd];
        let mut k = vec![0.0; t * kvd];
        let mut v = vec![0.0; t * kvd];
        let (bq, bk, bv) = (
            bias("self_attn.q_proj.bias")?,
            bias("self_attn.k_proj.bias")?,
            bias("self_attn.v_proj.bias")?,
        );
        lin(
            "self_attn.q_proj.weight",
            &xn,
            qd,
            bq.as_deref(),
            &mut q,
            false,
        )?;
        lin(
            "self_attn.k_proj.weight",
            &xn,
            kvd,
            bk.as_deref(),
            &mut k,
            false,
        )?;
        lin(
            "self_attn.v_proj.weight",
            &xn,
            kvd,
            bv.as_deref(),
            &mut v,
            false,
        )?;
        let half = hd / 2;
        let (kc, vc) = (&mut self.k_cache[layer], &mut self.v_cache[layer]);
        let ml = self.max_len;
        let slot = |s: usize, g: usize, p: usize| ((s * cfg.kv_heads + g) * ml + p) * hd;
        for i in 0..t {
            let p = b.pos[i] as usize;
            let (c, sn) = (
                &self.cos[p * half..(p + 1) * half],
                &self.sin[p * half..(p + 1) * half],
            );
            ops::rope(&mut q[i * qd..(i + 1) * qd], hd, c, sn);
            ops::rope(&mut k[i * kvd..(i + 1) * kvd], hd, c, sn);
            let s = b.seq[i] as usize;
            for g in 0..cfg.kv_heads {
                let dst = slot(s, g, p);
                kc[dst..dst + hd].copy_from_slice(&k[i * kvd + g * hd..i * kvd + (g + 1) * hd]);
                vc[dst..dst + hd].copy_from_slice(&v[i * kvd + g * hd..i * kvd + (g + 1) * hd]);
            }
        }
        let mut attn = vec![0.0; t * qd];
        let mut scores = Vec::new();
        let group = cfg.heads / cfg.kv_heads;
        for i in 0..t {
            let (s, p) = (b.seq[i] as usize, b.pos[i] as usize);
            for head in 0..cfg.heads {
                let base = slot(s, head / group, 0);
                let qo = i * qd + head * hd;
                ops::attend(
                    &q[qo..qo + hd],
                    &kc[base..base + (p + 1) * hd],
                    &vc[base..base + (p + 1) * hd],
                    p + 1,
                    &mut scores,
                    &mut attn[qo..qo + hd],
                );
            }
        }
        lin("self_attn.o_proj.weight", &attn, h, None, &mut x, true)?;

        ops::rms_norm(
            &x,
            &f32_of("post_attention_layernorm.weight")?,
            cfg.rms_norm_eps,
            &mut xn,
        );
        let inter = cfg.intermediate;
        let mut gate = vec![0.0; t * inter];
        let mut up = vec![0.0; t * inter];
        lin("mlp.gate_proj.weight", &xn, inter, None, &mut gate, false)?;
        lin("mlp.up_proj.weight", &xn, inter, None, &mut up, false)?;
        ops::swiglu(&mut gate, &up);
        lin("mlp.down_proj.weight", &gate, h, None, &mut x, true)?;
        Ok(x)
    }
}

fn host_bytes<'a>(w: &LayerWeights<'a>, key: &str) -> Result<&'a [u8]> {
    let v = w.tensor(key)?;
    w.host_bytes(&v)
        .ok_or_else(|| Error::Pipeline(format!("tensor {} has no host bytes", v.name())))
}
