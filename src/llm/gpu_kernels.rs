//! Typed launchers of the forward pass's kernels (`kernels/model.cu`).
//!
//! Every pointer is a device address of the stream's context, valid for the
//! sizes given until the launched work completes (the callers' contract,
//! stated on each `unsafe fn`).

use std::ffi::c_void;

use crate::cuda::{Context, Function, Module, Stream};
use crate::{DType, Error, Result};

/// One kernel argument (the kernels take 64-bit values and f32 scalars).
#[derive(Clone, Copy)]
pub(crate) enum Arg {
    U(u64),
    F(f32),
}

/// A GEMM input stored as two 16-bit matrices of the same shape, `hi + lo`
/// (precision exact), or as `hi` alone with `lo == 0` (precision fast).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Split {
    pub(crate) hi: u64,
    /// 0 when the input is `hi` alone.
    pub(crate) lo: u64,
}

/// The model module loaded into a context.
pub(crate) struct ModelKernels {
    _module: Module,
    /// 16-bit type of the weights and GEMM inputs: 0 bf16, 1 f16.
    kind: u64,
    embed: Function,
    rms_norm: Function,
    swiglu: Function,
    /// SwiGLU over 16-bit gate and up (GEMM outputs in the model's dtype).
    swiglu_h: Function,
    add_host_columns: Function,
}

/// Threads per block of the row kernels.
const ROW_BLOCK: u32 = 256;
/// Queues `f` with one-dimensional blocks of `block` threads.
pub(crate) fn launch(
    f: &Function,
    grid: (u32, u32),
    block: u32,
    shared: u32,
    s: &Stream,
    args: &[Arg],
) -> Result<()> {
    let mut vals: Vec<Arg> = args.to_vec();
    let mut params: Vec<*mut c_void> = vals
        .iter_mut()
        .map(|a| match a {
            Arg::U(v) => (v as *mut u64).cast(),
            Arg::F(v) => (v as *mut f32).cast(),
        })
        .collect();
    // SAFETY: every kernel of model.cu and attention.cu takes exactly the
    // parameters its launcher passes, in order (pointers and counts as 64-bit values,
    // scalars as f32); `params` points into `vals`, alive for the call; the
    // device ranges are the launcher's caller's contract.
    unsafe { f.launch((grid.0, grid.1, 1), (block, 1, 1), shared, s, &mut params) }
}

fn grid(n: usize) -> u32 {
    n.clamp(1, 65535) as u32
}

impl ModelKernels {
    /// Loads the module for weights of `dtype` (bf16 or f16).
    pub(crate) fn load(ctx: &Context, dtype: DType) -> Result<ModelKernels> {
        let kind = match dtype {
            DType::BF16 => 0,
            DType::F16 => 1,
            other => {
                return Err(Error::config(format!(
                    "the CUDA forward pass runs on bf16 or f16 weights, not {other}"
                )))
            }
        };
        let ptx = crate::kernels::PTX_MODULES
            .iter()
            .find(|(name, _)| *name == "model")
            .map(|(_, p)| *p)
            .ok_or_else(|| Error::Pipeline("the model kernels' PTX is not embedded".into()))?;
        let module = Module::load_ptx(ctx, ptx)?;
        Ok(ModelKernels {
            kind,
            embed: module.function("embed_gather")?,
            rms_norm: module.function("rms_norm_split")?,
            swiglu: module.function("swiglu_split")?,
            swiglu_h: module.function("swiglu_split_h")?,
            add_host_columns: module.function("add_host_columns")?,
            _module: module,
        })
    }

    /// `x[t] = f32(embed[ids[t]])` for `tokens` rows of `hidden`.
    ///
    /// # Safety
    /// `embed` holds the bf16 embedding (every id in range), `ids` `tokens`
    /// u32s, `x` `tokens * hidden` f32s.
    pub(crate) unsafe fn embed(
        &self,
        s: &Stream,
        embed: u64,
        ids: u64,
        x: u64,
        tokens: usize,
        hidden: usize,
    ) -> Result<()> {
        launch(
            &self.embed,
            (grid(tokens), 1),
            ROW_BLOCK,
            0,
            s,
            &[
                Arg::U(embed),
                Arg::U(ids),
                Arg::U(x),
                Arg::U(tokens as u64),
                Arg::U(hidden as u64),
                Arg::U(self.kind),
            ],
        )
    }

    /// RMSNorm of rows `rows[r]` (or `r` when `rows == 0`) of f32 `x`, split
    /// into 16-bit `hi[r]` + `lo[r]` (see model.cu), for `n_rows` rows of `hidden`.
    ///
    /// # Safety
    /// `x` covers every selected row, `w` `hidden` 16-bit values, `rows` `n_rows`
    /// u32s (or 0), `hi` (and `lo` unless 0) `n_rows * hidden` 16-bit values.
    #[allow(clippy::too_many_arguments)]
    pub(crate) unsafe fn rms_norm(
        &self,
        s: &Stream,
        x: u64,
        w: u64,
        rows: u64,
        out: Split,
        n_rows: usize,
        hidden: usize,
        eps: f32,
    ) -> Result<()> {
        launch(
            &self.rms_norm,
            (grid(n_rows), 1),
            ROW_BLOCK,
            0,
            s,
            &[
                Arg::U(x),
                Arg::U(w),
                Arg::U(rows),
                Arg::U(out.hi),
                Arg::U(out.lo),
                Arg::U(n_rows as u64),
                Arg::U(hidden as u64),
                Arg::F(eps),
                Arg::U(self.kind),
            ],
        )
    }

    /// `split(silu(gate) * up)` for `rows × cols` elements, row `r` of
    /// `gate` and `up` starting `r * stride` elements in: `stride == cols`
    /// for separate matrices, `up = gate + cols` elements and `stride == 2 *
    /// cols` for the `[t, gate | up]` output of a fused projection. `gate`
    /// and `up` are f32, or of the model's 16-bit dtype when `input16`.
    ///
    /// # Safety
    /// `gate` and `up` hold `(rows - 1) * stride + cols` elements each,
    /// `out.hi` (and `out.lo` unless 0) `rows * cols` 16-bit values.
    #[allow(clippy::too_many_arguments)]
    pub(crate) unsafe fn swiglu(
        &self,
        s: &Stream,
        (gate, up, input16): (u64, u64, bool),
        out: Split,
        rows: usize,
        cols: usize,
        stride: usize,
    ) -> Result<()> {
        // Four columns a thread along x, rows along y (each block strides
        // over rows when there are more than the grid's y).
        let x_blocks = cols.div_ceil(4 * ROW_BLOCK as usize);
        let f = if input16 {
            &self.swiglu_h
        } else {
            &self.swiglu
        };
        launch(
            f,
            (grid(x_blocks), grid(rows)),
            ROW_BLOCK,
            0,
            s,
            &[
                Arg::U(gate),
                Arg::U(up),
                Arg::U(out.hi),
                Arg::U(out.lo),
                Arg::U(rows as u64),
                Arg::U(cols as u64),
                Arg::U(stride as u64),
                Arg::U(self.kind),
            ],
        )
    }

    /// `y[r][col0 + j] (+)= src[r][j]` for `rows × cols` f32 values of
    /// `src`, rows of `y` `ldy` apart: read by the kernel from host memory
    /// mapped into the device (`src` its device address), so that it does
    /// not wait behind other copies on the copy engine; `accumulate` adds.
    ///
    /// # Safety
    /// `src` is the device address of `rows * cols` mapped page-locked f32s
    /// that the host does not write until the kernel has run; `y` holds
    /// `rows` rows of `ldy >= col0 + cols` f32s.
    pub(crate) unsafe fn add_host_columns(
        &self,
        s: &Stream,
        src: u64,
        y: u64,
        (rows, cols, ldy, col0): (usize, usize, usize, usize),
        accumulate: bool,
    ) -> Result<()> {
        let n = rows * cols;
        launch(
            &self.add_host_columns,
            (grid(n.div_ceil(ROW_BLOCK as usize).min(1024)), 1),
            ROW_BLOCK,
            0,
            s,
            &[
                Arg::U(src),
                Arg::U(y),
                Arg::U(rows as u64),
                Arg::U(cols as u64),
                Arg::U(ldy as u64),
                Arg::U(col0 as u64),
                Arg::U(accumulate as u64),
            ],
        )
    }
}
