//! Tests of the host backend: its streams, copies, casts and dequantization.

use super::*;

#[test]
fn copies_run_in_order_and_events_complete() {
    let s = HostStream::spawn("t").unwrap();
    let src = vec![7u8; 1 << 16];
    let mut dst = vec![0u8; 1 << 16];
    let ev = HostEvent::new();
    // SAFETY: both vectors outlive the synchronize below.
    unsafe {
        s.copy(
            dst.as_mut_ptr() as u64,
            src.as_ptr(),
            src.len(),
            CopyGuard::default(),
        )
    };
    s.record(&ev);
    ev.synchronize();
    assert!(ev.query());
    s.synchronize().unwrap();
    assert_eq!(dst, src);
}

#[test]
fn a_copy_onto_a_slot_in_use_is_a_violation() {
    let s = HostStream::spawn("t").unwrap();
    let flag = Arc::new(AtomicBool::new(true));
    let src = [1u8; 8];
    let mut dst = [0u8; 8];
    let guard = CopyGuard {
        dst_in_use: Some((flag, "GPU slot 0".into())),
        src_gen: None,
    };
    // SAFETY: both arrays outlive the synchronize below.
    unsafe { s.copy(dst.as_mut_ptr() as u64, src.as_ptr(), 8, guard) };
    let err = s.synchronize().unwrap_err().to_string();
    assert!(err.contains("GPU slot 0 was overwritten"), "{err}");
}

#[test]
fn a_stream_waits_for_another_streams_event() {
    let a = HostStream::spawn("a").unwrap();
    let b = HostStream::spawn("b").unwrap();
    let big = vec![3u8; 32 << 20];
    let mut mid = vec![0u8; 32 << 20];
    let mut out = vec![0u8; 32 << 20];
    let ev = HostEvent::new();
    // SAFETY: all three buffers outlive the synchronizes below.
    unsafe {
        a.copy(
            mid.as_mut_ptr() as u64,
            big.as_ptr(),
            big.len(),
            CopyGuard::default(),
        );
        a.record(&ev);
        b.wait_event(&ev);
        b.copy(
            out.as_mut_ptr() as u64,
            mid.as_ptr(),
            mid.len(),
            CopyGuard::default(),
        );
    }
    b.synchronize().unwrap();
    a.synchronize().unwrap();
    assert!(out.iter().all(|&x| x == 3));
}

#[test]
fn casts_match_the_half_crate() {
    let s = HostStream::immediate();
    let xs: Vec<f32> = (0..1000).map(|i| (i as f32 - 500.0) * 0.37).collect();
    let mut out = vec![0u16; xs.len()];
    // SAFETY: both buffers hold 1000 elements.
    unsafe {
        s.cast(
            DType::F32,
            DType::BF16,
            xs.as_ptr() as u64,
            out.as_mut_ptr() as u64,
            xs.len(),
        )
    };
    for (x, o) in xs.iter().zip(&out) {
        assert_eq!(*o, bf16::from_f32(*x).to_bits());
    }
}
