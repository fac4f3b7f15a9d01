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

/// One sequence's choice of its next token: the rule and, when the rule
/// samples, the uniform draw in `[0, 1)` that decides the token. The draw
/// comes from the sequence's own generator, so a sequence's tokens do not
/// depend on what else shares its pass; the host ([`sample_draw`]) and the
/// CUDA forward pass (`kernels/sampling.cu`) apply the same rule to it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TokenDraw {
    /// `0` (or below): greedy (argmax, ties to the lowest id).
    pub temperature: f32,
    /// Sample among the `top_k` most likely tokens (`0`: all).
    pub top_k: usize,
    /// Nucleus: the smallest set of most likely tokens (after top-k) whose
    /// probability reaches `top_p` (`1` or more: all).
    pub top_p: f32,
    /// The uniform draw (unused when greedy).
    pub uniform: f64,
}

impl TokenDraw {
    /// The argmax.
    pub fn greedy() -> TokenDraw {
        TokenDraw {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            uniform: 0.0,
        }
    }

    /// Whether the rule is the argmax (no draw needed): a temperature of 0
    /// or below, or NaN.
    pub fn is_greedy(&self) -> bool {
        self.temperature.is_nan() || self.temperature <= 0.0
    }
}

/// The token `draw` picks from `logits` on the host: the argmax when greedy;
/// with `top_p < 1`, the nucleus of the top-k in descending order of logit;
/// else among the top-k (in the order a selection leaves them).
pub fn sample_draw(logits: &[f32], draw: &TokenDraw) -> u32 {
    if draw.is_greedy() || logits.is_empty() {
        argmax(logits)
    } else if draw.top_p < 1.0 {
        sample_nucleus(logits, draw)
    } else {
        sample_top_k(logits, draw.temperature, draw.top_k, draw.uniform)
    }
}

/// Top-k with a temperature: `uniform` walks the weights of the top-k.
fn sample_top_k(logits: &[f32], temperature: f32, top_k: usize, uniform: f64) -> u32 {
    let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
    let k = match top_k {
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
        .map(|&i| (((logits[i as usize] - max) / temperature) as f64).exp())
        .collect();
    let total: f64 = weights.iter().sum();
    let mut r = uniform * total;
    for (w, &i) in weights.iter().zip(&idx) {
        r -= w;
        if r <= 0.0 {
            return i;
        }
    }
    *idx.last().unwrap_or(&0)
}

/// Top-k, then the smallest set of most likely tokens whose share of the
/// top-k's mass reaches `top_p`; `uniform` walks their weights.
fn sample_nucleus(logits: &[f32], draw: &TokenDraw) -> u32 {
    let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
    idx.sort_unstable_by(|a, b| logits[*b as usize].total_cmp(&logits[*a as usize]));
    if draw.top_k > 0 {
        idx.truncate(draw.top_k);
    }
    let max = logits[idx[0] as usize];
    let t = draw.temperature as f64;
    let weights: Vec<f64> = idx
        .iter()
        .map(|&i| ((logits[i as usize] - max) as f64 / t).exp())
        .collect();
    let total: f64 = weights.iter().sum();
    let mut kept = 0;
    let mut mass = 0.0;
    for w in &weights {
        kept += 1;
        mass += w / total;
        if mass >= draw.top_p as f64 {
            break;
        }
    }
    let kept_total: f64 = weights[..kept].iter().sum();
    let mut r = draw.uniform * kept_total;
    for (w, &i) in weights[..kept].iter().zip(&idx) {
        r -= w;
        if r <= 0.0 {
            return i;
        }
    }
    idx[kept - 1]
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

    /// The next draw: the parameters and, unless greedy, a uniform from the
    /// generator (a greedy draw leaves the generator as it is).
    pub fn next_draw(&mut self) -> TokenDraw {
        let mut d = TokenDraw {
            temperature: self.params.temperature,
            top_k: self.params.top_k,
            top_p: 1.0,
            uniform: 0.0,
        };
        if !d.is_greedy() {
            d.uniform = self.rng.gen::<f64>();
        }
        d
    }

    /// Picks a token from `logits`.
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

    /// What choosing tokens on the host costs per row at a 7B vocabulary
    /// (152 064): the scheduler used to pay it serially for every row of
    /// every pass, after copying the row's logits to the host. Prints the
    /// times; asserts only that every pick is admissible.
    #[test]
    fn host_sampling_time_per_row_at_a_7b_vocabulary() {
        let mut rng = rand::thread_rng();
        let vocab = 152_064;
        let rows: Vec<Vec<f32>> = (0..8)
            .map(|_| (0..vocab).map(|_| rng.gen_range(-12.0..12.0)).collect())
            .collect();
        let rules = [
            ("greedy", TokenDraw::greedy()),
            (
                "T 0.7, top-k 50",
                TokenDraw {
                    temperature: 0.7,
                    top_k: 50,
                    top_p: 1.0,
                    uniform: 0.0,
                },
            ),
            (
                "T 0.7, top-p 0.9",
                TokenDraw {
                    temperature: 0.7,
                    top_k: 0,
                    top_p: 0.9,
                    uniform: 0.0,
                },
            ),
        ];
        for (name, rule) in rules {
            let t0 = std::time::Instant::now();
            for row in &rows {
                let copy = row.to_vec();
                let d = TokenDraw {
                    uniform: rng.gen(),
                    ..rule
                };
                let id = sample_draw(&copy, &d) as usize;
                assert!(id < vocab);
                if rule.top_k > 0 {
                    let above = copy.iter().filter(|&&v| v > copy[id]).count();
                    assert!(above < rule.top_k, "{name}: {above} logits above the pick");
                }
            }
            let per_row = t0.elapsed().as_secs_f64() / rows.len() as f64;
            eprintln!(
                "host sampling, {name}: {:.3} ms per row, {:.1} ms for 64 rows",
                per_row * 1e3,
                per_row * 64e3
            );
        }
    }
}
