//! The stage threads live as long as the streamer: a pass that ends in a
//! panic leaves them parked for the next pass, and dropping the streamer
//! joins every thread it started.

mod common;

use std::panic::{catch_unwind, AssertUnwindSafe};

use common::models::small_model;
use common::tempdir;
use layer_streamer::{DType, Device, LayerStreamer};

/// Threads of this process whose name starts with `ls-` (the streamer's).
fn streamer_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .expect("listing /proc/self/task")
        .filter_map(|e| std::fs::read_to_string(e.ok()?.path().join("comm")).ok())
        .filter(|name| name.starts_with("ls-"))
        .count()
}

/// Waits (up to two seconds) for the count to settle at `n`: a new thread
/// names itself only once it runs.
fn settles_at(n: usize) -> bool {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    while std::time::Instant::now() < deadline {
        if streamer_threads() == n {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    false
}

#[test]
fn drop_after_a_panicking_pass_joins_every_thread() {
    let mut rng = common::rng("drop_after_a_panicking_pass");
    let dir = tempdir();
    let model = small_model(dir.path(), &mut rng, 5, DType::BF16);
    assert!(settles_at(0), "{} streamer threads", streamer_threads());
    for n_cpu in [0, 2] {
        let mut s = LayerStreamer::builder(&model)
            .device(Device::Host)
            .n_cpu(n_cpu)
            .reader_threads(3)
            .build()
            .unwrap();
        // The host backend's transfer stream has a worker thread; the
        // transfer, pin (with CPU slots) and reader threads are started once.
        let threads = 2 + usize::from(n_cpu > 0) + 3;
        assert!(
            settles_at(threads),
            "{} streamer threads",
            streamer_threads()
        );
        let r = catch_unwind(AssertUnwindSafe(|| {
            s.run_pass((), |(), _, layer, _| {
                if layer == 2 {
                    panic!("stop here");
                }
                Ok(())
            })
        }));
        assert!(r.is_err());
        // The stage threads survive the panic, parked, and run the next pass.
        assert!(
            settles_at(threads),
            "{} streamer threads",
            streamer_threads()
        );
        let seen = s.run_pass(0, |n, _, _, _| Ok(n + 1)).unwrap();
        assert_eq!(seen, model.num_layers());
        assert!(
            settles_at(threads),
            "{} streamer threads",
            streamer_threads()
        );
        drop(s);
        assert!(settles_at(0), "{} streamer threads", streamer_threads());
    }
}
