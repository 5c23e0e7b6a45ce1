//! Owning OS processes: reading /proc, spawning from one long-lived thread, watching one
//! child and stopping whole process trees.

pub mod cgroup;
pub mod child;
pub mod members;
pub mod notice;
pub mod owner;
pub mod procfs;
pub mod spawn;
pub mod tree;
