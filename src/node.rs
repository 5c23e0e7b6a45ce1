//! The embedding API: start a node inside your own tokio runtime, drive it with typed async
//! methods (the same operations as the command language), subscribe to its events, shut it
//! down. The REPL and the control socket are thin doors over `NodeHandle::execute`.
//!
//! ```no_run
//! # async fn demo() -> Result<(), fleet_commander::FleetError> {
//! use fleet_commander::{Node, NodeConfig, spec::FleetSpec};
//! let node = Node::start(NodeConfig::new("/tmp/fleet-state")).await?;
//! let mut events = node.subscribe();
//! let mut spec = FleetSpec::new("bots");
//! spec.agents = FleetSpec::numbered_agents(2);
//! spec.command = Some(vec!["/usr/local/bin/my-agent".into()]);
//! node.create_fleet(spec).await?;
//! while let Ok(ev) = events.recv().await { println!("{ev:?}"); break; }
//! node.shutdown().await;
//! # Ok(()) }
//! ```

use crate::actors::node::{NodeActor, NodeArgs};
use crate::context::{CgroupMode, NodeConfig, NodeContext};
use crate::error::FleetError;
use crate::messages::command::{AgentStatus, Command, FleetInfo, PortLeaseRow, Reply};
use crate::messages::events::Event;
use crate::messages::node::NodeMsg;
use crate::process::cgroup::CgroupTree;
use crate::process::procfs;
use crate::process::spawn::{Containment, Spawner};
use crate::process::tree::{self, Sweeper};
use crate::registry::{FileStore, RegistryData, Store};
use crate::spec::FleetSpec;
use ractor::rpc::CallResult;
use ractor::{Actor, ActorRef};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::broadcast;

/// Upper bound on any one command (a fleet stop waits for the agents' stop timeouts).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(900);

/// Entry point of the embedding API: `Node::start` returns the handle of a running node.
pub struct Node;

/// A running node. Cheap to clone; `shutdown` stops every fleet and the actor tree.
#[derive(Clone)]
pub struct NodeHandle {
    actor: ActorRef<NodeMsg>,
    ctx: Arc<NodeContext>,
    /// Cluster mode's door: set once by `cluster::join`.
    cluster: Arc<std::sync::OnceLock<Arc<crate::cluster::front::Front>>>,
    stopping: Arc<std::sync::atomic::AtomicBool>,
}

impl Node {
    /// Loads (or creates) the registry in `config.state_dir`, stops whatever a previous,
    /// crashed daemon of this node left running, and brings every fleet back in its desired
    /// state.
    pub async fn start(config: NodeConfig) -> Result<NodeHandle, FleetError> {
        let dir = config.state_dir.clone();
        // Before anything in the directory is read or touched: a second daemon on the same
        // state dir must stop here, not after sweeping the first one's agents.
        let lock = crate::state_dir::take(&dir)?;
        let store = FileStore::new(&dir);
        let loaded = store.load()?;
        if let Some(d) = &loaded {
            crate::registry::validate(d, &config.port_range).map_err(|reason| {
                FleetError::Store {
                    reason: format!(
                        "{} is not a valid registry: {reason}; the file was left untouched",
                        store.path().display()
                    ),
                }
            })?;
        }
        let mut data = match loaded {
            Some(d) => d,
            None => RegistryData {
                version: 1,
                node_id: crate::provision::generate_token()?[..16].to_string(),
                fleets: Default::default(),
            },
        };
        if data.node_id.is_empty() {
            data.node_id = crate::provision::generate_token()?[..16].to_string();
        }
        let host = crate::isolation::Host::detect();
        prepare_isolation(&config, host, &mut data)?;
        store.save(&data)?;
        let leftovers = sweep_leftovers(&data).await;
        if leftovers > 0 {
            tracing::warn!(
                count = leftovers,
                "stopped processes left by a previous run of this node"
            );
        }
        if config.cluster && !data.fleets.is_empty() {
            tracing::info!(
                fleets = data.fleets.len(),
                "cluster mode: the local registry's fleets are forgotten; etcd says what runs here"
            );
            data.fleets.clear();
            store.save(&data)?;
        }
        // Before the spawner: the namespace guardian and every agent inherit the daemon's
        // cgroup, which must already be the leaf it moves into.
        let mode = config.cgroup.clone();
        let cgroups = tokio::task::spawn_blocking(move || setup_cgroups(&mode))
            .await
            .map_err(FleetError::internal)??;
        let spawner = Spawner::start(tokio::runtime::Handle::current(), config.pid_namespace)
            .map_err(|e| FleetError::internal(format!("cannot start the spawner thread: {e}")))?;
        tracing::info!(
            containment = spawner.containment().as_str(),
            "what ends agents with the daemon"
        );
        let own_start = procfs::read_proc(std::process::id())
            .map(|p| p.start_time)
            .unwrap_or(0);
        let sweeper = Sweeper::start(own_start, spawner.guardian_pid());
        let ctx = Arc::new(NodeContext::new(
            config,
            data.node_id.clone(),
            spawner,
            sweeper,
            cgroups,
            host,
        ));
        *ctx.services
            .state_lock
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(lock);
        let (actor, _) = Actor::spawn(
            None,
            NodeActor,
            NodeArgs {
                ctx: ctx.clone(),
                store: Box::new(store),
                data,
            },
        )
        .await
        .map_err(FleetError::internal)?;
        Ok(NodeHandle {
            actor,
            ctx,
            cluster: Default::default(),
            stopping: Default::default(),
        })
    }
}

/// Readies the node for the isolation its host gives, said once: which protections are off
/// for which fleets; under root, a uid range that clashes with the host's users is refused,
/// every agent record gets its uid lease (records from before leases existed included), and
/// the state dir and `fleets/` become searchable (never listable) by other users, so each
/// agent uid can reach its own HOME.
fn prepare_isolation(
    config: &NodeConfig,
    host: crate::isolation::Host,
    data: &mut RegistryData,
) -> Result<(), FleetError> {
    use crate::isolation::uids;
    let strongest = host.strongest();
    tracing::info!(
        default = strongest.as_str(),
        landlock_abi = host.landlock_abi,
        uid_range = %config.agent_uids,
        "agent isolation"
    );
    if !host.can_setuid {
        tracing::warn!(
            "fleetd is not root: agents run as its own uid, so no own-uid, private-tmp or nproc-per-uid; Landlock alone separates them"
        );
    }
    let missing = host.missing(strongest);
    if !missing.is_empty() {
        tracing::warn!(off = %missing.join(", "), "this kernel cannot give agents every protection of isolation {strongest}");
    }
    if !host.can_setuid {
        return Ok(());
    }
    let range = config.agent_uids;
    uids::check_against_host(range).map_err(|reason| FleetError::Store { reason })?;
    let mut taken = uids::taken(
        &config.state_dir,
        range,
        data.fleets
            .values()
            .flat_map(|f| f.agents.values())
            .filter_map(|a| a.uid),
    );
    for (fleet, f) in data.fleets.iter_mut() {
        for (agent, a) in f.agents.iter_mut() {
            if a.uid.is_none() {
                let uid = uids::pick(range, &taken).ok_or_else(|| FleetError::Store {
                    reason: format!(
                        "no free uid in --agent-uids {range} for {fleet}/{agent}: widen the range"
                    ),
                })?;
                taken.insert(uid);
                a.uid = Some(uid);
            }
        }
    }
    for dir in [config.state_dir.clone(), config.state_dir.join("fleets")] {
        create_searchable(&dir).map_err(|e| FleetError::Store {
            reason: format!(
                "{}: cannot make it searchable for agent uids: {e}",
                dir.display()
            ),
        })?;
    }
    Ok(())
}

/// `dir`, created 0711 if it is missing, searchable (never listable) by other users.
fn create_searchable(dir: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    match std::fs::DirBuilder::new().mode(0o711).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    crate::isolation::tenant_fs::make_searchable(dir)
}

/// The per-agent cgroup tree, or None (said once, with why). A directory named explicitly
/// that cannot be used is an error; an automatic one that cannot be used is not.
fn setup_cgroups(mode: &CgroupMode) -> Result<Option<CgroupTree>, FleetError> {
    let (dir, explicit) = match mode {
        CgroupMode::Off => {
            tracing::info!("cgroups off by configuration: memory limits use /proc sampling");
            return Ok(None);
        }
        CgroupMode::At(dir) => (dir.clone(), true),
        CgroupMode::Auto => match procfs::cgroup_v2_delegated() {
            Some(dir) => (dir, false),
            None => {
                tracing::info!("cgroup v2 is not delegated to this daemon (cgroup v1 or hybrid host, or no delegation): per-agent memory.max/pids.max/cpu.max and cgroup.kill are off; memory limits use /proc sampling");
                return Ok(None);
            }
        },
    };
    match CgroupTree::setup(&dir) {
        Ok(tree) => {
            tracing::info!(cgroup = %tree.base().display(), controllers = %tree.controllers().names(), "agents run in cgroups of their own");
            Ok(Some(tree))
        }
        Err(e) if explicit => Err(FleetError::internal(format!(
            "cannot use cgroup {}: {e}",
            dir.display()
        ))),
        Err(e) => {
            tracing::warn!(cgroup = %dir.display(), error = %e, "cannot use the delegated cgroup: limits use /proc sampling");
            Ok(None)
        }
    }
}

/// Stops every process carrying this node's marker (and every recorded pid that is still the
/// same process): a crashed daemon's agents must not run twice.
async fn sweep_leftovers(data: &RegistryData) -> usize {
    let prefix = tree::node_marker_prefix(&data.node_id);
    let recorded: Vec<tree::Member> = data
        .fleets
        .values()
        .flat_map(|f| f.agents.values())
        .filter_map(|a| a.process.as_ref())
        .filter(|p| procfs::is_same_process(p.pid, p.start_time))
        .filter(|p| {
            // A recorded pid is only ours if it still carries our marker: never touch a reused pid.
            procfs::env_var(p.pid, tree::MARKER_VAR).is_some_and(|v| v.starts_with(&prefix))
        })
        .map(|p| tree::Member {
            pid: p.pid,
            pgid: p.pgid,
            start_time: p.start_time,
        })
        .collect();
    // Every recorded process, ours or dying: a process in its exit can no longer show its
    // marker but may still hold its port for a few milliseconds.
    let identities: Vec<tree::Member> = data
        .fleets
        .values()
        .flat_map(|f| f.agents.values())
        .filter_map(|a| a.process.as_ref())
        .map(|p| tree::Member {
            pid: p.pid,
            pgid: p.pgid,
            start_time: p.start_time,
        })
        .collect();
    tokio::task::spawn_blocking(move || {
        let mut all = tree::collect(None, &prefix);
        for r in recorded {
            if !all.iter().any(|m| m.pid == r.pid) {
                all.push(r);
            }
        }
        let n = all.len();
        tree::terminate_blocking(&all, Duration::from_secs(5));
        // Waiting is harmless even for a process that is not ours: same pid and start time
        // means it is the recorded one, and it is on its way out.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !tree::alive(&identities).is_empty() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        n
    })
    .await
    .unwrap_or(0)
}

impl NodeHandle {
    /// Runs one command of the command language (what the REPL and the socket do). In
    /// cluster mode it acts cluster-wide (`cluster::front`).
    pub async fn execute(&self, cmd: Command) -> Reply {
        match self.cluster.get() {
            Some(front) => front.execute(self, cmd).await,
            None => self.execute_local(cmd).await,
        }
    }

    /// Cluster mode: from now on every command goes through `front`. Once only.
    pub fn set_cluster(&self, front: Arc<crate::cluster::front::Front>) -> Result<(), FleetError> {
        self.cluster.set(front).map_err(|_| FleetError::Cluster {
            reason: "this node already belongs to a cluster".into(),
        })
    }

    /// The spawner's fence (cluster mode arms it).
    pub fn fence(&self) -> Arc<crate::process::spawn::Fence> {
        self.ctx.services.spawner.fence()
    }

    /// The `--spec` file the node was started with.
    pub fn spec_path(&self) -> Option<&std::path::Path> {
        self.ctx.config.spec_path.as_deref()
    }

    pub fn port_range(&self) -> crate::ports::PortRange {
        self.ctx.config.port_range
    }

    /// `shutdown` has begun.
    pub fn is_shutting_down(&self) -> bool {
        self.stopping.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// No status row and no live process of `fleet/agent` on this node.
    pub fn local_agent_gone(&self, agent: &str) -> bool {
        let Some((f, a)) = agent.split_once('/') else {
            return true;
        };
        let listed = self
            .ctx
            .views
            .status
            .iter()
            .any(|v| v.key().0 == f && v.key().1 == a);
        !listed && tree::collect(None, &format!("{}/{f}/{a}/", self.node_id())).is_empty()
    }

    /// Runs one command on this node only, whatever mode it is in.
    pub async fn execute_local(&self, cmd: Command) -> Reply {
        if let Command::Status {
            fleet: None,
            agent: None,
        } = cmd
        {
            return Reply::Status(self.status_all());
        }
        match self
            .actor
            .call(|r| NodeMsg::Command(cmd, r), Some(COMMAND_TIMEOUT))
            .await
        {
            Ok(CallResult::Success(r)) => r,
            Ok(CallResult::Timeout) => Reply::Error(FleetError::Timeout {
                what: "the node to answer".into(),
            }),
            _ => Reply::Error(FleetError::ShuttingDown),
        }
    }

    async fn ok(&self, cmd: Command) -> Result<(), FleetError> {
        match self.execute(cmd).await {
            Reply::Error(e) => Err(e),
            _ => Ok(()),
        }
    }

    /// Creates a fleet from a full spec and starts its agents.
    pub async fn create_fleet(&self, spec: FleetSpec) -> Result<(), FleetError> {
        if let Some(front) = self.cluster.get() {
            return front.create_fleet(spec).await;
        }
        match self
            .actor
            .call(
                |r| NodeMsg::CreateFleet(Box::new(spec), r),
                Some(COMMAND_TIMEOUT),
            )
            .await
        {
            Ok(CallResult::Success(r)) => r,
            _ => Err(FleetError::ShuttingDown),
        }
    }

    /// Makes the node's fleets match `specs` (what `--spec` and `reload` do).
    pub async fn apply_spec(&self, specs: Vec<FleetSpec>) -> Result<String, FleetError> {
        self.apply_spec_holding(specs, Default::default()).await
    }

    /// `apply_spec`, with the agents named in `hold` (`fleet/agent`) added stopped; they
    /// refuse every start until `handed_in` (cluster mode's handover; public for its tests).
    #[doc(hidden)]
    pub async fn apply_spec_holding(
        &self,
        specs: Vec<FleetSpec>,
        hold: std::collections::BTreeSet<String>,
    ) -> Result<String, FleetError> {
        match self
            .actor
            .call(
                |r| NodeMsg::ApplySpec(specs, hold, r),
                Some(COMMAND_TIMEOUT),
            )
            .await
        {
            Ok(CallResult::Success(r)) => r,
            _ => Err(FleetError::ShuttingDown),
        }
    }

    /// Ends the hold `apply_spec_holding` put on an agent. Ordered before any command sent
    /// after it (one mailbox).
    #[doc(hidden)]
    pub fn handed_in(&self, fleet: &str, agent: &str) {
        let _ = self.actor.send_message(NodeMsg::HandedIn {
            fleet: fleet.to_string(),
            agent: agent.to_string(),
        });
    }

    /// Every fleet with its state, strategy and how many of its agents run.
    pub async fn fleets(&self) -> Result<Vec<FleetInfo>, FleetError> {
        match self.execute(Command::FleetList).await {
            Reply::Fleets(v) => Ok(v),
            Reply::Error(e) => Err(e),
            other => Err(FleetError::internal(format!("unexpected reply {other:?}"))),
        }
    }

    /// Starts every agent of the fleet (and forgets their past restarts).
    pub async fn start_fleet(&self, fleet: &str) -> Result<(), FleetError> {
        self.ok(Command::FleetStart {
            fleet: fleet.into(),
        })
        .await
    }
    /// Stops every agent of the fleet; returns when all their processes are gone.
    pub async fn stop_fleet(&self, fleet: &str) -> Result<(), FleetError> {
        self.ok(Command::FleetStop {
            fleet: fleet.into(),
        })
        .await
    }
    /// Restarts every agent of the fleet; returns once the restarts are under way.
    pub async fn restart_fleet(&self, fleet: &str) -> Result<(), FleetError> {
        self.ok(Command::FleetRestart {
            fleet: fleet.into(),
        })
        .await
    }
    /// Stops and removes the fleet and releases its ports; `purge` also deletes its agents'
    /// HOMEs (only inside the state dir) and OpenClaw's lock files for them.
    pub async fn remove_fleet(&self, fleet: &str, purge: bool) -> Result<(), FleetError> {
        self.ok(Command::FleetRm {
            fleet: fleet.into(),
            purge,
        })
        .await
    }
    /// Adds an agent (new port block and token) and starts it if the fleet runs.
    pub async fn add_agent(&self, fleet: &str, agent: &str) -> Result<(), FleetError> {
        self.ok(Command::AgentAdd {
            fleet: fleet.into(),
            agent: agent.into(),
            settings: Default::default(),
        })
        .await
    }
    /// Adds a tenant: an agent with its own settings and secrets (files read now).
    pub async fn add_tenant(
        &self,
        fleet: &str,
        agent: &str,
        settings: crate::messages::command::AgentChange,
    ) -> Result<(), FleetError> {
        self.ok(Command::AgentAdd {
            fleet: fleet.into(),
            agent: agent.into(),
            settings,
        })
        .await
    }
    /// Starts an agent (a failed one too), with a fresh restart budget.
    pub async fn start_agent(&self, fleet: &str, agent: &str) -> Result<(), FleetError> {
        self.ok(Command::AgentStart {
            fleet: fleet.into(),
            agent: agent.into(),
        })
        .await
    }
    /// Stops the agent; returns when its whole process tree is gone.
    pub async fn stop_agent(&self, fleet: &str, agent: &str) -> Result<(), FleetError> {
        self.ok(Command::AgentStop {
            fleet: fleet.into(),
            agent: agent.into(),
        })
        .await
    }
    /// Stops the agent's tree gracefully and starts it again (not counted as a crash).
    pub async fn restart_agent(&self, fleet: &str, agent: &str) -> Result<(), FleetError> {
        self.ok(Command::AgentRestart {
            fleet: fleet.into(),
            agent: agent.into(),
        })
        .await
    }
    /// Stops and removes the agent and releases its port block; `purge` also deletes its HOME.
    pub async fn remove_agent(
        &self,
        fleet: &str,
        agent: &str,
        purge: bool,
    ) -> Result<(), FleetError> {
        self.ok(Command::AgentRm {
            fleet: fleet.into(),
            agent: agent.into(),
            purge,
        })
        .await
    }

    /// Status of one fleet, one agent, or (both `None`) every agent. Reads the shared status
    /// view: no mailbox on the way for the whole-node case.
    pub async fn status(
        &self,
        fleet: Option<&str>,
        agent: Option<&str>,
    ) -> Result<Vec<AgentStatus>, FleetError> {
        match self
            .execute(Command::Status {
                fleet: fleet.map(Into::into),
                agent: agent.map(Into::into),
            })
            .await
        {
            Reply::Status(v) => Ok(v),
            Reply::Error(e) => Err(e),
            other => Err(FleetError::internal(format!("unexpected reply {other:?}"))),
        }
    }

    fn status_all(&self) -> Vec<AgentStatus> {
        let mut rows: Vec<AgentStatus> = self
            .ctx
            .views
            .status
            .iter()
            .map(|v| self.ctx.status_row(v.key(), &v))
            .collect();
        rows.sort_by(|a, b| (&a.fleet, &a.agent).cmp(&(&b.fleet, &b.agent)));
        rows
    }

    /// Every port lease: fleet, agent, base port and stride.
    pub async fn ports(&self) -> Result<Vec<PortLeaseRow>, FleetError> {
        match self.execute(Command::Ports).await {
            Reply::Ports(v) => Ok(v),
            Reply::Error(e) => Err(e),
            other => Err(FleetError::internal(format!("unexpected reply {other:?}"))),
        }
    }

    /// The agent's gateway token; `rotate` makes a new one, rewrites the config and restarts
    /// the agent.
    pub async fn token(
        &self,
        fleet: &str,
        agent: &str,
        rotate: bool,
    ) -> Result<String, FleetError> {
        match self
            .execute(Command::Token {
                fleet: fleet.into(),
                agent: agent.into(),
                rotate,
            })
            .await
        {
            Reply::Token { token, .. } => Ok(token),
            Reply::Error(e) => Err(e),
            other => Err(FleetError::internal(format!("unexpected reply {other:?}"))),
        }
    }

    /// The last `lines` lines of the agent's log across its archives, tokens redacted.
    pub async fn logs(
        &self,
        fleet: &str,
        agent: &str,
        lines: usize,
    ) -> Result<Vec<String>, FleetError> {
        match self
            .execute(Command::Logs {
                fleet: fleet.into(),
                agent: agent.into(),
                lines,
                follow: false,
            })
            .await
        {
            Reply::Logs(v) => Ok(v),
            Reply::Error(e) => Err(e),
            other => Err(FleetError::internal(format!("unexpected reply {other:?}"))),
        }
    }

    /// `logs -n lines`, then a follower of what the agent writes next: the half of
    /// `logs --follow` that the REPL and the socket share.
    pub async fn follow_logs(
        &self,
        fleet: &str,
        agent: &str,
        lines: usize,
    ) -> Result<(Vec<String>, LogFollow), FleetError> {
        if let Some(front) = self.cluster.get() {
            front.follows_here(fleet, agent).await?;
        }
        let first = self.logs(fleet, agent, lines).await?;
        let tokens = self.agent_tokens(fleet, agent).await?;
        let path = crate::provision::AgentPaths::new(self.state_dir(), fleet, agent).agent_log;
        Ok((
            first,
            LogFollow {
                follower: crate::logs::tail::Follower::new(&path),
                tokens,
                node: self.clone(),
                fleet: fleet.to_string(),
                agent: agent.to_string(),
            },
        ))
    }

    /// Every token of an agent, current and earlier: what its logs must never show.
    async fn agent_tokens(&self, fleet: &str, agent: &str) -> Result<Vec<String>, FleetError> {
        let (fleet, agent) = (fleet.to_string(), agent.to_string());
        match self
            .actor
            .call(
                |reply| NodeMsg::AgentTokens {
                    fleet,
                    agent,
                    reply,
                },
                Some(Duration::from_secs(10)),
            )
            .await
        {
            Ok(CallResult::Success(r)) => r,
            _ => Err(FleetError::ShuttingDown),
        }
    }

    /// Fault injection for tests: the agent's actor panics, as a bug would make it. Its
    /// process is killed by the actor's drop and the fleet re-spawns the actor from the
    /// agent's recipe. Not reachable from the command language.
    #[doc(hidden)]
    pub fn inject_agent_panic(&self, fleet: &str, agent: &str) {
        let _ = self.actor.send_message(NodeMsg::InjectPanic {
            fleet: fleet.into(),
            agent: agent.into(),
        });
    }

    /// Every lifecycle event from now on. A subscriber that falls behind by more than the
    /// channel capacity loses the oldest events (`RecvError::Lagged`).
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.ctx.services.events.subscribe()
    }

    /// Prometheus text of the node's metrics now.
    pub fn metrics_text(&self) -> String {
        crate::metrics::render(&self.ctx)
    }

    /// Serves `GET /metrics` on `addr` (a loopback address unless you mean otherwise);
    /// returns the bound address.
    pub async fn serve_metrics(
        &self,
        addr: std::net::SocketAddr,
    ) -> std::io::Result<std::net::SocketAddr> {
        let l = tokio::net::TcpListener::bind(addr).await?;
        let bound = l.local_addr()?;
        tokio::spawn(crate::metrics::serve(l, self.ctx.clone()));
        Ok(bound)
    }

    /// Why a control-socket peer with this pid is refused because it belongs to an agent.
    #[doc(hidden)]
    pub fn agent_peer_refusal(&self, pid: i32) -> Option<String> {
        use std::sync::atomic::Ordering;
        let guardian = self
            .ctx
            .services
            .spawner
            .guardian_pid()
            .load(Ordering::Relaxed);
        let roots: Vec<(u32, String)> = self
            .ctx
            .views
            .status
            .iter()
            .filter_map(|v| {
                v.row
                    .pid
                    .map(|p| (p, format!("{}/{}", v.key().0, v.key().1)))
            })
            .collect();
        crate::admin::peer::refusal(
            pid,
            &crate::admin::peer::Agents {
                guardian,
                roots: &roots,
            },
        )
    }

    /// The isolation a fleet that names none gets on this host (`isolation::Host`).
    pub fn default_isolation(&self) -> crate::isolation::Isolation {
        self.ctx.host.strongest()
    }

    /// How agents are kept from outliving the node on this host.
    pub fn containment(&self) -> Containment {
        self.ctx.services.spawner.containment()
    }

    pub(crate) fn context(&self) -> Arc<NodeContext> {
        self.ctx.clone()
    }

    /// Cluster mode's front door, once joined.
    pub(crate) fn cluster_front(&self) -> Option<Arc<crate::cluster::front::Front>> {
        self.cluster.get().cloned()
    }

    /// The node's state directory (registry, agent HOMEs, socket).
    pub fn state_dir(&self) -> &std::path::Path {
        &self.ctx.config.state_dir
    }

    /// The node's id: part of every agent's environment marker, kept in the registry.
    pub fn node_id(&self) -> &str {
        &self.ctx.node_id
    }

    /// Stops every fleet (each agent within its stop timeout), then the actor tree and the
    /// spawner thread. Idempotent.
    pub async fn shutdown(&self) {
        self.stopping
            .store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(front) = self.cluster.get() {
            // Bounded: a shutdown is not held up by a slow shared filesystem.
            let _ = tokio::time::timeout(Duration::from_secs(120), front.hand_over_all(self)).await;
        }
        let _ = self
            .actor
            .call(NodeMsg::Shutdown, Some(COMMAND_TIMEOUT))
            .await;
        // Only now, with every agent stopped: the others may take them over at once.
        if let Some(front) = self.cluster.get() {
            front.leave().await;
        }
        let stopped = self
            .actor
            .stop_and_wait(Some("shutdown".into()), Some(Duration::from_secs(30)))
            .await;
        self.ctx.services.spawner.close();
        // Another daemon (or a new node in this process) may take the state dir from now on,
        // but only once this node can no longer write to it (the process's exit frees it
        // otherwise).
        if stopped.is_ok() {
            self.ctx
                .services
                .state_lock
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take();
        }
    }
}

/// New lines of one agent's log, every token redacted; poll it every few hundred ms.
pub struct LogFollow {
    follower: crate::logs::tail::Follower,
    tokens: Vec<String>,
    node: NodeHandle,
    fleet: String,
    agent: String,
}

impl LogFollow {
    /// The lines written since the last poll. The agent's tokens are asked for again before
    /// lines are shown, so a token rotated during the follow is redacted too (the old ones
    /// are kept when the node cannot answer).
    pub async fn poll(&mut self) -> Vec<String> {
        let lines = self.follower.poll().unwrap_or_default();
        if lines.is_empty() {
            return lines;
        }
        if let Ok(t) = self.node.agent_tokens(&self.fleet, &self.agent).await {
            for t in t {
                if !self.tokens.contains(&t) {
                    self.tokens.push(t);
                }
            }
        }
        let secrets: Vec<&str> = self.tokens.iter().map(String::as_str).collect();
        lines
            .iter()
            .map(|l| crate::logs::tail::redact(l, &secrets))
            .collect()
    }
}
