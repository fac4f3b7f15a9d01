//! SPSC ring throughput between two threads, each pinned to its own CPU when
//! the machine has two or more: items per second for single pushes and for
//! batches published together.

use std::sync::atomic::AtomicBool;
use std::sync::Barrier;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput};
use layer_streamer::ring::{Ring, Waiter};

fn pin(cpu: usize) {
    let n = std::thread::available_parallelism().map_or(1, |n| n.get());
    if n >= 2 {
        let mut set = nix::sched::CpuSet::new();
        if set.set(cpu % n).is_ok() {
            let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set);
        }
    }
}

/// Moves `items` u64s through a ring of `capacity`, publishing every `batch`.
fn transfer(capacity: usize, batch: usize, items: u64) -> Duration {
    let mut ring = Ring::new(capacity);
    let (mut p, mut c) = ring.split();
    let stop = AtomicBool::new(false);
    let barrier = Barrier::new(2);
    std::thread::scope(|s| {
        s.spawn(|| {
            pin(0);
            let mut w = Waiter::new(&stop);
            barrier.wait();
            for i in 0..items {
                let mut item = i;
                while let Err(back) = p.write(item) {
                    item = back;
                    p.publish();
                    w.wait().expect("not stopped");
                }
                if p.unpublished() >= batch {
                    p.publish();
                }
            }
            p.publish();
        });
        pin(1);
        let mut w = Waiter::new(&stop);
        barrier.wait();
        let t = Instant::now();
        let mut sum = 0u64;
        for _ in 0..items {
            sum = sum.wrapping_add(w.until(|| c.pop()).expect("not stopped"));
        }
        assert_eq!(sum, items * (items - 1) / 2);
        t.elapsed()
    })
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("ring");
    const ITEMS: u64 = 100_000;
    g.throughput(Throughput::Elements(ITEMS));
    for (cap, batch) in [(4, 1), (64, 1), (64, 8), (1024, 32)] {
        g.bench_with_input(
            BenchmarkId::new(format!("cap{cap}"), format!("batch{batch}")),
            &(cap, batch),
            |b, &(cap, batch)| {
                b.iter_custom(|iters| (0..iters).map(|_| transfer(cap, batch, ITEMS)).sum())
            },
        );
    }
    g.finish();
}

fn main() {
    let mut c = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2))
        .configure_from_args();
    bench(&mut c);
    c.final_summary();
}
