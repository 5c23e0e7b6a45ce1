//! Spawning agents from one dedicated, long-lived thread, so that the parent-death signal
//! (which fires when the *thread* that forked exits) never fires by accident, and so that
//! every agent lands in the node's PID namespace when the host allows one.
//!
//! Why a PID namespace: OpenClaw starts helpers in sessions of their own; a parent-death
//! signal reaches only the direct child. When the namespace's init (our tiny guardian)
//! dies, the kernel kills every process in the namespace, helpers included, so a SIGKILLed
//! daemon leaves nothing behind. The guardian dies with the spawner thread (parent-death
//! signal) or when the daemon's end of a pipe closes, whichever comes first. Without
//! CAP_SYS_ADMIN the node falls back to the parent-death signal on each agent plus sweeps by
//! environment marker (see `tree`), and says so once.
//!
//! Not here: what to run (provision) or what to do when it exits (the AgentActor).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::mpsc;
use tokio::sync::oneshot;

/// How the node keeps agents from outliving it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isolation {
    /// Agents run in a PID namespace whose init is our guardian.
    PidNamespace,
    /// Only the direct child gets a parent-death signal.
    ParentDeathSignal,
}

impl Isolation {
    pub fn as_str(self) -> &'static str {
        match self {
            Isolation::PidNamespace => "pid-namespace",
            Isolation::ParentDeathSignal => "parent-death-signal",
        }
    }
}

/// What to run. The environment is the complete, explicit set: nothing is inherited.
#[derive(Debug, Clone)]
pub struct SpawnRequest {
    pub program: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: PathBuf,
    /// The agent cgroup's `cgroup.procs`, open for writing; the child moves itself in before
    /// anything else, so nothing it starts runs outside. Must stay open until `spawn` returns.
    pub cgroup_procs: Option<RawFd>,
}

struct Job {
    req: SpawnRequest,
    reply: oneshot::Sender<io::Result<tokio::process::Child>>,
}

/// Handle to the spawner thread. Dropping it ends the thread and, with it, the guardian and
/// every process left in the namespace.
pub struct Spawner {
    tx: std::sync::Mutex<Option<mpsc::Sender<Job>>>,
    isolation: Isolation,
}

impl Spawner {
    /// Starts the spawner thread. `want_namespace`: try a PID namespace first.
    pub fn start(runtime: tokio::runtime::Handle, want_namespace: bool) -> io::Result<Spawner> {
        let (tx, rx) = mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = mpsc::channel::<Isolation>();
        std::thread::Builder::new()
            .name("fleet-spawner".into())
            .spawn(move || spawner_thread(runtime, want_namespace, rx, ready_tx))?;
        let isolation = ready_rx
            .recv()
            .map_err(|_| io::Error::other("spawner thread died during start"))?;
        Ok(Spawner {
            tx: std::sync::Mutex::new(Some(tx)),
            isolation,
        })
    }

    /// Ends the spawner thread (and so the guardian and its namespace) once queued spawns
    /// are done. Later spawns fail.
    pub fn close(&self) {
        if let Ok(mut tx) = self.tx.lock() {
            tx.take();
        }
    }

    pub fn isolation(&self) -> Isolation {
        self.isolation
    }

    /// Spawns one agent process: its own session and process group, stdin null, stdout and
    /// stderr piped, umask 077, parent-death signal SIGKILL.
    pub async fn spawn(&self, req: SpawnRequest) -> io::Result<tokio::process::Child> {
        let (reply, rx) = oneshot::channel();
        let tx = self
            .tx
            .lock()
            .map_err(|_| io::Error::other("spawner lock poisoned"))?
            .clone()
            .ok_or_else(|| io::Error::other("the node is shutting down"))?;
        tx.send(Job { req, reply })
            .map_err(|_| io::Error::other("spawner thread is gone"))?;
        rx.await
            .map_err(|_| io::Error::other("spawner thread dropped the request"))?
    }
}

struct Guardian {
    pid: libc::pid_t,
    // Held open: the guardian exits when this end closes.
    _pipe: OwnedFd,
}

fn spawner_thread(
    runtime: tokio::runtime::Handle,
    want_namespace: bool,
    rx: mpsc::Receiver<Job>,
    ready: mpsc::Sender<Isolation>,
) {
    let _enter = runtime.enter();
    let mut guardian = if want_namespace {
        match start_guardian() {
            Ok(g) => Some(g),
            Err(e) => {
                tracing::warn!(error = %e, "no PID namespace for agents (needs CAP_SYS_ADMIN): helpers that leave their process group may outlive a SIGKILLed daemon until its next start sweeps them");
                None
            }
        }
    } else {
        None
    };
    let isolation = if guardian.is_some() {
        Isolation::PidNamespace
    } else {
        Isolation::ParentDeathSignal
    };
    let _ = ready.send(isolation);
    while let Ok(job) = rx.recv() {
        if let Some(g) = &guardian {
            if guardian_exited(g.pid) {
                tracing::error!(
                    pid = g.pid,
                    "agent namespace guardian died; starting a new namespace"
                );
                guardian = start_guardian().ok();
            }
        }
        let in_ns = guardian.is_some();
        let result = spawn_one(&job.req, in_ns);
        let _ = job.reply.send(result);
    }
    // Dropping `guardian` closes the pipe: the guardian exits and the kernel ends the namespace.
    if let Some(g) = guardian.take() {
        drop(g._pipe);
        // Reap it so it does not stay a zombie of an embedding process.
        unsafe { libc::waitpid(g.pid, std::ptr::null_mut(), 0) };
    }
}

fn guardian_exited(pid: libc::pid_t) -> bool {
    unsafe { libc::waitpid(pid, std::ptr::null_mut(), libc::WNOHANG) == pid }
}

fn spawn_one(req: &SpawnRequest, in_ns: bool) -> io::Result<tokio::process::Child> {
    let mut cmd = tokio::process::Command::new(&req.program);
    cmd.args(&req.args)
        .env_clear()
        .envs(req.env.iter().map(|(k, v)| (k, v)))
        .current_dir(&req.cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(false);
    // In a PID namespace the parent lives outside it, so getppid() reads 0.
    let expected_ppid: libc::pid_t = if in_ns {
        0
    } else {
        std::process::id() as libc::pid_t
    };
    let cgroup_procs = req.cgroup_procs;
    unsafe {
        cmd.pre_exec(move || {
            // Only async-signal-safe calls here: we are between fork and exec.
            if let Some(fd) = cgroup_procs {
                // "0" moves the writing process itself.
                if libc::write(fd, c"0".as_ptr().cast(), 1) != 1 {
                    return Err(io::Error::last_os_error());
                }
            }
            if libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            libc::umask(0o077);
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The parent may have died between fork and prctl: then nobody will signal us.
            if libc::getppid() != expected_ppid {
                libc::_exit(1);
            }
            if in_ns {
                mount_own_proc()?;
            }
            Ok(())
        });
    }
    cmd.spawn()
}

/// Gives the agent a /proc of its own PID namespace (in a private mount namespace).
///
/// OpenClaw records lock and lease owners as its pid plus that pid's start time read from
/// /proc. Inside our PID namespace its pid is small (2, 3, …) while the host's /proc would
/// describe the host's process of that number; after a daemon restart the same small pids
/// are alive again in the new namespace and a stale owner looks alive (measured: restarted
/// gateways exited 78 or 1). With its own /proc the pid and the start time agree.
/// Async-signal-safe: raw system calls only.
unsafe fn mount_own_proc() -> io::Result<()> {
    if libc::unshare(libc::CLONE_NEWNS) != 0 {
        return Err(io::Error::last_os_error());
    }
    // Nothing we mount may propagate back to the host.
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
    if libc::mount(
        c"proc".as_ptr(),
        c"/proc".as_ptr(),
        c"proc".as_ptr(),
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        std::ptr::null(),
    ) != 0
    {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Creates a PID namespace for this thread's future children and forks its init.
fn start_guardian() -> io::Result<Guardian> {
    if unsafe { libc::unshare(libc::CLONE_NEWPID) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut fds = [0 as RawFd; 2];
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    match unsafe { libc::fork() } {
        -1 => Err(io::Error::last_os_error()),
        0 => guardian_main(r.as_raw_fd()),
        pid => {
            drop(r);
            Ok(Guardian { pid, _pipe: w })
        }
    }
}

/// The namespace's init: reaps orphans, exits when the daemon's pipe end closes or the
/// spawner thread dies. Runs right after fork in a multi-threaded process, so it uses raw,
/// async-signal-safe system calls only and never returns.
fn guardian_main(pipe: RawFd) -> ! {
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
        // Shown by ps/top: tells operators this is not a second daemon.
        libc::prctl(libc::PR_SET_NAME, c"fleet-guardian".as_ptr(), 0, 0, 0);
        // Keep nothing of the daemon open (sockets, agents' pipes): only our pipe end.
        let target: RawFd = 3;
        if pipe != target {
            libc::dup2(pipe, target);
        }
        libc::syscall(libc::SYS_close_range, 0u32, 2u32, 0u32);
        libc::syscall(libc::SYS_close_range, 4u32, u32::MAX, 0u32);
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::pthread_sigmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
        let mut buf = [0u8; 16];
        loop {
            while libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) > 0 {}
            let mut pfd = libc::pollfd {
                fd: target,
                events: libc::POLLIN,
                revents: 0,
            };
            let n = libc::poll(&mut pfd, 1, 1000);
            if n > 0 && pfd.revents != 0 {
                let r = libc::read(target, buf.as_mut_ptr().cast(), buf.len());
                if r <= 0 {
                    libc::_exit(0);
                }
            }
        }
    }
}
