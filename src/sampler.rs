//! The memory sampler: every sample interval (longer above 200 agents: `round_interval`),
//! one /proc scan measures each running agent's
//! whole process tree (by `process::members`' rule: its descendants and its marked helpers),
//! writes the memory view, reports agents above their fleet's `max_memory` for two samples in
//! a row to the node, and compares each fleet's template on disk with its accepted version
//! (the drift view). It decides nothing else; the node restarts the agent.

use crate::context::NodeContext;
use crate::messages::node::NodeMsg;
use crate::provision;
use ractor::ActorRef;
use std::sync::Arc;
use std::time::Duration;

/// Measures every agent's whole process tree (one /proc scan per round, off the actors) and
/// reports agents that stay above their fleet's `max_memory` for two samples in a row.
pub async fn run(ctx: Arc<NodeContext>, node: ActorRef<NodeMsg>) {
    let mut streaks: std::collections::HashMap<(String, String), u32> = Default::default();
    let mut membership = crate::process::members::Membership::default();
    let node_prefix = crate::process::tree::node_marker_prefix(&ctx.node_id);
    let since = crate::process::procfs::read_proc(std::process::id())
        .map(|p| p.start_time)
        .unwrap_or(0);
    let mut agents_last_round = 0usize;
    let mut first = true;
    loop {
        // The first round at once: agents adopted after a daemon restart show their memory
        // and drift without waiting a whole interval.
        if !first {
            let wait = round_interval(ctx.config.sample_interval, agents_last_round);
            tokio::time::sleep(wait).await;
        }
        first = false;
        check_drift(&ctx).await;
        let agents: Vec<((String, String), u32)> = ctx
            .views
            .status
            .iter()
            .filter_map(|v| v.row.pid.map(|p| (v.key().clone(), p)))
            .collect();
        agents_last_round = agents.len();
        if agents.is_empty() {
            ctx.views.memory.clear();
            streaks.clear();
            continue;
        }
        let mut m = std::mem::take(&mut membership);
        let prefix = node_prefix.clone();
        let (samples, m) = tokio::task::spawn_blocking(move || {
            let procs = crate::process::procfs::scan();
            let page = crate::process::procfs::page_size();
            // Stop's rule: the tree plus every marked process (a setsid helper too).
            let mut owned = m.assign(&procs, &agents, &prefix, since);
            let samples = agents
                .into_iter()
                .map(|(key, _)| {
                    let tree = owned.remove(&key).unwrap_or_default();
                    let rss = tree.iter().map(|p| p.rss_pages).sum::<u64>() * page;
                    (key, rss, tree.len() as u32)
                })
                .collect::<Vec<_>>();
            (samples, m)
        })
        .await
        .unwrap_or_default();
        membership = m;
        // A set, not a scan of `samples` per entry: that was O(N²) string compares, the largest
        // share of the idle daemon's CPU at 1000 agents.
        let sampled: std::collections::HashSet<&(String, String)> =
            samples.iter().map(|(key, _, _)| key).collect();
        ctx.views.memory.retain(|k, _| sampled.contains(k));
        streaks.retain(|k, _| sampled.contains(k));
        for (key, rss, processes) in samples {
            ctx.views
                .memory
                .insert(key.clone(), crate::context::MemSample { rss, processes });
            let limit = ctx.views.fleet_specs.get(&key.0).and_then(|s| s.max_memory);
            let streak = streaks.entry(key.clone()).or_default();
            *streak = crate::memory::next_streak(*streak, rss, limit);
            if *streak >= crate::memory::OVER_LIMIT_SAMPLES {
                *streak = 0;
                let reason = format!(
                    "memory limit: {} MiB above max_memory {} MiB for {} samples",
                    rss >> 20,
                    limit.unwrap_or(0) >> 20,
                    crate::memory::OVER_LIMIT_SAMPLES
                );
                let _ = node.send_message(NodeMsg::MemoryLimit {
                    fleet: key.0,
                    agent: key.1,
                    reason,
                });
            }
        }
    }
}

/// Agents one round at the base interval covers. A round reads every process's stat
/// (10-15 µs per agent here), so at 1000 agents every 5 s it was a fifth of the idle
/// daemon's CPU; the interval grows with the agents instead, keeping the sampler's share of a
/// core near 0.02 % at any N.
pub const AGENTS_PER_BASE_ROUND: usize = 200;
/// Never sample less often than this: `max_memory` acts within two rounds.
pub const LONGEST_ROUND: Duration = Duration::from_secs(60);

/// When the next round is due after one that measured `agents` agents: the base interval up
/// to `AGENTS_PER_BASE_ROUND` agents, then proportionally longer, at most `LONGEST_ROUND`
/// (never shorter than the base, whatever it is).
pub fn round_interval(base: Duration, agents: usize) -> Duration {
    spaced_out(base, agents, AGENTS_PER_BASE_ROUND, LONGEST_ROUND)
}

/// A periodic job over every agent (this sampler, the log pruner): `base` up to `per_base`
/// agents, then proportionally longer, at most `longest` (never shorter than `base`).
pub fn spaced_out(base: Duration, agents: usize, per_base: usize, longest: Duration) -> Duration {
    let rounds = agents.div_ceil(per_base.max(1)).max(1) as u32;
    base.saturating_mul(rounds).min(longest.max(base))
}

/// Compares each fleet's template on disk with the version its agents render, and records
/// the difference for `status`. An agent never takes a changed file by itself: that takes a
/// `reload`, and until then its restarts render the accepted version.
async fn check_drift(ctx: &Arc<NodeContext>) {
    let specs: Vec<(String, std::path::PathBuf, Option<serde_json::Value>)> = ctx
        .views
        .fleet_specs
        .iter()
        .filter_map(|e| {
            e.template
                .clone()
                .map(|t| (e.key().clone(), t, e.template_config.clone()))
        })
        .collect();
    let names: std::collections::HashSet<String> = ctx
        .views
        .fleet_specs
        .iter()
        .map(|e| e.key().clone())
        .collect();
    ctx.views.drift.retain(|f, _| names.contains(f));
    if specs.is_empty() {
        return;
    }
    let found = tokio::task::spawn_blocking(move || {
        specs
            .into_iter()
            .map(|(fleet, path, accepted)| {
                let d = template_drift(&path, accepted.as_ref());
                (fleet, d)
            })
            .collect::<Vec<_>>()
    })
    .await
    .unwrap_or_default();
    for (fleet, d) in found {
        match d {
            Some(d) => {
                ctx.views.drift.insert(fleet, d);
            }
            None => {
                ctx.views.drift.remove(&fleet);
            }
        }
    }
}

/// How the template at `path` differs from `accepted`, in words; `None` when it does not.
pub fn template_drift(
    path: &std::path::Path,
    accepted: Option<&serde_json::Value>,
) -> Option<String> {
    match provision::load_template(path) {
        Ok(v) if Some(&v) == accepted => None,
        Ok(_) => Some(format!(
            "template {} changed on disk since it was accepted; agents run the accepted version until `reload`",
            path.display()
        )),
        Err(e) => Some(format!(
            "{e}; agents run the accepted version"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_space_out_with_the_agents_they_read() {
        let s = Duration::from_secs;
        let cases = [
            (s(5), 0, s(5)),
            (s(5), 1, s(5)),
            (s(5), 200, s(5)),
            (s(5), 201, s(10)),
            (s(5), 1000, s(25)),
            (s(5), 4729, s(60)),
            (Duration::from_millis(500), 3, Duration::from_millis(500)),
            (s(90), 5000, s(90)),
        ];
        for (base, agents, want) in cases {
            assert_eq!(
                round_interval(base, agents),
                want,
                "{base:?}, {agents} agents"
            );
        }
    }
}
