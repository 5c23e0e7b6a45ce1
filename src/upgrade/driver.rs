//! Carries out an upgrade, a rollback or a resume through the node's own commands (stop,
//! backup, set, start, restore, status), exactly as an operator would type them: the node's
//! actors know nothing about upgrades. Every step is saved in the record before it is taken.

use super::*;
use crate::messages::command::{AgentChange, AgentStatus, Command, Reply};
use crate::messages::events::Event;
use crate::messages::node::NodeMsg;
use ractor::ActorRef;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How often a waiting step looks at the agent's status.
const POLL: Duration = Duration::from_millis(250);
/// Bound on one command (stops wait out the agent's stop timeout).
const CALL: Duration = Duration::from_secs(900);

/// How the driver reaches the agents and where it keeps its record.
#[derive(Clone)]
pub enum Via {
    /// This node's own actor; the record in `<state>/upgrades/`.
    Node(ActorRef<NodeMsg>),
    /// Cluster mode: the commands act cluster-wide through the front door (each step where
    /// the agent runs, its backup on that node's disk); the record lives in etcd.
    Cluster {
        front: Arc<crate::cluster::front::Front>,
        local: crate::node::NodeHandle,
    },
}

#[derive(Clone)]
pub struct Driver {
    via: Via,
    ctx: Arc<crate::context::NodeContext>,
    rec: Arc<Mutex<UpgradeRecord>>,
    /// Held from a change of the record to its save: saves of one batch's agents never
    /// overlap, and land in the order of their changes.
    saving: Arc<tokio::sync::Mutex<()>>,
    started: Instant,
}

impl Driver {
    pub fn new(via: Via, ctx: Arc<crate::context::NodeContext>, rec: UpgradeRecord) -> Driver {
        Driver {
            via,
            ctx,
            rec: Arc::new(Mutex::new(rec)),
            saving: Arc::default(),
            started: Instant::now(),
        }
    }

    fn fleet(&self) -> String {
        self.rec.lock().unwrap().fleet.clone()
    }

    pub fn snapshot(&self) -> UpgradeRecord {
        self.rec.lock().unwrap().clone()
    }

    /// Changes the record and saves it before anything else happens. Err: the record could
    /// not be written (a full disk): a step that a crash would then misjudge is not taken.
    async fn update(&self, f: impl FnOnce(&mut UpgradeRecord)) -> Result<(), String> {
        let _saving = self.saving.lock().await;
        let r = {
            let mut r = self.rec.lock().unwrap();
            f(&mut r);
            r.elapsed_ms = self.started.elapsed().as_millis() as u64;
            r.clone()
        };
        let saved = match &self.via {
            Via::Node(_) => save(&self.ctx.config.state_dir, &r),
            Via::Cluster { front, .. } => front.save_upgrade(&r).await.map_err(|e| e.to_string()),
        };
        saved.map_err(|e| {
            tracing::error!(fleet = %r.fleet, error = %e, "could not save the upgrade's progress");
            format!("the upgrade's record could not be saved: {e}")
        })
    }

    async fn step(&self, agent: &str, step: Step, reason: Option<String>) -> Result<(), String> {
        let fleet = self.fleet();
        tracing::info!(
            fleet,
            agent,
            ?step,
            reason = reason.as_deref().unwrap_or(""),
            "upgrade step"
        );
        self.ctx.publish(Event::Upgrade {
            fleet,
            agent: Some(agent.to_string()),
            step: step.name().into(),
            detail: reason.clone(),
            at_ms: crate::state::now_ms(),
        });
        self.update(|r| {
            if let Some(a) = r.agent_mut(agent) {
                a.step = step;
                if reason.is_some() {
                    a.reason = reason;
                }
            }
        })
        .await
    }

    async fn cmd(&self, c: Command) -> Result<Reply, String> {
        let node = match &self.via {
            Via::Node(node) => node,
            Via::Cluster { front, local } => {
                return match front.execute(local, c).await {
                    Reply::Error(e) => Err(e.to_string()),
                    r => Ok(r),
                };
            }
        };
        match node.call(|r| NodeMsg::Command(c, r), Some(CALL)).await {
            Ok(ractor::rpc::CallResult::Success(Reply::Error(e))) => Err(e.to_string()),
            Ok(ractor::rpc::CallResult::Success(r)) => Ok(r),
            Ok(_) => Err("the node did not answer in time".into()),
            Err(e) => Err(format!("the node is gone: {e}")),
        }
    }

    /// A backup of the stopped agent: its archive's path and (cluster mode) the node whose
    /// disk holds it.
    async fn backup(&self, agent: &str) -> Result<(PathBuf, Option<String>), String> {
        let fleet = self.fleet();
        let out = match &self.via {
            Via::Node(_) => {
                let dir = backup_dir(&self.ctx.config.state_dir, &fleet);
                crate::backup::make_private_dir(&dir)?;
                Some(dir.join(crate::backup::archive_name(agent)))
            }
            // Taken where the agent runs, into that node's own backups directory.
            Via::Cluster { .. } => None,
        };
        let r = self
            .cmd(Command::AgentBackup {
                fleet,
                agent: agent.to_string(),
                out: out.clone(),
            })
            .await?;
        match (r, out) {
            (Reply::Backups(rows), _) if !rows.is_empty() => {
                Ok((rows[0].path.clone(), rows[0].node.clone()))
            }
            (_, Some(out)) => Ok((out, None)),
            (other, None) => Err(format!("the backup did not say where it is: {other:?}")),
        }
    }

    async fn restore(&self, agent: &str, backup: &Path, on: Option<String>) -> Result<(), String> {
        let cmd = Command::AgentRestore {
            fleet: self.fleet(),
            agent: agent.to_string(),
            from: backup.to_path_buf(),
            force: false,
        };
        match &self.via {
            Via::Node(_) => self.cmd(cmd).await.map(drop),
            Via::Cluster { front, local } => match front.restore_from(local, cmd, on).await {
                Reply::Error(e) => Err(e.to_string()),
                _ => Ok(()),
            },
        }
    }

    async fn status(&self, agent: &str) -> Result<AgentStatus, String> {
        match self
            .cmd(Command::Status {
                fleet: Some(self.fleet()),
                agent: Some(agent.to_string()),
            })
            .await?
        {
            Reply::Status(mut rows) if !rows.is_empty() => Ok(rows.remove(0)),
            _ => Err(format!("no status for {agent}")),
        }
    }

    async fn set_version(&self, agent: &str, own: Option<String>) -> Result<(), String> {
        let change = AgentChange {
            no_openclaw_version: own.is_none(),
            openclaw_version: own,
            ..AgentChange::default()
        };
        self.cmd(Command::AgentSet {
            fleet: self.fleet(),
            agent: agent.to_string(),
            change,
        })
        .await
        .map(|_| ())
    }

    async fn stop(&self, agent: &str) -> Result<(), String> {
        self.cmd(Command::AgentStop {
            fleet: self.fleet(),
            agent: agent.to_string(),
        })
        .await
        .map(|_| ())
    }

    async fn start(&self, agent: &str) -> Result<(), String> {
        self.cmd(Command::AgentStart {
            fleet: self.fleet(),
            agent: agent.to_string(),
        })
        .await
        .map(|_| ())
    }

    /// Waits until the agent is ready (Ok) or its start failed or the timeout passed (Err).
    async fn wait_ready(
        &self,
        agent: &str,
        restarts_before: u32,
        timeout: Duration,
    ) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            let row = self.status(agent).await?;
            if ready(&row) {
                return Ok(());
            }
            if let Some(why) = failed(&row, restarts_before) {
                return Err(why);
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "not running and ready within {} s (it is {:?}{})",
                    timeout.as_secs(),
                    row.state,
                    if row.ready { "" } else { ", not ready" }
                )
                .to_lowercase());
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// The whole rollout. Returns the final record.
    pub async fn run(self) -> UpgradeRecord {
        let rec = self.snapshot();
        let todo: Vec<String> = rec
            .agents
            .iter()
            .filter(|a| a.step == Step::Pending)
            .map(|a| a.agent.clone())
            .collect();
        for batch in batches(&todo, rec.canary, rec.max_unavailable) {
            // One task per agent of the batch (the driver is a handle: cheap to clone).
            let mut set = tokio::task::JoinSet::new();
            for a in batch {
                let d = self.clone();
                set.spawn(async move { d.upgrade_one(a).await });
            }
            let mut stop = None;
            while let Some(r) = set.join_next().await {
                if let Err(why) = r.unwrap_or_else(|e| Err(format!("an upgrade task failed: {e}")))
                {
                    stop.get_or_insert(why);
                }
            }
            if let Some(why) = stop {
                let _ = self
                    .update(|r| {
                        r.state = Rollout::Stopped;
                        r.reason = Some(why);
                    })
                    .await;
                return self.snapshot();
            }
        }
        let to = rec.to.clone();
        let _ = match self.set_fleet_version(Some(to)).await {
            Ok(()) => {
                self.update(|r| {
                    r.state = Rollout::Done;
                    r.reason = None;
                })
                .await
            }
            Err(e) => {
                self.update(|r| {
                    r.state = Rollout::Stopped;
                    r.reason = Some(format!(
                        "every agent is upgraded, but the fleet's version could not be set: {e}"
                    ));
                })
                .await
            }
        };
        self.publish_fleet("done");
        self.snapshot()
    }

    fn publish_fleet(&self, step: &str) {
        self.ctx.publish(Event::Upgrade {
            fleet: self.fleet(),
            agent: None,
            step: step.into(),
            detail: None,
            at_ms: crate::state::now_ms(),
        });
    }

    async fn set_fleet_version(&self, version: Option<String>) -> Result<(), String> {
        let fleet = self.fleet();
        let node = match &self.via {
            Via::Node(node) => node,
            Via::Cluster { front, local } => {
                return front
                    .set_fleet_version(local, &fleet, version)
                    .await
                    .map_err(|e| e.to_string())
            }
        };
        match node
            .call(
                |r| NodeMsg::SetFleetVersion {
                    fleet,
                    version,
                    reply: r,
                },
                Some(CALL),
            )
            .await
        {
            Ok(ractor::rpc::CallResult::Success(r)) => r.map_err(|e| e.to_string()),
            _ => Err("the node did not answer".into()),
        }
    }

    /// One agent: Err(why the rollout stops) when it had to be put back.
    async fn upgrade_one(&self, agent: String) -> Result<(), String> {
        let rec = self.snapshot();
        let was_running = self.status(&agent).await?.state != crate::state::AgentState::Stopped;
        // Nothing has changed yet: a record that cannot be written stops here.
        self.update(|r| {
            if let Some(a) = r.agent_mut(&agent) {
                a.was_running = was_running;
            }
        })
        .await?;
        let t0 = Instant::now();
        self.step(&agent, Step::BackingUp, None).await?;
        if let Err(e) = self.stop(&agent).await {
            return self.put_back_old(&agent, format!("stopping it: {e}")).await;
        }
        let (out, on) = match self.backup(&agent).await {
            Ok(b) => b,
            Err(e) => {
                return self
                    .put_back_old(&agent, format!("backing it up: {e}"))
                    .await
            }
        };
        let noted = self
            .update(|r| {
                if let Some(a) = r.agent_mut(&agent) {
                    a.backup = Some(out.clone());
                    a.backup_node = on.clone();
                }
            })
            .await;
        // The new version must not run unless a crash from here on is known to need a
        // rollback.
        let noted = match noted {
            Ok(()) => self.step(&agent, Step::Restarting, None).await,
            Err(e) => Err(e),
        };
        if let Err(e) = noted {
            return self.put_back_old(&agent, e).await;
        }
        let restarts = self.status(&agent).await.map(|r| r.restarts).unwrap_or(0);
        let started = async {
            self.set_version(&agent, Some(rec.to.clone())).await?;
            if was_running {
                self.start(&agent).await?;
                self.wait_ready(&agent, restarts, Duration::from_secs(rec.ready_timeout_s))
                    .await?;
            }
            Ok::<(), String>(())
        }
        .await;
        match started {
            Ok(()) => {
                let ms = t0.elapsed().as_millis() as u64;
                let _ = self
                    .update(|r| {
                        if let Some(a) = r.agent_mut(&agent) {
                            a.unavailable_ms = Some(ms);
                        }
                    })
                    .await;
                let _ = self.step(&agent, Step::Kept, None).await;
                Ok(())
            }
            Err(why) => {
                let why = format!("{agent} on {}: {why}", rec.to);
                self.roll_back_one(&agent, Some(why.clone())).await;
                Err(why)
            }
        }
    }

    /// A failure before the new version ran: the HOME is untouched, start it as it was.
    async fn put_back_old(&self, agent: &str, why: String) -> Result<(), String> {
        let a = self
            .snapshot()
            .agents
            .into_iter()
            .find(|a| a.agent == agent);
        if let Some(a) = a {
            let _ = self.set_version(agent, a.own_version.clone()).await;
            if a.was_running {
                let _ = self.start(agent).await;
            }
        }
        let _ = self.step(agent, Step::RolledBack, Some(why.clone())).await;
        Err(format!("{agent}: {why}"))
    }

    /// Stop, restore the backup, old version, start (if it ran), wait for ready (reported,
    /// not required: the old version's own health is not the rollout's to judge). A restore
    /// that fails leaves the agent stopped (`rollback_failed`): the old version must never run
    /// on state the new one may have migrated.
    async fn roll_back_one(&self, agent: &str, why: Option<String>) {
        let Some(a) = self
            .snapshot()
            .agents
            .into_iter()
            .find(|a| a.agent == agent)
        else {
            return;
        };
        let _ = self.step(agent, Step::RollingBack, why.clone()).await;
        let mut problems = Vec::new();
        if let Err(e) = self.stop(agent).await {
            problems.push(format!("stop: {e}"));
        }
        let restored = match &a.backup {
            Some(b) => self.restore(agent, b, a.backup_node.clone()).await,
            None => Err("no backup was made".to_string()),
        };
        if let Err(e) = restored {
            let reason = format!(
                "{}; rollback: restoring its backup failed ({e}): left stopped; `fleet rollback` tries again",
                why.unwrap_or_default()
            );
            let _ = self.step(agent, Step::RollbackFailed, Some(reason)).await;
            return;
        }
        // Back on exactly the version it ran (the fleet's may have moved since).
        let back = a.own_version.clone().or(a.from.clone());
        if let Err(e) = self.set_version(agent, back).await {
            problems.push(format!("version: {e}"));
        }
        if a.was_running {
            let restarts = self.status(agent).await.map(|r| r.restarts).unwrap_or(0);
            if let Err(e) = self.start(agent).await {
                problems.push(format!("start: {e}"));
            } else if let Err(e) = self
                .wait_ready(agent, restarts, Duration::from_secs(120))
                .await
            {
                problems.push(format!("after the rollback: {e}"));
            }
        }
        // The restore rotated its gateway token (the archive's must not keep working).
        let mut reason = why.unwrap_or_default();
        reason.push_str("; restored from its backup (its gateway token was rotated)");
        if !problems.is_empty() {
            reason.push_str(&format!("; rollback: {}", problems.join("; ")));
        }
        let _ = self.step(agent, Step::RolledBack, Some(reason)).await;
    }

    /// `fleet rollback`: every agent the upgrade moved goes back, newest first, then the
    /// fleet's version. Agents the upgrade did not move (already on the new version, or added
    /// since) are pinned to the version they run, so that the fleet's version going back moves
    /// none of them without a backup.
    pub async fn roll_back_all(self, fleet_version: Option<String>) -> UpgradeRecord {
        let _ = self.update(|r| r.state = Rollout::RollingBack).await;
        let rec = self.snapshot();
        let moved: Vec<String> = rec
            .agents
            .iter()
            .rev()
            .filter(|a| {
                matches!(
                    a.step,
                    Step::Kept | Step::Restarting | Step::RollingBack | Step::RollbackFailed
                )
            })
            .map(|a| a.agent.clone())
            .collect();
        for a in moved {
            self.roll_back_one(&a, Some("fleet rollback".into())).await;
        }
        // Stopped for its backup when the driving node went away (cluster mode): its HOME
        // was never run on the new version, so it only starts again as it was.
        for a in rec.agents.iter().filter(|a| a.step == Step::BackingUp) {
            let _ = self
                .put_back_old(
                    &a.agent,
                    "its upgrade was interrupted during its backup".into(),
                )
                .await;
        }
        let recorded: std::collections::BTreeSet<&str> = rec
            .agents
            .iter()
            .filter(|a| a.step != Step::Skipped)
            .map(|a| a.agent.as_str())
            .collect();
        let mut problems = Vec::new();
        if let Ok(Reply::Status(rows)) = self
            .cmd(Command::Status {
                fleet: Some(rec.fleet.clone()),
                agent: None,
            })
            .await
        {
            for row in rows.iter().filter(|r| !recorded.contains(r.agent.as_str())) {
                if let Some(v) = &row.openclaw_version {
                    if let Err(e) = self.set_version(&row.agent, Some(v.clone())).await {
                        problems.push(format!("{}: {e}", row.agent));
                    }
                }
            }
        }
        let r = self.set_fleet_version(fleet_version).await;
        if let Err(e) = r {
            problems.push(format!("the fleet's version could not be set back: {e}"));
        }
        let failed: Vec<String> = self
            .snapshot()
            .agents
            .iter()
            .filter(|a| a.step == Step::RollbackFailed)
            .map(|a| a.agent.clone())
            .collect();
        if !failed.is_empty() {
            problems.push(format!(
                "not restored (left stopped): {}",
                failed.join(", ")
            ));
        }
        let _ = self
            .update(|rec| {
                rec.state = if failed.is_empty() {
                    Rollout::RolledBack
                } else {
                    Rollout::Stopped
                };
                rec.reason = (!problems.is_empty()).then(|| problems.join("; "));
            })
            .await;
        self.publish_fleet("rolled_back");
        self.snapshot()
    }

    /// At start, for a record the last daemon left mid-way.
    pub async fn resume(self, fleet_version: Option<String>) -> UpgradeRecord {
        let rec = self.snapshot();
        if rec.state == Rollout::RollingBack {
            return self.roll_back_all(fleet_version).await;
        }
        let mut put_back = Vec::new();
        for a in &rec.agents {
            match resume(a.step) {
                Resume::Leave => {}
                Resume::StartOld => {
                    let _ = self.set_version(&a.agent, a.own_version.clone()).await;
                    if a.was_running {
                        let _ = self.start(&a.agent).await;
                    }
                    let _ = self
                        .step(
                            &a.agent,
                            Step::RolledBack,
                            Some("fleetd stopped during its backup".into()),
                        )
                        .await;
                    put_back.push(a.agent.clone());
                }
                Resume::RollBack => {
                    self.roll_back_one(
                        &a.agent,
                        Some("fleetd stopped while it was upgraded".into()),
                    )
                    .await;
                    put_back.push(a.agent.clone());
                }
            }
        }
        let _ = self
            .update(|r| {
                r.state = Rollout::Interrupted;
                r.reason = Some(format!(
                    "fleetd stopped during the upgrade; put back on the old version: {}",
                    if put_back.is_empty() {
                        "none".to_string()
                    } else {
                        put_back.join(", ")
                    }
                ));
            })
            .await;
        self.publish_fleet("interrupted");
        self.snapshot()
    }
}
