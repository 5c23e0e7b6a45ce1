//! A started agent process as the daemon holds it: its pid, a pidfd to wait on, and the read
//! ends of its stdout and stderr pipes.
//!
//! Why not `tokio::process::Child`: the spawner starts children with a `vfork`-style clone of
//! its own (see `spawn`), and tokio can only wait on children it started itself. Waiting on a
//! pidfd needs no SIGCHLD handler and no orphan queue: the pidfd becomes readable when the
//! process exits, and only then do we reap it, by pid, which cannot have been reused while
//! the process is still our unreaped child.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use tokio::io::unix::AsyncFd;
use tokio::net::unix::pipe;

pub struct Child {
    pid: u32,
    /// Always `Some` until drop.
    pidfd: Option<AsyncFd<OwnedFd>>,
    status: Option<ExitStatus>,
    /// The handle a dropped `Child` handed to a task: dropping it again hands nothing on.
    orphan: bool,
    pub stdout: Option<pipe::Receiver>,
    pub stderr: Option<pipe::Receiver>,
}

impl Child {
    /// Wraps a child of this process that nobody has reaped. Must be called within a tokio
    /// runtime. On error the child is killed and reaped, so it never runs unowned.
    pub(crate) fn adopt(pid: u32, stdout: OwnedFd, stderr: OwnedFd) -> io::Result<Child> {
        let wrap = || -> io::Result<Child> {
            let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            let pidfd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
            Ok(Child {
                pid,
                // SAFETY: the AsyncFd owns the OwnedFd, so the descriptor stays open and the
                // same for the AsyncFd's whole life.
                pidfd: Some(unsafe {
                    AsyncFd::register_with_interest(pidfd, tokio::io::Interest::READABLE)
                        .map_err(io::Error::from)?
                }),
                status: None,
                orphan: false,
                stdout: Some(pipe::Receiver::from_owned_fd(stdout)?),
                stderr: Some(pipe::Receiver::from_owned_fd(stderr)?),
            })
        };
        wrap().inspect_err(|_| unsafe {
            libc::kill(pid as libc::pid_t, libc::SIGKILL);
            libc::waitpid(pid as libc::pid_t, std::ptr::null_mut(), 0);
        })
    }

    pub fn id(&self) -> u32 {
        self.pid
    }

    /// The exit status if the process has exited (reaping it), without blocking.
    pub fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        if let Some(st) = self.status {
            return Ok(Some(st));
        }
        let mut raw = 0;
        match unsafe { libc::waitpid(self.pid as libc::pid_t, &mut raw, libc::WNOHANG) } {
            0 => Ok(None),
            -1 => Err(io::Error::last_os_error()),
            _ => {
                let st = ExitStatus::from_raw(raw);
                self.status = Some(st);
                Ok(Some(st))
            }
        }
    }

    /// Waits for the process to exit and reaps it. Cancel-safe.
    pub async fn wait(&mut self) -> io::Result<ExitStatus> {
        loop {
            if let Some(st) = self.try_wait()? {
                return Ok(st);
            }
            let Some(fd) = &self.pidfd else {
                return Err(io::Error::other("child handle already dropped"));
            };
            let mut ready = fd.readable().await?;
            ready.clear_ready();
        }
    }
}

/// A handle dropped before its process was reaped hands the wait to a task, so the process
/// does not stay a zombie (what tokio's orphan queue does for its own children).
///
/// That task is only dropped unfinished when its runtime shuts down, and a runtime that is
/// shutting down drops every task spawned on it on the spot, so the orphan must not hand
/// itself on again: it did, recursively, until the worker's stack overflowed. The process
/// then gets its parent-death signal when the spawner thread ends.
impl Drop for Child {
    fn drop(&mut self) {
        if self.orphan || matches!(self.try_wait(), Ok(Some(_)) | Err(_)) {
            return;
        }
        let (Some(pidfd), Ok(rt)) = (self.pidfd.take(), tokio::runtime::Handle::try_current())
        else {
            return;
        };
        let mut orphan = Child {
            pid: self.pid,
            pidfd: Some(pidfd),
            status: None,
            orphan: true,
            stdout: None,
            stderr: None,
        };
        rt.spawn(async move {
            let _ = orphan.wait().await;
        });
    }
}

impl std::fmt::Debug for Child {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Child")
            .field("pid", &self.pid)
            .field("status", &self.status)
            .finish()
    }
}
