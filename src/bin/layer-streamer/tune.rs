//! `layer-streamer tune`: search the streamer's configuration space for the
//! fastest configuration of a workload, one child process per configuration.
//!
//! The children are this executable, re-entered through
//! [`layer_streamer::tuner::worker_main`] at the start of `main`.

use std::path::PathBuf;
use std::time::Duration;

use layer_streamer::io::OpenMode;
use layer_streamer::tuner::{Grid, Param, Strategy, TuneOptions, TuneReport, Tuner, Workloads};
use layer_streamer::{Device, Error, Result, StreamerConfig};

const AFTER_HELP: &str = "\
Grid lists are comma-separated; a parameter not given keeps its default. Counts take `off` for 0;
--read-chunk takes sizes (4MiB,16MiB); the caches take none, auto or a size (none,auto,8GB).

Workloads: pass (a pass with a no-op layer function), pass-delay:MS (each layer waits MS ms on the
host, standing in for compute; on CUDA too it is a host sleep), prefill:N (one forward pass over
an N-token prompt with the Qwen2/Llama model code, default 512) and decode:B (one forward pass
decoding one token for each of B sequences, default 1).

Each configuration runs in its own child process: one warm-up run, then RUNS-1 measured runs with
SLEEP seconds between them; a child is killed as soon as a measured run is slower than the best
mean so far, or when it reports nothing for TIMEOUT seconds. Configurations whose estimated memory
does not fit (MemAvailable, RLIMIT_MEMLOCK, free VRAM) are pruned without running.

--json prints {strategy, workload, device, best: null|{<config>, mean_s}, configs: [{config:
<config>, status: ok|slower|crashed|oom|limit|build_failed|timed_out|pruned, mean_s: f64|null,
warmup_s: f64|null, runs: [f64], reason: string|null}], children, wall_s}, where <config> is
{n_gpu, n_cpu_pinned, n_cpu, batch_gpu, batch_cpu_pinned, batch_cpu, reader_threads, read_chunk
(bytes), pinned_cache, gpu_cache (\"none\"|\"auto\"|bytes)}; with --search both,
{grid: <report>, descent: <report>}.";

/// Arguments of `tune`.
#[derive(clap::Args)]
#[command(after_help = AFTER_HELP)]
pub struct Args {
    /// The model directory.
    #[arg(long)]
    model: PathBuf,
    /// Where the weights go: host or cuda:N.
    #[arg(long, default_value = "cuda:0")]
    device: String,
    /// What each run measures: pass, pass-delay:MS, prefill:N or decode.
    #[arg(long, default_value = "pass")]
    workload: String,
    /// Compute dtype: bf16, f16, f32, or file (keep each tensor's dtype).
    #[arg(long, default_value = "bf16")]
    dtype: String,
    /// How files are opened: auto (O_DIRECT, buffered where refused), direct, buffered.
    #[arg(long, default_value = "auto")]
    io: String,
    /// GPU prefetch depths to try, e.g. 1,2,4.
    #[arg(long)]
    n_gpu: Option<String>,
    /// Pinned host slot counts to try, e.g. off,2,4.
    #[arg(long)]
    n_cpu_pinned: Option<String>,
    /// Unpinned CPU slot counts to try, e.g. off,2.
    #[arg(long)]
    n_cpu: Option<String>,
    /// Transfer batch sizes to try.
    #[arg(long)]
    batch_gpu: Option<String>,
    /// Pinned ring batch sizes to try.
    #[arg(long)]
    batch_cpu_pinned: Option<String>,
    /// CPU ring batch sizes to try.
    #[arg(long)]
    batch_cpu: Option<String>,
    /// Reader thread counts to try.
    #[arg(long)]
    reader_threads: Option<String>,
    /// Read request sizes to try (multiples of 4096), e.g. 4MiB,16MiB.
    #[arg(long)]
    read_chunk: Option<String>,
    /// Pinned cache budgets to try, e.g. none,auto,8GB.
    #[arg(long)]
    pinned_cache: Option<String>,
    /// GPU cache budgets to try, e.g. none,auto,4GB.
    #[arg(long)]
    gpu_cache: Option<String>,
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

impl Args {
    fn grid(&self) -> Result<Grid> {
        let lists = [
            (Param::NGpu, &self.n_gpu),
            (Param::NCpuPinned, &self.n_cpu_pinned),
            (Param::NCpu, &self.n_cpu),
            (Param::BatchGpu, &self.batch_gpu),
            (Param::BatchCpuPinned, &self.batch_cpu_pinned),
            (Param::BatchCpu, &self.batch_cpu),
            (Param::ReaderThreads, &self.reader_threads),
            (Param::ReadChunk, &self.read_chunk),
            (Param::PinnedCache, &self.pinned_cache),
            (Param::GpuCache, &self.gpu_cache),
        ];
        let mut b = Grid::builder();
        for (p, list) in lists {
            if let Some(list) = list {
                b = b.parse(p, list)?;
            }
        }
        Ok(b.build())
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
    let base = StreamerConfig {
        device: Device::parse(&a.device)?,
        dtype: crate::opts::parse_compute_dtype(&a.dtype)?,
        io_mode: OpenMode::parse(&a.io)?,
        ..StreamerConfig::default()
    };
    let options = TuneOptions {
        runs: a.runs,
        sleep: seconds("sleep", a.sleep)?,
        timeout: seconds("timeout", a.timeout)?,
        prune: !a.no_prune,
        echo_child_stderr: a.verbose,
        ..TuneOptions::default()
    };
    let grid = a.grid()?;
    let tuner = Tuner::new(&a.model, &a.workload, grid)
        .base_config(base)
        .options(options);
    tuner.check_workload(&Workloads::builtin())?;
    eprintln!(
        "tuning {} on {} over {} ({} configurations in the grid)",
        a.workload,
        a.device,
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
