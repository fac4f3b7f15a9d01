//! [`LayerStreamer`]: builds the pipeline once, then runs passes over the
//! model's layers, calling the caller's layer function for each layer with
//! its weights already on the device.

use crate::checkpoint::ModelIndex;
use crate::io::OpenMode;
use crate::kernels::Kernels;
use crate::pipeline::alloc;
use crate::pipeline::pass::Pipeline;
use crate::pipeline::placement::{self, AfterBuild, Room};
use crate::pipeline::plan::{Home, LayerPlan, LayerWeights};
use crate::pipeline::split::RowSplit;
use crate::pipeline::split_auto;
use crate::pipeline::{AutoShare, Backend, Budget, CpuShare, Device, PassStats, StreamerConfig};
use crate::quant::device::DequantKernels;
use crate::{cuda, DType, Error, Result};

mod tensor;

pub use crate::pipeline::compute::ComputeStream;
pub use crate::pipeline::placement::MemoryUse;
pub use tensor::DeviceTensor;

/// Builds a [`LayerStreamer`]. Every setter has the default of
/// [`StreamerConfig::default`].
pub struct LayerStreamerBuilder<'m> {
    model: &'m ModelIndex,
    cfg: StreamerConfig,
    reserve: u64,
    split_only: Option<Vec<String>>,
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
        /// Share of each 2-D layer weight's rows the CPU computes.
        cpu_share: CpuShare;
    }

    /// Bytes the caller will allocate on the device after build (KV cache,
    /// workspaces; RAM on the host backend) that `Budget::Auto` caches must
    /// leave free. The model's static tensors are counted already. Default 0.
    pub fn reserve(mut self, bytes: u64) -> Self {
        self.reserve = bytes;
        self
    }

    /// With a CPU share, splits only the 2-D weights whose key ends with one
    /// of `suffixes` (the others stream whole); by default every 2-D weight
    /// is split. A layer function meets the CPU once per group of split
    /// weights it multiplies, so fewer groups mean fewer meetings:
    /// [`LlamaModel::SPLIT_WEIGHTS`](crate::llm::LlamaModel::SPLIT_WEIGHTS)
    /// names the MLP's three, most of a layer's bytes.
    pub fn split_only(mut self, suffixes: &[&str]) -> Self {
        self.split_only = Some(suffixes.iter().map(|s| s.to_string()).collect());
        self
    }

    /// Allocates every slot, cache and stream, opens every file, and starts
    /// the stage threads.
    pub fn build(self) -> Result<LayerStreamer> {
        LayerStreamer::build(
            self.model,
            self.cfg,
            self.reserve,
            self.split_only.as_deref(),
        )
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
    pub(crate) pipeline: Pipeline,
    compute: ComputeStream,
    cfg: StreamerConfig,
    stats: PassStats,
    memory: MemoryUse,
    /// What `cpu_share auto` measured and picked.
    auto: Option<AutoShare>,
}

impl LayerStreamer {
    /// A builder for a streamer over `model`.
    pub fn builder(model: &ModelIndex) -> LayerStreamerBuilder<'_> {
        LayerStreamerBuilder {
            model,
            cfg: StreamerConfig::default(),
            reserve: 0,
            split_only: None,
        }
    }

    fn build(
        model: &ModelIndex,
        cfg: StreamerConfig,
        reserve: u64,
        split_only: Option<&[String]>,
    ) -> Result<LayerStreamer> {
        cfg.validate()?;
        if model.num_layers() == 0 {
            return Err(Error::model(
                model.dir(),
                "the model has no layers to stream",
            ));
        }
        let plan = |m: &ModelIndex| -> Result<Vec<LayerPlan>> {
            m.layers()
                .iter()
                .map(|l| LayerPlan::new(m, l, cfg.dtype, cfg.dequant.keeps_blocks()))
                .collect()
        };
        let whole = plan(model)?;
        let backend = backend(model, &cfg, &whole)?;
        let after = AfterBuild {
            statics: statics_bytes(model, cfg.dtype),
            reserve,
        };
        let mut room = Room::measure(&backend)?;
        let (split, resident, auto) = split_rows(
            model,
            (&cfg, split_only),
            &backend,
            &room,
            after,
            whole.clone(),
        )?;
        let (mut split, device_model) = split.unzip();
        let (model, mut plans) = match &device_model {
            Some(device_model) => (device_model, plan(device_model)?),
            None => (model, whole),
        };
        if let Some(s) = &split {
            // The CPU's rows live in the page cache: `auto` caches leave
            // them their room.
            room.ram = room.ram.map(|r| r.saturating_sub(s.pass_bytes()));
        }
        placement::place_layers(&room, &cfg, after, &mut plans, resident.as_deref());
        if let Some(s) = &mut split {
            s.pin(&backend)?;
        }
        let (mut res, memory) = alloc::allocate(backend, model, &cfg, plans)?;
        res.split = split;
        let compute = ComputeStream {
            inner: res.backend.compute_stream()?,
        };
        Ok(LayerStreamer {
            pipeline: Pipeline::start(res, &cfg)?,
            compute,
            cfg,
            stats: PassStats::default(),
            memory,
            auto,
        })
    }

    /// The model being streamed, as it is on disk (with a row split, the
    /// layer functions' device views hold fewer rows than its tensors).
    pub fn model(&self) -> &ModelIndex {
        let res = self.pipeline.res();
        res.split.as_ref().map_or(&res.model, |s| &s.full)
    }

    /// The layers as the pipeline streams them: with a row split, the
    /// device's rows of each tensor.
    pub(crate) fn device_layers(&self) -> &[crate::checkpoint::Layer] {
        self.pipeline.res().model.layers()
    }

    /// The CPU rows of every split tensor of `layer` (none without a split,
    /// or for a layer the GPU cache keeps whole).
    pub(crate) fn host_rows_of(&self, layer: usize) -> Vec<crate::HostRows<'_>> {
        let Some(split) = self.pipeline.res().split.as_ref() else {
            return Vec::new();
        };
        split
            .keys(layer)
            .filter_map(|k| split.rows(layer, k))
            .collect()
    }

    /// Where a row split's CPU rows are, in a line: page-locked memory (and
    /// how much), or the file pages and why, with what `cpu_share auto`
    /// measured and picked; `None` without a split, unless auto measured
    /// and split nothing.
    pub fn split_rows_note(&self) -> Option<String> {
        let Some(split) = self.pipeline.res().split.as_ref() else {
            return self.auto.map(|a| format!("no CPU rows; {a}"));
        };
        let gb = split.pass_bytes() as f64 / 1e9;
        let rows = match &split.pin_error {
            None => format!("CPU rows: {gb:.2} GB in page-locked memory"),
            Some(e) => {
                format!("CPU rows: {gb:.2} GB read from the file pages (page-locking failed: {e})")
            }
        };
        Some(match &self.auto {
            Some(a) => format!("{rows}; {a}"),
            None => rows,
        })
    }

    /// The share of each split weight's rows the CPU computes: 0 when whole
    /// layers stream.
    pub fn cpu_share(&self) -> f64 {
        self.pipeline.res().split.as_ref().map_or(0.0, |s| s.share)
    }

    /// What `cpu_share auto` measured when the streamer was built and the
    /// share it picked, 0 included (the meetings of the sides cost more than
    /// the CPU rows would save); `None` for a fixed share, and where auto
    /// measures nothing (the host backend, where the device is the CPU
    /// already, or every layer resident).
    pub fn auto_share(&self) -> Option<AutoShare> {
        self.auto
    }

    /// The configuration the streamer was built with.
    pub fn config(&self) -> &StreamerConfig {
        &self.cfg
    }

    /// What the streamer allocated.
    pub fn memory(&self) -> &MemoryUse {
        &self.memory
    }

    /// The layers the GPU cache keeps resident, in order: spread over the
    /// model, so that the layers that stream sit evenly between them.
    pub fn resident_layers(&self) -> Vec<usize> {
        let plans = self.pipeline.res().plans.iter().enumerate();
        let resident = plans.filter(|(_, p)| matches!(p.home, Home::Gpu(_)));
        resident.map(|(i, _)| i).collect()
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
        match &self.pipeline.res().backend {
            Backend::Cuda { ctx, .. } => Some(ctx),
            Backend::Host => None,
        }
    }

    /// Whether this streamer runs on the host backend.
    pub fn is_host(&self) -> bool {
        self.pipeline.res().backend.is_host()
    }

    /// Reads a non-layer tensor (embedding, final norm, lm_head, ...) and
    /// keeps it on the device, cast to the compute dtype when it is a float.
    pub fn load_static(&self, name: &str) -> Result<DeviceTensor> {
        tensor::load_static(
            self.pipeline.res(),
            &self.compute.inner,
            self.cfg.dtype,
            name,
        )
    }

    /// Runs one pass: calls `layer_fn(state, weights, layer, stream)` for every
    /// layer in order on the calling thread, with the layer's weights on the
    /// device, and returns the final state.
    ///
    /// The layer function launches its work on `stream`; the pass waits for
    /// that work to finish before it returns. A layer's device slot is reused
    /// once that work is done; work queued on another stream must be
    /// announced with [`LayerWeights::release_after`]. On CUDA the streamer's
    /// context is current on the calling thread while the layer function runs.
    ///
    /// An error from the layer function ends the pass with
    /// [`Error::LayerFn`]; a read or CUDA error ends it with that error; a
    /// panic in the layer function resumes on the caller after every stage
    /// thread has finished its part of the pass, and a panic in a stage
    /// thread ends the pass with [`Error::Pipeline`]. In each case the
    /// streamer stays usable: the stage threads live as long as the
    /// streamer, parked between passes.
    pub fn run_pass<S, F>(&mut self, state: S, mut layer_fn: F) -> Result<S>
    where
        F: FnMut(S, &LayerWeights<'_>, usize, &ComputeStream) -> Result<S>,
    {
        let layers = self.model().num_layers();
        let next = self.stats.pass + 1;
        let progress = self.cfg.progress.then(|| progress_bar(layers, next));
        let out = self
            .pipeline
            .run(&self.compute, state, &mut layer_fn, progress.as_ref());
        if let Some(pb) = &progress {
            pb.finish_and_clear();
        }
        let (state, stats) = out?;
        self.stats = stats;
        Ok(state)
    }
}

impl Drop for LayerStreamer {
    fn drop(&mut self) {
        // Nothing may still be copying into or reading from memory that is
        // about to be freed.
        let _ = self.compute.inner.synchronize();
        let _ = self.pipeline.res().synchronize_transfers();
        let _ = self.pipeline.wait_held();
    }
}

/// The backend `cfg` asks for, with the cast kernels when the model needs them.
/// The row split of a streamer built with a CPU share, and the layers the
/// GPU cache keeps: those it would keep of the whole layers, which stay
/// whole (the device computes a resident layer faster than the CPU could
/// compute any of its rows); every other layer is split at the share. And
/// what `cpu_share auto` measured, where it did.
#[allow(clippy::type_complexity)]
fn split_rows(
    model: &ModelIndex,
    (cfg, split_only): (&StreamerConfig, Option<&[String]>),
    backend: &Backend,
    room: &Room,
    after: AfterBuild,
    mut whole: Vec<LayerPlan>,
) -> Result<(
    Option<(RowSplit, ModelIndex)>,
    Option<Vec<bool>>,
    Option<AutoShare>,
)> {
    if cfg.cpu_share == CpuShare::Off {
        return Ok((None, None, None));
    }
    placement::place_layers(room, cfg, after, &mut whole, None);
    let resident: Vec<bool> = whole
        .iter()
        .map(|p| matches!(p.home, Home::Gpu(_)))
        .collect();
    let (share, auto) = match cfg.cpu_share {
        CpuShare::Fixed(share) => (share, None),
        _ => match split_auto::auto_share(model, (cfg, split_only), backend, &resident)? {
            Some(a) => (a.share, Some(a)),
            None => (0.0, None),
        },
    };
    if share == 0.0 {
        return Ok((None, None, auto));
    }
    let shares: Vec<f64> = resident
        .iter()
        .map(|&r| if r { 0.0 } else { share })
        .collect();
    let (split, index) = RowSplit::new(model, &shares, split_only)?;
    Ok((Some((split, index)), Some(resident), auto))
}

fn backend(model: &ModelIndex, cfg: &StreamerConfig, plans: &[LayerPlan]) -> Result<Backend> {
    // Plain casts into bf16 use the cast kernels; dequantizations, and plain
    // casts into f16, the dequantization kernels (see `dequant_source`).
    let casts = || plans.iter().flat_map(|p| &p.casts);
    let static_cast = |t: &&crate::checkpoint::TensorInfo| {
        cfg.dtype
            .is_some_and(|d| d != t.dtype && t.dtype.is_castable_float())
    };
    let f16 = cfg.dtype == Some(DType::F16);
    let needs_casts = casts().any(|c| c.quant.is_none() && c.fp8.is_none())
        || (!f16 && model.statics().iter().any(|t| static_cast(&t)));
    let needs_dequant = cfg.dtype.is_some()
        && (casts().any(|c| c.quant.is_some() || c.fp8.is_some())
            || model.statics().iter().any(|t| t.quant.is_some())
            || (f16 && model.statics().iter().any(|t| static_cast(&t))));
    Ok(match cfg.device {
        Device::Host => Backend::Host,
        Device::Cuda(ordinal) => {
            if needs_casts && cfg.dtype != Some(DType::BF16) {
                return Err(Error::config(format!(
                    "the device casts f16/f32 weights to bf16 (and any float to f16) only; \
                     compute dtype {} needs the model's tensors in that dtype",
                    cfg.dtype.map(|d| d.to_string()).unwrap_or_default()
                )));
            }
            let ctx = cuda::Context::new(ordinal)?;
            let kernels = if needs_casts {
                Some(Kernels::load(&ctx)?)
            } else {
                None
            };
            let dequant = if needs_dequant {
                Some(Box::new(DequantKernels::load(&ctx)?))
            } else {
                None
            };
            Backend::Cuda {
                ctx,
                kernels,
                dequant,
            }
        }
    })
}

/// Device bytes of the model's static tensors once loaded (after casts).
fn statics_bytes(model: &ModelIndex, dtype: Option<DType>) -> u64 {
    model
        .statics()
        .iter()
        .map(|t| match dtype {
            Some(d) if t.quant.is_some() => {
                t.shape.iter().product::<usize>() as u64 * d.size() as u64
            }
            Some(d) if d != t.dtype && t.dtype.is_castable_float() => {
                t.shape.iter().product::<usize>() as u64 * d.size() as u64
            }
            _ => t.len,
        })
        .map(placement::page_round)
        .sum()
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

#[cfg(test)]
mod tests {
    /// The Python binding and servers share a streamer across threads
    /// (`&LayerStreamer` in a thread that released the GIL): it must stay
    /// `Send + Sync`.
    #[test]
    fn streamer_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<super::LayerStreamer>();
    }
}
