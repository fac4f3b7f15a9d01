//! Build-time placement of layers (streamed, pinned cache, device cache)
//! within the caches' budgets, and the limits checked before anything is
//! allocated, so that a configuration that cannot fit says so.
//!
//! `Budget::Auto` leaves room for what the model allocates after build: the
//! static tensors (embedding, norm, lm_head) and a reserve the caller sets
//! (KV cache, workspaces). On the host backend the "device" is RAM, so the
//! device cache and the pinned cache share one RAM budget.

use super::plan::{Home, LayerPlan};
use super::{Backend, Budget, StreamerConfig};
use crate::host_memory::{mem_available, memlock_limit};
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

/// The share of `MemAvailable` that `Budget::Auto` caches may take, in tenths.
const AUTO_RAM_TENTHS: u64 = 6;

pub(crate) fn page_round(n: u64) -> u64 {
    n.div_ceil(4096) * 4096
}

/// What the machine offers the caches, measured once at build.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Room {
    /// Free device memory less the driver's margin; `None` on the host backend.
    pub(crate) device_free: Option<u64>,
    /// `MemAvailable`, where it can be read.
    pub(crate) ram: Option<u64>,
    /// `RLIMIT_MEMLOCK` where it binds (CUDA only: the host backend pins nothing).
    pub(crate) memlock: Option<u64>,
}

impl Room {
    pub(crate) fn measure(backend: &Backend) -> Result<Room> {
        Ok(match backend {
            Backend::Cuda { ctx, .. } => {
                let (free, total) = ctx.mem_info()?;
                Room {
                    device_free: Some(free.saturating_sub(GIB.max(total / 20))),
                    ram: mem_available(),
                    memlock: memlock_limit(),
                }
            }
            Backend::Host => Room {
                device_free: None,
                ram: mem_available(),
                memlock: None,
            },
        })
    }

    /// The RAM `Budget::Auto` caches may take in all.
    fn auto_ram(&self) -> u64 {
        self.ram.unwrap_or(0) / 10 * AUTO_RAM_TENTHS
    }
}

/// Device memory the model needs besides the layers: its static tensors and
/// the caller's reserve.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct AfterBuild {
    /// Bytes of the static tensors on the device (after casts).
    pub(crate) statics: u64,
    /// Bytes the caller allocates after build (KV cache, workspaces).
    pub(crate) reserve: u64,
}

impl AfterBuild {
    fn total(&self) -> u64 {
        self.statics.saturating_add(self.reserve)
    }
}

/// Sizes of the slots every layer passing through them needs.
pub(crate) struct SlotSizes {
    pub(crate) host: u64,
    pub(crate) device: u64,
}

pub(crate) fn slot_sizes(plans: &[LayerPlan]) -> SlotSizes {
    let max_of = |skip: fn(Home) -> bool, size: fn(&LayerPlan) -> u64| {
        let largest = plans.iter().filter(|p| !skip(p.home)).map(size).max();
        page_round(largest.unwrap_or(0).max(4096))
    };
    SlotSizes {
        host: max_of(|h| matches!(h, Home::Pinned(_)), |p| p.copy_bytes),
        device: max_of(|h| matches!(h, Home::Gpu(_)), |p| p.device_bytes),
    }
}

fn host_slot_count(cfg: &StreamerConfig) -> u64 {
    (cfg.n_cpu_pinned.max(1) + cfg.n_cpu) as u64
}

/// Decides which layers the caches keep, within their budgets; with
/// `resident`, the GPU cache keeps exactly the layers it marks (a row split
/// chose them on the whole layers, before splitting the others).
pub(crate) fn place_layers(
    room: &Room,
    cfg: &StreamerConfig,
    after: AfterBuild,
    plans: &mut [LayerPlan],
    resident: Option<&[bool]>,
) {
    let all = slot_sizes(plans);
    let dev_slots = (cfg.n_gpu + 1) as u64 * all.device;
    let host_slots = host_slot_count(cfg) * all.host;
    let total_dev: u64 = plans.iter().map(|p| page_round(p.device_bytes)).sum();
    // On the host backend everything below is RAM: one budget for all.
    let host_ram = room
        .auto_ram()
        .saturating_sub(host_slots)
        .saturating_sub(after.total());
    let gpu_budget = match cfg.gpu_cache {
        Budget::None => 0,
        Budget::Bytes(b) => b,
        Budget::Auto => {
            let free = match room.device_free {
                Some(free) => free.saturating_sub(after.total()),
                None => host_ram,
            };
            if total_dev <= free {
                total_dev
            } else {
                free.saturating_sub(dev_slots)
            }
        }
    };
    let gpu_used = match resident {
        Some(keep) => {
            let open = streamed(plans);
            let chosen: Vec<bool> = open.iter().map(|&i| keep.get(i) == Some(&true)).collect();
            let used = open.iter().zip(&chosen).filter(|(_, &c)| c);
            let used = used.map(|(&i, _)| page_round(plans[i].device_bytes)).sum();
            assign(plans, &open, &chosen, Home::Gpu);
            used
        }
        None => fill_spread(plans, gpu_budget, |p| p.device_bytes, Home::Gpu),
    };
    let streams_any = plans.iter().any(|p| !matches!(p.home, Home::Gpu(_)));
    let pinned_budget = match cfg.pinned_cache {
        Budget::None => 0,
        Budget::Bytes(b) => b,
        Budget::Auto => match room.device_free {
            Some(_) => {
                let ram = room.auto_ram();
                let limit = room.memlock.map_or(ram, |l| l.min(ram));
                limit.saturating_sub(host_slots)
            }
            None => host_ram
                .saturating_sub(gpu_used)
                .saturating_sub(if streams_any { dev_slots } else { 0 }),
        },
    };
    fill(plans, pinned_budget, |p| p.copy_bytes, Home::Pinned);
}

/// Gives streamed layers the home `home(i)` while `budget` lasts, spread
/// over the model: the layers left streaming sit evenly between the ones
/// given a home, so that each one's copy overlaps the compute of the homed
/// layers before it (homed layers first would leave the last streamed ones
/// waiting, one at a time, for a slot to free up). Returns the bytes used.
fn fill_spread(
    plans: &mut [LayerPlan],
    budget: u64,
    size: fn(&LayerPlan) -> u64,
    home: fn(usize) -> Home,
) -> u64 {
    let open = streamed(plans);
    // How many fit in order; those that stay streaming are spread evenly.
    let (in_order, _) = pick(plans, &open, budget, size, |_| true);
    let n = open.len().max(1);
    let left = open.len() - in_order.iter().filter(|&&c| c).count();
    let stays = |j: usize| (j + 1) * left / n > j * left / n;
    let (chosen, used) = pick(plans, &open, budget, size, |j| !stays(j));
    assign(plans, &open, &chosen, home);
    used
}

/// Gives streamed layers, in order, the home `home(i)` while `budget` lasts;
/// returns the bytes used.
fn fill(
    plans: &mut [LayerPlan],
    budget: u64,
    size: fn(&LayerPlan) -> u64,
    home: fn(usize) -> Home,
) -> u64 {
    let open = streamed(plans);
    let (chosen, used) = pick(plans, &open, budget, size, |_| true);
    assign(plans, &open, &chosen, home);
    used
}

/// The layers that have no home yet.
fn streamed(plans: &[LayerPlan]) -> Vec<usize> {
    (0..plans.len())
        .filter(|&i| plans[i].home == Home::Stream)
        .collect()
}

/// Which of the layers `open` fit `budget`: those `first` names, in order,
/// then any other the rest still holds. Returns the choice (by position in
/// `open`) and the bytes it takes.
fn pick(
    plans: &[LayerPlan],
    open: &[usize],
    budget: u64,
    size: fn(&LayerPlan) -> u64,
    first: impl Fn(usize) -> bool,
) -> (Vec<bool>, u64) {
    let mut chosen = vec![false; open.len()];
    let mut used = 0;
    for pass in [false, true] {
        for (j, &i) in open.iter().enumerate() {
            let need = page_round(size(&plans[i]));
            if !chosen[j] && (pass || first(j)) && used + need <= budget {
                used += need;
                chosen[j] = true;
            }
        }
    }
    (chosen, used)
}

/// Gives the chosen layers of `open` the homes `home(0)`, `home(1)`, … in
/// layer order, as the caches' buffers are made.
fn assign(plans: &mut [LayerPlan], open: &[usize], chosen: &[bool], home: fn(usize) -> Home) {
    let picked = open.iter().zip(chosen).filter(|(_, &c)| c);
    for (k, (&i, _)) in picked.enumerate() {
        plans[i].home = home(k);
    }
}

fn limit(what: &str, asked: u64, available: u64, hint: &str) -> Error {
    Error::Limit {
        what: what.into(),
        asked,
        available,
        hint: hint.into(),
    }
}

/// Checks what `mem` needs against what the machine has, before allocating.
pub(crate) fn check_limits(backend: &Backend, mem: &MemoryUse) -> Result<()> {
    let mut host = mem.host_slot_size * mem.cpu_slots as u64 + mem.pinned_bytes();
    if backend.is_host() {
        // The host backend's "device" memory is RAM too.
        host += mem.device_bytes();
    }
    if let Some(avail) = mem_available() {
        if host > avail {
            return Err(limit(
                "host memory (MemAvailable) for slots and caches",
                host,
                avail,
                "use fewer slots or smaller cache budgets",
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

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;

    const MIB: u64 = 1 << 20;

    fn plans(rng: &mut impl Rng, n: usize) -> Vec<LayerPlan> {
        (0..n)
            .map(|_| {
                let bytes = rng.gen_range(1..=4) * MIB;
                LayerPlan {
                    copy_bytes: bytes,
                    device_bytes: bytes,
                    casts: Vec::new(),
                    views: Vec::new(),
                    home: Home::Stream,
                    shift: 0,
                }
            })
            .collect()
    }

    fn cached(plans: &[LayerPlan], gpu: bool) -> u64 {
        plans
            .iter()
            .filter(|p| match p.home {
                Home::Gpu(_) => gpu,
                Home::Pinned(_) => !gpu,
                Home::Stream => false,
            })
            .map(|p| page_round(p.device_bytes))
            .sum()
    }

    use crate::test_rng::rng;

    #[test]
    fn resident_layers_are_spread_and_fill_the_budget_numbered_in_order() {
        let mut rng = rng();
        for round in 0..200 {
            let n = rng.gen_range(1..60);
            let mut p = plans(&mut rng, n);
            if round % 2 == 0 {
                // Equal layers: the streamed ones sit evenly.
                p.iter_mut()
                    .for_each(|l| (l.copy_bytes, l.device_bytes) = (MIB, MIB));
            }
            let budget = rng.gen_range(0..=n as u64 * 5) * MIB / 2;
            let used = fill_spread(&mut p, budget, |l| l.device_bytes, Home::Gpu);
            assert_eq!(used, cached(&p, true));
            assert!(used <= budget, "{used} > {budget}");
            // No streamed layer would still fit.
            for l in p.iter().filter(|l| l.home == Home::Stream) {
                assert!(used + page_round(l.device_bytes) > budget);
            }
            let homes: Vec<usize> = p
                .iter()
                .filter_map(|l| match l.home {
                    Home::Gpu(g) => Some(g),
                    _ => None,
                })
                .collect();
            assert_eq!(homes, (0..homes.len()).collect::<Vec<_>>());
            if round % 2 == 0 {
                let fit = (budget / MIB).min(n as u64) as usize;
                assert_eq!(homes.len(), fit);
                let streamed: Vec<usize> = (0..n).filter(|&i| p[i].home == Home::Stream).collect();
                let gaps: Vec<usize> = streamed.windows(2).map(|w| w[1] - w[0]).collect();
                let (lo, hi) = (gaps.iter().min(), gaps.iter().max());
                assert!(
                    hi.zip(lo).is_none_or(|(h, l)| h - l <= 1),
                    "n {n}, streamed {streamed:?}"
                );
                // The last layer streams when any does: the copies of a
                // pass end with its compute, not before it.
                assert!(streamed.last().is_none_or(|&l| l == n - 1), "{streamed:?}");
            }
        }
    }

    #[test]
    fn host_auto_caches_share_one_ram_budget() {
        let mut rng = rng();
        for _ in 0..50 {
            let n = rng.gen_range(4..40);
            let mut p = plans(&mut rng, n);
            let ram = rng.gen_range(8..200) * MIB;
            let statics = rng.gen_range(0..8) * MIB;
            let cfg = StreamerConfig {
                gpu_cache: Budget::Auto,
                pinned_cache: Budget::Auto,
                n_gpu: rng.gen_range(0..3),
                n_cpu_pinned: rng.gen_range(0..3),
                ..StreamerConfig::default()
            };
            let room = Room {
                device_free: None,
                ram: Some(ram),
                memlock: None,
            };
            let after = AfterBuild {
                statics,
                reserve: 0,
            };
            place_layers(&room, &cfg, after, &mut p, None);
            let sizes = slot_sizes(&p);
            let streams_any = p.iter().any(|p| !matches!(p.home, Home::Gpu(_)));
            let dev_slots = if streams_any {
                (cfg.n_gpu + 1) as u64 * sizes.device
            } else {
                0
            };
            let committed = cached(&p, true)
                + cached(&p, false)
                + dev_slots
                + host_slot_count(&cfg) * sizes.host
                + statics;
            let cache = cached(&p, true) + cached(&p, false);
            assert!(
                cache == 0 || committed <= ram / 10 * AUTO_RAM_TENTHS,
                "{committed} bytes committed of {ram} bytes of RAM"
            );
        }
    }

    #[test]
    fn cuda_auto_gpu_cache_leaves_room_for_statics_and_reserve() {
        let mut rng = rng();
        for _ in 0..50 {
            let n = rng.gen_range(4..40);
            let mut p = plans(&mut rng, n);
            let total: u64 = p.iter().map(|p| p.device_bytes).sum();
            // Often enough that every layer alone would fit.
            let free = total + rng.gen_range(0..16) * MIB;
            let after = AfterBuild {
                statics: rng.gen_range(1..32) * MIB,
                reserve: rng.gen_range(0..32) * MIB,
            };
            let cfg = StreamerConfig {
                gpu_cache: Budget::Auto,
                n_gpu: rng.gen_range(0..3),
                ..StreamerConfig::default()
            };
            let room = Room {
                device_free: Some(free),
                ram: Some(64 << 30),
                memlock: None,
            };
            place_layers(&room, &cfg, after, &mut p, None);
            let sizes = slot_sizes(&p);
            let streams_any = p.iter().any(|p| !matches!(p.home, Home::Gpu(_)));
            let slots = if streams_any {
                (cfg.n_gpu + 1) as u64 * sizes.device
            } else {
                0
            };
            let cache = cached(&p, true);
            assert!(
                cache == 0 || cache + slots + after.total() <= free,
                "cache {cache} + slots {slots} + statics and reserve {} > free {free}",
                after.total()
            );
        }
    }
}
