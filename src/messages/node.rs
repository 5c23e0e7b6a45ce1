//! Messages of the NodeActor, the entry point of every admin command.

use crate::messages::command::{Reply, Request};
use ractor::RpcReplyPort;

pub enum NodeMsg {
    /// One command of the command language, answered with its reply.
    Command(Request, RpcReplyPort<Reply>),
}
