//! `layer-streamer check-reference`: the forward pass against reference
//! logits from Hugging Face transformers.

use std::path::PathBuf;

use layer_streamer::llm::reference::{check, Reference};
use layer_streamer::llm::ModelOptions;
use layer_streamer::{Error, Result};

use crate::stream_args::{open_model, StreamArgs};

/// Arguments of `check-reference`.
#[derive(clap::Args)]
pub struct Args {
    /// A directory with reference.json and reference_logits.f32 (and the
    /// model, unless --model names it).
    pub dir: PathBuf,
    /// The model, when it is not in DIR: a directory or a GGUF file.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Sequences run together: the reference's, plus shorter ones checked
    /// against themselves run alone.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Largest relative L2 error allowed per row.
    #[arg(long, default_value_t = 2e-2)]
    pub tolerance: f64,
    /// Smallest share of rows whose argmax must agree.
    #[arg(long, default_value_t = 0.95)]
    pub min_agreement: f64,
    #[command(flatten)]
    pub stream: StreamArgs,
}

/// Runs `check-reference`; an error when the check fails.
pub fn run(a: Args) -> Result<()> {
    let reference = Reference::load(&a.dir)?;
    let len = reference.prompt_ids.len() + reference.greedy_ids.len() + 1;
    let opts = ModelOptions {
        max_batch: a.batch.max(1),
        max_len: len,
        max_tokens: len * a.batch.max(1),
        precision: a.stream.precision,
        kv_offload: a.stream.kv_offload,
    };
    let path = a.model.as_deref().unwrap_or(&a.dir);
    let (_index, mut streamer, mut model) = open_model(path, &a.stream, opts)?;
    if model.config().vocab != reference.vocab {
        return Err(Error::Input(format!(
            "the reference has a vocabulary of {} but the model {}",
            reference.vocab,
            model.config().vocab
        )));
    }
    let rep = check(&mut model, &mut streamer, &reference, a.batch)?;
    println!("row  rel_l2      argmax");
    for (i, (e, m)) in rep.rel_l2.iter().zip(&rep.argmax_match).enumerate() {
        println!("{i:>3}  {e:.3e}  {}", if *m { "ok" } else { "DIFFERS" });
    }
    if let Some(b) = rep.batch_rel_l2 {
        println!(
            "batch of {}: worst rel_l2 batched vs alone {b:.3e}",
            a.batch
        );
    }
    let ok = rep.passed(a.tolerance, a.min_agreement);
    println!(
        "{} {}: max rel_l2 {:.3e} (tolerance {:.1e}), argmax agreement {:.1}% (need {:.0}%), device {}, precision {}",
        if ok { "PASS" } else { "FAIL" },
        a.dir.display(),
        rep.max_rel_l2(),
        a.tolerance,
        100.0 * rep.argmax_agreement(),
        100.0 * a.min_agreement,
        a.stream.opts.config.device,
        a.stream.precision
    );
    if ok {
        Ok(())
    } else {
        Err(Error::Input(
            "the forward pass does not match the reference".into(),
        ))
    }
}
