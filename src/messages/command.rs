//! The command language: the one typed protocol between the REPL, the control socket,
//! `fleetctl` and the library API. `admin::parse` turns a line into a `Request`; the node
//! answers with a `Reply`. JSON shapes come from serde and are pinned by tests.

use crate::error::FleetError;
use crate::spec::{Profile, RestartType, Strategy};
use crate::state::{AgentState, ExitInfo, FleetState};
use serde::{Deserialize, Serialize};
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
    Reload,
    Help {
        topic: Option<String>,
    },
    Shutdown,
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
    Logs(Vec<String>),
    Token {
        fleet: String,
        agent: String,
        token: String,
    },
    Help {
        text: String,
    },
    Error(FleetError),
}
