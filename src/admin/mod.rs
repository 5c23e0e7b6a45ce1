//! The admin doors: the command parser, human/JSON rendering, the REPL and the control socket.

pub mod parse;
pub mod render;
