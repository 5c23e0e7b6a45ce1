//! Health-gated upgrades of a fleet's OpenClaw version, agent by agent. This module holds the
//! durable record of an upgrade (`<state>/upgrades/<fleet>.json`, written before every step
//! so a daemon that dies mid-way knows at its next start which agent was in flight) and the
//! decisions as plain functions; `driver` carries them out through the node's own commands.
//!
//! One agent's step: stop it, back up its HOME (OpenClaw migrates state one way), start it
//! on the new version, keep it only if it is running and ready (and no channel failed) within
//! the timeout; otherwise stop it, restore the backup, put it back on its old version, start
//! it, and stop the rollout.

pub mod driver;

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub const DEFAULT_CANARY: u32 = 1;
pub const DEFAULT_MAX_UNAVAILABLE: u32 = 1;
pub const DEFAULT_READY_TIMEOUT_S: u64 = 120;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Rollout {
    Running,
    /// Every agent runs the new version, and so does the fleet.
    Done,
    /// An agent did not come up ready: it is back on its old version and state; the rollout
    /// stopped there.
    Stopped,
    /// The daemon died mid-way; the agent in flight was put back at the next start.
    Interrupted,
    /// `fleet rollback` under way.
    RollingBack,
    /// `fleet rollback` done: every agent the upgrade moved is back.
    RolledBack,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    Pending,
    /// Already on the target version when the upgrade began.
    Skipped,
    BackingUp,
    Restarting,
    /// Running and ready on the new version.
    Kept,
    RollingBack,
    /// Back on its old version, with its backup.
    RolledBack,
    /// Its backup could not be restored: it is left stopped on the new version's state
    /// (never started on the old version over state the new one migrated); `fleet rollback`
    /// tries again.
    RollbackFailed,
}

impl Step {
    /// As in JSON and events.
    pub fn name(self) -> &'static str {
        match self {
            Step::Pending => "pending",
            Step::Skipped => "skipped",
            Step::BackingUp => "backing_up",
            Step::Restarting => "restarting",
            Step::Kept => "kept",
            Step::RollingBack => "rolling_back",
            Step::RolledBack => "rolled_back",
            Step::RollbackFailed => "rollback_failed",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentUpgrade {
    pub agent: String,
    /// Its own version before (`None`: its fleet's).
    pub own_version: Option<String>,
    /// The version it ran before (for display).
    pub from: Option<String>,
    pub step: Step,
    pub backup: Option<PathBuf>,
    /// Cluster mode: the node whose disk holds `backup`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup_node: Option<String>,
    /// Whether it was running before (an agent stopped by its operator stays stopped).
    pub was_running: bool,
    /// From its stop to ready on the new version.
    pub unavailable_ms: Option<u64>,
    pub reason: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UpgradeRecord {
    pub fleet: String,
    /// The version the fleet ran before (the default install's, named).
    pub from: Option<String>,
    /// The fleet's `openclaw_version` before (`None`: the default install), what a
    /// `fleet rollback` sets again.
    pub fleet_version: Option<String>,
    pub to: String,
    pub canary: u32,
    pub max_unavailable: u32,
    pub ready_timeout_s: u64,
    pub state: Rollout,
    pub reason: Option<String>,
    pub started_unix: u64,
    pub elapsed_ms: u64,
    pub agents: Vec<AgentUpgrade>,
    /// Cluster mode: the node that drives it (its lease holds the upgrade's lock).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

impl UpgradeRecord {
    pub fn agent_mut(&mut self, agent: &str) -> Option<&mut AgentUpgrade> {
        self.agents.iter_mut().find(|a| a.agent == agent)
    }
}

/// The settings of an upgrade's start.
#[derive(Debug, Clone)]
pub struct Plan {
    pub to: String,
    pub canary: Option<u32>,
    pub max_unavailable: Option<u32>,
    pub ready_timeout_s: Option<u64>,
}

/// A new upgrade's record for the fleet of `spec` (`default`: the version the default
/// install holds): every agent pending, but those already on `to`.
pub fn new_record(
    spec: &crate::spec::FleetSpec,
    plan: Plan,
    default: Option<String>,
) -> UpgradeRecord {
    let agents = spec
        .agents
        .iter()
        .map(|a| {
            let from = spec
                .openclaw_version_of(a)
                .map(str::to_string)
                .or_else(|| default.clone());
            AgentUpgrade {
                agent: a.clone(),
                own_version: spec.tenant(a).and_then(|t| t.openclaw_version.clone()),
                step: if from.as_deref() == Some(plan.to.as_str()) {
                    Step::Skipped
                } else {
                    Step::Pending
                },
                from,
                backup: None,
                backup_node: None,
                was_running: false,
                unavailable_ms: None,
                reason: None,
            }
        })
        .collect();
    UpgradeRecord {
        fleet: spec.name.clone(),
        from: spec.openclaw_version.clone().or(default),
        fleet_version: spec.openclaw_version.clone(),
        to: plan.to,
        canary: plan.canary.unwrap_or(DEFAULT_CANARY),
        max_unavailable: plan.max_unavailable.unwrap_or(DEFAULT_MAX_UNAVAILABLE),
        ready_timeout_s: plan.ready_timeout_s.unwrap_or(DEFAULT_READY_TIMEOUT_S),
        state: Rollout::Running,
        reason: None,
        started_unix: crate::state::now_ms() / 1000,
        elapsed_ms: 0,
        agents,
        node: None,
    }
}

/// The fleet's version set to `version` (`default`: what the default install holds): an
/// agent's own version equal to the new effective one is dropped, so it follows its fleet
/// again (and restarts for nothing).
pub fn set_fleet_version(
    spec: &mut crate::spec::FleetSpec,
    version: Option<String>,
    default: Option<String>,
) {
    let effective = version.clone().or(default);
    spec.openclaw_version = version;
    for t in spec.tenants.values_mut() {
        if t.openclaw_version.is_some() && t.openclaw_version == effective {
            t.openclaw_version = None;
        }
    }
    spec.tenants.retain(|_, t| !t.is_empty());
}

/// The agents in the order they are upgraded, in batches: `canary` of them first, one batch
/// each of at most `max_unavailable` (never more than the canary count), then the rest in
/// batches of `max_unavailable`. A failed batch stops everything after it.
pub fn batches(agents: &[String], canary: u32, max_unavailable: u32) -> Vec<Vec<String>> {
    let per = max_unavailable.max(1) as usize;
    let canary = (canary as usize).min(agents.len());
    let mut out = Vec::new();
    for c in agents[..canary].chunks(per.min(canary.max(1))) {
        out.push(c.to_vec());
    }
    for c in agents[canary..].chunks(per) {
        out.push(c.to_vec());
    }
    out
}

/// What an agent needs at the next start when the daemon died at `step` of an upgrade.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resume {
    /// Nothing was changed (or it was kept): leave it.
    Leave,
    /// Its HOME was untouched but it was stopped for the backup: start it again if it ran.
    StartOld,
    /// The new version may have migrated its state: restore the backup, old version, start.
    RollBack,
}

pub fn resume(step: Step) -> Resume {
    match step {
        Step::Pending | Step::Skipped | Step::Kept | Step::RolledBack | Step::RollbackFailed => {
            Resume::Leave
        }
        Step::BackingUp => Resume::StartOld,
        Step::Restarting | Step::RollingBack => Resume::RollBack,
    }
}

/// Whether a status row says the agent is up on its new version: running, ready, and no
/// channel broken: failed, or held off by OpenClaw's crash-loop breaker (both leave the
/// gateway's probes at 200).
pub fn ready(row: &crate::messages::command::AgentStatus) -> bool {
    use crate::channels::ChannelState;
    row.state == crate::state::AgentState::Running
        && row.ready
        && !row
            .channels
            .values()
            .any(|c| matches!(c.state, ChannelState::Failed | ChannelState::Off))
}

/// Whether the row says the start already failed (no point waiting out the timeout).
pub fn failed(row: &crate::messages::command::AgentStatus, restarts_before: u32) -> Option<String> {
    use crate::state::AgentState;
    if matches!(row.state, AgentState::Failed | AgentState::Backoff)
        || row.restarts > restarts_before
    {
        return Some(
            row.reason
                .clone()
                .unwrap_or_else(|| format!("it is {:?} after its start", row.state).to_lowercase()),
        );
    }
    None
}

pub fn record_path(state_dir: &Path, fleet: &str) -> PathBuf {
    state_dir.join("upgrades").join(format!("{fleet}.json"))
}

/// Where an upgrade keeps its agents' backups.
pub fn backup_dir(state_dir: &Path, fleet: &str) -> PathBuf {
    state_dir.join("upgrades").join(fleet)
}

pub fn load(state_dir: &Path, fleet: &str) -> Option<UpgradeRecord> {
    let b = crate::operator_file::read_bounded(&record_path(state_dir, fleet), 16 << 20).ok()?;
    serde_json::from_slice(&b).ok()
}

/// Every fleet's record, for the resume at start.
pub fn load_all(state_dir: &Path) -> Vec<UpgradeRecord> {
    let dir = state_dir.join("upgrades");
    std::fs::read_dir(&dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            load(state_dir, n.strip_suffix(".json")?)
        })
        .collect()
}

/// Writes the record atomically (temporary file, fsync, rename), 0600.
pub fn save(state_dir: &Path, rec: &UpgradeRecord) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let dir = state_dir.join("upgrades");
    crate::backup::make_private_dir(&dir)?;
    let path = record_path(state_dir, &rec.fleet);
    let tmp = dir.join(format!(".{}.json.tmp", rec.fleet));
    let json = serde_json::to_vec_pretty(rec).map_err(|e| e.to_string())?;
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)
        .map_err(|e| format!("writing {}: {e}", tmp.display()))?;
    f.write_all(&json)
        .and_then(|()| f.sync_all())
        .map_err(|e| format!("writing {}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, &path).map_err(|e| format!("writing {}: {e}", path.display()))?;
    if let Ok(d) = std::fs::File::open(&dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize) -> Vec<String> {
        (1..=n).map(|i| format!("a{i}")).collect()
    }

    #[test]
    fn batch_plans() {
        let b = |n, c, m| {
            batches(&names(n), c, m)
                .iter()
                .map(|x| x.len())
                .collect::<Vec<_>>()
        };
        assert_eq!(b(5, 1, 1), vec![1, 1, 1, 1, 1]);
        assert_eq!(b(5, 1, 2), vec![1, 2, 2]);
        assert_eq!(b(5, 2, 3), vec![2, 3]);
        assert_eq!(b(5, 3, 1), vec![1, 1, 1, 1, 1]);
        assert_eq!(b(3, 0, 3), vec![3]);
        assert_eq!(b(2, 5, 1), vec![1, 1]);
        assert_eq!(b(0, 1, 1), Vec::<usize>::new());
        // Order is the fleet's order.
        assert_eq!(
            batches(&names(3), 1, 2)[1],
            vec!["a2".to_string(), "a3".to_string()]
        );
    }

    fn row(
        state: &str,
        ready: bool,
        restarts: u32,
        channel: Option<&str>,
    ) -> crate::messages::command::AgentStatus {
        let channels = match channel {
            Some(c) => serde_json::json!({"telegram": {"state": c, "error": null}}),
            None => serde_json::json!({}),
        };
        serde_json::from_value(serde_json::json!({
            "fleet": "f", "agent": "a", "state": state, "pid": 1, "port": 20000, "home": "/h",
            "restarts": restarts, "healthy": true, "ready": ready, "uptime_s": 1,
            "rss_bytes": null, "last_exit": null, "reason": null, "drift": null,
            "channels": channels, "isolation": null,
        }))
        .unwrap()
    }

    #[test]
    fn readiness_of_an_upgraded_agent() {
        for (state, rd, restarts, ch, want_ready, want_failed) in [
            ("running", true, 0, None, true, false),
            ("running", true, 0, Some("ready"), true, false),
            ("running", false, 0, None, false, false),
            ("starting", false, 0, None, false, false),
            ("running", true, 0, Some("starting"), true, false),
            ("running", true, 0, Some("failed"), false, false),
            ("running", true, 0, Some("off"), false, false),
            ("backoff", false, 1, None, false, true),
            ("failed", false, 5, None, false, true),
            ("starting", false, 1, None, false, true),
        ] {
            let r = row(state, rd, restarts, ch);
            assert_eq!(ready(&r), want_ready, "{state} {rd} {ch:?}");
            assert_eq!(failed(&r, 0).is_some(), want_failed, "{state} {restarts}");
        }
    }

    #[test]
    fn resume_decisions() {
        for (step, want) in [
            (Step::Pending, Resume::Leave),
            (Step::Skipped, Resume::Leave),
            (Step::BackingUp, Resume::StartOld),
            (Step::Restarting, Resume::RollBack),
            (Step::Kept, Resume::Leave),
            (Step::RollingBack, Resume::RollBack),
            (Step::RolledBack, Resume::Leave),
            (Step::RollbackFailed, Resume::Leave),
        ] {
            assert_eq!(resume(step), want, "{step:?}");
        }
    }
}
