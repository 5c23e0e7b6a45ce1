//! LogRotator: a periodic job over every agent's log directory. It enforces the per-agent
//! disk budget and the retention (the decision is `logs::retention::plan_prune`, plain and
//! tested), runs the deletions off the actor, and publishes how many bytes it freed.

use crate::context::NodeContext;
use crate::logs::retention;
use crate::messages::events::Event;
use crate::messages::logs::LogsMsg;
use crate::spec::LogSpec;
use crate::state::now_ms;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use std::collections::HashMap;
use std::path::PathBuf;
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
        _myself: ActorRef<LogsMsg>,
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
            LogsMsg::Tick => {
                if rt.running {
                    return Ok(()); // the previous pass is still working
                }
                rt.running = true;
                let jobs: Vec<(LogSpec, Vec<PathBuf>)> = rt.fleets.values().cloned().collect();
                let (freed, files) = tokio::task::spawn_blocking(move || prune_all(&jobs))
                    .await
                    .unwrap_or((0, 0));
                rt.running = false;
                if files > 0 {
                    rt.ctx.publish(Event::LogsPruned {
                        bytes_freed: freed,
                        files_deleted: files,
                        at_ms: now_ms(),
                    });
                }
            }
        }
        Ok(())
    }
}

fn prune_all(jobs: &[(LogSpec, Vec<PathBuf>)]) -> (u64, u64) {
    let now = SystemTime::now();
    let (mut freed, mut files) = (0u64, 0u64);
    for (spec, homes) in jobs {
        let retention = Duration::from_secs(spec.retention_days as u64 * 86_400);
        for home in homes {
            let Ok(found) = retention::scan_agent_logs(&home.join("logs")) else {
                continue;
            };
            let plan = retention::plan_prune(&found, spec.budget_bytes, retention, now);
            for p in &plan.delete {
                // Only inside the agent's own log directory, whatever the scan returned.
                if p.starts_with(home.join("logs")) && std::fs::remove_file(p).is_ok() {
                    files += 1;
                }
            }
            freed += plan.bytes_freed;
        }
    }
    (freed, files)
}
