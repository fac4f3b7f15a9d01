//! `Tensor`: a weight as Python sees it, handed over zero-copy through
//! DLPack (`__dlpack__`, `__dlpack_device__`).
//!
//! A layer's views are valid only while its layer function runs: each view
//! carries the generation of the layer it was made for, and the streamer's
//! clock moves on when the layer function returns (and when the streamer is
//! closed), so any later use raises `StaleTensorError` instead of reading a
//! slot that now holds another layer. A DLPack export holds the streamer's
//! memory alive until the consumer deletes it, so even a consumer tensor kept
//! too long never points at freed memory (it aliases a recycled slot: copy
//! what must outlive the layer). Static tensors own their memory and are
//! valid for as long as they (or an export of them) live.

use std::ffi::c_void;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use dlpark::ffi::{
    DLDataType, DLDataTypeCode, DLDevice, DLManagedTensor, DLManagedTensorVersioned,
};
use dlpark::metadata::Dynamic;
use dlpark::python::{export_dlpack, CudaStreamRequest, DlpackExporter, ExportRequest};
use dlpark::{DlpackFlags, Managed, ManagedTensorBase};
use layer_streamer::{DType, DeviceTensor, TensorView};
use pyo3::exceptions::{PyBufferError, PyTypeError};
use pyo3::prelude::*;
use pyo3::types::PyTuple;

use crate::errors::StaleTensorError;
use crate::streamer::Core;

/// What a [`Tensor`] describes.
#[derive(Clone)]
pub(crate) struct Desc {
    ptr: u64,
    shape: Vec<usize>,
    dtype: DType,
    bytes: u64,
    name: String,
    key: Option<String>,
}

impl Desc {
    /// A layer's tensor, as the pipeline hands it over. (The one place that
    /// reads a `TensorView`.)
    pub(crate) fn of_view(v: &TensorView<'_>) -> Desc {
        Desc {
            ptr: v.ptr(),
            shape: match v.quant() {
                // Stored blocks travel as their bytes: a flat u8 array.
                Some(_) => vec![v.bytes() as usize],
                None => v.shape().to_vec(),
            },
            dtype: v.dtype(),
            bytes: v.bytes(),
            name: v.name().to_string(),
            key: Some(v.key().to_string()),
        }
    }

    /// The key inside the layer; empty for a static tensor.
    pub(crate) fn key(&self) -> &str {
        self.key.as_deref().unwrap_or_default()
    }

    /// A static tensor.
    pub(crate) fn of_static(t: &DeviceTensor) -> Desc {
        Desc {
            ptr: t.ptr(),
            shape: t.shape().to_vec(),
            dtype: t.dtype(),
            bytes: t.bytes(),
            name: t.name().to_string(),
            key: None,
        }
    }
}

/// Whether a layer's view is still usable: `gen` is the streamer's clock
/// when its layer function was called; the clock moves on when it returns.
pub(crate) struct Lease {
    pub(crate) clock: Arc<AtomicU64>,
    pub(crate) gen: u64,
    pub(crate) layer: usize,
    pub(crate) core: Weak<Core>,
}

impl Lease {
    fn is_live(&self) -> bool {
        // Acquire pairs with the Release of the clock's bump: once the bump
        // is seen, the slot may already hold another layer.
        self.clock.load(Ordering::Acquire) == self.gen
    }
}

/// Whose memory a tensor is, and so what an export must keep alive.
enum Source {
    /// A static tensor: its own allocation.
    Static(Arc<DeviceTensor>),
    /// A layer's view into a slot or cache of the streamer.
    Layer(Lease),
}

/// Held by a DLPack export's deleter context: the memory it points into.
enum KeepAlive {
    Static(#[allow(dead_code)] Arc<DeviceTensor>),
    Layer(#[allow(dead_code)] Arc<Core>),
}

/// One tensor on the streamer's device: a layer weight (valid only inside
/// the layer function) or a static tensor from `load_static`.
///
/// Hand it to `torch.from_dlpack`, `cupy.from_dlpack`, `jax.dlpack.from_dlpack`
/// or (host backend) `numpy.from_dlpack`; no bytes are copied. NumPy has no
/// bf16: use `.numpy()`, which gives bf16 as uint16 bit patterns (or float32).
#[pyclass(frozen, module = "layer_streamer", name = "Tensor")]
pub struct Tensor {
    desc: Desc,
    /// The element type as exported (bit patterns for `_bits()` views).
    dl: DLDataType,
    device: DLDevice,
    source: Source,
}

impl Tensor {
    /// A view of a layer's weight, valid while `clock` stays at `gen`.
    pub(crate) fn layer_view(desc: Desc, device: DLDevice, lease: Lease) -> Tensor {
        Tensor {
            dl: dl_dtype(desc.dtype),
            desc,
            device,
            source: Source::Layer(lease),
        }
    }

    /// A static tensor that owns its memory.
    pub(crate) fn owned(t: DeviceTensor, device: DLDevice) -> Tensor {
        let desc = Desc::of_static(&t);
        Tensor {
            dl: dl_dtype(desc.dtype),
            desc,
            device,
            source: Source::Static(Arc::new(t)),
        }
    }

    fn check(&self) -> PyResult<()> {
        match &self.source {
            Source::Layer(l) if !l.is_live() => Err(StaleTensorError::new_err(format!(
                "{} (layer {}) was used after its layer function returned: weight views \
                 are valid only inside layer_fn; copy what must outlive it",
                self.desc.name, l.layer
            ))),
            _ => Ok(()),
        }
    }

    fn keep_alive(&self) -> PyResult<KeepAlive> {
        Ok(match &self.source {
            Source::Static(t) => KeepAlive::Static(Arc::clone(t)),
            Source::Layer(l) => KeepAlive::Layer(l.core.upgrade().ok_or_else(|| {
                StaleTensorError::new_err(format!("{}: the streamer was closed", self.desc.name))
            })?),
        })
    }

    /// A managed DLPack tensor over this tensor's memory whose context keeps
    /// that memory alive.
    fn managed<M: ManagedTensorBase>(&self) -> PyResult<Managed<M>> {
        let keep = self.keep_alive()?;
        let shape: Vec<i64> = self.desc.shape.iter().map(|&d| d as i64).collect();
        let mut init = Dynamic::compact(shape)
            .initialize_as::<M>(Box::new(keep))
            .map_err(|e| PyBufferError::new_err(format!("{}: {e}", self.desc.name)))?;
        init.set_data(self.desc.ptr as *mut c_void)
            .set_device(self.device)
            .set_dtype(self.dl);
        // SAFETY: the data pointer is the start of `numel` contiguous elements
        // of `dl` on `device` (the pipeline's or the static tensor's memory);
        // that memory stays allocated while the context (`keep`, an Arc on its
        // owner) lives, which is until the consumer calls the deleter. The
        // compact strides describe exactly that layout; no flags are claimed.
        Ok(unsafe { init.finish() })
    }
}

/// A borrowed [`Tensor`] as dlpark's exporter.
struct Exporter<'a>(&'a Tensor);

impl DlpackExporter for Exporter<'_> {
    fn device(&self) -> DLDevice {
        self.0.device
    }

    fn flags(&self) -> DlpackFlags {
        DlpackFlags::empty()
    }

    fn prepare_export(&self, _py: Python<'_>, request: &ExportRequest<'_>) -> PyResult<()> {
        self.0.check()?;
        let Source::Layer(lease) = &self.0.source else {
            // Static tensors are complete (loaded synchronously) on every stream.
            return Ok(());
        };
        if self.0.device.device_type != dlpark::ffi::DLDeviceType::CUDA {
            return Ok(());
        }
        let target = match request.cuda_stream()? {
            CudaStreamRequest::NoSync => return Ok(()),
            CudaStreamRequest::Omitted | CudaStreamRequest::LegacyDefault => 1,
            CudaStreamRequest::PerThreadDefault => 2,
            CudaStreamRequest::Pointer(p) => p,
        };
        match lease.core.upgrade() {
            Some(core) => core.order_after_compute(target),
            None => Ok(()),
        }
    }

    fn export_legacy(&self, _py: Python<'_>) -> PyResult<Managed<DLManagedTensor>> {
        self.0.managed()
    }

    fn export_versioned(&self, _py: Python<'_>) -> PyResult<Managed<DLManagedTensorVersioned>> {
        self.0.managed()
    }
}

#[pymethods]
impl Tensor {
    /// The tensor's full name in the checkpoint.
    #[getter]
    fn name(&self) -> &str {
        &self.desc.name
    }

    /// The key inside its layer (e.g. `mlp.up_proj.weight`); None for a static tensor.
    #[getter]
    fn key(&self) -> Option<&str> {
        self.desc.key.as_deref()
    }

    /// The layer index; None for a static tensor.
    #[getter]
    fn layer(&self) -> Option<usize> {
        match &self.source {
            Source::Layer(l) => Some(l.layer),
            Source::Static(_) => None,
        }
    }

    /// Shape, outermost first.
    #[getter]
    fn shape<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyTuple>> {
        PyTuple::new(py, &self.desc.shape)
    }

    /// Number of dimensions.
    #[getter]
    fn ndim(&self) -> usize {
        self.desc.shape.len()
    }

    /// Element type: `bf16`, `f16`, `f32`, `f64`, `i8`, `u8`, `i16`, `i32`,
    /// `i64`, `bool`, `f8_e4m3`, `f8_e5m2` (`u16`/`u8` for `_bits()` views).
    #[getter]
    fn dtype(&self) -> String {
        if self.dl == dl_dtype(self.desc.dtype) {
            self.desc.dtype.to_string()
        } else {
            format!("u{}", self.dl.bits)
        }
    }

    /// Bytes of the tensor.
    #[getter]
    fn nbytes(&self) -> u64 {
        self.desc.bytes
    }

    /// `cpu` (host backend) or `cuda:N`.
    #[getter]
    fn device(&self) -> String {
        if self.device.device_type == dlpark::ffi::DLDeviceType::CUDA {
            format!("cuda:{}", self.device.device_id)
        } else {
            "cpu".into()
        }
    }

    /// Whether the tensor may still be used (False once its layer function returned).
    #[getter]
    fn is_valid(&self) -> bool {
        self.check().is_ok()
    }

    /// The address of the first element (a device address on CUDA).
    fn data_ptr(&self) -> PyResult<u64> {
        self.check()?;
        Ok(self.desc.ptr)
    }

    /// DLPack export (the Python array API protocol).
    #[pyo3(signature = (*, stream=None, max_version=None, dl_device=None, copy=None))]
    fn __dlpack__(
        &self,
        py: Python<'_>,
        stream: Option<&Bound<'_, PyAny>>,
        max_version: Option<(u32, u32)>,
        dl_device: Option<(u32, i32)>,
        copy: Option<bool>,
    ) -> PyResult<Py<PyAny>> {
        self.check()?;
        let request = ExportRequest::parse(stream, max_version, dl_device, copy)?;
        export_dlpack(&Exporter(self), py, request)
    }

    /// `(device_type, device_id)`: `(1, 0)` on the host backend, `(2, N)` on CUDA.
    fn __dlpack_device__(&self) -> PyResult<(u32, i32)> {
        self.check()?;
        Ok((self.device.device_type.0, self.device.device_id))
    }

    /// The same memory typed as unsigned integers of the element's width
    /// (bf16 as u16, f8 as u8): for consumers without those dtypes.
    fn _bits(&self) -> PyResult<Tensor> {
        self.check()?;
        let bits = (self.desc.dtype.size() * 8) as u8;
        Ok(Tensor {
            desc: self.desc.clone(),
            dl: DLDataType::new(DLDataTypeCode::UINT, bits, 1),
            device: self.device,
            source: match &self.source {
                Source::Static(t) => Source::Static(Arc::clone(t)),
                Source::Layer(l) => Source::Layer(Lease {
                    clock: Arc::clone(&l.clock),
                    gen: l.gen,
                    layer: l.layer,
                    core: Weak::clone(&l.core),
                }),
            },
        })
    }

    /// A NumPy array over the same memory (host backend only), read-only.
    ///
    /// NumPy has no bf16: `bf16="uint16"` (the default) gives the bit
    /// patterns zero-copy (`(a.astype(np.uint32) << 16).view(np.float32)`
    /// widens them), `bf16="float32"` a widened copy. f8 types come as uint8.
    #[pyo3(signature = (*, bf16 = "uint16"))]
    fn numpy(slf: &Bound<'_, Self>, bf16: &str) -> PyResult<Py<PyAny>> {
        let py = slf.py();
        if slf.get().device.device_type == dlpark::ffi::DLDeviceType::CUDA {
            return Err(PyTypeError::new_err(format!(
                "{} is on {}: use torch.from_dlpack or cupy.from_dlpack",
                slf.get().desc.name,
                slf.get().device()
            )));
        }
        Ok(py
            .import("layer_streamer._numpy")?
            .call_method1("to_numpy", (slf, bf16))?
            .unbind())
    }

    fn __repr__(&self) -> String {
        let state = match &self.source {
            Source::Layer(l) if !l.is_live() => ", stale",
            _ => "",
        };
        format!(
            "Tensor({:?}, shape={:?}, dtype={}, device={}{state})",
            self.desc.name,
            self.desc.shape,
            self.dtype(),
            self.device()
        )
    }
}

/// The DLPack element type of a checkpoint dtype.
fn dl_dtype(d: DType) -> DLDataType {
    let (code, bits) = match d {
        DType::BF16 => (DLDataTypeCode::BFLOAT, 16),
        DType::F16 => (DLDataTypeCode::FLOAT, 16),
        DType::F32 => (DLDataTypeCode::FLOAT, 32),
        DType::F64 => (DLDataTypeCode::FLOAT, 64),
        DType::I8 => (DLDataTypeCode::INT, 8),
        DType::U8 => (DLDataTypeCode::UINT, 8),
        DType::I16 => (DLDataTypeCode::INT, 16),
        DType::I32 => (DLDataTypeCode::INT, 32),
        DType::I64 => (DLDataTypeCode::INT, 64),
        DType::Bool => (DLDataTypeCode::BOOL, 8),
        DType::F8E4M3 => (DLDataTypeCode::FLOAT8_E4M3FN, 8),
        DType::F8E5M2 => (DLDataTypeCode::FLOAT8_E5M2, 8),
    };
    DLDataType::new(code, bits, 1)
}
