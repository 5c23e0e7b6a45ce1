//! Resource governance with real processes: a leaking agent is restarted for `memory limit`
//! while a single spike is not, admission refuses a start that would cross the memory
//! reserve, `capacity` names the binding limit, and `/metrics` is Prometheus text whose
//! counters move when agents restart.

mod common;

use common::{node_with, wait_until, STUB};
use fleet_commander::messages::command::{Command, Reply};
use fleet_commander::spec::FleetSpec;
use fleet_commander::state::AgentState;
use fleet_commander::NodeHandle;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

fn stub(name: &str, args: &str) -> FleetSpec {
    let mut s = FleetSpec::new(name);
    s.agents = FleetSpec::numbered_agents(1);
    let mut cmd = vec![STUB.to_string(), "--no-helper".into()];
    cmd.extend(args.split_whitespace().map(String::from));
    s.command = Some(cmd);
    s.stride = Some(1);
    s
}

async fn row(node: &NodeHandle, fleet: &str) -> fleet_commander::messages::command::AgentStatus {
    node.status(Some(fleet), None).await.unwrap().remove(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leaking_agent_is_restarted_for_memory_limit() {
    let (_d, node) = node_with(|c| c.sample_interval = Duration::from_millis(200)).await;
    let mut rx = node.subscribe();
    let mut spec = stub("leak", "--leak-mb-per-s 40");
    spec.max_memory = Some(30 * MIB);
    node.create_fleet(spec).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let t = loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Ok(fleet_commander::messages::events::Event::Agent(t)))
                if t.new == AgentState::Backoff =>
            {
                break t
            }
            Ok(Ok(_)) => continue,
            other => panic!("no restart: {other:?}"),
        }
    };
    assert!(
        t.reason
            .as_deref()
            .unwrap_or("")
            .starts_with("memory limit"),
        "{t:?}"
    );
    assert_eq!(t.restarts, 1);
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_spike_is_not_restarted() {
    // Spikes of 250 ms every 1.3 s, sampled every 500 ms: a sample may see a spike, the next
    // one never does, so no two samples in a row are over the limit.
    let interval = Duration::from_millis(500);
    let (_d, node) = node_with(|c| c.sample_interval = interval).await;
    let mut spec = stub(
        "spike",
        "--spike-mb 80 --spike-ms 250 --spike-every-ms 1300",
    );
    spec.max_memory = Some(40 * MIB);
    node.create_fleet(spec).await.unwrap();
    // The sampler must have seen the spike above the limit …
    let seen = wait_until(Duration::from_secs(30), "a sample above the limit", |s| {
        let r = futures_lite_block(row(&node, "spike"));
        *s = format!("{r:?}");
        r.rss_bytes.filter(|b| *b > 40 * MIB)
    });
    // … and for several more spikes after it, the agent keeps running, never restarted.
    let until = Instant::now() + interval * 8;
    while Instant::now() < until {
        let r = row(&node, "spike").await;
        assert_eq!(
            (r.state, r.restarts),
            (AgentState::Running, 0),
            "restarted after a spike of {seen} bytes: {r:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    node.shutdown().await;
}

/// Blocks on a future from inside `wait_until`'s closure (we are on a multi-thread runtime).
fn futures_lite_block<F: std::future::Future>(f: F) -> F::Output {
    tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(f))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admission_refuses_a_start_below_the_reserve() {
    let dir = tempfile::tempdir().unwrap();
    let meminfo = dir.path().join("meminfo");
    std::fs::write(&meminfo, "MemTotal: 16000000 kB\nMemAvailable: 300000 kB\n").unwrap();
    let m = meminfo.clone();
    let (_d, node) = node_with(move |c| {
        c.meminfo_path = m;
        c.memory_reserve = 512 * MIB;
    })
    .await;
    node.create_fleet(stub("adm", "")).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let r = loop {
        let r = row(&node, "adm").await;
        if r.state == AgentState::Failed {
            break r;
        }
        assert!(Instant::now() < deadline, "not refused: {r:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let reason = r.reason.unwrap_or_default();
    assert!(
        reason.contains("not admitted") && reason.contains("reserve"),
        "{reason}"
    );
    assert_eq!(r.pid, None);
    // Memory comes back: the same agent starts.
    std::fs::write(
        &meminfo,
        "MemTotal: 16000000 kB\nMemAvailable: 8000000 kB\n",
    )
    .unwrap();
    node.start_agent("adm", "agent-1").await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while row(&node, "adm").await.state != AgentState::Running {
        assert!(
            Instant::now() < deadline,
            "did not start once memory was back"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capacity_names_the_binding_limit() {
    let (_d, node) = node_with(|c| {
        c.port_range = fleet_commander::ports::PortRange::parse("45100-45109").unwrap();
    })
    .await;
    let mut spec = stub("cap", "");
    spec.agents = FleetSpec::numbered_agents(3);
    node.create_fleet(spec).await.unwrap();
    let Reply::Capacity(rows) = node.execute(Command::Capacity).await else {
        panic!()
    };
    assert_eq!(rows.len(), 1, "{rows:?}");
    let r = &rows[0];
    // 10 ports, stride 1, 3 leased (minus any port of the range bound by something else).
    let busy = (45100..=45109u16)
        .filter(|p| !fleet_commander::ports::port_is_bindable(*p))
        .count() as u64;
    assert!(r.by_ports <= 7 && r.by_ports + busy >= 7, "{r:?}");
    assert_eq!(r.binding, "ports", "{r:?}");
    assert_eq!(r.fits, r.by_ports);
    assert!(r.by_memory.unwrap() > r.by_ports);
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_prometheus_text_and_move_with_restarts() {
    let (_d, node) = node_with(|_| {}).await;
    let addr = node
        .serve_metrics("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    node.create_fleet(stub("met", "")).await.unwrap();
    let pid = loop {
        let r = row(&node, "met").await;
        if r.state == AgentState::Running {
            break r.pid.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let scrape = || {
        let (code, body) = get(addr.port(), "/metrics");
        assert_eq!(code, 200);
        check_exposition(&body);
        body
    };
    let before = scrape();
    assert!(
        before.contains(r#"fleet_agents{fleet="met",state="running"} 1"#),
        "{before}"
    );
    let restarts = |body: &str| -> u64 {
        body.lines()
            .filter(|l| l.starts_with("fleet_restarts_total{") && l.contains(r#"fleet="met""#))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
            .sum()
    };
    assert_eq!(restarts(&before), 0);
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let after = wait_until(
        Duration::from_secs(10),
        "the restart counter to move",
        |s| {
            let body = scrape();
            *s = body.clone();
            (restarts(&body) == 1).then_some(body)
        },
    );
    assert!(after.contains(r#"reason="signal""#), "{after}");
    assert!(
        after.contains("fleet_probe_latency_seconds_count"),
        "{after}"
    );
    // The saturated-host counters are exposed (when they count is table-tested in health.rs).
    for counter in [
        "fleet_probe_timeouts_excused_total ",
        "fleet_start_graces_extended_total ",
    ] {
        assert!(
            after.lines().any(|l| l.starts_with(counter)),
            "{counter}missing: {after}"
        );
    }
    let log_bytes = after
        .lines()
        .find(|l| l.starts_with("fleet_log_bytes_total "))
        .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok());
    assert!(
        log_bytes.is_some_and(|b| b > 0),
        "no log bytes counted: {after}"
    );
    node.shutdown().await;
}

fn get(port: u16, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut buf = String::new();
    s.read_to_string(&mut buf).unwrap();
    let code = buf.split(' ').nth(1).unwrap().parse().unwrap();
    let body = buf
        .split_once("\r\n\r\n")
        .map(|x| x.1.to_string())
        .unwrap_or_default();
    // Chunked encoding: keep only the payload lines.
    (code, body)
}

/// Every line is a comment (`# HELP|TYPE|UNIT|EOF`) or `name{labels} value` with a number.
fn check_exposition(body: &str) {
    let mut saw_eof = false;
    for line in body.lines().filter(|l| !l.is_empty()) {
        if line.chars().all(|c| c.is_ascii_hexdigit()) {
            continue; // chunk size line
        }
        if line == "# EOF" {
            saw_eof = true;
            continue;
        }
        if line.starts_with("# HELP ") || line.starts_with("# TYPE ") || line.starts_with("# UNIT ")
        {
            continue;
        }
        let (name_labels, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("bad line {line:?}"));
        assert!(
            value.parse::<f64>().is_ok() || value == "+Inf",
            "bad value in {line:?}"
        );
        let name = name_labels.split('{').next().unwrap();
        assert!(
            !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad metric name in {line:?}"
        );
        if let Some(labels) = name_labels.strip_prefix(name) {
            assert!(
                labels.is_empty() || (labels.starts_with('{') && labels.ends_with('}')),
                "bad labels in {line:?}"
            );
        }
    }
    assert!(saw_eof, "no # EOF: {body}");
}

/// `ksm` per fleet: an agent of a fleet with KSM on asked the kernel to merge its pages
/// (`ksm_merge_any: yes`, kept across exec), one with `ksm = false` did not, nor one of a
/// custom command left at the default.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ksm_is_asked_for_per_fleet() {
    use fleet_commander::process::procfs;
    if !procfs::ksm_available() {
        common::skipped("ksm_is_asked_for_per_fleet: this kernel has no PR_SET_MEMORY_MERGE");
        return;
    }
    if !nix::unistd::geteuid().is_root() {
        common::skipped(
            "ksm_is_asked_for_per_fleet: PR_SET_MEMORY_MERGE needs CAP_SYS_RESOURCE (run as root)",
        );
        return;
    }
    let (_d, node) = node_with(|_| {}).await;
    let mut on = stub("ksm-on", "");
    on.ksm = Some(true);
    let mut off = stub("ksm-off", "");
    off.ksm = Some(false);
    node.create_fleet(on).await.unwrap();
    node.create_fleet(off).await.unwrap();
    let stat = |fleet: &'static str| {
        let node = node.clone();
        wait_until(
            Duration::from_secs(20),
            &format!("{fleet} running"),
            move |s| {
                let r = futures_lite_block(row(&node, fleet));
                *s = format!("{r:?}");
                let pid = r.pid.filter(|_| r.state == AgentState::Running)?;
                procfs::parse_ksm_stat(
                    &std::fs::read_to_string(format!("/proc/{pid}/ksm_stat")).ok()?,
                )
            },
        )
    };
    assert!(
        stat("ksm-on").merge_any,
        "ksm on: the agent asked for merging"
    );
    assert!(!stat("ksm-off").merge_any, "ksm = false: it did not");
    node.create_fleet(stub("ksm-default", "")).await.unwrap();
    assert!(
        !stat("ksm-default").merge_any,
        "a custom command's default is off"
    );
    // The flag is the memory map's: the daemon (this process embeds the node) must not keep
    // it after handing it to a child.
    let me = procfs::parse_ksm_stat(&std::fs::read_to_string("/proc/self/ksm_stat").unwrap());
    assert!(!me.unwrap().merge_any, "the daemon itself is not merged");
    node.shutdown().await;
}

/// `heap_raise`: after each V8 heap out-of-memory abort the agent's next start gets a heap cap
/// `step_mib` larger, up to `max_mib`, and the reason says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heap_cap_is_raised_step_by_step_after_heap_aborts() {
    let (_d, node) = node_with(|_| {}).await;
    let mut rx = node.subscribe();
    let mut spec = FleetSpec::new("heap");
    spec.agents = FleetSpec::numbered_agents(1);
    spec.stride = Some(1);
    // What a Node that runs out of heap does: V8's line on stderr, then SIGABRT. Each start
    // records the NODE_OPTIONS it was given.
    spec.command = Some(vec![
        "/bin/sh".into(),
        "-c".into(),
        "echo \"$NODE_OPTIONS\" >> \"$HOME/options\"; echo 'FATAL ERROR: Ineffective mark-compacts near heap limit Allocation failed - JavaScript heap out of memory' >&2; sleep 0.2; kill -ABRT $$".into(),
    ]);
    spec.env.insert(
        "NODE_OPTIONS".into(),
        "--max-old-space-size=100 --trace-gc".into(),
    );
    spec.heap_raise = Some(fleet_commander::spec::HeapRaise {
        step_mib: 50,
        max_mib: 200,
    });
    spec.backoff.initial_ms = 20;
    spec.backoff.max_ms = 100;
    spec.intensity.max_restarts = 50;
    node.create_fleet(spec).await.unwrap();
    let home = std::path::PathBuf::from(row(&node, "heap").await.home);
    let caps = wait_until(Duration::from_secs(60), "four starts", |seen| {
        let text = std::fs::read_to_string(home.join("options")).unwrap_or_default();
        *seen = text.clone();
        let caps: Vec<String> = text.lines().map(str::to_string).collect();
        (caps.len() >= 4).then_some(caps)
    });
    assert_eq!(
        caps[..4],
        [
            "--max-old-space-size=100 --trace-gc",
            "--trace-gc --max-old-space-size=150",
            "--trace-gc --max-old-space-size=200",
            "--trace-gc --max-old-space-size=200",
        ]
    );
    // The backoff transitions say why and what changed.
    let mut reasons = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while reasons.len() < 3 {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Ok(fleet_commander::messages::events::Event::Agent(t)))
                if t.new == AgentState::Backoff =>
            {
                reasons.push(t.reason.unwrap_or_default())
            }
            Ok(Ok(_)) => continue,
            other => panic!("no backoff transition: {other:?} after {reasons:?}"),
        }
    }
    assert!(
        reasons[0].starts_with("js heap out of memory (limit 100 MiB)")
            && reasons[0].contains("heap cap raised to 150 MiB"),
        "{reasons:?}"
    );
    assert!(
        reasons[2].contains("heap cap at its bound (200 MiB)"),
        "{reasons:?}"
    );
    node.shutdown().await;
}
