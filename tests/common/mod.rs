//! Test fixtures that boot the real daemon: `Daemon::start()` runs `fleetd` on a temporary
//! state directory and talks to it only through its socket (via `fleetctl`); dropping it
//! stops the daemon and kills anything of its node still running. `node_with` starts a node
//! in this process instead, for tests that use the embedding API. `wait_until` waits for a
//! condition with a deadline and reports what it last saw.
#![allow(dead_code)]

#[path = "../../src/bin/fleet-fakes/fakes.rs"]
pub mod fakes;

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const FLEETD: &str = env!("CARGO_BIN_EXE_fleetd");
pub const FLEETCTL: &str = env!("CARGO_BIN_EXE_fleetctl");
pub const STUB: &str = env!("CARGO_BIN_EXE_fleet-stub-agent");

/// Says that a check could not run here, and counts it: `scripts/test.sh` sets
/// `FLEET_SKIP_LOG` to a file it reads after the run and prints how many checks were skipped
/// and which, so a skip is never reported as a pass.
pub fn skipped(what: &str) {
    eprintln!("SKIPPED: {what}");
    if let Some(path) = std::env::var_os("FLEET_SKIP_LOG") {
        use std::io::Write;
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            let _ = writeln!(f, "{what}");
        }
    }
}

/// Waits until `f` returns `Some`, polling every 20 ms, for at most `timeout`. On timeout it
/// panics with `what` and the last value `seen` recorded.
pub fn wait_until<T>(
    timeout: Duration,
    what: &str,
    mut f: impl FnMut(&mut String) -> Option<T>,
) -> T {
    let deadline = Instant::now() + timeout;
    let mut seen = String::new();
    loop {
        if let Some(v) = f(&mut seen) {
            return v;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}; last seen: {seen}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A port range of its own for each node a test binary starts: tests run in parallel, and two
/// nodes with one range would lease the same ports.
pub fn next_port_range() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let i = NEXT.fetch_add(1, Ordering::Relaxed);
    let first = 21000 + (i % 30) * 1000;
    format!("{first}-{}", first + 999)
}

/// A uid range of its own for each node a test binary starts (as root its agents get uids):
/// two nodes leasing the same uids would share RLIMIT_NPROC and file rights.
pub fn next_uid_range() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let i = NEXT.fetch_add(1, Ordering::Relaxed) % 200;
    let first = 1_600_000 + i * 1000;
    format!("{first}-{}", first + 999)
}

/// An in-process node on a temporary state directory, with a port range of its own; `f`
/// adjusts its config first.
pub async fn node_with(
    f: impl FnOnce(&mut fleet_commander::NodeConfig),
) -> (tempfile::TempDir, fleet_commander::NodeHandle) {
    let dir = tempfile::Builder::new()
        .prefix("fleet-node")
        .tempdir()
        .unwrap();
    searchable(dir.path());
    let mut config = fleet_commander::NodeConfig::new(dir.path().join("state"));
    config.port_range = fleet_commander::ports::PortRange::parse(&next_port_range()).unwrap();
    config.agent_uids =
        fleet_commander::isolation::uids::UidRange::parse(&next_uid_range()).unwrap();
    f(&mut config);
    let node = fleet_commander::Node::start(config).await.unwrap();
    (dir, node)
}

/// Lets other users search (not list) a test's temporary directory: as root, agents run
/// under uids of their own and must reach their HOMEs inside it.
pub fn searchable(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711)).expect("chmod 0711");
}

pub struct Daemon {
    pub dir: tempfile::TempDir,
    pub child: Option<Child>,
    pub extra_args: Vec<String>,
    /// Runs fleetd as this uid (and gid) instead of the test's own, through `setpriv`.
    pub run_as: Option<u32>,
    /// Extra environment for fleetd.
    pub env: Vec<(String, String)>,
}

impl Daemon {
    pub fn start() -> Daemon {
        Self::start_with(&[])
    }

    pub fn start_with(args: &[&str]) -> Daemon {
        Self::start_as(None, args)
    }

    /// fleetd as an unprivileged `uid` (root only: `setpriv` drops every capability and group),
    /// on a state dir and HOME that uid owns.
    pub fn start_as(run_as: Option<u32>, args: &[&str]) -> Daemon {
        Self::start_in(&std::env::temp_dir(), run_as, args)
    }

    /// `start_as` with the test directory under `parent` (a HOME under /tmp gets no private
    /// /tmp: a test of that uses another parent).
    pub fn start_in(parent: &Path, run_as: Option<u32>, args: &[&str]) -> Daemon {
        let dir = tempfile::Builder::new()
            .prefix("fleetd-test")
            .tempdir_in(parent)
            .expect("tempdir");
        searchable(dir.path());
        let mut extra_args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        if !extra_args.iter().any(|a| a == "--port-range") {
            extra_args.push("--port-range".into());
            extra_args.push(next_port_range());
        }
        if !extra_args.iter().any(|a| a == "--agent-uids") {
            extra_args.push("--agent-uids".into());
            extra_args.push(next_uid_range());
        }
        if let Some(uid) = run_as {
            for sub in ["state", "home"] {
                let p = dir.path().join(sub);
                std::fs::create_dir(&p).expect("dir for the unprivileged daemon");
                std::os::unix::fs::chown(&p, Some(uid), Some(uid)).expect("chown");
                std::fs::set_permissions(
                    &p,
                    <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o700),
                )
                .expect("chmod");
            }
        }
        let mut d = Daemon {
            dir,
            child: None,
            extra_args,
            run_as,
            env: Vec::new(),
        };
        d.launch();
        d
    }

    /// `start_with`, fleetd with this extra environment.
    pub fn start_env(env: &[(&str, &str)], args: &[&str]) -> Daemon {
        let dir = tempfile::Builder::new()
            .prefix("fleetd-test")
            .tempdir()
            .expect("tempdir");
        searchable(dir.path());
        let mut extra_args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        extra_args.extend(["--port-range".to_string(), next_port_range()]);
        extra_args.extend(["--agent-uids".to_string(), next_uid_range()]);
        let mut d = Daemon {
            dir,
            child: None,
            extra_args,
            run_as: None,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        d.launch();
        d
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    pub fn socket(&self) -> PathBuf {
        self.state_dir().join("fleetd.sock")
    }

    /// Starts fleetd on this state dir (again, after `kill9` or `stop`).
    pub fn launch(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("fleetd.log"))
            .expect("log file");
        let mut cmd = match self.run_as {
            None => Command::new(FLEETD),
            Some(uid) => {
                let mut c = Command::new("setpriv");
                c.arg(format!("--reuid={uid}"))
                    .arg(format!("--regid={uid}"))
                    .args(["--clear-groups", "--inh-caps=-all", "--bounding-set=-all"])
                    .arg("--")
                    .arg(FLEETD)
                    .env("HOME", self.dir.path().join("home"));
                c
            }
        };
        let child = cmd
            .arg("--state-dir")
            .arg(self.state_dir())
            .arg("--no-repl")
            .args(&self.extra_args)
            .env("FLEET_LOG", "debug")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn fleetd");
        self.child = Some(child);
        let sock = self.socket();
        wait_until(
            Duration::from_secs(20),
            "fleetd to answer on its socket",
            |seen| {
                let out = Command::new(FLEETCTL)
                    .arg("--socket")
                    .arg(&sock)
                    .arg("fleet")
                    .arg("list")
                    .output()
                    .ok()?;
                *seen = String::from_utf8_lossy(&out.stderr).to_string();
                out.status.success().then_some(())
            },
        );
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("fleetd.log")).unwrap_or_default()
    }

    /// Runs fleetctl with these words; returns the whole output.
    pub fn ctl_output(&self, words: &[&str]) -> Output {
        Command::new(FLEETCTL)
            .arg("--socket")
            .arg(self.socket())
            .args(words)
            .output()
            .expect("run fleetctl")
    }

    /// Runs fleetctl and insists on success; returns stdout.
    pub fn ctl(&self, words: &[&str]) -> String {
        let out = self.ctl_output(words);
        assert!(
            out.status.success(),
            "fleetctl {words:?} failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    }

    /// `status --json` as parsed JSON rows.
    pub fn status(&self) -> Vec<Value> {
        let s = self.ctl(&["--json", "status"]);
        serde_json::from_str::<Value>(&s)
            .unwrap_or_else(|e| panic!("status --json is not JSON ({e}): {s}"))
            .as_array()
            .cloned()
            .unwrap_or_else(|| panic!("status --json is not an array: {s}"))
    }

    pub fn agent(&self, fleet: &str, agent: &str) -> Option<Value> {
        self.status()
            .into_iter()
            .find(|r| r["fleet"] == fleet && r["agent"] == agent)
    }

    /// Waits until every listed agent is `running` (healthy); returns their rows.
    pub fn wait_running(&self, fleet: &str, n: usize, timeout: Duration) -> Vec<Value> {
        wait_until(timeout, &format!("{n} agents of {fleet} running"), |seen| {
            let rows: Vec<Value> = self
                .status()
                .into_iter()
                .filter(|r| r["fleet"] == fleet)
                .collect();
            *seen = serde_json::to_string(&rows).unwrap();
            (rows.len() == n
                && rows
                    .iter()
                    .all(|r| r["state"] == "running" && r["healthy"] == true))
            .then_some(rows)
        })
    }

    /// Stub-agent fleet: `fleet create <name> --agents n --command "<stub> <args>" --stride 1`.
    pub fn create_stub_fleet(&self, name: &str, n: u32, stub_args: &str, extra: &[&str]) {
        let out = self.try_create_stub_fleet(name, n, stub_args, extra);
        assert!(
            out.status.success(),
            "fleet create {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `create_stub_fleet` that returns fleetctl's output, success or not.
    pub fn try_create_stub_fleet(
        &self,
        name: &str,
        n: u32,
        stub_args: &str,
        extra: &[&str],
    ) -> Output {
        let cmd = format!("{STUB} {stub_args}");
        let n = n.to_string();
        let mut words = vec![
            "fleet",
            "create",
            name,
            "--agents",
            &n,
            "--command",
            &cmd,
            "--stride",
            "1",
        ];
        words.extend_from_slice(extra);
        self.ctl_output(&words)
    }

    /// SIGKILL the daemon (simulated crash) and reap it.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for a clean exit (bounded).
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("running");
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        wait_until(
            Duration::from_secs(60),
            "fleetd to exit after SIGTERM",
            |_| c.try_wait().ok().flatten(),
        )
    }

    pub fn node_id(&self) -> String {
        let reg: Value = serde_json::from_str(
            &std::fs::read_to_string(self.state_dir().join("registry.json")).unwrap_or_default(),
        )
        .unwrap_or(Value::Null);
        reg["node_id"].as_str().unwrap_or_default().to_string()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let id = self.node_id();
        self.kill9();
        if !id.is_empty() {
            // Whatever this node started and is still running goes now (by marker, pid-checked).
            for pid in marked_pids(&format!("{id}/")) {
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            }
        }
    }
}

/// Pids of live processes whose FLEET_COMMANDER_AGENT starts with `prefix`.
pub fn marked_pids(prefix: &str) -> Vec<u32> {
    marked(prefix).into_iter().map(|(pid, _)| pid).collect()
}

/// Live processes whose FLEET_COMMANDER_AGENT starts with `prefix`, with the marker's value
/// (`<node id>/<fleet>/<agent>/<incarnation>`).
pub fn marked(prefix: &str) -> Vec<(u32, String)> {
    let needle = format!("FLEET_COMMANDER_AGENT={prefix}");
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(env) = std::fs::read(format!("/proc/{pid}/environ")) else {
            continue;
        };
        let Some(kv) = env
            .split(|b| *b == 0)
            .find(|kv| kv.starts_with(needle.as_bytes()))
        else {
            continue;
        };
        if alive(pid) {
            let v = &kv["FLEET_COMMANDER_AGENT=".len()..];
            out.push((pid, String::from_utf8_lossy(v).to_string()));
        }
    }
    out
}

/// Exists, is not a zombie and is not exiting.
///
/// Exiting counts as gone: a PID namespace's init that was killed stays in its exit (state
/// S, no memory, flag PF_EXITING) until every process of its namespace has been reaped, and
/// those, orphaned by a killed fleetd, are reaped by the host's init. Measured on this VM: its
/// init reaps orphans only every ~1.8 s, so the guardian looked alive for up to 1.7 s after
/// a fleetd SIGKILL while running nothing.
pub fn alive(pid: u32) -> bool {
    const PF_EXITING: u64 = 0x4;
    let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let Some(i) = s.rfind(')') else {
        return false;
    };
    let fields: Vec<&str> = s[i + 2..].split(' ').collect();
    let state = fields.first().and_then(|f| f.chars().next());
    let flags = fields
        .get(6)
        .and_then(|f| f.parse::<u64>().ok())
        .unwrap_or(0);
    state.is_some_and(|c| c != 'Z' && c != 'X') && flags & PF_EXITING == 0
}

/// Children, grandchildren … of `root` (by ppid), live ones only.
pub fn descendants(root: u32) -> Vec<u32> {
    let mut table = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some(i) = s.rfind(')') else { continue };
        let ppid: u32 = s[i + 2..]
            .split(' ')
            .nth(1)
            .and_then(|x| x.parse().ok())
            .unwrap_or(0);
        table.push((pid, ppid));
    }
    let mut out = Vec::new();
    let mut frontier = vec![root];
    while let Some(p) = frontier.pop() {
        for (c, pp) in &table {
            if *pp == p && !out.contains(c) {
                out.push(*c);
                frontier.push(*c);
            }
        }
    }
    out.retain(|p| alive(*p));
    out
}

pub fn http_get(port: u16, path: &str) -> Option<u16> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(
        &([127, 0, 0, 1], port).into(),
        Duration::from_millis(500),
    )
    .ok()?;
    s.set_read_timeout(Some(Duration::from_millis(1000))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = String::new();
    let _ = s.read_to_string(&mut buf);
    buf.split(' ').nth(1)?.parse().ok()
}

pub fn read_file(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}
