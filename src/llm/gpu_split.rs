//! The CUDA forward pass with a CPU/GPU row split (a streamer built with a
//! `cpu_share`): the device computes the columns of its streamed rows with
//! the usual GEMMs, writing into the first columns of the full outputs
//! (rows of the output `n` apart), while the CPU pool computes the other
//! columns from the host rows. The sides meet four times per layer, as
//! [`crate::llm::split`] describes: after q/k/v, after o_proj, after
//! gate/up and after down_proj.
//!
//! A meeting: the 16-bit GEMM input (`hi`, and `lo` in exact precision) goes
//! to pinned staging and an event is recorded; the device GEMMs are queued;
//! the host waits for that event alone (no stream or device synchronize),
//! widens the input to f32 (`hi + lo`, the values the device multiplies),
//! computes its columns into staging mapped into the device, and queues a
//! kernel that reads them over the bus into the output's last columns
//! (adding them to the residual stream for o_proj and down_proj). A kernel
//! rather than a copy: a copy would queue on the copy engine behind the
//! streamer's transfer of the next layer, milliseconds for a small result.
//! Where the driver refuses the mapping, the residual's CPU columns are
//! fetched with the input, the host adds them, and copies go back, one per
//! token. The staging is reused only after a later event, so no copy or
//! kernel reads or writes it while the host does.
//!
//! A pass may give the device some or all of the CPU's rows
//! ([`Upload::cpu_fraction`]): they are copied from page-locked memory into
//! one device buffer on the compute stream, right before their product,
//! and their columns follow the slot's. A meeting where the CPU has no
//! rows left is skipped.

use std::time::{Duration, Instant};

use super::{CudaModel, SlotWeights};
use crate::cpu::{CpuPool, HostMatrix};
use crate::cuda::cublas::Cublas;
use crate::cuda::{memcpy_dtoh_async, memcpy_htod_async, Context, Event, Stream};
use crate::llm::config::ModelConfig;
use crate::llm::gpu_io::StagingBuf;
use crate::llm::gpu_kernels::{ModelKernels, Split};
use crate::llm::gpu_split_pass::{SplitUpload, Upload};
use crate::llm::gpu_weights::{rows_product, AtUse, RowsSrc};
use crate::llm::llama::PassBatch;
use crate::{DType, Error, HostRows, LayerWeights, Result};

/// The host side of the split: the CPU pool, pinned staging and the event
/// each meeting waits for.
pub(crate) struct GpuSplit {
    pool: CpuPool,
    /// The 16-bit type of the GEMM inputs.
    dtype: DType,
    act_hi: StagingBuf,
    act_lo: StagingBuf,
    /// The residual's CPU columns, `[t, c]` f32 (empty when `out` is
    /// mapped).
    resid: StagingBuf,
    /// The CPU's outputs, f32, one `[t, c]` block per weight of a meeting;
    /// mapped into the device where the driver allows.
    out: StagingBuf,
    /// The GEMM input in f32.
    xf: Vec<f32>,
    ready: Event,
    /// Where a pass's copied CPU rows go; `None` when none can be copied.
    upload: Option<Upload>,
    /// The fraction of its rows the CPU computes in the pass under way.
    fraction: f64,
}

/// One weight's split: `n` outputs, the first `g` in the slot, the next `u`
/// copied to the device for this pass, the rest on the CPU.
struct Part<'a> {
    key: &'a str,
    n: usize,
    g: usize,
    u: usize,
    host: Option<HostRows<'a>>,
}

impl Part<'_> {
    /// Columns the device computes.
    fn d(&self) -> usize {
        self.g + self.u
    }

    /// Columns the CPU computes.
    fn c(&self) -> usize {
        self.n - self.d()
    }

    /// The CPU's rows as a matrix, `None` when it has none.
    fn cpu_matrix(&self) -> Result<Option<HostMatrix<'_>>> {
        match &self.host {
            Some(h) if self.c() > 0 => Ok(Some(h.skip(self.u)?.matrix()?)),
            _ => Ok(None),
        }
    }
}

/// Weight `key` with `n` outputs as split in this pass: of the CPU's rows,
/// the first `1 - fraction` go to the device (whole row tiles).
fn part<'a>(w: &LayerWeights<'a>, key: &'a str, n: usize, fraction: f64) -> Result<Part<'a>> {
    let host = w.host_rows(key);
    let g = host.map_or(n, |h| h.first_row());
    if host.is_some_and(|h| h.first_row() + h.rows() != n) {
        return Err(Error::Pipeline(format!(
            "layer {} tensor {key}: the split's rows do not add up to {n} outputs",
            w.layer()
        )));
    }
    let cpu = n - g;
    let keep = crate::cpu::plan::cpu_rows(cpu, fraction, crate::pipeline::ROW_MULTIPLE);
    Ok(Part {
        key,
        n,
        g,
        u: cpu - keep,
        host,
    })
}

/// Queues the device's columns of `y (+)= x · W(part)ᵀ`: the slot's rows,
/// then the CPU rows copied for this pass (through `upload`), into the
/// first `part.d()` columns of `y`, whose rows are `part.n` apart.
///
/// # Safety
/// As for [`rows_product`]: `x` holds `t × k` inputs, the slot the
/// weight's `part.g` rows, `y` `t` rows of `part.n` f32; `upload` is on the
/// stream's context.
#[allow(clippy::too_many_arguments)]
unsafe fn device_columns(
    blas: &mut Cublas,
    at_use: Option<&AtUse>,
    upload: Option<&Upload>,
    x: Split,
    w: &SlotWeights<'_, '_>,
    p: &Part<'_>,
    y: u64,
    (t, k): (usize, usize),
    beta: f32,
    s: &Stream,
) -> Result<()> {
    let how = (w.dtype, at_use);
    if p.g > 0 {
        let src = w.rows_src(p.key, s)?;
        // SAFETY: forwarded from the caller.
        unsafe { rows_product(blas, how, src, x, y, (t, p.g, k, p.n), beta, s)? };
    }
    let (Some(h), true) = (&p.host, p.u > 0) else {
        return Ok(());
    };
    let up =
        upload.ok_or_else(|| Error::Pipeline(format!("{}: CPU rows to copy, no buffer", p.key)))?;
    let row = h
        .ty()
        .row_bytes(k as u64)
        .map_err(|e| Error::Pipeline(format!("{}: {e}", p.key)))?;
    let bytes = &h.bytes()[..(row as usize * p.u).min(h.bytes().len())];
    if bytes.len() > up.buf.len() {
        return Err(Error::Pipeline(format!(
            "{}: CPU rows exceed the copy buffer",
            p.key
        )));
    }
    let src = if h.ty().is_quantized() {
        RowsSrc::Blocks(h.ty(), up.buf.ptr())
    } else {
        RowsSrc::Plain(up.buf.ptr())
    };
    let yd = y + (p.g * 4) as u64;
    // SAFETY: the rows are page-locked and never written; the buffer holds
    // them (checked) and is rewritten only by a later copy on `s`, after
    // this product; the rest is the caller's contract.
    unsafe {
        memcpy_htod_async(up.buf.ptr(), bytes.as_ptr(), bytes.len(), s)?;
        rows_product(blas, how, src, x, yd, (t, p.u, k, p.n), beta, s)
    }
}

impl GpuSplit {
    /// The CPU pool and staging for passes of up to `max_tokens` tokens of
    /// `cfg`'s shapes, and the copy buffer for `streamer`'s CPU rows
    /// ([`Upload`]; `at_use`: blocks are dequantized at use).
    pub(crate) fn new(
        ctx: &Context,
        streamer: &crate::LayerStreamer,
        pool: CpuPool,
        cfg: &ModelConfig,
        (max_tokens, dtype, at_use): (usize, DType, bool),
    ) -> Result<GpuSplit> {
        let upload = Upload::new(ctx, streamer, &pool, dtype, at_use)?;
        let (h, qd, kvd, inter) = (cfg.hidden, cfg.q_dim(), cfg.kv_dim(), cfg.intermediate);
        let k_max = h.max(qd).max(inter);
        let out_max = (qd + 2 * kvd).max(2 * inter).max(h);
        let out = StagingBuf::new_mapped(ctx, max_tokens * out_max * 4)?;
        // Mapped outputs are added on the device: no residual comes back.
        let resid_bytes = if out.device_ptr().is_some() {
            0
        } else {
            max_tokens * h * 4
        };
        Ok(GpuSplit {
            pool,
            dtype,
            act_hi: StagingBuf::new(ctx, max_tokens * k_max * 2)?,
            act_lo: StagingBuf::new(ctx, max_tokens * k_max * 2)?,
            resid: StagingBuf::new(ctx, resid_bytes)?,
            out,
            xf: Vec::with_capacity(max_tokens * k_max),
            ready: Event::new(ctx, false)?,
            upload,
            fraction: 1.0,
        })
    }

    /// Queues the copies of a meeting's input `x` (`t × k`) and, with
    /// `resid = (y, p)`, of the CPU columns of `y` (rows `p.n` apart), then
    /// records the event [`wait`](Self::wait) waits for.
    ///
    /// # Safety
    /// `x` and `y` are live device buffers of those shapes on `s`'s context.
    unsafe fn fetch(
        &mut self,
        s: &Stream,
        x: Split,
        t: usize,
        k: usize,
        resid: Option<(u64, &Part<'_>)>,
    ) -> Result<()> {
        let bytes = t * k * 2;
        if bytes > self.act_hi.buf.len() {
            return Err(Error::Pipeline(format!(
                "{t} tokens exceed the split's staging"
            )));
        }
        // SAFETY: the staging buffers hold `bytes` (checked) and the host
        // touches them only after `ready`, recorded after these copies;
        // the device ranges are the caller's contract.
        unsafe {
            memcpy_dtoh_async(self.act_hi.buf.as_mut_ptr(), x.hi, bytes, s)?;
            if x.lo != 0 {
                memcpy_dtoh_async(self.act_lo.buf.as_mut_ptr(), x.lo, bytes, s)?;
            }
            if let Some((y, p)) = resid {
                let base = self.resid.buf.as_mut_ptr();
                // Whole rows (a CPU share of 1) are one range.
                let (c, rows) = if p.d() == 0 { (t * p.n, 1) } else { (p.c(), t) };
                for r in 0..rows {
                    let src = y + ((r * p.n + p.d()) * 4) as u64;
                    memcpy_dtoh_async(base.add(r * c * 4), src, c * 4, s)?;
                }
            }
        }
        self.ready.record(s)
    }

    /// [`wait`](Self::wait) when the CPU has columns in this meeting.
    fn wait_if(&mut self, meet: bool, t: usize, k: usize, lo: bool) -> Result<Duration> {
        if meet {
            self.wait(t, k, lo)
        } else {
            Ok(Duration::ZERO)
        }
    }

    /// Waits for the last [`fetch`](Self::fetch) and widens its input to
    /// f32; returns the time waited.
    fn wait(&mut self, t: usize, k: usize, lo: bool) -> Result<Duration> {
        let t0 = Instant::now();
        self.ready.synchronize()?;
        let waited = t0.elapsed();
        let n = t * k;
        let widen = |b: &[u8]| -> f32 {
            let bits = u16::from_le_bytes([b[0], b[1]]);
            match self.dtype {
                DType::F16 => half::f16::from_bits(bits).to_f32(),
                _ => half::bf16::from_bits(bits).to_f32(),
            }
        };
        self.xf.clear();
        let hi = self.act_hi.buf.as_slice()[..n * 2].chunks_exact(2);
        self.xf.extend(hi.map(widen));
        if lo {
            let lo = self.act_lo.buf.as_slice()[..n * 2].chunks_exact(2);
            self.xf.iter_mut().zip(lo).for_each(|(x, b)| *x += widen(b));
        }
        Ok(waited)
    }

    /// The CPU's columns of `p` for `t` tokens into `out` at f32 offset
    /// `at`; returns the time taken.
    fn compute(&mut self, p: &Part<'_>, t: usize, at: usize) -> Result<Duration> {
        let Some(m) = p.cpu_matrix()? else {
            return Ok(Duration::ZERO);
        };
        let t0 = Instant::now();
        let out = &mut self.out.buf.as_mut_slice()[at * 4..(at + t * p.c()) * 4];
        let out: &mut [f32] = bytemuck::try_cast_slice_mut(out)
            .map_err(|e| Error::Pipeline(format!("split staging: {e}")))?;
        self.pool.matmul(&m, &self.xf, t, out)?;
        Ok(t0.elapsed())
    }

    /// Queues `p`'s CPU columns (at f32 offset `at` of `out`) into the last
    /// columns of `y`, added to them with `add`: through the mapped
    /// staging by a kernel, else by copies (with the fetched residual
    /// added on the host).
    ///
    /// # Safety
    /// `y` is a live device buffer of `t` rows of `p.n` f32 on `s`'s context.
    #[allow(clippy::too_many_arguments)]
    unsafe fn send(
        &mut self,
        k: &ModelKernels,
        s: &Stream,
        y: u64,
        p: &Part<'_>,
        t: usize,
        at: usize,
        add: bool,
    ) -> Result<()> {
        let c = p.c();
        if c == 0 {
            return Ok(());
        }
        if let Some(dev) = self.out.device_ptr() {
            // SAFETY: `dev + at` is the mapped address of the t × c floats
            // just written, which the host writes again only after a later
            // event, recorded after this kernel; `y` is the caller's
            // contract.
            return unsafe {
                k.add_host_columns(s, dev + (at * 4) as u64, y, (t, c, p.n, p.d()), add)
            };
        }
        if add {
            let bytes = &self.resid.buf.as_slice()[..t * c * 4];
            let out = &mut self.out.buf.as_mut_slice()[at * 4..(at + t * c) * 4];
            for (o, r) in out.chunks_exact_mut(4).zip(bytes.chunks_exact(4)) {
                let sum = f32::from_le_bytes([o[0], o[1], o[2], o[3]])
                    + f32::from_le_bytes([r[0], r[1], r[2], r[3]]);
                o.copy_from_slice(&sum.to_le_bytes());
            }
        }
        let base = self.out.buf.as_ptr();
        // Whole rows (a CPU share of 1) are one range.
        let (c, rows) = if p.d() == 0 { (t * c, 1) } else { (c, t) };
        for r in 0..rows {
            let dst = y + ((r * p.n + p.d()) * 4) as u64;
            // SAFETY: the source row is inside `out`, which the host writes
            // again only after a later event, recorded after this copy; the
            // destination row is the caller's contract.
            unsafe { memcpy_htod_async(dst, base.add((at + r * c) * 4), c * 4, s)? };
        }
        Ok(())
    }

    /// One meeting: queues the copy of the input `x` (`t × k`) for the CPU
    /// (with `add`, also the residual's CPU columns of the one output) and
    /// the device's columns of each `(part, output)`; computes the CPU's
    /// columns once the copy has landed and queues them into the outputs
    /// (with `add`, accumulated into the residual stream `y`). A meeting
    /// where the CPU has no columns copies nothing and waits for nothing.
    ///
    /// # Safety
    /// As for [`device_columns`] for every part and output, and `x` of `t × k`
    /// on `s`'s context.
    #[allow(clippy::too_many_arguments)]
    unsafe fn meet(
        &mut self,
        (blas, at_use, kernels): (&mut Cublas, Option<&AtUse>, &ModelKernels),
        w: &SlotWeights<'_, '_>,
        x: Split,
        outs: &[(&Part<'_>, u64)],
        (t, k): (usize, usize),
        add: bool,
        s: &Stream,
    ) -> Result<()> {
        if add && outs.len() != 1 {
            return Err(Error::Pipeline(format!(
                "a meeting that adds into the residual stream has one output, not {}",
                outs.len()
            )));
        }
        let any = outs.iter().any(|(p, _)| p.c() > 0);
        let beta = if add { 1.0 } else { 0.0 };
        // SAFETY: forwarded from the caller.
        unsafe {
            if any {
                // Mapped staging is added on the device: no residual to fetch.
                let resid = if add && self.out.device_ptr().is_none() {
                    Some((outs[0].1, outs[0].0))
                } else {
                    None
                };
                self.fetch(s, x, t, k, resid)?;
            }
            for &(p, y) in outs {
                device_columns(
                    blas,
                    at_use,
                    self.upload.as_ref(),
                    x,
                    w,
                    p,
                    y,
                    (t, k),
                    beta,
                    s,
                )?;
            }
        }
        let stalled = self.wait_if(any, t, k, x.lo != 0)?;
        let (mut at, mut busy) = (0, Duration::ZERO);
        for &(p, y) in outs {
            busy += self.compute(p, t, at)?;
            // SAFETY: `y` holds t rows of `p.n` f32 (the caller's contract).
            unsafe { self.send(kernels, s, y, p, t, at, add)? };
            at += t * p.c();
        }
        w.w.note_cpu_side(busy, stalled);
        Ok(())
    }
}

impl CudaModel {
    /// Which CPU rows the passes copy to the device; see [`SplitUpload`].
    pub(crate) fn set_split_upload(&mut self, mode: SplitUpload) {
        if let Some(u) = self.split.as_mut().and_then(|s| s.upload.as_mut()) {
            u.mode = mode;
        }
    }

    /// How passes share the CPU rows out ([`Upload`]), in a line; `None`
    /// without a split.
    pub(crate) fn split_note(&self) -> Option<String> {
        let sp = self.split.as_ref()?;
        Some(match &sp.upload {
            Some(u) => u.describe(),
            None => "the CPU computes all its rows in every pass (they can't be copied as stored)"
                .into(),
        })
    }

    /// One decoder layer with the row split; see the module docs.
    pub(super) fn split_layer(
        &mut self,
        cfg: &ModelConfig,
        b: &PassBatch,
        w: &SlotWeights<'_, '_>,
        layer: usize,
        s: &Stream,
    ) -> Result<()> {
        let t = b.tokens.len();
        let sp = self.split.as_deref_mut().ok_or_else(no_split)?;
        sp.fraction = sp.upload.as_ref().map_or(1.0, |u| u.cpu_fraction(t));
        self.split_attention(cfg, b, w, layer, s)?;
        self.split_mlp(cfg, b.tokens.len(), w, s)
    }

    /// RMSNorm, the q/k/v meeting, RoPE, the cache write and attention on
    /// the device, and the o_proj meeting into the residual stream.
    fn split_attention(
        &mut self,
        cfg: &ModelConfig,
        b: &PassBatch,
        w: &SlotWeights<'_, '_>,
        layer: usize,
        s: &Stream,
    ) -> Result<()> {
        let t = b.tokens.len();
        let (h, qd, kvd) = (cfg.hidden, cfg.q_dim(), cfg.kv_dim());
        let au = self.at_use.as_deref();
        let sp = self.split.as_deref_mut().ok_or_else(no_split)?;
        let (ws, blas, k) = (&self.ws, &mut self.blas, &self.kernels);
        let (xn, attn, x) = (ws.xn.split(), ws.attn.split(), ws.x.ptr());
        let q = part(w.w, "self_attn.q_proj.weight", qd, sp.fraction)?;
        let kp = part(w.w, "self_attn.k_proj.weight", kvd, sp.fraction)?;
        let v = part(w.w, "self_attn.v_proj.weight", kvd, sp.fraction)?;
        let o = part(w.w, "self_attn.o_proj.weight", h, sp.fraction)?;
        let qkv = [(&q, ws.q.ptr()), (&kp, ws.k.ptr()), (&v, ws.v.ptr())];
        let bias = |key: &str| if cfg.qkv_bias { w.ptr(key) } else { Ok(0) };
        let biases = [
            bias("self_attn.q_proj.bias")?,
            bias("self_attn.k_proj.bias")?,
            bias("self_attn.v_proj.bias")?,
        ];
        let (seq, pos, il) = (ws.seq.ptr(), ws.pos.ptr(), cfg.rope_interleaved);
        // SAFETY: as in `CudaModel::attention`: weights of their shapes in
        // the live slot (the device's rows of split ones), workspaces sized
        // for max_tokens >= t, staging sized for the same; the caches (the
        // layer's, or an offload slot of the same size) hold every
        // (seq, pos) of the pass; x holds t rows of `hidden` f32.
        unsafe {
            let norm = w.ptr("input_layernorm.weight")?;
            k.rms_norm(s, x, norm, 0, xn, t, h, cfg.rms_norm_eps)?;
            sp.meet((blas, au, k), w, xn, &qkv, (t, h), false, s)?;
            let (qp, kpp, vp, a) = (ws.q.ptr(), ws.k.ptr(), ws.v.ptr(), &self.attn);
            let rope = (self.cos.ptr(), self.sin.ptr());
            let (kc, vc) = self.kv.attend(layer, s)?;
            a.write_cache(s, qp, kpp, vp, biases, rope, seq, pos, (kc, vc), t, il)?;
            a.run(s, qp, kc, vc, seq, pos, attn.hi, attn.lo)?;
            self.kv.attended(layer, s)?;
            sp.meet((blas, au, k), w, attn, &[(&o, x)], (t, qd), true, s)
        }
    }

    /// RMSNorm, the gate/up meeting, SwiGLU on the device, and the
    /// down_proj meeting into the residual stream.
    fn split_mlp(
        &mut self,
        cfg: &ModelConfig,
        t: usize,
        w: &SlotWeights<'_, '_>,
        s: &Stream,
    ) -> Result<()> {
        let (h, inter) = (cfg.hidden, cfg.intermediate);
        let au = self.at_use.as_deref();
        let sp = self.split.as_deref_mut().ok_or_else(no_split)?;
        let (ws, blas, k) = (&self.ws, &mut self.blas, &self.kernels);
        let (xn, act, x) = (ws.xn.split(), ws.act.split(), ws.x.ptr());
        let gate = part(w.w, "mlp.gate_proj.weight", inter, sp.fraction)?;
        let up = part(w.w, "mlp.up_proj.weight", inter, sp.fraction)?;
        let down = part(w.w, "mlp.down_proj.weight", h, sp.fraction)?;
        let (gp, upp) = (ws.gate_up.ptr(), ws.gate_up.ptr() + (t * inter * 4) as u64);
        // SAFETY: as in `CudaModel::mlp`, with gate and up as separate
        // [t, inter] f32 matrices in gate_up (which holds t * 2 * inter);
        // x holds t rows of `hidden` f32.
        unsafe {
            let post = w.ptr("post_attention_layernorm.weight")?;
            k.rms_norm(s, x, post, 0, xn, t, h, cfg.rms_norm_eps)?;
            let gu = [(&gate, gp), (&up, upp)];
            sp.meet((blas, au, k), w, xn, &gu, (t, h), false, s)?;
            k.swiglu(s, (gp, upp, false), act, t, inter, inter)?;
            sp.meet((blas, au, k), w, act, &[(&down, x)], (t, inter), true, s)
        }
    }
}

fn no_split() -> Error {
    Error::Pipeline("the split layer ran without the split's staging".into())
}
