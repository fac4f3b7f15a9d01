//! cuBLAS, loaded at run time: the library search, a handle (RAII) and the
//! one GEMM the model needs.
//!
//! cudarc's own loader only tries the sonames of the CUDA version it was
//! built for (`libcublas.so.12`, not `.13`) and panics when none loads, so
//! the library is found and opened here, in the order the search module
//! lists (`LS_CUBLAS_PATH`, the dynamic loader, the CUDA toolkit, and the
//! `nvidia` pip packages only when asked with `LS_CUBLAS_PIP` or
//! [`add_site_packages`]); no program is run to find it. The few functions
//! used are looked up by name; their C signatures (and cudarc's
//! `cublas::sys` types) are the same in cuBLAS 12 and 13.

use std::ffi::{c_int, c_void};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use cudarc::cublas::sys as cb;
use cudarc::driver::sys::CUstream;

use super::cublas_search as search;
pub use super::cublas_search::add_site_packages;
use super::cublaslt::{self, GemmKey, Lt, LtFns};
use super::{Context, Stream};
use crate::{Error, Result};

type CreateFn = unsafe extern "C" fn(*mut cb::cublasHandle_t) -> u32;
type DestroyFn = unsafe extern "C" fn(cb::cublasHandle_t) -> u32;
type SetStreamFn = unsafe extern "C" fn(cb::cublasHandle_t, *mut c_void) -> u32;
#[allow(clippy::type_complexity)]
type GemmExFn = unsafe extern "C" fn(
    cb::cublasHandle_t,
    u32,
    u32,
    c_int,
    c_int,
    c_int,
    *const c_void,
    *const c_void,
    u32,
    c_int,
    *const c_void,
    u32,
    c_int,
    *const c_void,
    *mut c_void,
    u32,
    c_int,
    u32,
    c_int,
) -> u32;

/// The loaded library and its functions.
struct Lib {
    path: PathBuf,
    create: CreateFn,
    destroy: DestroyFn,
    set_stream: SetStreamFn,
    gemm_ex: GemmExFn,
    /// cuBLASLt's matmul, when its library loaded next to cuBLAS's.
    lt: Option<LtFns>,
    // Kept loaded for the process's lifetime (the function pointers point into it).
    _libs: Vec<libloading::Library>,
}

fn lib() -> Result<&'static Lib> {
    static LIB: OnceLock<std::result::Result<Lib, String>> = OnceLock::new();
    LIB.get_or_init(load)
        .as_ref()
        .map_err(|e| Error::CudaUnavailable(e.clone()))
}

/// Whether cuBLAS can be loaded (never panics).
pub fn is_available() -> bool {
    lib().is_ok()
}

/// Where cuBLAS was loaded from, or why it could not be.
pub fn library_path() -> Result<PathBuf> {
    lib().map(|l| l.path.clone())
}

/// Opens cuBLAS at `path` and, first, the cuBLASLt of the same release
/// (from the same directory, or by the matching soname), returning
/// `[cuBLASLt?, cuBLAS]`.
fn open(path: &Path) -> std::result::Result<Vec<libloading::Library>, String> {
    use libloading::os::unix::{Library, RTLD_GLOBAL, RTLD_NOW};
    let mut libs = Vec::new();
    // cuBLAS needs cuBLASLt of the same release: open it first, so that a
    // library outside the loader's path resolves.
    if let Some(name) = path.file_name().and_then(|n| n.to_str()) {
        let lt = path.with_file_name(name.replace("libcublas", "libcublasLt"));
        let by_soname = path.parent().is_none_or(|d| d.as_os_str().is_empty());
        if by_soname || lt.exists() {
            // SAFETY: loading a shared library runs its initialisers;
            // cuBLASLt's have no preconditions on the caller.
            if let Ok(l) = unsafe { Library::open(Some(&lt), RTLD_NOW | RTLD_GLOBAL) } {
                libs.push(l.into());
            }
        }
    }
    // SAFETY: as above, for cuBLAS itself.
    let l = unsafe { Library::open(Some(path), RTLD_NOW | RTLD_GLOBAL) }
        .map_err(|e| format!("{}: {e}", path.display()))?;
    libs.push(l.into());
    Ok(libs)
}

fn symbols(path: PathBuf, libs: Vec<libloading::Library>) -> std::result::Result<Lib, String> {
    let main = libs.last().ok_or("no library")?;
    macro_rules! sym {
        ($name:literal, $ty:ty) => {
            // SAFETY: the symbol is cuBLAS's exported C function of this name,
            // whose signature is `$ty` (cublas_api.h, the same in 12 and 13).
            *unsafe { main.get::<$ty>($name) }.map_err(|e| format!("{}: {e}", path.display()))?
        };
    }
    Ok(Lib {
        create: sym!(b"cublasCreate_v2", CreateFn),
        destroy: sym!(b"cublasDestroy_v2", DestroyFn),
        set_stream: sym!(b"cublasSetStream_v2", SetStreamFn),
        gemm_ex: sym!(b"cublasGemmEx", GemmExFn),
        // Without cuBLASLt (or its functions) every GEMM uses cublasGemmEx.
        lt: (libs.len() > 1)
            .then(|| LtFns::load(&libs[0]).ok())
            .flatten(),
        path,
        _libs: libs,
    })
}

fn load() -> std::result::Result<Lib, String> {
    let env = |k: &str| std::env::var_os(k);
    let cands = search::candidates(&env, &search::registered_site_packages());
    let mut failures = Vec::new();
    for c in &cands {
        let by_soname = c.path.parent().is_none_or(|d| d.as_os_str().is_empty());
        if !by_soname && !c.path.exists() {
            if c.origin == "LS_CUBLAS_PATH" {
                failures.push(format!(
                    "{} (LS_CUBLAS_PATH) does not exist",
                    c.path.display()
                ));
            }
            continue;
        }
        match open(&c.path).and_then(|libs| symbols(c.path.clone(), libs)) {
            Ok(lib) => return Ok(lib),
            // The loader not finding a soname is the expected miss, not news.
            Err(e) if by_soname && e.contains("cannot open shared object file") => {}
            Err(e) => failures.push(e),
        }
    }
    Err(search::not_found(&cands, &failures))
}

/// Element types of GEMM operands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GemmType {
    /// bfloat16.
    BF16,
    /// IEEE half.
    F16,
    /// float32.
    F32,
}

impl GemmType {
    /// The 16-bit type GEMM inputs of a model computing in `dtype` take:
    /// f16 for f16, else bf16.
    pub(crate) fn half_of(dtype: crate::DType) -> GemmType {
        if dtype == crate::DType::F16 {
            GemmType::F16
        } else {
            GemmType::BF16
        }
    }

    pub(super) fn cuda(self) -> u32 {
        match self {
            GemmType::BF16 => cb::cudaDataType_t::CUDA_R_16BF as u32,
            GemmType::F16 => cb::cudaDataType_t::CUDA_R_16F as u32,
            GemmType::F32 => cb::cudaDataType_t::CUDA_R_32F as u32,
        }
    }
}

/// A cuBLAS handle bound to one context, with a cuBLASLt handle (made on
/// the first GEMM) that runs the GEMMs it has an algorithm for.
pub struct Cublas {
    handle: cb::cublasHandle_t,
    ctx: Context,
    lib: &'static Lib,
    /// The stream set by [`Cublas::set_stream`] (null: the default stream).
    stream: CUstream,
    lt: Option<Lt>,
    /// Whether cuBLASLt is used (loaded, and not turned off by `LS_CUBLASLT=0`).
    use_lt: bool,
}

// SAFETY: cuBLAS and cuBLASLt handles (and the stream handle kept for
// cuBLASLt) may be used from any thread as long as calls on them are not
// concurrent; `Cublas` needs `&mut self` for every call.
unsafe impl Send for Cublas {}

impl Cublas {
    /// Loads cuBLAS (once per process) and creates a handle in `ctx`.
    pub fn new(ctx: &Context) -> Result<Cublas> {
        let lib = lib()?;
        ctx.bind()?;
        let mut handle: cb::cublasHandle_t = std::ptr::null_mut();
        // SAFETY: the pointer is to a live local; ctx is current on this thread.
        status("cublasCreate", unsafe { (lib.create)(&mut handle) })?;
        Ok(Cublas {
            handle,
            ctx: ctx.clone(),
            lib,
            stream: std::ptr::null_mut(),
            lt: None,
            use_lt: lib.lt.is_some() && cublaslt::enabled(),
        })
    }

    /// Makes later calls run on `stream`.
    pub fn set_stream(&mut self, stream: &Stream) -> Result<()> {
        self.ctx.bind()?;
        // SAFETY: the handle is live; a CUstream is a cudaStream_t.
        status("cublasSetStream", unsafe {
            (self.lib.set_stream)(self.handle, stream.raw().cast())
        })?;
        self.stream = stream.raw();
        Ok(())
    }

    /// Whether GEMMs go through cuBLASLt (else `cublasGemmEx`).
    pub fn uses_cublaslt(&self) -> bool {
        self.use_lt
    }

    /// Sends later GEMMs through cuBLASLt (`true`, where it loaded) or
    /// `cublasGemmEx` (`false`); returns whether cuBLASLt is now used.
    pub fn set_cublaslt(&mut self, on: bool) -> bool {
        self.use_lt = on && self.lib.lt.is_some();
        self.use_lt
    }

    /// Queues `Y = alpha · X · Wᵀ + beta · Y` on the handle's stream, with
    /// row-major `X [rows, k]` (type `xw`), `W [n, k]` (type `xw`) and
    /// `Y [rows, n]` (type `y`), computed in f32.
    ///
    /// # Safety
    /// `x`, `w` and `y` are device addresses of the handle's context valid for
    /// those shapes until the queued work completes.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn linear(
        &mut self,
        x: u64,
        w: u64,
        xw: GemmType,
        y: u64,
        yt: GemmType,
        rows: usize,
        n: usize,
        k: usize,
        beta: f32,
    ) -> Result<()> {
        // SAFETY: forwarded from the caller; rows of `Y` are `n` apart.
        unsafe { self.linear_ld(x, w, xw, y, yt, rows, n, k, beta, n) }
    }

    /// [`linear`](Self::linear) into the first `n` columns of a row-major
    /// `Y` whose rows are `ldy >= n` elements apart: the other columns are
    /// neither read nor written.
    ///
    /// # Safety
    /// As for [`linear`](Self::linear), with `y` valid for `rows` rows of
    /// `ldy` elements.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn linear_ld(
        &mut self,
        x: u64,
        w: u64,
        xw: GemmType,
        y: u64,
        yt: GemmType,
        rows: usize,
        n: usize,
        k: usize,
        beta: f32,
        ldy: usize,
    ) -> Result<()> {
        let dim = |v: usize| {
            c_int::try_from(v)
                .map_err(|_| Error::Input(format!("GEMM dimension {v} exceeds a C int")))
        };
        if ldy < n {
            return Err(Error::Input(format!(
                "GEMM output rows of {ldy} elements cannot hold {n} columns"
            )));
        }
        let (m_, n_, k_, ld_) = (dim(n)?, dim(rows)?, dim(k)?, dim(ldy)?);
        let alpha = 1.0f32;
        self.ctx.bind()?;
        // SAFETY: forwarded from the caller; the stream is the handle's.
        if unsafe { self.linear_lt(x, w, xw, y, yt, (rows, n, k, ldy), beta)? } {
            return Ok(());
        }
        // Column-major view: Y_cm [n, rows] = W_cm[k, n]ᵀ · X_cm[k, rows].
        // SAFETY: the handle is live; scalars point to live locals (host
        // pointer mode, the default); operands are the caller's contract.
        status("cublasGemmEx", unsafe {
            (self.lib.gemm_ex)(
                self.handle,
                cb::cublasOperation_t::CUBLAS_OP_T as u32,
                cb::cublasOperation_t::CUBLAS_OP_N as u32,
                m_,
                n_,
                k_,
                (&alpha as *const f32).cast(),
                w as *const c_void,
                xw.cuda(),
                k_,
                x as *const c_void,
                xw.cuda(),
                k_,
                (&beta as *const f32).cast(),
                y as *mut c_void,
                yt.cuda(),
                ld_,
                cb::cublasComputeType_t::CUBLAS_COMPUTE_32F as u32,
                cb::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT as c_int,
            )
        })
    }
}

impl Cublas {
    /// [`Cublas::linear_ld`] through cuBLASLt; `Ok(false)` when it is off or
    /// has no algorithm for the GEMM.
    ///
    /// # Safety
    /// As for [`Cublas::linear`]; the context is current.
    #[allow(clippy::too_many_arguments)]
    unsafe fn linear_lt(
        &mut self,
        x: u64,
        w: u64,
        xw: GemmType,
        y: u64,
        yt: GemmType,
        (rows, n, k, ldy): (usize, usize, usize, usize),
        beta: f32,
    ) -> Result<bool> {
        let Some(fns) = self.lib.lt.as_ref().filter(|_| self.use_lt) else {
            return Ok(false);
        };
        if self.lt.is_none() {
            self.lt = Some(Lt::new(&self.ctx, fns)?);
        }
        let lt = self.lt.as_mut().expect("made above");
        let key = GemmKey {
            xw,
            yt,
            rows,
            n,
            k,
            ldy,
            align: [x, w, y].map(cublaslt::alignment),
        };
        // SAFETY: forwarded from the caller; the key states the operands'
        // real alignments; the stream is the one set on this handle.
        unsafe { lt.linear(&self.ctx, key, self.stream, (x, w, y), beta) }
    }
}

impl Drop for Cublas {
    fn drop(&mut self) {
        if self.ctx.bind().is_ok() {
            self.lt = None;
            // SAFETY: the handle is live and not used again.
            let _ = unsafe { (self.lib.destroy)(self.handle) };
        }
    }
}

/// A cuBLAS or cuBLASLt status as a result naming the call.
pub(super) fn status(call: &str, s: u32) -> Result<()> {
    if s == 0 {
        Ok(())
    } else {
        Err(Error::Pipeline(format!(
            "{call} failed with cuBLAS status {s}"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_library_is_an_error_not_a_panic() {
        // Either outcome is fine; what matters is that asking never panics.
        // With LS_CUBLAS_PATH set, the library there must load (no driver needed).
        match library_path() {
            Ok(p) => eprintln!("cuBLAS from {}", p.display()),
            Err(e) if std::env::var_os("LS_CUBLAS_PATH").is_some() => panic!("{e}"),
            Err(e) => eprintln!("{e}"),
        }
    }
}
