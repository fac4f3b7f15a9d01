//! Measuring the ceilings a pass is judged against, on the machine at hand:
//! the disk's best sequential read of the model's files, and the host-to-device
//! bandwidth from pinned and pageable memory, and the bf16 GEMM throughput of
//! cuBLAS. Also a kernel that occupies the compute stream for a set time,
//! standing in for a layer's compute.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::cuda::{self, Context, DeviceBuffer, Event, Function, HostRegistration, Module, Stream};
use crate::io::{AlignedBuf, DirectFile, OpenMode, ReadMode};
use crate::pipeline::stats::gbps;
use crate::{Error, Result};

/// What [`drop_page_cache`] managed to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheDrop {
    /// `posix_fadvise(POSIX_FADV_DONTNEED)` succeeded on every file.
    pub fadvise: bool,
    /// Writing `/proc/sys/vm/drop_caches` succeeded (needs root).
    pub drop_caches: bool,
}

impl CacheDrop {
    /// A sentence for reports.
    pub fn describe(&self) -> &'static str {
        match (self.drop_caches, self.fadvise) {
            (true, _) => "page cache dropped (drop_caches)",
            (false, true) => "page cache dropped for the model's files (fadvise)",
            (false, false) => {
                "page cache NOT dropped (not permitted): buffered numbers may be cached"
            }
        }
    }
}

/// Evicts `paths` from the page cache: `fadvise(DONTNEED)` per file, and
/// `drop_caches` where permitted.
pub fn drop_page_cache(paths: &[PathBuf]) -> CacheDrop {
    use nix::fcntl::{posix_fadvise, PosixFadviseAdvice};
    use std::os::fd::AsRawFd;
    let mut fadvise = true;
    for p in paths {
        let ok = std::fs::File::open(p).is_ok_and(|f| {
            posix_fadvise(f.as_raw_fd(), 0, 0, PosixFadviseAdvice::POSIX_FADV_DONTNEED).is_ok()
        });
        fadvise &= ok;
    }
    // SAFETY: `sync` has no preconditions.
    unsafe { libc::sync() };
    let drop_caches = std::fs::write("/proc/sys/vm/drop_caches", "1\n").is_ok();
    CacheDrop {
        fadvise,
        drop_caches,
    }
}

/// One point of a disk-read sweep.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DiskResult {
    /// `O_DIRECT` or buffered.
    pub mode: ReadMode,
    /// Reader threads.
    pub threads: usize,
    /// Bytes per request.
    pub chunk: u64,
    /// Bytes read.
    pub bytes: u64,
    /// Wall time.
    pub seconds: f64,
}

impl DiskResult {
    /// Throughput in GB/s.
    pub fn gbps(&self) -> f64 {
        gbps(self.bytes, Duration::from_secs_f64(self.seconds))
    }
}

/// Reads the first `sample` bytes of `files` (in order, as one sequence) with
/// `threads` threads taking `chunk`-byte requests in turn.
pub fn disk_read(
    files: &[PathBuf],
    mode: OpenMode,
    threads: usize,
    chunk: u64,
    sample: u64,
) -> Result<DiskResult> {
    if chunk == 0 || !chunk.is_multiple_of(4096) || threads == 0 {
        return Err(Error::config(format!(
            "disk read: chunk must be a positive multiple of 4096 ({chunk}) and threads positive ({threads})"
        )));
    }
    let opened = files
        .iter()
        .map(|p| DirectFile::open(p, mode))
        .collect::<Result<Vec<_>>>()?;
    let actual = opened
        .first()
        .map(|f| f.mode())
        .unwrap_or(ReadMode::Buffered);
    // The requests: (file, offset, len, required_end).
    let mut units = Vec::new();
    let mut left = sample;
    for (i, f) in opened.iter().enumerate() {
        let mut off = 0;
        while off < f.len() && left > 0 {
            let data = chunk.min(f.len() - off).min(left);
            units.push((i, off, data.div_ceil(4096) * 4096, off + data));
            off += chunk;
            left = left.saturating_sub(data);
        }
    }
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let t = Instant::now();
    let bytes = std::thread::scope(|s| -> Result<u64> {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| -> Result<u64> {
                    let mut buf = AlignedBuf::new(chunk as usize)?;
                    let mut bytes = 0;
                    while !failed.load(Ordering::Relaxed) {
                        let Some(&(f, off, len, end)) =
                            units.get(next.fetch_add(1, Ordering::Relaxed))
                        else {
                            break;
                        };
                        let r = opened[f].read_aligned(
                            off,
                            &mut buf.as_mut_slice()[..len as usize],
                            end,
                        );
                        if let Err(e) = r {
                            failed.store(true, Ordering::Relaxed);
                            return Err(e);
                        }
                        bytes += end - off;
                    }
                    Ok(bytes)
                })
            })
            .collect();
        let mut total = 0;
        for h in handles {
            total += h
                .join()
                .map_err(|_| Error::Pipeline("a disk reader thread panicked".into()))??;
        }
        Ok(total)
    })?;
    Ok(DiskResult {
        mode: actual,
        threads,
        chunk,
        bytes,
        seconds: t.elapsed().as_secs_f64(),
    })
}

/// Host-to-device bandwidth.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct H2dResult {
    /// Bytes per copy.
    pub bytes: u64,
    /// From pinned memory, GB/s (best of the repetitions).
    pub pinned_gbps: f64,
    /// From pageable memory, GB/s (best of the repetitions).
    pub pageable_gbps: f64,
}

/// Measures H2D bandwidth with `bytes`-byte copies, timed with events.
pub fn h2d_bandwidth(ctx: &Context, bytes: usize, reps: usize) -> Result<H2dResult> {
    let stream = Stream::new(ctx)?;
    let dev = DeviceBuffer::alloc(ctx, bytes)?;
    let mut host = AlignedBuf::new(bytes)?;
    host.as_mut_slice()
        .iter_mut()
        .enumerate()
        .for_each(|(i, b)| *b = i as u8);
    let (start, end) = (Event::new(ctx, true)?, Event::new(ctx, true)?);
    let time = |src: *const u8| -> Result<f64> {
        let mut best = 0f64;
        for _ in 0..reps.max(1) {
            start.record(&stream)?;
            // SAFETY: `src` is `host`, valid for `bytes` and alive until the
            // synchronize below; `dev` holds `bytes`.
            unsafe { cuda::memcpy_htod_async(dev.ptr(), src, bytes, &stream)? };
            end.record(&stream)?;
            end.synchronize()?;
            let ms = Event::elapsed_ms(&start, &end)?;
            best = best.max(bytes as f64 / (f64::from(ms) / 1e3) / 1e9);
        }
        Ok(best)
    };
    let pageable_gbps = time(host.as_ptr())?;
    let (ptr, len) = (host.as_mut_ptr(), host.len());
    // SAFETY: `host` is page-aligned, `len` bytes, and outlives `reg`.
    let reg = unsafe { HostRegistration::register(ctx, ptr, len)? };
    let pinned_gbps = time(host.as_ptr())?;
    drop(reg);
    Ok(H2dResult {
        bytes: bytes as u64,
        pinned_gbps,
        pageable_gbps,
    })
}

/// The bf16 GEMM throughput of cuBLAS (f32 accumulation, bf16 output) at a
/// square size `n`, in TFLOP/s: the best of `reps` timed products after one
/// untimed one (which lets cuBLAS choose its kernel). Needs `3 · n² · 2`
/// bytes of device memory.
pub fn gemm_peak_tflops(ctx: &Context, n: usize, reps: usize) -> Result<f64> {
    use crate::cuda::cublas::{Cublas, GemmType};
    if n == 0 {
        return Err(Error::Input(
            "gemm_peak_tflops: the matrix size must be positive".into(),
        ));
    }
    let bytes = n
        .checked_mul(n)
        .and_then(|e| e.checked_mul(2))
        .ok_or_else(|| Error::Input(format!("gemm_peak_tflops: {n}² bf16 overflows")))?;
    let stream = Stream::new(ctx)?;
    let mut blas = Cublas::new(ctx)?;
    blas.set_stream(&stream)?;
    let (a, b, c) = (
        DeviceBuffer::alloc(ctx, bytes)?,
        DeviceBuffer::alloc(ctx, bytes)?,
        DeviceBuffer::alloc(ctx, bytes)?,
    );
    // 0x3c3c is bf16 0.0115: finite, normal operands of a steady magnitude.
    a.memset_async(0x3c, &stream)?;
    b.memset_async(0x3c, &stream)?;
    let (start, end) = (Event::new(ctx, true)?, Event::new(ctx, true)?);
    let bf = GemmType::BF16;
    let mut best = 0f64;
    for rep in 0..=reps.max(1) {
        start.record(&stream)?;
        // SAFETY: a, b and c are n × n bf16 matrices of this context, alive
        // until the synchronize below.
        unsafe { blas.linear(a.ptr(), b.ptr(), bf, c.ptr(), bf, n, n, n, 0.0)? };
        end.record(&stream)?;
        end.synchronize()?;
        let s = f64::from(Event::elapsed_ms(&start, &end)?) / 1e3;
        if rep > 0 {
            best = best.max(2.0 * (n as f64).powi(3) / s.max(1e-9) / 1e12);
        }
    }
    Ok(best)
}

/// A kernel that keeps a stream busy for a set time.
pub struct Spinner {
    _module: Module,
    spin: Function,
}

impl Spinner {
    /// Loads the timing kernel into `ctx`.
    pub fn load(ctx: &Context) -> Result<Spinner> {
        let ptx = crate::kernels::PTX_MODULES
            .iter()
            .find(|(n, _)| *n == "timing")
            .map(|(_, p)| *p)
            .ok_or_else(|| Error::Pipeline("the timing kernel's PTX is missing".into()))?;
        let module = Module::load_ptx(ctx, ptx)?;
        Ok(Spinner {
            spin: module.function("spin_ns")?,
            _module: module,
        })
    }

    /// Queues `d` of busy time on `stream`.
    pub fn spin(&self, stream: &Stream, d: Duration) -> Result<()> {
        let mut ns = d.as_nanos() as u64;
        let mut params = [(&mut ns) as *mut u64 as *mut std::ffi::c_void];
        // SAFETY: `spin_ns` takes one u64 by value; `params` points at it.
        unsafe {
            self.spin
                .launch((1, 1, 1), (1, 1, 1), 0, stream, &mut params)
        }
    }
}

/// The model's safetensors files.
pub fn model_files(model: &crate::ModelIndex) -> Vec<PathBuf> {
    model.files().iter().map(|f| f.path.clone()).collect()
}

/// A path's file name, for short reports.
pub fn short_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| p.display().to_string())
}
