//! The command language: the one typed protocol between the REPL, the control socket,
//! `fleetctl` and the library API. `admin::parse` turns a line into a `Request`; the node
//! answers with a `Reply`. JSON shapes come from serde and are pinned by tests.

use crate::error::FleetError;
use crate::spec::{AgentSettings, Profile, RestartType, Strategy};
use crate::state::{AgentState, ExitInfo, FleetState};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// A parsed command line: the command plus the output format the caller asked for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Request {
    pub command: Command,
    /// `--json` given (trailing in the REPL, or fleetctl's flag).
    pub json: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Command {
    FleetCreate {
        fleet: String,
        agents: u32,
        strategy: Option<Strategy>,
        command: Option<Vec<String>>,
        template: Option<PathBuf>,
        restart: Option<RestartType>,
        stride: Option<u16>,
        profile: Option<Profile>,
        /// `None`: the strongest this host gives.
        #[serde(default)]
        isolation: Option<crate::isolation::Isolation>,
        /// `None`: the pinned default install.
        #[serde(default)]
        openclaw_version: Option<String>,
        /// `health.enabled = false`.
        #[serde(default)]
        no_probes: bool,
    },
    FleetList,
    FleetStart {
        fleet: String,
    },
    FleetStop {
        fleet: String,
    },
    FleetRestart {
        fleet: String,
    },
    FleetRm {
        fleet: String,
        purge: bool,
    },
    AgentAdd {
        fleet: String,
        agent: String,
        /// Its own settings (`--template`, `--env`, `--secret`, `--file`).
        #[serde(default, skip_serializing_if = "AgentChange::is_empty")]
        settings: AgentChange,
    },
    /// Changes one agent's own settings (and secrets); restarts only that agent.
    AgentSet {
        fleet: String,
        agent: String,
        change: AgentChange,
    },
    /// The agent's effective `openclaw.json` and environment, every secret redacted.
    AgentConfig {
        fleet: String,
        agent: String,
    },
    /// Demo: a Telegram DM to the agent's bot through a loopback fake Bot API (`fleet-fakes`),
    /// answered with the bot's reply.
    Say {
        fleet: String,
        agent: String,
        text: String,
    },
    /// The REPL prints lifecycle and channel transitions as they happen (`watch off` to stop).
    Watch {
        on: bool,
    },
    /// What `fleetctl exec` needs to run a program as the agent runs: its HOME, environment
    /// (secrets included) and PATH. Only the operator reaches the socket.
    ExecContext {
        fleet: String,
        agent: String,
    },
    AgentStart {
        fleet: String,
        agent: String,
    },
    AgentStop {
        fleet: String,
        agent: String,
    },
    AgentRestart {
        fleet: String,
        agent: String,
    },
    AgentRm {
        fleet: String,
        agent: String,
        purge: bool,
    },
    Status {
        fleet: Option<String>,
        agent: Option<String>,
    },
    Logs {
        fleet: String,
        agent: String,
        lines: usize,
        follow: bool,
    },
    Token {
        fleet: String,
        agent: String,
        rotate: bool,
    },
    Ports,
    Top,
    Capacity,
    Events,
    Reload {
        /// Only say what would change.
        #[serde(default)]
        dry_run: bool,
    },
    /// A consistent archive of the agent's HOME (`backup::archive`), running or not.
    AgentBackup {
        fleet: String,
        agent: String,
        /// The new archive's path; `None`: `<state>/backups/<fleet>/<agent>/`.
        #[serde(default)]
        out: Option<PathBuf>,
    },
    /// One archive per agent of the fleet, into `dir` (default `<state>/backups/<fleet>/`).
    FleetBackup {
        fleet: String,
        #[serde(default)]
        dir: Option<PathBuf>,
    },
    /// Replaces a stopped agent's HOME with an archive's, checked whole first; rotates its
    /// gateway token.
    AgentRestore {
        fleet: String,
        agent: String,
        from: PathBuf,
        /// Take an archive of another agent.
        #[serde(default)]
        force: bool,
    },
    /// Health-gated rollout of another OpenClaw version, agent by agent, each backed up
    /// first and rolled back with its backup when it does not come up ready.
    FleetUpgrade {
        fleet: String,
        to: String,
        #[serde(default)]
        canary: Option<u32>,
        #[serde(default)]
        max_unavailable: Option<u32>,
        #[serde(default)]
        ready_timeout_s: Option<u64>,
    },
    /// The fleet's last upgrade and where it stands.
    FleetUpgradeStatus {
        fleet: String,
    },
    /// Every agent the last upgrade moved goes back to its version and backup.
    FleetRollback {
        fleet: String,
    },
    /// The front door's config for every agent's webhook route (`--apply DIR`: written there
    /// and the proxy reloaded).
    Webhooks {
        #[serde(default)]
        format: Option<crate::webhooks::Format>,
        #[serde(default)]
        apply: Option<PathBuf>,
    },
    /// Read-only checks of the node, its fleets and agents.
    Doctor {
        fleet: Option<String>,
        agent: Option<String>,
    },
    Help {
        topic: Option<String>,
    },
    Shutdown,
    /// Cluster mode: every node, its lease, mark, capacity and agents.
    NodeList,
    /// Cluster mode: the node takes no new agents.
    NodeCordon {
        node: String,
    },
    /// Cluster mode: the node takes new agents again (ends a cordon or a drain).
    NodeUncordon {
        node: String,
    },
    /// Cluster mode: cordon, and move every agent off the node.
    NodeDrain {
        node: String,
    },
}

/// A change of one agent's own settings, as the command language gives it. Paths are the
/// operator's files, read by fleetd when the command is accepted.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentChange {
    /// A template layer over the fleet's (`--template`).
    pub template: Option<PathBuf>,
    /// Drop its own template layer (`--no-template`).
    pub no_template: bool,
    /// `--env K=V`: set or override.
    pub env: BTreeMap<String, String>,
    /// `--unset-env K`.
    pub unset_env: Vec<String>,
    /// `--secret NAME=FILE` / `agent secret … set NAME FILE`.
    pub secrets: BTreeMap<String, PathBuf>,
    /// `agent secret … rm NAME`.
    pub rm_secrets: Vec<String>,
    /// `--file DEST=SRC`.
    pub files: BTreeMap<String, PathBuf>,
    /// `--rm-file DEST`.
    pub rm_files: Vec<String>,
    /// `--openclaw-version V`: its own version over the fleet's.
    pub openclaw_version: Option<String>,
    /// `--no-openclaw-version`: back to its fleet's version.
    pub no_openclaw_version: bool,
}

impl AgentChange {
    pub fn is_empty(&self) -> bool {
        *self == AgentChange::default()
    }

    /// `old` with this change made. A secret or file named again is read again (its accepted
    /// content is dropped), so `agent secret … set` with the same file picks up a new value.
    pub fn apply(&self, old: &AgentSettings) -> Result<AgentSettings, FleetError> {
        let mut t = old.clone();
        if self.no_template && self.template.is_some() {
            return Err(FleetError::invalid(
                "--no-template",
                "cannot be given with --template",
            ));
        }
        if self.no_template {
            t.template = None;
            t.template_config = None;
        }
        if let Some(p) = &self.template {
            t.template = Some(p.clone());
            t.template_config = None;
        }
        for k in &self.unset_env {
            if t.env.remove(k).is_none() {
                return Err(FleetError::invalid(
                    format!("--unset-env {k}"),
                    "the agent has no such variable of its own",
                ));
            }
        }
        t.env.extend(self.env.clone());
        for k in &self.rm_secrets {
            if t.secrets.remove(k).is_none() {
                return Err(FleetError::invalid(
                    format!("secret {k}"),
                    "the agent has no such secret",
                ));
            }
            t.accepted.secrets.remove(k);
        }
        for (k, p) in &self.secrets {
            t.secrets.insert(k.clone(), p.clone());
            t.accepted.secrets.remove(k);
        }
        if self.no_openclaw_version && self.openclaw_version.is_some() {
            return Err(FleetError::invalid(
                "--no-openclaw-version",
                "cannot be given with --openclaw-version",
            ));
        }
        if self.no_openclaw_version {
            t.openclaw_version = None;
        }
        if let Some(v) = &self.openclaw_version {
            t.openclaw_version = Some(v.clone());
        }
        for d in &self.rm_files {
            if t.files.remove(d).is_none() {
                return Err(FleetError::invalid(
                    format!("--rm-file {d}"),
                    "the agent has no such file",
                ));
            }
            t.accepted.files.remove(d);
        }
        for (d, p) in &self.files {
            t.files.insert(d.clone(), p.clone());
            t.accepted.files.remove(d);
        }
        if let Some(p) = t.validate().into_iter().next() {
            return Err(FleetError::invalid(p.field, p.reason));
        }
        Ok(t)
    }

    fn has_nul(&self) -> bool {
        let path = |p: &PathBuf| p.as_os_str().as_encoded_bytes().contains(&0);
        let s = |v: &String| v.contains('\0');
        self.template.as_ref().is_some_and(path)
            || self.env.iter().any(|(k, v)| s(k) || s(v))
            || self.unset_env.iter().any(s)
            || self.secrets.iter().any(|(k, v)| s(k) || path(v))
            || self.rm_secrets.iter().any(s)
            || self.files.iter().any(|(k, v)| s(k) || path(v))
            || self.rm_files.iter().any(s)
            || self.openclaw_version.as_ref().is_some_and(s)
    }
}

fn no_nul_path(p: Option<&std::path::Path>) -> Result<(), FleetError> {
    if p.is_some_and(|p| p.as_os_str().as_encoded_bytes().contains(&0)) {
        return Err(FleetError::invalid("request", "a path contains a NUL byte"));
    }
    Ok(())
}

impl Command {
    /// What the parser checks, for a command that arrived already typed (a JSON request):
    /// every id against the id rule, counts within their limits, no NUL in any word. The node
    /// looks names up in its own maps, but a path is built from them first in places.
    pub fn check_ids(&self) -> Result<(), FleetError> {
        use crate::ids::validate_id;
        let fleet = |f: &str| validate_id("fleet", f);
        let both = |f: &str, a: &str| validate_id("fleet", f).and_then(|_| validate_id("agent", a));
        match self {
            Command::FleetCreate {
                fleet: f,
                agents,
                command,
                template,
                ..
            } => {
                fleet(f)?;
                if *agents > crate::admin::parse::MAX_AGENTS {
                    return Err(FleetError::invalid(
                        "--agents",
                        format!("{agents} is more than {}", crate::admin::parse::MAX_AGENTS),
                    ));
                }
                let nul = command.iter().flatten().any(|w| w.contains('\0'))
                    || template
                        .as_ref()
                        .is_some_and(|t| t.as_os_str().as_encoded_bytes().contains(&0));
                if nul {
                    return Err(FleetError::invalid("request", "a word contains a NUL byte"));
                }
                Ok(())
            }
            Command::FleetStart { fleet: f }
            | Command::FleetStop { fleet: f }
            | Command::FleetRestart { fleet: f }
            | Command::FleetRm { fleet: f, .. } => fleet(f),
            Command::AgentAdd {
                fleet: f,
                agent: a,
                settings: c,
            }
            | Command::AgentSet {
                fleet: f,
                agent: a,
                change: c,
            } => {
                both(f, a)?;
                if c.has_nul() {
                    return Err(FleetError::invalid("request", "a word contains a NUL byte"));
                }
                Ok(())
            }
            Command::Say {
                fleet: f,
                agent: a,
                text,
            } => {
                both(f, a)?;
                if text.contains('\0') || text.len() > 4096 {
                    return Err(FleetError::invalid(
                        "say",
                        "text must be at most 4096 bytes, no NUL",
                    ));
                }
                Ok(())
            }
            Command::Watch { .. } => Ok(()),
            Command::AgentBackup {
                fleet: f,
                agent: a,
                out: p,
            } => {
                both(f, a)?;
                no_nul_path(p.as_deref())
            }
            Command::AgentRestore {
                fleet: f,
                agent: a,
                from,
                ..
            } => {
                both(f, a)?;
                no_nul_path(Some(from))
            }
            Command::FleetBackup { fleet: f, dir } => {
                fleet(f)?;
                no_nul_path(dir.as_deref())
            }
            Command::FleetUpgrade { fleet: f, to, .. } => {
                fleet(f)?;
                match crate::spec::version_problem(to) {
                    Some(reason) => Err(FleetError::invalid("--to", reason)),
                    None => Ok(()),
                }
            }
            Command::Webhooks { apply, .. } => no_nul_path(apply.as_deref()),
            Command::FleetUpgradeStatus { fleet: f } | Command::FleetRollback { fleet: f } => {
                fleet(f)
            }
            Command::Doctor { fleet: f, agent: a } => {
                if let Some(f) = f {
                    fleet(f)?;
                }
                if let Some(a) = a {
                    validate_id("agent", a)?;
                }
                Ok(())
            }
            Command::AgentConfig { fleet: f, agent: a }
            | Command::ExecContext { fleet: f, agent: a }
            | Command::AgentStart { fleet: f, agent: a }
            | Command::AgentStop { fleet: f, agent: a }
            | Command::AgentRestart { fleet: f, agent: a }
            | Command::AgentRm {
                fleet: f, agent: a, ..
            }
            | Command::Token {
                fleet: f, agent: a, ..
            } => both(f, a),
            Command::Logs {
                fleet: f,
                agent: a,
                lines,
                ..
            } => {
                both(f, a)?;
                if *lines > crate::admin::parse::MAX_LOG_LINES {
                    return Err(FleetError::invalid(
                        "-n",
                        format!(
                            "{lines} is more than {}",
                            crate::admin::parse::MAX_LOG_LINES
                        ),
                    ));
                }
                Ok(())
            }
            Command::Status { fleet: f, agent: a } => {
                if let Some(f) = f {
                    fleet(f)?;
                }
                match a {
                    Some(a) => validate_id("agent", a),
                    None => Ok(()),
                }
            }
            Command::Help { topic } => match topic {
                Some(t) if t.len() > 64 || t.chars().any(char::is_control) => {
                    Err(FleetError::invalid("help", "not a command name"))
                }
                _ => Ok(()),
            },
            Command::NodeCordon { node }
            | Command::NodeUncordon { node }
            | Command::NodeDrain { node } => validate_id("node", node),
            Command::FleetList
            | Command::NodeList
            | Command::Ports
            | Command::Top
            | Command::Capacity
            | Command::Events
            | Command::Reload { .. }
            | Command::Shutdown => Ok(()),
        }
    }
}

/// One row of `status`. Field names are a contract (`status --json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentStatus {
    pub fleet: String,
    pub agent: String,
    pub state: AgentState,
    pub pid: Option<u32>,
    pub port: Option<u16>,
    pub home: String,
    pub restarts: u32,
    pub healthy: bool,
    pub ready: bool,
    pub uptime_s: u64,
    pub rss_bytes: Option<u64>,
    pub last_exit: Option<ExitInfo>,
    /// Why the agent is in its state, when there is more to say (failed, backoff, unhealthy).
    pub reason: Option<String>,
    /// Set when a file the agent's spec names (its template) now differs on disk from the
    /// version that was accepted and that its starts render: a `reload` applies it.
    pub drift: Option<String>,
    /// Each messaging channel its config sets up, by name (`telegram`): `ready`, `starting`,
    /// `failed` (with `error`) or `stopped`. Empty for an agent without channels.
    #[serde(default)]
    pub channels: BTreeMap<String, crate::channels::ChannelStatus>,
    /// How it is kept apart from other agents and the daemon on this host.
    #[serde(default)]
    pub isolation: Option<crate::isolation::IsolationStatus>,
    /// The OpenClaw version it runs (its own during an upgrade, else its fleet's, else the
    /// default install's); `None` for a fleet with its own command.
    #[serde(default)]
    pub openclaw_version: Option<String>,
    /// Each channel in webhook mode and its listener's loopback port.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub webhooks: BTreeMap<String, u16>,
    /// Cluster mode: the node it runs on (or is placed on); absent on a single host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Cluster mode: whether that node has carried out the operator's `agent stop` (it
    /// keeps the agent stopped), so a command that waits for it can tell.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held_stopped: Option<bool>,
}

impl AgentStatus {
    /// A row for an agent no node runs right now (cluster mode).
    pub fn placeholder(fleet: &str, agent: &str, node: Option<String>, reason: String) -> Self {
        AgentStatus {
            fleet: fleet.into(),
            agent: agent.into(),
            state: AgentState::Stopped,
            pid: None,
            port: None,
            home: String::new(),
            restarts: 0,
            healthy: false,
            ready: false,
            uptime_s: 0,
            rss_bytes: None,
            last_exit: None,
            reason: Some(reason),
            drift: None,
            channels: BTreeMap::new(),
            isolation: None,
            openclaw_version: None,
            webhooks: BTreeMap::new(),
            node,
            held_stopped: None,
        }
    }
}

/// One row of `node list` (cluster mode). Field names are a contract (`node list --json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeRow {
    pub node: String,
    /// `live` while its lease lives; `expired` for a marked node that is gone.
    pub lease: String,
    /// `cordon` or `drain`.
    pub mark: Option<String>,
    pub leader: bool,
    /// Agents it holds the claim of (runs or is starting).
    pub agents: u64,
    /// Agents placed on it.
    pub placed: u64,
    pub capacity: Option<crate::cluster::keys::NodeCapacity>,
    pub socket: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FleetInfo {
    pub fleet: String,
    pub state: FleetState,
    pub strategy: Strategy,
    pub restart: RestartType,
    pub agents: usize,
    pub running: usize,
    pub reason: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PortLeaseRow {
    pub fleet: String,
    pub agent: String,
    pub base: u16,
    pub stride: u16,
    /// The ports of its block that webhook listeners use, by channel.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub webhooks: BTreeMap<String, u16>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TopRow {
    pub fleet: String,
    pub agent: String,
    pub state: AgentState,
    pub pid: Option<u32>,
    pub processes: u32,
    pub rss_bytes: u64,
    pub pss_bytes: Option<u64>,
    pub cpu_percent: f64,
    /// Pages of its tree KSM merged with others' (`ksm_merging_pages` of
    /// `/proc/<pid>/ksm_stat`, summed); `None` where the kernel has no KSM.
    #[serde(default)]
    pub ksm_pages: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CapacityRow {
    pub fleet: String,
    pub by_memory: Option<u64>,
    pub by_ports: u64,
    pub by_fds: Option<u64>,
    pub by_pids: Option<u64>,
    pub fits: u64,
    pub binding: String,
}

/// The answer to one `Request`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "reply", content = "data", rename_all = "snake_case")]
pub enum Reply {
    /// A command that changes state and has nothing to show but a confirmation.
    Done {
        message: String,
    },
    Fleets(Vec<FleetInfo>),
    Status(Vec<AgentStatus>),
    Ports(Vec<PortLeaseRow>),
    Top(Vec<TopRow>),
    Capacity(Vec<CapacityRow>),
    Nodes(Vec<NodeRow>),
    Logs(Vec<String>),
    Token {
        fleet: String,
        agent: String,
        token: String,
    },
    Help {
        text: String,
    },
    /// `agent config`: every secret already replaced by `[REDACTED]`.
    Config {
        fleet: String,
        agent: String,
        config: serde_json::Value,
        env: BTreeMap<String, String>,
        secrets: Vec<String>,
        files: Vec<String>,
    },
    /// `ExecContext`: secrets in clear, for `fleetctl exec` only; never rendered.
    Exec {
        cwd: String,
        env: Vec<(String, String)>,
        /// What the program must be confined with: the agent's own (an operator's program in
        /// a tenant's HOME runs with no more rights than the tenant: the HOME may hold code
        /// the tenant planted, such as OpenClaw plugins).
        #[serde(default)]
        isolation: Option<crate::isolation::IsolationStatus>,
        #[serde(default)]
        port: u16,
        #[serde(default)]
        ports: u16,
    },
    Backups(Vec<crate::backup::BackupDone>),
    Doctor(Vec<crate::doctor::Check>),
    Upgrade(Box<crate::upgrade::UpgradeRecord>),
    Webhooks {
        format: crate::webhooks::Format,
        routes: Vec<crate::webhooks::Route>,
        config: String,
        /// Where it was written, with `--apply`.
        applied: Option<String>,
    },
    Error(FleetError),
}

/// The JSON shapes of the replies that are not a bare list (`--json`), as serde types: the
/// only definition of what a script reads, pinned by `admin::render`'s tests.
pub mod json {
    use crate::error::FleetError;
    use serde::{Deserialize, Serialize};

    /// `{"ok": true, "message": …}`
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    pub struct Done {
        pub ok: bool,
        pub message: String,
    }

    /// `{"lines": […]}`
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    pub struct Logs {
        pub lines: Vec<String>,
    }

    /// `{"fleet": …, "agent": …, "token": …}`
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    pub struct Token {
        pub fleet: String,
        pub agent: String,
        pub token: String,
    }

    /// `agent config --json`: `{"fleet", "agent", "config": <openclaw.json>, "env": {…},
    /// "secrets": [names], "files": [destinations]}`, every secret value `[REDACTED]`.
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    pub struct Config {
        pub fleet: String,
        pub agent: String,
        pub config: serde_json::Value,
        pub env: std::collections::BTreeMap<String, String>,
        pub secrets: Vec<String>,
        pub files: Vec<String>,
    }

    /// `{"help": …}`
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    pub struct Help {
        pub help: String,
    }

    /// `{"error": {"error": <kind>, …fields}, "message": <one line>}`
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    pub struct Error {
        pub error: FleetError,
        pub message: String,
    }
}

impl Command {
    /// The spec a `fleet create` asks for: every default but what its flags set; `None` for
    /// any other command.
    pub fn create_spec(&self) -> Option<crate::spec::FleetSpec> {
        let Command::FleetCreate {
            fleet,
            agents,
            strategy,
            command,
            template,
            restart,
            stride,
            profile,
            isolation,
            openclaw_version,
            no_probes,
        } = self
        else {
            return None;
        };
        let mut spec = crate::spec::FleetSpec::new(fleet.clone());
        spec.agents = crate::spec::FleetSpec::numbered_agents(*agents);
        spec.strategy = strategy.unwrap_or_default();
        spec.restart = restart.unwrap_or_default();
        spec.command = command.clone();
        spec.template = template.clone();
        spec.stride = *stride;
        spec.profile = profile.unwrap_or_default();
        spec.isolation = *isolation;
        spec.openclaw_version = openclaw_version.clone();
        spec.health.enabled = !no_probes;
        Some(spec)
    }
}
