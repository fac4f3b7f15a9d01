//! The forward pass's math on the host, in f32: what the host backend runs,
//! and a second reference for the CUDA kernels.

use crate::quant::QuantType;
use crate::{DType, Error, Result};

/// The element type the host math reads a weight in: its block type when
/// stored quantized, else its plain float type (bf16, f16 or f32).
pub fn weight_type(dtype: DType, quant: Option<QuantType>) -> Result<QuantType> {
    match quant.or_else(|| QuantType::from_dtype(dtype)) {
        Some(t) => Ok(t),
        None => Err(Error::Input(format!(
            "weights of dtype {dtype} are not supported (bf16, f16, f32 or ggml blocks)"
        ))),
    }
}

/// Converts little-endian `bytes` of `ty` (a float type or ggml blocks) to
/// f32, into `out`.
pub fn to_f32_into(bytes: &[u8], ty: QuantType, out: &mut [f32]) -> Result<()> {
    let n = out.len() as u64;
    let want = ty
        .tensor_size(&[n])
        .map_err(|e| Error::Input(format!("{n} elements of {ty}: {e}")))?
        .1;
    if bytes.len() as u64 != want {
        return Err(Error::Input(format!(
            "{} bytes of {ty} are not {n} elements",
            bytes.len()
        )));
    }
    crate::quant::dequantize_f32(ty, bytes, out)
}

/// Converts a whole tensor to f32.
pub fn to_f32(bytes: &[u8], ty: QuantType) -> Result<Vec<f32>> {
    let blocks = bytes.len() as u64 / ty.block_bytes();
    let mut out = vec![0.0; (blocks * ty.block_elems()) as usize];
    to_f32_into(bytes, ty, &mut out)?;
    Ok(out)
}

/// `y[t, n] (+)= sum_k x[t, k] * w[n, k]` (+ `bias[n]`): a linear layer over
/// `rows` inputs, with `w` an `[n_out, k]` row-major weight in its file dtype.
/// With `accumulate` the product is added to `y` (a residual connection).
#[allow(clippy::too_many_arguments)]
pub fn linear(
    x: &[f32],
    rows: usize,
    w: &[u8],
    w_ty: QuantType,
    n_out: usize,
    bias: Option<&[f32]>,
    y: &mut [f32],
    accumulate: bool,
) -> Result<()> {
    let Some(k) = x.len().checked_div(rows) else {
        return Ok(());
    };
    let row_bytes = w_ty.row_bytes(k as u64).map_or(usize::MAX, |b| b as usize);
    if Some(w.len()) != row_bytes.checked_mul(n_out) || y.len() < rows * n_out {
        return Err(Error::Input(format!(
            "linear: weight of {} bytes does not match [{n_out}, {k}] {w_ty}, or output too small",
            w.len()
        )));
    }
    // Output rows split over a few threads; each converts its weight rows
    // to f32 once and dots them with every input row.
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(8)
        .min(n_out.div_ceil(64).max(1));
    let chunk = n_out.div_ceil(threads);
    let mut partial: Vec<Vec<f32>> = vec![Vec::new(); threads];
    let result: Result<()> = std::thread::scope(|s| {
        let handles: Vec<_> = partial
            .iter_mut()
            .enumerate()
            .map(|(t, out)| {
                s.spawn(move || -> Result<()> {
                    let lo = (t * chunk).min(n_out);
                    let hi = ((t + 1) * chunk).min(n_out);
                    out.resize((hi - lo) * rows, 0.0);
                    let mut wrow = vec![0.0f32; k];
                    for n in lo..hi {
                        to_f32_into(&w[n * row_bytes..(n + 1) * row_bytes], w_ty, &mut wrow)?;
                        let b = bias.map_or(0.0, |b| b[n]);
                        for r in 0..rows {
                            out[(n - lo) * rows + r] = dot(&x[r * k..(r + 1) * k], &wrow) + b;
                        }
                    }
                    Ok(())
                })
            })
            .collect();
        for h in handles {
            h.join()
                .map_err(|_| Error::Pipeline("a linear-layer thread panicked".into()))??;
        }
        Ok(())
    });
    result?;
    for (t, out) in partial.iter().enumerate() {
        let lo = (t * chunk).min(n_out);
        for (i, v) in out.iter().enumerate() {
            let (n, r) = (lo + i / rows, i % rows);
            let dst = &mut y[r * n_out + n];
            *dst = if accumulate { *dst + v } else { *v };
        }
    }
    Ok(())
}

/// Dot product with four independent accumulators.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 4];
    let chunks = a.len() / 4;
    for i in 0..chunks {
        for j in 0..4 {
            acc[j] += a[4 * i + j] * b[4 * i + j];
        }
    }
    let mut s = (acc[0] + acc[1]) + (acc[2] + acc[3]);
    for i in chunks * 4..a.len() {
        s += a[i] * b[i];
    }
    s
}

/// RMSNorm of each `width`-wide row of `x` into `out`:
/// `x / sqrt(mean(x²) + eps) * w`.
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let width = w.len();
    for (xr, or) in x.chunks_exact(width).zip(out.chunks_exact_mut(width)) {
        let ms = xr.iter().map(|v| v * v).sum::<f32>() / width as f32;
        let inv = 1.0 / (ms + eps).sqrt();
        for ((o, v), g) in or.iter_mut().zip(xr).zip(w) {
            *o = g * (v * inv);
        }
    }
}

/// Rotates every head of one token's `x` (`heads * head_dim` wide) in place
/// by the angles of one position (`cos`/`sin` rows of `head_dim / 2`),
/// as transformers' `rotate_half` does: the first and second halves of a head
/// form the pairs; with `interleaved`, neighbouring elements do (GPT-J style,
/// the order llama.cpp stores llama q/k rows in).
pub fn rope(x: &mut [f32], head_dim: usize, cos: &[f32], sin: &[f32], interleaved: bool) {
    let half = head_dim / 2;
    for h in x.chunks_exact_mut(head_dim) {
        for i in 0..half {
            let (ia, ib) = if interleaved {
                (2 * i, 2 * i + 1)
            } else {
                (i, i + half)
            };
            let (a, b) = (h[ia], h[ib]);
            h[ia] = a * cos[i] - b * sin[i];
            h[ib] = b * cos[i] + a * sin[i];
        }
    }
}

/// `silu(gate) * up`, element-wise, into `gate`.
pub fn swiglu(gate: &mut [f32], up: &[f32]) {
    for (g, u) in gate.iter_mut().zip(up) {
        *g = *g / (1.0 + (-*g).exp()) * u;
    }
}

/// Softmax attention of one query head `q` over `len` cached keys/values
/// (rows of `head_dim` at `k`/`v` with stride `head_dim`), into `out`.
pub fn attend(q: &[f32], k: &[f32], v: &[f32], len: usize, scores: &mut Vec<f32>, out: &mut [f32]) {
    let d = q.len();
    let scale = 1.0 / (d as f32).sqrt();
    scores.clear();
    let mut max = f32::NEG_INFINITY;
    for j in 0..len {
        let s = dot(q, &k[j * d..(j + 1) * d]) * scale;
        max = max.max(s);
        scores.push(s);
    }
    let mut sum = 0.0;
    for s in scores.iter_mut() {
        *s = (*s - max).exp();
        sum += *s;
    }
    out.fill(0.0);
    for (j, p) in scores.iter().enumerate() {
        let p = p / sum;
        for (o, vv) in out.iter_mut().zip(&v[j * d..(j + 1) * d]) {
            *o += p * vv;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_matches_a_naive_product() {
        let (rows, k, n) = (3, 70, 130);
        let x: Vec<f32> = (0..rows * k).map(|i| (i as f32 * 0.37).sin()).collect();
        let w: Vec<f32> = (0..n * k).map(|i| (i as f32 * 0.11).cos()).collect();
        let bytes: Vec<u8> = w.iter().flat_map(|v| v.to_le_bytes()).collect();
        let mut y = vec![1.0; rows * n];
        linear(&x, rows, &bytes, QuantType::F32, n, None, &mut y, true).unwrap();
        for r in 0..rows {
            for o in 0..n {
                let want: f32 = 1.0 + (0..k).map(|i| x[r * k + i] * w[o * k + i]).sum::<f32>();
                assert!((y[r * n + o] - want).abs() < 1e-3, "{r} {o}");
            }
        }
    }

    #[test]
    fn rope_at_zero_is_identity_and_keeps_norms() {
        let mut x: Vec<f32> = (0..16).map(|i| i as f32).collect();
        let before = x.clone();
        rope(&mut x, 8, &[1.0; 4], &[0.0; 4], false);
        assert_eq!(x, before);
        let a = 0.3f32;
        rope(&mut x, 8, &[a.cos(); 4], &[a.sin(); 4], false);
        let n0: f32 = before.iter().map(|v| v * v).sum();
        let n1: f32 = x.iter().map(|v| v * v).sum();
        assert!((n0 - n1).abs() < 1e-3);
    }
}
