//! Choosing the next token from one row of logits: greedy, or top-k with a
//! temperature.

use rand::{Rng, SeedableRng};

/// How the next token is chosen.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingParams {
    /// `0` (or below): greedy (argmax).
    pub temperature: f32,
    /// Sample among the `top_k` most likely tokens (`0`: all).
    pub top_k: usize,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
        }
    }
}

/// The index of the largest value (the first one on ties); NaNs are skipped.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    let mut best_v = f32::NEG_INFINITY;
    for (i, &v) in logits.iter().enumerate() {
        if v > best_v {
            best_v = v;
            best = i;
        }
    }
    best as u32
}

/// A seeded sampler.
pub struct Sampler {
    params: SamplingParams,
    rng: rand::rngs::SmallRng,
}

impl Sampler {
    /// A sampler with these parameters and seed.
    pub fn new(params: SamplingParams, seed: u64) -> Sampler {
        Sampler {
            params,
            rng: rand::rngs::SmallRng::seed_from_u64(seed),
        }
    }

    /// Picks a token from `logits`.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.params.temperature <= 0.0 || logits.is_empty() {
            return argmax(logits);
        }
        let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
        let k = match self.params.top_k {
            0 => logits.len(),
            k => k.min(logits.len()),
        };
        let by_logit = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]);
        if k < idx.len() {
            idx.select_nth_unstable_by(k - 1, by_logit);
            idx.truncate(k);
        }
        let max = idx
            .iter()
            .map(|&i| logits[i as usize])
            .fold(f32::NEG_INFINITY, f32::max);
        let weights: Vec<f64> = idx
            .iter()
            .map(|&i| (((logits[i as usize] - max) / self.params.temperature) as f64).exp())
            .collect();
        let total: f64 = weights.iter().sum();
        let mut r = self.rng.gen::<f64>() * total;
        for (w, &i) in weights.iter().zip(&idx) {
            r -= w;
            if r <= 0.0 {
                return i;
            }
        }
        *idx.last().unwrap_or(&0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_and_top1_pick_the_maximum() {
        let l = [0.1, 3.0, -1.0, 2.9];
        assert_eq!(argmax(&l), 1);
        let mut s = Sampler::new(
            SamplingParams {
                temperature: 1.0,
                top_k: 1,
            },
            3,
        );
        assert_eq!(s.sample(&l), 1);
    }

    #[test]
    fn top_k_never_leaves_the_top_k() {
        let l: Vec<f32> = (0..100).map(|i| i as f32 * 0.01).collect();
        let mut s = Sampler::new(
            SamplingParams {
                temperature: 5.0,
                top_k: 3,
            },
            1,
        );
        for _ in 0..200 {
            assert!(s.sample(&l) >= 97);
        }
    }
}
