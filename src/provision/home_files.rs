//! Writing fleetd's files into an agent's HOME (its secrets' files, the files its settings
//! copy in). The HOME belongs to the agent, which may have replaced any directory on the way
//! with a symlink to another tenant's HOME or to `/etc`: every component is opened relative
//! to the one before without following links, and the file is created beside its final name
//! and renamed over it, so whatever was there (a link, a FIFO) is replaced, never written
//! through.

use nix::fcntl::{openat, renameat, OFlag};
use nix::sys::stat::{mkdirat, Mode};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Component, Path};

fn open_dir_at(dir: Option<&OwnedFd>, name: &Path) -> nix::Result<OwnedFd> {
    let fd = openat(
        dir.map(|d| d.as_raw_fd()),
        name,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    // SAFETY: openat returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The directory `rel` inside `home` (created 0700 where missing), opened without following
/// a link at any step.
fn open_inside(home: &Path, rel: &Path) -> Result<OwnedFd, String> {
    let mut dir = open_dir_at(None, home).map_err(|e| format!("{}: {e}", home.display()))?;
    for c in rel.components() {
        let Component::Normal(name) = c else {
            return Err(format!("{} leaves the HOME", rel.display()));
        };
        match mkdirat(Some(dir.as_raw_fd()), name, Mode::from_bits_truncate(0o700)) {
            Ok(()) | Err(nix::errno::Errno::EEXIST) => {}
            Err(e) => return Err(format!("creating {}: {e}", rel.display())),
        }
        dir = open_dir_at(Some(&dir), Path::new(name)).map_err(|e| match e {
            nix::errno::Errno::ELOOP | nix::errno::Errno::ENOTDIR => format!(
                "{} is not a directory inside the HOME (a link or a file is in the way)",
                rel.display()
            ),
            e => format!("{}: {e}", rel.display()),
        })?;
    }
    Ok(dir)
}

/// Writes `bytes` to `home/rel` with mode 0600, replacing whatever is at that name.
pub fn write_in_home(home: &Path, rel: &str, bytes: &[u8]) -> Result<(), String> {
    use std::io::Write;
    let rel = Path::new(rel);
    let (Some(name), parent) = (rel.file_name(), rel.parent().unwrap_or(Path::new(""))) else {
        return Err(format!("{} names no file", rel.display()));
    };
    let dir = open_inside(home, parent)?;
    let mut suffix = [0u8; 6];
    getrandom::getrandom(&mut suffix).map_err(|e| format!("random temp name: {e}"))?;
    let tmp = format!(".fleetd-tmp-{}", super::hex(&suffix));
    let fd = openat(
        Some(dir.as_raw_fd()),
        tmp.as_str(),
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::from_bits_truncate(0o600),
    )
    .map_err(|e| format!("creating {}: {e}", rel.display()))?;
    // SAFETY: a new descriptor nothing else owns.
    let mut f = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    let written = f
        .write_all(bytes)
        .map_err(|e| format!("writing {}: {e}", rel.display()))
        .and_then(|()| {
            renameat(
                Some(dir.as_raw_fd()),
                tmp.as_str(),
                Some(dir.as_raw_fd()),
                name,
            )
            .map_err(|e| format!("renaming into {}: {e}", rel.display()))
        });
    if written.is_err() {
        let _ = nix::unistd::unlinkat(
            Some(dir.as_raw_fd()),
            tmp.as_str(),
            nix::unistd::UnlinkatFlags::NoRemoveDir,
        );
    }
    written
}

/// Removes every entry of `home/rel` (a directory fleetd owns, such as the secrets' files)
/// whose name is not in `keep`. Missing: nothing to do.
pub fn prune_in_home(home: &Path, rel: &str, keep: &[&str]) -> Result<(), String> {
    let dir = open_inside(home, Path::new(rel))?;
    let path = Path::new("/proc/self/fd").join(dir.as_raw_fd().to_string());
    let entries = std::fs::read_dir(&path).map_err(|e| format!("listing {rel}: {e}"))?;
    for e in entries.flatten() {
        let name = e.file_name();
        if keep.iter().any(|k| name == std::ffi::OsStr::new(k)) {
            continue;
        }
        let flag = if e.file_type().is_ok_and(|t| t.is_dir()) {
            nix::unistd::UnlinkatFlags::RemoveDir
        } else {
            nix::unistd::UnlinkatFlags::NoRemoveDir
        };
        let _ = nix::unistd::unlinkat(Some(dir.as_raw_fd()), name.as_os_str(), flag);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{symlink, PermissionsExt};

    #[test]
    fn writes_0600_files_and_never_through_a_link() {
        let t = tempfile::tempdir().unwrap();
        let home = t.path().join("home");
        let outside = t.path().join("outside");
        std::fs::create_dir_all(&home).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        write_in_home(&home, "a/b/SOUL.md", b"persona").unwrap();
        let f = home.join("a/b/SOUL.md");
        assert_eq!(std::fs::read(&f).unwrap(), b"persona");
        assert_eq!(
            std::fs::metadata(&f).unwrap().permissions().mode() & 0o777,
            0o600
        );
        // A directory on the way replaced by a link to elsewhere: refused, nothing written.
        symlink(&outside, home.join("evil")).unwrap();
        let e = write_in_home(&home, "evil/x", b"data").unwrap_err();
        assert!(e.contains("not a directory inside the HOME"), "{e}");
        assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);
        // The final name a link to a file elsewhere: the link is replaced, the target kept.
        let target = outside.join("target");
        std::fs::write(&target, b"keep").unwrap();
        symlink(&target, home.join("a/link")).unwrap();
        write_in_home(&home, "a/link", b"new").unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"keep");
        assert_eq!(std::fs::read(home.join("a/link")).unwrap(), b"new");
        assert!(!std::fs::symlink_metadata(home.join("a/link"))
            .unwrap()
            .file_type()
            .is_symlink());
        // Pruning keeps what is named.
        prune_in_home(&home, "a", &["b"]).unwrap();
        let left: Vec<_> = std::fs::read_dir(home.join("a"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, vec![std::ffi::OsString::from("b")]);
    }
}
