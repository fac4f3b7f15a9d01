//! The crate's PTX kernels and their typed launchers.
//!
//! `kernels/*.cu` are compiled to PTX by `build.rs` (or, without `nvcc`, taken
//! from the checked-in `kernels/ptx/`) and embedded here. [`Kernels::load`]
//! JIT-loads the module into a context once; the launchers queue work on a
//! stream and return without waiting.
//!
//! Device pointers are passed as `u64` addresses, so every launcher is an
//! `unsafe fn`: the addresses must be device memory of the stream's context,
//! valid for the element counts given, until the launched work completes. The
//! launchers check alignment (an [`Error::Input`]) but cannot check extents.
//!
//! Calling a launcher outside `unsafe` does not compile:
//!
//! ```compile_fail,E0133
//! fn queue(k: &layer_streamer::kernels::Kernels, s: &layer_streamer::cuda::Stream) {
//!     let _ = k.cast_f16_to_bf16(0x1000, 0x2000, 1, s);
//! }
//! ```

use std::ffi::c_void;

use crate::cuda::{memcpy_dtod_async, Context, Function, Module, Stream};
use crate::dtype::DType;
use crate::error::{Error, Result};

include!(concat!(env!("OUT_DIR"), "/ptx_modules.rs"));

/// PTX of `kernels/kernels.cu`: the cast and SwiGLU kernels.
pub const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/kernels.ptx"));

/// Where the embedded PTX came from: `"nvcc <path> <release line>"` when
/// `build.rs` compiled it, or `"checked-in kernels/ptx"`.
pub const PTX_SOURCE: &str = env!("LS_PTX_SOURCE");

/// The kernel entry points [`PTX`] must define.
pub const KERNEL_NAMES: &[&str] = &[
    "cast_f16_to_bf16",
    "cast_f32_to_bf16",
    "swiglu_bf16",
    "swiglu_fused_bf16",
];

/// Threads per block of every launch.
const BLOCK: u32 = 256;
/// Most blocks per launch: enough to fill a 132-SM H100 sixteen times over;
/// the kernels' grid-stride loops cover the rest.
const MAX_GRID: u64 = 132 * 16;

/// The kernel module loaded into one context, with its functions looked up.
#[derive(Debug)]
pub struct Kernels {
    module: Module,
    cast_f16: Function,
    cast_f32: Function,
    swiglu: Function,
    swiglu_fused: Function,
}

impl Kernels {
    /// Loads [`PTX`] into `ctx` and looks up every kernel.
    pub fn load(ctx: &Context) -> Result<Kernels> {
        let module = Module::load_ptx(ctx, PTX)?;
        Ok(Kernels {
            cast_f16: module.function("cast_f16_to_bf16")?,
            cast_f32: module.function("cast_f32_to_bf16")?,
            swiglu: module.function("swiglu_bf16")?,
            swiglu_fused: module.function("swiglu_fused_bf16")?,
            module,
        })
    }

    /// The loaded module.
    pub fn module(&self) -> &Module {
        &self.module
    }

    /// Queues `dst[i] = bf16(src[i])` for `n` f16 elements: round to nearest
    /// even, NaN stays NaN, ±Inf and subnormals convert exactly as IEEE says.
    /// `src` and `dst` must be 2-byte aligned.
    ///
    /// # Safety
    /// `src` holds `n` f16 values and `dst` has room for `n` bf16 values, both device
    /// memory of `stream`'s context that stays allocated, and that nothing else
    /// reads (`dst`) or writes (`src`, `dst`), until the queued work completes.
    pub unsafe fn cast_f16_to_bf16(
        &self,
        src: u64,
        dst: u64,
        n: usize,
        stream: &Stream,
    ) -> Result<()> {
        check_align("cast_f16_to_bf16", &[("src", src, 2), ("dst", dst, 2)])?;
        // SAFETY: cast_f16_to_bf16(src, dst, n) takes three 64-bit
        // parameters; the ranges are the caller's contract.
        unsafe {
            launch_1d(
                &self.cast_f16,
                stream,
                n as u64,
                8,
                &mut [src, dst, n as u64],
            )
        }
    }

    /// Queues `dst[i] = bf16(src[i])` for `n` f32 elements, with the rounding of
    /// [`Kernels::cast_f16_to_bf16`]. `src` must be 4-byte and `dst` 2-byte aligned.
    ///
    /// # Safety
    /// `src` holds `n` f32 values and `dst` has room for `n` bf16 values, both device
    /// memory of `stream`'s context that stays allocated, and that nothing else
    /// reads (`dst`) or writes (`src`, `dst`), until the queued work completes.
    pub unsafe fn cast_f32_to_bf16(
        &self,
        src: u64,
        dst: u64,
        n: usize,
        stream: &Stream,
    ) -> Result<()> {
        check_align("cast_f32_to_bf16", &[("src", src, 4), ("dst", dst, 2)])?;
        // SAFETY: cast_f32_to_bf16(src, dst, n) takes three 64-bit
        // parameters; the ranges are the caller's contract.
        unsafe {
            launch_1d(
                &self.cast_f32,
                stream,
                n as u64,
                4,
                &mut [src, dst, n as u64],
            )
        }
    }

    /// Queues a cast of `n` elements of dtype `from` to bf16: f16 and f32 are
    /// converted, bf16 is copied. Other dtypes are an [`Error::Input`].
    ///
    /// # Safety
    /// `src` holds `n` values of dtype `from` and `dst` has room for `n` bf16 values, both device
    /// memory of `stream`'s context that stays allocated, and that nothing else
    /// reads (`dst`) or writes (`src`, `dst`), until the queued work completes.
    pub unsafe fn cast_to_bf16(
        &self,
        from: DType,
        src: u64,
        dst: u64,
        n: usize,
        stream: &Stream,
    ) -> Result<()> {
        match from {
            // SAFETY: forwarded from the caller, for the dtype matched.
            DType::F16 => unsafe { self.cast_f16_to_bf16(src, dst, n, stream) },
            // SAFETY: as above.
            DType::F32 => unsafe { self.cast_f32_to_bf16(src, dst, n, stream) },
            DType::BF16 => {
                let bytes = n.checked_mul(2).ok_or_else(|| {
                    Error::Input(format!("cast_to_bf16: {n} elements overflow a byte count"))
                })?;
                // SAFETY: the caller's contract: src and dst are device ranges of
                // the stream's context holding n bf16 elements each, live until the
                // queued work completes.
                unsafe { memcpy_dtod_async(dst, src, bytes, stream) }
            }
            other => Err(Error::Input(format!(
                "cast_to_bf16: cannot cast {other} to bf16 on the GPU (only f16, f32 and bf16)"
            ))),
        }
    }

    /// Queues `out[i] = silu(gate[i]) * up[i]` for `n` bf16 elements, computed
    /// in f32 and rounded to nearest even. All pointers must be 2-byte aligned.
    ///
    /// # Safety
    /// `gate` and `up` hold `n` bf16 values and `out` has room for `n`, all
    /// device memory of `stream`'s context that stays allocated, and that
    /// nothing else writes (nor reads `out`), until the queued work completes.
    pub unsafe fn swiglu(
        &self,
        gate: u64,
        up: u64,
        out: u64,
        n: usize,
        stream: &Stream,
    ) -> Result<()> {
        check_align(
            "swiglu",
            &[("gate", gate, 2), ("up", up, 2), ("out", out, 2)],
        )?;
        // SAFETY: swiglu_bf16(gate, up, out, n) takes four 64-bit
        // parameters; the ranges are the caller's contract.
        unsafe {
            launch_1d(
                &self.swiglu,
                stream,
                n as u64,
                8,
                &mut [gate, up, out, n as u64],
            )
        }
    }

    /// Like [`Kernels::swiglu`] over the output of a fused gate/up projection:
    /// `gate_up` holds `rows` rows of `2 * cols` bf16 elements, each row
    /// `[gate(cols) | up(cols)]`; `out` is `rows x cols`.
    ///
    /// # Safety
    /// `gate_up` holds `rows * 2 * cols` bf16 values and `out` has room for
    /// `rows * cols`, both device memory of `stream`'s context that stays
    /// allocated, and that nothing else writes (nor reads `out`), until the
    /// queued work completes.
    pub unsafe fn swiglu_fused(
        &self,
        gate_up: u64,
        out: u64,
        rows: usize,
        cols: usize,
        stream: &Stream,
    ) -> Result<()> {
        check_align("swiglu_fused", &[("gate_up", gate_up, 2), ("out", out, 2)])?;
        let n = (rows as u64)
            .checked_mul(cols as u64)
            .filter(|n| n.checked_mul(4).is_some())
            .ok_or_else(|| {
                Error::Input(format!("swiglu_fused: {rows} x {cols} elements overflow"))
            })?;
        // SAFETY: swiglu_fused_bf16(gate_up, out, rows, cols) takes four
        // 64-bit parameters; the ranges are the caller's contract.
        unsafe {
            launch_1d(
                &self.swiglu_fused,
                stream,
                n,
                8,
                &mut [gate_up, out, rows as u64, cols as u64],
            )
        }
    }
}

/// Fails with [`Error::Input`] naming the kernel and argument unless every
/// `(name, address, alignment)` is aligned.
fn check_align(kernel: &str, args: &[(&str, u64, u64)]) -> Result<()> {
    for &(name, addr, align) in args {
        if addr % align != 0 {
            return Err(Error::Input(format!(
                "{kernel}: {name} = {addr:#x} is not {align}-byte aligned"
            )));
        }
    }
    Ok(())
}

/// Blocks for `n` elements handled `per_thread` at a time, capped at [`MAX_GRID`].
fn grid_for(n: u64, per_thread: u64) -> u32 {
    let threads = n.div_ceil(per_thread);
    threads.div_ceil(BLOCK as u64).clamp(1, MAX_GRID) as u32
}

/// Launches a grid-stride kernel whose parameters are all 64-bit (device
/// pointers and counts), in order. Nothing is launched for `n == 0`.
///
/// # Safety
/// `f` takes exactly `args.len()` 64-bit parameters, and the device ranges
/// `args` name are valid for the kernel's accesses until the work completes.
unsafe fn launch_1d(
    f: &Function,
    stream: &Stream,
    n: u64,
    per_thread: u64,
    args: &mut [u64],
) -> Result<()> {
    if n == 0 {
        return Ok(());
    }
    // cuLaunchKernel takes, per parameter, a pointer to the argument's value.
    let mut params: Vec<*mut c_void> = args.iter_mut().map(|a| (a as *mut u64).cast()).collect();
    // SAFETY: the parameter list and the device ranges are the caller's
    // contract; params point into `args`, alive for the call.
    unsafe {
        f.launch(
            (grid_for(n, per_thread), 1, 1),
            (BLOCK, 1, 1),
            0,
            stream,
            &mut params,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grid_is_at_least_one_block_and_capped() {
        assert_eq!(grid_for(1, 8), 1);
        assert_eq!(grid_for(256 * 8, 8), 1);
        assert_eq!(grid_for(256 * 8 + 1, 8), 2);
        assert_eq!(grid_for(u64::MAX / 2, 1), MAX_GRID as u32);
    }

    #[test]
    fn misaligned_pointers_are_refused() {
        assert!(check_align("k", &[("src", 0x1000, 4)]).is_ok());
        let e = check_align("k", &[("src", 0x1002, 4)]).unwrap_err();
        assert!(
            e.to_string().contains("src = 0x1002 is not 4-byte aligned"),
            "{e}"
        );
    }
}
