//! An OpenAI-compatible HTTP server with continuous batching (the `serve`
//! feature, on by default; build with `default-features = false` to leave
//! out tokio and axum).
//!
//! The axum handlers parse and check each request, tokenize it and queue it;
//! one scheduler thread owns the streamer and the model and, at every pass
//! boundary, admits queued requests into free KV slots, runs one pass that
//! decodes a token for each running sequence and prefills new prompts in
//! chunks, and retires finished or abandoned sequences. The HTTP side never
//! touches the device.
//!
//! ```no_run
//! use layer_streamer::llm::{ChatTemplate, LlamaModel, ModelOptions, Tokenizer};
//! use layer_streamer::serve::{serve, ServeOptions};
//! use layer_streamer::{Device, LayerStreamer, ModelIndex};
//! # fn main() -> layer_streamer::Result<()> {
//! let dir = std::path::PathBuf::from("./Qwen2-7B-Instruct");
//! let tokenizer = Tokenizer::from_dir(&dir)?;
//! let template = ChatTemplate::from_dir(&dir)?;
//! let opts = ServeOptions::new("qwen2-7b");
//! serve(opts, tokenizer, template, move || {
//!     let index = ModelIndex::open(&dir)?;
//!     let streamer = LayerStreamer::builder(&index).device(Device::Cuda(0)).build()?;
//!     let sizes = ModelOptions { max_batch: 32, max_len: 4096, max_tokens: 512, ..ModelOptions::default() };
//!     let model = LlamaModel::load(&streamer, sizes)?;
//!     Ok((streamer, model))
//! })
//! # }
//! ```

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;

use crate::llm::{ChatTemplate, LlamaModel, Tokenizer};
use crate::{Error, LayerStreamer, Result};

pub mod api;
pub mod error;
mod handlers;
pub mod metrics;
pub mod sampling;
pub mod scheduler;
pub mod text;

pub use error::ApiError;
use handlers::AppState;
pub use scheduler::SchedulerHandle;

/// How the server listens and what it accepts.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Address to bind (port 0: any free port, printed at start-up).
    pub addr: SocketAddr,
    /// The model name `/v1/models` lists and requests must give.
    pub model_name: String,
    /// With a key, every request but `/health` needs `Authorization: Bearer KEY`.
    pub api_key: Option<String>,
    /// Requests that may wait for a sequence slot; past them, 429.
    pub max_queue: usize,
    /// Largest request body in bytes; past it, 413.
    pub max_body_bytes: usize,
    /// After SIGINT/SIGTERM, how long running requests may take to finish
    /// before they are cancelled (a second signal cancels them at once).
    pub shutdown_grace: Duration,
}

impl ServeOptions {
    /// Defaults: 127.0.0.1:8000, no key, a queue of 256, 4 MiB bodies, 30 s
    /// of grace.
    pub fn new(model_name: &str) -> ServeOptions {
        ServeOptions {
            addr: SocketAddr::from(([127, 0, 0, 1], 8000)),
            model_name: model_name.to_string(),
            api_key: None,
            max_queue: 256,
            max_body_bytes: 4 << 20,
            shutdown_grace: Duration::from_secs(30),
        }
    }
}

/// Serves until SIGINT or SIGTERM. `load` builds the streamer and the model
/// on the scheduler's thread; the server listens once it has returned, and
/// prints `listening on http://ADDR` on stdout.
pub fn serve(
    opts: ServeOptions,
    tokenizer: Tokenizer,
    template: Option<ChatTemplate>,
    load: impl FnOnce() -> Result<(LayerStreamer, LlamaModel)> + Send + 'static,
) -> Result<()> {
    let metrics = Arc::new(metrics::Metrics::default());
    let (handle, limits, thread) = scheduler::spawn(load, opts.max_queue, metrics)?;
    let state = Arc::new(AppState {
        scheduler: handle.clone(),
        tokenizer: Arc::new(tokenizer),
        template,
        limits,
        model_name: opts.model_name.clone(),
        started: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("ls-http")
        .build()
        .map_err(|e| Error::Pipeline(format!("cannot start the tokio runtime: {e}")))?;
    let served = runtime.block_on(listen(&opts, state, handle.clone()));
    // Whatever ended the server, the scheduler stops too.
    if served.is_err() {
        handle.abort();
    }
    let _ = thread.join();
    served
}

/// The routes, with the API key check and the body limit.
fn router(state: Arc<AppState>, api_key: Option<String>, max_body: usize) -> Router {
    let api = Router::new()
        .route("/v1/chat/completions", post(handlers::chat))
        .route("/v1/completions", post(handlers::completions))
        .route("/v1/models", get(handlers::models))
        .route("/metrics", get(handlers::metrics))
        .route_layer(middleware::from_fn_with_state(Arc::new(api_key), auth));
    Router::new()
        .route("/health", get(handlers::health))
        .merge(api)
        .fallback(|| async {
            ApiError::not_found("no such endpoint", "unknown_url").into_response()
        })
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(state)
}

/// Requires `Authorization: Bearer KEY` when a key is set.
async fn auth(State(key): State<Arc<Option<String>>>, req: Request, next: Next) -> Response {
    let Some(key) = key.as_deref() else {
        return next.run(req).await;
    };
    let given = req
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(g) if same_key(g.trim().as_bytes(), key.as_bytes()) => next.run(req).await,
        Some(_) => ApiError::unauthorized("incorrect API key provided").into_response(),
        None => {
            ApiError::unauthorized("no API key given: send the header 'Authorization: Bearer KEY'")
                .into_response()
        }
    }
}

/// Compares keys in time that depends on their lengths only.
fn same_key(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Binds, serves, and on a signal drains the scheduler, then stops.
async fn listen(opts: &ServeOptions, state: Arc<AppState>, handle: SchedulerHandle) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(opts.addr)
        .await
        .map_err(|e| Error::Config(format!("cannot listen on {}: {e}", opts.addr)))?;
    let addr = listener
        .local_addr()
        .map_err(|e| Error::Config(format!("cannot read the bound address: {e}")))?;
    println!("listening on http://{addr}");
    use std::io::Write;
    let _ = std::io::stdout().flush();
    let app = router(state, opts.api_key.clone(), opts.max_body_bytes);
    let grace = opts.shutdown_grace;
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown_signal(handle, grace))
        .await
        .map_err(|e| Error::Config(format!("serving on {addr}: {e}")))
}

/// Resolves at the first SIGINT/SIGTERM, after telling the scheduler to
/// drain; a second signal, or the end of the grace time, cancels what runs.
async fn shutdown_signal(handle: SchedulerHandle, grace: Duration) {
    let mut signals = match Signals::new() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("serve: cannot watch for SIGINT/SIGTERM ({e}); stop the server with SIGKILL");
            return std::future::pending().await;
        }
    };
    let name = signals.next().await;
    eprintln!(
        "serve: {name}: finishing running requests (up to {:.0} s; send it again to cancel them)",
        grace.as_secs_f64()
    );
    handle.drain();
    tokio::spawn(async move {
        let why = tokio::select! {
            n = signals.next() => n,
            _ = tokio::time::sleep(grace) => "grace time over",
        };
        eprintln!("serve: {why}: cancelling running requests");
        handle.abort();
    });
}

/// SIGINT and SIGTERM.
struct Signals {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> std::io::Result<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            int: signal(SignalKind::interrupt())?,
            term: signal(SignalKind::terminate())?,
        })
    }

    async fn next(&mut self) -> &'static str {
        tokio::select! {
            _ = self.int.recv() => "SIGINT",
            _ = self.term.recv() => "SIGTERM",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::same_key;

    #[test]
    fn keys_compare_by_every_byte() {
        let key: Vec<u8> = (0..32).map(|_| rand::random::<u8>() | 1).collect();
        assert!(same_key(&key, &key));
        for i in 0..key.len() {
            let mut k = key.clone();
            k[i] ^= 1;
            assert!(!same_key(&k, &key));
        }
        assert!(!same_key(&key[..31], &key));
    }
}
