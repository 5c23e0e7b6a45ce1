//! Messages of an AgentActor: admin operations from its FleetSupervisor, and reports from the
//! tasks it started (provisioning/spawn, the process owner, the prober, timers). Every report
//! carries the incarnation (`gen`) it belongs to; older ones are dropped.

use crate::health::ProbeReport;
use crate::process::owner::OwnerEvent;
use ractor::RpcReplyPort;

pub enum AgentMsg {
    /// Start if not running; an operator's start also forgets past restarts.
    Start {
        reset_history: bool,
    },
    /// Stop the whole process tree; the reply comes when every process is gone.
    Stop {
        reply: Option<RpcReplyPort<()>>,
    },
    /// Stop, then start again. `reason` is shown in events.
    Restart {
        reason: String,
    },
    /// Stop and mark `failed` (the fleet gave up).
    Fail {
        reason: String,
    },
    /// Fault injection for tests: the handler panics.
    #[doc(hidden)]
    InjectPanic,
    /// A new token, already durable in the registry: the agent restarts with it if it runs
    /// (its config is rendered at every start).
    SetToken {
        token: String,
        reply: RpcReplyPort<()>,
    },
    /// Over the fleet's max_memory: restart, counted like a crash.
    MemoryLimit {
        reason: String,
    },
    /// The fleet's settings changed (no restart by itself).
    UpdateSpec(std::sync::Arc<crate::spec::FleetSpec>),

    // --- reports from the agent's own tasks ---
    /// Boxed: it is the largest message, and a mailbox's blocks are sized by the largest.
    Spawned {
        gen: u64,
        result: Box<Result<Spawned, SpawnFailure>>,
    },
    Owner {
        gen: u64,
        event: OwnerEvent,
    },
    Probe {
        gen: u64,
        report: ProbeReport,
    },
    GraceExpired {
        gen: u64,
    },
    /// A restart held in a gateway's first seconds (`lifecycle::hold_before_stop`) is due.
    HeldStop {
        gen: u64,
    },
    BackoffDone {
        gen: u64,
    },
}

/// A process that was started, with the start-gate permit it holds until healthy.
pub struct Spawned {
    pub child: crate::process::child::Child,
    /// The agent's base port (new if its old block was taken by another process).
    pub port: u16,
    pub permit: Option<tokio::sync::OwnedSemaphorePermit>,
    /// The incarnation's cgroup, where the node has cgroups.
    pub cgroup: Option<crate::process::cgroup::AgentCgroup>,
}

/// Why an agent could not be started. A start failure goes through the restart policy like a
/// crash (a full disk, EMFILE or a busy port heal by themselves), unless it is `permanent`: a
/// fault in what was asked for (an invalid spec or template) that no retry can fix.
#[derive(Debug)]
pub struct SpawnFailure {
    pub reason: String,
    pub permanent: bool,
}
