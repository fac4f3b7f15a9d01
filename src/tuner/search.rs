//! The search strategies: every point of the grid, or coordinate descent
//! from the base configuration. Both launch one child per configuration,
//! skip configurations whose memory cannot fit, and kill a child as soon as
//! one of its measured runs is slower than the best mean so far.

use std::time::Instant;

use super::child::Request;
use super::estimate::{MachineLimits, MemoryEstimate};
use super::grid::{Candidate, Param};
use super::process::{run_child, ChildCommand};
use super::report::{Best, ConfigResult, TuneReport};
use super::Tuner;
use crate::{ModelIndex, Result};

/// How configurations are chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// Every point of the grid, in order.
    Grid,
    /// Coordinate descent: start from the base configuration; for each
    /// parameter in turn try each of its grid values with the others fixed,
    /// keeping any that beats the best so far; sweep again until a whole
    /// sweep brings no improvement. Configurations are never run twice.
    Descent,
}

impl Strategy {
    /// `grid` or `descent`.
    pub fn name(self) -> &'static str {
        match self {
            Strategy::Grid => "grid",
            Strategy::Descent => "descent",
        }
    }
}

/// One search in progress.
pub(crate) struct Search<'t> {
    tuner: &'t Tuner,
    model: ModelIndex,
    cmd: ChildCommand,
    limits: MachineLimits,
    strategy: Strategy,
    results: Vec<ConfigResult>,
    best: Option<Best>,
    children: usize,
    planned: usize,
}

impl<'t> Search<'t> {
    pub(crate) fn new(
        tuner: &'t Tuner,
        model: ModelIndex,
        cmd: ChildCommand,
        limits: MachineLimits,
        strategy: Strategy,
    ) -> Search<'t> {
        Search {
            tuner,
            model,
            cmd,
            limits,
            strategy,
            results: Vec::new(),
            best: None,
            children: 0,
            planned: 0,
        }
    }

    pub(crate) fn run(mut self) -> Result<TuneReport> {
        let t0 = Instant::now();
        let start = Candidate::from_config(&self.tuner.base);
        match self.strategy {
            Strategy::Grid => {
                let all = self.tuner.grid.candidates(&start);
                self.planned = all.len();
                for c in all {
                    self.evaluate(c)?;
                }
            }
            Strategy::Descent => self.descend(start)?,
        }
        Ok(TuneReport {
            strategy: self.strategy.name().into(),
            workload: self.tuner.workload.clone(),
            device: self.tuner.base.device.to_string(),
            best: self.best,
            configs: self.results,
            children: self.children,
            wall_s: t0.elapsed().as_secs_f64(),
        })
    }

    fn descend(&mut self, start: Candidate) -> Result<()> {
        let axes: Vec<(Param, Vec<_>)> = Param::ALL
            .into_iter()
            .map(|p| (p, self.tuner.grid.axis(p, &start)))
            .collect();
        let mut current = start;
        self.evaluate(current)?;
        loop {
            let mut improved = false;
            for (p, values) in &axes {
                for &v in values {
                    let c = current.with(*p, v)?;
                    if self.results.iter().any(|r| r.config == c) {
                        continue;
                    }
                    self.evaluate(c)?;
                    if self.best.is_some_and(|b| b.config == c) {
                        current = c;
                        improved = true;
                    }
                }
            }
            // The start may have failed; move to the best that finished.
            if let Some(b) = self.best {
                if b.config != current {
                    current = b.config;
                    improved = true;
                }
            }
            if !improved {
                return Ok(());
            }
        }
    }

    /// Runs (or prunes) one configuration and records its outcome.
    fn evaluate(&mut self, c: Candidate) -> Result<ConfigResult> {
        let opts = &self.tuner.options;
        let device = self.tuner.base.device;
        let result = match MemoryEstimate::new(&self.model, &c)
            .exceeds(device, &self.limits)
            .filter(|_| opts.prune)
        {
            Some(why) => ConfigResult::pruned(c, why),
            None => {
                let req = Request::new(
                    self.tuner.child_model_dir(),
                    &self.tuner.workload,
                    &self.tuner.base,
                    c,
                    opts.runs,
                    opts.sleep,
                );
                self.children += 1;
                let kill_above = self.best.map(|b| b.mean_s).filter(|_| opts.early_kill);
                let report = run_child(
                    &self.cmd,
                    &req,
                    kill_above,
                    opts.timeout,
                    opts.echo_child_stderr,
                )?;
                ConfigResult::from_child(c, report)
            }
        };
        let new_best = match (result.mean_s, self.best) {
            (Some(m), Some(b)) => m < b.mean_s,
            (Some(_), None) => true,
            (None, _) => false,
        };
        if new_best {
            if let Some(m) = result.mean_s {
                self.best = Some(Best {
                    config: c,
                    mean_s: m,
                });
            }
        }
        if opts.progress {
            self.print_progress(&result, new_best);
        }
        self.results.push(result.clone());
        Ok(result)
    }

    fn print_progress(&self, r: &ConfigResult, new_best: bool) {
        let n = self.results.len() + 1;
        let of = match self.strategy {
            Strategy::Grid => format!("{n}/{}", self.planned),
            Strategy::Descent => n.to_string(),
        };
        let what = match (r.mean_s, &r.reason) {
            (Some(m), _) => format!("{m:.4} s"),
            (None, Some(why)) => why.clone(),
            (None, None) => r.status.name().into(),
        };
        eprintln!("[{} {of}] {}: {what}", self.strategy.name(), r.config);
        if new_best {
            if let Some(m) = r.mean_s {
                eprintln!("new best: {} mean {m:.4} s", r.config);
            }
        }
    }
}
