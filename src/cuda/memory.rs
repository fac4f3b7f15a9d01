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
///
/// A mapped registration ([`HostRegistration::register_mapped`]) also maps
/// the range into the device's address space: kernels read it in place,
/// over the bus, through [`HostRegistration::device_ptr`].
pub struct HostRegistration {
    ctx: Context,
    /// Start of the registered range; page-aligned, registered until Drop.
    ptr: *mut u8,
    len: usize,
    /// The range's device address when it is mapped.
    device_ptr: Option<u64>,
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
        // SAFETY: forwarded from this function's contract.
        unsafe { Self::register_with(ctx, ptr, len, false) }
    }

    /// Registers `[ptr, ptr + len)` as [`register`](Self::register) does
    /// (same checks, same `RLIMIT_MEMLOCK` accounting) and maps it into the
    /// device's address space (`CU_MEMHOSTREGISTER_DEVICEMAP`): while it
    /// is registered, kernels and copies on the device may read (and write)
    /// it at [`device_ptr`](Self::device_ptr), always `Some` for such a
    /// registration, over the bus. A driver that refuses the mapping is an
    /// [`Error::Cuda`].
    ///
    /// # Safety
    /// As for [`register`](Self::register). Besides: for as long as work
    /// queued on the device may read the range through the device address,
    /// the registration must stay alive (dropping it unmaps the range under
    /// a running kernel) and the host must not write the bytes it reads.
    pub unsafe fn register_mapped(
        ctx: &Context,
        ptr: *mut u8,
        len: usize,
    ) -> Result<HostRegistration> {
        // SAFETY: forwarded from this function's contract.
        unsafe { Self::register_with(ctx, ptr, len, true) }
    }

    /// [`register`](Self::register), and the device mapping when `mapped`.
    ///
    /// # Safety
    /// As for [`register`](Self::register).
    unsafe fn register_with(
        ctx: &Context,
        ptr: *mut u8,
        len: usize,
        mapped: bool,
    ) -> Result<HostRegistration> {
        ctx.bind()?;
        let page = page_size();
        if len == 0 || !(ptr as usize).is_multiple_of(page) {
            return Err(Error::Input(format!(
                "HostRegistration::register: {len} bytes at {ptr:p}: the start must be {page}-byte aligned and the length non-zero"
            )));
        }
        check_memlock(len as u64)?;
        let flags = if mapped {
            sys::CU_MEMHOSTREGISTER_PORTABLE | sys::CU_MEMHOSTREGISTER_DEVICEMAP
        } else {
            sys::CU_MEMHOSTREGISTER_PORTABLE
        };
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
        let mut reg = HostRegistration {
            ctx: ctx.clone(),
            ptr,
            len,
            device_ptr: None,
        };
        if mapped {
            // On failure `reg` is dropped, which unregisters the range.
            reg.device_ptr = Some(mapped_device_ptr(ptr)?);
        }
        Ok(reg)
    }

    /// The device address of the range's first byte, for a registration made
    /// by [`register_mapped`](Self::register_mapped); `None` otherwise.
    pub fn device_ptr(&self) -> Option<u64> {
        self.device_ptr
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
            .field("device_ptr", &self.device_ptr.map(|p| format!("{p:#x}")))
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

/// The device address of `ptr`, the start of a range just registered with
/// `CU_MEMHOSTREGISTER_DEVICEMAP` in the current context.
fn mapped_device_ptr(ptr: *mut u8) -> Result<u64> {
    let mut dev: sys::CUdeviceptr = 0;
    // SAFETY: the range at `ptr` is registered and mapped (the caller's
    // contract); the out-pointer is to a live local; flags must be 0.
    let res = unsafe { sys::cuMemHostGetDevicePointer_v2(&mut dev, ptr.cast(), 0) };
    check("cuMemHostGetDevicePointer_v2", res)?;
    Ok(dev)
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
