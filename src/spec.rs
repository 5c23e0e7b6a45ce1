//! What the operator asked for: serde types with defaults and validation, shared by the
//! command language, the TOML spec file and the registry. Deserialized and validated once;
//! the runtime never parses user input into its own state (that lives in `state` and the
//! actors).

use crate::ids::{is_valid_id, ID_RULE};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

/// OTP restart type of an agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RestartType {
    /// Always restarted.
    #[default]
    Permanent,
    /// Restarted only after an abnormal exit (non-zero code or a signal).
    Transient,
    /// Never restarted.
    Temporary,
}

/// OTP strategy of a fleet: which siblings restart with a crashed agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    #[default]
    OneForOne,
    OneForAll,
    RestForOne,
}

/// Memory/start-up profile applied to OpenClaw agents.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Profile {
    #[default]
    Default,
    Lean,
}

macro_rules! str_enum {
    ($t:ty { $($v:ident = $s:literal),* $(,)? }) => {
        impl $t {
            pub const NAMES: &'static [&'static str] = &[$($s),*];
            pub fn as_str(self) -> &'static str { match self { $(Self::$v => $s),* } }
        }
        impl std::str::FromStr for $t {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                match s { $($s => Ok(Self::$v),)* _ => Err(format!("expected one of {}", Self::NAMES.join("|"))) }
            }
        }
        impl std::fmt::Display for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result { f.write_str(self.as_str()) }
        }
    };
}
str_enum!(RestartType { Permanent = "permanent", Transient = "transient", Temporary = "temporary" });
str_enum!(Strategy { OneForOne = "one_for_one", OneForAll = "one_for_all", RestForOne = "rest_for_one" });
str_enum!(Profile { Default = "default", Lean = "lean" });

/// Exponential backoff between restarts of one agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BackoffSpec {
    /// Delay before the second consecutive restart; the first is immediate.
    pub initial_ms: u64,
    pub max_ms: u64,
    pub multiplier: f64,
    /// Fraction (0..=1) of the delay added or removed at random.
    pub jitter: f64,
    /// Consecutive-failure count resets after the agent stayed healthy this long.
    pub reset_after_s: u64,
}

impl Default for BackoffSpec {
    fn default() -> Self {
        BackoffSpec {
            initial_ms: 500,
            max_ms: 30_000,
            multiplier: 2.0,
            jitter: 0.2,
            reset_after_s: 60,
        }
    }
}

/// Restart intensity: more than `max_restarts` within `window_s` gives up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Intensity {
    pub max_restarts: u32,
    pub window_s: u64,
}

impl Intensity {
    pub fn window(&self) -> Duration {
        Duration::from_secs(self.window_s)
    }
}

fn default_agent_intensity() -> Intensity {
    Intensity {
        max_restarts: 5,
        window_s: 300,
    }
}

fn default_fleet_intensity() -> Intensity {
    Intensity {
        max_restarts: 3,
        window_s: 300,
    }
}

/// Liveness/readiness probing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HealthSpec {
    /// False: no probe at all, as supervisord and PM2 run: a spawned agent counts as running
    /// and ready (nothing checks its port; a hang goes unseen). Custom commands only (agents
    /// that serve no HTTP, the like-for-like supervisor figures): an OpenClaw fleet's start
    /// gate, upgrades and channel states all rest on its probes. Written only when false, so
    /// a registry stays readable by the build before this field.
    #[serde(skip_serializing_if = "is_true")]
    pub enabled: bool,
    /// Steady probe interval once the agent is running.
    pub interval_ms: u64,
    /// How long a starting agent may take to pass its first probe before probe failures count.
    pub grace_ms: u64,
    /// Failed probes in a row that restart a running agent.
    pub failures: u32,
    /// One probe's answer time. 5 s, not 2: on two cores, three lean gateways cold-starting
    /// at once starved a healthy one past three 2-second probes, and its restart fed the
    /// storm (tests/real_openclaw.rs, 2026-12-01).
    pub timeout_ms: u64,
}

impl Default for HealthSpec {
    fn default() -> Self {
        HealthSpec {
            enabled: true,
            interval_ms: 10_000,
            grace_ms: 120_000,
            failures: 3,
            timeout_ms: 5_000,
        }
    }
}

/// Agent log handling.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogSpec {
    pub max_bytes: u64,
    pub keep: u32,
    pub budget_bytes: u64,
    pub retention_days: u32,
}

impl Default for LogSpec {
    fn default() -> Self {
        LogSpec {
            max_bytes: 10 * 1024 * 1024,
            keep: 5,
            budget_bytes: 100 * 1024 * 1024,
            retention_days: 7,
        }
    }
}

/// Per-agent cgroup v2 limits (used where the host delegates a cgroup to the daemon; see
/// `process::cgroup`). Unset means no limit.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CgroupLimits {
    /// `memory.max`: the kernel's hard cap on the agent's whole tree, in bytes (an OOM kill
    /// inside the agent's cgroup, then a restart like any crash).
    pub memory_max: Option<u64>,
    /// `pids.max`: processes and threads the agent's tree may hold.
    pub pids_max: Option<u64>,
    /// `cpu.max`: percent of one core (150 = one and a half cores).
    pub cpu_max: Option<u32>,
}

/// Scheduled backups of each agent of a fleet (`[fleet.backup]`): one archive per agent every
/// `every`, the newest `keep` kept, in `<dir>/<fleet>/<agent>/` (default
/// `<state>/backups/<fleet>/<agent>/`). A failed backup is an event and a metric; the agent
/// runs on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackupSpec {
    /// `30m`, `6h`, `1d`: a whole number and a unit (s, m, h, d), at least a minute.
    pub every: String,
    #[serde(default = "default_backup_keep")]
    pub keep: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dir: Option<PathBuf>,
}

fn default_backup_keep() -> u32 {
    7
}

impl BackupSpec {
    /// `every` in seconds, or why it is not a duration.
    pub fn every_s(&self) -> Result<u64, String> {
        parse_duration_s(&self.every)
    }
}

/// `[fleet.heap_raise]`: after a V8 heap out-of-memory abort, the agent's next start gets a
/// heap cap (`--max-old-space-size`) `step_mib` larger than the one it died under, never above
/// `max_mib`. Kept for the agent's life in this daemon; a restart of fleetd starts again from
/// the fleet's own cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeapRaise {
    #[serde(default = "default_heap_step")]
    pub step_mib: u32,
    pub max_mib: u32,
}

fn default_heap_step() -> u32 {
    64
}

impl HeapRaise {
    /// The cap after an out-of-memory abort under `current` (`None`: V8's own default, taken
    /// as unknown: the first raise goes to `max_mib`'s first step above nothing, `step_mib`).
    pub fn next(self, current: Option<u32>) -> Option<u32> {
        let cur = current.unwrap_or(0);
        let next = cur.saturating_add(self.step_mib).min(self.max_mib);
        (next > cur).then_some(next)
    }
}

/// `90s`, `30m`, `6h`, `1d` → seconds; at least 60 s, at most 366 days.
pub fn parse_duration_s(v: &str) -> Result<u64, String> {
    let bad = || format!("{v:?} is not a duration like 30m, 6h or 1d (s, m, h, d; at least 1m)");
    let split = v.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
    let (n, unit) = v.split_at(split);
    let n: u64 = n.parse().map_err(|_| bad())?;
    let mult = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(bad()),
    };
    let s = n.checked_mul(mult).ok_or_else(bad)?;
    if !(60..=366 * 86_400).contains(&s) {
        return Err(bad());
    }
    Ok(s)
}

/// `pids.max` (and, for an agent with a uid of its own, RLIMIT_NPROC) when the fleet sets
/// none: a fork bomb in one tenant stops here instead of starving the host. An idle OpenClaw
/// tree holds about 40 threads.
pub const DEFAULT_PIDS_MAX: u64 = 1024;
/// `memory.max` when the fleet sets none: four times what a talking lean gateway holds.
pub const DEFAULT_MEMORY_MAX: u64 = 4 << 30;

/// Ports each OpenClaw agent needs by default: base .. base+110 plus headroom (OpenClaw asks
/// for 120 between bases); the block is rounded to 128.
pub const OPENCLAW_STRIDE: u16 = 128;
/// OpenClaw derives ports up to base+110, so a smaller block overlaps a neighbour's CDP range.
pub const OPENCLAW_MIN_STRIDE: u16 = 111;
/// The lean profile loads no browser plugin: the gateway listens on its base port only
/// (measured, docs/openclaw-facts.md). A few spare ports keep room for what a later version
/// adds next to the base.
pub const LEAN_STRIDE: u16 = 4;

/// One fleet as the operator described it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetSpec {
    pub name: String,
    /// Agent ids in start order.
    #[serde(default)]
    pub agents: Vec<String>,
    #[serde(default)]
    pub strategy: Strategy,
    #[serde(default)]
    pub restart: RestartType,
    #[serde(default)]
    pub backoff: BackoffSpec,
    #[serde(default = "default_agent_intensity")]
    pub intensity: Intensity,
    #[serde(default = "default_fleet_intensity")]
    pub fleet_intensity: Intensity,
    #[serde(default = "default_stop_timeout")]
    pub stop_timeout_ms: u64,
    /// Program and arguments; `None` runs `openclaw gateway run`.
    #[serde(default)]
    pub command: Option<Vec<String>>,
    /// JSON config template merged under the values the commander enforces.
    #[serde(default)]
    pub template: Option<PathBuf>,
    /// The template's content as fleetd read it when the command or reload was accepted
    /// (`provision::accept_files`): what every start renders, whatever the file says later.
    /// Set by fleetd, never written in a spec file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template_config: Option<serde_json::Value>,
    /// Extra environment for the agent (added to the explicit set, never inherited).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Ports leased per agent.
    #[serde(default)]
    pub stride: Option<u16>,
    #[serde(default)]
    pub health: HealthSpec,
    #[serde(default)]
    pub profile: Profile,
    /// Restart an agent whose whole process tree stays above this many bytes.
    #[serde(default)]
    pub max_memory: Option<u64>,
    #[serde(default)]
    pub logs: LogSpec,
    /// Hard per-agent limits through cgroup v2, where delegated.
    #[serde(default)]
    pub cgroup: CgroupLimits,
    /// How its agents are kept apart from each other and from the daemon; `None`: the
    /// strongest this host gives (`isolation::Host::resolve`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub isolation: Option<crate::isolation::Isolation>,
    /// Let the kernel merge its agents' identical pages (KSM, `PR_SET_MEMORY_MERGE`); `None`:
    /// on for OpenClaw fleets where the kernel has it (`FleetSpec::merges_pages`). ksmd itself
    /// (`/sys/kernel/mm/ksm/run`) is the host's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ksm: Option<bool>,
    /// Raise an agent's heap cap step by step after V8 heap out-of-memory aborts; `None`: never.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heap_raise: Option<HeapRaise>,
    /// Scheduled backups of its agents; `None`: only on demand.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup: Option<BackupSpec>,
    /// Node/V8 flags on the gateway's own command line (`node FLAGS openclaw.mjs gateway
    /// run`), for those NODE_OPTIONS refuses, such as `--optimize-for-size` (measured under
    /// conversation: 85 MiB less per tenant for 19 % more CPU, docs/bench.md). OpenClaw
    /// fleets only; empty: the `openclaw` launcher as installed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub node_flags: Vec<String>,
    /// The OpenClaw version its agents run, installed side by side by
    /// `scripts/install-openclaw.sh VERSION`; `None`: the pinned default install.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub openclaw_version: Option<String>,
    /// Queue this fleet's starts behind the node's start gate (default: only OpenClaw fleets,
    /// whose cold start costs ~16 CPU-seconds; a small program starts faster than it queues).
    #[serde(default)]
    pub start_gate: Option<bool>,
    /// Per-agent settings (a tenant's own template layer, env, secrets and files), by agent
    /// id; an agent without an entry is its fleet's clone. Written in a spec file as
    /// `[[fleet.agents]]` tables.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tenants: BTreeMap<String, AgentSettings>,
    /// Cluster mode: the secret every node derives this fleet's gateway tokens from
    /// (`provision::derived_token`), so an agent keeps its token when it moves to another
    /// host. Travels in the fleet's etcd doc, never with a spec; `None`: random tokens.
    #[serde(skip)]
    pub token_seed: Option<Secret>,
    /// Cluster mode: how many times each agent's token was rotated (`token --rotate`, a
    /// restore); part of what its token derives from. In the etcd doc beside the seed.
    #[serde(skip)]
    pub token_epochs: BTreeMap<String, u32>,
}

fn default_stop_timeout() -> u64 {
    30_000
}

impl FleetSpec {
    /// A fleet with every default and no agents.
    pub fn new(name: impl Into<String>) -> Self {
        FleetSpec {
            name: name.into(),
            agents: Vec::new(),
            strategy: Strategy::default(),
            restart: RestartType::default(),
            backoff: BackoffSpec::default(),
            intensity: default_agent_intensity(),
            fleet_intensity: default_fleet_intensity(),
            stop_timeout_ms: default_stop_timeout(),
            command: None,
            template: None,
            template_config: None,
            env: BTreeMap::new(),
            stride: None,
            health: HealthSpec::default(),
            profile: Profile::default(),
            max_memory: None,
            logs: LogSpec::default(),
            cgroup: CgroupLimits::default(),
            isolation: None,
            openclaw_version: None,
            backup: None,
            ksm: None,
            heap_raise: None,
            node_flags: Vec::new(),
            start_gate: None,
            tenants: BTreeMap::new(),
            token_seed: None,
            token_epochs: BTreeMap::new(),
        }
    }

    /// The agent's own settings, if it has any.
    /// How many times the agent's derived token was rotated (0: never).
    pub fn token_epoch(&self, agent: &str) -> u32 {
        self.token_epochs.get(agent).copied().unwrap_or(0)
    }

    pub fn tenant(&self, agent: &str) -> Option<&AgentSettings> {
        self.tenants.get(agent)
    }

    /// The OpenClaw version this agent runs: its own (an upgrade under way sets it agent by
    /// agent), else its fleet's; `None`: the default install.
    pub fn openclaw_version_of(&self, agent: &str) -> Option<&str> {
        self.tenant(agent)
            .and_then(|t| t.openclaw_version.as_deref())
            .or(self.openclaw_version.as_deref())
    }

    /// `agent-1` … `agent-N`.
    pub fn numbered_agents(n: u32) -> Vec<String> {
        (1..=n).map(|i| format!("agent-{i}")).collect()
    }

    pub fn runs_openclaw(&self) -> bool {
        self.command.is_none()
    }

    pub fn effective_stride(&self) -> u16 {
        self.stride
            .unwrap_or(match (self.runs_openclaw(), self.profile) {
                (true, Profile::Default) => OPENCLAW_STRIDE,
                (true, Profile::Lean) => LEAN_STRIDE,
                (false, _) => 1,
            })
    }

    /// Whether its agents ask the kernel to merge their pages. Off by default for a custom
    /// command: a small program has little to merge, and each spawn then pays two prctl
    /// calls over the daemon's whole memory map (add 1000 stand-ins went from 1.6 s to 14 s).
    pub fn merges_pages(&self, kernel_has_it: bool) -> bool {
        self.ksm.unwrap_or(self.runs_openclaw() && kernel_has_it)
    }

    /// Whether this fleet's starts queue behind the node's start gate.
    pub fn gated(&self) -> bool {
        self.start_gate.unwrap_or(self.runs_openclaw())
    }

    pub fn stop_timeout(&self) -> Duration {
        Duration::from_millis(self.stop_timeout_ms)
    }

    /// Every problem with this spec, each naming its field. Empty means valid.
    pub fn validate(&self) -> Vec<SpecProblem> {
        let mut p = Vec::new();
        let mut bad = |field: &str, reason: String| {
            p.push(SpecProblem {
                field: field.to_string(),
                reason,
            })
        };
        if !is_valid_id(&self.name) {
            bad("name", format!("{:?} must be {ID_RULE}", self.name));
        }
        if self.agents.len() > crate::specfile::MAX_AGENT_COUNT as usize {
            bad(
                "agents",
                format!(
                    "{} agents is more than {}",
                    self.agents.len(),
                    crate::specfile::MAX_AGENT_COUNT
                ),
            );
        }
        let mut seen = std::collections::HashSet::new();
        for (i, a) in self.agents.iter().enumerate() {
            if !is_valid_id(a) {
                bad(&format!("agents[{i}]"), format!("{a:?} must be {ID_RULE}"));
            } else if !seen.insert(a.as_str()) {
                bad(&format!("agents[{i}]"), format!("duplicate agent id {a:?}"));
            }
        }
        if let Some(reason) = self.openclaw_version.as_deref().and_then(version_problem) {
            bad("openclaw_version", reason);
        }
        if let Err(reason) = node_flags_problem(&self.node_flags) {
            bad("node_flags", reason);
        } else if !self.node_flags.is_empty() && !self.runs_openclaw() {
            bad(
                "node_flags",
                "only for OpenClaw fleets: a custom command names its own flags".into(),
            );
        }
        if let Some(h) = &self.heap_raise {
            if h.step_mib == 0 {
                bad("heap_raise.step_mib", "must be at least 1".into());
            }
            if !(16..=65_536).contains(&h.max_mib) {
                bad(
                    "heap_raise.max_mib",
                    format!("{} is not between 16 and 65536", h.max_mib),
                );
            }
        }
        if let Some(b) = &self.backup {
            if let Err(reason) = b.every_s() {
                bad("backup.every", reason);
            }
            if !(1..=1000).contains(&b.keep) {
                bad(
                    "backup.keep",
                    format!("{} is not between 1 and 1000", b.keep),
                );
            }
            if let Some(d) = &b.dir {
                if !d.is_absolute() {
                    bad(
                        "backup.dir",
                        format!("{} is not an absolute path", d.display()),
                    );
                }
            }
        }
        if let Some(cmd) = &self.command {
            if cmd.is_empty() || cmd[0].trim().is_empty() {
                bad("command", "must name a program".into());
            }
        }
        match self.stride {
            Some(0) => bad("stride", "must be at least 1".into()),
            Some(s)
                if self.runs_openclaw()
                    && self.profile == Profile::Default
                    && s < OPENCLAW_MIN_STRIDE =>
            {
                bad(
                    "stride",
                    format!("{s} is too small for OpenClaw with its browser control on (profile default uses base..base+110): use at least {OPENCLAW_MIN_STRIDE}, or profile lean"),
                )
            }
            _ => {}
        }
        let b = &self.backoff;
        if b.multiplier < 1.0 || !b.multiplier.is_finite() {
            bad("backoff.multiplier", "must be a number >= 1".into());
        }
        if !(0.0..=1.0).contains(&b.jitter) {
            bad("backoff.jitter", "must be between 0 and 1".into());
        }
        if b.max_ms < b.initial_ms {
            bad("backoff.max_ms", "must be >= backoff.initial_ms".into());
        }
        if self.intensity.window_s == 0 {
            bad("intensity.window_s", "must be at least 1".into());
        }
        if self.fleet_intensity.window_s == 0 {
            bad("fleet_intensity.window_s", "must be at least 1".into());
        }
        if !self.health.enabled && self.runs_openclaw() {
            bad(
                "health.enabled",
                "an OpenClaw fleet is probed: its start gate, upgrades and channel states rest on /healthz and /readyz".into(),
            );
        }
        if self.health.interval_ms == 0 {
            bad("health.interval_ms", "must be at least 1".into());
        }
        if self.health.failures == 0 {
            bad("health.failures", "must be at least 1".into());
        }
        if self.health.timeout_ms == 0 {
            bad("health.timeout_ms", "must be at least 1".into());
        }
        if self.logs.max_bytes < 1024 {
            bad("logs.max_bytes", "must be at least 1024".into());
        }
        if self.logs.budget_bytes < self.logs.max_bytes {
            bad("logs.budget_bytes", "must be >= logs.max_bytes".into());
        }
        for (k, v) in &self.env {
            if let Some(reason) = env_problem(k, v) {
                bad(&format!("env.{k}"), reason);
            }
        }
        // An entry for an agent not (or not yet) listed is harmless: a reload records the
        // fleet's new spec before it adds the agent, and a removal drops the entry.
        for (a, t) in &self.tenants {
            if !is_valid_id(a) {
                bad(&format!("tenants.{a:?}"), format!("must be {ID_RULE}"));
            }
            for p in t.validate() {
                bad(&format!("agents.{a}.{}", p.field), p.reason);
            }
        }
        if let Some(m) = self.max_memory {
            if m < 1024 * 1024 {
                bad("max_memory", "must be at least 1 MiB".into());
            }
        }
        if self.cgroup.memory_max.is_some_and(|m| m < 1024 * 1024) {
            bad("cgroup.memory_max", "must be at least 1 MiB".into());
        }
        if self.cgroup.pids_max == Some(0) {
            bad("cgroup.pids_max", "must be at least 1".into());
        }
        if self.cgroup.cpu_max == Some(0) {
            bad(
                "cgroup.cpu_max",
                "must be at least 1 (percent of one core)".into(),
            );
        }
        p
    }

    /// `validate` as a single error naming every problem.
    pub fn check(&self) -> Result<(), crate::FleetError> {
        let problems = self.validate();
        if problems.is_empty() {
            Ok(())
        } else {
            Err(crate::FleetError::Spec {
                reason: format!(
                    "fleet {:?}: {}",
                    self.name,
                    problems
                        .iter()
                        .map(|p| p.to_string())
                        .collect::<Vec<_>>()
                        .join("; ")
                ),
            })
        }
    }
}

/// Why `k=v` cannot be in an agent's environment, if it cannot.
pub fn env_problem(k: &str, v: &str) -> Option<String> {
    if k.is_empty() || k.contains('=') || k.contains('\0') {
        Some("invalid variable name".into())
    } else if k == "HOME" || k == crate::provision::MARKER_VAR {
        Some("is set by fleetd for every agent and cannot be overridden".into())
    } else if v.contains('\0') {
        Some("value contains a NUL byte".into())
    } else {
        None
    }
}

/// A secret's value as fleetd accepted it. Never printed: `Debug` shows its length only, and
/// it is not serialized with the spec (the registry keeps its name and source file; the value
/// lives in the 0600 vault beside it, see `registry::FileStore`).
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: String) -> Secret {
        Secret(value)
    }
    /// The value itself: for the agent's environment and files, and for redaction.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secret(<{} bytes>)", self.0.len())
    }
}

/// What fleetd read from the files an agent's settings name, when the command or reload was
/// accepted: what every start uses, whatever the files say later. Not serialized with the
/// spec (the registry's file store keeps it in its 0600 vault).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Accepted {
    /// Secret name → value.
    pub secrets: BTreeMap<String, Secret>,
    /// `files` destination → content.
    pub files: BTreeMap<String, Vec<u8>>,
}

impl std::fmt::Debug for Accepted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Accepted")
            .field("secrets", &self.secrets.keys().collect::<Vec<_>>())
            .field("files", &self.files.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// Longest secret fleetd accepts (a bot token is ~46 bytes, an API key ~200).
pub const MAX_SECRET_BYTES: u64 = 64 * 1024;
/// Shortest: anything shorter could not be told apart from ordinary text when logs are
/// redacted.
pub const MIN_SECRET_BYTES: usize = 8;
/// Largest file an agent's `files` may copy into its HOME, and how many it may name.
pub const MAX_FILE_BYTES: u64 = 1024 * 1024;
pub const MAX_FILES: usize = 64;
pub const MAX_SECRETS: usize = 64;

/// HOME paths fleetd writes itself: a `files` entry may not replace them.
const RESERVED_IN_HOME: &[&str] = &[
    ".openclaw/openclaw.json",
    ".openclaw/secrets",
    "logs",
    "tmp",
];

/// Where, inside an agent's HOME, fleetd puts the file of each secret (for settings such as
/// Telegram's `tokenFile` that read a file).
pub const SECRETS_DIR_IN_HOME: &str = ".openclaw/secrets";

/// One tenant's settings on top of its fleet's: a template layer deep-merged over the fleet's
/// template, env added to (and overriding) the fleet's env, secrets given as environment
/// variables and files, and files copied into its HOME. The values the commander enforces
/// still win over every layer.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentSettings {
    pub template: Option<PathBuf>,
    /// The template's content as accepted (see `FleetSpec::template_config`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub template_config: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Variable name → the operator's file holding the value.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub secrets: BTreeMap<String, PathBuf>,
    /// Destination relative to HOME → the operator's source file.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub files: BTreeMap<String, PathBuf>,
    /// Its own OpenClaw version over the fleet's: set by `fleet upgrade` while it moves the
    /// fleet agent by agent, dropped when the fleet's version catches up.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub openclaw_version: Option<String>,
    #[serde(skip)]
    pub accepted: Accepted,
}

impl AgentSettings {
    pub fn is_empty(&self) -> bool {
        self.template.is_none()
            && self.env.is_empty()
            && self.secrets.is_empty()
            && self.files.is_empty()
            && self.openclaw_version.is_none()
    }

    /// The values its secrets hold now that `new` (its next settings, `None`: none) no
    /// longer holds: what its logs must go on redacting.
    pub fn secrets_dropped_by(&self, new: Option<&AgentSettings>) -> Vec<Secret> {
        self.accepted
            .secrets
            .values()
            .filter(|v| !new.is_some_and(|n| n.accepted.secrets.values().any(|x| x == *v)))
            .cloned()
            .collect()
    }

    /// Every problem, each naming its field (`env.TZ`, `secrets.KEY`, `files.<dest>`).
    pub fn validate(&self) -> Vec<SpecProblem> {
        let mut p = Vec::new();
        let mut bad = |field: String, reason: String| p.push(SpecProblem { field, reason });
        for (k, v) in &self.env {
            if let Some(reason) = env_problem(k, v) {
                bad(format!("env.{k}"), reason);
            }
        }
        if let Some(reason) = self.openclaw_version.as_deref().and_then(version_problem) {
            bad("openclaw_version".into(), reason);
        }
        if self.secrets.len() > MAX_SECRETS {
            bad("secrets".into(), format!("more than {MAX_SECRETS}"));
        }
        for (k, src) in &self.secrets {
            if let Some(reason) = secret_name_problem(k) {
                bad(format!("secrets.{k}"), reason);
            } else if self.env.contains_key(k) {
                bad(
                    format!("secrets.{k}"),
                    "is also set in env: give the variable one source".into(),
                );
            } else if src.as_os_str().is_empty() {
                bad(format!("secrets.{k}"), "must name a file".into());
            }
        }
        if self.files.len() > MAX_FILES {
            bad("files".into(), format!("more than {MAX_FILES}"));
        }
        for (dest, src) in &self.files {
            if let Some(reason) = home_path_problem(dest) {
                bad(format!("files.{dest:?}"), reason);
            } else if src.as_os_str().is_empty() {
                bad(format!("files.{dest:?}"), "must name a source file".into());
            }
        }
        p
    }
}

/// Why `name` cannot be a secret's variable name, if it cannot.
pub fn secret_name_problem(name: &str) -> Option<String> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name
            .chars()
            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_');
    if !ok {
        Some(format!(
            "{name:?} must be an environment variable name: A-Z, 0-9 and _, not starting with a digit, at most 128"
        ))
    } else if env_problem(name, "").is_some() || name == "PATH" {
        Some(format!("{name} is set by fleetd and cannot be a secret"))
    } else {
        None
    }
}

/// Why `dest` cannot be where a file goes in an agent's HOME, if it cannot: it must be a
/// relative path of plain components that stays inside the HOME and leaves alone what
/// fleetd writes there itself.
pub fn home_path_problem(dest: &str) -> Option<String> {
    use std::path::Component;
    let p = std::path::Path::new(dest);
    if dest.is_empty() || dest.len() > 1024 || dest.chars().any(char::is_control) {
        return Some(
            "must be a relative path inside the HOME, at most 1024 bytes, no control characters"
                .into(),
        );
    }
    if p.is_absolute() || !p.components().all(|c| matches!(c, Component::Normal(_))) {
        return Some(format!(
            "{dest:?} must be a relative path inside the HOME (no leading /, no . or ..)"
        ));
    }
    for r in RESERVED_IN_HOME {
        if p.starts_with(r) {
            return Some(format!("{dest:?}: {r} is written by fleetd itself"));
        }
    }
    None
}

/// One problem found by `FleetSpec::validate`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpecProblem {
    pub field: String,
    pub reason: String,
}

impl std::fmt::Display for SpecProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.reason)
    }
}

/// Why `v` cannot name an installed OpenClaw version (it becomes a directory name under the
/// install's `versions/`): a published version number, like `2026.9.5` or `2026.9.1-beta.1`.
pub fn version_problem(v: &str) -> Option<String> {
    let ok = !v.is_empty()
        && v.len() <= 64
        && v.starts_with(|c: char| c.is_ascii_digit())
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-')
        && !v.contains("..");
    (!ok).then(|| {
        format!(
            "{:?} is not a version number (digits first, then letters, digits, '.' or '-', at most 64)",
            v.escape_debug().to_string()
        )
    })
}

fn is_true(b: &bool) -> bool {
    *b
}

/// Why these `node_flags` cannot go on a command line: each one a single `--flag` or
/// `--flag=value` of printable ASCII (no spaces, no second program or script slipped in),
/// at most 32 of them.
pub fn node_flags_problem(flags: &[String]) -> Result<(), String> {
    if flags.len() > 32 {
        return Err(format!("{} flags, at most 32", flags.len()));
    }
    for f in flags {
        let body = f.strip_prefix("--").unwrap_or("");
        let ok = !body.is_empty()
            && f.len() <= 128
            && body.bytes().all(|b| b.is_ascii_graphic())
            && body.as_bytes()[0].is_ascii_alphanumeric();
        if !ok {
            return Err(format!(
                "{f:?} is not one --flag or --flag=value of printable ASCII"
            ));
        }
        let name = body.split('=').next().unwrap_or(body);
        if let Some(why) = refused_node_flag(name) {
            return Err(format!("{f:?}: {why}"));
        }
    }
    Ok(())
}

/// Node flags `node_flags` may not carry: code loaded or run beside the gateway's, a
/// debugger port (past the enforced loopback bind), an env file, and the heap cap, which is
/// the profile's and `heap_raise`'s (the command line would win over NODE_OPTIONS, and the
/// out-of-memory reason would name the wrong limit).
fn refused_node_flag(name: &str) -> Option<&'static str> {
    let code = [
        "require",
        "import",
        "eval",
        "print",
        "loader",
        "experimental-loader",
        "env-file",
        "env-file-if-exists",
        "run",
        "test",
        "watch",
        "watch-path",
        "check",
        "interactive",
    ];
    if code.contains(&name) {
        Some("loads or runs code beside the gateway's")
    } else if name.starts_with("inspect") || name.starts_with("debug") {
        Some("opens a debugger")
    } else if name == "max-old-space-size" {
        Some("the heap cap is the profile's NODE_OPTIONS and heap_raise's")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_flags_are_single_flags() {
        let v = |xs: &[&str]| xs.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let good = [
            v(&[]),
            v(&["--optimize-for-size"]),
            v(&["--optimize-for-size", "--max-semi-space-size=16"]),
        ];
        for flags in good {
            assert_eq!(node_flags_problem(&flags), Ok(()), "{flags:?}");
        }
        let bad = [
            v(&["--require=/tmp/x.js"]),
            v(&["--import=data:text/javascript,1"]),
            v(&["--eval=1"]),
            v(&["--inspect=0.0.0.0:9229"]),
            v(&["--inspect-brk"]),
            v(&["--env-file=/etc/shadow"]),
            v(&["--max-old-space-size=4096"]),
            v(&["-e"]),
            v(&["/tmp/evil.js"]),
            v(&["--"]),
            v(&["---x"]),
            v(&["--a b"]),
            v(&["--require=/x\n"]),
            v(&["--x\u{7}"]),
            vec!["--x".to_string(); 33],
        ];
        for flags in bad {
            assert!(node_flags_problem(&flags).is_err(), "{flags:?} accepted");
        }
    }

    #[test]
    fn pages_are_merged_by_default_for_openclaw_only() {
        let openclaw = FleetSpec::new("o");
        let mut command = FleetSpec::new("c");
        command.command = Some(vec!["sleep".into(), "9".into()]);
        let with = |s: &FleetSpec, ksm: Option<bool>| {
            let mut s = s.clone();
            s.ksm = ksm;
            s
        };
        let cases = [
            (&openclaw, None, true, true),
            (&openclaw, None, false, false),
            (&openclaw, Some(false), true, false),
            (&command, None, true, false),
            (&command, Some(true), true, true),
        ];
        for (spec, ksm, kernel, want) in cases {
            assert_eq!(
                with(spec, ksm).merges_pages(kernel),
                want,
                "{} ksm={ksm:?} kernel={kernel}",
                spec.name
            );
        }
    }

    #[test]
    fn heap_raises_are_bounded() {
        let h = HeapRaise {
            step_mib: 64,
            max_mib: 512,
        };
        for (cur, want) in [
            (Some(384), Some(448)),
            (Some(448), Some(512)),
            (Some(500), Some(512)),
            (Some(512), None),
            (Some(600), None),
            (None, Some(64)),
        ] {
            assert_eq!(h.next(cur), want, "{cur:?}");
        }
    }

    #[test]
    fn durations() {
        for (v, want) in [
            ("1m", Some(60)),
            ("90s", Some(90)),
            ("6h", Some(21_600)),
            ("1d", Some(86_400)),
            ("59s", None),
            ("6", None),
            ("h", None),
            ("6 h", None),
            ("-1h", None),
            ("400d", None),
            ("99999999999999999999d", None),
        ] {
            assert_eq!(parse_duration_s(v).ok(), want, "{v}");
        }
    }

    #[test]
    fn version_names() {
        for (v, ok) in [
            ("2026.9.5", true),
            ("2026.9.1-beta.1", true),
            ("", false),
            ("../x", false),
            ("1..2", false),
            ("v1", false),
            ("1/2", false),
            ("1\n", false),
        ] {
            assert_eq!(version_problem(v).is_none(), ok, "{v:?}");
        }
    }

    #[test]
    fn defaults_are_valid() {
        let mut s = FleetSpec::new("f");
        s.agents = FleetSpec::numbered_agents(3);
        assert_eq!(s.validate(), vec![]);
        assert_eq!(s.effective_stride(), 128);
    }

    #[test]
    fn validate_names_every_problem() {
        let mut s = FleetSpec::new("Bad");
        s.agents = vec!["a".into(), "a".into(), "x_y".into()];
        s.stride = Some(20);
        s.backoff.jitter = 2.0;
        let fields: Vec<String> = s.validate().into_iter().map(|p| p.field).collect();
        assert_eq!(
            fields,
            ["name", "agents[1]", "agents[2]", "stride", "backoff.jitter"]
        );
    }

    #[test]
    fn lean_openclaw_needs_only_a_small_block() {
        let mut s = FleetSpec::new("f");
        s.profile = Profile::Lean;
        assert_eq!(s.effective_stride(), LEAN_STRIDE);
        s.stride = Some(2);
        assert!(s.validate().is_empty());
        s.profile = Profile::Default;
        assert_eq!(s.validate()[0].field, "stride");
    }

    #[test]
    fn custom_command_may_use_small_stride() {
        let mut s = FleetSpec::new("f");
        s.command = Some(vec!["stub".into()]);
        s.stride = Some(1);
        assert!(s.validate().is_empty());
        assert_eq!(s.effective_stride(), 1);
    }

    #[test]
    fn names_round_trip() {
        for n in Strategy::NAMES {
            assert_eq!(n.parse::<Strategy>().unwrap().as_str(), *n);
        }
        assert!("one-for-all".parse::<Strategy>().is_err());
    }
}
