//! Thin RAII over the raw CUDA driver API (`cudarc::driver::sys`, loaded at run time).
//!
//! `libcuda` is loaded on first use. cudarc's loader panics when the library is
//! missing, so every entry point here first asks [`check_available`], which
//! looks for the library without touching any driver function and then runs
//! `cuInit(0)` once; absence becomes [`Error::CudaUnavailable`].
//!
//! Every driver call goes through one checked helper that turns a failing
//! `CUresult` into [`Error::Cuda`] with the driver's own name and description
//! of the error. Every object makes its context current on the calling thread
//! before calling the driver, so it can be used (and dropped) from any thread.
//! Errors in `Drop` cannot be returned: they are recorded in the context (or,
//! for the context itself, process-wide) and returned by the next fallible call.
//!
//! ```no_run
//! use layer_streamer::cuda::{self, Context, DeviceBuffer, Event, Stream};
//! # fn main() -> layer_streamer::Result<()> {
//! if !cuda::is_available() {
//!     return Ok(());
//! }
//! let ctx = Context::new(0)?;
//! let stream = Stream::new(&ctx)?;
//! let buf = DeviceBuffer::alloc(&ctx, 1 << 20)?;
//! buf.memset_zero()?;
//! let done = Event::new(&ctx, false)?;
//! done.record(&stream)?;
//! done.synchronize()?;
//! # Ok(()) }
//! ```

mod context;
mod copy2d;
pub mod cublas;
mod cublas_search;
mod cublaslt;
mod memory;
mod module;
mod stream;

use std::ffi::CStr;
use std::sync::{Mutex, OnceLock};

use cudarc::driver::sys;

use crate::error::{Error, Result};

pub use context::Context;
pub use copy2d::{
    max_copy_pitch, memcpy_2d_dtod_async, memcpy_2d_dtoh_async, memcpy_2d_htod_async, Rect2d,
};
pub use memory::{
    memcpy_dtod_async, memcpy_dtoh_async, memcpy_htod_async, DeviceBuffer, HostRegistration,
};
pub use module::{Function, Module};
pub use stream::{Event, Stream};

/// Oldest driver API this crate calls (CUDA 12.0, as `cuDriverGetVersion` reports it).
const MIN_DRIVER_VERSION: i32 = 12000;

/// Whether a usable CUDA driver is present: `libcuda` loads, `cuInit(0)`
/// succeeds and the driver supports CUDA 12.0 or newer. Never panics; the
/// outcome is computed once per process.
pub fn is_available() -> bool {
    check_available().is_ok()
}

/// `Ok` when a usable CUDA driver is present, else [`Error::CudaUnavailable`]
/// saying why. Never panics; the outcome is computed once per process.
pub fn check_available() -> Result<()> {
    static INIT: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    INIT.get_or_init(init_driver)
        .clone()
        .map_err(Error::CudaUnavailable)
}

fn init_driver() -> std::result::Result<(), String> {
    // The loader and the symbol lookups of cudarc panic on failure; keep any such
    // panic inside the availability check instead of unwinding into the caller.
    let outcome = std::panic::catch_unwind(|| {
        // SAFETY: is_culib_present only tries to dlopen the candidate library
        // names and closes them again; it calls no driver function.
        if !unsafe { sys::is_culib_present() } {
            return Err(
                "libcuda.so could not be loaded (is the NVIDIA driver installed?)".to_string(),
            );
        }
        // SAFETY: cuInit takes a flags value that must be 0 and has no other preconditions.
        let res = unsafe { sys::cuInit(0) };
        if res != sys::CUresult::CUDA_SUCCESS {
            return Err(format!(
                "cuInit failed: {} ({}): {}",
                error_name(res),
                res as u32,
                error_string(res)
            ));
        }
        let mut version = 0;
        // SAFETY: the pointer is to a live local i32 the driver writes once.
        let res = unsafe { sys::cuDriverGetVersion(&mut version) };
        if res != sys::CUresult::CUDA_SUCCESS {
            return Err(format!("cuDriverGetVersion failed: {}", error_name(res)));
        }
        if version < MIN_DRIVER_VERSION {
            return Err(format!(
                "the driver supports CUDA {}.{}, but CUDA 12.0 or newer is needed",
                version / 1000,
                version % 1000 / 10
            ));
        }
        Ok(())
    });
    outcome.unwrap_or_else(|_| Err("loading the CUDA driver library panicked".to_string()))
}

/// Number of CUDA devices.
pub fn device_count() -> Result<usize> {
    check_available()?;
    let mut n = 0;
    // SAFETY: the driver is initialised (check_available) and the pointer is to a live local.
    check("cuDeviceGetCount", unsafe { sys::cuDeviceGetCount(&mut n) })?;
    Ok(n.max(0) as usize)
}

/// The CUDA version the driver supports, as (major, minor), e.g. (13, 0).
pub fn driver_version() -> Result<(u32, u32)> {
    check_available()?;
    let mut v = 0;
    // SAFETY: the driver library is loaded (check_available) and the pointer is to a live local.
    check("cuDriverGetVersion", unsafe {
        sys::cuDriverGetVersion(&mut v)
    })?;
    let v = v.max(0) as u32;
    Ok((v / 1000, v % 1000 / 10))
}

/// Maps a `CUresult` to `Ok` or to [`Error::Cuda`] naming `call`.
pub(crate) fn check(call: &'static str, res: sys::CUresult) -> Result<()> {
    if res == sys::CUresult::CUDA_SUCCESS {
        Ok(())
    } else {
        Err(cuda_error(call, res))
    }
}

/// The [`Error::Cuda`] for a failed `call`.
pub(crate) fn cuda_error(call: &'static str, res: sys::CUresult) -> Error {
    Error::Cuda {
        call,
        code: res as u32,
        name: error_name(res),
        message: error_string(res),
    }
}

/// The driver's name for `res`, e.g. `CUDA_ERROR_OUT_OF_MEMORY`.
fn error_name(res: sys::CUresult) -> String {
    let mut p = std::ptr::null();
    // SAFETY: cuGetErrorName needs no initialisation; it stores a pointer to a
    // static NUL-terminated string (or leaves p null for an unknown code).
    let ok = unsafe { sys::cuGetErrorName(res, &mut p) } == sys::CUresult::CUDA_SUCCESS;
    if ok && !p.is_null() {
        // SAFETY: the driver returned a valid, static, NUL-terminated string.
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    } else {
        format!("{res:?}")
    }
}

/// The driver's description of `res`.
fn error_string(res: sys::CUresult) -> String {
    let mut p = std::ptr::null();
    // SAFETY: as in error_name: the driver stores a pointer to a static string.
    let ok = unsafe { sys::cuGetErrorString(res, &mut p) } == sys::CUresult::CUDA_SUCCESS;
    if ok && !p.is_null() {
        // SAFETY: the driver returned a valid, static, NUL-terminated string.
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    } else {
        "unknown error".to_string()
    }
}

/// A failed driver call that happened in `Drop`, kept until a fallible call can return it.
#[derive(Debug, Default)]
pub(crate) struct DeferredError(Mutex<Option<(&'static str, sys::CUresult)>>);

impl DeferredError {
    /// Records `res` from `call` unless it is a success. The first error wins:
    /// later ones are usually consequences of it.
    pub(crate) fn record(&self, call: &'static str, res: sys::CUresult) {
        if res == sys::CUresult::CUDA_SUCCESS {
            return;
        }
        let mut slot = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some((call, res));
        }
    }

    /// Returns (and clears) the recorded error, if any.
    pub(crate) fn take(&self) -> Result<()> {
        let taken = self.0.lock().unwrap_or_else(|p| p.into_inner()).take();
        match taken {
            Some((call, res)) => Err(cuda_error(call, res)),
            None => Ok(()),
        }
    }
}

/// Errors from dropping the last handle of a context, which has nowhere else to
/// record them. Reported by the next [`Context::new`].
pub(crate) fn process_deferred() -> &'static DeferredError {
    static SLOT: OnceLock<DeferredError> = OnceLock::new();
    SLOT.get_or_init(DeferredError::default)
}

/// Whether libcuda exports `name` (a NUL-terminated symbol name).
///
/// cudarc panics on a missing symbol, so functions newer than CUDA 12.0 are
/// looked up here before they are called.
pub(crate) fn has_symbol(name: &[u8]) -> bool {
    if check_available().is_err() {
        return false;
    }
    // SAFETY: the library is present (check_available), so culib() loads it
    // without panicking; `get` only looks the symbol up and the returned value is
    // not called here.
    unsafe { sys::culib().get::<*const std::ffi::c_void>(name).is_ok() }
}
