//! A plain f64 Llama/Qwen2 forward pass, written from transformers'
//! modeling code with no caching or batching: the reference the host
//! backend is checked against.

use serde_json::Value;

use super::Weights;

fn get(w: &Weights, name: &str) -> Option<Vec<f64>> {
    w.get(name)
        .map(|(_, v)| v.iter().map(|&x| x as f64).collect())
}

/// `x [rows, k] · W [n, k]ᵀ + b`.
fn linear(x: &[f64], w: &[f64], b: Option<&[f64]>, n: usize) -> Vec<f64> {
    let k = w.len() / n;
    x.chunks(k)
        .flat_map(|row| {
            (0..n).map(move |j| {
                let dot: f64 = row
                    .iter()
                    .zip(&w[j * k..(j + 1) * k])
                    .map(|(a, b)| a * b)
                    .sum();
                dot + b.map_or(0.0, |b| b[j])
            })
        })
        .collect()
}

fn rms_norm(x: &[f64], w: &[f64], eps: f64) -> Vec<f64> {
    x.chunks(w.len())
        .flat_map(|row| {
            let ms = row.iter().map(|v| v * v).sum::<f64>() / row.len() as f64;
            let r = 1.0 / (ms + eps).sqrt();
            row.iter().zip(w).map(move |(v, g)| v * r * g)
        })
        .collect()
}

/// Inverse frequencies with transformers' linear and llama3 scalings.
fn inv_freq(c: &Value, head_dim: usize) -> Vec<f64> {
    let theta = c["rope_theta"].as_f64().unwrap();
    let s = &c["rope_scaling"];
    let f = |k: &str| s[k].as_f64().unwrap();
    (0..head_dim / 2)
        .map(|i| {
            let base = 1.0 / theta.powf((2 * i) as f64 / head_dim as f64);
            match s["rope_type"].as_str() {
                Some("linear") => base / f("factor"),
                Some("llama3") => {
                    let old = f("original_max_position_embeddings");
                    let wavelen = 2.0 * std::f64::consts::PI / base;
                    if wavelen > old / f("low_freq_factor") {
                        base / f("factor")
                    } else if wavelen < old / f("high_freq_factor") {
                        base
                    } else {
                        let smooth = (old / wavelen - f("low_freq_factor"))
                            / (f("high_freq_factor") - f("low_freq_factor"));
                        (1.0 - smooth) * base / f("factor") + smooth * base
                    }
                }
                _ => base,
            }
        })
        .collect()
}

/// `rotate_half` RoPE of every `head_dim`-wide head of each token's row.
fn rope(x: &mut [f64], width: usize, head_dim: usize, inv: &[f64]) {
    let half = head_dim / 2;
    for (pos, row) in x.chunks_mut(width).enumerate() {
        for head in row.chunks_mut(head_dim) {
            for i in 0..half {
                let (sin, cos) = (pos as f64 * inv[i]).sin_cos();
                let (a, b) = (head[i], head[i + half]);
                head[i] = a * cos - b * sin;
                head[i + half] = b * cos + a * sin;
            }
        }
    }
}

/// Causal attention with grouped key/value heads.
fn attention(
    q: &[f64],
    k: &[f64],
    v: &[f64],
    t: usize,
    heads: usize,
    kv_heads: usize,
    hd: usize,
) -> Vec<f64> {
    let (qd, kvd) = (heads * hd, kv_heads * hd);
    let mut out = vec![0.0; t * qd];
    for i in 0..t {
        for h in 0..heads {
            let g = h / (heads / kv_heads);
            let qh = &q[i * qd + h * hd..i * qd + (h + 1) * hd];
            let scores: Vec<f64> = (0..=i)
                .map(|j| {
                    let kh = &k[j * kvd + g * hd..j * kvd + (g + 1) * hd];
                    qh.iter().zip(kh).map(|(a, b)| a * b).sum::<f64>() / (hd as f64).sqrt()
                })
                .collect();
            let max = scores.iter().cloned().fold(f64::MIN, f64::max);
            let e: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
            let sum: f64 = e.iter().sum();
            for (j, p) in e.iter().enumerate() {
                for d in 0..hd {
                    out[i * qd + h * hd + d] += p / sum * v[j * kvd + g * hd + d];
                }
            }
        }
    }
    out
}

/// The logits after the last of `ids`.
pub fn logits(c: &Value, w: &Weights, ids: &[u32]) -> Vec<f32> {
    let n = |k: &str| c[k].as_u64().unwrap() as usize;
    let (h, heads, kv_heads, hd, inter) = (
        n("hidden_size"),
        n("num_attention_heads"),
        n("num_key_value_heads"),
        n("head_dim"),
        n("intermediate_size"),
    );
    let eps = c["rms_norm_eps"].as_f64().unwrap();
    let embed = get(w, "model.embed_tokens.weight").unwrap();
    let mut x: Vec<f64> = ids
        .iter()
        .flat_map(|&t| embed[t as usize * h..(t as usize + 1) * h].to_vec())
        .collect();
    let inv = inv_freq(c, hd);
    let t = ids.len();
    for l in 0..n("num_hidden_layers") {
        let p = |k: &str| get(w, &format!("model.layers.{l}.{k}"));
        let xn = rms_norm(&x, &p("input_layernorm.weight").unwrap(), eps);
        let proj = |name: &str, inp: &[f64], rows: usize| {
            let b = p(&format!("{name}.bias"));
            linear(
                inp,
                &p(&format!("{name}.weight")).unwrap(),
                b.as_deref(),
                rows,
            )
        };
        let mut q = proj("self_attn.q_proj", &xn, heads * hd);
        let mut k = proj("self_attn.k_proj", &xn, kv_heads * hd);
        let v = proj("self_attn.v_proj", &xn, kv_heads * hd);
        rope(&mut q, heads * hd, hd, &inv);
        rope(&mut k, kv_heads * hd, hd, &inv);
        let a = attention(&q, &k, &v, t, heads, kv_heads, hd);
        let o = proj("self_attn.o_proj", &a, h);
        x.iter_mut().zip(&o).for_each(|(x, o)| *x += o);
        let xn = rms_norm(&x, &p("post_attention_layernorm.weight").unwrap(), eps);
        let gate = proj("mlp.gate_proj", &xn, inter);
        let up = proj("mlp.up_proj", &xn, inter);
        let act: Vec<f64> = gate
            .iter()
            .zip(&up)
            .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
            .collect();
        let d = proj("mlp.down_proj", &act, h);
        x.iter_mut().zip(&d).for_each(|(x, d)| *x += d);
    }
    let last = rms_norm(
        &x[(t - 1) * h..],
        &get(w, "model.norm.weight").unwrap(),
        eps,
    );
    let head = get(w, "lm_head.weight").unwrap_or(embed);
    linear(&last, &head, None, n("vocab_size"))
        .into_iter()
        .map(|v| v as f32)
        .collect()
}
