//! Pass statistics and memory use as Python dicts.

use layer_streamer::pipeline::{Stage, StageStats};
use layer_streamer::streamer::MemoryUse;
use layer_streamer::PassStats;
use pyo3::prelude::*;
use pyo3::types::PyDict;

/// A pass's statistics: totals, then one dict per stage.
pub fn to_dict<'py>(py: Python<'py>, st: &PassStats) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("pass", st.pass)?;
    d.set_item("wall_s", st.wall.as_secs_f64())?;
    d.set_item("layers", st.layers)?;
    d.set_item("layer_bytes", st.layer_bytes)?;
    d.set_item("gbps", st.gbps())?;
    d.set_item("bound_by", st.bound_by().name())?;
    d.set_item("pinned_cache_hits", st.pinned_cache_hits)?;
    d.set_item("gpu_cache_hits", st.gpu_cache_hits)?;
    for s in Stage::ALL {
        d.set_item(s.name(), stage(py, st.stage(s))?)?;
    }
    Ok(d)
}

fn stage<'py>(py: Python<'py>, s: &StageStats) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("bytes", s.bytes)?;
    d.set_item("busy_s", s.busy.as_secs_f64())?;
    d.set_item("stalled_s", s.stalled.as_secs_f64())?;
    d.set_item("items", s.items)?;
    d.set_item("busy_gbps", s.busy_gbps())?;
    Ok(d)
}

/// What a streamer allocated.
pub fn memory_to_dict<'py>(py: Python<'py>, m: &MemoryUse) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("gpu_slot_size", m.gpu_slot_size)?;
    d.set_item("gpu_slots", m.gpu_slots)?;
    d.set_item("gpu_cache_bytes", m.gpu_cache_bytes)?;
    d.set_item("gpu_cache_layers", m.gpu_cache_layers)?;
    d.set_item("host_slot_size", m.host_slot_size)?;
    d.set_item("cpu_slots", m.cpu_slots)?;
    d.set_item("pinned_slots", m.pinned_slots)?;
    d.set_item("pinned_cache_bytes", m.pinned_cache_bytes)?;
    d.set_item("pinned_cache_layers", m.pinned_cache_layers)?;
    Ok(d)
}
