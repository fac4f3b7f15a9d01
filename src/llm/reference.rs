//! Checking the forward pass against reference logits from Hugging Face
//! transformers (`reference.json` + `reference_logits.f32`, as written by
//! `hf_reference.py` or `scripts/hf_fixture.py`): the prompt, then the
//! reference's greedy tokens fed one by one (teacher forcing), comparing the
//! logits of every step.

use std::path::Path;

use serde::Deserialize;

use crate::llm::llama::LlamaModel;
use crate::llm::sampling::argmax;
use crate::{Error, LayerStreamer, Result};

/// The reference's prompt, greedy continuation and logits.
#[derive(Debug, Clone)]
pub struct Reference {
    /// Prompt ids.
    pub prompt_ids: Vec<u32>,
    /// Greedy continuation ids.
    pub greedy_ids: Vec<u32>,
    /// Vocabulary size.
    pub vocab: usize,
    /// `[1 + steps, vocab]`: row 0 after the prompt, row i after greedy_ids[i-1].
    pub logits: Vec<f32>,
}

#[derive(Deserialize)]
struct Meta {
    prompt_ids: Vec<u32>,
    greedy_ids: Vec<u32>,
    vocab: usize,
}

impl Reference {
    /// Reads `DIR/reference.json` and `DIR/reference_logits.f32`.
    pub fn load(dir: &Path) -> Result<Reference> {
        let jp = dir.join("reference.json");
        let text = std::fs::read_to_string(&jp).map_err(|e| Error::io("reading", &jp, None, e))?;
        let m: Meta = serde_json::from_str(&text)
            .map_err(|e| Error::model(&jp, format!("invalid reference.json: {e}")))?;
        let lp = dir.join("reference_logits.f32");
        let bytes = std::fs::read(&lp).map_err(|e| Error::io("reading", &lp, None, e))?;
        let rows = 1 + m.greedy_ids.len();
        if bytes.len() != rows * m.vocab * 4 {
            return Err(Error::model(
                &lp,
                format!(
                    "{} bytes, but {rows} rows of {} f32 logits were expected",
                    bytes.len(),
                    m.vocab
                ),
            ));
        }
        Ok(Reference {
            logits: bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            prompt_ids: m.prompt_ids,
            greedy_ids: m.greedy_ids,
            vocab: m.vocab,
        })
    }

    /// Reference row `i`.
    pub fn row(&self, i: usize) -> &[f32] {
        &self.logits[i * self.vocab..(i + 1) * self.vocab]
    }
}

/// Relative L2 error of `got` against `want`.
pub fn rel_l2(got: &[f32], want: &[f32]) -> f64 {
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (g, w) in got.iter().zip(want) {
        num += ((g - w) as f64).powi(2);
        den += (*w as f64).powi(2);
    }
    (num / den.max(1e-30)).sqrt()
}

/// Per-row comparison of a run against the reference.
#[derive(Debug, Clone, Default)]
pub struct CheckReport {
    /// Relative L2 error of each row.
    pub rel_l2: Vec<f64>,
    /// Whether each row's argmax matches the reference's.
    pub argmax_match: Vec<bool>,
    /// For extra batch sequences: the worst relative L2 error between their
    /// batched and single-sequence logits.
    pub batch_rel_l2: Option<f64>,
}

impl CheckReport {
    /// Largest per-row error.
    pub fn max_rel_l2(&self) -> f64 {
        self.rel_l2.iter().copied().fold(0.0, f64::max)
    }

    /// Share of rows whose argmax agrees.
    pub fn argmax_agreement(&self) -> f64 {
        let n = self.argmax_match.len().max(1);
        self.argmax_match.iter().filter(|m| **m).count() as f64 / n as f64
    }

    /// Whether every row is within `tol` and agreement is at least `min_agree`.
    pub fn passed(&self, tol: f64, min_agree: f64) -> bool {
        self.max_rel_l2() <= tol
            && self.argmax_agreement() >= min_agree
            && !matches!(self.batch_rel_l2, Some(e) if e > tol)
    }
}

/// Teacher-forced logits of `prompts` (each continued by `forced[i]`) run as
/// one batch: `rows[seq][step]`.
pub fn teacher_forced(
    model: &mut LlamaModel,
    streamer: &mut LayerStreamer,
    prompts: &[Vec<u32>],
    forced: &[Vec<u32>],
) -> Result<Vec<Vec<Vec<f32>>>> {
    model.reset();
    let inputs: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
    let first = model.forward(streamer, &inputs)?;
    let mut rows: Vec<Vec<Vec<f32>>> = first.into_iter().map(|r| vec![r]).collect();
    let steps = forced.iter().map(Vec::len).max().unwrap_or(0);
    for step in 0..steps {
        let inputs: Vec<&[u32]> = forced
            .iter()
            .map(|f| f.get(step..step + 1).unwrap_or(&[]))
            .collect();
        let out = model.forward(streamer, &inputs)?;
        for (s, r) in out.into_iter().enumerate() {
            if !r.is_empty() {
                rows[s].push(r);
            }
        }
    }
    Ok(rows)
}

/// Runs the reference's prompt and greedy tokens through `model` and
/// compares every row. With `batch > 1`, runs the reference sequence
/// together with `batch - 1` shorter prompts (truncations of it, continued
/// by the same tokens) and also checks that each batched sequence's logits
/// equal those of the sequence run alone.
pub fn check(
    model: &mut LlamaModel,
    streamer: &mut LayerStreamer,
    reference: &Reference,
    batch: usize,
) -> Result<CheckReport> {
    let batch = batch.max(1);
    let mut prompts = vec![reference.prompt_ids.clone()];
    let mut forced = vec![reference.greedy_ids.clone()];
    for b in 1..batch {
        let keep = (reference.prompt_ids.len() * (batch - b) / batch).max(1);
        prompts.push(reference.prompt_ids[..keep].to_vec());
        forced.push(reference.greedy_ids[..reference.greedy_ids.len() / (b + 1)].to_vec());
    }
    let rows = teacher_forced(model, streamer, &prompts, &forced)?;
    let mut rep = CheckReport::default();
    for (i, got) in rows[0].iter().enumerate() {
        let want = reference.row(i);
        rep.rel_l2.push(rel_l2(got, want));
        rep.argmax_match.push(argmax(got) == argmax(want));
    }
    if batch > 1 {
        let mut worst = 0.0f64;
        for s in 1..batch {
            let alone = teacher_forced(model, streamer, &prompts[s..=s], &forced[s..=s])?;
            for (a, b) in alone[0].iter().zip(&rows[s]) {
                worst = worst.max(rel_l2(b, a));
            }
        }
        rep.batch_rel_l2 = Some(worst);
    }
    Ok(rep)
}
