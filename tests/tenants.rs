//! Tenants through the command language, on stub agents (the real-gateway round trip is in
//! `real_openclaw.rs`): `agent add` with its own env, secrets and files; `agent secret` and
//! `agent set` restarting that agent only; `agent config` redacting; `fleetctl exec` running
//! in the agent's context; secrets surviving a daemon restart in the 0600 vault and leaving it
//! with the agent; bad secret files refused with nothing changed; a HOME whose directories
//! the agent replaced by links never written through.

mod common;

use common::{read_file, wait_until, Daemon, STUB};
use serde_json::Value;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

const T: Duration = Duration::from_secs(30);

fn pid(d: &Daemon, fleet: &str, agent: &str) -> u64 {
    d.agent(fleet, agent)
        .and_then(|r| r["pid"].as_u64())
        .unwrap_or(0)
}

/// Waits until the agent runs with a pid other than `old` (0: any) and is healthy.
fn wait_new_pid(d: &Daemon, fleet: &str, agent: &str, old: u64) -> u64 {
    wait_until(T, &format!("{fleet}/{agent} running anew"), |last| {
        let r = d.agent(fleet, agent)?;
        *last = r.to_string();
        let p = r["pid"].as_u64()?;
        (r["state"] == "running" && r["healthy"] == true && p != old).then_some(p)
    })
}

fn environ(pid: u64) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/environ"))
        .unwrap_or_default()
        .split(|b| *b == 0)
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .collect()
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

fn write(dir: &Path, name: &str, content: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, content).unwrap();
    p
}

/// `agent secret <agent> set <name> <file>`.
fn secret_set<'a>(agent: &'a str, name: &'a str, file: &'a Path) -> [&'a str; 6] {
    [
        "agent",
        "secret",
        agent,
        "set",
        name,
        file.to_str().unwrap(),
    ]
}

fn fails(d: &Daemon, words: &[&str]) -> String {
    let out = d.ctl_output(words);
    assert!(!out.status.success(), "{words:?} succeeded");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_tenant_gets_its_own_env_secrets_and_files_and_changes_restart_it_alone() {
    let d = Daemon::start();
    let files = tempfile::tempdir().unwrap();
    let f = files.path();
    // The agent prints its secret at start, so redaction of its log can be checked.
    let cmd = format!("sh -c 'echo \"key=$API_KEY\"; exec {STUB} --no-helper'");
    d.ctl(&[
        "fleet",
        "create",
        "t",
        "--agents",
        "1",
        "--command",
        &cmd,
        "--stride",
        "1",
    ]);
    let sibling = wait_new_pid(&d, "t", "agent-1", 0);
    let key1 = write(f, "k1", "first-secret-value-1\n");
    let soul = write(f, "soul.md", "I am alice's bot.\n");
    d.ctl(&[
        "agent",
        "add",
        "t",
        "alice",
        "--env",
        "TZ=UTC",
        "--secret",
        &format!("API_KEY={}", key1.display()),
        "--file",
        &format!("notes/SOUL.md={}", soul.display()),
    ]);
    let p1 = wait_new_pid(&d, "t", "alice", 0);
    let env = environ(p1);
    assert!(
        env.contains(&"API_KEY=first-secret-value-1".to_string()),
        "{env:?}"
    );
    assert!(env.contains(&"TZ=UTC".to_string()), "{env:?}");
    assert!(
        !environ(sibling).iter().any(|v| v.starts_with("API_KEY=")),
        "the sibling got alice's secret"
    );
    let home = PathBuf::from(d.agent("t", "alice").unwrap()["home"].as_str().unwrap());
    let secret_file = home.join(".openclaw/secrets/API_KEY");
    assert_eq!(read_file(&secret_file), "first-secret-value-1");
    assert_eq!(mode(&secret_file), 0o600);
    assert_eq!(
        read_file(&home.join("notes/SOUL.md")),
        "I am alice's bot.\n"
    );
    let vault = d.state_dir().join("vault.json");
    assert_eq!(mode(&vault), 0o600);
    assert!(read_file(&vault).contains("first-secret-value-1"));
    let registry = read_file(&d.state_dir().join("registry.json"));
    assert!(
        !registry.contains("first-secret-value-1"),
        "secret in the registry"
    );
    assert!(
        registry.contains("API_KEY"),
        "the registry names the secret"
    );

    // Bad secret files: refused, naming the file and why; nothing changed.
    let fifo = f.join("fifo");
    assert!(std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let cases: Vec<(PathBuf, &str)> = vec![
        (f.join("missing"), "does not exist"),
        (fifo.clone(), "not a regular file"),
        (write(f, "empty", "\n"), "empty"),
        (write(f, "short", "abc"), "fewer than 8"),
        (
            write(f, "huge", &"x".repeat(65 * 1024)),
            "more than the limit",
        ),
        (f.to_path_buf(), "not a regular file"),
    ];
    // The registry records each running process a moment after it starts (writes are
    // batched): wait for that, or the comparison below would see it land.
    let registry = d.state_dir().join("registry.json");
    let before = wait_until(T, "the registry to record both processes", |seen| {
        let text = read_file(&registry);
        let v: Value = serde_json::from_str(&text).ok()?;
        let recorded = |a: &str| v["fleets"]["t"]["agents"][a]["process"]["pid"].as_u64();
        *seen = format!("{:?} {:?}", recorded("agent-1"), recorded("alice"));
        (recorded("agent-1") == Some(pid(&d, "t", "agent-1"))
            && recorded("alice") == Some(pid(&d, "t", "alice")))
        .then_some(text)
    });
    for (file, why) in &cases {
        let e = fails(&d, &secret_set("t/alice", "API_KEY", file));
        assert!(
            e.contains(&file.display().to_string()) && e.contains(why),
            "{}: {e}",
            file.display()
        );
        let e = fails(
            &d,
            &[
                "agent",
                "add",
                "t",
                "bob",
                "--secret",
                &format!("K_1={}", file.display()),
            ],
        );
        assert!(e.contains(why), "{e}");
    }
    assert!(d.agent("t", "bob").is_none(), "a refused add left an agent");
    assert_eq!(read_file(&d.state_dir().join("registry.json")), before);
    assert_eq!(
        pid(&d, "t", "alice"),
        p1,
        "a refused change restarted the agent"
    );

    // A new value: alice alone restarts, with it.
    let key2 = write(f, "k2", "second-secret-value-2");
    let said = d.ctl(&secret_set("t/alice", "API_KEY", &key2));
    assert!(said.contains("its secrets changed"), "{said}");
    let p2 = wait_new_pid(&d, "t", "alice", p1);
    assert!(environ(p2).contains(&"API_KEY=second-secret-value-2".to_string()));
    assert_eq!(pid(&d, "t", "agent-1"), sibling, "the sibling restarted");
    assert_eq!(read_file(&secret_file), "second-secret-value-2");
    // Its log said both values; `logs` shows neither.
    let logs = wait_until(T, "alice's log shows both starts", |last| {
        let l = d.ctl(&["logs", "t/alice", "-n", "1000"]);
        *last = l.clone();
        (l.matches("key=").count() >= 2).then_some(l)
    });
    for v in ["first-secret-value-1", "second-secret-value-2"] {
        assert!(!logs.contains(v), "{v} in logs: {logs}");
    }
    assert!(logs.contains("key=[REDACTED]"), "{logs}");

    // `agent config`: names, no values.
    let cfg: Value =
        serde_json::from_str(&d.ctl(&["--json", "agent", "config", "t/alice"])).unwrap();
    assert_eq!(cfg["env"]["API_KEY"], "[REDACTED]", "{cfg}");
    assert_eq!(cfg["env"]["TZ"], "UTC", "{cfg}");
    assert_eq!(cfg["secrets"], serde_json::json!(["API_KEY"]));
    assert_eq!(cfg["files"], serde_json::json!(["notes/SOUL.md"]));
    assert!(!cfg.to_string().contains("second-secret-value-2"));

    // `fleetctl exec`: the agent's HOME and secrets, the program's own exit status.
    let out = d.ctl_output(&[
        "exec",
        "t/alice",
        "--",
        "sh",
        "-c",
        "printf '%s %s' \"$API_KEY\" \"$PWD\"; exit 3",
    ]);
    assert_eq!(out.status.code(), Some(3));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("second-secret-value-2 {}", home.display())
    );
    let out = d.ctl_output(&["exec", "t/alice", "--", "/nonexistent/program"]);
    assert_eq!(out.status.code(), Some(127));
    let out = d.ctl_output(&["exec", "t/nobody", "--", "true"]);
    assert_eq!(out.status.code(), Some(1), "exec of an unknown agent");

    // A daemon restart keeps the settings (the value comes back from the vault).
    let mut d = d;
    d.stop();
    d.launch();
    let out = d.ctl_output(&[
        "exec",
        "t/alice",
        "--",
        "sh",
        "-c",
        "printf %s \"$API_KEY\"",
    ]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "second-secret-value-2"
    );
    let p3 = wait_new_pid(&d, "t", "alice", 0);
    assert!(environ(p3).contains(&"API_KEY=second-secret-value-2".to_string()));

    // Settings changes: --unset-env, secret rm.
    d.ctl(&["agent", "set", "t/alice", "--unset-env", "TZ"]);
    let p4 = wait_new_pid(&d, "t", "alice", p3);
    assert!(!environ(p4).iter().any(|v| v.starts_with("TZ=")));
    let e = fails(&d, &["agent", "set", "t/alice", "--unset-env", "TZ"]);
    assert!(e.contains("no such variable"), "{e}");
    d.ctl(&["agent", "secret", "t/alice", "rm", "API_KEY"]);
    let p5 = wait_new_pid(&d, "t", "alice", p4);
    assert!(!environ(p5).iter().any(|v| v.starts_with("API_KEY=")));
    assert!(
        !secret_file.exists(),
        "the removed secret's file stayed in HOME"
    );

    // A directory of the HOME replaced by a link: the next start refuses it and writes
    // nothing through it.
    let outside = tempfile::tempdir().unwrap();
    std::fs::remove_dir_all(home.join("notes")).unwrap();
    std::os::unix::fs::symlink(outside.path(), home.join("notes")).unwrap();
    d.ctl(&["agent", "restart", "t/alice"]);
    let row = wait_until(T, "alice's start refused", |last| {
        let r = d.agent("t", "alice")?;
        *last = r.to_string();
        r["reason"]
            .as_str()
            .is_some_and(|why| why.contains("not a directory inside the HOME"))
            .then_some(r)
    });
    assert_ne!(row["state"], "running", "{row}");
    assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 0);

    // The secret leaves the vault with the agent.
    d.ctl(&secret_set("t/alice", "API_KEY", &key2));
    assert!(read_file(&vault).contains("second-secret-value-2"));
    d.ctl(&["agent", "rm", "t/alice"]);
    assert!(
        !read_file(&vault).contains("second-secret-value-2"),
        "vault kept a removed agent's secret"
    );
}

#[test]
fn spec_fleets_take_tenant_settings_from_the_spec_only() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("a.key");
    std::fs::write(&key, "spec-secret-value").unwrap();
    // b has a file and no secret: it still gets its file.
    std::fs::write(dir.path().join("b.md"), "b's persona\n").unwrap();
    let spec = dir.path().join("fleets.toml");
    std::fs::write(
        &spec,
        format!(
            "[[fleet]]\nname = \"s\"\ncommand = \"{STUB} --no-helper\"\nstride = 1\n\
             [[fleet.agents]]\nid = \"a\"\nsecrets = {{ API_KEY = \"a.key\" }}\n\
             [[fleet.agents]]\nid = \"b\"\nfiles = {{ \"notes/b.md\" = \"b.md\" }}\n"
        ),
    )
    .unwrap();
    let d = Daemon::start_with(&["--spec", spec.to_str().unwrap()]);
    let pa = wait_new_pid(&d, "s", "a", 0);
    let pb = wait_new_pid(&d, "s", "b", 0);
    assert!(environ(pa).contains(&"API_KEY=spec-secret-value".to_string()));
    let home_b = PathBuf::from(d.agent("s", "b").unwrap()["home"].as_str().unwrap());
    assert_eq!(read_file(&home_b.join("notes/b.md")), "b's persona\n");
    let e = fails(&d, &secret_set("s/a", "API_KEY", &key));
    assert!(e.contains("spec"), "{e}");
    std::fs::write(&key, "spec-secret-value-2").unwrap();
    let said = d.ctl(&["reload"]);
    assert!(
        said.contains("restart agent s/a (its secrets changed)") && !said.contains("s/b"),
        "{said}"
    );
    let pa2 = wait_new_pid(&d, "s", "a", pa);
    assert!(environ(pa2).contains(&"API_KEY=spec-secret-value-2".to_string()));
    assert_eq!(pid(&d, "s", "b"), pb, "b restarted for a's secret");
    // A secret file that went missing: the reload is refused whole.
    std::fs::remove_file(&key).unwrap();
    let e = fails(&d, &["reload"]);
    assert!(e.contains("a.key") && e.contains("does not exist"), "{e}");
    assert_eq!(pid(&d, "s", "a"), pa2);
}

#[test]
fn a_heap_abort_and_the_crash_loop_breaker_are_named() {
    let d = Daemon::start();
    let dir = tempfile::tempdir().unwrap();
    // V8's abort: the line on stderr, then SIGABRT.
    let oom = format!(
        "sh -c 'echo \"FATAL ERROR: Ineffective mark-compacts near heap limit Allocation failed - JavaScript heap out of memory\" >&2; exec {STUB} --no-helper --abort-after-ms 300'"
    );
    d.ctl(&["fleet", "create", "h", "--command", &oom, "--stride", "1"]);
    d.ctl(&[
        "agent",
        "add",
        "h",
        "a",
        "--env",
        "NODE_OPTIONS=--max-old-space-size=300",
    ]);
    let row = wait_until(T, "the abort named as a heap exhaustion", |last| {
        let r = d.agent("h", "a")?;
        *last = r.to_string();
        r["reason"]
            .as_str()?
            .contains("js heap out of memory (limit 300 MiB), signal 6 (SIGABRT)")
            .then_some(r)
    });
    assert!(row["restarts"].as_u64().unwrap() >= 1, "{row}");

    // OpenClaw's breaker: probes green, channels held off; said in status.
    let tpl = write(
        dir.path(),
        "t.json",
        r#"{"channels": {"telegram": {"botToken": "x"}}}"#,
    );
    let breaker = format!(
        "sh -c 'echo \"restart-loop breaker tripped: 3 unclean exits; suppressing channel/provider account auto-start\" >&2; exec {STUB} --no-helper'"
    );
    d.ctl(&[
        "fleet",
        "create",
        "b",
        "--agents",
        "1",
        "--command",
        &breaker,
        "--stride",
        "1",
        "--template",
        tpl.to_str().unwrap(),
    ]);
    let row = wait_until(T, "the breaker shown on the channel", |last| {
        let r = d.agent("b", "agent-1")?;
        *last = r.to_string();
        (r["channels"]["telegram"]["state"] == "off" && r["state"] == "running").then_some(r)
    });
    assert!(
        row["channels"]["telegram"]["error"]
            .as_str()
            .unwrap()
            .contains("crash-loop breaker"),
        "{row}"
    );
    // A fleet without the line: its channel is ready once the probe says so.
    let plain = format!("{STUB} --no-helper");
    d.ctl(&[
        "fleet",
        "create",
        "c",
        "--agents",
        "1",
        "--command",
        &plain,
        "--stride",
        "1",
        "--template",
        tpl.to_str().unwrap(),
    ]);
    wait_until(T, "a plain agent's channel ready", |last| {
        let r = d.agent("c", "agent-1")?;
        *last = r.to_string();
        (r["channels"]["telegram"]["state"] == "ready").then_some(())
    });
}
