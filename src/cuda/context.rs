//! The primary context of one device.

use std::ffi::CStr;
use std::sync::Arc;

use cudarc::driver::sys;

use super::{check, check_available, device_count, process_deferred, DeferredError};
use crate::error::{Error, Result};

/// The primary context of one CUDA device, retained for as long as any clone
/// (or any stream, event, buffer or module made from it) is alive.
///
/// Cheap to clone. Every method makes the context current on the calling
/// thread first, so a `Context` can be used from any thread.
#[derive(Clone)]
pub struct Context {
    inner: Arc<ContextInner>,
}

struct ContextInner {
    ordinal: usize,
    device: sys::CUdevice,
    /// Retained with cuDevicePrimaryCtxRetain; released once, in Drop.
    raw: sys::CUcontext,
    /// Errors from dropping objects of this context, reported by the next `bind`.
    deferred: DeferredError,
}

// SAFETY: a CUcontext is a driver handle valid on every thread (any thread can
// make it current); the struct has no thread-affine state of its own.
unsafe impl Send for ContextInner {}
// SAFETY: as for Send; shared access only reads the handle, and the deferred
// error slot is behind a Mutex.
unsafe impl Sync for ContextInner {}

impl Context {
    /// Retains the primary context of device `ordinal`.
    ///
    /// Returns [`Error::CudaUnavailable`] without a driver and [`Error::Config`]
    /// when there is no such device.
    pub fn new(ordinal: usize) -> Result<Context> {
        check_available()?;
        process_deferred().take()?;
        let count = device_count()?;
        if ordinal >= count {
            return Err(Error::config(format!(
                "CUDA device {ordinal} does not exist: the driver reports {count} device(s)"
            )));
        }
        let mut device: sys::CUdevice = 0;
        // SAFETY: the driver is initialised and ordinal < device count; the
        // pointer is to a live local.
        check("cuDeviceGet", unsafe {
            sys::cuDeviceGet(&mut device, ordinal as i32)
        })?;
        let mut raw: sys::CUcontext = std::ptr::null_mut();
        // SAFETY: device is a valid device handle; the pointer is to a live local.
        check("cuDevicePrimaryCtxRetain", unsafe {
            sys::cuDevicePrimaryCtxRetain(&mut raw, device)
        })?;
        let ctx = Context {
            inner: Arc::new(ContextInner {
                ordinal,
                device,
                raw,
                deferred: DeferredError::default(),
            }),
        };
        ctx.bind()?;
        Ok(ctx)
    }

    /// The device ordinal this context belongs to.
    pub fn ordinal(&self) -> usize {
        self.inner.ordinal
    }

    /// The raw driver handle.
    pub fn raw(&self) -> sys::CUcontext {
        self.inner.raw
    }

    /// The raw device handle.
    pub fn device(&self) -> sys::CUdevice {
        self.inner.device
    }

    /// Makes this context current on the calling thread (`cuCtxSetCurrent`).
    ///
    /// First returns any error recorded while dropping an object of this context.
    pub fn bind(&self) -> Result<()> {
        self.inner.deferred.take()?;
        // SAFETY: raw is a retained primary context, alive while self is.
        check("cuCtxSetCurrent", unsafe {
            sys::cuCtxSetCurrent(self.inner.raw)
        })
    }

    /// The device's name, e.g. "NVIDIA H100 80GB HBM3".
    pub fn name(&self) -> Result<String> {
        self.bind()?;
        let mut buf = [0 as std::ffi::c_char; 256];
        // SAFETY: buf is a live, writable buffer of the length passed; the driver
        // NUL-terminates what it writes.
        check("cuDeviceGetName", unsafe {
            sys::cuDeviceGetName(buf.as_mut_ptr(), buf.len() as i32, self.inner.device)
        })?;
        buf[buf.len() - 1] = 0;
        // SAFETY: buf is NUL-terminated (its last byte is forced to 0 above).
        Ok(unsafe { CStr::from_ptr(buf.as_ptr()) }
            .to_string_lossy()
            .into_owned())
    }

    /// Free and total device memory in bytes (`cuMemGetInfo`).
    pub fn mem_info(&self) -> Result<(u64, u64)> {
        self.bind()?;
        let (mut free, mut total) = (0usize, 0usize);
        // SAFETY: the context is current; both pointers are to live locals.
        check("cuMemGetInfo_v2", unsafe {
            sys::cuMemGetInfo_v2(&mut free, &mut total)
        })?;
        Ok((free as u64, total as u64))
    }

    /// Waits for all work in this context to finish.
    pub fn synchronize(&self) -> Result<()> {
        self.bind()?;
        // SAFETY: the context is current on this thread.
        check("cuCtxSynchronize", unsafe { sys::cuCtxSynchronize() })
    }

    /// The device's compute capability as (major, minor), e.g. (9, 0) for an H100.
    pub fn compute_capability(&self) -> Result<(u32, u32)> {
        use sys::CUdevice_attribute::{
            CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR as MAJOR,
            CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR as MINOR,
        };
        self.bind()?;
        let (mut major, mut minor) = (0, 0);
        // SAFETY: device is a valid device handle; the pointers are to live locals.
        check("cuDeviceGetAttribute", unsafe {
            sys::cuDeviceGetAttribute(&mut major, MAJOR, self.inner.device)
        })?;
        // SAFETY: as above.
        check("cuDeviceGetAttribute", unsafe {
            sys::cuDeviceGetAttribute(&mut minor, MINOR, self.inner.device)
        })?;
        Ok((major.max(0) as u32, minor.max(0) as u32))
    }

    /// Whether `self` and `other` are the same driver context (the primary
    /// context of the same device).
    pub fn same_as(&self, other: &Context) -> bool {
        self.inner.raw == other.inner.raw
    }

    /// Records an error from a `Drop` of an object of this context; the next
    /// fallible call on this context returns it.
    pub(crate) fn record_drop_error(&self, call: &'static str, res: sys::CUresult) {
        self.inner.deferred.record(call, res);
    }

    /// Makes the context current for a `Drop`, recording (not returning) a failure.
    /// Returns whether the context is current.
    pub(crate) fn bind_for_drop(&self) -> bool {
        // SAFETY: raw is a retained primary context, alive while self is.
        let res = unsafe { sys::cuCtxSetCurrent(self.inner.raw) };
        self.record_drop_error("cuCtxSetCurrent (in drop)", res);
        res == sys::CUresult::CUDA_SUCCESS
    }

    /// Fails with [`Error::Config`] unless `other` is this same context.
    pub(crate) fn expect_same(&self, other: &Context, what: &str) -> Result<()> {
        if self.same_as(other) {
            Ok(())
        } else {
            Err(Error::config(format!(
                "{what}: objects of device {} and device {} cannot be mixed",
                self.ordinal(),
                other.ordinal()
            )))
        }
    }
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("ordinal", &self.inner.ordinal)
            .field("raw", &self.inner.raw)
            .finish()
    }
}

impl Drop for ContextInner {
    fn drop(&mut self) {
        let mut current: sys::CUcontext = std::ptr::null_mut();
        // SAFETY: the pointer is to a live local; the driver is initialised
        // because this context was created.
        let res = unsafe { sys::cuCtxGetCurrent(&mut current) };
        if res == sys::CUresult::CUDA_SUCCESS && current == self.raw {
            // Leave no dangling current context on this thread once the primary
            // context may be destroyed.
            // SAFETY: a null context is always a valid argument.
            let res = unsafe { sys::cuCtxSetCurrent(std::ptr::null_mut()) };
            process_deferred().record("cuCtxSetCurrent (in drop)", res);
        }
        // SAFETY: this is the single release matching the retain in Context::new;
        // every object that uses the context holds a clone, so none is left.
        let res = unsafe { sys::cuDevicePrimaryCtxRelease_v2(self.device) };
        process_deferred().record("cuDevicePrimaryCtxRelease (in drop)", res);
    }
}
