//! Lifecycle events published on the node's broadcast channel, for embedders, `events` and
//! the metrics. Serialized with serde; the JSON shape is a contract pinned by tests.

use crate::state::{AgentState, ExitInfo, FleetState};
use serde::{Deserialize, Serialize};

/// One agent state transition.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentTransition {
    pub fleet: String,
    pub agent: String,
    pub old: AgentState,
    pub new: AgentState,
    pub pid: Option<u32>,
    pub exit: Option<ExitInfo>,
    pub restarts: u32,
    /// Why, in a few words (`exit 78 (EX_CONFIG)`, `health check failed`, `memory limit`…).
    pub reason: Option<String>,
    pub at_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    Agent(AgentTransition),
    Fleet {
        fleet: String,
        old: FleetState,
        new: FleetState,
        reason: Option<String>,
        at_ms: u64,
    },
    LogsPruned {
        bytes_freed: u64,
        files_deleted: u64,
        at_ms: u64,
    },
    LogLinesDropped {
        fleet: String,
        agent: String,
        lines: u64,
        reason: String,
        at_ms: u64,
    },
    /// A messaging channel of an agent changed state (`channels` in `status`).
    Channel {
        fleet: String,
        agent: String,
        channel: String,
        state: crate::channels::ChannelState,
        error: Option<String>,
        at_ms: u64,
    },
    /// A scheduled backup of an agent failed (the agent runs on; retried later).
    BackupFailed {
        fleet: String,
        agent: String,
        reason: String,
        at_ms: u64,
    },
    /// A step of `fleet upgrade` / `fleet rollback` (`agent: None`: the whole fleet's).
    Upgrade {
        fleet: String,
        agent: Option<String>,
        /// `backing_up`, `restarting`, `kept`, `rolling_back`, `rolled_back`; for the fleet
        /// `done`, `rolled_back`, `interrupted`.
        step: String,
        detail: Option<String>,
        at_ms: u64,
    },
}
