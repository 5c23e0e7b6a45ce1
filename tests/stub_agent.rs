//! Integration tests of `fleet-stub-agent`: each boots the real binary in a temporary HOME on a
//! free loopback port and looks at it only from outside (HTTP, exit status, /proc, its console
//! and log file), as a supervisor would. The request parsing and routing tables are unit-tested
//! in the binary itself; this file does not repeat them.

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use std::os::unix::process::ExitStatusExt;
use tempfile::TempDir;

const STUB: &str = env!("CARGO_BIN_EXE_fleet-stub-agent");
/// Generous because 2 cores are shared with other builds; a healthy stub needs milliseconds.
const START_LIMIT: Duration = Duration::from_secs(10);
const POLL_EVERY: Duration = Duration::from_millis(20);

fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind port 0");
    l.local_addr().unwrap().port()
}

/// Polls `probe` until it returns Ok, at most `limit`; on timeout fails with the last thing seen.
fn wait_until<T>(what: &str, limit: Duration, mut probe: impl FnMut() -> Result<T, String>) -> T {
    let start = Instant::now();
    let mut tries = 0u32;
    loop {
        tries += 1;
        match probe() {
            Ok(v) => return v,
            Err(last) if start.elapsed() >= limit || tries > 100_000 => {
                panic!("gave up after {limit:?} waiting for {what}; last saw: {last}")
            }
            Err(_) => std::thread::sleep(POLL_EVERY),
        }
    }
}

/// One HTTP/1.1 GET; returns the status code and body.
fn http_get(
    port: u16,
    path: &str,
    bearer: Option<&str>,
    read_timeout: Duration,
) -> std::io::Result<(u16, String)> {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500))?;
    s.set_read_timeout(Some(read_timeout))?;
    let auth = bearer.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    write!(s, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}\r\n")?;
    let mut raw = String::new();
    s.read_to_string(&mut raw)?;
    let code = raw
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("no status line in {raw:?}")))?;
    let body = raw
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    Ok((code, body))
}

fn get(port: u16, path: &str, bearer: Option<&str>) -> std::io::Result<(u16, String)> {
    http_get(port, path, bearer, Duration::from_secs(3))
}

/// (state, ppid, pgrp, session) from /proc/<pid>/stat.
fn proc_stat(pid: i32) -> Option<(char, i32, i32, i32)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some((
        f[0].chars().next()?,
        f[1].parse().ok()?,
        f[2].parse().ok()?,
        f[3].parse().ok()?,
    ))
}

fn vm_rss_kb(pid: i32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn alive(pid: i32) -> bool {
    matches!(proc_stat(pid), Some((st, ..)) if st != 'Z' && st != 'X')
}

fn is_stub_binary(pid: i32) -> bool {
    let exe = std::fs::read_link(format!("/proc/{pid}/exe"));
    let stub = std::fs::canonicalize(STUB);
    matches!((exe, stub), (Ok(e), Ok(s)) if e == s)
}

fn children_of(parent: i32) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| matches!(proc_stat(pid), Some((_, pp, ..)) if pp == parent))
        .collect()
}

fn write_config(home: &Path, json: &str) {
    std::fs::create_dir_all(home.join(".openclaw")).unwrap();
    std::fs::write(home.join(".openclaw/openclaw.json"), json).unwrap();
}

fn config(token: &str, log_file: &Path) -> String {
    serde_json::json!({
        "gateway": {"mode": "local", "bind": "loopback", "auth": {"mode": "token", "token": token}},
        "logging": {"file": log_file},
    })
    .to_string()
}

/// A running stub; on drop it SIGKILLs the stub and its helper, whatever the test did.
struct Stub {
    child: Child,
    pid: i32,
    port: u16,
    home: TempDir,
    out: Receiver<String>,
    seen: Vec<String>,
    err: Arc<Mutex<String>>,
    helper: Option<i32>,
    spawned: Instant,
}

impl Stub {
    /// Spawns with a clean env: HOME, PATH and (if given) OPENCLAW_GATEWAY_PORT only.
    fn spawn(home: TempDir, port: u16, env_port: Option<&str>, args: &[&str]) -> Stub {
        let mut cmd = Command::new(STUB);
        cmd.env_clear()
            .env("HOME", home.path())
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(p) = env_port {
            cmd.env("OPENCLAW_GATEWAY_PORT", p);
        }
        let spawned = Instant::now();
        let mut child = cmd.spawn().expect("spawn fleet-stub-agent");
        let (tx, out) = channel();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let err = Arc::new(Mutex::new(String::new()));
        let (err2, mut stderr) = (err.clone(), child.stderr.take().unwrap());
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = stderr.read(&mut buf) {
                err2.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        Stub {
            pid: child.id() as i32,
            child,
            port,
            home,
            out,
            seen: Vec::new(),
            err,
            helper: None,
            spawned,
        }
    }

    /// The common case: a valid config with `token`, port from the environment.
    fn start(token: &str, args: &[&str]) -> Stub {
        let home = TempDir::new().unwrap();
        write_config(
            home.path(),
            &config(token, &home.path().join("logs/agent.log")),
        );
        let port = free_port();
        Stub::spawn(home, port, Some(&port.to_string()), args)
    }

    fn stderr(&self) -> String {
        self.err.lock().unwrap().clone()
    }

    /// Waits until stderr (read by a thread, so it can lag the exit) contains `needle`.
    fn wait_stderr(&self, needle: &str) {
        wait_until(
            &format!("stderr to mention {needle:?}"),
            START_LIMIT,
            || {
                let err = self.stderr();
                if err.contains(needle) {
                    Ok(())
                } else {
                    Err(format!("{err:?}"))
                }
            },
        )
    }

    fn note(&mut self, line: String) {
        if let Some(p) = line.strip_prefix("helper pid=") {
            self.helper = p.trim().parse().ok();
        }
        self.seen.push(line);
    }

    /// Waits for a stdout line containing `needle`.
    fn wait_line(&mut self, needle: &str, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        if let Some(l) = self.seen.iter().find(|l| l.contains(needle)) {
            return l.clone();
        }
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.out.recv_timeout(left) {
                Ok(line) => {
                    let hit = line.contains(needle);
                    self.note(line.clone());
                    if hit {
                        return line;
                    }
                }
                Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => panic!(
                    "no stdout line with {needle:?} within {limit:?}; stdout so far: {:?}; stderr: {:?}",
                    self.seen,
                    self.stderr()
                ),
            }
        }
    }

    fn wait_healthy(&mut self) {
        let port = self.port;
        let child = &mut self.child;
        let err = self.err.clone();
        wait_until("GET /healthz -> 200", START_LIMIT, || {
            if let Ok(Some(st)) = child.try_wait() {
                panic!(
                    "stub exited before healthy: {st:?}; stderr: {:?}",
                    err.lock().unwrap()
                );
            }
            match get(port, "/healthz", None) {
                Ok((200, _)) => Ok(()),
                other => Err(format!("{other:?}")),
            }
        })
    }

    fn wait_helper(&mut self) -> i32 {
        self.wait_line("helper pid=", START_LIMIT);
        self.helper.expect("helper pid line parsed")
    }

    fn signal(&self, sig: i32) {
        assert_eq!(unsafe { libc::kill(self.pid, sig) }, 0, "kill({sig})");
    }

    fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let child = &mut self.child;
        let err = self.err.clone();
        wait_until("the stub to exit", limit, || match child.try_wait() {
            Ok(Some(st)) => Ok(st),
            other => Err(format!(
                "{other:?}; stderr: {:?}",
                err.lock().unwrap().as_str()
            )),
        })
    }
}

impl Drop for Stub {
    fn drop(&mut self) {
        // Children are only looked up while the stub is unreaped, so its pid cannot have been
        // reused by then.
        let mut helpers = Vec::new();
        if let Ok(None) = self.child.try_wait() {
            helpers.extend(children_of(self.pid));
        }
        while let Ok(line) = self.out.try_recv() {
            self.note(line);
        }
        helpers.extend(self.helper);
        for pid in helpers {
            // Only our own binary: keeps a recycled pid safe from us.
            if is_stub_binary(pid) {
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn sigterm_exits_zero_and_writes_start_and_stop_to_its_log_file() {
    let mut s = Stub::start("tok-a", &[]);
    s.wait_healthy();
    let listening = s.wait_line("stub-agent listening on", START_LIMIT);
    assert!(
        listening.contains(&format!("127.0.0.1:{} pid={}", s.port, s.pid)),
        "{listening}"
    );
    s.wait_stderr("stub-agent warning: this is a stand-in");
    s.signal(libc::SIGTERM);
    let st = s.wait_exit(START_LIMIT);
    assert_eq!(st.code(), Some(0), "{st:?}; stderr: {}", s.stderr());
    s.wait_line("stub-agent: shutting down", START_LIMIT);
    let log = std::fs::read_to_string(s.home.path().join("logs/agent.log")).unwrap();
    let lines: Vec<&str> = log.lines().collect();
    assert_eq!(lines.len(), 2, "log file: {log:?}");
    assert!(lines[0].contains("started") && lines[1].contains("stopped"));
    assert!(lines.iter().all(|l| l.contains(&format!("pid={}", s.pid))));
}

#[test]
fn config_problems_exit_78_at_once() {
    // (case, config file, set OPENCLAW_GATEWAY_PORT, what stderr must mention)
    let cases: [(&str, Option<&str>, bool, &str); 5] = [
        ("no config file", None, true, "openclaw.json"),
        ("invalid JSON", Some("{\"gateway\":"), true, "invalid JSON"),
        (
            "no token",
            Some(r#"{"gateway":{"mode":"local","auth":{"mode":"token"}}}"#),
            true,
            "gateway.auth.token",
        ),
        (
            "no port anywhere",
            Some(r#"{"gateway":{"auth":{"token":"t"}}}"#),
            false,
            "port",
        ),
        (
            "bad env port",
            Some(r#"{"gateway":{"auth":{"token":"t"}}}"#),
            true,
            "OPENCLAW_GATEWAY_PORT",
        ),
    ];
    for (name, json, with_env_port, says) in cases {
        let home = TempDir::new().unwrap();
        if let Some(j) = json {
            write_config(home.path(), j);
        }
        let port = free_port();
        let port = port.to_string();
        let env_port = match name {
            "bad env port" => Some("eighty"),
            _ => with_env_port.then_some(port.as_str()),
        };
        let mut s = Stub::spawn(home, 1, env_port, &[]);
        let st = s.wait_exit(START_LIMIT);
        assert_eq!(st.code(), Some(78), "{name}: {st:?}");
        s.wait_stderr(says);
        // Stdout closes (no helper holds it) without a single line: nothing was started.
        match s.out.recv_timeout(START_LIMIT) {
            Err(RecvTimeoutError::Disconnected) => {}
            other => panic!("{name}: expected a silent, closed stdout, got {other:?}"),
        }
    }
}

#[test]
fn whoami_accepts_its_own_token_and_refuses_another_agents() {
    let mut a = Stub::start("token-of-a", &["--no-helper"]);
    let mut b = Stub::start("token-of-b", &["--no-helper"]);
    a.wait_healthy();
    b.wait_healthy();
    assert_eq!(get(a.port, "/whoami", Some("token-of-a")).unwrap().0, 200);
    assert_eq!(get(b.port, "/whoami", Some("token-of-b")).unwrap().0, 200);
    assert_eq!(get(b.port, "/whoami", Some("token-of-a")).unwrap().0, 401);
    assert_eq!(get(a.port, "/whoami", Some("token-of-b")).unwrap().0, 401);
    assert_eq!(get(a.port, "/whoami", None).unwrap().0, 401);
    assert_eq!(get(a.port, "/nothing-here", None).unwrap().0, 404);
    let (code, body) = get(a.port, "/healthz", None).unwrap();
    assert_eq!(
        (code, body.as_str()),
        (200, r#"{"ok":true,"status":"live"}"#)
    );
}

#[test]
fn env_port_wins_over_config_port() {
    let home = TempDir::new().unwrap();
    let (cfg_port, env_port) = (free_port(), free_port());
    assert_ne!(cfg_port, env_port);
    let json = format!(r#"{{"gateway":{{"port":{cfg_port},"auth":{{"token":"t"}}}}}}"#);
    write_config(home.path(), &json);
    let mut s = Stub::spawn(
        home,
        env_port,
        Some(&env_port.to_string()),
        &["--no-helper"],
    );
    s.wait_healthy();
    assert!(
        get(cfg_port, "/healthz", None).is_err(),
        "config port answered too"
    );
}

#[test]
fn config_port_is_used_without_the_env_variable() {
    let home = TempDir::new().unwrap();
    let port = free_port();
    let json = format!(r#"{{"gateway":{{"port":{port},"auth":{{"token":"t"}}}}}}"#);
    write_config(home.path(), &json);
    let mut s = Stub::spawn(home, port, None, &["--no-helper"]);
    s.wait_healthy();
}

#[test]
fn helper_has_its_own_session_and_outlives_the_stub() {
    let mut s = Stub::start("t", &[]);
    s.wait_healthy();
    let helper = s.wait_helper();
    let (_, _, stub_pgrp, stub_sid) = proc_stat(s.pid).expect("stub stat");
    let (state, ppid, pgrp, sid) = proc_stat(helper).expect("helper stat");
    assert_eq!(ppid, s.pid, "helper should be the stub's child");
    assert_eq!(
        (pgrp, sid),
        (helper, helper),
        "helper should lead its own session"
    );
    assert_ne!(pgrp, stub_pgrp);
    assert_ne!(sid, stub_sid);
    assert_ne!(state, 'Z');

    s.signal(libc::SIGTERM);
    assert_eq!(s.wait_exit(START_LIMIT).code(), Some(0));
    assert!(
        alive(helper),
        "helper died with the stub: {:?}",
        proc_stat(helper)
    );
    // The helper must not hold the listening socket: the port is free once the stub is gone.
    TcpListener::bind(("127.0.0.1", s.port)).expect("port still held after the stub exited");
}

#[test]
fn orphan_helper_is_reparented_and_leads_its_own_session() {
    let mut s = Stub::start("t", &["--helper-orphan"]);
    s.wait_healthy();
    let helper = s.wait_helper();
    let (_, _, _, stub_sid) = proc_stat(s.pid).unwrap();
    let (state, ppid, pgrp, sid) = proc_stat(helper).expect("helper stat");
    assert_ne!(ppid, s.pid, "an orphan helper must not be the stub's child");
    assert_eq!((pgrp, sid), (helper, helper));
    assert_ne!(sid, stub_sid);
    assert_ne!(state, 'Z');
    assert!(
        children_of(s.pid).is_empty(),
        "the intermediate child was not reaped"
    );
}

#[test]
fn crash_after_ms_exits_with_the_given_code() {
    let mut s = Stub::start(
        "t",
        &["--no-helper", "--crash-after-ms", "300", "--exit-code", "3"],
    );
    s.wait_healthy();
    let st = s.wait_exit(START_LIMIT);
    assert_eq!(st.code(), Some(3), "{st:?}");
    assert!(s.spawned.elapsed() >= Duration::from_millis(300));
}

#[test]
fn exit_code_alone_exits_at_once_without_config() {
    let mut s = Stub::spawn(TempDir::new().unwrap(), 1, None, &["--exit-code", "5"]);
    assert_eq!(s.wait_exit(START_LIMIT).code(), Some(5));
}

#[test]
fn abort_after_ms_dies_by_signal() {
    let mut s = Stub::start("t", &["--no-helper", "--abort-after-ms", "200"]);
    s.wait_healthy();
    let st = s.wait_exit(START_LIMIT);
    assert_eq!(st.signal(), Some(libc::SIGABRT), "{st:?}");
}

#[test]
fn unknown_flag_exits_2_with_usage() {
    let mut s = Stub::spawn(TempDir::new().unwrap(), 1, None, &["--frobnicate"]);
    assert_eq!(s.wait_exit(START_LIMIT).code(), Some(2));
    s.wait_stderr("usage:");
}

#[test]
fn port_in_use_exits_1_after_the_retry_window() {
    let holder = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = holder.local_addr().unwrap().port();
    let home = TempDir::new().unwrap();
    write_config(home.path(), r#"{"gateway":{"auth":{"token":"t"}}}"#);
    let env_port = port.to_string();
    let mut s = Stub::spawn(home, port, Some(&env_port), &["--bind-retry-ms", "300"]);
    let st = s.wait_exit(START_LIMIT);
    assert_eq!(st.code(), Some(1), "{st:?}");
    assert!(s.spawned.elapsed() >= Duration::from_millis(300));
    s.wait_stderr("cannot bind");
    drop(holder);
}

#[test]
fn hung_healthz_accepts_but_never_answers_and_does_not_block_others() {
    let s = Stub::start("t", &["--no-helper", "--hang-healthz"]);
    let port = s.port;
    wait_until("GET /readyz -> 200", START_LIMIT, || {
        match get(port, "/readyz", None) {
            Ok((200, _)) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut hung = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).expect("accepts");
    hung.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    hung.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut buf = [0u8; 64];
    match hung.read(&mut buf) {
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
        other => panic!("hung /healthz answered: {other:?}"),
    }
    // The hung connection is still open, yet other requests are served.
    assert_eq!(get(port, "/readyz", None).unwrap().0, 200);
}

#[test]
fn ready_only_after_the_ready_delay() {
    let mut s = Stub::start("t", &["--no-helper", "--ready-delay-ms", "1500"]);
    s.wait_healthy();
    let port = s.port;
    if s.spawned.elapsed() < Duration::from_millis(1000) {
        assert_eq!(get(port, "/readyz", None).unwrap().0, 503);
    }
    wait_until("GET /readyz -> 200", START_LIMIT, || {
        match get(port, "/readyz", None) {
            Ok((200, b)) => Ok(b),
            other => Err(format!("{other:?}")),
        }
    });
    assert!(s.spawned.elapsed() >= Duration::from_millis(1500));
}

#[test]
fn ignore_sigterm_keeps_serving() {
    let mut s = Stub::start("t", &["--no-helper", "--ignore-sigterm"]);
    s.wait_healthy();
    s.signal(libc::SIGTERM);
    s.wait_line("ignoring SIGTERM", START_LIMIT);
    assert_eq!(s.child.try_wait().unwrap(), None);
    assert_eq!(get(s.port, "/healthz", None).unwrap().0, 200);
}

#[test]
fn flood_writes_the_asked_bytes_as_lines_then_keeps_serving() {
    let mut s = Stub::start(
        "t",
        &[
            "--no-helper",
            "--flood-bytes",
            "200000",
            "--line-bytes",
            "100",
        ],
    );
    s.wait_healthy();
    let mut flood = 0;
    let deadline = Instant::now() + START_LIMIT;
    while flood < 2000 {
        let left = deadline.saturating_duration_since(Instant::now());
        match s.out.recv_timeout(left) {
            Ok(l) => {
                if l.starts_with("stub-agent flood") {
                    assert_eq!(l.len(), 99, "line without its newline: {l:?}");
                    flood += 1;
                }
            }
            Err(e) => panic!("{e:?} after {flood} flood lines"),
        }
    }
    assert_eq!(get(s.port, "/healthz", None).unwrap().0, 200);
}

#[test]
fn leak_grows_and_spike_comes_back_down() {
    let mut leak = Stub::start("t", &["--no-helper", "--leak-mb-per-s", "20"]);
    let mut spike = Stub::start("t", &["--no-helper", "--spike-mb", "24"]);
    leak.wait_healthy();
    spike.wait_healthy();
    let pid = leak.pid;
    wait_until(
        "leaking stub above 12 MB",
        START_LIMIT,
        || match vm_rss_kb(pid) {
            Some(kb) if kb > 12 * 1024 => Ok(()),
            other => Err(format!("VmRSS {other:?} kB")),
        },
    );
    let pid = spike.pid;
    let peak = vm_rss_kb(pid).unwrap_or(0);
    // The spike is touched before the first probe answers, and lasts 1 s from start.
    if spike.spawned.elapsed() < Duration::from_millis(800) {
        assert!(peak > 20 * 1024, "spike not resident: {peak} kB");
    }
    wait_until(
        "spiking stub back under 8 MB",
        START_LIMIT,
        || match vm_rss_kb(pid) {
            Some(kb) if kb < 8 * 1024 => Ok(()),
            other => Err(format!("VmRSS {other:?} kB")),
        },
    );
}

#[test]
fn idle_stub_and_helper_use_little_memory() {
    let mut s = Stub::start("t", &[]);
    s.wait_healthy();
    let helper = s.wait_helper();
    for _ in 0..5 {
        assert_eq!(get(s.port, "/healthz", None).unwrap().0, 200);
    }
    let stub_kb = vm_rss_kb(s.pid).expect("stub VmRSS");
    let helper_kb = vm_rss_kb(helper).expect("helper VmRSS");
    eprintln!("idle VmRSS: stub {stub_kb} kB, helper {helper_kb} kB");
    assert!(stub_kb < 4096, "stub VmRSS {stub_kb} kB");
    assert!(helper_kb < 4096, "helper VmRSS {helper_kb} kB");
}
