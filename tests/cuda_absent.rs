//! Without a CUDA driver every CUDA entry point returns `CudaUnavailable`
//! instead of panicking. With one, the availability check agrees with the
//! driver.

use layer_streamer::cuda::{self, Context};
use layer_streamer::Error;

fn assert_unavailable<T: std::fmt::Debug>(what: &str, r: layer_streamer::Result<T>) {
    match r {
        Err(Error::CudaUnavailable(why)) => assert!(!why.is_empty(), "{what}: empty reason"),
        other => panic!("{what}: expected CudaUnavailable, got {other:?}"),
    }
}

#[test]
fn every_entry_point_reports_absence_without_panicking() {
    if cuda::is_available() {
        assert_eq!(cuda::is_available(), cuda::device_count().is_ok());
        assert!(cuda::check_available().is_ok());
        eprintln!("a CUDA driver is present: {:?}", cuda::driver_version());
        return;
    }
    // Asked twice: the outcome is cached, and stays the same.
    assert!(!cuda::is_available());
    assert_unavailable("check_available", cuda::check_available());
    assert_unavailable("check_available (again)", cuda::check_available());
    assert_unavailable("device_count", cuda::device_count());
    assert_unavailable("driver_version", cuda::driver_version());
    // Streams, events, buffers, registrations, modules and kernels all need a
    // context; getting one is where absence shows.
    assert_unavailable("Context::new(0)", Context::new(0));
    assert_unavailable("Context::new(7)", Context::new(7));
}

#[test]
fn absence_is_consistent_across_threads() {
    let here = cuda::is_available();
    let there = std::thread::spawn(cuda::is_available).join().unwrap();
    assert_eq!(here, there);
}
