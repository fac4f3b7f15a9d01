//! The tuner from Python: the Rust [`Tuner`] searches (grid or coordinate
//! descent, one child process per configuration, early kills, memory
//! pruning) and the children are Python processes that run the user's
//! workload (`layer_streamer._tune_child`), speaking the tuner's protocol.

use std::path::PathBuf;
use std::time::Duration;

use layer_streamer::tuner::{
    self, Grid, GridBuilder, Param, Request, Strategy, TuneOptions, Tuner,
};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::config;
use crate::errors::{InputError, PyResultExt};

/// Searches configurations of `workload` over the model in `model_dir` and
/// returns the report as JSON (the schema of the Rust `tuner` module).
/// `child_command` is the program and arguments each child runs.
#[pyfunction]
#[pyo3(signature = (model_dir, workload, grid, child_command, *, base=None, strategy="grid",
                    runs=3, sleep=1.0, timeout=300.0, early_kill=true, prune=true,
                    progress=true, echo_stderr=false))]
#[allow(clippy::too_many_arguments)]
pub fn tune(
    py: Python<'_>,
    model_dir: PathBuf,
    workload: String,
    grid: &Bound<'_, PyDict>,
    child_command: Vec<String>,
    base: Option<&Bound<'_, PyDict>>,
    strategy: &str,
    runs: usize,
    sleep: f64,
    timeout: f64,
    early_kill: bool,
    prune: bool,
    progress: bool,
    echo_stderr: bool,
) -> PyResult<String> {
    let strategy = match strategy {
        "grid" => Strategy::Grid,
        "descent" => Strategy::Descent,
        s => {
            return Err(InputError::new_err(format!(
                "strategy: expected \"grid\" or \"descent\", got {s:?}"
            )))
        }
    };
    let seconds = |name: &str, s: f64| {
        Duration::try_from_secs_f64(s)
            .map_err(|_| InputError::new_err(format!("{name}: expected seconds >= 0, got {s}")))
    };
    let options = TuneOptions {
        runs,
        sleep: seconds("sleep", sleep)?,
        timeout: seconds("timeout", timeout)?,
        early_kill,
        prune,
        progress,
        echo_child_stderr: echo_stderr,
    };
    let (exe, args) = child_command
        .split_first()
        .ok_or_else(|| InputError::new_err("child_command is empty"))?;
    let tuner = Tuner::new(model_dir, workload, grid_of(grid)?)
        .base_config(config::from_kwargs(base)?)
        .options(options)
        .child_command(exe, args.iter());
    let report = py.detach(|| tuner.search(strategy)).py_err()?;
    Ok(report.to_json().to_string())
}

/// A grid from `{"n_gpu": [1, 2], "pinned_cache": [None, "auto"], ...}`.
fn grid_of(grid: &Bound<'_, PyDict>) -> PyResult<Grid> {
    let mut b = Grid::builder();
    for (k, v) in grid.iter() {
        let name: String = k.extract()?;
        let p = Param::from_name(&name).ok_or_else(|| {
            let known: Vec<&str> = Param::ALL.iter().map(|p| p.name()).collect();
            InputError::new_err(format!(
                "cannot search {name:?}: the parameters are {}",
                known.join(", ")
            ))
        })?;
        let items: Vec<Bound<'_, PyAny>> = v.try_iter()?.collect::<PyResult<_>>()?;
        if items.is_empty() {
            return Err(InputError::new_err(format!("{name}: no values to try")));
        }
        b = axis(b, p, &name, &items)?;
    }
    Ok(b.build())
}

fn axis(b: GridBuilder, p: Param, name: &str, items: &[Bound<'_, PyAny>]) -> PyResult<GridBuilder> {
    let counts =
        || -> PyResult<Vec<usize>> { items.iter().map(|i| config::count(name, i)).collect() };
    let budgets =
        || -> PyResult<Vec<_>> { items.iter().map(|i| config::budget(name, i)).collect() };
    Ok(match p {
        Param::ReadChunk => b.read_chunk(
            items
                .iter()
                .map(|i| config::size(name, i))
                .collect::<PyResult<Vec<_>>>()?,
        ),
        Param::PinnedCache => b.pinned_cache(budgets()?),
        Param::GpuCache => b.gpu_cache(budgets()?),
        Param::NGpu => b.n_gpu(counts()?),
        Param::NCpuPinned => b.n_cpu_pinned(counts()?),
        Param::NCpu => b.n_cpu(counts()?),
        Param::BatchGpu => b.batch_gpu(counts()?),
        Param::BatchCpuPinned => b.batch_cpu_pinned(counts()?),
        Param::BatchCpu => b.batch_cpu(counts()?),
        Param::ReaderThreads => b.reader_threads(counts()?),
        Param::CpuShare => b.cpu_share(
            items
                .iter()
                .map(|i| config::cpu_share(name, i))
                .collect::<PyResult<Vec<_>>>()?,
        ),
    })
}

/// In a tuner child: the request the parent sent, as
/// `{"model", "workload", "config" (constructor keywords), "runs", "sleep_s"}`.
#[pyfunction]
pub fn tune_request(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    let json = std::env::var(tuner::REQUEST_ENV).map_err(|_| {
        InputError::new_err(format!(
            "{} is not set: this process was not started by the tuner",
            tuner::REQUEST_ENV
        ))
    })?;
    let req: Request = serde_json::from_str(&json)
        .map_err(|e| InputError::new_err(format!("invalid {}: {e}", tuner::REQUEST_ENV)))?;
    let cfg = req.streamer_config().py_err()?;
    let d = PyDict::new(py);
    d.set_item("model", req.model.display().to_string())?;
    d.set_item("workload", &req.workload)?;
    d.set_item("config", config::to_kwargs(py, &cfg)?)?;
    d.set_item("runs", req.runs)?;
    d.set_item("sleep_s", req.sleep_s)?;
    Ok(d)
}

/// Adds the functions and the protocol's constants.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(tune, m)?)?;
    m.add_function(wrap_pyfunction!(tune_request, m)?)?;
    m.add("TUNER_CHILD_ENV", tuner::CHILD_ENV)?;
    m.add("TUNER_REQUEST_ENV", tuner::REQUEST_ENV)?;
    m.add("TUNER_ERROR_EXIT", tuner::ERROR_EXIT)?;
    Ok(())
}
