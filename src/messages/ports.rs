//! Messages of the PortAllocator.

use crate::error::FleetError;
use crate::ports::Lease;
use ractor::RpcReplyPort;

pub enum PortsMsg {
    /// A block of `stride` ports for the agent (its existing lease if it has one).
    Allocate {
        fleet: String,
        agent: String,
        stride: u16,
        reply: RpcReplyPort<Result<Lease, FleetError>>,
    },
    /// Blocks for many agents of one fleet from one look at the host's bound ports: all or
    /// none (on error nothing stays leased).
    AllocateMany {
        fleet: String,
        agents: Vec<String>,
        stride: u16,
        reply: RpcReplyPort<Result<Vec<Lease>, FleetError>>,
    },
    /// Re-install a lease read from the registry.
    Restore {
        fleet: String,
        agent: String,
        lease: Lease,
        reply: RpcReplyPort<Result<(), FleetError>>,
    },
    Release {
        fleet: String,
        agent: String,
    },
    /// The agent's block is taken by another process: lease it a new one (the old is freed).
    Reallocate {
        fleet: String,
        agent: String,
        stride: u16,
        reply: RpcReplyPort<Result<Lease, FleetError>>,
    },
    List {
        reply: RpcReplyPort<Vec<(String, String, Lease)>>,
    },
    /// Blocks of `stride` still free in the range (for `capacity`).
    Free {
        stride: u16,
        reply: RpcReplyPort<u64>,
    },
}
