//! What a spawned agent does to itself between clone and exec: a private /tmp, the rlimit
//! floor, every capability gone (bounding set, ambient, effective, permitted, inheritable;
//! root's exec rules locked off), its own uid and gid with no supplementary groups,
//! `no_new_privs`, then its Landlock ruleset. In that order: each step needs the rights the
//! next one takes away (mounting and setuid need capabilities, Landlock forbids mounts).
//!
//! Runs in a child that shares the daemon's memory (`spawn`): raw system calls only, no
//! allocation. Everything it reads is prepared by `Confinement::prepare` in the daemon.

use super::tenant_fs::Identity;
use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

/// What one agent's process is confined with. `Default` confines nothing (`isolation =
/// "none"`).
#[derive(Debug, Default)]
pub struct Confinement {
    /// Run as this uid/gid (`isolation = "uid"`).
    pub identity: Option<Identity>,
    /// Drop every capability and set `no_new_privs`.
    pub drop_privileges: bool,
    /// The agent's Landlock ruleset (`sandbox::build`).
    pub landlock: Option<OwnedFd>,
    /// RLIMIT_NPROC: processes and threads its uid may hold (only meaningful with a uid of
    /// its own; the limit counts every process of the uid).
    pub nproc: Option<u64>,
    /// Bind-mount this directory over /tmp in a mount namespace of its own.
    pub private_tmp: Option<PathBuf>,
}

/// `Confinement` as the child reads it: plain values and C strings.
#[derive(Debug)]
pub struct Prepared {
    pub uid: Option<(libc::uid_t, libc::gid_t)>,
    pub drop_privileges: bool,
    /// The daemon is root: the bounding set and the securebits can be changed.
    pub privileged: bool,
    pub cap_last: u32,
    pub nproc: Option<u64>,
    pub private_tmp: Option<CString>,
    /// Raw descriptor of the ruleset (kept open by `Confinement` until the spawn returns).
    pub landlock_fd: Option<libc::c_int>,
}

impl Confinement {
    pub fn prepare(&self) -> io::Result<Prepared> {
        let private_tmp = match &self.private_tmp {
            Some(p) => Some(CString::new(p.as_os_str().as_bytes()).map_err(|_| {
                io::Error::new(io::ErrorKind::InvalidInput, "tmp path contains a NUL byte")
            })?),
            None => None,
        };
        Ok(Prepared {
            uid: self.identity.map(|i| (i.uid, i.gid)),
            drop_privileges: self.drop_privileges,
            privileged: unsafe { libc::geteuid() } == 0,
            cap_last: cap_last(),
            nproc: self.nproc,
            private_tmp,
            landlock_fd: self.landlock.as_ref().map(|f| f.as_raw_fd()),
        })
    }

    /// Whether the child must run anything of this module at all.
    pub fn is_none(&self) -> bool {
        self.identity.is_none()
            && !self.drop_privileges
            && self.landlock.is_none()
            && self.nproc.is_none()
            && self.private_tmp.is_none()
    }
}

/// The highest capability number this kernel knows.
fn cap_last() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(40)
}

/// Steps of the confinement, numbered after `spawn`'s own so a failure names its step.
pub struct Step;

impl Step {
    pub const PRIVATE_TMP: u32 = 20;
    pub const NPROC: u32 = 21;
    pub const CAPABILITIES: u32 = 22;
    pub const IDENTITY: u32 = 23;
    pub const NO_NEW_PRIVS: u32 = 24;
    pub const LANDLOCK: u32 = 25;

    pub fn name(step: u32) -> Option<&'static str> {
        Some(match step {
            Self::PRIVATE_TMP => "mounting the agent's private /tmp",
            Self::NPROC => "setting RLIMIT_NPROC",
            Self::CAPABILITIES => "dropping capabilities",
            Self::IDENTITY => "taking the agent's uid and gid",
            Self::NO_NEW_PRIVS => "setting no_new_privs",
            Self::LANDLOCK => "entering the agent's Landlock sandbox",
            _ => return None,
        })
    }
}

/// Adds read access to this process's /proc (a mount of its own, so another inode than the
/// one the daemon's ruleset names) to the ruleset. Raw calls on a stack struct only.
unsafe fn allow_own_proc(ruleset: libc::c_int) -> Result<(), u32> {
    #[repr(C, packed)]
    struct PathBeneath {
        allowed_access: u64,
        parent_fd: i32,
    }
    const RULE_PATH_BENEATH: libc::c_int = 1;
    const READ_FILE: u64 = 1 << 2;
    const READ_DIR: u64 = 1 << 3;
    let fd = libc::open(c"/proc".as_ptr(), libc::O_PATH | libc::O_CLOEXEC);
    if fd < 0 {
        return Err(Step::LANDLOCK);
    }
    let attr = PathBeneath {
        allowed_access: READ_FILE | READ_DIR,
        parent_fd: fd,
    };
    let rc = libc::syscall(
        libc::SYS_landlock_add_rule,
        ruleset,
        RULE_PATH_BENEATH,
        &attr as *const PathBeneath,
        0u32,
    );
    libc::close(fd);
    if rc != 0 {
        return Err(Step::LANDLOCK);
    }
    Ok(())
}

const SECBIT_NOROOT: libc::c_ulong = 1 << 0;
const SECBIT_NOROOT_LOCKED: libc::c_ulong = 1 << 1;
const SECBIT_NO_SETUID_FIXUP: libc::c_ulong = 1 << 2;
const SECBIT_NO_SETUID_FIXUP_LOCKED: libc::c_ulong = 1 << 3;
const SECBIT_KEEP_CAPS_LOCKED: libc::c_ulong = 1 << 5;
const SECBIT_NO_CAP_AMBIENT_RAISE: libc::c_ulong = 1 << 6;
const SECBIT_NO_CAP_AMBIENT_RAISE_LOCKED: libc::c_ulong = 1 << 7;

/// Gives this process a mount namespace of its own from which nothing propagates back to the
/// host. Async-signal-safe.
///
/// # Safety
/// Only in the spawned child before exec.
pub unsafe fn own_mount_namespace() -> io::Result<()> {
    if libc::unshare(libc::CLONE_NEWNS) != 0 {
        return Err(io::Error::last_os_error());
    }
    if libc::mount(
        std::ptr::null(),
        c"/".as_ptr(),
        std::ptr::null(),
        libc::MS_REC | libc::MS_PRIVATE,
        std::ptr::null(),
    ) != 0
    {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Mounts the private /tmp. `own_namespace`: the child already has a private mount
/// namespace (it mounted its own /proc). Async-signal-safe.
///
/// # Safety
/// Only in the spawned child before exec.
pub unsafe fn private_tmp(p: &Prepared, own_namespace: bool) -> Result<(), u32> {
    let Some(tmp) = &p.private_tmp else {
        return Ok(());
    };
    if !own_namespace && own_mount_namespace().is_err() {
        return Err(Step::PRIVATE_TMP);
    }
    if libc::mount(
        tmp.as_ptr(),
        c"/tmp".as_ptr(),
        std::ptr::null(),
        libc::MS_BIND,
        std::ptr::null(),
    ) != 0
    {
        return Err(Step::PRIVATE_TMP);
    }
    Ok(())
}

/// Everything after the mounts: limits, capabilities, identity, no_new_privs, Landlock.
/// `own_proc`: the child mounted a /proc of its own, which the ruleset (built on the daemon's
/// /proc) does not name yet. Async-signal-safe.
///
/// # Safety
/// Only in the spawned child before exec.
pub unsafe fn drop_privileges(p: &Prepared, own_proc: bool) -> Result<(), u32> {
    if let Some(n) = p.nproc {
        let lim = libc::rlimit {
            rlim_cur: n,
            rlim_max: n,
        };
        if libc::setrlimit(libc::RLIMIT_NPROC, &lim) != 0 {
            return Err(Step::NPROC);
        }
    }
    if p.drop_privileges && p.privileged {
        // Root's exec rules would hand a uid-0 program every capability again: lock them off
        // before the bounding set (which needs CAP_SETPCAP) goes.
        let bits = SECBIT_NOROOT
            | SECBIT_NOROOT_LOCKED
            | SECBIT_NO_SETUID_FIXUP
            | SECBIT_NO_SETUID_FIXUP_LOCKED
            | SECBIT_KEEP_CAPS_LOCKED
            | SECBIT_NO_CAP_AMBIENT_RAISE
            | SECBIT_NO_CAP_AMBIENT_RAISE_LOCKED;
        if libc::prctl(libc::PR_SET_SECUREBITS, bits, 0, 0, 0) != 0 {
            return Err(Step::CAPABILITIES);
        }
        for cap in 0..=p.cap_last {
            if libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) != 0 {
                return Err(Step::CAPABILITIES);
            }
        }
    }
    if p.drop_privileges {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0,
            0,
            0,
        );
    }
    if let Some((uid, gid)) = p.uid {
        // Raw calls: this child shares the daemon's memory, glibc would signal its threads.
        if libc::syscall(libc::SYS_setgroups, 0usize, std::ptr::null::<libc::gid_t>()) != 0
            || libc::syscall(libc::SYS_setresgid, gid, gid, gid) != 0
            || libc::syscall(libc::SYS_setresuid, uid, uid, uid) != 0
        {
            return Err(Step::IDENTITY);
        }
    }
    if p.drop_privileges {
        #[repr(C)]
        struct Header {
            version: u32,
            pid: libc::c_int,
        }
        #[repr(C)]
        #[derive(Clone, Copy)]
        struct Data {
            effective: u32,
            permitted: u32,
            inheritable: u32,
        }
        const VERSION_3: u32 = 0x2008_0522;
        let mut h = Header {
            version: VERSION_3,
            pid: 0,
        };
        let d = [Data {
            effective: 0,
            permitted: 0,
            inheritable: 0,
        }; 2];
        if libc::syscall(libc::SYS_capset, &mut h as *mut Header, d.as_ptr()) != 0 {
            return Err(Step::CAPABILITIES);
        }
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            return Err(Step::NO_NEW_PRIVS);
        }
    }
    if let Some(fd) = p.landlock_fd {
        if own_proc {
            allow_own_proc(fd)?;
        }
        // Landlock needs no_new_privs (or CAP_SYS_ADMIN, gone by now).
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            return Err(Step::NO_NEW_PRIVS);
        }
        if libc::syscall(libc::SYS_landlock_restrict_self, fd, 0u32) != 0 {
            return Err(Step::LANDLOCK);
        }
    }
    Ok(())
}
