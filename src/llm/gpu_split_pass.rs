//! How much of its rows the CPU computes in a pass of `t` tokens, and the
//! device buffer the other CPU rows go through.
//!
//! The streamer fixes each layer's split at build, for decoding. A larger
//! pass makes the CPU's rows cost more on the CPU (its products turn
//! compute-bound after a few tokens) while the device's rows cost the same
//! copy, so the CPU keeps a fraction `f` of its rows and the device takes
//! the rest, copied from the page-locked CPU rows into [`Upload`] on the
//! compute stream and multiplied there. With `a(t)` the CPU's time for all
//! its rows of a layer, `b` their copy time and `d` the copy time of the
//! device's rows, both sides finish together at `f · a = d + (1 - f) · b`:
//!
//! `f = (d + b) / (a + b)`, clamped to `[0, 1]`.
//!
//! Decoding at a balanced share gives `f ≈ 1`; a CPU slower than the
//! share was planned for hands rows back; prefill gives `f ≈ 0`, the
//! whole layer on the device. Near either end the pass goes all the way
//! (`f` from 0.85 is 1, up to 0.25 is 0): a few copied rows delay the CPU's
//! next meeting, and a few CPU rows of a large pass cost more in copies and
//! widening of the activations than their product. `a(t)` is linear in `t` through the CPU
//! rates measured at 1 and 8 tokens when the model is loaded, `b` and `d`
//! come from a copy timed then. [`SplitUpload`] (or `LS_SPLIT_UPLOAD` =
//! `auto`, `never`, `always`) can fix the choice.

use crate::cpu::calibrate::calibrate;
use crate::cpu::CpuPool;
use crate::cuda::{Context, DeviceBuffer};
use crate::pipeline::split_auto::h2d_rate;
use crate::quant::QuantType;
use crate::{DType, Error, HostRows, LayerStreamer, Result};

/// The fraction from which the CPU computes all its rows.
const KEEP_ALL: f64 = 0.85;

/// The fraction up to which the device computes all the CPU's rows.
const GIVE_ALL: f64 = 0.25;

/// Which of the CPU's rows of a CPU/GPU row split a CUDA pass copies to
/// the device and computes there instead ([`LlamaModel::set_split_upload`]).
/// Rows the device can't read as stored (not page-locked, or f16/f32 rows
/// for a bf16 pass) stay on the CPU whatever the choice.
///
/// [`LlamaModel::set_split_upload`]: crate::llm::LlamaModel::set_split_upload
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SplitUpload {
    /// As many as make both sides finish together, pass by pass (the
    /// default): none when decoding at a balanced share, all in prefill.
    #[default]
    Auto,
    /// None: the CPU computes all its rows in every pass.
    Never,
    /// All: the device computes every row in every pass.
    Always,
}

impl SplitUpload {
    /// The choice `LS_SPLIT_UPLOAD` names (`auto` when unset).
    pub fn from_env() -> Result<SplitUpload> {
        match std::env::var("LS_SPLIT_UPLOAD").ok().as_deref() {
            None | Some("auto") => Ok(SplitUpload::Auto),
            Some("never") => Ok(SplitUpload::Never),
            Some("always") => Ok(SplitUpload::Always),
            Some(v) => Err(Error::config(format!(
                "LS_SPLIT_UPLOAD={v:?}: expected auto, never or always"
            ))),
        }
    }
}

/// The device buffer CPU rows are copied into, and the costs the fraction
/// is computed from.
pub(crate) struct Upload {
    pub(crate) buf: DeviceBuffer,
    pub(crate) mode: SplitUpload,
    /// Seconds of the CPU for its rows of a split layer at 1 token, and
    /// what each further token adds.
    cpu_s: (f64, f64),
    /// Copy seconds of those rows, and of the layer's device rows.
    copy_s: (f64, f64),
}

/// Whether the device can multiply CPU rows of `ty` copied as they are: the
/// model's 16-bit dtype, or blocks the at-use kernels decode.
pub(crate) fn device_reads(ty: QuantType, dtype: DType, at_use: bool) -> bool {
    QuantType::from_dtype(dtype) == Some(ty) || (ty.is_quantized() && at_use)
}

impl Upload {
    /// The buffer and costs for `streamer`'s split, or `None` when no pass
    /// can copy CPU rows: they are not page-locked, or of a type the device
    /// would have to cast.
    pub(crate) fn new(
        ctx: &Context,
        streamer: &LayerStreamer,
        pool: &CpuPool,
        dtype: DType,
        at_use: bool,
    ) -> Result<Option<Upload>> {
        let mode = SplitUpload::from_env()?;
        let layers = streamer.device_layers();
        let rows: Vec<Vec<HostRows<'_>>> = (0..layers.len())
            .map(|l| streamer.host_rows_of(l))
            .collect();
        let all = || rows.iter().flatten();
        let readable = all().all(|h| h.is_pinned() && device_reads(h.ty(), dtype, at_use));
        let largest = all().map(|h| h.bytes().len()).max().unwrap_or(0);
        if !readable || largest == 0 {
            return Ok(None);
        }
        let buf = DeviceBuffer::alloc(ctx, largest).map_err(|e| {
            Error::config(format!(
                "the device buffer for CPU rows a large pass copies ({largest} bytes) does not fit: {e}"
            ))
        })?;
        // The most CPU bytes of a layer, and that layer's device bytes.
        let (l, host) = (rows.iter().enumerate())
            .map(|(l, r)| (l, r.iter().map(|h| h.bytes().len() as u64).sum::<u64>()))
            .max_by_key(|&(_, b)| b)
            .unwrap_or((0, 0));
        let device = layers.get(l).map_or(0, |x| x.data_bytes);
        let mut types: Vec<QuantType> = all().map(|h| h.ty()).collect();
        types.sort_by_key(|t| t.ggml_type_id());
        types.dedup();
        let secs = |tokens| -> Result<f64> {
            let rates = calibrate(pool, &types, tokens, 32 << 20, 2)?;
            rates.seconds(
                &rows[l]
                    .iter()
                    .map(|h| (h.ty(), h.bytes().len() as u64))
                    .collect::<Vec<_>>(),
            )
        };
        let (one, eight) = (secs(1)?, secs(8)?);
        let bps = copy_rate(ctx, &buf, &rows)?;
        Ok(Some(Upload {
            buf,
            mode,
            cpu_s: (one, ((eight - one) / 7.0).max(0.0)),
            copy_s: (host as f64 / bps, device as f64 / bps),
        }))
    }

    /// The costs and the fractions they give, in a line.
    pub(crate) fn describe(&self) -> String {
        let ms = |s: f64| s * 1e3;
        format!(
            "a split layer's CPU rows: {:.2} ms on the CPU at 1 token (+{:.3} ms a token), \
             copies {:.2} ms (CPU rows) and {:.2} ms (device rows); CPU fraction {:?}: \
             {:.2} at 1 token, {:.2} at 8, {:.2} at 512",
            ms(self.cpu_s.0),
            ms(self.cpu_s.1),
            ms(self.copy_s.0),
            ms(self.copy_s.1),
            self.mode,
            self.cpu_fraction(1),
            self.cpu_fraction(8),
            self.cpu_fraction(512),
        )
    }

    /// The fraction of its rows the CPU computes in a pass of `t` tokens.
    pub(crate) fn cpu_fraction(&self, t: usize) -> f64 {
        match self.mode {
            SplitUpload::Never => 1.0,
            SplitUpload::Always => 0.0,
            SplitUpload::Auto => {
                let a = self.cpu_s.0 + t.saturating_sub(1) as f64 * self.cpu_s.1;
                let (b, d) = self.copy_s;
                let f = ((d + b) / (a + b).max(1e-12)).clamp(0.0, 1.0);
                // A few rows copied on the compute stream cost the CPU
                // side a wait for them at its next meeting: near balance,
                // the CPU keeps them. A few rows left on the CPU of a large
                // pass cost more than their product (the activations'
                // copies and widening): the device takes them.
                if f >= KEEP_ALL {
                    1.0
                } else if f <= GIVE_ALL {
                    0.0
                } else {
                    f
                }
            }
        }
    }
}

/// Host-to-device bytes per second from the CPU rows' page-locked memory:
/// the largest CPU part copied into `buf`.
fn copy_rate(ctx: &Context, buf: &DeviceBuffer, rows: &[Vec<HostRows<'_>>]) -> Result<f64> {
    match rows.iter().flatten().max_by_key(|h| h.bytes().len()) {
        Some(h) => h2d_rate(ctx, h.bytes(), buf),
        None => Ok(1e9),
    }
}
