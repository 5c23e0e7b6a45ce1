//! The task that owns one running child: it alone waits on it (so signals are only ever sent
//! to a pid that has not been reaped), pumps its stdout/stderr into the agent's log writer,
//! and carries out stop requests on the whole tree (SIGTERM, stop timeout, SIGKILL). When its
//! handle is dropped, from any code path, it kills the tree. One small task per agent, no
//! thread.

use super::cgroup::AgentCgroup;
use super::child::Child;
use super::tree::{self, Member, Sweeper};
use crate::logs::writer::{LineSplitter, LogWriter, Stream};
use crate::state::ExitInfo;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::unix::pipe;
use tokio::time::Instant;

/// Requests to the owner task.
#[derive(Debug, Clone, Copy)]
enum Ctl {
    Stop { timeout: Duration },
    Kill,
}

/// What the owner task reports back.
#[derive(Debug, Clone)]
pub enum OwnerEvent {
    /// The main process is gone. `requested`: a stop or kill was asked for.
    /// `heap_oom`: its stderr said V8 ran out of heap (the abort behind a SIGABRT).
    Exited {
        exit: ExitInfo,
        requested: bool,
        heap_oom: bool,
    },
    /// Its stderr said OpenClaw's crash-loop breaker holds its channels off.
    Breaker,
    /// Every process of the tree is gone after the exit (sent after `Exited`).
    TreeGone { killed_leftovers: usize },
    /// Lines lost while the log could not be written.
    LogDropped { lines: u64 },
}

/// Handle to a running, owned process. Dropping it kills the whole tree.
pub struct ProcessHandle {
    pub pid: u32,
    pub start_time: u64,
    ctl: Arc<CtlCell>,
}

impl ProcessHandle {
    /// Graceful stop: SIGTERM to the tree, SIGKILL after `timeout`.
    pub fn stop(&self, timeout: Duration) {
        self.ctl.post(Ctl::Stop { timeout });
    }

    /// SIGKILL to the tree at once.
    pub fn kill(&self) {
        self.ctl.post(Ctl::Kill);
    }
}

impl Drop for ProcessHandle {
    /// The owner kills the tree when nobody holds its handle any more.
    fn drop(&mut self) {
        self.ctl.dropped.store(true, Ordering::Release);
        self.ctl.notify.notify_one();
    }
}

/// The owner's mailbox: at most one pending request, merged (a kill wins over a stop, two
/// stops keep the shorter timeout). A thousand idle agents each held an unbounded channel
/// whose first block alone was larger than this whole cell.
#[derive(Default)]
struct CtlCell {
    pending: std::sync::Mutex<Option<Ctl>>,
    notify: tokio::sync::Notify,
    dropped: AtomicBool,
}

impl CtlCell {
    fn post(&self, ctl: Ctl) {
        if let Ok(mut p) = self.pending.lock() {
            *p = Some(merge(*p, ctl));
        }
        self.notify.notify_one();
    }

    /// The next request; `None` once the handle is dropped and nothing is pending.
    async fn next(&self) -> Option<Ctl> {
        loop {
            if let Some(c) = self.pending.lock().ok().and_then(|mut p| p.take()) {
                return Some(c);
            }
            if self.dropped.load(Ordering::Acquire) {
                return None;
            }
            // notify_one stores a permit when nobody waits: no wake-up is lost.
            self.notify.notified().await;
        }
    }
}

fn merge(pending: Option<Ctl>, new: Ctl) -> Ctl {
    match (pending, new) {
        (Some(Ctl::Kill), _) | (_, Ctl::Kill) => Ctl::Kill,
        (Some(Ctl::Stop { timeout: a }), Ctl::Stop { timeout: b }) => {
            Ctl::Stop { timeout: a.min(b) }
        }
        (None, s) => s,
    }
}

/// How long to keep reading pipes after the main process exits: helpers may hold them open.
const DRAIN_AFTER_EXIT: Duration = Duration::from_millis(100);
/// Grace for leftovers of a process that exited by itself.
const LEFTOVER_GRACE: Duration = Duration::from_secs(2);
/// How long a killed cgroup may take to empty before its removal is given up (logged).
const CGROUP_EMPTY_WITHIN: Duration = Duration::from_secs(5);

/// Takes ownership of `child`. `marker` is this incarnation's environment marker; `cgroup`,
/// where the node has cgroups, holds the child and everything it starts.
pub fn own(
    mut child: Child,
    marker: String,
    sweeper: Sweeper,
    cgroup: Option<AgentCgroup>,
    log: LogWriter,
    on_event: impl Fn(OwnerEvent) + Send + 'static,
) -> ProcessHandle {
    let pid = child.id();
    let start_time = super::procfs::read_proc(pid)
        .map(|p| p.start_time)
        .unwrap_or(0);
    let ctl = Arc::new(CtlCell::default());
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let guard = KillGuard {
        pgid: pid,
        marker: marker.clone(),
        cgroup,
        armed: true,
    };
    tokio::spawn(run(
        child,
        stdout,
        stderr,
        ctl.clone(),
        marker,
        sweeper,
        log,
        on_event,
        guard,
        // What this incarnation started is younger than it: sweeps need not read older
        // processes.
        start_time,
    ));
    ProcessHandle {
        pid,
        start_time,
        ctl,
    }
}

/// Kills the group from `Drop` if the task is dropped before the child was reaped (runtime
/// shut down, task aborted): no code path leaks a running process.
struct KillGuard {
    pgid: u32,
    marker: String,
    cgroup: Option<AgentCgroup>,
    armed: bool,
}

impl KillGuard {
    /// SIGKILL to everything in the cgroup (nothing to do without one).
    fn kill_cgroup(&self) {
        if let Some(cg) = &self.cgroup {
            let _ = cg.kill();
        }
    }

    /// The processes in the cgroup that `members` does not hold yet, as signalable members:
    /// helpers that left the tree and dropped the marker are still in the cgroup.
    fn add_cgroup_members(&self, members: &mut Vec<Member>) {
        let Some(cg) = &self.cgroup else {
            return;
        };
        for pid in cg.pids() {
            if pid == self.pgid || members.iter().any(|m| m.pid == pid) {
                continue;
            }
            if let Some(p) = super::procfs::read_proc(pid) {
                members.push(Member::from(&p));
            }
        }
    }
}

impl Drop for KillGuard {
    fn drop(&mut self) {
        if self.armed && self.pgid > 1 {
            let _ = killpg(Pid::from_raw(self.pgid as i32), Signal::SIGKILL);
            self.kill_cgroup();
            let left = tree::collect(None, &self.marker);
            tree::signal_members(&left, Signal::SIGKILL);
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn run(
    mut child: Child,
    mut stdout: Option<pipe::Receiver>,
    mut stderr: Option<pipe::Receiver>,
    ctl_cell: Arc<CtlCell>,
    marker: String,
    sweeper: Sweeper,
    mut log: LogWriter,
    on_event: impl Fn(OwnerEvent),
    mut guard: KillGuard,
    since: u64,
) {
    let pid = guard.pgid;
    let mut split_out = LineSplitter::new();
    let mut split_err = LineSplitter::new();
    let mut pace_out = Pace::new();
    let mut pace_err = Pace::new();
    let mut notes = crate::process::notice::Notes::default();
    let mut kill_at: Option<Instant> = None;
    let mut requested = false;
    let mut members: Vec<Member> = Vec::new();
    let mut term_sweep: Option<SweepFuture> = None;
    let mut ctl_open = true;

    let status = loop {
        tokio::select! {
            st = child.wait() => break st,
            r = readable(&stdout) => {
                pump(&mut log, &mut split_out, Stream::Out, &mut stdout, r, &mut pace_out, &mut notes);
                report_drops(&mut log, &on_event);
                pace_out.yield_if_busy().await;
            }
            r = readable(&stderr) => {
                pump(&mut log, &mut split_err, Stream::Err, &mut stderr, r, &mut pace_err, &mut notes);
                if notes.take_breaker() {
                    on_event(OwnerEvent::Breaker);
                }
                report_drops(&mut log, &on_event);
                pace_err.yield_if_busy().await;
            }
            ctl = ctl_cell.next(), if ctl_open => {
                if let Ok(Some(_)) = child.try_wait() {
                    continue; // exited meanwhile; the wait branch reports it
                }
                requested = true;
                match ctl {
                    Some(Ctl::Stop { timeout }) => {
                        let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGTERM);
                        // The search for descendants in other groups runs beside the wait:
                        // an agent that exits on SIGTERM at once is reaped at once (a fleet
                        // stop waited for a thousand-root scan before reaping anything). If it
                        // exits first, the leftover sweep after the exit catches the rest.
                        let (sw, mk) = (sweeper.clone(), marker.clone());
                        term_sweep = Some(Box::pin(async move {
                            sw.collect_since(Some(pid), &mk, since).await
                        }));
                        let at = Instant::now() + timeout;
                        kill_at = Some(kill_at.map_or(at, |k| k.min(at)));
                    }
                    Some(Ctl::Kill) | None => {
                        if ctl.is_none() {
                            ctl_open = false;
                        }
                        let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
                        guard.kill_cgroup();
                        members = sweeper.collect_since(Some(pid), &marker, since).await;
                        tree::signal_members(&members, Signal::SIGKILL);
                        kill_at = None;
                    }
                }
            }
            found = sweep_opt(&mut term_sweep) => {
                term_sweep = None;
                members = found;
                guard.add_cgroup_members(&mut members);
                tree::signal_members(&members, Signal::SIGTERM);
            }
            _ = sleep_until_opt(kill_at) => {
                kill_at = None;
                if let Ok(None) = child.try_wait() {
                    let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
                }
                guard.kill_cgroup();
                let more = sweeper.collect_since(Some(pid), &marker, since).await;
                members.extend(more);
                tree::signal_members(&members, Signal::SIGKILL);
            }
        }
    };
    guard.pgid = 0; // reaped: never signal that group id again
    let exit = match status {
        Ok(st) => ExitInfo::from_status(st),
        Err(_) => ExitInfo::Code(-1),
    };
    // Lines printed just before the exit are still in the pipes.
    let drain_until = Instant::now() + DRAIN_AFTER_EXIT;
    while stdout.is_some() || stderr.is_some() {
        tokio::select! {
            r = readable(&stdout) => pump(&mut log, &mut split_out, Stream::Out, &mut stdout, r, &mut pace_out, &mut notes),
            r = readable(&stderr) => pump(&mut log, &mut split_err, Stream::Err, &mut stderr, r, &mut pace_err, &mut notes),
            _ = tokio::time::sleep_until(drain_until) => break,
        }
    }
    split_out.finish(&mut |l, cut| log.write_line(Stream::Out, l, cut));
    split_err.finish(&mut |l, cut| {
        notes.see(l);
        log.write_line(Stream::Err, l, cut)
    });
    log.flush();
    report_drops(&mut log, &on_event);
    drop((stdout, stderr));
    // Compressions of archives rotated during a flood may still run: wait for them (off the
    // runtime), so once the stop is reported nothing writes into the log directory and a
    // purge that follows removes it whole.
    let closing = tokio::task::spawn_blocking(move || log.close());

    if !requested {
        // Crash path: report first so the restart is not delayed by the sweep.
        on_event(OwnerEvent::Exited {
            exit,
            requested,
            heap_oom: notes.heap_oom,
        });
    }
    // Whatever the tree left behind (helpers in their own sessions) goes now.
    let mut leftovers = sweeper.collect_since(None, &marker, since).await;
    guard.add_cgroup_members(&mut leftovers);
    let grace = kill_at
        .map(|k| k.saturating_duration_since(Instant::now()))
        .unwrap_or(LEFTOVER_GRACE);
    let killed = if leftovers.is_empty() {
        0
    } else {
        tokio::task::spawn_blocking(move || tree::terminate_blocking(&leftovers, grace))
            .await
            .unwrap_or(0)
    };
    // The cgroup is the last word: whatever is still in it goes, and the tree counts as
    // gone only once the kernel says the cgroup is empty.
    if let Some(cg) = guard.cgroup.take() {
        let _ = tokio::task::spawn_blocking(move || cg.kill_and_remove(CGROUP_EMPTY_WITHIN)).await;
    }
    guard.armed = false;
    let _ = closing.await;
    if requested {
        on_event(OwnerEvent::Exited {
            exit,
            requested,
            heap_oom: notes.heap_oom,
        });
    }
    on_event(OwnerEvent::TreeGone {
        killed_leftovers: killed,
    });
}

/// Waits until the pipe has data or is closed (forever once it is gone).
async fn readable(r: &Option<pipe::Receiver>) -> std::io::Result<()> {
    match r {
        Some(r) => r.readable().await,
        None => std::future::pending().await,
    }
}

type SweepFuture = std::pin::Pin<Box<dyn std::future::Future<Output = Vec<Member>> + Send>>;

async fn sweep_opt(f: &mut Option<SweepFuture>) -> Vec<Member> {
    match f {
        Some(f) => f.await,
        None => std::future::pending().await,
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Largest read: the default Linux pipe capacity, so one read empties a full pipe.
const READ_LARGE: usize = 64 * 1024;
/// A flooding agent yields after this much so its worker thread serves other tasks too.
/// tokio's cooperative budget would only yield after 128 reads (8 MiB of log work).
const YIELD_EVERY: usize = 256 * 1024;

thread_local! {
    /// Pipes are read into one buffer per runtime thread, never held across an await: a
    /// thousand mostly idle agents need no read buffer of their own.
    static SCRATCH: std::cell::RefCell<Box<[u8]>> =
        std::cell::RefCell::new(vec![0; READ_LARGE].into_boxed_slice());
}

/// How much a pipe has delivered since its pump last gave the runtime back.
struct Pace {
    since_yield: usize,
}

impl Pace {
    fn new() -> Self {
        Pace { since_yield: 0 }
    }

    async fn yield_if_busy(&mut self) {
        if self.since_yield >= YIELD_EVERY {
            self.since_yield = 0;
            tokio::task::yield_now().await;
        }
    }
}

/// One read of a pipe that reported readiness, into the log; end of file or an error closes
/// the stream (after its last partial line).
fn pump(
    log: &mut LogWriter,
    split: &mut LineSplitter,
    stream: Stream,
    src: &mut Option<pipe::Receiver>,
    ready: std::io::Result<()>,
    pace: &mut Pace,
    notes: &mut crate::process::notice::Notes,
) {
    let mut write = |l: &[u8], cut: usize| {
        if stream == Stream::Err {
            notes.see(l);
        }
        log.write_line(stream, l, cut)
    };
    let Some(r) = src.as_ref() else {
        return;
    };
    let got = match ready {
        Err(e) => Err(e),
        Ok(()) => SCRATCH.with(|b| {
            let mut b = b.borrow_mut();
            match r.try_read(&mut b) {
                Ok(0) => Ok(None),
                Ok(n) => {
                    split.push(&b[..n], &mut write);
                    pace.since_yield += n;
                    Ok(Some(n))
                }
                Err(e) => Err(e),
            }
        }),
    };
    match got {
        // Spurious readiness: try_read cleared it; wait again.
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        Ok(Some(_)) => {}
        Ok(None) | Err(_) => {
            split.finish(&mut write);
            *src = None;
        }
    }
    log.flush();
}

fn report_drops(log: &mut LogWriter, on_event: &impl Fn(OwnerEvent)) {
    if let Some(lines) = log.take_dropped_report() {
        on_event(OwnerEvent::LogDropped { lines });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kill_wins_and_two_stops_keep_the_shorter_timeout() {
        let s = |ms| Ctl::Stop {
            timeout: Duration::from_millis(ms),
        };
        let timeout = |c: Ctl| match c {
            Ctl::Stop { timeout } => Some(timeout.as_millis()),
            Ctl::Kill => None,
        };
        assert_eq!(timeout(merge(None, s(500))), Some(500));
        assert_eq!(timeout(merge(Some(s(500)), s(200))), Some(200));
        assert_eq!(timeout(merge(Some(s(200)), s(500))), Some(200));
        assert_eq!(timeout(merge(Some(s(200)), Ctl::Kill)), None);
        assert_eq!(timeout(merge(Some(Ctl::Kill), s(200))), None);
    }

    #[tokio::test]
    async fn cell_delivers_a_request_posted_before_the_wait_then_none_after_drop() {
        let cell = Arc::new(CtlCell::default());
        cell.post(Ctl::Kill);
        assert!(matches!(cell.next().await, Some(Ctl::Kill)));
        let waiter = tokio::spawn({
            let cell = cell.clone();
            async move { cell.next().await.is_none() }
        });
        cell.dropped.store(true, Ordering::Release);
        cell.notify.notify_one();
        let got = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("the waiter wakes up")
            .unwrap();
        assert!(got, "a dropped handle reads as None");
    }
}
