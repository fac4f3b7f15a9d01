//! Configuration search: which stage depths, batches, reader threads, read
//! size and cache budgets make a workload fastest on this machine.
//!
//! A [`Tuner`] takes a [`Grid`] of values per parameter, a workload name and
//! [`TuneOptions`], and measures each configuration in its own child process,
//! so that a CUDA out-of-memory error, a crash or a hang in one configuration
//! does not end the search. Per configuration: one warm-up run (discarded),
//! `runs - 1` measured runs averaged, a sleep between runs. As soon as one
//! measured run is slower than the best mean so far, the child is killed
//! ("slower"); a child that reports nothing for `timeout` is killed ("timed
//! out"). Configurations whose estimated memory cannot fit the machine are
//! not launched at all ("pruned"). New bests are printed to stderr as they
//! are found.
//!
//! Two strategies ([`Strategy`]): the whole grid, or coordinate descent from
//! the base configuration, which usually needs far fewer children.
//!
//! # The child
//!
//! The child is the same executable, re-entered: call [`worker_main`] first
//! thing in `main`. When the process was started as a tuner child (the
//! environment variable [`CHILD_ENV`], `LS_TUNER_CHILD`, is set) it runs the
//! named workload from the [`Workloads`] it is given and exits; otherwise it
//! returns at once. Workloads are registered by name, so the user's own code
//! is what the child measures (see [`worker_main`] for a full program). The
//! `layer-streamer tune` command does the same with [`Workloads::builtin`].
//!
//! The protocol: the request is JSON in `LS_TUNER_REQUEST`; the child writes
//! one JSON object per line to stdout, `{"run":i,"seconds":t}` after each run
//! (run 0 is the warm-up), then `{"done":{"runs":n,"mean_s":m}}`, or
//! `{"error":{"kind":k,"cuda_code":c,"message":m}}` when the configuration
//! fails, where `k` is an [`ErrorKind`] (`oom`, `limit`, `config`, `input`,
//! `model`, `cuda`, `io`, `layer_fn`, `pipeline`) and `c`, present for CUDA
//! errors, the driver's `CUresult`. The child's stderr is kept for the
//! reason of a crash.
//!
//! # The JSON result
//!
//! [`TuneReport::to_json`] (and `layer-streamer tune --json`) gives:
//!
//! ```text
//! {
//!   "strategy": "grid" | "descent",
//!   "workload": string,                 // e.g. "pass-delay:5"
//!   "device": string,                   // "host" or "cuda:N"
//!   "best": null | { <config>, "mean_s": f64 },
//!   "configs": [{
//!     "config": <config>,
//!     "status": "ok" | "slower" | "crashed" | "oom" | "limit"
//!             | "build_failed" | "timed_out" | "pruned",
//!     "mean_s": f64 | null,             // mean of the measured runs; only for "ok"
//!     "warmup_s": f64 | null,           // the discarded first run
//!     "runs": [f64],                    // measured runs (those finished, if killed)
//!     "reason": string | null           // why there is no mean; null for "ok"
//!   }],
//!   "children": usize,                  // child processes started
//!   "wall_s": f64                       // the whole search
//! }
//! <config> = "n_gpu": usize, "n_cpu_pinned": usize, "n_cpu": usize,
//!            "batch_gpu": usize, "batch_cpu_pinned": usize, "batch_cpu": usize,
//!            "reader_threads": usize, "read_chunk": u64 (bytes),
//!            "pinned_cache": "none" | "auto" | u64 (bytes),
//!            "gpu_cache": "none" | "auto" | u64 (bytes),
//!            "cpu_share": "off" | "auto" | f64 (a fraction)
//! ```
//! `layer-streamer tune --search both --json` prints
//! `{"grid": <report>, "descent": <report>}`.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::{Error, ModelIndex, Result, StreamerConfig};

mod child;
mod estimate;
mod grid;
mod process;
mod report;
mod search;
mod workload;

pub use child::{
    worker_main, ChildError, Done, ErrorKind, Line, Request, CHILD_ENV, ERROR_EXIT, REQUEST_ENV,
};
pub use estimate::{MachineLimits, MemoryEstimate};
pub use grid::{format_bytes, Candidate, Grid, GridBuilder, Param, Value};
pub use report::{Best, ConfigResult, Status, TuneReport};
pub use search::Strategy;
pub use workload::{RunFn, Workload, Workloads};

/// How each configuration is measured.
#[derive(Debug, Clone, PartialEq)]
pub struct TuneOptions {
    /// Runs per configuration, the first a discarded warm-up; at least 2.
    pub runs: usize,
    /// Sleep between runs (lets the disk and the GPU's clocks settle).
    pub sleep: Duration,
    /// The longest a child may go without reporting a run before it is
    /// killed; the first run's allowance includes building the streamer.
    pub timeout: Duration,
    /// Kill a child as soon as a measured run is slower than the best mean.
    pub early_kill: bool,
    /// Skip configurations whose estimated memory cannot fit.
    pub prune: bool,
    /// Print each configuration's outcome, and each new best, to stderr.
    pub progress: bool,
    /// Copy the children's stderr to ours as it comes.
    pub echo_child_stderr: bool,
}

impl Default for TuneOptions {
    fn default() -> Self {
        TuneOptions {
            runs: 3,
            sleep: Duration::from_secs(1),
            timeout: Duration::from_secs(300),
            early_kill: true,
            prune: true,
            progress: true,
            echo_child_stderr: false,
        }
    }
}

/// Searches for the fastest configuration of a workload; see the
/// [module docs](self).
#[derive(Debug, Clone)]
pub struct Tuner {
    model_dir: PathBuf,
    workload: String,
    grid: Grid,
    base: StreamerConfig,
    options: TuneOptions,
    exe: Option<PathBuf>,
    child_args: Vec<OsString>,
    limits: Option<MachineLimits>,
}

impl Tuner {
    /// A tuner of `workload` (a name registered in the child's [`Workloads`],
    /// optionally `name:ARG`) over the model in `model_dir`, trying `grid`.
    pub fn new(model_dir: impl AsRef<Path>, workload: impl Into<String>, grid: Grid) -> Tuner {
        Tuner {
            model_dir: model_dir.as_ref().to_path_buf(),
            workload: workload.into(),
            grid,
            base: StreamerConfig::default(),
            options: TuneOptions::default(),
            exe: None,
            child_args: Vec::new(),
            limits: None,
        }
    }

    /// The configuration every candidate starts from: its device, dtype,
    /// I/O mode and CPU affinity are used as they are, its searched
    /// parameters wherever the grid gives no values, and it is where
    /// coordinate descent starts. Default: [`StreamerConfig::default`].
    pub fn base_config(mut self, cfg: StreamerConfig) -> Self {
        self.base = cfg;
        self
    }

    /// How each configuration is measured.
    pub fn options(mut self, options: TuneOptions) -> Self {
        self.options = options;
        self
    }

    /// The program children run, and its arguments. Default: this
    /// executable ([`std::env::current_exe`]) with no arguments; it must
    /// call [`worker_main`] before anything else.
    pub fn child_command(
        mut self,
        exe: impl Into<PathBuf>,
        args: impl IntoIterator<Item = impl Into<OsString>>,
    ) -> Self {
        self.exe = Some(exe.into());
        self.child_args = args.into_iter().map(Into::into).collect();
        self
    }

    /// The machine's memory for pruning, instead of detecting it.
    pub fn limits(mut self, limits: MachineLimits) -> Self {
        self.limits = Some(limits);
        self
    }

    /// The grid.
    pub fn grid(&self) -> &Grid {
        &self.grid
    }

    /// Checks the workload against `workloads` (the registry the children
    /// use) before any child starts.
    pub fn check_workload(&self, workloads: &Workloads) -> Result<()> {
        workloads.check(&self.workload)
    }

    /// Runs one search and reports every configuration it tried.
    pub fn search(&self, strategy: Strategy) -> Result<TuneReport> {
        if self.options.runs < 2 {
            return Err(Error::Input(format!(
                "runs must be at least 2 (one warm-up, then measured runs), got {}",
                self.options.runs
            )));
        }
        if self.options.timeout.is_zero() {
            return Err(Error::Input("the timeout must be positive".into()));
        }
        let model = ModelIndex::open(&self.model_dir)?;
        let exe = match &self.exe {
            Some(e) => e.clone(),
            None => std::env::current_exe()
                .map_err(|e| Error::io("finding this executable", "/proc/self/exe", None, e))?,
        };
        let cmd = process::ChildCommand {
            exe,
            args: self.child_args.clone(),
        };
        let limits = self
            .limits
            .unwrap_or_else(|| MachineLimits::detect(self.base.device));
        search::Search::new(self, model, cmd, limits, strategy).run()
    }

    /// The model directory as children get it: absolute where it can be made so.
    fn child_model_dir(&self) -> PathBuf {
        std::path::absolute(&self.model_dir).unwrap_or_else(|_| self.model_dir.clone())
    }
}
