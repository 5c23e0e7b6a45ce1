//! Supervision against real processes: restarts with the backoff schedule, intensity,
//! strategies, exit 78, stop escalation, removal during backoff, and no process outliving a
//! SIGKILLed or stopped daemon. Uses the embedding API for fine-grained specs and the fleetd
//! binary where the daemon itself must die.

mod common;

use common::{alive, descendants, marked_pids, wait_until, Daemon, STUB};

use fleet_commander::messages::command::AgentStatus;
use fleet_commander::messages::events::{AgentTransition, Event};
use fleet_commander::spec::{BackoffSpec, FleetSpec, Intensity, Strategy};
use fleet_commander::state::{AgentState, ExitInfo};
use fleet_commander::NodeHandle;
use std::time::{Duration, Instant};
use tokio::sync::broadcast::Receiver;

async fn node() -> (tempfile::TempDir, NodeHandle) {
    common::node_with(|_| {}).await
}

/// Watches for `watch` that no process marked with `marker` runs.
async fn none_marked_for(marker: &str, watch: Duration, what: &str) {
    let until = Instant::now() + watch;
    while Instant::now() < until {
        let m = marked_pids(marker);
        assert!(m.is_empty(), "{what}: {m:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn stub_spec(name: &str, n: u32, args: &str) -> FleetSpec {
    let mut s = FleetSpec::new(name);
    s.agents = FleetSpec::numbered_agents(n);
    let mut cmd = vec![STUB.to_string()];
    cmd.extend(args.split_whitespace().map(String::from));
    s.command = Some(cmd);
    s.stride = Some(1);
    s.health.interval_ms = 200;
    s.health.timeout_ms = 500;
    s.health.grace_ms = 10_000;
    s.stop_timeout_ms = 5_000;
    s.backoff = BackoffSpec {
        initial_ms: 200,
        max_ms: 2_000,
        multiplier: 2.0,
        jitter: 0.0,
        reset_after_s: 60,
    };
    s
}

async fn status_of(node: &NodeHandle, fleet: &str, agent: &str) -> Option<AgentStatus> {
    node.status(Some(fleet), Some(agent))
        .await
        .ok()?
        .into_iter()
        .next()
}

/// Polls status until `pred` holds; panics with the last row seen.
async fn wait_agent(
    node: &NodeHandle,
    fleet: &str,
    agent: &str,
    timeout: Duration,
    what: &str,
    pred: impl Fn(&AgentStatus) -> bool,
) -> AgentStatus {
    let deadline = Instant::now() + timeout;
    let mut last = None;
    loop {
        if let Some(s) = status_of(node, fleet, agent).await {
            if pred(&s) {
                return s;
            }
            last = Some(s);
        }
        if Instant::now() > deadline {
            panic!("timed out waiting for {fleet}/{agent} {what}; last: {last:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn wait_all_running(node: &NodeHandle, fleet: &str, n: usize) -> Vec<AgentStatus> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let rows = node.status(Some(fleet), None).await.unwrap();
        if rows.len() == n && rows.iter().all(|r| r.state == AgentState::Running) {
            return rows;
        }
        if Instant::now() > deadline {
            panic!("fleet {fleet} not all running: {rows:#?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Next agent transition matching `pred`, within `timeout`.
async fn next_transition(
    rx: &mut Receiver<Event>,
    timeout: Duration,
    pred: impl Fn(&AgentTransition) -> bool,
) -> AgentTransition {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Ok(Event::Agent(t))) if pred(&t) => return t,
            Ok(Ok(_)) => continue,
            Ok(Err(e)) => panic!("event channel: {e}"),
            Err(_) => panic!("no matching transition within {timeout:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_restarts_follow_the_backoff_schedule() {
    let (_d, node) = node().await;
    let mut rx = node.subscribe();
    let mut spec = stub_spec(
        "crashy",
        1,
        "--no-helper --crash-after-ms 150 --exit-code 3",
    );
    spec.intensity = Intensity {
        max_restarts: 10,
        window_s: 60,
    };
    let backoff = spec.backoff.clone();
    node.create_fleet(spec).await.unwrap();
    // The first restart is immediate, then initial * multiplier^(n-2): 0, 200, 400, 800 ms.
    for n in 1..=4u32 {
        let b = next_transition(&mut rx, Duration::from_secs(10), |t| {
            t.new == AgentState::Backoff
        })
        .await;
        assert_eq!(b.exit, Some(ExitInfo::Code(3)), "{b:?}");
        assert_eq!(b.restarts, n, "{b:?}");
        let t0 = Instant::now();
        next_transition(&mut rx, Duration::from_secs(10), |t| {
            t.old == AgentState::Backoff
        })
        .await;
        let waited = t0.elapsed();
        let expected = fleet_commander::restart::backoff_delay(&backoff, n, 0.5);
        let want = if n == 1 {
            Duration::ZERO
        } else {
            Duration::from_millis(200 * 2u64.pow(n - 2))
        };
        assert_eq!(expected, want, "schedule for restart {n}");
        assert!(
            waited + Duration::from_millis(30) >= want,
            "restart {n} came after {waited:?}, before {want:?}"
        );
        assert!(
            waited < want + Duration::from_millis(1500),
            "restart {n} came after {waited:?}, long after {want:?}"
        );
    }
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_loop_fails_after_intensity_and_spares_others() {
    let (_d, node) = node().await;
    node.create_fleet(stub_spec("steady", 1, "--no-helper"))
        .await
        .unwrap();
    let before = wait_all_running(&node, "steady", 1).await;
    let mut spec = stub_spec("loop", 1, "--no-helper --exit-code 1");
    spec.backoff.initial_ms = 10;
    spec.intensity = Intensity {
        max_restarts: 3,
        window_s: 60,
    };
    node.create_fleet(spec).await.unwrap();
    let failed = wait_agent(
        &node,
        "loop",
        "agent-1",
        Duration::from_secs(20),
        "failed",
        |s| s.state == AgentState::Failed,
    )
    .await;
    assert_eq!(failed.restarts, 3, "{failed:?}");
    assert!(
        failed.reason.as_deref().unwrap_or("").contains("intensity"),
        "{failed:?}"
    );
    let after = wait_all_running(&node, "steady", 1).await;
    assert_eq!(
        after[0].pid, before[0].pid,
        "the other fleet's agent was touched"
    );
    assert_eq!(after[0].restarts, 0);
    node.shutdown().await;
}

async fn strategy_case(strategy: Strategy, expect_restarted: &[&str]) {
    let (_d, node) = node().await;
    let name = strategy.as_str().replace('_', "-");
    let mut spec = stub_spec(&name, 3, "--no-helper");
    spec.strategy = strategy;
    node.create_fleet(spec).await.unwrap();
    let before = wait_all_running(&node, &name, 3).await;
    let victim = before
        .iter()
        .find(|r| r.agent == "agent-2")
        .unwrap()
        .pid
        .unwrap();
    unsafe { libc::kill(victim as i32, libc::SIGKILL) };
    let mut restarted = vec!["agent-2"];
    restarted.extend_from_slice(expect_restarted);
    // Every agent that must restart gets a new pid and runs again.
    let deadline = Instant::now() + Duration::from_secs(20);
    let after = loop {
        let rows = node.status(Some(&name), None).await.unwrap();
        let done = rows.iter().all(|r| {
            let old = before.iter().find(|b| b.agent == r.agent).unwrap();
            r.state == AgentState::Running
                && (!restarted.contains(&r.agent.as_str()) || r.pid != old.pid)
        });
        if done {
            break rows;
        }
        assert!(
            Instant::now() < deadline,
            "{strategy}: not settled: {rows:#?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    for r in &after {
        let old = before.iter().find(|b| b.agent == r.agent).unwrap();
        let moved = r.pid != old.pid;
        assert_eq!(
            moved,
            restarted.contains(&r.agent.as_str()),
            "{strategy}: {} pid {:?} -> {:?}",
            r.agent,
            old.pid,
            r.pid
        );
    }
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_for_one_restarts_only_the_crashed_agent() {
    strategy_case(Strategy::OneForOne, &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_for_all_restarts_every_sibling() {
    strategy_case(Strategy::OneForAll, &["agent-1", "agent-3"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_for_one_restarts_the_later_siblings() {
    strategy_case(Strategy::RestForOne, &["agent-3"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_78_is_failed_and_never_restarted() {
    let (_d, node) = node().await;
    let mut rx = node.subscribe();
    node.create_fleet(stub_spec("cfg", 1, "--exit-code 78"))
        .await
        .unwrap();
    let t = next_transition(&mut rx, Duration::from_secs(10), |t| {
        t.new == AgentState::Failed
    })
    .await;
    assert_eq!(t.exit, Some(ExitInfo::Code(78)));
    assert!(t.reason.as_deref().unwrap_or("").contains("78"), "{t:?}");
    let s = status_of(&node, "cfg", "agent-1").await.unwrap();
    assert_eq!(
        (s.state, s.restarts, s.pid),
        (AgentState::Failed, 0, None),
        "{s:?}"
    );
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_escalates_to_sigkill_and_leaves_no_descendant() {
    let (_d, node) = node().await;
    let mut spec = stub_spec("stubborn", 1, "--ignore-sigterm --helper-orphan");
    spec.stop_timeout_ms = 700;
    node.create_fleet(spec).await.unwrap();
    let rows = wait_all_running(&node, "stubborn", 1).await;
    let pid = rows[0].pid.unwrap();
    let marker = format!("{}/stubborn/agent-1/", node.node_id());
    // The orphaned helper sits in a session of its own, outside the agent's tree.
    let tree = wait_until(Duration::from_secs(5), "the helper to exist", |seen| {
        let m = marked_pids(&marker);
        *seen = format!("{m:?}");
        (m.len() >= 2).then_some(m)
    });
    assert!(tree.contains(&pid));
    let t0 = Instant::now();
    node.stop_agent("stubborn", "agent-1").await.unwrap();
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(600),
        "SIGTERM was ignored, the stop must have waited: {took:?}"
    );
    let left: Vec<u32> = tree.iter().copied().filter(|p| alive(*p)).collect();
    assert!(left.is_empty(), "still alive after stop: {left:?}");
    let s = status_of(&node, "stubborn", "agent-1").await.unwrap();
    assert_eq!(s.state, AgentState::Stopped);
    assert_eq!(s.last_exit, Some(ExitInfo::Signal(libc::SIGKILL)), "{s:?}");
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_takes_the_orphaned_helper_with_it() {
    let (_d, node) = node().await;
    node.create_fleet(stub_spec("crashy", 1, "--helper-orphan"))
        .await
        .unwrap();
    let pid = wait_all_running(&node, "crashy", 1).await[0].pid.unwrap();
    let marker = format!("{}/crashy/agent-1/", node.node_id());
    // The helper left the agent's tree (re-parented, own session) and carries the marker.
    let helpers = wait_until(Duration::from_secs(5), "the helper to exist", |seen| {
        let m: Vec<u32> = marked_pids(&marker)
            .into_iter()
            .filter(|p| *p != pid)
            .collect();
        *seen = format!("{m:?}");
        (!m.is_empty()).then_some(m)
    });
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    wait_agent(
        &node,
        "crashy",
        "agent-1",
        Duration::from_secs(10),
        "restarted",
        |s| s.restarts >= 1 && s.state == AgentState::Running,
    )
    .await;
    wait_until(
        Duration::from_secs(5),
        "the old helper to be gone",
        |seen| {
            let left: Vec<u32> = helpers.iter().copied().filter(|p| alive(*p)).collect();
            *seen = format!("{left:?}");
            left.is_empty().then_some(())
        },
    );
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_an_agent_in_backoff_leaves_nothing_running() {
    let (_d, node) = node().await;
    let mut spec = stub_spec("flaky", 1, "--crash-after-ms 100");
    spec.backoff.initial_ms = 400;
    spec.backoff.multiplier = 1.0;
    node.create_fleet(spec).await.unwrap();
    // Second crash: its restart waits 400 ms in backoff.
    let b = wait_agent(
        &node,
        "flaky",
        "agent-1",
        Duration::from_secs(10),
        "in a delayed backoff",
        |s| s.state == AgentState::Backoff && s.restarts >= 2,
    )
    .await;
    assert!(b.pid.is_none());
    node.remove_agent("flaky", "agent-1", false).await.unwrap();
    assert!(status_of(&node, "flaky", "agent-1").await.is_none());
    // Watch past the moment the backoff timer would have fired: nothing of the agent may run.
    let marker = format!("{}/flaky/agent-1/", node.node_id());
    none_marked_for(
        &marker,
        Duration::from_millis(1200),
        "processes of a removed agent",
    )
    .await;
    node.shutdown().await;
}

/// A stop that comes while a start waits at the start gate cancels that start at once: it
/// leaves the queue, and no process of it runs when the gate opens later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_cancels_a_start_waiting_at_the_gate() {
    let (_d, node) = common::node_with(|c| c.max_concurrent_starts = 1).await;
    // Never healthy: the first start holds the only gate permit for its whole grace.
    let mut spec = stub_spec("gate", 2, "--hang-healthz");
    spec.start_gate = Some(true);
    node.create_fleet(spec).await.unwrap();
    let queue = |node: &NodeHandle| -> Option<i64> {
        node.metrics_text()
            .lines()
            .find(|l| l.starts_with("fleet_start_gate_queue "))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    let waiting = loop {
        let rows = node.status(Some("gate"), None).await.unwrap();
        let starting = rows.iter().find(|r| r.state == AgentState::Starting);
        let queued = rows.iter().find(|r| r.state == AgentState::Provisioning);
        if let (Some(_), Some(q), Some(1)) = (starting, queued, queue(&node)) {
            break q.agent.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no start waiting at the gate: {rows:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    node.stop_agent("gate", &waiting).await.unwrap();
    let s = status_of(&node, "gate", &waiting).await.unwrap();
    assert_eq!(s.state, AgentState::Stopped, "{s:?}");
    // The queue empties now, not when the permit holder's grace ends 10 s later.
    let deadline = Instant::now() + Duration::from_secs(3);
    while queue(&node) != Some(0) {
        assert!(
            Instant::now() < deadline,
            "the stopped start still waits at the gate"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The gate opens: the cancelled start must not run.
    let marker = format!("{}/gate/{waiting}/", node.node_id());
    node.stop_fleet("gate").await.unwrap();
    none_marked_for(
        &marker,
        Duration::from_millis(500),
        "a process of the stopped start",
    )
    .await;
    node.shutdown().await;
}

/// A node shut down while its agents are still starting has no agent process left when
/// `shutdown` returns: starts in flight are cancelled or stopped, and waited for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_during_starts_leaves_no_process() {
    for round in 0..5 {
        let (_d, node) = node().await;
        let mut rx = node.subscribe();
        node.create_fleet(stub_spec("early", 8, "")).await.unwrap();
        // Shut down once `round` agents have a process: the others are mid-start.
        for _ in 0..round {
            next_transition(&mut rx, Duration::from_secs(10), |t| {
                t.new == AgentState::Starting
            })
            .await;
        }
        node.shutdown().await;
        let left = marked_pids(&format!("{}/", node.node_id()));
        assert!(
            left.is_empty(),
            "round {round}: processes after shutdown: {left:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hung_healthz_restarts_after_n_failed_probes() {
    let (_d, node) = node().await;
    let mut spec = stub_spec("hung", 1, "--no-helper --hang-healthz-after-ms 600");
    spec.health.failures = 3;
    spec.health.timeout_ms = 200;
    spec.stop_timeout_ms = 1_000;
    node.create_fleet(spec).await.unwrap();
    let first = wait_all_running(&node, "hung", 1).await[0].pid;
    let s = wait_agent(
        &node,
        "hung",
        "agent-1",
        Duration::from_secs(20),
        "restarted by health",
        |s| s.restarts >= 1,
    )
    .await;
    assert_ne!(s.pid, first, "{s:?}");
    node.shutdown().await;
}

#[test]
fn daemon_sigkill_leaves_no_process_behind() {
    let mut d = Daemon::start();
    d.create_stub_fleet("a", 3, "", &[]);
    d.create_stub_fleet("b", 2, "--helper-orphan", &[]);
    d.wait_running("a", 3, Duration::from_secs(20));
    d.wait_running("b", 2, Duration::from_secs(20));
    let prefix = format!("{}/", d.node_id());
    // Each agent and its helper (in a session of its own); b's helpers are orphans.
    let pids = wait_until(Duration::from_secs(5), "agents and helpers", |seen| {
        let p = marked_pids(&prefix);
        *seen = format!("{p:?}");
        (p.len() >= 10).then_some(p)
    });
    d.kill9();
    let t0 = Instant::now();
    wait_until(
        Duration::from_secs(2),
        "every agent process to be gone after SIGKILL of fleetd",
        |seen| {
            let left: Vec<u32> = pids.iter().copied().filter(|p| alive(*p)).collect();
            *seen = format!("{left:?}");
            left.is_empty().then_some(())
        },
    );
    eprintln!(
        "all {} agent processes gone {:?} after the daemon's SIGKILL",
        pids.len(),
        t0.elapsed()
    );
}

#[test]
fn graceful_daemon_stop_leaves_no_process_behind() {
    let mut d = Daemon::start();
    d.create_stub_fleet("g", 3, "--helper-orphan", &[]);
    let rows = d.wait_running("g", 3, Duration::from_secs(20));
    let prefix = format!("{}/", d.node_id());
    let pids = marked_pids(&prefix);
    assert!(pids.len() >= 3, "{pids:?} {rows:?}");
    let kids = descendants(d.pid());
    let st = d.stop();
    assert!(st.success(), "fleetd exit status {st:?}\n{}", d.log());
    let left: Vec<u32> = pids
        .iter()
        .chain(kids.iter())
        .copied()
        .filter(|p| alive(*p))
        .collect();
    assert!(left.is_empty(), "alive after graceful stop: {left:?}");
}

/// The port an agent moved to lives in its recipe: an AgentActor re-spawned after a panic
/// starts on the block leased to it, not on the one it was created with.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_respawned_after_its_actor_panics_keeps_its_leased_port() {
    let (_dir, node) = node().await;
    node.create_fleet(stub_spec("mv", 1, "--no-helper"))
        .await
        .unwrap();
    let first = wait_all_running(&node, "mv", 1).await;
    let old_port = first[0].port.unwrap();
    node.stop_agent("mv", "agent-1").await.unwrap();
    // Another process takes the agent's port while it is stopped: its next start moves.
    let squatter = std::net::TcpListener::bind(("127.0.0.1", old_port)).unwrap();
    node.start_agent("mv", "agent-1").await.unwrap();
    let moved = wait_agent(
        &node,
        "mv",
        "agent-1",
        Duration::from_secs(20),
        "running on a new port",
        |s| s.state == AgentState::Running && s.port.is_some_and(|p| p != old_port),
    )
    .await;
    let new_port = moved.port.unwrap();
    let lease = |rows: Vec<fleet_commander::messages::command::PortLeaseRow>| {
        rows.into_iter().find(|r| r.fleet == "mv").map(|r| r.base)
    };
    assert_eq!(lease(node.ports().await.unwrap()), Some(new_port));
    node.inject_agent_panic("mv", "agent-1");
    let back = wait_agent(
        &node,
        "mv",
        "agent-1",
        Duration::from_secs(20),
        "re-spawned and running",
        |s| s.state == AgentState::Running && s.pid.is_some() && s.pid != moved.pid,
    )
    .await;
    assert_eq!(
        back.port,
        Some(new_port),
        "the re-spawned actor did not start on its lease"
    );
    assert_eq!(
        lease(node.ports().await.unwrap()),
        Some(new_port),
        "the lease moved again"
    );
    drop(squatter);
    node.shutdown().await;
}

/// `--no-probes` (`health.enabled = false`): an agent that serves no HTTP at all counts as
/// running once spawned, as supervisord and PM2 run it; beside it the same program in a
/// probed fleet stays `starting`, waiting for a /healthz that never answers.
#[test]
fn a_fleet_without_probes_runs_what_serves_nothing() {
    let d = Daemon::start();
    for (fleet, extra) in [("probed", None), ("unprobed", Some("--no-probes"))] {
        let mut words = vec![
            "fleet",
            "create",
            fleet,
            "--agents",
            "1",
            "--command",
            "sleep 600",
        ];
        words.extend(extra);
        let out = d.ctl(&words);
        assert!(out.contains("created"), "{out}");
    }
    let rows = d.wait_running("unprobed", 1, Duration::from_secs(20));
    assert_eq!(rows[0]["ready"], true, "{}", rows[0]);
    let probed = wait_until(Duration::from_secs(20), "probed/agent-1 spawned", |seen| {
        let r = d.agent("probed", "agent-1")?;
        *seen = r.to_string();
        r["pid"].as_u64().is_some().then_some(r)
    });
    assert_eq!(probed["state"], "starting", "{probed}");
    assert_eq!(probed["healthy"], false, "{probed}");
    // An OpenClaw fleet is always probed: refused, naming the field, and nothing created.
    let out = d.ctl_output(&["fleet", "create", "oc", "--agents", "1", "--no-probes"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("health.enabled"), "{err}");
    assert!(
        d.agent("oc", "agent-1").is_none(),
        "a refused fleet was created"
    );
}

/// Cluster mode's handover: an agent applied held stays stopped and refuses every start (a
/// command forwarded from another node, a fleet start, a restart) until it is handed in, or
/// until an apply that no longer holds it; the rest of its fleet runs meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_agent_refuses_starts_until_handed_in() {
    use fleet_commander::messages::command::{Command, Reply};
    let (_d, node) = node().await;
    let spec = stub_spec("held", 3, "--no-helper");
    let hold = ["held/agent-2", "held/agent-3"]
        .into_iter()
        .map(String::from)
        .collect();
    node.apply_spec_holding(vec![spec.clone()], hold)
        .await
        .unwrap();
    let t = Duration::from_secs(20);
    wait_agent(&node, "held", "agent-1", t, "running", |s| {
        s.state == AgentState::Running
    })
    .await;
    let refused = [
        Command::AgentStart {
            fleet: "held".into(),
            agent: "agent-2".into(),
        },
        Command::AgentRestart {
            fleet: "held".into(),
            agent: "agent-2".into(),
        },
        Command::FleetStart {
            fleet: "held".into(),
        },
    ];
    for cmd in refused {
        let what = format!("{cmd:?}");
        match node.execute(cmd).await {
            Reply::Error(e) => assert!(e.to_string().contains("handed over"), "{what}: {e}"),
            other => panic!("{what} was not refused: {other:?}"),
        }
    }
    for a in ["agent-2", "agent-3"] {
        let s = status_of(&node, "held", a).await.unwrap();
        assert!(
            s.state == AgentState::Stopped && s.pid.is_none(),
            "a held agent started: {s:?}"
        );
    }
    node.handed_in("held", "agent-2");
    node.start_agent("held", "agent-2").await.unwrap();
    wait_agent(&node, "held", "agent-2", t, "running once handed in", |s| {
        s.state == AgentState::Running
    })
    .await;
    // Still held: the hand-in was agent-2's alone.
    assert!(node.start_agent("held", "agent-3").await.is_err());
    node.apply_spec(vec![spec]).await.unwrap();
    node.start_agent("held", "agent-3").await.unwrap();
    wait_agent(
        &node,
        "held",
        "agent-3",
        t,
        "running once no apply holds it",
        |s| s.state == AgentState::Running,
    )
    .await;
    node.shutdown().await;
}
