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
//! desired state, never from an earlier tenant's HOME.
//!
//! A node that dies archives nothing then, so a node also archives each agent it runs live
//! every `--snapshot-every` (one at a time) and records it at the same key, guarded by its
//! claim and the fleet doc, in place of the record before (whose archive it deletes): the
//! node that takes a dead node's agent restores it as of then. An archive no record names
//! (a refused restore's) is kept `ORPHAN_KEEP` for the operator, then swept.

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
    /// Archived while the agent ran (`--snapshot-every`), for a node that dies: the node
    /// that runs the agent replaces it as it goes. `false`: archived stopped, by a node
    /// letting the agent go (the newest state there is).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub live: bool,
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

/// Archives an agent's HOME into `<dir>/<fleet>/`: a stopped one's, or (`live`) a running
/// one's, as `agent backup` does.
pub(super) async fn archive(
    node: &NodeHandle,
    dir: &Path,
    me: &str,
    id: &str,
    live: bool,
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
            live,
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
    match archive(&node, &dir?, &me, &id, false).await {
        Ok(h) => Some((id, h)),
        Err(e) => {
            tracing::warn!(agent = %id, error = %e, "its HOME could not be archived for the move: it starts elsewhere from its last live archive if one is recorded, else from the desired state alone");
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

/// Records the live archive `h` of `id` (`--snapshot-every`) in place of the record read at
/// `prev_rev` (`None`: there was none), only while this node holds the agent's claim on
/// `lease` and its fleet's doc is still at `fleet_rev`: an agent let go, moved or removed
/// meanwhile keeps what its new state says. `false`: not recorded (the archive is the
/// caller's to delete).
pub(super) async fn record_live(
    etcd: &Etcd,
    id: &str,
    fleet_rev: i64,
    lease: i64,
    h: &Handover,
    prev_rev: Option<i64>,
) -> Result<bool, FleetError> {
    use etcd_client::{Compare, CompareOp, Txn};
    let (fleet_guard, put) = guarded_record(&etcd.keys, id, fleet_rev, h)?;
    let k = etcd.keys.handover(id);
    let unchanged = match prev_rev {
        Some(rev) => Compare::mod_revision(k, CompareOp::Equal, rev),
        None => Compare::create_revision(k, CompareOp::Equal, 0),
    };
    let claimed = Compare::lease(etcd.keys.claim(id), CompareOp::Equal, lease);
    etcd.txn(
        Txn::new()
            .when([fleet_guard, unchanged, claimed])
            .and_then([put]),
    )
    .await
}

/// Of `agents` (`fleet/agent`, with when each was last archived live here), the one whose
/// live archive is most overdue at `every`, if any is due. One at a time: a node's
/// snapshots never compete with its agents for the disk more than one backup does.
pub fn next_live<'a>(
    agents: impl IntoIterator<Item = (&'a String, Option<std::time::Instant>)>,
    every: std::time::Duration,
) -> Option<&'a String> {
    agents
        .into_iter()
        .filter(|(_, last)| last.is_none_or(|t| t.elapsed() >= every))
        .min_by_key(|(_, last)| *last)
        .map(|(a, _)| a)
}

/// When an agent whose live archive came to nothing (not recorded, voided) counts as last
/// archived: `retry` before it is due again at `every`, and behind every agent already
/// overdue, so one agent that keeps failing cannot hold the node's others back.
pub fn tried_at(
    now: std::time::Instant,
    every: std::time::Duration,
    retry: std::time::Duration,
) -> std::time::Instant {
    now.checked_sub(every.saturating_sub(retry.min(every)))
        .unwrap_or(now)
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

/// Marks an archive as last written now (best effort): the sweep keeps it `ORPHAN_KEEP`
/// from the moment its restore was refused, not from when it was made.
pub(super) fn touch(path: &Path) {
    use std::os::unix::fs::OpenOptionsExt;
    let r = std::fs::File::options()
        .write(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .and_then(|f| f.set_modified(std::time::SystemTime::now()));
    if let Err(e) = r {
        tracing::debug!(path = %path.display(), error = %e, "a kept handover archive's time was not renewed");
    }
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

/// How long an archive no record names is kept in the handover directory: the one a restore
/// refused, or a taker without `--handover-dir` skipped, is the only copy of those sessions,
/// for the operator to restore by hand (`agent restore`); after this it is deleted.
pub const ORPHAN_KEEP: std::time::Duration = std::time::Duration::from_secs(7 * 24 * 3600);

/// The archives in `<dir>/<fleet>/` that no record names (`named`) and that were last
/// written before `now - keep`. Only plain archive names of regular files are candidates:
/// a symlink, a directory, a FIFO, a file being written (`.`-named) is never one, and no
/// symlinked fleet directory is entered.
pub fn orphans(
    dir: &Path,
    named: &std::collections::BTreeSet<PathBuf>,
    now: std::time::SystemTime,
    keep: std::time::Duration,
) -> Vec<PathBuf> {
    let Some(cutoff) = now.checked_sub(keep) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let Ok(fleets) = std::fs::read_dir(dir) else {
        return out;
    };
    for f in fleets.flatten() {
        let Ok(ft) = f.file_type() else { continue };
        if !ft.is_dir() {
            continue;
        }
        let Ok(files) = std::fs::read_dir(f.path()) else {
            continue;
        };
        for e in files.flatten() {
            let path = e.path();
            let plain = e.file_name().to_str().is_some_and(plain_file_name);
            if !plain || named.contains(&path) {
                continue;
            }
            // `DirEntry::metadata` does not follow a symlink.
            let Ok(m) = e.metadata() else { continue };
            if m.file_type().is_file() && m.modified().is_ok_and(|t| t < cutoff) {
                out.push(path);
            }
        }
    }
    out
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
            live: false,
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
    fn only_old_unrecorded_plain_archives_are_orphans() {
        use std::time::{Duration, SystemTime};
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let f = dir.join("f");
        std::fs::create_dir(&f).unwrap();
        let old = SystemTime::now() - Duration::from_secs(8 * 24 * 3600);
        let written_at = |p: &Path, at: SystemTime| {
            std::fs::write(p, b"x").unwrap();
            std::fs::File::options()
                .write(true)
                .open(p)
                .unwrap()
                .set_modified(at)
                .unwrap();
        };
        let file = |name: &str, at: SystemTime| {
            let p = f.join(name);
            written_at(&p, at);
            p
        };
        let orphan = file("n1.a-1.tar.gz", old);
        let recorded = file("n1.b-1.tar.gz", old);
        file("n1.c-1.tar.gz", SystemTime::now());
        file(".n1.d-1.tar.gz", old);
        file("notes.txt", old);
        std::os::unix::fs::symlink(&orphan, f.join("n1.e-1.tar.gz")).unwrap();
        std::fs::create_dir(f.join("n1.g-1.tar.gz")).unwrap();
        // A fleet directory that is a symlink is not entered.
        let elsewhere = tempfile::tempdir().unwrap();
        let outside = elsewhere.path().join("n1.h-1.tar.gz");
        written_at(&outside, old);
        std::os::unix::fs::symlink(elsewhere.path(), dir.join("g")).unwrap();
        let named = [recorded].into_iter().collect();
        let got = orphans(dir, &named, SystemTime::now(), ORPHAN_KEEP);
        assert_eq!(got, vec![orphan]);
        assert!(orphans(&dir.join("missing"), &named, SystemTime::now(), ORPHAN_KEEP).is_empty());
    }

    #[test]
    fn the_most_overdue_agent_is_archived_live_next() {
        use std::time::{Duration, Instant};
        let every = Duration::from_secs(60);
        let now = Instant::now();
        let (a, b, c) = ("f/a".to_string(), "f/b".to_string(), "f/c".to_string());
        let long = now.checked_sub(Duration::from_secs(300)).unwrap();
        let longer = now.checked_sub(Duration::from_secs(600)).unwrap();
        type Case<'a> = (Vec<(&'a String, Option<Instant>)>, Option<&'a String>);
        let cases: [Case; 7] = [
            (vec![], None),
            (vec![(&a, Some(now))], None),
            (vec![(&a, Some(now)), (&b, Some(long))], Some(&b)),
            (vec![(&a, Some(long)), (&b, Some(longer))], Some(&b)),
            // Never archived here comes first.
            (vec![(&a, Some(longer)), (&c, None)], Some(&c)),
            // One that came to nothing waits its retry, and then behind the overdue.
            (vec![(&a, Some(tried_at(now, every, every / 6)))], None),
            (
                vec![
                    (&a, Some(tried_at(now, every, Duration::ZERO))),
                    (&b, Some(long)),
                ],
                Some(&b),
            ),
        ];
        for (i, (agents, want)) in cases.into_iter().enumerate() {
            assert_eq!(next_live(agents, every), want, "case {i}");
        }
    }

    #[test]
    fn a_live_archive_record_reads_back_and_old_records_still_parse() {
        let h = Handover {
            node: "n1".into(),
            file: "n1.a-1.tar.gz".into(),
            bytes: 3,
            live: true,
        };
        let back: Handover = serde_json::from_slice(&serde_json::to_vec(&h).unwrap()).unwrap();
        assert_eq!(back, h);
        let old: Handover =
            serde_json::from_str(r#"{"node":"n1","file":"n1.a-1.tar.gz","bytes":3}"#).unwrap();
        assert!(!old.live);
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
