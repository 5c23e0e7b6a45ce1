//! Provisioning through the real daemon: ids refused before anything touches disk, HOME and
//! config modes, enforced config fields over a hostile template, distinct ports/tokens/logs,
//! ports held by other processes skipped (at lease time and again before a start), and the
//! start gate's bound on concurrent starts.

mod common;

use common::{wait_until, Daemon, STUB};
use fleet_commander::messages::events::Event;
use fleet_commander::spec::FleetSpec;
use fleet_commander::state::AgentState;
use serde_json::Value;
use std::collections::HashSet;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

const T: Duration = Duration::from_secs(30);

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .permissions()
        .mode()
        & 0o777
}

fn fleet_dirs(d: &Daemon) -> Vec<String> {
    std::fs::read_dir(d.state_dir().join("fleets"))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().to_string())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn invalid_ids_are_refused_before_anything_touches_disk() {
    let d = Daemon::start();
    let long = "a".repeat(41);
    for bad in ["../x", "A", "a_b", long.as_str(), "-a"] {
        let out = d.ctl_output(&["fleet", "create", bad, "--agents", "1", "--command", STUB]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{bad:?} accepted");
        assert!(
            err.contains("fleet") && err.contains(bad),
            "{bad:?}: unclear error: {err}"
        );
    }
    d.create_stub_fleet("ok", 1, "--no-helper", &[]);
    for bad in ["../x", "A", "a_b", long.as_str()] {
        let out = d.ctl_output(&["agent", "add", "ok", bad]);
        assert!(!out.status.success(), "agent {bad:?} accepted");
        assert!(String::from_utf8_lossy(&out.stderr).contains("agent"));
    }
    assert_eq!(fleet_dirs(&d), ["ok"]);
    let agents: Vec<String> = std::fs::read_dir(d.state_dir().join("fleets/ok"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .collect();
    assert_eq!(agents, ["agent-1"]);
}

#[test]
fn homes_configs_ports_tokens_and_logs_are_isolated_and_enforced() {
    let d = Daemon::start();
    let tpl = d.dir.path().join("hostile.json");
    std::fs::write(
        &tpl,
        r#"{"gateway":{"mode":"remote","bind":"lan","port":1,"auth":{"mode":"none","token":"stolen-token-123"}},
            "logging":{"file":"/tmp/openclaw/shared.log"},"custom":{"kept":true}}"#,
    )
    .unwrap();
    let tpl_s = tpl.display().to_string();
    let cmd = format!("{STUB} --no-helper");
    d.ctl(&[
        "fleet",
        "create",
        "iso",
        "--agents",
        "3",
        "--command",
        &cmd,
        "--template",
        &tpl_s,
        "--stride",
        "3",
    ]);
    let rows = d.wait_running("iso", 3, T);
    let mut ports = Vec::new();
    let mut tokens = HashSet::new();
    let mut logs = HashSet::new();
    for r in &rows {
        let home = Path::new(r["home"].as_str().unwrap());
        assert!(
            home.starts_with(d.state_dir().join("fleets/iso")),
            "{home:?}"
        );
        assert_eq!(mode(home), 0o700, "{home:?}");
        assert_eq!(mode(&home.join(".openclaw")), 0o700);
        let cfg_path = home.join(".openclaw/openclaw.json");
        assert_eq!(mode(&cfg_path), 0o600);
        let cfg: Value =
            serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
        let port = r["port"].as_u64().unwrap();
        let token = d
            .ctl(&["token", &format!("iso/{}", r["agent"].as_str().unwrap())])
            .trim()
            .to_string();
        assert_eq!(cfg["gateway"]["mode"], "local", "{cfg}");
        assert_eq!(cfg["gateway"]["bind"], "loopback", "{cfg}");
        assert_eq!(cfg["gateway"]["auth"]["mode"], "token", "{cfg}");
        assert_eq!(cfg["gateway"]["auth"]["token"], token.as_str(), "{cfg}");
        assert_eq!(cfg["gateway"]["port"].as_u64(), Some(port), "{cfg}");
        let log_file = cfg["logging"]["file"].as_str().unwrap();
        assert!(Path::new(log_file).starts_with(home), "{log_file}");
        assert_eq!(
            cfg["custom"]["kept"], true,
            "template values outside the enforced ones are kept"
        );
        assert_eq!(token.len(), 64);
        assert!(token.chars().all(|c| c.is_ascii_hexdigit()));
        ports.push(port);
        tokens.insert(token);
        logs.insert(log_file.to_string());
        // The daemon's log of it is outside its HOME, where the agent cannot touch it.
        assert!(!home.join("logs/agent.log").exists());
        let fleet_agent = home.strip_prefix(d.state_dir().join("fleets")).unwrap();
        assert!(d
            .state_dir()
            .join("logs")
            .join(fleet_agent)
            .join("agent.log")
            .exists());
    }
    ports.sort();
    for w in ports.windows(2) {
        assert!(w[1] >= w[0] + 3, "port blocks overlap: {ports:?}");
    }
    assert_eq!(tokens.len(), 3, "tokens shared");
    assert_eq!(logs.len(), 3, "log files shared");
    let log = d.log();
    assert!(
        log.contains("bind"),
        "no warning about the overridden bind: {log}"
    );
    for t in &tokens {
        assert!(
            !log.contains(t.as_str()),
            "a token reached the daemon's log"
        );
    }
}

#[test]
fn ports_bound_by_other_processes_are_skipped_at_lease_and_before_a_start() {
    // A listener on the first port of the daemon's range.
    let range = common::next_port_range();
    let first: u16 = range.split('-').next().unwrap().parse().unwrap();
    let squatter = std::net::TcpListener::bind(("127.0.0.1", first)).unwrap();
    let d = Daemon::start_with(&["--port-range", &range]);
    d.create_stub_fleet("sq", 1, "--no-helper", &[]);
    let rows = d.wait_running("sq", 1, T);
    assert_ne!(
        rows[0]["port"].as_u64(),
        Some(first as u64),
        "leased a bound port"
    );
    drop(squatter);
    // Stop the agent, let another process take its port, start it again: it moves.
    let port = rows[0]["port"].as_u64().unwrap() as u16;
    d.ctl(&["agent", "stop", "sq/agent-1"]);
    let thief = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
    d.ctl(&["agent", "start", "sq/agent-1"]);
    let moved = d.wait_running("sq", 1, T);
    assert_ne!(moved[0]["port"].as_u64(), Some(port as u64), "{moved:?}");
    drop(thief);
    let ports = d.ctl(&["--json", "ports"]);
    let leases: Value = serde_json::from_str(&ports).unwrap();
    assert_eq!(
        leases.as_array().unwrap().len(),
        1,
        "the old block was not released: {ports}"
    );
    assert_eq!(leases[0]["base"], moved[0]["port"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_start_gate_bounds_concurrent_starts() {
    let (_d, node) = common::node_with(|c| c.max_concurrent_starts = 2).await;
    let mut rx = node.subscribe();
    let mut spec = FleetSpec::new("gated");
    spec.agents = FleetSpec::numbered_agents(6);
    spec.command = Some(vec![
        STUB.into(),
        "--no-helper".into(),
        "--bind-delay-ms".into(),
        "300".into(),
    ]);
    spec.stride = Some(1);
    spec.start_gate = Some(true);
    node.create_fleet(spec).await.unwrap();
    let mut starting = HashSet::new();
    let mut running = HashSet::new();
    let mut max_seen = 0;
    let deadline = tokio::time::Instant::now() + T;
    while running.len() < 6 {
        let ev = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .unwrap_or_else(|_| {
                panic!("not all running; running={running:?} starting={starting:?}")
            })
            .unwrap();
        if let Event::Agent(t) = ev {
            if t.new == AgentState::Starting {
                starting.insert(t.agent.clone());
            } else {
                starting.remove(&t.agent);
            }
            if t.new == AgentState::Running {
                running.insert(t.agent.clone());
            }
            max_seen = max_seen.max(starting.len());
            assert!(
                starting.len() <= 2,
                "more than 2 starting at once: {starting:?}"
            );
        }
    }
    assert_eq!(max_seen, 2, "the gate never let 2 start together");
    let procs = common::marked_pids(&format!("{}/", node.node_id()));
    assert_eq!(procs.len(), 6, "{procs:?}");
    node.shutdown().await;
    wait_until(T, "no process left", |_| {
        procs.iter().all(|p| !common::alive(*p)).then_some(())
    });
}
