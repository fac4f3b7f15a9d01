//! Pitched (2-D) copies: a band of rows between device buffers of
//! different pitches, and rectangles of one pitch between pinned host memory
//! and the device (`cuMemcpy2DAsync`).

use cudarc::driver::sys;

use super::{check, cuda_error, Context, Stream};
use crate::error::{Error, Result};

/// Queues a copy of `height` rows of `width` bytes between device addresses
/// on `stream`: row `i` goes from `src + i * src_pitch` to
/// `dst + i * dst_pitch` (e.g. a block of columns into a wider matrix).
/// Both pitches must be at least `width`.
///
/// # Safety
/// Every row range of both sides must be device memory of the stream's
/// context, not freed before the copy completes; the two sides must not
/// overlap.
pub unsafe fn memcpy_2d_dtod_async(
    dst: u64,
    dst_pitch: usize,
    src: u64,
    src_pitch: usize,
    width: usize,
    height: usize,
    stream: &Stream,
) -> Result<()> {
    if width == 0 || height == 0 {
        return Ok(());
    }
    if dst_pitch < width || src_pitch < width {
        return Err(Error::Input(format!(
            "a 2-D copy of rows of {width} bytes needs pitches of at least that, not \
             {src_pitch} (source) and {dst_pitch} (destination)"
        )));
    }
    stream.context().bind()?;
    use sys::CUmemorytype::CU_MEMORYTYPE_DEVICE as DEV;
    let copy = descriptor(
        (std::ptr::null(), src, src_pitch),
        (std::ptr::null_mut(), dst, dst_pitch),
        (DEV, DEV),
        (width, height),
    );
    // SAFETY: `copy` is a live, fully initialised descriptor of two device
    // ranges (the driver reads it before returning); the caller guarantees
    // the ranges stay valid until the copy completes.
    check("cuMemcpy2DAsync_v2", unsafe {
        sys::cuMemcpy2DAsync_v2(&copy, stream.raw())
    })
}
/// One pitched rectangle of a 2-D copy: `height` rows of `width` bytes, the
/// first at byte `offset` of both the source and the destination, each next
/// row `pitch` bytes after the one before, on both sides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rect2d {
    /// Byte offset of the first row in the source and in the destination.
    pub offset: usize,
    /// Bytes per row; at most `pitch`.
    pub width: usize,
    /// Rows.
    pub height: usize,
    /// Bytes from one row's start to the next one's.
    pub pitch: usize,
}

impl Rect2d {
    /// Bytes the rectangle copies.
    pub fn bytes(&self) -> usize {
        self.width.saturating_mul(self.height)
    }

    /// One past the last byte it touches, relative to the base address; `None`
    /// when that overflows.
    pub fn end(&self) -> Option<usize> {
        if self.height == 0 || self.width == 0 {
            return Some(self.offset);
        }
        (self.height - 1)
            .checked_mul(self.pitch)?
            .checked_add(self.width)?
            .checked_add(self.offset)
    }
}

/// The largest pitch a 2-D copy takes on `ctx`'s device
/// (`CU_DEVICE_ATTRIBUTE_MAX_PITCH`).
pub fn max_copy_pitch(ctx: &Context) -> Result<u64> {
    use sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_PITCH as MAX_PITCH;
    ctx.bind()?;
    let mut pitch = 0;
    // SAFETY: the device handle is the context's; the pointer is to a live local.
    check("cuDeviceGetAttribute", unsafe {
        sys::cuDeviceGetAttribute(&mut pitch, MAX_PITCH, ctx.device())
    })?;
    Ok(pitch.max(0) as u64)
}

/// The driver's description of copying `r` from `src` to `dst`: each a host
/// pointer or a device address, as `kinds` says, already advanced by
/// `r.offset` (the driver's own x offset must stay within the pitch).
fn copy_2d(
    r: Rect2d,
    src: (*const u8, u64),
    dst: (*mut u8, u64),
    kinds: (sys::CUmemorytype, sys::CUmemorytype),
) -> Result<sys::CUDA_MEMCPY2D> {
    if r.width > r.pitch || r.end().is_none() {
        return Err(Error::Input(format!(
            "a 2-D copy of {} rows of {} bytes at pitch {} from offset {} is not a valid \
             rectangle (rows wider than the pitch, or an overflowing extent)",
            r.height, r.width, r.pitch, r.offset
        )));
    }
    Ok(descriptor(
        (src.0, src.1, r.pitch),
        (dst.0, dst.1, r.pitch),
        kinds,
        (r.width, r.height),
    ))
}

/// A 2-D copy's descriptor: each side a host pointer or a device address
/// (as `kinds` says) and its pitch; `(width, height)` in bytes and rows.
fn descriptor(
    src: (*const u8, u64, usize),
    dst: (*mut u8, u64, usize),
    kinds: (sys::CUmemorytype, sys::CUmemorytype),
    (width, height): (usize, usize),
) -> sys::CUDA_MEMCPY2D {
    sys::CUDA_MEMCPY2D {
        srcXInBytes: 0,
        srcY: 0,
        srcMemoryType: kinds.0,
        srcHost: src.0.cast(),
        srcDevice: src.1,
        srcArray: std::ptr::null_mut(),
        srcPitch: src.2,
        dstXInBytes: 0,
        dstY: 0,
        dstMemoryType: kinds.1,
        dstHost: dst.0.cast(),
        dstDevice: dst.1,
        dstArray: std::ptr::null_mut(),
        dstPitch: dst.2,
        WidthInBytes: width,
        Height: height,
    }
}

/// Queues the 2-D copy `r` from host memory at `src` to device memory at
/// `dst` on `stream` (`cuMemcpy2DAsync`).
///
/// # Safety
/// Every byte of `r` from `src` (bytes `r.offset .. r.end()`) must stay valid
/// for reads, and page-locked for the copy to be asynchronous, until the copy
/// has completed; those of `dst` must be device memory of the stream's context
/// not freed before then. The pitch must not exceed [`max_copy_pitch`].
pub unsafe fn memcpy_2d_htod_async(
    dst: u64,
    src: *const u8,
    r: Rect2d,
    stream: &Stream,
) -> Result<()> {
    use sys::CUmemorytype::{CU_MEMORYTYPE_DEVICE, CU_MEMORYTYPE_HOST};
    let desc = copy_2d(
        r,
        (src.wrapping_add(r.offset), 0),
        (std::ptr::null_mut(), dst.wrapping_add(r.offset as u64)),
        (CU_MEMORYTYPE_HOST, CU_MEMORYTYPE_DEVICE),
    )?;
    // SAFETY: the caller guarantees both ranges for the copy's lifetime;
    // `desc` is a complete description that outlives the call.
    unsafe { queue_2d(&desc, r, stream) }
}

/// Queues the 2-D copy `r` from device memory at `src` to host memory at
/// `dst` on `stream` (`cuMemcpy2DAsync`).
///
/// # Safety
/// Every byte of `r` at `dst` must stay valid for writes, and neither read nor
/// written by the host (page-locked for the copy to be asynchronous), until the
/// copy has completed; those of `src` must be device memory of the stream's
/// context not freed before then. The pitch must not exceed [`max_copy_pitch`].
pub unsafe fn memcpy_2d_dtoh_async(
    dst: *mut u8,
    src: u64,
    r: Rect2d,
    stream: &Stream,
) -> Result<()> {
    use sys::CUmemorytype::{CU_MEMORYTYPE_DEVICE, CU_MEMORYTYPE_HOST};
    let desc = copy_2d(
        r,
        (std::ptr::null(), src.wrapping_add(r.offset as u64)),
        (dst.wrapping_add(r.offset), 0),
        (CU_MEMORYTYPE_DEVICE, CU_MEMORYTYPE_HOST),
    )?;
    // SAFETY: as in `memcpy_2d_htod_async`, with the directions swapped.
    unsafe { queue_2d(&desc, r, stream) }
}

/// Queues `desc` (the copy of `r`) on `stream`; an empty rectangle queues
/// nothing.
///
/// # Safety
/// As for [`memcpy_2d_htod_async`] for the ranges `desc` names.
unsafe fn queue_2d(desc: &sys::CUDA_MEMCPY2D, r: Rect2d, stream: &Stream) -> Result<()> {
    if r.bytes() == 0 {
        return Ok(());
    }
    stream.context().bind()?;
    // SAFETY: the caller guarantees the ranges until the copy completes; the
    // driver reads `desc` during the call only.
    let res = unsafe { sys::cuMemcpy2DAsync_v2(desc, stream.raw()) };
    if res != sys::CUresult::CUDA_SUCCESS {
        let mut e = cuda_error("cuMemcpy2DAsync_v2", res);
        if let Error::Cuda { message, .. } = &mut e {
            message.push_str(&format!(
                " ({} rows of {} bytes at pitch {} from offset {})",
                r.height, r.width, r.pitch, r.offset
            ));
        }
        return Err(e);
    }
    Ok(())
}
