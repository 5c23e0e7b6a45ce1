//! The part of cluster-mode commands that happens on other nodes: an agent's own commands
//! carried to the node that runs it, a fleet's `restart`/`backup` to every node with a share
//! of it, a purge to every node, an archive to the node that restores it. The transport is
//! `mailbox`; the decisions (what may be asked, how long to wait, how answers combine) are
//! plain functions below.

use super::front::{done, err, refuse, Front};
use super::mailbox;
use crate::messages::command::{Command, Reply};
use crate::messages::forward::{Forward, Request};
use crate::node::NodeHandle;
use crate::provision::AgentPaths;
use crate::FleetError;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The fleet and agent of a command that runs where its agent runs (and may be asked of
/// that node). `logs --follow` is not one: a stream does not cross nodes.
pub fn agent_command(cmd: &Command) -> Option<(String, String)> {
    match cmd {
        Command::Logs {
            fleet,
            agent,
            follow: false,
            ..
        }
        | Command::AgentConfig { fleet, agent }
        | Command::Token {
            fleet,
            agent,
            rotate: false,
        }
        | Command::ExecContext { fleet, agent }
        | Command::Say { fleet, agent, .. }
        | Command::AgentRestart { fleet, agent }
        | Command::AgentBackup { fleet, agent, .. } => Some((fleet.clone(), agent.clone())),
        _ => None,
    }
}

/// How long the asker waits for the node's answer.
pub fn patience(cmd: &Command) -> Duration {
    Duration::from_secs(match cmd {
        // A model's turn.
        Command::Say { .. } => 180,
        Command::AgentBackup { .. } | Command::FleetBackup { .. } => 600,
        Command::AgentRestart { .. } | Command::FleetRestart { .. } => 120,
        _ => 30,
    })
}

const PURGE_PATIENCE: Duration = Duration::from_secs(60);
const RESTORE_PATIENCE: Duration = Duration::from_secs(600);

/// One answer of many nodes' (`(node, reply)`, in node order): every part's `Done` joined,
/// every part's `Backups` together; an error anywhere makes a `Partial` naming what was
/// done and where it failed (or, when nothing was done, one error naming every node).
pub fn combine(what: &str, parts: Vec<(String, Reply)>) -> Reply {
    let mut done_parts = Vec::new();
    let mut failed = Vec::new();
    let mut backups = Vec::new();
    let mut any_backups = false;
    for (node, r) in parts {
        match r {
            Reply::Done { message } => done_parts.push(format!("{node}: {message}")),
            Reply::Backups(rows) => {
                any_backups = true;
                done_parts.push(format!("{node}: {} archive(s)", rows.len()));
                backups.extend(rows);
            }
            Reply::Error(e) => failed.push(format!("{node}: {e}")),
            other => done_parts.push(format!("{node}: {other:?}")),
        }
    }
    match (done_parts.is_empty(), failed.is_empty()) {
        (_, true) if any_backups => Reply::Backups(backups),
        (_, true) => done(format!("{what}: {}", done_parts.join("; "))),
        (true, false) => Reply::Error(FleetError::Cluster {
            reason: format!("{what}: {}", failed.join("; ")),
        }),
        (false, false) => Reply::Error(FleetError::Partial {
            done: format!("{what}: {}", done_parts.join("; ")),
            failed: failed.join("; "),
        }),
    }
}

impl Front {
    fn request(&self, forward: Forward) -> Result<Request, FleetError> {
        let lease = self.lease.load(std::sync::atomic::Ordering::SeqCst);
        if lease == 0 {
            return Err(FleetError::Cluster {
                reason: "this node holds no cluster lease now (joining, or cut off from etcd); nothing was asked of another node".into(),
            });
        }
        Ok(Request {
            from: self.cfg.node_name.clone(),
            lease,
            forward,
        })
    }

    /// Asks `node` through etcd on this node's lease.
    pub(super) async fn ask(
        &self,
        node: String,
        forward: Forward,
        blob: Vec<u8>,
        wait: Duration,
    ) -> Reply {
        let r = match self.request(forward) {
            Ok(req) => mailbox::ask(self.etcd.clone(), node, req, blob, wait).await,
            Err(e) => Err(e),
        };
        r.unwrap_or_else(Reply::Error)
    }

    /// A reply of this node's, with this node named where the reply says where something is.
    pub(super) fn stamped(&self, mut reply: Reply) -> Reply {
        if let Reply::Backups(rows) = &mut reply {
            for b in rows {
                b.node = Some(self.cfg.node_name.clone());
            }
        }
        reply
    }

    /// Carries out another node's request here.
    pub async fn serve(&self, local: &NodeHandle, id: &str, req: Request) -> Reply {
        match req.forward {
            Forward::Command { command } => {
                // A restore from an archive on this node's own disk (an upgrade's backup).
                let agent = agent_command(&command).or(match &command {
                    Command::AgentRestore { fleet, agent, .. } => {
                        Some((fleet.clone(), agent.clone()))
                    }
                    _ => None,
                });
                let fleet_share = matches!(
                    command,
                    Command::FleetRestart { .. } | Command::FleetBackup { .. }
                );
                if agent.is_none() && !fleet_share {
                    return refuse(&format!("asking another node for {command:?}"));
                }
                if let Some((f, a)) = agent {
                    match self.where_it_runs(&f, &a).await {
                        Ok(None) => {}
                        Ok(Some((n, _))) => {
                            return Reply::Error(FleetError::Cluster {
                                reason: format!(
                                    "{f}/{a} moved to node {n} meanwhile; nothing was done on {}",
                                    self.cfg.node_name
                                ),
                            })
                        }
                        Err(e) => return Reply::Error(e),
                    }
                }
                self.stamped(local.execute_local(command).await)
            }
            Forward::Purge { fleet, agent } => {
                err(self.purge_here(local, &fleet, agent.as_deref()).await)
            }
            Forward::Restore {
                fleet,
                agent,
                force,
                chunks,
                bytes,
            } => err(self
                .restore_here(local, id, fleet, agent, force, chunks, bytes)
                .await),
        }
    }

    /// `fleet restart` / `fleet backup`: each node that holds agents of the fleet does its
    /// share, all at once.
    pub(super) async fn on_every_holder(
        &self,
        local: &NodeHandle,
        fleet: &str,
        cmd: Command,
    ) -> Result<Reply, FleetError> {
        let snap = self.etcd.snapshot(false).await?;
        let Some((doc, _)) = snap.fleets.get(fleet) else {
            return Err(FleetError::NoSuchFleet {
                fleet: fleet.into(),
            });
        };
        let holders: BTreeSet<String> = doc
            .spec
            .agents
            .iter()
            .filter_map(|a| snap.claims.get(&format!("{fleet}/{a}")).cloned())
            .collect();
        if holders.is_empty() {
            return Err(FleetError::Cluster {
                reason: format!("no agent of fleet {fleet} runs on any node now"),
            });
        }
        let wait = patience(&cmd);
        let forward = Forward::Command {
            command: cmd.clone(),
        };
        let parts = self
            .everywhere(&holders, forward, wait, || async {
                self.stamped(local.execute_local(cmd.clone()).await)
            })
            .await?;
        let verb = match cmd {
            Command::FleetBackup { .. } => "backed up",
            _ => "restarted",
        };
        Ok(combine(&format!("fleet {fleet} {verb}"), parts))
    }

    /// Asks every node in `nodes` at once (this one by `here`), answers in node order.
    async fn everywhere<F, Fut>(
        &self,
        nodes: &BTreeSet<String>,
        forward: Forward,
        wait: Duration,
        here: F,
    ) -> Result<Vec<(String, Reply)>, FleetError>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Reply>,
    {
        let me = self.cfg.node_name.clone();
        let mut asked = tokio::task::JoinSet::new();
        for n in nodes.iter().filter(|n| **n != me) {
            let (etcd, req, n) = (self.etcd.clone(), self.request(forward.clone())?, n.clone());
            asked.spawn(async move {
                let r = mailbox::ask(etcd, n.clone(), req, Vec::new(), wait).await;
                (n, r.unwrap_or_else(Reply::Error))
            });
        }
        let mut parts = Vec::new();
        if nodes.contains(&me) {
            parts.push((me, here().await));
        }
        while let Some(r) = asked.join_next().await {
            if let Ok(p) = r {
                parts.push(p);
            }
        }
        parts.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(parts)
    }

    /// After `agent rm --purge` / `fleet rm --purge` took it out of the desired state: every
    /// live node deletes what it keeps of it (the HOME where it ran, copies left by moves).
    /// A node not in the cluster now keeps its copy; the answer says which nodes purged.
    pub(super) async fn purge_everywhere(
        &self,
        local: &NodeHandle,
        fleet: &str,
        agent: Option<&str>,
    ) -> Reply {
        let what = match agent {
            Some(a) => format!("agent {fleet}/{a}"),
            None => format!("fleet {fleet}"),
        };
        let removed = format!("{what} removed (cluster-wide)");
        let nodes: BTreeSet<String> = match self.etcd.snapshot(false).await {
            Ok(s) => s.nodes.keys().cloned().collect(),
            Err(e) => {
                return Reply::Error(FleetError::Partial {
                    done: removed,
                    failed: format!("nothing was purged: {e}"),
                })
            }
        };
        let forward = Forward::Purge {
            fleet: fleet.into(),
            agent: agent.map(str::to_string),
        };
        let parts = self
            .everywhere(&nodes, forward, PURGE_PATIENCE, || async {
                err(self.purge_here(local, fleet, agent).await)
            })
            .await;
        match parts {
            Ok(parts) => combine(&format!("{removed}; purged on every live node"), parts),
            Err(e) => Reply::Error(FleetError::Partial {
                done: removed,
                failed: format!("nothing was purged: {e}"),
            }),
        }
    }

    /// This node's part of a purge: once the agent is out of the desired state and its
    /// processes here are gone, its HOME, logs and lock files here go.
    async fn purge_here(
        &self,
        local: &NodeHandle,
        fleet: &str,
        agent: Option<&str>,
    ) -> Result<Reply, FleetError> {
        let sd = local.state_dir().to_path_buf();
        let deadline = Instant::now() + PURGE_PATIENCE - Duration::from_secs(5);
        let names = loop {
            let snap = self.etcd.snapshot(false).await?;
            let wanted = match agent {
                Some(a) => snap
                    .fleets
                    .get(fleet)
                    .is_some_and(|(d, _)| d.spec.agents.iter().any(|x| x == a)),
                None => snap.fleets.contains_key(fleet),
            };
            if wanted {
                return Err(FleetError::Cluster {
                    reason: format!(
                        "{fleet}{} is in the desired state again; nothing was purged",
                        agent.map(|a| format!("/{a}")).unwrap_or_default()
                    ),
                });
            }
            let names = kept_here(&sd, fleet, agent);
            if names
                .iter()
                .all(|a| local.local_agent_gone(&format!("{fleet}/{a}")))
            {
                break names;
            }
            if Instant::now() > deadline {
                return Err(FleetError::Timeout {
                    what: format!("the processes of {fleet} on this node to end"),
                });
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        };
        if names.is_empty() {
            return Ok(done("nothing of it here".into()));
        }
        let (f, whole_fleet) = (fleet.to_string(), agent.is_none());
        let n = names.len();
        tokio::task::spawn_blocking(move || {
            for a in &names {
                crate::provision::purge_home(&sd, &AgentPaths::new(&sd, &f, a))?;
            }
            if whole_fleet {
                let _ = std::fs::remove_dir(sd.join("fleets").join(&f));
                let _ = std::fs::remove_dir(sd.join("logs").join(&f));
            }
            Ok::<(), FleetError>(())
        })
        .await
        .map_err(FleetError::internal)??;
        Ok(done(format!("{n} HOME(s) purged")))
    }

    /// `agent restore`: here, or on the node that runs the agent with the archive (a file
    /// on this host) carried through etcd.
    pub(super) async fn restore(
        &self,
        local: &NodeHandle,
        fleet: String,
        agent: String,
        from: PathBuf,
        force: bool,
    ) -> Result<Reply, FleetError> {
        let restored = match self.where_it_runs(&fleet, &agent).await? {
            None => {
                let (fleet, agent) = (fleet.clone(), agent.clone());
                local
                    .execute_local(Command::AgentRestore {
                        fleet,
                        agent,
                        from,
                        force,
                    })
                    .await
            }
            Some((node, _)) => self.restore_at(node, &fleet, &agent, from, force).await?,
        };
        self.rotated_after(local, &fleet, &agent, restored).await
    }

    /// After a restore: the HOME is the archive's now, and a token it held must not keep
    /// working. The node's own rotation re-derived the current epoch's token (what every
    /// node derives); the desired state's new epoch replaces it everywhere.
    async fn rotated_after(
        &self,
        local: &NodeHandle,
        fleet: &str,
        agent: &str,
        restored: Reply,
    ) -> Result<Reply, FleetError> {
        let Reply::Done { message } = restored else {
            return Ok(restored);
        };
        match self.rotate_token(local, fleet, agent).await {
            Ok(_) => Ok(done(message)),
            Err(e) => Err(FleetError::Partial {
                done: message,
                failed: format!("rotating its token in the desired state: {e}"),
            }),
        }
    }

    /// An upgrade's rollback: `cmd` (an `AgentRestore`) from an archive on node `on`'s disk
    /// (`None`: this node's), carried out there, which must be where the agent runs.
    pub async fn restore_from(
        &self,
        local: &NodeHandle,
        cmd: Command,
        on: Option<String>,
    ) -> Reply {
        let Command::AgentRestore { fleet, agent, .. } = &cmd else {
            return refuse("restore_from without a restore");
        };
        let (fleet, agent) = (fleet.clone(), agent.clone());
        let me = self.cfg.node_name.clone();
        let holder = match self.where_it_runs(&fleet, &agent).await {
            Ok(h) => h.map_or_else(|| me.clone(), |(n, _)| n),
            Err(e) => return Reply::Error(e),
        };
        let on = on.unwrap_or_else(|| me.clone());
        if holder != on {
            return Reply::Error(FleetError::Cluster {
                reason: format!(
                    "{fleet}/{agent}'s backup is on node {on}'s disk, but it runs on node {holder} now; nothing was restored"
                ),
            });
        }
        let restored = if holder == me {
            local.execute_local(cmd).await
        } else {
            let forward = Forward::Command { command: cmd };
            self.ask(holder, forward, Vec::new(), RESTORE_PATIENCE)
                .await
        };
        err(self.rotated_after(local, &fleet, &agent, restored).await)
    }

    async fn restore_at(
        &self,
        node: String,
        fleet: &str,
        agent: &str,
        from: PathBuf,
        force: bool,
    ) -> Result<Reply, FleetError> {
        if !from.is_absolute() {
            return Err(FleetError::invalid(
                "--from",
                format!("{} is not an absolute path", from.display()),
            ));
        }
        let path = from.clone();
        let blob = tokio::task::spawn_blocking(move || {
            crate::operator_file::read_bounded(&path, mailbox::MAX_ATTACHED_BYTES)
        })
        .await
        .map_err(FleetError::internal)?
        .map_err(|e| {
            FleetError::invalid(
                "--from",
                format!(
                    "{} {e} (an archive for an agent on another node travels through etcd, at most {} MiB; restore a bigger one at node {node})",
                    from.display(),
                    mailbox::MAX_ATTACHED_BYTES >> 20
                ),
            )
        })?;
        let forward = Forward::Restore {
            fleet: fleet.into(),
            agent: agent.into(),
            force,
            chunks: blob.len().div_ceil(mailbox::CHUNK_BYTES) as u32,
            bytes: blob.len() as u64,
        };
        Ok(self.ask(node, forward, blob, RESTORE_PATIENCE).await)
    }

    #[allow(clippy::too_many_arguments)]
    async fn restore_here(
        &self,
        local: &NodeHandle,
        id: &str,
        fleet: String,
        agent: String,
        force: bool,
        chunks: u32,
        bytes: u64,
    ) -> Result<Reply, FleetError> {
        if let Some((n, _)) = self.where_it_runs(&fleet, &agent).await? {
            return Err(FleetError::Cluster {
                reason: format!(
                    "{fleet}/{agent} moved to node {n} meanwhile; nothing was restored"
                ),
            });
        }
        let data = mailbox::attached(&self.etcd, id, chunks, bytes).await?;
        let dir = local.state_dir().join("incoming");
        let path = dir.join(format!("{id}.archive"));
        let p = path.clone();
        tokio::task::spawn_blocking(move || write_private(&dir, &p, &data))
            .await
            .map_err(FleetError::internal)?
            .map_err(|e| FleetError::Store {
                reason: format!("writing the received archive {}: {e}", path.display()),
            })?;
        let reply = local
            .execute_local(Command::AgentRestore {
                fleet,
                agent,
                from: path.clone(),
                force,
            })
            .await;
        let _ = std::fs::remove_file(&path);
        Ok(reply)
    }
}

/// The agents of `fleet` (or just `agent`) this host keeps a HOME or logs of.
fn kept_here(state_dir: &Path, fleet: &str, agent: Option<&str>) -> Vec<String> {
    let present = |a: &str| {
        let p = AgentPaths::new(state_dir, fleet, a);
        p.home.symlink_metadata().is_ok() || p.daemon_log_dir.symlink_metadata().is_ok()
    };
    match agent {
        Some(a) => [a.to_string()].into_iter().filter(|a| present(a)).collect(),
        None => {
            let mut names = BTreeSet::new();
            for dir in [state_dir.join("fleets"), state_dir.join("logs")] {
                if let Ok(rd) = std::fs::read_dir(dir.join(fleet)) {
                    for e in rd.flatten() {
                        let n = e.file_name().to_string_lossy().to_string();
                        if crate::ids::validate_id("agent", &n).is_ok() {
                            names.insert(n);
                        }
                    }
                }
            }
            names.into_iter().collect()
        }
    }
}

fn write_private(dir: &Path, path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(data)?;
    f.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backup(agent: &str, node: &str) -> crate::backup::BackupDone {
        crate::backup::BackupDone {
            fleet: "f".into(),
            agent: agent.into(),
            path: PathBuf::from(format!("/b/{agent}")),
            bytes: 1,
            files: 1,
            archive_bytes: 1,
            elapsed_ms: 1,
            node: Some(node.into()),
        }
    }

    #[test]
    fn many_nodes_answers_combine_into_one() {
        let ok = |m: &str| Reply::Done { message: m.into() };
        let bad = || Reply::Error(FleetError::NoSuchFleet { fleet: "f".into() });
        let n = |s: &str| s.to_string();
        type Parts = Vec<(String, Reply)>;
        let cases: Vec<(&str, Parts, &str)> = vec![
            (
                "all done",
                vec![(n("a"), ok("x")), (n("b"), ok("y"))],
                "done: w: a: x; b: y",
            ),
            (
                "one failed",
                vec![(n("a"), ok("x")), (n("b"), bad())],
                "partial",
            ),
            (
                "all failed",
                vec![(n("a"), bad()), (n("b"), bad())],
                "error",
            ),
            (
                "backups",
                vec![
                    (n("a"), Reply::Backups(vec![backup("1", "a")])),
                    (n("b"), Reply::Backups(vec![backup("2", "b")])),
                ],
                "backups: 2",
            ),
        ];
        for (what, parts, want) in cases {
            let got = match combine("w", parts) {
                Reply::Done { message } => format!("done: {message}"),
                Reply::Error(FleetError::Partial { done, failed }) => {
                    assert!(done.contains("a: x") && failed.contains("b:"), "{what}");
                    "partial".into()
                }
                Reply::Error(FleetError::Cluster { reason }) => {
                    assert!(reason.contains("a:") && reason.contains("b:"), "{what}");
                    "error".into()
                }
                Reply::Backups(rows) => format!("backups: {}", rows.len()),
                other => format!("{other:?}"),
            };
            assert_eq!(got, want, "{what}");
        }
    }

    #[test]
    fn only_an_agents_own_commands_go_to_the_node_that_runs_it() {
        let s = |x: &str| x.to_string();
        let cases = vec![
            (
                Command::Logs {
                    fleet: s("f"),
                    agent: s("a"),
                    lines: 5,
                    follow: false,
                },
                true,
            ),
            (
                Command::Logs {
                    fleet: s("f"),
                    agent: s("a"),
                    lines: 5,
                    follow: true,
                },
                false,
            ),
            (
                Command::Token {
                    fleet: s("f"),
                    agent: s("a"),
                    rotate: false,
                },
                true,
            ),
            (
                Command::Token {
                    fleet: s("f"),
                    agent: s("a"),
                    rotate: true,
                },
                false,
            ),
            (
                Command::AgentRestart {
                    fleet: s("f"),
                    agent: s("a"),
                },
                true,
            ),
            (
                Command::AgentStop {
                    fleet: s("f"),
                    agent: s("a"),
                },
                false,
            ),
            (
                Command::AgentRm {
                    fleet: s("f"),
                    agent: s("a"),
                    purge: true,
                },
                false,
            ),
            (Command::Shutdown, false),
        ];
        for (cmd, forwarded) in cases {
            assert_eq!(agent_command(&cmd).is_some(), forwarded, "{cmd:?}");
        }
    }

    #[test]
    fn what_a_node_keeps_of_a_fleet_is_found_by_its_dirs() {
        let t = std::env::temp_dir().join(format!("fc-kept-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&t);
        std::fs::create_dir_all(t.join("fleets/f/a1")).unwrap();
        std::fs::create_dir_all(t.join("logs/f/a2")).unwrap();
        std::fs::create_dir_all(t.join("fleets/f/..bad")).unwrap();
        std::fs::create_dir_all(t.join("fleets/g/b")).unwrap();
        assert_eq!(kept_here(&t, "f", None), vec!["a1", "a2"]);
        assert_eq!(kept_here(&t, "f", Some("a1")), vec!["a1"]);
        assert!(kept_here(&t, "f", Some("zz")).is_empty());
        assert!(kept_here(&t, "nope", None).is_empty());
        std::fs::remove_dir_all(&t).unwrap();
    }
}
