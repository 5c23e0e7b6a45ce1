//! The door between nodes in cluster mode: what one fleetd asks another through etcd
//! (`m/<node>/<id>`), answered with a `Reply` at `r/<id>`. etcd's own access control (TLS
//! client certificates, users) is what admits a caller: whoever may write the cluster's
//! desired state may also ask a node for what the command language lets its socket do.

use super::command::Command;
use serde::{Deserialize, Serialize};

/// One request, as stored at `m/<node>/<id>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Request {
    /// The asking node (for the log and the reply's wording).
    pub from: String,
    /// The asker's etcd lease: the reply is put on it, so a request and its answer vanish
    /// with an asker that died waiting.
    pub lease: i64,
    pub forward: Forward,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Forward {
    /// One of an agent's own commands (`logs`, `config`, `token`, `say`, `agent restart`,
    /// `agent backup`, `exec-context`) for an agent the node runs, or a fleet's share of
    /// `fleet restart` / `fleet backup` on that node.
    Command { command: Command },
    /// Deletes what the node keeps of a removed agent (its HOME, logs and lock files), once
    /// its processes there are gone; `agent: None`: of every agent of a removed fleet.
    Purge {
        fleet: String,
        agent: Option<String>,
    },
    /// `agent restore` with the archive's bytes in `chunks` keys `x/<id>/<n>` (the archive
    /// is a file on the asking host).
    Restore {
        fleet: String,
        agent: String,
        force: bool,
        chunks: u32,
        bytes: u64,
    },
}
