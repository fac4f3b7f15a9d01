//! Device memory, pinned host memory, copies, streams and events, on a GPU.
//! Skips without a driver unless `LS_REQUIRE_GPU=1`.

mod common;

use std::alloc::{alloc_zeroed, dealloc, Layout};

use layer_streamer::cuda::{
    memcpy_dtod_async, memcpy_dtoh_async, memcpy_htod_async, Context, DeviceBuffer, Event,
    HostRegistration, Stream,
};
use layer_streamer::Error;
use rand::RngCore;

/// Page-aligned host memory owned by the test.
struct PageAligned {
    ptr: *mut u8,
    layout: Layout,
}

impl PageAligned {
    fn new(len: usize) -> PageAligned {
        let layout = Layout::from_size_align(len, 4096).unwrap();
        // SAFETY: the layout has a non-zero size (every caller passes len > 0).
        let ptr = unsafe { alloc_zeroed(layout) };
        assert!(!ptr.is_null(), "allocating {len} bytes failed");
        PageAligned { ptr, layout }
    }

    fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is a live, zero-initialised allocation of layout.size() bytes.
        unsafe { std::slice::from_raw_parts(self.ptr, self.layout.size()) }
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in as_slice, and &mut self makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.layout.size()) }
    }

    /// Registers the whole allocation.
    fn register(&self, ctx: &Context) -> layer_streamer::Result<HostRegistration> {
        // SAFETY: the range is this live allocation; each test drops the
        // registration before the PageAligned (declared earlier, dropped later).
        unsafe { HostRegistration::register(ctx, self.ptr, self.layout.size()) }
    }
}

impl Drop for PageAligned {
    fn drop(&mut self) {
        // SAFETY: ptr was allocated with this layout and is freed only here.
        unsafe { dealloc(self.ptr, self.layout) }
    }
}

#[test]
fn context_describes_the_device() {
    let Some(ctx) = common::gpu("context_describes_the_device") else {
        return;
    };
    let name = ctx.name().unwrap();
    let (free, total) = ctx.mem_info().unwrap();
    let cc = ctx.compute_capability().unwrap();
    eprintln!(
        "device 0: {name}, compute capability {cc:?}, {free} of {total} bytes free, driver CUDA {:?}",
        layer_streamer::cuda::driver_version().unwrap()
    );
    assert!(!name.is_empty());
    assert!(free > 0 && free <= total);
    assert!(cc >= (8, 0), "the PTX targets sm_80 and newer");
    let again = Context::new(0).unwrap();
    assert!(
        again.same_as(&ctx),
        "both are the primary context of device 0"
    );
    assert!(matches!(Context::new(100_000), Err(Error::Config(_))));
    ctx.synchronize().unwrap();
}

#[test]
fn pinned_round_trip_is_identical() {
    let Some(ctx) = common::gpu("pinned_round_trip_is_identical") else {
        return;
    };
    let mut rng = common::rng("pinned_round_trip_is_identical");
    let len = 2 << 20;
    let mut src = PageAligned::new(len);
    let dst = PageAligned::new(len);
    rng.fill_bytes(src.as_mut_slice());
    let src_reg = src.register(&ctx).unwrap();
    let dst_reg = dst.register(&ctx).unwrap();
    assert_eq!(src_reg.len(), len);
    let dev = DeviceBuffer::alloc(&ctx, len).unwrap();
    let stream = Stream::new(&ctx).unwrap();
    // SAFETY: src and dst are registered, live and untouched by the host until
    // the stream is synchronised; dev holds len bytes.
    unsafe {
        memcpy_htod_async(dev.ptr(), src.ptr, len, &stream).unwrap();
        memcpy_dtoh_async(dst.ptr, dev.ptr(), len, &stream).unwrap();
    }
    stream.synchronize().unwrap();
    assert!(
        src.as_slice() == dst.as_slice(),
        "bytes changed on the way through the GPU"
    );
    drop((src_reg, dst_reg));
}

#[test]
fn registration_refuses_unaligned_memory() {
    let Some(ctx) = common::gpu("registration_refuses_unaligned_memory") else {
        return;
    };
    let mem = PageAligned::new(8192);
    // SAFETY: the range is inside the live allocation; it is refused anyway.
    let r = unsafe { HostRegistration::register(&ctx, mem.ptr.add(8), 4096) };
    assert!(matches!(r, Err(Error::Input(_))), "{r:?}");
}

#[test]
fn mapped_registration_refuses_unaligned_or_empty_ranges() {
    let Some(ctx) = common::gpu("mapped_registration_refuses_unaligned_or_empty_ranges") else {
        return;
    };
    let mem = PageAligned::new(8192);
    // SAFETY: the ranges are inside the live allocation; they are refused anyway.
    let r = unsafe { HostRegistration::register_mapped(&ctx, mem.ptr.add(8), 4096) };
    assert!(matches!(r, Err(Error::Input(_))), "{r:?}");
    // SAFETY: as above.
    let r = unsafe { HostRegistration::register_mapped(&ctx, mem.ptr, 0) };
    assert!(matches!(r, Err(Error::Input(_))), "{r:?}");
}

/// The device reads a mapped registration in place: a copy out of its
/// device address gives the host's bytes, and after the host rewrites them,
/// the new ones. A plain registration has no device address.
#[test]
fn mapped_registration_is_read_in_place_by_the_device() {
    use rand::Rng;

    let test = "mapped_registration_is_read_in_place_by_the_device";
    let Some(ctx) = common::gpu(test) else {
        return;
    };
    let mut rng = common::rng(test);
    let len = 4096 * rng.gen_range(1..64);
    let mut mem = PageAligned::new(len);
    let plain = PageAligned::new(4096);
    let plain_reg = plain.register(&ctx).unwrap();
    assert_eq!(plain_reg.device_ptr(), None);
    // SAFETY: the range is this live allocation, dropped after the
    // registration; the host writes it only while no copy is queued.
    let reg = unsafe { HostRegistration::register_mapped(&ctx, mem.ptr, len) }.unwrap();
    let at = reg
        .device_ptr()
        .expect("a mapped registration has a device address");
    assert_eq!(reg.len(), len);
    let dev = DeviceBuffer::alloc(&ctx, len).unwrap();
    let stream = Stream::new(&ctx).unwrap();
    for round in 0..2 {
        rng.fill_bytes(mem.as_mut_slice());
        let off = rng.gen_range(0..len);
        let n = rng.gen_range(1..=len - off);
        // SAFETY: [at + off, at + n) is inside the mapped range and `dev`
        // holds len >= n bytes; both outlive the synchronize below.
        unsafe { memcpy_dtod_async(dev.ptr(), at + off as u64, n, &stream).unwrap() };
        stream.synchronize().unwrap();
        let mut back = vec![0u8; n];
        dev.copy_to_host(0, &mut back).unwrap();
        assert!(
            back == mem.as_slice()[off..off + n],
            "round {round}: {n} bytes at {off} read through the device address differ"
        );
    }
    drop((reg, plain_reg));
}

#[test]
fn event_orders_work_across_streams() {
    let Some(ctx) = common::gpu("event_orders_work_across_streams") else {
        return;
    };
    let mut rng = common::rng("event_orders_work_across_streams");
    let len = 256 << 20;
    let mut data = vec![0u8; len];
    rng.fill_bytes(&mut data);
    let src = DeviceBuffer::alloc(&ctx, len).unwrap();
    let mid = DeviceBuffer::alloc(&ctx, len).unwrap();
    let dst = DeviceBuffer::alloc(&ctx, len).unwrap();
    src.copy_from_host(0, &data).unwrap();
    mid.memset_zero().unwrap();
    dst.memset_zero().unwrap();

    let a = Stream::new(&ctx).unwrap();
    let b = Stream::new(&ctx).unwrap();
    let start = Event::new(&ctx, true).unwrap();
    let copied = Event::new(&ctx, true).unwrap();
    start.record(&a).unwrap();
    // SAFETY: all three buffers hold len bytes, do not overlap, and outlive the
    // synchronisation below.
    unsafe { memcpy_dtod_async(mid.ptr(), src.ptr(), len, &a).unwrap() };
    copied.record(&a).unwrap();
    // Without this wait, B would copy mid while A is still filling it.
    b.wait_event(&copied).unwrap();
    // SAFETY: as above.
    unsafe { memcpy_dtod_async(dst.ptr(), mid.ptr(), len, &b).unwrap() };
    b.synchronize().unwrap();
    assert!(
        copied.query().unwrap(),
        "B finished, so the event it waited on has completed"
    );

    let mut out = vec![0u8; len];
    dst.copy_to_host(0, &mut out).unwrap();
    assert!(out == data, "stream B did not see stream A's copy");
    copied.synchronize().unwrap();
    let ms = Event::elapsed_ms(&start, &copied).unwrap();
    eprintln!("copied {len} bytes device to device in {ms:.3} ms");
    assert!(ms > 0.0);
}

#[test]
fn oversized_allocation_is_a_limit_error() {
    let Some(ctx) = common::gpu("oversized_allocation_is_a_limit_error") else {
        return;
    };
    let (free, total) = ctx.mem_info().unwrap();
    let asked = (free + total) as usize;
    match DeviceBuffer::alloc(&ctx, asked) {
        Err(Error::Limit {
            asked: a,
            available,
            ..
        }) => {
            assert_eq!(a, asked as u64);
            assert!(available < a);
        }
        other => panic!("expected Error::Limit, got {other:?}"),
    }
    // The context is still usable afterwards.
    let small = DeviceBuffer::alloc(&ctx, 4096).unwrap();
    small.memset_zero().unwrap();
    let mut back = vec![1u8; 4096];
    small.copy_to_host(0, &mut back).unwrap();
    assert!(back.iter().all(|&b| b == 0));
    assert!(DeviceBuffer::alloc(&ctx, 0).unwrap().is_empty());
    let e = small.copy_to_host(4000, &mut back).unwrap_err();
    assert!(matches!(e, Error::Input(_)), "{e}");
}

#[test]
fn objects_work_and_drop_on_other_threads() {
    let Some(ctx) = common::gpu("objects_work_and_drop_on_other_threads") else {
        return;
    };
    let stream = Stream::new(&ctx).unwrap();
    let ev = Event::new(&ctx, false).unwrap();
    let buf = DeviceBuffer::alloc(&ctx, 1 << 20).unwrap();
    std::thread::scope(|s| {
        s.spawn(|| {
            buf.memset_async(7, &stream).unwrap();
            ev.record(&stream).unwrap();
            ev.synchronize().unwrap();
        });
    });
    let mut back = vec![0u8; 1 << 20];
    buf.copy_to_host(0, &mut back).unwrap();
    assert!(back.iter().all(|&b| b == 7));
    std::thread::spawn(move || drop((buf, ev, stream)))
        .join()
        .unwrap();
    // A failure while dropping would be reported here.
    ctx.bind().unwrap();
}
