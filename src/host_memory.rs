//! What the host lets this process have: RAM available now and how much it
//! may pin. One place, so that the streamer's budgets, the tuner's pruning
//! and the allocators agree.

/// Bytes of RAM the kernel says are available (`MemAvailable` in
/// `/proc/meminfo`); `None` where it cannot be read.
pub fn mem_available() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    parse_mem_available(&text)
}

fn parse_mem_available(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// How many bytes this process may pin: the soft `RLIMIT_MEMLOCK`, or `None`
/// when there is no limit (unlimited, or the process holds `CAP_IPC_LOCK`,
/// which exempts it).
pub fn memlock_limit() -> Option<u64> {
    use nix::sys::resource::{getrlimit, Resource, RLIM_INFINITY};
    let (soft, _) = getrlimit(Resource::RLIMIT_MEMLOCK).ok()?;
    if soft == RLIM_INFINITY || has_cap_ipc_lock() {
        return None;
    }
    Some(soft)
}

/// Whether the process holds `CAP_IPC_LOCK`, which exempts it from
/// `RLIMIT_MEMLOCK`.
pub fn has_cap_ipc_lock() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .is_some_and(|s| cap_ipc_lock_in(&s))
}

fn cap_ipc_lock_in(status: &str) -> bool {
    const CAP_IPC_LOCK: u32 = 14;
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << CAP_IPC_LOCK) != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_mem_available_in_bytes() {
        let text = "MemTotal:       24000000 kB\nMemFree:  100 kB\nMemAvailable:   12345 kB\n";
        assert_eq!(parse_mem_available(text), Some(12345 * 1024));
        assert_eq!(parse_mem_available("MemTotal: 5 kB\n"), None);
        assert_eq!(parse_mem_available("MemAvailable: lots kB\n"), None);
        assert!(mem_available().is_some_and(|b| b > 0));
    }

    #[test]
    fn cap_ipc_lock_is_bit_14_of_cap_eff() {
        assert!(cap_ipc_lock_in("Name: x\nCapEff:\t0000000000004000\n"));
        assert!(cap_ipc_lock_in("CapEff:\t000001ffffffffff\n"));
        assert!(!cap_ipc_lock_in("CapEff:\t0000000000003fff\n"));
        assert!(!cap_ipc_lock_in("CapPrm:\t0000000000004000\n"));
    }
}
