//! Ten thousand host-backend passes keep resident memory flat: nothing is
//! allocated per pass that is not freed.

mod common;

use common::models::small_model;
use common::tempdir;
use layer_streamer::{Budget, DType, Device, LayerStreamer};

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("reading /proc/self/statm");
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .expect("parsing /proc/self/statm");
    pages * 4096
}

#[test]
fn ten_thousand_passes_with_flat_memory() {
    let mut rng = common::rng("ten_thousand_passes_with_flat_memory");
    let dir = tempdir();
    let model = small_model(dir.path(), &mut rng, 3, DType::BF16);
    let mut s = LayerStreamer::builder(&model)
        .device(Device::Host)
        .file_dtype()
        .n_gpu(1)
        .n_cpu_pinned(2)
        .reader_threads(2)
        .pinned_cache(Budget::Bytes(model.max_slot_bytes() + 4096))
        .build()
        .unwrap();
    let mut run = |passes: usize| {
        for _ in 0..passes {
            let n = s.run_pass(0usize, |n, w, _, _| Ok(n + w.len())).unwrap();
            assert!(n > 0);
        }
    };
    run(500);
    let before = rss_bytes();
    run(9_500);
    let after = rss_bytes();
    eprintln!("rss after 500 passes: {before} B, after 10000: {after} B");
    assert!(
        after <= before + (1 << 20),
        "resident memory grew from {before} to {after} bytes over 9500 passes"
    );
}
