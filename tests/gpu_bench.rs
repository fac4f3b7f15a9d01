//! The compute ceiling `bench-generate` judges passes against, on a GPU:
//! cuBLAS's bf16 GEMM throughput at a square size. Skips without a driver
//! unless `LS_REQUIRE_GPU=1`.

use layer_streamer::bench::gemm_peak_tflops;
use layer_streamer::Error;

mod common;

#[test]
fn gemm_peak_is_a_plausible_tensor_core_rate_and_bad_sizes_are_errors() {
    let Some(ctx) =
        common::gpu("gemm_peak_is_a_plausible_tensor_core_rate_and_bad_sizes_are_errors")
    else {
        return;
    };
    let small = gemm_peak_tflops(&ctx, 1024, 3).unwrap();
    let large = gemm_peak_tflops(&ctx, 4096, 3).unwrap();
    eprintln!("bf16 GEMM: {small:.1} TFLOP/s at 1024³, {large:.1} TFLOP/s at 4096³");
    // Every sm_80+ card does well over 10 dense bf16 TFLOP/s at 4096³, and
    // none reaches 5 PFLOP/s; a wrong FLOP count or timing lands outside.
    assert!(
        large.is_finite() && (10.0..5000.0).contains(&large),
        "{large}"
    );
    assert!(
        small.is_finite() && small > 0.0 && small < 5000.0,
        "{small}"
    );
    assert!(matches!(gemm_peak_tflops(&ctx, 0, 3), Err(Error::Input(_))));
    assert!(matches!(
        gemm_peak_tflops(&ctx, usize::MAX / 2, 1),
        Err(Error::Input(_))
    ));
}
