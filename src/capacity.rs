//! `capacity`: how many more agents of each fleet fit on this host, by memory (MemAvailable
//! less the reserve, over the fleet's observed or estimated tree size), free port blocks,
//! file descriptors and pids, and which of them binds. Reads /proc (blocking); decides
//! nothing.

use crate::context::NodeContext;
use crate::messages::command::CapacityRow;
use crate::registry::FleetRecord;
use std::collections::BTreeMap;

/// One row per fleet; `free` holds the free port blocks per stride.
pub fn rows(
    ctx: &NodeContext,
    fleets: &BTreeMap<String, FleetRecord>,
    free: &BTreeMap<u16, u64>,
) -> Vec<CapacityRow> {
    let host = crate::process::procfs::host_info();
    let mem_available =
        crate::memory::mem_available(&ctx.config.meminfo_path).unwrap_or(host.mem_available);
    let mut rows = Vec::new();
    for (name, rec) in fleets {
        let stride = rec.spec.effective_stride();
        let free_port_blocks = free.get(&stride).copied().unwrap_or(0);
        let room = crate::memory::HostRoom {
            mem_available,
            reserve: ctx.config.memory_reserve,
            free_port_blocks,
            nofile_soft: host.nofile_soft,
            fds_in_use: host.fds_in_use,
            pid_max: host.pid_max,
            pids_in_use: host.pids_in_use,
        };
        let per_agent = crate::memory::estimate(&rec.spec, &ctx.observed_rss(name));
        let procs: Vec<u64> = ctx
            .views
            .memory
            .iter()
            .filter(|e| &e.key().0 == name)
            .map(|e| e.processes as u64)
            .collect();
        let procs_per_agent = if procs.is_empty() {
            if rec.spec.runs_openclaw() {
                4
            } else {
                2
            }
        } else {
            procs.iter().sum::<u64>().div_ceil(procs.len() as u64)
        };
        let (m, p, f, d, binding) = crate::memory::capacity(&room, per_agent, procs_per_agent);
        rows.push(CapacityRow {
            fleet: name.clone(),
            by_memory: Some(m),
            by_ports: p,
            by_fds: Some(f),
            by_pids: Some(d),
            fits: m.min(p).min(f).min(d),
            binding: binding.to_string(),
        });
    }
    rows
}
