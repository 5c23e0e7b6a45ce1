//! Messages of the LogRotator.

use crate::provision::AgentPaths;
use crate::spec::LogSpec;

pub enum LogsMsg {
    /// Periodic tick (every `NodeConfig::log_interval`): start a pass unless one is running.
    Tick,
    /// A pass finished (sent by the pass's own task).
    PassDone,
    /// The log settings and agents' paths of a fleet (replaces what was known of it).
    Fleet {
        fleet: String,
        spec: LogSpec,
        homes: Vec<AgentPaths>,
    },
    ForgetFleet {
        fleet: String,
    },
}
