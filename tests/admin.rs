//! The admin doors against the real daemon: every command through `fleetctl`, the `status
//! --json` contract, bad requests on the raw socket, exit codes, owner-only socket (checked
//! with a real connection as another uid), `rm` with and without `--purge`, the `events`
//! stream, token rotation without leaks, the REPL through a pipe, sd_notify readiness, JSON
//! logs, SIGHUP without a spec, and the default state dir for a non-root user.

mod common;

use common::{alive, marked_pids, wait_until, Daemon, FLEETCTL, FLEETD, STUB};
use fleet_commander::admin::socket::Frame;
use fleet_commander::messages::command::Reply;
use serde_json::Value;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(30);

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).to_string()
}
fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

fn json(s: &str) -> Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("not JSON ({e}): {s}"))
}

fn pid_of(row: &Value) -> u32 {
    row["pid"]
        .as_u64()
        .unwrap_or_else(|| panic!("no pid in {row}")) as u32
}

fn ctl_at(socket: &Path, words: &[&str]) -> Output {
    Command::new(FLEETCTL)
        .arg("--socket")
        .arg(socket)
        .args(words)
        .output()
        .expect("run fleetctl")
}

/// Lines a reader thread reads from `r`, as a channel (ends when the stream closes).
fn line_channel(r: impl Read + Send + 'static) -> Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(r).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// Receives lines until one matches `pred`, within `timeout`; every line received goes into
/// `seen`. Panics with what it saw on timeout.
fn recv_until(
    rx: &Receiver<String>,
    seen: &mut Vec<String>,
    timeout: Duration,
    what: &str,
    pred: impl Fn(&str) -> bool,
) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                seen.push(line.clone());
                if pred(&line) {
                    return line;
                }
            }
            Err(e) => panic!("no line {what} within {timeout:?} ({e}); saw: {seen:#?}"),
        }
    }
}

/// A daemon started by the test itself (other arguments, environment, pipes), wrapped in the
/// fixture's `Daemon` so that dropping it kills it and whatever its node started.
struct Custom {
    daemon: Daemon,
    stdin: Option<std::process::ChildStdin>,
    stdout: Option<std::process::ChildStdout>,
}

fn spawn_fleetd(args: &[&str], env: &[(&str, &str)], pipes: bool, socket: Option<&Path>) -> Custom {
    let dir = tempfile::Builder::new()
        .prefix("fleetd-admin")
        .tempdir()
        .expect("tempdir");
    common::searchable(dir.path());
    let state = dir.path().join("state");
    let log = std::fs::File::create(dir.path().join("fleetd.log")).expect("log file");
    let mut cmd = Command::new(FLEETD);
    cmd.arg("--state-dir")
        .arg(&state)
        .args(["--port-range", &common::next_port_range()])
        .args(["--agent-uids", &common::next_uid_range()])
        .args(args)
        .env("FLEET_LOG", "debug")
        .stderr(log.try_clone().unwrap());
    if let Some(s) = socket {
        cmd.arg("--socket").arg(s);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    if pipes {
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped());
    } else {
        cmd.stdin(Stdio::null()).stdout(log);
    }
    let mut child = cmd.spawn().expect("spawn fleetd");
    let stdin = child.stdin.take();
    let stdout = child.stdout.take();
    let daemon = Daemon {
        dir,
        child: Some(child),
        extra_args: vec![],
        run_as: None,
        env: vec![],
    };
    let sock = socket.map(Path::to_path_buf).unwrap_or(daemon.socket());
    wait_until(T, "fleetd to answer on its socket", |seen| {
        let out = ctl_at(&sock, &["fleet", "list"]);
        *seen = stderr(&out);
        out.status.success().then_some(())
    });
    Custom {
        daemon,
        stdin,
        stdout,
    }
}

fn exit_status(child: &mut Child, what: &str) -> std::process::ExitStatus {
    wait_until(Duration::from_secs(60), what, |_| {
        child.try_wait().ok().flatten()
    })
}

fn cmdline(pid: u32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .unwrap_or_default()
        .split(|b| *b == 0)
        .filter(|w| !w.is_empty())
        .map(|w| String::from_utf8_lossy(w).to_string())
        .collect()
}

/// Every column of a borderless table starts at the same offset in each row as in the header.
fn assert_aligned(table: &str) {
    let lines: Vec<&str> = table.lines().collect();
    let header = lines[0].as_bytes();
    // A column starts after two blanks (one blank separates words of a header like LAST EXIT).
    let starts: Vec<usize> = (0..header.len())
        .filter(|&p| {
            header[p] != b' '
                && (p == 0 || (header[p - 1] == b' ' && p >= 2 && header[p - 2] == b' '))
        })
        .collect();
    assert!(starts.len() >= 3, "too few columns in {table}");
    for row in &lines[1..] {
        let r = row.as_bytes();
        for &p in &starts {
            assert!(
                p < r.len() && r[p] != b' ' && (p == 0 || r[p - 1] == b' '),
                "column at {p} not aligned in row {row:?} of\n{table}"
            );
        }
    }
}

fn rows_of(d: &Daemon, fleet: &str) -> Vec<Value> {
    d.status()
        .into_iter()
        .filter(|r| r["fleet"] == fleet)
        .collect()
}

fn wait_state(d: &Daemon, fleet: &str, agent: &str, state: &str) -> Value {
    wait_until(T, &format!("{fleet}/{agent} {state}"), |seen| {
        let row = d.agent(fleet, agent);
        *seen = format!("{row:?}");
        row.filter(|r| r["state"] == state)
    })
}

#[test]
fn every_command_answers_and_shutdown_leaves_nothing() {
    let mut d = Daemon::start();
    let sock_mode = std::fs::metadata(d.socket()).unwrap().mode() & 0o777;
    assert_eq!(sock_mode, 0o600, "socket mode {sock_mode:o}");

    let help = d.ctl(&["help"]);
    for cmd in [
        "fleet create",
        "agent restart",
        "status",
        "token",
        "shutdown",
    ] {
        assert!(help.contains(cmd), "help lacks {cmd}: {help}");
    }
    let help_status = d.ctl(&["help", "status"]);
    assert!(help_status.starts_with("usage: status"), "{help_status}");
    assert_eq!(d.ctl(&["fleet", "list"]).trim(), "no fleets");
    assert_eq!(d.ctl(&["status"]).trim(), "no agents");

    // A multi-word --command arrives as one value and is split into the program's argv.
    d.create_stub_fleet("alpha", 2, "--no-helper --print-every-ms 100", &[]);
    let rows = d.wait_running("alpha", 2, T);
    for r in &rows {
        // Exactly the fields of the protocol's type (its shape is pinned once, in
        // admin::render's tests): a round trip through AgentStatus keeps every key.
        let typed: fleet_commander::messages::command::AgentStatus =
            serde_json::from_value(r.clone()).unwrap_or_else(|e| panic!("{e}: {r}"));
        let keys = |v: &Value| {
            let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
            k.sort();
            k
        };
        assert_eq!(keys(r), keys(&serde_json::to_value(&typed).unwrap()), "{r}");
        assert!(r["pid"].is_u64() && r["port"].is_u64(), "{r}");
        assert!(r["restarts"].is_u64() && r["uptime_s"].is_u64(), "{r}");
        assert!(r["healthy"].is_boolean() && r["ready"].is_boolean(), "{r}");
        assert!(r["rss_bytes"].is_u64() || r["rss_bytes"].is_null(), "{r}");
        assert!(r["last_exit"].is_null(), "{r}");
        let home = PathBuf::from(r["home"].as_str().unwrap());
        assert!(home.starts_with(d.state_dir()) && home.is_dir(), "{r}");
    }
    let argv = cmdline(pid_of(&rows[0]));
    assert_eq!(
        argv,
        vec![STUB, "--no-helper", "--print-every-ms", "100"],
        "agent command line"
    );

    let human = d.ctl(&["status"]);
    assert_eq!(human.lines().count(), 3, "{human}");
    assert!(human.starts_with("FLEET"), "{human}");
    assert_aligned(&human);
    let one = json(&d.ctl(&["status", "alpha/agent-1", "--json"]));
    assert_eq!(one.as_array().map(Vec::len), Some(1), "{one}");
    assert_eq!(one[0]["agent"], "agent-1", "{one}");
    let fleet_rows = json(&d.ctl(&["--json", "status", "alpha"]));
    assert_eq!(fleet_rows.as_array().map(Vec::len), Some(2), "{fleet_rows}");

    let fleets = json(&d.ctl(&["--json", "fleet", "list"]));
    assert_eq!(fleets[0]["fleet"], "alpha", "{fleets}");
    assert_eq!(fleets[0]["agents"], 2, "{fleets}");
    assert_aligned(&d.ctl(&["fleet", "list"]));

    let logs = wait_until(T, "3 log lines of alpha/agent-1", |seen| {
        let out = d.ctl(&["logs", "alpha/agent-1", "-n", "3"]);
        *seen = out.clone();
        (out.lines().count() == 3).then_some(out)
    });
    assert!(!logs.trim().is_empty(), "{logs}");

    let ports = json(&d.ctl(&["--json", "ports"]));
    let leased: Vec<&Value> = ports
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["fleet"] == "alpha")
        .collect();
    assert_eq!(leased.len(), 2, "{ports}");
    for r in &rows {
        assert!(
            leased.iter().any(|p| p["base"] == r["port"]),
            "port {} of {} not among leases {ports}",
            r["port"],
            r["agent"]
        );
    }
    assert_aligned(&d.ctl(&["ports"]));

    let top = json(&d.ctl(&["top", "--json"]));
    let top = top.as_array().unwrap();
    assert_eq!(top.len(), 2, "{top:?}");
    assert!(
        top.iter().all(|r| r["processes"].as_u64() >= Some(1)),
        "{top:?}"
    );
    assert_aligned(&d.ctl(&["top"]));

    // Agent verbs.
    d.ctl(&["agent", "add", "alpha", "agent-3"]);
    let a3 = wait_state(&d, "alpha", "agent-3", "running");
    d.ctl(&["agent", "stop", "alpha/agent-3"]);
    let stopped = d.agent("alpha", "agent-3").unwrap();
    assert_eq!(stopped["state"], "stopped", "{stopped}");
    assert!(stopped["pid"].is_null(), "{stopped}");
    assert!(!alive(pid_of(&a3)), "agent-3's process outlived agent stop");
    d.ctl(&["agent", "start", "alpha/agent-3"]);
    wait_state(&d, "alpha", "agent-3", "running");
    let before = pid_of(&d.agent("alpha", "agent-2").unwrap());
    d.ctl(&["agent", "restart", "alpha/agent-2"]);
    wait_until(T, "alpha/agent-2 running with a new pid", |seen| {
        let r = d.agent("alpha", "agent-2")?;
        *seen = r.to_string();
        (r["state"] == "running" && r["pid"].as_u64() != Some(before as u64)).then_some(())
    });
    d.ctl(&["agent", "rm", "alpha/agent-3"]);
    assert!(d.agent("alpha", "agent-3").is_none(), "{:?}", d.status());

    // Fleet verbs.
    let node = d.node_id();
    assert!(!node.is_empty());
    d.ctl(&["fleet", "stop", "alpha"]);
    let rows = rows_of(&d, "alpha");
    assert!(rows.iter().all(|r| r["state"] == "stopped"), "{rows:?}");
    assert_eq!(marked_pids(&format!("{node}/alpha/")), Vec::<u32>::new());
    d.ctl(&["fleet", "start", "alpha"]);
    let rows = d.wait_running("alpha", 2, T);
    let old: Vec<u32> = rows.iter().map(pid_of).collect();
    d.ctl(&["fleet", "restart", "alpha"]);
    wait_until(T, "alpha restarted with new pids", |seen| {
        let rows = rows_of(&d, "alpha");
        *seen = format!("{rows:?}");
        (rows.len() == 2
            && rows.iter().all(|r| {
                r["state"] == "running" && !old.iter().any(|p| r["pid"].as_u64() == Some(*p as u64))
            }))
        .then_some(())
    });
    d.ctl(&["fleet", "rm", "alpha"]);
    assert_eq!(d.ctl(&["fleet", "list"]).trim(), "no fleets");
    assert_eq!(marked_pids(&format!("{node}/alpha/")), Vec::<u32>::new());

    // `shutdown` through fleetctl: the daemon stops its agents and exits 0.
    d.create_stub_fleet("beta", 2, "", &[]);
    d.wait_running("beta", 2, T);
    assert!(!marked_pids(&format!("{node}/")).is_empty());
    d.ctl(&["shutdown"]);
    let mut child = d.child.take().unwrap();
    let status = exit_status(&mut child, "fleetd to exit after `shutdown`");
    assert!(
        status.success(),
        "fleetd exited with {status}; log:\n{}",
        d.log()
    );
    assert_eq!(marked_pids(&format!("{node}/")), Vec::<u32>::new());
    assert!(!d.socket().exists(), "socket left behind");
}

#[test]
fn rm_keeps_the_home_and_purge_deletes_it() {
    let d = Daemon::start();
    d.create_stub_fleet("keep", 2, "--no-helper", &[]);
    d.create_stub_fleet("gone", 1, "--no-helper", &[]);
    d.create_stub_fleet("kept", 1, "--no-helper", &[]);
    let homes = |fleet: &str| -> Vec<PathBuf> {
        d.wait_running(fleet, rows_of(&d, fleet).len(), T)
            .iter()
            .map(|r| PathBuf::from(r["home"].as_str().unwrap()))
            .collect()
    };
    let keep = homes("keep");
    let gone = homes("gone");
    let kept = homes("kept");
    for h in keep.iter().chain(&gone).chain(&kept) {
        assert!(
            h.starts_with(d.state_dir()) && h.is_dir(),
            "{}",
            h.display()
        );
    }
    let out = d.ctl(&["agent", "rm", "keep/agent-1"]);
    assert!(
        keep[0].is_dir(),
        "plain rm deleted {} ({out})",
        keep[0].display()
    );
    let out = d.ctl(&["agent", "rm", "--purge", "keep/agent-2"]);
    assert!(
        !keep[1].exists(),
        "rm --purge kept {} ({out})",
        keep[1].display()
    );
    let out = d.ctl(&["fleet", "rm", "gone", "--purge"]);
    assert!(
        !gone[0].exists(),
        "fleet rm --purge kept {} ({out})",
        gone[0].display()
    );
    let out = d.ctl(&["fleet", "rm", "kept"]);
    assert!(
        kept[0].is_dir(),
        "fleet rm deleted {} ({out})",
        kept[0].display()
    );
    // Removing what is not there names it.
    let out = d.ctl_output(&["agent", "rm", "keep/agent-9"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(stderr(&out).contains("keep/agent-9"), "{}", stderr(&out));
}

#[test]
fn events_stream_and_token_rotation_never_show_a_token() {
    let d = Daemon::start();
    d.create_stub_fleet("tok", 1, "--no-helper --print-every-ms 50", &[]);
    let row = d.wait_running("tok", 1, T).remove(0);
    let t1 = d.ctl(&["token", "tok/agent-1"]).trim().to_string();
    assert!(
        t1.len() >= 16 && !t1.contains(char::is_whitespace),
        "{t1:?}"
    );
    let home = PathBuf::from(row["home"].as_str().unwrap());
    let config = common::read_file(&home.join(".openclaw/openclaw.json"));
    assert!(
        config.contains(&t1),
        "the agent's config lacks the token shown"
    );

    let mut events = Command::new(FLEETCTL)
        .arg("--socket")
        .arg(d.socket())
        .arg("events")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("fleetctl events");
    let rx = line_channel(events.stdout.take().unwrap());
    let mut seen = Vec::new();
    // The stream has no greeting, so it may subscribe after the first restart: restart until
    // one shows, a bounded number of times.
    let mut shown = None;
    for _ in 0..10 {
        d.ctl(&["agent", "restart", "tok/agent-1"]);
        let deadline = Instant::now() + Duration::from_secs(3);
        while let Ok(l) = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            seen.push(l.clone());
            let stop_seen = seen
                .iter()
                .any(|l| l.contains("tok/agent-1") && l.contains("→ stopping"));
            if stop_seen && l.contains("tok/agent-1") && l.contains("→ running") {
                shown = Some(l);
                break;
            }
        }
        if shown.is_some() {
            break;
        }
    }
    assert!(
        shown.is_some(),
        "no transition to running on the events stream: {seen:#?}"
    );
    assert!(
        seen.iter()
            .any(|l| l.contains("tok/agent-1") && l.contains("→ stopping")),
        "restart did not show a stop: {seen:#?}"
    );

    let old_pid = pid_of(&wait_state(&d, "tok", "agent-1", "running"));
    let t2 = d
        .ctl(&["token", "tok/agent-1", "--rotate"])
        .trim()
        .to_string();
    assert!(
        t2.len() >= 16 && t2 != t1,
        "rotate gave {t2:?} after {t1:?}"
    );
    assert_eq!(d.ctl(&["token", "tok/agent-1"]).trim(), t2);
    wait_until(T, "tok/agent-1 running again with a new pid", |s| {
        let r = d.agent("tok", "agent-1")?;
        *s = r.to_string();
        (r["state"] == "running" && r["pid"].as_u64() != Some(old_pid as u64)).then_some(())
    });
    recv_until(
        &rx,
        &mut seen,
        T,
        "showing the restart after rotation",
        |l| l.contains("tok/agent-1") && l.contains("→ running"),
    );
    let config = common::read_file(&home.join(".openclaw/openclaw.json"));
    assert!(
        config.contains(&t2),
        "the agent's config lacks the rotated token"
    );

    unsafe { libc::kill(events.id() as i32, libc::SIGTERM) };
    let _ = events.wait();
    while let Ok(l) = rx.recv_timeout(Duration::from_secs(5)) {
        seen.push(l);
    }
    let status = d.ctl(&["status", "--json"]) + &d.ctl(&["status"]);
    let logs = d.ctl(&["logs", "tok/agent-1", "-n", "1000"]);
    let daemon_log = d.log();
    for (name, text) in [
        ("events", seen.join("\n")),
        ("status", status),
        ("logs", logs),
        ("fleetd's log", daemon_log),
    ] {
        for t in [&t1, &t2] {
            assert!(!text.contains(t.as_str()), "{name} shows a token: {text}");
        }
    }
    // The daemon still serves after the subscriber went away.
    d.ctl(&["status"]);
}

/// Writes `line` and reads the one frame that answers it.
fn request(conn: &mut UnixStream, reader: &mut impl BufRead, line: &[u8]) -> Frame {
    conn.write_all(line).unwrap();
    conn.write_all(b"\n").unwrap();
    let mut reply = String::new();
    reader.read_line(&mut reply).unwrap();
    serde_json::from_str(&reply).unwrap_or_else(|e| {
        panic!(
            "reply to {:?} is not a frame ({e}): {reply:?}",
            String::from_utf8_lossy(line)
        )
    })
}

#[test]
fn bad_requests_get_errors_and_the_daemon_goes_on() {
    let d = Daemon::start_with(&["--log-format", "json"]);
    d.create_stub_fleet("f", 1, "--no-helper", &[]);
    d.wait_running("f", 1, T);

    let mut conn = UnixStream::connect(d.socket()).unwrap();
    conn.set_read_timeout(Some(T)).unwrap();
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let long = format!("status {}", "x".repeat(10 * 1024));
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("unknown verb", b"frobnicate".to_vec(), "frobnicate"),
        ("typo", b"stauts".to_vec(), "did you mean `status`"),
        ("missing id", b"fleet start".to_vec(), "missing <fleet>"),
        ("bad id", b"agent stop f/../x".to_vec(), "invalid agent id"),
        ("extra words", b"fleet list now".to_vec(), "unexpected word"),
        ("unknown fleet", b"fleet stop nope".to_vec(), "nope"),
        ("empty line", b"".to_vec(), "empty line"),
        ("10 kB line", long.into_bytes(), "8192"),
        ("invalid UTF-8", b"status \xff\xfe".to_vec(), "UTF-8"),
        ("unbalanced quote", b"status \"f".to_vec(), "unbalanced"),
    ];
    for (what, line, needle) in cases {
        match request(&mut conn, &mut reader, &line) {
            Frame::Reply {
                reply: Reply::Error(e),
                ..
            } => {
                let shown = serde_json::to_string(&e).unwrap() + &e.to_string();
                assert!(shown.contains(needle), "{what}: {shown} lacks {needle:?}");
            }
            other => panic!("{what}: expected an error frame, got {other:?}"),
        }
        // The same connection then serves a valid request.
        match request(&mut conn, &mut reader, b"status --json") {
            Frame::Reply {
                reply: Reply::Status(rows),
                json: true,
            } => assert_eq!(rows.len(), 1, "after {what}: {rows:?}"),
            other => panic!("after {what}: expected status rows, got {other:?}"),
        }
    }
    drop(reader);
    drop(conn);

    // fleetctl: exit 0 on success, 1 with the error on stderr for a refused command.
    let ok = d.ctl_output(&["status"]);
    assert_eq!(ok.status.code(), Some(0), "{ok:?}");
    let bad = d.ctl_output(&["stauts"]);
    assert_eq!(bad.status.code(), Some(1), "{bad:?}");
    assert!(stdout(&bad).is_empty(), "{bad:?}");
    assert!(
        stderr(&bad).contains("did you mean `status`"),
        "{}",
        stderr(&bad)
    );
    let bad = d.ctl_output(&["--json", "fleet", "start", "nope"]);
    assert_eq!(bad.status.code(), Some(1), "{bad:?}");
    let err = json(stderr(&bad).trim());
    assert_eq!(err["error"]["fleet"], "nope", "{err}");
    let missing = d.dir.path().join("no-such.sock");
    let bad = ctl_at(&missing, &["status"]);
    assert!(!bad.status.success(), "{bad:?}");
    assert!(stderr(&bad).contains("no-such.sock"), "{}", stderr(&bad));

    // SIGHUP without --spec is logged and ignored.
    let pid = d.pid();
    unsafe { libc::kill(pid as i32, libc::SIGHUP) };
    wait_until(T, "fleetd to log the ignored SIGHUP", |seen| {
        let log = d.log();
        *seen = log.lines().last().unwrap_or_default().to_string();
        log.contains("SIGHUP ignored").then_some(())
    });
    assert!(alive(pid), "SIGHUP killed fleetd");
    assert_eq!(d.status().len(), 1);

    // --log-format json: every line on stderr is one JSON object with a level.
    let log = d.log();
    assert!(log.lines().count() >= 3, "{log}");
    for l in log.lines().filter(|l| !l.trim().is_empty()) {
        let v: Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
        assert!(v["level"].is_string(), "{l}");
    }
}

#[test]
fn the_socket_refuses_another_user() {
    // The socket in a directory anyone may enter, so the socket's own mode is what refuses.
    let open_dir = tempfile::Builder::new()
        .prefix("fleetd-sock")
        .tempdir()
        .unwrap();
    std::fs::set_permissions(open_dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let sock = open_dir.path().join("ctl.sock");
    let c = spawn_fleetd(&["--no-repl"], &[], false, Some(&sock));
    let meta = std::fs::metadata(&sock).unwrap();
    assert_eq!(meta.mode() & 0o777, 0o600, "mode {:o}", meta.mode());
    assert_eq!(meta.uid(), nix::unistd::geteuid().as_raw());
    if !nix::unistd::geteuid().is_root() {
        eprintln!("not root: cannot connect as another uid; checked the mode only");
        return;
    }
    let as_nobody = |words: &[&str]| {
        Command::new("setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                FLEETCTL,
                "--socket",
            ])
            .arg(&sock)
            .args(words)
            .output()
            .expect("setpriv (util-linux) runs fleetctl as uid 65534")
    };
    let out = as_nobody(&["status"]);
    assert!(!out.status.success(), "uid 65534 was served: {out:?}");
    assert!(
        stderr(&out).contains("ermission denied"),
        "{}",
        stderr(&out)
    );

    // Even if the file mode were loosened, the daemon checks the peer's uid itself.
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666)).unwrap();
    let out = as_nobody(&["status"]);
    assert_eq!(out.status.code(), Some(1), "uid 65534 was served: {out:?}");
    assert!(
        stderr(&out).contains("only the daemon's user"),
        "{}",
        stderr(&out)
    );
    assert!(ctl_at(&sock, &["status"]).status.success());
    drop(c);
}

#[test]
fn the_repl_serves_a_pipe_and_eof_keeps_the_daemon() {
    let mut c = spawn_fleetd(&["--repl"], &[], true, None);
    let rx = line_channel(c.stdout.take().unwrap());
    let mut stdin = c.stdin.take().unwrap();
    let mut seen = Vec::new();
    let mut say = |line: &str| {
        stdin.write_all(line.as_bytes()).unwrap();
        stdin.write_all(b"\n").unwrap();
        stdin.flush().unwrap();
    };
    say("help status");
    recv_until(&rx, &mut seen, T, "answering `help status`", |l| {
        l.starts_with("usage: status")
    });
    say("stauts");
    recv_until(&rx, &mut seen, T, "answering `stauts`", |l| {
        l.starts_with("error:") && l.contains("did you mean `status`")
    });
    say(&format!(
        "fleet create r --agents 1 --stride 1 --command '{STUB} --no-helper'"
    ));
    recv_until(&rx, &mut seen, T, "confirming the fleet", |l| {
        l.contains("fleet r created with 1 agents")
    });
    let deadline = Instant::now() + T;
    loop {
        say("status r/agent-1 --json");
        let l = recv_until(&rx, &mut seen, T, "with status JSON", |l| {
            l.starts_with('[')
        });
        if json(&l)[0]["state"] == "running" {
            break;
        }
        assert!(Instant::now() < deadline, "r/agent-1 not running: {l}");
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(stdin);
    let d = &c.daemon;
    wait_until(T, "fleetd to note the closed stdin", |s| {
        *s = d.log().lines().last().unwrap_or_default().to_string();
        d.log().contains("stdin closed").then_some(())
    });
    // EOF did not stop the daemon: the socket still serves, the agent still runs.
    let rows = d.status();
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["state"], "running", "{rows:?}");
    let node = d.node_id();
    d.ctl(&["shutdown"]);
    let mut child = c.daemon.child.take().unwrap();
    let st = exit_status(&mut child, "fleetd to exit after shutdown");
    assert!(st.success(), "{st}; log:\n{}", c.daemon.log());
    assert_eq!(marked_pids(&format!("{node}/")), Vec::<u32>::new());
}

/// `key=value` of `dist/fleetd.service`, the last one winning as in systemd.
fn unit_value(unit: &str, key: &str) -> String {
    unit.lines()
        .rev()
        .find_map(|l| l.trim().strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("dist/fleetd.service has no {key}="))
        .to_string()
}

#[test]
fn the_unit_file_command_notifies_readiness_and_stopping() {
    let unit = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/dist/fleetd.service"))
        .expect("dist/fleetd.service");
    assert_eq!(unit_value(&unit, "Type"), "notify");
    assert_eq!(unit_value(&unit, "KillMode"), "mixed");
    let stop: u64 = unit_value(&unit, "TimeoutStopSec")
        .parse()
        .expect("TimeoutStopSec in seconds");
    assert!(
        stop > 30,
        "TimeoutStopSec={stop} is not above systemd's default"
    );
    // The unit's own command line, with this build's binary and a temporary state dir.
    let exec = unit_value(&unit, "ExecStart");
    let words: Vec<&str> = exec.split_whitespace().collect();
    assert_eq!(words[0], "/usr/local/bin/fleetd", "{exec}");
    let at = words
        .iter()
        .position(|w| *w == "--state-dir")
        .expect("--state-dir in ExecStart");
    let mut args: Vec<&str> = words[1..].to_vec();
    args.drain(at - 1..=at);

    let dir = tempfile::Builder::new()
        .prefix("fleetd-notify")
        .tempdir()
        .unwrap();
    let path = dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&path).unwrap();
    notify.set_read_timeout(Some(T)).unwrap();
    let mut c = spawn_fleetd(
        &args,
        &[("NOTIFY_SOCKET", path.to_str().unwrap())],
        false,
        None,
    );
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let mut recv = |want: &str| loop {
        let n = notify
            .recv(&mut buf)
            .unwrap_or_else(|e| panic!("no {want} on NOTIFY_SOCKET ({e}); got {got:?}"));
        let msg = String::from_utf8_lossy(&buf[..n]).to_string();
        got.push(msg.clone());
        if msg.lines().any(|l| l == want) {
            return;
        }
    };
    recv("READY=1");
    let mut child = c.daemon.child.take().unwrap();
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    recv("STOPPING=1");
    let st = exit_status(&mut child, "fleetd to exit after SIGTERM");
    assert!(st.success(), "{st}; log:\n{}", c.daemon.log());
}

#[test]
fn the_default_state_dir_works_for_a_non_root_user() {
    if !nix::unistd::geteuid().is_root() {
        common::skipped("admin default_state_dir: not root, cannot run fleetd as another user");
        return;
    }
    let home = tempfile::Builder::new()
        .prefix("fleetd-home")
        .tempdir()
        .unwrap();
    std::os::unix::fs::chown(home.path(), Some(65534), Some(65534)).unwrap();
    let as_nobody = |program: &str| {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups", program])
            .env("HOME", home.path())
            .env_remove("XDG_STATE_HOME")
            .env_remove("FLEET_STATE_DIR");
        c
    };
    let log = std::fs::File::create(home.path().join("fleetd.log")).unwrap();
    let mut fleetd = as_nobody(FLEETD)
        .args(["--no-repl", "--port-range", &common::next_port_range()])
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let state = home.path().join(".local/state/fleet-commander");
    let log = || common::read_file(&home.path().join("fleetd.log"));
    // setpriv execs fleetd, so this pid is the daemon's.
    let pid = fleetd.id();
    let ctl = |words: &[&str]| as_nobody(FLEETCTL).args(words).output().unwrap();
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        wait_until(
            T,
            "fleetd (uid 65534) to answer on the default socket",
            |s| {
                let out = ctl(&["fleet", "list"]);
                *s = format!("{}{}", stderr(&out), log());
                out.status.success().then_some(())
            },
        );
        assert!(state.join("fleetd.sock").exists(), "{}", log());
        // The checkout may sit in a directory only root can enter (a `mktemp -d` clone): the
        // agent's program goes where its user can reach it.
        let stub = home.path().join("fleet-stub-agent");
        std::fs::copy(STUB, &stub).unwrap();
        std::os::unix::fs::chown(&stub, Some(65534), Some(65534)).unwrap();
        let cmd = format!("{} --no-helper", stub.display());
        let out = ctl(&[
            "fleet",
            "create",
            "n",
            "--agents",
            "1",
            "--stride",
            "1",
            "--command",
            &cmd,
        ]);
        assert!(out.status.success(), "{out:?}");
        let row = wait_until(T, "n/agent-1 running as uid 65534", |s| {
            let out = ctl(&["status", "--json"]);
            *s = stdout(&out) + &stderr(&out);
            let rows = serde_json::from_str::<Value>(&stdout(&out)).ok()?;
            let row = rows.get(0)?.clone();
            (row["state"] == "running").then_some(row)
        });
        let home_dir = PathBuf::from(row["home"].as_str().unwrap());
        assert!(home_dir.starts_with(&state), "{row}");
        let owner = std::fs::metadata(format!("/proc/{}", pid_of(&row)))
            .unwrap()
            .uid();
        assert_eq!(owner, 65534, "agent runs as uid {owner}");
    }));
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let st = exit_status(&mut fleetd, "fleetd (uid 65534) to exit after SIGTERM");
    if let Err(p) = outcome {
        std::panic::resume_unwind(p);
    }
    assert!(st.success(), "{st}; log:\n{}", log());
    let node: Value =
        serde_json::from_str(&common::read_file(&state.join("registry.json"))).unwrap();
    let id = node["node_id"].as_str().unwrap();
    assert_eq!(marked_pids(&format!("{id}/")), Vec::<u32>::new());
}
