//! AgentActor: one per agent, owns at most one OS process tree at a time. Its handlers only
//! decide (with `restart::decide`, `lifecycle::after_exit`, the probe reports and the
//! operator's wishes) and start small tasks for the work: the start pipeline (`start`),
//! owning the process (`process::owner`), probing (`health`). Every
//! task's report carries the incarnation it belongs to; stale ones are dropped.

use crate::context::{AgentView, NodeContext, Observed};
use crate::health::{self, ProbeReport};
use crate::lifecycle::{self, Next, Purpose};
use crate::messages::agent::{AgentMsg, SpawnFailure, Spawned};
use crate::messages::command::AgentStatus;
use crate::messages::events::{AgentTransition, Event};
use crate::messages::fleet::FleetMsg;
use crate::process::owner::{self, OwnerEvent, ProcessHandle};
use crate::process::tree;
use crate::provision::AgentPaths;
use crate::restart::{self, Decision, ExitCause, History};
use crate::spec::FleetSpec;
use crate::start::{kill_orphan, kill_unwanted, open_log, StartJob};
use crate::state::{now_ms, AgentState, ExitInfo};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub struct AgentActor;

pub struct AgentArgs {
    pub fleet: String,
    pub agent: String,
    pub spec: Arc<FleetSpec>,
    pub port: u16,
    pub token: String,
    /// Its uid lease (registry record), for `isolation = "uid"`.
    pub uid: Option<u32>,
    pub ctx: Arc<NodeContext>,
    pub fleet_ref: ActorRef<FleetMsg>,
    pub start: bool,
}

pub struct AgentRuntime {
    /// Unique per actor instance (see `AgentView::owner`).
    instance: u64,
    fleet: String,
    agent: String,
    spec: Arc<FleetSpec>,
    port: u16,
    token: String,
    uid: Option<u32>,
    ctx: Arc<NodeContext>,
    fleet_ref: ActorRef<FleetMsg>,
    paths: AgentPaths,
    state: AgentState,
    reason: Option<String>,
    gen: u64,
    /// `gen` as a start in flight sees it: a start whose incarnation is no longer current
    /// gives up before it spawns (or while it waits at the start gate).
    gen_tx: tokio::sync::watch::Sender<u64>,
    process: Option<ProcessHandle>,
    prober: Option<tokio::task::JoinHandle<()>>,
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
    stopping: Option<Purpose>,
    stop_waiters: Vec<ractor::RpcReplyPort<()>>,
    /// Incarnations that may still have processes: a start in flight (until its result is
    /// back), or a main process that exited or was not wanted while its leftovers are swept.
    /// A stop is not finished until they are gone.
    sweeping: Vec<u64>,
    history: History,
    restarts: u32,
    last_exit: Option<ExitInfo>,
    started_at: Option<Instant>,
    healthy_since: Option<Instant>,
    healthy: bool,
    ready: bool,
    want_running: bool,
    /// The channels its config sets up (`channels.<name>`), from its spec.
    configured_channels: Vec<String>,
    /// What `/readyz` last listed as failing.
    failing: Vec<String>,
    /// This incarnation was ready once.
    was_ready: bool,
    /// This incarnation's stderr said OpenClaw's crash-loop breaker tripped.
    breaker: bool,
    /// This incarnation's start grace was given once more on a saturated host.
    grace_extended: bool,
    /// Its heap cap as raised after out-of-memory aborts (`heap_raise`); `None`: the fleet's.
    heap_mib: Option<u32>,
    /// Itself, for timers set outside a handler's arguments.
    me: ActorRef<AgentMsg>,
    /// The channel states last published, so only changes become events.
    channels: std::collections::BTreeMap<String, crate::channels::ChannelStatus>,
}

impl Drop for AgentRuntime {
    fn drop(&mut self) {
        // The process handle's own drop kills the tree; the prober must not outlive us.
        if let Some(p) = self.prober.take() {
            p.abort();
        }
        // Runs on every exit path (ractor kills children without post_stop), so the views
        // never keep a row for an agent that no longer exists.
        let key = (self.fleet.clone(), self.agent.clone());
        let me = self.instance;
        self.ctx.views.status.remove_if(&key, |_, v| v.owner == me);
        // Its observed process goes with it (a re-spawned actor writes its own).
        self.ctx.views.observed.remove(&key);
    }
}

impl Actor for AgentActor {
    type Msg = AgentMsg;
    type State = AgentRuntime;
    type Arguments = AgentArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<AgentMsg>,
        a: AgentArgs,
    ) -> Result<AgentRuntime, ActorProcessingErr> {
        let paths = AgentPaths::new(&a.ctx.config.state_dir, &a.fleet, &a.agent);
        let mut rt = AgentRuntime {
            instance: a.ctx.next_incarnation(),
            fleet: a.fleet,
            agent: a.agent,
            spec: a.spec,
            port: a.port,
            token: a.token,
            uid: a.uid,
            ctx: a.ctx,
            fleet_ref: a.fleet_ref,
            paths,
            state: AgentState::Stopped,
            reason: None,
            gen: 0,
            gen_tx: tokio::sync::watch::Sender::new(0),
            process: None,
            prober: None,
            permit: None,
            stopping: None,
            stop_waiters: Vec::new(),
            sweeping: Vec::new(),
            history: History::default(),
            restarts: 0,
            last_exit: None,
            started_at: None,
            healthy_since: None,
            healthy: false,
            ready: false,
            want_running: a.start,
            configured_channels: Vec::new(),
            failing: Vec::new(),
            was_ready: false,
            breaker: false,
            grace_extended: false,
            heap_mib: None,
            me: myself.clone(),
            channels: Default::default(),
        };
        rt.configured_channels = configured_channels(&rt.spec, &rt.agent);
        rt.publish_view();
        if rt.want_running {
            rt.begin_start(&myself);
        }
        Ok(rt)
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<AgentMsg>,
        rt: &mut AgentRuntime,
    ) -> Result<(), ActorProcessingErr> {
        rt.ctx
            .views
            .status
            .remove(&(rt.fleet.clone(), rt.agent.clone()));
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<AgentMsg>,
        msg: AgentMsg,
        rt: &mut AgentRuntime,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            AgentMsg::Start { reset_history } => {
                rt.want_running = true;
                if reset_history {
                    rt.history.reset();
                }
                let idle = rt.process.is_none()
                    && !matches!(rt.state, AgentState::Provisioning | AgentState::Starting);
                if idle {
                    rt.begin_start(&myself);
                }
            }
            AgentMsg::Stop { reply } => {
                rt.want_running = false;
                if let Some(r) = reply {
                    rt.stop_waiters.push(r);
                }
                rt.stop_process(Purpose::Stop);
            }
            AgentMsg::Restart { reason } => {
                rt.want_running = true;
                if rt.process.is_some() {
                    rt.reason = Some(reason);
                    rt.stop_process(Purpose::Restart);
                } else {
                    rt.begin_start(&myself);
                }
            }
            AgentMsg::Fail { reason } => {
                rt.want_running = false;
                rt.stop_process(Purpose::Fail(reason));
            }
            AgentMsg::InjectPanic => panic!("fault injection: {}/{}", rt.fleet, rt.agent),
            AgentMsg::SetToken { token, reply } => {
                rt.token = token;
                if rt.process.is_some() {
                    rt.reason = Some("token rotated".into());
                    rt.stop_process(Purpose::Restart);
                } else if rt.want_running && rt.state == AgentState::Provisioning {
                    // A start in flight renders the old token: start over (the old start gives
                    // up, or its process is killed as it arrives).
                    rt.begin_start(&myself);
                }
                let _ = reply.send(());
            }
            AgentMsg::UpdateSpec(spec) => {
                rt.configured_channels = configured_channels(&spec, &rt.agent);
                rt.spec = spec;
            }
            AgentMsg::MemoryLimit { reason } => {
                if rt.process.is_some() && rt.stopping.is_none() {
                    rt.reason = Some(reason);
                    rt.stop_process(Purpose::Memory);
                }
            }
            AgentMsg::Spawned { gen, result } => rt.on_spawned(&myself, gen, *result),
            AgentMsg::Owner { gen, event } => rt.on_owner(&myself, gen, event),
            AgentMsg::Probe { gen, report } => rt.on_probe(gen, report),
            AgentMsg::GraceExpired { gen } => {
                let starting = gen == rt.gen && rt.state == AgentState::Starting;
                // Read only when a grace ran out: a rare event.
                let host = starting
                    .then(|| crate::pressure::HostCpu::now().saturated())
                    .flatten();
                if starting && health::extend_grace(rt.grace_extended, host.is_some()) {
                    let host = host.unwrap_or_default();
                    rt.grace_extended = true;
                    rt.ctx.services.metrics.graces_extended.inc();
                    let grace = Duration::from_millis(rt.spec.health.grace_ms);
                    tracing::warn!(fleet = %rt.fleet, agent = %rt.agent, %host, "start grace given once more: the host's CPU is saturated");
                    rt.set_state(
                        AgentState::Starting,
                        None,
                        Some(format!("start grace given once more ({host})")),
                    );
                    myself.send_after(grace, move || AgentMsg::GraceExpired { gen });
                } else if starting {
                    let again = if rt.grace_extended {
                        ", given twice on a saturated host"
                    } else {
                        ""
                    };
                    rt.reason = Some(format!(
                        "no healthy /healthz within the {} ms start grace{again}",
                        rt.spec.health.grace_ms
                    ));
                    rt.stop_process(Purpose::Health);
                } else if gen == rt.gen {
                    // A channel still failing now counts as failed.
                    rt.publish_view();
                }
            }
            AgentMsg::HeldStop { gen } => {
                if gen == rt.gen && rt.stopping.is_some() {
                    if let Some(p) = &rt.process {
                        p.stop(rt.spec.stop_timeout());
                    }
                }
            }
            AgentMsg::BackoffDone { gen } => {
                if gen == rt.gen && rt.state == AgentState::Backoff && rt.want_running {
                    rt.begin_start(&myself);
                }
            }
        }
        Ok(())
    }
}

impl AgentRuntime {
    fn set_state(&mut self, new: AgentState, exit: Option<ExitInfo>, reason: Option<String>) {
        let old = self.state;
        self.state = new;
        self.reason = reason;
        self.publish_view();
        if old != new {
            self.ctx.publish(Event::Agent(AgentTransition {
                fleet: self.fleet.clone(),
                agent: self.agent.clone(),
                old,
                new,
                pid: self.process.as_ref().map(|p| p.pid),
                exit,
                restarts: self.restarts,
                reason: self.reason.clone(),
                at_ms: now_ms(),
            }));
        }
    }

    /// Records the running process (or none) for the registry.
    fn observe(&self, process: Option<crate::registry::ProcessRecord>) {
        self.ctx.views.observed.insert(
            (self.fleet.clone(), self.agent.clone()),
            Observed { process },
        );
        self.ctx.views.observed_changed.notify_one();
    }

    fn publish_view(&mut self) {
        let seen = crate::channels::Seen {
            running: self.process.is_some() && crate::channels::process_running(self.state),
            ready: self.ready,
            was_ready: self.was_ready,
            failing: &self.failing,
            up_for: self.started_at.map(|t| t.elapsed()).unwrap_or_default(),
            grace: Duration::from_millis(self.spec.health.grace_ms),
            breaker: self.breaker,
        };
        let channels = crate::channels::channel_states(&self.configured_channels, &seen);
        for (name, c) in crate::channels::changed(&self.channels, &channels) {
            if c.state == crate::channels::ChannelState::Failed {
                tracing::warn!(fleet = %self.fleet, agent = %self.agent, channel = %name, "channel failed while the gateway runs");
            }
            self.ctx.publish(Event::Channel {
                fleet: self.fleet.clone(),
                agent: self.agent.clone(),
                channel: name.clone(),
                state: c.state,
                error: c.error.clone(),
                at_ms: now_ms(),
            });
        }
        self.channels = channels.clone();
        let row = AgentStatus {
            channels,
            fleet: self.fleet.clone(),
            agent: self.agent.clone(),
            state: self.state,
            pid: self.process.as_ref().map(|p| p.pid),
            port: Some(self.port),
            home: self.paths.home.display().to_string(),
            restarts: self.restarts,
            healthy: self.healthy,
            ready: self.ready,
            uptime_s: 0,
            drift: None,
            rss_bytes: None,
            last_exit: self.last_exit,
            reason: self.reason.clone(),
            isolation: crate::isolation::IsolationStatus::of(
                self.ctx.host,
                self.spec.isolation,
                self.uid,
            ),
            // Filled in by the status rows, which know the install and the leases.
            openclaw_version: None,
            node: None,
            held_stopped: None,
            webhooks: Default::default(),
        };
        let started = self.process.as_ref().and(self.started_at);
        self.ctx.views.status.insert(
            (self.fleet.clone(), self.agent.clone()),
            AgentView {
                row,
                started,
                owner: self.instance,
            },
        );
    }

    /// Provision, pass the start gate and spawn, in a task; the result comes back as
    /// `Spawned` for this incarnation.
    fn begin_start(&mut self, myself: &ActorRef<AgentMsg>) {
        self.begin_start_after(myself, None);
    }

    /// `begin_start`, telling in the event how the previous process ended.
    fn begin_start_after(&mut self, myself: &ActorRef<AgentMsg>, exit: Option<ExitInfo>) {
        let gen = self.next_gen();
        self.sweeping.push(gen);
        self.set_state(AgentState::Provisioning, exit, None);
        let job = StartJob {
            fleet: self.fleet.clone(),
            agent: self.agent.clone(),
            ctx: self.ctx.clone(),
            spec: self.spec.clone(),
            paths: self.paths.clone(),
            port: self.port,
            token: self.token.clone(),
            marker: self.marker(gen),
            gen,
            uid: self.uid,
            current: self.gen_tx.subscribe(),
            fleet_ref: self.fleet_ref.clone(),
            heap_mib: self.heap_mib,
        };
        let me = myself.clone();
        tokio::spawn(async move {
            let result = Box::new(job.run().await);
            if let Err(ractor::MessagingErr::SendErr(AgentMsg::Spawned { result, .. })) =
                me.send_message(AgentMsg::Spawned { gen, result })
            {
                // The actor is gone: the child must not survive it.
                if let Ok(sp) = *result {
                    kill_orphan(sp);
                }
            }
        });
    }

    /// The environment marker of this agent's incarnation `gen`.
    fn marker(&self, gen: u64) -> String {
        tree::marker(&self.ctx.node_id, &self.fleet, &self.agent, gen)
    }

    /// Moves on to a new incarnation: reports of older ones are stale from now on, and a
    /// start in flight for one of them gives up.
    fn next_gen(&mut self) -> u64 {
        self.gen = self.ctx.next_incarnation();
        self.gen_tx.send_replace(self.gen);
        self.gen
    }

    fn on_spawned(
        &mut self,
        myself: &ActorRef<AgentMsg>,
        gen: u64,
        result: Result<Spawned, SpawnFailure>,
    ) {
        if gen != self.gen || !self.want_running {
            if gen == self.gen {
                self.next_gen();
                self.set_state(AgentState::Stopped, None, None);
            }
            match result {
                // Its owner kills it at once; its `TreeGone` ends the sweep of `gen`.
                Ok(sp) => {
                    let me = myself.clone();
                    kill_unwanted(
                        sp,
                        &self.ctx,
                        &self.spec,
                        &self.paths,
                        self.marker(gen),
                        move |event| {
                            let _ = me.send_message(AgentMsg::Owner { gen, event });
                        },
                    );
                }
                Err(_) => {
                    self.sweeping.retain(|g| *g != gen);
                    self.reply_stop_waiters();
                }
            }
            return;
        }
        // From here on the incarnation's processes are `self.process`'s.
        self.sweeping.retain(|g| *g != gen);
        match result {
            Err(f) => {
                tracing::warn!(fleet = %self.fleet, agent = %self.agent, reason = %f.reason, permanent = f.permanent, "start failed");
                self.reason = Some(format!("start failed: {}", f.reason));
                let cause = ExitCause::StartFailed {
                    permanent: f.permanent,
                };
                self.after_exit(myself, cause, None, None);
            }
            Ok(sp) => {
                let log = open_log(&self.ctx, &self.spec, &self.paths);
                let me = myself.clone();
                let handle = owner::own(
                    sp.child,
                    self.marker(gen),
                    self.ctx.services.sweeper.clone(),
                    sp.cgroup,
                    log,
                    move |event| {
                        let _ = me.send_message(AgentMsg::Owner { gen, event });
                    },
                );
                if sp.port != self.port {
                    tracing::warn!(fleet = %self.fleet, agent = %self.agent, old = self.port, new = sp.port, "port block taken by another process; agent moved");
                    self.port = sp.port;
                }
                self.observe(Some(crate::registry::ProcessRecord {
                    pid: handle.pid,
                    pgid: handle.pid,
                    start_time: handle.start_time,
                }));
                self.process = Some(handle);
                self.permit = sp.permit;
                self.started_at = Some(Instant::now());
                self.healthy = false;
                self.ready = false;
                self.was_ready = false;
                self.breaker = false;
                self.grace_extended = false;
                self.failing.clear();
                self.set_state(AgentState::Starting, None, None);
                if !self.spec.health.enabled {
                    self.on_probe(gen, ProbeReport::unprobed());
                    return;
                }
                let me = myself.clone();
                self.prober = Some(health::spawn_prober(
                    self.port,
                    self.spec.health.clone(),
                    Some(self.ctx.services.listeners.clone()),
                    Some(health::ProbeMetrics {
                        latency: self.ctx.services.metrics.probe_latency.clone(),
                        excused: self.ctx.services.metrics.probes_excused.clone(),
                    }),
                    move |report| {
                        let _ = me.send_message(AgentMsg::Probe { gen, report });
                    },
                ));
                let grace = Duration::from_millis(self.spec.health.grace_ms);
                myself.send_after(grace, move || AgentMsg::GraceExpired { gen });
            }
        }
    }

    fn on_probe(&mut self, gen: u64, r: ProbeReport) {
        if gen != self.gen || self.process.is_none() || self.stopping.is_some() {
            return;
        }
        self.healthy = r.healthy;
        self.ready = r.ready;
        self.was_ready |= r.ready;
        self.failing = r.failing;
        match (self.state, r.healthy) {
            (AgentState::Starting, true) | (AgentState::Unhealthy, true) => {
                self.permit = None;
                self.healthy_since = Some(Instant::now());
                self.set_state(AgentState::Running, None, None);
            }
            (AgentState::Running, false) | (AgentState::Unhealthy, false) => {
                self.healthy_since = None;
                let why = r.error.unwrap_or_else(|| "probe failed".into());
                if r.failures >= self.spec.health.failures {
                    let excused = match r.excused {
                        0 => String::new(),
                        n => format!(", {n} more timeouts not counted on a saturated host"),
                    };
                    self.reason = Some(format!(
                        "{} failed /healthz probes in a row{excused} ({why})",
                        r.failures
                    ));
                    self.stop_process(Purpose::Health);
                } else {
                    self.set_state(AgentState::Unhealthy, None, Some(why));
                }
            }
            _ => self.publish_view(),
        }
    }

    fn on_owner(&mut self, myself: &ActorRef<AgentMsg>, gen: u64, event: OwnerEvent) {
        if let OwnerEvent::TreeGone { .. } = event {
            // Whatever the incarnation: its last processes are gone.
            self.sweeping.retain(|g| *g != gen);
            self.reply_stop_waiters();
            return;
        }
        if gen != self.gen {
            return;
        }
        match event {
            OwnerEvent::LogDropped { lines } => {
                self.ctx.publish(Event::LogLinesDropped {
                    fleet: self.fleet.clone(),
                    agent: self.agent.clone(),
                    lines,
                    reason: "log could not be written".into(),
                    at_ms: now_ms(),
                });
            }
            OwnerEvent::TreeGone { .. } => {}
            OwnerEvent::Breaker => {
                tracing::warn!(fleet = %self.fleet, agent = %self.agent, "OpenClaw's crash-loop breaker tripped: its channels stay off while its probes pass");
                self.breaker = true;
                self.publish_view();
            }
            OwnerEvent::Exited { exit, heap_oom, .. } => {
                if self.stopping.is_none() {
                    // An exit nobody asked for: a status note it carried (a probe's error, a
                    // grace given once more) is not its cause; every stop fleetd asks for
                    // sets `stopping` with its reason.
                    self.reason = None;
                }
                if heap_oom && self.stopping.is_none() {
                    let mut reason = heap_oom_reason(&self.spec, &self.agent, exit, self.heap_mib);
                    if let Some(raise) = self.spec.heap_raise {
                        let now = self.heap_mib.or_else(|| heap_cap(&self.spec, &self.agent));
                        match raise.next(now) {
                            Some(next) => {
                                tracing::warn!(fleet = %self.fleet, agent = %self.agent, from = ?now, to = next, "heap cap raised after a js heap out-of-memory abort");
                                reason.push_str(&format!("; heap cap raised to {next} MiB"));
                                self.heap_mib = Some(next);
                            }
                            None => reason.push_str(&format!(
                                "; heap cap at its bound ({} MiB)",
                                raise.max_mib
                            )),
                        }
                    }
                    self.reason = Some(reason);
                }
                let healthy_for = self.healthy_since.map(|t| t.elapsed());
                self.process = None;
                self.sweeping.push(gen);
                self.observe(None);
                if let Some(p) = self.prober.take() {
                    p.abort();
                }
                self.permit = None;
                self.healthy = false;
                self.ready = false;
                self.healthy_since = None;
                self.started_at = None;
                self.last_exit = Some(exit);
                match lifecycle::after_exit(self.stopping.take(), exit, self.want_running) {
                    Next::Decide(cause) => self.after_exit(myself, cause, healthy_for, Some(exit)),
                    Next::Stopped => {
                        self.set_state(AgentState::Stopped, Some(exit), None);
                        self.reply_stop_waiters();
                    }
                    Next::Failed(reason) => {
                        self.set_state(AgentState::Failed, Some(exit), Some(reason));
                        self.reply_stop_waiters();
                    }
                    Next::StartAgain => self.begin_start_after(myself, Some(exit)),
                }
            }
        }
    }

    fn after_exit(
        &mut self,
        myself: &ActorRef<AgentMsg>,
        cause: ExitCause,
        healthy_for: Option<Duration>,
        exit: Option<ExitInfo>,
    ) {
        let exit = exit.or(self.last_exit);
        if !self.want_running {
            self.set_state(AgentState::Stopped, exit, None);
            self.reply_stop_waiters();
            return;
        }
        let now = Instant::now();
        let decision = restart::decide(
            &self.spec,
            &self.history,
            cause,
            healthy_for,
            now,
            rand::random::<f64>(),
        );
        match decision {
            Decision::Restart { after } => {
                self.history
                    .record_restart(now, self.spec.intensity.window());
                self.restarts += 1;
                let _ = self.fleet_ref.send_message(FleetMsg::AgentRestarting {
                    agent: self.agent.clone(),
                });
                let why = self.reason.take().unwrap_or_else(|| cause.describe());
                self.next_gen();
                self.set_state(
                    AgentState::Backoff,
                    exit,
                    Some(format!("{why}; restart in {} ms", after.as_millis())),
                );
                if after.is_zero() {
                    self.begin_start(myself);
                } else {
                    let gen = self.gen;
                    myself.send_after(after, move || AgentMsg::BackoffDone { gen });
                }
            }
            Decision::GiveUp { reason } => {
                self.want_running = false;
                let reason = match (cause, self.reason.take()) {
                    (ExitCause::StartFailed { .. }, Some(why)) => format!("{why}; {reason}"),
                    _ => reason,
                };
                self.set_state(AgentState::Failed, exit, Some(reason.clone()));
                let _ = self.fleet_ref.send_message(FleetMsg::AgentFailed {
                    agent: self.agent.clone(),
                    reason,
                });
            }
            Decision::Stay { reason } => {
                self.want_running = false;
                self.set_state(AgentState::Stopped, exit, Some(reason));
            }
        }
    }

    /// Stops the current process for `purpose`, or settles at once when there is none.
    fn stop_process(&mut self, purpose: Purpose) {
        if let Some(p) = &self.process {
            let age = self.started_at.map(|t| t.elapsed()).unwrap_or_default();
            let hold = lifecycle::hold_before_stop(&purpose, self.spec.runs_openclaw(), age);
            if lifecycle::replaces(self.stopping.as_ref(), &purpose) {
                self.stopping = Some(purpose);
            }
            match hold {
                Some(d) => {
                    let gen = self.gen;
                    tracing::debug!(fleet = %self.fleet, agent = %self.agent, hold_ms = d.as_millis() as u64, "restart held: the gateway is in its first seconds");
                    self.me.send_after(d, move || AgentMsg::HeldStop { gen });
                }
                None => p.stop(self.spec.stop_timeout()),
            }
            let reason = self.reason.clone();
            self.set_state(AgentState::Stopping, None, reason);
            return;
        }
        // No process: cancel a pending backoff or a start in flight by moving on a generation.
        // A start already spawning is killed when its result comes back, and the stop is
        // answered only then (`sweeping`).
        self.next_gen();
        match purpose {
            Purpose::Fail(reason) => self.set_state(AgentState::Failed, None, Some(reason)),
            _ if self.state == AgentState::Failed => {}
            _ => self.set_state(AgentState::Stopped, None, None),
        }
        self.reply_stop_waiters();
    }

    /// Answers pending stops once no process of this agent is left: none running, none of
    /// an earlier incarnation still being swept.
    fn reply_stop_waiters(&mut self) {
        if self.process.is_some() || !self.sweeping.is_empty() {
            return;
        }
        for w in self.stop_waiters.drain(..) {
            let _ = w.send(());
        }
    }
}

/// The channels an agent's effective config sets up.
fn configured_channels(spec: &crate::spec::FleetSpec, agent: &str) -> Vec<String> {
    match crate::provision::effective_template(spec, agent) {
        Some(serde_json::Value::Object(m)) => crate::provision::configured_channels(&m),
        _ => Vec::new(),
    }
}

/// The heap cap the fleet's settings give the agent (its `NODE_OPTIONS`, else the lean
/// profile's), in MiB; `None`: V8's default.
fn heap_cap(spec: &crate::spec::FleetSpec, agent: &str) -> Option<u32> {
    let options = crate::provision::extra_env(spec, agent)
        .ok()
        .and_then(|e| e.get("NODE_OPTIONS").cloned())
        .or_else(|| {
            (spec.runs_openclaw() && spec.profile == crate::spec::Profile::Lean)
                .then(|| crate::provision::LEAN_NODE_OPTIONS.to_string())
        })
        .unwrap_or_default();
    crate::process::notice::heap_cap_mib(&options).and_then(|m| u32::try_from(m).ok())
}

/// The reason of a V8 heap out-of-memory abort, with the heap cap the agent ran under.
fn heap_oom_reason(
    spec: &crate::spec::FleetSpec,
    agent: &str,
    exit: ExitInfo,
    raised: Option<u32>,
) -> String {
    match raised.or_else(|| heap_cap(spec, agent)) {
        Some(mib) => format!("js heap out of memory (limit {mib} MiB), {exit}"),
        None => format!("js heap out of memory (V8's default limit), {exit}"),
    }
}
