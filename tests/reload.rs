//! Reload sees what the files a spec names say, not only their paths: an edited template
//! restarts exactly the agents that use it, an agent never takes a changed file by itself
//! (and `status` says the file on disk differs), and an invalid edit is refused whole.

mod common;

use common::{wait_until, Daemon, STUB};
use serde_json::Value;
use std::path::Path;
use std::time::Duration;

const T: Duration = Duration::from_secs(30);

fn pid(d: &Daemon, fleet: &str, agent: &str) -> u64 {
    d.agent(fleet, agent).unwrap()["pid"].as_u64().unwrap()
}

fn config_mark(d: &Daemon, fleet: &str, agent: &str) -> Value {
    let row = d.agent(fleet, agent).unwrap();
    let home = row["home"].as_str().unwrap();
    let text = std::fs::read_to_string(Path::new(home).join(".openclaw/openclaw.json")).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    v["custom"]["v"].clone()
}

#[test]
fn an_edited_template_restarts_only_its_agents_and_only_on_reload() {
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("fleets.toml");
    let a = dir.path().join("a.json");
    let b = dir.path().join("b.json");
    std::fs::write(&a, r#"{"custom": {"v": 1}}"#).unwrap();
    std::fs::write(&b, r#"{"custom": {"v": 1}}"#).unwrap();
    std::fs::write(
        &spec,
        format!(
            "[defaults]\ncommand = \"{STUB} --no-helper\"\nstride = 1\n\
             [[fleet]]\nname = \"a\"\nagents = 2\ntemplate = \"a.json\"\n\
             [[fleet]]\nname = \"b\"\nagents = 1\ntemplate = \"b.json\"\n"
        ),
    )
    .unwrap();
    let mut d = Daemon::start_with(&["--spec", spec.to_str().unwrap()]);
    d.wait_running("a", 2, T);
    d.wait_running("b", 1, T);
    let (a1, a2, b1) = (
        pid(&d, "a", "agent-1"),
        pid(&d, "a", "agent-2"),
        pid(&d, "b", "agent-1"),
    );

    // Edited in place: reload says which agents restart and why, and restarts only those.
    std::fs::write(&a, r#"{"custom": {"v": 2}}"#).unwrap();
    let dry = d.ctl(&["reload", "--dry-run"]);
    assert!(
        dry.contains("restart agent a/agent-1 (template content changed)"),
        "{dry}"
    );
    assert!(dry.contains("restart agent a/agent-2"), "{dry}");
    assert!(!dry.contains("b/agent-1"), "{dry}");
    assert_eq!(pid(&d, "a", "agent-1"), a1, "--dry-run restarted an agent");
    let done = d.ctl(&["reload"]);
    assert!(
        done.contains("restart agent a/agent-1") && done.contains("a/agent-2"),
        "{done}"
    );
    wait_until(T, "a's agents restarted on the new template", |seen| {
        let rows = d.status();
        *seen = serde_json::to_string(&rows).unwrap();
        let new = |agent: &str, old: u64| {
            rows.iter().any(|r| {
                r["fleet"] == "a"
                    && r["agent"] == agent
                    && r["state"] == "running"
                    && r["pid"].as_u64().is_some_and(|p| p != old)
            })
        };
        (new("agent-1", a1) && new("agent-2", a2)).then_some(())
    });
    assert_eq!(config_mark(&d, "a", "agent-1"), 2);
    assert_eq!(config_mark(&d, "a", "agent-2"), 2);
    assert_eq!(
        pid(&d, "b", "agent-1"),
        b1,
        "b does not use a.json but restarted"
    );
    assert_eq!(config_mark(&d, "b", "agent-1"), 1);

    // Edited again without reload: a crash brings the accepted version back, and status
    // says the file on disk differs.
    std::fs::write(&a, r#"{"custom": {"v": 3}}"#).unwrap();
    let drift = wait_until(T, "status to flag the edited template", |seen| {
        let r = d.agent("a", "agent-1")?;
        *seen = r.to_string();
        r["drift"].as_str().map(str::to_string)
    });
    assert!(
        drift.contains("a.json") && drift.contains("reload"),
        "{drift}"
    );
    assert!(d.agent("b", "agent-1").unwrap()["drift"].is_null());
    let before = pid(&d, "a", "agent-1");
    unsafe { libc::kill(before as i32, libc::SIGKILL) };
    wait_until(T, "a/agent-1 back after SIGKILL", |seen| {
        let r = d.agent("a", "agent-1")?;
        *seen = r.to_string();
        (r["state"] == "running" && r["pid"].as_u64() != Some(before)).then_some(())
    });
    assert_eq!(
        config_mark(&d, "a", "agent-1"),
        2,
        "a restart took the unaccepted file"
    );
    // A daemon start with --spec applies the spec as it is then: that is a reload.
    d.kill9();
    d.launch();
    d.wait_running("a", 2, T);
    wait_until(T, "the spec applied at start", |seen| {
        *seen = format!("{}", config_mark(&d, "a", "agent-2"));
        (config_mark(&d, "a", "agent-2") == 3).then_some(())
    });
    d.wait_running("a", 2, T);

    // An invalid edit: refused with file, line and reason; nothing restarts.
    let pids: Vec<u64> = ["agent-1", "agent-2"]
        .iter()
        .map(|a| pid(&d, "a", a))
        .collect();
    std::fs::write(&a, "{\n  \"custom\": \n}\n").unwrap();
    let out = d.ctl_output(&["reload"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("a.json") && err.contains("invalid JSON at line 3"),
        "{err}"
    );
    let after: Vec<u64> = ["agent-1", "agent-2"]
        .iter()
        .map(|a| pid(&d, "a", a))
        .collect();
    assert_eq!(after, pids, "a refused reload restarted agents");
}
