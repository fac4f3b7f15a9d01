//! The tuner's library API on the host backend. This test binary is its own
//! tuner child: `main` calls `worker_main` first (so `harness = false`), then
//! runs the checks, each a search over a tiny synthetic model with a workload
//! whose time, crashes and hangs depend on the configuration.

use std::path::Path;
use std::time::{Duration, Instant};

use layer_streamer::synth::{write_model, Arch, Shape, SynthSpec};
use layer_streamer::tuner::{
    worker_main, Candidate, Grid, MachineLimits, Param, Status, Strategy, TuneOptions, TuneReport,
    Tuner, Value, Workloads,
};
use layer_streamer::{Budget, DType, Device, LayerStreamer, StreamerConfig};

mod common;

/// Milliseconds one run of `scaled` takes per unit of `n_gpu`.
const MS_PER_GPU_SLOT: u64 = 12;
/// Milliseconds one run of `scaled` takes per unit of `batch_cpu_pinned`.
const MS_PER_PINNED_BATCH: u64 = 10;

/// The test workloads:
/// - `scaled`: a host pass whose layer function sleeps so that a run takes
///   about `n_gpu × 12 ms + batch_cpu_pinned × 10 ms`; with `n_cpu = 3` it aborts in its first measured
///   run, with `batch_gpu = 9` it hangs there.
fn workloads() -> Workloads {
    let mut w = Workloads::builtin();
    w.register("scaled", |cfg, model, _arg| {
        let layers = model.num_layers().max(1) as u32;
        let ms =
            MS_PER_GPU_SLOT * cfg.n_gpu as u64 + MS_PER_PINNED_BATCH * cfg.batch_cpu_pinned as u64;
        let per_layer = Duration::from_millis(ms) / layers;
        let (abort, hang) = (cfg.n_cpu == 3, cfg.batch_gpu == 9);
        let mut s = LayerStreamer::builder(model).config(cfg.clone()).build()?;
        let mut run = 0;
        Ok(Box::new(move || {
            if run == 1 && abort {
                eprintln!("scaled: aborting as asked (n_cpu = 3)");
                std::process::abort();
            }
            if run == 1 && hang {
                std::thread::sleep(Duration::from_secs(3600));
            }
            run += 1;
            let t = Instant::now();
            s.run_pass((), |(), _w, _layer, _stream| {
                std::thread::sleep(per_layer);
                Ok(())
            })?;
            Ok(t.elapsed())
        }))
    });
    // Writes this child's pid to the file named by its argument, then hangs.
    w.register("pid-then-hang", |_cfg, _model, arg| {
        let path = arg.expect("pid-then-hang:PATH").to_string();
        std::fs::write(&path, std::process::id().to_string())
            .map_err(|e| layer_streamer::Error::io("writing", &path, None, e))?;
        Ok(Box::new(move || {
            std::thread::sleep(Duration::from_secs(3600));
            Ok(Duration::ZERO)
        }))
    });
    w
}

/// Set in the environment of the process `children_die_with_their_parent`
/// starts and kills: the model directory to tune over.
const ORPHAN_PARENT_ENV: &str = "LS_TEST_TUNER_PARENT";

/// One check of this test binary, given the model directory.
type Check = fn(&Path);

fn main() {
    worker_main(&workloads());
    if let Some(model) = std::env::var_os(ORPHAN_PARENT_ENV) {
        return tune_until_killed(Path::new(&model));
    }

    let dir = common::tempdir();
    write_tiny_model(dir.path());
    let checks: [(&str, Check); 7] = [
        (
            "grid_finds_the_fastest_and_kills_slower_and_crashing_children",
            grid_search,
        ),
        (
            "timeouts_and_build_failures_are_reported_and_the_search_goes_on",
            hang_and_bad_config,
        ),
        ("descent_finds_the_same_best_with_fewer_children", descent),
        (
            "configurations_that_cannot_fit_are_pruned_unlaunched",
            pruning,
        ),
        ("the_json_report_has_the_documented_fields", json_report),
        (
            "the_default_grid_holds_the_library_and_tool_defaults",
            default_grid,
        ),
        (
            "children_die_with_their_parent",
            children_die_with_their_parent,
        ),
    ];
    for (name, check) in checks {
        let t = Instant::now();
        eprintln!("test {name} ...");
        check(dir.path());
        eprintln!("test {name} ... ok ({:.1} s)", t.elapsed().as_secs_f64());
    }
    eprintln!("\ntest result: ok. {} passed", checks.len());
}

fn write_tiny_model(dir: &Path) {
    let spec = SynthSpec {
        arch: Arch::Qwen2,
        shape: Shape {
            hidden: 64,
            intermediate: 128,
            layers: 3,
            heads: 4,
            kv_heads: 2,
            vocab: 320,
        },
        dtype: DType::BF16,
        tie: true,
        shard_size: 1 << 30,
        seed: common::seed("tuner::write_tiny_model"),
        threads: 1,
    };
    write_model(dir, &spec).expect("write the synthetic model");
}

fn base() -> StreamerConfig {
    StreamerConfig {
        device: Device::Host,
        dtype: None,
        n_gpu: 1,
        n_cpu_pinned: 2,
        reader_threads: 1,
        read_chunk: 64 << 10,
        ..StreamerConfig::default()
    }
}

fn options(runs: usize) -> TuneOptions {
    TuneOptions {
        runs,
        sleep: Duration::from_millis(10),
        timeout: Duration::from_secs(20),
        ..TuneOptions::default()
    }
}

fn tuner(model: &Path, grid: Grid, runs: usize) -> Tuner {
    Tuner::new(model, "scaled", grid)
        .base_config(base())
        .options(options(runs))
}

fn find(r: &TuneReport, f: impl Fn(&layer_streamer::tuner::Candidate) -> bool) -> usize {
    r.configs
        .iter()
        .position(|c| f(&c.config))
        .unwrap_or_else(|| panic!("no such configuration in\n{r}"))
}

fn grid_search(model: &Path) {
    let grid = Grid::builder().n_gpu([1, 8]).n_cpu([0, 3]).build();
    let runs = 4;
    let r = tuner(model, grid, runs).search(Strategy::Grid).unwrap();
    println!("{r}");
    assert_eq!(r.configs.len(), 4);
    assert_eq!(r.children, 4);
    let best = r.best.expect("a best configuration");
    assert_eq!((best.config.n_gpu, best.config.n_cpu), (1, 0), "{r}");

    let fast = &r.configs[find(&r, |c| c.n_gpu == 1 && c.n_cpu == 0)];
    assert_eq!(fast.status, Status::Ok);
    assert_eq!(fast.runs.len(), runs - 1, "every measured run of the best");
    assert!(fast.warmup_s.is_some());

    let slow = &r.configs[find(&r, |c| c.n_gpu == 8 && c.n_cpu == 0)];
    assert_eq!(slow.status, Status::Slower, "{r}");
    assert!(
        slow.runs.len() < runs - 1,
        "killed after {} of {} measured runs",
        slow.runs.len(),
        runs - 1
    );
    assert!(slow.mean_s.is_none());

    for n_gpu in [1, 8] {
        let crashed = &r.configs[find(&r, |c| c.n_gpu == n_gpu && c.n_cpu == 3)];
        assert_eq!(crashed.status, Status::Crashed, "{r}");
        let why = crashed.reason.as_deref().unwrap_or_default();
        assert!(why.contains("SIGABRT"), "{why}");
        assert!(why.contains("aborting as asked"), "stderr kept: {why}");
    }
}

fn hang_and_bad_config(model: &Path) {
    let grid = Grid::builder()
        .batch_gpu([1, 9])
        .read_chunk([64 << 10, 1000])
        .build();
    let mut opts = options(3);
    opts.timeout = Duration::from_millis(1500);
    let t = Instant::now();
    let r = tuner(model, grid, 3)
        .options(opts)
        .search(Strategy::Grid)
        .unwrap();
    println!("{r}");
    assert!(
        t.elapsed() < Duration::from_secs(15),
        "the hang was cut short"
    );
    assert_eq!(r.configs.len(), 4);

    let hung = &r.configs[find(&r, |c| c.batch_gpu == 9 && c.read_chunk == 64 << 10)];
    assert_eq!(hung.status, Status::TimedOut, "{r}");
    assert!(
        hung.warmup_s.is_some(),
        "the warm-up was reported before the hang"
    );
    assert!(hung
        .reason
        .as_deref()
        .unwrap_or_default()
        .contains("timed out"));

    for batch in [1, 9] {
        let bad = &r.configs[find(&r, |c| c.batch_gpu == batch && c.read_chunk == 1000)];
        assert_eq!(bad.status, Status::BuildFailed, "{r}");
        let why = bad.reason.as_deref().unwrap_or_default();
        assert!(why.contains("read_chunk") && why.contains("4096"), "{why}");
    }
    let ok = &r.configs[find(&r, |c| c.batch_gpu == 1 && c.read_chunk == 64 << 10)];
    assert_eq!(ok.status, Status::Ok, "{r}");
    assert_eq!(r.best.map(|b| b.config), Some(ok.config));
}

fn descent(model: &Path) {
    let grid = Grid::builder()
        .n_gpu([1, 2, 4, 6])
        .batch_cpu_pinned([1, 2, 3])
        .build();
    let t = tuner(model, grid.clone(), 3).base_config(StreamerConfig {
        n_gpu: 4,
        batch_cpu_pinned: 3,
        ..base()
    });
    let r = t.search(Strategy::Descent).unwrap();
    println!("{r}");
    let best = r.best.expect("a best configuration");
    assert_eq!(
        (best.config.n_gpu, best.config.batch_cpu_pinned),
        (1, 1),
        "the grid's best\n{r}"
    );
    let start = &r.configs[0].config;
    assert_eq!(
        (start.n_gpu, start.batch_cpu_pinned),
        (4, 3),
        "starts from the base"
    );
    assert!(
        r.children < grid.len(),
        "descent ran {} children, the grid has {}",
        r.children,
        grid.len()
    );
    let mut seen = Vec::new();
    for c in &r.configs {
        assert!(!seen.contains(&c.config), "{} ran twice", c.config);
        seen.push(c.config);
    }
}

fn pruning(model: &Path) {
    let grid = Grid::builder().n_gpu([1, 1000]).build();
    let limits = MachineLimits {
        mem_available: Some(20 << 20),
        memlock: None,
        free_vram: None,
    };
    let r = tuner(model, grid, 2)
        .limits(limits)
        .search(Strategy::Grid)
        .unwrap();
    println!("{r}");
    assert_eq!(r.children, 1, "the pruned configuration was not launched");
    let pruned = &r.configs[find(&r, |c| c.n_gpu == 1000)];
    assert_eq!(pruned.status, Status::Pruned);
    let why = pruned.reason.as_deref().unwrap_or_default();
    assert!(
        why.starts_with("pruned: needs") && why.contains("MB of host RAM, 21.0 MB available"),
        "{why}"
    );
    assert_eq!(r.configs[find(&r, |c| c.n_gpu == 1)].status, Status::Ok);
}

fn json_report(model: &Path) {
    let grid = Grid::builder().n_gpu([1, 8]).read_chunk([64 << 10]).build();
    let r = tuner(model, grid, 3).search(Strategy::Grid).unwrap();
    let text = serde_json::to_string(&r.to_json()).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["strategy"], "grid");
    assert_eq!(v["workload"], "scaled");
    assert_eq!(v["device"], "host");
    assert_eq!(v["children"], 2);
    assert!(v["wall_s"].as_f64().unwrap() > 0.0);
    assert_eq!(v["best"]["n_gpu"], 1);
    assert_eq!(v["best"]["read_chunk"], 64 << 10);
    assert_eq!(v["best"]["pinned_cache"], "none");
    assert!(v["best"]["mean_s"].as_f64().unwrap() > 0.0);
    let configs = v["configs"].as_array().unwrap();
    assert_eq!(configs.len(), 2);
    for c in configs {
        for key in ["config", "status", "mean_s", "runs", "reason", "warmup_s"] {
            assert!(c.get(key).is_some(), "{key} missing in {c}");
        }
        for key in [
            "n_gpu",
            "n_cpu_pinned",
            "n_cpu",
            "batch_gpu",
            "batch_cpu_pinned",
        ] {
            assert!(c["config"].get(key).is_some(), "{key} missing in {c}");
        }
    }
    assert_eq!(configs[0]["status"], "ok");
    assert!(configs[0]["reason"].is_null());
    assert_eq!(configs[1]["status"], "slower");
    let back: TuneReport = serde_json::from_str(&text).unwrap();
    assert_eq!(back, r);
    assert!(Param::from_name("n-gpu").is_some());
}

fn default_grid(_model: &Path) {
    let grid = Grid::default_search();
    let lib = Candidate::from_config(&StreamerConfig::default());
    let cli = Candidate::from_config(&StreamerConfig::cli_default());
    for p in Param::ALL {
        let values = grid.values(p);
        assert!(
            values.contains(&lib.get(p)),
            "{p}: {values:?} lacks the library default"
        );
        assert!(
            values.contains(&cli.get(p)),
            "{p}: {values:?} lacks the tool's default"
        );
    }
    let candidates = grid.candidates(&Candidate::default());
    assert!(candidates.contains(&lib), "{grid}");
    assert!(candidates.contains(&cli), "{grid}");
    assert_eq!(
        grid.values(Param::PinnedCache),
        [Value::Budget(Budget::Auto), Value::Budget(Budget::None)]
    );
}

/// The killed parent: a search whose one child writes its pid and hangs.
fn tune_until_killed(model: &Path) {
    let pid_file = model.join("child.pid");
    let workload = format!("pid-then-hang:{}", pid_file.display());
    let mut opts = options(2);
    opts.timeout = Duration::from_secs(3600);
    let _ = Tuner::new(model, workload, Grid::default())
        .base_config(base())
        .options(opts)
        .search(Strategy::Grid);
    unreachable!("the search hangs until this process is killed");
}

/// Whether `pid` is running (neither gone nor a zombie waiting to be reaped).
fn running(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with(['Z', 'X'])),
        Err(_) => false,
    }
}

fn children_die_with_their_parent(model: &Path) {
    let pid_file = model.join("child.pid");
    let _ = std::fs::remove_file(&pid_file);
    let mut parent = std::process::Command::new(std::env::current_exe().unwrap())
        .env(ORPHAN_PARENT_ENV, model)
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("start the parent");
    let t0 = Instant::now();
    let child: i32 = loop {
        if let Some(pid) = std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|s| s.trim().parse().ok())
        {
            break pid;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the tuner child never started"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(
        running(child),
        "child {child} runs before its parent is killed"
    );
    parent.kill().unwrap();
    parent.wait().unwrap();
    let t1 = Instant::now();
    while running(child) && t1.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let alive = running(child);
    if alive {
        // SAFETY: kill(2) with a pid this test read from its own child's file.
        unsafe { libc::kill(child, libc::SIGKILL) };
    }
    assert!(!alive, "child {child} outlived its killed parent");
}
