//! A hostile tenant against the control socket: an agent running as the daemon's own user
//! (the unprivileged case, where uids do not separate them) tries `token`, `agent stop` and
//! `shutdown` on a sibling through the socket, also from a process in a new session and with
//! the agent marker removed from its environment. Every attempt is refused, naming why, and
//! nothing changes; the operator's `fleetctl` still works.

mod common;

use common::{read_file, wait_until, Daemon, FLEETCTL, STUB};
use std::time::Duration;

const T: Duration = Duration::from_secs(30);

#[test]
fn an_agent_cannot_drive_the_fleet_through_the_control_socket() {
    let d = Daemon::start();
    let sock = d.socket().display().to_string();
    let mut attack = String::new();
    for cmd in ["token t/agent-2", "agent stop t/agent-2", "shutdown"] {
        attack.push_str(&format!(
            "{FLEETCTL} --socket {sock} {cmd} >> $HOME/direct 2>&1; echo rc=$? >> $HOME/direct; \
             setsid -w env -u FLEET_COMMANDER_AGENT {FLEETCTL} --socket {sock} {cmd} >> $HOME/hidden 2>&1; echo rc=$? >> $HOME/hidden; "
        ));
    }
    attack.push_str("touch $HOME/done");
    // Only agent-1 attacks; agent-2 is the victim.
    let cmd = format!(
        "sh -c 'if [ \"${{HOME##*/}}\" = agent-1 ]; then {attack}; fi; exec {STUB} --no-helper'"
    );
    d.ctl(&[
        "fleet",
        "create",
        "t",
        "--agents",
        "2",
        "--command",
        &cmd,
        "--stride",
        "1",
    ]);
    let victim = d.wait_running("t", 2, T);
    let home1 = std::path::PathBuf::from(
        victim.iter().find(|r| r["agent"] == "agent-1").unwrap()["home"]
            .as_str()
            .unwrap(),
    );
    wait_until(T, "the attacker to finish", |_| {
        home1.join("done").exists().then_some(())
    });
    let token_before = d.ctl(&["token", "t/agent-2"]);
    for f in ["direct", "hidden"] {
        let out = read_file(&home1.join(f));
        assert_eq!(
            out.matches("rc=1").count(),
            3,
            "{f}: every attempt must fail: {out}"
        );
        assert!(
            !out.contains(token_before.trim()),
            "{f}: the token leaked: {out}"
        );
        assert!(out.contains("may not use the control socket"), "{f}: {out}");
    }
    let after = d.status();
    let pid_of = |rows: &[serde_json::Value], a: &str| {
        rows.iter().find(|r| r["agent"] == a).unwrap()["pid"].clone()
    };
    assert_eq!(
        pid_of(&after, "agent-2"),
        pid_of(&victim, "agent-2"),
        "the victim was touched"
    );
    assert!(after.iter().all(|r| r["state"] == "running"), "{after:?}");
    assert!(d.log().contains("control connection refused"));
}
