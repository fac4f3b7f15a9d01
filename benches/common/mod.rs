//! What the GPU benches share: a CUDA context or the reason to skip.

use layer_streamer::cuda::{self, Context};
use layer_streamer::Error;

/// A context on device 0, or `None` after saying on stderr why `bench`
/// skips; with `LS_REQUIRE_GPU=1` the absence of a GPU is a failure.
pub fn gpu(bench: &str) -> Option<Context> {
    let why = match cuda::device_count() {
        Err(Error::CudaUnavailable(why)) => why,
        Err(e) => panic!("{bench}: counting CUDA devices: {e}"),
        Ok(0) => "the driver reports no CUDA device".to_string(),
        Ok(_) => return Some(Context::new(0).unwrap_or_else(|e| panic!("{bench}: device 0: {e}"))),
    };
    if std::env::var("LS_REQUIRE_GPU").is_ok_and(|v| v == "1") {
        panic!("{bench}: LS_REQUIRE_GPU=1 but there is no GPU: {why}");
    }
    eprintln!("{bench}: skipped: {why}");
    None
}
