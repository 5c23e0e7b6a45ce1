//! Scheduled backups (`[fleet.backup] every, keep, dir`): a task that looks every
//! `TICK` at each fleet's agents, backs up those whose newest archive is older than `every`
//! through the node's own `agent backup` command (live, the agent keeps running), and prunes
//! each agent's directory to its newest `keep` archives. When the last archive was made is read
//! from the directory itself, so a daemon restart neither repeats nor skips one. A failure is
//! an event and a metric, retried after `RETRY`, and never stops an agent.

use crate::context::NodeContext;
use crate::messages::command::{Command, Reply};
use crate::messages::events::Event;
use crate::messages::node::NodeMsg;
use ractor::ActorRef;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

const TICK: Duration = Duration::from_secs(30);
/// A failed agent is tried again after this (or after `every`, if shorter).
const RETRY: Duration = Duration::from_secs(600);

/// Whether an agent whose newest archive was made at `newest` is due at `now`. An archive
/// from the future (a clock that was wrong once) must not hold the schedule off until then.
pub fn due(newest: Option<SystemTime>, now: SystemTime, every: Duration) -> bool {
    match newest {
        None => true,
        Some(t) => now.duration_since(t).map_or(true, |age| age >= every),
    }
}

/// Of an agent's archives (oldest first), the ones beyond the newest `keep`.
pub fn to_prune(archives: &[PathBuf], keep: usize) -> &[PathBuf] {
    &archives[..archives.len().saturating_sub(keep)]
}

/// Where a fleet's schedule puts one agent's archives: `<dir>/<fleet>/<agent>/` (agent ids
/// repeat across fleets, and pruning must only ever see one agent's archives).
pub fn agent_dir(state_dir: &Path, fleet: &str, agent: &str, dir: Option<&Path>) -> PathBuf {
    dir.map_or_else(|| state_dir.join("backups"), Path::to_path_buf)
        .join(fleet)
        .join(agent)
}

pub async fn run(ctx: Arc<NodeContext>, node: ActorRef<NodeMsg>) {
    let mut failed_at: HashMap<(String, String), std::time::Instant> = HashMap::new();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let specs: Vec<_> = ctx
            .views
            .fleet_specs
            .iter()
            .filter(|s| s.backup.is_some())
            .map(|s| s.value().clone())
            .collect();
        for spec in specs {
            let Some(b) = spec.backup.clone() else {
                continue;
            };
            let Ok(every) = b.every_s().map(Duration::from_secs) else {
                continue;
            };
            for agent in &spec.agents {
                let key = (spec.name.clone(), agent.clone());
                if failed_at
                    .get(&key)
                    .is_some_and(|t| t.elapsed() < RETRY.min(every))
                {
                    continue;
                }
                let home =
                    crate::provision::AgentPaths::new(&ctx.config.state_dir, &spec.name, agent)
                        .home;
                let dir = agent_dir(&ctx.config.state_dir, &spec.name, agent, b.dir.as_deref());
                let (d, a) = (dir.clone(), agent.clone());
                let newest = tokio::task::spawn_blocking(move || {
                    super::archives_of(&d, &a)
                        .last()
                        .and_then(|p| std::fs::metadata(p).ok())
                        .and_then(|m| m.modified().ok())
                })
                .await
                .unwrap_or(None);
                // An agent that never started has no HOME to back up yet.
                if !home.is_dir() || !due(newest, SystemTime::now(), every) {
                    continue;
                }
                match backup_one(&ctx, &node, &spec.name, agent, &dir).await {
                    Ok(()) => {
                        failed_at.remove(&key);
                        let (d, a, keep) = (dir.clone(), agent.clone(), b.keep as usize);
                        let _ = tokio::task::spawn_blocking(move || {
                            let all = super::archives_of(&d, &a);
                            for p in to_prune(&all, keep) {
                                if let Err(e) = std::fs::remove_file(p) {
                                    tracing::warn!(path = %p.display(), error = %e, "could not prune an old backup");
                                }
                            }
                        })
                        .await;
                    }
                    Err(reason) => {
                        tracing::warn!(fleet = %spec.name, agent, %reason, "scheduled backup failed");
                        ctx.publish(Event::BackupFailed {
                            fleet: spec.name.clone(),
                            agent: agent.clone(),
                            reason,
                            at_ms: crate::state::now_ms(),
                        });
                        failed_at.insert(key, std::time::Instant::now());
                    }
                }
            }
        }
    }
}

async fn backup_one(
    ctx: &NodeContext,
    node: &ActorRef<NodeMsg>,
    fleet: &str,
    agent: &str,
    dir: &Path,
) -> Result<(), String> {
    let d = dir.to_path_buf();
    let made = tokio::task::spawn_blocking(move || super::make_private_dir(&d))
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r);
    if let Err(e) = made {
        // The command never ran, so it counted nothing.
        ctx.services.metrics.backup_done(false);
        return Err(e);
    }
    let cmd = Command::AgentBackup {
        fleet: fleet.to_string(),
        agent: agent.to_string(),
        out: Some(dir.join(super::archive_name(agent))),
    };
    match node
        .call(
            |r| NodeMsg::Command(cmd, r),
            Some(Duration::from_secs(3600)),
        )
        .await
    {
        Ok(ractor::rpc::CallResult::Success(Reply::Error(e))) => Err(e.to_string()),
        Ok(ractor::rpc::CallResult::Success(_)) => Ok(()),
        Ok(_) => Err("the node did not answer in time".into()),
        Err(e) => Err(format!("the node is gone: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn due_rules() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(100_000);
        let h = Duration::from_secs(3600);
        for (newest, want) in [
            (None, true),
            (Some(now - h), true),
            (Some(now - h + Duration::from_secs(1)), false),
            (Some(now), false),
            // An archive dated in the future: due (else one wrong clock stops the schedule).
            (Some(now + h), true),
        ] {
            assert_eq!(due(newest, now, h), want, "{newest:?}");
        }
    }

    #[test]
    fn prune_rules() {
        let v: Vec<PathBuf> = (1..=5).map(|i| PathBuf::from(format!("a-{i}"))).collect();
        assert_eq!(to_prune(&v, 3), &v[..2]);
        assert_eq!(to_prune(&v, 5), &[] as &[PathBuf]);
        assert_eq!(to_prune(&v, 9), &[] as &[PathBuf]);
        assert_eq!(to_prune(&v, 1), &v[..4]);
    }
}
