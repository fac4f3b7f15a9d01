//! Build-time placement of layers (streamed, pinned cache, device cache) and
//! the allocation of every slot, cache, stream and event, with the limits
//! checked first so that a configuration that cannot fit says so.

use crate::host_memory::{mem_available, memlock_limit};
use std::sync::atomic::AtomicBool;

use crate::checkpoint::ModelIndex;
use crate::io::{AlignedBuf, DirectFile};
use crate::pipeline::plan::{Home, LayerPlan};
use crate::pipeline::resources::{LayerEvents, Resources, SlotPtr};
use crate::pipeline::{Backend, Budget, StreamerConfig};
use crate::{Error, Result};

/// What a streamer allocated, in bytes and layers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MemoryUse {
    /// Size of one device slot.
    pub gpu_slot_size: u64,
    /// Device slots.
    pub gpu_slots: usize,
    /// Bytes of device cache.
    pub gpu_cache_bytes: u64,
    /// Layers resident on the device.
    pub gpu_cache_layers: usize,
    /// Size of one host slot (CPU or pinned).
    pub host_slot_size: u64,
    /// Unpinned CPU slots.
    pub cpu_slots: usize,
    /// Pinned slots (including the transfer thread's staging buffer).
    pub pinned_slots: usize,
    /// Bytes of pinned cache.
    pub pinned_cache_bytes: u64,
    /// Layers kept in the pinned cache.
    pub pinned_cache_layers: usize,
}

impl MemoryUse {
    /// Device bytes in all.
    pub fn device_bytes(&self) -> u64 {
        self.gpu_slot_size * self.gpu_slots as u64 + self.gpu_cache_bytes
    }

    /// Pinned host bytes in all.
    pub fn pinned_bytes(&self) -> u64 {
        self.host_slot_size * self.pinned_slots as u64 + self.pinned_cache_bytes
    }
}

const GIB: u64 = 1 << 30;

fn page_round(n: u64) -> u64 {
    n.div_ceil(4096) * 4096
}

/// Sizes of the slots every layer passing through them needs.
struct SlotSizes {
    host: u64,
    device: u64,
}

fn slot_sizes(plans: &[LayerPlan]) -> SlotSizes {
    SlotSizes {
        host: page_round(
            plans
                .iter()
                .filter(|p| !matches!(p.home, Home::Pinned(_)))
                .map(|p| p.copy_bytes)
                .max()
                .unwrap_or(0)
                .max(4096),
        ),
        device: page_round(
            plans
                .iter()
                .filter(|p| !matches!(p.home, Home::Gpu(_)))
                .map(|p| p.device_bytes)
                .max()
                .unwrap_or(0)
                .max(4096),
        ),
    }
}

fn host_slot_count(cfg: &StreamerConfig) -> u64 {
    (cfg.n_cpu_pinned.max(1) + cfg.n_cpu) as u64
}

/// Decides which layers the caches keep, within their budgets.
pub(crate) fn place_layers(
    backend: &Backend,
    cfg: &StreamerConfig,
    plans: &mut [LayerPlan],
) -> Result<()> {
    let all = slot_sizes(plans);
    let n_dev_slots = (cfg.n_gpu + 1) as u64;
    let total_dev: u64 = plans.iter().map(|p| page_round(p.device_bytes)).sum();
    let gpu_budget = match cfg.gpu_cache {
        Budget::None => 0,
        Budget::Bytes(b) => b,
        Budget::Auto => {
            let free = match backend {
                Backend::Cuda { ctx, .. } => {
                    let (free, total) = ctx.mem_info()?;
                    free.saturating_sub(GIB.max(total / 20))
                }
                Backend::Host => mem_available().unwrap_or(0) / 4,
            };
            if total_dev <= free {
                total_dev
            } else {
                free.saturating_sub(n_dev_slots * all.device)
            }
        }
    };
    let mut used = 0;
    let mut g = 0;
    for p in plans.iter_mut() {
        let need = page_round(p.device_bytes);
        if used + need <= gpu_budget {
            used += need;
            p.home = Home::Gpu(g);
            g += 1;
        }
    }
    let pinned_budget = match cfg.pinned_cache {
        Budget::None => 0,
        Budget::Bytes(b) => b,
        Budget::Auto => {
            let ram = mem_available().unwrap_or(0) / 10 * 6;
            let limit = match backend {
                Backend::Cuda { .. } => memlock_limit().map_or(ram, |l| l.min(ram)),
                Backend::Host => ram,
            };
            limit.saturating_sub(host_slot_count(cfg) * all.host)
        }
    };
    let mut used = 0;
    let mut c = 0;
    for p in plans.iter_mut().filter(|p| p.home == Home::Stream) {
        let need = page_round(p.copy_bytes);
        if used + need <= pinned_budget {
            used += need;
            p.home = Home::Pinned(c);
            c += 1;
        }
    }
    Ok(())
}

fn limit(what: &str, asked: u64, available: u64, hint: &str) -> Error {
    Error::Limit {
        what: what.into(),
        asked,
        available,
        hint: hint.into(),
    }
}

/// Opens the files and allocates everything a pass needs.
pub(crate) fn allocate(
    backend: Backend,
    model: &ModelIndex,
    cfg: &StreamerConfig,
    plans: Vec<LayerPlan>,
) -> Result<(Resources, MemoryUse)> {
    let sizes = slot_sizes(&plans);
    let streams_any = plans.iter().any(|p| !matches!(p.home, Home::Gpu(_)));
    let n_gpu_slots = if streams_any { cfg.n_gpu + 1 } else { 0 };
    let n_pinned = cfg.n_cpu_pinned;
    let staging = n_pinned == 0;
    let cache_sizes: Vec<u64> = plans
        .iter()
        .filter(|p| matches!(p.home, Home::Pinned(_)))
        .map(|p| page_round(p.copy_bytes))
        .collect();
    let gpu_cache_sizes: Vec<u64> = plans
        .iter()
        .filter(|p| matches!(p.home, Home::Gpu(_)))
        .map(|p| page_round(p.device_bytes))
        .collect();
    let mem = MemoryUse {
        gpu_slot_size: sizes.device,
        gpu_slots: n_gpu_slots,
        gpu_cache_bytes: gpu_cache_sizes.iter().sum(),
        gpu_cache_layers: gpu_cache_sizes.len(),
        host_slot_size: sizes.host,
        cpu_slots: cfg.n_cpu,
        pinned_slots: n_pinned + usize::from(staging),
        pinned_cache_bytes: cache_sizes.iter().sum(),
        pinned_cache_layers: cache_sizes.len(),
    };
    check_limits(&backend, &mem)?;

    let files = model
        .files()
        .iter()
        .map(|f| DirectFile::open(&f.path, cfg.io_mode))
        .collect::<Result<Vec<_>>>()?;
    let mut cpu_slots = (0..cfg.n_cpu)
        .map(|_| AlignedBuf::new(sizes.host as usize))
        .collect::<Result<Vec<_>>>()?;
    let cpu_ptrs = cpu_slots
        .iter_mut()
        .map(|b| SlotPtr(b.as_mut_ptr()))
        .collect();
    let pinned_slots = (0..n_pinned)
        .map(|_| backend.pinned(sizes.host as usize))
        .collect::<Result<Vec<_>>>()?;
    let pinned_ptrs = pinned_slots
        .iter()
        .map(|b| SlotPtr(b.ptr() as *mut u8))
        .collect();
    let pinned_done = (0..n_pinned)
        .map(|_| backend.event(false))
        .collect::<Result<Vec<_>>>()?;
    let staging = if staging {
        let b = backend.pinned(sizes.host as usize)?;
        let p = SlotPtr(b.ptr() as *mut u8);
        Some((b, p, backend.event(false)?))
    } else {
        None
    };
    let pinned_cache = cache_sizes
        .iter()
        .map(|&n| backend.pinned(n as usize))
        .collect::<Result<Vec<_>>>()?;
    let pinned_cache_ptrs = pinned_cache
        .iter()
        .map(|b| SlotPtr(b.ptr() as *mut u8))
        .collect();
    let gpu_slots = (0..n_gpu_slots)
        .map(|i| backend.alloc(sizes.device as usize, format!("device slot {i}")))
        .collect::<Result<Vec<_>>>()?;
    let gpu_layers: Vec<usize> = plans
        .iter()
        .enumerate()
        .filter(|(_, p)| matches!(p.home, Home::Gpu(_)))
        .map(|(i, _)| i)
        .collect();
    let gpu_cache = gpu_cache_sizes
        .iter()
        .zip(&gpu_layers)
        .map(|(&n, l)| backend.alloc(n as usize, format!("device cache buffer of layer {l}")))
        .collect::<Result<Vec<_>>>()?;
    let events = (0..plans.len())
        .map(|_| {
            Ok(LayerEvents {
                h2d_start: backend.event(true)?,
                h2d_end: backend.event(true)?,
                compute_start: backend.event(true)?,
                compute_end: backend.event(true)?,
                transferred: AtomicBool::new(false),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let transfer = backend.stream("h2d")?;
    let res = Resources {
        model: model.clone(),
        files,
        cpu_slots,
        cpu_ptrs,
        pinned_slots,
        pinned_ptrs,
        pinned_done,
        staging,
        pinned_filled: (0..pinned_cache.len())
            .map(|_| AtomicBool::new(false))
            .collect(),
        _pinned_cache: pinned_cache,
        pinned_cache_ptrs,
        gpu_filled: (0..gpu_cache.len())
            .map(|_| AtomicBool::new(false))
            .collect(),
        gpu_slots,
        gpu_cache,
        events,
        transfer,
        plans,
        backend,
    };
    Ok((res, mem))
}

fn check_limits(backend: &Backend, mem: &MemoryUse) -> Result<()> {
    let host = mem.host_slot_size * mem.cpu_slots as u64 + mem.pinned_bytes();
    if let Some(avail) = mem_available() {
        if host > avail {
            return Err(limit(
                "host memory (MemAvailable) for slots and the pinned cache",
                host,
                avail,
                "use fewer slots or a smaller pinned cache budget",
            ));
        }
    }
    if let Backend::Cuda { ctx, .. } = backend {
        if let Some(lim) = memlock_limit() {
            if mem.pinned_bytes() > lim {
                return Err(limit(
                    "pinned memory (RLIMIT_MEMLOCK)",
                    mem.pinned_bytes(),
                    lim,
                    "raise it with `ulimit -l` or /etc/security/limits.conf, or shrink the pinned cache",
                ));
            }
        }
        let (free, _) = ctx.mem_info()?;
        if mem.device_bytes() > free {
            return Err(limit(
                "GPU memory for layer slots and the device cache",
                mem.device_bytes(),
                free,
                "use a smaller n_gpu or GPU cache budget",
            ));
        }
    }
    Ok(())
}
