//! The scheduler on the host backend with a tiny synthetic model.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use rand::Rng;
use tokio::sync::mpsc::UnboundedReceiver;

use super::{spawn, Event, FinishReason, Job};
use crate::llm::{LlamaModel, ModelOptions};
use crate::serve::metrics::Metrics;
use crate::serve::sampling::SamplingSpec;
use crate::synth::{write_model, Arch, Shape, SynthSpec};
use crate::{Device, LayerStreamer, ModelIndex, Result};

/// Writes a tiny model into `dir` and returns how to load it for `batch`
/// sequences on the host backend.
fn host_engine(
    dir: &std::path::Path,
    batch: usize,
) -> impl FnOnce() -> Result<(LayerStreamer, LlamaModel)> + Send + 'static {
    let mut rng = rand::thread_rng();
    let spec = SynthSpec {
        arch: Arch::Qwen2,
        shape: Shape::preset("tiny").unwrap(),
        dtype: crate::DType::BF16,
        tie: rng.gen_bool(0.5),
        shard_size: 4_000_000_000,
        seed: rng.gen(),
        threads: 1,
    };
    write_model(dir, &spec).unwrap();
    let path = dir.to_path_buf();
    move || {
        let index = ModelIndex::open(&path)?;
        let s = LayerStreamer::builder(&index)
            .device(Device::Host)
            .file_dtype()
            .reader_threads(1)
            .build()?;
        let opts = ModelOptions {
            max_batch: batch,
            max_len: 64,
            max_tokens: 64,
            ..ModelOptions::default()
        };
        let model = LlamaModel::load(&s, opts)?;
        Ok((s, model))
    }
}

/// A job with a random prompt and sampling rule, and where its events go.
fn random_job(i: usize, vocab: usize, new_tokens: usize) -> (Job, UnboundedReceiver<Event>) {
    let mut rng = rand::thread_rng();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let job = Job {
        id: format!("job-{i}"),
        prompt: (0..rng.gen_range(1..30))
            .map(|_| rng.gen_range(0..vocab as u32))
            .collect(),
        max_new_tokens: new_tokens,
        sampling: SamplingSpec {
            temperature: rng.gen_range(0.0..1.5),
            top_p: rng.gen_range(0.5..1.0),
            top_k: rng.gen_range(0..50),
            seed: rng.gen(),
        },
        stop_ids: Vec::new(),
        events: tx,
        arrived: Instant::now(),
    };
    (job, rx)
}

/// The number of tokens a job received before finishing for its length.
fn count_tokens(mut rx: UnboundedReceiver<Event>, vocab: usize) -> usize {
    let mut tokens = 0;
    loop {
        match rx.blocking_recv() {
            Some(Event::Token(id)) => {
                assert!((id as usize) < vocab);
                tokens += 1;
            }
            Some(Event::Finished(reason)) => {
                assert_eq!(reason, FinishReason::Length);
                return tokens;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}

/// The scheduler's own time around each pass on the host backend, next to
/// the passes': prints both, and checks that every job got its tokens and
/// that the counters add up.
#[test]
fn the_scheduler_adds_little_time_around_a_pass() {
    let dir = tempfile::tempdir().unwrap();
    let batch = 8;
    let metrics = Arc::new(Metrics::default());
    let load = host_engine(dir.path(), batch);
    let (handle, limits, thread) = spawn(load, 2 * batch, metrics.clone()).unwrap();
    let new_tokens = 12;
    let receivers: Vec<_> = (0..2 * batch)
        .map(|i| {
            let (job, rx) = random_job(i, limits.vocab, new_tokens);
            handle.submit(job).unwrap();
            rx
        })
        .collect();
    for rx in receivers {
        assert_eq!(count_tokens(rx, limits.vocab), new_tokens);
    }
    handle.drain();
    thread.join().unwrap();
    let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
    let passes = get(&metrics.passes);
    let (pass_us, host_us) = (get(&metrics.pass_us), get(&metrics.pass_host_us));
    assert_eq!(
        get(&metrics.generated_tokens),
        (2 * batch * new_tokens) as u64
    );
    assert!(passes >= new_tokens as u64, "{passes} passes");
    eprintln!(
        "scheduler on the host backend, {passes} passes of up to {batch} sequences: \
         pass {:.3} ms, scheduler around it {:.1} us per pass",
        pass_us as f64 / passes as f64 / 1e3,
        host_us as f64 / passes as f64
    );
    assert!(
        host_us < pass_us,
        "{host_us} us around passes of {pass_us} us"
    );
}
