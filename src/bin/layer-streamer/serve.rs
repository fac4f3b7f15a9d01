//! `layer-streamer serve`: an OpenAI-compatible server with continuous batching.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use layer_streamer::llm::{ChatTemplate, ModelOptions, Tokenizer};
use layer_streamer::pipeline::parse_size;
use layer_streamer::serve::{serve, ServeOptions};
use layer_streamer::{Error, ModelIndex, Result};

use crate::stream_args::{load_model, StreamArgs};

/// The environment variable that may hold the API key.
const API_KEY_VAR: &str = "LS_API_KEY";

/// Arguments of `serve`.
#[derive(clap::Args)]
pub struct Args {
    /// The model directory (Hugging Face layout).
    #[arg(long)]
    pub model: PathBuf,
    /// Address to listen on (127.0.0.1: this machine only).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: IpAddr,
    /// Port (0: any free port; the address is printed).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Sequences generated together (KV cache slots, allotted at start-up).
    #[arg(long, default_value_t = 8)]
    pub max_batch: usize,
    /// Longest sequence, prompt and completion together.
    #[arg(long, default_value_t = 2048)]
    pub max_len: usize,
    /// Most tokens one pass processes: one per running sequence, the rest
    /// for prompt chunks of newly admitted requests.
    #[arg(long, default_value_t = 512)]
    pub max_tokens_per_pass: usize,
    /// Requests that may wait for a slot; past them, 429.
    #[arg(long, default_value_t = 256)]
    pub max_queue: usize,
    /// Largest request body (past it, 413).
    #[arg(long, default_value = "4MiB")]
    pub max_body: String,
    /// Require `Authorization: Bearer KEY` (default: $LS_API_KEY when set).
    #[arg(long)]
    pub api_key: Option<String>,
    /// The model name clients ask for (default: the model directory's name).
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// Seconds running requests may take to finish after SIGINT/SIGTERM.
    #[arg(long, default_value_t = 30.0)]
    pub shutdown_grace: f64,
    #[command(flatten)]
    pub stream: StreamArgs,
}

/// Runs `serve`.
pub fn run(a: Args) -> Result<()> {
    if a.max_tokens_per_pass < a.max_batch {
        return Err(Error::Input(format!(
            "--max-tokens-per-pass {} is below --max-batch {}: every running sequence needs a \
             token in each pass",
            a.max_tokens_per_pass, a.max_batch
        )));
    }
    if !(a.shutdown_grace.is_finite() && a.shutdown_grace >= 0.0) {
        return Err(Error::Input(format!(
            "invalid --shutdown-grace {}: seconds, 0 or more",
            a.shutdown_grace
        )));
    }
    let name = a.served_model_name.clone().unwrap_or_else(|| {
        let canon = a.model.canonicalize().unwrap_or_else(|_| a.model.clone());
        canon
            .file_name()
            .map_or("model".into(), |n| n.to_string_lossy().into_owned())
    });
    let max_body = parse_size(&a.max_body)?;
    let opts = ServeOptions {
        addr: SocketAddr::new(a.host, a.port),
        model_name: name,
        api_key: a
            .api_key
            .clone()
            .or_else(|| std::env::var(API_KEY_VAR).ok())
            .filter(|k| !k.is_empty()),
        max_queue: a.max_queue,
        max_body_bytes: usize::try_from(max_body).unwrap_or(usize::MAX),
        shutdown_grace: Duration::from_secs_f64(a.shutdown_grace),
    };
    let index = ModelIndex::open(&a.model)?;
    let tokenizer = Tokenizer::for_model(&index)?;
    let template = ChatTemplate::for_model(&index)?;
    let sizes = ModelOptions {
        max_batch: a.max_batch,
        max_len: a.max_len,
        max_tokens: a.max_tokens_per_pass,
        precision: a.stream.precision,
        kv_offload: a.stream.kv_offload,
    };
    eprintln!(
        "serve: loading {} for {} sequences of up to {} tokens",
        a.model.display(),
        a.max_batch,
        a.max_len
    );
    let stream = a.stream;
    serve(opts, tokenizer, template, move || {
        let (_index, streamer, model) = load_model(index, &stream, sizes)?;
        Ok((streamer, model))
    })
}
