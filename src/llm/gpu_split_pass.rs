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
//! (`f` from 0.85 is 1, up to 0.35 is 0): a few copied rows delay the CPU's
//! next meeting, and a few CPU rows of a large pass cost more in copies and
//! widening of the activations than their product.
//!
//! `a(t)` comes from the CPU rates measured when the model is loaded at 1,
//! 8 and 32 tokens, linear between them and past 32 with the slope from 8
//! to 32 (the products decode a row once for up to 8 tokens, so a larger
//! pass costs more per token than the first 8 do; a line through 1 and 8
//! tokens alone kept a third of the rows on the CPU at 32 tokens and
//! halved that batch's decode rate). `b` and `d` come from a copy timed at
//! load. [`SplitUpload`] (or `LS_SPLIT_UPLOAD` = `auto`, `never`,
//! `always`) can fix the choice.

use crate::cpu::calibrate::Calibration;
use crate::cpu::CpuPool;
use crate::cuda::{Context, DeviceBuffer};
use crate::pipeline::split_auto::h2d_rate;
use crate::quant::QuantType;
use crate::{DType, Error, HostRows, LayerStreamer, Result};

/// The fraction from which the CPU computes all its rows.
const KEEP_ALL: f64 = 0.85;

/// The fraction up to which the device computes all the CPU's rows.
/// (A 7B bf16 decode of 32 sequences on an H200 host kept 0.26 of its rows
/// on the CPU at the rates measured at load: 109 tokens/s against 151 with
/// every row on the device, the CPU slower beside the copies than alone and
/// each meeting a wait for the device.)
const GIVE_ALL: f64 = 0.35;

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
    /// Seconds of the CPU for its rows of a split layer by token count.
    cpu: CpuCost,
    /// Copy seconds of those rows, and of the layer's device rows.
    copy_s: (f64, f64),
}

/// The token counts the CPU's products are measured at when the model is
/// loaded.
pub(crate) const CALIBRATED_TOKENS: [usize; 3] = [1, 8, 32];

/// The CPU's seconds for all its rows of a split layer, by the tokens of a
/// pass, from measurements at [`CALIBRATED_TOKENS`] at load.
#[derive(Debug, Clone)]
pub(crate) struct CpuCost {
    /// `(tokens, seconds)`, by increasing tokens.
    calibrated: Vec<(usize, f64)>,
}

impl CpuCost {
    /// The costs measured at load (`(tokens, seconds)`). More tokens never
    /// cost less (the product reads the same rows and does more), so a
    /// point above a later one was slowed by something else and takes the
    /// later one's time.
    pub(crate) fn new(mut calibrated: Vec<(usize, f64)>) -> CpuCost {
        calibrated.sort_by_key(|&(t, _)| t);
        calibrated.dedup_by_key(|&mut (t, _)| t);
        for i in (1..calibrated.len()).rev() {
            calibrated[i - 1].1 = calibrated[i - 1].1.min(calibrated[i].1);
        }
        CpuCost { calibrated }
    }

    /// Seconds for `t` tokens: linear between the measured points and past
    /// the last with the slope of the last two (never below the cost of
    /// fewer tokens).
    pub(crate) fn seconds(&self, t: usize) -> f64 {
        let c = &self.calibrated;
        let Some(&(t0, s0)) = c.first() else {
            return 0.0;
        };
        if c.len() == 1 || t <= t0 {
            return s0;
        }
        let i = c
            .iter()
            .position(|&(ti, _)| ti >= t)
            .unwrap_or(c.len() - 1)
            .max(1);
        let ((ta, sa), (tb, sb)) = (c[i - 1], c[i]);
        if t == tb {
            // A measured point is its measurement, not an interpolation's
            // rounding of it.
            return sb;
        }
        let slope = ((sb - sa) / (tb - ta) as f64).max(0.0);
        sa + slope * (t - ta) as f64
    }
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
        // One matrix per type for every token count.
        let cal = Calibration::new(pool, &types, 32 << 20)?;
        let secs = |tokens| -> Result<f64> {
            let rates = cal.products(pool, tokens, 3)?;
            rates.seconds(
                &rows[l]
                    .iter()
                    .map(|h| (h.ty(), h.bytes().len() as u64))
                    .collect::<Vec<_>>(),
            )
        };
        let calibrated = (CALIBRATED_TOKENS.iter())
            .map(|&t| Ok((t, secs(t)?)))
            .collect::<Result<Vec<_>>>()?;
        let bps = copy_rate(ctx, &buf, &rows)?;
        Ok(Some(Upload {
            buf,
            mode,
            cpu: CpuCost::new(calibrated),
            copy_s: (host as f64 / bps, device as f64 / bps),
        }))
    }

    /// The costs and the fractions they give, in a line.
    pub(crate) fn describe(&self) -> String {
        let ms = |s: f64| s * 1e3;
        format!(
            "a split layer's CPU rows: {:.2} ms on the CPU at 1 token, {:.2} at 8, {:.2} at 32, \
             copies {:.2} ms (CPU rows) and {:.2} ms (device rows); CPU fraction {:?}: \
             {:.2} at 1 token, {:.2} at 8, {:.2} at 32, {:.2} at 512",
            ms(self.cpu.seconds(1)),
            ms(self.cpu.seconds(8)),
            ms(self.cpu.seconds(32)),
            ms(self.copy_s.0),
            ms(self.copy_s.1),
            self.mode,
            self.cpu_fraction(1),
            self.cpu_fraction(8),
            self.cpu_fraction(32),
            self.cpu_fraction(512),
        )
    }

    /// The fraction of its rows the CPU computes in a pass of `t` tokens.
    pub(crate) fn cpu_fraction(&self, t: usize) -> f64 {
        match self.mode {
            SplitUpload::Never => 1.0,
            SplitUpload::Always => 0.0,
            SplitUpload::Auto => {
                let (b, d) = self.copy_s;
                balance(self.cpu.seconds(t), b, d)
            }
        }
    }
}

/// The CPU's fraction of its rows that makes both sides finish together
/// (module docs), taken all the way near either end.
pub(crate) fn balance(a: f64, b: f64, d: f64) -> f64 {
    let f = ((d + b) / (a + b).max(1e-12)).clamp(0.0, 1.0);
    // A few rows copied on the compute stream cost the CPU side a wait for
    // them at its next meeting: near balance, the CPU keeps them. A few rows
    // left on the CPU of a large pass cost more than their product (the
    // activations' copies and widening): the device takes them.
    if f >= KEEP_ALL {
        1.0
    } else if f <= GIVE_ALL {
        0.0
    } else {
        f
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

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;

    fn random_cost(rng: &mut impl Rng) -> (CpuCost, [f64; 3]) {
        let a1 = rng.gen_range(1e-3..5e-3);
        let a8 = a1 + rng.gen_range(1e-4..5e-3);
        let a32 = a8 + rng.gen_range(1e-3..2e-2);
        let points = vec![(32, a32), (1, a1), (8, a8)];
        (CpuCost::new(points), [a1, a8, a32])
    }

    #[test]
    fn the_calibration_is_linear_between_its_points_and_past_the_last() {
        let mut rng = rand::thread_rng();
        for _ in 0..100 {
            let (cost, [a1, a8, a32]) = random_cost(&mut rng);
            let close = |x: f64, y: f64| (x - y).abs() <= 1e-12 * y.abs().max(1.0);
            assert!(close(cost.seconds(1), a1));
            assert!(close(cost.seconds(8), a8));
            assert!(close(cost.seconds(32), a32));
            let t = rng.gen_range(2..8);
            assert!(close(
                cost.seconds(t),
                a1 + (a8 - a1) * (t - 1) as f64 / 7.0
            ));
            let t = rng.gen_range(9..32);
            assert!(close(
                cost.seconds(t),
                a8 + (a32 - a8) * (t - 8) as f64 / 24.0
            ));
            let t = rng.gen_range(33..4096);
            assert!(close(
                cost.seconds(t),
                a32 + (a32 - a8) * (t - 32) as f64 / 24.0
            ));
            assert!(cost.seconds(t) >= cost.seconds(32));
        }
    }

    #[test]
    fn a_point_slower_than_more_tokens_takes_their_time() {
        let mut rng = rand::thread_rng();
        let a8 = rng.gen_range(1e-3..5e-3);
        let a32 = a8 * rng.gen_range(2.0..5.0);
        // One token measured slower than eight (the pool was busy).
        let slow = a8 * rng.gen_range(1.5..4.0);
        let cost = CpuCost::new(vec![(1, slow), (8, a8), (32, a32)]);
        assert_eq!(cost.seconds(1), a8);
        assert_eq!(cost.seconds(8), a8);
        assert_eq!(cost.seconds(32), a32);
    }

    #[test]
    fn large_passes_go_to_the_device_and_one_token_stays_on_the_cpu() {
        let mut rng = rand::thread_rng();
        for _ in 0..100 {
            // Copies: the CPU rows' b and the device rows' d; the CPU at 1
            // token just fast enough to keep its rows.
            let b = rng.gen_range(2e-3..5e-3);
            let d = rng.gen_range(2e-3..5e-3);
            let a1 = (d + b) / rng.gen_range(0.86..1.0) - b;
            // Eight tokens cost less than twice one; 32 four times 8.
            let a8 = a1 * rng.gen_range(1.2..2.0);
            let cost = CpuCost::new(vec![(1, a1), (8, a8), (32, 4.0 * a8)]);
            assert_eq!(balance(cost.seconds(1), b, d), 1.0);
            let f8 = balance(cost.seconds(8), b, d);
            assert!(f8 > 0.0 && f8 <= 1.0, "{f8}");
            let f32 = balance(cost.seconds(32), b, d);
            assert!(
                f32 < 0.5,
                "{f32}: a third of the rows or more on the CPU at 32 tokens"
            );
            assert_eq!(balance(cost.seconds(512), b, d), 0.0);
            // The line through 1 and 8 alone would have kept more at 32.
            let line = a1 + (a8 - a1) * 31.0 / 7.0;
            assert!(balance(line, b, d) >= f32);
        }
    }
}
