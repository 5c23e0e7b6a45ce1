//! Agent log files: the writer the daemon owns, reading back across archives, and the pure
//! retention/budget decisions the LogRotator carries out.

pub mod retention;
pub mod tail;
pub mod writer;
