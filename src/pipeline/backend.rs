//! The two backends the pipeline runs over: CUDA, and the host backend whose
//! "device" is host memory (see [`host`](super::host)).
//!
//! The pipeline talks to both through the small set of types here: a device
//! allocation, pinned host memory, a stream and an event.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::host::{CopyGuard, HostEvent, HostStream, PinnedSource};
use crate::cuda::{self, Context, DeviceBuffer, HostRegistration};
use crate::io::AlignedBuf;
use crate::kernels::Kernels;
use crate::quant::device::DequantKernels;
use crate::quant::fp8::Fp8Layout;
use crate::quant::QuantType;
use crate::{DType, Error, Result};

/// The backend a streamer was built on.
pub(crate) enum Backend {
    Cuda {
        ctx: Context,
        kernels: Option<Kernels>,
        /// Loaded when the model has block-quantized tensors.
        dequant: Option<Box<DequantKernels>>,
    },
    Host,
}

impl Backend {
    pub(crate) fn is_host(&self) -> bool {
        matches!(self, Backend::Host)
    }

    /// A stream for transfers (host backend: with its own worker thread).
    pub(crate) fn stream(&self, name: &str) -> Result<StreamH> {
        Ok(match self {
            Backend::Cuda { ctx, .. } => StreamH::Cuda(cuda::Stream::new(ctx)?),
            Backend::Host => StreamH::Host(HostStream::spawn(name)?),
        })
    }

    /// A stream for the caller's compute (host backend: runs on the caller).
    pub(crate) fn compute_stream(&self) -> Result<StreamH> {
        Ok(match self {
            Backend::Cuda { ctx, .. } => StreamH::Cuda(cuda::Stream::new(ctx)?),
            Backend::Host => StreamH::Host(HostStream::immediate()),
        })
    }

    pub(crate) fn event(&self, timing: bool) -> Result<EventH> {
        Ok(match self {
            Backend::Cuda { ctx, .. } => EventH::Cuda(cuda::Event::new(ctx, timing)?),
            Backend::Host => EventH::Host(HostEvent::new()),
        })
    }

    /// A device allocation of `bytes`, named for error messages.
    pub(crate) fn alloc(&self, bytes: usize, name: String) -> Result<DevMem> {
        Ok(match self {
            Backend::Cuda { ctx, .. } => DevMem::Cuda(DeviceBuffer::alloc(ctx, bytes.max(1))?),
            Backend::Host => DevMem::Host {
                buf: AlignedBuf::new(bytes.max(1))?,
                in_use: Arc::new(AtomicBool::new(false)),
                name: name.into(),
            },
        })
    }

    /// Page-aligned host memory of `bytes`, registered with the driver on CUDA.
    pub(crate) fn pinned(&self, bytes: usize) -> Result<PinnedBuf> {
        let mut buf = AlignedBuf::new(bytes.max(1))?;
        let reg = match self {
            Backend::Cuda { ctx, .. } => {
                let (ptr, len) = (buf.as_mut_ptr(), buf.len());
                // SAFETY: `buf` is page-aligned, `len` bytes long, and is
                // dropped after `reg` (field order of `PinnedBuf`).
                Some(unsafe { HostRegistration::register(ctx, ptr, len)? })
            }
            Backend::Host => None,
        };
        Ok(PinnedBuf {
            _reg: reg,
            buf,
            gen: Arc::new(AtomicU64::new(0)),
        })
    }

    /// The dequantization kernels, where the model needs them (CUDA).
    pub(crate) fn dequant_kernels(&self) -> Option<&DequantKernels> {
        match self {
            Backend::Cuda { dequant, .. } => dequant.as_deref(),
            Backend::Host => None,
        }
    }

    pub(crate) fn kernels(&self) -> Option<&Kernels> {
        match self {
            Backend::Cuda { kernels, .. } => kernels.as_ref(),
            Backend::Host => None,
        }
    }
}

/// Page-aligned host memory, pinned on CUDA.
pub(crate) struct PinnedBuf {
    // Declared first so that it is dropped (unregistered) before `buf`.
    _reg: Option<HostRegistration>,
    pub(crate) buf: AlignedBuf,
    /// Bumped by a writer before each refill; see the host backend's checks.
    pub(crate) gen: Arc<AtomicU64>,
}

impl PinnedBuf {
    pub(crate) fn ptr(&self) -> *const u8 {
        self.buf.as_ptr()
    }

    /// Marks the start of a refill.
    pub(crate) fn begin_fill(&self) {
        self.gen.fetch_add(1, Ordering::AcqRel);
    }
}

/// Device memory: a CUDA allocation, or host memory on the host backend.
pub(crate) enum DevMem {
    Cuda(DeviceBuffer),
    Host {
        buf: AlignedBuf,
        /// Raised while a layer function may read this slot.
        in_use: Arc<AtomicBool>,
        name: Arc<str>,
    },
}

impl DevMem {
    pub(crate) fn ptr(&self) -> u64 {
        match self {
            DevMem::Cuda(b) => b.ptr(),
            DevMem::Host { buf, .. } => buf.as_ptr() as u64,
        }
    }

    pub(crate) fn len(&self) -> usize {
        match self {
            DevMem::Cuda(b) => b.len(),
            DevMem::Host { buf, .. } => buf.len(),
        }
    }

    pub(crate) fn set_in_use(&self, v: bool) {
        if let DevMem::Host { in_use, .. } = self {
            in_use.store(v, Ordering::Release);
        }
    }

    /// Copies `dst.len()` bytes starting at `offset` back to the host (synchronous).
    pub(crate) fn read(&self, offset: usize, dst: &mut [u8]) -> Result<()> {
        match self {
            DevMem::Cuda(b) => b.copy_to_host(offset, dst),
            DevMem::Host { buf, .. } => {
                let src = buf
                    .as_slice()
                    .get(offset..offset + dst.len())
                    .ok_or_else(|| out_of_bounds("read", offset, dst.len(), buf.len()))?;
                dst.copy_from_slice(src);
                Ok(())
            }
        }
    }

    /// Copies `src` to `offset` (synchronous).
    pub(crate) fn write(&mut self, offset: usize, src: &[u8]) -> Result<()> {
        match self {
            DevMem::Cuda(b) => b.copy_from_host(offset, src),
            DevMem::Host { buf, .. } => {
                let size = buf.len();
                buf.as_mut_slice()
                    .get_mut(offset..offset + src.len())
                    .ok_or_else(|| out_of_bounds("write", offset, src.len(), size))?
                    .copy_from_slice(src);
                Ok(())
            }
        }
    }
}

fn out_of_bounds(op: &str, offset: usize, len: usize, size: usize) -> Error {
    Error::Pipeline(format!(
        "device {op} of {len} bytes at offset {offset} overruns a buffer of {size} bytes"
    ))
}

/// A stream of either backend.
pub(crate) enum StreamH {
    Cuda(cuda::Stream),
    Host(HostStream),
}

impl StreamH {
    /// Queues a host-to-device copy of `len` bytes into `dst` at `dst_off`.
    ///
    /// # Safety
    /// `src` is valid for `len` bytes (pinned memory on CUDA) and is not
    /// written until an event recorded after this copy has completed.
    pub(crate) unsafe fn copy_htod(
        &self,
        dst: &DevMem,
        dst_off: usize,
        src: *const u8,
        len: usize,
        src_gen: Option<(&Arc<AtomicU64>, PinnedSource)>,
    ) -> Result<()> {
        if dst_off + len > dst.len() {
            return Err(Error::Pipeline(format!(
                "copy of {len} bytes at offset {dst_off} overruns a device buffer of {} bytes",
                dst.len()
            )));
        }
        match (self, dst) {
            // SAFETY: the destination range is in bounds (checked above); the
            // caller guarantees the source.
            (StreamH::Cuda(s), DevMem::Cuda(_)) => unsafe {
                cuda::memcpy_htod_async(dst.ptr() + dst_off as u64, src, len, s)
            },
            (StreamH::Host(s), DevMem::Host { in_use, name, .. }) => {
                let guard = CopyGuard {
                    dst_in_use: Some((in_use.clone(), name.clone())),
                    src_gen: src_gen.map(|(g, n)| (g.clone(), g.load(Ordering::Acquire), n)),
                };
                // SAFETY: as above.
                unsafe { s.copy(dst.ptr() + dst_off as u64, src, len, guard) };
                Ok(())
            }
            _ => Err(Error::Pipeline(
                "stream and buffer of different backends".into(),
            )),
        }
    }

    /// Queues a conversion of `n` elements from `src` (dtype `from`) to `dst` (dtype `to`).
    ///
    /// # Safety
    /// Both device ranges are valid for `n` elements of their dtype.
    pub(crate) unsafe fn cast(
        &self,
        kernels: Option<&Kernels>,
        from: DType,
        to: DType,
        src: u64,
        dst: u64,
        n: usize,
    ) -> Result<()> {
        match self {
            StreamH::Cuda(s) => {
                let k = kernels.ok_or_else(|| Error::Pipeline("kernels not loaded".into()))?;
                if to != DType::BF16 {
                    return Err(Error::config(format!(
                        "the device casts to bf16 only, not {from} to {to}"
                    )));
                }
                // SAFETY: forwarded from the caller: both ranges hold n elements
                // of their dtype on this stream's context.
                unsafe { k.cast_to_bf16(from, src, dst, n, s) }
            }
            StreamH::Host(s) => {
                // SAFETY: forwarded from the caller.
                unsafe { s.cast(from, to, src, dst, n) };
                Ok(())
            }
        }
    }

    /// Queues the dequantization of `n` elements stored as `ty` blocks at
    /// `src` into `n` values of `to` (bf16 or f16) at `dst`.
    ///
    /// # Safety
    /// `src` holds `ty.tensor_size(&[n])` bytes and `dst` room for `n` 16-bit
    /// values, both device memory of this stream's backend that stay valid
    /// until the work completes.
    #[allow(clippy::too_many_arguments)]
    pub(crate) unsafe fn dequant(
        &self,
        kernels: Option<&DequantKernels>,
        ty: QuantType,
        to: DType,
        src: u64,
        dst: u64,
        n: usize,
    ) -> Result<()> {
        match self {
            StreamH::Cuda(s) => {
                let k = kernels
                    .ok_or_else(|| Error::Pipeline("dequantization kernels not loaded".into()))?;
                // SAFETY: forwarded from the caller.
                unsafe { k.dequantize(ty, to, src, dst, n as u64, s) }
            }
            StreamH::Host(s) => {
                // SAFETY: forwarded from the caller.
                unsafe { s.dequant(ty, to, src, dst, n) };
                Ok(())
            }
        }
    }

    /// Queues the dequantization of an FP8 weight of `layout` at `src`, with
    /// its scales at `scale`, into `to` (bf16 or f16) at `dst`.
    ///
    /// # Safety
    /// `src` holds `layout.elems()` bytes, `scale` `layout.scale_bytes()`
    /// bytes and `dst` room for `layout.elems()` 16-bit values, all device
    /// memory of this stream's backend that stays valid (and `dst` unread by
    /// other work) until the work completes.
    pub(crate) unsafe fn dequant_fp8(
        &self,
        kernels: Option<&DequantKernels>,
        layout: &Fp8Layout,
        to: DType,
        src: u64,
        scale: u64,
        dst: u64,
    ) -> Result<()> {
        match self {
            StreamH::Cuda(s) => {
                let k = kernels
                    .ok_or_else(|| Error::Pipeline("dequantization kernels not loaded".into()))?;
                // SAFETY: forwarded from the caller.
                unsafe { k.dequantize_fp8(layout, to, src, scale, dst, s) }
            }
            StreamH::Host(s) => {
                // SAFETY: forwarded from the caller.
                unsafe { s.dequant_fp8(*layout, to, src, scale, dst) };
                Ok(())
            }
        }
    }

    pub(crate) fn record(&self, ev: &EventH) -> Result<()> {
        match (self, ev) {
            (StreamH::Cuda(s), EventH::Cuda(e)) => e.record(s),
            (StreamH::Host(s), EventH::Host(e)) => {
                s.record(e);
                Ok(())
            }
            _ => Err(Error::Pipeline(
                "stream and event of different backends".into(),
            )),
        }
    }

    pub(crate) fn wait_event(&self, ev: &EventH) -> Result<()> {
        match (self, ev) {
            (StreamH::Cuda(s), EventH::Cuda(e)) => s.wait_event(e),
            (StreamH::Host(s), EventH::Host(e)) => {
                s.wait_event(e);
                Ok(())
            }
            _ => Err(Error::Pipeline(
                "stream and event of different backends".into(),
            )),
        }
    }

    pub(crate) fn synchronize(&self) -> Result<()> {
        match self {
            StreamH::Cuda(s) => s.synchronize(),
            StreamH::Host(s) => s.synchronize(),
        }
    }

    /// Violations the host backend detected so far.
    pub(crate) fn check(&self) -> Result<()> {
        match self {
            StreamH::Cuda(_) => Ok(()),
            StreamH::Host(s) => s.check(),
        }
    }
}

/// An event of either backend.
pub(crate) enum EventH {
    Cuda(cuda::Event),
    Host(HostEvent),
}

impl EventH {
    pub(crate) fn query(&self) -> Result<bool> {
        match self {
            EventH::Cuda(e) => e.query(),
            EventH::Host(e) => Ok(e.query()),
        }
    }

    pub(crate) fn synchronize(&self) -> Result<()> {
        match self {
            EventH::Cuda(e) => e.synchronize(),
            EventH::Host(e) => {
                e.synchronize();
                Ok(())
            }
        }
    }

    /// Records the event on a raw CUDA stream.
    ///
    /// # Safety
    /// `stream` is a live stream of the event's context, or null.
    pub(crate) unsafe fn record_raw(&self, stream: cudarc::driver::sys::CUstream) -> Result<()> {
        match self {
            EventH::Cuda(e) => {
                e.context().bind()?;
                // SAFETY: the event is live and its context current; the
                // caller guarantees the stream.
                cuda::check("cuEventRecord", unsafe {
                    cudarc::driver::sys::cuEventRecord(e.raw(), stream)
                })
            }
            EventH::Host(_) => Err(Error::Pipeline(
                "a host event cannot be recorded on a CUDA stream".into(),
            )),
        }
    }

    /// Time from `start` to `end`, both completed.
    pub(crate) fn elapsed(start: &EventH, end: &EventH) -> Result<Duration> {
        match (start, end) {
            (EventH::Cuda(a), EventH::Cuda(b)) => {
                let ms = cuda::Event::elapsed_ms(a, b)?;
                Ok(Duration::from_secs_f64(f64::from(ms.max(0.0)) / 1e3))
            }
            (EventH::Host(a), EventH::Host(b)) => match (a.completed_at(), b.completed_at()) {
                (Some(x), Some(y)) => Ok(y.saturating_duration_since(x)),
                _ => Ok(Duration::ZERO),
            },
            _ => Err(Error::Pipeline("events of different backends".into())),
        }
    }
}
