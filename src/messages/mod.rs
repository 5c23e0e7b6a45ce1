//! One message enum per actor, plus the events and the command language.

pub mod agent;
pub mod command;
pub mod events;
pub mod fleet;
pub mod forward;
pub mod logs;
pub mod node;
pub mod ports;
