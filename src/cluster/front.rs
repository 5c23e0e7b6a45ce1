//! Commands in cluster mode: whatever changes desired state becomes an etcd transaction (so
//! it acts cluster-wide from any node's socket, REPL or library API), `status` and `fleet
//! list` read the whole cluster, an agent's own commands run where it runs (here) or say
//! which node runs it, and host commands (ports, top, capacity, doctor…) stay on this host.
//! The match below is exhaustive on purpose: a new command must be given its place here.

use super::declared::imperative;
use super::keys::{FleetDoc, Mark, NodeInfo};
use super::remote::patience;
use super::{ClusterConfig, Etcd};
use crate::messages::command::{AgentChange, Command, FleetInfo, NodeRow, Reply};
use crate::messages::forward::Forward;
use crate::node::NodeHandle;
use crate::spec::{AgentSettings, FleetSpec};
use crate::state::FleetState;
use crate::FleetError;
use std::sync::Arc;

pub struct Front {
    pub(super) etcd: Etcd,
    pub(super) cfg: Arc<ClusterConfig>,
    /// The node's lease while it has one (0: none), for `leave`.
    pub(super) lease: std::sync::atomic::AtomicI64,
    /// Held by the reconcile task through each round, and by a shutdown's handover: the
    /// handover starts only once no round is bringing agents in or letting them go.
    pub(super) round: tokio::sync::Mutex<()>,
}

/// How long `agent stop|start` waits for the node that runs the agent.
const SETTLE: std::time::Duration = std::time::Duration::from_secs(90);

pub(super) fn refuse(what: &str) -> Reply {
    Reply::Error(FleetError::Cluster {
        reason: format!(
            "{what} is not carried out cluster-wide by this build; nothing was changed"
        ),
    })
}

pub(super) fn done(message: String) -> Reply {
    Reply::Done { message }
}

pub(super) fn err(r: Result<Reply, FleetError>) -> Reply {
    r.unwrap_or_else(Reply::Error)
}

impl Front {
    pub fn new(etcd: Etcd, cfg: Arc<ClusterConfig>) -> Front {
        Front {
            etcd,
            cfg,
            lease: Default::default(),
            round: Default::default(),
        }
    }

    /// Gives the node's lease back (its claims and registration go with it), once its
    /// agents are stopped: the others take them over at once instead of after the TTL.
    pub async fn leave(&self) {
        let id = self.lease.swap(0, std::sync::atomic::Ordering::SeqCst);
        if id != 0 {
            let mut c = self.etcd.client.clone();
            let _ = super::bounded(c.lease_revoke(id)).await;
            tracing::info!(node = %self.cfg.node_name, "left the cluster (lease revoked)");
        }
    }

    /// A node that shuts down hands its agents' HOMEs over (`--handover-dir`) before it
    /// gives its lease back: all stopped at once, each archived, each recorded by a
    /// transaction that holds only while this node still has the claim and the fleet is
    /// as read (an agent removed meanwhile gets no record, its archive is deleted).
    pub async fn hand_over_all(&self, local: &NodeHandle) {
        use etcd_client::{Compare, CompareOp, Txn};
        let Some(dir) = self.cfg.handover_dir.clone() else {
            return;
        };
        let _no_round = self.round.lock().await;
        let me = self.cfg.node_name.clone();
        let snap = match self.etcd.snapshot(false).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "shutting down without handing the agents' HOMEs over");
                return;
            }
        };
        let desired: std::collections::BTreeSet<String> = snap.agents().into_iter().collect();
        // The live archives the handovers replace (`--snapshot-every`): read by nobody after.
        let replaced = super::handover::pending(&self.etcd, None)
            .await
            .unwrap_or_default();
        let mut work = tokio::task::JoinSet::new();
        for (a, n) in &snap.claims {
            if *n == me && desired.contains(a) {
                work.spawn(super::handover::stop_and_archive(
                    local.clone(),
                    Some(dir.clone()),
                    me.clone(),
                    a.clone(),
                ));
            }
        }
        let mut handed = 0;
        while let Some(r) = work.join_next().await {
            let Ok(Some((a, h))) = r else {
                continue;
            };
            let fleet = a.split('/').next().unwrap_or_default();
            let Some((_, rev)) = snap.fleets.get(fleet) else {
                continue;
            };
            let claim = Compare::value(self.etcd.keys.claim(&a), CompareOp::Equal, me.clone());
            let ok = match super::handover::guarded_record(&self.etcd.keys, &a, *rev, &h) {
                Ok((guard, put)) => {
                    self.etcd
                        .txn(Txn::new().when([claim, guard]).and_then([put]))
                        .await
                }
                Err(e) => Err(e),
            };
            match ok {
                Ok(true) => {
                    handed += 1;
                    if let Some((p, _)) = replaced
                        .get(&a)
                        .filter(|(p, _)| p.live && p.node == me && p.file != h.file)
                    {
                        let path = super::handover::archive_path(&dir, &a, p);
                        super::handover::remove_archive(&path);
                    }
                }
                Ok(false) => {
                    super::handover::remove_archive(&super::handover::archive_path(&dir, &a, &h))
                }
                // It may have committed: the file stays for a record that may name it.
                Err(e) => {
                    tracing::warn!(agent = %a, error = %e, "its handover record may not be written")
                }
            }
        }
        tracing::info!(node = %me, handed, "agents' HOMEs handed over for the shutdown");
    }

    pub fn node_name(&self) -> &str {
        &self.cfg.node_name
    }

    pub fn socket(&self) -> &str {
        &self.cfg.socket
    }

    /// Creates a fleet in the cluster's desired state (the library API's `create_fleet`).
    /// What the spec names on this host's disk (a template, a tenant's secrets and files)
    /// is read here, once, and goes into etcd with it.
    pub async fn create_fleet(&self, spec: FleetSpec) -> Result<(), FleetError> {
        spec.check()?;
        let mut spec = crate::provision::accepted_spec(spec).await?;
        spec.token_seed = Some(crate::spec::Secret::new(crate::provision::generate_token()?));
        let name = spec.name.clone();
        self.etcd
            .update_fleet(&name, |old| match old {
                Some(_) => Err(FleetError::FleetExists {
                    fleet: name.clone(),
                }),
                None => Ok(Some(FleetDoc {
                    spec: spec.clone(),
                    stopped: Default::default(),
                    declared_by: None,
                })),
            })
            .await
    }

    /// One command, cluster-wide. Boxed, with its `Send` stated: an upgrade's driver runs
    /// its steps through this very function, and the compiler cannot prove `Send` of a
    /// future that contains itself.
    pub fn execute<'a>(
        &'a self,
        local: &'a NodeHandle,
        cmd: Command,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Reply> + Send + 'a>> {
        Box::pin(self.execute_here(local, cmd))
    }

    async fn execute_here(&self, local: &NodeHandle, cmd: Command) -> Reply {
        match cmd {
            Command::FleetCreate { .. } => {
                let Some(spec) = cmd.create_spec() else {
                    return refuse("fleet create");
                };
                let (fleet, agents) = (spec.name.clone(), spec.agents.len());
                match self.create_fleet(spec).await {
                    Ok(()) => done(format!(
                        "fleet {fleet} created with {agents} agents (cluster-wide)"
                    )),
                    Err(e) => Reply::Error(e),
                }
            }
            Command::FleetRm { fleet, purge } => {
                let r = self
                    .etcd
                    .update_fleet(&fleet, |old| match old {
                        None => Err(FleetError::NoSuchFleet {
                            fleet: fleet.clone(),
                        }),
                        Some(d) => imperative(&d, format!("fleet {fleet}")).map(|()| None),
                    })
                    .await;
                match r {
                    Ok(()) if purge => self.purge_everywhere(local, &fleet, None).await,
                    Ok(()) => done(format!("fleet {fleet} removed (cluster-wide)")),
                    Err(e) => Reply::Error(e),
                }
            }
            Command::AgentAdd {
                fleet,
                agent,
                settings,
            } => {
                if let Err(e) = crate::ids::validate_id("agent", &agent) {
                    return Reply::Error(e);
                }
                let tenant = match accept_change(&fleet, &agent, &settings, None).await {
                    Ok(t) => t,
                    Err(e) => return Reply::Error(e),
                };
                let r = self
                    .change_agents(&fleet, |doc| {
                        imperative(doc, format!("fleet {fleet}"))?;
                        if doc.spec.agents.contains(&agent) {
                            return Err(FleetError::AgentExists {
                                fleet: fleet.clone(),
                                agent: agent.clone(),
                            });
                        }
                        doc.spec.agents.push(agent.clone());
                        if let Some(t) = &tenant {
                            doc.spec.tenants.insert(agent.clone(), t.clone());
                        }
                        doc.spec.check()
                    })
                    .await;
                err(r.map(|()| done(format!("agent {fleet}/{agent} added (cluster-wide)"))))
            }
            Command::AgentSet {
                fleet,
                agent,
                change,
            } => err(self.set_tenant(&fleet, &agent, &change).await),
            Command::AgentRm {
                fleet,
                agent,
                purge,
            } => {
                let r = self
                    .change_agents(&fleet, |doc| {
                        imperative(doc, format!("fleet {fleet}"))?;
                        let before = doc.spec.agents.len();
                        doc.spec.agents.retain(|a| a != &agent);
                        if doc.spec.agents.len() == before {
                            return Err(FleetError::NoSuchAgent {
                                fleet: fleet.clone(),
                                agent: agent.clone(),
                            });
                        }
                        doc.stopped.remove(&agent);
                        doc.spec.tenants.remove(&agent);
                        Ok(())
                    })
                    .await;
                match r {
                    Ok(()) if purge => self.purge_everywhere(local, &fleet, Some(&agent)).await,
                    Ok(()) => done(format!("agent {fleet}/{agent} removed (cluster-wide)")),
                    Err(e) => Reply::Error(e),
                }
            }
            Command::AgentStart { fleet, agent } => {
                self.set_stopped(&fleet, Some(&agent), false).await
            }
            Command::AgentStop { fleet, agent } => {
                self.set_stopped(&fleet, Some(&agent), true).await
            }
            Command::FleetStart { fleet } => self.set_stopped(&fleet, None, false).await,
            Command::FleetStop { fleet } => self.set_stopped(&fleet, None, true).await,
            Command::Status { fleet, agent } => err(self.status(fleet, agent).await),
            Command::FleetList => err(self.fleet_list().await),
            Command::Reload { dry_run } => err(self.reload(local, dry_run).await),
            Command::FleetUpgrade {
                fleet,
                to,
                canary,
                max_unavailable,
                ready_timeout_s,
            } => {
                let plan = crate::upgrade::Plan {
                    to,
                    canary,
                    max_unavailable,
                    ready_timeout_s,
                };
                err(self.upgrade(local, &fleet, plan).await)
            }
            Command::FleetUpgradeStatus { fleet } => err(self.upgrade_status(&fleet).await),
            Command::FleetRollback { fleet } => err(self.rollback(local, &fleet).await),
            Command::NodeList => err(self.node_list().await),
            Command::NodeCordon { node } => err(self.mark(&node, Some(Mark::Cordon)).await),
            Command::NodeDrain { node } => err(self.mark(&node, Some(Mark::Drain)).await),
            Command::NodeUncordon { node } => err(self.mark(&node, None).await),
            // A stream cannot cross nodes: `logs --follow` names the node's socket.
            Command::Logs {
                ref fleet,
                ref agent,
                follow: true,
                ..
            } => match self.follows_here(fleet, agent).await {
                Ok(()) => local.execute_local(cmd).await,
                Err(e) => Reply::Error(e),
            },
            Command::AgentRestore {
                fleet,
                agent,
                from,
                force,
            } => err(self.restore(local, fleet, agent, from, force).await),
            Command::FleetRestart { ref fleet } | Command::FleetBackup { ref fleet, .. } => {
                let fleet = fleet.clone();
                err(self.on_every_holder(local, &fleet, cmd).await)
            }
            Command::Token {
                fleet,
                agent,
                rotate: true,
            } => err(self.rotate_token(local, &fleet, &agent).await),
            // This host's own figures and tools.
            Command::Ports
            | Command::Top
            | Command::Capacity
            | Command::Events
            | Command::Watch { .. }
            | Command::Help { .. }
            | Command::Doctor { .. }
            | Command::Webhooks { .. }
            | Command::Shutdown => local.execute_local(cmd).await,
            // An agent's own commands (`remote::agent_command`): where it runs.
            Command::Logs {
                ref fleet,
                ref agent,
                ..
            }
            | Command::AgentConfig {
                ref fleet,
                ref agent,
            }
            | Command::Token {
                ref fleet,
                ref agent,
                ..
            }
            | Command::ExecContext {
                ref fleet,
                ref agent,
            }
            | Command::Say {
                ref fleet,
                ref agent,
                ..
            }
            | Command::AgentRestart {
                ref fleet,
                ref agent,
            }
            | Command::AgentBackup {
                ref fleet,
                ref agent,
                ..
            } => {
                let (fleet, agent) = (fleet.clone(), agent.clone());
                self.where_it_runs_do(local, &fleet, &agent, cmd).await
            }
        }
    }

    /// One of an agent's own commands (`remote::agent_command`), here or at its node.
    async fn where_it_runs_do(
        &self,
        local: &NodeHandle,
        fleet: &str,
        agent: &str,
        cmd: Command,
    ) -> Reply {
        match self.where_it_runs(fleet, agent).await {
            Ok(None) => self.stamped(local.execute_local(cmd).await),
            Ok(Some((node, _))) => {
                let wait = patience(&cmd);
                self.ask(node, Forward::Command { command: cmd }, Vec::new(), wait)
                    .await
            }
            Err(e) => Reply::Error(e),
        }
    }

    /// `token --rotate`: the agent's token epoch goes up by one in its fleet's doc; the node
    /// that runs it derives the new token and takes it (as does any node it moves to). The
    /// answer waits, bounded, until that node has it.
    pub(super) async fn rotate_token(
        &self,
        local: &NodeHandle,
        fleet: &str,
        agent: &str,
    ) -> Result<Reply, FleetError> {
        let mut new_token = String::new();
        self.change_agents(fleet, |doc| {
            if !doc.spec.agents.iter().any(|a| a == agent) {
                return Err(FleetError::NoSuchAgent {
                    fleet: fleet.into(),
                    agent: agent.into(),
                });
            }
            let Some(seed) = doc.spec.token_seed.clone() else {
                return Err(FleetError::Cluster {
                    reason: format!(
                        "fleet {fleet}'s doc in etcd has no token seed; nothing was changed"
                    ),
                });
            };
            let epoch = doc.spec.token_epochs.entry(agent.into()).or_insert(0);
            *epoch += 1;
            new_token = crate::provision::derived_token(&seed, fleet, agent, *epoch);
            Ok(())
        })
        .await?;
        let token = Reply::Token {
            fleet: fleet.into(),
            agent: agent.into(),
            token: new_token.clone(),
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
        loop {
            let ask = Command::Token {
                fleet: fleet.into(),
                agent: agent.into(),
                rotate: false,
            };
            match self.where_it_runs_do(local, fleet, agent, ask).await {
                Reply::Token { token: t, .. } if t == new_token => return Ok(token),
                // Not running anywhere: whichever node starts it derives the new one.
                Reply::Error(FleetError::Cluster { reason }) if reason.contains("runs on no node") => {
                    return Ok(token)
                }
                _ if std::time::Instant::now() > deadline => {
                    return Err(FleetError::Partial {
                        done: format!("a new token for {fleet}/{agent} is in the desired state"),
                        failed: "the node that runs it has not taken it within 15 s; it will at its next round".into(),
                    })
                }
                _ => tokio::time::sleep(std::time::Duration::from_millis(250)).await,
            }
        }
    }

    /// `agent start|stop`, `fleet start|stop`: the stopped set in the fleet's doc.
    pub async fn set_stopped(&self, fleet: &str, agent: Option<&str>, stopped: bool) -> Reply {
        let r = self
            .change_agents(fleet, |doc| {
                match agent {
                    Some(a) => {
                        if !doc.spec.agents.iter().any(|x| x == a) {
                            return Err(FleetError::NoSuchAgent {
                                fleet: fleet.into(),
                                agent: a.into(),
                            });
                        }
                        if stopped {
                            doc.stopped.insert(a.into());
                        } else {
                            doc.stopped.remove(a);
                        }
                    }
                    None if stopped => doc.stopped = doc.spec.agents.iter().cloned().collect(),
                    None => doc.stopped.clear(),
                }
                Ok(())
            })
            .await;
        let what = match agent {
            Some(a) => format!("agent {fleet}/{a}"),
            None => format!("fleet {fleet}"),
        };
        let verb = if stopped { "stopped" } else { "started" };
        if let Err(e) = r {
            return Reply::Error(e);
        }
        // One agent's answer waits until the node that runs it has done it (an upgrade
        // backs up only a stopped agent); a fleet's is given once asked.
        if let Some(a) = agent {
            if let Err(e) = self.settle(fleet, a, stopped).await {
                return Reply::Error(e);
            }
        }
        done(format!("{what} {verb} (cluster-wide)"))
    }

    /// Waits (bounded) until the node that runs `fleet/agent` has stopped it (or started
    /// it), as its published rows say.
    async fn settle(&self, fleet: &str, agent: &str, stopped: bool) -> Result<(), FleetError> {
        let deadline = std::time::Instant::now() + SETTLE;
        loop {
            let snap = self.etcd.snapshot(true).await?;
            let row = super::cluster_status(&snap)
                .into_iter()
                .find(|r| r.fleet == fleet && r.agent == agent);
            // What the node that runs it published once it carried the stop or start out
            // (a row no node publishes: nobody runs it, nothing to wait for).
            let (settled, seen) = match &row {
                None => (true, "gone".to_string()),
                Some(r) => (
                    r.held_stopped.is_none_or(|held| held == stopped),
                    format!("{:?}", r.state).to_lowercase(),
                ),
            };
            if settled {
                return Ok(());
            }
            if std::time::Instant::now() > deadline {
                let verb = if stopped { "stop" } else { "start" };
                return Err(FleetError::Partial {
                    done: format!("{fleet}/{agent}'s {verb} is in the desired state"),
                    failed: format!(
                        "it was not done within {} s (it is {seen}); the node that runs it keeps trying",
                        SETTLE.as_secs()
                    ),
                });
            }
            tokio::time::sleep(std::time::Duration::from_millis(250)).await;
        }
    }

    /// `agent set` / `agent secret`: the new settings are read here from the old ones in
    /// etcd, and written only if nobody changed that agent's settings meanwhile.
    async fn set_tenant(
        &self,
        fleet: &str,
        agent: &str,
        change: &AgentChange,
    ) -> Result<Reply, FleetError> {
        let snap = self.etcd.snapshot(false).await?;
        let doc = snap.doc_with(fleet, agent)?;
        imperative(doc, format!("agent {fleet}/{agent}'s settings"))?;
        let old = doc.spec.tenant(agent).cloned();
        let new = accept_change(fleet, agent, change, old.as_ref())
            .await?
            .filter(|t| !t.is_empty());
        if new == old {
            return Ok(done(format!("agent {fleet}/{agent}: nothing changed")));
        }
        self.change_agents(fleet, |doc| {
            imperative(doc, format!("agent {fleet}/{agent}'s settings"))?;
            if doc.spec.tenant(agent) != old.as_ref() {
                return Err(FleetError::Cluster {
                    reason: format!("agent {fleet}/{agent}'s settings were changed by another command meanwhile; nothing was changed, try again"),
                });
            }
            match &new {
                Some(t) => doc.spec.tenants.insert(agent.to_string(), t.clone()),
                None => doc.spec.tenants.remove(agent),
            };
            doc.spec.check()
        })
        .await?;
        Ok(done(format!(
            "agent {fleet}/{agent}: settings changed (cluster-wide); it restarts where it runs"
        )))
    }

    async fn change_agents(
        &self,
        fleet: &str,
        mut f: impl FnMut(&mut FleetDoc) -> Result<(), FleetError>,
    ) -> Result<(), FleetError> {
        self.etcd
            .update_fleet(fleet, |old| {
                let mut doc = old.ok_or_else(|| FleetError::NoSuchFleet {
                    fleet: fleet.into(),
                })?;
                f(&mut doc)?;
                Ok(Some(doc))
            })
            .await
    }

    /// Whether `logs --follow` of the agent can be served here (a stream does not cross
    /// nodes), else the error naming the node and its socket.
    pub async fn follows_here(&self, fleet: &str, agent: &str) -> Result<(), FleetError> {
        match self.where_it_runs(fleet, agent).await? {
            None => Ok(()),
            Some((node, socket)) => Err(FleetError::Cluster {
                reason: format!(
                    "{fleet}/{agent} runs on node {node}: follow its logs at that node's socket ({socket}), or leave out --follow to fetch them from here"
                ),
            }),
        }
    }

    /// `None`: the agent runs here; else the node that runs it, with its socket.
    pub(super) async fn where_it_runs(
        &self,
        fleet: &str,
        agent: &str,
    ) -> Result<Option<(String, String)>, FleetError> {
        let snap = self.etcd.snapshot(false).await?;
        snap.doc_with(fleet, agent)?;
        match snap.claims.get(&format!("{fleet}/{agent}")) {
            Some(n) if n == &self.cfg.node_name => Ok(None),
            Some(n) => {
                let socket = snap
                    .nodes
                    .get(n)
                    .map(|i| i.socket.clone())
                    .unwrap_or_else(|| "unknown".into());
                Ok(Some((n.clone(), socket)))
            }
            None => Err(FleetError::Cluster {
                reason: format!("{fleet}/{agent} runs on no node right now"),
            }),
        }
    }

    async fn status(
        &self,
        fleet: Option<String>,
        agent: Option<String>,
    ) -> Result<Reply, FleetError> {
        let snap = self.etcd.snapshot(true).await?;
        if let Some(f) = &fleet {
            let Some((doc, _)) = snap.fleets.get(f) else {
                return Err(FleetError::NoSuchFleet { fleet: f.clone() });
            };
            if let Some(a) = &agent {
                if !doc.spec.agents.contains(a) {
                    return Err(FleetError::NoSuchAgent {
                        fleet: f.clone(),
                        agent: a.clone(),
                    });
                }
            }
        }
        let rows = super::cluster_status(&snap)
            .into_iter()
            .filter(|r| fleet.as_ref().is_none_or(|f| &r.fleet == f))
            .filter(|r| agent.as_ref().is_none_or(|a| &r.agent == a))
            .collect();
        Ok(Reply::Status(rows))
    }

    async fn fleet_list(&self) -> Result<Reply, FleetError> {
        let snap = self.etcd.snapshot(true).await?;
        let rows = super::cluster_status(&snap);
        let infos = snap
            .fleets
            .iter()
            .map(|(name, (doc, _))| {
                let running = rows
                    .iter()
                    .filter(|r| &r.fleet == name && r.state == crate::state::AgentState::Running)
                    .count();
                FleetInfo {
                    fleet: name.clone(),
                    state: if doc.stopped.len() == doc.spec.agents.len()
                        && !doc.spec.agents.is_empty()
                    {
                        FleetState::Stopped
                    } else {
                        FleetState::Running
                    },
                    strategy: doc.spec.strategy,
                    restart: doc.spec.restart,
                    agents: doc.spec.agents.len(),
                    running,
                    reason: None,
                }
            })
            .collect();
        Ok(Reply::Fleets(infos))
    }

    async fn node_list(&self) -> Result<Reply, FleetError> {
        let snap = self.etcd.snapshot(false).await?;
        let mut names: Vec<&String> = snap.nodes.keys().chain(snap.marks.keys()).collect();
        names.sort();
        names.dedup();
        let rows = names
            .into_iter()
            .map(|n| {
                let info: Option<&NodeInfo> = snap.nodes.get(n);
                NodeRow {
                    node: n.clone(),
                    lease: if info.is_some() { "live" } else { "expired" }.into(),
                    mark: snap.marks.get(n).map(|m| m.as_str().to_string()),
                    leader: snap.leader.as_deref() == Some(n.as_str()),
                    agents: snap.claims.values().filter(|h| *h == n).count() as u64,
                    placed: snap.assign.values().filter(|h| *h == n).count() as u64,
                    capacity: info.map(|i| i.capacity.clone()),
                    socket: info.map(|i| i.socket.clone()),
                }
            })
            .collect();
        Ok(Reply::Nodes(rows))
    }

    async fn mark(&self, node: &str, mark: Option<Mark>) -> Result<Reply, FleetError> {
        crate::ids::validate_id("node", node)?;
        let snap = self.etcd.snapshot(false).await?;
        if !snap.nodes.contains_key(node) && !snap.marks.contains_key(node) {
            return Err(FleetError::Cluster {
                reason: format!("no node named {node:?} in the cluster"),
            });
        }
        let key = self.etcd.keys.cordon(node);
        match mark {
            Some(m) => self.etcd.put(key, m.as_str().into(), None).await?,
            None => self.etcd.delete(key).await?,
        }
        Ok(done(match mark {
            Some(Mark::Cordon) => format!("node {node} cordoned: it takes no new agents"),
            Some(Mark::Drain) => {
                format!("node {node} draining: its agents move to the other nodes")
            }
            None => format!("node {node} uncordoned"),
        }))
    }
}

/// An agent's settings after `change` (over `old`, `None`: none), with what they name read
/// from this host's disk; `None` when the change sets nothing.
async fn accept_change(
    fleet: &str,
    agent: &str,
    change: &AgentChange,
    old: Option<&AgentSettings>,
) -> Result<Option<AgentSettings>, FleetError> {
    if change.is_empty() {
        return Ok(old.cloned());
    }
    crate::provision::accepted_change(change, &old.cloned().unwrap_or_default(), fleet, agent)
        .await
        .map(Some)
}
