//! The node's side of day-2 operations: backup, restore, upgrade, rollback, doctor. Each
//! checks what it is asked against the registry on the actor, then does its work in a task
//! (blocking file work in `spawn_blocking`, an upgrade in `upgrade::driver`) and answers when
//! it is done.

use super::{done, now, Later, NodeRuntime, Outcome};
use crate::backup::{self, BackupDone, Expect, Limits, Meta};
use crate::error::FleetError;
use crate::isolation::tenant_fs::Identity;
use crate::isolation::Isolation;
use crate::messages::command::Reply;
use crate::messages::fleet::FleetMsg;
use crate::messages::node::NodeMsg;
use crate::provision::{self, AgentPaths};
use crate::registry::Desired;
use crate::state::AgentState;
use crate::upgrade::driver::{Driver, Via};
use crate::upgrade::{self, Rollout};
use ractor::ActorRef;
use std::path::PathBuf;
use std::sync::Arc;

/// One agent's backup job, everything it needs off the actor.
struct Job {
    home: PathBuf,
    owner: Option<Identity>,
    out: PathBuf,
    meta: Meta,
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, FleetError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(FleetError::internal)
}

impl NodeRuntime {
    /// The uid whose file rights work inside this agent's HOME (`None`: the daemon's own).
    fn home_owner(&self, fleet: &str, agent: &str) -> Result<Option<Identity>, FleetError> {
        let rec = self.agent_record(fleet, agent)?;
        let spec = &self.data.fleets[fleet].spec;
        Ok(match self.ctx.host.resolve(spec.isolation) {
            Ok(Isolation::Uid) => rec.uid.map(Identity::of_uid),
            _ => None,
        })
    }

    /// The version an agent runs, named (the default install's read from it).
    pub(super) fn effective_version(&self, fleet: &str, agent: &str) -> Option<String> {
        let spec = &self.data.fleets.get(fleet)?.spec;
        if !spec.runs_openclaw() {
            return None;
        }
        spec.openclaw_version_of(agent)
            .map(str::to_string)
            .or_else(|| provision::default_version(self.ctx.config.openclaw_bin.as_deref()))
    }

    fn backup_job(
        &self,
        fleet: &str,
        agent: &str,
        out: Option<PathBuf>,
    ) -> Result<Job, FleetError> {
        self.check_not_removing(fleet, Some(agent))?;
        self.check_not_restoring(fleet, Some(agent))?;
        let owner = self.home_owner(fleet, agent)?;
        let paths = AgentPaths::new(&self.ctx.config.state_dir, fleet, agent);
        let out = match out {
            Some(p) if !p.is_absolute() => {
                return Err(FleetError::invalid(
                    "--out",
                    format!("{} is not an absolute path", p.display()),
                ))
            }
            Some(p) => p,
            None => self
                .default_backup_dir(fleet, agent)
                .join(backup::archive_name(agent)),
        };
        Ok(Job {
            home: paths.home,
            owner,
            out,
            meta: Meta {
                fleet: fleet.to_string(),
                agent: agent.to_string(),
                openclaw_version: self.effective_version(fleet, agent),
            },
        })
    }

    fn default_backup_dir(&self, fleet: &str, agent: &str) -> PathBuf {
        self.ctx
            .config
            .state_dir
            .join("backups")
            .join(fleet)
            .join(agent)
    }

    pub(super) fn agent_backup(
        &self,
        fleet: &str,
        agent: &str,
        out: Option<PathBuf>,
    ) -> Result<Later, FleetError> {
        let default_dir = out.is_none().then(|| self.default_backup_dir(fleet, agent));
        let job = self.backup_job(fleet, agent, out)?;
        let ctx = self.ctx.clone();
        Ok(Box::pin(async move {
            let r = blocking(move || {
                if let Some(d) = default_dir {
                    backup::make_private_dir(&d).map_err(FleetError::internal)?;
                }
                run_job(job)
            })
            .await;
            match r {
                Ok(Ok(done)) => {
                    ctx.services.metrics.backup_done(true);
                    Reply::Backups(vec![done])
                }
                Ok(Err(e)) => {
                    ctx.services.metrics.backup_done(false);
                    Reply::Error(e)
                }
                Err(e) => Reply::Error(e),
            }
        }))
    }

    pub(super) fn fleet_backup(
        &self,
        fleet: &str,
        dir: Option<PathBuf>,
    ) -> Result<Later, FleetError> {
        let rec = self.fleet_record(fleet)?;
        if let Some(d) = &dir {
            if !d.is_absolute() {
                return Err(FleetError::invalid(
                    "--dir",
                    format!("{} is not an absolute path", d.display()),
                ));
            }
        }
        let mut jobs = Vec::new();
        for a in &rec.spec.agents {
            let out = dir.as_ref().map(|d| d.join(backup::archive_name(a)));
            let mk = dir.is_none().then(|| self.default_backup_dir(fleet, a));
            jobs.push((self.backup_job(fleet, a, out)?, mk));
        }
        let ctx = self.ctx.clone();
        Ok(Box::pin(async move {
            let r = blocking(move || {
                let mut ok = Vec::new();
                let mut failed = Vec::new();
                for (job, mk) in jobs {
                    let name = format!("{}/{}", job.meta.fleet, job.meta.agent);
                    let r = mk
                        .map_or(Ok(()), |d| {
                            backup::make_private_dir(&d).map_err(FleetError::internal)
                        })
                        .and_then(|()| run_job(job));
                    ctx.services.metrics.backup_done(r.is_ok());
                    match r {
                        Ok(d) => ok.push(d),
                        Err(e) => failed.push(format!("{name}: {e}")),
                    }
                }
                (ok, failed)
            })
            .await;
            match r {
                Ok((ok, failed)) if failed.is_empty() => Reply::Backups(ok),
                Ok((ok, failed)) => Reply::Error(FleetError::Partial {
                    done: if ok.is_empty() {
                        "nothing".into()
                    } else {
                        format!(
                            "backed up {}",
                            ok.iter()
                                .map(|d| d.path.display().to_string())
                                .collect::<Vec<_>>()
                                .join(", ")
                        )
                    },
                    failed: failed.join("; "),
                }),
                Err(e) => Reply::Error(e),
            }
        }))
    }

    pub(super) fn agent_restore(
        &mut self,
        myself: &ActorRef<NodeMsg>,
        fleet: &str,
        agent: &str,
        from: PathBuf,
        force: bool,
    ) -> Result<Later, FleetError> {
        let rec = self.agent_record(fleet, agent)?;
        self.check_not_removing(fleet, Some(agent))?;
        if !from.is_absolute() {
            return Err(FleetError::invalid(
                "--from",
                format!("{} is not an absolute path", from.display()),
            ));
        }
        let key = (fleet.to_string(), agent.to_string());
        let state = self.ctx.views.status.get(&key).map(|v| v.snapshot().state);
        if rec.desired != Desired::Stopped
            || !matches!(
                state,
                None | Some(AgentState::Stopped) | Some(AgentState::Failed)
            )
        {
            return Err(FleetError::invalid(
                "agent restore",
                format!("{fleet}/{agent} is not stopped: `agent stop {fleet}/{agent}` first"),
            ));
        }
        if !self.restoring.insert(key.clone()) {
            return Err(FleetError::invalid(
                "agent restore",
                format!("{fleet}/{agent} is being restored already"),
            ));
        }
        let owner = self.home_owner(fleet, agent)?;
        let home = AgentPaths::new(&self.ctx.config.state_dir, fleet, agent).home;
        let me = myself.clone();
        let (f, a) = key;
        Ok(Box::pin(async move {
            let (f2, a2) = (f.clone(), a.clone());
            let r = blocking(move || {
                let expect = Expect {
                    fleet: &f2,
                    agent: &a2,
                    force,
                };
                backup::restore_home(&home, owner, &from, &expect, &Limits::default())
                    .map_err(|e| FleetError::invalid("--from", format!("{}: {e}", from.display())))
            })
            .await;
            let reply = match r {
                Ok(Ok(m)) => {
                    // The HOME is the archive's now: a token it held must not keep working.
                    let rotated = ractor::call_t!(
                        me,
                        |r| NodeMsg::Command(
                            crate::messages::command::Command::Token {
                                fleet: f.clone(),
                                agent: a.clone(),
                                rotate: true,
                            },
                            r
                        ),
                        10_000
                    );
                    match rotated {
                        Ok(Reply::Token { .. }) => Reply::Done {
                            message: format!(
                                "agent {f}/{a} restored from the backup of {}/{} made {} ({} files, OpenClaw {}); its token was rotated",
                                m.fleet,
                                m.agent,
                                m.created,
                                m.files.len(),
                                m.openclaw_version.as_deref().unwrap_or("-")
                            ),
                        },
                        Ok(other) => Reply::Error(FleetError::Partial {
                            done: format!("agent {f}/{a} restored"),
                            failed: format!("rotating its token: {other:?}"),
                        }),
                        Err(e) => Reply::Error(FleetError::Partial {
                            done: format!("agent {f}/{a} restored"),
                            failed: format!("rotating its token: {e}"),
                        }),
                    }
                }
                Ok(Err(e)) | Err(e) => Reply::Error(e),
            };
            let _ = me.send_message(NodeMsg::RestoreDone { fleet: f, agent: a });
            reply
        }))
    }

    pub(super) fn fleet_upgrade(
        &mut self,
        myself: &ActorRef<NodeMsg>,
        fleet: &str,
        to: String,
        canary: Option<u32>,
        max_unavailable: Option<u32>,
        ready_timeout_s: Option<u64>,
    ) -> Result<Later, FleetError> {
        self.imperative_change(fleet, format!("fleet {fleet}'s OpenClaw version"))?;
        let rec = self.fleet_record(fleet)?;
        if !rec.spec.runs_openclaw() {
            return Err(FleetError::invalid(
                "fleet upgrade",
                format!("fleet {fleet} runs its own command, not OpenClaw"),
            ));
        }
        if self.upgrading.contains(fleet) {
            return Err(FleetError::invalid(
                "fleet upgrade",
                format!("an upgrade or rollback of {fleet} is under way (fleet upgrade {fleet} --status)"),
            ));
        }
        provision::resolve_openclaw_version(self.ctx.config.openclaw_bin.as_deref(), Some(&to))
            .map_err(|e| FleetError::invalid("--to", e.to_string()))?;
        let plan = upgrade::Plan {
            to,
            canary,
            max_unavailable,
            ready_timeout_s,
        };
        let default = provision::default_version(self.ctx.config.openclaw_bin.as_deref());
        let record = upgrade::new_record(&rec.spec, plan, default);
        upgrade::save(&self.ctx.config.state_dir, &record).map_err(FleetError::internal)?;
        self.upgrading.insert(fleet.to_string());
        let d = Driver::new(Via::Node(myself.clone()), self.ctx.clone(), record);
        let (me, f) = (myself.clone(), fleet.to_string());
        Ok(Box::pin(async move {
            let rec = tokio::spawn(d.run()).await;
            let _ = me.send_message(NodeMsg::UpgradeDone { fleet: f });
            match rec {
                Ok(r) => Reply::Upgrade(Box::new(r)),
                Err(e) => Reply::Error(FleetError::internal(e)),
            }
        }))
    }

    pub(super) fn fleet_rollback(
        &mut self,
        myself: &ActorRef<NodeMsg>,
        fleet: &str,
    ) -> Result<Later, FleetError> {
        self.imperative_change(fleet, format!("fleet {fleet}'s OpenClaw version"))?;
        self.fleet_ref(fleet)?;
        if self.upgrading.contains(fleet) {
            return Err(FleetError::invalid(
                "fleet rollback",
                format!("an upgrade or rollback of {fleet} is under way"),
            ));
        }
        let rec = upgrade::load(&self.ctx.config.state_dir, fleet).ok_or_else(|| {
            FleetError::invalid(
                "fleet rollback",
                format!("fleet {fleet} has no upgrade to roll back"),
            )
        })?;
        if rec.state == Rollout::RolledBack {
            return Err(FleetError::invalid(
                "fleet rollback",
                format!("the last upgrade of {fleet} is rolled back already"),
            ));
        }
        let fleet_version = rec.fleet_version.clone();
        self.upgrading.insert(fleet.to_string());
        let d = Driver::new(Via::Node(myself.clone()), self.ctx.clone(), rec);
        let (me, f) = (myself.clone(), fleet.to_string());
        Ok(Box::pin(async move {
            let rec = tokio::spawn(d.roll_back_all(fleet_version)).await;
            let _ = me.send_message(NodeMsg::UpgradeDone { fleet: f });
            match rec {
                Ok(r) => Reply::Upgrade(Box::new(r)),
                Err(e) => Reply::Error(FleetError::internal(e)),
            }
        }))
    }

    pub(super) fn upgrade_status(&self, fleet: &str) -> Result<Outcome, FleetError> {
        self.fleet_ref(fleet)?;
        match upgrade::load(&self.ctx.config.state_dir, fleet) {
            Some(r) => now(Reply::Upgrade(Box::new(r))),
            None => done(format!("fleet {fleet} has never been upgraded")),
        }
    }

    /// Upgrades and rollbacks the last daemon left mid-way: each is resumed (the agent in
    /// flight put back on its old version and state) before anything else is asked of it.
    pub(super) fn resume_upgrades(&mut self, myself: &ActorRef<NodeMsg>) {
        for rec in upgrade::load_all(&self.ctx.config.state_dir) {
            if !matches!(rec.state, Rollout::Running | Rollout::RollingBack)
                || !self.data.fleets.contains_key(&rec.fleet)
            {
                continue;
            }
            tracing::warn!(fleet = %rec.fleet, "resuming an upgrade the last fleetd left mid-way");
            let fleet = rec.fleet.clone();
            let fleet_version = rec.fleet_version.clone();
            self.upgrading.insert(fleet.clone());
            let d = Driver::new(Via::Node(myself.clone()), self.ctx.clone(), rec);
            let me = myself.clone();
            tokio::spawn(async move {
                let r = d.resume(fleet_version).await;
                tracing::info!(fleet = %r.fleet, state = ?r.state, reason = r.reason.as_deref().unwrap_or(""), "upgrade resumed");
                let _ = me.send_message(NodeMsg::UpgradeDone { fleet });
            });
        }
    }

    pub(super) async fn set_fleet_version(
        &mut self,
        fleet: &str,
        version: Option<String>,
    ) -> Result<(), FleetError> {
        let f = self.fleet_ref(fleet)?;
        let default = provision::default_version(self.ctx.config.openclaw_bin.as_deref());
        let rec = self.data.fleets.get_mut(fleet).expect("checked above");
        let before = rec.spec.clone();
        upgrade::set_fleet_version(&mut rec.spec, version, default);
        let spec = rec.spec.clone();
        if let Err(e) = self.save().await {
            self.data.fleets.get_mut(fleet).expect("checked above").spec = before;
            return Err(e);
        }
        let _ = f.send_message(FleetMsg::UpdateSpec(Arc::new(spec)));
        Ok(())
    }

    pub(super) fn doctor(
        &self,
        fleet: Option<String>,
        agent: Option<String>,
    ) -> Result<Later, FleetError> {
        if let Some(f) = &fleet {
            self.fleet_ref(f)?;
            if let Some(a) = &agent {
                self.agent_record(f, a)?;
            }
        }
        let input = crate::doctor::Input {
            state_dir: self.ctx.config.state_dir.clone(),
            openclaw_bin: self.ctx.config.openclaw_bin.clone(),
            memory_reserve: self.ctx.config.memory_reserve,
            cgroups_delegated: self.ctx.services.cgroups.is_some(),
            host: self.ctx.host,
            data: self.data.clone(),
            rows: super::status_rows(&self.ctx, &self.data, fleet.as_deref(), agent.as_deref()),
            fleet,
            agent,
        };
        Ok(Box::pin(async move {
            blocking(move || Reply::Doctor(crate::doctor::run(&input)))
                .await
                .unwrap_or_else(Reply::Error)
        }))
    }
}

fn run_job(job: Job) -> Result<BackupDone, FleetError> {
    backup::backup_home(
        &job.home,
        job.owner,
        &job.out,
        &job.meta,
        &Limits::default(),
    )
    .map_err(|e| FleetError::Backup {
        what: format!("{}/{}", job.meta.fleet, job.meta.agent),
        reason: e,
    })
}
