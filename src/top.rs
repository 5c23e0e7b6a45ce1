//! `top`: processes, RSS, PSS and CPU of each agent's whole tree, by the same membership rule
//! as a stop and the memory sampler (`process::members`). Blocking (two /proc scans
//! `TOP_WINDOW` apart): run it in a blocking task.

use crate::messages::command::{AgentStatus, TopRow};
use std::time::Duration;

/// Whole-tree processes, RSS, PSS and CPU of each agent; CPU from two scans `TOP_WINDOW`
/// apart (blocking: runs in a blocking task).
pub fn rows(rows: &[AgentStatus], node_id: &str) -> Vec<TopRow> {
    use crate::process::procfs::{self, ProcInfo};
    let ticks = |t: &[&ProcInfo]| t.iter().map(|p| p.utime + p.stime).sum::<u64>();
    // The same membership as the memory sampler and a stop: trees plus marked processes.
    let agents: Vec<((String, String), u32)> = rows
        .iter()
        .filter_map(|r| r.pid.map(|p| ((r.fleet.clone(), r.agent.clone()), p)))
        .collect();
    let prefix = crate::process::tree::node_marker_prefix(node_id);
    let since = procfs::read_proc(std::process::id())
        .map(|p| p.start_time)
        .unwrap_or(0);
    let mut membership = crate::process::members::Membership::default();
    let before_scan = procfs::scan();
    let before = membership.assign(&before_scan, &agents, &prefix, since);
    std::thread::sleep(TOP_WINDOW);
    let after_scan = procfs::scan();
    let after = membership.assign(&after_scan, &agents, &prefix, since);
    let hz = procfs::clock_ticks_per_sec().max(1) as f64;
    rows.iter()
        .map(|r| {
            let key = (r.fleet.clone(), r.agent.clone());
            let (procs, rss, pss, cpu, ksm) = match r.pid {
                Some(_) => {
                    let now = after.get(&key).cloned().unwrap_or_default();
                    let then = ticks(before.get(&key).map(Vec::as_slice).unwrap_or(&[]));
                    let cpu =
                        ticks(&now).saturating_sub(then) as f64 / hz / TOP_WINDOW.as_secs_f64()
                            * 100.0;
                    let rss = now.iter().map(|p| p.rss_pages).sum::<u64>() * procfs::page_size();
                    let pss = now
                        .iter()
                        .map(|p| procfs::pss_bytes(p.pid))
                        .sum::<Option<u64>>();
                    let ksm = now
                        .iter()
                        .map(|p| procfs::ksm_merging_pages(p.pid))
                        .sum::<Option<u64>>();
                    (now.len() as u32, rss, pss, cpu, ksm)
                }
                None => (0, 0, None, 0.0, None),
            };
            TopRow {
                fleet: r.fleet.clone(),
                agent: r.agent.clone(),
                state: r.state,
                pid: r.pid,
                processes: procs,
                rss_bytes: rss,
                pss_bytes: pss,
                cpu_percent: (cpu * 10.0).round() / 10.0,
                ksm_pages: ksm,
            }
        })
        .collect()
}

/// How long `top` watches CPU time.
const TOP_WINDOW: Duration = Duration::from_millis(500);
