//! End to end against the real OpenClaw gateway (`openclaw gateway run`, no `--command`):
//! isolation of HOMEs, ports, tokens and logs; the held pid being the gateway; restart of one
//! killed gateway alone; no process left after `fleet stop` or a daemon SIGKILL; the same
//! ports and tokens after a daemon restart; `agent rm --purge` removing OpenClaw's lock files.
//! Needs `scripts/install-openclaw.sh` (run by `scripts/test.sh`); fails when the install is
//! missing unless `FLEET_SKIP_REAL_OPENCLAW=1`. Start-up times are printed, never asserted.

mod common;
#[path = "common/openclaw.rs"]
mod openclaw;

use common::{descendants, http_get, marked_pids, wait_until, Daemon};
use openclaw::{
    cmdline, environ_var, gateway_health, lock_files, ns_pids, same_alive, serial, start_time,
    Install, START_DEADLINE,
};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
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
        let cfg: Value =
            serde_json::from_str(&common::read_file(&s.home.join(".openclaw/openclaw.json")))
                .unwrap_or_else(|e| panic!("{name}: openclaw.json: {e}"));
        assert_eq!(cfg["gateway"]["port"], s.port, "{name}: config port");
        assert_eq!(
            cfg["gateway"]["auth"]["token"],
            s.token.as_str(),
            "{name}: config token"
        );
        // Both log files exist inside its own HOME and are written to.
        for log in ["logs/agent.log", "logs/openclaw.log"] {
            let p = s.home.join(log);
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

/// A real lean gateway started by fleetd answers a Telegram DM end to end over loopback: the
/// fake Bot API delivers the message by long polling, the gateway asks the fake model with its
/// tenant's API key, and the model's answer comes back through `sendMessage` to that chat.
#[test]
fn a_real_gateway_answers_a_telegram_dm_through_the_fakes() {
    use common::fakes::{FakeModel, FakeTelegram};
    let Some(inst) = openclaw::install("a_real_gateway_answers_a_telegram_dm_through_the_fakes")
    else {
        return;
    };
    let _one_at_a_time = serial();
    let tg = FakeTelegram::start();
    let answer = "the fake model's answer";
    let model = FakeModel::start(answer);
    let bot = "123456789:AAfakeTokenForTenantAlice";
    tg.add_bot(bot);
    let d = daemon(&inst, "56000-56999", &[]);
    let template = d.dir.path().join("tenant.json");
    let user = 4242;
    std::fs::write(
        &template,
        serde_json::json!({
            "plugins": {"allow": ["telegram"]},
            "channels": {"telegram": {"botToken": bot, "apiRoot": tg.api_root(),
                "dmPolicy": "allowlist", "allowFrom": [user.to_string()]}},
            "models": {"providers": {"fake": {"baseUrl": model.base_url(),
                "apiKey": "sk-tenant-alice", "models": [{"id": "m", "name": "m"}]}}},
            "agents": {"defaults": {"model": {"primary": "fake/m"}, "heartbeat": {"every": "0m"}}}
        })
        .to_string(),
    )
    .unwrap();
    let t0 = Instant::now();
    d.ctl(&[
        "fleet",
        "create",
        "tenants",
        "--agents",
        "1",
        "--profile",
        "lean",
        "--template",
        template.to_str().unwrap(),
    ]);
    let rows = wait_until(START_DEADLINE, "the tenant's gateway running", |last| {
        let rows = d.status();
        *last = serde_json::to_string(&rows).unwrap();
        (rows.len() == 1 && rows[0]["state"] == "running").then_some(rows)
    });
    // /readyz turns 200 only once the Telegram channel is up.
    wait_ready(rows[0]["port"].as_u64().unwrap() as u16, "tenants/agent-1");
    let ready = t0.elapsed();
    let asked = Instant::now();
    tg.send_dm(bot, user, "hello, bot");
    let reply = wait_until(Duration::from_secs(120), "the bot's answer", |last| {
        let sent = tg.sent(bot);
        *last = format!("sent {sent:?}; calls {:?}", tg.calls(bot));
        sent.into_iter()
            .find(|m| m.chat_id == user.to_string() && m.text.contains(answer))
    });
    eprintln!(
        "telegram round trip (one run): fleet create -> /readyz {:?}; DM -> reply {:?}",
        ready,
        reply.at.duration_since(asked)
    );
    assert!(
        model.keys().iter().all(|k| k == "sk-tenant-alice") && !model.keys().is_empty(),
        "the model saw keys {:?}",
        model.keys()
    );
    let calls = tg.calls(bot);
    assert!(calls.iter().any(|c| c == "getUpdates"), "{calls:?}");
}
