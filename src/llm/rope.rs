//! Rotary position embeddings: the `rope_scaling` (or transformers 5
//! `rope_parameters`) variants the forward pass implements, and the
//! inverse frequencies and cos/sin tables they give.

use serde_json::Value;

/// Llama 3 RoPE frequency scaling (`rope_type == "llama3"`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Llama3Scaling {
    /// `factor`.
    pub factor: f64,
    /// `low_freq_factor`.
    pub low_freq_factor: f64,
    /// `high_freq_factor`.
    pub high_freq_factor: f64,
    /// `original_max_position_embeddings`.
    pub original_max_positions: f64,
}

/// How RoPE frequencies are scaled (`rope_scaling.rope_type`).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum RopeScaling {
    /// No scaling (absent, `null` or `"default"`).
    #[default]
    None,
    /// `"linear"`: every inverse frequency divided by `factor`.
    Linear {
        /// `factor`.
        factor: f64,
    },
    /// `"dynamic"` (NTK): the base grows once a sequence exceeds
    /// `max_position_embeddings`; below that it is the default RoPE, which is
    /// all the forward pass implements (the model refuses longer `max_len`).
    Dynamic {
        /// `factor`.
        factor: f64,
    },
    /// `"llama3"`.
    Llama3(Llama3Scaling),
}

impl RopeScaling {
    /// Parses a `rope_scaling` object; the error names the key or type.
    pub fn parse(s: &Value) -> Result<RopeScaling, String> {
        let kind = s
            .get("rope_type")
            .or_else(|| s.get("type"))
            .and_then(Value::as_str)
            .unwrap_or("");
        let f = |k: &str| {
            s.get(k)
                .and_then(Value::as_f64)
                .ok_or_else(|| format!("config.json: rope_scaling.{k} is missing or not a number"))
        };
        match kind {
            "" | "default" => Ok(RopeScaling::None),
            "linear" => Ok(RopeScaling::Linear {
                factor: positive(f("factor")?, "factor")?,
            }),
            "dynamic" => Ok(RopeScaling::Dynamic {
                factor: positive(f("factor")?, "factor")?,
            }),
            "llama3" => Ok(RopeScaling::Llama3(Llama3Scaling {
                factor: positive(f("factor")?, "factor")?,
                low_freq_factor: positive(f("low_freq_factor")?, "low_freq_factor")?,
                high_freq_factor: positive(f("high_freq_factor")?, "high_freq_factor")?,
                original_max_positions: positive(
                    f("original_max_position_embeddings")?,
                    "original_max_position_embeddings",
                )?,
            })),
            other => Err(format!(
                "config.json: rope_scaling.rope_type {other:?} is not implemented (implemented: \
                 default, linear, dynamic, llama3)"
            )),
        }
    }

    /// Scales one inverse frequency.
    fn apply(&self, inv_freq: f32) -> f32 {
        match self {
            RopeScaling::None | RopeScaling::Dynamic { .. } => inv_freq,
            RopeScaling::Linear { factor } => (inv_freq as f64 / factor) as f32,
            RopeScaling::Llama3(s) => llama3_scale(inv_freq, s),
        }
    }
}

fn positive(v: f64, key: &str) -> Result<f64, String> {
    if v > 0.0 && v.is_finite() {
        Ok(v)
    } else {
        Err(format!(
            "config.json: rope_scaling.{key} is {v}, not a positive number"
        ))
    }
}

/// RoPE inverse frequencies (`head_dim / 2` of them), as transformers
/// computes them in f32, scaled as `scaling` says.
pub fn inv_freq(head_dim: usize, theta: f64, scaling: &RopeScaling) -> Vec<f32> {
    (0..head_dim / 2)
        .map(|i| {
            let exp = (2 * i) as f32 / head_dim as f32;
            scaling.apply(1.0f32 / (theta as f32).powf(exp))
        })
        .collect()
}

/// RoPE cosines and sines of `inv` for positions `0..len`: two
/// `[len, inv.len()]` row-major f32 tables.
pub fn tables(inv: &[f32], len: usize) -> (Vec<f32>, Vec<f32>) {
    let mut cos = Vec::with_capacity(len * inv.len());
    let mut sin = Vec::with_capacity(len * inv.len());
    for p in 0..len {
        for &f in inv {
            let a = p as f32 * f;
            cos.push(a.cos());
            sin.push(a.sin());
        }
    }
    (cos, sin)
}

/// transformers' `_compute_llama3_parameters`, for one frequency.
fn llama3_scale(inv_freq: f32, s: &Llama3Scaling) -> f32 {
    let low_wavelen = s.original_max_positions / s.low_freq_factor;
    let high_wavelen = s.original_max_positions / s.high_freq_factor;
    let f = inv_freq as f64;
    let wavelen = 2.0 * std::f64::consts::PI / f;
    let out = if wavelen > low_wavelen {
        f / s.factor
    } else if wavelen < high_wavelen {
        f
    } else {
        let smooth = (s.original_max_positions / wavelen - s.low_freq_factor)
            / (s.high_freq_factor - s.low_freq_factor);
        (1.0 - smooth) * f / s.factor + smooth * f
    };
    out as f32
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn linear_divides_every_frequency_and_unknown_types_are_named() {
        let plain = inv_freq(64, 10000.0, &RopeScaling::None);
        let s = RopeScaling::parse(&json!({"type": "linear", "factor": 4.0})).unwrap();
        let scaled = inv_freq(64, 10000.0, &s);
        for (a, b) in plain.iter().zip(&scaled) {
            assert_eq!(*b, (*a as f64 / 4.0) as f32);
        }
        let e = RopeScaling::parse(&json!({"rope_type": "yarn", "factor": 4.0})).unwrap_err();
        assert!(e.contains("rope_type \"yarn\""), "{e}");
        let e = RopeScaling::parse(&json!({"rope_type": "linear"})).unwrap_err();
        assert!(e.contains("rope_scaling.factor"), "{e}");
        let e = RopeScaling::parse(&json!({"rope_type": "linear", "factor": 0.0})).unwrap_err();
        assert!(e.contains("rope_scaling.factor is 0"), "{e}");
    }
}
