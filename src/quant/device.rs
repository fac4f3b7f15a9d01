//! Dequantization on the device: `kernels/dequant.cu`, two kernels per
//! [`QuantType`] (bf16 and f16 output; a block type's kernels write 8
//! consecutive elements per thread), each bit-identical to
//! [`dequantize_bf16`](super::dequantize_bf16) /
//! [`dequantize_f16`](super::dequantize_f16) on the host.
//!
//! The PTX is its own module (built by `build.rs` like the others, or taken
//! from the checked-in `kernels/ptx/dequant.ptx`) and is loaded into a context
//! by [`DequantKernels::load`].

use std::ffi::c_void;

use super::fp8::Fp8Layout;
use super::QuantType;
use crate::cuda::{Context, Function, Module, Stream};
use crate::error::{Error, Result};
use crate::DType;

#[path = "gemv.rs"]
mod gemv;
pub use gemv::{gemv_kernel_name, Gemv, GEMV_MAX_TOKENS, GEMV_TOKEN_COUNTS};

/// PTX of `kernels/dequant.cu`.
pub const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/dequant.ptx"));

/// Threads per block of every launch.
const BLOCK: u32 = 256;
/// Most blocks per launch; the kernels' grid-stride loops cover the rest.
const MAX_GRID: u64 = 132 * 16;

/// The output dtypes the kernels write, in the order of their tables.
pub const OUTPUTS: [DType; 2] = [DType::BF16, DType::F16];

/// Index of `to` in [`OUTPUTS`], or an error naming the caller.
fn output_index(to: DType, what: &str) -> Result<usize> {
    OUTPUTS.iter().position(|&d| d == to).ok_or_else(|| {
        Error::Input(format!(
            "{what}: the device dequantizes into bf16 or f16, not {to}"
        ))
    })
}

/// The kernel entry point that dequantizes `ty` into bf16.
pub const fn kernel_name(ty: QuantType) -> &'static str {
    match ty {
        QuantType::F32 => "dequant_f32_bf16",
        QuantType::F16 => "dequant_f16_bf16",
        QuantType::BF16 => "dequant_bf16_bf16",
        QuantType::Q8_0 => "dequant_q8_0_bf16",
        QuantType::Q4_0 => "dequant_q4_0_bf16",
        QuantType::Q4_1 => "dequant_q4_1_bf16",
        QuantType::Q5_0 => "dequant_q5_0_bf16",
        QuantType::Q5_1 => "dequant_q5_1_bf16",
        QuantType::Q4_K => "dequant_q4_k_bf16",
        QuantType::Q5_K => "dequant_q5_k_bf16",
        QuantType::Q6_K => "dequant_q6_k_bf16",
    }
}

/// The kernel entry point that dequantizes `ty` into f16 (saturating, see
/// [`f32_to_f16_sat`](super::f32_to_f16_sat)).
pub const fn kernel_name_f16(ty: QuantType) -> &'static str {
    match ty {
        QuantType::F32 => "dequant_f32_f16",
        QuantType::F16 => "dequant_f16_f16",
        QuantType::BF16 => "dequant_bf16_f16",
        QuantType::Q8_0 => "dequant_q8_0_f16",
        QuantType::Q4_0 => "dequant_q4_0_f16",
        QuantType::Q4_1 => "dequant_q4_1_f16",
        QuantType::Q5_0 => "dequant_q5_0_f16",
        QuantType::Q5_1 => "dequant_q5_1_f16",
        QuantType::Q4_K => "dequant_q4_k_f16",
        QuantType::Q5_K => "dequant_q5_k_f16",
        QuantType::Q6_K => "dequant_q6_k_f16",
    }
}

/// The kernel entry point that dequantizes `ty` into `to` (bf16 or f16).
pub fn kernel_name_for(ty: QuantType, to: DType) -> Result<&'static str> {
    Ok(match output_index(to, ty.name())? {
        0 => kernel_name(ty),
        _ => kernel_name_f16(ty),
    })
}

/// The kernel entry point that gathers rows of `ty` blocks by token id
/// into f32 (through bf16 or f16); `None` for plain floats.
pub const fn gather_kernel_name(ty: QuantType) -> Option<&'static str> {
    Some(match ty {
        QuantType::Q8_0 => "gather_q8_0_f32",
        QuantType::Q4_0 => "gather_q4_0_f32",
        QuantType::Q4_1 => "gather_q4_1_f32",
        QuantType::Q5_0 => "gather_q5_0_f32",
        QuantType::Q5_1 => "gather_q5_1_f32",
        QuantType::Q4_K => "gather_q4_k_f32",
        QuantType::Q5_K => "gather_q5_k_f32",
        QuantType::Q6_K => "gather_q6_k_f32",
        QuantType::F32 | QuantType::F16 | QuantType::BF16 => return None,
    })
}

/// The kernel entry point that dequantizes FP8 weights with their scales
/// into bf16.
pub const FP8_KERNEL: &str = "dequant_fp8_bf16";
/// Like [`FP8_KERNEL`], into f16 (saturating).
pub const FP8_KERNEL_F16: &str = "dequant_fp8_f16";

/// The dequantization module loaded into one context, with one kernel per type.
#[derive(Debug)]
pub struct DequantKernels {
    _module: Module,
    /// Per output of [`OUTPUTS`], indexed like [`QuantType::ALL`].
    functions: [Vec<Function>; 2],
    /// [`FP8_KERNEL`] and [`FP8_KERNEL_F16`].
    fp8: [Function; 2],
    /// [`gather_kernel_name`], indexed like [`QuantType::ALL`].
    gather: Vec<Option<Function>>,
    /// [`gemv_kernel_name`] per [`GEMV_TOKEN_COUNTS`], indexed like
    /// [`QuantType::ALL`].
    gemv: Vec<Option<[Function; 4]>>,
}

/// The entry points of the gemv kernel `name`, one per [`GEMV_TOKEN_COUNTS`].
fn gemv_entries(module: &Module, name: &str) -> Result<[Function; 4]> {
    let [a, b, c, d] = GEMV_TOKEN_COUNTS.map(|t| module.function(&format!("{name}_t{t}")));
    Ok([a?, b?, c?, d?])
}

impl DequantKernels {
    /// Loads [`PTX`] into `ctx` and looks up every kernel.
    pub fn load(ctx: &Context) -> Result<DequantKernels> {
        let module = Module::load_ptx(ctx, PTX)?;
        let table = |name: fn(QuantType) -> &'static str| {
            QuantType::ALL
                .into_iter()
                .map(|t| module.function(name(t)))
                .collect::<Result<Vec<_>>>()
        };
        let functions = [table(kernel_name)?, table(kernel_name_f16)?];
        let fp8 = [
            module.function(FP8_KERNEL)?,
            module.function(FP8_KERNEL_F16)?,
        ];
        let optional = |name: fn(QuantType) -> Option<&'static str>| {
            QuantType::ALL
                .into_iter()
                .map(|t| name(t).map(|n| module.function(n)).transpose())
                .collect::<Result<Vec<_>>>()
        };
        let gather = optional(gather_kernel_name)?;
        let gemv = QuantType::ALL
            .into_iter()
            .map(|t| {
                gemv_kernel_name(t)
                    .map(|n| gemv_entries(&module, n))
                    .transpose()
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(DequantKernels {
            _module: module,
            functions,
            fp8,
            gather,
            gemv,
        })
    }

    /// [`dequantize`](Self::dequantize) into bf16.
    ///
    /// # Safety
    /// As for [`dequantize`](Self::dequantize).
    pub unsafe fn dequantize_bf16(
        &self,
        ty: QuantType,
        src: u64,
        dst: u64,
        n: u64,
        stream: &Stream,
    ) -> Result<()> {
        // SAFETY: forwarded from this function's contract.
        unsafe { self.dequantize(ty, DType::BF16, src, dst, n, stream) }
    }

    /// Queues the dequantization of `n` elements of `ty`, stored as blocks at
    /// `src`, into `n` values of `to` (bf16 or f16) at `dst`. `n` must be a
    /// multiple of the type's block; `dst` must be 2-byte aligned. Nothing is
    /// launched for `n == 0`. Returns without waiting.
    ///
    /// # Safety
    /// `src` must be device memory of the stream's context holding
    /// `n / ty.block_elems()` whole blocks (`ty.tensor_size(&[n])` bytes) and
    /// `dst` device memory of that context with room for `n` 16-bit values,
    /// not overlapping `src`; both must stay allocated, and `src` unmodified
    /// and `dst` unread by other work, until the queued kernel completes.
    pub unsafe fn dequantize(
        &self,
        ty: QuantType,
        to: DType,
        src: u64,
        dst: u64,
        n: u64,
        stream: &Stream,
    ) -> Result<()> {
        let name = kernel_name_for(ty, to)?;
        let out = output_index(to, name)?;
        ty.tensor_size(&[n])
            .map_err(|e| Error::Input(format!("{name}: {e}")))?;
        if !dst.is_multiple_of(2) {
            return Err(Error::Input(format!(
                "{name}: dst = {dst:#x} is not 2-byte aligned"
            )));
        }
        if n == 0 {
            return Ok(());
        }
        let f = &self.functions[out][QuantType::ALL
            .iter()
            .position(|&t| t == ty)
            .expect("ALL lists every type")];
        let mut args = [src, dst, n];
        let mut params: Vec<*mut c_void> =
            args.iter_mut().map(|a| (a as *mut u64).cast()).collect();
        // The block types' kernels write 8 elements per thread.
        let per_thread = if ty.is_quantized() { 8 } else { 1 };
        let grid = (n / per_thread).div_ceil(BLOCK as u64).clamp(1, MAX_GRID) as u32;
        // SAFETY: every dequant kernel takes (const uint8_t*, uint16_t*, u64),
        // passed as three 64-bit values that `params` points to for the call;
        // the device ranges for n elements are the caller's contract above.
        unsafe { f.launch((grid, 1, 1), (BLOCK, 1, 1), 0, stream, &mut params) }
    }
}

impl DequantKernels {
    /// Queues `dst[t * hidden + c] = f32(x)` for `tokens` token ids at `ids`
    /// (u32), where `x` is element `c` of row `ids[t]` of the `[rows,
    /// hidden]` matrix of `ty` blocks at `src`, dequantized into `to` (bf16
    /// or f16) exactly as [`dequantize`](Self::dequantize) does: a lookup in
    /// a quantized embedding that gives what a lookup in its dequantized
    /// matrix gives. `hidden` must be a multiple of the block; `ids` and
    /// `dst` must be 4-byte aligned. Returns without waiting.
    ///
    /// # Safety
    /// `src` must be device memory of the stream's context holding every row
    /// `ids` names (`ty.row_bytes(hidden)` bytes each), `ids` `tokens` u32s
    /// and `dst` room for `tokens * hidden` f32s not overlapping the inputs;
    /// all must stay allocated, the inputs unmodified and `dst` unread by
    /// other work, until the queued kernel completes.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn gather_rows_f32(
        &self,
        ty: QuantType,
        to: DType,
        src: u64,
        ids: u64,
        dst: u64,
        tokens: u64,
        hidden: u64,
        stream: &Stream,
    ) -> Result<()> {
        let what = format!("gathering rows of {ty}");
        let out = output_index(to, &what)? as u64;
        let at = QuantType::ALL.iter().position(|&t| t == ty).unwrap_or(0);
        let Some(f) = self.gather.get(at).and_then(Option::as_ref) else {
            return Err(Error::Input(format!(
                "{what}: only block types are gathered on the device"
            )));
        };
        ty.row_bytes(hidden)
            .map_err(|e| Error::Input(format!("{what}: {e}")))?;
        if !dst.is_multiple_of(4) || !ids.is_multiple_of(4) {
            return Err(Error::Input(format!(
                "{what}: ids = {ids:#x} and dst = {dst:#x} must be 4-byte aligned"
            )));
        }
        let n = tokens
            .checked_mul(hidden)
            .ok_or_else(|| Error::Input(format!("{what}: {tokens} rows of {hidden} overflow")))?;
        if n == 0 {
            return Ok(());
        }
        let mut args = [src, ids, dst, tokens, hidden, out];
        let mut params: Vec<*mut c_void> =
            args.iter_mut().map(|a| (a as *mut u64).cast()).collect();
        // 8 elements per thread (hidden is a multiple of the block, so of 8).
        let grid = (n / 8).div_ceil(BLOCK as u64).clamp(1, MAX_GRID) as u32;
        // SAFETY: every gather kernel takes (const uint8_t*, const uint32_t*,
        // float*, u64, u64, u64), passed as six 64-bit values that `params`
        // points to for the call; the device ranges are the caller's
        // contract above.
        unsafe { f.launch((grid, 1, 1), (BLOCK, 1, 1), 0, stream, &mut params) }
    }

    /// [`dequantize_fp8`](Self::dequantize_fp8) into bf16.
    ///
    /// # Safety
    /// As for [`dequantize_fp8`](Self::dequantize_fp8).
    pub unsafe fn dequantize_fp8_bf16(
        &self,
        layout: &Fp8Layout,
        src: u64,
        scale: u64,
        dst: u64,
        stream: &Stream,
    ) -> Result<()> {
        // SAFETY: forwarded from this function's contract.
        unsafe { self.dequantize_fp8(layout, DType::BF16, src, scale, dst, stream) }
    }

    /// Queues the dequantization of an FP8 weight of `layout` (its
    /// `rows × cols` bytes at `src`, its scales at `scale`) into as many
    /// values of `to` (bf16 or f16) at `dst`, bit-identical to
    /// [`fp8::dequantize_bf16`](super::fp8::dequantize_bf16) /
    /// [`fp8::dequantize_f16`](super::fp8::dequantize_f16). `dst` must be
    /// 2-byte aligned; rows, columns and tiles must be below 2³².
    /// Returns without waiting.
    ///
    /// # Safety
    /// `src`, `scale` and `dst` must be device memory of the stream's context
    /// holding `layout.elems()` bytes, `layout.scale_bytes()` bytes and room
    /// for `layout.elems()` 16-bit values, `dst` overlapping neither; all must
    /// stay allocated, the inputs unmodified and `dst` unread by other work,
    /// until the queued kernel completes.
    pub unsafe fn dequantize_fp8(
        &self,
        layout: &Fp8Layout,
        to: DType,
        src: u64,
        scale: u64,
        dst: u64,
        stream: &Stream,
    ) -> Result<()> {
        let out = output_index(to, FP8_KERNEL)?;
        let (tile_rows, tile_cols) = layout.tile();
        let dims = [layout.rows, layout.cols, tile_rows, tile_cols];
        if dims.iter().any(|&d| d > u32::MAX as u64) || tile_rows == 0 || tile_cols == 0 {
            return Err(Error::Input(format!(
                "{FP8_KERNEL}: weight [{}, {}] with tiles of [{tile_rows}, {tile_cols}] is \
                 outside the kernel's 32-bit indices",
                layout.rows, layout.cols
            )));
        }
        if !dst.is_multiple_of(2) {
            return Err(Error::Input(format!(
                "{FP8_KERNEL}: dst = {dst:#x} is not 2-byte aligned"
            )));
        }
        if layout.elems() == 0 {
            return Ok(());
        }
        let format = match layout.format {
            DType::F8E5M2 => 1u64,
            _ => 0,
        };
        let scale_dtype = match layout.scale_dtype {
            DType::F32 => 0u64,
            DType::BF16 => 1,
            _ => 2,
        };
        let mut args = [
            src,
            scale,
            dst,
            layout.rows,
            layout.cols,
            tile_rows,
            tile_cols,
            format | (scale_dtype << 8),
        ];
        let mut params: Vec<*mut c_void> =
            args.iter_mut().map(|a| (a as *mut u64).cast()).collect();
        // Threads across a row's columns, blocks of the y dimension over rows;
        // both loops stride, so any size is covered.
        let gx = layout.cols.div_ceil(BLOCK as u64).clamp(1, 64) as u32;
        let gy = layout.rows.clamp(1, MAX_GRID * 8 / gx as u64) as u32;
        // SAFETY: dequant_fp8_bf16/_f16 take eight 64-bit values (three
        // pointers, four sizes, the format flags), which `params` points to
        // for the call; the device ranges are the caller's contract above.
        unsafe { self.fp8[out].launch((gx, gy, 1), (BLOCK, 1, 1), 0, stream, &mut params) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ptx_defines_a_kernel_for_every_type() {
        for ty in QuantType::ALL {
            for to in OUTPUTS {
                let entry = format!(".entry {}(", kernel_name_for(ty, to).unwrap());
                assert!(PTX.contains(&entry), "dequant.ptx lacks {entry}");
            }
        }
        let gathered: Vec<_> = QuantType::ALL
            .into_iter()
            .filter_map(gather_kernel_name)
            .collect();
        assert_eq!(gathered.len(), 8, "every block type gathers");
        for name in gathered {
            let entry = format!(".entry {name}(");
            assert!(PTX.contains(&entry), "dequant.ptx lacks {entry}");
        }
        for name in [FP8_KERNEL, FP8_KERNEL_F16] {
            let entry = format!(".entry {name}(");
            assert!(PTX.contains(&entry), "dequant.ptx lacks {entry}");
        }
        let e = kernel_name_for(QuantType::Q4_K, DType::F32).unwrap_err();
        assert!(e.to_string().contains("bf16 or f16, not"), "{e}");
        let gemv = QuantType::ALL.into_iter().filter_map(gemv_kernel_name);
        for name in gemv.flat_map(|n| GEMV_TOKEN_COUNTS.map(|t| format!("{n}_t{t}"))) {
            let entry = format!(".entry {name}(");
            assert!(PTX.contains(&entry), "dequant.ptx lacks {entry}");
        }
    }
}
