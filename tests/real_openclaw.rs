//! End to end against the real OpenClaw gateway (`openclaw gateway run`, no `--command`):
//! isolation of HOMEs, ports, tokens and logs; the held pid being the gateway; restart of one
//! killed gateway alone; no process left after `fleet stop` or a daemon SIGKILL; the same
//! ports and tokens after a daemon restart; `agent rm --purge` removing OpenClaw's lock files.
//! Needs `scripts/install-openclaw.sh` (run by `scripts/test.sh`); fails when the install is
//! missing unless `FLEET_SKIP_REAL_OPENCLAW=1`. Start-up times are printed, never asserted.

mod common;
#[path = "common/openclaw.rs"]
mod openclaw;

use common::{descendants, http_get, marked_pids, read_file, wait_until, Daemon};
use openclaw::{
    cmdline, environ_var, gateway_health, lock_files, ns_pids, same_alive, serial, start_time,
    Install, START_DEADLINE,
};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Port ranges outside `common::next_port_range()`'s 21000-50999: a leased port stays the
/// agent's over a daemon restart, and a stub of another test binary running at the same time
/// (other worktrees on a shared machine) once took 127.0.0.1:21000 in between, so the
/// restarted gateway's port answered the stub's 404 to the WebSocket client.
fn daemon(inst: &Install, ports: &str, extra: &[&str]) -> Daemon {
    let bin = inst.openclaw.to_string_lossy().into_owned();
    let mut args = vec!["--openclaw", bin.as_str(), "--port-range", ports];
    args.extend_from_slice(extra);
    Daemon::start_with(&args)
}

fn token(d: &Daemon, fleet: &str, agent: &str) -> String {
    let v: Value = serde_json::from_str(&d.ctl(&["--json", "token", &format!("{fleet}/{agent}")]))
        .expect("token --json is JSON");
    v["token"].as_str().expect("token field").to_string()
}

/// What one running agent looks like from outside, keyed by agent name.
#[derive(Debug, Clone)]
struct Seen {
    pid: u32,
    start: u64,
    port: u16,
    home: PathBuf,
    token: String,
}

fn seen(d: &Daemon, fleet: &str, rows: &[Value]) -> BTreeMap<String, Seen> {
    rows.iter()
        .map(|r| {
            let agent = r["agent"].as_str().unwrap().to_string();
            let pid = r["pid"].as_u64().expect("running agent has a pid") as u32;
            let s = Seen {
                pid,
                start: start_time(pid).unwrap_or_else(|| panic!("{agent}: pid {pid} not in /proc")),
                port: r["port"].as_u64().expect("running agent has a port") as u16,
                home: PathBuf::from(r["home"].as_str().unwrap()),
                token: token(d, fleet, &agent),
            };
            (agent, s)
        })
        .collect()
}

fn wait_ready(port: u16, who: &str) {
    wait_until(
        START_DEADLINE,
        &format!("{who}: /readyz 200 on {port}"),
        |last| {
            let code = http_get(port, "/readyz");
            *last = format!("{code:?}");
            (code == Some(200)).then_some(())
        },
    );
}

/// Distinct ports, HOMEs, tokens, log files; each gateway ready on its own port, the held pid
/// being `openclaw-gateway` itself, running with the environment the commander gave it.
fn check_isolated(agents: &BTreeMap<String, Seen>) {
    let n = agents.len();
    let distinct =
        |f: &dyn Fn(&Seen) -> String| agents.values().map(f).collect::<BTreeSet<_>>().len() == n;
    assert!(
        distinct(&|s| s.port.to_string()),
        "ports not distinct: {agents:?}"
    );
    assert!(
        distinct(&|s| s.home.display().to_string()),
        "HOMEs not distinct: {agents:?}"
    );
    assert!(distinct(&|s| s.token.clone()), "tokens not distinct");
    for (name, s) in agents {
        assert_eq!(s.token.len(), 64, "{name}: token is not 64 hex characters");
        wait_ready(s.port, name);
        // The gateway renames itself once up; before that the comm is still `openclaw`.
        wait_until(
            Duration::from_secs(30),
            &format!("{name}: pid {} is openclaw-gateway", s.pid),
            |last| {
                *last = cmdline(s.pid);
                (*last == "openclaw-gateway").then_some(())
            },
        );
        let home = s.home.to_string_lossy();
        assert_eq!(
            environ_var(s.pid, "HOME").as_deref(),
            Some(&*home),
            "{name}: HOME"
        );
        assert_eq!(
            environ_var(s.pid, "TMPDIR"),
            Some(format!("{home}/tmp")),
            "{name}: TMPDIR must be inside its HOME"
        );
        assert_eq!(
            environ_var(s.pid, "OPENCLAW_GATEWAY_PORT"),
            Some(s.port.to_string()),
            "{name}: port env"
        );
        assert!(
            environ_var(s.pid, "NODE_COMPILE_CACHE").is_some(),
            "{name}: NODE_COMPILE_CACHE unset"
        );
        assert_eq!(
            environ_var(s.pid, "OPENCLAW_PACKAGED_COMPILE_CACHE_RESPAWNED").as_deref(),
            Some("1"),
            "{name}: without it the launcher re-spawns and the held pid is not the gateway"
        );
        // Its config carries the port and token the commander reports.
        let cfg: Value = serde_json::from_str(&read_file(&s.home.join(".openclaw/openclaw.json")))
            .unwrap_or_else(|e| panic!("{name}: openclaw.json: {e}"));
        assert_eq!(cfg["gateway"]["port"], s.port, "{name}: config port");
        assert_eq!(
            cfg["gateway"]["auth"]["token"],
            s.token.as_str(),
            "{name}: config token"
        );
        // Both log files exist and are written to: OpenClaw's in its own HOME, the daemon's
        // outside it (`<state>/logs/<fleet>/<agent>/agent.log`).
        let daemon_log = s
            .home
            .parent()
            .and_then(Path::parent)
            .and_then(Path::parent)
            .unwrap()
            .join("logs")
            .join(
                s.home
                    .strip_prefix(s.home.parent().unwrap().parent().unwrap())
                    .unwrap(),
            )
            .join("agent.log");
        for p in [daemon_log, s.home.join("logs/openclaw.log")] {
            wait_until(
                Duration::from_secs(30),
                &format!("{name}: {} non-empty", p.display()),
                |last| {
                    let len = std::fs::metadata(&p).map(|m| m.len());
                    *last = format!("{len:?}");
                    (len.unwrap_or(0) > 0).then_some(())
                },
            );
        }
        let ns = ns_pids(s.pid);
        eprintln!(
            "{name}: pid {} port {} ready; NSpid {ns:?}{}",
            s.pid,
            s.port,
            if ns.len() > 1 {
                " (inside a PID namespace: getppid() is 0 there)"
            } else {
                ""
            }
        );
    }
}

/// A client holding one agent's token is served by that agent and refused by every other.
fn check_tokens(inst: &Install, agents: &BTreeMap<String, Seen>) {
    let (first, a) = agents.iter().next().expect("an agent");
    let own = gateway_health(inst, a.port, &a.token);
    assert!(own.ok, "{first}'s own token refused on {}: {own:?}", a.port);
    assert!(
        own.stdout.contains("\"ok\": true"),
        "{first}: health JSON lacks ok=true: {}",
        own.stdout
    );
    for (name, b) in agents.iter().skip(1) {
        let other = gateway_health(inst, b.port, &a.token);
        assert!(
            !other.ok,
            "{name} on {} accepted {first}'s token: {other:?}",
            b.port
        );
        assert!(
            other.stdout.contains("token mismatch") || other.stderr.contains("token mismatch"),
            "{name}: refused, but not for the token: {other:?}"
        );
    }
}

/// Live pids (with start times) of processes carrying this marker prefix or descending from
/// one of `roots`.
fn tree_of(prefix: &str, roots: &[u32]) -> Vec<(u32, u64)> {
    let mut pids: BTreeSet<u32> = marked_pids(prefix).into_iter().collect();
    for r in roots {
        pids.insert(*r);
        pids.extend(descendants(*r));
    }
    pids.into_iter()
        .filter_map(|p| start_time(p).map(|t| (p, t)))
        .collect()
}

fn none_alive(procs: &[(u32, u64)], prefix: &str) -> Option<()> {
    let left: Vec<_> = procs.iter().filter(|(p, t)| same_alive(*p, *t)).collect();
    (left.is_empty() && marked_pids(prefix).is_empty()).then_some(())
}

fn describe(procs: &[(u32, u64)], prefix: &str) -> String {
    let left: Vec<String> = procs
        .iter()
        .filter(|(p, t)| same_alive(*p, *t))
        .map(|(p, _)| format!("{p} {}", cmdline(*p)))
        .collect();
    format!(
        "alive: {left:?}; marked {prefix}: {:?}",
        marked_pids(prefix)
    )
}

/// One daemon, one fleet of 3 lean real gateways, checked in turn (a cold start is expensive,
/// so the checks share it): isolation, tokens, one gateway killed and restarted alone,
/// `agent rm --purge`, then fleetd SIGKILL leaving nothing within 2 s. (`fleet stop`: in
/// `two_real_agents_default_profile`; daemon restart: `real_daemon_restart_*`.)
#[test]
fn real_fleet_of_three() {
    let Some(inst) = openclaw::install("real_fleet_of_three") else {
        return;
    };
    let _one_at_a_time = serial();
    let mut d = daemon(&inst, "55000-55999", &[]);
    let t0 = Instant::now();
    d.ctl(&["fleet", "create", "r", "--agents", "3", "--profile", "lean"]);
    let rows = d.wait_running("r", 3, START_DEADLINE);
    eprintln!(
        "real_fleet_of_three: 3 lean gateways running {:.1} s after fleet create",
        t0.elapsed().as_secs_f64()
    );
    let node = d.node_id();
    assert!(!node.is_empty(), "registry.json has no node_id");
    eprintln!(
        "real_fleet_of_three: restarts during start: {:?}",
        rows.iter().map(|r| &r["restarts"]).collect::<Vec<_>>()
    );
    let agents = seen(&d, "r", &rows);
    check_isolated(&agents);
    check_tokens(&inst, &agents);

    // Each gateway's tree: spawn-broker (own session) and sqlite worker carry its marker.
    for (name, s) in &agents {
        let marker =
            environ_var(s.pid, "FLEET_COMMANDER_AGENT").expect("gateway carries its marker");
        assert!(
            marker.starts_with(&format!("{node}/r/{name}/")),
            "{name}: marker {marker}"
        );
        let kids = descendants(s.pid);
        let unmarked: Vec<_> = kids
            .iter()
            .filter(|p| environ_var(**p, "FLEET_COMMANDER_AGENT").is_some_and(|m| m != marker))
            .collect();
        assert!(
            unmarked.is_empty(),
            "{name}: descendants with another marker: {unmarked:?}"
        );
        eprintln!(
            "{name}: {} descendants: {:?}",
            kids.len(),
            kids.iter().map(|p| cmdline(*p)).collect::<Vec<_>>()
        );
    }

    // SIGKILL one gateway: it alone restarts, its old tree goes, the others keep their pids.
    let victim = agents["agent-2"].clone();
    let old_marker = environ_var(victim.pid, "FLEET_COMMANDER_AGENT").unwrap();
    let old_tree = tree_of(&old_marker, &[victim.pid]);
    unsafe { libc::kill(victim.pid as i32, libc::SIGKILL) };
    let t_kill = Instant::now();
    let row = wait_until(
        START_DEADLINE,
        "agent-2 running again under a new pid",
        |last| {
            let r = d.agent("r", "agent-2")?;
            *last = r.to_string();
            (r["state"] == "running"
                && r["healthy"] == true
                && r["pid"].as_u64().is_some_and(|p| p as u32 != victim.pid))
            .then_some(r)
        },
    );
    eprintln!(
        "real_fleet_of_three: killed gateway running again after {:.1} s",
        t_kill.elapsed().as_secs_f64()
    );
    assert!(
        row["restarts"].as_u64().unwrap() >= 1,
        "agent-2 restart not counted: {row}"
    );
    assert_eq!(
        row["port"].as_u64(),
        Some(victim.port as u64),
        "agent-2 changed port"
    );
    assert_eq!(
        token(&d, "r", "agent-2"),
        victim.token,
        "agent-2 changed token"
    );
    wait_ready(victim.port, "agent-2 after restart");
    wait_until(
        Duration::from_secs(30),
        "the killed gateway's old tree to be gone",
        |last| {
            *last = describe(&old_tree, &old_marker);
            none_alive(&old_tree, &old_marker)
        },
    );
    for name in ["agent-1", "agent-3"] {
        let r = d.agent("r", name).unwrap();
        let s = &agents[name];
        assert_eq!(r["restarts"], 0, "{name} restarted with agent-2: {r}");
        assert!(
            same_alive(s.pid, s.start),
            "{name}: pid {} is not the same process any more: {r}",
            s.pid
        );
        assert_eq!(
            r["pid"].as_u64(),
            Some(s.pid as u64),
            "{name}: pid changed: {r}"
        );
    }

    // agent rm --purge: HOME and OpenClaw's lock files for that HOME go.
    let gone = agents["agent-3"].clone();
    let locks = lock_files(&gone.home);
    assert!(
        !locks.is_empty(),
        "no lock files for {} under /tmp/openclaw-state-locks-<uid>/ while it runs (docs/openclaw-facts.md §2)",
        gone.home.display()
    );
    let gone_marker = environ_var(gone.pid, "FLEET_COMMANDER_AGENT").unwrap();
    let gone_tree = tree_of(&gone_marker, &[gone.pid]);
    d.ctl(&["agent", "rm", "r/agent-3", "--purge"]);
    wait_until(
        Duration::from_secs(30),
        "agent-3's processes gone after rm --purge",
        |last| {
            *last = describe(&gone_tree, &gone_marker);
            none_alive(&gone_tree, &gone_marker)
        },
    );
    assert!(
        d.agent("r", "agent-3").is_none(),
        "agent-3 still listed after rm"
    );
    assert!(
        !gone.home.exists(),
        "{} still exists after rm --purge",
        gone.home.display()
    );
    let left: Vec<_> = locks.iter().filter(|p| p.exists()).collect();
    assert!(
        left.is_empty(),
        "lock files left after rm --purge: {left:?}"
    );
    assert!(
        !lock_files(&agents["agent-1"].home).is_empty(),
        "purging agent-3 removed agent-1's locks"
    );

    // Daemon SIGKILL: the PID-namespace guardian / sweep leaves nothing of the node within 2 s.
    let rows = d.wait_running("r", 2, START_DEADLINE);
    let before = seen(&d, "r", &rows);
    let node_prefix = format!("{node}/");
    let roots: Vec<u32> = std::iter::once(d.pid())
        .chain(before.values().map(|s| s.pid))
        .collect();
    let whole = tree_of(&node_prefix, &roots);
    let fleetd_pid = d.pid();
    d.kill9();
    let t_kill = Instant::now();
    let whole: Vec<_> = whole
        .into_iter()
        .filter(|(p, _)| *p != fleetd_pid)
        .collect();
    wait_until(
        Duration::from_secs(2),
        "every process of the node gone after fleetd SIGKILL",
        |last| {
            *last = describe(&whole, &node_prefix);
            none_alive(&whole, &node_prefix)
        },
    );
    eprintln!(
        "real_fleet_of_three: {} processes gone {:.2} s after fleetd SIGKILL",
        whole.len(),
        t_kill.elapsed().as_secs_f64()
    );
}

/// Kills fleetd with SIGKILL under 2 lean gateways and starts it again on the same state:
/// the same ports, tokens and HOMEs come back and the gateways get ready.
fn daemon_restart(test: &str, ports: &str, extra: &[&str]) {
    let Some(inst) = openclaw::install(test) else {
        return;
    };
    let _one_at_a_time = serial();
    let mut d = daemon(&inst, ports, extra);
    d.ctl(&["fleet", "create", "r", "--agents", "2", "--profile", "lean"]);
    let rows = d.wait_running("r", 2, START_DEADLINE);
    let before = seen(&d, "r", &rows);
    let node_prefix = format!("{}/", d.node_id());
    d.kill9();
    // Without the PID-namespace guardian the new daemon's sweep takes what PDEATHSIG left.
    let t_up = Instant::now();
    d.launch();
    let rows = d.wait_running("r", 2, START_DEADLINE);
    eprintln!(
        "{test}: 2 gateways running {:.1} s after fleetd restart",
        t_up.elapsed().as_secs_f64()
    );
    let after = seen(&d, "r", &rows);
    for (name, s) in &after {
        assert_eq!(
            s.port, before[name].port,
            "{name}: port changed over a daemon restart"
        );
        assert_eq!(
            s.token, before[name].token,
            "{name}: token changed over a daemon restart"
        );
        assert_eq!(
            s.home, before[name].home,
            "{name}: HOME changed over a daemon restart"
        );
        assert!(
            !same_alive(before[name].pid, before[name].start),
            "{name}: the old gateway survived"
        );
        wait_ready(s.port, name);
    }
    check_tokens(&inst, &after);
    let marked: Vec<String> = marked_pids(&node_prefix)
        .into_iter()
        .filter_map(|p| environ_var(p, "FLEET_COMMANDER_AGENT"))
        .collect();
    let current: BTreeSet<String> = after
        .values()
        .filter_map(|s| environ_var(s.pid, "FLEET_COMMANDER_AGENT"))
        .collect();
    let stale: Vec<_> = marked.iter().filter(|m| !current.contains(*m)).collect();
    assert!(
        stale.is_empty(),
        "processes of the killed daemon's incarnations still run: {stale:?}"
    );
    d.stop();
}

/// Daemon restart with agents as plain children (what a non-root fleetd does).
#[test]
fn real_daemon_restart_keeps_ports_and_tokens() {
    daemon_restart(
        "real_daemon_restart_keeps_ports_and_tokens",
        "58000-58999",
        &["--no-pid-namespace"],
    );
}

/// The same with agents in fleetd's PID namespace (the default for root). OpenClaw 2026.9.6
/// records its owner lease as its pid plus that pid's start time from /proc; with the host's
/// /proc, a restarted daemon's namespace reuses the same small pids and a stale lease looked
/// held (the gateway exited 1, "Another Gateway owner lease is still active"). Agents now get
/// a /proc of their own namespace (`process::spawn::mount_own_proc`); this guards that.
#[test]
fn real_daemon_restart_in_pid_namespace() {
    daemon_restart("real_daemon_restart_in_pid_namespace", "59000-59999", &[]);
}

/// Issue 9: two agents of one fleet (default profile) reach /readyz 200 with distinct ports,
/// HOMEs and log files and are gone after `fleet stop`. Prints create → both running.
#[test]
fn two_real_agents_default_profile() {
    let Some(inst) = openclaw::install("two_real_agents_default_profile") else {
        return;
    };
    let _one_at_a_time = serial();
    let mut d = daemon(&inst, "56000-56999", &[]);
    let t0 = Instant::now();
    d.ctl(&["fleet", "create", "two", "--agents", "2"]);
    let rows = d.wait_running("two", 2, START_DEADLINE);
    eprintln!(
        "two_real_agents_default_profile: 2 gateways running {:.1} s after fleet create",
        t0.elapsed().as_secs_f64()
    );
    let agents = seen(&d, "two", &rows);
    check_isolated(&agents);
    let logs: BTreeSet<PathBuf> = agents
        .values()
        .map(|s| s.home.join("logs/openclaw.log"))
        .collect();
    assert_eq!(logs.len(), 2, "log files not distinct");
    let prefix = format!("{}/two/", d.node_id());
    let roots: Vec<u32> = agents.values().map(|s| s.pid).collect();
    let tree = tree_of(&prefix, &roots);
    assert!(
        tree.len() > roots.len(),
        "expected each gateway to have helper processes (spawn-broker, sqlite worker): {tree:?}"
    );
    d.ctl(&["fleet", "stop", "two"]);
    wait_until(
        Duration::from_secs(60),
        "both gateways gone after fleet stop",
        |last| {
            *last = describe(&tree, &prefix);
            none_alive(&tree, &prefix)
        },
    );
    for s in agents.values() {
        assert_ne!(
            http_get(s.port, "/readyz"),
            Some(200),
            "port {} still serves after fleet stop",
            s.port
        );
    }
    d.stop();
}

/// 10 lean gateways (or `FLEET_REAL_AGENTS`) through the start gate
/// (`--max-concurrent-starts 2`): every one running and answering `/readyz` 200 at the same
/// time; prints create → all running. Takes minutes and ~700 MB per agent; run with
/// `cargo test --test real_openclaw -- --ignored --nocapture ten`.
#[test]
#[ignore]
fn ten_real_agents_with_start_gate() {
    let Some(inst) = openclaw::install("ten_real_agents_with_start_gate") else {
        return;
    };
    let _one_at_a_time = serial();
    let n: usize = std::env::var("FLEET_REAL_AGENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let mut d = daemon(&inst, "51000-52999", &["--max-concurrent-starts", "2"]);
    let t0 = Instant::now();
    let count = n.to_string();
    d.ctl(&[
        "fleet",
        "create",
        "ten",
        "--agents",
        &count,
        "--profile",
        "lean",
    ]);
    let mut first_running: BTreeMap<String, f64> = BTreeMap::new();
    wait_until(
        Duration::from_secs(900 + 60 * n as u64),
        "gateways running",
        |last| {
            let rows: Vec<Value> = d
                .status()
                .into_iter()
                .filter(|r| r["fleet"] == "ten")
                .collect();
            for r in &rows {
                if r["state"] == "running" && r["healthy"] == true {
                    first_running
                        .entry(r["agent"].as_str().unwrap().to_string())
                        .or_insert_with(|| t0.elapsed().as_secs_f64());
                }
            }
            *last = format!("{} running: {first_running:?}", first_running.len());
            (first_running.len() == n).then_some(())
        },
    );
    eprintln!(
        "ten_real_agents_with_start_gate: all {n} running {:.1} s after fleet create; per agent {first_running:?}",
        t0.elapsed().as_secs_f64()
    );
    // Every one ready at once, each on its own port.
    let rows: Vec<Value> = d
        .status()
        .into_iter()
        .filter(|r| r["fleet"] == "ten")
        .collect();
    for r in &rows {
        let port = r["port"].as_u64().unwrap() as u16;
        wait_ready(port, r["agent"].as_str().unwrap());
    }
    let running_now = d
        .status()
        .iter()
        .filter(|r| r["fleet"] == "ten" && r["state"] == "running")
        .count();
    assert_eq!(
        running_now, n,
        "an agent left running while the others were checked"
    );
    eprintln!(
        "ten_real_agents_with_start_gate: {n} lean gateways running at once, every /readyz 200"
    );
    let rows = d.status();
    let restarts: u64 = rows
        .iter()
        .map(|r| r["restarts"].as_u64().unwrap_or(0))
        .sum();
    eprintln!("ten_real_agents_with_start_gate: restarts during start {restarts}");
    let top = d.ctl(&["top"]);
    eprintln!("{top}");
    let t_stop = Instant::now();
    d.ctl(&["fleet", "stop", "ten"]);
    let prefix = format!("{}/ten/", d.node_id());
    wait_until(Duration::from_secs(120), "gateways gone", |last| {
        let m = marked_pids(&prefix);
        *last = format!("{m:?}");
        m.is_empty().then_some(())
    });
    eprintln!(
        "ten_real_agents_with_start_gate: fleet stop took {:.1} s",
        t_stop.elapsed().as_secs_f64()
    );
    d.stop();
}

/// The `lean` profile against `default`, in one daemon and one run: both gateways get ready
/// on their own ports, and the lean one's whole tree holds less memory. Figures printed.
#[test]
fn lean_profile_is_ready_and_smaller_than_default() {
    let Some(inst) = openclaw::install("lean_profile_is_ready_and_smaller_than_default") else {
        return;
    };
    let _one_at_a_time = serial();
    let d = daemon(&inst, "57000-57999", &[]);
    let t0 = Instant::now();
    d.ctl(&[
        "fleet",
        "create",
        "dflt",
        "--agents",
        "1",
        "--profile",
        "default",
    ]);
    d.ctl(&[
        "fleet",
        "create",
        "lean",
        "--agents",
        "1",
        "--profile",
        "lean",
    ]);
    let mut up = BTreeMap::new();
    let rows = wait_until(START_DEADLINE, "both gateways running", |last| {
        let rows: Vec<Value> = d.status();
        *last = serde_json::to_string(&rows).unwrap();
        for r in &rows {
            if r["state"] == "running" {
                up.entry(r["fleet"].as_str().unwrap().to_string())
                    .or_insert_with(|| t0.elapsed());
            }
        }
        (rows.len() == 2 && rows.iter().all(|r| r["state"] == "running")).then_some(rows)
    });
    for r in &rows {
        wait_ready(
            r["port"].as_u64().unwrap() as u16,
            r["fleet"].as_str().unwrap(),
        );
    }
    // Memory settles after start-up: compare the whole trees' PSS (`top`) once both are ready
    // and the sampler has seen them, taking each profile's largest of three readings.
    let mut pss: BTreeMap<String, u64> = BTreeMap::new();
    for _ in 0..3 {
        let top: Value = serde_json::from_str(&d.ctl(&["--json", "top"])).unwrap();
        for r in top.as_array().unwrap() {
            let v = r["pss_bytes"]
                .as_u64()
                .or(r["rss_bytes"].as_u64())
                .unwrap_or(0);
            let e = pss
                .entry(r["fleet"].as_str().unwrap().to_string())
                .or_default();
            *e = (*e).max(v);
        }
    }
    let rss: BTreeMap<String, u64> =
        wait_until(Duration::from_secs(30), "RSS samples of both", |last| {
            let rows = d.status();
            *last = serde_json::to_string(&rows).unwrap();
            rows.iter()
                .map(|r| Some((r["fleet"].as_str()?.to_string(), r["rss_bytes"].as_u64()?)))
                .collect::<Option<BTreeMap<_, _>>>()
        });
    eprintln!(
        "lean vs default (one run): cold start to running {:?} vs {:?}; tree PSS {} vs {} MiB; tree RSS {} vs {} MiB",
        up["lean"],
        up["dflt"],
        pss["lean"] >> 20,
        pss["dflt"] >> 20,
        rss["lean"] >> 20,
        rss["dflt"] >> 20
    );
    assert!(
        pss["lean"] < pss["dflt"],
        "lean PSS {} is not below default {}",
        pss["lean"],
        pss["dflt"]
    );
}

/// GET with the body, for the metrics endpoint.
fn http_body(port: u16, path: &str) -> String {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return String::new();
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    );
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

fn mode(p: &std::path::Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .permissions()
        .mode()
        & 0o777
}

/// One tenant of the end-to-end test.
struct Tenant {
    id: &'static str,
    bot: String,
    key: &'static str,
    user: i64,
}

/// Three tenants, three bots, three model keys, each from a spec with per-agent settings and
/// secrets, on real lean gateways: each bot answers its own user with the model's answer to
/// its own key and no bot says anything to another's user; `status` shows each channel ready;
/// `agent config` redacts; `fleetctl exec` runs `openclaw channels status --json` as the
/// agent; a rotated secret (spec reload) restarts that agent alone and its bot answers with the
/// new token; a revoked token shows that channel failed while `/healthz` stays 200; no secret
/// value is in fleetd's debug log, events, `status --json`, metrics, the registry or any
/// agent's command line, and every file holding one is 0600.
#[test]
fn three_tenants_each_answered_by_their_own_bot_and_key() {
    use common::fakes::{FakeModel, FakeTelegram};
    let Some(inst) = openclaw::install("three_tenants_each_answered_by_their_own_bot_and_key")
    else {
        return;
    };
    let _one_at_a_time = serial();
    let tg = FakeTelegram::start();
    let model = FakeModel::start("the model answers with key {key}");
    let tenants = [
        Tenant {
            id: "alice",
            bot: "1001:AAalice-bot-token-0001".into(),
            key: "sk-alice-key-000001",
            user: 5001,
        },
        Tenant {
            id: "bob",
            bot: "1002:AAbob-bot-token-00002".into(),
            key: "sk-bob-key-0000002",
            user: 5002,
        },
        Tenant {
            id: "carol",
            bot: "1003:AAcarol-bot-token-003".into(),
            key: "sk-carol-key-00003",
            user: 5003,
        },
    ];
    for t in &tenants {
        tg.add_bot(&t.bot);
    }
    let metrics_port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    // The spec and its files live beside the daemon's state dir.
    let work = tempfile::tempdir().unwrap();
    let dir = work.path();
    std::fs::create_dir_all(dir.join("secrets")).unwrap();
    std::fs::create_dir_all(dir.join("tenants")).unwrap();
    std::fs::write(
        dir.join("fleet.json"),
        serde_json::json!({
            "models": {"providers": {"fake": {"baseUrl": model.base_url(),
                "apiKey": "${OPENAI_API_KEY}", "models": [{"id": "m", "name": "m"}]}}},
            "agents": {"defaults": {"model": {"primary": "fake/m"}, "heartbeat": {"every": "0m"}}}
        })
        .to_string(),
    )
    .unwrap();
    let mut spec = String::from(
        "[[fleet]]\nname = \"tenants\"\nprofile = \"lean\"\ntemplate = \"fleet.json\"\n[fleet.health]\ninterval_ms = 1000\ntimeout_ms = 10000\n",
    );
    // The daemon's state dir is known only once it exists: carol's tokenFile names a path in
    // her HOME, so the daemon is made first and the spec written before it is told to load it.
    let mut d = daemon(
        &inst,
        "57000-57999",
        &["--metrics-addr", &metrics_port.to_string()],
    );
    let state_dir = d.state_dir();
    let home = |id: &str| state_dir.join("fleets/tenants").join(id);
    for t in &tenants {
        std::fs::write(
            dir.join(format!("secrets/{}.tg", t.id)),
            format!("{}\n", t.bot),
        )
        .unwrap();
        std::fs::write(dir.join(format!("secrets/{}.key", t.id)), t.key).unwrap();
        let token = if t.id == "carol" {
            serde_json::json!({"tokenFile": home("carol").join(".openclaw/secrets/TG_BOT_TOKEN")})
        } else {
            serde_json::json!({"botToken": "${TG_BOT_TOKEN}"})
        };
        let mut tgc = serde_json::json!({"apiRoot": tg.api_root(), "dmPolicy": "allowlist",
            "allowFrom": [t.user.to_string()]});
        for (k, v) in token.as_object().unwrap() {
            tgc[k] = v.clone();
        }
        std::fs::write(
            dir.join(format!("tenants/{}.json", t.id)),
            serde_json::json!({"channels": {"telegram": tgc}}).to_string(),
        )
        .unwrap();
        std::fs::write(
            dir.join(format!("tenants/{}.soul.md", t.id)),
            format!("I am {}'s bot.\n", t.id),
        )
        .unwrap();
        spec.push_str(&format!(
            "\n[[fleet.agents]]\nid = \"{id}\"\ntemplate = \"tenants/{id}.json\"\nenv = {{ TZ = \"Europe/Madrid\" }}\nsecrets = {{ TG_BOT_TOKEN = \"secrets/{id}.tg\", OPENAI_API_KEY = \"secrets/{id}.key\" }}\nfiles = {{ \".openclaw/workspace/SOUL.md\" = \"tenants/{id}.soul.md\" }}\n",
            id = t.id
        ));
    }
    let spec_path = dir.join("fleets.toml");
    std::fs::write(&spec_path, &spec).unwrap();
    d.stop();
    d.extra_args
        .extend(["--spec".to_string(), spec_path.display().to_string()]);
    let t0 = Instant::now();
    d.launch();
    let events_file = dir.join("events.jsonl");
    let mut events = std::process::Command::new(env!("CARGO_BIN_EXE_fleetctl"))
        .arg("--socket")
        .arg(d.socket())
        .args(["--json", "events"])
        .stdout(std::fs::File::create(&events_file).unwrap())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();

    let rows = d.wait_running("tenants", 3, START_DEADLINE);
    let port = |rows: &[Value], id: &str| {
        rows.iter()
            .find(|r| r["agent"] == id)
            .and_then(|r| r["port"].as_u64())
            .unwrap() as u16
    };
    for t in &tenants {
        wait_ready(port(&rows, t.id), t.id);
    }
    let ready_after = t0.elapsed();
    let channel = |d: &Daemon, id: &str| -> String {
        d.agent("tenants", id)
            .and_then(|r| {
                r["channels"]["telegram"]["state"]
                    .as_str()
                    .map(str::to_string)
            })
            .unwrap_or_default()
    };
    for t in &tenants {
        wait_until(
            Duration::from_secs(30),
            &format!("{}: telegram ready in status", t.id),
            |last| {
                *last = channel(&d, t.id);
                (last == "ready").then_some(())
            },
        );
    }

    // Each bot answers its own user, with the model's answer to its own key.
    let ask = |t: &Tenant, bot: &str, text: &str| -> Duration {
        let before = tg.sent(bot).len();
        let asked = Instant::now();
        tg.send_dm(bot, t.user, text);
        let m = wait_until(
            Duration::from_secs(120),
            &format!("{}'s answer", t.id),
            |last| {
                let sent = tg.sent(bot);
                *last = format!("sent {sent:?}; calls {:?}", tg.calls(bot));
                sent.into_iter()
                    .skip(before)
                    .find(|m| m.text.contains("the model answers"))
            },
        );
        assert_eq!(
            m.chat_id,
            t.user.to_string(),
            "{}'s bot answered another chat",
            t.id
        );
        assert!(
            m.text.contains(t.key),
            "{}'s bot answered with another key: {:?}",
            t.id,
            m.text
        );
        m.at.duration_since(asked)
    };
    let mut first = Vec::new();
    for t in &tenants {
        first.push(ask(t, &t.bot, "hello, bot"));
    }
    let later = ask(&tenants[0], &tenants[0].bot, "and again");
    for t in &tenants {
        let wrong: Vec<_> = tg
            .sent(&t.bot)
            .into_iter()
            .filter(|m| m.chat_id != t.user.to_string())
            .collect();
        assert!(
            wrong.is_empty(),
            "{}'s bot wrote to other chats: {wrong:?}",
            t.id
        );
    }
    let keys: BTreeSet<String> = model.keys().into_iter().collect();
    let want: BTreeSet<String> = tenants.iter().map(|t| t.key.to_string()).collect();
    assert_eq!(keys, want, "the model saw other keys than the tenants' own");
    eprintln!(
        "tenants (one run): spec start -> 3 bots ready {ready_after:?}; first DM -> reply {first:?}; a later DM {later:?}"
    );
    let tree_rss: u64 = {
        let pid = d.agent("tenants", "alice").unwrap()["pid"]
            .as_u64()
            .unwrap() as u32;
        let mut all = vec![pid];
        all.extend(descendants(pid));
        all.iter()
            .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/status")).ok())
            .filter_map(|s| {
                s.lines()
                    .find(|l| l.starts_with("VmRSS:"))
                    .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            })
            .sum::<u64>()
    };
    eprintln!(
        "tenants (one run): whole-tree RSS of a lean tenant with Telegram on, after turns: {} MiB",
        tree_rss / 1024
    );

    // Files: persona copied, secrets in 0600 files only.
    for t in &tenants {
        let h = home(t.id);
        assert_eq!(
            read_file(&h.join(".openclaw/workspace/SOUL.md")),
            format!("I am {}'s bot.\n", t.id)
        );
        for name in ["TG_BOT_TOKEN", "OPENAI_API_KEY"] {
            let f = h.join(".openclaw/secrets").join(name);
            assert_eq!(mode(&f), 0o600, "{}", f.display());
        }
        assert_eq!(read_file(&h.join(".openclaw/secrets/TG_BOT_TOKEN")), t.bot);
    }
    assert_eq!(mode(&d.state_dir().join("vault.json")), 0o600);

    // `agent config` shows the placeholder and redacts the values.
    let cfg: Value =
        serde_json::from_str(&d.ctl(&["--json", "agent", "config", "tenants/alice"])).unwrap();
    assert_eq!(
        cfg["config"]["channels"]["telegram"]["botToken"], "${TG_BOT_TOKEN}",
        "{cfg}"
    );
    assert_eq!(cfg["env"]["TG_BOT_TOKEN"], "[REDACTED]", "{cfg}");
    assert_eq!(cfg["env"]["TZ"], "Europe/Madrid", "{cfg}");
    assert_eq!(
        cfg["config"]["gateway"]["auth"]["token"], "[REDACTED]",
        "{cfg}"
    );
    assert_eq!(
        cfg["config"]["plugins"]["allow"],
        serde_json::json!(["openai", "telegram"]),
        "{cfg}"
    );

    // `fleetctl exec` runs as the agent: its HOME, its secrets, its openclaw on PATH.
    let out = d.ctl_output(&[
        "exec",
        "tenants/carol",
        "--",
        "openclaw",
        "channels",
        "status",
        "--json",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "exec failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("telegram"), "{stdout}");
    let out = d.ctl_output(&[
        "exec",
        "tenants/carol",
        "--",
        "sh",
        "-c",
        "echo $HOME; test -n \"$TG_BOT_TOKEN\" && echo has-token; exit 7",
    ]);
    assert_eq!(
        out.status.code(),
        Some(7),
        "exec keeps the program's exit status"
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&home("carol").display().to_string()) && stdout.contains("has-token"),
        "{stdout}"
    );

    // A rotated secret: only bob restarts, and answers with his new token.
    let before = seen(&d, "tenants", &d.status());
    let bob = &tenants[1];
    let new_bot = "1002:AAbob-bot-token-ROTATED".to_string();
    tg.add_bot(&new_bot);
    tg.revoke(&bob.bot);
    std::fs::write(dir.join("secrets/bob.tg"), &new_bot).unwrap();
    let said = d.ctl(&["reload"]);
    assert!(
        said.contains("restart agent tenants/bob (its secrets changed)")
            && !said.contains("alice")
            && !said.contains("carol"),
        "{said}"
    );
    let rows = wait_until(START_DEADLINE, "bob restarted with his new token", |last| {
        let rows = d.status();
        *last = serde_json::to_string(&rows).unwrap();
        let b = rows.iter().find(|r| r["agent"] == "bob")?;
        (b["state"] == "running" && b["pid"].as_u64() != Some(before["bob"].pid as u64))
            .then_some(rows)
    });
    wait_ready(port(&rows, "bob"), "bob after rotation");
    for id in ["alice", "carol"] {
        let s = &before[id];
        assert!(
            same_alive(s.pid, s.start),
            "{id} was restarted by bob's rotation"
        );
    }
    ask(bob, &new_bot, "after the rotation");

    // A revoked token: that channel fails, the gateway stays live, the others stay ready.
    let mut secrets_extra: Vec<String> = Vec::new();
    let alice = &tenants[0];
    tg.revoke(&alice.bot);
    wait_until(
        Duration::from_secs(90),
        "alice's channel failed in status",
        |last| {
            *last = channel(&d, "alice");
            (last == "failed").then_some(())
        },
    );
    assert_eq!(http_get(port(&rows, "alice"), "/healthz"), Some(200));
    assert_eq!(d.agent("tenants", "alice").unwrap()["state"], "running");
    for id in ["bob", "carol"] {
        assert_eq!(channel(&d, id), "ready", "{id}");
    }
    let metrics = http_body(metrics_port, "/metrics");
    assert!(
        metrics.contains(r#"fleet_agent_channel{fleet="tenants",agent="alice",channel="telegram",state="failed"} 1"#),
        "{metrics}"
    );

    // A walk-in customer onboarded by commands: from `agent add` to its bot's answer.
    let dave = Tenant {
        id: "dave",
        bot: "1004:AAdave-bot-token-00004".into(),
        key: "sk-dave-key-000004",
        user: 5004,
    };
    tg.add_bot(&dave.bot);
    std::fs::write(dir.join("secrets/dave.tg"), &dave.bot).unwrap();
    std::fs::write(dir.join("secrets/dave.key"), dave.key).unwrap();
    std::fs::write(
        dir.join("tenants/dave.json"),
        serde_json::json!({"channels": {"telegram": {"botToken": "${TG_BOT_TOKEN}",
            "apiRoot": tg.api_root(), "dmPolicy": "allowlist", "allowFrom": [dave.user.to_string()]}}})
        .to_string(),
    )
    .unwrap();
    let fleet_json = dir.join("fleet.json").display().to_string();
    d.ctl(&[
        "fleet",
        "create",
        "walkin",
        "--profile",
        "lean",
        "--template",
        &fleet_json,
    ]);
    let added = Instant::now();
    d.ctl(&[
        "agent",
        "add",
        "walkin",
        "dave",
        "--template",
        &dir.join("tenants/dave.json").display().to_string(),
        "--secret",
        &format!("TG_BOT_TOKEN={}", dir.join("secrets/dave.tg").display()),
        "--secret",
        &format!("OPENAI_API_KEY={}", dir.join("secrets/dave.key").display()),
    ]);
    let rows = d.wait_running("walkin", 1, START_DEADLINE);
    wait_ready(port(&rows, "dave"), "dave");
    ask(&dave, &dave.bot, "hi, I just signed up");
    eprintln!(
        "tenants (one run): agent add -> the new tenant's bot answered in {:?}",
        added.elapsed()
    );
    secrets_extra.extend([dave.bot.clone(), dave.key.to_string()]);

    // No secret value anywhere it must not be.
    let _ = events.kill();
    let _ = events.wait();
    let mut secrets: Vec<String> = tenants
        .iter()
        .flat_map(|t| [t.bot.clone(), t.key.to_string()])
        .collect();
    secrets.push(new_bot.clone());
    secrets.extend(secrets_extra);
    let logs = d.ctl(&["logs", "tenants/bob", "-n", "100000"]);
    let mut places: Vec<(String, String)> = vec![
        ("fleetd's debug log".into(), d.log()),
        ("events".into(), read_file(&events_file)),
        ("status --json".into(), d.ctl(&["--json", "status"])),
        ("metrics".into(), metrics),
        (
            "registry.json".into(),
            read_file(&d.state_dir().join("registry.json")),
        ),
        ("logs of bob".into(), logs),
    ];
    for r in d.status() {
        let pid = r["pid"].as_u64().unwrap() as u32;
        let mut tree = vec![pid];
        tree.extend(descendants(pid));
        for p in tree {
            let cmd = std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
            places.push((
                format!("/proc/{p}/cmdline"),
                String::from_utf8_lossy(&cmd).into_owned(),
            ));
        }
    }
    assert!(
        read_file(&events_file).contains("\"channel\""),
        "no channel event was streamed"
    );
    for (what, text) in &places {
        for s in &secrets {
            assert!(
                !text.contains(s.as_str()),
                "a secret ({}…) is in {what}",
                &s[..6]
            );
        }
    }
}
