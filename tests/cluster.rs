//! Cluster mode against a real etcd (scripts/install-etcd.sh; `FLEET_ETCD_BIN`), with real
//! fleetd processes on loopback: placement over three nodes, drain, a SIGKILLed node, a
//! frozen node (SIGSTOP for 3 × TTL), an etcd restart, the same status through every socket,
//! a three-member etcd that loses one member, a tenant that moves with its settings, TLS
//! with client certificates, a long etcd outage ridden out, and a node cut off from a
//! running etcd. A sampler checks every 100 ms, for the whole of the fail-over tests, that
//! no agent has live processes under two nodes.

mod common;

use common::{wait_until, Daemon, STUB};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One test at a time: each starts etcd and several daemons on 2 cores.
static SERIAL: Mutex<()> = Mutex::new(());

const TTL: u64 = 5;

fn etcd_bin() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("FLEET_ETCD_BIN") {
        return Some(PathBuf::from(p));
    }
    let out = Command::new("sh")
        .args(["-c", "command -v etcd"])
        .output()
        .ok()?;
    let p = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (!p.is_empty()).then(|| PathBuf::from(p))
}

/// Loopback ports of this test binary's own (another binary's tests use 21000-50999).
fn etcd_ports(i: u16) -> (u16, u16) {
    (52379 + i * 2, 52380 + i * 2)
}

struct EtcdMember {
    child: Option<Child>,
    args: Vec<String>,
    bin: PathBuf,
    log: PathBuf,
}

impl EtcdMember {
    fn start(bin: &Path, dir: &Path, name: &str, i: u16, cluster: &str) -> EtcdMember {
        let (client, peer) = etcd_ports(i);
        let args = vec![
            "--name".into(),
            name.into(),
            "--data-dir".into(),
            dir.join(name).display().to_string(),
            "--listen-client-urls".into(),
            format!("http://127.0.0.1:{client}"),
            "--advertise-client-urls".into(),
            format!("http://127.0.0.1:{client}"),
            "--listen-peer-urls".into(),
            format!("http://127.0.0.1:{peer}"),
            "--initial-advertise-peer-urls".into(),
            format!("http://127.0.0.1:{peer}"),
            "--initial-cluster".into(),
            cluster.into(),
            "--initial-cluster-token".into(),
            format!("fleet-test-{}", std::process::id()),
        ];
        let mut m = EtcdMember {
            child: None,
            args,
            bin: bin.to_path_buf(),
            log: dir.join(format!("{name}.log")),
        };
        m.launch();
        m
    }

    fn launch(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        self.child = Some(
            Command::new(&self.bin)
                .args(&self.args)
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .expect("start etcd"),
        );
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while c.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for EtcdMember {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A one-member etcd under `dir`, or `None` (said as skipped) where etcd is not installed.
fn one_etcd(dir: &Path) -> Option<EtcdMember> {
    let Some(bin) = etcd_bin() else {
        common::skipped("tests/cluster.rs: no etcd (run scripts/install-etcd.sh)");
        return None;
    };
    Some(EtcdMember::start(
        &bin,
        dir,
        "e0",
        0,
        &format!("e0=http://127.0.0.1:{}", etcd_ports(0).1),
    ))
}

/// What most tests start with: the one-test-at-a-time lock, a temporary directory and a
/// one-member etcd in it (`None`, said as skipped, where etcd is not installed).
fn one_etcd_serial() -> Option<(
    std::sync::MutexGuard<'static, ()>,
    tempfile::TempDir,
    EtcdMember,
)> {
    let one = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let etcd = one_etcd(dir.path())?;
    Some((one, dir, etcd))
}

fn url(i: u16) -> String {
    format!("http://127.0.0.1:{}", etcd_ports(i).0)
}

fn node(name: &str, etcd: &str) -> Daemon {
    node_with(name, etcd, &[])
}

fn node_with(name: &str, etcd: &str, extra: &[&str]) -> Daemon {
    let ttl = TTL.to_string();
    let mut args = vec![
        "--etcd",
        etcd,
        "--node-name",
        name,
        "--lease-ttl",
        &ttl,
        "--cgroup",
        "off",
    ];
    args.extend_from_slice(extra);
    Daemon::start_with(&cluster_args(&args))
}

/// `--json status` through one node, or None while it cannot answer (etcd down).
fn try_status(d: &Daemon) -> Option<Vec<Value>> {
    let out = d.ctl_output(&["--json", "status"]);
    if !out.status.success() {
        return None;
    }
    serde_json::from_slice::<Value>(&out.stdout)
        .ok()?
        .as_array()
        .cloned()
}

/// Waits until `n` agents of fleet `s` run, every one healthy, on nodes `on`; returns
/// agent → (node, pid).
fn wait_spread(
    d: &Daemon,
    n: usize,
    on: &[&str],
    timeout: Duration,
    what: &str,
) -> BTreeMap<String, (String, u64)> {
    wait_until(timeout, what, |seen| {
        let rows = try_status(d)?;
        let ok: BTreeMap<String, (String, u64)> = rows
            .iter()
            .filter(|r| r["fleet"] == "s" && r["state"] == "running" && r["healthy"] == true)
            .filter(|r| on.iter().any(|n| r["node"] == *n))
            .filter_map(|r| {
                Some((
                    r["agent"].as_str()?.to_string(),
                    (r["node"].as_str()?.to_string(), r["pid"].as_u64()?),
                ))
            })
            .collect();
        *seen = format!(
            "{} of {n} running on {on:?}; rows: {}",
            ok.len(),
            rows.iter()
                .map(|r| format!("{}@{}:{}", r["agent"], r["node"], r["state"]))
                .collect::<Vec<_>>()
                .join(" ")
        );
        (ok.len() == n).then_some(ok)
    })
}

/// Every 100 ms: for each agent, the nodes (by node id in the process marker) that have a
/// live process of it. Two nodes at once is the violation.
struct Sampler {
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<(u64, Vec<String>)>>,
}

impl Sampler {
    fn start(node_ids: Arc<Mutex<BTreeSet<String>>>) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut rounds = 0u64;
            let mut violations = Vec::new();
            while !s.load(Ordering::Relaxed) {
                let ids = node_ids.lock().unwrap().clone();
                let mut by_agent: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
                for id in &ids {
                    for (pid, marker) in common::marked(&format!("{id}/")) {
                        let mut parts = marker.splitn(4, '/');
                        let (Some(node), Some(f), Some(a)) =
                            (parts.next(), parts.next(), parts.next())
                        else {
                            continue;
                        };
                        let _ = pid;
                        by_agent
                            .entry(format!("{f}/{a}"))
                            .or_default()
                            .insert(node.to_string());
                    }
                }
                for (a, nodes) in by_agent {
                    if nodes.len() > 1 {
                        violations.push(format!("round {rounds}: {a} live under {nodes:?}"));
                    }
                }
                rounds += 1;
                std::thread::sleep(Duration::from_millis(100));
            }
            (rounds, violations)
        });
        Sampler {
            stop,
            handle: Some(handle),
        }
    }

    fn finish(mut self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.take().unwrap().join().unwrap()
    }
}

fn nodes_live(d: &Daemon) -> Option<BTreeMap<String, Value>> {
    let out = d.ctl_output(&["--json", "node", "list"]);
    if !out.status.success() {
        return None;
    }
    let v: Value = serde_json::from_slice(&out.stdout).ok()?;
    Some(
        v.as_array()?
            .iter()
            .filter(|r| r["lease"] == "live")
            .map(|r| (r["node"].as_str().unwrap_or("").to_string(), r.clone()))
            .collect(),
    )
}

/// `fleet create NAME --agents N` of stand-ins, retried while the node is still joining (a
/// new etcd cluster electing its first leader answers errors for a moment).
fn create_stub_fleet_once_joined(d: &Daemon, name: &str, n: u32) {
    wait_until(Duration::from_secs(20), "fleet create", |seen| {
        let out = d.try_create_stub_fleet(name, n, "", &[]);
        *seen = String::from_utf8_lossy(&out.stderr).to_string();
        out.status.success().then_some(())
    });
}

fn is_root() -> bool {
    unsafe { libc::geteuid() == 0 }
}

/// Cluster flags plus `--unfenced` where the PID-namespace guardian cannot run (not root):
/// a test without root still exercises everything but the fence.
fn cluster_args<'a>(args: &[&'a str]) -> Vec<&'a str> {
    let mut v = args.to_vec();
    if !is_root() {
        v.push("--unfenced");
    }
    v
}

#[test]
fn three_nodes_spread_fail_over_fence_drain_and_ride_out_an_etcd_restart() {
    let Some((_one, _dir, mut etcd)) = one_etcd_serial() else {
        return;
    };
    let u = url(0);
    let mut n1 = node("n1", &u);
    let n2 = node("n2", &u);
    let n3 = node("n3", &u);
    let ids = Arc::new(Mutex::new(BTreeSet::from([
        n1.node_id(),
        n2.node_id(),
        n3.node_id(),
    ])));
    let sampler = Sampler::start(ids.clone());

    // 30 stand-ins, created through n1, spread over all three.
    n1.create_stub_fleet("s", 30, "", &[]);
    let placed = wait_spread(
        &n2,
        30,
        &["n1", "n2", "n3"],
        Duration::from_secs(60),
        "30 agents",
    );
    for n in ["n1", "n2", "n3"] {
        let k = placed.values().filter(|(x, _)| x == n).count();
        assert_eq!(
            k, 10,
            "spread by free room over equal nodes: {n} has {k}: {placed:?}"
        );
    }

    // The same cluster-wide status through every node's socket.
    wait_until(
        Duration::from_secs(10),
        "one status through every socket",
        |seen| {
            let views: Vec<BTreeSet<(String, String, String)>> = [&n1, &n2, &n3]
                .iter()
                .map(|d| {
                    try_status(d)
                        .unwrap_or_default()
                        .iter()
                        .map(|r| {
                            (
                                r["agent"].to_string(),
                                r["node"].to_string(),
                                r["pid"].to_string(),
                            )
                        })
                        .collect()
                })
                .collect();
            *seen = format!("{views:?}");
            (views[0].len() == 30 && views[0] == views[1] && views[1] == views[2]).then_some(())
        },
    );
    // An agent's own command at another node is answered by the node that runs it.
    let (agent, _) = placed.iter().find(|(_, (n, _))| n == "n3").unwrap();
    let there = n3.ctl(&["logs", &format!("s/{agent}")]);
    assert!(!there.trim().is_empty());
    assert_eq!(n1.ctl(&["logs", &format!("s/{agent}")]), there);

    // Drain n3: everything moves to n1 and n2; then n3 takes agents again.
    n1.ctl(&["node", "drain", "n3"]);
    let drained = wait_spread(
        &n1,
        30,
        &["n1", "n2"],
        Duration::from_secs(30),
        "n3 drained",
    );
    let on_n3: BTreeSet<&String> = placed
        .iter()
        .filter(|(_, (n, _))| n == "n3")
        .map(|(a, _)| a)
        .collect();
    for (a, (n, pid)) in &drained {
        if !on_n3.contains(a) {
            assert_eq!(
                (n, pid),
                (&placed[a].0, &placed[a].1),
                "{a} was not on n3 and must not have moved or restarted"
            );
        }
    }
    n1.ctl(&["node", "uncordon", "n3"]);

    // SIGKILL n1: its agents run on n2 and n3 within 30 s.
    n1.kill9();
    let t = Instant::now();
    let after_kill = wait_spread(
        &n2,
        30,
        &["n2", "n3"],
        Duration::from_secs(30),
        "n1's agents on the survivors within 30 s",
    );
    eprintln!(
        "cluster: SIGKILLed node's agents running elsewhere after {:?}",
        t.elapsed()
    );
    // n1 comes back (a new lease once the old one expired) and takes no agent from the others.
    n1.launch();
    ids.lock().unwrap().insert(n1.node_id());
    wait_until(Duration::from_secs(30), "n1 live again", |seen| {
        let l = nodes_live(&n2)?;
        *seen = format!("{:?}", l.keys());
        l.contains_key("n1").then_some(())
    });

    if is_root() {
        // SIGSTOP n2 for 3 × TTL: its agents die (the guardian's deadline) before its lease
        // expires, run elsewhere, and n2 rejoins without duplicates.
        let n2_pids: Vec<u64> = after_kill
            .values()
            .filter(|(n, _)| n == "n2")
            .map(|(_, p)| *p)
            .collect();
        assert!(!n2_pids.is_empty());
        unsafe { libc::kill(n2.pid() as i32, libc::SIGSTOP) };
        let frozen = Instant::now();
        wait_until(
            Duration::from_secs(TTL),
            "a frozen node's agents dead within its TTL",
            |seen| {
                let alive: Vec<&u64> = n2_pids
                    .iter()
                    .filter(|p| common::alive(**p as u32))
                    .collect();
                *seen = format!("{alive:?}");
                alive.is_empty().then_some(())
            },
        );
        eprintln!(
            "cluster: frozen node's agents dead after {:?}",
            frozen.elapsed()
        );
        wait_spread(
            &n3,
            30,
            &["n1", "n3"],
            Duration::from_secs(30),
            "the frozen node's agents elsewhere",
        );
        let rest = Duration::from_secs(3 * TTL).saturating_sub(frozen.elapsed());
        std::thread::sleep(rest); // the freeze itself lasts 3 × TTL: not a synchronisation
        unsafe { libc::kill(n2.pid() as i32, libc::SIGCONT) };
        wait_until(Duration::from_secs(30), "n2 live again", |seen| {
            let l = nodes_live(&n3)?;
            *seen = format!("{:?}", l.keys());
            l.contains_key("n2").then_some(())
        });
    } else {
        common::skipped("tests/cluster.rs: the SIGSTOP fence needs a PID namespace (root)");
    }

    // etcd restarted: no healthy agent restarts.
    let before = wait_spread(
        &n3,
        30,
        &["n1", "n2", "n3"],
        Duration::from_secs(30),
        "settled",
    );
    etcd.stop();
    let err = n3.ctl_output(&["status"]);
    assert!(!err.status.success(), "status answered with etcd down");
    assert!(
        String::from_utf8_lossy(&err.stderr).contains("etcd"),
        "{}",
        String::from_utf8_lossy(&err.stderr)
    );
    etcd.launch();
    wait_until(
        Duration::from_secs(30),
        "all three nodes live after etcd's restart",
        |seen| {
            let l = nodes_live(&n1)?;
            *seen = format!("{:?}", l.keys());
            (l.len() == 3).then_some(())
        },
    );
    let after = wait_spread(
        &n1,
        30,
        &["n1", "n2", "n3"],
        Duration::from_secs(30),
        "after etcd",
    );
    assert_eq!(
        after, before,
        "an agent moved or restarted across etcd's restart"
    );

    let (rounds, violations) = sampler.finish();
    assert!(rounds > 100, "the sampler ran only {rounds} rounds");
    assert!(violations.is_empty(), "two live instances: {violations:?}");
    drop((n1, n2, n3));
}

#[test]
fn a_three_member_etcd_keeps_serving_with_one_member_killed() {
    let _one = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let Some(bin) = etcd_bin() else {
        common::skipped("tests/cluster.rs: no etcd (run scripts/install-etcd.sh)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let cluster = (1..=3)
        .map(|i| format!("m{i}=http://127.0.0.1:{}", etcd_ports(i).1))
        .collect::<Vec<_>>()
        .join(",");
    let mut members: Vec<EtcdMember> = (1..=3)
        .map(|i| EtcdMember::start(&bin, dir.path(), &format!("m{i}"), i, &cluster))
        .collect();
    let urls = (1..=3).map(url).collect::<Vec<_>>().join(",");
    // A node that names one member of three cannot tell an outage from a cut-off by
    // refusals: it says so, and rides out only what a cut-off node would.
    {
        let one = node("one", &url(1));
        wait_until(
            Duration::from_secs(30),
            "the unnamed members noticed",
            |seen| {
                *seen = one.log();
                seen.contains("do not reach every etcd member")
                    .then_some(())
            },
        );
    }
    let a = node("a", &urls);
    create_stub_fleet_once_joined(&a, "s", 3);
    let before = wait_spread(&a, 3, &["a"], Duration::from_secs(30), "3 agents");
    members[0].stop();
    // Still serving: a change is accepted and carried out, and nothing restarted.
    wait_until(
        Duration::from_secs(20),
        "a command through the surviving members",
        |seen| {
            let out = a.ctl_output(&["agent", "add", "s", "extra"]);
            *seen = String::from_utf8_lossy(&out.stderr).to_string();
            (out.status.success() || seen.contains("already exists")).then_some(())
        },
    );
    let after = wait_spread(&a, 4, &["a"], Duration::from_secs(30), "4 agents");
    for (agent, v) in &before {
        assert_eq!(
            &after[agent], v,
            "{agent} restarted when one etcd member died"
        );
    }
    wait_until(
        Duration::from_secs(30),
        "a, naming all three, reaches them all",
        |seen| {
            *seen = a.log();
            seen.contains("every etcd member is reached").then_some(())
        },
    );
    drop(a);
    drop(members);
}

#[test]
fn agents_ride_out_a_long_etcd_outage_unless_told_to_stop() {
    let Some((_one, _dir, mut etcd)) = one_etcd_serial() else {
        return;
    };
    let u = url(0);
    let a = node("a", &u);
    let c = node_with("c", &u, &["--etcd-outage", "stop"]);
    wait_until(Duration::from_secs(30), "both nodes live", |seen| {
        let l = nodes_live(&a)?;
        *seen = format!("{:?}", l.keys());
        (l.len() == 2).then_some(())
    });
    create_stub_fleet_once_joined(&a, "s", 4);
    let before = wait_spread(&a, 4, &["a", "c"], Duration::from_secs(30), "4 agents");
    let on = |n: &str| -> BTreeMap<String, u64> {
        before
            .iter()
            .filter(|(_, (node, _))| node == n)
            .map(|(agent, (_, pid))| (agent.clone(), *pid))
            .collect()
    };
    let (on_a, on_c) = (on("a"), on("c"));
    assert!(!on_a.is_empty() && !on_c.is_empty(), "spread: {before:?}");
    wait_until(
        Duration::from_secs(30),
        "a knows it reaches every member",
        |seen| {
            *seen = a.log();
            seen.contains("every etcd member is reached").then_some(())
        },
    );

    // etcd down for everyone, 4 × TTL: a's agents live throughout (sampled every 100 ms);
    // c, told to stop, stops its own as a cut-off node would.
    etcd.stop();
    let until = Instant::now() + Duration::from_secs(4 * TTL);
    while Instant::now() < until {
        for (agent, pid) in &on_a {
            assert!(
                common::alive(*pid as u32),
                "{agent} (pid {pid}) died in the outage\n{}",
                a.log()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    for (agent, pid) in &on_c {
        assert!(
            !common::alive(*pid as u32),
            "{agent} on c (pid {pid}) outlived 4 × TTL of etcd silence"
        );
    }
    assert!(a.log().contains("etcd is down everywhere"), "{}", a.log());
    assert!(
        c.log().contains("no lease renewal in time")
            && !c.log().contains("etcd is down everywhere"),
        "{}",
        c.log()
    );
    let err = a.ctl_output(&["status"]);
    assert!(
        !err.status.success() && String::from_utf8_lossy(&err.stderr).contains("etcd"),
        "status answered with etcd down: {}",
        String::from_utf8_lossy(&err.stdout)
    );

    // etcd back: a renews the lease it kept and restarts nothing; every agent runs again.
    etcd.launch();
    let after = wait_spread(
        &a,
        4,
        &["a", "c"],
        Duration::from_secs(60),
        "4 agents after",
    );
    for (agent, pid) in &on_a {
        assert_eq!(
            after.get(agent),
            Some(&("a".to_string(), *pid)),
            "{agent} was restarted or moved by the outage"
        );
    }
    assert!(a.log().contains("etcd answers again"), "{}", a.log());
}

/// A loopback TCP proxy to a local port that a test can cut: once cut, nothing sent either
/// way is delivered and new connections are accepted and held, so a client sees timeouts,
/// never refusals (a node cut off from a running etcd). Its threads end on `Drop`.
struct Blackhole {
    port: u16,
    cut: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
}

impl Blackhole {
    fn start(to: u16) -> Blackhole {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.set_nonblocking(true).unwrap();
        let port = l.local_addr().unwrap().port();
        let (cut, stop) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicBool::new(false)),
        );
        let (c, s) = (cut.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut held = Vec::new();
            while !s.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((down, _)) if c.load(Ordering::Relaxed) => held.push(down),
                    Ok((down, _)) => {
                        let _ = down.set_nonblocking(false);
                        let Ok(up) = std::net::TcpStream::connect(("127.0.0.1", to)) else {
                            continue;
                        };
                        let pairs = [
                            (down.try_clone().unwrap(), up.try_clone().unwrap()),
                            (up, down),
                        ];
                        for (from, into) in pairs {
                            let (c, s) = (c.clone(), s.clone());
                            std::thread::spawn(move || pump(from, into, &c, &s));
                        }
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        Blackhole { port, cut, stop }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for Blackhole {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Copies `from` into `into` until either closes, dropping what comes once `cut`.
fn pump(
    mut from: std::net::TcpStream,
    mut into: std::net::TcpStream,
    cut: &AtomicBool,
    stop: &AtomicBool,
) {
    use std::io::{Read, Write};
    let _ = from.set_read_timeout(Some(Duration::from_millis(100)));
    let mut buf = vec![0u8; 16 * 1024];
    while !stop.load(Ordering::Relaxed) {
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(_) if cut.load(Ordering::Relaxed) => {}
            Ok(n) => {
                if into.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => break,
        }
    }
}

#[test]
fn a_node_cut_off_from_a_running_etcd_stops_its_agents_before_another_starts_them() {
    let Some((_one, _dir, _etcd)) = one_etcd_serial() else {
        return;
    };
    let proxy = Blackhole::start(etcd_ports(0).0);
    // x reaches the one member through the proxy: ride-out is armed, and must not fire.
    let x = node("x", &proxy.url());
    let y = node("y", &url(0));
    let ids = Arc::new(Mutex::new(BTreeSet::from([x.node_id(), y.node_id()])));
    let sampler = Sampler::start(ids);
    wait_until(Duration::from_secs(30), "both nodes live", |seen| {
        let l = nodes_live(&y)?;
        *seen = format!("{:?}", l.keys());
        (l.len() == 2).then_some(())
    });
    create_stub_fleet_once_joined(&y, "s", 6);
    let before = wait_spread(&y, 6, &["x", "y"], Duration::from_secs(30), "6 agents");
    let on_x: Vec<u64> = before
        .values()
        .filter(|(n, _)| n == "x")
        .map(|(_, pid)| *pid)
        .collect();
    assert!(!on_x.is_empty(), "spread: {before:?}");
    wait_until(
        Duration::from_secs(30),
        "x knows it reaches every member",
        |seen| {
            *seen = x.log();
            seen.contains("every etcd member is reached").then_some(())
        },
    );

    // Cut off: timeouts, not refusals. x stops its agents before its lease can expire, and
    // y runs all six once it has; never two at once (the sampler).
    proxy.cut.store(true, Ordering::Relaxed);
    wait_spread(&y, 6, &["y"], Duration::from_secs(40), "all six on y");
    for pid in &on_x {
        assert!(
            !common::alive(*pid as u32),
            "x's agent (pid {pid}) outlived its lease"
        );
    }
    let log = x.log();
    assert!(
        log.contains("no lease renewal in time") && !log.contains("etcd is down everywhere"),
        "{log}"
    );
    let (rounds, violations) = sampler.finish();
    assert!(rounds > 50, "the sampler ran only {rounds} rounds");
    assert!(violations.is_empty(), "two live instances: {violations:?}");
}

/// A process's environment.
fn environ(pid: u64) -> BTreeMap<String, String> {
    std::fs::read(format!("/proc/{pid}/environ"))
        .unwrap_or_default()
        .split(|b| *b == 0)
        .filter_map(|kv| {
            let kv = String::from_utf8_lossy(kv);
            let (k, v) = kv.split_once('=')?;
            Some((k.to_string(), v.to_string()))
        })
        .collect()
}

/// The row of `fleet/agent` once it runs healthy on one of `on`, else None.
fn running_on(d: &Daemon, fleet: &str, agent: &str, on: &[&str]) -> Option<(String, u64)> {
    try_status(d)?.iter().find_map(|r| {
        (r["fleet"] == fleet
            && r["agent"] == agent
            && r["state"] == "running"
            && on.iter().any(|n| r["node"] == *n))
        .then(|| Some((r["node"].as_str()?.to_string(), r["pid"].as_u64()?)))
        .flatten()
    })
}

#[test]
fn a_tenant_moves_with_its_secret_env_and_files_from_etcd_not_from_the_host() {
    let Some((_one, dir, _etcd)) = one_etcd_serial() else {
        return;
    };
    let u = url(0);
    let a = node("a", &u);
    let b = node("b", &u);
    a.create_stub_fleet("t", 1, "", &[]);
    let token_file = dir.path().join("bot.tg");
    let soul_file = dir.path().join("soul.md");
    std::fs::write(&token_file, "123456:tenant-bot-token\n").unwrap();
    std::fs::write(&soul_file, "You are a pirate.").unwrap();

    // A setting naming a file that is not there: refused, naming the field; nothing added.
    let out = b.ctl_output(&[
        "agent",
        "add",
        "t",
        "ghost",
        "--secret",
        &format!("TG_BOT_TOKEN={}", dir.path().join("absent").display()),
    ]);
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        e.contains("secrets.TG_BOT_TOKEN") && e.contains("nothing was changed"),
        "{e}"
    );

    // The tenant is added through b; its files are read on b's host, once.
    b.ctl(&[
        "agent",
        "add",
        "t",
        "bot",
        "--secret",
        &format!("TG_BOT_TOKEN={}", token_file.display()),
        "--env",
        "PERSONA=pirate",
        "--file",
        &format!("SOUL.md={}", soul_file.display()),
    ]);
    let (first, pid) = wait_until(Duration::from_secs(30), "bot running", |_| {
        running_on(&a, "t", "bot", &["a", "b"])
    });
    let env = environ(pid);
    assert_eq!(
        env.get("TG_BOT_TOKEN").map(String::as_str),
        Some("123456:tenant-bot-token")
    );
    assert_eq!(env.get("PERSONA").map(String::as_str), Some("pirate"));
    let home = PathBuf::from(&env["HOME"]);
    assert_eq!(
        std::fs::read_to_string(home.join("SOUL.md")).unwrap(),
        "You are a pirate."
    );
    assert!(
        !try_status(&a)
            .unwrap()
            .iter()
            .any(|r| r["agent"] == "ghost"),
        "the refused add left no agent"
    );

    let by_name = |n: &str| if n == "a" { &a } else { &b };
    let token = by_name(&first).ctl(&["token", "t/bot"]).trim().to_string();
    assert_eq!(token.len(), 64, "{token}");

    // The operator's files are gone: the node that takes the agent over provisions its HOME
    // from etcd alone.
    std::fs::remove_file(&token_file).unwrap();
    std::fs::remove_file(&soul_file).unwrap();
    let other = if first == "a" { "b" } else { "a" };
    a.ctl(&["node", "drain", &first]);
    let (_, pid) = wait_until(Duration::from_secs(30), "bot moved", |_| {
        running_on(&a, "t", "bot", &[other])
    });
    let env = environ(pid);
    assert_eq!(
        env.get("TG_BOT_TOKEN").map(String::as_str),
        Some("123456:tenant-bot-token")
    );
    assert_eq!(env.get("PERSONA").map(String::as_str), Some("pirate"));
    let moved_home = PathBuf::from(&env["HOME"]);
    assert_eq!(
        by_name(other).ctl(&["token", "t/bot"]).trim(),
        token,
        "a moved agent keeps its gateway token"
    );
    assert_ne!(moved_home, home, "another host's HOME");
    assert_eq!(
        std::fs::read_to_string(moved_home.join("SOUL.md")).unwrap(),
        "You are a pirate."
    );

    // A change of its settings from any node restarts it where it runs, with the new value.
    b.ctl(&["agent", "set", "t/bot", "--env", "PERSONA=poet"]);
    let (_, new_pid) = wait_until(Duration::from_secs(30), "bot restarted as a poet", |_| {
        running_on(&a, "t", "bot", &[other])
            .filter(|(_, p)| environ(*p).get("PERSONA").map(String::as_str) == Some("poet"))
    });
    assert_ne!(new_pid, pid);

    // An agent's own commands at the node that does not run it are carried to the one that
    // does (through etcd), and answer as there.
    let (here, there) = (by_name(other), by_name(&first));
    assert_eq!(there.ctl(&["token", "t/bot"]).trim(), token);
    // `token --rotate` at either node: one new token, the one the node running it took.
    let rotated = there
        .ctl(&["token", "t/bot", "--rotate"])
        .trim()
        .to_string();
    assert!(rotated.len() == 64 && rotated != token, "{rotated}");
    assert_eq!(here.ctl(&["token", "t/bot"]).trim(), rotated);
    // The rotation restarts it: its log grows until the new process is up, so the two nodes'
    // answers are compared until they agree (a node answering from elsewhere never does).
    let logs_here = wait_until(
        Duration::from_secs(30),
        "the same logs through both nodes",
        |_| {
            let (h, t) = (here.ctl(&["logs", "t/bot"]), there.ctl(&["logs", "t/bot"]));
            (h == t).then_some(h)
        },
    );
    assert!(!logs_here.trim().is_empty(), "the stand-in logs its start");
    let follow = std::process::Command::new("timeout")
        .args(["20", common::FLEETCTL, "--socket"])
        .arg(there.socket())
        .args(["logs", "t/bot", "--follow"])
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&follow.stderr);
    assert!(
        !follow.status.success() && e.contains(&format!("runs on node {other}")),
        "a stream does not cross nodes, and says where to follow it: {e}"
    );
    // A backup asked at `there` is taken where the agent runs, and says so.
    let b_out = there.ctl(&["--json", "agent", "backup", "t/bot"]);
    let rows: Vec<Value> = serde_json::from_str(&b_out).unwrap();
    assert_eq!(rows[0]["node"], other, "{b_out}");
    let archive = PathBuf::from(rows[0]["path"].as_str().unwrap());
    assert!(archive.starts_with(here.state_dir()), "{archive:?}");
    // `fleet restart` from `there` restarts it where it runs.
    let out = there.ctl(&["fleet", "restart", "t"]);
    assert!(out.contains(&format!("{other}:")), "{out}");
    let (_, restarted) = wait_until(Duration::from_secs(30), "bot restarted", |_| {
        running_on(&a, "t", "bot", &[other]).filter(|(_, p)| *p != new_pid)
    });
    // Restore from `there`, with the archive a file on `there`'s host: carried through etcd.
    let copy = dir.path().join("bot-copy.tar.gz");
    std::fs::copy(&archive, &copy).unwrap();
    there.ctl(&["agent", "stop", "t/bot"]);
    wait_until(Duration::from_secs(30), "bot stopped", |_| {
        try_status(&a)?
            .iter()
            .find(|r| r["agent"] == "bot" && r["state"] == "stopped")
            .map(drop)
    });
    std::fs::write(moved_home.join("SOUL.md"), "changed after the backup").unwrap();
    let out = there.ctl(&[
        "agent",
        "restore",
        "t/bot",
        "--from",
        copy.to_str().unwrap(),
    ]);
    assert!(out.contains("restored"), "{out}");
    assert_eq!(
        std::fs::read_to_string(moved_home.join("SOUL.md")).unwrap(),
        "You are a pirate.",
        "the HOME is the archive's again"
    );
    assert_ne!(
        here.ctl(&["token", "t/bot"]).trim(),
        rotated,
        "a restore rotates the token (the archive's must not work)"
    );
    assert_eq!(
        here.ctl(&["token", "t/bot"]),
        there.ctl(&["token", "t/bot"]),
        "one token cluster-wide after a restore"
    );
    let out = there.ctl_output(&["agent", "restore", "t/bot", "--from", "/dev/zero"]);
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && e.contains("--from"), "{e}");
    there.ctl(&["agent", "start", "t/bot"]);
    wait_until(Duration::from_secs(30), "bot running again", |_| {
        running_on(&a, "t", "bot", &[other]).filter(|(_, p)| *p != restarted)
    });

    // `agent rm --purge` from either node: every node's copy of the HOME goes (the first
    // host kept one from before the move).
    assert!(home.exists() && moved_home.exists());
    let out = there.ctl(&["agent", "rm", "t/bot", "--purge"]);
    assert!(out.contains("purged"), "{out}");
    assert!(!home.exists(), "{home:?} purged on {first}");
    assert!(!moved_home.exists(), "{moved_home:?} purged on {other}");
    drop(a);
    drop(b);
}

/// `<HOME>/notes/session.txt` of a running agent, by its pid.
fn session_of(pid: u64) -> Option<String> {
    let home = PathBuf::from(environ(pid).get("HOME")?);
    std::fs::read_to_string(home.join("notes").join("session.txt")).ok()
}

fn write_session(pid: u64, text: &str) {
    let home = PathBuf::from(&environ(pid)["HOME"]);
    std::fs::create_dir_all(home.join("notes")).unwrap();
    std::fs::write(home.join("notes").join("session.txt"), text).unwrap();
}

/// Writes `"<agent> <said>"` as the session of each agent (name → (node, pid)).
fn write_sessions(agents: &BTreeMap<String, (String, u64)>, said: &str) {
    for (n, (_, pid)) in agents {
        write_session(*pid, &format!("{n} {said}"));
    }
}

/// Each agent's session says `"<agent> <said>"`.
fn assert_sessions(agents: &BTreeMap<String, (String, u64)>, said: &str, why: &str) {
    for (n, (_, pid)) in agents {
        assert_eq!(
            session_of(*pid).as_deref(),
            Some(format!("{n} {said}").as_str()),
            "{n}: {why}"
        );
    }
}

/// Archives waiting in the shared handover dir for fleet `f`.
fn waiting_archives(shared: &Path, f: &str) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(shared.join(f))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().to_string())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn a_moved_agent_takes_its_home_along_through_the_handover_dir() {
    let Some((_one, dir, _etcd)) = one_etcd_serial() else {
        return;
    };
    let u = url(0);
    let shared = dir.path().join("handover");
    std::fs::create_dir(&shared).unwrap();

    // A handover dir that is not an absolute directory is refused, naming the flag.
    for bad in ["relative/dir", "/dev/null"] {
        let e = refused(
            dir.path(),
            &["--etcd", &u, "--node-name", "x", "--handover-dir", bad],
        );
        assert!(e.contains("--handover-dir"), "{bad}: {e}");
    }

    // Live archives off: what waits in the directory here is what moves left.
    let start = |name: &str| {
        node_with(
            name,
            &u,
            &[
                "--handover-dir",
                shared.to_str().unwrap(),
                "--snapshot-every",
                "0",
            ],
        )
    };
    let a = start("a");
    let mut b = start("b");
    a.create_stub_fleet("h", 2, "", &[]);
    let names = ["agent-1", "agent-2"];
    let on_any = |d: &Daemon, nodes: &[&str]| -> Option<BTreeMap<String, (String, u64)>> {
        names
            .iter()
            .map(|n| Some((n.to_string(), running_on(d, "h", n, nodes)?)))
            .collect()
    };
    let first = wait_until(Duration::from_secs(30), "both agents running", |_| {
        on_any(&a, &["a", "b"])
    });
    let tokens: BTreeMap<&str, String> = names
        .iter()
        .map(|n| (*n, a.ctl(&["token", &format!("h/{n}")]).trim().to_string()))
        .collect();
    assert!(
        first.values().any(|(n, _)| n == "a"),
        "placement spreads: a runs one of them ({first:?})"
    );
    write_sessions(&first, "talked before the drain");

    // A drain: each agent leaves a, and its HOME (what the desired state does not hold)
    // arrives with it on b.
    a.ctl(&["node", "drain", "a"]);
    let drained = wait_until(Duration::from_secs(45), "every agent on b", |_| {
        on_any(&a, &["b"])
    });
    assert_sessions(
        &drained,
        "talked before the drain",
        "its session moved with it",
    );
    for n in drained.keys() {
        assert_eq!(
            b.ctl(&["token", &format!("h/{n}")]).trim(),
            tokens[n.as_str()],
            "{n} keeps its token through the handover's restore"
        );
    }
    assert_eq!(
        waiting_archives(&shared, "h"),
        Vec::<String>::new(),
        "taken-in archives are deleted"
    );

    // A graceful shutdown (SIGTERM) of the node that runs them hands them over too.
    a.ctl(&["node", "uncordon", "a"]);
    write_sessions(&drained, "talked on b");
    assert!(b.stop().success());
    let back = wait_until(Duration::from_secs(45), "every agent on a", |_| {
        on_any(&a, &["a"])
    });
    assert_sessions(&back, "talked on b", "its session survived b's shutdown");

    // A node that never ran them joins, cordoned: drained with nowhere to go, both wait as
    // archives. A removal (without --purge) takes the removed agent's record and archive
    // with it in the same change, so the name added again starts on the new node from its
    // own desired state; the other is restored there from a's archive.
    let c = start("c");
    wait_until(Duration::from_secs(30), "c live", |_| {
        nodes_live(&a)?.contains_key("c").then_some(())
    });
    a.ctl(&["node", "cordon", "c"]);
    write_sessions(&back, "talked on a");
    a.ctl(&["node", "drain", "a"]);
    // Both let go (their claims released, which is the transaction that records the
    // archive), with nowhere to go.
    wait_until(Duration::from_secs(45), "both released, unplaced", |seen| {
        let rows = try_status(&a)?;
        *seen = format!("{rows:?}");
        let unplaced = rows
            .iter()
            .filter(|r| {
                r["fleet"] == "h"
                    && r["reason"]
                        .as_str()
                        .is_some_and(|x| x.starts_with("not placed"))
            })
            .count();
        (unplaced == 2).then_some(())
    });
    assert_eq!(
        waiting_archives(&shared, "h").len(),
        2,
        "two archives waiting"
    );
    c.ctl(&["agent", "rm", "h/agent-2"]);
    let left = waiting_archives(&shared, "h");
    assert!(
        left.len() == 1 && left[0].starts_with("a.agent-1-"),
        "only agent-1's archive is left: {left:?}"
    );
    c.ctl(&["agent", "add", "h", "agent-2"]);
    c.ctl(&["node", "uncordon", "c"]);
    let last = wait_until(Duration::from_secs(45), "both running on c", |_| {
        on_any(&a, &["c"])
    });
    assert_eq!(
        session_of(last["agent-1"].1).as_deref(),
        Some("agent-1 talked on a"),
        "agent-1's HOME came from a's archive"
    );
    assert_eq!(
        session_of(last["agent-2"].1),
        None,
        "the agent added again under a removed name starts with a fresh HOME"
    );
    assert_eq!(waiting_archives(&shared, "h"), Vec::<String>::new());
    drop(c);
    drop(a);
}

/// Archives in the shared directory of fleet `f` made by `node` for `agent`.
fn archives_by(shared: &Path, f: &str, node: &str, agent: &str) -> Vec<String> {
    let prefix = format!("{node}.{agent}-");
    waiting_archives(shared, f)
        .into_iter()
        .filter(|n| n.starts_with(&prefix) && n.ends_with(".tar.gz"))
        .collect()
}

#[test]
fn a_dead_nodes_agents_start_elsewhere_from_their_last_live_archive() {
    let Some((_one, dir, _etcd)) = one_etcd_serial() else {
        return;
    };
    let u = url(0);
    let shared = dir.path().join("live");
    std::fs::create_dir(&shared).unwrap();
    let flag = |v: &str| -> Vec<String> {
        ["--etcd", &u, "--node-name", "x", "--handover-dir"]
            .iter()
            .map(|s| s.to_string())
            .chain([
                shared.display().to_string(),
                "--snapshot-every".into(),
                v.into(),
            ])
            .collect()
    };
    let e = refused(
        dir.path(),
        &flag("5").iter().map(String::as_str).collect::<Vec<_>>(),
    );
    assert!(e.contains("--snapshot-every") && e.contains("10"), "{e}");
    let e = refused(
        dir.path(),
        &["--etcd", &u, "--node-name", "x", "--snapshot-every", "60"],
    );
    assert!(e.contains("--handover-dir"), "{e}");

    let start = |name: &str| {
        node_with(
            name,
            &u,
            &[
                "--handover-dir",
                shared.to_str().unwrap(),
                "--snapshot-every",
                "10",
            ],
        )
    };
    let mut a = start("a");
    let b = start("b");
    a.create_stub_fleet("l", 2, "", &[]);
    let names = ["agent-1", "agent-2"];
    let rows = wait_until(Duration::from_secs(30), "one agent on each node", |_| {
        let v: Vec<(String, (String, u64))> = names
            .iter()
            .map(|n| Some((n.to_string(), running_on(&a, "l", n, &["a", "b"])?)))
            .collect::<Option<_>>()?;
        (v.iter().any(|(_, (n, _))| n == "a") && v.iter().any(|(_, (n, _))| n == "b")).then_some(v)
    });
    let (on_a, (_, pid)) = rows.iter().find(|(_, (n, _))| n == "a").unwrap().clone();
    write_session(pid, "said before a died");
    // A live archive begun after the write holds it: the second new one at the latest
    // (the first may have been under way at the write).
    let at_write: BTreeSet<String> = archives_by(&shared, "l", "a", &on_a).into_iter().collect();
    let mut new = BTreeSet::new();
    wait_until(
        Duration::from_secs(45),
        "two live archives of it made since",
        |_| {
            new.extend(
                archives_by(&shared, "l", "a", &on_a)
                    .into_iter()
                    .filter(|n| !at_write.contains(n)),
            );
            (new.len() >= 2).then_some(())
        },
    );
    // Each new live archive replaces the one before: they do not pile up.
    let kept = archives_by(&shared, "l", "a", &on_a);
    assert!(kept.len() <= 2, "live archives pile up: {kept:?}");

    a.kill9();
    let moved = wait_until(Duration::from_secs(45), "it runs on b", |_| {
        running_on(&b, "l", &on_a, &["b"])
    });
    assert_eq!(
        session_of(moved.1).as_deref(),
        Some("said before a died"),
        "a node's death hands its agent's HOME over, as of its last live archive"
    );
    drop(b);
}

/// `fleet/agent` → pid of every running agent of `fleet`, as `d` sees the cluster.
fn running_pids(d: &Daemon, fleet: &str) -> BTreeMap<String, u64> {
    try_status(d)
        .unwrap_or_default()
        .iter()
        .filter(|r| r["fleet"] == fleet && r["state"] == "running")
        .filter_map(|r| Some((r["agent"].as_str()?.to_string(), r["pid"].as_u64()?)))
        .collect()
}

#[test]
fn a_spec_file_declares_fleets_cluster_wide_and_reload_keeps_them_in_step() {
    let Some((_one, dir, _etcd)) = one_etcd_serial() else {
        return;
    };
    let u = url(0);
    let spec = dir.path().join("fleets.toml");
    let template = dir.path().join("t.json");
    let write_spec = |agents: u32, extra: &str| {
        std::fs::write(
            &spec,
            format!(
                "[defaults]\ncommand = \"{STUB} --no-helper\"\nstride = 1\n\
                 [[fleet]]\nname = \"decl\"\nagents = {agents}\ntemplate = \"t.json\"\n{extra}"
            ),
        )
        .unwrap();
    };
    std::fs::write(&template, r#"{"custom": {"v": 1}}"#).unwrap();
    write_spec(2, "");
    let a = Daemon::start_with(&cluster_args(&[
        "--etcd",
        &u,
        "--node-name",
        "a",
        "--lease-ttl",
        &TTL.to_string(),
        "--cgroup",
        "off",
        "--spec",
        spec.to_str().unwrap(),
    ]));
    let b = node("b", &u);
    // Declared at a's start, run wherever placement puts them; seen from b.
    let first = wait_until(Duration::from_secs(60), "decl's 2 agents running", |seen| {
        let p = running_pids(&b, "decl");
        *seen = format!("{p:?}");
        (p.len() == 2).then_some(p)
    });

    // The file owns what it declares: a command that would change it is refused.
    let out = b.ctl_output(&["agent", "add", "decl", "x"]);
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && e.contains("on node a") && e.contains("fleets.toml"),
        "{e}"
    );
    let out = b.ctl_output(&["reload"]);
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && e.contains("without --spec"), "{e}");

    // Edited: a dry run says what would change and changes nothing; reload does it.
    std::fs::write(&template, r#"{"custom": {"v": 2}}"#).unwrap();
    write_spec(3, "");
    let dry = a.ctl(&["reload", "--dry-run"]);
    assert!(dry.contains("update fleet decl"), "{dry}");
    assert_eq!(running_pids(&b, "decl"), first, "a dry run changes nothing");
    let out = a.ctl(&["reload"]);
    assert!(out.contains("update fleet decl"), "{out}");
    wait_until(
        Duration::from_secs(60),
        "3 agents, the first two restarted for the new template",
        |seen| {
            let p = running_pids(&b, "decl");
            *seen = format!("{p:?} (first {first:?})");
            (p.len() == 3
                && first
                    .iter()
                    .all(|(k, pid)| p.get(k).is_some_and(|x| x != pid)))
            .then_some(())
        },
    );
    assert!(a.ctl(&["reload"]).contains("nothing to change"));

    // A fleet made by commands is never taken over by a file: refused whole.
    b.create_stub_fleet("hand", 1, "--no-helper", &[]);
    let settled = wait_until(Duration::from_secs(30), "hand running", |_| {
        let p = running_pids(&b, "decl");
        (running_pids(&b, "hand").len() == 1 && p.len() == 3).then_some(p)
    });
    write_spec(4, "[[fleet]]\nname = \"hand\"\nagents = 2\n");
    let out = a.ctl_output(&["reload"]);
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && e.contains("hand") && e.contains("made by commands"),
        "{e}"
    );
    assert_eq!(
        running_pids(&b, "decl"),
        settled,
        "a refused reload changed nothing"
    );

    // Dropped from the file: removed cluster-wide; the command-made fleet stays.
    std::fs::write(&spec, format!("[defaults]\ncommand = \"{STUB}\"\n")).unwrap();
    let out = a.ctl(&["reload"]);
    assert!(out.contains("remove fleet decl"), "{out}");
    wait_until(Duration::from_secs(30), "decl gone everywhere", |seen| {
        let rows = try_status(&b)?;
        *seen = format!("{rows:?}");
        (!rows.iter().any(|r| r["fleet"] == "decl") && rows.iter().any(|r| r["fleet"] == "hand"))
            .then_some(())
    });
    drop(a);
    drop(b);
}

/// A versions home of stand-in OpenClaw releases: two that serve (the stand-in agent) and
/// one that exits 78 at once, as a release that rejects its config.
fn stand_in_versions(dir: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let home = dir.join("openclaw");
    // The stand-in agent is copied in: an agent may execute only what its install holds
    // (and the system's own programs).
    let serve = |v: &str| {
        let stub = home.join("versions").join(v).join("node_modules/stand-in");
        std::fs::create_dir_all(stub.parent().unwrap()).unwrap();
        std::fs::copy(STUB, &stub).unwrap();
        format!("#!/bin/sh\nexec {} --no-helper\n", stub.display())
    };
    for (v, body) in [
        ("1.0.0-v1", serve("1.0.0-v1")),
        ("1.0.0-v2", serve("1.0.0-v2")),
        (
            "1.0.0-bad",
            "#!/bin/sh\necho 'stand-in: this version rejects the config' >&2\nexit 78\n".into(),
        ),
    ] {
        let bin = home.join("versions").join(v).join("node_modules/.bin");
        std::fs::create_dir_all(&bin).unwrap();
        std::fs::write(bin.join("openclaw"), body).unwrap();
        std::fs::set_permissions(bin.join("openclaw"), std::fs::Permissions::from_mode(0o755))
            .unwrap();
    }
    let mut walk = vec![dir.to_path_buf()];
    while let Some(p) = walk.pop() {
        common::searchable(&p);
        for e in std::fs::read_dir(&p).unwrap().flatten() {
            if e.file_type().unwrap().is_dir() {
                walk.push(e.path());
            }
        }
    }
    home
}

/// agent → (node, pid, version) of every running agent of fleet `up`.
fn versions_running(d: &Daemon) -> BTreeMap<String, (String, u64, String)> {
    try_status(d)
        .unwrap_or_default()
        .iter()
        .filter(|r| r["fleet"] == "up" && r["state"] == "running" && r["ready"] == true)
        .filter_map(|r| {
            Some((
                r["agent"].as_str()?.to_string(),
                (
                    r["node"].as_str()?.to_string(),
                    r["pid"].as_u64()?,
                    r["openclaw_version"].as_str()?.to_string(),
                ),
            ))
        })
        .collect()
}

fn all_on(d: &Daemon, version: &str, what: &str) -> BTreeMap<String, (String, u64, String)> {
    wait_until(Duration::from_secs(60), what, |seen| {
        let v = versions_running(d);
        *seen = format!("{v:?}");
        (v.len() == 4 && v.values().all(|(_, _, x)| x == version)).then_some(v)
    })
}

#[test]
fn a_fleet_upgrades_and_rolls_back_across_nodes_each_step_where_its_agent_runs() {
    let Some((_one, dir, _etcd)) = one_etcd_serial() else {
        return;
    };
    let u = url(0);
    common::searchable(dir.path());
    let versions = stand_in_versions(&dir.path().join("releases"));
    let vh = versions.to_string_lossy().into_owned();
    let start = |name: &str| {
        Daemon::start_env(
            &[("FLEET_OPENCLAW_HOME", &vh)],
            &cluster_args(&[
                "--etcd",
                &u,
                "--node-name",
                name,
                "--lease-ttl",
                &TTL.to_string(),
                "--cgroup",
                "off",
            ]),
        )
    };
    let (a, b) = (start("a"), start("b"));
    a.ctl(&[
        "fleet",
        "create",
        "up",
        "--agents",
        "4",
        "--openclaw-version",
        "1.0.0-v1",
    ]);
    let v1 = all_on(&b, "1.0.0-v1", "4 agents on v1");
    let nodes: BTreeSet<&str> = v1.values().map(|(n, _, _)| n.as_str()).collect();
    assert_eq!(nodes.len(), 2, "spread over both nodes: {v1:?}");

    // Driven from b; each agent backed up on the node that runs it, then on v2.
    let out = b.ctl(&["--json", "fleet", "upgrade", "up", "--to", "1.0.0-v2"]);
    let rec: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(rec["state"], "done", "{out}");
    for ag in rec["agents"].as_array().unwrap() {
        let name = ag["agent"].as_str().unwrap();
        assert_eq!(ag["step"], "kept", "{out}");
        assert_eq!(
            ag["backup_node"].as_str(),
            Some(v1[name].0.as_str()),
            "{out}"
        );
        let archive = PathBuf::from(ag["backup"].as_str().unwrap());
        assert!(archive.exists(), "{archive:?}");
    }
    let v2 = all_on(&a, "1.0.0-v2", "4 agents on v2");
    for (name, (_, pid, _)) in &v2 {
        assert_ne!(*pid, v1[name].1, "{name} restarted on the new version");
    }
    let st: Value =
        serde_json::from_str(&a.ctl(&["--json", "fleet", "upgrade", "up", "--status"])).unwrap();
    assert_eq!(
        st["state"], "done",
        "the record is in etcd: any node shows it"
    );

    // Rolled back from a: each agent restored where it runs, back on v1.
    let out = a.ctl(&["--json", "fleet", "rollback", "up"]);
    let rec: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(rec["state"], "rolled_back", "{out}");
    let back = all_on(&b, "1.0.0-v1", "4 agents back on v1");

    // A release that does not come up: the canary is put back, nobody else is touched.
    let bad = b.ctl_output(&["--json", "fleet", "upgrade", "up", "--to", "1.0.0-bad"]);
    assert!(
        !bad.status.success(),
        "a stopped rollout is a failed command"
    );
    let out = String::from_utf8_lossy(&bad.stdout).to_string();
    let rec: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(rec["state"], "stopped", "{out}");
    let steps: Vec<&str> = rec["agents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["step"].as_str().unwrap())
        .collect();
    assert_eq!(
        steps,
        ["rolled_back", "pending", "pending", "pending"],
        "{out}"
    );
    let after = all_on(&a, "1.0.0-v1", "4 agents on v1 after the failed canary");
    let canary = rec["agents"][0]["agent"].as_str().unwrap();
    for (name, (_, pid, _)) in &after {
        if name != canary {
            assert_eq!(*pid, back[name].1, "{name} was not touched");
        }
    }
    drop(a);
    drop(b);
}

/// A CA, etcd's server certificate for 127.0.0.1 and a node's client certificate, made by
/// the openssl CLI; None when it is not installed.
fn certificates(dir: &Path) -> Option<()> {
    let run = |args: &[&str]| {
        Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .ok()
            .filter(|s| s.success())
            .map(drop)
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut ca = vec!["req", "-x509", "-days", "1", "-subj", "/CN=fleet-test-ca"];
    ca.extend(ec);
    ca.extend(["-keyout", "ca.key", "-out", "ca.pem"]);
    run(&ca)?;
    for (name, ext) in [
        // etcd dials its own gRPC gateway with its server certificate: both usages.
        (
            "server",
            "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n",
        ),
        ("client", "extendedKeyUsage=clientAuth\n"),
    ] {
        std::fs::write(dir.join(format!("{name}.ext")), ext).ok()?;
        let mut req = vec!["req", "-subj"];
        let subj = format!("/CN={name}");
        req.push(&subj);
        req.extend(ec);
        let (key, csr, pem, extf) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.pem"),
            format!("{name}.ext"),
        );
        req.extend(["-keyout", &key, "-out", &csr]);
        run(&req)?;
        run(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "1",
            "-out",
            &pem,
            "-extfile",
            &extf,
        ])?;
    }
    Some(())
}

#[test]
fn a_node_without_the_fence_is_refused_unless_it_says_unfenced() {
    let Some((_one, dir, _etcd)) = one_etcd_serial() else {
        return;
    };
    let u = url(0);
    let ttl = TTL.to_string();
    let mut flags = vec![
        "--etcd",
        &u,
        "--node-name",
        "x",
        "--lease-ttl",
        &ttl,
        "--cgroup",
        "off",
    ];
    // Without the guardian (turned off as root, out of reach otherwise) nothing kills a
    // frozen node's agents before its lease expires: refused, naming the way out.
    if is_root() {
        flags.push("--no-pid-namespace");
    }
    let e = refused_as_given(dir.path(), &flags);
    assert!(
        e.contains("--unfenced") && e.contains("PID-namespace guardian"),
        "{e}"
    );
    assert!(
        !dir.path().join("refused.sock").exists(),
        "a refused node leaves no control socket behind"
    );
    let e = refused_as_given(dir.path(), &["--unfenced"]);
    assert!(e.contains("--etcd"), "--unfenced alone: {e}");

    // Said on purpose, the node joins and runs its agents.
    flags.push("--unfenced");
    let n = Daemon::start_with(&flags);
    create_stub_fleet_once_joined(&n, "s", 2);
    wait_spread(&n, 2, &["x"], Duration::from_secs(30), "2 agents unfenced");
}

/// fleetd with these flags (and `--unfenced` off root, as every node here) must refuse to
/// start: its stderr.
fn refused(dir: &Path, flags: &[&str]) -> String {
    if flags.contains(&"--etcd") {
        refused_as_given(dir, &cluster_args(flags))
    } else {
        refused_as_given(dir, flags)
    }
}

fn refused_as_given(dir: &Path, flags: &[&str]) -> String {
    let mut c = Command::new(common::FLEETD)
        .arg("--state-dir")
        .arg(dir.join("refused-state"))
        .arg("--socket")
        .arg(dir.join("refused.sock"))
        .arg("--no-repl")
        .args(flags)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let st = wait_until(Duration::from_secs(10), "fleetd refusing", |_| {
        c.try_wait().ok().flatten()
    });
    let mut err = String::new();
    std::io::Read::read_to_string(&mut c.stderr.take().unwrap(), &mut err).unwrap();
    assert!(!st.success(), "fleetd {flags:?} started: {err}");
    err
}

#[test]
fn nodes_speak_tls_with_client_certificates_and_bad_tls_flags_are_refused() {
    let _one = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let Some(bin) = etcd_bin() else {
        common::skipped("tests/cluster.rs: no etcd (run scripts/install-etcd.sh)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    if certificates(d).is_none() {
        common::skipped("tests/cluster.rs: TLS: no openssl CLI to make certificates");
        return;
    }
    let (client, peer) = etcd_ports(0);
    let https = format!("https://127.0.0.1:{client}");
    let file = |n: &str| d.join(n).display().to_string();
    let mut etcd = EtcdMember {
        child: None,
        args: [
            "--name",
            "tls",
            "--data-dir",
            &file("tls-data"),
            "--listen-client-urls",
            &https,
            "--advertise-client-urls",
            &https,
            "--listen-peer-urls",
            &format!("http://127.0.0.1:{peer}"),
            "--initial-advertise-peer-urls",
            &format!("http://127.0.0.1:{peer}"),
            "--initial-cluster",
            &format!("tls=http://127.0.0.1:{peer}"),
            "--cert-file",
            &file("server.pem"),
            "--key-file",
            &file("server.key"),
            "--trusted-ca-file",
            &file("ca.pem"),
            "--client-cert-auth",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect(),
        bin: bin.clone(),
        log: d.join("tls-etcd.log"),
    };
    etcd.launch();

    // What an operator can get wrong is refused before anything starts, naming the flag.
    let base = ["--node-name", "x", "--etcd"];
    let e = refused(d, &[&base[..], &[&https]].concat());
    assert!(e.contains("--etcd-ca") && e.contains("https"), "{e}");
    let e = refused(
        d,
        &[
            &base[..],
            &[
                &format!("http://127.0.0.1:{client}"),
                "--etcd-ca",
                &file("ca.pem"),
            ],
        ]
        .concat(),
    );
    assert!(e.contains("--etcd-ca") && e.contains("http://"), "{e}");
    let e = refused(
        d,
        &[&base[..], &[&https, "--etcd-ca", &file("ca.key.missing")]].concat(),
    );
    assert!(
        e.contains("--etcd-ca") && e.contains("ca.key.missing"),
        "{e}"
    );
    let e = refused(
        d,
        &[&base[..], &[&https, "--etcd-ca", &file("server.ext")]].concat(),
    );
    assert!(
        e.contains("--etcd-ca") && e.contains("not a PEM file"),
        "{e}"
    );

    // The right certificates: the node joins and runs its agents.
    let n = Daemon::start_with(&cluster_args(&[
        "--etcd",
        &https,
        "--node-name",
        "t",
        "--lease-ttl",
        &TTL.to_string(),
        "--cgroup",
        "off",
        "--etcd-ca",
        &file("ca.pem"),
        "--etcd-cert",
        &file("client.pem"),
        "--etcd-key",
        &file("client.key"),
    ]));
    create_stub_fleet_once_joined(&n, "s", 2);
    wait_spread(&n, 2, &["t"], Duration::from_secs(30), "2 agents over TLS");
    // Without its client certificate etcd turns the node away: its commands say so.
    let mut no_cert = Command::new(common::FLEETD)
        .arg("--state-dir")
        .arg(d.join("no-cert-state"))
        .arg("--socket")
        .arg(d.join("no-cert.sock"))
        .args([
            "--no-repl",
            "--cgroup",
            "off",
            "--port-range",
            &common::next_port_range(),
        ])
        .args(cluster_args(&[
            "--etcd",
            &https,
            "--node-name",
            "u",
            "--etcd-ca",
            &file("ca.pem"),
        ]))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_until(
        Duration::from_secs(20),
        "a node without a client certificate refused by etcd",
        |seen| {
            let out = Command::new(common::FLEETCTL)
                .arg("--socket")
                .arg(d.join("no-cert.sock"))
                .arg("status")
                .output()
                .ok()?;
            *seen = String::from_utf8_lossy(&out.stderr).to_string();
            (!out.status.success() && seen.contains("cluster: etcd")).then_some(())
        },
    );
    unsafe { libc::kill(no_cert.id() as i32, libc::SIGTERM) };
    wait_until(Duration::from_secs(20), "the refused node stopping", |_| {
        no_cert.try_wait().ok().flatten()
    });
    drop(n);
}
