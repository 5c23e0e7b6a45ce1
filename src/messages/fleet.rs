//! Messages of a FleetSupervisor: admin operations from the NodeActor, and escalations from
//! its agents.

use crate::error::FleetError;
use crate::spec::FleetSpec;
use ractor::RpcReplyPort;
use std::sync::Arc;

/// Operations on one agent, forwarded by the fleet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentOp {
    Start,
    Stop,
    Restart,
}

pub enum FleetMsg {
    /// Add (and start if `start`) an agent whose port and token are already decided.
    /// An agent's desired record (lease, token, and what later per-agent settings add), as
    /// its owner, the node, holds it: the fleet keeps it as the recipe it re-spawns from.
    AddAgent {
        agent: String,
        record: Box<crate::registry::AgentRecord>,
        start: bool,
        reply: RpcReplyPort<Result<(), FleetError>>,
    },
    /// Stop an agent's processes, then its actor.
    RemoveAgent {
        agent: String,
        reply: RpcReplyPort<Result<(), FleetError>>,
    },
    Agent {
        agent: String,
        op: AgentOp,
        reply: RpcReplyPort<Result<(), FleetError>>,
    },
    /// From an agent's start: its base port is held by another process. The fleet asks the
    /// node (the lease's owner) for a new block, keeps it in the agent's recipe, and answers
    /// with its base.
    MovePort {
        agent: String,
        reply: RpcReplyPort<Result<u16, FleetError>>,
    },
    /// Internal: the node moved the agent's lease; the recipe takes the new port.
    PortMoved {
        agent: String,
        port: u16,
    },
    /// Fault injection for tests: the agent's actor panics (its process is killed by its
    /// drop, and the fleet re-spawns it from its recipe).
    #[doc(hidden)]
    InjectPanic {
        agent: String,
    },
    /// A new token for the agent, already saved by the node (the token's owner).
    SetToken {
        agent: String,
        token: String,
        reply: RpcReplyPort<Result<(), FleetError>>,
    },
    StartAll {
        reply: RpcReplyPort<()>,
    },
    /// Stops agents in reverse start order; replies when all are stopped.
    StopAll {
        reply: RpcReplyPort<()>,
    },
    RestartAll {
        reply: RpcReplyPort<()>,
    },
    UpdateSpec(Arc<FleetSpec>),
    /// Internal: a StopAll finished.
    Stopped,
    /// The sampler saw the agent above the fleet's max_memory twice in a row.
    MemoryLimit {
        agent: String,
        reason: String,
    },

    // --- from agents ---
    /// The agent crashed and is being restarted: apply the strategy to its siblings.
    AgentRestarting {
        agent: String,
    },
    /// The agent gave up (intensity, exit 78, spawn error): escalate.
    AgentFailed {
        agent: String,
        reason: String,
    },
}
