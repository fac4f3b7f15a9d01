//! The child side of the tuner protocol: [`worker_main`], and the messages
//! the parent and child exchange.
//!
//! The parent starts the child with [`CHILD_ENV`] set and the [`Request`] as
//! JSON in [`REQUEST_ENV`]. The child writes one JSON object per line to
//! stdout: `{"run":i,"seconds":t}` after each run (run 0 is the warm-up),
//! then `{"done":{"runs":n,"mean_s":m}}`; or, when the configuration cannot be
//! built or a run fails, `{"error":{"kind":k,"cuda_code":c,"message":m}}`
//! ([`ChildError`]) and exits with status 2. Lines that are not protocol messages (a workload's own output)
//! are ignored by the parent.

use std::collections::BTreeMap;
use std::fmt;
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::grid::Candidate;
use super::workload::Workloads;
use crate::{Error, ModelIndex, Result, StreamerConfig};

/// Set (to `1`) in the environment of a tuner child.
pub const CHILD_ENV: &str = "LS_TUNER_CHILD";
/// Holds the child's [`Request`] as JSON.
pub const REQUEST_ENV: &str = "LS_TUNER_REQUEST";

/// Exit status of a child that reported an error line.
pub const ERROR_EXIT: i32 = 2;

/// What one child is asked to measure.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Request {
    /// The model directory.
    pub model: PathBuf,
    /// The workload spec, `name` or `name:ARG`.
    pub workload: String,
    /// The base configuration's options that the search does not vary
    /// (device, dtype, I/O mode, CPU affinity), by field name, as the text
    /// their parsers read ([`StreamerConfig::OPTIONS`]).
    pub options: BTreeMap<String, String>,
    /// The searched parameters.
    pub config: Candidate,
    /// Runs in all, the first a warm-up.
    pub runs: usize,
    /// Seconds to sleep between runs.
    pub sleep_s: f64,
}

impl Request {
    /// The request for `candidate` over `base`'s other options.
    pub(crate) fn new(
        model: PathBuf,
        workload: &str,
        base: &StreamerConfig,
        candidate: Candidate,
        runs: usize,
        sleep: Duration,
    ) -> Request {
        let options = StreamerConfig::OPTIONS
            .iter()
            // A child draws no progress bar: its stderr is kept for crash reasons.
            .filter(|o| !o.searched && !o.switch)
            .map(|o| (o.name.to_string(), (o.get)(base)))
            .collect();
        Request {
            model,
            workload: workload.to_string(),
            options,
            config: candidate,
            runs,
            sleep_s: sleep.as_secs_f64(),
        }
    }

    /// The streamer configuration the child builds: the library's defaults,
    /// the request's options, then the candidate.
    pub fn streamer_config(&self) -> Result<StreamerConfig> {
        let mut base = StreamerConfig::default();
        for (name, text) in &self.options {
            let spec = StreamerConfig::OPTIONS
                .iter()
                .find(|o| o.name == name)
                .ok_or_else(|| Error::Input(format!("{REQUEST_ENV}: unknown option {name:?}")))?;
            (spec.set)(&mut base, text)?;
        }
        Ok(self.config.apply(&base))
    }
}

/// A line of the child's output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Line {
    /// A run finished: `{"run":i,"seconds":t}`; run 0 is the warm-up.
    Run {
        /// 0-based run index.
        run: usize,
        /// Its time.
        seconds: f64,
    },
    /// Every run finished.
    Done {
        /// Summary.
        done: Done,
    },
    /// The configuration failed.
    Error {
        /// What failed.
        error: ChildError,
    },
}

/// The final line's contents.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Done {
    /// Measured runs (warm-up excluded).
    pub runs: usize,
    /// Their mean time in seconds.
    pub mean_s: f64,
}

/// An error a child reports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChildError {
    /// What kind of error it is.
    pub kind: ErrorKind,
    /// The driver's `CUresult` value, for a CUDA error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cuda_code: Option<u32>,
    /// The error's message.
    pub message: String,
}

impl ChildError {
    /// What a child reports for `e`.
    pub fn of(e: &Error) -> ChildError {
        ChildError {
            kind: ErrorKind::of(e),
            cuda_code: match e {
                Error::Cuda { code, .. } => Some(*code),
                _ => None,
            },
            message: e.to_string(),
        }
    }
}

/// The kind of an error, as children report it: the [`Error`] variant, with
/// CUDA's out-of-memory told apart by the driver's code. In JSON, its
/// snake-case name: `oom`, `cuda`, `limit`, `config`, `input`, `model`,
/// `io`, `layer_fn`, `pipeline`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// CUDA ran out of memory (`CUDA_ERROR_OUT_OF_MEMORY`).
    Oom,
    /// Any other CUDA error, or no usable driver.
    Cuda,
    /// A memory limit checked before allocating ([`Error::Limit`]).
    Limit,
    /// An invalid configuration ([`Error::Config`]).
    Config,
    /// A bad workload or argument ([`Error::Input`], [`Error::UnknownTensor`]).
    Input,
    /// An invalid model ([`Error::Model`]).
    Model,
    /// A failed read ([`Error::Io`]).
    Io,
    /// The workload's layer function failed ([`Error::LayerFn`]).
    LayerFn,
    /// A pipeline stage stopped ([`Error::Pipeline`]).
    Pipeline,
}

impl ErrorKind {
    /// The kind of `e`.
    pub fn of(e: &Error) -> ErrorKind {
        const OUT_OF_MEMORY: u32 = cudarc::driver::sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY as u32;
        match e {
            Error::Cuda { code, .. } if *code == OUT_OF_MEMORY => ErrorKind::Oom,
            Error::Cuda { .. } | Error::CudaUnavailable(_) => ErrorKind::Cuda,
            Error::Limit { .. } => ErrorKind::Limit,
            Error::Config(_) => ErrorKind::Config,
            Error::Input(_) | Error::UnknownTensor(_) => ErrorKind::Input,
            Error::Model { .. } => ErrorKind::Model,
            Error::Io { .. } => ErrorKind::Io,
            Error::LayerFn { .. } => ErrorKind::LayerFn,
            Error::Pipeline(_) => ErrorKind::Pipeline,
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The JSON name, from the one place that spells it.
        match serde_json::to_value(self) {
            Ok(serde_json::Value::String(s)) => f.write_str(&s),
            _ => write!(f, "{self:?}"),
        }
    }
}

/// The entry point of a tuner child. Call it first thing in `main` of every
/// program that runs a [`Tuner`](super::Tuner) (the tuner re-enters the same
/// executable for each configuration): when the process was started as a
/// tuner child ([`CHILD_ENV`] set) it runs the requested workload from
/// `workloads`, prints the protocol lines and exits; otherwise it returns at
/// once and `main` goes on.
///
/// ```no_run
/// use std::time::Instant;
/// use layer_streamer::tuner::{self, Grid, Strategy, TuneOptions, Tuner, Workloads};
/// use layer_streamer::{Device, LayerStreamer, StreamerConfig};
///
/// fn workloads() -> Workloads {
///     let mut w = Workloads::builtin();
///     w.register("my-forward", |cfg, model, _arg| {
///         let mut s = LayerStreamer::builder(model).config(cfg.clone()).build()?;
///         Ok(Box::new(move || {
///             let t = Instant::now();
///             s.run_pass((), |(), _weights, _layer, _stream| Ok(()))?;
///             Ok(t.elapsed())
///         }))
///     });
///     w
/// }
///
/// fn main() -> layer_streamer::Result<()> {
///     tuner::worker_main(&workloads()); // returns unless this is a tuner child
///     let grid = Grid::builder().n_gpu([1, 2, 4]).n_cpu_pinned([2, 4]).build();
///     let base = StreamerConfig { device: Device::Cuda(0), ..Default::default() };
///     let report = Tuner::new("models/qwen2-7b", "my-forward", grid)
///         .base_config(base)
///         .options(TuneOptions { runs: 3, ..Default::default() })
///         .search(Strategy::Grid)?;
///     println!("{report}");
///     Ok(())
/// }
/// ```
pub fn worker_main(workloads: &Workloads) {
    if std::env::var_os(CHILD_ENV).is_none() {
        return;
    }
    let code = match run_worker(workloads) {
        Ok(()) => 0,
        Err(e) => {
            emit(&Line::Error {
                error: ChildError::of(&e),
            });
            ERROR_EXIT
        }
    };
    std::process::exit(code);
}

fn run_worker(workloads: &Workloads) -> Result<()> {
    let json = std::env::var(REQUEST_ENV)
        .map_err(|_| Error::Input(format!("{CHILD_ENV} is set but {REQUEST_ENV} is not")))?;
    let req: Request = serde_json::from_str(&json)
        .map_err(|e| Error::Input(format!("invalid {REQUEST_ENV}: {e}")))?;
    let cfg = req.streamer_config()?;
    cfg.validate()?;
    let (workload, arg) = workloads.get(&req.workload)?;
    let model = ModelIndex::open(&req.model)?;
    let mut run = workload.prepare(&cfg, &model, arg)?;
    let mut measured = Vec::with_capacity(req.runs);
    for i in 0..req.runs {
        if i > 0 && req.sleep_s > 0.0 {
            std::thread::sleep(Duration::from_secs_f64(req.sleep_s));
        }
        let seconds = run()?.as_secs_f64();
        emit(&Line::Run { run: i, seconds });
        if i > 0 {
            measured.push(seconds);
        }
    }
    let mean_s = measured.iter().sum::<f64>() / measured.len().max(1) as f64;
    emit(&Line::Done {
        done: Done {
            runs: measured.len(),
            mean_s,
        },
    });
    Ok(())
}

fn emit(line: &Line) {
    let mut out = std::io::stdout().lock();
    if let Ok(s) = serde_json::to_string(line) {
        // The parent may have gone (killed us early); nothing to report to then.
        let _ = writeln!(out, "{s}");
        let _ = out.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_have_the_documented_shape() {
        let run = serde_json::to_string(&Line::Run {
            run: 1,
            seconds: 0.5,
        })
        .unwrap();
        assert_eq!(run, r#"{"run":1,"seconds":0.5}"#);
        let err: Line =
            serde_json::from_str(r#"{"error":{"kind":"limit","message":"too big"}}"#).unwrap();
        assert!(matches!(err, Line::Error { error } if error.kind == ErrorKind::Limit));
        let done: Line = serde_json::from_str(r#"{"done":{"runs":2,"mean_s":0.25}}"#).unwrap();
        assert!(matches!(done, Line::Done { done } if done.runs == 2));
        assert!(serde_json::from_str::<Line>(r#"{"hello":1}"#).is_err());
    }

    #[test]
    fn requests_round_trip_to_the_same_config() {
        let base = StreamerConfig {
            device: crate::Device::Host,
            dtype: None,
            io_mode: crate::io::OpenMode::Buffered,
            cpu_affinity: Some(vec![3, 1]),
            progress: true,
            ..Default::default()
        };
        let cand = Candidate {
            n_gpu: 5,
            ..Candidate::from_config(&base)
        };
        let req = Request::new("m".into(), "pass", &base, cand, 3, Duration::ZERO);
        let back: Request = serde_json::from_str(&serde_json::to_string(&req).unwrap()).unwrap();
        let child = back.streamer_config().unwrap();
        assert!(!child.progress, "children draw no progress bar");
        assert_eq!(
            child,
            StreamerConfig {
                progress: false,
                ..cand.apply(&base)
            }
        );
    }

    #[test]
    fn errors_cross_as_typed_kinds_with_the_driver_code() {
        let mut rng = rand::thread_rng();
        // Any CUresult other than out-of-memory is a plain CUDA error.
        let other: u32 = loop {
            let c = rand::Rng::gen_range(&mut rng, 1..1000u32);
            if c != 2 {
                break c;
            }
        };
        let cuda = |code: u32, name: &str| Error::Cuda {
            call: "cuMemAlloc",
            code,
            // The name does not decide the kind: the code does.
            name: name.into(),
            message: "m".into(),
        };
        let cases = [
            (cuda(2, "SOMETHING_ELSE"), ErrorKind::Oom, Some(2)),
            (
                cuda(other, "CUDA_ERROR_OUT_OF_MEMORY"),
                ErrorKind::Cuda,
                Some(other),
            ),
            (Error::config("x"), ErrorKind::Config, None),
            (Error::UnknownTensor("t".into()), ErrorKind::Input, None),
            (
                Error::Limit {
                    what: "GPU memory".into(),
                    asked: 2,
                    available: 1,
                    hint: String::new(),
                },
                ErrorKind::Limit,
                None,
            ),
        ];
        for (e, kind, code) in cases {
            let line = Line::Error {
                error: ChildError::of(&e),
            };
            let back: Line = serde_json::from_str(&serde_json::to_string(&line).unwrap()).unwrap();
            let Line::Error { error } = back else {
                panic!("{line:?} came back as another line")
            };
            assert_eq!((error.kind, error.cuda_code), (kind, code), "{e}");
            assert_eq!(error.message, e.to_string());
        }
        let oom = serde_json::to_value(ChildError::of(&cuda(2, "x"))).unwrap();
        assert_eq!(oom["kind"], "oom");
        assert_eq!(oom["cuda_code"], 2);
        assert_eq!(ErrorKind::LayerFn.to_string(), "layer_fn");
    }
}
