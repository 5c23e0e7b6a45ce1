//! Daemon work inside an agent's HOME done with the tenant's own file credentials.
//!
//! Why: under `isolation = "uid"` the HOME belongs to the tenant, who may have replaced any
//! directory in it with a symlink to `/etc` or to a neighbour's HOME. A root daemon following
//! it would write, chmod or delete there with root's rights. Doing that work with the
//! thread's filesystem uid and gid set to the tenant's (`setfsuid`, per thread, and the
//! capabilities that bypass file permissions drop with it) makes the kernel refuse whatever
//! the tenant could not do itself, and files the daemon creates belong to the tenant.

use std::io;

/// The uid and gid an agent runs as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    pub uid: u32,
    pub gid: u32,
}

impl Identity {
    /// Each agent's gid is its uid (see `uids`).
    pub fn of_uid(uid: u32) -> Identity {
        Identity { uid, gid: uid }
    }
}

/// The owner of `home` when it is not the daemon: the tenant whose file rights every daemon
/// operation inside it takes. The HOME's own entry sits in a directory of the daemon's, so
/// the tenant cannot have swapped it; a HOME that is missing or not a directory gives None
/// (nothing in it is touched then, or it is made by `ensure_home`).
pub fn home_owner(home: &std::path::Path) -> Option<Identity> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::symlink_metadata(home).ok()?;
    let me = unsafe { libc::geteuid() };
    (m.is_dir() && m.uid() != me).then(|| Identity {
        uid: m.uid(),
        gid: m.gid(),
    })
}

/// Runs `f` with this thread's filesystem uid/gid set to `id` and no supplementary groups,
/// then puts the daemon's back (also when `f` panics). `None` runs `f` as it is. `f` must not
/// await or hand work to other threads: only this thread's credentials change.
pub fn as_tenant<T>(id: Option<Identity>, f: impl FnOnce() -> T) -> io::Result<T> {
    let Some(id) = id else { return Ok(f()) };
    let guard = Switched::to(id)?;
    let out = f();
    drop(guard);
    Ok(out)
}

/// The daemon's credentials while switched, restored on drop.
struct Switched {
    groups: Vec<libc::gid_t>,
}

impl Switched {
    fn to(id: Identity) -> io::Result<Switched> {
        let n = unsafe { libc::getgroups(0, std::ptr::null_mut()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut groups = vec![0 as libc::gid_t; n as usize];
        let n = unsafe { libc::getgroups(n, groups.as_mut_ptr()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        groups.truncate(n as usize);
        // Raw system calls: glibc's wrappers would change every thread of the daemon.
        let ok = unsafe {
            libc::syscall(libc::SYS_setgroups, 0usize, std::ptr::null::<libc::gid_t>()) == 0
        };
        if !ok {
            return Err(io::Error::last_os_error());
        }
        let back = Switched { groups };
        unsafe {
            libc::syscall(libc::SYS_setfsgid, id.gid);
            libc::syscall(libc::SYS_setfsuid, id.uid);
        }
        // setfsuid reports nothing; asking with an invalid id returns the current one.
        let (fsuid, fsgid) = unsafe {
            (
                libc::syscall(libc::SYS_setfsuid, u32::MAX) as u32,
                libc::syscall(libc::SYS_setfsgid, u32::MAX) as u32,
            )
        };
        if fsuid != id.uid || fsgid != id.gid {
            return Err(io::Error::other(format!(
                "cannot take uid {} / gid {} for file access (setfsuid gave {fsuid}/{fsgid})",
                id.uid, id.gid
            )));
        }
        Ok(back)
    }
}

impl Drop for Switched {
    fn drop(&mut self) {
        let euid = unsafe { libc::geteuid() };
        let egid = unsafe { libc::getegid() };
        unsafe {
            libc::syscall(libc::SYS_setfsuid, euid);
            libc::syscall(libc::SYS_setfsgid, egid);
            libc::syscall(libc::SYS_setgroups, self.groups.len(), self.groups.as_ptr());
        }
        let fsuid = unsafe { libc::syscall(libc::SYS_setfsuid, u32::MAX) as u32 };
        if fsuid != euid {
            // A daemon thread left with a tenant's file rights would write the registry as
            // the tenant: nothing safe can follow.
            eprintln!("fleetd: cannot restore the daemon's file credentials; aborting");
            std::process::abort();
        }
    }
}

/// Adds search (never read) permission for group and others to a directory of the
/// daemon's, so agent uids can walk through it to their HOMEs.
pub fn make_searchable(dir: &std::path::Path) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir)?.permissions().mode() & 0o7777;
    if mode & 0o011 != 0o011 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode | 0o011))?;
    }
    Ok(())
}

/// Whether `id` can walk down to `path` (its HOME, the program it runs): every directory
/// above it must be searchable for it. An error names the first one that is not, and what
/// to do.
pub fn check_reachable(path: &std::path::Path, id: Identity, what: &str) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let mut dirs: Vec<&std::path::Path> = path.ancestors().skip(1).collect();
    dirs.reverse();
    for dir in dirs {
        let Ok(m) = std::fs::metadata(dir) else {
            continue;
        };
        let bit = if m.uid() == id.uid {
            0o100
        } else if m.gid() == id.gid {
            0o010
        } else {
            0o001
        };
        if m.mode() & bit == 0 {
            return Err(format!(
                "{} (mode {:04o}, uid {}) is not searchable by the agent's uid {}: it cannot reach its {what} {}; give that directory search permission for others (chmod o+x) or move what it holds",
                dir.display(),
                m.mode() & 0o7777,
                m.uid(),
                id.uid,
                path.display()
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn fsuid() -> u32 {
        unsafe { libc::syscall(libc::SYS_setfsuid, u32::MAX) as u32 }
    }

    #[test]
    fn an_unsearchable_directory_above_the_home_is_named() {
        use std::os::unix::fs::PermissionsExt;
        let t = tempfile::tempdir().unwrap();
        let closed = t.path().join("closed");
        let home = closed.join("state/fleets/f/a");
        std::fs::create_dir_all(&home).unwrap();
        std::fs::set_permissions(t.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
        std::fs::set_permissions(&closed, std::fs::Permissions::from_mode(0o700)).unwrap();
        let id = Identity::of_uid(1_599_997);
        let e = check_reachable(&home, id, "HOME").unwrap_err();
        assert!(
            e.contains(&format!("{} (mode 0700", closed.display())),
            "{e}"
        );
        std::fs::set_permissions(&closed, std::fs::Permissions::from_mode(0o711)).unwrap();
        assert_eq!(check_reachable(&home, id, "HOME"), Ok(()));
    }

    #[test]
    fn none_runs_as_the_daemon() {
        let me = fsuid();
        assert_eq!(as_tenant(None, fsuid).unwrap(), me);
    }

    /// Root only: a file made as the tenant is the tenant's, a root-only file is refused, and
    /// the daemon's credentials are back afterwards, also after a panic.
    #[test]
    fn as_root_files_are_made_and_refused_with_the_tenants_rights() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIPPED: needs root (setfsuid to another uid)");
            return;
        }
        use std::os::unix::fs::PermissionsExt;
        let t = tempfile::tempdir().unwrap();
        std::fs::set_permissions(t.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
        let id = Identity::of_uid(1_599_998);
        let home = t.path().join("home");
        std::fs::create_dir(&home).unwrap();
        std::os::unix::fs::chown(&home, Some(id.uid), Some(id.gid)).unwrap();
        let secret = t.path().join("root-only");
        std::fs::write(&secret, "x").unwrap();
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
        let (made, refused) = as_tenant(Some(id), || {
            (
                std::fs::write(home.join("f"), "y"),
                std::fs::read(&secret).map(|_| ()),
            )
        })
        .unwrap();
        made.unwrap();
        assert_eq!(std::fs::metadata(home.join("f")).unwrap().uid(), id.uid);
        assert_eq!(
            refused.unwrap_err().kind(),
            io::ErrorKind::PermissionDenied,
            "a tenant read a root-only file"
        );
        assert_eq!(fsuid(), 0);
        let panicked = std::panic::catch_unwind(|| {
            let _ = as_tenant(Some(id), || panic!("inside"));
        });
        assert!(panicked.is_err());
        assert_eq!(fsuid(), 0, "credentials not restored after a panic");
        assert!(std::fs::read(&secret).is_ok());
    }
}
