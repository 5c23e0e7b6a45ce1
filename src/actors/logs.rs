//! LogRotator: a periodic job over every agent's log directory. It enforces the per-agent
//! disk budget and the retention (the decision is `logs::retention::plan_prune`, plain and
//! tested), runs the scan and deletions on a blocking thread while its mailbox stays free,
//! and publishes how many bytes it freed. Rotation by size is the writer's job, not this
//! actor's. Passes space out above 200 agents (`pass_interval`), as the sampler's rounds do.

use crate::context::NodeContext;
use crate::isolation::tenant_fs::{as_tenant, home_owner};
use crate::logs::retention;
use crate::logs::writer::with_rotation_lock;
use crate::messages::events::Event;
use crate::messages::logs::LogsMsg;
use crate::provision::AgentPaths;
use crate::spec::LogSpec;
use crate::state::now_ms;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use std::collections::HashMap;
use std::fs;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

pub struct LogRotator;

pub struct LogsRuntime {
    ctx: Arc<NodeContext>,
    fleets: HashMap<String, (LogSpec, Vec<AgentPaths>)>,
    running: bool,
    /// When the last pass started.
    last_pass: Option<std::time::Instant>,
}

impl Actor for LogRotator {
    type Msg = LogsMsg;
    type State = LogsRuntime;
    type Arguments = Arc<NodeContext>;

    async fn pre_start(
        &self,
        myself: ActorRef<LogsMsg>,
        ctx: Arc<NodeContext>,
    ) -> Result<LogsRuntime, ActorProcessingErr> {
        myself.send_interval(ctx.config.log_interval, || LogsMsg::Tick);
        Ok(LogsRuntime {
            ctx,
            fleets: HashMap::new(),
            running: false,
            last_pass: None,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<LogsMsg>,
        msg: LogsMsg,
        rt: &mut LogsRuntime,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            LogsMsg::Fleet { fleet, spec, homes } => {
                rt.fleets.insert(fleet, (spec, homes));
            }
            LogsMsg::ForgetFleet { fleet } => {
                rt.fleets.remove(&fleet);
            }
            LogsMsg::PassDone => rt.running = false,
            LogsMsg::Tick => {
                if rt.running {
                    return Ok(()); // the previous pass is still working
                }
                let agents = rt.fleets.values().map(|(_, a)| a.len()).sum();
                let due = pass_interval(rt.ctx.config.log_interval, agents);
                if rt.last_pass.is_some_and(|t| t.elapsed() + SLACK < due) {
                    return Ok(());
                }
                rt.last_pass = Some(std::time::Instant::now());
                rt.running = true;
                let jobs: Vec<(LogSpec, Vec<AgentPaths>)> = rt.fleets.values().cloned().collect();
                let ctx = rt.ctx.clone();
                tokio::spawn(async move {
                    let (freed, files) = tokio::task::spawn_blocking(move || prune_all(&jobs))
                        .await
                        .unwrap_or((0, 0));
                    if files > 0 {
                        tracing::info!(bytes_freed = freed, files_deleted = files, "logs pruned");
                        ctx.publish(Event::LogsPruned {
                            bytes_freed: freed,
                            files_deleted: files,
                            at_ms: now_ms(),
                        });
                    }
                    let _ = myself.send_message(LogsMsg::PassDone);
                });
            }
        }
        Ok(())
    }
}

/// Agents one pass at the base interval covers. A pass costs ~15 syscalls per agent (two
/// directory scans under the tenant's file rights); at 1000 agents every 60 s it was 40 % of
/// the idle daemon's CPU. The writer bounds each `agent.log*` by itself (`max_bytes` ×
/// (`keep` + 1)); a pass is what holds OpenClaw's own logs to the budget and ages archives
/// out, neither of which needs to act within the minute.
pub const AGENTS_PER_BASE_PASS: usize = 200;
/// Never pass less often than this.
pub const LONGEST_PASS: Duration = Duration::from_secs(600);
/// A tick that comes a little early still starts the pass it is for.
const SLACK: Duration = Duration::from_secs(1);

/// How often passes go over `agents` agents: the base interval up to
/// `AGENTS_PER_BASE_PASS`, then proportionally longer, at most `LONGEST_PASS` (never shorter
/// than the base).
pub fn pass_interval(base: Duration, agents: usize) -> Duration {
    crate::sampler::spaced_out(base, agents, AGENTS_PER_BASE_PASS, LONGEST_PASS)
}

/// One pass over every known agent: (bytes freed, files deleted).
fn prune_all(jobs: &[(LogSpec, Vec<AgentPaths>)]) -> (u64, u64) {
    let now = SystemTime::now();
    let (mut freed, mut files) = (0u64, 0u64);
    for (spec, agents) in jobs {
        let retention = Duration::from_secs(spec.retention_days as u64 * 86_400);
        for paths in agents {
            let (b, n) = prune_agent(paths, spec.budget_bytes, retention, now);
            freed += b;
            files += n;
        }
    }
    (freed, files)
}

/// Applies retention and budget (one budget for both) to an agent's logs: the daemon's
/// `agent.log*` outside the HOME, with the daemon's rights, and OpenClaw's `openclaw.log*` in
/// `<home>/logs`, with the tenant's file rights (its HOME is its own to fill with links). A
/// directory that is gone (purged) or not a real directory is left alone; nothing is created.
pub(crate) fn prune_agent(
    paths: &AgentPaths,
    budget_bytes: u64,
    retention: Duration,
    now: SystemTime,
) -> (u64, u64) {
    let owner = home_owner(&paths.home);
    // Our writer shifts archives under this lock: without it a deletion planned for
    // `agent.log.5.gz` could hit what has just become `.5` (a newer archive).
    with_rotation_lock(&paths.agent_log, || {
        let mut found = scan(&paths.daemon_log_dir);
        found.extend(as_tenant(owner, || scan(&paths.log_dir)).unwrap_or_default());
        let plan = retention::plan_prune(&found, budget_bytes, retention, now);
        let (mut freed, mut files) = (0, 0);
        for f in found.iter().filter(|f| plan.delete.contains(&f.path)) {
            // Only directly inside one of the agent's log directories, whatever the scan said.
            let dir = f.path.parent();
            let removed = if dir == Some(paths.daemon_log_dir.as_path()) {
                fs::remove_file(&f.path)
            } else if dir == Some(paths.log_dir.as_path()) {
                as_tenant(owner, || fs::remove_file(&f.path)).and_then(|r| r)
            } else {
                continue;
            };
            match removed {
                Ok(()) => {
                    freed += f.bytes;
                    files += 1;
                }
                Err(e) => {
                    tracing::debug!(file = %f.path.display(), error = %e, "cannot delete log archive")
                }
            }
        }
        (freed, files)
    })
}

/// The log files in `dir`, none when it is missing or not a real directory.
fn scan(dir: &Path) -> Vec<retention::LogFile> {
    match fs::symlink_metadata(dir) {
        Ok(m) if m.is_dir() => {}
        _ => return Vec::new(),
    }
    retention::scan_agent_logs(dir).unwrap_or_else(|e| {
        tracing::warn!(dir = %dir.display(), error = %e, "cannot scan agent logs");
        Vec::new()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passes_space_out_with_the_agents_they_scan() {
        let s = Duration::from_secs;
        let cases = [
            (s(60), 0, s(60)),
            (s(60), 200, s(60)),
            (s(60), 201, s(120)),
            (s(60), 1000, s(300)),
            (s(60), 4729, s(600)),
            (s(1), 3, s(1)),
            (s(900), 5000, s(900)),
        ];
        for (base, agents, want) in cases {
            assert_eq!(
                pass_interval(base, agents),
                want,
                "{base:?}, {agents} agents"
            );
        }
    }
}
