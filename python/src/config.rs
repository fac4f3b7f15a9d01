//! Streamer options as Python keywords: parsed into a [`StreamerConfig`]
//! in one place (the constructor and the tuner both use it), and written
//! back as the same keywords.

use layer_streamer::io::OpenMode;
use layer_streamer::pipeline::parse_size;
use layer_streamer::{Budget, CpuShare, DType, Dequant, Device, StreamerConfig};
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyString};

use crate::errors::InputError;

/// Every keyword the constructor takes after the model directory.
pub const OPTIONS: [&str; 17] = [
    "device",
    "dtype",
    "n_gpu",
    "n_cpu_pinned",
    "n_cpu",
    "batch_gpu",
    "batch_cpu_pinned",
    "batch_cpu",
    "reader_threads",
    "read_chunk",
    "io_mode",
    "pinned_cache",
    "gpu_cache",
    "cpu_affinity",
    "progress",
    "dequant",
    "cpu_share",
];

/// The defaults of the Python constructor (those of `llm-layer-prefetch`'s
/// users): [`StreamerConfig::default`] with eight reader threads and the
/// pinned cache on.
pub fn defaults() -> StreamerConfig {
    StreamerConfig {
        reader_threads: 8,
        pinned_cache: Budget::Auto,
        ..StreamerConfig::default()
    }
}

/// Applies `kwargs` (any subset of [`OPTIONS`]) over [`defaults`].
pub fn from_kwargs(kwargs: Option<&Bound<'_, PyDict>>) -> PyResult<StreamerConfig> {
    let mut c = defaults();
    let Some(kwargs) = kwargs else {
        return Ok(c);
    };
    for (k, v) in kwargs.iter() {
        let key: String = k.extract()?;
        let v = &v;
        match key.as_str() {
            "device" => c.device = device(v)?,
            "dtype" => c.dtype = dtype(v)?,
            "n_gpu" => c.n_gpu = count(&key, v)?,
            "n_cpu_pinned" => c.n_cpu_pinned = count(&key, v)?,
            "n_cpu" => c.n_cpu = count(&key, v)?,
            "batch_gpu" => c.batch_gpu = count(&key, v)?,
            "batch_cpu_pinned" => c.batch_cpu_pinned = count(&key, v)?,
            "batch_cpu" => c.batch_cpu = count(&key, v)?,
            "reader_threads" => c.reader_threads = count(&key, v)?,
            "read_chunk" => c.read_chunk = size(&key, v)?,
            "io_mode" => c.io_mode = io_mode(v)?,
            "pinned_cache" => c.pinned_cache = budget(&key, v)?,
            "gpu_cache" => c.gpu_cache = budget(&key, v)?,
            "cpu_affinity" => c.cpu_affinity = v.extract::<Option<Vec<usize>>>()?,
            "progress" => c.progress = v.is_truthy()?,
            "dequant" => {
                let s: String = v.extract()?;
                c.dequant = Dequant::parse(&s).map_err(crate::errors::to_py)?;
            }
            "cpu_share" => c.cpu_share = cpu_share(&key, v)?,
            other => {
                return Err(InputError::new_err(format!(
                    "unknown option {other:?}: the options are {}",
                    OPTIONS.join(", ")
                )))
            }
        }
    }
    Ok(c)
}

/// `cuda`, `cuda:N`, `host`, or an ordinal (-1: host).
pub fn device(v: &Bound<'_, PyAny>) -> PyResult<Device> {
    if let Ok(n) = v.extract::<i64>() {
        return Ok(match usize::try_from(n) {
            Ok(n) => Device::Cuda(n),
            Err(_) => Device::Host,
        });
    }
    let s: String = v
        .str()
        .and_then(|s| s.extract())
        .map_err(|_| InputError::new_err("device: expected \"host\", \"cuda:N\" or an int"))?;
    Device::parse(&s).map_err(crate::errors::to_py)
}

/// `bf16`, `f16`, `f32`, or `file`/None (keep each tensor's stored type).
pub fn dtype(v: &Bound<'_, PyAny>) -> PyResult<Option<DType>> {
    if v.is_none() {
        return Ok(None);
    }
    let s: String = v
        .str()?
        .extract::<String>()?
        .trim()
        .trim_start_matches("torch.")
        .to_string();
    if s.eq_ignore_ascii_case("file") {
        return Ok(None);
    }
    match DType::parse(&s) {
        Some(d @ (DType::BF16 | DType::F16 | DType::F32)) => Ok(Some(d)),
        _ => Err(InputError::new_err(format!(
            "dtype: expected \"bf16\", \"f16\", \"f32\" or \"file\", got {s:?}"
        ))),
    }
}

/// A count; None or False is 0 (a stage switched off).
pub(crate) fn count(key: &str, v: &Bound<'_, PyAny>) -> PyResult<usize> {
    if v.is_none() {
        return Ok(0);
    }
    if v.is_instance_of::<PyBool>() {
        return Ok(usize::from(v.is_truthy()?));
    }
    v.extract::<usize>().map_err(|_| {
        InputError::new_err(format!(
            "{key}: expected a non-negative int or None, got {}",
            repr(v)
        ))
    })
}

/// Bytes: an int, or a size such as "16MiB".
pub(crate) fn size(key: &str, v: &Bound<'_, PyAny>) -> PyResult<u64> {
    if let Ok(n) = v.extract::<u64>() {
        return Ok(n);
    }
    match v.cast::<PyString>() {
        Ok(s) => parse_size(&s.to_string()).map_err(|e| InputError::new_err(format!("{key}: {e}"))),
        Err(_) => Err(InputError::new_err(format!(
            "{key}: expected a number of bytes or a size such as \"16MiB\", got {}",
            repr(v)
        ))),
    }
}

/// A cache budget: None/0/False/"none" is no cache, "auto"/True as much
/// as fits, an int or a size string a number of bytes.
pub fn budget(key: &str, v: &Bound<'_, PyAny>) -> PyResult<Budget> {
    if v.is_none() {
        return Ok(Budget::None);
    }
    if v.is_instance_of::<PyBool>() {
        return Ok(if v.is_truthy()? {
            Budget::Auto
        } else {
            Budget::None
        });
    }
    if let Ok(n) = v.extract::<u64>() {
        return Ok(if n == 0 {
            Budget::None
        } else {
            Budget::Bytes(n)
        });
    }
    match v.cast::<PyString>() {
        Ok(s) => {
            Budget::parse(&s.to_string()).map_err(|e| InputError::new_err(format!("{key}: {e}")))
        }
        Err(_) => Err(InputError::new_err(format!(
            "{key}: expected None, \"auto\", a number of bytes or a size such as \"8GB\", got {}",
            repr(v)
        ))),
    }
}

/// A CPU share: None/0/"off" is none, "auto" balanced at build, a number
/// in `[0, 1]` that fraction of each streamed layer's rows.
pub fn cpu_share(key: &str, v: &Bound<'_, PyAny>) -> PyResult<CpuShare> {
    if v.is_none() {
        return Ok(CpuShare::Off);
    }
    let bad = |e: layer_streamer::Error| InputError::new_err(format!("{key}: {e}"));
    if v.is_instance_of::<PyBool>() {
        return Err(InputError::new_err(format!(
            "{key}: expected None, \"off\", \"auto\" or a fraction in [0, 1], got {}",
            repr(v)
        )));
    }
    if let Ok(f) = v.extract::<f64>() {
        return CpuShare::fraction(f).map_err(bad);
    }
    match v.cast::<PyString>() {
        Ok(s) => CpuShare::parse(&s.to_string()).map_err(bad),
        Err(_) => Err(InputError::new_err(format!(
            "{key}: expected None, \"off\", \"auto\" or a fraction in [0, 1], got {}",
            repr(v)
        ))),
    }
}

/// A CPU share as a keyword value: None, "auto" or the fraction.
fn cpu_share_to_py<'py>(py: Python<'py>, c: CpuShare) -> PyResult<Bound<'py, PyAny>> {
    Ok(match c {
        CpuShare::Off => py.None().into_bound(py),
        CpuShare::Auto => "auto".into_pyobject(py)?.into_any(),
        CpuShare::Fixed(f) => f.into_pyobject(py)?.into_any(),
    })
}

fn io_mode(v: &Bound<'_, PyAny>) -> PyResult<OpenMode> {
    let s: String = v.extract()?;
    OpenMode::parse(&s).map_err(crate::errors::to_py)
}

fn repr(v: &Bound<'_, PyAny>) -> String {
    v.repr()
        .map(|r| r.to_string())
        .unwrap_or_else(|_| "?".into())
}

/// A budget as a keyword value: None, "auto" or bytes.
pub fn budget_to_py<'py>(py: Python<'py>, b: Budget) -> PyResult<Bound<'py, PyAny>> {
    Ok(match b {
        Budget::None => py.None().into_bound(py),
        Budget::Auto => "auto".into_pyobject(py)?.into_any(),
        Budget::Bytes(n) => n.into_pyobject(py)?.into_any(),
    })
}

/// `c` as the keywords that rebuild it.
pub fn to_kwargs<'py>(py: Python<'py>, c: &StreamerConfig) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("device", c.device.to_string())?;
    d.set_item(
        "dtype",
        c.dtype
            .map(|t| t.to_string())
            .unwrap_or_else(|| "file".into()),
    )?;
    d.set_item("n_gpu", c.n_gpu)?;
    d.set_item("n_cpu_pinned", c.n_cpu_pinned)?;
    d.set_item("n_cpu", c.n_cpu)?;
    d.set_item("batch_gpu", c.batch_gpu)?;
    d.set_item("batch_cpu_pinned", c.batch_cpu_pinned)?;
    d.set_item("batch_cpu", c.batch_cpu)?;
    d.set_item("reader_threads", c.reader_threads)?;
    d.set_item("read_chunk", c.read_chunk)?;
    d.set_item(
        "io_mode",
        match c.io_mode {
            OpenMode::Auto => "auto",
            OpenMode::Direct => "direct",
            OpenMode::Buffered => "buffered",
        },
    )?;
    d.set_item("pinned_cache", budget_to_py(py, c.pinned_cache)?)?;
    d.set_item("gpu_cache", budget_to_py(py, c.gpu_cache)?)?;
    d.set_item("cpu_affinity", c.cpu_affinity.clone())?;
    d.set_item("progress", c.progress)?;
    d.set_item("dequant", c.dequant.name())?;
    d.set_item("cpu_share", cpu_share_to_py(py, c.cpu_share)?)?;
    Ok(d)
}
