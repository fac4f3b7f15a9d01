//! Helpers shared by the integration tests: seeded random data, scratch
//! directories, synthetic models, the checked-in reference fixtures, and a
//! CUDA context or the reason to skip.
//!
//! Every test binary that needs them declares `mod common;` and calls
//! `common::rng`, `common::tempdir`, `common::models::…` and so on.
#![allow(dead_code)]

pub mod assets;
pub mod attention;
mod dirs;
pub mod models;
mod random;
pub mod reference;

use layer_streamer::cuda::{self, Context};
use layer_streamer::Error;

// Each test binary uses some of these; the others would warn as unused.
#[allow(unused_imports)]
pub use dirs::{cli_binary, tempdir};
#[allow(unused_imports)]
pub use random::{bytes, rng, seed};

/// A context on device 0, or `None` (after saying why on stderr) when this
/// machine has no usable CUDA driver or device. With `LS_REQUIRE_GPU=1` the
/// absence of a GPU fails the test instead. Any other error fails the test.
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
