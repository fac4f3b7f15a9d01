//! Shared by the GPU integration tests: get a context or explain the skip.
#![allow(dead_code)]

use layer_streamer::cuda::{self, Context};
use layer_streamer::Error;
use rand::rngs::StdRng;
use rand::SeedableRng;

/// A context on device 0, or `None` (after saying why on stderr) when this
/// machine has no usable CUDA driver or device. With `LS_REQUIRE_GPU=1` the
/// absence of a GPU fails the test instead. Any other error fails the test.
pub mod models;

pub fn gpu(test: &str) -> Option<Context> {
    let require = std::env::var("LS_REQUIRE_GPU").is_ok_and(|v| v == "1");
    let why = match cuda::device_count() {
        Err(Error::CudaUnavailable(why)) => why,
        Err(e) => panic!("{test}: cuDeviceGetCount failed: {e}"),
        Ok(0) => "the driver reports no CUDA device".to_string(),
        Ok(_) => return Some(Context::new(0).unwrap_or_else(|e| panic!("{test}: {e}"))),
    };
    if require {
        panic!("{test}: LS_REQUIRE_GPU=1 but there is no GPU: {why}");
    }
    eprintln!("skipping {test}: {why} (set LS_REQUIRE_GPU=1 to make this a failure)");
    None
}

/// A fresh random generator; the seed is printed so that a failure can be
/// replayed with `LS_SEED=<seed>`.
pub fn rng(test: &str) -> StdRng {
    let seed = match std::env::var("LS_SEED") {
        Ok(s) => s.parse().expect("LS_SEED must be a u64"),
        Err(_) => rand::random(),
    };
    eprintln!("{test}: random seed {seed} (replay with LS_SEED={seed})");
    StdRng::seed_from_u64(seed)
}
