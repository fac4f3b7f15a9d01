//! Each request's own sampler: temperature, top-k and top-p with its own
//! seed, so that a request's tokens do not depend on what else is in the
//! batch.

use rand::{Rng, SeedableRng};

use crate::llm::sampling::{sample_draw, TokenDraw};

/// How one request samples.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingSpec {
    /// `0`: greedy.
    pub temperature: f32,
    /// Nucleus: the smallest set of most likely tokens whose probability
    /// reaches `top_p` (`1`: all).
    pub top_p: f32,
    /// The `top_k` most likely tokens (`0`: all).
    pub top_k: usize,
    /// Seed of the request's generator.
    pub seed: u64,
}

/// A request's sampler: its rule and its own generator.
pub struct RequestSampler {
    spec: SamplingSpec,
    rng: rand::rngs::SmallRng,
}

impl RequestSampler {
    /// A sampler for `spec`.
    pub fn new(spec: SamplingSpec) -> RequestSampler {
        RequestSampler {
            spec,
            rng: rand::rngs::SmallRng::seed_from_u64(spec.seed),
        }
    }

    /// The draw for the request's next token: one uniform from its
    /// generator unless greedy. Without top-p the draws are those of the
    /// crate's [`Sampler`](crate::llm::Sampler) with the same seed, so the
    /// tokens are those of `generate`.
    pub fn next_draw(&mut self) -> TokenDraw {
        let mut d = TokenDraw {
            temperature: self.spec.temperature,
            top_k: self.spec.top_k,
            top_p: self.spec.top_p,
            uniform: 0.0,
        };
        if !d.is_greedy() {
            d.uniform = self.rng.gen::<f64>();
        }
        d
    }

    /// Picks the next token from `logits` on the host.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if logits.is_empty() {
            return 0;
        }
        let d = self.next_draw();
        sample_draw(logits, &d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llm::sampling::{argmax, Sampler, SamplingParams};

    fn spec(temperature: f32, top_p: f32, top_k: usize, seed: u64) -> SamplingSpec {
        SamplingSpec {
            temperature,
            top_p,
            top_k,
            seed,
        }
    }

    #[test]
    fn greedy_is_argmax_and_plain_matches_the_crate_sampler() {
        let mut rng = rand::thread_rng();
        let logits: Vec<f32> = (0..500).map(|_| rng.gen_range(-5.0..5.0)).collect();
        let mut g = RequestSampler::new(spec(0.0, 0.5, 3, rng.gen()));
        assert_eq!(g.sample(&logits), argmax(&logits));
        let seed = rng.gen();
        let mut ours = RequestSampler::new(spec(0.8, 1.0, 20, seed));
        let mut theirs = Sampler::new(
            SamplingParams {
                temperature: 0.8,
                top_k: 20,
            },
            seed,
        );
        for _ in 0..50 {
            assert_eq!(ours.sample(&logits), theirs.sample(&logits));
        }
    }

    #[test]
    fn top_p_keeps_only_the_nucleus() {
        let mut rng = rand::thread_rng();
        // Token 7 holds about 88 % of the mass, token 3 about 12 %, the rest
        // almost nothing: top_p 0.8 leaves token 7 alone, 0.95 both.
        let mut logits = vec![-20.0f32; 64];
        logits[7] = 2.0;
        logits[3] = 0.0;
        let mut narrow = RequestSampler::new(spec(1.0, 0.8, 0, rng.gen()));
        let mut wide = RequestSampler::new(spec(1.0, 0.95, 0, rng.gen()));
        let mut seen = [0usize; 64];
        for _ in 0..400 {
            assert_eq!(narrow.sample(&logits), 7);
            seen[wide.sample(&logits) as usize] += 1;
        }
        assert_eq!(seen[7] + seen[3], 400);
        assert!(seen[3] > 10, "{:?}", &seen[..8]);
    }
}
