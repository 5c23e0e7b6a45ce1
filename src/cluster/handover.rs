//! A moved agent takes its HOME along (`--handover-dir`, a directory every node mounts at
//! the same path: NFS, a cluster filesystem). Without it a move keeps what the desired
//! state holds (config, token, the tenant's secrets and files) and loses what only the old
//! HOME held (sessions, memory, media).
//!
//! The node that lets a still-desired agent go (drain, cordon, rebalancing, its own
//! shutdown) stops it, archives its HOME there (`backup::archive`, checked whole when
//! read back) and records the archive at `h/<fleet>/<agent>` in the transaction that gives
//! up its claim, guarded by the fleet doc's revision, so a record is never written for an
//! agent that was removed meanwhile. The node that claims the agent next adds it stopped,
//! restores the archive, starts it, then deletes the file and the record. A change of the
//! desired state that removes an agent deletes its record in the same transaction
//! (`Etcd::update_fleet`), then the file: a name added again later starts from its own
//! desired state, never from an earlier tenant's HOME. A node that dies hands over nothing: its agents
//! start elsewhere from the desired state alone.

use super::{bounded, Etcd};
use crate::backup;
use crate::messages::command::{Command, Reply};
use crate::node::NodeHandle;
use crate::FleetError;
use etcd_client::GetOptions;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The record of one agent's archived HOME, waiting for the node that takes it over.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Handover {
    /// The node that archived it.
    pub node: String,
    /// The archive's file name in `<handover dir>/<fleet>/`.
    pub file: String,
    /// The archive's size.
    pub bytes: u64,
}

/// `<node>.<agent>-<UTC time>.tar.gz`: unique per node and moment.
pub fn file_name(node: &str, agent: &str) -> String {
    format!("{node}.{}", backup::archive_name(agent))
}

/// A name a record may give: one plain archive file of the fleet's directory (a record is
/// read from etcd: it never leads anywhere else).
pub fn plain_file_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && !name.starts_with('.')
        && name.ends_with(".tar.gz")
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

/// What the node taking an agent over does with its recorded handover.
#[derive(Debug, PartialEq, Eq)]
pub enum Take {
    /// Restore this archive into the new HOME before the first start (also when this node
    /// made it: its old HOME here may be gone, a reinstalled host of the same name).
    Restore(PathBuf),
    /// Nothing is restored, for this reason (the agent starts from the desired state).
    Skip(String),
}

pub fn take(rec: &Handover, dir: Option<&Path>, fleet: &str) -> Take {
    if !plain_file_name(&rec.file) {
        return Take::Skip(format!(
            "its handover record names {:?}, not an archive's plain file name",
            rec.file
        ));
    }
    let Some(dir) = dir else {
        return Take::Skip(format!(
            "this node has no --handover-dir to read {} (archived by node {}) from",
            rec.file, rec.node
        ));
    };
    Take::Restore(dir.join(fleet).join(&rec.file))
}

/// Archives a stopped agent's HOME into `<dir>/<fleet>/`.
pub(super) async fn archive(
    node: &NodeHandle,
    dir: &Path,
    me: &str,
    id: &str,
) -> Result<Handover, FleetError> {
    let (fleet, agent) = split(id)?;
    let fleet_dir = dir.join(fleet);
    let d = fleet_dir.clone();
    tokio::task::spawn_blocking(move || backup::make_private_dir(&d))
        .await
        .map_err(FleetError::internal)?
        .map_err(|reason| FleetError::Store { reason })?;
    let file = file_name(me, agent);
    let cmd = Command::AgentBackup {
        fleet: fleet.into(),
        agent: agent.into(),
        out: Some(fleet_dir.join(&file)),
    };
    match node.execute_local(cmd).await {
        Reply::Backups(done) => Ok(Handover {
            node: me.to_string(),
            file,
            bytes: done.first().map_or(0, |d| d.archive_bytes),
        }),
        Reply::Error(e) => Err(e),
        other => Err(FleetError::internal(format!(
            "the backup answered {other:?}"
        ))),
    }
}

/// Stops `fleet/agent` (waiting until its processes are gone) and, with `dir`, archives
/// its HOME there. `None`: the stop failed, or the archive did (named in the log).
pub(super) async fn stop_and_archive(
    node: NodeHandle,
    dir: Option<PathBuf>,
    me: String,
    id: String,
) -> Option<(String, Handover)> {
    let (fleet, agent) = split(&id).ok()?;
    let stop = Command::AgentStop {
        fleet: fleet.into(),
        agent: agent.into(),
    };
    if matches!(node.execute_local(stop).await, Reply::Error(_)) {
        return None;
    }
    match archive(&node, &dir?, &me, &id).await {
        Ok(h) => Some((id, h)),
        Err(e) => {
            tracing::warn!(agent = %id, error = %e, "its HOME could not be archived for the move: it starts elsewhere from the desired state alone");
            None
        }
    }
}

/// The compare and the put that record `h` for `id` only while its fleet's doc is still
/// at `fleet_rev` (the revision of the read in which the agent was desired).
pub(super) fn guarded_record(
    keys: &super::Keys,
    id: &str,
    fleet_rev: i64,
    h: &Handover,
) -> Result<(etcd_client::Compare, etcd_client::TxnOp), FleetError> {
    use etcd_client::{Compare, CompareOp, TxnOp};
    let fleet = split(id)?.0;
    Ok((
        Compare::mod_revision(keys.fleet(fleet), CompareOp::Equal, fleet_rev),
        TxnOp::put(
            keys.handover(id),
            serde_json::to_vec(h).map_err(FleetError::internal)?,
            None,
        ),
    ))
}

/// Where `h`'s archive is.
pub(super) fn archive_path(dir: &Path, id: &str, h: &Handover) -> PathBuf {
    dir.join(id.split('/').next().unwrap_or_default())
        .join(&h.file)
}

/// Every recorded handover (`fleet/agent` → record, its mod revision); a record that does
/// not parse is named in the log and left alone.
pub(super) async fn pending(
    etcd: &Etcd,
    fleet: Option<&str>,
) -> Result<BTreeMap<String, (Handover, i64)>, FleetError> {
    let prefix = etcd.keys.handovers(fleet);
    let mut c = etcd.client.clone();
    let r = bounded(c.get(prefix, Some(GetOptions::new().with_prefix()))).await?;
    let all = etcd.keys.handovers(None);
    let mut out = BTreeMap::new();
    for kv in r.kvs() {
        let key = String::from_utf8_lossy(kv.key()).to_string();
        let Some(id) = key.strip_prefix(&all) else {
            continue;
        };
        match serde_json::from_slice::<Handover>(kv.value()) {
            Ok(h) => {
                out.insert(id.to_string(), (h, kv.mod_revision()));
            }
            Err(e) => tracing::warn!(key = %key, error = %e, "unreadable handover record; ignored"),
        }
    }
    Ok(out)
}

/// Deletes a record, unless it changed since it was read at `rev`.
pub(super) async fn consume(etcd: &Etcd, id: &str, rev: i64) -> Result<(), FleetError> {
    use etcd_client::{Compare, CompareOp, Txn, TxnOp};
    let k = etcd.keys.handover(id);
    etcd.txn(
        Txn::new()
            .when([Compare::mod_revision(k.clone(), CompareOp::Equal, rev)])
            .and_then([TxnOp::delete(k, None)]),
    )
    .await
    .map(drop)
}

/// Best effort: a file left behind is named in the log.
pub(super) fn remove_archive(path: &Path) {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "a handover archive was not deleted")
        }
    }
}

fn split(id: &str) -> Result<(&str, &str), FleetError> {
    id.split_once('/')
        .ok_or_else(|| FleetError::internal(format!("{id:?} is not fleet/agent")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_the_taking_node_does_with_a_record() {
        let rec = |node: &str, file: &str| Handover {
            node: node.into(),
            file: file.into(),
            bytes: 1,
        };
        let dir = Path::new("/shared/handover");
        let ok = "n1.bot-20261202T101010.123Z.tar.gz";
        let cases: [(Handover, Option<&Path>, Take); 6] = [
            (
                rec("n1", ok),
                Some(dir),
                Take::Restore(dir.join("f").join(ok)),
            ),
            // Its own archive too: the HOME it left here may be gone.
            (
                rec("n2", ok),
                Some(dir),
                Take::Restore(dir.join("f").join(ok)),
            ),
            (rec("n1", ok), None, Take::Skip(String::new())),
            (
                rec("n1", "../../etc/shadow.tar.gz"),
                Some(dir),
                Take::Skip(String::new()),
            ),
            (
                rec("n1", ".hidden.tar.gz"),
                Some(dir),
                Take::Skip(String::new()),
            ),
            (rec("n1", "bot.zip"), Some(dir), Take::Skip(String::new())),
        ];
        for (i, (r, d, want)) in cases.into_iter().enumerate() {
            let got = take(&r, d, "f");
            match (&got, &want) {
                (Take::Skip(why), Take::Skip(_)) => assert!(!why.is_empty(), "case {i}"),
                _ => assert_eq!(got, want, "case {i}"),
            }
        }
    }

    #[test]
    fn archive_names_are_plain_and_per_node() {
        let n = file_name("n-1", "bot");
        assert!(n.starts_with("n-1.bot-") && plain_file_name(&n), "{n}");
        for bad in ["", "a/b.tar.gz", "a b.tar.gz", "x.tar.gz\n", "\u{0}.tar.gz"] {
            assert!(!plain_file_name(bad), "{bad:?}");
        }
    }
}
