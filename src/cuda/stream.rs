//! Streams and events.

use std::sync::OnceLock;

use cudarc::driver::sys;

use super::{check, cuda_error, has_symbol, Context};
use crate::error::Result;

/// A non-blocking CUDA stream (`CU_STREAM_NON_BLOCKING`): it does not
/// synchronise with the legacy default stream.
pub struct Stream {
    ctx: Context,
    /// Created in `new`, destroyed once in Drop.
    raw: sys::CUstream,
}

// SAFETY: a CUstream is a driver handle usable from any thread once its context
// is current, which every method (and Drop) arranges first.
unsafe impl Send for Stream {}
// SAFETY: the driver serialises work submitted to one stream from several
// threads; the struct itself is never mutated after creation.
unsafe impl Sync for Stream {}

impl Stream {
    /// Creates a non-blocking stream in `ctx`.
    pub fn new(ctx: &Context) -> Result<Stream> {
        ctx.bind()?;
        let mut raw: sys::CUstream = std::ptr::null_mut();
        let flags = sys::CUstream_flags::CU_STREAM_NON_BLOCKING as u32;
        // SAFETY: the context is current; the pointer is to a live local.
        check("cuStreamCreate", unsafe {
            sys::cuStreamCreate(&mut raw, flags)
        })?;
        Ok(Stream {
            ctx: ctx.clone(),
            raw,
        })
    }

    /// The raw driver handle, valid while `self` is alive.
    pub fn raw(&self) -> sys::CUstream {
        self.raw
    }

    /// The context the stream belongs to.
    pub fn context(&self) -> &Context {
        &self.ctx
    }

    /// Waits until all work queued on the stream has finished.
    pub fn synchronize(&self) -> Result<()> {
        self.ctx.bind()?;
        // SAFETY: raw is a live stream of the current context.
        check("cuStreamSynchronize", unsafe {
            sys::cuStreamSynchronize(self.raw)
        })
    }

    /// Makes all work queued on this stream after this call wait until `ev`'s
    /// most recent record has completed (`cuStreamWaitEvent`). The host does
    /// not wait.
    pub fn wait_event(&self, ev: &Event) -> Result<()> {
        self.ctx.expect_same(&ev.ctx, "Stream::wait_event")?;
        self.ctx.bind()?;
        // SAFETY: raw and ev.raw are live handles of the current context; flags must be 0.
        check("cuStreamWaitEvent", unsafe {
            sys::cuStreamWaitEvent(self.raw, ev.raw, 0)
        })
    }

    /// Whether all work queued on the stream has finished, without waiting.
    pub fn query(&self) -> Result<bool> {
        self.ctx.bind()?;
        // SAFETY: raw is a live stream of the current context.
        ready("cuStreamQuery", unsafe { sys::cuStreamQuery(self.raw) })
    }
}

impl std::fmt::Debug for Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stream").field("raw", &self.raw).finish()
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        if !self.ctx.bind_for_drop() {
            return;
        }
        // SAFETY: raw was created by cuStreamCreate and is destroyed only here;
        // queued work still completes after destruction, as the driver documents.
        let res = unsafe { sys::cuStreamDestroy_v2(self.raw) };
        self.ctx.record_drop_error("cuStreamDestroy (in drop)", res);
    }
}

/// A CUDA event: a marker recorded on a stream that other streams or the host
/// can wait on.
pub struct Event {
    ctx: Context,
    /// Created in `new`, destroyed once in Drop.
    raw: sys::CUevent,
}

// SAFETY: a CUevent is a driver handle usable from any thread once its context
// is current, which every method (and Drop) arranges first.
unsafe impl Send for Event {}
// SAFETY: the driver synchronises concurrent use of one event; the struct is
// never mutated after creation.
unsafe impl Sync for Event {}

impl Event {
    /// Creates an event in `ctx`. With `timing = false` the event cannot be used
    /// with [`Event::elapsed_ms`] but records and waits are cheaper
    /// (`CU_EVENT_DISABLE_TIMING`).
    pub fn new(ctx: &Context, timing: bool) -> Result<Event> {
        ctx.bind()?;
        let flags = if timing {
            sys::CUevent_flags::CU_EVENT_DEFAULT
        } else {
            sys::CUevent_flags::CU_EVENT_DISABLE_TIMING
        } as u32;
        let mut raw: sys::CUevent = std::ptr::null_mut();
        // SAFETY: the context is current; the pointer is to a live local.
        check("cuEventCreate", unsafe {
            sys::cuEventCreate(&mut raw, flags)
        })?;
        Ok(Event {
            ctx: ctx.clone(),
            raw,
        })
    }

    /// The raw driver handle, valid while `self` is alive.
    pub fn raw(&self) -> sys::CUevent {
        self.raw
    }

    /// The context the event belongs to.
    pub fn context(&self) -> &Context {
        &self.ctx
    }

    /// Records the event at the current end of `stream`'s queue. A later
    /// record replaces this one for future waits and queries.
    pub fn record(&self, stream: &Stream) -> Result<()> {
        self.ctx.expect_same(&stream.ctx, "Event::record")?;
        self.ctx.bind()?;
        // SAFETY: raw and stream.raw are live handles of the current context.
        check("cuEventRecord", unsafe {
            sys::cuEventRecord(self.raw, stream.raw)
        })
    }

    /// Whether the work before the most recent record has completed (true also
    /// for an event never recorded).
    pub fn query(&self) -> Result<bool> {
        self.ctx.bind()?;
        // SAFETY: raw is a live event of the current context.
        ready("cuEventQuery", unsafe { sys::cuEventQuery(self.raw) })
    }

    /// Blocks the calling thread until the most recent record has completed.
    pub fn synchronize(&self) -> Result<()> {
        self.ctx.bind()?;
        // SAFETY: raw is a live event of the current context.
        check("cuEventSynchronize", unsafe {
            sys::cuEventSynchronize(self.raw)
        })
    }

    /// Milliseconds between two completed records; both events must have been
    /// created with `timing = true`.
    pub fn elapsed_ms(start: &Event, end: &Event) -> Result<f32> {
        start.ctx.expect_same(&end.ctx, "Event::elapsed_ms")?;
        start.ctx.bind()?;
        let mut ms = 0f32;
        // The _v2 entry point is the one CUDA 13 headers use; 12.x drivers
        // before 12.8 only export the original.
        static HAS_V2: OnceLock<bool> = OnceLock::new();
        let res = if *HAS_V2.get_or_init(|| has_symbol(b"cuEventElapsedTime_v2\0")) {
            // SAFETY: both events are live handles of the current context; the
            // pointer is to a live local.
            unsafe { sys::cuEventElapsedTime_v2(&mut ms, start.raw, end.raw) }
        } else {
            // SAFETY: as above.
            unsafe { sys::cuEventElapsedTime(&mut ms, start.raw, end.raw) }
        };
        check("cuEventElapsedTime", res)?;
        Ok(ms)
    }
}

impl std::fmt::Debug for Event {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Event").field("raw", &self.raw).finish()
    }
}

impl Drop for Event {
    fn drop(&mut self) {
        if !self.ctx.bind_for_drop() {
            return;
        }
        // SAFETY: raw was created by cuEventCreate and is destroyed only here; a
        // pending record still completes after destruction, as the driver documents.
        let res = unsafe { sys::cuEventDestroy_v2(self.raw) };
        self.ctx.record_drop_error("cuEventDestroy (in drop)", res);
    }
}

/// Maps the result of a query: success is "done", `CUDA_ERROR_NOT_READY` is
/// "not yet", anything else an error.
fn ready(call: &'static str, res: sys::CUresult) -> Result<bool> {
    match res {
        sys::CUresult::CUDA_SUCCESS => Ok(true),
        sys::CUresult::CUDA_ERROR_NOT_READY => Ok(false),
        other => Err(cuda_error(call, other)),
    }
}
