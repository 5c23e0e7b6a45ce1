//! Taking possession of a state directory before anything in it is read or touched: create it
//! owner-only if it is missing, refuse one that others could write to (never chmod an
//! operator's directory), and hold an exclusive lock on `fleetd.lock` for the node's whole
//! life, so two daemons can never run the same agents. The lock file names its holder's pid.

use crate::FleetError;
use std::fs::File;
use std::io::{Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// The lock's file name inside the state directory.
pub const LOCK_FILE: &str = "fleetd.lock";

/// What `check_mode` makes of an existing state directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModeVerdict {
    /// Owner-only, ours: what fleetd creates.
    Ok,
    /// Ours and not writable by others, but readable or searchable by them: used as it is.
    Loose(u32),
    /// Another user's, or writable by others: refused.
    Refuse(String),
}

/// The rule for an existing state directory (`mode` with its type bits, `owner` its uid).
pub fn check_mode(mode: u32, owner: u32, me: u32) -> ModeVerdict {
    let perm = mode & 0o7777;
    if owner != me {
        return ModeVerdict::Refuse(format!(
            "is owned by uid {owner}, not by this daemon's uid {me}"
        ));
    }
    if perm & 0o022 != 0 {
        return ModeVerdict::Refuse(format!(
            "has mode {perm:04o}: other users could plant files in it (fleetd creates it 0700)"
        ));
    }
    if perm & 0o077 != 0 {
        return ModeVerdict::Loose(perm);
    }
    ModeVerdict::Ok
}

/// The held lock; released when dropped (or when the process dies, whatever kills it).
#[derive(Debug)]
pub struct StateLock {
    _file: File,
    path: PathBuf,
}

impl StateLock {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Creates or checks `dir`, then takes its lock. Nothing else in `dir` is touched first.
pub fn take(dir: &Path) -> Result<StateLock, FleetError> {
    let err = |reason: String| FleetError::Store {
        reason: format!("state dir {}: {reason}", dir.display()),
    };
    match std::fs::symlink_metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::create_dir_all(parent)
                    .map_err(|e| err(format!("cannot create its parent: {e}")))?;
            }
            std::fs::DirBuilder::new()
                .mode(0o700)
                .create(dir)
                .or_else(|e| match e.kind() {
                    std::io::ErrorKind::AlreadyExists => Ok(()),
                    _ => Err(e),
                })
                .map_err(|e| err(format!("cannot create: {e}")))?;
        }
        Err(e) => return Err(err(format!("cannot inspect: {e}"))),
        Ok(_) => {}
    }
    // Follows a symlink on purpose: a state dir may be a link to another disk. What it
    // points at must still be a directory of ours.
    let meta = std::fs::metadata(dir).map_err(|e| err(format!("cannot inspect: {e}")))?;
    if !meta.is_dir() {
        return Err(err(format!(
            "{}, not a directory",
            crate::operator_file::kind_of(&meta.file_type())
        )));
    }
    match check_mode(meta.mode(), meta.uid(), nix::unistd::geteuid().as_raw()) {
        ModeVerdict::Ok => {}
        ModeVerdict::Loose(perm) => tracing::warn!(
            state_dir = %dir.display(),
            mode = format!("{perm:04o}"),
            "state dir is readable by other users; left as it is (fleetd creates it 0700)"
        ),
        ModeVerdict::Refuse(reason) => {
            return Err(err(format!(
                "{reason}; fix it or choose another --state-dir"
            )))
        }
    }
    let path = dir.join(LOCK_FILE);
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(&path)
        .map_err(|e| err(format!("cannot open its lock {}: {e}", path.display())))?;
    if !file.metadata().map(|m| m.is_file()).unwrap_or(false) {
        return Err(err(format!("{} is not a regular file", path.display())));
    }
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let os = std::io::Error::last_os_error();
        if os.raw_os_error() == Some(libc::EWOULDBLOCK) {
            let mut holder = String::new();
            let _ = Read::by_ref(&mut file).take(32).read_to_string(&mut holder);
            let holder = holder.trim();
            let who = if holder.is_empty() {
                "another process".to_string()
            } else {
                format!("fleetd pid {holder}")
            };
            return Err(err(format!(
                "is in use by {who} (it holds {}); one daemon per state dir",
                path.display()
            )));
        }
        return Err(err(format!("cannot lock {}: {os}", path.display())));
    }
    let _ = file.set_len(0);
    let _ = file.rewind();
    let _ = writeln!(file, "{}", std::process::id());
    Ok(StateLock { _file: file, path })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn mode_rules() {
        let me = 1000;
        let cases = [
            (0o40700, me, ModeVerdict::Ok),
            (0o40750, me, ModeVerdict::Loose(0o750)),
            (0o40755, me, ModeVerdict::Loose(0o755)),
            (0o41777, me, ModeVerdict::Refuse(String::new())),
            (0o40770, me, ModeVerdict::Refuse(String::new())),
            (0o40702, me, ModeVerdict::Refuse(String::new())),
            (0o40700, 0, ModeVerdict::Refuse(String::new())),
        ];
        for (mode, owner, want) in cases {
            let got = check_mode(mode, owner, me);
            match (&got, &want) {
                (ModeVerdict::Refuse(r), ModeVerdict::Refuse(_)) => assert!(!r.is_empty()),
                _ => assert_eq!(got, want, "mode {mode:o} owner {owner}"),
            }
        }
    }

    #[test]
    fn a_missing_dir_is_created_owner_only_and_locked_once() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("a/b/state");
        let lock = take(&dir).unwrap();
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        let held = std::fs::read_to_string(lock.path()).unwrap();
        assert_eq!(held.trim(), std::process::id().to_string());
        let e = take(&dir).unwrap_err().to_string();
        assert!(
            e.contains(&format!("fleetd pid {}", std::process::id())),
            "{e}"
        );
        drop(lock);
        take(&dir).expect("free again once dropped");
    }

    #[test]
    fn a_world_writable_dir_is_refused_and_left_alone() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("open");
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o1777)).unwrap();
        let e = take(&dir).unwrap_err().to_string();
        assert!(e.contains("1777"), "{e}");
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o1777, "the operator's mode was changed");
        assert!(!dir.join(LOCK_FILE).exists(), "something was written");
    }

    #[test]
    fn a_file_in_place_of_the_dir_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("file");
        std::fs::write(&f, b"keep").unwrap();
        let e = take(&f).unwrap_err().to_string();
        assert!(e.contains("not a directory"), "{e}");
        assert_eq!(std::fs::read(&f).unwrap(), b"keep");
    }
}
