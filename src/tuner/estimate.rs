//! Memory a configuration needs, estimated from the model before any child
//! starts, so that configurations that cannot fit are skipped ("pruned")
//! instead of launched.

use serde::{Deserialize, Serialize};

use super::grid::Candidate;
use crate::pipeline::{Budget, Device};
use crate::ModelIndex;

const PAGE: u64 = 4096;

fn page_round(n: u64) -> u64 {
    n.div_ceil(PAGE) * PAGE
}

/// What the machine has, as far as is known. `None` fields are not checked.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineLimits {
    /// Host RAM available (`MemAvailable` in `/proc/meminfo`).
    pub mem_available: Option<u64>,
    /// The soft `RLIMIT_MEMLOCK`, where it is limited.
    pub memlock: Option<u64>,
    /// Free device memory.
    pub free_vram: Option<u64>,
}

impl MachineLimits {
    /// Reads the limits of this machine for `device`. Free device memory is
    /// asked of the driver through a short-lived context, released before
    /// any child starts; it stays `None` where CUDA is unavailable.
    pub fn detect(device: Device) -> MachineLimits {
        let free_vram = match device {
            Device::Host => None,
            Device::Cuda(ordinal) if crate::cuda::is_available() => {
                crate::cuda::Context::new(ordinal)
                    .and_then(|ctx| ctx.mem_info())
                    .ok()
                    .map(|(free, _total)| free)
            }
            Device::Cuda(_) => None,
        };
        MachineLimits {
            mem_available: crate::host_memory::mem_available(),
            memlock: crate::host_memory::memlock_limit(),
            free_vram,
        }
    }
}

/// Bytes a configuration allocates, estimated from the model's largest
/// layer and total size (the streamer's own placement may differ slightly:
/// casts change device sizes, and `auto` budgets size themselves to fit, so
/// they count as zero here).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryEstimate {
    /// Device slots and the device cache.
    pub device: u64,
    /// Pinned slots (or the transfer thread's staging buffer) and the pinned cache.
    pub pinned: u64,
    /// Unpinned CPU slots.
    pub unpinned: u64,
}

impl MemoryEstimate {
    /// The estimate for `c` over `model`.
    pub fn new(model: &ModelIndex, c: &Candidate) -> MemoryEstimate {
        let slot = page_round(model.max_slot_bytes()).max(PAGE);
        let all_layers: u64 = model
            .layers()
            .iter()
            .map(|l| page_round(l.slot_bytes))
            .sum();
        let cache = |b: Budget, room: u64| match b {
            Budget::None | Budget::Auto => 0,
            Budget::Bytes(n) => n.min(room),
        };
        let gpu_cache = cache(c.gpu_cache, all_layers);
        let gpu_slots = if gpu_cache >= all_layers && all_layers > 0 {
            0
        } else {
            (c.n_gpu as u64 + 1) * slot
        };
        let pinned_cache = cache(c.pinned_cache, all_layers - gpu_cache);
        let host_slot = if gpu_cache + pinned_cache >= all_layers {
            PAGE
        } else {
            slot
        };
        MemoryEstimate {
            device: gpu_slots + gpu_cache,
            pinned: c.n_cpu_pinned.max(1) as u64 * host_slot + pinned_cache,
            unpinned: c.n_cpu as u64 * host_slot,
        }
    }

    /// Host RAM the configuration takes on `device` (on the host backend,
    /// device memory is host memory too).
    pub fn host_ram(&self, device: Device) -> u64 {
        let dev = match device {
            Device::Host => self.device,
            Device::Cuda(_) => 0,
        };
        self.pinned + self.unpinned + dev
    }

    /// Why the configuration cannot fit under `limits`, or `None` if it may.
    pub fn exceeds(&self, device: Device, limits: &MachineLimits) -> Option<String> {
        let gb = |b: u64| match b {
            100_000_000.. => format!("{:.2} GB", b as f64 / 1e9),
            100_000.. => format!("{:.1} MB", b as f64 / 1e6),
            _ => format!("{b} bytes"),
        };
        if let Some(avail) = limits.mem_available {
            let need = self.host_ram(device);
            if need > avail {
                return Some(format!(
                    "needs {} of host RAM, {} available",
                    gb(need),
                    gb(avail)
                ));
            }
        }
        if let Device::Cuda(_) = device {
            if let Some(lim) = limits.memlock.filter(|&l| self.pinned > l) {
                return Some(format!(
                    "needs {} pinned, RLIMIT_MEMLOCK is {}",
                    gb(self.pinned),
                    gb(lim)
                ));
            }
            if let Some(free) = limits.free_vram.filter(|&f| self.device > f) {
                return Some(format!(
                    "needs {} of GPU memory, {} free",
                    gb(self.device),
                    gb(free)
                ));
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_limit_names_what_does_not_fit() {
        let est = MemoryEstimate {
            device: 6_000_000_000,
            pinned: 2_000_000_000,
            unpinned: 1_000_000_000,
        };
        let roomy = MachineLimits {
            mem_available: Some(100_000_000_000),
            memlock: None,
            free_vram: Some(80_000_000_000),
        };
        assert_eq!(est.exceeds(Device::Cuda(0), &roomy), None);
        let vram = MachineLimits {
            free_vram: Some(4_000_000_000),
            ..roomy
        };
        let why = est.exceeds(Device::Cuda(0), &vram).unwrap();
        assert_eq!(why, "needs 6.00 GB of GPU memory, 4.00 GB free");
        assert_eq!(
            est.exceeds(Device::Host, &vram),
            None,
            "no VRAM on the host"
        );
        let memlock = MachineLimits {
            memlock: Some(1 << 30),
            ..roomy
        };
        assert!(est
            .exceeds(Device::Cuda(0), &memlock)
            .unwrap()
            .contains("RLIMIT_MEMLOCK"));
        let ram = MachineLimits {
            mem_available: Some(8_000_000_000),
            ..roomy
        };
        assert_eq!(est.exceeds(Device::Cuda(0), &ram), None);
        assert_eq!(est.host_ram(Device::Host), 9_000_000_000);
        assert!(est
            .exceeds(Device::Host, &ram)
            .unwrap()
            .contains("host RAM"));
    }
}
