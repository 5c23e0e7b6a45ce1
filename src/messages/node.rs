//! Messages of the NodeActor, the entry point of every admin command.

use crate::error::FleetError;
use crate::messages::command::{Command, Reply};
use crate::spec::FleetSpec;
use ractor::RpcReplyPort;

// A command is moved once into the node's mailbox and answered: boxing it would buy nothing.
#[allow(clippy::large_enum_variant)]
pub enum NodeMsg {
    /// One command of the command language, answered with its reply.
    Command(Command, RpcReplyPort<Reply>),
    /// Create a fleet from a full spec (the library API and the spec file).
    CreateFleet(Box<FleetSpec>, RpcReplyPort<Result<(), FleetError>>),
    /// Apply a whole desired spec (spec file load or reload): create, remove, restart only what
    /// changed. The agents named `fleet/agent` in the set are added stopped, and refuse to
    /// start until `HandedIn`.
    ApplySpec(
        Vec<FleetSpec>,
        std::collections::BTreeSet<String>,
        RpcReplyPort<Result<String, FleetError>>,
    ),
    /// Stop every fleet (reverse creation order), then reply.
    Shutdown(RpcReplyPort<()>),
    /// Copy what agents observed (pids, start times, ports) into the registry and save it.
    FlushObserved,
    /// A removal's task finished (processes gone, HOME purged if asked): the name may be
    /// used again. `agent: None` for a whole fleet.
    RemovalDone {
        fleet: String,
        agent: Option<String>,
    },
    /// An agent's base port is held by another process: lease it a new block, record it,
    /// answer with its base (asked by the agent's fleet).
    MovePort {
        fleet: String,
        agent: String,
        stride: u16,
        reply: RpcReplyPort<Result<u16, FleetError>>,
    },
    /// Fault injection for tests: make an agent's actor panic.
    #[doc(hidden)]
    InjectPanic { fleet: String, agent: String },
    /// Every token of an agent, current and earlier (for redacting a followed log).
    AgentTokens {
        fleet: String,
        agent: String,
        reply: RpcReplyPort<Result<Vec<String>, FleetError>>,
    },
    /// An upgrade's last step: the fleet runs `version` (`None`: the default install); every
    /// agent's own version that is now the same as the fleet's is dropped. Restarts nobody.
    SetFleetVersion {
        fleet: String,
        version: Option<String>,
        reply: RpcReplyPort<Result<(), FleetError>>,
    },
    /// A restore's task ended: the agent may be started again.
    RestoreDone { fleet: String, agent: String },
    /// An agent an `ApplySpec` held is handed in (its archive restored, or none to wait
    /// for): it may be started.
    HandedIn { fleet: String, agent: String },
    /// An upgrade or rollback task ended (its record is saved): the fleet may take another.
    UpgradeDone { fleet: String },
    /// From the sampler: the agent stayed above its fleet's max_memory.
    MemoryLimit {
        fleet: String,
        agent: String,
        reason: String,
    },
}
