//! FleetSupervisor: one per fleet. Holds the recipe of each agent (its desired record from the
//! node: lease, token; changes come from the node or go to it), re-spawns an
//! AgentActor that died (panic, error) from it, applies the fleet's strategy when an agent
//! restarts, and counts escalated failures against the fleet's own intensity. Long waits (an
//! agent's stop) run in tasks so the supervisor keeps answering.

use crate::actors::agent::{AgentActor, AgentArgs};
use crate::context::NodeContext;
use crate::error::FleetError;
use crate::messages::agent::AgentMsg;
use crate::messages::events::Event;
use crate::messages::fleet::{AgentOp, FleetMsg};
use crate::restart::FleetHistory;
use crate::spec::{FleetSpec, Strategy};
use crate::state::{now_ms, FleetState};
use crate::strategy::siblings_to_restart;
use ractor::{Actor, ActorProcessingErr, ActorRef, SupervisionEvent};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub struct FleetSupervisor;

pub struct FleetArgs {
    pub spec: Arc<FleetSpec>,
    pub ctx: Arc<NodeContext>,
    /// The node owns the desired state (leases, tokens): changes go to it.
    pub node: ActorRef<crate::messages::node::NodeMsg>,
}

struct AgentEntry {
    actor: ActorRef<AgentMsg>,
    /// The recipe: the node's record of this agent, kept in step by `PortMoved`/`SetToken`.
    record: crate::registry::AgentRecord,
    want_running: bool,
}

pub struct FleetRuntime {
    spec: Arc<FleetSpec>,
    ctx: Arc<NodeContext>,
    node: ActorRef<crate::messages::node::NodeMsg>,
    /// Start order.
    order: Vec<String>,
    agents: HashMap<String, AgentEntry>,
    history: FleetHistory,
    state: FleetState,
}

/// Extra time beyond the stop timeout for an agent to report that it stopped.
const STOP_MARGIN: Duration = Duration::from_secs(5);

impl Actor for FleetSupervisor {
    type Msg = FleetMsg;
    type State = FleetRuntime;
    type Arguments = FleetArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<FleetMsg>,
        a: FleetArgs,
    ) -> Result<FleetRuntime, ActorProcessingErr> {
        a.ctx
            .views
            .fleet_states
            .insert(a.spec.name.clone(), (FleetState::Running, None));
        a.ctx
            .views
            .fleet_specs
            .insert(a.spec.name.clone(), a.spec.clone());
        Ok(FleetRuntime {
            spec: a.spec,
            ctx: a.ctx,
            node: a.node,
            order: Vec::new(),
            agents: HashMap::new(),
            history: FleetHistory::default(),
            state: FleetState::Running,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<FleetMsg>,
        msg: FleetMsg,
        rt: &mut FleetRuntime,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            FleetMsg::AddAgent {
                agent,
                record,
                start,
                reply,
            } => {
                if rt.agents.contains_key(&agent) {
                    let _ = reply.send(Err(FleetError::AgentExists {
                        fleet: rt.spec.name.clone(),
                        agent,
                    }));
                    return Ok(());
                }
                let start = start && rt.state != FleetState::Failed;
                let r = rt.spawn_agent(&myself, &agent, &record, start).await;
                if let Ok(actor) = r {
                    rt.order.push(agent.clone());
                    rt.agents.insert(
                        agent,
                        AgentEntry {
                            actor,
                            record: *record,
                            want_running: start,
                        },
                    );
                    let _ = reply.send(Ok(()));
                } else if let Err(e) = r {
                    let _ = reply.send(Err(e));
                }
            }
            FleetMsg::RemoveAgent { agent, reply } => match rt.agents.remove(&agent) {
                None => {
                    let _ = reply.send(Err(rt.no_such(&agent)));
                }
                Some(entry) => {
                    rt.order.retain(|a| a != &agent);
                    let timeout = rt.spec.stop_timeout() + STOP_MARGIN;
                    tokio::spawn(async move {
                        stop_agent(&entry.actor, timeout).await;
                        entry.actor.stop(Some("removed".into()));
                        let _ = reply.send(Ok(()));
                    });
                }
            },
            FleetMsg::Agent { agent, op, reply } => {
                let Some(entry) = rt.agents.get_mut(&agent) else {
                    let _ = reply.send(Err(rt.no_such(&agent)));
                    return Ok(());
                };
                match op {
                    AgentOp::Start => {
                        entry.want_running = true;
                        let _ = entry.actor.send_message(AgentMsg::Start {
                            reset_history: true,
                        });
                        let _ = reply.send(Ok(()));
                    }
                    AgentOp::Restart => {
                        entry.want_running = true;
                        let _ = entry.actor.send_message(AgentMsg::Restart {
                            reason: "restart requested".into(),
                        });
                        let _ = reply.send(Ok(()));
                    }
                    AgentOp::Stop => {
                        entry.want_running = false;
                        let actor = entry.actor.clone();
                        let timeout = rt.spec.stop_timeout() + STOP_MARGIN;
                        tokio::spawn(async move {
                            stop_agent(&actor, timeout).await;
                            let _ = reply.send(Ok(()));
                        });
                    }
                }
            }
            FleetMsg::MovePort { agent, reply } => {
                let (node, me) = (rt.node.clone(), myself.clone());
                let (fleet, stride) = (rt.spec.name.clone(), rt.spec.effective_stride());
                tokio::spawn(async move {
                    let name = agent.clone();
                    let r = match node
                        .call(
                            |r| crate::messages::node::NodeMsg::MovePort {
                                fleet,
                                agent: name,
                                stride,
                                reply: r,
                            },
                            Some(Duration::from_secs(10)),
                        )
                        .await
                    {
                        Ok(ractor::rpc::CallResult::Success(r)) => r,
                        _ => Err(FleetError::Timeout {
                            what: "the node to lease a new port block".into(),
                        }),
                    };
                    // The recipe learns the port before the agent starts on it.
                    if let Ok(port) = r {
                        let _ = me.send_message(FleetMsg::PortMoved { agent, port });
                    }
                    let _ = reply.send(r);
                });
            }
            FleetMsg::PortMoved { agent, port } => {
                if let Some(e) = rt.agents.get_mut(&agent) {
                    e.record.port_base = Some(port);
                }
            }
            FleetMsg::InjectPanic { agent } => {
                if let Some(e) = rt.agents.get(&agent) {
                    let _ = e.actor.send_message(AgentMsg::InjectPanic);
                }
            }
            FleetMsg::SetToken {
                agent,
                token,
                reply,
            } => {
                let Some(entry) = rt.agents.get_mut(&agent) else {
                    let _ = reply.send(Err(rt.no_such(&agent)));
                    return Ok(());
                };
                entry.record.replace_token(token.clone());
                let actor = entry.actor.clone();
                tokio::spawn(async move {
                    let r = match actor
                        .call(
                            |r| AgentMsg::SetToken { token, reply: r },
                            Some(Duration::from_secs(10)),
                        )
                        .await
                    {
                        Ok(ractor::rpc::CallResult::Success(())) => Ok(()),
                        _ => Err(FleetError::Timeout {
                            what: format!("agent {agent} to take its new token"),
                        }),
                    };
                    let _ = reply.send(r);
                });
            }
            FleetMsg::StartAll { reply } => {
                rt.history.reset();
                rt.set_state(FleetState::Running, None);
                for name in &rt.order {
                    if let Some(e) = rt.agents.get_mut(name) {
                        e.want_running = true;
                        let _ = e.actor.send_message(AgentMsg::Start {
                            reset_history: true,
                        });
                    }
                }
                let _ = reply.send(());
            }
            FleetMsg::StopAll { reply } => {
                for e in rt.agents.values_mut() {
                    e.want_running = false;
                }
                // A failed fleet stays failed; a stopped one has nothing to announce.
                let stopping = !matches!(rt.state, FleetState::Failed | FleetState::Stopped);
                if stopping {
                    rt.set_state(FleetState::Stopping, None);
                }
                let refs = rt.reverse_order_refs();
                let timeout = rt.spec.stop_timeout() + STOP_MARGIN;
                let sequential = rt.spec.strategy != Strategy::OneForOne;
                let me = myself.clone();
                tokio::spawn(async move {
                    stop_in_reverse(refs, timeout, sequential).await;
                    if stopping {
                        let _ = me.send_message(FleetMsg::Stopped);
                    }
                    let _ = reply.send(());
                });
            }
            FleetMsg::Stopped => {
                if rt.state == FleetState::Stopping {
                    rt.set_state(FleetState::Stopped, None);
                }
            }
            FleetMsg::RestartAll { reply } => {
                rt.history.reset();
                rt.set_state(FleetState::Running, None);
                for name in &rt.order {
                    if let Some(e) = rt.agents.get_mut(name) {
                        e.want_running = true;
                        let _ = e.actor.send_message(AgentMsg::Restart {
                            reason: "fleet restart requested".into(),
                        });
                    }
                }
                let _ = reply.send(());
            }
            FleetMsg::MemoryLimit { agent, reason } => {
                if let Some(e) = rt.agents.get(&agent) {
                    let _ = e.actor.send_message(AgentMsg::MemoryLimit { reason });
                }
            }
            FleetMsg::UpdateSpec(spec) => {
                rt.ctx
                    .views
                    .fleet_specs
                    .insert(spec.name.clone(), spec.clone());
                for e in rt.agents.values() {
                    let _ = e.actor.send_message(AgentMsg::UpdateSpec(spec.clone()));
                }
                rt.spec = spec;
            }
            FleetMsg::AgentRestarting { agent } => {
                if rt.state != FleetState::Running {
                    return Ok(());
                }
                let siblings = siblings_to_restart(rt.spec.strategy, &rt.order, &agent);
                for s in siblings {
                    if let Some(e) = rt.agents.get(&s) {
                        if e.want_running {
                            let _ = e.actor.send_message(AgentMsg::Restart {
                                reason: format!("{}: {agent} restarted", rt.spec.strategy),
                            });
                        }
                    }
                }
            }
            FleetMsg::AgentFailed { agent, reason } => {
                if let Some(e) = rt.agents.get_mut(&agent) {
                    e.want_running = false;
                }
                tracing::warn!(fleet = %rt.spec.name, agent = %agent, %reason, "agent failed");
                if rt.state == FleetState::Running
                    && rt
                        .history
                        .escalate(&rt.spec.fleet_intensity, Instant::now())
                {
                    let why = format!(
                        "fleet intensity exceeded: more than {} agent failures within {}s (last: {agent}: {reason})",
                        rt.spec.fleet_intensity.max_restarts, rt.spec.fleet_intensity.window_s
                    );
                    tracing::error!(fleet = %rt.spec.name, "{why}");
                    rt.set_state(FleetState::Failed, Some(why.clone()));
                    for e in rt.agents.values_mut() {
                        e.want_running = false;
                        let _ = e.actor.send_message(AgentMsg::Fail {
                            reason: format!("fleet failed: {why}"),
                        });
                    }
                }
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<FleetMsg>,
        evt: SupervisionEvent,
        rt: &mut FleetRuntime,
    ) -> Result<(), ActorProcessingErr> {
        let (cell, why) = match &evt {
            SupervisionEvent::ActorFailed(c, e) => (c.clone(), e.to_string()),
            SupervisionEvent::ActorTerminated(c, _, r) => {
                (c.clone(), r.clone().unwrap_or_else(|| "terminated".into()))
            }
            _ => return Ok(()),
        };
        // Only the current generation of a child is re-spawned; an actor we removed, or an
        // older generation, is not ours any more.
        let Some(name) = rt
            .agents
            .iter()
            .find(|(_, e)| e.actor.get_id() == cell.get_id())
            .map(|(n, _)| n.clone())
        else {
            return Ok(());
        };
        tracing::error!(fleet = %rt.spec.name, agent = %name, reason = %why, "agent actor died; re-spawning it");
        let (record, start) = {
            let e = &rt.agents[&name];
            (e.record.clone(), e.want_running)
        };
        match rt.spawn_agent(&myself, &name, &record, start).await {
            Ok(actor) => {
                if let Some(e) = rt.agents.get_mut(&name) {
                    e.actor = actor;
                }
            }
            Err(e) => {
                tracing::error!(fleet = %rt.spec.name, agent = %name, error = %e, "re-spawn failed")
            }
        }
        Ok(())
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<FleetMsg>,
        rt: &mut FleetRuntime,
    ) -> Result<(), ActorProcessingErr> {
        for e in rt.agents.values() {
            e.actor.stop(Some("fleet stopped".into()));
        }
        Ok(())
    }
}

impl Drop for FleetRuntime {
    fn drop(&mut self) {
        // Runs on every exit path, Kill included (post_stop does not).
        self.ctx.views.fleet_specs.remove(&self.spec.name);
    }
}

impl FleetRuntime {
    async fn spawn_agent(
        &self,
        myself: &ActorRef<FleetMsg>,
        agent: &str,
        record: &crate::registry::AgentRecord,
        start: bool,
    ) -> Result<ActorRef<AgentMsg>, FleetError> {
        let port = record.port_base.ok_or_else(|| FleetError::Provision {
            fleet: self.spec.name.clone(),
            agent: agent.to_string(),
            reason: "the agent has no port lease".into(),
        })?;
        let args = AgentArgs {
            fleet: self.spec.name.clone(),
            agent: agent.to_string(),
            spec: self.spec.clone(),
            port,
            token: record.token.clone(),
            uid: record.uid,
            ctx: self.ctx.clone(),
            fleet_ref: myself.clone(),
            start,
        };
        // Unnamed: ractor's names are global, and two fleets may both have `agent-1`.
        Actor::spawn_linked(None, AgentActor, args, myself.get_cell())
            .await
            .map(|(a, _)| a)
            .map_err(FleetError::internal)
    }

    fn no_such(&self, agent: &str) -> FleetError {
        FleetError::NoSuchAgent {
            fleet: self.spec.name.clone(),
            agent: agent.to_string(),
        }
    }

    fn reverse_order_refs(&self) -> Vec<ActorRef<AgentMsg>> {
        self.order
            .iter()
            .rev()
            .filter_map(|n| self.agents.get(n).map(|e| e.actor.clone()))
            .collect()
    }

    fn set_state(&mut self, new: FleetState, reason: Option<String>) {
        let old = self.state;
        self.state = new;
        self.ctx
            .views
            .fleet_states
            .insert(self.spec.name.clone(), (new, reason.clone()));
        if old != new {
            self.ctx.publish(Event::Fleet {
                fleet: self.spec.name.clone(),
                old,
                new,
                reason,
                at_ms: now_ms(),
            });
        }
    }
}

/// Asks one agent to stop and waits until its whole tree is gone (or the timeout passes).
async fn stop_agent(actor: &ActorRef<AgentMsg>, timeout: Duration) {
    let _ = actor
        .call(|r| AgentMsg::Stop { reply: Some(r) }, Some(timeout))
        .await;
}

/// Stops agents last-started first. With `sequential` (agents that depend on each other:
/// one_for_all, rest_for_one) each waits for the previous; independent agents (one_for_one)
/// get their SIGTERM in the same order without waiting, so a large fleet stops in one stop
/// timeout instead of one per agent.
async fn stop_in_reverse(refs: Vec<ActorRef<AgentMsg>>, timeout: Duration, sequential: bool) {
    if sequential {
        for a in &refs {
            stop_agent(a, timeout).await;
        }
    } else {
        let mut waits = Vec::with_capacity(refs.len());
        for a in refs {
            waits.push(tokio::spawn(async move { stop_agent(&a, timeout).await }));
        }
        for w in waits {
            let _ = w.await;
        }
    }
}
