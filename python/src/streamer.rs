//! `Streamer`, the native class under `layer_streamer.LayerStreamer`: builds a
//! [`LayerStreamer`] from keyword options, runs passes that call a Python
//! layer function, loads static tensors, reports statistics.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use dlpark::ffi::DLDevice;
use layer_streamer::{cuda, Device, Error, LayerStreamer, ModelIndex, StreamerConfig};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

use crate::config;
use crate::errors::{to_py, CudaError, LayerStreamerError, PyResultExt};
use crate::stats;
use crate::tensor::{Desc, Lease, Tensor};

/// The streamer and what exports of its views need, shared with those
/// exports so that its memory outlives any of them.
pub(crate) struct Core {
    streamer: Mutex<LayerStreamer>,
    cuda: Option<CudaSide>,
}

/// The compute stream's handle and an event to order other streams after it.
struct CudaSide {
    ctx: cuda::Context,
    compute: usize,
    event: cuda::Event,
}

impl Core {
    /// Makes `stream` (a raw `CUstream`; 1 and 2 are the legacy and
    /// per-thread default streams) wait for the work queued so far on the
    /// compute stream, where the layer's weights are ready.
    pub(crate) fn order_after_compute(&self, stream: usize) -> PyResult<()> {
        let Some(c) = &self.cuda else {
            return Ok(());
        };
        if stream == c.compute {
            return Ok(());
        }
        c.ctx.bind().py_err()?;
        use cudarc::driver::sys;
        // SAFETY: the event and the compute stream belong to the context
        // made current above and live as long as `self`.
        let r = unsafe { sys::cuEventRecord(c.event.raw(), c.compute as sys::CUstream) };
        check("cuEventRecord", r)?;
        // SAFETY: `stream` is the consumer's stream of this device (the
        // DLPack protocol's contract), or a default-stream sentinel.
        let r = unsafe { sys::cuStreamWaitEvent(stream as sys::CUstream, c.event.raw(), 0) };
        check("cuStreamWaitEvent", r)
    }
}

fn check(call: &str, r: cudarc::driver::sys::CUresult) -> PyResult<()> {
    if r == cudarc::driver::sys::CUresult::CUDA_SUCCESS {
        Ok(())
    } else {
        Err(CudaError::new_err(format!("{call} failed: {r:?}")))
    }
}

/// Streams a model's layers to a device, pass after pass.
#[pyclass(subclass, module = "layer_streamer._native", name = "Streamer")]
pub struct Streamer {
    core: Mutex<Option<Arc<Core>>>,
    /// Moves on when a layer function returns and when the streamer closes.
    clock: Arc<AtomicU64>,
    config: StreamerConfig,
    model_dir: String,
    num_layers: usize,
    layer_keys: Vec<String>,
    device: DLDevice,
}

impl Streamer {
    fn core(&self) -> PyResult<Arc<Core>> {
        self.core
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .ok_or_else(|| LayerStreamerError::new_err("the streamer is closed"))
    }
}

fn busy() -> PyErr {
    LayerStreamerError::new_err(
        "the streamer is running a pass: call it from outside the layer function, \
         one pass at a time",
    )
}

#[pymethods]
impl Streamer {
    /// Opens the model in `model_dir` and allocates every slot, cache and
    /// stream. Keywords: see `layer_streamer.LayerStreamer`.
    #[new]
    #[pyo3(signature = (model_dir, **options))]
    fn new(
        py: Python<'_>,
        model_dir: std::path::PathBuf,
        options: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<Streamer> {
        let cfg = config::from_kwargs(options)?;
        let built = py.detach(|| -> layer_streamer::Result<_> {
            let model = ModelIndex::open(&model_dir)?;
            let s = LayerStreamer::builder(&model).config(cfg.clone()).build()?;
            let cuda = match (s.context(), s.compute_stream().cuda()) {
                (Some(ctx), Some(stream)) => Some(CudaSide {
                    ctx: ctx.clone(),
                    compute: stream.raw() as usize,
                    event: cuda::Event::new(ctx, false)?,
                }),
                _ => None,
            };
            Ok((model, s, cuda))
        });
        let (model, s, cuda) = built.py_err()?;
        let device = match cfg.device {
            Device::Cuda(n) => DLDevice::cuda(n as i32),
            Device::Host => DLDevice::CPU,
        };
        let layer_keys = model
            .layers()
            .first()
            .map(|l| l.tensors.iter().map(|t| t.key.clone()).collect())
            .unwrap_or_default();
        Ok(Streamer {
            core: Mutex::new(Some(Arc::new(Core {
                streamer: Mutex::new(s),
                cuda,
            }))),
            clock: Arc::new(AtomicU64::new(0)),
            config: cfg,
            model_dir: model_dir.display().to_string(),
            num_layers: model.num_layers(),
            layer_keys,
            device,
        })
    }

    /// Runs one pass: `layer_fn(x, weights, layer_idx)` for every layer in
    /// order on this thread; what it returns is the next layer's `x`, and the
    /// last layer's is the result. The GIL is released while the pipeline
    /// waits. An exception in `layer_fn` ends the pass and propagates as it
    /// was raised; the streamer stays usable.
    fn run_pass(&self, py: Python<'_>, x: Py<PyAny>, layer_fn: Py<PyAny>) -> PyResult<Py<PyAny>> {
        let core = self.core()?;
        let mut guard = core.streamer.try_lock().map_err(|_| busy())?;
        let streamer: &mut LayerStreamer = &mut guard;
        let clock = &self.clock;
        let weak = Arc::downgrade(&core);
        let device = self.device;
        let mut raised: Option<PyErr> = None;
        let result = py.detach(|| {
            streamer.run_pass(x, |x, weights, layer, _stream| {
                Python::attach(|py| {
                    let gen = clock.load(Ordering::Acquire);
                    let dict = PyDict::new(py);
                    let filled = weights.tensors().try_for_each(|v| {
                        let lease = Lease {
                            clock: Arc::clone(clock),
                            gen,
                            layer,
                            core: weak.clone(),
                        };
                        let desc = Desc::of_view(&v);
                        let key = desc.key().to_string();
                        dict.set_item(
                            key,
                            Bound::new(py, Tensor::layer_view(desc, device, lease))?,
                        )
                    });
                    let out = filled.and_then(|()| layer_fn.call1(py, (x, dict, layer)));
                    // Release: a view that sees the new value must not be used.
                    clock.fetch_add(1, Ordering::Release);
                    out.map_err(|e| {
                        raised = Some(e);
                        Error::Input("the layer function raised a Python exception".into())
                    })
                })
            })
        });
        self.clock.fetch_add(1, Ordering::Release);
        drop(guard);
        match (result, raised) {
            (Ok(x), _) => Ok(x),
            (Err(_), Some(e)) => Err(e),
            (Err(e), None) => Err(to_py(e)),
        }
    }

    /// Reads a non-layer tensor (embedding, final norm, lm_head) onto the
    /// device, cast to the compute dtype when it is a float. It owns its
    /// memory: it stays valid after passes and after `close()`.
    fn load_static(&self, py: Python<'_>, name: &str) -> PyResult<Tensor> {
        let core = self.core()?;
        let mut guard = core.streamer.try_lock().map_err(|_| busy())?;
        let streamer: &mut LayerStreamer = &mut guard;
        let t = py.detach(|| streamer.load_static(name)).py_err()?;
        Ok(Tensor::owned(t, self.device))
    }

    /// Statistics of the last completed pass as a dict (None before the
    /// first): `pass`, `wall_s`, `layers`, `layer_bytes`, `gbps`, `bound_by`,
    /// cache hits, and per stage (`read`, `pin`, `h2d`, `compute`) `bytes`,
    /// `busy_s`, `stalled_s`, `items`, `busy_gbps`.
    #[getter]
    fn last_pass_stats<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyDict>>> {
        let core = self.core()?;
        let guard = core.streamer.try_lock().map_err(|_| busy())?;
        let st = guard.last_pass_stats();
        if st.pass == 0 {
            return Ok(None);
        }
        stats::to_dict(py, st).map(Some)
    }

    /// What the streamer allocated: slot sizes and counts, cache bytes and layers.
    #[getter]
    fn memory<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let core = self.core()?;
        let guard = core.streamer.try_lock().map_err(|_| busy())?;
        stats::memory_to_dict(py, guard.memory())
    }

    /// The options the streamer was built with, as keywords.
    #[getter]
    fn config<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        config::to_kwargs(py, &self.config)
    }

    /// The model directory.
    #[getter]
    fn model_dir(&self) -> &str {
        &self.model_dir
    }

    /// Number of layers a pass streams.
    #[getter]
    fn num_layers(&self) -> usize {
        self.num_layers
    }

    /// The keys of a layer's tensors (those of the first layer, in file
    /// order), e.g. `self_attn.q_proj.weight`.
    #[getter]
    fn layer_keys<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        PyList::new(py, &self.layer_keys)
    }

    /// `host` or `cuda:N`.
    #[getter]
    fn device(&self) -> String {
        self.config.device.to_string()
    }

    /// The CUDA device ordinal; None on the host backend.
    #[getter]
    fn device_index(&self) -> Option<usize> {
        match self.config.device {
            Device::Cuda(n) => Some(n),
            Device::Host => None,
        }
    }

    /// The raw `CUstream` layer functions run on (0 on the host backend).
    #[getter]
    fn compute_stream(&self) -> PyResult<usize> {
        Ok(self.core()?.cuda.as_ref().map_or(0, |c| c.compute))
    }

    /// Whether `close()` has run.
    #[getter]
    fn closed(&self) -> bool {
        self.core
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_none()
    }

    /// Frees the streamer's slots, caches and streams (once no DLPack export
    /// of a layer's view is alive). Views become stale; static tensors stay.
    fn close(&self) -> PyResult<()> {
        let mut slot = self.core.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(core) = slot.as_ref() {
            if core.streamer.try_lock().is_err() {
                return Err(busy());
            }
        }
        self.clock.fetch_add(1, Ordering::Release);
        slot.take();
        Ok(())
    }

    fn __repr__(&self) -> String {
        format!(
            "LayerStreamer({:?}, device={}, layers={}{})",
            self.model_dir,
            self.config.device,
            self.num_layers,
            if self.closed() { ", closed" } else { "" }
        )
    }
}
