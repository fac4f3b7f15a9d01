//! `layer-streamer tune`: search the streamer's configuration space for the
//! fastest configuration of a workload, one child process per configuration.
//!
//! The children are this executable, re-entered through
//! [`layer_streamer::tuner::worker_main`] at the start of `main`.

use std::path::PathBuf;
use std::time::Duration;

use layer_streamer::pipeline::config::OptionSpec;
use layer_streamer::tuner::{Grid, Param, Strategy, TuneOptions, TuneReport, Tuner, Workloads};
use layer_streamer::{Error, Result, StreamerConfig};

use crate::opts::{apply_options, option_arg};

/// The help after the flags: lists, workloads, how children are measured,
/// and the JSON schema (its `<config>` fields from the option table).
fn after_help() -> String {
    let config: Vec<&str> = Param::ALL.iter().map(|p| p.name()).collect();
    format!(
        "\
Grid lists are comma-separated. With no list at all, the default grid is searched: a few values
of n_gpu, n_cpu_pinned, reader_threads and pinned_cache (none,auto) that always include the
library's and this tool's defaults; once any list is given, a parameter without one keeps this
tool's default. Counts take `off` for 0; --read-chunk takes sizes (4MiB,16MiB); the caches take
none, auto or a size (none,auto,8GB); --cpu-share takes off, auto or fractions (off,0.2,0.3,auto).

Workloads: pass (a pass with a no-op layer function), pass-delay:MS (each layer waits MS ms on the
host, standing in for compute; on CUDA too it is a host sleep), prefill:N (one forward pass over
an N-token prompt with the Qwen2/Llama model code, default 512) and decode:B (one forward pass
decoding one token for each of B sequences, default 1); both take the CUDA pass's precision after
the count (prefill:512:exact, decode:8:fast; default fast).

Each configuration runs in its own child process, which dies with this one: one warm-up run, then
RUNS-1 measured runs with SLEEP seconds between them; a child is killed as soon as a measured run
is slower than the best mean so far, or when it reports nothing for TIMEOUT seconds.
Configurations whose estimated memory does not fit (MemAvailable, RLIMIT_MEMLOCK unless the
process holds CAP_IPC_LOCK, free VRAM) are pruned without running.

--json prints {{strategy, workload, device, best: null|{{<config>, mean_s}}, configs: [{{config:
<config>, status: ok|slower|crashed|oom|limit|build_failed|timed_out|pruned, mean_s: f64|null,
warmup_s: f64|null, runs: [f64], reason: string|null}}], children, wall_s}}, where <config> is
{{{}}} (read_chunk in bytes; the caches \"none\"|\"auto\"|bytes); with --search both,
{{grid: <report>, descent: <report>}}.",
        config.join(", ")
    )
}

/// Arguments of `tune`.
#[derive(clap::Args)]
#[command(after_help = after_help())]
pub struct Args {
    /// The model directory.
    #[arg(long)]
    model: PathBuf,
    /// What each run measures: pass, pass-delay:MS, prefill:N[:PRECISION] or
    /// decode[:B[:PRECISION]].
    #[arg(long, default_value = "pass")]
    workload: String,
    #[command(flatten)]
    space: SearchSpace,
    /// Runs per configuration, the first a discarded warm-up (at least 2).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Seconds to sleep between runs.
    #[arg(long, default_value_t = 1.0)]
    sleep: f64,
    /// Seconds a child may go without reporting a run before it is killed.
    #[arg(long, default_value_t = 300.0)]
    timeout: f64,
    /// Search strategy: grid, descent, or both (compares them).
    #[arg(long, default_value = "grid")]
    search: String,
    /// Launch configurations even when their memory looks like it cannot fit.
    #[arg(long)]
    no_prune: bool,
    /// Copy the children's stderr to this one's.
    #[arg(long)]
    verbose: bool,
    /// Print the result as JSON (schema below) instead of tables.
    #[arg(long)]
    json: bool,
}

/// The option table's flags as `tune` takes them: a list of values to try
/// for each searched option, one value for the others (device, dtype, I/O
/// mode, CPU affinity).
#[derive(Debug, Clone)]
struct SearchSpace {
    /// The tool's defaults with the single-valued flags applied.
    base: StreamerConfig,
    /// The lists given, by parameter.
    lists: Vec<(Param, String)>,
}

impl SearchSpace {
    /// Options `tune` takes one value of: all but the searched ones and the
    /// progress bar (children draw none).
    fn fixed() -> impl Iterator<Item = &'static OptionSpec> {
        StreamerConfig::OPTIONS
            .iter()
            .filter(|o| !o.searched && !o.switch)
    }

    /// The grid the lists describe, or the default grid without any.
    fn grid(&self) -> Result<Grid> {
        if self.lists.is_empty() {
            return Ok(Grid::default_search());
        }
        let mut b = Grid::builder();
        for (p, list) in &self.lists {
            b = b.parse(*p, list)?;
        }
        Ok(b.build())
    }
}

impl clap::FromArgMatches for SearchSpace {
    fn from_arg_matches(m: &clap::ArgMatches) -> std::result::Result<Self, clap::Error> {
        let mut base = StreamerConfig::cli_default();
        apply_options(&mut base, m, Self::fixed())?;
        let lists = Param::ALL
            .into_iter()
            .filter_map(|p| m.get_one::<String>(p.name()).map(|l| (p, l.clone())))
            .collect();
        Ok(SearchSpace { base, lists })
    }

    fn update_from_arg_matches(
        &mut self,
        m: &clap::ArgMatches,
    ) -> std::result::Result<(), clap::Error> {
        *self = Self::from_arg_matches(m)?;
        Ok(())
    }
}

impl clap::Args for SearchSpace {
    fn augment_args(cmd: clap::Command) -> clap::Command {
        let default = StreamerConfig::cli_default();
        let fixed = Self::fixed().map(|o| option_arg(o, &default, false));
        let lists = StreamerConfig::OPTIONS
            .iter()
            .filter(|o| o.searched)
            .map(|o| option_arg(o, &default, true));
        cmd.args(fixed.chain(lists))
    }

    fn augment_args_for_update(cmd: clap::Command) -> clap::Command {
        Self::augment_args(cmd)
    }
}

fn seconds(what: &str, s: f64) -> Result<Duration> {
    Duration::try_from_secs_f64(s)
        .map_err(|_| Error::Input(format!("--{what} must be a non-negative number of seconds")))
}

/// Runs `tune`.
pub fn run(a: Args) -> Result<()> {
    let strategies = match a.search.as_str() {
        "grid" => vec![Strategy::Grid],
        "descent" => vec![Strategy::Descent],
        "both" => vec![Strategy::Grid, Strategy::Descent],
        s => {
            return Err(Error::Input(format!(
                "unknown --search {s:?}: expected grid, descent or both"
            )))
        }
    };
    let base = a.space.base.clone();
    let options = TuneOptions {
        runs: a.runs,
        sleep: seconds("sleep", a.sleep)?,
        timeout: seconds("timeout", a.timeout)?,
        prune: !a.no_prune,
        echo_child_stderr: a.verbose,
        ..TuneOptions::default()
    };
    let grid = a.space.grid()?;
    let tuner = Tuner::new(&a.model, &a.workload, grid)
        .base_config(base)
        .options(options);
    tuner.check_workload(&Workloads::builtin())?;
    eprintln!(
        "tuning {} on {} over {} ({} configurations in the grid)",
        a.workload,
        a.space.base.device,
        tuner.grid(),
        tuner.grid().len()
    );
    let reports = strategies
        .iter()
        .map(|&s| tuner.search(s))
        .collect::<Result<Vec<_>>>()?;
    if a.json {
        let doc = match &reports[..] {
            [one] => one.to_json(),
            many => serde_json::Value::Object(
                many.iter()
                    .map(|r| (r.strategy.clone(), r.to_json()))
                    .collect(),
            ),
        };
        println!("{}", serde_json::to_string_pretty(&doc).unwrap_or_default());
    } else {
        for r in &reports {
            println!("{r}\n");
        }
        if reports.len() > 1 {
            for r in &reports {
                println!("{}", summary(r));
            }
        }
    }
    Ok(())
}

fn summary(r: &TuneReport) -> String {
    let best = match &r.best {
        Some(b) => format!("{:.4} s with {}", b.mean_s, b.config),
        None => "none finished".into(),
    };
    format!(
        "{:<8} best: {best} ({} child runs, {} configurations, {:.1} s)",
        r.strategy,
        r.children,
        r.configs.len(),
        r.wall_s
    )
}
