//! The allocation of every slot, cache, stream and event, once, at build
//! time, after [`placement`](super::placement) has decided where each layer
//! lives and checked that it all fits.

use std::sync::atomic::AtomicBool;

use super::backend::Backend;
use super::placement::{check_limits, page_round, slot_sizes, MemoryUse};
use super::plan::{Home, LayerPlan};
use super::resources::{
    CpuSlot, DeviceCacheEntry, LayerEvents, PinnedCacheEntry, PinnedSlot, Resources, SlotPtr,
};
use super::StreamerConfig;
use crate::checkpoint::ModelIndex;
use crate::io::{AlignedBuf, DirectFile};
use crate::Result;

/// What `plans` need: slot counts and sizes, cache sizes.
fn memory_use(cfg: &StreamerConfig, plans: &[LayerPlan]) -> MemoryUse {
    let sizes = slot_sizes(plans);
    let streams_any = plans.iter().any(|p| !matches!(p.home, Home::Gpu(_)));
    let cached = |gpu: bool| {
        plans.iter().filter_map(move |p| match p.home {
            Home::Gpu(_) if gpu => Some(page_round(p.device_bytes)),
            Home::Pinned(_) if !gpu => Some(page_round(p.copy_bytes)),
            _ => None,
        })
    };
    MemoryUse {
        gpu_slot_size: sizes.device,
        gpu_slots: if streams_any { cfg.n_gpu + 1 } else { 0 },
        gpu_cache_bytes: cached(true).sum(),
        gpu_cache_layers: cached(true).count(),
        host_slot_size: sizes.host,
        cpu_slots: cfg.n_cpu,
        pinned_slots: cfg.n_cpu_pinned + usize::from(cfg.n_cpu_pinned == 0),
        pinned_cache_bytes: cached(false).sum(),
        pinned_cache_layers: cached(false).count(),
    }
}

fn pinned_slot(backend: &Backend, bytes: u64) -> Result<PinnedSlot> {
    let buf = backend.pinned(bytes as usize)?;
    Ok(PinnedSlot {
        ptr: SlotPtr(buf.ptr() as *mut u8),
        buf,
        done: backend.event(false)?,
    })
}

fn layer_events(backend: &Backend) -> Result<LayerEvents> {
    Ok(LayerEvents {
        h2d_start: backend.event(true)?,
        copied: backend.event(true)?,
        h2d_end: backend.event(true)?,
        compute_start: backend.event(true)?,
        compute_end: backend.event(true)?,
        release: backend.event(false)?,
        transferred: AtomicBool::new(false),
        converted: AtomicBool::new(false),
        held: AtomicBool::new(false),
    })
}

/// The host side: CPU slots, pinned slots (or the staging buffer), pinned cache.
fn host_side(
    backend: &Backend,
    cfg: &StreamerConfig,
    mem: &MemoryUse,
) -> Result<(Vec<CpuSlot>, Vec<PinnedSlot>, Option<PinnedSlot>)> {
    let cpu = (0..cfg.n_cpu)
        .map(|_| {
            let mut buf = AlignedBuf::new(mem.host_slot_size as usize)?;
            Ok(CpuSlot {
                ptr: SlotPtr(buf.as_mut_ptr()),
                _buf: buf,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let pinned = (0..cfg.n_cpu_pinned)
        .map(|_| pinned_slot(backend, mem.host_slot_size))
        .collect::<Result<Vec<_>>>()?;
    let staging = if cfg.n_cpu_pinned == 0 {
        Some(pinned_slot(backend, mem.host_slot_size)?)
    } else {
        None
    };
    Ok((cpu, pinned, staging))
}

/// The caches: one buffer per cached layer, in layer order.
fn caches(
    backend: &Backend,
    plans: &[LayerPlan],
) -> Result<(Vec<PinnedCacheEntry>, Vec<DeviceCacheEntry>)> {
    let mut pinned = Vec::new();
    let mut device = Vec::new();
    for (l, p) in plans.iter().enumerate() {
        match p.home {
            Home::Pinned(_) => {
                let buf = backend.pinned(page_round(p.copy_bytes) as usize)?;
                pinned.push(PinnedCacheEntry {
                    ptr: SlotPtr(buf.ptr() as *mut u8),
                    _buf: buf,
                    filled: AtomicBool::new(false),
                });
            }
            Home::Gpu(_) => {
                let name = format!("device cache buffer of layer {l}");
                device.push(DeviceCacheEntry {
                    mem: backend.alloc(page_round(p.device_bytes) as usize, name)?,
                    filled: AtomicBool::new(false),
                });
            }
            Home::Stream => {}
        }
    }
    Ok((pinned, device))
}

/// Opens the files and allocates everything a pass needs.
pub(crate) fn allocate(
    backend: Backend,
    model: &ModelIndex,
    cfg: &StreamerConfig,
    plans: Vec<LayerPlan>,
) -> Result<(Resources, MemoryUse)> {
    let mem = memory_use(cfg, &plans);
    check_limits(&backend, &mem)?;
    let files = model
        .files()
        .iter()
        .map(|f| DirectFile::open(&f.path, cfg.io_mode))
        .collect::<Result<Vec<_>>>()?;
    let (cpu_slots, pinned_slots, staging) = host_side(&backend, cfg, &mem)?;
    let (pinned_cache, gpu_cache) = caches(&backend, &plans)?;
    let gpu_slots = (0..mem.gpu_slots)
        .map(|i| backend.alloc(mem.gpu_slot_size as usize, format!("device slot {i}")))
        .collect::<Result<Vec<_>>>()?;
    let events = (0..plans.len())
        .map(|_| layer_events(&backend))
        .collect::<Result<Vec<_>>>()?;
    let transfer = backend.stream("h2d")?;
    let convert = if plans.iter().any(|p| !p.casts.is_empty()) {
        Some(backend.stream("convert")?)
    } else {
        None
    };
    let res = Resources {
        model: model.clone(),
        files,
        plans,
        cpu_slots,
        pinned_slots,
        staging,
        pinned_cache,
        gpu_slots,
        gpu_cache,
        events,
        transfer,
        convert,
        backend,
        split: None,
    };
    Ok((res, mem))
}
