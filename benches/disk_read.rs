//! Sequential read bandwidth of one large file: `O_DIRECT` against buffered
//! reads, for request sizes of 1, 4, 16 and 64 MiB and 1, 2, 4 and 8 reader
//! threads. Threads split the file into interleaved requests (thread `t`
//! reads requests `t`, `t + T`, `t + 2T`, ...), as the pipeline's readers do.
//!
//! The file is `$LS_BENCH_FILE`, or one of `$LS_BENCH_BYTES` bytes (default
//! 256 MiB) created in a temporary directory under the current directory
//! (not /tmp or /dev/shm, which may be tmpfs, where `O_DIRECT` is refused).
//! The page cache is dropped for the file before every buffered iteration
//! with `posix_fadvise(POSIX_FADV_DONTNEED)`, which needs no privileges; when
//! that fails the output says so, and buffered numbers then include cached
//! reads. Under `cargo test --benches` (no `--bench` argument) a 4 MiB file
//! is used and each case runs once.
//!
//! ```text
//! LS_BENCH_FILE=/data/model-00001-of-00004.safetensors cargo bench --bench disk_read
//! LS_BENCH_BYTES=8GiB cargo bench --bench disk_read -- 'direct/16MiB'
//! ```

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput};
use layer_streamer::io::{AlignedBuf, DirectFile, OpenMode, ReadMode};

const MIB: u64 = 1 << 20;

/// Parses a byte count with an optional KiB/MiB/GiB suffix.
fn parse_bytes(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, mult) = [("GiB", 1u64 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)]
        .iter()
        .find_map(|(suf, m)| s.strip_suffix(suf).map(|n| (n, *m)))
        .unwrap_or((s, 1));
    num.trim().parse::<u64>().ok()?.checked_mul(mult)
}

/// Writes `len` bytes of non-constant data (so no filesystem can elide them).
fn create_file(path: &Path, len: u64) {
    let f = std::fs::File::create(path).expect("creating the bench file");
    let mut block = vec![0u8; (8 * MIB) as usize];
    let mut off = 0u64;
    while off < len {
        let n = block.len().min((len - off) as usize);
        for (i, w) in block[..n].chunks_exact_mut(8).enumerate() {
            w.copy_from_slice(
                &(off / 8 + i as u64)
                    .wrapping_mul(0x9E37_79B9_7F4A_7C15)
                    .to_le_bytes(),
            );
        }
        f.write_all_at(&block[..n], off)
            .expect("writing the bench file");
        off += n as u64;
    }
    f.sync_all().expect("syncing the bench file");
}

/// Reads the whole file once with `threads` readers issuing `request`-byte reads.
fn read_file(file: &DirectFile, request: u64, threads: usize, bufs: &mut [AlignedBuf]) {
    let len = file.len();
    let requests = len.div_ceil(request);
    std::thread::scope(|s| {
        for (t, buf) in bufs.iter_mut().enumerate().take(threads) {
            s.spawn(move || {
                let mut i = t as u64;
                while i < requests {
                    let off = i * request;
                    let n = request.min((len - off).div_ceil(4096) * 4096) as usize;
                    file.read_aligned(off, &mut buf.as_mut_slice()[..n], len)
                        .expect("bench read");
                    i += threads as u64;
                }
            });
        }
    });
}

/// Drops the file's cached pages; false where the kernel refuses.
fn drop_cache(file: &DirectFile) -> bool {
    nix::fcntl::posix_fadvise(
        file.as_raw_fd(),
        0,
        0,
        nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
    )
    .is_ok()
}

fn main() {
    let bench_mode = std::env::args().any(|a| a == "--bench");
    let mut _tmp = None;
    let path: PathBuf = match std::env::var_os("LS_BENCH_FILE") {
        Some(p) => PathBuf::from(p),
        None => {
            let len = if bench_mode {
                std::env::var("LS_BENCH_BYTES")
                    .ok()
                    .and_then(|s| parse_bytes(&s))
                    .unwrap_or(256 * MIB)
            } else {
                4 * MIB
            };
            let dir = tempfile::Builder::new()
                .prefix(".disk-read-bench-")
                .tempdir_in(".")
                .expect("temp dir under .");
            let p = dir.path().join("bench.bin");
            create_file(&p, len);
            _tmp = Some(dir);
            p
        }
    };
    let direct = DirectFile::open(&path, OpenMode::Auto).expect("opening the bench file");
    let buffered = DirectFile::open(&path, OpenMode::Buffered).expect("opening the bench file");
    println!(
        "disk_read: {} ({} bytes), direct mode {}, block size {}",
        path.display(),
        direct.len(),
        direct.mode(),
        direct.block_size()
    );
    let can_drop = drop_cache(&buffered);
    if !can_drop {
        println!(
            "disk_read: posix_fadvise(DONTNEED) failed: buffered numbers include page-cache hits"
        );
    }
    let mut c = Criterion::default().configure_from_args();
    if bench_mode {
        c = c
            .sample_size(10)
            .warm_up_time(Duration::from_millis(500))
            .measurement_time(Duration::from_secs(3));
    }
    let mut bufs: Vec<AlignedBuf> = (0..8)
        .map(|_| AlignedBuf::new((64 * MIB) as usize).expect("buffers"))
        .collect();
    for (name, file) in [("direct", &direct), ("buffered", &buffered)] {
        if name == "direct" && file.mode() != ReadMode::Direct {
            println!(
                "disk_read: O_DIRECT is not available for this file; skipping the direct cases"
            );
            continue;
        }
        let mut group = c.benchmark_group(format!("disk_read/{name}"));
        group.throughput(Throughput::Bytes(file.len()));
        for request in [1, 4, 16, 64] {
            for threads in [1usize, 2, 4, 8] {
                let id = BenchmarkId::new(format!("{request}MiB"), format!("{threads}threads"));
                group.bench_function(id, |b| {
                    b.iter_custom(|iters| {
                        let mut total = Duration::ZERO;
                        for _ in 0..iters {
                            if name == "buffered" {
                                drop_cache(file);
                            }
                            let t = Instant::now();
                            read_file(file, request * MIB, threads, &mut bufs);
                            total += t.elapsed();
                        }
                        total
                    })
                });
            }
        }
        group.finish();
    }
}
