//! Device memory, page-locked registration of host memory, and copies.

use std::sync::atomic::{AtomicU64, Ordering};

use cudarc::driver::sys;

use super::{check, cuda_error, Context, Stream};
use crate::error::{Error, Result};

/// A device allocation (`cuMemAlloc`), freed on drop.
pub struct DeviceBuffer {
    ctx: Context,
    /// A live allocation of `len` bytes, or 0 when `len` is 0.
    ptr: sys::CUdeviceptr,
    len: usize,
}

// SAFETY: a device pointer is an address in the context's address space, usable
// from any thread that makes the context current, which every method does.
unsafe impl Send for DeviceBuffer {}
// SAFETY: the struct is never mutated after creation; concurrent copies into the
// same range are the caller's ordering concern on the GPU, not a host data race.
unsafe impl Sync for DeviceBuffer {}

impl DeviceBuffer {
    /// Allocates `bytes` of device memory in `ctx`.
    ///
    /// Checks free device memory first: asking for more than is free (or the
    /// driver running out) is an [`Error::Limit`] naming both amounts. A
    /// zero-byte buffer allocates nothing and has pointer 0.
    pub fn alloc(ctx: &Context, bytes: usize) -> Result<DeviceBuffer> {
        ctx.bind()?;
        if bytes == 0 {
            return Ok(DeviceBuffer {
                ctx: ctx.clone(),
                ptr: 0,
                len: 0,
            });
        }
        let (free, total) = ctx.mem_info()?;
        let limit = |available: u64| {
            Error::Limit {
            what: format!("GPU memory on device {}", ctx.ordinal()),
            asked: bytes as u64,
            available,
            hint: format!(
                "the device has {total} bytes in all; lower the GPU memory budget or the number of GPU slots"
            ),
        }
        };
        if bytes as u64 > free {
            return Err(limit(free));
        }
        let mut ptr: sys::CUdeviceptr = 0;
        // SAFETY: the context is current; the pointer is to a live local.
        let res = unsafe { sys::cuMemAlloc_v2(&mut ptr, bytes) };
        if res == sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY {
            // Free memory is not all allocatable (fragmentation, other processes).
            return Err(limit(ctx.mem_info().map(|m| m.0).unwrap_or(free)));
        }
        check("cuMemAlloc_v2", res)?;
        Ok(DeviceBuffer {
            ctx: ctx.clone(),
            ptr,
            len: bytes,
        })
    }

    /// The device address (`CUdeviceptr`) of the first byte.
    pub fn ptr(&self) -> u64 {
        self.ptr
    }

    /// Size in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer has no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The context the buffer belongs to.
    pub fn context(&self) -> &Context {
        &self.ctx
    }

    /// Copies `src` to bytes `[offset, offset + src.len())` of the buffer and
    /// waits until the copy has landed.
    ///
    /// Runs on the legacy default stream, which the crate's non-blocking
    /// [`Stream`]s do not wait for: finish work on those that touches this
    /// range before calling.
    pub fn copy_from_host(&self, offset: usize, src: &[u8]) -> Result<()> {
        self.check_range("copy_from_host", offset, src.len())?;
        if src.is_empty() {
            return Ok(());
        }
        self.ctx.bind()?;
        // SAFETY: the range is inside this live allocation (check_range) and src
        // is a live slice of src.len() bytes.
        check("cuMemcpyHtoD_v2", unsafe {
            sys::cuMemcpyHtoD_v2(self.ptr + offset as u64, src.as_ptr().cast(), src.len())
        })?;
        // From pageable memory the call may return once the data is staged;
        // wait for the legacy stream so the bytes are on the device.
        // SAFETY: the null stream is the context's legacy default stream.
        check("cuStreamSynchronize", unsafe {
            sys::cuStreamSynchronize(std::ptr::null_mut())
        })
    }

    /// Copies bytes `[offset, offset + dst.len())` of the buffer into `dst`,
    /// returning once they are there. Same stream caveat as
    /// [`DeviceBuffer::copy_from_host`].
    pub fn copy_to_host(&self, offset: usize, dst: &mut [u8]) -> Result<()> {
        self.check_range("copy_to_host", offset, dst.len())?;
        if dst.is_empty() {
            return Ok(());
        }
        self.ctx.bind()?;
        // SAFETY: the range is inside this live allocation and dst is a live,
        // exclusively borrowed slice of dst.len() bytes; the copy is synchronous.
        check("cuMemcpyDtoH_v2", unsafe {
            sys::cuMemcpyDtoH_v2(dst.as_mut_ptr().cast(), self.ptr + offset as u64, dst.len())
        })
    }

    /// Sets every byte to zero and waits until done. Same stream caveat as
    /// [`DeviceBuffer::copy_from_host`].
    pub fn memset_zero(&self) -> Result<()> {
        if self.len == 0 {
            return Ok(());
        }
        self.ctx.bind()?;
        // SAFETY: [ptr, ptr + len) is this live allocation.
        check("cuMemsetD8_v2", unsafe {
            sys::cuMemsetD8_v2(self.ptr, 0, self.len)
        })?;
        // SAFETY: the null stream is the context's legacy default stream.
        check("cuStreamSynchronize", unsafe {
            sys::cuStreamSynchronize(std::ptr::null_mut())
        })
    }

    /// Queues setting every byte to `value` on `stream`.
    pub fn memset_async(&self, value: u8, stream: &Stream) -> Result<()> {
        self.ctx
            .expect_same(stream.context(), "DeviceBuffer::memset_async")?;
        if self.len == 0 {
            return Ok(());
        }
        self.ctx.bind()?;
        // SAFETY: [ptr, ptr + len) is this live allocation, of the stream's
        // context (checked above), when the memset is queued; it writes device
        // memory only, so no host memory can be touched whatever happens later.
        check("cuMemsetD8Async", unsafe {
            sys::cuMemsetD8Async(self.ptr, value, self.len, stream.raw())
        })
    }

    fn check_range(&self, what: &str, offset: usize, len: usize) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(Error::Input(format!(
                "DeviceBuffer::{what}: {len} bytes at offset {offset} do not fit in a {}-byte buffer",
                self.len
            ))),
        }
    }
}

impl std::fmt::Debug for DeviceBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceBuffer")
            .field("ptr", &format_args!("{:#x}", self.ptr))
            .field("len", &self.len)
            .finish()
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        if self.len == 0 || !self.ctx.bind_for_drop() {
            return;
        }
        // SAFETY: ptr came from cuMemAlloc in this context and is freed only here.
        let res = unsafe { sys::cuMemFree_v2(self.ptr) };
        self.ctx.record_drop_error("cuMemFree (in drop)", res);
    }
}

/// Bytes currently registered by live [`HostRegistration`]s in this process,
/// counted against `RLIMIT_MEMLOCK`.
static REGISTERED_BYTES: AtomicU64 = AtomicU64::new(0);

/// Page-locks caller-owned host memory for the GPU (`cuMemHostRegister`), so
/// async copies from and to it run by DMA without staging. Unregistered on drop;
/// the memory itself stays the caller's.
pub struct HostRegistration {
    ctx: Context,
    /// Start of the registered range; page-aligned, registered until Drop.
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the registration is a property of the address range, not of a thread;
// Drop makes the context current itself.
unsafe impl Send for HostRegistration {}
// SAFETY: the struct is never mutated after creation and gives no access to the
// memory it describes.
unsafe impl Sync for HostRegistration {}

impl HostRegistration {
    /// Registers `[ptr, ptr + len)` with the driver.
    ///
    /// Checks `RLIMIT_MEMLOCK` first (unless the process may lock any amount,
    /// `CAP_IPC_LOCK`): exceeding it, counting the other live registrations of
    /// this process, is an [`Error::Limit`]. A `ptr` that is not page-aligned,
    /// or `len == 0`, is an [`Error::Input`].
    ///
    /// # Safety
    /// `[ptr, ptr + len)` must be valid memory owned by the caller, must stay
    /// allocated for as long as the returned registration lives, and must not
    /// overlap another live registration.
    pub unsafe fn register(ctx: &Context, ptr: *mut u8, len: usize) -> Result<HostRegistration> {
        ctx.bind()?;
        let page = page_size();
        if len == 0 || !(ptr as usize).is_multiple_of(page) {
            return Err(Error::Input(format!(
                "HostRegistration::register: {len} bytes at {ptr:p}: the start must be {page}-byte aligned and the length non-zero"
            )));
        }
        check_memlock(len as u64)?;
        let flags = sys::CU_MEMHOSTREGISTER_PORTABLE;
        // SAFETY: the caller guarantees the range is valid and outlives the
        // registration; the context is current.
        let res = unsafe { sys::cuMemHostRegister_v2(ptr.cast(), len, flags) };
        if res != sys::CUresult::CUDA_SUCCESS {
            let mut e = cuda_error("cuMemHostRegister_v2", res);
            if let Error::Cuda { message, .. } = &mut e {
                message.push_str(&format!(" (registering {len} bytes at {ptr:p})"));
            }
            return Err(e);
        }
        REGISTERED_BYTES.fetch_add(len as u64, Ordering::Relaxed);
        Ok(HostRegistration {
            ctx: ctx.clone(),
            ptr,
            len,
        })
    }

    /// Start of the registered range.
    pub fn ptr(&self) -> *mut u8 {
        self.ptr
    }

    /// Length of the registered range in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the range is empty (never true for a registration that succeeded).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The context the registration was made in.
    pub fn context(&self) -> &Context {
        &self.ctx
    }
}

impl std::fmt::Debug for HostRegistration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostRegistration")
            .field("ptr", &self.ptr)
            .field("len", &self.len)
            .finish()
    }
}

impl Drop for HostRegistration {
    fn drop(&mut self) {
        REGISTERED_BYTES.fetch_sub(self.len as u64, Ordering::Relaxed);
        if !self.ctx.bind_for_drop() {
            return;
        }
        // SAFETY: ptr was registered by cuMemHostRegister and is unregistered only here.
        let res = unsafe { sys::cuMemHostUnregister(self.ptr.cast()) };
        self.ctx
            .record_drop_error("cuMemHostUnregister (in drop)", res);
    }
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 {
        p as usize
    } else {
        4096
    }
}

/// Fails with [`Error::Limit`] when registering `len` more bytes would exceed
/// the soft `RLIMIT_MEMLOCK`.
fn check_memlock(len: u64) -> Result<()> {
    use nix::sys::resource::{getrlimit, Resource, RLIM_INFINITY};
    let Ok((soft, _hard)) = getrlimit(Resource::RLIMIT_MEMLOCK) else {
        return Ok(());
    };
    if soft == RLIM_INFINITY || crate::host_memory::has_cap_ipc_lock() {
        return Ok(());
    }
    let used = REGISTERED_BYTES.load(Ordering::Relaxed);
    let available = soft.saturating_sub(used);
    if len > available {
        return Err(Error::Limit {
            what: "pinned memory (RLIMIT_MEMLOCK)".to_string(),
            asked: len,
            available,
            hint: format!(
                "the limit is {soft} bytes and {used} are already pinned by this process; \
                 raise it with `ulimit -l` or in /etc/security/limits.conf, or pin fewer or smaller slots"
            ),
        });
    }
    Ok(())
}

/// Queues a copy of `len` bytes from host `src` to device address `dst` on `stream`.
///
/// # Safety
/// `src` must be valid for reads of `len` bytes until the copy has completed
/// (page-locked, e.g. through a [`HostRegistration`], for the copy to be truly
/// asynchronous), and `[dst, dst + len)` must be device memory of the stream's
/// context not freed before the copy completes.
pub unsafe fn memcpy_htod_async(
    dst: u64,
    src: *const u8,
    len: usize,
    stream: &Stream,
) -> Result<()> {
    if len == 0 {
        return Ok(());
    }
    stream.context().bind()?;
    // SAFETY: the caller guarantees both ranges stay valid until the copy completes.
    check("cuMemcpyHtoDAsync_v2", unsafe {
        sys::cuMemcpyHtoDAsync_v2(dst, src.cast(), len, stream.raw())
    })
}

/// Queues a copy of `len` bytes from device address `src` to host `dst` on `stream`.
///
/// # Safety
/// `dst` must be valid for writes of `len` bytes, and not read or written by the
/// host, until the copy has completed (page-locked for the copy to be truly
/// asynchronous); `[src, src + len)` must be device memory of the stream's
/// context not freed before the copy completes.
pub unsafe fn memcpy_dtoh_async(dst: *mut u8, src: u64, len: usize, stream: &Stream) -> Result<()> {
    if len == 0 {
        return Ok(());
    }
    stream.context().bind()?;
    // SAFETY: the caller guarantees both ranges stay valid until the copy completes.
    check("cuMemcpyDtoHAsync_v2", unsafe {
        sys::cuMemcpyDtoHAsync_v2(dst.cast(), src, len, stream.raw())
    })
}

/// Queues a copy of `len` bytes between device addresses on `stream`.
///
/// # Safety
/// `[src, src + len)` and `[dst, dst + len)` must be device memory of the
/// stream's context, not freed before the copy completes, and must not overlap.
pub unsafe fn memcpy_dtod_async(dst: u64, src: u64, len: usize, stream: &Stream) -> Result<()> {
    if len == 0 {
        return Ok(());
    }
    stream.context().bind()?;
    // SAFETY: the caller guarantees both ranges are valid device memory until
    // the copy completes.
    check("cuMemcpyDtoDAsync_v2", unsafe {
        sys::cuMemcpyDtoDAsync_v2(dst, src, len, stream.raw())
    })
}

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
