//! Counters the scheduler and the handlers update, rendered as a Prometheus
//! text page.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Server counters. Each is independent: `Relaxed` is enough, as a scrape
/// needs no ordering between them.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Requests accepted into the queue.
    pub requests: AtomicU64,
    /// Requests refused because the queue was full.
    pub rejected_queue_full: AtomicU64,
    /// Requests refused as invalid (4xx other than 429).
    pub rejected_invalid: AtomicU64,
    /// Requests that finished (stop or length).
    pub finished: AtomicU64,
    /// Requests dropped before their end: the client went away, a stop
    /// string ended the text, or a shutdown cancelled them.
    pub cancelled: AtomicU64,
    /// Requests that failed in the forward pass.
    pub failed: AtomicU64,
    /// Prompt tokens of finished and running requests.
    pub prompt_tokens: AtomicU64,
    /// Tokens generated.
    pub generated_tokens: AtomicU64,
    /// Requests waiting for a sequence slot.
    pub queue_length: AtomicU64,
    /// Sequences holding a KV slot.
    pub running: AtomicU64,
    /// Forward passes run.
    pub passes: AtomicU64,
    /// Their total time, in microseconds.
    pub pass_us: AtomicU64,
    /// The scheduler's own time around the passes (planning each pass,
    /// drawing, handing out tokens), in microseconds.
    pub pass_host_us: AtomicU64,
    /// Sequences over all passes (mean batch size = this / passes).
    pub pass_sequences: AtomicU64,
    /// Tokens over all passes.
    pub pass_tokens: AtomicU64,
    /// Requests that got a first token.
    pub first_tokens: AtomicU64,
    /// Their total time to first token, in microseconds.
    pub ttft_us: AtomicU64,
}

fn add(c: &AtomicU64, v: u64) {
    c.fetch_add(v, Ordering::Relaxed);
}

impl Metrics {
    /// Records one pass.
    pub fn record_pass(&self, time: Duration, sequences: usize, tokens: usize) {
        add(&self.passes, 1);
        add(&self.pass_us, time.as_micros() as u64);
        add(&self.pass_sequences, sequences as u64);
        add(&self.pass_tokens, tokens as u64);
    }

    /// Records the scheduler's own time around one pass.
    pub fn record_pass_host(&self, time: Duration) {
        add(&self.pass_host_us, time.as_micros() as u64);
    }

    /// Records a request's first token.
    pub fn record_first_token(&self, ttft: Duration) {
        add(&self.first_tokens, 1);
        add(&self.ttft_us, ttft.as_micros() as u64);
    }

    /// The Prometheus text exposition of every counter.
    pub fn render(&self) -> String {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, samples: &[(&str, f64)]| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (labels, v) in samples {
                let _ = writeln!(out, "{name}{labels} {v}");
            }
        };
        metric(
            "ls_requests_total",
            "counter",
            "Requests by outcome.",
            &[
                (r#"{outcome="accepted"}"#, get(&self.requests) as f64),
                (r#"{outcome="finished"}"#, get(&self.finished) as f64),
                (r#"{outcome="cancelled"}"#, get(&self.cancelled) as f64),
                (r#"{outcome="failed"}"#, get(&self.failed) as f64),
                (
                    r#"{outcome="queue_full"}"#,
                    get(&self.rejected_queue_full) as f64,
                ),
                (r#"{outcome="invalid"}"#, get(&self.rejected_invalid) as f64),
            ],
        );
        metric(
            "ls_prompt_tokens_total",
            "counter",
            "Prompt tokens of admitted requests.",
            &[("", get(&self.prompt_tokens) as f64)],
        );
        metric(
            "ls_generation_tokens_total",
            "counter",
            "Tokens generated.",
            &[("", get(&self.generated_tokens) as f64)],
        );
        self.render_passes(&mut metric);
        out
    }

    /// The queue, batch and timing part of [`Metrics::render`].
    fn render_passes(&self, metric: &mut impl FnMut(&str, &str, &str, &[(&str, f64)])) {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let secs = |c: &AtomicU64| get(c) as f64 / 1e6;
        metric(
            "ls_queue_length",
            "gauge",
            "Requests waiting for a sequence slot.",
            &[("", get(&self.queue_length) as f64)],
        );
        metric(
            "ls_running_sequences",
            "gauge",
            "Sequences holding a KV slot.",
            &[("", get(&self.running) as f64)],
        );
        metric(
            "ls_pass_seconds",
            "summary",
            "Time of the forward passes.",
            &[
                ("_sum", secs(&self.pass_us)),
                ("_count", get(&self.passes) as f64),
            ],
        );
        metric(
            "ls_pass_host_seconds_total",
            "counter",
            "The scheduler's time around the passes: planning, drawing, handing out tokens.",
            &[("", secs(&self.pass_host_us))],
        );
        metric(
            "ls_pass_sequences_total",
            "counter",
            "Sequences over all passes (divided by ls_pass_seconds_count: the mean batch size).",
            &[("", get(&self.pass_sequences) as f64)],
        );
        metric(
            "ls_pass_tokens_total",
            "counter",
            "Tokens over all passes, prefill and decode.",
            &[("", get(&self.pass_tokens) as f64)],
        );
        metric(
            "ls_time_to_first_token_seconds",
            "summary",
            "Time from a request's arrival to its first token.",
            &[
                ("_sum", secs(&self.ttft_us)),
                ("_count", get(&self.first_tokens) as f64),
            ],
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_shows_every_counter_with_its_value() {
        let m = Metrics::default();
        let n = rand::random::<u32>() as u64 % 1000 + 1;
        m.requests.store(n, Ordering::Relaxed);
        m.record_pass(Duration::from_millis(250), 3, 40);
        m.record_pass(Duration::from_millis(750), 5, 5);
        m.record_pass_host(Duration::from_micros(1500));
        let text = m.render();
        assert!(text.contains(&format!("ls_requests_total{{outcome=\"accepted\"}} {n}\n")));
        assert!(text.contains("ls_pass_seconds_sum 1\n"), "{text}");
        assert!(text.contains("ls_pass_seconds_count 2\n"));
        assert!(text.contains("ls_pass_sequences_total 8\n"));
        assert!(text.contains("ls_pass_tokens_total 45\n"));
        assert!(
            text.contains("ls_pass_host_seconds_total 0.0015\n"),
            "{text}"
        );
        m.running.store(n + 1, Ordering::Relaxed);
        let text = m.render();
        assert!(text.contains(&format!("ls_running_sequences {}\n", n + 1)));
        assert!(text.contains("# TYPE ls_queue_length gauge\n"));
    }
}
