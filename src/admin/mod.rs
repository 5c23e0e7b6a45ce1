//! The admin doors: the command parser, human/JSON rendering, the REPL and the control socket.
//! All of them end in `NodeHandle::execute`.

pub mod client;
pub mod parse;
pub mod peer;
pub mod render;
pub mod repl;
pub mod socket;
