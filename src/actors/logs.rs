//! LogRotator: a periodic job over every agent's log directory. It enforces the per-agent
//! disk budget and the retention (the decision is `logs::retention::plan_prune`, plain and
//! tested), runs the scan and deletions on a blocking thread while its mailbox stays free,
//! and publishes how many bytes it freed. Rotation by size is the writer's job, not this
//! actor's.

use crate::context::NodeContext;
use crate::logs::retention::{self, AGENT_LOG};
use crate::logs::writer::with_rotation_lock;
use crate::messages::events::Event;
use crate::messages::logs::LogsMsg;
use crate::spec::LogSpec;
use crate::state::now_ms;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

pub struct LogRotator;

pub struct LogsRuntime {
    ctx: Arc<NodeContext>,
    fleets: HashMap<String, (LogSpec, Vec<PathBuf>)>,
    running: bool,
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
                rt.running = true;
                let jobs: Vec<(LogSpec, Vec<PathBuf>)> = rt.fleets.values().cloned().collect();
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

/// One pass over every known agent: (bytes freed, files deleted).
fn prune_all(jobs: &[(LogSpec, Vec<PathBuf>)]) -> (u64, u64) {
    let now = SystemTime::now();
    let (mut freed, mut files) = (0u64, 0u64);
    for (spec, homes) in jobs {
        let retention = Duration::from_secs(spec.retention_days as u64 * 86_400);
        for home in homes {
            // With the tenant's file rights (its HOME is its own to fill with links).
            let owner = crate::isolation::tenant_fs::home_owner(home);
            let (b, n) = crate::isolation::tenant_fs::as_tenant(owner, || {
                prune_home(home, spec.budget_bytes, retention, now)
            })
            .unwrap_or((0, 0));
            freed += b;
            files += n;
        }
    }
    (freed, files)
}

/// Applies retention and budget to `<home>/logs`. A HOME that is gone (purged) or whose log
/// directory is not a real directory (a symlink could lead anywhere) is left alone; nothing
/// is ever created.
pub(crate) fn prune_home(
    home: &Path,
    budget_bytes: u64,
    retention: Duration,
    now: SystemTime,
) -> (u64, u64) {
    let dir = home.join("logs");
    match fs::symlink_metadata(&dir) {
        Ok(m) if m.is_dir() => {}
        _ => return (0, 0),
    }
    // Our writer shifts archives under this lock: without it a deletion planned for
    // `agent.log.5.gz` could hit what has just become `.5` (a newer archive).
    with_rotation_lock(&dir.join(AGENT_LOG), || {
        let found = match retention::scan_agent_logs(&dir) {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot scan agent logs");
                return (0, 0);
            }
        };
        let plan = retention::plan_prune(&found, budget_bytes, retention, now);
        let (mut freed, mut files) = (0, 0);
        for f in found.iter().filter(|f| plan.delete.contains(&f.path)) {
            // Only directly inside the agent's log directory, whatever the scan returned.
            if f.path.parent() != Some(dir.as_path()) {
                continue;
            }
            match fs::remove_file(&f.path) {
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
