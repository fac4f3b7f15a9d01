//! The scheduler: one OS thread that owns the streamer and the model. At
//! every pass boundary it drops sequences whose client went away, admits
//! queued requests into free KV slots, then runs one pass that decodes a
//! token for every running sequence and feeds waiting prompts chunk by
//! chunk with the tokens left in the pass's budget.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc::UnboundedSender;

use crate::llm::{LlamaModel, TokenDraw};
use crate::serve::metrics::Metrics;
use crate::serve::sampling::{RequestSampler, SamplingSpec};
use crate::{LayerStreamer, Result};

/// A request for the scheduler: a tokenized prompt and how to continue it.
pub struct Job {
    /// The request id (for the log).
    pub id: String,
    /// Prompt tokens (at least one, fewer than the model's `max_len`).
    pub prompt: Vec<u32>,
    /// Most new tokens.
    pub max_new_tokens: usize,
    /// How each token is chosen.
    pub sampling: SamplingSpec,
    /// Tokens that end the sequence (not sent).
    pub stop_ids: Vec<u32>,
    /// Where the tokens go; a closed channel cancels the job.
    pub events: UnboundedSender<Event>,
    /// When the request arrived.
    pub arrived: Instant,
}

/// What the scheduler tells a request.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A new token.
    Token(u32),
    /// No more tokens.
    Finished(FinishReason),
    /// The job was dropped (failure or shutdown), with the reason.
    Failed(String),
}

/// Why a sequence ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// A stop token (or, on the HTTP side, a stop string).
    Stop,
    /// `max_tokens` or the model's maximum length.
    Length,
}

impl FinishReason {
    /// The OpenAI `finish_reason`.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// The model's sizes, as the HTTP side needs them for validation.
#[derive(Debug, Clone)]
pub struct ModelLimits {
    /// KV slots.
    pub max_batch: usize,
    /// Longest sequence.
    pub max_len: usize,
    /// Vocabulary size.
    pub vocab: usize,
    /// End-of-sequence tokens.
    pub eos_token_ids: Vec<u32>,
}

const RUNNING: u8 = 0;
const DRAINING: u8 = 1;
const ABORTING: u8 = 2;

/// What the HTTP side holds: the bounded queue and the shutdown state.
#[derive(Clone)]
pub struct SchedulerHandle {
    queue: SyncSender<Job>,
    capacity: usize,
    state: Arc<AtomicU8>,
    metrics: Arc<Metrics>,
}

/// Why a job was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubmitError {
    /// The queue holds `capacity` jobs already.
    Full(usize),
    /// The scheduler is shutting down or gone.
    ShuttingDown,
}

impl SchedulerHandle {
    /// Queues `job`, or says why not.
    pub fn submit(&self, job: Job) -> std::result::Result<(), SubmitError> {
        if self.state.load(Ordering::Acquire) != RUNNING {
            return Err(SubmitError::ShuttingDown);
        }
        // Counted before the send so that the scheduler's decrement on
        // receipt never runs first.
        self.metrics.queue_length.fetch_add(1, Ordering::Relaxed);
        let r = self.queue.try_send(job);
        if r.is_err() {
            self.metrics.queue_length.fetch_sub(1, Ordering::Relaxed);
        }
        match r {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) => Err(SubmitError::Full(self.capacity)),
            Err(TrySendError::Disconnected(_)) => Err(SubmitError::ShuttingDown),
        }
    }

    /// Stops admitting requests; running ones finish.
    pub fn drain(&self) {
        let _ = self
            .state
            .compare_exchange(RUNNING, DRAINING, Ordering::AcqRel, Ordering::Acquire);
    }

    /// Cancels every running and waiting request now.
    pub fn abort(&self) {
        self.state.store(ABORTING, Ordering::Release);
    }

    /// Whether requests are being admitted.
    pub fn accepting(&self) -> bool {
        self.state.load(Ordering::Acquire) == RUNNING
    }

    /// The counters.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }
}

/// A sequence in a KV slot.
struct Running {
    job: Job,
    /// Prompt tokens fed so far.
    fed: usize,
    /// Tokens sent.
    generated: usize,
    /// The last token sampled (the next pass's input once the prompt is in).
    last: u32,
    sampler: RequestSampler,
    first_token: Option<Instant>,
}

/// The scheduler's state: the engine, its slots and the queue.
pub struct Scheduler {
    streamer: LayerStreamer,
    model: LlamaModel,
    slots: Vec<Option<Running>>,
    /// Tokens one pass may hold.
    pass_tokens: usize,
    queue: Receiver<Job>,
    state: Arc<AtomicU8>,
    metrics: Arc<Metrics>,
}

impl Scheduler {
    /// A scheduler over `streamer` and `model` with a queue of `capacity`
    /// waiting jobs, and the handle to reach it.
    pub fn new(
        streamer: LayerStreamer,
        model: LlamaModel,
        capacity: usize,
        metrics: Arc<Metrics>,
    ) -> (Scheduler, SchedulerHandle) {
        let (tx, rx) = std::sync::mpsc::sync_channel(capacity);
        let state = Arc::new(AtomicU8::new(RUNNING));
        let opts = *model.options();
        let handle = SchedulerHandle {
            queue: tx,
            capacity,
            state: state.clone(),
            metrics: metrics.clone(),
        };
        let sched = Scheduler {
            streamer,
            slots: (0..opts.max_batch).map(|_| None).collect(),
            pass_tokens: opts.max_tokens,
            model,
            queue: rx,
            state,
            metrics,
        };
        (sched, handle)
    }

    /// The model's sizes.
    pub fn limits(&self) -> ModelLimits {
        let cfg = self.model.config();
        ModelLimits {
            max_batch: self.slots.len(),
            max_len: self.model.options().max_len,
            vocab: cfg.vocab,
            eos_token_ids: cfg.eos_token_ids.clone(),
        }
    }

    /// Runs until a drain has finished every running job, or an abort.
    pub fn run(mut self) {
        loop {
            let state = self.state.load(Ordering::Acquire);
            if state == ABORTING {
                self.cancel_all("the server is shutting down");
                return;
            }
            self.drop_cancelled();
            if state == RUNNING {
                self.admit();
            } else {
                self.refuse_queued();
                if self.running() == 0 {
                    return;
                }
            }
            let running = self.running();
            self.metrics
                .running
                .store(running as u64, Ordering::Relaxed);
            if running > 0 {
                self.step();
            }
        }
    }

    fn running(&self) -> usize {
        self.slots.iter().flatten().count()
    }

    /// Frees the slots of jobs whose receiver is gone.
    fn drop_cancelled(&mut self) {
        for slot in &mut self.slots {
            if slot.as_ref().is_some_and(|r| r.job.events.is_closed()) {
                let r = slot.take().expect("checked above");
                self.metrics.cancelled.fetch_add(1, Ordering::Relaxed);
                log(&r, "dropped (client gone or stop string seen)");
            }
        }
    }

    /// Moves queued jobs into free slots; waits a little for one when idle.
    fn admit(&mut self) {
        while let Some(free) = self.slots.iter().position(Option::is_none) {
            let job = if self.running() == 0 {
                match self.queue.recv_timeout(Duration::from_millis(50)) {
                    Ok(j) => j,
                    Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => return,
                }
            } else {
                match self.queue.try_recv() {
                    Ok(j) => j,
                    Err(_) => return,
                }
            };
            self.metrics.queue_length.fetch_sub(1, Ordering::Relaxed);
            if job.events.is_closed() {
                self.metrics.cancelled.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            if let Err(e) = self.model.reset_sequence(free) {
                let _ = job.events.send(Event::Failed(e.to_string()));
                continue;
            }
            self.metrics
                .prompt_tokens
                .fetch_add(job.prompt.len() as u64, Ordering::Relaxed);
            self.slots[free] = Some(Running {
                sampler: RequestSampler::new(job.sampling),
                job,
                fed: 0,
                generated: 0,
                last: 0,
                first_token: None,
            });
        }
    }

    fn refuse_queued(&mut self) {
        while let Ok(job) = self.queue.try_recv() {
            self.metrics.queue_length.fetch_sub(1, Ordering::Relaxed);
            self.metrics.cancelled.fetch_add(1, Ordering::Relaxed);
            let _ = job
                .events
                .send(Event::Failed("the server is shutting down".into()));
        }
    }

    fn cancel_all(&mut self, why: &str) {
        self.refuse_queued();
        for r in self.slots.iter_mut().filter_map(Option::take) {
            self.metrics.cancelled.fetch_add(1, Ordering::Relaxed);
            let _ = r.job.events.send(Event::Failed(why.to_string()));
            log(&r, why);
        }
    }

    /// The new tokens of each slot for one pass: one decode token for every
    /// sequence whose prompt is in, then prompt chunks, oldest request
    /// first, while the pass has room.
    fn plan_pass(&self) -> Vec<Vec<u32>> {
        let mut inputs = vec![Vec::new(); self.slots.len()];
        let mut budget = self.pass_tokens;
        for (i, r) in self.slots.iter().enumerate() {
            if let Some(r) = r.as_ref().filter(|r| r.fed == r.job.prompt.len()) {
                inputs[i].push(r.last);
                budget = budget.saturating_sub(1);
            }
        }
        let mut prefilling: Vec<(usize, &Running)> = self
            .slots
            .iter()
            .enumerate()
            .filter_map(|(i, r)| r.as_ref().map(|r| (i, r)))
            .filter(|(_, r)| r.fed < r.job.prompt.len())
            .collect();
        prefilling.sort_by_key(|(_, r)| r.job.arrived);
        for (i, r) in prefilling {
            let take = (r.job.prompt.len() - r.fed).min(budget);
            inputs[i].extend_from_slice(&r.job.prompt[r.fed..r.fed + take]);
            budget -= take;
        }
        inputs
    }

    /// The draw of each slot whose input completes its prompt in this pass
    /// (every decoding sequence, and a prompt's last chunk): only those take
    /// a uniform from their request's generator, so a request's draws do not
    /// depend on how its prompt was split across passes.
    fn plan_draws(&mut self, inputs: &[Vec<u32>]) -> Vec<Option<TokenDraw>> {
        self.slots
            .iter_mut()
            .zip(inputs)
            .map(|(slot, input)| {
                let r = slot.as_mut()?;
                let completes = !input.is_empty() && r.fed + input.len() >= r.job.prompt.len();
                completes.then(|| r.sampler.next_draw())
            })
            .collect()
    }

    /// One pass, then a token for every sequence whose input is complete,
    /// chosen where the logits are (on the device with CUDA).
    fn step(&mut self) {
        let start = Instant::now();
        let inputs = self.plan_pass();
        let draws = self.plan_draws(&inputs);
        let refs: Vec<&[u32]> = inputs.iter().map(Vec::as_slice).collect();
        let t0 = Instant::now();
        let result = self.model.forward_sample(&mut self.streamer, &refs, &draws);
        let seqs = inputs.iter().filter(|i| !i.is_empty()).count();
        let tokens = inputs.iter().map(Vec::len).sum();
        let pass = t0.elapsed();
        self.metrics.record_pass(pass, seqs, tokens);
        let ids = match result {
            Ok(ids) => ids,
            Err(e) => return self.fail_all(&e),
        };
        for (i, input) in inputs.iter().enumerate() {
            let Some(r) = self.slots[i].as_mut() else {
                continue;
            };
            if r.fed < r.job.prompt.len() {
                r.fed += input.len();
            }
            if let Some(id) = ids[i] {
                self.take_token(i, id);
            }
        }
        self.metrics
            .record_pass_host(start.elapsed().saturating_sub(pass));
    }

    /// Hands sequence `i` its new token `id`, and retires it when done.
    fn take_token(&mut self, i: usize, id: u32) {
        let max_len = self.model.options().max_len;
        let Some(r) = self.slots[i].as_mut() else {
            return;
        };
        if r.first_token.is_none() {
            let now = Instant::now();
            r.first_token = Some(now);
            self.metrics.record_first_token(now - r.job.arrived);
        }
        let finish = if r.job.stop_ids.contains(&id) {
            Some(FinishReason::Stop)
        } else {
            if r.job.events.send(Event::Token(id)).is_err() {
                return; // dropped at the next pass boundary
            }
            r.generated += 1;
            r.last = id;
            self.metrics
                .generated_tokens
                .fetch_add(1, Ordering::Relaxed);
            let full = self.model.lengths()[i] >= max_len;
            (r.generated >= r.job.max_new_tokens || full).then_some(FinishReason::Length)
        };
        if let Some(reason) = finish {
            let r = self.slots[i].take().expect("checked above");
            let _ = r.job.events.send(Event::Finished(reason));
            self.metrics.finished.fetch_add(1, Ordering::Relaxed);
            log(&r, reason.as_str());
        }
    }

    fn fail_all(&mut self, e: &crate::Error) {
        let why = format!("the forward pass failed: {e}");
        eprintln!("serve: {why}");
        for r in self.slots.iter_mut().filter_map(Option::take) {
            self.metrics.failed.fetch_add(1, Ordering::Relaxed);
            let _ = r.job.events.send(Event::Failed(why.clone()));
            log(&r, "failed");
        }
    }
}

/// One line per request: id, tokens, time to first token, decode speed.
fn log(r: &Running, outcome: &str) {
    let now = Instant::now();
    let ttft = r.first_token.map_or("-".to_string(), |t| {
        format!("{:.3} s", (t - r.job.arrived).as_secs_f64())
    });
    let rate = r.first_token.map_or(0.0, |t| {
        r.generated.saturating_sub(1) as f64 / (now - t).as_secs_f64().max(1e-9)
    });
    eprintln!(
        "serve: {} {outcome}: prompt {} tokens, completion {} tokens, TTFT {ttft}, {rate:.1} tokens/s, {:.3} s in all",
        r.job.id,
        r.job.prompt.len(),
        r.generated,
        (now - r.job.arrived).as_secs_f64()
    );
}

/// Builds the engine with `load` on a new thread (so that a CUDA context
/// is made and used on that thread alone) and runs the scheduler there.
/// Returns the handle and the model's sizes once loaded, or the load error.
pub fn spawn(
    load: impl FnOnce() -> Result<(LayerStreamer, LlamaModel)> + Send + 'static,
    capacity: usize,
    metrics: Arc<Metrics>,
) -> Result<(SchedulerHandle, ModelLimits, std::thread::JoinHandle<()>)> {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let thread = std::thread::Builder::new()
        .name("ls-scheduler".into())
        .spawn(move || match load() {
            Ok((streamer, model)) => {
                let (sched, handle) = Scheduler::new(streamer, model, capacity, metrics);
                let _ = ready_tx.send(Ok((handle, sched.limits())));
                sched.run();
            }
            Err(e) => {
                let _ = ready_tx.send(Err(e));
            }
        })
        .map_err(|e| crate::Error::Pipeline(format!("cannot start the scheduler thread: {e}")))?;
    match ready_rx.recv() {
        Ok(Ok((handle, limits))) => Ok((handle, limits, thread)),
        Ok(Err(e)) => {
            let _ = thread.join();
            Err(e)
        }
        Err(_) => {
            let _ = thread.join();
            Err(crate::Error::Pipeline(
                "the scheduler thread stopped while loading the model".into(),
            ))
        }
    }
}

#[cfg(test)]
#[path = "scheduler_tests.rs"]
mod tests;
