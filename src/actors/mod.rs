//! The supervision tree: one file per actor. Actors decide; the modules they call do the work.

pub mod agent;
pub mod fleet;
pub mod logs;
pub mod node;
pub mod ports;
