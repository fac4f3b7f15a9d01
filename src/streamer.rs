//! [`LayerStreamer`]: builds the pipeline once, then runs passes over the
//! model's layers, calling the caller's layer function for each layer with
//! its weights already on the device.

use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::sync::Mutex;
use std::time::Instant;

use crate::checkpoint::ModelIndex;
use crate::io::OpenMode;
use crate::kernels::Kernels;
use crate::pipeline::plan::{LayerPlan, LayerWeights};
use crate::pipeline::readers::{self, Claim, InFlight};
use crate::pipeline::resources::{Resources, Rings};
use crate::pipeline::stages::{self, H2dInput, PassCtx};
use crate::pipeline::{Backend, Budget, Device, PassStats, StageStats, StreamH, StreamerConfig};
use crate::ring::{Consumer, Producer};
use crate::{cuda, DType, Error, Result};

mod alloc;
mod consume;
mod tensor;

pub use alloc::MemoryUse;
pub use tensor::DeviceTensor;

/// The stream the layer function launches its work on.
pub struct ComputeStream {
    pub(crate) inner: StreamH,
}

impl ComputeStream {
    /// The CUDA stream; `None` on the host backend.
    pub fn cuda(&self) -> Option<&cuda::Stream> {
        match &self.inner {
            StreamH::Cuda(s) => Some(s),
            StreamH::Host(_) => None,
        }
    }

    /// The raw `CUstream`; null on the host backend.
    pub fn raw(&self) -> cudarc::driver::sys::CUstream {
        match &self.inner {
            StreamH::Cuda(s) => s.raw(),
            StreamH::Host(_) => std::ptr::null_mut(),
        }
    }

    /// Whether this is the host backend's (synchronous) stream.
    pub fn is_host(&self) -> bool {
        matches!(self.inner, StreamH::Host(_))
    }

    /// Waits until the work queued on the stream has finished.
    pub fn synchronize(&self) -> Result<()> {
        self.inner.synchronize()
    }
}

/// Builds a [`LayerStreamer`]. Every setter has the default of
/// [`StreamerConfig::default`].
pub struct LayerStreamerBuilder<'m> {
    model: &'m ModelIndex,
    cfg: StreamerConfig,
}

macro_rules! setters {
    ($($(#[$doc:meta])* $name:ident: $ty:ty;)*) => {$(
        $(#[$doc])*
        pub fn $name(mut self, v: $ty) -> Self {
            self.cfg.$name = v;
            self
        }
    )*};
}

impl<'m> LayerStreamerBuilder<'m> {
    /// Replaces the whole configuration.
    pub fn config(mut self, cfg: StreamerConfig) -> Self {
        self.cfg = cfg;
        self
    }

    /// Compute dtype: f16/f32 tensors are cast to it on the device.
    pub fn dtype(mut self, d: DType) -> Self {
        self.cfg.dtype = Some(d);
        self
    }

    /// Keep every tensor in its file dtype (no casts).
    pub fn file_dtype(mut self) -> Self {
        self.cfg.dtype = None;
        self
    }

    /// CPUs to pin the stage threads to.
    pub fn cpu_affinity(mut self, cpus: Vec<usize>) -> Self {
        self.cfg.cpu_affinity = Some(cpus);
        self
    }

    setters! {
        /// Where the weights go.
        device: Device;
        /// GPU prefetch depth (`n_gpu + 1` device slots).
        n_gpu: usize;
        /// Pinned host slots (0: the transfer thread stages through one buffer).
        n_cpu_pinned: usize;
        /// Unpinned CPU slots (0: readers fill pinned slots directly).
        n_cpu: usize;
        /// Items the transfer thread hands over at once.
        batch_gpu: usize;
        /// Items handed over from the pinned ring at once.
        batch_cpu_pinned: usize;
        /// Items handed over from the CPU ring at once.
        batch_cpu: usize;
        /// Reader threads.
        reader_threads: usize;
        /// Bytes per read request (a multiple of 4096).
        read_chunk: u64;
        /// How model files are opened.
        io_mode: OpenMode;
        /// Layers kept pinned in host RAM across passes.
        pinned_cache: Budget;
        /// Layers kept resident on the device.
        gpu_cache: Budget;
        /// Show a progress bar per pass.
        progress: bool;
    }

    /// Allocates every slot, cache and stream and opens every file.
    pub fn build(self) -> Result<LayerStreamer> {
        LayerStreamer::build(self.model, self.cfg)
    }
}

/// Streams a model's layers to the device, pass after pass.
///
/// ```no_run
/// use layer_streamer::{Device, LayerStreamer, ModelIndex};
/// # fn main() -> layer_streamer::Result<()> {
/// let model = ModelIndex::open("./my-model")?;
/// let mut s = LayerStreamer::builder(&model).device(Device::Host).build()?;
/// let layers_seen = s.run_pass(0usize, |n, w, layer, _stream| {
///     assert_eq!(w.layer(), layer);
///     Ok(n + 1)
/// })?;
/// assert_eq!(layers_seen, model.num_layers());
/// println!("{}", s.last_pass_stats());
/// # Ok(()) }
/// ```
pub struct LayerStreamer {
    res: Resources,
    rings: Rings,
    compute: ComputeStream,
    cfg: StreamerConfig,
    n_gpu_slots: usize,
    stats: PassStats,
    passes: u64,
    memory: MemoryUse,
}

impl LayerStreamer {
    /// A builder for a streamer over `model`.
    pub fn builder(model: &ModelIndex) -> LayerStreamerBuilder<'_> {
        LayerStreamerBuilder {
            model,
            cfg: StreamerConfig::default(),
        }
    }

    fn build(model: &ModelIndex, cfg: StreamerConfig) -> Result<LayerStreamer> {
        cfg.validate()?;
        if model.num_layers() == 0 {
            return Err(Error::model(
                model.dir(),
                "the model has no layers to stream",
            ));
        }
        let mut plans = model
            .layers()
            .iter()
            .map(|l| LayerPlan::new(model, l, cfg.dtype))
            .collect::<Result<Vec<_>>>()?;
        let needs_casts = plans.iter().any(|p| !p.casts.is_empty())
            || model.statics().iter().any(|t| {
                cfg.dtype
                    .is_some_and(|d| d != t.dtype && t.dtype.is_castable_float())
            });
        let backend = match cfg.device {
            Device::Host => Backend::Host,
            Device::Cuda(ordinal) => {
                if needs_casts && cfg.dtype != Some(DType::BF16) {
                    return Err(Error::config(format!(
                        "the device casts f16/f32 weights to bf16 only; compute dtype {} needs \
                         the model's tensors in that dtype",
                        cfg.dtype.map(|d| d.to_string()).unwrap_or_default()
                    )));
                }
                let ctx = cuda::Context::new(ordinal)?;
                let kernels = if needs_casts {
                    Some(Kernels::load(&ctx)?)
                } else {
                    None
                };
                Backend::Cuda { ctx, kernels }
            }
        };
        alloc::place_layers(&backend, &cfg, &mut plans)?;
        let (res, memory) = alloc::allocate(backend, model, &cfg, plans)?;
        let compute = ComputeStream {
            inner: res.backend.compute_stream()?,
        };
        let rings = Rings::new(
            res.cpu_slots.len(),
            res.pinned_slots.len(),
            res.gpu_slots.len(),
            model.num_layers(),
        );
        Ok(LayerStreamer {
            n_gpu_slots: res.gpu_slots.len(),
            res,
            rings,
            compute,
            cfg,
            stats: PassStats::default(),
            passes: 0,
            memory,
        })
    }

    /// The model being streamed.
    pub fn model(&self) -> &ModelIndex {
        &self.res.model
    }

    /// The configuration the streamer was built with.
    pub fn config(&self) -> &StreamerConfig {
        &self.cfg
    }

    /// What the streamer allocated.
    pub fn memory(&self) -> &MemoryUse {
        &self.memory
    }

    /// Statistics of the last completed pass.
    pub fn last_pass_stats(&self) -> &PassStats {
        &self.stats
    }

    /// The stream layer functions run on; use it for work before and after a pass.
    pub fn compute_stream(&self) -> &ComputeStream {
        &self.compute
    }

    /// The CUDA context; `None` on the host backend.
    pub fn context(&self) -> Option<&cuda::Context> {
        match &self.res.backend {
            Backend::Cuda { ctx, .. } => Some(ctx),
            Backend::Host => None,
        }
    }

    /// Whether this streamer runs on the host backend.
    pub fn is_host(&self) -> bool {
        self.res.backend.is_host()
    }

    /// Reads a non-layer tensor (embedding, final norm, lm_head, ...) and
    /// keeps it on the device, cast to the compute dtype when it is a float.
    pub fn load_static(&self, name: &str) -> Result<DeviceTensor> {
        tensor::load_static(&self.res, &self.compute.inner, self.cfg.dtype, name)
    }

    /// Runs one pass: calls `layer_fn(state, weights, layer, stream)` for every
    /// layer in order on the calling thread, with the layer's weights on the
    /// device, and returns the final state.
    ///
    /// The layer function launches its work on `stream`; the pass waits for
    /// that work to finish before it returns. An error from the layer function
    /// ends the pass with [`Error::LayerFn`]; a read or CUDA error ends it with
    /// that error; a panic in the layer function resumes on the caller after
    /// every stage thread has stopped. In each case the streamer stays usable.
    pub fn run_pass<S, F>(&mut self, state: S, mut layer_fn: F) -> Result<S>
    where
        F: FnMut(S, &LayerWeights<'_>, usize, &ComputeStream) -> Result<S>,
    {
        let n_cpu = self.res.cpu_slots.len();
        let n_pinned = self.res.pinned_slots.len();
        self.rings.reset(n_cpu, n_pinned, self.n_gpu_slots);
        for ev in &self.res.events {
            ev.transferred.store(false, Ordering::Relaxed);
        }
        for m in &self.res.gpu_slots {
            m.set_in_use(false);
        }
        let cfg = &self.cfg;
        let res = &self.res;
        let compute = &self.compute;
        let layers = res.model.num_layers();
        let pinned_hits = count_filled(&res.pinned_filled);
        let gpu_hits = count_filled(&res.gpu_filled);
        let ctx = PassCtx::new(res, cfg.read_chunk);
        let r = &mut self.rings;
        let (cpu_free_p, cpu_free_c) = r.cpu_free.split();
        let (cpu_full_p, cpu_full_c) = r.cpu_full.split();
        let (pin_free_p, pin_free_c) = r.pin_free.split();
        let (pin_full_p, pin_full_c) = r.pin_full.split();
        let (gpu_free_p, gpu_free_c) = r.gpu_free.split();
        let (gpu_full_p, gpu_full_c) = r.gpu_full.split();
        // Wire the rings for the stages this configuration runs (DESIGN.md,
        // "The data path"); ends a configuration does not use are dropped.
        let w = match (n_cpu > 0, n_pinned > 0) {
            (true, true) => Wiring {
                reader: Some((cpu_free_c, cpu_full_p, false, cfg.batch_cpu)),
                pin: Some((cpu_full_c, cpu_free_p, pin_free_c, pin_full_p)),
                h2d: H2dInput {
                    full: Some(pin_full_c),
                    pin_free: Some(pin_free_p),
                    cpu_free: None,
                },
            },
            (true, false) => Wiring {
                reader: Some((cpu_free_c, cpu_full_p, false, cfg.batch_cpu)),
                pin: None,
                h2d: H2dInput {
                    full: Some(cpu_full_c),
                    pin_free: None,
                    cpu_free: Some(cpu_free_p),
                },
            },
            (false, true) => Wiring {
                reader: Some((pin_free_c, pin_full_p, true, cfg.batch_cpu_pinned)),
                pin: None,
                h2d: H2dInput {
                    full: Some(pin_full_c),
                    pin_free: Some(pin_free_p),
                    cpu_free: None,
                },
            },
            (false, false) => Wiring {
                reader: None,
                pin: None,
                h2d: H2dInput {
                    full: None,
                    pin_free: None,
                    cpu_free: None,
                },
            },
        };
        let readers = w.reader.map(|(free, out, pinned, batch)| {
            (
                Mutex::new(Claim::new(free, pinned)),
                Mutex::new(InFlight::new(out, layers, batch)),
            )
        });
        let progress = cfg.progress.then(|| progress_bar(layers, self.passes + 1));
        let affinity = cfg.cpu_affinity.as_deref();

        let t0 = Instant::now();
        let (outcome, read_stats, pin_stats, h2d) = std::thread::scope(|s| {
            let ctx = &ctx;
            let mut reader_handles = Vec::with_capacity(cfg.reader_threads);
            if let Some((claim, inflight)) = &readers {
                for t in 0..cfg.reader_threads {
                    let h = std::thread::Builder::new()
                        .name(format!("ls-read-{t}"))
                        .spawn_scoped(s, move || {
                            stages::pin_thread(affinity, 2 + t);
                            readers::reader(ctx, claim, inflight)
                        });
                    match h {
                        Ok(h) => reader_handles.push(h),
                        Err(e) => ctx.fail(spawn_error("reader", e)),
                    }
                }
            }
            let pin_handle = w.pin.and_then(|(input, cpu_free, pin_free, out)| {
                std::thread::Builder::new()
                    .name("ls-pin".into())
                    .spawn_scoped(s, move || {
                        stages::pin_thread(affinity, 1);
                        stages::pin_stage(ctx, input, cpu_free, pin_free, out, cfg.batch_cpu_pinned)
                    })
                    .map_err(|e| ctx.fail(spawn_error("pin", e)))
                    .ok()
            });
            let h2d_input = w.h2d;
            let h2d_handle = std::thread::Builder::new()
                .name("ls-h2d".into())
                .spawn_scoped(s, move || {
                    stages::pin_thread(affinity, 0);
                    stages::h2d_stage(ctx, h2d_input, gpu_free_c, gpu_full_p, cfg.batch_gpu)
                })
                .map_err(|e| ctx.fail(spawn_error("transfer", e)))
                .ok();
            let outcome = catch_unwind(AssertUnwindSafe(|| {
                consume::consume(
                    ctx,
                    compute,
                    gpu_full_c,
                    gpu_free_p,
                    state,
                    &mut layer_fn,
                    progress.as_ref(),
                )
            }));
            if !matches!(outcome, Ok(Ok(_))) {
                ctx.stop();
            }
            let mut read_stats = StageStats::default();
            let n_readers = reader_handles.len().max(1) as u32;
            for h in reader_handles {
                match h.join() {
                    Ok(st) => {
                        read_stats.bytes += st.bytes;
                        read_stats.busy += st.busy / n_readers;
                        read_stats.stalled += st.stalled / n_readers;
                        read_stats.items += st.items;
                    }
                    Err(_) => ctx.fail(Error::Pipeline("a reader thread panicked".into())),
                }
            }
            let pin_stats = match pin_handle.map(|h| h.join()) {
                Some(Ok(st)) => st,
                Some(Err(_)) => {
                    ctx.fail(Error::Pipeline("the pin thread panicked".into()));
                    StageStats::default()
                }
                None => StageStats::default(),
            };
            let h2d = match h2d_handle.map(|h| h.join()) {
                Some(Ok(st)) => st,
                Some(Err(_)) => {
                    ctx.fail(Error::Pipeline("the transfer thread panicked".into()));
                    Default::default()
                }
                None => Default::default(),
            };
            (outcome, read_stats, pin_stats, h2d)
        });
        // Every copy and every layer's work must be done before the slots are
        // touched again, whatever happened.
        let synced = compute.inner.synchronize().and(res.transfer.synchronize());
        let wall = t0.elapsed();
        if let Some(pb) = &progress {
            pb.finish_and_clear();
        }
        let (state, consumer_stall) = match outcome {
            Err(panic) => resume_unwind(panic),
            Ok(result) => match (ctx.take_error(), result) {
                (Some(e), _) => return Err(e),
                (None, Err(e)) => return Err(e),
                (None, Ok(done)) => done,
            },
        };
        synced?;
        self.passes += 1;
        let mut st = PassStats {
            pass: self.passes,
            wall,
            layers,
            layer_bytes: res.model.total_layer_bytes(),
            read: read_stats,
            pin: pin_stats,
            pinned_cache_hits: pinned_hits,
            gpu_cache_hits: gpu_hits,
            ..Default::default()
        };
        if st.read.bytes == 0 {
            st.read = h2d.read;
        }
        if st.pin.bytes == 0 {
            st.pin = h2d.pin;
        }
        st.h2d.bytes = h2d.bytes;
        st.h2d.items = h2d.items;
        st.h2d.stalled = h2d.stalled;
        for ev in &res.events {
            if ev.transferred.load(Ordering::Relaxed) {
                st.h2d.busy += crate::pipeline::EventH::elapsed(&ev.h2d_start, &ev.h2d_end)?;
            }
            st.compute.busy +=
                crate::pipeline::EventH::elapsed(&ev.compute_start, &ev.compute_end)?;
        }
        st.compute.items = layers;
        st.compute.bytes = st.layer_bytes;
        st.compute.stalled = consumer_stall;
        self.stats = st;
        Ok(state)
    }
}

impl Drop for LayerStreamer {
    fn drop(&mut self) {
        // Nothing may still be copying into or reading from memory that is
        // about to be freed.
        let _ = self.compute.inner.synchronize();
        let _ = self.res.transfer.synchronize();
    }
}

type ReaderWiring<'a> = (
    Consumer<'a, u32>,
    Producer<'a, crate::pipeline::resources::Job>,
    bool,
    usize,
);
type PinWiring<'a> = (
    Consumer<'a, crate::pipeline::resources::Job>,
    Producer<'a, u32>,
    Consumer<'a, u32>,
    Producer<'a, crate::pipeline::resources::Job>,
);

/// Which ring ends each stage gets in one pass.
struct Wiring<'a> {
    reader: Option<ReaderWiring<'a>>,
    pin: Option<PinWiring<'a>>,
    h2d: H2dInput<'a>,
}

fn spawn_error(stage: &str, e: std::io::Error) -> Error {
    Error::Pipeline(format!("cannot start the {stage} thread: {e}"))
}

fn count_filled(flags: &[std::sync::atomic::AtomicBool]) -> usize {
    flags.iter().filter(|f| f.load(Ordering::Acquire)).count()
}

fn progress_bar(layers: usize, pass: u64) -> indicatif::ProgressBar {
    let pb = indicatif::ProgressBar::new(layers as u64);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "pass {msg} [{bar:40}] {pos}/{len} layers {elapsed_precise}",
    ) {
        pb.set_style(style.progress_chars("=> "));
    }
    pb.set_message(pass.to_string());
    pb
}
