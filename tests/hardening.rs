//! What a careless or hostile operator (or a hostile client) must not be able to do to the
//! daemon, driven through its real doors: two daemons on one state dir, typos that destroy,
//! files that hang or exhaust it, a damaged registry, argument injection, descriptor
//! exhaustion, failed starts that stay failed, replies that lie, helpers that escape the
//! accounting, and removals racing re-creations.

mod common;

use common::{alive, marked_pids, wait_until, Daemon, FLEETCTL, FLEETD, STUB};
use serde_json::Value;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Runs fleetd with `args` and expects it to give up by itself; returns its exit code and
/// stderr.
fn fleetd_refuses(args: &[&str]) -> (i32, String) {
    let mut child = Command::new(FLEETD)
        .args(args)
        .arg("--no-repl")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn fleetd");
    let status = wait_until(Duration::from_secs(30), "fleetd to give up", |_| {
        child.try_wait().ok().flatten()
    });
    let mut err = String::new();
    let _ = child.stderr.take().unwrap().read_to_string(&mut err);
    (status.code().unwrap_or(-1), err)
}

/// Writes `text` as a spec in `dir` and starts fleetd on it (and `extra`), expecting a refusal.
fn spec_refused(dir: &Path, text: &str, extra: &[&str]) -> (i32, String) {
    let spec = dir.join("fleets.toml");
    std::fs::write(&spec, text).unwrap();
    let state = dir.join("state");
    let mut args = vec![
        "--state-dir",
        state.to_str().unwrap(),
        "--spec",
        spec.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    fleetd_refuses(&args)
}

fn ctl_at(socket: &Path, words: &[&str]) -> Output {
    Command::new(FLEETCTL)
        .arg("--socket")
        .arg(socket)
        .args(words)
        .output()
        .expect("run fleetctl")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn fleets(d: &Daemon) -> Vec<String> {
    let v: Value = serde_json::from_str(&d.ctl(&["--json", "fleet", "list"])).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|f| f["fleet"].as_str().unwrap().to_string())
        .collect()
}

fn pids(d: &Daemon, fleet: &str) -> Vec<u64> {
    d.status()
        .iter()
        .filter(|r| r["fleet"] == fleet)
        .filter_map(|r| r["pid"].as_u64())
        .collect()
}

fn registry(d: &Daemon) -> Vec<u8> {
    std::fs::read(d.state_dir().join("registry.json")).unwrap()
}

// ---- data loss and duplicate agents -------------------------------------------------------

#[test]
fn a_second_daemon_on_the_same_state_dir_stops_before_touching_anything() {
    let d = Daemon::start();
    d.create_stub_fleet("f", 2, "--no-helper", &[]);
    let before = d.wait_running("f", 2, Duration::from_secs(20));
    let before_pids: Vec<u64> = before.iter().map(|r| r["pid"].as_u64().unwrap()).collect();
    // The first daemon records its agents' pids a moment after they start: wait for that.
    let reg = wait_until(Duration::from_secs(10), "both pids in the registry", |_| {
        let r = registry(&d);
        let text = String::from_utf8_lossy(&r).to_string();
        before_pids
            .iter()
            .all(|p| text.contains(&format!("\"pid\": {p}")))
            .then_some(r)
    });
    let state = d.state_dir();
    let other_socket = d.dir.path().join("other.sock");
    let holder = format!("fleetd pid {}", d.pid());
    // Another socket (it used to run every agent twice) and the same socket.
    for socket in [other_socket.as_path(), d.socket().as_path()] {
        let (code, err) = fleetd_refuses(&[
            "--state-dir",
            state.to_str().unwrap(),
            "--socket",
            socket.to_str().unwrap(),
        ]);
        assert_ne!(code, 0, "{err}");
        assert!(
            err.contains(&holder) || err.contains("served by another running daemon"),
            "{err}"
        );
    }
    let (_, err) = fleetd_refuses(&[
        "--state-dir",
        state.to_str().unwrap(),
        "--socket",
        other_socket.to_str().unwrap(),
    ]);
    assert!(err.contains(&holder), "the holder is named: {err}");
    assert!(!other_socket.exists(), "the refused daemon left a socket");
    for p in &before_pids {
        assert!(alive(*p as u32), "agent {p} of the first daemon was killed");
    }
    assert_eq!(pids(&d, "f"), before_pids, "agents were replaced");
    assert_eq!(registry(&d), reg, "the registry was rewritten");
}

#[test]
fn typos_in_paths_never_destroy_what_is_there() {
    let dir = tempfile::tempdir().unwrap();
    // --socket naming an operator's file, directory or link: refused, left as it was.
    let file = dir.path().join("notes.txt");
    std::fs::write(&file, b"precious").unwrap();
    let sub = dir.path().join("adir");
    std::fs::create_dir(&sub).unwrap();
    let link = dir.path().join("link");
    std::os::unix::fs::symlink(&file, &link).unwrap();
    for (i, target) in [&file, &sub, &link].into_iter().enumerate() {
        let state = dir.path().join(format!("state{i}"));
        let (code, err) = fleetd_refuses(&[
            "--state-dir",
            state.to_str().unwrap(),
            "--socket",
            target.to_str().unwrap(),
        ]);
        assert_ne!(code, 0);
        assert!(err.contains("refusing to replace it"), "{err}");
        assert!(
            !state.join("registry.json").exists(),
            "the node started: {err}"
        );
    }
    assert_eq!(std::fs::read(&file).unwrap(), b"precious");
    assert!(sub.is_dir());
    assert!(std::fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());

    // A state dir others may write to: refused, its mode left alone, nothing written.
    for mode in [0o1777, 0o777, 0o770] {
        let state = dir.path().join(format!("open-{mode:o}"));
        std::fs::create_dir(&state).unwrap();
        std::fs::set_permissions(&state, std::fs::Permissions::from_mode(mode)).unwrap();
        let (code, err) = fleetd_refuses(&["--state-dir", state.to_str().unwrap()]);
        assert_ne!(code, 0);
        assert!(err.contains(&format!("{mode:04o}")), "{err}");
        let now = std::fs::metadata(&state).unwrap().permissions().mode() & 0o7777;
        assert_eq!(now, mode, "the state dir was chmod-ed");
        assert_eq!(
            std::fs::read_dir(&state).unwrap().count(),
            0,
            "files written"
        );
    }
    // Another user's state dir (needs root to make one).
    if nix::unistd::geteuid().is_root() {
        let state = dir.path().join("nobody");
        std::fs::create_dir(&state).unwrap();
        std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700)).unwrap();
        nix::unistd::chown(&state, Some(65534.into()), Some(65534.into())).unwrap();
        let (code, err) = fleetd_refuses(&["--state-dir", state.to_str().unwrap()]);
        assert_ne!(code, 0);
        assert!(err.contains("owned by uid 65534"), "{err}");
    } else {
        common::skipped("hardening: a state dir owned by another user (needs root)");
    }
}

// ---- crashes and hangs from input ---------------------------------------------------------

#[test]
fn bad_templates_are_refused_at_the_door_and_an_accepted_one_cannot_break_a_start() {
    let d = Daemon::start();
    let dir = d.dir.path();
    let fifo = dir.join("fifo.json");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    std::fs::write(dir.join("array.json"), "[1,2]").unwrap();
    std::fs::write(dir.join("bad.json"), "{\"a\": }").unwrap();
    std::fs::write(dir.join("big.json"), vec![b' '; 2 * 1024 * 1024]).unwrap();
    let zero_link = dir.join("zero.json");
    std::os::unix::fs::symlink("/dev/zero", &zero_link).unwrap();
    let cmd = format!("{STUB} --no-helper");
    let cases: Vec<(PathBuf, &str)> = vec![
        (PathBuf::from("/dev/zero"), "not a regular file"),
        (zero_link, "not a regular file"),
        (fifo, "a FIFO"),
        (dir.join("missing.json"), "does not exist"),
        (dir.to_path_buf(), "a directory"),
        (dir.join("array.json"), "must be a JSON object"),
        (dir.join("bad.json"), "invalid JSON at line 1"),
        (dir.join("big.json"), "more than the limit"),
    ];
    for (i, (path, want)) in cases.iter().enumerate() {
        let name = format!("t{i}");
        let t = Instant::now();
        let out = d.ctl_output(&[
            "fleet",
            "create",
            &name,
            "--agents",
            "1",
            "--command",
            &cmd,
            "--stride",
            "1",
            "--template",
            path.to_str().unwrap(),
        ]);
        assert!(!out.status.success(), "{} accepted", path.display());
        let msg = text(&out);
        assert!(msg.contains("template") && msg.contains(want), "{msg}");
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "{} took {:?}",
            path.display(),
            t.elapsed()
        );
    }
    // A command that does not exist: refused too, before any agent exists.
    let out = d.ctl_output(&[
        "fleet",
        "create",
        "nocmd",
        "--agents",
        "1",
        "--command",
        "/nonexistent/agent",
    ]);
    assert!(text(&out).contains("cannot be run"), "{}", text(&out));
    assert!(
        fleets(&d).is_empty(),
        "refused creates left fleets: {:?}",
        fleets(&d)
    );

    // Accepted, then the file is replaced by a FIFO: restarts (and a daemon restart) render
    // what was accepted.
    let good = dir.join("good.json");
    std::fs::write(&good, r#"{"custom": {"mark": "accepted"}}"#).unwrap();
    d.ctl(&[
        "fleet",
        "create",
        "ok",
        "--agents",
        "1",
        "--command",
        &cmd,
        "--stride",
        "1",
        "--template",
        good.to_str().unwrap(),
    ]);
    d.wait_running("ok", 1, Duration::from_secs(20));
    std::fs::remove_file(&good).unwrap();
    nix::unistd::mkfifo(&good, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let mut d = d;
    d.kill9();
    d.launch();
    let rows = d.wait_running("ok", 1, Duration::from_secs(30));
    let home = rows[0]["home"].as_str().unwrap();
    let config = std::fs::read_to_string(Path::new(home).join(".openclaw/openclaw.json")).unwrap();
    assert!(config.contains("accepted"), "{config}");
}

#[test]
fn a_damaged_registry_is_refused_with_its_location_and_left_untouched() {
    let d = Daemon::start();
    d.create_stub_fleet("f", 2, "--no-helper", &[]);
    d.wait_running("f", 2, Duration::from_secs(20));
    let state = d.state_dir();
    let good: Value = serde_json::from_slice(&registry(&d)).unwrap();
    let mut d = d;
    d.stop();
    type Edit = fn(&mut Value);
    let cases: Vec<(&str, Edit, &str)> = vec![
        (
            "dotdot",
            |r| {
                let f = &mut r["fleets"]["f"];
                let a = f["agents"]["agent-1"].take();
                f["agents"].as_object_mut().unwrap().remove("agent-1");
                f["agents"]["../../etc"] = a;
                f["spec"]["agents"][0] = "../../etc".into();
            },
            "agents[0]",
        ),
        (
            "port",
            |r| r["fleets"]["f"]["agents"]["agent-1"]["port_base"] = 80.into(),
            "outside the port range",
        ),
        (
            "stride",
            |r| r["fleets"]["f"]["agents"]["agent-1"]["stride"] = 0.into(),
            "agents.agent-1.stride",
        ),
        (
            "dup",
            |r| {
                let b = r["fleets"]["f"]["agents"]["agent-1"]["port_base"].clone();
                r["fleets"]["f"]["agents"]["agent-2"]["port_base"] = b;
            },
            "overlaps",
        ),
        (
            "command",
            |r| r["fleets"]["f"]["spec"]["command"] = serde_json::json!([]),
            "spec.command",
        ),
    ];
    for (what, edit, want) in cases {
        let mut r = good.clone();
        edit(&mut r);
        let bytes = serde_json::to_vec_pretty(&r).unwrap();
        std::fs::write(state.join("registry.json"), &bytes).unwrap();
        let range = d.extra_args[1].clone();
        let (code, err) = fleetd_refuses(&[
            "--state-dir",
            state.to_str().unwrap(),
            "--port-range",
            &range,
        ]);
        assert_eq!(
            code, 78,
            "{what}: EX_CONFIG, so systemd does not loop: {err}"
        );
        assert!(
            err.contains("registry.json") && err.contains(want),
            "{what}: {err}"
        );
        assert!(!err.contains("panicked"), "{what}: {err}");
        assert_eq!(
            std::fs::read(state.join("registry.json")).unwrap(),
            bytes,
            "{what}: rewritten"
        );
    }
}

#[test]
fn the_repl_on_a_pipe_goes_on_after_invalid_utf8_and_overlong_lines() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let mut child = Command::new(FLEETD)
        .arg("--state-dir")
        .arg(&state)
        .arg("--repl")
        .arg("--port-range")
        .arg(common::next_port_range())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut input = Vec::new();
    input.extend_from_slice(b"fleet list\n");
    input.extend_from_slice(&[0xff, 0xfe, b' ', b's', b'\n']);
    input.extend(std::iter::repeat_n(b'x', 20_000));
    input.extend_from_slice(b"\nhelp status\nshutdown\n");
    stdin.write_all(&input).unwrap();
    drop(stdin);
    let status = wait_until(Duration::from_secs(30), "fleetd to take `shutdown`", |_| {
        child.try_wait().ok().flatten()
    });
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    assert!(status.success(), "{out}");
    assert!(out.contains("not valid UTF-8"), "{out}");
    assert!(out.contains("longer than"), "{out}");
    assert!(out.contains("usage") || out.contains("status"), "{out}");
    assert!(out.contains("shutting down"), "{out}");
}

// ---- the control plane --------------------------------------------------------------------

#[test]
fn no_byte_of_an_argument_can_inject_a_second_request() {
    let d = Daemon::start();
    d.create_stub_fleet("f", 0, "--no-helper", &[]);
    let mut chars: Vec<u8> = (1u8..0x20).collect();
    chars.push(0x7f);
    for c in chars {
        let c = c as char;
        let evil = format!("x'{c}fleet create injected{c}");
        let out = d.ctl_output(&["agent", "add", "f", &evil]);
        assert!(!out.status.success(), "{c:?}: {}", text(&out));
        let out = d.ctl_output(&["fleet", "create", &format!("a{c}b")]);
        assert!(!out.status.success(), "{c:?}: {}", text(&out));
    }
    let out = d.ctl_output(&["agent", "add", "f", "'\nfleet create injected\n"]);
    assert!(!out.status.success());
    assert_eq!(fleets(&d), vec!["f".to_string()], "a request was injected");
    // A typed request that skips the client's parser is checked by the daemon.
    let mut s = std::os::unix::net::UnixStream::connect(d.socket()).unwrap();
    s.write_all(
        b"{\"command\":{\"cmd\":\"agent_add\",\"fleet\":\"f\",\"agent\":\"../x\"},\"json\":true}\n",
    )
    .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(&s), &mut line).unwrap();
    assert!(
        line.contains("invalid_id") && line.contains("../x"),
        "{line}"
    );
    assert!(d.status().is_empty());
}

#[test]
fn idle_clients_cannot_exhaust_the_daemons_descriptors() {
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let socket = state.join("fleetd.sock");
    let metrics_port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let log = std::fs::File::create(dir.path().join("fleetd.log")).unwrap();
    let mut cmd = Command::new(FLEETD);
    cmd.arg("--state-dir")
        .arg(&state)
        .arg("--no-repl")
        .arg("--port-range")
        .arg(common::next_port_range())
        .arg("--metrics-addr")
        .arg(metrics_port.to_string())
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    unsafe {
        cmd.pre_exec(|| {
            let lim = libc::rlimit {
                rlim_cur: 256,
                rlim_max: 256,
            };
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    let daemon_pid = child.id();
    struct Kill(u32);
    impl Drop for Kill {
        fn drop(&mut self) {
            unsafe { libc::kill(self.0 as i32, libc::SIGKILL) };
        }
    }
    let _guard = Kill(daemon_pid);
    wait_until(Duration::from_secs(20), "the socket", |_| {
        ctl_at(&socket, &["fleet", "list"])
            .status
            .success()
            .then_some(())
    });
    let stub = format!("{STUB} --no-helper");
    let out = ctl_at(
        &socket,
        &[
            "fleet",
            "create",
            "f",
            "--agents",
            "1",
            "--command",
            &stub,
            "--stride",
            "1",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    let row = |socket: &Path| -> Option<Value> {
        let o = ctl_at(socket, &["--json", "status"]);
        let v: Value = serde_json::from_slice(&o.stdout).ok()?;
        v.as_array()?.first().cloned()
    };
    let first = wait_until(Duration::from_secs(20), "agent running", |seen| {
        let r = row(&socket)?;
        *seen = r.to_string();
        (r["state"] == "running").then_some(r)
    });
    // Idle connections over both doors: more than the daemon's whole descriptor limit.
    let mut held = Vec::new();
    // (A connect blocks once the listen backlog of 128 is full: 150 of each stay near it, and
    // a TCP connect that is not taken at once is given up.)
    for _ in 0..150 {
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], metrics_port));
        if let Ok(s) = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
            held.push(Box::new(s) as Box<dyn std::any::Any>);
        }
        if let Ok(s) = std::os::unix::net::UnixStream::connect(&socket) {
            held.push(Box::new(s) as Box<dyn std::any::Any>);
        }
    }
    assert!(held.len() > 256, "only {} connections held", held.len());
    // A crash while they are held: the restart needs descriptors.
    let pid = first["pid"].as_u64().unwrap() as i32;
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let fds = || {
        std::fs::read_dir(format!("/proc/{daemon_pid}/fd"))
            .map(|d| d.count())
            .unwrap_or(0)
    };
    // Watched without the doors (the test holds them busy): the registry records the new
    // process, and the agent's own port answers.
    let port = first["port"].as_u64().unwrap() as u16;
    let reg = state.join("registry.json");
    let mut most = 0;
    wait_until(
        Duration::from_secs(60),
        "the crashed agent running again",
        |seen| {
            most = most.max(fds());
            let r: Value = serde_json::from_slice(&std::fs::read(&reg).ok()?).ok()?;
            let now = r["fleets"]["f"]["agents"]["agent-1"]["process"]["pid"].as_u64()?;
            *seen = format!("pid {now} (daemon fds {})", fds());
            (now != pid as u64
                && alive(now as u32)
                && common::http_get(port, "/healthz") == Some(200))
            .then_some(())
        },
    );
    assert!(most < 240, "the daemon held {most} of its 256 descriptors");
    assert!(alive(daemon_pid), "the daemon died");
    // The doors answer again once the idle clients are gone.
    drop(held);
    wait_until(Duration::from_secs(30), "a scrape", |_| {
        (common::http_get(metrics_port, "/metrics") == Some(200)).then_some(())
    });
    let after = wait_until(Duration::from_secs(60), "the socket answering", |_| {
        row(&socket)
    });
    let _ = child.kill();
    let _ = child.wait();
    assert!(after["restarts"].as_u64().unwrap() >= 1, "{after}");
    let _ = child.kill();
    let _ = child.wait();
}

// ---- recovery -----------------------------------------------------------------------------

#[test]
fn a_failed_start_is_retried_and_heals_when_its_cause_goes() {
    let d = Daemon::start();
    d.create_stub_fleet("f", 0, "--no-helper", &[]);
    // The config cannot be written: a non-empty directory stands where it goes.
    let home = d.state_dir().join("fleets/f/a");
    let blocker = home.join(".openclaw/openclaw.json");
    std::fs::create_dir_all(blocker.join("x")).unwrap();
    d.ctl(&["agent", "add", "f", "a"]);
    let seen = wait_until(
        Duration::from_secs(20),
        "a start failure in backoff",
        |seen| {
            let r = d.agent("f", "a")?;
            *seen = r.to_string();
            (r["state"] == "backoff"
                && r["reason"]
                    .as_str()
                    .is_some_and(|s| s.contains("start failed")))
            .then_some(r)
        },
    );
    assert_ne!(seen["state"], "failed");
    std::fs::remove_dir_all(&blocker).unwrap();
    let r = wait_until(
        Duration::from_secs(30),
        "the agent running once the cause is gone",
        |seen| {
            let r = d.agent("f", "a")?;
            *seen = r.to_string();
            (r["state"] == "running").then_some(r)
        },
    );
    assert!(r["restarts"].as_u64().unwrap() >= 1);
}

#[test]
fn an_error_reply_means_nothing_changed() {
    let d = Daemon::start();
    d.create_stub_fleet("f", 2, "--no-helper", &[]);
    d.wait_running("f", 2, Duration::from_secs(20));
    // A purge that must be refused: the HOME is a link out of the state dir.
    d.ctl(&["agent", "stop", "f/agent-1"]);
    let home = d.state_dir().join("fleets/f/agent-1");
    let outside = d.dir.path().join("outside-home");
    std::fs::rename(&home, &outside).unwrap();
    std::os::unix::fs::symlink(&outside, &home).unwrap();
    let reg = registry(&d);
    let out = d.ctl_output(&["agent", "rm", "f/agent-1", "--purge"]);
    assert!(!out.status.success());
    assert!(text(&out).contains("refusing to purge"), "{}", text(&out));
    assert!(
        d.agent("f", "agent-1").is_some(),
        "the agent was removed anyway"
    );
    assert_eq!(registry(&d), reg, "the registry changed");
    assert!(outside.exists());
    let out = d.ctl_output(&["fleet", "rm", "f", "--purge"]);
    assert!(!out.status.success(), "{}", text(&out));
    assert_eq!(
        d.status().len(),
        2,
        "fleet rm --purge removed agents it refused to purge"
    );

    // A token rotation whose save fails: same token, same process.
    let before = d.ctl(&["token", "f/agent-2"]);
    let pid = d.agent("f", "agent-2").unwrap()["pid"].clone();
    let tmp = d.state_dir().join(".registry.json.tmp");
    std::fs::create_dir_all(tmp.join("x")).unwrap();
    let out = d.ctl_output(&["token", "f/agent-2", "--rotate"]);
    assert!(!out.status.success(), "{}", text(&out));
    assert_eq!(d.ctl(&["token", "f/agent-2"]), before, "the token changed");
    assert_eq!(
        d.agent("f", "agent-2").unwrap()["pid"],
        pid,
        "the agent restarted"
    );
    std::fs::remove_dir_all(&tmp).unwrap();
}

#[test]
fn memory_top_and_stop_agree_on_a_setsid_helper() {
    let d = Daemon::start();
    d.create_stub_fleet("f", 1, "--helper-orphan --helper-mb 64", &[]);
    d.wait_running("f", 1, Duration::from_secs(20));
    let rss = wait_until(
        Duration::from_secs(30),
        "the helper's memory in status",
        |seen| {
            let r = d.agent("f", "agent-1")?;
            *seen = r.to_string();
            let rss = r["rss_bytes"].as_u64()?;
            (rss > 60 << 20).then_some(rss)
        },
    );
    assert!(rss > 60 << 20);
    let top: Value = serde_json::from_str(&d.ctl(&["--json", "top"])).unwrap();
    let row = &top[0];
    assert!(row["processes"].as_u64().unwrap() >= 2, "{row}");
    assert!(row["rss_bytes"].as_u64().unwrap() > 60 << 20, "{row}");
    let node = d.node_id();
    d.ctl(&["agent", "stop", "f/agent-1"]);
    wait_until(Duration::from_secs(10), "no marked process left", |seen| {
        let left = marked_pids(&format!("{node}/"));
        *seen = format!("{left:?}");
        left.is_empty().then_some(())
    });
}

#[test]
fn logs_redact_earlier_tokens_too() {
    let d = Daemon::start();
    let script =
        format!("sh -c 'cat \"$HOME/.openclaw/openclaw.json\"; echo; exec {STUB} --no-helper'");
    d.ctl(&[
        "fleet",
        "create",
        "f",
        "--agents",
        "1",
        "--command",
        &script,
        "--stride",
        "1",
    ]);
    d.wait_running("f", 1, Duration::from_secs(20));
    let first = d.ctl(&["token", "f/agent-1"]).trim().to_string();
    let second = d
        .ctl(&["token", "f/agent-1", "--rotate"])
        .trim()
        .to_string();
    assert_ne!(first, second);
    wait_until(
        Duration::from_secs(20),
        "both tokens in the raw log",
        |_| {
            let raw =
                std::fs::read_to_string(d.state_dir().join("logs/f/agent-1/agent.log")).ok()?;
            (raw.contains(&first) && raw.contains(&second)).then_some(())
        },
    );
    let logs = d.ctl(&["logs", "f/agent-1", "-n", "200"]);
    assert!(!logs.contains(&first), "old token shown: {logs}");
    assert!(!logs.contains(&second), "current token shown: {logs}");
}

#[test]
fn a_fifo_in_place_of_an_agents_log_never_hangs_the_daemon() {
    let d = Daemon::start();
    d.create_stub_fleet("f", 1, "--no-helper", &[]);
    d.wait_running("f", 1, Duration::from_secs(20));
    d.ctl(&["agent", "stop", "f/agent-1"]);
    // The agent's log lives outside its HOME now, but a FIFO there (a mistake, a restored
    // backup) must still never hang the daemon.
    let log = d.state_dir().join("logs/f/agent-1/agent.log");
    std::fs::remove_file(&log).unwrap();
    nix::unistd::mkfifo(&log, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let t = Instant::now();
    let out = d.ctl_output(&["logs", "f/agent-1"]);
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "logs blocked {:?}",
        t.elapsed()
    );
    assert!(!text(&out).contains("panicked"), "{}", text(&out));
    d.ctl(&["agent", "start", "f/agent-1"]);
    d.wait_running("f", 1, Duration::from_secs(20));
    assert!(d.ctl_output(&["fleet", "list"]).status.success());
}

// ---- reload owns only what the spec declares ----------------------------------------------

#[test]
fn reload_changes_only_the_spec_fleets_and_says_what_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("fleets.toml");
    let write = |agents: u32, extra: &str| {
        std::fs::write(
            &spec,
            format!(
                "[[fleet]]\nname = \"s\"\nagents = {agents}\ncommand = \"{STUB} --no-helper\"\nstride = 1\n{extra}"
            ),
        )
        .unwrap();
    };
    write(2, "");
    let d = Daemon::start_with(&["--spec", spec.to_str().unwrap()]);
    d.wait_running("s", 2, Duration::from_secs(20));
    d.create_stub_fleet("c", 1, "--no-helper", &[]);
    d.wait_running("c", 1, Duration::from_secs(20));

    // Commands may not change the spec's fleets.
    let out = d.ctl_output(&["agent", "add", "s", "x"]);
    assert!(
        text(&out).contains("declared in the spec file"),
        "{}",
        text(&out)
    );
    let out = d.ctl_output(&["fleet", "rm", "s"]);
    assert!(
        text(&out).contains("declared in the spec file"),
        "{}",
        text(&out)
    );

    // reload keeps the command's fleet; --dry-run changes nothing and names the change.
    assert!(d.ctl(&["reload"]).contains("0 changes"));
    assert_eq!(fleets(&d), vec!["c".to_string(), "s".to_string()]);
    write(3, "");
    let pids_before = pids(&d, "s");
    let dry = d.ctl(&["reload", "--dry-run"]);
    assert!(dry.contains("add agent s/agent-3"), "{dry}");
    assert_eq!(d.status().iter().filter(|r| r["fleet"] == "s").count(), 2);
    let done = d.ctl(&["reload"]);
    assert!(done.contains("add agent s/agent-3"), "{done}");
    d.wait_running("s", 3, Duration::from_secs(20));
    assert_eq!(
        &pids(&d, "s")[..2],
        &pids_before[..],
        "unchanged agents restarted"
    );
    assert!(
        d.log().contains("add agent s/agent-3"),
        "the change is not in the log"
    );

    // A spec fleet may not take a command fleet's name: refused whole.
    std::fs::write(
        &spec,
        format!(
            "[[fleet]]\nname = \"s\"\nagents = 1\ncommand = \"{STUB}\"\nstride = 1\n[[fleet]]\nname = \"c\"\nagents = 1\ncommand = \"{STUB}\"\nstride = 1\n"
        ),
    )
    .unwrap();
    let out = d.ctl_output(&["reload"]);
    assert!(!out.status.success());
    assert!(text(&out).contains("made by a command"), "{}", text(&out));
    assert_eq!(
        d.status().iter().filter(|r| r["fleet"] == "s").count(),
        3,
        "a refused reload changed s"
    );

    // The spec swapped for a device: refused at once.
    std::fs::remove_file(&spec).unwrap();
    std::os::unix::fs::symlink("/dev/zero", &spec).unwrap();
    let out = d.ctl_output(&["reload"]);
    assert!(text(&out).contains("not a regular file"), "{}", text(&out));
}

#[test]
fn a_spec_that_cannot_be_applied_fails_the_start() {
    let dir = tempfile::tempdir().unwrap();
    // Five agents, three ports.
    let text = format!("[[fleet]]\nname = \"s\"\nagents = 5\ncommand = \"{STUB}\"\nstride = 1\n");
    let (code, err) = spec_refused(dir.path(), &text, &["--port-range", "39990-39992"]);
    assert_eq!(code, 78, "{err}");
    assert!(err.contains("applying the spec"), "{err}");
}

#[test]
fn env_values_that_fleetd_cannot_honour_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    for (env, want) in [
        ("env = { K = \"a\\u0000b\" }", "NUL"),
        ("env = { HOME = \"/root\" }", "cannot be overridden"),
        (
            "env = { FLEET_COMMANDER_AGENT = \"x\" }",
            "cannot be overridden",
        ),
    ] {
        let text = format!("[[fleet]]\nname = \"s\"\nagents = 1\ncommand = \"{STUB}\"\n{env}\n");
        let (code, err) = spec_refused(dir.path(), &text, &[]);
        assert_eq!(code, 78, "{env}: {err}");
        assert!(err.contains(want), "{env}: {err}");
    }
    let list: Vec<String> = (0..10_001).map(|i| format!("\"a{i}\"")).collect();
    let text = format!(
        "[[fleet]]\nname = \"s\"\nagents = [{}]\ncommand = \"{STUB}\"\n",
        list.join(",")
    );
    let (_, err) = spec_refused(dir.path(), &text, &[]);
    assert!(err.contains("more than 10000"), "{err}");
}

// ---- removal racing re-creation -----------------------------------------------------------

/// 20 clients create, remove, purge and re-create the same names for a bounded time, with
/// agents that take a second to stop; afterwards registry, status, leases, HOMEs and live
/// processes must agree exactly.
#[test]
fn removals_and_recreations_of_the_same_names_stay_consistent() {
    let d = Daemon::start();
    let socket = d.socket();
    let stub = format!("{STUB} --no-helper --term-delay-ms 1000");
    let deadline = Instant::now() + Duration::from_secs(12);
    let mut clients = Vec::new();
    for c in 0..20u32 {
        let (socket, stub) = (socket.clone(), stub.clone());
        clients.push(std::thread::spawn(move || {
            let mut n = 0u32;
            while Instant::now() < deadline && n < 200 {
                n += 1;
                let fleet = format!("f{}", (c + n) % 2);
                let agent = format!("a{}", (c * 7 + n) % 3);
                let path = format!("{fleet}/{agent}");
                let words: Vec<&str> = match (c + n) % 5 {
                    0 => vec![
                        "fleet",
                        "create",
                        &fleet,
                        "--agents",
                        "2",
                        "--command",
                        &stub,
                        "--stride",
                        "1",
                    ],
                    1 => vec!["fleet", "rm", &fleet, "--purge"],
                    2 => vec!["agent", "add", &fleet, &agent],
                    3 => vec!["agent", "rm", &path, "--purge"],
                    _ => vec!["agent", "rm", &path],
                };
                let _ = ctl_at(&socket, &words);
            }
        }));
    }
    for c in clients {
        c.join().unwrap();
    }
    // Quiet: every removal done (a create of a name being removed is refused until then).
    let settled = |d: &Daemon| -> Option<(Vec<Value>, Value, Vec<Value>)> {
        let status = d.status();
        let ports: Value = serde_json::from_str(&d.ctl(&["--json", "ports"])).ok()?;
        let reg: Value = serde_json::from_slice(&registry(d)).ok()?;
        let busy = status.iter().any(|r| r["state"] != "running");
        (!busy).then_some((status, reg, ports.as_array()?.clone()))
    };
    let (status, reg, ports) = wait_until(Duration::from_secs(60), "every agent settled", |seen| {
        let s = settled(&d);
        *seen = format!("{:?}", d.status());
        s
    });
    // (fleet, agent) of each row, sorted.
    let names = |rows: &[Value]| {
        let mut v: Vec<(String, String)> = rows
            .iter()
            .map(|r| {
                (
                    r["fleet"].as_str().unwrap().into(),
                    r["agent"].as_str().unwrap().into(),
                )
            })
            .collect();
        v.sort();
        v
    };
    let in_status = names(&status);
    let mut in_registry: Vec<(String, String)> = Vec::new();
    for (f, rec) in reg["fleets"].as_object().unwrap() {
        for a in rec["agents"].as_object().unwrap().keys() {
            in_registry.push((f.clone(), a.clone()));
        }
    }
    in_registry.sort();
    let in_ports = names(&ports);
    assert_eq!(in_status, in_registry, "status and registry disagree");
    assert_eq!(in_ports, in_registry, "leases and registry disagree");
    let node = d.node_id();
    for (f, a) in &in_registry {
        let home = d.state_dir().join("fleets").join(f).join(a);
        assert!(
            home.join(".openclaw/openclaw.json").exists(),
            "{f}/{a} runs without its HOME"
        );
        assert!(
            d.state_dir()
                .join("logs")
                .join(f)
                .join(a)
                .join("agent.log")
                .exists(),
            "{f}/{a} runs without its log"
        );
    }
    // Stops of removed agents take a second each: wait for them, then one process per agent.
    wait_until(
        Duration::from_secs(30),
        "exactly one process per agent",
        |seen| {
            let all = marked_pids(&format!("{node}/"));
            *seen = format!(
                "{} marked processes for {} agents",
                all.len(),
                in_registry.len()
            );
            let each = in_registry
                .iter()
                .all(|(f, a)| marked_pids(&format!("{node}/{f}/{a}/")).len() == 1);
            (each && all.len() == in_registry.len()).then_some(())
        },
    );
}
