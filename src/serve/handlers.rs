//! The HTTP handlers: parse and check a request, tokenize it, queue it for
//! the scheduler, and turn the scheduler's events into an OpenAI response,
//! whole or as server-sent events. Nothing here touches the device.

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::stream::{self, Stream, StreamExt};
use serde_json::{json, Value};
use tokio::sync::mpsc::UnboundedReceiver;

use crate::llm::{ChatTemplate, Message, Tokenizer};
use crate::serve::api::{self, ChatRequest, Checked, CommonParams, CompletionRequest, PromptInput};
use crate::serve::error::ApiError;
use crate::serve::sampling::SamplingSpec;
use crate::serve::scheduler::{Event, Job, ModelLimits, SchedulerHandle, SubmitError};
use crate::serve::text::TextAssembler;

/// What every handler shares.
pub struct AppState {
    /// The scheduler's queue.
    pub scheduler: SchedulerHandle,
    /// The model's tokenizer.
    pub tokenizer: Arc<Tokenizer>,
    /// Its chat template, if it has one.
    pub template: Option<ChatTemplate>,
    /// The model's sizes.
    pub limits: ModelLimits,
    /// The name `/v1/models` lists and requests must ask for.
    pub model_name: String,
    /// When the server started (the model's `created`).
    pub started: u64,
}

/// The two kinds of completion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Chat,
    Text,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn new_id(prefix: &str) -> String {
    use rand::Rng;
    let n: u128 = rand::thread_rng().gen();
    format!("{prefix}-{:024x}", n & ((1u128 << 96) - 1))
}

/// The body, or the 400/413 of a body that could not be read.
fn body(state: &AppState, b: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    b.map_err(|e| {
        state
            .scheduler
            .metrics()
            .rejected_invalid
            .fetch_add(1, Ordering::Relaxed);
        ApiError {
            status: e.status(),
            ..ApiError::invalid(format!("cannot read the request body: {e}"))
        }
    })
}

/// `POST /v1/chat/completions`.
pub async fn chat(
    State(state): State<Arc<AppState>>,
    b: Result<Bytes, BytesRejection>,
) -> Response {
    let prepared = body(&state, b).and_then(|b| {
        let req: ChatRequest = api::parse(&b)?;
        let template = state.template.as_ref().ok_or_else(|| {
            ApiError::invalid("the model has no chat template; use /v1/completions")
        })?;
        if req.messages.is_empty() {
            return Err(ApiError::invalid_param("messages", "messages is empty"));
        }
        let msgs = req
            .messages
            .iter()
            .map(|m| Ok(Message::new(&m.role, &m.text()?)))
            .collect::<Result<Vec<_>, ApiError>>()?;
        let text = template
            .render(&msgs, true)
            .map_err(|e| ApiError::invalid_param("messages", e.to_string()))?;
        let prompt = state
            .tokenizer
            .encode(&text, false)
            .map_err(|e| ApiError::invalid_param("messages", e.to_string()))?;
        Ok((prompt, req.common))
    });
    respond(state, Kind::Chat, prepared).await
}

/// `POST /v1/completions`.
pub async fn completions(
    State(state): State<Arc<AppState>>,
    b: Result<Bytes, BytesRejection>,
) -> Response {
    let prepared = body(&state, b).and_then(|b| {
        let req: CompletionRequest = api::parse(&b)?;
        let prompt = match req.prompt.resolve(state.limits.vocab)? {
            PromptInput::Ids(ids) => ids,
            PromptInput::Text(t) => state
                .tokenizer
                .encode(&t, true)
                .map_err(|e| ApiError::invalid_param("prompt", e.to_string()))?,
        };
        Ok((prompt, req.common))
    });
    respond(state, Kind::Text, prepared).await
}

/// Checks, queues and answers a tokenized request.
async fn respond(
    state: Arc<AppState>,
    kind: Kind,
    prepared: Result<(Vec<u32>, CommonParams), ApiError>,
) -> Response {
    let arrived = Instant::now();
    let queued =
        prepared.and_then(|(prompt, common)| queue(&state, kind, prompt, &common, arrived));
    let gen = match queued {
        Ok(g) => g,
        Err(e) => {
            let m = state.scheduler.metrics();
            match e.status {
                StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE => {}
                _ => {
                    m.rejected_invalid.fetch_add(1, Ordering::Relaxed);
                }
            }
            return e.into_response();
        }
    };
    if gen.checked.stream {
        Sse::new(sse(gen))
            .keep_alive(KeepAlive::default())
            .into_response()
    } else {
        whole(gen).await
    }
}

/// Checks the request against the model and queues it.
fn queue(
    state: &AppState,
    kind: Kind,
    prompt: Vec<u32>,
    common: &CommonParams,
    arrived: Instant,
) -> Result<Generation, ApiError> {
    let checked = common.check()?;
    if common.model != state.model_name {
        return Err(ApiError::not_found(
            format!(
                "the model {:?} does not exist; this server serves {:?}",
                common.model, state.model_name
            ),
            "model_not_found",
        ));
    }
    let max_new = room_for(state.limits.max_len, kind, prompt.len(), checked.max_tokens)?;
    // The tokenizer may know ids the model's embedding does not have; one
    // such id would fail the whole batch's pass.
    if let Some(bad) = prompt.iter().find(|&&t| t as usize >= state.limits.vocab) {
        return Err(ApiError::invalid(format!(
            "the prompt has token id {bad}, outside the model's vocabulary of {} ids",
            state.limits.vocab
        )));
    }
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let id = new_id(if kind == Kind::Chat {
        "chatcmpl"
    } else {
        "cmpl"
    });
    let prompt_tokens = prompt.len();
    let job = Job {
        id: id.clone(),
        prompt,
        max_new_tokens: max_new,
        sampling: SamplingSpec {
            temperature: checked.temperature,
            top_p: checked.top_p,
            top_k: checked.top_k,
            seed: checked.seed.unwrap_or_else(rand::random),
        },
        stop_ids: if checked.ignore_eos {
            Vec::new()
        } else {
            state.limits.eos_token_ids.clone()
        },
        events: tx,
        arrived,
    };
    match state.scheduler.submit(job) {
        Ok(()) => {}
        Err(SubmitError::Full(n)) => {
            let m = state.scheduler.metrics();
            m.rejected_queue_full.fetch_add(1, Ordering::Relaxed);
            return Err(ApiError::queue_full(n));
        }
        Err(SubmitError::ShuttingDown) => return Err(ApiError::shutting_down()),
    }
    state
        .scheduler
        .metrics()
        .requests
        .fetch_add(1, Ordering::Relaxed);
    Ok(Generation {
        text: TextAssembler::new(state.tokenizer.clone(), checked.stop.clone()),
        checked,
        events: rx,
        kind,
        id,
        created: unix_now(),
        model: state.model_name.clone(),
        prompt_tokens,
        started: false,
        finish: None,
    })
}

/// The tokens a request may generate: what it asks for (by default all the
/// room left), if the prompt and that fit in `max_len`.
fn room_for(
    max_len: usize,
    kind: Kind,
    prompt: usize,
    asked: Option<usize>,
) -> Result<usize, ApiError> {
    if prompt == 0 {
        return Err(ApiError::invalid_param(
            "prompt",
            "the prompt has no tokens",
        ));
    }
    let room = max_len.saturating_sub(prompt);
    let max_new = asked.unwrap_or(room);
    if room == 0 || max_new > room {
        return Err(ApiError {
            code: Some("context_length_exceeded"),
            ..ApiError::invalid_param(
                if kind == Kind::Chat {
                    "messages"
                } else {
                    "prompt"
                },
                format!(
                    "this server's maximum context length is {max_len} tokens (--max-len), but \
                     {} were asked for ({prompt} in the prompt, {max_new} to generate)",
                    prompt.saturating_add(max_new),
                ),
            )
        });
    }
    Ok(max_new)
}

/// A queued request as the HTTP side follows it.
struct Generation {
    events: UnboundedReceiver<Event>,
    text: TextAssembler,
    checked: Checked,
    kind: Kind,
    id: String,
    created: u64,
    model: String,
    prompt_tokens: usize,
    /// Whether the first chunk went out.
    started: bool,
    /// Set once the text is complete.
    finish: Option<&'static str>,
}

/// What one wait on the scheduler gave.
enum Step {
    /// New text (possibly empty).
    Text(String),
    /// The last text and the finish reason.
    Done(String, &'static str),
    /// The scheduler dropped the request.
    Failed(String),
}

impl Generation {
    /// Waits for the next token and turns it into text.
    async fn next(&mut self) -> Step {
        let fail = |e: crate::Error| Step::Failed(e.to_string());
        match self.events.recv().await {
            Some(Event::Token(id)) => match self.text.push(id) {
                Ok(t) if self.text.stopped() => Step::Done(t, "stop"),
                Ok(t) => Step::Text(t),
                Err(e) => fail(e),
            },
            // The last tokens' text settles only now (an incomplete
            // character at the end), and a stop string may be found in it.
            Some(Event::Finished(reason)) => match self.text.finish() {
                Ok(t) if self.text.stopped() => Step::Done(t, "stop"),
                Ok(t) => Step::Done(t, reason.as_str()),
                Err(e) => fail(e),
            },
            Some(Event::Failed(why)) => Step::Failed(why),
            None => Step::Failed("the scheduler stopped".into()),
        }
    }

    fn usage(&self) -> Value {
        let c = self.text.tokens();
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": c,
            "total_tokens": self.prompt_tokens + c,
        })
    }

    /// A streamed chunk with this text (and finish reason).
    fn chunk(&self, text: &str, finish: Option<&str>, first: bool) -> Value {
        let choice = match self.kind {
            Kind::Chat => {
                let delta = match (first, finish.is_some() && text.is_empty()) {
                    (true, _) => json!({"role": "assistant", "content": text}),
                    (false, true) => json!({}),
                    (false, false) => json!({"content": text}),
                };
                json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish})
            }
            Kind::Text => {
                json!({"index": 0, "text": text, "logprobs": null, "finish_reason": finish})
            }
        };
        let mut v = self.envelope(true);
        v["choices"] = json!([choice]);
        if self.checked.include_usage {
            v["usage"] = Value::Null;
        }
        v
    }

    /// `id`, `object`, `created`, `model`.
    fn envelope(&self, chunk: bool) -> Value {
        let object = match (self.kind, chunk) {
            (Kind::Chat, true) => "chat.completion.chunk",
            (Kind::Chat, false) => "chat.completion",
            (Kind::Text, _) => "text_completion",
        };
        json!({"id": self.id, "object": object, "created": self.created, "model": self.model})
    }

    /// The SSE events of one step; `false` once the stream is over.
    async fn events(&mut self) -> (Vec<SseEvent>, bool) {
        let data = |v: Value| SseEvent::default().data(v.to_string());
        let mut out = Vec::new();
        if !self.started && self.kind == Kind::Chat {
            // The role goes out at once, so a client sees the request started.
            out.push(data(self.chunk("", None, true)));
        }
        self.started = true;
        match self.next().await {
            Step::Text(t) if t.is_empty() => (out, true),
            Step::Text(t) => {
                out.push(data(self.chunk(&t, None, false)));
                (out, true)
            }
            Step::Done(t, reason) => {
                self.finish = Some(reason);
                out.push(data(self.chunk(&t, Some(reason), false)));
                if self.checked.include_usage {
                    let mut v = self.envelope(true);
                    v["choices"] = json!([]);
                    v["usage"] = self.usage();
                    out.push(data(v));
                }
                out.push(SseEvent::default().data("[DONE]"));
                (out, false)
            }
            Step::Failed(why) => {
                out.push(data(ApiError::internal(why).body()));
                out.push(SseEvent::default().data("[DONE]"));
                (out, false)
            }
        }
    }
}

/// The response as server-sent events. Dropping the stream (the client went
/// away, or a stop string ended it) drops the receiver, which the scheduler
/// sees at its next pass boundary.
fn sse(gen: Generation) -> impl Stream<Item = Result<SseEvent, Infallible>> {
    stream::unfold(Some(gen), |gen| async move {
        let mut gen = gen?;
        let (events, more) = gen.events().await;
        let events = stream::iter(events.into_iter().map(Ok));
        Some((events, more.then_some(gen)))
    })
    .flatten()
}

/// The whole response at once.
async fn whole(mut gen: Generation) -> Response {
    let mut text = String::new();
    let reason = loop {
        match gen.next().await {
            Step::Text(t) => text += &t,
            Step::Done(t, reason) => {
                text += &t;
                break reason;
            }
            Step::Failed(why) => return ApiError::internal(why).into_response(),
        }
    };
    let choice = match gen.kind {
        Kind::Chat => json!({
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": null,
            "finish_reason": reason,
        }),
        Kind::Text => json!({"index": 0, "text": text, "logprobs": null, "finish_reason": reason}),
    };
    let mut v = gen.envelope(false);
    v["choices"] = json!([choice]);
    v["usage"] = gen.usage();
    Json(v).into_response()
}

/// `GET /v1/models`.
pub async fn models(State(state): State<Arc<AppState>>) -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [{
            "id": state.model_name,
            "object": "model",
            "created": state.started,
            "owned_by": "layer-streamer",
            "max_model_len": state.limits.max_len,
        }],
    }))
}

/// `GET /health`: 200 while requests are admitted, 503 once shutting down.
pub async fn health(State(state): State<Arc<AppState>>) -> Response {
    if state.scheduler.accepting() {
        Json(json!({"status": "ok"})).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "shutting down"})),
        )
            .into_response()
    }
}

/// `GET /metrics`.
pub async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    (
        [("content-type", "text/plain; version=0.0.4")],
        state.scheduler.metrics().render(),
    )
        .into_response()
}
