//! Host-to-device copy bandwidth on device 0, for copies of 1, 4, 16, 64 and
//! 256 MiB, reported in bytes per second:
//!
//! - `h2d/pinned/N`: from page-aligned host memory registered with
//!   `cuMemHostRegister` (the crate's [`HostRegistration`]), as the pipeline's
//!   pinned slots are;
//! - `h2d/pageable/N`: from the same kind of memory, not registered;
//! - `h2d/recycle/N`: the pipeline's device-slot recycling, from pinned memory
//!   into two device slots in turn: each copy on the transfer stream records
//!   an event that the compute stream waits on (`cuStreamWaitEvent`), the
//!   compute stream records a second event, and the next copy into that slot
//!   waits on it first. The compute stream runs no work, so the difference to
//!   `pinned` is the cost of the ordering itself.
//!
//! Each measurement queues its copies and waits for the stream at the end, so
//! the time is wall-clock time from the first copy queued to the last landed.
//! Host memory is written before the copies, so no case copies untouched pages.
//!
//! Without a CUDA driver or device the bench says why and exits successfully
//! (`LS_REQUIRE_GPU=1` makes that a failure). Under `cargo test --benches`
//! (no `--bench` argument) only 1 and 4 MiB are copied, each case once.
//! Where `RLIMIT_MEMLOCK` forbids registering the buffer, the pinned and
//! recycle cases are skipped with the reason.
//!
//! ```text
//! cargo bench --bench h2d
//! cargo bench --bench h2d -- 'h2d/pinned'
//! ```

mod common;

use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, SamplingMode, Throughput};
use layer_streamer::cuda::{self, Context, DeviceBuffer, Event, HostRegistration, Stream};
use layer_streamer::io::AlignedBuf;
use layer_streamer::Result;

const MIB: usize = 1 << 20;
/// Copy sizes in MiB: powers of 4 from 1 to 256.
const SIZES_MIB: [usize; 5] = [1, 4, 16, 64, 256];
/// Sizes under `cargo test --benches`.
const TEST_SIZES_MIB: [usize; 2] = [1, 4];
/// Device slots the recycling case cycles through (the streamer's default `n_gpu`).
const SLOTS: usize = 2;

/// Page-aligned host memory written with a pattern, page-locked when
/// `registration` is set.
struct HostBuf {
    // Declared before `buf` so that it drops first: the range is unregistered
    // before its memory is unmapped.
    registration: Option<HostRegistration>,
    buf: AlignedBuf,
}

impl HostBuf {
    /// `len` bytes of ordinary (pageable) memory, every page written.
    fn pageable(len: usize) -> HostBuf {
        let mut buf = AlignedBuf::new(len)
            .unwrap_or_else(|e| panic!("h2d: allocating {len} bytes of host memory: {e}"));
        for (i, b) in buf.as_mut_slice().iter_mut().enumerate() {
            *b = (i as u8) ^ (i >> 12) as u8;
        }
        HostBuf {
            registration: None,
            buf,
        }
    }

    /// `len` bytes registered with `cuMemHostRegister`.
    fn pinned(ctx: &Context, len: usize) -> Result<HostBuf> {
        let mut host = HostBuf::pageable(len);
        let (ptr, len) = (host.buf.as_mut_ptr(), host.buf.len());
        // SAFETY: `ptr` is the start of `host.buf`, a page-aligned mapping of
        // `len` bytes that lives in the same struct as the registration and is
        // dropped after it (field order); nothing else registers it.
        host.registration = Some(unsafe { HostRegistration::register(ctx, ptr, len)? });
        Ok(host)
    }

    fn len(&self) -> usize {
        self.buf.len()
    }
}

/// Queues a copy of the first `n` bytes of `src` to the start of `dst` on `stream`.
fn copy(dst: &DeviceBuffer, src: &HostBuf, n: usize, stream: &Stream) {
    assert!(
        n <= dst.len() && n <= src.len(),
        "h2d: {n} bytes do not fit"
    );
    // SAFETY: both ranges hold `n` bytes (asserted above); the buffers live
    // until `main` returns, and every measurement waits for its streams before
    // returning, so no copy is in flight when they are dropped.
    unsafe { cuda::memcpy_htod_async(dst.ptr(), src.buf.as_ptr(), n, stream) }
        .unwrap_or_else(|e| panic!("h2d: copying {n} bytes: {e}"));
}

/// `iters` copies of `n` bytes from `src` into `dst`, timed until the last has landed.
fn plain_copies(
    dst: &DeviceBuffer,
    src: &HostBuf,
    n: usize,
    stream: &Stream,
    iters: u64,
) -> Duration {
    let t = Instant::now();
    for _ in 0..iters {
        copy(dst, src, n, stream);
    }
    stream.synchronize().expect("h2d: cuStreamSynchronize");
    t.elapsed()
}

/// The pipeline's device-slot recycling without its threads: a transfer and a
/// compute stream, device slots, and per slot the event of its last copy and
/// of its last use.
struct Recycler {
    transfer: Stream,
    compute: Stream,
    slots: Vec<DeviceBuffer>,
    /// Recorded on the transfer stream after the copy into the slot.
    copied: Vec<Event>,
    /// Recorded on the compute stream after the slot's (empty) use.
    consumed: Vec<Event>,
}

impl Recycler {
    fn new(ctx: &Context, slot_bytes: usize) -> Result<Recycler> {
        // Timing events, as the pipeline's per-layer events are.
        let events = || {
            (0..SLOTS)
                .map(|_| Event::new(ctx, true))
                .collect::<Result<Vec<_>>>()
        };
        Ok(Recycler {
            transfer: Stream::new(ctx)?,
            compute: Stream::new(ctx)?,
            slots: (0..SLOTS)
                .map(|_| DeviceBuffer::alloc(ctx, slot_bytes))
                .collect::<Result<_>>()?,
            copied: events()?,
            consumed: events()?,
        })
    }

    /// `iters` copies of `n` bytes from `src` through the slots in turn,
    /// timed until the compute stream has consumed the last.
    fn run(&self, src: &HostBuf, n: usize, iters: u64) -> Duration {
        let t = Instant::now();
        for i in 0..iters as usize {
            let k = i % SLOTS;
            if i >= SLOTS {
                // The slot's previous content must be consumed before it is overwritten.
                self.transfer
                    .wait_event(&self.consumed[k])
                    .expect("h2d: cuStreamWaitEvent (transfer)");
            }
            copy(&self.slots[k], src, n, &self.transfer);
            self.copied[k]
                .record(&self.transfer)
                .expect("h2d: cuEventRecord (copied)");
            self.compute
                .wait_event(&self.copied[k])
                .expect("h2d: cuStreamWaitEvent (compute)");
            self.consumed[k]
                .record(&self.compute)
                .expect("h2d: cuEventRecord (consumed)");
        }
        self.compute
            .synchronize()
            .expect("h2d: cuStreamSynchronize (compute)");
        t.elapsed()
    }
}

/// The host buffers, the device destination and the streams every case uses.
struct Setup {
    pageable: HostBuf,
    /// `None` where registration was refused (the reason was printed).
    pinned: Option<HostBuf>,
    dst: DeviceBuffer,
    stream: Stream,
    recycler: Recycler,
}

impl Setup {
    fn new(ctx: &Context, bytes: usize) -> Setup {
        let pinned = HostBuf::pinned(ctx, bytes)
            .map_err(|e| eprintln!("h2d: skipping the pinned and recycle cases: {e}"))
            .ok();
        Setup {
            pageable: HostBuf::pageable(bytes),
            pinned,
            dst: DeviceBuffer::alloc(ctx, bytes).expect("h2d: allocating the device buffer"),
            stream: Stream::new(ctx).expect("h2d: creating a stream"),
            recycler: Recycler::new(ctx, bytes).expect("h2d: allocating the device slots"),
        }
    }
}

fn bench(c: &mut Criterion, s: &Setup, sizes_mib: &[usize]) {
    let mut g = c.benchmark_group("h2d");
    // Copies of 256 MiB take tens of milliseconds: the same number of
    // iterations per sample keeps the run short.
    g.sampling_mode(SamplingMode::Flat);
    for &mib in sizes_mib {
        let n = mib * MIB;
        g.throughput(Throughput::Bytes(n as u64));
        let id = |case: &str| BenchmarkId::new(case, format!("{mib}MiB"));
        if let Some(pinned) = &s.pinned {
            g.bench_function(id("pinned"), |b| {
                b.iter_custom(|iters| plain_copies(&s.dst, pinned, n, &s.stream, iters))
            });
        }
        g.bench_function(id("pageable"), |b| {
            b.iter_custom(|iters| plain_copies(&s.dst, &s.pageable, n, &s.stream, iters))
        });
        if let Some(pinned) = &s.pinned {
            g.bench_function(id("recycle"), |b| {
                b.iter_custom(|iters| s.recycler.run(pinned, n, iters))
            });
        }
    }
    g.finish();
}

fn main() {
    let Some(ctx) = common::gpu("h2d") else {
        return;
    };
    let benching = std::env::args().any(|a| a == "--bench");
    let sizes: &[usize] = if benching {
        &SIZES_MIB
    } else {
        &TEST_SIZES_MIB
    };
    let name = ctx
        .name()
        .unwrap_or_else(|e| format!("(name unknown: {e})"));
    eprintln!("h2d: device 0 is {name}");
    let largest = sizes.iter().max().copied().unwrap_or(1) * MIB;
    let setup = Setup::new(&ctx, largest);
    let mut c = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .configure_from_args();
    bench(&mut c, &setup, sizes);
    c.final_summary();
}
