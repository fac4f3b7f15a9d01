//! The generation loop: prefill every prompt in one pass, then decode all
//! sequences together, one token each per pass, until each stops.

use std::time::{Duration, Instant};

use crate::llm::llama::LlamaModel;
use crate::llm::sampling::{Sampler, SamplingParams};
use crate::{LayerStreamer, Result};

/// What to generate.
#[derive(Debug, Clone)]
pub struct GenerateParams {
    /// Most new tokens per sequence.
    pub max_new_tokens: usize,
    /// Sampling of each next token.
    pub sampling: SamplingParams,
    /// Seed of the sampler.
    pub seed: u64,
    /// Tokens that end a sequence (not included in its output).
    pub stop_ids: Vec<u32>,
}

/// What a generation produced and how long it took.
#[derive(Debug, Clone, Default)]
pub struct Generation {
    /// The new tokens of each sequence.
    pub tokens: Vec<Vec<u32>>,
    /// Prompt tokens, all sequences together.
    pub prompt_tokens: usize,
    /// Time of the prefill pass(es).
    pub prefill: Duration,
    /// Time of the decode passes.
    pub decode: Duration,
    /// Decode passes run.
    pub decode_passes: usize,
    /// Layer bytes one pass streams.
    pub pass_bytes: u64,
}

impl Generation {
    /// New tokens over all sequences.
    pub fn new_tokens(&self) -> usize {
        self.tokens.iter().map(Vec::len).sum()
    }

    /// Decode throughput: tokens per second over all sequences (the first
    /// new token of each, which comes from the prefill, not counted).
    pub fn decode_tokens_per_s(&self) -> f64 {
        let toks = self.new_tokens().saturating_sub(self.tokens.len());
        toks as f64 / self.decode.as_secs_f64().max(1e-9)
    }

    /// Weight bytes streamed per second during decode.
    pub fn decode_gb_per_s(&self) -> f64 {
        self.pass_bytes as f64 * self.decode_passes as f64
            / self.decode.as_secs_f64().max(1e-9)
            / 1e9
    }
}

/// Generates from `prompts` (one sequence each; the model's caches are
/// reset first). `on_token(seq, id)` is called for each new token as it is
/// produced, stop tokens excluded.
pub fn generate(
    model: &mut LlamaModel,
    streamer: &mut LayerStreamer,
    prompts: &[Vec<u32>],
    params: &GenerateParams,
    mut on_token: impl FnMut(usize, u32) -> Result<()>,
) -> Result<Generation> {
    model.reset();
    let mut sampler = Sampler::new(params.sampling, params.seed);
    let n = prompts.len();
    let mut gen = Generation {
        tokens: vec![Vec::new(); n],
        prompt_tokens: prompts.iter().map(Vec::len).sum(),
        pass_bytes: streamer.model().total_layer_bytes(),
        ..Default::default()
    };
    if params.max_new_tokens == 0 || n == 0 {
        return Ok(gen);
    }
    let t0 = Instant::now();
    let inputs: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
    let mut logits = model.forward(streamer, &inputs)?;
    gen.prefill = t0.elapsed();
    let mut done = vec![false; n];
    let mut last = vec![0u32; n];
    let t1 = Instant::now();
    loop {
        for s in 0..n {
            if done[s] {
                continue;
            }
            let id = sampler.sample(&logits[s]);
            if params.stop_ids.contains(&id) {
                done[s] = true;
                continue;
            }
            gen.tokens[s].push(id);
            on_token(s, id)?;
            last[s] = id;
            let room = model.options().max_len - model.lengths()[s];
            if gen.tokens[s].len() >= params.max_new_tokens || room == 0 {
                done[s] = true;
            }
        }
        if done.iter().all(|d| *d) {
            break;
        }
        // Finished sequences still take part (their cache has room or is
        // not read again) so that every pass has the same shape; their
        // logits are ignored.
        let step: Vec<[u32; 1]> = last.iter().map(|&t| [t]).collect();
        let inputs: Vec<&[u32]> = step
            .iter()
            .zip(&done)
            .map(|(t, &d)| if d { &t[..0] } else { &t[..] })
            .collect();
        logits = model.forward(streamer, &inputs)?;
        gen.decode_passes += 1;
    }
    gen.decode = t1.elapsed();
    Ok(gen)
}
