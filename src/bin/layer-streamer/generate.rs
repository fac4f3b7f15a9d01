//! `layer-streamer generate`: text generation with a Qwen2/Llama model.

use std::io::Write;
use std::path::PathBuf;

use layer_streamer::llm::{
    generate, ChatTemplate, GenerateParams, Generation, Message, ModelOptions, SamplingParams,
    TextStream, Tokenizer,
};
use layer_streamer::{Error, LayerStreamer, ModelIndex, Result};

use crate::stream_args::{load_model, parse_ids, StreamArgs};

/// Arguments of `generate`.
#[derive(clap::Args)]
pub struct Args {
    /// The model directory (Hugging Face layout).
    #[arg(long)]
    pub model: PathBuf,
    /// A user message (rendered with the model's chat template when it has one).
    #[arg(long, conflicts_with_all = ["messages", "prompt_ids"])]
    pub prompt: Option<String>,
    /// A JSON file with a list of {"role", "content"} messages.
    #[arg(long, conflicts_with = "prompt_ids")]
    pub messages: Option<PathBuf>,
    /// Token ids, comma-separated (no tokenizer needed).
    #[arg(long)]
    pub prompt_ids: Option<String>,
    /// A system message put before the prompt.
    #[arg(long)]
    pub system: Option<String>,
    /// Use the prompt as raw text, without the chat template.
    #[arg(long)]
    pub raw: bool,
    /// A file with one prompt per line, generated together as a batch.
    #[arg(long)]
    pub batch_prompts: Option<PathBuf>,
    /// Most new tokens per sequence.
    #[arg(long, default_value_t = 128)]
    pub max_new_tokens: usize,
    /// Sampling temperature (0: greedy).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Sample among the k most likely tokens (0: all).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Seed of the sampler.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Longest sequence (prompt + new tokens); default: the longest prompt plus --max-new-tokens.
    #[arg(long)]
    pub max_len: Option<usize>,
    /// Most tokens per pass (longer prefills take several passes).
    #[arg(long, default_value_t = 4096)]
    pub max_tokens: usize,
    #[command(flatten)]
    pub stream: StreamArgs,
}

/// Token ids of every prompt the arguments describe.
pub fn prompts(a: &Args, index: &ModelIndex) -> Result<(Vec<Vec<u32>>, Option<Tokenizer>)> {
    if let Some(ids) = &a.prompt_ids {
        let tok = Tokenizer::for_model(index).ok();
        return Ok((vec![parse_ids(ids)?], tok));
    }
    let tok = Tokenizer::for_model(index)?;
    let template = if a.raw {
        None
    } else {
        ChatTemplate::for_model(index)?
    };
    let render = |user: &str| -> Result<Vec<u32>> {
        let mut msgs = Vec::new();
        if let Some(s) = &a.system {
            msgs.push(Message::new("system", s));
        }
        msgs.push(Message::new("user", user));
        match &template {
            Some(t) => tok.encode(&t.render(&msgs, true)?, false),
            None => tok.encode(user, true),
        }
    };
    let prompts = if let Some(path) = &a.batch_prompts {
        let text =
            std::fs::read_to_string(path).map_err(|e| Error::io("reading", path, None, e))?;
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(render)
            .collect::<Result<Vec<_>>>()?
    } else if let Some(path) = &a.messages {
        let msgs = layer_streamer::llm::chat::read_messages(path)?;
        let t = template.as_ref().ok_or_else(|| {
            Error::Input("--messages needs a chat template in tokenizer_config.json".into())
        })?;
        vec![tok.encode(&t.render(&msgs, true)?, false)?]
    } else if let Some(p) = &a.prompt {
        vec![render(p)?]
    } else {
        return Err(Error::Input(
            "give --prompt, --messages, --prompt-ids or --batch-prompts".into(),
        ));
    };
    Ok((prompts, Some(tok)))
}

/// Prints the closing line: prefill, decode speed, streaming rate.
pub fn report(g: &Generation, streamer: &LayerStreamer, tflops: Option<f64>) {
    let prefill_s = g.prefill.as_secs_f64();
    eprintln!(
        "prefill: {} tokens in {:.3} s ({:.1} tokens/s){}",
        g.prompt_tokens,
        prefill_s,
        g.prompt_tokens as f64 / prefill_s.max(1e-9),
        tflops.map_or(String::new(), |t| format!(", layer compute {t:.1} TFLOP/s"))
    );
    eprintln!(
        "decode: {} tokens in {} passes, {:.3} s: {:.2} tokens/s, {:.2} GB/s streamed ({:.2} GB per pass)",
        g.new_tokens(),
        g.decode_passes,
        g.decode.as_secs_f64(),
        g.decode_tokens_per_s(),
        g.decode_gb_per_s(),
        g.pass_bytes as f64 / 1e9
    );
    eprintln!("last pass: {}", streamer.last_pass_stats());
}

/// Runs `generate`.
pub fn run(a: Args) -> Result<()> {
    let index = ModelIndex::open(&a.model)?;
    let (prompts, tok) = prompts(&a, &index)?;
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let max_len = a.max_len.unwrap_or(longest + a.max_new_tokens);
    if longest > max_len {
        return Err(Error::Input(format!(
            "the prompt has {longest} tokens, more than the maximum length {max_len} (--max-len)"
        )));
    }
    let opts = ModelOptions {
        max_batch: prompts.len(),
        max_len,
        max_tokens: a.max_tokens.max(prompts.len()),
        precision: a.stream.precision,
        kv_offload: a.stream.kv_offload,
    };
    let (_index, mut streamer, mut model) = load_model(index, &a.stream, opts)?;
    let params = GenerateParams {
        max_new_tokens: a.max_new_tokens,
        sampling: SamplingParams {
            temperature: a.temperature,
            top_k: a.top_k,
        },
        seed: a.seed,
        stop_ids: model.config().eos_token_ids.clone(),
    };
    let single = prompts.len() == 1;
    let mut text = tok.as_ref().map(TextStream::new);
    let stdout = std::io::stdout();
    let g = generate(&mut model, &mut streamer, &prompts, &params, |s, id| {
        if single {
            let mut out = stdout.lock();
            match text.as_mut() {
                Some(ts) => write!(out, "{}", ts.push(id)?),
                None => write!(out, "{id} "),
            }
            .and_then(|_| out.flush())
            .map_err(|e| Error::Input(format!("writing to stdout: {e}")))?;
        }
        let _ = s;
        Ok(())
    })?;
    println!();
    if !single {
        for (i, toks) in g.tokens.iter().enumerate() {
            let shown = match &tok {
                Some(t) => t.decode(toks)?,
                None => format!("{toks:?}"),
            };
            println!("[{i}] {shown}");
        }
    }
    report(&g, &streamer, model.last_gemm_tflops());
    Ok(())
}
