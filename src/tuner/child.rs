//! The child side of the tuner protocol: [`worker_main`], and the messages
//! the parent and child exchange.
//!
//! The parent starts the child with [`CHILD_ENV`] set and the [`Request`] as
//! JSON in [`REQUEST_ENV`]. The child writes one JSON object per line to
//! stdout: `{"run":i,"seconds":t}` after each run (run 0 is the warm-up),
//! then `{"done":{"runs":n,"mean_s":m}}`; or, when the configuration cannot be
//! built or a run fails, `{"error":{"kind":k,"message":m}}` and exits with
//! status 2. Lines that are not protocol messages (a workload's own output)
//! are ignored by the parent.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::grid::Candidate;
use super::workload::Workloads;
use crate::io::OpenMode;
use crate::{DType, Device, Error, ModelIndex, Result, StreamerConfig};

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
    /// `host` or `cuda:N`.
    pub device: String,
    /// Compute dtype, or `None` to keep the file dtype.
    pub dtype: Option<String>,
    /// `auto`, `direct` or `buffered`.
    pub io_mode: String,
    /// CPUs for the stage threads.
    pub cpu_affinity: Option<Vec<usize>>,
    /// The searched parameters.
    pub config: Candidate,
    /// Runs in all, the first a warm-up.
    pub runs: usize,
    /// Seconds to sleep between runs.
    pub sleep_s: f64,
}

impl Request {
    /// The request for `candidate` over `base`'s device, dtype and I/O mode.
    pub(crate) fn new(
        model: PathBuf,
        workload: &str,
        base: &StreamerConfig,
        candidate: Candidate,
        runs: usize,
        sleep: Duration,
    ) -> Request {
        Request {
            model,
            workload: workload.to_string(),
            device: base.device.to_string(),
            dtype: base.dtype.map(|d| d.to_string()),
            io_mode: match base.io_mode {
                OpenMode::Auto => "auto",
                OpenMode::Direct => "direct",
                OpenMode::Buffered => "buffered",
            }
            .into(),
            cpu_affinity: base.cpu_affinity.clone(),
            config: candidate,
            runs,
            sleep_s: sleep.as_secs_f64(),
        }
    }

    /// The streamer configuration the child builds.
    pub fn streamer_config(&self) -> Result<StreamerConfig> {
        let dtype = match &self.dtype {
            None => None,
            Some(d) => Some(
                DType::parse(d)
                    .ok_or_else(|| Error::config(format!("unknown compute dtype {d:?}")))?,
            ),
        };
        let io_mode = match self.io_mode.as_str() {
            "auto" => OpenMode::Auto,
            "direct" => OpenMode::Direct,
            "buffered" => OpenMode::Buffered,
            m => return Err(Error::config(format!("unknown I/O mode {m:?}"))),
        };
        let base = StreamerConfig {
            device: Device::parse(&self.device)?,
            dtype,
            io_mode,
            cpu_affinity: self.cpu_affinity.clone(),
            progress: false,
            ..StreamerConfig::default()
        };
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
    /// [`error_kind`] of the error.
    pub kind: String,
    /// The error's message.
    pub message: String,
}

/// A short, stable name for the kind of an error, as children report it:
/// `oom` (CUDA out of memory), `limit` (a memory limit checked before
/// allocating), `config` (an invalid configuration), `input` (a bad workload
/// or argument), `model`, `cuda`, `io`, `layer_fn`, `pipeline`.
pub fn error_kind(e: &Error) -> &'static str {
    match e {
        Error::Cuda { name, .. } if name.contains("OUT_OF_MEMORY") => "oom",
        Error::Cuda { .. } | Error::CudaUnavailable(_) => "cuda",
        Error::Limit { .. } => "limit",
        Error::Config(_) => "config",
        Error::Input(_) | Error::UnknownTensor(_) => "input",
        Error::Model { .. } => "model",
        Error::Io { .. } => "io",
        Error::LayerFn { .. } => "layer_fn",
        Error::Pipeline(_) => "pipeline",
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
                error: ChildError {
                    kind: error_kind(&e).into(),
                    message: e.to_string(),
                },
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
        assert!(matches!(err, Line::Error { error } if error.kind == "limit"));
        let done: Line = serde_json::from_str(r#"{"done":{"runs":2,"mean_s":0.25}}"#).unwrap();
        assert!(matches!(done, Line::Done { done } if done.runs == 2));
        assert!(serde_json::from_str::<Line>(r#"{"hello":1}"#).is_err());
    }

    #[test]
    fn requests_round_trip_to_the_same_config() {
        let base = StreamerConfig {
            device: Device::Host,
            dtype: None,
            io_mode: OpenMode::Buffered,
            ..Default::default()
        };
        let cand = Candidate {
            n_gpu: 5,
            ..Candidate::from_config(&base)
        };
        let req = Request::new("m".into(), "pass", &base, cand, 3, Duration::ZERO);
        let back: Request = serde_json::from_str(&serde_json::to_string(&req).unwrap()).unwrap();
        assert_eq!(back.streamer_config().unwrap(), cand.apply(&base));
    }

    #[test]
    fn error_kinds() {
        assert_eq!(error_kind(&Error::config("x")), "config");
        let oom = Error::Cuda {
            call: "cuMemAlloc",
            code: 2,
            name: "CUDA_ERROR_OUT_OF_MEMORY".into(),
            message: "out of memory".into(),
        };
        assert_eq!(error_kind(&oom), "oom");
        let lim = Error::Limit {
            what: "GPU memory".into(),
            asked: 2,
            available: 1,
            hint: String::new(),
        };
        assert_eq!(error_kind(&lim), "limit");
    }
}
