//! Fleet Commander: runs fleets of OpenClaw agents as native, supervised processes on one
//! Linux host, without containers. This crate is the library (the actor tree, embeddable in
//! any tokio server); the binaries `fleetd`, `fleetctl` and `fleet-stub-agent` sit on top.

pub mod actors;
pub mod admin;
pub mod backup;
pub mod capacity;
pub mod channels;
pub mod cluster;
pub mod context;
pub mod doctor;
pub mod error;
pub mod health;
pub mod ids;
pub mod isolation;
pub mod lifecycle;
pub mod listeners;
pub mod logs;
pub mod memory;
pub mod messages;
pub mod metrics;
pub mod node;
pub mod operator_file;
pub mod ports;
pub mod pressure;
pub mod process;
pub mod provision;
pub mod reconcile;
pub mod registry;
pub mod restart;
pub mod sampler;
pub mod spec;
pub mod specfile;
pub mod start;
pub mod state;
pub mod state_dir;
pub mod strategy;
pub mod top;
pub mod upgrade;
pub mod vault;
pub mod webhooks;

pub use context::NodeConfig;
pub use error::{FleetError, Result};
pub use node::{Node, NodeHandle};
