//! An agent's paths inside the state dir and its HOME layout, and its gateway token.

use crate::error::FleetError;
use crate::isolation::tenant_fs::{as_tenant, Identity};
use std::fs;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Where one agent's files live. Built only from validated ids (they become directory names).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentPaths {
    /// `<state_dir>/fleets/<fleet>/<agent>`: the agent's HOME.
    pub home: PathBuf,
    /// `home/.openclaw`
    pub openclaw_dir: PathBuf,
    /// `home/.openclaw/openclaw.json`
    pub config: PathBuf,
    /// `home/logs`: OpenClaw's own log files (the agent writes them).
    pub log_dir: PathBuf,
    /// `<state_dir>/logs/<fleet>/<agent>`: what the daemon writes about the agent, outside
    /// its HOME so the agent (a tenant's shell, maybe hostile) can neither read nor erase it.
    pub daemon_log_dir: PathBuf,
    /// `daemon_log_dir/agent.log`: what the agent prints, written by the daemon.
    pub agent_log: PathBuf,
    /// `home/logs/openclaw.log`: OpenClaw's own log file (`logging.file`).
    pub openclaw_log: PathBuf,
    /// `home/tmp`: the agent's TMPDIR.
    pub tmp: PathBuf,
}

impl AgentPaths {
    pub fn new(state_dir: &Path, fleet: &str, agent: &str) -> AgentPaths {
        let home = state_dir.join("fleets").join(fleet).join(agent);
        let openclaw_dir = home.join(".openclaw");
        let log_dir = home.join("logs");
        let daemon_log_dir = state_dir.join("logs").join(fleet).join(agent);
        let mut p = AgentPaths {
            config: openclaw_dir.join("openclaw.json"),
            agent_log: daemon_log_dir.join("agent.log"),
            daemon_log_dir,
            openclaw_log: log_dir.join("openclaw.log"),
            tmp: home.join("tmp"),
            openclaw_dir,
            log_dir,
            home,
        };
        // Every agent's actor and the log rotator keep one for its whole life: each `join`
        // leaves up to twice the bytes a path needs (heaptrack: 1.1 KiB per agent).
        for path in [
            &mut p.home,
            &mut p.openclaw_dir,
            &mut p.config,
            &mut p.log_dir,
            &mut p.daemon_log_dir,
            &mut p.agent_log,
            &mut p.openclaw_log,
            &mut p.tmp,
        ] {
            path.shrink_to_fit();
        }
        p
    }

    /// (fleet, agent) as read back from the HOME path, for error messages.
    pub(super) fn owner(&self) -> (String, String) {
        let name = |p: Option<&Path>| {
            p.and_then(Path::file_name)
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "?".into())
        };
        (name(self.home.parent()), name(Some(&self.home)))
    }

    pub(super) fn err(&self, reason: impl Into<String>) -> FleetError {
        let (fleet, agent) = self.owner();
        FleetError::Provision {
            fleet,
            agent,
            reason: reason.into(),
        }
    }
}

/// Creates the HOME and its sub-directories; safe to call on every start. Modes are set
/// explicitly because the daemon's umask is not ours to trust.
///
/// With an `owner` (the agent's own uid): the fleet directory becomes searchable by others
/// (never listable), the HOME is the owner's (a HOME made before, by root or by an earlier
/// uid, is handed over whole), and everything inside it is made with the owner's file rights
/// (`tenant_fs`): the tenant may have replaced any of it with a link.
pub fn ensure_home(paths: &AgentPaths, owner: Option<Identity>) -> Result<(), FleetError> {
    // The daemon's own log directory for the agent: root's (the daemon's), owner-only.
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&paths.daemon_log_dir)
        .map_err(|e| paths.err(format!("creating {}: {e}", paths.daemon_log_dir.display())))?;
    if let Some(parent) = paths.home.parent() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)
            .map_err(|e| paths.err(format!("creating {}: {e}", parent.display())))?;
        if owner.is_some() {
            crate::isolation::tenant_fs::make_searchable(parent)
                .map_err(|e| paths.err(format!("chmod o+x {}: {e}", parent.display())))?;
        }
    }
    let Some(id) = owner else {
        return make_home_dirs(paths, None);
    };
    match fs::DirBuilder::new().mode(0o700).create(&paths.home) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(paths.err(format!("creating {}: {e}", paths.home.display()))),
    }
    // The fleet directory is the daemon's: the HOME entry itself cannot have been swapped.
    let meta = fs::symlink_metadata(&paths.home)
        .map_err(|e| paths.err(format!("{}: {e}", paths.home.display())))?;
    if !meta.is_dir() {
        return Err(paths.err(format!(
            "{} exists and is not a directory",
            paths.home.display()
        )));
    }
    if meta.uid() != id.uid || meta.gid() != id.gid {
        hand_over(&paths.home, id).map_err(|e| {
            paths.err(format!(
                "giving {} to uid {}: {e}",
                paths.home.display(),
                id.uid
            ))
        })?;
    }
    make_home_dirs(paths, Some(id))
}

/// Every entry under `dir` (links themselves, never what they point at) to `id`. Only for a
/// HOME no process of its agent runs in (before a start).
fn hand_over(dir: &Path, id: Identity) -> std::io::Result<()> {
    std::os::unix::fs::lchown(dir, Some(id.uid), Some(id.gid))?;
    if !fs::symlink_metadata(dir)?.is_dir() {
        return Ok(());
    }
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        if entry.file_type()?.is_dir() {
            hand_over(&path, id)?;
        } else {
            std::os::unix::fs::lchown(&path, Some(id.uid), Some(id.gid))?;
        }
    }
    Ok(())
}

/// The HOME's sub-directories and modes, and the stale lock payloads cleared, with the
/// owner's file rights.
fn make_home_dirs(paths: &AgentPaths, owner: Option<Identity>) -> Result<(), FleetError> {
    as_tenant(owner, || make_home_dirs_here(paths, owner.map(|o| o.uid)))
        .map_err(|e| paths.err(format!("switching to the agent's uid: {e}")))?
}

fn make_home_dirs_here(paths: &AgentPaths, uid: Option<u32>) -> Result<(), FleetError> {
    for dir in [&paths.home, &paths.openclaw_dir, &paths.log_dir, &paths.tmp] {
        // Every restart passes here: a directory already right costs one stat.
        if fs::symlink_metadata(dir)
            .is_ok_and(|m| m.is_dir() && m.permissions().mode() & 0o777 == 0o700)
        {
            continue;
        }
        match fs::DirBuilder::new().mode(0o700).create(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(paths.err(format!("creating {}: {e}", dir.display()))),
        }
        let meta = fs::metadata(dir).map_err(|e| paths.err(format!("{}: {e}", dir.display())))?;
        if !meta.is_dir() {
            return Err(paths.err(format!("{} exists and is not a directory", dir.display())));
        }
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
            .map_err(|e| paths.err(format!("chmod 0700 {}: {e}", dir.display())))?;
    }
    // Called right before each spawn, when no incarnation of this agent is running.
    clear_gateway_lock_payloads(paths, uid)?;
    Ok(())
}

/// Deletes the gateway-lock payloads (`gateway.<h>.lock`, `gateway.state.lock`: JSON with the
/// owner's pid and start time) a previous incarnation left in
/// `<HOME>/.openclaw/tmp/openclaw-<uid>/`; returns how many. The commander is the only one to
/// start this agent and the previous gateway has exited, so any payload there is stale. It
/// must go because OpenClaw's staleness test reads `/proc/<pid>` with the pid as seen in the
/// gateway's PID namespace while `/proc` is the host's: after a daemon restart the recorded
/// namespace pid (2, 3, …) is alive again in the new namespace, `/proc/2` (the host's
/// kthreadd) matches the recorded start time, and the gateway exits 78 "Another gateway
/// (pid 2) already owns this state directory". The zero-byte `*.lock.sqlite` lifecycle locks
/// beside them are kernel locks, not pids, and stay. (A spec `env` setting
/// `OPENCLAW_STATE_DIR` moves the directory; it is not followed.)
pub fn clear_gateway_lock_payloads(
    paths: &AgentPaths,
    uid: Option<u32>,
) -> Result<usize, FleetError> {
    let uid = uid.unwrap_or_else(|| nix::unistd::getuid().as_raw());
    let dir = paths
        .openclaw_dir
        .join("tmp")
        .join(format!("openclaw-{uid}"));
    let entries = match fs::read_dir(&dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(paths.err(format!("listing {}: {e}", dir.display()))),
    };
    let mut removed = 0;
    for entry in entries {
        let entry = entry.map_err(|e| paths.err(format!("listing {}: {e}", dir.display())))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if !(name.starts_with("gateway.") && name.ends_with(".lock")) {
            continue;
        }
        match fs::remove_file(entry.path()) {
            Ok(()) => removed += 1,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(paths.err(format!(
                    "removing stale gateway lock {}: {e}",
                    entry.path().display()
                )))
            }
        }
    }
    Ok(removed)
}

/// 32 bytes from the OS RNG as 64 lowercase hex characters.
pub fn generate_token() -> Result<String, FleetError> {
    let mut buf = [0u8; 32];
    getrandom::getrandom(&mut buf)
        .map_err(|e| FleetError::internal(format!("OS random source failed: {e}")))?;
    Ok(hex(&buf))
}

/// A new agent's gateway token: derived from its fleet's seed in cluster mode, else random.
pub fn agent_token(spec: &crate::spec::FleetSpec, agent: &str) -> Result<String, FleetError> {
    match &spec.token_seed {
        Some(seed) => Ok(derived_token(
            seed,
            &spec.name,
            agent,
            spec.token_epoch(agent),
        )),
        None => generate_token(),
    }
}

/// An agent's gateway token derived from its fleet's seed: the same on every host, so a
/// moved agent keeps it, and no agent's token tells another's (HMAC-SHA256). `epoch`: how
/// many times it was rotated (0 derives what tokens were before rotation existed).
pub fn derived_token(seed: &crate::spec::Secret, fleet: &str, agent: &str, epoch: u32) -> String {
    use hmac::Mac as _;
    let mut m = hmac::Hmac::<sha2::Sha256>::new_from_slice(seed.expose().as_bytes())
        .expect("HMAC takes a key of any length");
    m.update(b"fleet-commander gateway token\0");
    m.update(fleet.as_bytes());
    m.update(b"\0");
    m.update(agent.as_bytes());
    if epoch > 0 {
        m.update(format!("\0{epoch}").as_bytes());
    }
    hex(&m.finalize().into_bytes())
}

pub(super) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}
