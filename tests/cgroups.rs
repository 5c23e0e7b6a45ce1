//! Per-agent cgroups against the real kernel: every process of an agent lands in its
//! incarnation's cgroup, and a helper that left the agent's tree *and* dropped its
//! environment marker (found neither as a descendant nor by marker) is still stopped with the
//! agent, killed after a crash of the agent, and swept by the next daemon after a crash of the
//! daemon. The host here is cgroup v1, so each test mounts a cgroup2 hierarchy of its own (no
//! controllers are free for it: limits are unit-tested in `process::cgroup`) and hands a
//! directory of it to fleetd with `--cgroup`. Needs root (CAP_SYS_ADMIN) to mount; says so and
//! passes without checking anything where it cannot.

mod common;

use common::{alive, wait_until, Daemon, STUB};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A private cgroup2 mount with one directory for the daemon, torn down on drop.
struct Cgroup2 {
    _tmp: tempfile::TempDir,
    mount: PathBuf,
    dir: PathBuf,
}

impl Cgroup2 {
    fn new(name: &str) -> Option<Cgroup2> {
        let tmp = tempfile::Builder::new().prefix("fleet-cg").tempdir().ok()?;
        let mount = tmp.path().join("cg");
        std::fs::create_dir(&mount).ok()?;
        let target = std::ffi::CString::new(mount.to_str()?).ok()?;
        let rc = unsafe {
            libc::mount(
                c"cgroup2".as_ptr(),
                target.as_ptr(),
                c"cgroup2".as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        if rc != 0 {
            common::skipped(&format!(
                "cgroups {name}: cannot mount cgroup2 here ({})",
                std::io::Error::last_os_error()
            ));
            return None;
        }
        let dir = mount.join(format!("fleet-test-{name}-{}", std::process::id()));
        std::fs::create_dir(&dir).expect("test cgroup");
        Some(Cgroup2 {
            _tmp: tmp,
            mount,
            dir,
        })
    }

    fn arg(&self) -> &str {
        self.dir.to_str().unwrap()
    }

    /// Agent cgroup directories (`<fleet>.<agent>.<n>`) the daemon holds now.
    fn agent_dirs(&self) -> Vec<String> {
        std::fs::read_dir(self.dir.join("agents"))
            .map(|d| {
                d.flatten()
                    .filter(|e| e.path().is_dir())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for Cgroup2 {
    fn drop(&mut self) {
        // Deepest first; a cgroup with processes cannot go, so kill them first.
        fn clear(dir: &Path) {
            if let Ok(entries) = std::fs::read_dir(dir) {
                for e in entries.flatten() {
                    if e.path().is_dir() {
                        clear(&e.path());
                    }
                }
            }
            let _ = std::fs::write(dir.join("cgroup.kill"), "1");
            for _ in 0..200 {
                if std::fs::remove_dir(dir).is_ok() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        clear(&self.dir);
        let target = std::ffi::CString::new(self.mount.to_str().unwrap()).unwrap();
        unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
    }
}

/// A program that answers like the stand-in agent but first leaves behind `sleep <token>`
/// with an empty environment, in a session of its own, re-parented away from the agent.
fn escaping_command(token: u32) -> String {
    format!(
        "sh -c '(env -i setsid sleep {token} </dev/null >/dev/null 2>&1 &); exec {STUB} --no-helper'"
    )
}

/// Live pids whose command line is exactly `sleep <token>`.
fn sleepers(token: u32) -> Vec<u32> {
    let want = format!("sleep\0{token}\0");
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c == want.as_bytes()) {
            out.push(pid);
        }
    }
    out
}

/// The one escaped helper of `token`, once it is there.
fn sleeper(token: u32) -> u32 {
    wait_until(Duration::from_secs(20), "the escaped helper", |seen| {
        let s = sleepers(token);
        *seen = format!("{s:?}");
        (s.len() == 1).then(|| s[0])
    })
}

/// The unified-hierarchy path of `pid`, read from the kernel.
fn cgroup_of(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("0::").map(str::to_string))
        .unwrap_or_default()
}

fn token(salt: u32) -> u32 {
    900_000 + (std::process::id() % 50_000) * 2 + salt
}

/// Kills what a failed test may leave behind.
struct KillSleepers(u32);
impl Drop for KillSleepers {
    fn drop(&mut self) {
        for pid in sleepers(self.0) {
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
    }
}

#[test]
fn escaped_unmarked_helper_is_stopped_with_its_agent() {
    let Some(cg) = Cgroup2::new("stop") else {
        return;
    };
    let tok = token(0);
    let _cleanup = KillSleepers(tok);
    let d = Daemon::start_with(&["--cgroup", cg.arg()]);
    let cmd = escaping_command(tok);
    d.ctl(&[
        "fleet",
        "create",
        "cg",
        "--agents",
        "1",
        "--command",
        &cmd,
        "--stride",
        "1",
    ]);
    let row = d.wait_running("cg", 1, Duration::from_secs(30)).remove(0);
    let agent_pid = row["pid"].as_u64().unwrap() as u32;
    let helper = sleeper(tok);
    // Preconditions: the helper is outside the agent's tree and carries no marker, so only
    // the cgroup can find it.
    assert!(
        !common::descendants(agent_pid).contains(&helper),
        "helper {helper} is still a descendant of {agent_pid}"
    );
    let environ = std::fs::read(format!("/proc/{helper}/environ")).unwrap_or_default();
    assert!(
        !String::from_utf8_lossy(&environ).contains("FLEET_COMMANDER_AGENT"),
        "helper kept the marker"
    );
    let agent_cg = cgroup_of(agent_pid);
    assert!(
        agent_cg.contains("/agents/cg.agent-1."),
        "agent in cgroup {agent_cg:?}"
    );
    assert_eq!(
        cgroup_of(helper),
        agent_cg,
        "helper left the agent's cgroup"
    );

    d.ctl(&["agent", "stop", "cg/agent-1"]);
    wait_until(Duration::from_secs(15), "the helper to be stopped", |_| {
        (!alive(helper)).then_some(())
    });
    wait_until(
        Duration::from_secs(10),
        "the incarnation's cgroup removed",
        |seen| {
            let dirs = cg.agent_dirs();
            *seen = format!("{dirs:?}");
            dirs.is_empty().then_some(())
        },
    );

    // A crash of the agent: the restart comes first, the old incarnation's helper still goes,
    // and the new incarnation's helper is untouched by that.
    d.ctl(&["agent", "start", "cg/agent-1"]);
    let row = d.wait_running("cg", 1, Duration::from_secs(30)).remove(0);
    let first_pid = row["pid"].as_u64().unwrap() as u32;
    let old_helper = sleeper(tok);
    unsafe { libc::kill(first_pid as i32, libc::SIGKILL) };
    wait_until(
        Duration::from_secs(30),
        "a new pid, and the old helper gone",
        |seen| {
            let row = d.agent("cg", "agent-1")?;
            let pid = row["pid"].as_u64()? as u32;
            *seen = format!("{row} old helper alive {}", alive(old_helper));
            (pid != first_pid && row["state"] == "running" && !alive(old_helper)).then_some(())
        },
    );
    let new_helper = sleeper(tok);
    assert_ne!(new_helper, old_helper);
    assert_ne!(cgroup_of(new_helper), cgroup_of(first_pid));
}

#[test]
fn next_daemon_sweeps_what_a_crashed_one_left_in_cgroups() {
    let Some(cg) = Cgroup2::new("crash") else {
        return;
    };
    let tok = token(1);
    let _cleanup = KillSleepers(tok);
    // Without the PID namespace nothing kills the helper when the daemon dies.
    let mut d = Daemon::start_with(&["--cgroup", cg.arg(), "--no-pid-namespace"]);
    let cmd = escaping_command(tok);
    d.ctl(&[
        "fleet",
        "create",
        "cg",
        "--agents",
        "1",
        "--command",
        &cmd,
        "--stride",
        "1",
    ]);
    d.wait_running("cg", 1, Duration::from_secs(30));
    let helper = sleeper(tok);
    d.kill9();
    assert!(
        alive(helper),
        "precondition: the helper outlives the daemon"
    );
    d.launch();
    wait_until(
        Duration::from_secs(15),
        "the leftover helper killed",
        |_| (!alive(helper)).then_some(()),
    );
    // The agent itself comes back, once.
    d.wait_running("cg", 1, Duration::from_secs(30));
    let now = sleeper(tok);
    assert_ne!(now, helper);
}

/// With `--cgroup auto` (the default) the daemon says once, at start, whether agents get
/// cgroups; on a host without cgroup2 at /sys/fs/cgroup (cgroup v1 or hybrid, like this one)
/// it must be the fallback, and starting agents must not repeat it.
#[test]
fn daemon_says_once_whether_agents_get_cgroups() {
    let d = Daemon::start();
    d.create_stub_fleet("once", 2, "--no-helper", &[]);
    d.wait_running("once", 2, Duration::from_secs(30));
    let log = d.log();
    let absent = log.matches("cgroup v2 is not delegated").count();
    let present = log.matches("agents run in cgroups of their own").count();
    assert_eq!(
        absent + present,
        1,
        "said {absent} + {present} times:\n{log}"
    );
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let unified_at_sys = mountinfo.lines().any(|l| {
        l.split(" - ").next().and_then(|pre| pre.split(' ').nth(4)) == Some("/sys/fs/cgroup")
            && l.split(" - ")
                .nth(1)
                .is_some_and(|post| post.starts_with("cgroup2 "))
    });
    if !unified_at_sys {
        assert_eq!(absent, 1, "no cgroup2 at /sys/fs/cgroup, yet:\n{log}");
    }
}
