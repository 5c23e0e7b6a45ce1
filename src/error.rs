//! The library's typed errors. Every variant names the thing that was wrong (fleet, agent,
//! field) and why, and renders as one line an operator can act on. Binaries wrap these with
//! `anyhow` context; the library never does.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "error", rename_all = "snake_case")]
pub enum FleetError {
    #[error("invalid {kind} id {id:?}: must be {rule}")]
    InvalidId {
        kind: String,
        id: String,
        rule: String,
    },
    #[error("invalid {field}: {reason}")]
    InvalidArgument { field: String, reason: String },
    #[error("fleet {fleet:?} already exists")]
    FleetExists { fleet: String },
    #[error("no fleet named {fleet:?}")]
    NoSuchFleet { fleet: String },
    #[error("agent {fleet}/{agent} already exists")]
    AgentExists { fleet: String, agent: String },
    #[error("no agent {fleet}/{agent}")]
    NoSuchAgent { fleet: String, agent: String },
    #[error("port range {range} exhausted: {needed} ports needed for {fleet}/{agent}, the range holds {held} blocks of that stride and all are leased or busy")]
    PortRangeExhausted {
        fleet: String,
        agent: String,
        range: String,
        needed: u32,
        held: u32,
    },
    #[error("provisioning {fleet}/{agent} failed: {reason}")]
    Provision {
        fleet: String,
        agent: String,
        reason: String,
    },
    #[error("not admitted: {reason}")]
    NotAdmitted { reason: String },
    #[error("state store: {reason}")]
    Store { reason: String },
    #[error("spec: {reason}")]
    Spec { reason: String },
    #[error("node is shutting down")]
    ShuttingDown,
    #[error("timed out waiting for {what}")]
    Timeout { what: String },
    /// A change that was carried out only in part: `done` says what did happen.
    #[error("partly done: {done}; then: {failed}")]
    Partial { done: String, failed: String },
    #[error("{what} is declared in the spec file {spec}: change it there and `reload` (the spec owns the fleets it declares)")]
    OwnedBySpec { what: String, spec: String },
    #[error("{what} is still being removed; try again once its removal is complete")]
    BeingRemoved { what: String },
    #[error("backup of {what} failed: {reason}")]
    Backup { what: String, reason: String },
    /// Cluster mode: etcd cannot be reached, the agent runs on another node, or the command
    /// is one this build does not carry out cluster-wide. Nothing was changed.
    #[error("cluster: {reason}")]
    Cluster { reason: String },
    #[error("internal error: {reason}")]
    Internal { reason: String },
}

impl FleetError {
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        FleetError::InvalidArgument {
            field: field.into(),
            reason: reason.into(),
        }
    }
    /// A spec error about one agent's settings, saying whose and that nothing changed.
    pub fn of_agent(self, fleet: &str, agent: &str) -> Self {
        match self {
            FleetError::Spec { reason } => FleetError::Spec {
                reason: format!("agent {fleet}/{agent}: {reason}; nothing was changed"),
            },
            other => other,
        }
    }

    pub fn internal(reason: impl std::fmt::Display) -> Self {
        FleetError::Internal {
            reason: reason.to_string(),
        }
    }
}

pub type Result<T, E = FleetError> = std::result::Result<T, E>;
