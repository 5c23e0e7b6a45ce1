//! Day-2 operations on real gateways: versions side by side, backup and restore of a running
//! agent's HOME, health-gated upgrades from a published older OpenClaw to the pinned one with
//! a rollback of a version that cannot start, `fleet rollback`, a daemon killed mid-upgrade,
//! and `doctor`. One fleet of three real agents is shared by every step (a cold start costs
//! ~16 CPU-seconds).

mod common;
#[path = "common/openclaw.rs"]
mod openclaw;

use common::{searchable, wait_until, Daemon};
use openclaw::{install, serial, START_DEADLINE};
use serde_json::Value;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The older published version `scripts/test.sh` installs beside the pinned one.
const PREVIOUS: &str = "2026.9.5";
const PINNED: &str = "2026.9.6";

fn json(d: &Daemon, words: &[&str]) -> Value {
    let mut w = vec!["--json"];
    w.extend_from_slice(words);
    let out = d.ctl_output(&w);
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    serde_json::from_str(text.trim())
        .unwrap_or_else(|e| panic!("{words:?}: not JSON ({e}): {text}"))
}

fn fails(d: &Daemon, words: &[&str]) -> String {
    let out = d.ctl_output(words);
    assert!(
        !out.status.success(),
        "{words:?} should fail: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout)
}

fn token(d: &Daemon, agent: &str) -> String {
    json(d, &["token", &format!("f/{agent}")])["token"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Every agent of `f` running, ready, on `version`; returns their rows.
fn wait_fleet(d: &Daemon, version: &str) -> Vec<Value> {
    wait_until(
        START_DEADLINE,
        &format!("fleet f ready on {version}"),
        |seen| {
            let rows: Vec<Value> = d
                .status()
                .into_iter()
                .filter(|r| r["fleet"] == "f")
                .collect();
            *seen = serde_json::to_string(&rows).unwrap();
            (rows.len() == 3
                && rows.iter().all(|r| {
                    r["state"] == "running"
                        && r["ready"] == true
                        && r["openclaw_version"] == version
                }))
            .then_some(rows)
        },
    )
}

/// The executable an agent's process runs: the Node of the install it was started from (the
/// gateway renames its command line).
fn exe(d: &Daemon, agent: &str) -> String {
    let pid = d.agent("f", agent).unwrap()["pid"].as_u64().unwrap();
    std::fs::read_link(format!("/proc/{pid}/exe"))
        .map(|p| p.display().to_string())
        .unwrap_or_default()
}

fn marker(home: &Path) -> PathBuf {
    home.join(".openclaw/fleet-test-marker")
}

/// Writes a file into an agent's HOME as its owner (the test runs as root; the agent as its
/// own uid).
fn write_marker(home: &Path, text: &str) {
    use std::os::unix::fs::MetadataExt;
    let p = marker(home);
    std::fs::write(&p, text).unwrap();
    let m = std::fs::metadata(home).unwrap();
    std::os::unix::fs::chown(&p, Some(m.uid()), Some(m.gid())).unwrap();
}

/// A versions directory of its own: the published older version (a link to its install),
/// and two stand-ins that cannot serve: one exits 78 at once, one never becomes ready.
fn versions_home(dir: &Path) -> PathBuf {
    let real = fleet_commander::provision::default_install_dir()
        .join("versions")
        .join(PREVIOUS);
    assert!(
        real.join("node_modules/.bin/openclaw").exists(),
        "OpenClaw {PREVIOUS} is not installed at {}: run scripts/install-openclaw.sh {PREVIOUS} (scripts/test.sh does)",
        real.display()
    );
    let v = dir.join("openclaw/versions");
    std::fs::create_dir_all(&v).unwrap();
    std::os::unix::fs::symlink(&real, v.join(PREVIOUS)).unwrap();
    for (name, body) in [
        (
            "0.0.1-broken",
            "#!/bin/sh\necho 'stand-in: this version rejects the config' >&2\nexit 78\n",
        ),
        ("0.0.2-hangs", "#!/bin/sh\nexec sleep 600\n"),
    ] {
        let bin = v.join(name).join("node_modules/.bin");
        std::fs::create_dir_all(&bin).unwrap();
        std::fs::write(bin.join("openclaw"), body).unwrap();
        std::fs::set_permissions(bin.join("openclaw"), std::fs::Permissions::from_mode(0o755))
            .unwrap();
    }
    for p in [dir.to_path_buf(), dir.join("openclaw"), v.clone()] {
        searchable(&p);
    }
    let mut walk = vec![v.clone()];
    while let Some(p) = walk.pop() {
        for e in std::fs::read_dir(&p).unwrap().flatten() {
            if e.file_type().unwrap().is_dir() {
                searchable(&e.path());
                walk.push(e.path());
            }
        }
    }
    dir.join("openclaw")
}

#[test]
fn upgrade_backup_restore_doctor_on_real_gateways() {
    let Some(inst) = install("day2") else { return };
    let _one = serial();
    let scratch = tempfile::tempdir().unwrap();
    searchable(scratch.path());
    let versions = versions_home(scratch.path());
    let bin = inst.openclaw.to_string_lossy().into_owned();
    let vh = versions.to_string_lossy().into_owned();
    let mut d = Daemon::start_env(&[("FLEET_OPENCLAW_HOME", &vh)], &["--openclaw", &bin]);

    // Bad versions are refused, naming the field, and create nothing.
    let e = fails(
        &d,
        &[
            "fleet",
            "create",
            "x",
            "--agents",
            "1",
            "--openclaw-version",
            "9.9.9",
        ],
    );
    assert!(
        e.contains("openclaw_version") && e.contains("not installed"),
        "{e}"
    );
    let e = fails(
        &d,
        &[
            "fleet",
            "create",
            "x",
            "--agents",
            "1",
            "--openclaw-version",
            "../x",
        ],
    );
    assert!(e.contains("--openclaw-version"), "{e}");
    assert!(d.status().is_empty());

    d.ctl(&[
        "fleet",
        "create",
        "f",
        "--agents",
        "3",
        "--profile",
        "lean",
        "--openclaw-version",
        PREVIOUS,
    ]);
    let rows = wait_fleet(&d, PREVIOUS);
    assert!(
        exe(&d, "agent-1").contains(&format!("versions/{PREVIOUS}/")),
        "{}",
        exe(&d, "agent-1")
    );
    let home1 = PathBuf::from(
        rows.iter().find(|r| r["agent"] == "agent-1").unwrap()["home"]
            .as_str()
            .unwrap(),
    );

    // ---- backup of a running agent, restore into it stopped ----
    write_marker(&home1, "before");
    let out = scratch.path().join("agent-1.tar.gz");
    let t = Instant::now();
    let b = json(
        &d,
        &[
            "agent",
            "backup",
            "f/agent-1",
            "--out",
            out.to_str().unwrap(),
        ],
    );
    let backup_s = t.elapsed().as_secs_f64();
    assert_eq!(b[0]["path"], out.to_str().unwrap(), "{b}");
    assert_eq!(
        std::fs::metadata(&out).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let m = fleet_commander::backup::archive::verify(&out, &Default::default()).unwrap();
    assert_eq!((m.fleet.as_str(), m.agent.as_str()), ("f", "agent-1"));
    assert_eq!(m.openclaw_version.as_deref(), Some(PREVIOUS));
    assert!(
        m.sqlite.iter().any(|p| p.ends_with("openclaw.sqlite")),
        "the gateway's database is copied through SQLite's backup API: {:?}",
        m.sqlite
    );
    assert!(m
        .files
        .iter()
        .any(|f| f.path == ".openclaw/fleet-test-marker"));
    assert!(!m
        .files
        .iter()
        .any(|f| f.path.starts_with("tmp/") || f.path.ends_with("-wal")));
    // Never over an existing file.
    let e = fails(
        &d,
        &[
            "agent",
            "backup",
            "f/agent-1",
            "--out",
            out.to_str().unwrap(),
        ],
    );
    assert!(e.contains("never overwrites"), "{e}");
    // A running agent is never restored into.
    let e = fails(
        &d,
        &[
            "agent",
            "restore",
            "f/agent-1",
            "--from",
            out.to_str().unwrap(),
        ],
    );
    assert!(e.contains("not stopped"), "{e}");

    d.ctl(&["agent", "stop", "f/agent-1"]);
    write_marker(&home1, "after");
    let old_token = token(&d, "agent-1");
    // Broken and foreign archives change nothing.
    let bytes = std::fs::read(&out).unwrap();
    let cut = scratch.path().join("cut.tar.gz");
    std::fs::write(&cut, &bytes[..bytes.len() * 2 / 3]).unwrap();
    let e = fails(
        &d,
        &[
            "agent",
            "restore",
            "f/agent-1",
            "--from",
            cut.to_str().unwrap(),
        ],
    );
    assert!(e.contains("corrupt or truncated"), "{e}");
    d.ctl(&["agent", "stop", "f/agent-2"]);
    let e = fails(
        &d,
        &[
            "agent",
            "restore",
            "f/agent-2",
            "--from",
            out.to_str().unwrap(),
        ],
    );
    assert!(e.contains("--force"), "{e}");
    d.ctl(&["agent", "start", "f/agent-2"]);
    assert_eq!(std::fs::read_to_string(marker(&home1)).unwrap(), "after");
    assert_eq!(
        token(&d, "agent-1"),
        old_token,
        "a refused restore rotates nothing"
    );

    let t = Instant::now();
    d.ctl(&[
        "agent",
        "restore",
        "f/agent-1",
        "--from",
        out.to_str().unwrap(),
    ]);
    let restore_s = t.elapsed().as_secs_f64();
    assert_eq!(std::fs::read_to_string(marker(&home1)).unwrap(), "before");
    assert_ne!(
        token(&d, "agent-1"),
        old_token,
        "a restore rotates the gateway token"
    );
    d.ctl(&["agent", "start", "f/agent-1"]);
    wait_fleet(&d, PREVIOUS);
    eprintln!("FIGURE backup of one running real agent: {backup_s:.2} s ({} files, {} bytes); restore: {restore_s:.2} s", m.files.len(), m.bytes);

    // ---- a version that cannot start: the canary is rolled back with its state ----
    write_marker(&home1, "state of agent-1");
    let t = Instant::now();
    let out = d.ctl_output(&[
        "--json",
        "fleet",
        "upgrade",
        "f",
        "--to",
        "0.0.1-broken",
        "--ready-timeout",
        "60",
    ]);
    let bad_s = t.elapsed().as_secs_f64();
    assert!(
        !out.status.success(),
        "an upgrade that had to stop exits non-zero"
    );
    let rec: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rec["state"], "stopped", "{rec}");
    let steps: Vec<&str> = rec["agents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["step"].as_str().unwrap())
        .collect();
    assert_eq!(steps, ["rolled_back", "pending", "pending"], "{rec}");
    assert!(rec["reason"].as_str().unwrap().contains("agent-1"), "{rec}");
    wait_fleet(&d, PREVIOUS);
    assert_eq!(
        std::fs::read_to_string(marker(&home1)).unwrap(),
        "state of agent-1"
    );
    eprintln!("FIGURE upgrade to a version that exits 78, rolled back: {bad_s:.1} s");

    // ---- the real upgrade: older published version → pinned ----
    let t = Instant::now();
    let rec = json(
        &d,
        &[
            "fleet",
            "upgrade",
            "f",
            "--to",
            PINNED,
            "--canary",
            "1",
            "--max-unavailable",
            "2",
        ],
    );
    let up_s = t.elapsed().as_secs_f64();
    assert_eq!(rec["state"], "done", "{rec}");
    let unavailable: Vec<f64> = rec["agents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            assert_eq!(a["step"], "kept", "{rec}");
            assert!(
                a["backup"].as_str().is_some_and(|b| Path::new(b).exists()),
                "{rec}"
            );
            a["unavailable_ms"].as_f64().unwrap() / 1000.0
        })
        .collect();
    wait_fleet(&d, PINNED);
    assert!(
        !exe(&d, "agent-1").contains("versions/"),
        "{}",
        exe(&d, "agent-1")
    );
    let status = json(&d, &["fleet", "upgrade", "f", "--status"]);
    assert_eq!(status["state"], "done");
    eprintln!("FIGURE 3-agent upgrade {PREVIOUS} → {PINNED}: {up_s:.1} s total, per-agent unavailable {unavailable:?} s");

    // ---- fleet rollback: every agent back on the older version with its backup ----
    write_marker(&home1, "written on the new version");
    let t = Instant::now();
    let rec = json(&d, &["fleet", "rollback", "f"]);
    let rb_s = t.elapsed().as_secs_f64();
    assert_eq!(rec["state"], "rolled_back", "{rec}");
    wait_fleet(&d, PREVIOUS);
    assert_eq!(
        std::fs::read_to_string(marker(&home1)).unwrap(),
        "state of agent-1",
        "the rollback restores the state from before the upgrade"
    );
    eprintln!("FIGURE fleet rollback of 3 agents: {rb_s:.1} s");

    // ---- doctor: clean, then a HOME opened to others fails it ----
    let out = d.ctl_output(&["--json", "doctor", "f"]);
    let checks: Value = serde_json::from_slice(&out.stdout).unwrap();
    let failed: Vec<&Value> = checks
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["level"] == "fail")
        .collect();
    assert!(out.status.success() && failed.is_empty(), "{failed:?}");
    for want in [
        "home.mode",
        "config",
        "port.foreign",
        "openclaw.breaker",
        "openclaw.version",
        "isolation",
    ] {
        assert!(
            checks
                .as_array()
                .unwrap()
                .iter()
                .any(|c| c["check"] == want && c["subject"] == "f/agent-2"),
            "doctor checks {want}: {checks}"
        );
    }
    let home2 = PathBuf::from(d.agent("f", "agent-2").unwrap()["home"].as_str().unwrap());
    std::fs::set_permissions(&home2, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = d.ctl_output(&["--json", "doctor"]);
    std::fs::set_permissions(&home2, std::fs::Permissions::from_mode(0o700)).unwrap();
    assert!(!out.status.success(), "a fail makes doctor exit non-zero");
    let checks: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        checks
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["check"] == "home.mode"
                && c["subject"] == "f/agent-2"
                && c["level"] == "fail"),
        "{checks}"
    );
    assert!(checks
        .as_array()
        .unwrap()
        .iter()
        .any(|c| c["subject"] == "node" && c["check"] == "registry"));

    // ---- a daemon killed mid-upgrade: the agent in flight is put back at the next start ----
    write_marker(&home1, "before the crash");
    let mut bg = std::process::Command::new(env!("CARGO_BIN_EXE_fleetctl"))
        .arg("--socket")
        .arg(d.socket())
        .args([
            "fleet",
            "upgrade",
            "f",
            "--to",
            "0.0.2-hangs",
            "--ready-timeout",
            "600",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let record = d.state_dir().join("upgrades/f.json");
    wait_until(
        Duration::from_secs(120),
        "agent-1 restarting on the hanging version",
        |seen| {
            let r: Value = serde_json::from_slice(&std::fs::read(&record).ok()?).ok()?;
            *seen = r.to_string();
            (r["agents"][0]["step"] == "restarting"
                && d.agent("f", "agent-1")?["state"] != "stopped")
                .then_some(())
        },
    );
    d.kill9();
    let _ = bg.wait();
    d.launch();
    wait_until(
        START_DEADLINE,
        "the interrupted upgrade to be put back",
        |seen| {
            let r: Value = serde_json::from_slice(&std::fs::read(&record).ok()?).ok()?;
            *seen = r.to_string();
            (r["state"] == "interrupted").then_some(())
        },
    );
    wait_fleet(&d, PREVIOUS);
    assert_eq!(
        std::fs::read_to_string(marker(&home1)).unwrap(),
        "before the crash"
    );
    d.stop();
}

/// A free loopback port for fleetd's metrics listener.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn metrics(port: u16) -> String {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return String::new();
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = s.write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

fn counter(text: &str, line_start: &str) -> u64 {
    text.lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// `[fleet.backup]`: each agent backed up live on schedule, its directory pruned to `keep`, and
/// a backup that cannot be made is counted while its agent runs on.
#[test]
fn scheduled_backups_are_made_pruned_and_failures_counted() {
    let dir = tempfile::tempdir().unwrap();
    searchable(dir.path());
    let out = dir.path().join("archives");
    let blocker = dir.path().join("not-a-directory");
    std::fs::write(&blocker, b"x").unwrap();
    // An old archive of agent-1: due at once, and pruned after the new one (keep = 1).
    let seeded = out.join("s/agent-1/agent-1-20200101T000000.000Z.tar.gz");
    std::fs::create_dir_all(seeded.parent().unwrap()).unwrap();
    std::fs::write(&seeded, b"old").unwrap();
    std::fs::File::options()
        .write(true)
        .open(&seeded)
        .unwrap()
        .set_modified(std::time::UNIX_EPOCH + Duration::from_secs(1_577_836_800))
        .unwrap();
    let spec = dir.path().join("fleets.toml");
    std::fs::write(
        &spec,
        format!(
            "[defaults]\ncommand = \"{} --no-helper\"\nstride = 1\n\
             [[fleet]]\nname = \"s\"\nagents = 2\n[fleet.backup]\nevery = \"1h\"\nkeep = 1\ndir = \"{}\"\n\
             [[fleet]]\nname = \"bad\"\nagents = 1\n[fleet.backup]\nevery = \"1h\"\ndir = \"{}\"\n",
            common::STUB,
            out.display(),
            blocker.display()
        ),
    )
    .unwrap();
    let port = free_port();
    let p = port.to_string();
    let mut d = Daemon::start_with(&["--spec", spec.to_str().unwrap(), "--metrics-addr", &p]);
    d.wait_running("s", 2, Duration::from_secs(60));
    d.wait_running("bad", 1, Duration::from_secs(60));
    for agent in ["agent-1", "agent-2"] {
        let adir = out.join("s").join(agent);
        let got = wait_until(
            Duration::from_secs(90),
            &format!("a scheduled backup of s/{agent}"),
            |seen| {
                let v = fleet_commander::backup::archives_of(&adir, agent);
                *seen = format!("{v:?}");
                (v.len() == 1 && v[0] != seeded).then(|| v[0].clone())
            },
        );
        let m = fleet_commander::backup::archive::verify(&got, &Default::default()).unwrap();
        assert_eq!((m.fleet.as_str(), m.agent.as_str()), ("s", agent));
        assert_eq!(
            std::fs::metadata(&got).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
    assert!(!seeded.exists(), "the old archive is pruned (keep = 1)");
    let text = wait_until(Duration::from_secs(90), "backup counters", |seen| {
        let t = metrics(port);
        *seen = t
            .lines()
            .filter(|l| l.contains("backups"))
            .collect::<Vec<_>>()
            .join("\n");
        (counter(&t, "fleet_backups_total{state=\"ok\"}") >= 2
            && counter(&t, "fleet_backups_total{state=\"failed\"}") >= 1)
            .then_some(t)
    });
    assert!(text.contains("fleet_backups_total"), "{text}");
    // The agent whose backups fail runs on, untouched.
    let row = d.agent("bad", "agent-1").unwrap();
    assert_eq!(row["state"], "running", "{row}");
    assert_eq!(row["restarts"], 0, "{row}");
    d.stop();
}
