//! Messages of the LogRotator.

use crate::spec::LogSpec;
use std::path::PathBuf;

pub enum LogsMsg {
    /// Periodic tick (also sent on demand by tests and `logs prune`).
    Tick,
    /// The log settings and agent homes of a fleet (replaces what was known of it).
    Fleet {
        fleet: String,
        spec: LogSpec,
        homes: Vec<PathBuf>,
    },
    ForgetFleet {
        fleet: String,
    },
}
