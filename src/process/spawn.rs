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

use super::child::Child;
use crate::isolation::confine::{self, Confinement};
use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, AtomicU32, Ordering};
use std::sync::{mpsc, Arc};
use tokio::sync::oneshot;

/// How the node keeps agents from outliving it (what keeps tenants apart is `isolation`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Containment {
    /// Agents run in a PID namespace whose init is our guardian.
    PidNamespace,
    /// Only the direct child gets a parent-death signal.
    ParentDeathSignal,
}

impl Containment {
    pub fn as_str(self) -> &'static str {
        match self {
            Containment::PidNamespace => "pid-namespace",
            Containment::ParentDeathSignal => "parent-death-signal",
        }
    }
}

/// What to run. The environment is the complete, explicit set: nothing is inherited.
#[derive(Debug)]
pub struct SpawnRequest {
    pub program: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: PathBuf,
    /// The agent cgroup's `cgroup.procs`, open for writing; the child moves itself in before
    /// anything else, so nothing it starts runs outside. Must stay open until `spawn` returns.
    pub cgroup_procs: Option<RawFd>,
    /// Its uid, capabilities and sandbox (`isolation`); the default confines nothing.
    pub confine: Confinement,
    /// Ask the kernel to merge its identical pages with other processes' (KSM,
    /// `PR_SET_MEMORY_MERGE`, Linux >= 6.4): inherited by every child it forks and kept across
    /// exec. Best effort: a kernel without it, or a daemon without CAP_SYS_RESOURCE, leaves it
    /// off (`ksm_merge_any: no` in its `/proc/<pid>/ksm_stat`).
    pub ksm: bool,
}

struct Job {
    req: SpawnRequest,
    reply: oneshot::Sender<io::Result<Child>>,
}

/// Handle to the spawner thread. Dropping it ends the thread and, with it, the guardian and
/// every process left in the namespace.
pub struct Spawner {
    tx: std::sync::Mutex<Option<mpsc::Sender<Job>>>,
    containment: Containment,
    guardian: Arc<AtomicU32>,
    fence: Arc<Fence>,
}

/// A deadline after which no agent of this node may run (cluster mode: the end of its right
/// to run them, its etcd lease, minus a margin). Enforced twice, neither time by the daemon's
/// event loop: the spawner refuses to start anything once it has passed, and the namespace
/// guardian, told each new deadline over its pipe, exits at it, and the kernel kills every
/// process in the namespace with it. A daemon that is frozen (SIGSTOP, a stalled VM) stops
/// extending the deadline, so its agents die in time anyway. Unarmed (the default, single
/// host) it does nothing.
#[derive(Default)]
pub struct Fence {
    /// CLOCK_BOOTTIME milliseconds (counts suspended time, as the lease's clock does); 0:
    /// unarmed.
    deadline_ms: std::sync::atomic::AtomicU64,
    /// A copy of the write end of the current guardian's pipe.
    pipe: std::sync::Mutex<Option<OwnedFd>>,
}

impl Fence {
    /// Sets the deadline (CLOCK_BOOTTIME ms, from `boottime_ms`) and tells the guardian.
    pub fn arm(&self, deadline_ms: u64) {
        let d = deadline_ms.max(1);
        self.deadline_ms.store(d, Ordering::SeqCst);
        if let Ok(pipe) = self.pipe.lock() {
            if let Some(fd) = pipe.as_ref() {
                tell_guardian(fd.as_raw_fd(), d);
            }
        }
    }

    /// The deadline, 0 when unarmed.
    pub fn deadline_ms(&self) -> u64 {
        self.deadline_ms.load(Ordering::SeqCst)
    }

    /// Armed and passed: nothing may start.
    pub fn lapsed(&self) -> bool {
        let d = self.deadline_ms();
        d != 0 && boottime_ms() >= d
    }

    fn adopt(&self, guardian: Option<&Guardian>) {
        let Ok(mut pipe) = self.pipe.lock() else {
            return;
        };
        *pipe = guardian.and_then(|g| g._pipe.try_clone().ok());
        if let Some(fd) = pipe.as_ref() {
            // Never block the caller of `arm` on a guardian that stopped reading.
            unsafe {
                let fl = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
                libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK);
            }
        }
        let d = self.deadline_ms();
        if let (Some(fd), true) = (pipe.as_ref(), d != 0) {
            tell_guardian(fd.as_raw_fd(), d);
        }
    }
}

/// Milliseconds of CLOCK_BOOTTIME, the clock the guardian's deadline is in.
pub fn boottime_ms() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000
}

fn tell_guardian(fd: RawFd, deadline_ms: u64) {
    // 8 bytes, below PIPE_BUF: one atomic write the guardian reads whole. A full pipe (a
    // guardian that stopped reading) drops the update; the one before still holds.
    let b = deadline_ms.to_le_bytes();
    unsafe { libc::write(fd, b.as_ptr().cast(), b.len()) };
}

impl Spawner {
    /// Starts the spawner thread. `want_namespace`: try a PID namespace first.
    pub fn start(runtime: tokio::runtime::Handle, want_namespace: bool) -> io::Result<Spawner> {
        let (tx, rx) = mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = mpsc::channel::<Containment>();
        let guardian = Arc::new(AtomicU32::new(0));
        let shown = guardian.clone();
        let fence = Arc::new(Fence::default());
        let f = fence.clone();
        std::thread::Builder::new()
            .name("fleet-spawner".into())
            .spawn(move || spawner_thread(runtime, want_namespace, rx, ready_tx, shown, f))?;
        let containment = ready_rx
            .recv()
            .map_err(|_| io::Error::other("spawner thread died during start"))?;
        Ok(Spawner {
            tx: std::sync::Mutex::new(Some(tx)),
            containment,
            guardian,
            fence,
        })
    }

    /// The node's fence (cluster mode arms it).
    pub fn fence(&self) -> Arc<Fence> {
        self.fence.clone()
    }

    /// The host pid of the PID namespace's init (0 without a namespace), kept current when a
    /// new namespace replaces a dead one.
    pub fn guardian_pid(&self) -> Arc<AtomicU32> {
        self.guardian.clone()
    }

    /// Ends the spawner thread (and so the guardian and its namespace) once queued spawns
    /// are done. Later spawns fail.
    pub fn close(&self) {
        if let Ok(mut tx) = self.tx.lock() {
            tx.take();
        }
    }

    pub fn containment(&self) -> Containment {
        self.containment
    }

    /// Spawns one agent process: its own session and process group, stdin null, stdout and
    /// stderr piped, umask 077, parent-death signal SIGKILL.
    pub async fn spawn(&self, req: SpawnRequest) -> io::Result<Child> {
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
    ready: mpsc::Sender<Containment>,
    shown: Arc<AtomicU32>,
    fence: Arc<Fence>,
) {
    let _enter = runtime.enter();
    let show = |g: &Option<Guardian>| {
        shown.store(g.as_ref().map_or(0, |g| g.pid as u32), Ordering::Relaxed)
    };
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
    show(&guardian);
    fence.adopt(guardian.as_ref());
    let containment = if guardian.is_some() {
        Containment::PidNamespace
    } else {
        Containment::ParentDeathSignal
    };
    let slots = match Slots::new() {
        Ok(s) => s,
        Err(e) => {
            // Without them no spawn can work; say why on every request instead of dying.
            tracing::error!(error = %e, "spawner: cannot reserve descriptor slots");
            let _ = ready.send(containment);
            while let Ok(job) = rx.recv() {
                let _ = job.reply.send(Err(io::Error::new(
                    e.kind(),
                    format!("spawner has no descriptor slots: {e}"),
                )));
            }
            return;
        }
    };
    let _ = ready.send(containment);
    // The namespace ended (its guardian exited) and a new one is due.
    let mut lost = false;
    while let Ok(job) = rx.recv() {
        if let Some(g) = &guardian {
            if let Some(status) = guardian_exit(g.pid) {
                if libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0 {
                    // What the fence is for: a cluster node past its lease deadline, or one
                    // that holds no lease yet (`cluster::join` closes the fence first).
                    tracing::info!(
                        pid = g.pid,
                        "agent namespace ended at the fence (this cluster node's lease lapsed, or it holds none yet); a new one starts once it holds its lease"
                    );
                } else {
                    tracing::error!(
                        pid = g.pid,
                        status,
                        "agent namespace guardian died; starting a new namespace"
                    );
                }
                guardian = None;
                show(&guardian);
                fence.adopt(None);
                lost = true;
            }
        }
        // Not while the fence is lapsed: a new guardian would be told the passed deadline
        // and end at once (and nothing may start anyway).
        if lost && !fence.lapsed() {
            guardian = match start_guardian() {
                Ok(g) => Some(g),
                Err(e) => {
                    tracing::error!(error = %e, "the agents' PID namespace could not be started again; starts are refused until it can");
                    None
                }
            };
            show(&guardian);
            fence.adopt(guardian.as_ref());
            lost = guardian.is_none();
        }
        let in_ns = guardian.is_some();
        let result = if fence.lapsed() {
            Err(io::Error::other(
                "this node's right to run agents (its cluster lease) has lapsed: nothing starts until it holds its lease again",
            ))
        } else if lost {
            // This node runs its agents in the namespace (`containment` says so, and cluster
            // mode's fence depends on it): never quietly outside it.
            Err(io::Error::other(
                "the agents' PID namespace could not be started again: nothing starts outside it (see the daemon's log)",
            ))
        } else {
            spawn_one(&job.req, in_ns, &slots)
        };
        // The requester gave up (its agent was stopped meanwhile): nobody would own the
        // process, so it must not run. Its session leader's group is the whole agent so far.
        if let Err(Ok(child)) = job.reply.send(result) {
            unsafe { libc::kill(-(child.id() as libc::pid_t), libc::SIGKILL) };
        }
    }
    // Dropping `guardian` closes the pipe: the guardian exits and the kernel ends the namespace.
    show(&None);
    fence.adopt(None);
    if let Some(g) = guardian.take() {
        drop(g._pipe);
        // Reap it so it does not stay a zombie of an embedding process.
        unsafe { libc::waitpid(g.pid, std::ptr::null_mut(), 0) };
    }
}

/// The guardian's wait status once it has exited (reaped), else None.
fn guardian_exit(pid: libc::pid_t) -> Option<libc::c_int> {
    let mut status = 0;
    (unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) } == pid).then_some(status)
}

fn spawn_one(req: &SpawnRequest, in_ns: bool, slots: &Slots) -> io::Result<Child> {
    // In a PID namespace the parent lives outside it, so getppid() reads 0.
    let expected_ppid: libc::pid_t = if in_ns {
        0
    } else {
        std::process::id() as libc::pid_t
    };
    let prepared = Prepared::new(req)?;
    let mut confined = req.confine.prepare()?;
    let (out_r, out_w) = pipe()?;
    let (err_r, err_w) = pipe()?;
    let landlock = req.confine.landlock.as_ref().map(|f| f.as_raw_fd());
    let loaded = slots.load(&out_w, &err_w, req.cgroup_procs, landlock)?;
    drop((out_w, err_w));
    // The child reads the ruleset from its slot: the original is beyond what it keeps.
    if landlock.is_some() {
        confined.landlock_fd = Some(slots.landlock);
    }
    let args = ChildArgs {
        program: prepared.program.as_ptr(),
        argv: prepared.argv_ptrs.as_ptr(),
        envp: prepared.envp_ptrs.as_ptr(),
        cwd: prepared.cwd.as_ptr(),
        stdin: slots.stdin,
        stdout: slots.stdout,
        stderr: slots.stderr,
        cgroup_procs: if req.cgroup_procs.is_some() {
            slots.cgroup
        } else {
            -1
        },
        keep_below: slots.keep_below,
        share_files: slots.share_files,
        expected_ppid,
        in_ns,
        confine: &confined,
        confined: !req.confine.is_none(),
        failed_at: AtomicU32::new(0),
        errno: AtomicI32::new(0),
    };
    // KSM's flag belongs to the memory map, and the child shares ours until it execs (a
    // prctl in it would set the daemon's flag for good, and every later child would inherit
    // it): set it here, let the exec take it over (the kernel keeps it across exec), clear it.
    // The spawner makes one child at a time, so no other spawn sees it.
    let ksm_set = req.ksm && unsafe { libc::prctl(PR_SET_MEMORY_MERGE, 1, 0, 0, 0) } == 0;
    let pid = clone_vfork(&args);
    if ksm_set {
        unsafe { libc::prctl(PR_SET_MEMORY_MERGE, 0, 0, 0, 0) };
    }
    // The child (if it got as far as exec) holds the write ends now; ours must go, or the
    // pipes would never report end-of-file.
    drop(loaded);
    let pid = pid?;
    let stage = args.failed_at.load(Ordering::SeqCst);
    if stage != 0 {
        let errno = args.errno.load(Ordering::SeqCst);
        unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
        let err = io::Error::from_raw_os_error(errno);
        let step = confine::Step::name(stage).unwrap_or_else(|| Stage::name(stage));
        return Err(io::Error::new(err.kind(), format!("{step}: {err}")));
    }
    Child::adopt(pid as u32, out_r, err_r)
}

/// Low descriptor numbers reserved for what a child needs (stdin, stdout, stderr, cgroup),
/// each holding /dev/null between spawns.
///
/// Why: a child gets a copy of the daemon's descriptor table at clone and closes every
/// close-on-exec entry at exec; with a thousand agents that is four thousand entries copied
/// and closed per start (measured: exec alone took 3 ms at N = 1000). Instead the child
/// shares our table (`CLONE_FILES`) and its first act is `close_range(keep_below, ~0,
/// CLOSE_RANGE_UNSHARE)`, which gives it a private table holding only the descriptors below
/// `keep_below`: the slots, reserved when the daemon had few descriptors open. Only the
/// spawner thread writes to the slots, so nothing else sees a slot change.
struct Slots {
    null: OwnedFd,
    stdin: RawFd,
    stdout: RawFd,
    stderr: RawFd,
    cgroup: RawFd,
    landlock: RawFd,
    _held: [OwnedFd; 5],
    keep_below: u32,
    /// `close_range` exists (Linux 5.9); without it the child gets a full copy.
    share_files: bool,
}

impl Slots {
    fn new() -> io::Result<Slots> {
        let null = open_cloexec(c"/dev/null", libc::O_RDONLY)?;
        let dup = || -> io::Result<OwnedFd> {
            let fd = unsafe { libc::fcntl(null.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 3) };
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(unsafe { OwnedFd::from_raw_fd(fd) })
        };
        let held = [dup()?, dup()?, dup()?, dup()?, dup()?];
        let raw = held.each_ref().map(|f| f.as_raw_fd());
        let keep_below = raw.iter().copied().max().unwrap_or(2) as u32 + 1;
        // A no-op call tells whether the system call exists.
        let share_files =
            unsafe { libc::syscall(libc::SYS_close_range, u32::MAX, u32::MAX, 0) } == 0;
        if !share_files {
            tracing::info!("no close_range (Linux < 5.9): each agent start copies the daemon's descriptor table");
        }
        Ok(Slots {
            null,
            stdin: raw[0],
            stdout: raw[1],
            stderr: raw[2],
            cgroup: raw[3],
            landlock: raw[4],
            _held: held,
            keep_below,
            share_files,
        })
    }

    /// Puts this child's descriptors into the slots until the returned guard drops.
    fn load<'a>(
        &'a self,
        out: &OwnedFd,
        err: &OwnedFd,
        cgroup: Option<RawFd>,
        landlock: Option<RawFd>,
    ) -> io::Result<Loaded<'a>> {
        let loaded = Loaded(self);
        dup3(out.as_raw_fd(), self.stdout)?;
        dup3(err.as_raw_fd(), self.stderr)?;
        if let Some(cg) = cgroup {
            dup3(cg, self.cgroup)?;
        }
        if let Some(ll) = landlock {
            dup3(ll, self.landlock)?;
        }
        Ok(loaded)
    }
}

/// Back to /dev/null on drop, so the daemon keeps no child's pipe end or cgroup open.
struct Loaded<'a>(&'a Slots);

impl Drop for Loaded<'_> {
    fn drop(&mut self) {
        let s = self.0;
        for slot in [s.stdout, s.stderr, s.cgroup, s.landlock] {
            let _ = dup3(s.null.as_raw_fd(), slot);
        }
    }
}

fn dup3(from: RawFd, to: RawFd) -> io::Result<()> {
    if unsafe { libc::dup3(from, to, libc::O_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// What the child does before exec, numbered so a failure can say which step failed.
struct Stage;

impl Stage {
    const CGROUP: u32 = 1;
    const SETSID: u32 = 2;
    const PDEATHSIG: u32 = 3;
    const PARENT_GONE: u32 = 4;
    const PROC: u32 = 5;
    const STDIO: u32 = 6;
    const CHDIR: u32 = 7;
    const EXEC: u32 = 8;
    const FDS: u32 = 9;

    fn name(stage: u32) -> &'static str {
        match stage {
            Self::CGROUP => "joining the agent cgroup",
            Self::SETSID => "setsid",
            Self::PDEATHSIG => "setting the parent-death signal",
            Self::PARENT_GONE => "the daemon exited during the start",
            Self::PROC => "mounting the namespace's /proc",
            Self::STDIO => "setting up stdin/stdout/stderr",
            Self::CHDIR => "changing to the agent's HOME",
            Self::EXEC => "exec",
            Self::FDS => "unsharing the descriptor table",
            _ => "starting the child",
        }
    }
}

/// Program, arguments, environment and directory as C strings, built before the clone: the
/// child shares our memory and must not allocate.
struct Prepared {
    program: CString,
    cwd: CString,
    _argv: Vec<CString>,
    _envp: Vec<CString>,
    argv_ptrs: Vec<*const libc::c_char>,
    envp_ptrs: Vec<*const libc::c_char>,
}

impl Prepared {
    fn new(req: &SpawnRequest) -> io::Result<Prepared> {
        let cstr = |b: &[u8], what: &str| {
            CString::new(b).map_err(|_| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{what} contains a NUL byte"),
                )
            })
        };
        let program = resolve_program(&req.program, &req.env)?;
        let program = cstr(program.as_os_str().as_bytes(), "program")?;
        let mut argv = vec![cstr(req.program.as_os_str().as_bytes(), "program")?];
        for a in &req.args {
            argv.push(cstr(a.as_bytes(), "argument")?);
        }
        let envp = req
            .env
            .iter()
            .map(|(k, v)| {
                if k.is_empty() || k.contains('=') {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!("environment name {k:?} is empty or contains '='"),
                    ));
                }
                cstr(format!("{k}={v}").as_bytes(), "environment")
            })
            .collect::<io::Result<Vec<_>>>()?;
        let argv_ptrs = argv
            .iter()
            .map(|c| c.as_ptr())
            .chain(std::iter::once(std::ptr::null()))
            .collect();
        let envp_ptrs = envp
            .iter()
            .map(|c| c.as_ptr())
            .chain(std::iter::once(std::ptr::null()))
            .collect();
        Ok(Prepared {
            program,
            cwd: cstr(req.cwd.as_os_str().as_bytes(), "directory")?,
            _argv: argv,
            _envp: envp,
            argv_ptrs,
            envp_ptrs,
        })
    }
}

/// The program to exec: as given when it names a path, else the first executable of that
/// name in the PATH of the agent's environment (the daemon's PATH when it has none), as
/// `Command` does with a cleared environment.
pub fn resolve_program(program: &Path, env: &[(String, String)]) -> io::Result<PathBuf> {
    if program.as_os_str().as_bytes().contains(&b'/') {
        return Ok(program.to_path_buf());
    }
    let path = env
        .iter()
        .rev()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| std::ffi::OsString::from(v))
        .or_else(|| std::env::var_os("PATH"))
        .unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    for dir in std::env::split_paths(&path) {
        let candidate = dir.join(program);
        if is_executable_file(&candidate) {
            return Ok(candidate);
        }
    }
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        format!(
            "{} not found in PATH {}",
            program.display(),
            path.to_string_lossy()
        ),
    ))
}

fn is_executable_file(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

fn open_cloexec(path: &CStr, flags: libc::c_int) -> io::Result<OwnedFd> {
    let fd = unsafe { libc::open(path.as_ptr(), flags | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// What the child reads, and where it reports a failure (shared memory: the parent reads it
/// once the clone returns).
/// `prctl` option of Linux 6.4 (not in every libc crate release).
const PR_SET_MEMORY_MERGE: libc::c_int = 67;

struct ChildArgs {
    program: *const libc::c_char,
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
    cwd: *const libc::c_char,
    stdin: RawFd,
    stdout: RawFd,
    stderr: RawFd,
    cgroup_procs: RawFd,
    /// With `share_files`: the child keeps only descriptors below this.
    keep_below: u32,
    share_files: bool,
    expected_ppid: libc::pid_t,
    in_ns: bool,
    confine: *const confine::Prepared,
    /// Whether `confine` has anything to do.
    confined: bool,
    failed_at: AtomicU32,
    errno: AtomicI32,
}

/// Stack of the cloned child until it execs: it runs only `child_main`'s system calls.
const CHILD_STACK: usize = 64 * 1024;

/// Starts `child_main` in a child that shares our memory and suspends this thread until the
/// child has exec'd or exited (what `posix_spawn` does inside glibc).
///
/// Why not fork: fork copies the page tables of the whole daemon (tens of MiB with a thousand
/// agents) for every start, and every page any daemon thread then writes faults and is copied
/// until the child execs; perf showed `copy_page_range` leading the cost of adding agents.
/// `posix_spawn` itself cannot do the setup we need (session, parent-death signal, cgroup,
/// private /proc), so the child runs our own code, which must be async-signal-safe and must
/// not allocate. All signals stay blocked across the clone so no handler of the daemon runs
/// on the shared memory in the child.
fn clone_vfork(args: &ChildArgs) -> io::Result<libc::pid_t> {
    let mut stack = vec![0u8; CHILD_STACK];
    // The stack grows down on every Linux architecture Rust supports; 16-byte aligned top.
    let top = ((stack.as_mut_ptr() as usize + CHILD_STACK) & !15) as *mut libc::c_void;
    let mut all: libc::sigset_t = unsafe { std::mem::zeroed() };
    let mut old: libc::sigset_t = unsafe { std::mem::zeroed() };
    unsafe {
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
    }
    let pid = unsafe {
        libc::clone(
            child_main,
            top,
            libc::CLONE_VM
                | libc::CLONE_VFORK
                | if args.share_files {
                    libc::CLONE_FILES
                } else {
                    0
                }
                | libc::SIGCHLD,
            args as *const ChildArgs as *mut libc::c_void,
        )
    };
    let err = io::Error::last_os_error();
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut()) };
    drop(stack);
    if pid < 0 {
        return Err(err);
    }
    Ok(pid)
}

/// Runs in the cloned child, between clone and exec, on the daemon's memory: raw system
/// calls only, no allocation, no locks. A failure is written to `args` and ends the child.
extern "C" fn child_main(arg: *mut libc::c_void) -> libc::c_int {
    let a = unsafe { &*(arg as *const ChildArgs) };
    let fail = |stage: u32| -> libc::c_int {
        a.errno.store(
            io::Error::last_os_error().raw_os_error().unwrap_or(0),
            Ordering::SeqCst,
        );
        a.failed_at.store(stage, Ordering::SeqCst);
        unsafe { libc::_exit(127) }
    };
    unsafe {
        // First, while the table is still the daemon's: a private one with the slots only.
        if a.share_files
            && libc::syscall(
                libc::SYS_close_range,
                a.keep_below,
                u32::MAX,
                libc::CLOSE_RANGE_UNSHARE,
            ) != 0
        {
            return fail(Stage::FDS);
        }
        if a.cgroup_procs >= 0 && libc::write(a.cgroup_procs, c"0".as_ptr().cast(), 1) != 1 {
            // "0" moves the writing process itself.
            return fail(Stage::CGROUP);
        }
        if libc::setsid() < 0 {
            return fail(Stage::SETSID);
        }
        libc::umask(0o077);
        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
            return fail(Stage::PDEATHSIG);
        }
        // The parent may have died between clone and prctl: then nobody will signal us.
        if libc::getppid() != a.expected_ppid {
            return fail(Stage::PARENT_GONE);
        }
        if a.in_ns && mount_own_proc().is_err() {
            return fail(Stage::PROC);
        }
        // dup2 clears close-on-exec on the copy; the originals close at exec.
        if libc::dup2(a.stdin, 0) < 0 || libc::dup2(a.stdout, 1) < 0 || libc::dup2(a.stderr, 2) < 0
        {
            return fail(Stage::STDIO);
        }
        if a.confined {
            let c = &*a.confine;
            if let Err(step) = confine::private_tmp(c, a.in_ns) {
                return fail(step);
            }
            if let Err(step) = confine::drop_privileges(c, a.in_ns) {
                return fail(step);
            }
            // A change of uid clears the parent-death signal: set it again, and look again
            // whether the parent is still there to send it.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return fail(Stage::PDEATHSIG);
            }
            if libc::getppid() != a.expected_ppid {
                return fail(Stage::PARENT_GONE);
            }
        }
        // Nothing else of the daemon's goes on, close-on-exec or not (the private table is
        // small: this is cheap).
        if a.share_files && libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) != 0 {
            return fail(Stage::FDS);
        }
        if libc::chdir(a.cwd) != 0 {
            return fail(Stage::CHDIR);
        }
        // Handlers are reset by exec, but ignored signals stay ignored: Rust ignores SIGPIPE,
        // and an agent must start with the default disposition of every signal.
        let mut dfl: libc::sigaction = std::mem::zeroed();
        dfl.sa_sigaction = libc::SIG_DFL;
        for sig in 1..=libc::SIGRTMAX() {
            if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                libc::sigaction(sig, &dfl, std::ptr::null_mut());
            }
        }
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::pthread_sigmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
        libc::execve(a.program, a.argv, a.envp);
        fail(Stage::EXEC)
    }
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
    // Nothing we mount may propagate back to the host.
    confine::own_mount_namespace()?;
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
    // A new namespace each time (the first, or one that replaces a dead one): `clone` with
    // CLONE_NEWPID makes the guardian the init of a fresh namespace, and `setns` points this
    // thread's future children into it. `unshare(CLONE_NEWPID)` cannot do this twice: once
    // the children's namespace differs from the thread's own, the kernel refuses a new one,
    // and spawns would go on landing in the dead namespace (ENOMEM). So the children's
    // namespace goes back to the thread's own first (a no-op the first time).
    let own = std::fs::File::open("/proc/thread-self/ns/pid")?;
    if unsafe { libc::setns(own.as_raw_fd(), libc::CLONE_NEWPID) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut fds = [0 as RawFd; 2];
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // fork semantics (no new stack, SIGCHLD to us at exit), in a new PID namespace.
    let pid = unsafe {
        libc::syscall(
            libc::SYS_clone,
            (libc::CLONE_NEWPID | libc::SIGCHLD) as libc::c_ulong,
            0usize,
            0usize,
            0usize,
            0usize,
        )
    };
    match pid {
        -1 => Err(io::Error::last_os_error()),
        0 => guardian_main(r.as_raw_fd()),
        pid => {
            let pid = pid as libc::pid_t;
            drop(r);
            let ns = std::fs::File::open(format!("/proc/{pid}/ns/pid"));
            let joined = ns.and_then(|ns| {
                if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWPID) } != 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(())
                }
            });
            if let Err(e) = joined {
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                    libc::waitpid(pid, std::ptr::null_mut(), 0);
                }
                return Err(e);
            }
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
        let mut buf = [0u8; 64];
        // The fence's deadline (CLOCK_BOOTTIME ms), 0 while unarmed: at it, this process
        // exits, and the kernel kills everything in the namespace.
        let mut deadline: u64 = 0;
        loop {
            while libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) > 0 {}
            let mut ts: libc::timespec = std::mem::zeroed();
            libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts);
            let now = ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000;
            if deadline != 0 && now >= deadline {
                libc::kill(-1, libc::SIGKILL);
                libc::_exit(0);
            }
            let wait = if deadline == 0 {
                1000
            } else {
                (deadline - now).min(1000) as libc::c_int
            };
            let mut pfd = libc::pollfd {
                fd: target,
                events: libc::POLLIN,
                revents: 0,
            };
            let n = libc::poll(&mut pfd, 1, wait);
            if n > 0 && pfd.revents != 0 {
                let r = libc::read(target, buf.as_mut_ptr().cast(), buf.len());
                if r <= 0 {
                    libc::_exit(0);
                }
                // Writes are 8 bytes each: the newest whole one counts.
                let whole = (r as usize / 8) * 8;
                if whole >= 8 {
                    let mut d = [0u8; 8];
                    d.copy_from_slice(&buf[whole - 8..whole]);
                    deadline = u64::from_le_bytes(d);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    fn req(program: &str, args: &[&str], env: &[(&str, &str)], cwd: &Path) -> SpawnRequest {
        SpawnRequest {
            program: program.into(),
            args: args.iter().map(|s| s.to_string()).collect(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            cwd: cwd.to_path_buf(),
            cgroup_procs: None,
            confine: Confinement::default(),
            ksm: false,
        }
    }

    async fn output(mut child: Child) -> (String, String, std::process::ExitStatus) {
        let (mut out, mut err) = (String::new(), String::new());
        let mut so = child.stdout.take().unwrap();
        let mut se = child.stderr.take().unwrap();
        let deadline = std::time::Duration::from_secs(10);
        tokio::time::timeout(deadline, async {
            let _ = tokio::join!(so.read_to_string(&mut out), se.read_to_string(&mut err));
        })
        .await
        .expect("child output within 10 s");
        let st = tokio::time::timeout(deadline, child.wait())
            .await
            .expect("child exit within 10 s")
            .unwrap();
        (out, err, st)
    }

    // A PID namespace where the host allows one (CAP_SYS_ADMIN); the parent-death-signal
    // fallback otherwise.
    async fn spawner() -> Spawner {
        Spawner::start(tokio::runtime::Handle::current(), true).unwrap()
    }

    #[tokio::test]
    async fn child_gets_exactly_its_environment_null_stdin_own_session_and_directory() {
        for want_namespace in [true, false] {
            let sp = Spawner::start(tokio::runtime::Handle::current(), want_namespace).unwrap();
            environment_case(sp).await;
        }
    }

    async fn environment_case(sp: Spawner) {
        let dir = tempfile::tempdir().unwrap();
        let script = "env | sort; echo stdin=$(cat | wc -c); echo cwd=$(pwd); \
                      echo sid=$(cut -d' ' -f6 /proc/self/stat) pid=$$; umask; \
                      grep SigIgn /proc/self/status; echo oops >&2; exit 3";
        let child = sp
            .spawn(req(
                "sh",
                &["-c", script],
                &[("PATH", "/usr/bin:/bin"), ("ONLY", "this one")],
                dir.path(),
            ))
            .await
            .unwrap();
        let pid = child.id();
        let (out, err, st) = output(child).await;
        let env: Vec<&str> = out
            .lines()
            .take_while(|l| !l.starts_with("stdin="))
            .collect();
        // sh adds PWD (and may add SHLVL and _) itself; nothing comes from the daemon.
        let foreign: Vec<&&str> = env
            .iter()
            .filter(|l| {
                !["PATH=", "ONLY=", "PWD=", "SHLVL=", "_="]
                    .iter()
                    .any(|p| l.starts_with(p))
            })
            .collect();
        assert!(foreign.is_empty(), "inherited variables: {foreign:?}");
        assert!(env.contains(&"ONLY=this one"), "{out}");
        assert!(out.contains("stdin=0\n"), "{out}");
        let cwd = dir.path().canonicalize().unwrap();
        assert!(out.contains(&format!("cwd={}\n", cwd.display())), "{out}");
        // Session leader: sid equals its pid (as seen in its own namespace).
        let sid_line = out.lines().find(|l| l.starts_with("sid=")).unwrap();
        let (sid, own) = sid_line.split_once(' ').unwrap();
        assert_eq!(&sid[4..], &own[4..], "{sid_line}");
        assert!(out.contains("0077\n"), "umask: {out}");
        // Rust ignores SIGPIPE in the daemon; the agent must not inherit that, nor any other
        // ignored signal (but glibc's reserved 32 and 33, which its sigaction refuses and the
        // agent's libc manages itself).
        let ign = out
            .lines()
            .find_map(|l| l.strip_prefix("SigIgn:\t"))
            .unwrap();
        let ign = u64::from_str_radix(ign, 16).unwrap() & !(0b11 << 31);
        assert_eq!(ign, 0, "ignored signals: {ign:#x}");
        assert_eq!(err, "oops\n");
        assert_eq!(st.code(), Some(3));
        assert!(pid > 0);
        sp.close();
    }

    #[tokio::test]
    async fn program_is_looked_up_in_the_agents_path_and_errors_name_the_step() {
        let dir = tempfile::tempdir().unwrap();
        let sp = spawner().await;
        let missing = sp
            .spawn(req(
                "no-such-program-x",
                &[],
                &[("PATH", "/nonexistent")],
                dir.path(),
            ))
            .await
            .unwrap_err();
        assert_eq!(missing.kind(), io::ErrorKind::NotFound);
        let msg = missing.to_string();
        assert!(
            msg.contains("no-such-program-x") && msg.contains("/nonexistent"),
            "{msg}"
        );

        let gone = dir.path().join("gone");
        let bad_cwd = sp
            .spawn(req("/bin/true", &[], &[], &gone))
            .await
            .unwrap_err();
        assert!(bad_cwd.to_string().contains("HOME"), "{bad_cwd}");

        let not_exec = dir.path().join("plain-file");
        std::fs::write(&not_exec, "x").unwrap();
        let e = sp
            .spawn(req(not_exec.to_str().unwrap(), &[], &[], dir.path()))
            .await
            .unwrap_err();
        assert!(e.to_string().starts_with("exec:"), "{e}");
        assert_eq!(e.kind(), io::ErrorKind::PermissionDenied);
        sp.close();
    }

    #[tokio::test]
    async fn child_holds_only_its_stdio_whatever_the_daemon_has_open() {
        let dir = tempfile::tempdir().unwrap();
        let sp = spawner().await;
        // Opened after the spawner reserved its slots, like agents' pipes and sockets; one
        // without close-on-exec, which a plain fork and exec would pass on.
        let held: Vec<std::fs::File> = (0..64)
            .map(|_| std::fs::File::open("/dev/null").unwrap())
            .collect();
        let leaky = unsafe { libc::open(c"/dev/null".as_ptr(), libc::O_RDONLY) };
        assert!(leaky > 2);
        let child = sp
            .spawn(req("/bin/ls", &["/proc/self/fd"], &[], dir.path()))
            .await
            .unwrap();
        let (out, err, st) = output(child).await;
        assert!(st.success(), "{err}");
        let fds: Vec<&str> = out.split_whitespace().collect();
        // 3 is the directory ls itself opened to list.
        assert_eq!(fds, ["0", "1", "2", "3"], "{out}");
        unsafe { libc::close(leaky) };
        drop(held);
        sp.close();
    }

    #[tokio::test]
    async fn dropped_child_is_reaped_not_left_a_zombie() {
        let dir = tempfile::tempdir().unwrap();
        let sp = spawner().await;
        let child = sp
            .spawn(req("/bin/true", &[], &[], dir.path()))
            .await
            .unwrap();
        let pid = child.id();
        drop(child);
        // The handle's task reaps it once it exits: its /proc entry goes (a zombie keeps one).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::path::Path::new(&format!("/proc/{pid}")).exists() {
            assert!(
                std::time::Instant::now() < deadline,
                "pid {pid} never reaped"
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        sp.close();
    }

    /// A spawn whose requester is gone by the time it runs (its agent was stopped) leaves
    /// no process running.
    #[tokio::test]
    async fn a_spawn_nobody_waits_for_is_killed() {
        let dir = tempfile::tempdir().unwrap();
        let sp = spawner().await;
        let (reply, rx) = oneshot::channel();
        drop(rx);
        let tx = sp.tx.lock().unwrap().clone().unwrap();
        tx.send(Job {
            req: req("/bin/sleep", &["30"], &[], dir.path()),
            reply,
        })
        .unwrap();
        // Jobs run in order: once this one is back, the abandoned one has been handled.
        let other = sp
            .spawn(req("/bin/true", &[], &[], Path::new("/")))
            .await
            .unwrap();
        drop(other);
        let cwd = dir.path().canonicalize().unwrap();
        let in_dir = || {
            std::fs::read_dir("/proc")
                .unwrap()
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
                .filter(|e| std::fs::read_link(e.path().join("cwd")).is_ok_and(|c| c == cwd))
                .count()
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while in_dir() > 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "the abandoned child still runs"
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        sp.close();
    }

    /// A runtime that shuts down while a task holds a running child drops that child inside
    /// the shutdown: the wait handed to a task is dropped on the spot, and must not hand itself
    /// on again (it did, recursively, until the worker's stack overflowed).
    #[test]
    fn a_live_child_dropped_by_a_runtime_shutdown_is_let_go() {
        let dir = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let (sp, pid) = rt.block_on(async {
            let sp = spawner().await;
            let child = sp
                .spawn(req("/bin/sleep", &["30"], &[], dir.path()))
                .await
                .unwrap();
            let pid = child.id();
            let (held_tx, held_rx) = tokio::sync::oneshot::channel();
            tokio::spawn(async move {
                let _child = child;
                let _ = held_tx.send(());
                std::future::pending::<()>().await
            });
            held_rx.await.unwrap();
            (sp, pid)
        });
        drop(rt);
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        sp.close();
    }
}
