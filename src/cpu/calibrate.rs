//! A short measurement of the CPU side: GB/s of stored weights per type at a
//! batch size, next to the memory read bandwidth of the same threads. The
//! planner ([`super::plan`]) turns these into per-layer times.
//!
//! A pass reads its CPU rows from DRAM, while a calibration matrix of tens of
//! MiB fits a server's last-level cache (300 MiB on some): every timed run
//! first flushes its data out of the caches (`clflush` on x86-64), and runs
//! over at least twice the last-level cache ([`calibration_bytes`]), so the
//! rates are DRAM's, over runs long enough that waking the pool's threads
//! is a small part of them.

use std::hint::black_box;
use std::time::Instant;

use rand::{Rng, SeedableRng};
use rayon::prelude::*;

use super::{CpuPool, HostMatrix};
use crate::error::{Error, Result};
use crate::quant::{self, QuantType};

/// Elements per row of the matrices measured (a 7B model's hidden size).
pub const CALIBRATION_COLS: usize = 4096;

/// The most bytes a calibration matrix or read takes.
pub const MAX_CALIBRATION_BYTES: usize = 1 << 30;

/// Bytes of the last-level cache when nothing says (Linux's sysfs does).
const DEFAULT_LLC_BYTES: usize = 32 << 20;

/// The bytes a calibration asked for `bytes` measures over: at least twice
/// the last-level cache, at most [`MAX_CALIBRATION_BYTES`]. (Over flushed
/// 32 MiB, 16 threads of a host with a 300 MiB cache read 58 to 72 GB/s in
/// one run each, against 106 over 512 MiB.)
pub fn calibration_bytes(bytes: usize) -> usize {
    bytes
        .max(2 * llc_bytes().unwrap_or(DEFAULT_LLC_BYTES))
        .min(MAX_CALIBRATION_BYTES)
}

/// The largest cache of CPU 0 (`/sys/devices/system/cpu/cpu0/cache`), in
/// bytes.
fn llc_bytes() -> Option<usize> {
    let dir = std::fs::read_dir("/sys/devices/system/cpu/cpu0/cache").ok()?;
    (dir.flatten())
        .filter_map(|e| std::fs::read_to_string(e.path().join("size")).ok())
        .filter_map(|s| parse_cache_size(s.trim()))
        .max()
}

/// `32768K`, `300M` or a byte count, as sysfs writes cache sizes.
fn parse_cache_size(s: &str) -> Option<usize> {
    let (num, unit) = match s.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => s.split_at(i),
        None => (s, ""),
    };
    let n: usize = num.parse().ok()?;
    let unit = match unit {
        "" => 1,
        "K" => 1 << 10,
        "M" => 1 << 20,
        "G" => 1 << 30,
        _ => return None,
    };
    n.checked_mul(unit)
}

/// What [`calibrate`] measured.
#[derive(Debug, Clone, PartialEq)]
pub struct CpuRates {
    /// Tokens per product.
    pub tokens: usize,
    /// Bytes of stored weights per second, per type.
    pub by_type: Vec<(QuantType, f64)>,
    /// Bytes per second a streaming sum reads on the same threads, where
    /// measured ([`calibrate`]; [`calibrate_products`] does not).
    pub read_bps: Option<f64>,
}

impl CpuRates {
    /// Bytes per second for `ty`, or an error naming the type when it was
    /// not measured.
    pub fn rate(&self, ty: QuantType) -> Result<f64> {
        self.by_type
            .iter()
            .find(|(t, _)| *t == ty)
            .map(|(_, r)| *r)
            .ok_or_else(|| {
                Error::Config(format!(
                    "no CPU rate for {ty}: calibrated {:?}",
                    self.by_type
                        .iter()
                        .map(|(t, _)| t.name())
                        .collect::<Vec<_>>()
                ))
            })
    }

    /// Seconds the CPU takes for tensors of these stored types and bytes.
    pub fn seconds(&self, tensors: &[(QuantType, u64)]) -> Result<f64> {
        tensors
            .iter()
            .map(|&(ty, bytes)| Ok(bytes as f64 / self.rate(ty)?))
            .sum()
    }
}

/// Best of `reps` runs of `f`, in seconds, each after `data` is flushed
/// from the caches.
fn best(reps: usize, data: &[u8], mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    let mut best = f64::INFINITY;
    for _ in 0..reps.max(1) {
        evict(data);
        let t = Instant::now();
        f()?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(best)
}

/// Writes back and drops every cache line of `data` from every cache level,
/// so that the next read of it comes from DRAM (nothing on architectures
/// other than x86-64).
fn evict(data: &[u8]) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_clflush, _mm_mfence};
        for line in data.chunks(64) {
            // SAFETY: `line` is readable memory of `data`; CLFLUSH (SSE2, in
            // every x86-64 CPU) only moves it out of the caches.
            unsafe { _mm_clflush(line.as_ptr()) };
        }
        // SAFETY: a fence has no operands (SSE2).
        unsafe { _mm_mfence() };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = data;
}

/// Bytes per second of a streaming sum over `bytes` bytes (at least
/// [`calibration_bytes`]) on the pool's threads.
pub fn measure_read(pool: &CpuPool, bytes: usize, reps: usize) -> f64 {
    let bytes = calibration_bytes(bytes);
    let mut buf = vec![0u64; (bytes / 8).max(1)];
    // Written by the pool's threads, which fault the pages in together.
    pool.install(|| {
        (buf.par_chunks_mut(1 << 16).enumerate()).for_each(|(i, c)| {
            (c.iter_mut().enumerate()).for_each(|(j, v)| *v = ((i << 16) + j) as u64)
        })
    });
    let secs = best(reps, bytemuck::cast_slice(&buf), || {
        let s: u64 = pool.install(|| {
            buf.par_chunks(1 << 16)
                .map(|c| c.iter().fold(0u64, |a, &v| a.wrapping_add(v)))
                .reduce(|| 0, u64::wrapping_add)
        });
        black_box(s);
        Ok(())
    })
    .unwrap_or(f64::INFINITY);
    (buf.len() * 8) as f64 / secs
}

/// A matrix of about `bytes` bytes of `ty` with rows of
/// [`CALIBRATION_COLS`]: one random stretch of rows, quantized once and
/// repeated, written by the pool's threads (a matrix the size of a few
/// last-level caches takes as long to fault in on one thread as its
/// products take). Returns the bytes and the row count.
pub fn random_matrix(
    pool: &CpuPool,
    ty: QuantType,
    bytes: usize,
    rng: &mut impl Rng,
) -> Result<(Vec<u8>, usize)> {
    let row_bytes =
        ty.row_bytes(CALIBRATION_COLS as u64)
            .map_err(|e| Error::Input(format!("calibration matrix: {e}")))? as usize;
    let seed_rows = ((1 << 20) / row_bytes).max(1);
    let src: Vec<f32> = (0..seed_rows * CALIBRATION_COLS)
        .map(|_| rng.gen_range(-1.0..1.0))
        .collect();
    let seed = quant::quantize(ty, &src)?;
    let rows = (bytes / row_bytes).max(1);
    let mut out = vec![0u8; rows * row_bytes];
    pool.install(|| {
        out.par_chunks_mut(seed.len())
            .for_each(|c| c.copy_from_slice(&seed[..c.len()]))
    });
    Ok((out, rows))
}

/// Matrices of stored types to time the pool's products on, made once and
/// measured at any number of tokens.
pub struct Calibration {
    /// Per type: the matrix's bytes and rows.
    matrices: Vec<(QuantType, Vec<u8>, usize)>,
}

impl Calibration {
    /// A matrix of each of `types` of about `bytes` bytes (at least
    /// [`calibration_bytes`]).
    pub fn new(pool: &CpuPool, types: &[QuantType], bytes: usize) -> Result<Calibration> {
        let bytes = calibration_bytes(bytes);
        let mut rng = rand::rngs::SmallRng::from_entropy();
        let matrices = (types.iter())
            .map(|&ty| {
                let (w, rows) = random_matrix(pool, ty, bytes, &mut rng)?;
                Ok((ty, w, rows))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Calibration { matrices })
    }

    /// Bytes of stored weights per second of each type in products with
    /// `tokens` tokens, best of `reps`.
    pub fn products(&self, pool: &CpuPool, tokens: usize, reps: usize) -> Result<CpuRates> {
        if tokens == 0 {
            return Err(Error::Input("calibrate: tokens is 0".into()));
        }
        let by_type = (self.matrices.iter())
            .map(|(ty, w, rows)| Ok((*ty, rate(pool, *ty, (w, *rows), tokens, reps)?)))
            .collect::<Result<Vec<_>>>()?;
        Ok(CpuRates {
            tokens,
            by_type,
            read_bps: None,
        })
    }
}

/// Bytes per second of the stored `ty` matrix `w` of `rows` rows in
/// products with `tokens` tokens, best of `reps`.
fn rate(
    pool: &CpuPool,
    ty: QuantType,
    (w, rows): (&[u8], usize),
    tokens: usize,
    reps: usize,
) -> Result<f64> {
    let m = HostMatrix::new(ty, w, rows, CALIBRATION_COLS)?;
    let mut rng = rand::rngs::SmallRng::from_entropy();
    let x: Vec<f32> = (0..tokens * CALIBRATION_COLS)
        .map(|_| rng.gen_range(-1.0..1.0))
        .collect();
    let mut y = vec![0f32; tokens * rows];
    let secs = best(reps, w, || pool.matmul(&m, &x, tokens, &mut y))?;
    black_box(&y);
    Ok(w.len() as f64 / secs)
}

/// Bytes per second of stored `ty` weights in products with `tokens` tokens,
/// over a matrix of about `bytes` bytes (at least [`calibration_bytes`]).
pub fn measure_type(
    pool: &CpuPool,
    ty: QuantType,
    bytes: usize,
    tokens: usize,
    reps: usize,
) -> Result<f64> {
    Calibration::new(pool, &[ty], bytes)?
        .products(pool, tokens, reps)?
        .rate(ty)
}

/// Measures each of `types` at `tokens` tokens over matrices of about
/// `bytes` bytes (at least [`calibration_bytes`]), best of `reps`, and the
/// read bandwidth over twice that.
pub fn calibrate(
    pool: &CpuPool,
    types: &[QuantType],
    tokens: usize,
    bytes: usize,
    reps: usize,
) -> Result<CpuRates> {
    let mut rates = calibrate_products(pool, types, tokens, bytes, reps)?;
    rates.read_bps = Some(measure_read(pool, bytes.saturating_mul(2), reps));
    Ok(rates)
}

/// [`calibrate`]'s products alone, without the read bandwidth.
pub fn calibrate_products(
    pool: &CpuPool,
    types: &[QuantType],
    tokens: usize,
    bytes: usize,
    reps: usize,
) -> Result<CpuRates> {
    if tokens == 0 {
        return Err(Error::Input("calibrate: tokens is 0".into()));
    }
    Calibration::new(pool, types, bytes)?.products(pool, tokens, reps)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;

    #[test]
    fn cache_sizes_parse_as_sysfs_writes_them() {
        let mut rng = crate::test_rng::rng();
        let n: usize = rng.gen_range(1..100_000);
        assert_eq!(parse_cache_size(&format!("{n}K")), Some(n << 10));
        assert_eq!(parse_cache_size(&format!("{n}M")), Some(n << 20));
        assert_eq!(parse_cache_size(&format!("{n}")), Some(n));
        assert_eq!(parse_cache_size(&format!("{n}Q")), None);
        assert_eq!(parse_cache_size("K"), None);
        assert_eq!(parse_cache_size(&format!("{}G", usize::MAX >> 4)), None);
    }

    #[test]
    fn calibrations_run_over_twice_the_last_level_cache() {
        let llc = llc_bytes().unwrap_or(DEFAULT_LLC_BYTES);
        let want = (2 * llc).min(MAX_CALIBRATION_BYTES);
        assert_eq!(calibration_bytes(1), want);
        assert_eq!(
            calibration_bytes(want + 7),
            (want + 7).min(MAX_CALIBRATION_BYTES)
        );
        assert_eq!(calibration_bytes(usize::MAX), MAX_CALIBRATION_BYTES);
    }
}
