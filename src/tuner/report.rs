//! The result of a search: every configuration's outcome, the best one, and
//! their table and JSON forms (the schema is in the [module docs](super)).

use std::fmt;

use serde::{Deserialize, Serialize};

use super::child::ErrorKind;
use super::grid::{Candidate, Param};
use super::process::{ChildReport, Ending};

/// How a configuration fared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Every run finished; `mean_s` is their mean.
    Ok,
    /// A measured run was slower than the best mean so far: killed early.
    Slower,
    /// The child died (signal or exit status) or failed while running.
    Crashed,
    /// CUDA ran out of memory.
    Oom,
    /// A memory limit checked before allocating was exceeded.
    Limit,
    /// The configuration was rejected while building (invalid, bad workload).
    BuildFailed,
    /// The child stopped reporting for longer than the timeout and was killed.
    TimedOut,
    /// Not launched: its estimated memory does not fit the machine.
    Pruned,
}

impl Status {
    /// The name used in JSON and the table.
    pub fn name(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Slower => "slower",
            Status::Crashed => "crashed",
            Status::Oom => "oom",
            Status::Limit => "limit",
            Status::BuildFailed => "build_failed",
            Status::TimedOut => "timed_out",
            Status::Pruned => "pruned",
        }
    }
}

/// One configuration's outcome.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConfigResult {
    /// The configuration.
    pub config: Candidate,
    /// How it fared.
    pub status: Status,
    /// Mean of the measured runs; only for [`Status::Ok`].
    pub mean_s: Option<f64>,
    /// The warm-up run's time, where it finished.
    pub warmup_s: Option<f64>,
    /// Measured runs' times (for a configuration killed early, those it finished).
    pub runs: Vec<f64>,
    /// Why it has no mean; `None` for [`Status::Ok`].
    pub reason: Option<String>,
}

impl ConfigResult {
    /// A configuration that was not launched.
    pub(crate) fn pruned(config: Candidate, why: String) -> ConfigResult {
        ConfigResult {
            config,
            status: Status::Pruned,
            mean_s: None,
            warmup_s: None,
            runs: Vec::new(),
            reason: Some(format!("pruned: {why}")),
        }
    }

    /// The outcome of a child.
    pub(crate) fn from_child(config: Candidate, r: ChildReport) -> ConfigResult {
        let (status, reason) = match r.ending {
            Ending::Finished if !r.runs.is_empty() => (Status::Ok, None),
            Ending::Finished => (
                Status::Crashed,
                Some("finished without a measured run".to_string()),
            ),
            Ending::Slower { best_s } => (
                Status::Slower,
                Some(format!(
                    "slower (killed early): run {} took {:.4} s, best mean {:.4} s",
                    r.runs.len(),
                    r.runs.last().copied().unwrap_or(f64::NAN),
                    best_s
                )),
            ),
            Ending::Failed(e) => {
                let status = match e.kind {
                    ErrorKind::Oom => Status::Oom,
                    ErrorKind::Limit => Status::Limit,
                    ErrorKind::Config | ErrorKind::Input | ErrorKind::Model => Status::BuildFailed,
                    ErrorKind::Cuda | ErrorKind::Io | ErrorKind::LayerFn | ErrorKind::Pipeline => {
                        Status::Crashed
                    }
                };
                let what = match status {
                    Status::Oom => "OOM".to_string(),
                    Status::Limit => "limit".to_string(),
                    Status::BuildFailed => format!("build failed ({})", e.kind),
                    _ => format!("failed ({})", e.kind),
                };
                (status, Some(format!("{what}: {}", e.message)))
            }
            Ending::Crashed(how) => (Status::Crashed, Some(format!("crashed: {how}"))),
            Ending::TimedOut(t) => (
                Status::TimedOut,
                Some(format!(
                    "timed out: no run reported for {:.1} s",
                    t.as_secs_f64()
                )),
            ),
        };
        let mean_s =
            (status == Status::Ok).then(|| r.runs.iter().sum::<f64>() / r.runs.len() as f64);
        ConfigResult {
            config,
            status,
            mean_s,
            warmup_s: r.warmup_s,
            runs: r.runs,
            reason,
        }
    }
}

/// The best configuration and its mean time. In JSON the configuration's
/// fields and `mean_s` sit side by side.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Best {
    /// The configuration.
    #[serde(flatten)]
    pub config: Candidate,
    /// Its mean time in seconds.
    pub mean_s: f64,
}

/// The result of one search.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TuneReport {
    /// `grid` or `descent`.
    pub strategy: String,
    /// The workload spec.
    pub workload: String,
    /// The device, `host` or `cuda:N`.
    pub device: String,
    /// The fastest configuration that finished, if any did.
    pub best: Option<Best>,
    /// Every configuration tried (or pruned), in the order tried.
    pub configs: Vec<ConfigResult>,
    /// Child processes started.
    pub children: usize,
    /// Wall time of the whole search.
    pub wall_s: f64,
}

impl TuneReport {
    /// The report as the documented JSON document.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or(serde_json::Value::Null)
    }

    /// The number of configurations with `status`.
    pub fn count(&self, status: Status) -> usize {
        self.configs.iter().filter(|c| c.status == status).count()
    }
}

impl fmt::Display for TuneReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let rows: Vec<Vec<String>> = self
            .configs
            .iter()
            .map(|r| {
                Param::ALL
                    .iter()
                    .map(|&p| r.config.get(p).to_string())
                    .collect()
            })
            .collect();
        let widths: Vec<usize> = Param::ALL
            .iter()
            .enumerate()
            .map(|(i, p)| {
                rows.iter()
                    .map(|r| r[i].len())
                    .chain([p.title().len()])
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        write!(f, "  ")?;
        for (p, w) in Param::ALL.iter().zip(&widths) {
            write!(f, "{:>w$} ", p.title())?;
        }
        writeln!(f, "{:>10}  result", "mean_s")?;
        for (r, row) in self.configs.iter().zip(&rows) {
            let is_best = self.best.is_some_and(|b| b.config == r.config);
            write!(f, "{}", if is_best { "* " } else { "  " })?;
            for (cell, w) in row.iter().zip(&widths) {
                write!(f, "{cell:>w$} ")?;
            }
            let mean = r.mean_s.map_or("-".to_string(), |m| format!("{m:.4}"));
            let what = match (&r.reason, r.status) {
                (None, s) => s.name().to_string(),
                (Some(why), _) => why.clone(),
            };
            writeln!(f, "{mean:>10}  {what}")?;
        }
        match &self.best {
            Some(b) => writeln!(
                f,
                "best ({}): {} mean {:.4} s",
                self.strategy, b.config, b.mean_s
            )?,
            None => writeln!(f, "best ({}): none finished", self.strategy)?,
        }
        write!(
            f,
            "{} configurations, {} child processes, {:.1} s",
            self.configs.len(),
            self.children,
            self.wall_s
        )
    }
}
