//! NodeActor: the root. Starts the PortAllocator and the LogRotator, one FleetSupervisor per
//! fleet, turns every admin command into messages to them, and keeps the desired state in
//! the registry (saved before a command replies). It never waits on an agent itself: long
//! operations (stops) are awaited from tasks or by the fleets.

use crate::actors::fleet::{FleetArgs, FleetSupervisor};
use crate::actors::logs::LogRotator;
use crate::actors::ports::PortAllocator;
use crate::admin::parse::help_text;
use crate::context::NodeContext;
use crate::error::FleetError;
use crate::logs::tail;
use crate::messages::command::{AgentStatus, Command, FleetInfo, PortLeaseRow, Reply, TopRow};
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
    store: Box<dyn Store>,
    data: RegistryData,
    fleets: BTreeMap<String, ActorRef<FleetMsg>>,
    ports: ActorRef<PortsMsg>,
    logs: ActorRef<LogsMsg>,
    /// Names whose removal is under way (`None`: the whole fleet). Until it is complete (the
    /// processes gone, the HOME purged, the lease released) the name cannot be created again:
    /// the old removal would otherwise delete the new agent's HOME or lease.
    removing: std::collections::BTreeSet<(String, Option<String>)>,
}

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
        tokio::spawn(sample_memory(a.ctx.clone(), myself.clone()));
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
            store: a.store,
            data: RegistryData::default(),
            fleets: BTreeMap::new(),
            ports,
            logs,
            removing: Default::default(),
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
        Ok(rt)
    }

    async fn handle(
        &self,
        myself: ActorRef<NodeMsg>,
        msg: NodeMsg,
        rt: &mut NodeRuntime,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            NodeMsg::Command(cmd, reply) => {
                if let Some(r) = rt.command(&myself, cmd, reply).await {
                    let (reply, answer) = r;
                    let _ = reply.send(answer);
                }
            }
            NodeMsg::CreateFleet(spec, reply) => {
                let r = rt
                    .create_fleet(&myself, *spec, Desired::Running, Origin::Command)
                    .await;
                let _ = reply.send(r);
            }
            NodeMsg::ApplySpec(specs, reply) => {
                let r = rt.apply_spec(&myself, specs, false).await;
                let _ = reply.send(r);
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
                let _ = reply.send(rt.agent_record(&fleet, &agent).map(|a| a.all_tokens()));
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
                if let Err(e) = rt.flush_observed() {
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
        if let Err(e) = rt.flush_observed() {
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

type Answer = Option<(ractor::RpcReplyPort<Reply>, Reply)>;

fn answer(reply: ractor::RpcReplyPort<Reply>, r: Result<Reply, FleetError>) -> Answer {
    Some((reply, r.unwrap_or_else(Reply::Error)))
}

fn done(msg: impl Into<String>) -> Result<Reply, FleetError> {
    Ok(Reply::Done {
        message: msg.into(),
    })
}

impl NodeRuntime {
    async fn command(
        &mut self,
        myself: &ActorRef<NodeMsg>,
        cmd: Command,
        reply: ractor::RpcReplyPort<Reply>,
    ) -> Answer {
        match cmd {
            Command::FleetCreate {
                fleet,
                agents,
                strategy,
                command,
                template,
                restart,
                stride,
                profile,
            } => {
                let mut spec = FleetSpec::new(fleet.clone());
                spec.agents = FleetSpec::numbered_agents(agents);
                if let Some(s) = strategy {
                    spec.strategy = s;
                }
                if let Some(r) = restart {
                    spec.restart = r;
                }
                spec.command = command;
                spec.template = template;
                spec.stride = stride;
                if let Some(p) = profile {
                    spec.profile = p;
                }
                let r = self
                    .create_fleet(myself, spec, Desired::Running, Origin::Command)
                    .await;
                answer(
                    reply,
                    r.and_then(|_| done(format!("fleet {fleet} created with {agents} agents"))),
                )
            }
            Command::FleetList => answer(reply, Ok(Reply::Fleets(self.fleet_infos()))),
            Command::FleetStart { fleet } => {
                let r = self.run_fleet(&fleet, false).await;
                answer(
                    reply,
                    r.and_then(|_| done(format!("fleet {fleet} started"))),
                )
            }
            Command::FleetRestart { fleet } => {
                let r = self.run_fleet(&fleet, true).await;
                answer(
                    reply,
                    r.and_then(|_| done(format!("fleet {fleet} restarting"))),
                )
            }
            Command::FleetStop { fleet } => {
                let f = match self.fleet_ref(&fleet) {
                    Ok(f) => f,
                    Err(e) => return answer(reply, Err(e)),
                };
                if let Err(e) = self.set_fleet_desired(&fleet, Desired::Stopped) {
                    return answer(reply, Err(e));
                }
                tokio::spawn(async move {
                    let _ = f
                        .call(|r| FleetMsg::StopAll { reply: r }, Some(LONG_CALL))
                        .await;
                    let _ = reply.send(Reply::Done {
                        message: format!("fleet {fleet} stopped"),
                    });
                });
                None
            }
            Command::FleetRm { fleet, purge } => {
                if let Err(e) = self.imperative_change(&fleet, format!("fleet {fleet}")) {
                    return answer(reply, Err(e));
                }
                self.remove_fleet(myself, fleet, purge, reply)
            }
            Command::AgentAdd { fleet, agent } => {
                let r = match self.imperative_change(&fleet, format!("fleet {fleet}")) {
                    Err(e) => Err(e),
                    Ok(()) => self.add_agent(&fleet, &agent).await,
                };
                answer(
                    reply,
                    r.and_then(|_| done(format!("agent {fleet}/{agent} added"))),
                )
            }
            Command::AgentStart { fleet, agent } => {
                self.agent_op(fleet, agent, AgentOp::Start, Desired::Running, reply)
                    .await
            }
            Command::AgentRestart { fleet, agent } => {
                self.agent_op(fleet, agent, AgentOp::Restart, Desired::Running, reply)
                    .await
            }
            Command::AgentStop { fleet, agent } => {
                self.agent_op(fleet, agent, AgentOp::Stop, Desired::Stopped, reply)
                    .await
            }
            Command::AgentRm {
                fleet,
                agent,
                purge,
            } => {
                if let Err(e) = self.imperative_change(&fleet, format!("fleet {fleet}")) {
                    return answer(reply, Err(e));
                }
                self.remove_agent(myself, fleet, agent, purge, reply)
            }
            Command::Status { fleet, agent } => answer(reply, self.status(fleet, agent)),
            Command::Logs {
                fleet,
                agent,
                lines,
                follow: _,
            } => {
                let tokens = match self.agent_record(&fleet, &agent) {
                    Ok(a) => a.all_tokens(),
                    Err(e) => return answer(reply, Err(e)),
                };
                let paths = AgentPaths::new(&self.ctx.config.state_dir, &fleet, &agent);
                tokio::task::spawn_blocking(move || {
                    let r = match tail::last_lines(&paths.agent_log, lines) {
                        Ok(v) => {
                            let secrets: Vec<&str> = tokens.iter().map(String::as_str).collect();
                            Reply::Logs(v.iter().map(|l| tail::redact(l, &secrets)).collect())
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Reply::Logs(vec![]),
                        Err(e) => Reply::Error(FleetError::internal(format!(
                            "reading {}: {e}",
                            paths.agent_log.display()
                        ))),
                    };
                    let _ = reply.send(r);
                });
                None
            }
            Command::Token {
                fleet,
                agent,
                rotate,
            } => {
                let r = self.token(&fleet, &agent, rotate).await;
                answer(
                    reply,
                    r.map(|token| Reply::Token {
                        fleet,
                        agent,
                        token,
                    }),
                )
            }
            Command::Ports => {
                let r = self
                    .ports
                    .call(|r| PortsMsg::List { reply: r }, Some(CALL))
                    .await;
                let rows = match r {
                    Ok(CallResult::Success(v)) => Ok(v
                        .into_iter()
                        .map(|(fleet, agent, l)| PortLeaseRow {
                            fleet,
                            agent,
                            base: l.base,
                            stride: l.stride,
                        })
                        .collect()),
                    _ => Err(FleetError::internal("the port allocator did not answer")),
                };
                answer(reply, rows.map(Reply::Ports))
            }
            Command::Top => {
                let rows = self.status(None, None);
                let node_id = self.ctx.node_id.clone();
                tokio::task::spawn_blocking(move || {
                    let r = rows.map(|r| match r {
                        Reply::Status(rows) => Reply::Top(top_rows(&rows, &node_id)),
                        other => other,
                    });
                    let _ = reply.send(r.unwrap_or_else(Reply::Error));
                });
                None
            }
            Command::Capacity => answer(reply, Ok(Reply::Capacity(self.capacity().await))),
            Command::Events => answer(
                reply,
                Err(FleetError::invalid(
                    "events",
                    "events is a stream: use it from the REPL or fleetctl",
                )),
            ),
            Command::Reload { dry_run } => {
                let r = match self.ctx.config.spec_path.clone() {
                    None => Err(FleetError::invalid(
                        "reload",
                        "the daemon was started without --spec",
                    )),
                    Some(p) => match tokio::task::spawn_blocking(move || specfile::load_spec(&p))
                        .await
                        .map_err(FleetError::internal)
                    {
                        Ok(Ok(specs)) => self
                            .apply_spec(myself, specs, dry_run)
                            .await
                            .map(|m| Reply::Done { message: m }),
                        Ok(Err(e)) | Err(e) => Err(e),
                    },
                };
                answer(reply, r)
            }
            Command::Help { topic } => answer(
                reply,
                help_text(topic.as_deref())
                    .map(|text| Reply::Help { text })
                    .map_err(|e| FleetError::invalid("help", e.to_string())),
            ),
            Command::Shutdown => answer(reply, done("shutting down")),
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
        match f.call(msg, Some(timeout)).await {
            Ok(CallResult::Success(v)) => Ok(v),
            _ => Err(FleetError::Timeout {
                what: format!("fleet {fleet} to answer"),
            }),
        }
    }

    /// Starts (or restarts) every agent of a fleet and records that it should run.
    async fn run_fleet(&mut self, fleet: &str, restart: bool) -> Result<(), FleetError> {
        if restart {
            self.fleet_call(fleet, |r| FleetMsg::RestartAll { reply: r }, CALL)
                .await?;
        } else {
            self.fleet_call(fleet, |r| FleetMsg::StartAll { reply: r }, CALL)
                .await?;
        }
        self.set_fleet_desired(fleet, Desired::Running)
    }

    fn save(&self) -> Result<(), FleetError> {
        self.store.save(&self.data)
    }

    /// Copies each agent's observed process into the registry; saves if anything changed.
    fn flush_observed(&mut self) -> Result<(), FleetError> {
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
            self.save()?;
        }
        Ok(())
    }

    fn set_fleet_desired(&mut self, fleet: &str, d: Desired) -> Result<(), FleetError> {
        if let Some(f) = self.data.fleets.get_mut(fleet) {
            f.desired = d;
            for a in f.agents.values_mut() {
                a.desired = d;
            }
        }
        self.save()
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
        match self
            .ports
            .call(|r| PortsMsg::Free { stride, reply: r }, Some(CALL))
            .await
        {
            Ok(CallResult::Success(n)) => Ok(n),
            _ => Err(FleetError::internal("the port allocator did not answer")),
        }
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
        let spec = accept_files(spec).await?;
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
        let leases = match self
            .ports
            .call(
                |r| PortsMsg::AllocateMany {
                    fleet,
                    agents: names,
                    stride,
                    reply: r,
                },
                Some(CALL),
            )
            .await
        {
            Ok(CallResult::Success(r)) => r?,
            _ => return Err(FleetError::internal("port allocator did not answer")),
        };
        let mut agents: BTreeMap<String, AgentRecord> = BTreeMap::new();
        for (a, lease) in spec.agents.iter().zip(leases) {
            let token = match provision::generate_token() {
                Ok(t) => t,
                Err(e) => {
                    for a in &spec.agents {
                        self.release(&spec.name, a);
                    }
                    return Err(e);
                }
            };
            agents.insert(
                a.clone(),
                AgentRecord {
                    desired,
                    port_base: Some(lease.base),
                    stride: lease.stride,
                    token,
                    process: None,
                    previous_tokens: vec![],
                },
            );
        }
        let rec = FleetRecord {
            spec: spec.clone(),
            desired,
            agents,
            origin: Some(origin),
        };
        self.data.fleets.insert(spec.name.clone(), rec.clone());
        if let Err(e) = self.save() {
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
                    port: a.port_base.unwrap_or(0),
                    token: a.token.clone(),
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
            match accept_files(rec.spec.clone()).await {
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
                .map(|a| AgentPaths::new(&self.ctx.config.state_dir, fleet, a).home)
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
        let lease = match self
            .ports
            .call(
                |r| PortsMsg::Reallocate {
                    fleet: f,
                    agent: a,
                    stride,
                    reply: r,
                },
                Some(CALL),
            )
            .await
        {
            Ok(CallResult::Success(r)) => r?,
            _ => return Err(FleetError::internal("the port allocator did not answer")),
        };
        if let Some(rec) = self
            .data
            .fleets
            .get_mut(fleet)
            .and_then(|f| f.agents.get_mut(agent))
        {
            rec.port_base = Some(lease.base);
            rec.stride = lease.stride;
        }
        self.save()?;
        tracing::warn!(
            fleet,
            agent,
            port = lease.base,
            "agent moved to a new port block"
        );
        Ok(lease.base)
    }

    fn release(&self, fleet: &str, agent: &str) {
        let _ = self.ports.send_message(PortsMsg::Release {
            fleet: fleet.to_string(),
            agent: agent.to_string(),
        });
    }

    fn remove_fleet(
        &mut self,
        myself: &ActorRef<NodeMsg>,
        fleet: String,
        purge: bool,
        reply: ractor::RpcReplyPort<Reply>,
    ) -> Answer {
        let f = match self.fleet_ref(&fleet) {
            Ok(f) => f,
            Err(e) => return answer(reply, Err(e)),
        };
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
                if let Err(e) =
                    provision::check_purge(&state_dir, &AgentPaths::new(&state_dir, &fleet, a))
                {
                    return answer(reply, Err(e));
                }
            }
        }
        let Some(rec) = self.data.fleets.remove(&fleet) else {
            return answer(reply, Err(FleetError::NoSuchFleet { fleet }));
        };
        if let Err(e) = self.save() {
            self.data.fleets.insert(fleet, rec);
            return answer(reply, Err(e));
        }
        tracing::info!(fleet = %fleet, purge, "fleet removed");
        self.removing.insert((fleet.clone(), None));
        self.fleets.remove(&fleet);
        for a in rec.agents.keys() {
            self.ctx.views.observed.remove(&(fleet.clone(), a.clone()));
        }
        let _ = self.logs.send_message(LogsMsg::ForgetFleet {
            fleet: fleet.clone(),
        });
        let ctx = self.ctx.clone();
        let (ports, me) = (self.ports.clone(), myself.clone());
        tokio::spawn(async move {
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
            let _ = reply.send(rep);
        });
        None
    }

    // ---- agents ----

    fn agent_record(&self, fleet: &str, agent: &str) -> Result<&AgentRecord, FleetError> {
        let f = self
            .data
            .fleets
            .get(fleet)
            .ok_or_else(|| FleetError::NoSuchFleet {
                fleet: fleet.to_string(),
            })?;
        f.agents.get(agent).ok_or_else(|| FleetError::NoSuchAgent {
            fleet: fleet.to_string(),
            agent: agent.to_string(),
        })
    }

    async fn add_agent(&mut self, fleet: &str, agent: &str) -> Result<(), FleetError> {
        crate::ids::validate_id("agent", agent)?;
        let f = self.fleet_ref(fleet)?;
        self.check_not_removing(fleet, Some(agent))?;
        let rec = self
            .data
            .fleets
            .get(fleet)
            .expect("fleet ref implies record");
        if rec.agents.contains_key(agent) {
            return Err(FleetError::AgentExists {
                fleet: fleet.to_string(),
                agent: agent.to_string(),
            });
        }
        let desired = rec.desired;
        let stride = rec.spec.effective_stride();
        let lease = self.allocate(fleet, agent, stride).await?;
        let token = provision::generate_token()?;
        {
            let rec = self.data.fleets.get_mut(fleet).expect("checked above");
            rec.spec.agents.push(agent.to_string());
            rec.agents.insert(
                agent.to_string(),
                AgentRecord {
                    desired,
                    port_base: Some(lease.base),
                    stride: lease.stride,
                    token: token.clone(),
                    process: None,
                    previous_tokens: vec![],
                },
            );
        }
        if let Err(e) = self.save() {
            let rec = self.data.fleets.get_mut(fleet).expect("checked above");
            rec.spec.agents.retain(|a| a != agent);
            rec.agents.remove(agent);
            self.release(fleet, agent);
            return Err(e);
        }
        let name = agent.to_string();
        let port = lease.base;
        let r = match f
            .call(
                |r| FleetMsg::AddAgent {
                    agent: name,
                    port,
                    token,
                    start: desired == Desired::Running,
                    reply: r,
                },
                Some(CALL),
            )
            .await
        {
            Ok(CallResult::Success(r)) => r,
            _ => Err(FleetError::internal("fleet did not answer AddAgent")),
        };
        self.tell_rotator(fleet);
        r
    }

    async fn agent_op(
        &mut self,
        fleet: String,
        agent: String,
        op: AgentOp,
        desired: Desired,
        reply: ractor::RpcReplyPort<Reply>,
    ) -> Answer {
        if let Err(e) = self.agent_record(&fleet, &agent) {
            return answer(reply, Err(e));
        }
        let f = match self.fleet_ref(&fleet) {
            Ok(f) => f,
            Err(e) => return answer(reply, Err(e)),
        };
        if let Some(a) = self
            .data
            .fleets
            .get_mut(&fleet)
            .and_then(|f| f.agents.get_mut(&agent))
        {
            a.desired = desired;
        }
        if let Err(e) = self.save() {
            return answer(reply, Err(e));
        }
        tokio::spawn(async move {
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
            let _ = reply.send(rep);
        });
        None
    }

    fn remove_agent(
        &mut self,
        myself: &ActorRef<NodeMsg>,
        fleet: String,
        agent: String,
        purge: bool,
        reply: ractor::RpcReplyPort<Reply>,
    ) -> Answer {
        if let Err(e) = self.agent_record(&fleet, &agent) {
            return answer(reply, Err(e));
        }
        let f = match self.fleet_ref(&fleet) {
            Ok(f) => f,
            Err(e) => return answer(reply, Err(e)),
        };
        let state_dir = self.ctx.config.state_dir.clone();
        let paths = AgentPaths::new(&state_dir, &fleet, &agent);
        if purge {
            if let Err(e) = provision::check_purge(&state_dir, &paths) {
                return answer(reply, Err(e));
            }
        }
        let rec = self.data.fleets.get_mut(&fleet).expect("checked");
        let old = rec.agents.remove(&agent);
        let pos = rec.spec.agents.iter().position(|a| a == &agent);
        rec.spec.agents.retain(|a| a != &agent);
        if let Err(e) = self.save() {
            let rec = self.data.fleets.get_mut(&fleet).expect("checked");
            if let Some(o) = old {
                rec.agents.insert(agent.clone(), o);
            }
            if let Some(p) = pos {
                rec.spec.agents.insert(p, agent);
            }
            return answer(reply, Err(e));
        }
        tracing::info!(fleet = %fleet, agent = %agent, purge, "agent removed");
        self.removing.insert((fleet.clone(), Some(agent.clone())));
        self.tell_rotator(&fleet);
        self.ctx
            .views
            .observed
            .remove(&(fleet.clone(), agent.clone()));
        let (ports, me) = (self.ports.clone(), myself.clone());
        tokio::spawn(async move {
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
            let _ = reply.send(rep);
        });
        None
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
        let t = provision::generate_token()?;
        if let Some(a) = self
            .data
            .fleets
            .get_mut(fleet)
            .and_then(|f| f.agents.get_mut(agent))
        {
            a.replace_token(t.clone());
        }
        if let Err(e) = self.save() {
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
            accepted.push(accept_files(s).await?);
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
        for (c, what) in changes.into_iter().zip(described) {
            let r = match c {
                Action::AddFleet(spec) => {
                    self.create_fleet(myself, spec, Desired::Running, Origin::Spec)
                        .await
                }
                Action::RemoveFleet(fleet) => {
                    let (tx, _rx) = tokio::sync::oneshot::channel();
                    let port = ractor::RpcReplyPort::from(tx);
                    if let Some((r, a)) = self.remove_fleet(myself, fleet, false, port) {
                        let _ = r.send(a);
                    }
                    Ok(())
                }
                Action::UpdateFleet { fleet, spec } => self.update_spec(&fleet, spec),
                Action::AddAgent { fleet, agent } => self.add_agent(&fleet, &agent).await,
                Action::RemoveAgent { fleet, agent } => {
                    let (tx, _rx) = tokio::sync::oneshot::channel();
                    if let Some((r, a)) = self.remove_agent(myself, fleet, agent, false, tx.into())
                    {
                        let _ = r.send(a);
                    }
                    Ok(())
                }
                Action::RestartAgent { fleet, agent } => {
                    let r = match specs.iter().find(|s| s.name == fleet) {
                        Some(spec) => self.update_spec(&fleet, spec.clone()),
                        None => Ok(()),
                    };
                    let (tx, _rx) = tokio::sync::oneshot::channel();
                    let _ = self
                        .agent_op(fleet, agent, AgentOp::Restart, Desired::Running, tx.into())
                        .await;
                    r
                }
            };
            match r {
                Ok(()) => {
                    tracing::info!(change = %what, "spec applied");
                    done.push(what);
                }
                Err(e) if done.is_empty() => return Err(e),
                Err(e) => {
                    return Err(FleetError::Partial {
                        done: format!(
                            "{} of the spec's changes made ({})",
                            done.len(),
                            done.join("; ")
                        ),
                        failed: format!("{what} failed: {e}"),
                    })
                }
            }
        }
        if let Err(e) = self.save() {
            tracing::error!(error = %e, "could not save which fleets the spec owns");
        }
        Ok(if done.is_empty() {
            "spec applied: 0 changes".into()
        } else {
            format!("spec applied: {} changes: {}", done.len(), done.join("; "))
        })
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
    async fn capacity(&self) -> Vec<crate::messages::command::CapacityRow> {
        let host = crate::process::procfs::host_info();
        let mem_available = crate::memory::mem_available(&self.ctx.config.meminfo_path)
            .unwrap_or(host.mem_available);
        let mut rows = Vec::new();
        for (name, rec) in &self.data.fleets {
            let stride = rec.spec.effective_stride();
            let free_port_blocks = match self
                .ports
                .call(|r| PortsMsg::Free { stride, reply: r }, Some(CALL))
                .await
            {
                Ok(CallResult::Success(n)) => n,
                _ => 0,
            };
            let room = crate::memory::HostRoom {
                mem_available,
                reserve: self.ctx.config.memory_reserve,
                free_port_blocks,
                nofile_soft: host.nofile_soft,
                fds_in_use: host.fds_in_use,
                pid_max: host.pid_max,
                pids_in_use: host.pids_in_use,
            };
            let per_agent = crate::memory::estimate(&rec.spec, &self.ctx.observed_rss(name));
            let procs: Vec<u64> = self
                .ctx
                .views
                .memory
                .iter()
                .filter(|e| &e.key().0 == name)
                .map(|e| e.processes as u64)
                .collect();
            let procs_per_agent = if procs.is_empty() {
                if rec.spec.runs_openclaw() {
                    4
                } else {
                    2
                }
            } else {
                procs.iter().sum::<u64>().div_ceil(procs.len() as u64)
            };
            let (m, p, f, d, binding) = crate::memory::capacity(&room, per_agent, procs_per_agent);
            rows.push(crate::messages::command::CapacityRow {
                fleet: name.clone(),
                by_memory: Some(m),
                by_ports: p,
                by_fds: Some(f),
                by_pids: Some(d),
                fits: m.min(p).min(f).min(d),
                binding: binding.to_string(),
            });
        }
        rows
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

    fn update_spec(&mut self, fleet: &str, mut spec: FleetSpec) -> Result<(), FleetError> {
        let f = self.fleet_ref(fleet)?;
        let mut limits_changed = false;
        if let Some(rec) = self.data.fleets.get_mut(fleet) {
            // The agent list is managed by AddAgent/RemoveAgent changes.
            spec.agents = rec.spec.agents.clone();
            limits_changed = rec.spec.cgroup != spec.cgroup;
            rec.spec = spec.clone();
        }
        self.save()?;
        if limits_changed {
            self.apply_cgroup_limits(&spec);
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

/// Whole-tree processes, RSS, PSS and CPU of each agent; CPU from two scans `TOP_WINDOW`
/// apart (blocking: runs in a blocking task).
fn top_rows(rows: &[AgentStatus], node_id: &str) -> Vec<TopRow> {
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
            let (procs, rss, pss, cpu) = match r.pid {
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
                    (now.len() as u32, rss, pss, cpu)
                }
                None => (0, 0, None, 0.0),
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
            }
        })
        .collect()
}

/// How long `top` watches CPU time.
const TOP_WINDOW: Duration = Duration::from_millis(500);

/// Measures every agent's whole process tree (one /proc scan per round, off the actors) and
/// reports agents that stay above their fleet's `max_memory` for two samples in a row.
async fn sample_memory(ctx: Arc<NodeContext>, node: ActorRef<NodeMsg>) {
    let mut streaks: std::collections::HashMap<(String, String), u32> = Default::default();
    let mut membership = crate::process::members::Membership::default();
    let node_prefix = crate::process::tree::node_marker_prefix(&ctx.node_id);
    let since = crate::process::procfs::read_proc(std::process::id())
        .map(|p| p.start_time)
        .unwrap_or(0);
    let mut tick = tokio::time::interval(ctx.config.sample_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        check_drift(&ctx).await;
        let agents: Vec<((String, String), u32)> = ctx
            .views
            .status
            .iter()
            .filter_map(|v| v.row.pid.map(|p| (v.key().clone(), p)))
            .collect();
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

/// `provision::accept_files` off the actor's thread (it reads operator files).
async fn accept_files(mut spec: FleetSpec) -> Result<FleetSpec, FleetError> {
    tokio::task::spawn_blocking(move || provision::accept_files(&mut spec).map(|()| spec))
        .await
        .map_err(FleetError::internal)?
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
