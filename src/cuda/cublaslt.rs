//! cuBLASLt's matmul behind [`Cublas::linear`](super::cublas::Cublas::linear).
//!
//! `cublasGemmEx` picks its kernel by cuBLAS's legacy heuristics, which on
//! Hopper send every large GEMM with an f32 output to an sm80 CUTLASS kernel
//! (about a third of the card's bf16 rate), while cuBLASLt's heuristics pick
//! the Hopper kernels for the same call. So each GEMM asks cuBLASLt for its
//! best algorithm once per shape, types and operand alignment, keeps the
//! answer, and runs through `cublasLtMatmul` with a workspace of its own.
//! Where cuBLASLt is missing or offers no algorithm, the caller falls back to
//! `cublasGemmEx`; `LS_CUBLASLT=0` forces that fallback (for comparisons).
//!
//! Hopper's fast kernels load their tiles with the tensor memory accelerator,
//! which needs 16-byte aligned operands. A weight in a slot sits where the
//! checkpoint put it (safetensors aligns tensors to 8 bytes only), so a large
//! GEMM (at least [`COPY_ROWS`] activation rows, where the copy costs a
//! fraction of what it saves; any GEMM when the weight is not even 8-byte
//! aligned, which no kernel takes) with a misaligned weight copies the weight, a
//! chunk of rows at a time, into an aligned scratch buffer first and runs one
//! GEMM per chunk into the matching columns of the output.

use std::collections::HashMap;
use std::ffi::c_void;

use cudarc::cublas::sys as cb;
use cudarc::cublaslt::sys as lt;
use cudarc::driver::sys::CUstream;

use super::cublas::{status, GemmType};
use super::{Context, DeviceBuffer};
use crate::{Error, Result};

type CreateFn = unsafe extern "C" fn(*mut lt::cublasLtHandle_t) -> u32;
type DestroyFn = unsafe extern "C" fn(lt::cublasLtHandle_t) -> u32;
type DescCreateFn = unsafe extern "C" fn(*mut lt::cublasLtMatmulDesc_t, u32, u32) -> u32;
type DescDestroyFn = unsafe extern "C" fn(lt::cublasLtMatmulDesc_t) -> u32;
type DescSetFn = unsafe extern "C" fn(lt::cublasLtMatmulDesc_t, u32, *const c_void, usize) -> u32;
type LayoutCreateFn =
    unsafe extern "C" fn(*mut lt::cublasLtMatrixLayout_t, u32, u64, u64, i64) -> u32;
type LayoutDestroyFn = unsafe extern "C" fn(lt::cublasLtMatrixLayout_t) -> u32;
type PrefCreateFn = unsafe extern "C" fn(*mut lt::cublasLtMatmulPreference_t) -> u32;
type PrefDestroyFn = unsafe extern "C" fn(lt::cublasLtMatmulPreference_t) -> u32;
type PrefSetFn =
    unsafe extern "C" fn(lt::cublasLtMatmulPreference_t, u32, *const c_void, usize) -> u32;
#[allow(clippy::type_complexity)]
type HeuristicFn = unsafe extern "C" fn(
    lt::cublasLtHandle_t,
    lt::cublasLtMatmulDesc_t,
    lt::cublasLtMatrixLayout_t,
    lt::cublasLtMatrixLayout_t,
    lt::cublasLtMatrixLayout_t,
    lt::cublasLtMatrixLayout_t,
    lt::cublasLtMatmulPreference_t,
    i32,
    *mut lt::cublasLtMatmulHeuristicResult_t,
    *mut i32,
) -> u32;
#[allow(clippy::type_complexity)]
type MatmulFn = unsafe extern "C" fn(
    lt::cublasLtHandle_t,
    lt::cublasLtMatmulDesc_t,
    *const c_void,
    *const c_void,
    lt::cublasLtMatrixLayout_t,
    *const c_void,
    lt::cublasLtMatrixLayout_t,
    *const c_void,
    *const c_void,
    lt::cublasLtMatrixLayout_t,
    *mut c_void,
    lt::cublasLtMatrixLayout_t,
    *const lt::cublasLtMatmulAlgo_t,
    *mut c_void,
    usize,
    CUstream,
) -> u32;

/// cuBLASLt's functions, looked up in the library opened next to cuBLAS.
pub(super) struct LtFns {
    create: CreateFn,
    destroy: DestroyFn,
    desc_create: DescCreateFn,
    desc_destroy: DescDestroyFn,
    desc_set: DescSetFn,
    layout_create: LayoutCreateFn,
    layout_destroy: LayoutDestroyFn,
    pref_create: PrefCreateFn,
    pref_destroy: PrefDestroyFn,
    pref_set: PrefSetFn,
    heuristic: HeuristicFn,
    matmul: MatmulFn,
}

impl LtFns {
    /// Looks the functions up in `lib`, or says which one is missing.
    pub(super) fn load(lib: &libloading::Library) -> std::result::Result<LtFns, String> {
        macro_rules! sym {
            ($name:literal, $ty:ty) => {
                // SAFETY: the symbol is cuBLASLt's exported C function of this
                // name, whose signature is `$ty` (cublasLt.h, the same in 12 and 13).
                *unsafe { lib.get::<$ty>($name) }.map_err(|e| e.to_string())?
            };
        }
        Ok(LtFns {
            create: sym!(b"cublasLtCreate", CreateFn),
            destroy: sym!(b"cublasLtDestroy", DestroyFn),
            desc_create: sym!(b"cublasLtMatmulDescCreate", DescCreateFn),
            desc_destroy: sym!(b"cublasLtMatmulDescDestroy", DescDestroyFn),
            desc_set: sym!(b"cublasLtMatmulDescSetAttribute", DescSetFn),
            layout_create: sym!(b"cublasLtMatrixLayoutCreate", LayoutCreateFn),
            layout_destroy: sym!(b"cublasLtMatrixLayoutDestroy", LayoutDestroyFn),
            pref_create: sym!(b"cublasLtMatmulPreferenceCreate", PrefCreateFn),
            pref_destroy: sym!(b"cublasLtMatmulPreferenceDestroy", PrefDestroyFn),
            pref_set: sym!(b"cublasLtMatmulPreferenceSetAttribute", PrefSetFn),
            heuristic: sym!(b"cublasLtMatmulAlgoGetHeuristic", HeuristicFn),
            matmul: sym!(b"cublasLtMatmul", MatmulFn),
        })
    }
}

/// Whether `LS_CUBLASLT` leaves cuBLASLt on (anything but `0`).
pub(super) fn enabled() -> bool {
    std::env::var_os("LS_CUBLASLT").is_none_or(|v| v != "0")
}

/// Bytes of the workspace cuBLASLt may use (split-K partial sums and the like).
pub(super) const WORKSPACE: usize = 32 << 20;

/// Bytes of the aligned scratch for misaligned weights (a chunk of rows).
const SCRATCH: usize = 64 << 20;

/// Activation rows from which a misaligned weight is copied to the scratch.
pub(super) const COPY_ROWS: usize = 1024;

/// Alignment the Hopper kernels need of every operand.
const TMA_ALIGN: u32 = 16;

/// Plans kept before the cache starts over (each is a few hundred bytes of
/// host memory; the shapes of one model are a handful per batch size).
const MAX_PLANS: usize = 1024;

/// What a plan depends on: `Y [rows, n] (+)= X [rows, k] · W [n, k]ᵀ` with
/// these types and the operands' address alignments.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) struct GemmKey {
    pub xw: GemmType,
    pub yt: GemmType,
    pub rows: usize,
    pub n: usize,
    pub k: usize,
    /// Leading dimension of Y (elements between its rows; `n` unless the
    /// GEMM writes a band of Y's columns).
    pub ldy: usize,
    /// Alignment in bytes (a power of two, at most 256) of X, W and Y.
    pub align: [u32; 3],
}

/// The largest power of two (at most 256) dividing `addr`.
pub(super) fn alignment(addr: u64) -> u32 {
    if addr == 0 {
        256
    } else {
        1u32 << addr.trailing_zeros().min(8)
    }
}

/// A described matmul and the algorithm chosen for it (None: cuBLASLt had
/// none, use `cublasGemmEx`).
struct Plan {
    fns: &'static LtFns,
    desc: lt::cublasLtMatmulDesc_t,
    /// Layouts of W, X and Y (A, B and C = D in cuBLASLt's column-major terms).
    layouts: [lt::cublasLtMatrixLayout_t; 3],
    algo: Option<lt::cublasLtMatmulAlgo_t>,
}

impl Drop for Plan {
    fn drop(&mut self) {
        // SAFETY: the objects were created by these functions, are not null
        // (creation failures never make a Plan) and are not used again.
        unsafe {
            for l in self.layouts {
                (self.fns.layout_destroy)(l);
            }
            (self.fns.desc_destroy)(self.desc);
        }
    }
}

/// A cuBLASLt handle, its workspace and the plans chosen so far.
pub(super) struct Lt {
    fns: &'static LtFns,
    handle: lt::cublasLtHandle_t,
    workspace: DeviceBuffer,
    /// Aligned copies of misaligned weights (made on first need).
    scratch: Option<DeviceBuffer>,
    plans: HashMap<GemmKey, Plan>,
}

impl Lt {
    /// A handle and workspace in `ctx` (which the caller made current).
    pub(super) fn new(ctx: &Context, fns: &'static LtFns) -> Result<Lt> {
        let workspace = DeviceBuffer::alloc(ctx, WORKSPACE)?;
        let mut handle: lt::cublasLtHandle_t = std::ptr::null_mut();
        // SAFETY: the pointer is to a live local.
        status("cublasLtCreate", unsafe { (fns.create)(&mut handle) })?;
        Ok(Lt {
            fns,
            handle,
            workspace,
            scratch: None,
            plans: HashMap::new(),
        })
    }

    /// Queues the GEMM of `key` on `stream` if cuBLASLt has an algorithm for
    /// it, through the aligned scratch when the weight is misaligned and the
    /// GEMM large; `Ok(false)` when it has none (the caller uses
    /// `cublasGemmEx`).
    ///
    /// # Safety
    /// As for [`Lt::matmul`].
    pub(super) unsafe fn linear(
        &mut self,
        ctx: &Context,
        key: GemmKey,
        stream: CUstream,
        (x, w, y): (u64, u64, u64),
        beta: f32,
    ) -> Result<bool> {
        let aligned = key.align.iter().all(|&a| a >= TMA_ALIGN);
        let ysize = if key.yt == GemmType::F32 { 4 } else { 2 };
        let row_bytes = key.k * 2;
        // Whole chunks of 64 rows keep each band of Y 256-byte aligned.
        let chunk = (SCRATCH / row_bytes.max(1)) / 64 * 64;
        // Below 8 bytes no kernel takes the weight (cublasGemmEx refuses it
        // too), so it is copied at any size.
        let copy = !aligned
            && (key.rows >= COPY_ROWS || key.align[1] < 8)
            && key.align[0] >= TMA_ALIGN
            && key.align[2] >= TMA_ALIGN
            && row_bytes.is_multiple_of(TMA_ALIGN as usize)
            && chunk > 0;
        if !copy {
            // SAFETY: forwarded from the caller.
            return unsafe { self.matmul(key, stream, (x, w, y), beta) };
        }
        if self.scratch.is_none() {
            self.scratch = Some(DeviceBuffer::alloc(ctx, SCRATCH)?);
        }
        let scratch = self.scratch.as_ref().expect("made above").ptr();
        for j0 in (0..key.n).step_by(chunk) {
            let n = chunk.min(key.n - j0);
            let band = GemmKey {
                n,
                align: [key.align[0], 256, alignment(y + (j0 * ysize) as u64)],
                ..key
            };
            // SAFETY: the weight's rows [j0, j0 + n) are device memory of
            // this context (the caller's contract) and the scratch holds
            // `chunk` rows; the copy and the GEMM after it are queued in
            // order on `stream`, so the next chunk's copy waits for this GEMM.
            unsafe {
                crate::cuda::check(
                    "cuMemcpyDtoDAsync_v2",
                    cudarc::driver::sys::cuMemcpyDtoDAsync_v2(
                        scratch,
                        w + (j0 * row_bytes) as u64,
                        n * row_bytes,
                        stream,
                    ),
                )?;
                let yb = y + (j0 * ysize) as u64;
                if !self.matmul(band, stream, (x, scratch, yb), beta)? {
                    // A first band without an algorithm leaves Y untouched, so
                    // the caller's fallback is safe; a later one cannot happen
                    // (every band has the shape and alignments of the first
                    // or is narrower) but is an error rather than a half result.
                    if j0 == 0 {
                        return Ok(false);
                    }
                    return Err(Error::Pipeline(format!(
                        "cuBLASLt has no algorithm for columns {j0}.. of a {}×{}×{} GEMM",
                        key.rows, key.n, key.k
                    )));
                }
            }
        }
        Ok(true)
    }

    /// Queues the GEMM of `key` on `stream` if cuBLASLt has an algorithm for
    /// it; `Ok(false)` when it has none.
    ///
    /// # Safety
    /// `x`, `w` and `y` are device addresses of the handle's context (current
    /// on this thread) valid for the key's shapes until the work completes,
    /// with the alignments the key states; `stream` is a live stream of it.
    unsafe fn matmul(
        &mut self,
        key: GemmKey,
        stream: CUstream,
        (x, w, y): (u64, u64, u64),
        beta: f32,
    ) -> Result<bool> {
        if !self.plans.contains_key(&key) {
            if self.plans.len() >= MAX_PLANS {
                self.plans.clear();
            }
            let plan = self.plan(key)?;
            self.plans.insert(key, plan);
        }
        let plan = &self.plans[&key];
        let Some(algo) = plan.algo.as_ref() else {
            return Ok(false);
        };
        let alpha = 1.0f32;
        let [a, b, c] = plan.layouts;
        // SAFETY: the handle, descriptor, layouts and workspace are live; the
        // scalars point to live locals (host pointer mode); C and D are the
        // same matrix with the same layout, which cuBLASLt allows; operands
        // are the caller's contract.
        let s = unsafe {
            (self.fns.matmul)(
                self.handle,
                plan.desc,
                (&alpha as *const f32).cast(),
                w as *const c_void,
                a,
                x as *const c_void,
                b,
                (&beta as *const f32).cast(),
                y as *const c_void,
                c,
                y as *mut c_void,
                c,
                algo,
                self.workspace.ptr() as *mut c_void,
                WORKSPACE,
                stream,
            )
        };
        // An algorithm the heuristics offered but the call refuses: remember
        // that this GEMM has none, and let the caller use cublasGemmEx.
        if s == cb::cublasStatus_t::CUBLAS_STATUS_NOT_SUPPORTED as u32 {
            if let Some(p) = self.plans.get_mut(&key) {
                p.algo = None;
            }
            return Ok(false);
        }
        status("cublasLtMatmul", s).map_err(|e| Error::Pipeline(format!("{e} ({key:?})")))?;
        Ok(true)
    }

    /// Describes `key`'s matmul and asks the heuristics for its best algorithm.
    fn plan(&self, key: GemmKey) -> Result<Plan> {
        let f = self.fns;
        let mut desc: lt::cublasLtMatmulDesc_t = std::ptr::null_mut();
        // SAFETY: the pointer is to a live local.
        status("cublasLtMatmulDescCreate", unsafe {
            (f.desc_create)(
                &mut desc,
                cb::cublasComputeType_t::CUBLAS_COMPUTE_32F as u32,
                GemmType::F32.cuda(),
            )
        })?;
        // From here the plan owns what exists, so an error drops it cleanly.
        let mut plan = Plan {
            fns: f,
            desc,
            layouts: [std::ptr::null_mut(); 3],
            algo: None,
        };
        let op_t = cb::cublasOperation_t::CUBLAS_OP_T as i32;
        // SAFETY: the descriptor is live; the value is an i32 (cublasOperation_t).
        status("cublasLtMatmulDescSetAttribute", unsafe {
            (f.desc_set)(
                desc,
                lt::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA as u32,
                (&op_t as *const i32).cast(),
                4,
            )
        })?;
        // Column-major: Y_cm [n, rows] = W_cm [k, n]ᵀ · X_cm [k, rows].
        let dims = [
            (key.xw, key.k, key.n, key.k),
            (key.xw, key.k, key.rows, key.k),
            (key.yt, key.n, key.rows, key.ldy),
        ];
        for (slot, (t, r, c, ld)) in plan.layouts.iter_mut().zip(dims) {
            let mut l: lt::cublasLtMatrixLayout_t = std::ptr::null_mut();
            // SAFETY: the pointer is to a live local.
            status("cublasLtMatrixLayoutCreate", unsafe {
                (f.layout_create)(&mut l, t.cuda(), r as u64, c as u64, ld as i64)
            })?;
            *slot = l;
        }
        plan.algo = self.heuristic(&plan, key)?;
        Ok(plan)
    }

    /// The heuristics' first algorithm for `plan` within the workspace, if any.
    fn heuristic(&self, plan: &Plan, key: GemmKey) -> Result<Option<lt::cublasLtMatmulAlgo_t>> {
        let f = self.fns;
        let mut pref: lt::cublasLtMatmulPreference_t = std::ptr::null_mut();
        // SAFETY: the pointer is to a live local.
        status("cublasLtMatmulPreferenceCreate", unsafe {
            (f.pref_create)(&mut pref)
        })?;
        let result = (|| {
            use lt::cublasLtMatmulPreferenceAttributes_t as P;
            let ws = WORKSPACE as u64;
            // SAFETY: the preference is live; the value is a u64.
            status("cublasLtMatmulPreferenceSetAttribute", unsafe {
                (f.pref_set)(
                    pref,
                    P::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES as u32,
                    (&ws as *const u64).cast(),
                    8,
                )
            })?;
            let [ax, aw, ay] = key.align;
            for (attr, a) in [
                (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, aw),
                (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, ax),
                (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, ay),
                (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, ay),
            ] {
                // SAFETY: the preference is live; the value is a u32.
                status("cublasLtMatmulPreferenceSetAttribute", unsafe {
                    (f.pref_set)(pref, attr as u32, (&a as *const u32).cast(), 4)
                })?;
            }
            // SAFETY: an all-zero heuristic result is a valid value of this
            // plain C struct (integers and an array of u64).
            let mut res: lt::cublasLtMatmulHeuristicResult_t = unsafe { std::mem::zeroed() };
            let mut found = 0i32;
            let [a, b, c] = plan.layouts;
            // SAFETY: every object is live; room for one result is given.
            let s = unsafe {
                (f.heuristic)(
                    self.handle,
                    plan.desc,
                    a,
                    b,
                    c,
                    c,
                    pref,
                    1,
                    &mut res,
                    &mut found,
                )
            };
            // NOT_SUPPORTED (15) means no algorithm for this problem: not an error.
            if s == cb::cublasStatus_t::CUBLAS_STATUS_NOT_SUPPORTED as u32 {
                return Ok(None);
            }
            status("cublasLtMatmulAlgoGetHeuristic", s)?;
            Ok((found > 0 && res.state as u32 == 0).then_some(res.algo))
        })();
        // SAFETY: created above, not used again.
        unsafe { (f.pref_destroy)(pref) };
        result
    }
}

impl Drop for Lt {
    fn drop(&mut self) {
        self.plans.clear();
        // SAFETY: the handle is live and not used again (plans dropped first).
        let _ = unsafe { (self.fns.destroy)(self.handle) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alignment_is_the_largest_power_of_two_up_to_256() {
        assert_eq!(alignment(0), 256);
        assert_eq!(alignment(0x1000), 256);
        assert_eq!(alignment(0x1080), 128);
        assert_eq!(alignment(0x1002), 2);
        assert_eq!(alignment(0x1001), 1);
        assert_eq!(alignment(0x7f00_0000_0010), 16);
    }
}
