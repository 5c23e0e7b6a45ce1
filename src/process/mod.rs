//! Owning OS processes: reading /proc, spawning from one long-lived thread, stopping whole
//! process trees.

pub mod procfs;
