//! Pitched 2-D copies (`cuMemcpy2DAsync`) between registered host memory and
//! the device, on a GPU: random rectangles land exactly on their rows and
//! leave every other byte alone, both ways. Skips without a driver unless
//! `LS_REQUIRE_GPU=1`.

mod common;

use layer_streamer::cuda::{
    max_copy_pitch, memcpy_2d_dtoh_async, memcpy_2d_htod_async, DeviceBuffer, HostRegistration,
    Rect2d, Stream,
};
use layer_streamer::io::AlignedBuf;
use layer_streamer::Error;
use rand::Rng;

/// What a 2-D copy does, on host byte arrays.
fn apply(r: &Rect2d, src: &[u8], dst: &mut [u8]) {
    for row in 0..r.height {
        let at = r.offset + row * r.pitch;
        dst[at..at + r.width].copy_from_slice(&src[at..at + r.width]);
    }
}

#[test]
fn two_d_copies_move_exactly_their_rows_both_ways() {
    let test = "two_d_copies_move_exactly_their_rows_both_ways";
    let Some(ctx) = common::gpu(test) else {
        return;
    };
    let mut rng = common::rng(test);
    assert!(max_copy_pitch(&ctx).unwrap() >= 1 << 20);
    let stream = Stream::new(&ctx).unwrap();
    let len = 1 << 20;
    let mut host = AlignedBuf::new(len).unwrap();
    let (ptr, n) = (host.as_mut_ptr(), host.len());
    // SAFETY: `host` is a live page-aligned mapping of `n` bytes that outlives
    // the registration (dropped first, below); nothing else registered it.
    let reg = unsafe { HostRegistration::register(&ctx, ptr, n) }.unwrap();
    let dev = DeviceBuffer::alloc(&ctx, len).unwrap();
    for _ in 0..50 {
        let pitch = rng.gen_range(1..8192);
        let width = rng.gen_range(0..=pitch);
        let height = rng.gen_range(0..(len / pitch).min(64));
        let span = height.saturating_sub(1) * pitch + width;
        let r = Rect2d {
            offset: rng.gen_range(0..=len - span),
            width,
            height,
            pitch,
        };
        // Host → device over random device bytes.
        let src: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
        host.as_mut_slice()[..len].copy_from_slice(&src);
        let mut want: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
        dev.copy_from_host(0, &want).unwrap();
        // SAFETY: the rectangle lies within both buffers (offset + span <=
        // len), which live, untouched by the host, until the synchronize.
        unsafe { memcpy_2d_htod_async(dev.ptr(), host.as_ptr(), r, &stream) }.unwrap();
        stream.synchronize().unwrap();
        apply(&r, &src, &mut want);
        let mut got = vec![0u8; len];
        dev.copy_to_host(0, &mut got).unwrap();
        assert!(got == want, "host → device {r:?}");
        // Device → host over random host bytes.
        let src: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
        dev.copy_from_host(0, &src).unwrap();
        let mut want: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
        host.as_mut_slice()[..len].copy_from_slice(&want);
        // SAFETY: as above.
        unsafe { memcpy_2d_dtoh_async(host.as_mut_ptr(), dev.ptr(), r, &stream) }.unwrap();
        stream.synchronize().unwrap();
        apply(&r, &src, &mut want);
        assert!(host.as_slice()[..len] == want[..], "device → host {r:?}");
    }
    // A row wider than its pitch is refused before the driver sees it.
    let bad = Rect2d {
        offset: 0,
        width: 65,
        height: 2,
        pitch: 64,
    };
    // SAFETY: the call is refused before anything is queued.
    let e = unsafe { memcpy_2d_htod_async(dev.ptr(), host.as_ptr(), bad, &stream) }.unwrap_err();
    assert!(matches!(e, Error::Input(_)), "{e}");
    drop(reg);
}
