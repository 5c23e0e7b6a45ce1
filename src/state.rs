//! The one vocabulary of run-time states, spelled the same in code, JSON, tables, README and
//! metric labels. Only runtime observations live here; what the operator asked for lives in
//! `spec`.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Lifecycle state of one agent (see DESIGN.md, "Agent lifecycle").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AgentState {
    Provisioning,
    Starting,
    Running,
    Unhealthy,
    Backoff,
    Stopping,
    Stopped,
    Failed,
}

impl AgentState {
    pub const ALL: [AgentState; 8] = [
        AgentState::Provisioning,
        AgentState::Starting,
        AgentState::Running,
        AgentState::Unhealthy,
        AgentState::Backoff,
        AgentState::Stopping,
        AgentState::Stopped,
        AgentState::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            AgentState::Provisioning => "provisioning",
            AgentState::Starting => "starting",
            AgentState::Running => "running",
            AgentState::Unhealthy => "unhealthy",
            AgentState::Backoff => "backoff",
            AgentState::Stopping => "stopping",
            AgentState::Stopped => "stopped",
            AgentState::Failed => "failed",
        }
    }

    /// True while an OS process may exist for the agent.
    pub fn has_process(self) -> bool {
        matches!(
            self,
            AgentState::Starting
                | AgentState::Running
                | AgentState::Unhealthy
                | AgentState::Stopping
        )
    }
}

impl fmt::Display for AgentState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// State of a whole fleet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FleetState {
    Running,
    Stopping,
    Stopped,
    Failed,
}

impl FleetState {
    pub fn as_str(self) -> &'static str {
        match self {
            FleetState::Running => "running",
            FleetState::Stopping => "stopping",
            FleetState::Stopped => "stopped",
            FleetState::Failed => "failed",
        }
    }
}

impl fmt::Display for FleetState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a child process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExitInfo {
    Code(i32),
    Signal(i32),
}

/// EX_CONFIG: OpenClaw's "lock, port or config conflict". Never restart-looped.
pub const EXIT_CONFIG: i32 = 78;

impl ExitInfo {
    pub fn from_status(st: std::process::ExitStatus) -> Self {
        use std::os::unix::process::ExitStatusExt;
        match (st.code(), st.signal()) {
            (Some(c), _) => ExitInfo::Code(c),
            (None, Some(s)) => ExitInfo::Signal(s),
            (None, None) => ExitInfo::Code(-1),
        }
    }
    pub fn is_clean(self) -> bool {
        matches!(self, ExitInfo::Code(0))
    }
}

impl fmt::Display for ExitInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitInfo::Code(c) => write!(f, "exit {c}"),
            ExitInfo::Signal(s) => {
                let name = nix::sys::signal::Signal::try_from(*s)
                    .map(|s| s.as_str())
                    .unwrap_or("?");
                write!(f, "signal {s} ({name})")
            }
        }
    }
}

/// Milliseconds since the Unix epoch: the timestamp of every event.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
