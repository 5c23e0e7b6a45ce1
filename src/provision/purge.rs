//! Deleting an agent's HOME (only inside the state dir) and the lock files OpenClaw leaves
//! for it in /tmp.

use super::*;
use crate::error::FleetError;
use std::ffi::OsString;
use std::fs;
use std::path::{Component, Path, PathBuf};

/// Deletes an agent's HOME, the daemon's logs of it and the lock files OpenClaw keeps for it
/// under `/tmp/openclaw-state-locks-<uid>/` (never deleted by OpenClaw itself; the uid is the
/// HOME's owner, the agent's own under `isolation = "uid"`). The agent must be stopped first.
/// Refuses anything that does not resolve to a path inside `<state_dir>/fleets/`.
pub fn purge_home(state_dir: &Path, paths: &AgentPaths) -> Result<(), FleetError> {
    let uid = crate::isolation::tenant_fs::home_owner(&paths.home)
        .map_or_else(|| nix::unistd::getuid().as_raw(), |o| o.uid);
    let lock_dir = PathBuf::from(format!("/tmp/openclaw-state-locks-{uid}"));
    purge_home_with_lock_dir(state_dir, paths, &lock_dir)?;
    match fs::remove_dir_all(&paths.daemon_log_dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(paths.err(format!("removing {}: {e}", paths.daemon_log_dir.display()))),
    }
}

pub(super) fn purge_home_with_lock_dir(
    state_dir: &Path,
    paths: &AgentPaths,
    lock_dir: &Path,
) -> Result<(), FleetError> {
    let home = check_purge(state_dir, paths)?;
    // The lock names hash the state database's resolved path: compute it before it is gone.
    let db = resolve_via_existing_ancestor(&home.join(".openclaw/state/openclaw.sqlite"))
        .map_err(|e| paths.err(format!("resolving the state database path: {e}")))?;
    let hash = state_lock_hash(&db);

    match fs::remove_dir_all(&home) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(paths.err(format!("removing {}: {e}", home.display()))),
    }
    // A symlinked HOME that pointed inside: the link itself goes too.
    if fs::symlink_metadata(&paths.home).is_ok_and(|m| m.file_type().is_symlink()) {
        fs::remove_file(&paths.home)
            .map_err(|e| paths.err(format!("removing link {}: {e}", paths.home.display())))?;
    }
    for name in state_lock_files(lock_dir, &hash)
        .map_err(|e| paths.err(format!("listing {}: {e}", lock_dir.display())))?
    {
        let f = lock_dir.join(&name);
        match fs::remove_file(&f) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(paths.err(format!("removing {}: {e}", f.display()))),
        }
    }
    Ok(())
}

/// Whether `purge_home` would go ahead, checked before anything of the agent is removed (so
/// a refused purge changes nothing): the HOME, resolved, must lie inside `<state>/fleets`.
/// Returns the resolved HOME.
pub fn check_purge(state_dir: &Path, paths: &AgentPaths) -> Result<PathBuf, FleetError> {
    let refuse =
        |why: &str| paths.err(format!("refusing to purge {}: {why}", paths.home.display()));
    if paths.home.components().any(|c| c == Component::ParentDir) {
        return Err(refuse("the path contains '..'"));
    }
    let fleets = resolve_via_existing_ancestor(&state_dir.join("fleets"))
        .map_err(|e| paths.err(format!("resolving {}: {e}", state_dir.display())))?;
    let home = resolve_via_existing_ancestor(&paths.home)
        .map_err(|e| paths.err(format!("resolving {}: {e}", paths.home.display())))?;
    if home == fleets || !home.starts_with(&fleets) {
        return Err(refuse(&format!(
            "it resolves to {}, which is not inside {}",
            home.display(),
            fleets.display()
        )));
    }
    Ok(home)
}

/// Node's `path.resolve(realpath)` with OpenClaw's fallback for paths that do not exist yet:
/// the deepest existing ancestor is resolved and the rest appended.
pub(super) fn resolve_via_existing_ancestor(p: &Path) -> std::io::Result<PathBuf> {
    let abs = if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir()?.join(p)
    };
    let mut rest = Vec::new();
    let mut cur = abs.as_path();
    loop {
        match fs::canonicalize(cur) {
            Ok(real) => {
                let mut out = real;
                out.extend(rest.iter().rev());
                return Ok(out);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let name = cur.file_name().ok_or(e)?;
                rest.push(name.to_os_string());
                cur = cur.parent().expect("a path with a file name has a parent");
            }
            Err(e) => return Err(e),
        }
    }
}

/// The 8 hex characters OpenClaw 2026.9.6 puts in `<family>.<hash>.lock.sqlite`: the start
/// of sha256 of the resolved path of `<HOME>/.openclaw/state/openclaw.sqlite`
/// (`resolveLifecycleCoordinatorBase` in the package; see docs/openclaw-facts.md).
pub(super) fn state_lock_hash(db_path: &Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    hex(&sha256(db_path.as_os_str().as_bytes())[..4])
}

/// Names in `lock_dir` of the form `<family>.<hash>.lock.sqlite`. Any family is taken (the
/// measured ones are gateway-lifecycle, state-handles and state-lifecycle), so a new family
/// in a later version is purged too.
pub(super) fn state_lock_files(lock_dir: &Path, hash: &str) -> std::io::Result<Vec<OsString>> {
    let entries = match fs::read_dir(lock_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for entry in entries {
        let name = entry?.file_name();
        let Some(s) = name.to_str() else { continue };
        let Some(stem) = s.strip_suffix(".lock.sqlite") else {
            continue;
        };
        if let Some((family, h)) = stem.rsplit_once('.') {
            let family_ok =
                !family.is_empty() && family.bytes().all(|c| c.is_ascii_lowercase() || c == b'-');
            if family_ok && h == hash {
                out.push(name);
            }
        }
    }
    Ok(out)
}

/// SHA-256 of `data` (OpenClaw names its lock files after it).
pub(super) fn sha256(data: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(data).into()
}
