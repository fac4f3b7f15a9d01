//! PTX modules and kernel launches.

use std::ffi::{c_void, CString};
use std::sync::Arc;

use cudarc::driver::sys;

use super::{cuda_error, Context, Stream};
use crate::error::{Error, Result};

/// Size of the buffer the JIT compiler writes its error log into.
const JIT_LOG_BYTES: usize = 16 * 1024;

/// A loaded PTX module (`cuModuleLoadDataEx`), unloaded when it and every
/// [`Function`] taken from it are dropped.
#[derive(Clone)]
pub struct Module {
    inner: Arc<ModuleInner>,
}

struct ModuleInner {
    ctx: Context,
    /// Loaded in `load_ptx`, unloaded once in Drop.
    raw: sys::CUmodule,
}

// SAFETY: a CUmodule is a driver handle usable from any thread once its context
// is current, which every use (and Drop) arranges first.
unsafe impl Send for ModuleInner {}
// SAFETY: the handle is only read after creation.
unsafe impl Sync for ModuleInner {}

impl Module {
    /// JIT-compiles and loads PTX text in `ctx`. A PTX the driver rejects gives
    /// an [`Error::Cuda`] whose message carries the JIT compiler's error log.
    pub fn load_ptx(ctx: &Context, ptx: &str) -> Result<Module> {
        ctx.bind()?;
        let image = CString::new(ptx).map_err(|e| {
            Error::Input(format!(
                "PTX text contains a NUL byte at {}",
                e.nul_position()
            ))
        })?;
        let mut log = vec![0u8; JIT_LOG_BYTES];
        let mut options = [
            sys::CUjit_option::CU_JIT_ERROR_LOG_BUFFER,
            sys::CUjit_option::CU_JIT_ERROR_LOG_BUFFER_SIZE_BYTES,
        ];
        // The driver reads each option value as a pointer-sized word: a pointer
        // for the buffer, the size itself (not a pointer to it) for the length.
        let mut values = [
            log.as_mut_ptr().cast::<c_void>(),
            JIT_LOG_BYTES as *mut c_void,
        ];
        let mut raw: sys::CUmodule = std::ptr::null_mut();
        // SAFETY: image is NUL-terminated PTX alive for the call; options and
        // values are arrays of equal length alive for the call; log is writable
        // for JIT_LOG_BYTES bytes; the context is current.
        let res = unsafe {
            sys::cuModuleLoadDataEx(
                &mut raw,
                image.as_ptr().cast(),
                options.len() as u32,
                options.as_mut_ptr(),
                values.as_mut_ptr(),
            )
        };
        if res != sys::CUresult::CUDA_SUCCESS {
            let mut e = cuda_error("cuModuleLoadDataEx", res);
            let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
            let text = String::from_utf8_lossy(&log[..end]);
            if let Error::Cuda { message, .. } = &mut e {
                if text.trim().is_empty() {
                    message.push_str(" (the JIT compiler left no log)");
                } else {
                    message.push_str(&format!("; JIT log: {}", text.trim()));
                }
            }
            return Err(e);
        }
        Ok(Module {
            inner: Arc::new(ModuleInner {
                ctx: ctx.clone(),
                raw,
            }),
        })
    }

    /// The context the module is loaded in.
    pub fn context(&self) -> &Context {
        &self.inner.ctx
    }

    /// Looks up the kernel `name` (an `extern "C"` `__global__` function).
    pub fn function(&self, name: &str) -> Result<Function> {
        self.inner.ctx.bind()?;
        let cname = CString::new(name)
            .map_err(|_| Error::Input(format!("kernel name {name:?} contains a NUL byte")))?;
        let mut raw: sys::CUfunction = std::ptr::null_mut();
        // SAFETY: the module is loaded, cname is NUL-terminated and alive for the
        // call, the pointer is to a live local.
        let res = unsafe { sys::cuModuleGetFunction(&mut raw, self.inner.raw, cname.as_ptr()) };
        if res != sys::CUresult::CUDA_SUCCESS {
            let mut e = cuda_error("cuModuleGetFunction", res);
            if let Error::Cuda { message, .. } = &mut e {
                message.push_str(&format!(" (kernel {name:?})"));
            }
            return Err(e);
        }
        Ok(Function {
            module: self.inner.clone(),
            raw,
            name: name.to_string(),
        })
    }
}

impl std::fmt::Debug for Module {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Module")
            .field("raw", &self.inner.raw)
            .finish()
    }
}

impl Drop for ModuleInner {
    fn drop(&mut self) {
        if !self.ctx.bind_for_drop() {
            return;
        }
        // SAFETY: raw was loaded in this context and is unloaded only here, after
        // the last Function (which holds this Arc) is gone.
        let res = unsafe { sys::cuModuleUnload(self.raw) };
        self.ctx.record_drop_error("cuModuleUnload (in drop)", res);
    }
}

/// A kernel of a loaded [`Module`]; keeps the module loaded.
pub struct Function {
    module: Arc<ModuleInner>,
    /// Valid while `module` is loaded.
    raw: sys::CUfunction,
    name: String,
}

// SAFETY: a CUfunction is a driver handle usable from any thread once its
// context is current; launches of one function from several threads are
// allowed by the driver.
unsafe impl Send for Function {}
// SAFETY: the handle is only read after creation.
unsafe impl Sync for Function {}

impl Function {
    /// The kernel's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Queues the kernel on `stream` (`cuLaunchKernel`).
    ///
    /// `params` has one entry per kernel parameter, each a pointer to the
    /// argument's value (e.g. `&mut dev_ptr as *mut u64 as *mut c_void` for a
    /// pointer parameter); the driver copies the values before returning.
    ///
    /// # Safety
    /// `params` must match the kernel's signature in number, order and types,
    /// every pointer in it must be valid for the duration of the call, and every
    /// device address passed must be valid for all the accesses the kernel makes
    /// with these grid and block sizes until it completes.
    pub unsafe fn launch(
        &self,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        shared_mem: u32,
        stream: &Stream,
        params: &mut [*mut c_void],
    ) -> Result<()> {
        self.module
            .ctx
            .expect_same(stream.context(), "Function::launch")?;
        self.module.ctx.bind()?;
        // SAFETY: raw belongs to a loaded module of the current context; the
        // caller guarantees params match the kernel and stay valid; extra is null.
        let res = unsafe {
            sys::cuLaunchKernel(
                self.raw,
                grid.0,
                grid.1,
                grid.2,
                block.0,
                block.1,
                block.2,
                shared_mem,
                stream.raw(),
                params.as_mut_ptr(),
                std::ptr::null_mut(),
            )
        };
        if res != sys::CUresult::CUDA_SUCCESS {
            let mut e = cuda_error("cuLaunchKernel", res);
            if let Error::Cuda { message, .. } = &mut e {
                message.push_str(&format!(
                    " (kernel {}, grid {grid:?}, block {block:?})",
                    self.name
                ));
            }
            return Err(e);
        }
        Ok(())
    }
}

impl std::fmt::Debug for Function {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Function")
            .field("name", &self.name)
            .finish()
    }
}
