//! Memory and capacity decisions as plain functions: the over-limit streak rule (PM2's
//! `max_memory_restart` without its false positives on a single spike), node admission
//! against a MemAvailable reserve, and how many more agents fit by memory, ports, file
//! descriptors and pids. The sampler task that feeds them lives in the NodeActor.

use crate::spec::{FleetSpec, Profile};

/// Samples in a row above the limit that restart an agent.
pub const OVER_LIMIT_SAMPLES: u32 = 2;

/// The next over-limit streak after one sample; restart when it reaches
/// `OVER_LIMIT_SAMPLES`.
pub fn next_streak(streak: u32, rss: u64, limit: Option<u64>) -> u32 {
    match limit {
        Some(l) if rss > l => streak + 1,
        _ => 0,
    }
}

/// What one more agent of a fleet is expected to take, before anything of it was observed:
/// measured whole-tree RSS of a real gateway (OPENCLAW.md) or a small program's.
pub fn default_estimate(spec: &FleetSpec) -> u64 {
    const MIB: u64 = 1024 * 1024;
    match (spec.runs_openclaw(), spec.profile) {
        (true, Profile::Default) => 1024 * MIB,
        (true, Profile::Lean) => 704 * MIB,
        (false, _) => 8 * MIB,
    }
}

/// The fleet's estimate: the mean observed tree RSS of its running agents, else the default.
pub fn estimate(spec: &FleetSpec, observed: &[u64]) -> u64 {
    if observed.is_empty() {
        default_estimate(spec)
    } else {
        observed.iter().sum::<u64>() / observed.len() as u64
    }
}

/// Admission: refuse a start that would take MemAvailable below the reserve.
pub fn admit(mem_available: u64, reserve: u64, estimate: u64) -> Result<(), String> {
    if mem_available >= reserve.saturating_add(estimate) {
        Ok(())
    } else {
        Err(format!(
            "MemAvailable {} MiB minus this agent's estimated {} MiB would fall below the reserve of {} MiB",
            mem_available >> 20,
            estimate >> 20,
            reserve >> 20
        ))
    }
}

/// Inputs of `capacity`.
#[derive(Debug, Clone, Copy)]
pub struct HostRoom {
    pub mem_available: u64,
    pub reserve: u64,
    pub free_port_blocks: u64,
    pub nofile_soft: u64,
    pub fds_in_use: u64,
    pub pid_max: u64,
    pub pids_in_use: u64,
}

/// Daemon-side descriptors per agent: stdout and stderr pipes, the pidfd, the log file, and
/// a probe socket while probing.
pub const FDS_PER_AGENT: u64 = 5;

/// How many more agents fit by each limit, and which limit binds.
pub fn capacity(
    room: &HostRoom,
    per_agent_mem: u64,
    procs_per_agent: u64,
) -> (u64, u64, u64, u64, &'static str) {
    let by_memory = room.mem_available.saturating_sub(room.reserve) / per_agent_mem.max(1);
    let by_ports = room.free_port_blocks;
    let by_fds = room.nofile_soft.saturating_sub(room.fds_in_use) / FDS_PER_AGENT;
    let by_pids = room.pid_max.saturating_sub(room.pids_in_use) / procs_per_agent.max(1);
    let all = [
        (by_memory, "memory"),
        (by_ports, "ports"),
        (by_fds, "file descriptors"),
        (by_pids, "pids"),
    ];
    let binding = all
        .iter()
        .min_by_key(|(n, _)| *n)
        .map(|(_, w)| *w)
        .unwrap_or("memory");
    (by_memory, by_ports, by_fds, by_pids, binding)
}

/// MemAvailable in bytes from a meminfo file (tests point it at a file of their own).
pub fn mem_available(meminfo: &std::path::Path) -> Option<u64> {
    let text = std::fs::read_to_string(meminfo).ok()?;
    crate::process::procfs::parse_meminfo(&text).map(|(_, avail)| avail)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streak_needs_consecutive_samples() {
        let l = Some(100);
        let samples = [50, 150, 50, 150, 150];
        let mut s = 0;
        let mut restarted_at = None;
        for (i, rss) in samples.iter().enumerate() {
            s = next_streak(s, *rss, l);
            if s >= OVER_LIMIT_SAMPLES && restarted_at.is_none() {
                restarted_at = Some(i);
            }
        }
        assert_eq!(restarted_at, Some(4), "a single spike must not restart");
        assert_eq!(next_streak(5, 1000, None), 0);
    }

    #[test]
    fn admission_keeps_the_reserve() {
        let mib = 1 << 20;
        assert!(admit(2048 * mib, 512 * mib, 1024 * mib).is_ok());
        let e = admit(1000 * mib, 512 * mib, 1024 * mib).unwrap_err();
        assert!(
            e.contains("1000") && e.contains("512") && e.contains("1024"),
            "{e}"
        );
    }

    #[test]
    fn capacity_names_the_binding_limit() {
        let room = HostRoom {
            mem_available: 10 << 30,
            reserve: 1 << 30,
            free_port_blocks: 7,
            nofile_soft: 1024,
            fds_in_use: 24,
            pid_max: 4_000_000,
            pids_in_use: 400,
        };
        let (m, p, f, d, b) = capacity(&room, 1 << 30, 4);
        assert_eq!((m, p, f, d, b), (9, 7, 200, 999_900, "ports"));
        let (_, _, _, _, b) = capacity(&room, 2 << 30, 4);
        assert_eq!(b, "memory");
    }

    #[test]
    fn estimate_prefers_observation() {
        let mut s = FleetSpec::new("f");
        assert_eq!(estimate(&s, &[]), 1 << 30);
        s.profile = Profile::Lean;
        assert_eq!(estimate(&s, &[]), 704 << 20);
        assert_eq!(estimate(&s, &[10, 20]), 15);
    }
}
