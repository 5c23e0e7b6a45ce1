//! NodeActor: the root. Starts the PortAllocator and the LogRotator, one FleetSupervisor per
//! fleet, turns every admin command into messages to them, and keeps the desired state in
//! the registry (saved before a command replies). It never waits on an agent itself: long
//! operations (stops) are awaited from tasks or by the fleets.

use crate::actors::call_t;
use crate::actors::fleet::{FleetArgs, FleetSupervisor};
use crate::actors::logs::LogRotator;
use crate::actors::ports::PortAllocator;
use crate::admin::parse::help_text;
use crate::context::NodeContext;
use crate::error::FleetError;
use crate::messages::command::{AgentStatus, Command, FleetInfo, PortLeaseRow, Reply};
use crate::messages::fleet::{AgentOp, FleetMsg};
use crate::messages::logs::LogsMsg;
use crate::messages::node::NodeMsg;
use crate::messages::ports::PortsMsg;
use crate::ports::Lease;
use crate::provision::{self, AgentPaths};
use crate::reconcile::{self, Action};
use crate::registry::{AgentRecord, Desired, FleetRecord, Origin, RegistryData, Store};
use crate::spec::FleetSpec;
use crate::specfile;
use crate::state::FleetState;
use ractor::rpc::CallResult;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

pub struct NodeActor;

pub struct NodeArgs {
    pub ctx: Arc<NodeContext>,
    pub store: Box<dyn Store>,
    pub data: RegistryData,
}

pub struct NodeRuntime {
    ctx: Arc<NodeContext>,
    store: crate::registry::Writer,
    data: RegistryData,
    fleets: BTreeMap<String, ActorRef<FleetMsg>>,
    ports: ActorRef<PortsMsg>,
    logs: ActorRef<LogsMsg>,
    /// Names whose removal is under way (`None`: the whole fleet). Until it is complete (the
    /// processes gone, the HOME purged, the lease released) the name cannot be created again:
    /// the old removal would otherwise delete the new agent's HOME or lease.
    removing: std::collections::BTreeSet<(String, Option<String>)>,
    /// Agents whose HOME a restore is replacing: they cannot be started meanwhile.
    restoring: std::collections::BTreeSet<(String, String)>,
    /// `fleet/agent` of agents an `ApplySpec` adds stopped (cluster mode: a handover's
    /// archive is restored into the HOME before the agent's first start here). Until
    /// `HandedIn` nothing starts them: a start forwarded from another node, or an upgrade's,
    /// between the apply and the restore would make the restore refuse a running agent.
    hold: std::collections::BTreeSet<String>,
    /// Fleets with an upgrade or rollback under way (one at a time per fleet).
    upgrading: std::collections::BTreeSet<String>,
    /// The webhook routes the front door is to get and last took.
    front_door: Arc<std::sync::Mutex<front_door::FrontDoorState>>,
    /// Held while a front door config is written and the proxy reloaded: one at a time.
    front_door_writer: Arc<std::sync::Mutex<()>>,
}

mod day2;
mod front_door;
mod tenants;

const CALL: Duration = Duration::from_secs(10);
/// Bound for calls that wait on agents' stops (each within its stop timeout; a one_for_all
/// fleet stops its agents one after another).
const LONG_CALL: Duration = Duration::from_secs(900);
/// How long observed pids/ports changes are gathered before one registry write.
const OBSERVED_BATCH: Duration = Duration::from_millis(200);

impl Actor for NodeActor {
    type Msg = NodeMsg;
    type State = NodeRuntime;
    type Arguments = NodeArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<NodeMsg>,
        a: NodeArgs,
    ) -> Result<NodeRuntime, ActorProcessingErr> {
        let (ports, _) = Actor::spawn_linked(
            None,
            PortAllocator,
            (a.ctx.config.port_range, a.ctx.services.metrics.clone()),
            myself.get_cell(),
        )
        .await?;
        let (logs, _) =
            Actor::spawn_linked(None, LogRotator, a.ctx.clone(), myself.get_cell()).await?;
        tokio::spawn(crate::sampler::run(a.ctx.clone(), myself.clone()));
        tokio::spawn(crate::backup::schedule::run(a.ctx.clone(), myself.clone()));
        // Pids and ports change at every restart: batch their registry writes.
        let (ctx, me) = (a.ctx.clone(), myself.clone());
        tokio::spawn(async move {
            loop {
                ctx.views.observed_changed.notified().await;
                tokio::time::sleep(OBSERVED_BATCH).await;
                if me.send_message(NodeMsg::FlushObserved).is_err() {
                    return;
                }
            }
        });
        let mut rt = NodeRuntime {
            ctx: a.ctx,
            store: crate::registry::Writer::start(a.store),
            data: RegistryData::default(),
            fleets: BTreeMap::new(),
            ports,
            logs,
            removing: Default::default(),
            restoring: Default::default(),
            hold: Default::default(),
            upgrading: Default::default(),
            front_door: Default::default(),
            front_door_writer: Default::default(),
        };
        let data = a.data;
        rt.data.version = data.version;
        rt.data.node_id = data.node_id.clone();
        // Bring back every fleet in its desired state, with the same ports and tokens: the
        // registry is what is desired and nothing runs yet.
        let mut records = data.fleets;
        let desired: Vec<FleetSpec> = records.values().map(|r| r.spec.clone()).collect();
        for action in reconcile::plan(&[], &desired) {
            let Action::AddFleet(spec) = action else {
                continue; // from nothing, a plan only adds
            };
            let Some(rec) = records.remove(&spec.name) else {
                continue;
            };
            if let Err(e) = rt.restore_fleet(&myself, rec).await {
                tracing::error!(fleet = %spec.name, error = %e, "could not restore fleet");
            }
        }
        rt.resume_upgrades(&myself);
        // The front door gets the routes as they are now, whatever it was last given.
        rt.sync_front_door();
        Ok(rt)
    }

    async fn handle(
        &self,
        myself: ActorRef<NodeMsg>,
        msg: NodeMsg,
        rt: &mut NodeRuntime,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            NodeMsg::Command(cmd, reply) => rt.answer(&myself, cmd, reply).await,
            NodeMsg::SetFleetVersion {
                fleet,
                version,
                reply,
            } => {
                let _ = reply.send(rt.set_fleet_version(&fleet, version).await);
            }
            NodeMsg::RestoreDone { fleet, agent } => {
                rt.restoring.remove(&(fleet, agent));
            }
            NodeMsg::UpgradeDone { fleet } => {
                rt.upgrading.remove(&fleet);
            }
            NodeMsg::CreateFleet(spec, reply) => {
                let r = rt
                    .create_fleet(&myself, *spec, Desired::Running, Origin::Command)
                    .await;
                let _ = reply.send(r);
            }
            NodeMsg::ApplySpec(specs, hold, reply) => {
                // Each apply names every agent it holds: an earlier hold it does not name is
                // over (the cluster hands agents in before its next apply).
                rt.hold = hold;
                let r = rt.apply_spec(&myself, specs, false).await;
                let fleets = &rt.data.fleets;
                rt.hold.retain(|k| {
                    k.split_once('/').is_some_and(|(f, a)| {
                        fleets.get(f).is_some_and(|r| r.agents.contains_key(a))
                    })
                });
                let _ = reply.send(r);
            }
            NodeMsg::HandedIn { fleet, agent } => {
                rt.hold.remove(&format!("{fleet}/{agent}"));
            }
            NodeMsg::MovePort {
                fleet,
                agent,
                stride,
                reply,
            } => {
                let r = rt.move_port(&fleet, &agent, stride).await;
                let _ = reply.send(r);
            }
            NodeMsg::InjectPanic { fleet, agent } => {
                if let Some(f) = rt.fleets.get(&fleet) {
                    let _ = f.send_message(FleetMsg::InjectPanic { agent });
                }
            }
            NodeMsg::AgentTokens {
                fleet,
                agent,
                reply,
            } => {
                let _ = reply.send(rt.redactions(&fleet, &agent));
            }
            NodeMsg::RemovalDone { fleet, agent } => {
                rt.removing.remove(&(fleet, agent));
            }
            NodeMsg::MemoryLimit {
                fleet,
                agent,
                reason,
            } => {
                if let Some(f) = rt.fleets.get(&fleet) {
                    let _ = f.send_message(FleetMsg::MemoryLimit { agent, reason });
                }
            }
            NodeMsg::FlushObserved => {
                if let Err(e) = rt.flush_observed().await {
                    tracing::error!(error = %e, "could not save observed pids and ports");
                }
            }
            NodeMsg::Shutdown(reply) => {
                let fleets: Vec<ActorRef<FleetMsg>> = rt.fleets.values().rev().cloned().collect();
                tokio::spawn(async move {
                    let mut waits = Vec::new();
                    for f in fleets {
                        waits.push(tokio::spawn(async move {
                            let _ = f
                                .call(|r| FleetMsg::StopAll { reply: r }, Some(LONG_CALL))
                                .await;
                        }));
                    }
                    for w in waits {
                        let _ = w.await;
                    }
                    let _ = reply.send(());
                });
            }
        }
        Ok(())
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<NodeMsg>,
        rt: &mut NodeRuntime,
    ) -> Result<(), ActorProcessingErr> {
        if let Err(e) = rt.flush_observed().await {
            tracing::error!(error = %e, "could not save observed pids and ports at stop");
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        _myself: ActorRef<NodeMsg>,
        evt: ractor::SupervisionEvent,
        _rt: &mut NodeRuntime,
    ) -> Result<(), ActorProcessingErr> {
        // A fleet or service actor that dies is logged; the other fleets keep running.
        match evt {
            ractor::SupervisionEvent::ActorFailed(c, e) => {
                tracing::error!(actor = ?c.get_id(), error = %e, "child actor failed")
            }
            ractor::SupervisionEvent::ActorTerminated(c, _, r) => {
                tracing::debug!(actor = ?c.get_id(), reason = ?r, "child actor stopped")
            }
            _ => {}
        }
        Ok(())
    }
}

/// Work that answers later (a stop to wait for, a file to read): `command` runs it in a task
/// and replies with what it gives, so no handler waits on agents.
type Later = std::pin::Pin<Box<dyn std::future::Future<Output = Reply> + Send>>;

/// What an operation gives back; only `command` turns it into a reply.
enum Outcome {
    Now(Reply),
    Later(Later),
}

fn done(msg: impl Into<String>) -> Result<Outcome, FleetError> {
    Ok(Outcome::Now(Reply::Done {
        message: msg.into(),
    }))
}

fn now(r: Reply) -> Result<Outcome, FleetError> {
    Ok(Outcome::Now(r))
}

impl NodeRuntime {
    /// Runs one command and answers it: at once, or from a task once its work is done.
    async fn answer(
        &mut self,
        myself: &ActorRef<NodeMsg>,
        cmd: Command,
        reply: ractor::RpcReplyPort<Reply>,
    ) {
        match self.command(myself, cmd).await {
            Ok(Outcome::Now(r)) => {
                let _ = reply.send(r);
            }
            Ok(Outcome::Later(work)) => {
                tokio::spawn(async move {
                    let _ = reply.send(work.await);
                });
            }
            Err(e) => {
                let _ = reply.send(Reply::Error(e));
            }
        }
    }

    async fn command(
        &mut self,
        myself: &ActorRef<NodeMsg>,
        cmd: Command,
    ) -> Result<Outcome, FleetError> {
        match cmd {
            Command::FleetCreate { .. } => {
                let spec = cmd
                    .create_spec()
                    .ok_or_else(|| FleetError::internal("create_spec"))?;
                let (fleet, agents) = (spec.name.clone(), spec.agents.len());
                self.create_fleet(myself, spec, Desired::Running, Origin::Command)
                    .await?;
                done(format!("fleet {fleet} created with {agents} agents"))
            }
            Command::FleetList => now(Reply::Fleets(self.fleet_infos())),
            Command::FleetStart { fleet } => {
                self.run_fleet(&fleet, false).await?;
                done(format!("fleet {fleet} started"))
            }
            Command::FleetRestart { fleet } => {
                self.run_fleet(&fleet, true).await?;
                done(format!("fleet {fleet} restarting"))
            }
            Command::FleetStop { fleet } => {
                let f = self.fleet_ref(&fleet)?;
                self.set_fleet_desired(&fleet, Desired::Stopped).await?;
                Ok(Outcome::Later(Box::pin(async move {
                    let _ = f
                        .call(|r| FleetMsg::StopAll { reply: r }, Some(LONG_CALL))
                        .await;
                    Reply::Done {
                        message: format!("fleet {fleet} stopped"),
                    }
                })))
            }
            Command::FleetRm { fleet, purge } => {
                self.imperative_change(&fleet, format!("fleet {fleet}"))?;
                Ok(Outcome::Later(
                    self.remove_fleet(myself, fleet, purge).await?,
                ))
            }
            Command::AgentAdd {
                fleet,
                agent,
                settings,
            } => {
                self.imperative_change(&fleet, format!("fleet {fleet}"))?;
                crate::ids::validate_id("agent", &agent)?;
                self.fleet_ref(&fleet)?;
                let tenant = self.new_tenant(&fleet, &agent, &settings).await?;
                self.add_agent(&fleet, &agent, tenant).await?;
                done(format!("agent {fleet}/{agent} added"))
            }
            Command::AgentSet {
                fleet,
                agent,
                change,
            } => done(self.set_tenant(&fleet, &agent, change).await?),
            Command::AgentConfig { fleet, agent } => {
                Ok(Outcome::Later(self.agent_view(&fleet, &agent, true)?))
            }
            Command::Say { fleet, agent, text } => {
                Ok(Outcome::Later(self.say(&fleet, &agent, text)?))
            }
            Command::Watch { .. } => Err(FleetError::invalid(
                "watch",
                "watch is a setting of the REPL on a terminal",
            )),
            Command::ExecContext { fleet, agent } => {
                Ok(Outcome::Later(self.agent_view(&fleet, &agent, false)?))
            }
            Command::AgentStart { fleet, agent } => Ok(Outcome::Later(
                self.agent_op(fleet, agent, AgentOp::Start, Desired::Running)
                    .await?,
            )),
            Command::AgentRestart { fleet, agent } => Ok(Outcome::Later(
                self.agent_op(fleet, agent, AgentOp::Restart, Desired::Running)
                    .await?,
            )),
            Command::AgentStop { fleet, agent } => Ok(Outcome::Later(
                self.agent_op(fleet, agent, AgentOp::Stop, Desired::Stopped)
                    .await?,
            )),
            Command::AgentRm {
                fleet,
                agent,
                purge,
            } => {
                self.imperative_change(&fleet, format!("fleet {fleet}"))?;
                Ok(Outcome::Later(
                    self.remove_agent(myself, fleet, agent, purge).await?,
                ))
            }
            Command::Status { fleet, agent } => now(self.status(fleet, agent)?),
            Command::Logs {
                fleet,
                agent,
                lines,
                follow: _,
            } => {
                let tokens = self.redactions(&fleet, &agent)?;
                let paths = AgentPaths::new(&self.ctx.config.state_dir, &fleet, &agent);
                Ok(Outcome::Later(Box::pin(async move {
                    tokio::task::spawn_blocking(move || read_logs(&paths, lines, &tokens))
                        .await
                        .unwrap_or_else(|e| Reply::Error(FleetError::internal(e)))
                })))
            }
            Command::Token {
                fleet,
                agent,
                rotate,
            } => {
                let token = self.token(&fleet, &agent, rotate).await?;
                now(Reply::Token {
                    fleet,
                    agent,
                    token,
                })
            }
            Command::Ports => {
                let leases = call_t(
                    &self.ports,
                    |r| PortsMsg::List { reply: r },
                    CALL,
                    "the port allocator",
                )
                .await?;
                let hooks = front_door::routes(&self.data);
                now(Reply::Ports(
                    leases
                        .into_iter()
                        .map(|(fleet, agent, l)| PortLeaseRow {
                            webhooks: hooks
                                .iter()
                                .filter(|r| r.fleet == fleet && r.agent == agent)
                                .map(|r| (r.channel.clone(), r.port))
                                .collect(),
                            fleet,
                            agent,
                            base: l.base,
                            stride: l.stride,
                        })
                        .collect(),
                ))
            }
            Command::Top => {
                let rows = status_rows(&self.ctx, &self.data, None, None);
                let node_id = self.ctx.node_id.clone();
                Ok(Outcome::Later(Box::pin(async move {
                    tokio::task::spawn_blocking(move || {
                        Reply::Top(crate::top::rows(&rows, &node_id))
                    })
                    .await
                    .unwrap_or_else(|e| Reply::Error(FleetError::internal(e)))
                })))
            }
            Command::Capacity => now(Reply::Capacity(self.capacity().await?)),
            Command::Events => Err(FleetError::invalid(
                "events",
                "events is a stream: use it from the REPL or fleetctl",
            )),
            Command::Reload { dry_run } => {
                let Some(p) = self.ctx.config.spec_path.clone() else {
                    return Err(FleetError::invalid(
                        "reload",
                        "the daemon was started without --spec",
                    ));
                };
                let specs = tokio::task::spawn_blocking(move || specfile::load_spec(&p))
                    .await
                    .map_err(FleetError::internal)??;
                let message = self.apply_spec(myself, specs, dry_run).await?;
                now(Reply::Done { message })
            }
            Command::AgentBackup { fleet, agent, out } => {
                self.agent_record(&fleet, &agent)?;
                Ok(Outcome::Later(self.agent_backup(&fleet, &agent, out)?))
            }
            Command::FleetBackup { fleet, dir } => {
                Ok(Outcome::Later(self.fleet_backup(&fleet, dir)?))
            }
            Command::AgentRestore {
                fleet,
                agent,
                from,
                force,
            } => Ok(Outcome::Later(
                self.agent_restore(myself, &fleet, &agent, from, force)?,
            )),
            Command::FleetUpgrade {
                fleet,
                to,
                canary,
                max_unavailable,
                ready_timeout_s,
            } => Ok(Outcome::Later(self.fleet_upgrade(
                myself,
                &fleet,
                to,
                canary,
                max_unavailable,
                ready_timeout_s,
            )?)),
            Command::FleetUpgradeStatus { fleet } => self.upgrade_status(&fleet),
            Command::FleetRollback { fleet } => {
                Ok(Outcome::Later(self.fleet_rollback(myself, &fleet)?))
            }
            Command::Doctor { fleet, agent } => Ok(Outcome::Later(self.doctor(fleet, agent)?)),
            Command::Webhooks { format, apply } => self.webhooks_command(format, apply),
            Command::Help { topic } => now(Reply::Help {
                text: help_text(topic.as_deref())
                    .map_err(|e| FleetError::invalid("help", e.to_string()))?,
            }),
            Command::Shutdown => done("shutting down"),
            Command::NodeList
            | Command::NodeCordon { .. }
            | Command::NodeUncordon { .. }
            | Command::NodeDrain { .. } => Err(FleetError::Cluster {
                reason:
                    "this fleetd runs a single host (no --etcd): there are no nodes to list or mark"
                        .into(),
            }),
        }
    }

    // ---- fleets ----

    fn fleet_ref(&self, fleet: &str) -> Result<ActorRef<FleetMsg>, FleetError> {
        self.fleets
            .get(fleet)
            .cloned()
            .ok_or_else(|| FleetError::NoSuchFleet {
                fleet: fleet.to_string(),
            })
    }

    async fn fleet_call<T: Send + 'static>(
        &self,
        fleet: &str,
        msg: impl FnOnce(ractor::RpcReplyPort<T>) -> FleetMsg,
        timeout: Duration,
    ) -> Result<T, FleetError> {
        let f = self.fleet_ref(fleet)?;
        call_t(&f, msg, timeout, &format!("fleet {fleet}")).await
    }

    /// Starts (or restarts) every agent of a fleet and records that it should run.
    async fn run_fleet(&mut self, fleet: &str, restart: bool) -> Result<(), FleetError> {
        self.fleet_ref(fleet)?;
        self.check_not_restoring(fleet, None)?;
        // Saved first: an error reply must mean nothing was started.
        self.set_fleet_desired(fleet, Desired::Running).await?;
        if restart {
            self.fleet_call(fleet, |r| FleetMsg::RestartAll { reply: r }, CALL)
                .await
        } else {
            self.fleet_call(fleet, |r| FleetMsg::StartAll { reply: r }, CALL)
                .await
        }
    }

    /// Durable before it returns, written off this handler's thread by the registry writer.
    async fn save(&self) -> Result<(), FleetError> {
        self.store.save(self.data.clone()).await?;
        self.sync_front_door();
        Ok(())
    }

    /// Copies each agent's observed process into the registry; saves if anything changed.
    async fn flush_observed(&mut self) -> Result<(), FleetError> {
        let mut changed = false;
        for e in self.ctx.views.observed.iter() {
            let (fleet, agent) = e.key();
            let Some(rec) = self
                .data
                .fleets
                .get_mut(fleet)
                .and_then(|f| f.agents.get_mut(agent))
            else {
                continue;
            };
            if rec.process != e.process {
                rec.process = e.process.clone();
                changed = true;
            }
        }
        if changed {
            self.save().await?;
        }
        Ok(())
    }

    /// Records that a fleet (and each of its agents) should run or not; on a failed save the
    /// record is as it was.
    async fn set_fleet_desired(&mut self, fleet: &str, d: Desired) -> Result<(), FleetError> {
        let Some(f) = self.data.fleets.get_mut(fleet) else {
            return Ok(());
        };
        let before = (
            f.desired,
            f.agents
                .iter()
                .map(|(k, a)| (k.clone(), a.desired))
                .collect::<Vec<_>>(),
        );
        f.desired = d;
        for a in f.agents.values_mut() {
            a.desired = d;
        }
        let r = self.save().await;
        if r.is_err() {
            if let Some(f) = self.data.fleets.get_mut(fleet) {
                f.desired = before.0;
                for (k, was) in before.1 {
                    if let Some(a) = f.agents.get_mut(&k) {
                        a.desired = was;
                    }
                }
            }
        }
        r
    }

    fn fleet_infos(&self) -> Vec<FleetInfo> {
        self.data
            .fleets
            .iter()
            .map(|(name, rec)| {
                let (state, reason) = self
                    .ctx
                    .views
                    .fleet_states
                    .get(name)
                    .map(|s| s.clone())
                    .unwrap_or((FleetState::Running, None));
                let running = self
                    .ctx
                    .views
                    .status
                    .iter()
                    .filter(|e| {
                        &e.key().0 == name && e.row.state == crate::state::AgentState::Running
                    })
                    .count();
                FleetInfo {
                    fleet: name.clone(),
                    state,
                    strategy: rec.spec.strategy,
                    restart: rec.spec.restart,
                    agents: rec.agents.len(),
                    running,
                    reason,
                }
            })
            .collect()
    }

    /// Refuses a command that would change the structure of a fleet the spec file owns.
    fn imperative_change(&self, fleet: &str, what: String) -> Result<(), FleetError> {
        match self.data.fleets.get(fleet).and_then(|r| r.origin) {
            Some(Origin::Spec) => Err(FleetError::OwnedBySpec {
                what,
                spec: self
                    .ctx
                    .config
                    .spec_path
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_else(|| "(none)".into()),
            }),
            _ => Ok(()),
        }
    }

    /// A name whose removal is not complete yet cannot be created again.
    /// An agent whose HOME a restore is replacing can be neither started, backed up nor
    /// removed until the restore is done (`agent: None`: any agent of the fleet).
    fn check_not_restoring(&self, fleet: &str, agent: Option<&str>) -> Result<(), FleetError> {
        let held = self.hold.iter().find(|k| {
            k.split_once('/')
                .is_some_and(|(f, a)| f == fleet && agent.is_none_or(|x| x == a))
        });
        if let Some(k) = held {
            return Err(FleetError::invalid(
                "agent",
                format!("{k} is being handed over from another node; try again once its HOME is restored"),
            ));
        }
        match self
            .restoring
            .iter()
            .find(|(f, a)| f == fleet && agent.is_none_or(|x| x == a))
        {
            Some((f, a)) => Err(FleetError::invalid(
                "agent",
                format!("{f}/{a} is being restored; try again once the restore is done"),
            )),
            None => Ok(()),
        }
    }

    fn check_not_removing(&self, fleet: &str, agent: Option<&str>) -> Result<(), FleetError> {
        let busy = self
            .removing
            .iter()
            .any(|(f, a)| f == fleet && (a.is_none() || agent.is_none() || a.as_deref() == agent));
        if busy {
            return Err(FleetError::BeingRemoved {
                what: match agent {
                    Some(a) => format!("agent {fleet}/{a}"),
                    None => format!("fleet {fleet}"),
                },
            });
        }
        Ok(())
    }

    async fn free_blocks(&self, stride: u16) -> Result<u64, FleetError> {
        call_t(
            &self.ports,
            |r| PortsMsg::Free { stride, reply: r },
            CALL,
            "the port allocator",
        )
        .await
    }

    async fn create_fleet(
        &mut self,
        myself: &ActorRef<NodeMsg>,
        spec: FleetSpec,
        desired: Desired,
        origin: Origin,
    ) -> Result<(), FleetError> {
        spec.check()?;
        if self.fleets.contains_key(&spec.name) {
            return Err(FleetError::FleetExists { fleet: spec.name });
        }
        self.check_not_removing(&spec.name, None)?;
        self.check_host_gives(&spec)?;
        let spec = provision::accepted_spec(spec).await?;
        // The files were read off the actor: look again.
        if self.fleets.contains_key(&spec.name) {
            return Err(FleetError::FleetExists { fleet: spec.name });
        }
        self.check_not_removing(&spec.name, None)?;
        self.warn_unenforced(&spec);
        let stride = spec.effective_stride();
        let free = self.free_blocks(stride).await?;
        if (spec.agents.len() as u64) > free {
            return Err(FleetError::PortRangeExhausted {
                fleet: spec.name.clone(),
                agent: spec.agents.first().cloned().unwrap_or_default(),
                range: format!(
                    "{}-{}",
                    self.ctx.config.port_range.first, self.ctx.config.port_range.last
                ),
                needed: stride as u32 * spec.agents.len() as u32,
                held: free as u32,
            });
        }
        let (fleet, names) = (spec.name.clone(), spec.agents.clone());
        let leases = call_t(
            &self.ports,
            |r| PortsMsg::AllocateMany {
                fleet,
                agents: names,
                stride,
                reply: r,
            },
            CALL,
            "the port allocator",
        )
        .await??;
        let uids = match self.lease_uids(spec.agents.len()) {
            Ok(u) => u,
            Err(e) => {
                for a in &spec.agents {
                    self.release(&spec.name, a);
                }
                return Err(e);
            }
        };
        let mut agents: BTreeMap<String, AgentRecord> = BTreeMap::new();
        for ((a, lease), uid) in spec.agents.iter().zip(leases).zip(uids) {
            let token = match provision::agent_token(&spec, a) {
                Ok(t) => t,
                Err(e) => {
                    for a in &spec.agents {
                        self.release(&spec.name, a);
                    }
                    return Err(e);
                }
            };
            let d = self.desired_of(&spec.name, a, desired);
            agents.insert(a.clone(), AgentRecord::new(d, &lease, token, uid));
        }
        let rec = FleetRecord {
            spec: spec.clone(),
            desired,
            agents,
            origin: Some(origin),
        };
        self.data.fleets.insert(spec.name.clone(), rec.clone());
        if let Err(e) = self.save().await {
            self.data.fleets.remove(&spec.name);
            for a in &spec.agents {
                self.release(&spec.name, a);
            }
            return Err(e);
        }
        tracing::info!(fleet = %spec.name, agents = spec.agents.len(), origin = ?origin, "fleet created");
        self.start_fleet_actor(myself, rec).await
    }

    /// Spawns the fleet's supervisor and its agents from a registry record.
    async fn start_fleet_actor(
        &mut self,
        myself: &ActorRef<NodeMsg>,
        rec: FleetRecord,
    ) -> Result<(), FleetError> {
        let spec = Arc::new(rec.spec.clone());
        let (fleet, _) = Actor::spawn_linked(
            None,
            FleetSupervisor,
            FleetArgs {
                spec: spec.clone(),
                ctx: self.ctx.clone(),
                node: myself.clone(),
            },
            myself.get_cell(),
        )
        .await
        .map_err(FleetError::internal)?;
        self.fleets.insert(spec.name.clone(), fleet.clone());
        // All AddAgent messages first, then the answers: a thousand agents cost one pass
        // through the fleet's mailbox, not a thousand round trips.
        let mut answers = Vec::with_capacity(spec.agents.len());
        for name in &spec.agents {
            let Some(a) = rec.agents.get(name) else {
                continue;
            };
            let (tx, rx) = tokio::sync::oneshot::channel();
            fleet
                .send_message(FleetMsg::AddAgent {
                    agent: name.clone(),
                    record: Box::new(a.clone()),
                    start: rec.desired == Desired::Running && a.desired == Desired::Running,
                    reply: tx.into(),
                })
                .map_err(|_| FleetError::internal("fleet stopped while adding agents"))?;
            answers.push(rx);
        }
        for rx in answers {
            match tokio::time::timeout(CALL, rx).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => return Err(e),
                _ => return Err(FleetError::internal("fleet did not answer AddAgent")),
            }
        }
        self.tell_rotator(&spec.name);
        Ok(())
    }

    async fn restore_fleet(
        &mut self,
        myself: &ActorRef<NodeMsg>,
        mut rec: FleetRecord,
    ) -> Result<(), FleetError> {
        // A registry from before templates were kept in it: read the file once, now. If it
        // cannot be read the agents' starts fail with the reason and are retried.
        if rec.spec.template.is_some() && rec.spec.template_config.is_none() {
            match provision::accepted_spec(rec.spec.clone()).await {
                Ok(spec) => rec.spec.template_config = spec.template_config,
                Err(e) => {
                    tracing::error!(fleet = %rec.spec.name, error = %e, "cannot read the fleet's template")
                }
            }
        }
        for (agent, a) in &rec.agents {
            if let Some(base) = a.port_base {
                let lease = Lease {
                    base,
                    stride: a.stride,
                };
                let (f, ag) = (rec.spec.name.clone(), agent.clone());
                let _ = self
                    .ports
                    .call(
                        |r| PortsMsg::Restore {
                            fleet: f,
                            agent: ag,
                            lease,
                            reply: r,
                        },
                        Some(CALL),
                    )
                    .await;
            }
        }
        self.data.fleets.insert(rec.spec.name.clone(), rec.clone());
        self.start_fleet_actor(myself, rec).await
    }

    fn tell_rotator(&self, fleet: &str) {
        if let Some(rec) = self.data.fleets.get(fleet) {
            let homes = rec
                .agents
                .keys()
                .map(|a| AgentPaths::new(&self.ctx.config.state_dir, fleet, a))
                .collect();
            let _ = self.logs.send_message(LogsMsg::Fleet {
                fleet: fleet.to_string(),
                spec: rec.spec.logs.clone(),
                homes,
            });
        }
    }

    async fn allocate(&self, fleet: &str, agent: &str, stride: u16) -> Result<Lease, FleetError> {
        let (f, a) = (fleet.to_string(), agent.to_string());
        match self
            .ports
            .call(
                |r| PortsMsg::Allocate {
                    fleet: f,
                    agent: a,
                    stride,
                    reply: r,
                },
                Some(CALL),
            )
            .await
        {
            Ok(CallResult::Success(r)) => r,
            _ => Err(FleetError::internal("port allocator did not answer")),
        }
    }

    /// A new port block for an agent whose base port another process holds: leased, then
    /// recorded and saved before anyone starts on it.
    async fn move_port(
        &mut self,
        fleet: &str,
        agent: &str,
        stride: u16,
    ) -> Result<u16, FleetError> {
        self.agent_record(fleet, agent)?;
        let (f, a) = (fleet.to_string(), agent.to_string());
        let lease = call_t(
            &self.ports,
            |r| PortsMsg::Reallocate {
                fleet: f,
                agent: a,
                stride,
                reply: r,
            },
            CALL,
            "the port allocator",
        )
        .await??;
        if let Some(rec) = self
            .data
            .fleets
            .get_mut(fleet)
            .and_then(|f| f.agents.get_mut(agent))
        {
            rec.port_base = Some(lease.base);
            rec.stride = lease.stride;
        }
        self.save().await?;
        tracing::warn!(
            fleet,
            agent,
            port = lease.base,
            "agent moved to a new port block"
        );
        Ok(lease.base)
    }

    /// `n` uid leases for new agents (all None when the daemon cannot change uids): the
    /// lowest uids of the range no record holds, no HOME on disk is owned by and no process
    /// runs as.
    fn lease_uids(&self, n: usize) -> Result<Vec<Option<u32>>, FleetError> {
        use crate::isolation::uids;
        if !self.ctx.host.can_setuid {
            return Ok(vec![None; n]);
        }
        let range = self.ctx.config.agent_uids;
        let mut taken = uids::taken(
            &self.ctx.config.state_dir,
            range,
            self.data
                .fleets
                .values()
                .flat_map(|f| f.agents.values())
                .filter_map(|a| a.uid),
        );
        (0..n)
            .map(|_| {
                let uid = uids::pick(range, &taken).ok_or_else(|| FleetError::NotAdmitted {
                    reason: format!("no free uid left in --agent-uids {range}: widen the range"),
                })?;
                taken.insert(uid);
                Ok(Some(uid))
            })
            .collect()
    }

    fn release(&self, fleet: &str, agent: &str) {
        let _ = self.ports.send_message(PortsMsg::Release {
            fleet: fleet.to_string(),
            agent: agent.to_string(),
        });
    }

    async fn remove_fleet(
        &mut self,
        myself: &ActorRef<NodeMsg>,
        fleet: String,
        purge: bool,
    ) -> Result<Later, FleetError> {
        let f = self.fleet_ref(&fleet)?;
        self.check_not_restoring(&fleet, None)?;
        let state_dir = self.ctx.config.state_dir.clone();
        if purge {
            // A purge that would be refused must refuse the whole command, before anything.
            let names: Vec<String> = self
                .data
                .fleets
                .get(&fleet)
                .map(|r| r.agents.keys().cloned().collect())
                .unwrap_or_default();
            for a in &names {
                provision::check_purge(&state_dir, &AgentPaths::new(&state_dir, &fleet, a))?;
            }
        }
        let Some(rec) = self.data.fleets.remove(&fleet) else {
            return Err(FleetError::NoSuchFleet { fleet });
        };
        if let Err(e) = self.save().await {
            self.data.fleets.insert(fleet, rec);
            return Err(e);
        }
        tracing::info!(fleet = %fleet, purge, "fleet removed");
        self.removing.insert((fleet.clone(), None));
        self.fleets.remove(&fleet);
        let _ = self.logs.send_message(LogsMsg::ForgetFleet {
            fleet: fleet.clone(),
        });
        let ctx = self.ctx.clone();
        let (ports, me) = (self.ports.clone(), myself.clone());
        Ok(Box::pin(async move {
            let _ = f
                .call(|r| FleetMsg::StopAll { reply: r }, Some(LONG_CALL))
                .await;
            f.stop(Some("removed".into()));
            ctx.views.fleet_states.remove(&fleet);
            // Leases go back only once the processes holding them are gone.
            for a in rec.agents.keys() {
                let _ = ports.send_message(PortsMsg::Release {
                    fleet: fleet.clone(),
                    agent: a.clone(),
                });
            }
            let mut rep = Reply::Done {
                message: format!("fleet {fleet} removed"),
            };
            if purge {
                let (sd, name) = (state_dir.clone(), fleet.clone());
                let r = tokio::task::spawn_blocking(move || {
                    for a in rec.agents.keys() {
                        provision::purge_home(&sd, &AgentPaths::new(&sd, &name, a))?;
                    }
                    let _ = std::fs::remove_dir(sd.join("fleets").join(&name));
                    let _ = std::fs::remove_dir(sd.join("logs").join(&name));
                    Ok::<(), FleetError>(())
                })
                .await
                .map_err(FleetError::internal)
                .and_then(|r| r);
                rep = match r {
                    Ok(()) => Reply::Done {
                        message: format!("fleet {fleet} removed and purged"),
                    },
                    Err(e) => Reply::Error(FleetError::Partial {
                        done: format!("fleet {fleet} removed"),
                        failed: format!("its HOMEs were not purged: {e}"),
                    }),
                };
            }
            let _ = me.send_message(NodeMsg::RemovalDone {
                fleet: fleet.clone(),
                agent: None,
            });
            rep
        }))
    }

    // ---- agents ----

    fn fleet_record(&self, fleet: &str) -> Result<&FleetRecord, FleetError> {
        self.data
            .fleets
            .get(fleet)
            .ok_or_else(|| FleetError::NoSuchFleet {
                fleet: fleet.to_string(),
            })
    }

    fn agent_record(&self, fleet: &str, agent: &str) -> Result<&AgentRecord, FleetError> {
        let f = self.fleet_record(fleet)?;
        f.agents.get(agent).ok_or_else(|| FleetError::NoSuchAgent {
            fleet: fleet.to_string(),
            agent: agent.to_string(),
        })
    }

    /// Everything to redact from an agent's output: its gateway tokens and its secrets'
    /// values, current and earlier.
    fn redactions(&self, fleet: &str, agent: &str) -> Result<Vec<String>, FleetError> {
        let rec = self.agent_record(fleet, agent)?;
        let mut v = rec.all_tokens();
        v.extend(rec.previous_secrets.iter().map(|s| s.expose().to_string()));
        if let Some(t) = self.data.fleets[fleet].spec.tenant(agent) {
            v.extend(t.accepted.secrets.values().map(|s| s.expose().to_string()));
        }
        Ok(v)
    }

    /// An added agent's desired state: its fleet's, unless the apply holds it.
    fn desired_of(&self, fleet: &str, agent: &str, fleet_desired: Desired) -> Desired {
        if self.hold.contains(&format!("{fleet}/{agent}")) {
            Desired::Stopped
        } else {
            fleet_desired
        }
    }

    async fn add_agent(
        &mut self,
        fleet: &str,
        agent: &str,
        tenant: Option<crate::spec::AgentSettings>,
    ) -> Result<(), FleetError> {
        self.add_agents(fleet, vec![(agent.to_string(), tenant)])
            .await
    }

    /// Adds agents to a fleet: ports, uids and tokens for all, one registry save, then each
    /// to its fleet. One save and one uid scan for a batch is what lets a node take over a
    /// dead node's hundreds of agents in about a second (fleet-bench --cluster) instead of
    /// one fsync'd registry write each. `tenant`: the agent's own settings, already read;
    /// `None` keeps what the fleet's spec holds for it (a reload records it first). Nothing
    /// changes unless every agent can be recorded.
    async fn add_agents(
        &mut self,
        fleet: &str,
        agents: Vec<(String, Option<crate::spec::AgentSettings>)>,
    ) -> Result<(), FleetError> {
        let f = self.fleet_ref(fleet)?;
        let mut seen = std::collections::BTreeSet::new();
        for (agent, _) in &agents {
            crate::ids::validate_id("agent", agent)?;
            self.check_not_removing(fleet, Some(agent))?;
            if self.data.fleets[fleet].agents.contains_key(agent) || !seen.insert(agent) {
                return Err(FleetError::AgentExists {
                    fleet: fleet.to_string(),
                    agent: agent.to_string(),
                });
            }
        }
        let rec = &self.data.fleets[fleet];
        let desired = rec.desired;
        let stride = rec.spec.effective_stride();
        let uids = self.lease_uids(agents.len())?;
        let mut leased = Vec::with_capacity(agents.len());
        let mut failed = None;
        for (agent, _) in &agents {
            let lease = match self.allocate(fleet, agent, stride).await {
                Ok(l) => l,
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            };
            match provision::agent_token(&self.data.fleets[fleet].spec, agent) {
                Ok(t) => leased.push((lease, t)),
                Err(e) => {
                    self.release(fleet, agent);
                    failed = Some(e);
                    break;
                }
            }
        }
        if let Some(e) = failed {
            for (agent, _) in agents.iter().take(leased.len()) {
                self.release(fleet, agent);
            }
            return Err(e);
        }
        let old_spec = self.data.fleets[fleet].spec.clone();
        let set_tenant = agents.iter().any(|(_, t)| t.is_some());
        let wanted: Vec<Desired> = agents
            .iter()
            .map(|(a, _)| self.desired_of(fleet, a, desired))
            .collect();
        let mut wanted = wanted.into_iter();
        {
            let rec = self.data.fleets.get_mut(fleet).expect("checked above");
            for ((agent, tenant), ((lease, token), uid)) in
                agents.iter().zip(leased.into_iter().zip(uids))
            {
                rec.spec.agents.push(agent.clone());
                if let Some(t) = tenant {
                    rec.spec.tenants.insert(agent.clone(), t.clone());
                }
                let d = wanted.next().unwrap_or(desired);
                rec.agents
                    .insert(agent.clone(), AgentRecord::new(d, &lease, token, uid));
            }
        }
        if let Err(e) = self.save().await {
            let rec = self.data.fleets.get_mut(fleet).expect("checked above");
            rec.spec = old_spec;
            for (agent, _) in &agents {
                rec.agents.remove(agent);
            }
            for (agent, _) in &agents {
                self.release(fleet, agent);
            }
            return Err(e);
        }
        if set_tenant {
            // Its fleet starts it from the spec: the spec must hold its settings first.
            let spec = Arc::new(self.data.fleets[fleet].spec.clone());
            let _ = f.send_message(FleetMsg::UpdateSpec(spec));
        }
        let mut first_err = None;
        for (agent, _) in &agents {
            let record = Box::new(self.agent_record(fleet, agent)?.clone());
            let name = agent.clone();
            let r = call_t(
                &f,
                |r| FleetMsg::AddAgent {
                    agent: name,
                    start: desired == Desired::Running && record.desired == Desired::Running,
                    record,
                    reply: r,
                },
                CALL,
                &format!("fleet {fleet}"),
            )
            .await
            .and_then(|r| r);
            if let Err(e) = r {
                first_err.get_or_insert(e);
            }
        }
        self.tell_rotator(fleet);
        first_err.map_or(Ok(()), Err)
    }

    async fn agent_op(
        &mut self,
        fleet: String,
        agent: String,
        op: AgentOp,
        desired: Desired,
    ) -> Result<Later, FleetError> {
        let was = self.agent_record(&fleet, &agent)?.desired;
        if op != AgentOp::Stop {
            self.check_not_restoring(&fleet, Some(&agent))?;
        }
        let f = self.fleet_ref(&fleet)?;
        self.set_agent_desired(&fleet, &agent, desired);
        if let Err(e) = self.save().await {
            self.set_agent_desired(&fleet, &agent, was);
            return Err(e);
        }
        Ok(Box::pin(async move {
            let name = agent.clone();
            let r = f
                .call(
                    |r| FleetMsg::Agent {
                        agent: name,
                        op,
                        reply: r,
                    },
                    Some(LONG_CALL),
                )
                .await;
            let verb = match op {
                AgentOp::Start => "starting",
                AgentOp::Stop => "stopped",
                AgentOp::Restart => "restarting",
            };
            let rep = match r {
                Ok(CallResult::Success(Ok(()))) => Reply::Done {
                    message: format!("agent {fleet}/{agent} {verb}"),
                },
                Ok(CallResult::Success(Err(e))) => Reply::Error(e),
                _ => Reply::Error(FleetError::internal("fleet did not answer")),
            };
            rep
        }))
    }

    async fn remove_agent(
        &mut self,
        myself: &ActorRef<NodeMsg>,
        fleet: String,
        agent: String,
        purge: bool,
    ) -> Result<Later, FleetError> {
        self.check_not_restoring(&fleet, Some(&agent))?;
        self.agent_record(&fleet, &agent)?;
        let f = self.fleet_ref(&fleet)?;
        let state_dir = self.ctx.config.state_dir.clone();
        let paths = AgentPaths::new(&state_dir, &fleet, &agent);
        if purge {
            provision::check_purge(&state_dir, &paths)?;
        }
        let rec = self.data.fleets.get_mut(&fleet).expect("checked");
        let old = rec.agents.remove(&agent);
        let pos = rec.spec.agents.iter().position(|a| a == &agent);
        rec.spec.agents.retain(|a| a != &agent);
        // Its secrets leave the vault with it.
        let old_tenant = rec.spec.tenants.remove(&agent);
        if let Err(e) = self.save().await {
            let rec = self.data.fleets.get_mut(&fleet).expect("checked");
            if let Some(o) = old {
                rec.agents.insert(agent.clone(), o);
            }
            if let Some(t) = old_tenant {
                rec.spec.tenants.insert(agent.clone(), t);
            }
            if let Some(p) = pos {
                rec.spec.agents.insert(p, agent);
            }
            return Err(e);
        }
        tracing::info!(fleet = %fleet, agent = %agent, purge, "agent removed");
        if old_tenant.is_some() {
            let spec = Arc::new(self.data.fleets[&fleet].spec.clone());
            let _ = f.send_message(FleetMsg::UpdateSpec(spec));
        }
        self.removing.insert((fleet.clone(), Some(agent.clone())));
        self.tell_rotator(&fleet);
        self.ctx
            .views
            .observed
            .remove(&(fleet.clone(), agent.clone()));
        let (ports, me) = (self.ports.clone(), myself.clone());
        Ok(Box::pin(async move {
            let name = agent.clone();
            let r = f
                .call(
                    |r| FleetMsg::RemoveAgent {
                        agent: name,
                        reply: r,
                    },
                    Some(LONG_CALL),
                )
                .await;
            let _ = ports.send_message(PortsMsg::Release {
                fleet: fleet.clone(),
                agent: agent.clone(),
            });
            let done = format!("agent {fleet}/{agent} removed");
            let mut rep = match r {
                Ok(CallResult::Success(Ok(()))) => Reply::Done {
                    message: done.clone(),
                },
                Ok(CallResult::Success(Err(e))) => Reply::Error(FleetError::Partial {
                    done: done.clone(),
                    failed: e.to_string(),
                }),
                _ => Reply::Error(FleetError::Partial {
                    done: done.clone(),
                    failed: "its fleet did not confirm that the agent stopped".into(),
                }),
            };
            if purge {
                let sd = state_dir.clone();
                let r =
                    tokio::task::spawn_blocking(move || provision::purge_home(&sd, &paths)).await;
                let r = r.map_err(FleetError::internal).and_then(|r| r);
                match (r, &mut rep) {
                    (Ok(()), Reply::Done { message }) => message.push_str(" and purged"),
                    (Ok(()), _) => {}
                    (Err(e), _) => {
                        rep = Reply::Error(FleetError::Partial {
                            done,
                            failed: format!("its HOME was not purged: {e}"),
                        })
                    }
                }
            }
            let _ = me.send_message(NodeMsg::RemovalDone {
                fleet: fleet.clone(),
                agent: Some(agent.clone()),
            });
            rep
        }))
    }

    /// The agent's token; `rotate`: a new one is saved first (the registry owns it), then
    /// the agent takes it and restarts. A failed save changes nothing.
    async fn token(
        &mut self,
        fleet: &str,
        agent: &str,
        rotate: bool,
    ) -> Result<String, FleetError> {
        let current = self.agent_record(fleet, agent)?.clone();
        if !rotate {
            return Ok(current.token);
        }
        let f = self.fleet_ref(fleet)?;
        // Cluster mode: the token every node derives for the agent's current epoch, so
        // the agent's other nodes agree (a new epoch in the desired state rotates it there).
        let t = provision::agent_token(&self.data.fleets[fleet].spec, agent)?;
        if let Some(a) = self
            .data
            .fleets
            .get_mut(fleet)
            .and_then(|f| f.agents.get_mut(agent))
        {
            a.replace_token(t.clone());
        }
        if let Err(e) = self.save().await {
            if let Some(a) = self
                .data
                .fleets
                .get_mut(fleet)
                .and_then(|f| f.agents.get_mut(agent))
            {
                *a = current;
            }
            return Err(e);
        }
        let name = agent.to_string();
        let token = t.clone();
        match f
            .call(
                |r| FleetMsg::SetToken {
                    agent: name,
                    token,
                    reply: r,
                },
                Some(CALL),
            )
            .await
        {
            Ok(CallResult::Success(Ok(()))) => Ok(t),
            Ok(CallResult::Success(Err(e))) => Err(FleetError::Partial {
                done: format!("a new token for {fleet}/{agent} was saved"),
                failed: format!("the agent did not take it yet ({e}); it will at its next start"),
            }),
            _ => Err(FleetError::Partial {
                done: format!("a new token for {fleet}/{agent} was saved"),
                failed: "the agent did not confirm it; it takes it at its next start".into(),
            }),
        }
    }

    fn status(&self, fleet: Option<String>, agent: Option<String>) -> Result<Reply, FleetError> {
        if let Some(f) = &fleet {
            let rec = self
                .data
                .fleets
                .get(f)
                .ok_or_else(|| FleetError::NoSuchFleet { fleet: f.clone() })?;
            if let Some(a) = &agent {
                if !rec.agents.contains_key(a) {
                    return Err(FleetError::NoSuchAgent {
                        fleet: f.clone(),
                        agent: a.clone(),
                    });
                }
            }
        }
        Ok(Reply::Status(status_rows(
            &self.ctx,
            &self.data,
            fleet.as_deref(),
            agent.as_deref(),
        )))
    }

    /// Makes the fleets the spec owns match `specs`: creates what is new, removes what is
    /// gone, restarts only agents whose settings changed; fleets made by commands are never
    /// touched, and a spec fleet may not take the name of one. Everything that can be checked
    /// (every fleet's fields, files and commands, room for the new port blocks) is checked
    /// before the first change. Each change is logged and answered by name; `dry_run` only
    /// says what would be done.
    async fn apply_spec(
        &mut self,
        myself: &ActorRef<NodeMsg>,
        specs: Vec<FleetSpec>,
        dry_run: bool,
    ) -> Result<String, FleetError> {
        let mut accepted = Vec::with_capacity(specs.len());
        for s in specs {
            s.check()?;
            accepted.push(provision::accepted_spec(s).await?);
        }
        let specs = accepted;
        for s in &specs {
            if let Some(rec) = self.data.fleets.get(&s.name) {
                if rec.origin == Some(Origin::Command) {
                    return Err(FleetError::Spec {
                        reason: format!(
                            "fleet {:?} exists and was made by a command, not by the spec: remove it (fleet rm {}) or give the spec's fleet another name; nothing was changed",
                            s.name, s.name
                        ),
                    });
                }
            }
        }
        let declared: std::collections::BTreeSet<&str> =
            specs.iter().map(|s| s.name.as_str()).collect();
        let old: Vec<FleetSpec> = self
            .data
            .fleets
            .values()
            .filter(|r| match r.origin {
                Some(Origin::Spec) => true,
                Some(Origin::Command) => false,
                None => declared.contains(r.spec.name.as_str()),
            })
            .map(|r| r.spec.clone())
            .collect();
        let changes = reconcile::plan(&old, &specs);
        let described: Vec<String> = changes
            .iter()
            .map(|c| reconcile::describe(c, &old, &specs))
            .collect();
        if dry_run {
            return Ok(if changes.is_empty() {
                "reload --dry-run: the spec matches; nothing would change".into()
            } else {
                format!(
                    "reload --dry-run: {} changes would be made: {}",
                    changes.len(),
                    described.join("; ")
                )
            });
        }
        self.check_room(&changes).await?;
        for c in &changes {
            if let Action::AddFleet(s) = c {
                self.check_not_removing(&s.name, None)?;
            }
            if let Action::AddAgent { fleet, agent } = c {
                self.check_not_removing(fleet, Some(agent))?;
            }
        }
        // Fleets of an old registry that the spec declares are the spec's from now on.
        for name in &declared {
            if let Some(rec) = self.data.fleets.get_mut(*name) {
                rec.origin = Some(Origin::Spec);
            }
        }
        let mut done: Vec<String> = Vec::new();
        let mut changes = changes.into_iter().zip(described).peekable();
        while let Some((c, what)) = changes.next() {
            let mut whats = vec![what];
            let r = match c {
                Action::AddFleet(spec) => {
                    self.create_fleet(myself, spec, Desired::Running, Origin::Spec)
                        .await
                }
                // The removal's stops run on in a task; the name stays reserved until then.
                Action::RemoveFleet(fleet) => self
                    .remove_fleet(myself, fleet, false)
                    .await
                    .map(|work| drop(tokio::spawn(work))),
                Action::UpdateFleet { fleet, spec } => self.update_spec(&fleet, spec).await,
                // A run of additions to one fleet is one batch (one registry save).
                Action::AddAgent { fleet, agent } => {
                    let mut batch = vec![(agent, None)];
                    while let Some((Action::AddAgent { fleet: f, agent: a }, w)) = changes.peek() {
                        if *f != fleet {
                            break;
                        }
                        batch.push((a.clone(), None));
                        whats.push(w.clone());
                        changes.next();
                    }
                    self.add_agents(&fleet, batch).await
                }
                Action::RemoveAgent { fleet, agent } => self
                    .remove_agent(myself, fleet, agent, false)
                    .await
                    .map(|work| drop(tokio::spawn(work))),
                // The fleet's new spec came first (UpdateFleet); an agent the operator
                // stopped stays stopped and takes it at its next start.
                Action::RestartAgent { fleet, agent } => self.restart_for_reload(&fleet, &agent),
            };
            match r {
                Ok(()) => {
                    for what in whats {
                        tracing::info!(change = %what, "spec applied");
                        done.push(what);
                    }
                }
                Err(e) if done.is_empty() => return Err(e),
                Err(e) => {
                    return Err(FleetError::Partial {
                        done: format!(
                            "{} of the spec's changes made ({})",
                            done.len(),
                            done.join("; ")
                        ),
                        failed: format!("{} failed: {e}", whats.join("; ")),
                    })
                }
            }
        }
        if let Err(e) = self.save().await {
            tracing::error!(error = %e, "could not save which fleets the spec owns");
        }
        Ok(if done.is_empty() {
            "spec applied: 0 changes".into()
        } else {
            format!("spec applied: {} changes: {}", done.len(), done.join("; "))
        })
    }

    fn set_agent_desired(&mut self, fleet: &str, agent: &str, d: Desired) {
        if let Some(a) = self
            .data
            .fleets
            .get_mut(fleet)
            .and_then(|f| f.agents.get_mut(agent))
        {
            a.desired = d;
        }
    }

    /// Restarts an agent that should run so it takes its fleet's new spec; one that should
    /// not is left as it is. Nothing to save: desired state is unchanged.
    fn restart_for_reload(&self, fleet: &str, agent: &str) -> Result<(), FleetError> {
        let wanted = self
            .data
            .fleets
            .get(fleet)
            .is_some_and(|f| f.desired == Desired::Running)
            && self.agent_record(fleet, agent)?.desired == Desired::Running;
        if !wanted {
            return Ok(());
        }
        let f = self.fleet_ref(fleet)?;
        let name = agent.to_string();
        tokio::spawn(async move {
            let _ = f
                .call(
                    |r| FleetMsg::Agent {
                        agent: name,
                        op: AgentOp::Restart,
                        reply: r,
                    },
                    Some(LONG_CALL),
                )
                .await;
        });
        Ok(())
    }

    /// Refuses a set of changes whose new agents would not all get a port block.
    async fn check_room(&self, changes: &[Action]) -> Result<(), FleetError> {
        let mut need: BTreeMap<u16, u64> = BTreeMap::new();
        for c in changes {
            match c {
                Action::AddFleet(s) => {
                    *need.entry(s.effective_stride()).or_default() += s.agents.len() as u64
                }
                Action::AddAgent { fleet, .. } => {
                    let stride = self
                        .data
                        .fleets
                        .get(fleet)
                        .map(|r| r.spec.effective_stride())
                        .unwrap_or(1);
                    *need.entry(stride).or_default() += 1;
                }
                _ => {}
            }
        }
        for (stride, n) in need {
            let free = self.free_blocks(stride).await?;
            if n > free {
                return Err(FleetError::Spec {
                    reason: format!(
                        "the spec needs {n} new port blocks of {stride} ports, the range {}-{} has {free} free; nothing was changed",
                        self.ctx.config.port_range.first, self.ctx.config.port_range.last
                    ),
                });
            }
        }
        Ok(())
    }

    /// How many more agents of each fleet fit, by memory, ports, descriptors and pids.
    async fn capacity(&self) -> Result<Vec<crate::messages::command::CapacityRow>, FleetError> {
        let mut free = BTreeMap::new();
        for rec in self.data.fleets.values() {
            let stride = rec.spec.effective_stride();
            if let std::collections::btree_map::Entry::Vacant(e) = free.entry(stride) {
                e.insert(self.free_blocks(stride).await?);
            }
        }
        let (ctx, fleets) = (self.ctx.clone(), self.data.fleets.clone());
        tokio::task::spawn_blocking(move || crate::capacity::rows(&ctx, &fleets, &free))
            .await
            .map_err(FleetError::internal)
    }

    /// Says when a fleet sets cgroup limits this host cannot enforce.
    fn warn_unenforced(&self, spec: &FleetSpec) {
        let available = self
            .ctx
            .services
            .cgroups
            .as_ref()
            .map(|t| t.controllers())
            .unwrap_or_default();
        let missing = crate::process::cgroup::unenforced(&spec.cgroup, available);
        if !missing.is_empty() {
            tracing::warn!(fleet = %spec.name, limits = ?missing, cgroups = self.ctx.services.cgroups.is_some(), "cgroup limits not enforced: no delegated cgroup v2 controller for them on this host");
        }
    }

    /// Running agents take changed cgroup limits at once (the kernel applies them live);
    /// later starts write them anyway. Said once when the host cannot enforce one.
    fn apply_cgroup_limits(&self, spec: &FleetSpec) {
        self.warn_unenforced(spec);
        let Some(tree) = &self.ctx.services.cgroups else {
            return;
        };
        if let Err(e) = tree.apply_fleet_limits(&spec.name, &spec.cgroup) {
            tracing::warn!(fleet = %spec.name, error = %e, "cannot write cgroup limits of running agents");
        }
    }

    /// A fleet may not ask for more isolation than this host gives (refused before anything
    /// changes, naming why).
    /// What a spec asks of this host that it does not have: an isolation level its kernel or
    /// privileges cannot give, an OpenClaw version that is not installed.
    pub(super) fn check_host_gives(&self, spec: &FleetSpec) -> Result<(), FleetError> {
        self.ctx.host.resolve(spec.isolation).map_err(|reason| {
            FleetError::invalid(format!("fleet {} isolation", spec.name), reason)
        })?;
        if !spec.runs_openclaw() {
            return Ok(());
        }
        let mut versions: Vec<(String, &str)> = Vec::new();
        if let Some(v) = &spec.openclaw_version {
            versions.push((format!("fleet {} openclaw_version", spec.name), v));
        }
        for (a, t) in &spec.tenants {
            if let Some(v) = &t.openclaw_version {
                versions.push((format!("agent {}/{a} openclaw_version", spec.name), v));
            }
        }
        for (field, v) in versions {
            provision::resolve_openclaw_version(self.ctx.config.openclaw_bin.as_deref(), Some(v))
                .map_err(|e| FleetError::invalid(field, e.to_string()))?;
        }
        Ok(())
    }

    async fn update_spec(&mut self, fleet: &str, mut spec: FleetSpec) -> Result<(), FleetError> {
        self.check_host_gives(&spec)?;
        let f = self.fleet_ref(fleet)?;
        let mut limits_changed = false;
        let mut before = None;
        let mut rotated = Vec::new();
        if let Some(rec) = self.data.fleets.get_mut(fleet) {
            // The agent list is managed by AddAgent/RemoveAgent changes.
            spec.agents = rec.spec.agents.clone();
            limits_changed = rec.spec.cgroup != spec.cgroup;
            let records_before = rec.agents.clone();
            // Values the agents' secrets no longer have stay redacted from their logs.
            for (a, old) in &rec.spec.tenants {
                if let Some(r) = rec.agents.get_mut(a) {
                    r.remember_secrets(old.secrets_dropped_by(spec.tenant(a)));
                }
            }
            // Cluster mode: a rotation is a new epoch of the agent's derived token.
            if spec.token_seed.is_some() {
                for (a, r) in rec.agents.iter_mut() {
                    let fresh = rec.spec.token_seed != spec.token_seed
                        || rec.spec.token_epoch(a) != spec.token_epoch(a);
                    let token = provision::agent_token(&spec, a)?;
                    if fresh && r.token != token {
                        r.replace_token(token.clone());
                        rotated.push((a.clone(), token));
                    }
                }
            }
            before = Some((
                std::mem::replace(&mut rec.spec, spec.clone()),
                records_before,
            ));
        }
        if let Err(e) = self.save().await {
            if let (Some(rec), Some((old, records))) = (self.data.fleets.get_mut(fleet), before) {
                rec.spec = old;
                rec.agents = records;
            }
            return Err(e);
        }
        if limits_changed {
            self.apply_cgroup_limits(&spec);
        }
        for (agent, token) in rotated {
            tracing::info!(fleet, agent = %agent, "gateway token rotated (its epoch changed in the desired state)");
            let f = f.clone();
            tokio::spawn(async move {
                let _ = f
                    .call(
                        |reply| FleetMsg::SetToken {
                            agent,
                            token,
                            reply,
                        },
                        Some(CALL),
                    )
                    .await;
            });
        }
        let _ = f.send_message(FleetMsg::UpdateSpec(Arc::new(spec)));
        self.tell_rotator(fleet);
        Ok(())
    }
}

/// Status rows in fleet order, agents in their start order.
pub fn status_rows(
    ctx: &NodeContext,
    data: &RegistryData,
    fleet: Option<&str>,
    agent: Option<&str>,
) -> Vec<AgentStatus> {
    let mut rows = Vec::new();
    for (fname, rec) in &data.fleets {
        if fleet.is_some_and(|f| f != fname) {
            continue;
        }
        for a in &rec.spec.agents {
            if agent.is_some_and(|x| x != a) {
                continue;
            }
            let key = (fname.clone(), a.clone());
            if let Some(v) = ctx.views.status.get(&key) {
                rows.push(ctx.status_row(&key, &v));
            }
        }
    }
    rows
}

/// The last `lines` lines of an agent's log with every token redacted (blocking).
fn read_logs(paths: &AgentPaths, lines: usize, tokens: &[String]) -> Reply {
    match crate::logs::tail::last_lines(&paths.agent_log, lines) {
        Ok(v) => {
            let secrets: Vec<&str> = tokens.iter().map(String::as_str).collect();
            Reply::Logs(
                v.iter()
                    .map(|l| crate::logs::tail::redact(l, &secrets))
                    .collect(),
            )
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Reply::Logs(vec![]),
        Err(e) => Reply::Error(FleetError::internal(format!(
            "reading {}: {e}",
            paths.agent_log.display()
        ))),
    }
}
