//! What every actor of one node shares, split three ways: its configuration (`NodeConfig`,
//! node id), its services (spawner thread, /proc sweeper, event channel, start gate, metrics,
//! cgroups) and its views (status, fleet states, observed processes, memory samples, specs,
//! drift), each view written by one owner and read by anyone, so `status` never waits on a
//! mailbox. Desired state is not here: the registry, owned by the NodeActor, holds it.

use crate::messages::command::AgentStatus;
use crate::messages::events::Event;
use crate::ports::PortRange;
use crate::process::spawn::Spawner;
use crate::process::tree::Sweeper;
use dashmap::DashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::sync::{broadcast, Semaphore};

/// Settings of one node. `NodeConfig::new(state_dir)` gives the documented defaults.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Registry, agent HOMEs and the control socket live here.
    pub state_dir: PathBuf,
    pub port_range: PortRange,
    /// OpenClaw agents allowed in `starting` at once (a cold start costs ~16 CPU-seconds).
    pub max_concurrent_starts: usize,
    /// The `openclaw` binary; `None` finds it (see `provision::resolve_openclaw`).
    pub openclaw_bin: Option<PathBuf>,
    /// Run agents in a PID namespace when the host allows it.
    pub pid_namespace: bool,
    /// How often the LogRotator runs.
    pub log_interval: std::time::Duration,
    /// Capacity of the event channel (slow subscribers lose the oldest events).
    pub event_capacity: usize,
    /// The declarative spec file (`reload` re-reads it).
    pub spec_path: Option<PathBuf>,
    /// The public HTTPS base the front door serves (`--public-url`): each webhook channel
    /// registers `<public_url>/<fleet>/<agent>/<channel>`.
    pub public_url: Option<String>,
    /// Where the front door's config is written and how the proxy is reloaded whenever the
    /// routes change (`--webhooks-dir`, `--webhooks-format`, `--webhooks-reload`).
    pub front_door: Option<FrontDoor>,
    /// How often each agent's whole process tree is measured.
    pub sample_interval: std::time::Duration,
    /// Starts are refused when MemAvailable would fall below this many bytes.
    pub memory_reserve: u64,
    /// Where MemAvailable is read (tests point it at a file of their own).
    pub meminfo_path: PathBuf,
    /// Which cgroup v2 directory agents get their cgroups under.
    pub cgroup: CgroupMode,
    /// Uids (and, equal to them, gids) leased to agents under `isolation = "uid"`.
    pub agent_uids: crate::isolation::uids::UidRange,
    /// Cluster mode: what runs here comes from etcd (`cluster::join`), so a start forgets
    /// the fleets of the local registry (after stopping anything a crashed run left).
    pub cluster: bool,
}

/// The reverse proxy fleetd keeps in step with the agents' webhook routes.
#[derive(Debug, Clone)]
pub struct FrontDoor {
    pub dir: PathBuf,
    pub format: crate::webhooks::Format,
    pub reload: Vec<String>,
}

/// Where per-agent cgroups live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CgroupMode {
    /// The daemon's own cgroup when the host delegates it (pure cgroup v2, writable).
    Auto,
    /// No cgroups: limits by /proc sampling only.
    Off,
    /// This cgroup v2 directory (e.g. a hybrid host's unified hierarchy).
    At(PathBuf),
}

impl std::str::FromStr for CgroupMode {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "auto" => CgroupMode::Auto,
            "off" => CgroupMode::Off,
            dir => CgroupMode::At(PathBuf::from(dir)),
        })
    }
}

impl NodeConfig {
    /// The documented defaults on `state_dir`: ports 20000-59999, one concurrent OpenClaw
    /// start per core, PID namespace when allowed, logs pruned every 60 s, memory sampled
    /// every 5 s, a 512 MiB MemAvailable reserve.
    pub fn new(state_dir: impl Into<PathBuf>) -> Self {
        NodeConfig {
            state_dir: state_dir.into(),
            port_range: PortRange::default(),
            max_concurrent_starts: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2),
            openclaw_bin: None,
            pid_namespace: true,
            log_interval: std::time::Duration::from_secs(60),
            event_capacity: 4096,
            spec_path: None,
            public_url: None,
            front_door: None,
            sample_interval: std::time::Duration::from_secs(5),
            memory_reserve: 512 * 1024 * 1024,
            meminfo_path: PathBuf::from("/proc/meminfo"),
            cgroup: CgroupMode::Auto,
            agent_uids: crate::isolation::uids::UidRange::parse(
                crate::isolation::uids::DEFAULT_RANGE,
            )
            .expect("the default range parses"),
            cluster: false,
        }
    }
}

pub type AgentKey = (String, String);

/// One agent's entry in the status view: the row plus what changes without a message.
#[derive(Debug, Clone)]
pub struct AgentView {
    pub row: AgentStatus,
    /// When the current process started (uptime is derived when read).
    pub started: Option<std::time::Instant>,
    /// Which actor instance wrote it: a re-spawned actor's entry is never removed by the
    /// drop of its predecessor.
    pub owner: u64,
}

impl AgentView {
    pub fn snapshot(&self) -> AgentStatus {
        let mut row = self.row.clone();
        row.uptime_s = self.started.map(|s| s.elapsed().as_secs()).unwrap_or(0);
        row
    }
}

/// What every actor of one node shares, in three parts: what it was configured with, the
/// services it uses, and the read-mostly views, each written by exactly one owner.
pub struct NodeContext {
    pub config: NodeConfig,
    pub node_id: String,
    /// What isolation this host gives agents (found once at start).
    pub host: crate::isolation::Host,
    pub services: Services,
    pub views: Views,
}

/// The node's machinery: used by the actors, owned by none of them.
pub struct Services {
    pub spawner: Spawner,
    pub sweeper: Sweeper,
    pub events: broadcast::Sender<Event>,
    pub gate: Arc<Semaphore>,
    /// Starts waiting at the start gate (counted by the starts themselves).
    pub gate_waiting: std::sync::atomic::AtomicI64,
    /// Which ports listen, read once for every prober (`listeners`).
    pub listeners: Arc<crate::listeners::ListenerTable>,
    pub metrics: crate::metrics::Metrics,
    /// Per-agent cgroups, where a cgroup v2 directory is delegated to the daemon.
    pub cgroups: Option<crate::process::cgroup::CgroupTree>,
    /// The state dir's lock, held from before the registry is read until `shutdown` ends.
    pub state_lock: std::sync::Mutex<Option<crate::state_dir::StateLock>>,
    incarnations: AtomicU64,
}

/// Read-mostly views, so that `status`, metrics and the sampler never wait on a mailbox. Each
/// is written only by the owner its comment names.
pub struct Views {
    /// One row per agent, written only by that agent's actor.
    pub status: DashMap<AgentKey, AgentView>,
    /// Fleet states, written only by each fleet's supervisor.
    pub fleet_states: DashMap<String, (crate::state::FleetState, Option<String>)>,
    /// The process each agent last ran, written only by that agent; the NodeActor copies it
    /// into the registry (debounced) so a restarted daemon can find what a crashed one left.
    pub observed: DashMap<AgentKey, Observed>,
    pub observed_changed: tokio::sync::Notify,
    /// Each agent's last memory sample, written only by the sampler.
    pub memory: DashMap<AgentKey, MemSample>,
    /// Each fleet's current spec, written only by its FleetSupervisor (read by the sampler,
    /// admission and capacity).
    pub fleet_specs: DashMap<String, Arc<crate::spec::FleetSpec>>,
    /// Per fleet: how a file its spec names differs on disk from the accepted version, written
    /// only by the sampler (which looks every sample interval).
    pub drift: DashMap<String, String>,
}

/// One measurement of an agent's whole process tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemSample {
    pub rss: u64,
    pub processes: u32,
}

/// An agent's running process, as last observed (its port is desired state: the registry
/// has it, and a move goes through the node).
#[derive(Debug, Clone, PartialEq)]
pub struct Observed {
    pub process: Option<crate::registry::ProcessRecord>,
}

impl NodeContext {
    pub fn new(
        config: NodeConfig,
        node_id: String,
        spawner: Spawner,
        sweeper: Sweeper,
        cgroups: Option<crate::process::cgroup::CgroupTree>,
        host: crate::isolation::Host,
    ) -> Self {
        let (events, _) = broadcast::channel(config.event_capacity.max(16));
        let gate = Arc::new(Semaphore::new(config.max_concurrent_starts.max(1)));
        NodeContext {
            config,
            node_id,
            host,
            services: Services {
                spawner,
                sweeper,
                events,
                gate,
                gate_waiting: std::sync::atomic::AtomicI64::new(0),
                listeners: Default::default(),
                metrics: crate::metrics::Metrics::default(),
                cgroups,
                state_lock: std::sync::Mutex::new(None),
                incarnations: AtomicU64::new(1),
            },
            views: Views {
                status: DashMap::new(),
                fleet_states: DashMap::new(),
                observed: DashMap::new(),
                observed_changed: tokio::sync::Notify::new(),
                memory: DashMap::new(),
                fleet_specs: DashMap::new(),
                drift: DashMap::new(),
            },
        }
    }

    /// A node-wide unique number for each process start (part of the environment marker).
    pub fn next_incarnation(&self) -> u64 {
        self.services.incarnations.fetch_add(1, Ordering::Relaxed)
    }

    pub fn publish(&self, ev: Event) {
        self.services.metrics.observe_event(&ev);
        let _ = self.services.events.send(ev);
    }

    /// The status row of one agent view, with its latest memory sample.
    pub fn status_row(&self, key: &AgentKey, view: &AgentView) -> AgentStatus {
        let mut row = view.snapshot();
        row.drift = self.views.drift.get(&key.0).map(|d| d.clone());
        if row.pid.is_some() {
            row.rss_bytes = self.views.memory.get(key).map(|m| m.rss);
        }
        if let Some(spec) = self.views.fleet_specs.get(&key.0) {
            if let (true, Some(base)) = (spec.runs_openclaw(), row.port) {
                let template = crate::provision::effective_template(&spec, &key.1);
                for (ch, port) in
                    crate::webhooks::ports(template.as_ref(), base, spec.effective_stride())
                {
                    if let Some(p) = port {
                        row.webhooks.insert(ch.to_string(), p);
                    }
                }
            }
            if spec.runs_openclaw() {
                row.openclaw_version = match spec.openclaw_version_of(&key.1) {
                    Some(v) => Some(v.to_string()),
                    None => crate::provision::default_version_cached(
                        self.config.openclaw_bin.as_deref(),
                    ),
                };
            }
        }
        row
    }

    /// Mean observed tree RSS of a fleet's running agents.
    pub fn observed_rss(&self, fleet: &str) -> Vec<u64> {
        self.views
            .memory
            .iter()
            .filter(|e| e.key().0 == fleet && e.rss > 0)
            .map(|e| e.rss)
            .collect()
    }
}

/// The documented default state directory: `$FLEET_STATE_DIR`, else `/var/lib/fleet-commander`
/// for root, else `$XDG_STATE_HOME/fleet-commander`, else `~/.local/state/fleet-commander`.
pub fn default_state_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("FLEET_STATE_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    if nix::unistd::geteuid().is_root() {
        return PathBuf::from("/var/lib/fleet-commander");
    }
    if let Some(d) = std::env::var_os("XDG_STATE_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(d).join("fleet-commander");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    home.join(".local/state/fleet-commander")
}

/// The control socket's default path inside a state directory.
pub fn default_socket(state_dir: &std::path::Path) -> PathBuf {
    state_dir.join("fleetd.sock")
}
