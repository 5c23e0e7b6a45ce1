//! Durable state: the daemon restarted after a clean stop or a SIGKILL brings every fleet
//! back with the same ports, tokens and HOMEs, never runs an agent twice, never touches a
//! reused pid; a corrupt registry stops it with a clear error and an untouched file; the
//! declarative spec reloads by difference and a bad spec changes nothing.

mod common;

use common::{alive, marked_pids, wait_until, Daemon, STUB};
use serde_json::Value;
use std::collections::BTreeMap;
use std::time::Duration;

const T: Duration = Duration::from_secs(30);

fn by_agent(rows: &[Value]) -> BTreeMap<String, Value> {
    rows.iter()
        .map(|r| {
            (
                format!(
                    "{}/{}",
                    r["fleet"].as_str().unwrap(),
                    r["agent"].as_str().unwrap()
                ),
                r.clone(),
            )
        })
        .collect()
}

fn token(d: &Daemon, path: &str) -> String {
    d.ctl(&["token", path]).trim().to_string()
}

#[test]
fn clean_restart_keeps_ports_tokens_homes_and_desired_state() {
    let mut d = Daemon::start();
    d.create_stub_fleet("keep", 3, "--no-helper", &[]);
    let rows = by_agent(&d.wait_running("keep", 3, T));
    let tokens: Vec<String> = (1..=3)
        .map(|i| token(&d, &format!("keep/agent-{i}")))
        .collect();
    d.ctl(&["agent", "stop", "keep/agent-3"]);
    assert!(d.stop().success());
    d.launch();
    let after = wait_until(T, "agents 1-2 running and agent-3 stopped again", |seen| {
        let rows = by_agent(&d.status());
        *seen = format!("{rows:?}");
        let ok = rows.len() == 3
            && rows["keep/agent-1"]["state"] == "running"
            && rows["keep/agent-2"]["state"] == "running"
            && rows["keep/agent-3"]["state"] == "stopped";
        ok.then_some(rows)
    });
    for (k, r) in &rows {
        assert_eq!(after[k]["port"], r["port"], "{k} port changed");
        assert_eq!(after[k]["home"], r["home"], "{k} home changed");
    }
    let again: Vec<String> = (1..=3)
        .map(|i| token(&d, &format!("keep/agent-{i}")))
        .collect();
    assert_eq!(again, tokens);
}

/// After a SIGKILL of the daemon, a new daemon runs exactly one process tree per agent on the
/// same ports. Without a PID namespace, orphaned helpers outlive the daemon; the next start
/// must find them by their marker and stop them before starting fresh agents.
fn sigkill_then_restart(extra: &[&str]) {
    let mut d = Daemon::start_with(extra);
    d.create_stub_fleet("crash", 2, "--helper-orphan", &[]);
    let before = by_agent(&d.wait_running("crash", 2, T));
    let prefix = format!("{}/", d.node_id());
    let old = wait_until(T, "2 agents and 2 helpers", |seen| {
        let m = marked_pids(&prefix);
        *seen = format!("{m:?}");
        (m.len() >= 4).then_some(m)
    });
    d.kill9();
    d.launch();
    let after = by_agent(&d.wait_running("crash", 2, T));
    wait_until(
        T,
        "every process of the crashed daemon to be gone",
        |seen| {
            let left: Vec<u32> = old.iter().copied().filter(|p| alive(*p)).collect();
            *seen = format!("{left:?}");
            left.is_empty().then_some(())
        },
    );
    for (k, r) in &before {
        assert_eq!(after[k]["port"], r["port"], "{k} port changed");
        assert_ne!(after[k]["pid"], r["pid"], "{k} was not restarted");
    }
    // Exactly one agent process (plus its one helper) per agent.
    for i in 1..=2 {
        let agent_prefix = format!("{prefix}crash/agent-{i}/");
        let procs = wait_until(T, "one agent and one helper", |seen| {
            let m = marked_pids(&agent_prefix);
            *seen = format!("{m:?}");
            (m.len() == 2).then_some(m)
        });
        let pid = after[&format!("crash/agent-{i}")]["pid"].as_u64().unwrap() as u32;
        assert!(procs.contains(&pid), "{procs:?} lacks {pid}");
    }
}

#[test]
fn sigkill_and_restart_runs_each_agent_once_with_pid_namespace() {
    sigkill_then_restart(&[]);
}

#[test]
fn sigkill_and_restart_sweeps_survivors_without_pid_namespace() {
    sigkill_then_restart(&["--no-pid-namespace"]);
}

#[test]
fn a_recorded_pid_reused_by_an_unrelated_process_is_left_alone() {
    let mut d = Daemon::start();
    d.create_stub_fleet("reuse", 1, "--no-helper", &[]);
    d.wait_running("reuse", 1, T);
    // The registry records the running pid (written in a batch shortly after the start).
    let reg_path = d.state_dir().join("registry.json");
    wait_until(T, "the pid in the registry", |seen| {
        let reg: Value = serde_json::from_str(&common::read_file(&reg_path)).ok()?;
        *seen = reg["fleets"]["reuse"]["agents"]["agent-1"].to_string();
        reg["fleets"]["reuse"]["agents"]["agent-1"]["process"]["pid"].as_u64()
    });
    d.kill9();
    let mut stranger = std::process::Command::new("sleep")
        .arg("300")
        .spawn()
        .unwrap();
    let spid = stranger.id();
    let stat = std::fs::read_to_string(format!("/proc/{spid}/stat")).unwrap();
    let start: u64 = stat[stat.rfind(')').unwrap() + 2..]
        .split(' ')
        .nth(19)
        .unwrap()
        .parse()
        .unwrap();
    let mut reg: Value = serde_json::from_str(&common::read_file(&reg_path)).unwrap();
    reg["fleets"]["reuse"]["agents"]["agent-1"]["process"] =
        serde_json::json!({"pid": spid, "pgid": spid, "start_time": start});
    std::fs::write(&reg_path, serde_json::to_vec_pretty(&reg).unwrap()).unwrap();
    d.launch();
    d.wait_running("reuse", 1, T);
    let alive_now = alive(spid);
    let _ = stranger.kill();
    let _ = stranger.wait();
    assert!(
        alive_now,
        "the daemon killed an unrelated process whose pid it had recorded"
    );
}

#[test]
fn a_corrupt_registry_stops_the_daemon_and_is_left_untouched() {
    let mut d = Daemon::start();
    d.create_stub_fleet("c", 1, "--no-helper", &[]);
    d.wait_running("c", 1, T);
    assert!(d.stop().success());
    let reg_path = d.state_dir().join("registry.json");
    let good = std::fs::read(&reg_path).unwrap();
    let mut bad = good[..good.len() / 2].to_vec();
    bad.extend_from_slice(b"\n}}garbage");
    std::fs::write(&reg_path, &bad).unwrap();
    let out = std::process::Command::new(common::FLEETD)
        .arg("--state-dir")
        .arg(d.state_dir())
        .arg("--no-repl")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "fleetd started on a corrupt registry: {err}"
    );
    assert!(
        err.contains("registry.json") && err.contains("line"),
        "unclear error: {err}"
    );
    assert_eq!(
        std::fs::read(&reg_path).unwrap(),
        bad,
        "the corrupt file was modified"
    );
    assert!(d.state_dir().join("registry.json.bak").exists());
}

fn spec_file(fleets: &[(&str, u32, &str)]) -> String {
    let mut s = String::new();
    for (name, n, args) in fleets {
        let mut cmd = vec![format!("{STUB:?}")];
        cmd.extend(args.split_whitespace().map(|a| format!("{a:?}")));
        s.push_str(&format!(
            "[[fleet]]\nname = \"{name}\"\nagents = {n}\ncommand = [{}]\nstride = 1\n\n",
            cmd.join(", ")
        ));
    }
    s
}

fn pids(d: &Daemon) -> BTreeMap<String, Value> {
    by_agent(&d.status())
        .into_iter()
        .map(|(k, v)| (k, v["pid"].clone()))
        .collect()
}

#[test]
fn spec_reload_changes_only_what_changed_and_a_bad_spec_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("fleets.toml");
    std::fs::write(
        &spec,
        spec_file(&[
            ("a", 2, "--no-helper"),
            ("b", 1, "--no-helper"),
            ("e", 1, "--no-helper"),
        ]),
    )
    .unwrap();
    let spec_arg = spec.display().to_string();
    let d = Daemon::start_with(&["--spec", &spec_arg]);
    d.wait_running("a", 2, T);
    d.wait_running("b", 1, T);
    d.wait_running("e", 1, T);
    let before = pids(&d);
    let b_pid = before["b/agent-1"].as_u64().unwrap() as u32;

    std::fs::write(
        &spec,
        spec_file(&[
            ("a", 3, "--no-helper"),
            ("c", 1, "--no-helper"),
            ("e", 1, "--no-helper --print-every-ms 60000"),
        ]),
    )
    .unwrap();
    unsafe { libc::kill(d.pid() as i32, libc::SIGHUP) };
    let after = wait_until(T, "the reloaded spec to be running", |seen| {
        let rows = by_agent(&d.status());
        *seen = format!("{rows:?}");
        let keys: Vec<&String> = rows.keys().collect();
        let running = rows.values().all(|r| r["state"] == "running");
        let e_new = rows
            .get("e/agent-1")
            .is_some_and(|r| r["pid"] != before["e/agent-1"]);
        (keys
            == [
                "a/agent-1",
                "a/agent-2",
                "a/agent-3",
                "c/agent-1",
                "e/agent-1",
            ]
            && running
            && e_new)
            .then_some(rows)
    });
    assert_eq!(
        after["a/agent-1"]["pid"], before["a/agent-1"],
        "an unchanged agent was restarted"
    );
    assert_eq!(
        after["a/agent-2"]["pid"], before["a/agent-2"],
        "an unchanged agent was restarted"
    );
    wait_until(T, "the removed fleet's process to be gone", |_| {
        (!alive(b_pid)).then_some(())
    });
    let fleets = d.ctl(&["fleet", "list"]);
    assert!(
        !fleets.contains('b') || !fleets.lines().any(|l| l.starts_with("b ")),
        "{fleets}"
    );

    // A spec with an error is rejected whole: nothing changes.
    let snapshot = pids(&d);
    let bad = spec_file(&[("a", 1, "--no-helper"), ("z", 1, "--no-helper")])
        + "[[fleet]]\nname = \"q\"\nstrategy = \"one_for_some\"\n";
    let bad_line = bad
        .lines()
        .position(|l| l.contains("one_for_some"))
        .unwrap()
        + 1;
    std::fs::write(&spec, &bad).unwrap();
    let out = d.ctl_output(&["reload"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a bad spec was accepted");
    assert!(
        err.contains("strategy") && err.contains(&format!("fleets.toml:{bad_line}:")),
        "error does not name line {bad_line} and the field: {err}"
    );
    assert_eq!(pids(&d), snapshot, "a rejected spec changed what runs");
}
