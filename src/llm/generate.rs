//! The generation loop: prefill every prompt in one pass, then decode all
//! sequences together, one token each per pass, until each stops.

use std::time::{Duration, Instant};

use crate::llm::llama::LlamaModel;
use crate::llm::sampling::{Sampler, SamplingParams, TokenDraw};
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
    let mut t1 = t0;
    let mut prefill = true;
    let mut inputs: Vec<Vec<u32>> = prompts.to_vec();
    let mut done = vec![false; n];
    loop {
        // One draw per running sequence, in order, as the sampler always
        // drew; the tokens are chosen where the logits are.
        let draws: Vec<Option<TokenDraw>> = done
            .iter()
            .map(|&d| (!d).then(|| sampler.next_draw()))
            .collect();
        let refs: Vec<&[u32]> = inputs.iter().map(Vec::as_slice).collect();
        let ids = model.forward_sample(streamer, &refs, &draws)?;
        if prefill {
            prefill = false;
            gen.prefill = t0.elapsed();
            t1 = Instant::now();
        } else {
            gen.decode_passes += 1;
        }
        for (s, id) in ids.into_iter().enumerate() {
            if done[s] {
                continue;
            }
            // A sequence without input (an empty prompt) gets no token.
            let Some(id) = id.filter(|id| !params.stop_ids.contains(id)) else {
                done[s] = true;
                continue;
            };
            gen.tokens[s].push(id);
            on_token(s, id)?;
            let room = model.options().max_len - model.lengths()[s];
            done[s] = gen.tokens[s].len() >= params.max_new_tokens || room == 0;
        }
        if done.iter().all(|d| *d) {
            break;
        }
        // Finished sequences take no part in the next pass.
        for (s, input) in inputs.iter_mut().enumerate() {
            input.clear();
            if !done[s] {
                input.push(
                    *gen.tokens[s]
                        .last()
                        .expect("a running sequence has a token"),
                );
            }
        }
    }
    gen.decode = t1.elapsed();
    Ok(gen)
}
