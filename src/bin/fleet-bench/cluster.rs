//! The cluster benchmark (`--cluster NODESxAGENTS`): a real etcd and real fleetd nodes on
//! loopback, each with its own port range and state directory, running tiny HTTP stand-ins.
//! It measures what the multi-host mode costs and how fast it heals:
//! - placement: `fleet create` of NODES×AGENTS through one node → all running and healthy;
//! - etcd writes per agent start, counted by a watch on the cluster's prefix (every put and
//!   delete, by key class, with their bytes), and the background rate of a quiet cluster;
//! - node death: SIGKILL one node's fleetd → every agent it ran is running and healthy
//!   elsewhere (`--cluster-runs` times, a different node each time, relaunched after);
//! - the simulation (`--sim-nodes`): many fleetd nodes against one etcd, a few agents each,
//!   with etcd's, the leader's and the other nodes' CPU and the bytes the nodes read.

use crate::bench::fleetd::Fleetd;
use crate::bench::probe::{percentiles, Pctl};
use crate::bench::report::Machine;
use anyhow::{bail, Context, Result};
use fleet_commander::process::procfs;
use fleet_commander::state::AgentState;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const FLEET: &str = "bench";
const PREFIX: &str = "/fleet-commander/";
const ETCD_CLIENT: u16 = 52579;
const ETCD_PEER: u16 = 52580;

pub struct ClusterArgs<'a> {
    pub fleetd: &'a Path,
    pub dir: &'a Path,
    pub child: &'a [String],
    pub nodes: usize,
    pub agents_per_node: usize,
    pub runs: usize,
    pub ttl: u64,
    pub sim_nodes: &'a [usize],
    pub sim_agents_per_node: usize,
    pub ports: (u16, u16),
}

/// Puts and deletes seen by the watch, by key class (`d/fleets`, `d/assign`, `o`, …).
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Writes {
    pub count: BTreeMap<String, u64>,
    pub bytes: BTreeMap<String, u64>,
}

impl Writes {
    fn minus(&self, before: &Writes) -> Writes {
        let sub = |a: &BTreeMap<String, u64>, b: &BTreeMap<String, u64>| {
            a.iter()
                .map(|(k, v)| (k.clone(), v - b.get(k).copied().unwrap_or(0)))
                .filter(|(_, v)| *v > 0)
                .collect()
        };
        Writes {
            count: sub(&self.count, &before.count),
            bytes: sub(&self.bytes, &before.bytes),
        }
    }
    fn total(&self) -> u64 {
        self.count.values().sum()
    }
}

#[derive(Debug, Serialize)]
pub struct Failover {
    pub killed: String,
    pub agents_moved: usize,
    /// SIGKILL → the last of them running and healthy on a survivor, through `status`.
    pub seconds: f64,
}

#[derive(Debug, Serialize)]
pub struct Sim {
    pub nodes: usize,
    pub agents: usize,
    pub placed_s: f64,
    /// Over a quiet window after placement, % of one core.
    pub etcd_cpu_pct: f64,
    pub leader_cpu_pct: f64,
    pub follower_cpu_pct_mean: f64,
    pub writes_per_s: f64,
    /// Size of the desired state a node's full read returns (keys + values under `d/`).
    pub desired_state_bytes: u64,
    /// What etcd sent its clients, and its range (read) calls, per second over the window
    /// (its own metrics: `etcd_network_client_grpc_sent_bytes_total`, `grpc_server_handled_total`).
    pub sent_bytes_per_s: f64,
    pub reads_per_s: f64,
    pub etcd_rss_mib: f64,
}

#[derive(Debug, Serialize)]
pub struct ClusterReport {
    pub date: String,
    pub machine: Machine,
    pub command: String,
    pub etcd: String,
    pub lease_ttl_s: u64,
    pub nodes: usize,
    pub agents: usize,
    pub placed_s: f64,
    pub spread: BTreeMap<String, usize>,
    /// Writes per agent of a burst of `agent add`s, by key class.
    pub writes_per_agent_start: BTreeMap<String, f64>,
    pub agents_added: usize,
    /// Background writes of the quiet cluster (observed state, nothing else), per second.
    pub quiet_writes_per_s: BTreeMap<String, f64>,
    pub failovers: Vec<Failover>,
    pub failover_s: Option<Pctl>,
    pub sims: Vec<Sim>,
}

pub fn run(a: &ClusterArgs, now: String, command: String) -> Result<ClusterReport> {
    let bin = etcd_bin()?;
    let version = Command::new(&bin)
        .arg("--version")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .to_string()
        })
        .unwrap_or_default();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let mut report = ClusterReport {
        date: now,
        machine: Machine::read(),
        command,
        etcd: version,
        lease_ttl_s: a.ttl,
        nodes: a.nodes,
        agents: a.nodes * a.agents_per_node,
        placed_s: 0.0,
        spread: BTreeMap::new(),
        writes_per_agent_start: BTreeMap::new(),
        agents_added: 0,
        quiet_writes_per_s: BTreeMap::new(),
        failovers: Vec::new(),
        failover_s: None,
        sims: Vec::new(),
    };
    if a.nodes > 0 {
        let etcd = Etcd::start(&bin, &a.dir.join("etcd-main"))?;
        let watch = Watch::start(&rt, PREFIX)?;
        main_cluster(a, &mut report, &watch)?;
        drop(etcd);
    }
    for &n in a.sim_nodes {
        let etcd = Etcd::start(&bin, &a.dir.join(format!("etcd-sim-{n}")))?;
        let watch = Watch::start(&rt, PREFIX)?;
        report.sims.push(simulate(a, n, &rt, &watch, &etcd)?);
        drop(etcd);
    }
    Ok(report)
}

fn say(msg: impl AsRef<str>) {
    eprintln!("fleet-bench --cluster: {}", msg.as_ref());
}

/// `$FLEET_ETCD_BIN`, `etcd` on PATH, or where scripts/install-etcd.sh unpacks it.
fn etcd_bin() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("FLEET_ETCD_BIN") {
        return Ok(PathBuf::from(p));
    }
    for dir in std::env::var("PATH").unwrap_or_default().split(':') {
        let p = Path::new(dir).join("etcd");
        if p.is_file() {
            return Ok(p);
        }
    }
    let p = PathBuf::from("/opt/fleet-commander/etcd/usr/bin/etcd");
    if p.is_file() {
        return Ok(p);
    }
    bail!("no etcd: run scripts/install-etcd.sh (or set FLEET_ETCD_BIN)")
}

/// One etcd member on loopback, killed with its data when dropped.
struct Etcd {
    child: Child,
}

impl Etcd {
    fn start(bin: &Path, dir: &Path) -> Result<Etcd> {
        std::fs::create_dir_all(dir)?;
        let log = std::fs::File::create(dir.join("etcd.log"))?;
        let client = format!("http://127.0.0.1:{ETCD_CLIENT}");
        let peer = format!("http://127.0.0.1:{ETCD_PEER}");
        let child = Command::new(bin)
            .args(["--name", "bench", "--data-dir"])
            .arg(dir.join("data"))
            .args([
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
            ])
            .args([
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
            ])
            .args(["--initial-cluster", &format!("bench={peer}")])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let e = Etcd { child };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", ETCD_CLIENT)).is_err() {
            if Instant::now() > deadline {
                bail!(
                    "etcd did not listen on {client} within 20 s; see {}",
                    dir.display()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(e)
    }
    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Counts every put and delete under the prefix, from a watch on a tokio task.
struct Watch {
    seen: Arc<Mutex<Writes>>,
    client: etcd_client::Client,
}

impl Watch {
    fn start(rt: &tokio::runtime::Runtime, prefix: &'static str) -> Result<Watch> {
        let seen = Arc::new(Mutex::new(Writes::default()));
        let client = rt.block_on(etcd_client::Client::connect(
            [format!("http://127.0.0.1:{ETCD_CLIENT}")],
            None,
        ))?;
        let mut c = client.clone();
        let mut stream =
            rt.block_on(c.watch(prefix, Some(etcd_client::WatchOptions::new().with_prefix())))?;
        let s = seen.clone();
        rt.spawn(async move {
            while let Ok(Some(resp)) = stream.message().await {
                let mut w = s.lock().unwrap();
                for e in resp.events() {
                    let Some(kv) = e.kv() else { continue };
                    let key = String::from_utf8_lossy(kv.key());
                    let class = class_of(key.strip_prefix(prefix).unwrap_or(&key));
                    *w.count.entry(class.clone()).or_default() += 1;
                    *w.bytes.entry(class).or_default() +=
                        (kv.key().len() + kv.value().len()) as u64;
                }
            }
        });
        Ok(Watch { seen, client })
    }
    fn now(&self) -> Writes {
        self.seen.lock().unwrap().clone()
    }
    /// The bytes under `d/` and the leader's name.
    fn desired(&self, rt: &tokio::runtime::Runtime) -> Result<(u64, Option<String>)> {
        let mut c = self.client.clone();
        let r = rt.block_on(c.get(
            format!("{PREFIX}d/"),
            Some(etcd_client::GetOptions::new().with_prefix()),
        ))?;
        let bytes = r
            .kvs()
            .iter()
            .map(|kv| (kv.key().len() + kv.value().len()) as u64)
            .sum();
        let leader = r
            .kvs()
            .iter()
            .find(|kv| kv.key() == format!("{PREFIX}d/leader").as_bytes())
            .map(|kv| String::from_utf8_lossy(kv.value()).to_string());
        Ok((bytes, leader))
    }
}

/// `d/fleets`, `d/claims`, … or `o` (observed state).
fn class_of(rest: &str) -> String {
    let mut parts = rest.split('/');
    match (parts.next(), parts.next()) {
        (Some("d"), Some(k)) => format!("d/{k}"),
        (Some(k), _) => k.to_string(),
        _ => rest.to_string(),
    }
}

struct Node {
    name: String,
    dir: PathBuf,
    range: String,
    /// Its own `--agent-uids`: nodes sharing a host must not lease the same uids.
    uids: String,
    max_agents: usize,
    d: Option<Fleetd>,
}

impl Node {
    fn launch(&mut self, a: &ClusterArgs) -> Result<()> {
        let mut extra: Vec<String> = [
            "--etcd",
            &format!("http://127.0.0.1:{ETCD_CLIENT}"),
            "--node-name",
            &self.name,
            "--lease-ttl",
            &a.ttl.to_string(),
            "--max-agents",
            &self.max_agents.to_string(),
            "--agent-uids",
            &self.uids,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        // Off root the PID-namespace guardian cannot run; the bench measures placement and
        // fail-over, which do not depend on it.
        if unsafe { libc::geteuid() } != 0 {
            extra.push("--unfenced".into());
        }
        self.d = Some(
            Fleetd::start_with(
                a.fleetd,
                &self.dir,
                &self.range,
                Some(a.child.to_vec()),
                None,
                &extra,
            )
            .with_context(|| format!("node {}", self.name))?,
        );
        Ok(())
    }
    fn fleetd(&self) -> &Fleetd {
        self.d.as_ref().expect("launched")
    }
    fn shutdown(&mut self) {
        if let Some(mut d) = self.d.take() {
            let _ = crate::bench::Subject::shutdown(&mut d);
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// `n` nodes, each with its own slice of the port range and room for `room` agents.
fn nodes(a: &ClusterArgs, tag: &str, n: usize, room: usize) -> Result<Vec<Node>> {
    let (first, last) = a.ports;
    let width = (last - first + 1) as usize / n;
    if room > 2000 {
        bail!("{room} agents per node: at most 2000 (each node's uid range)");
    }
    if width < room {
        bail!(
            "--port-range {first}-{last}: {n} nodes get {width} ports each, fewer than the {room} agents each may hold"
        );
    }
    let mut v = Vec::new();
    for i in 0..n {
        let lo = first as usize + i * width;
        let mut node = Node {
            name: format!("{tag}{}", i + 1),
            dir: a
                .dir
                .join(format!("{tag}-{n}"))
                .join(format!("{tag}{}", i + 1)),
            range: format!("{lo}-{}", lo + width - 1),
            uids: format!("{}-{}", 1_900_000 + i * 2000, 1_901_999 + i * 2000),
            max_agents: room,
            d: None,
        };
        node.launch(a)?;
        v.push(node);
    }
    Ok(v)
}

/// Agent → node of every agent running and healthy, through one node's `status`.
fn running(d: &Fleetd) -> BTreeMap<String, String> {
    d.status(FLEET)
        .unwrap_or_default()
        .into_iter()
        .filter(|s| s.state == AgentState::Running && s.healthy)
        .filter_map(|s| Some((s.agent, s.node?)))
        .collect()
}

/// Polls every 100 ms until `ok` holds of the running set, at most `limit`.
fn wait_for(
    d: &Fleetd,
    limit: Duration,
    what: &str,
    ok: impl Fn(&BTreeMap<String, String>) -> bool,
) -> Result<(Duration, BTreeMap<String, String>)> {
    let t = Instant::now();
    loop {
        let r = running(d);
        if ok(&r) {
            return Ok((t.elapsed(), r));
        }
        if t.elapsed() > limit {
            bail!("{what}: not within {limit:?} ({} running)", r.len());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn main_cluster(a: &ClusterArgs, r: &mut ClusterReport, watch: &Watch) -> Result<()> {
    let total = a.nodes * a.agents_per_node;
    // The burst of adds below.
    let k = 30usize;
    // Room for one survivor to take every agent (2 nodes: the other's whole share).
    let room = total + k;
    say(format!(
        "{} nodes, {total} stand-ins, lease TTL {} s",
        a.nodes, a.ttl
    ));
    let mut ns = nodes(a, "n", a.nodes, room)?;
    let t = Instant::now();
    ns[0].fleetd().create(total)?;
    let (_, placed) = wait_for(
        ns[0].fleetd(),
        Duration::from_secs(120) + Duration::from_millis(100) * total as u32,
        "placement",
        |m| m.len() == total,
    )?;
    r.placed_s = t.elapsed().as_secs_f64();
    for n in placed.values() {
        *r.spread.entry(n.clone()).or_default() += 1;
    }
    say(format!("placed in {:.1} s: {:?}", r.placed_s, r.spread));

    // Quiet: what a cluster that changes nothing writes.
    let before = watch.now();
    let quiet = Duration::from_secs(20);
    std::thread::sleep(quiet);
    let q = watch.now().minus(&before);
    r.quiet_writes_per_s = q
        .count
        .iter()
        .map(|(k, v)| (k.clone(), *v as f64 / quiet.as_secs_f64()))
        .collect();

    // A burst of adds: writes per agent start, by class.
    let before = watch.now();
    let t = Instant::now();
    for i in 1..=k {
        let name = format!("added-{i}");
        if let fleet_commander::messages::command::Reply::Error(e) = ns[1 % ns.len()]
            .fleetd()
            .request(&["agent", "add", FLEET, &name])?
        {
            bail!("agent add {name}: {e}");
        }
    }
    wait_for(
        ns[0].fleetd(),
        Duration::from_secs(60),
        "added agents",
        |m| m.len() == total + k,
    )?;
    let w = watch.now().minus(&before);
    let secs = t.elapsed().as_secs_f64();
    r.agents_added = k;
    for (class, n) in &w.count {
        let background = r.quiet_writes_per_s.get(class).copied().unwrap_or(0.0) * secs;
        r.writes_per_agent_start.insert(
            class.clone(),
            ((*n as f64 - background) / k as f64).max(0.0),
        );
    }
    say(format!(
        "{k} adds: {} writes in {secs:.1} s ({:?}); per agent {:?}",
        w.total(),
        w.count,
        r.writes_per_agent_start
    ));
    let total = total + k;

    // Node death, a different node each run.
    for run in 0..a.runs {
        let victim = run % ns.len();
        let watcher = (victim + 1) % ns.len();
        let now = running(ns[watcher].fleetd());
        let name = ns[victim].name.clone();
        let on_victim: Vec<String> = now
            .iter()
            .filter(|(_, n)| **n == name)
            .map(|(a, _)| a.clone())
            .collect();
        let t = Instant::now();
        ns[victim].d.as_mut().expect("launched").kill9();
        let (_, _) = wait_for(
            ns[watcher].fleetd(),
            Duration::from_secs(120),
            &format!("{name}'s agents elsewhere"),
            |m| {
                m.len() == total
                    && on_victim
                        .iter()
                        .all(|a| m.get(a).is_some_and(|n| *n != name))
            },
        )?;
        let f = Failover {
            killed: name.clone(),
            agents_moved: on_victim.len(),
            seconds: t.elapsed().as_secs_f64(),
        };
        say(format!(
            "run {}: SIGKILL {name} → its {} agents running elsewhere in {:.2} s",
            run + 1,
            f.agents_moved,
            f.seconds
        ));
        r.failovers.push(f);
        // Back, as an operator's systemd would bring it (empty: agents do not move back).
        ns[victim].d = None;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match ns[victim].launch(a) {
                Ok(()) => break,
                Err(e) if Instant::now() < deadline => {
                    say(format!("relaunching {name}: {e:#}; again"));
                    std::thread::sleep(Duration::from_secs(1));
                }
                Err(e) => return Err(e),
            }
        }
    }
    let secs: Vec<f64> = r.failovers.iter().map(|f| f.seconds).collect();
    r.failover_s = percentiles(&secs);
    for n in ns.iter_mut() {
        n.shutdown();
    }
    Ok(())
}

/// CPU ticks (user + system) of `pid` now.
fn ticks(pid: u32) -> u64 {
    procfs::read_proc(pid)
        .map(|p| p.utime + p.stime)
        .unwrap_or(0)
}

fn simulate(
    a: &ClusterArgs,
    n: usize,
    rt: &tokio::runtime::Runtime,
    watch: &Watch,
    etcd: &Etcd,
) -> Result<Sim> {
    let agents = n * a.sim_agents_per_node;
    say(format!("simulation: {n} nodes, {agents} stand-ins"));
    let mut ns = nodes(a, "s", n, a.sim_agents_per_node * 2)?;
    let t = Instant::now();
    ns[0].fleetd().create(agents)?;
    wait_for(
        ns[0].fleetd(),
        Duration::from_secs(300),
        "simulated placement",
        |m| m.len() == agents,
    )?;
    let placed_s = t.elapsed().as_secs_f64();
    let (bytes, leader) = watch.desired(rt)?;
    let pids: Vec<(String, u32)> = ns
        .iter()
        .map(|x| (x.name.clone(), x.fleetd().pid()))
        .collect();
    let before: Vec<u64> = pids.iter().map(|(_, p)| ticks(*p)).collect();
    let etcd_before = ticks(etcd.pid());
    let m0 = etcd_metrics()?;
    let w0 = watch.now();
    let window = Duration::from_secs(20);
    std::thread::sleep(window);
    let hz = procfs::clock_ticks_per_sec() as f64;
    let pct = |d: u64| d as f64 / hz / window.as_secs_f64() * 100.0;
    let writes = watch.now().minus(&w0).total();
    let m1 = etcd_metrics()?;
    let mut leader_pct = 0.0;
    let mut others = Vec::new();
    for ((name, pid), b) in pids.iter().zip(&before) {
        let p = pct(ticks(*pid).saturating_sub(*b));
        if Some(name) == leader.as_ref() {
            leader_pct = p;
        } else {
            others.push(p);
        }
    }
    let s = Sim {
        nodes: n,
        agents,
        placed_s,
        etcd_cpu_pct: pct(ticks(etcd.pid()).saturating_sub(etcd_before)),
        leader_cpu_pct: leader_pct,
        follower_cpu_pct_mean: others.iter().sum::<f64>() / others.len().max(1) as f64,
        writes_per_s: writes as f64 / window.as_secs_f64(),
        desired_state_bytes: bytes,
        sent_bytes_per_s: (m1.0 - m0.0) / window.as_secs_f64(),
        reads_per_s: (m1.1 - m0.1) / window.as_secs_f64(),
        etcd_rss_mib: procfs::rss_bytes(etcd.pid()).unwrap_or(0) as f64 / 1048576.0,
    };
    say(format!("{s:?}"));
    for x in ns.iter_mut() {
        x.shutdown();
    }
    Ok(s)
}

/// etcd's counters of bytes sent to clients and of range calls, from its `/metrics`.
fn etcd_metrics() -> Result<(f64, f64)> {
    use std::io::{Read, Write};
    let mut c = std::net::TcpStream::connect(("127.0.0.1", ETCD_CLIENT))?;
    c.set_read_timeout(Some(Duration::from_secs(5)))?;
    c.write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
    let mut text = String::new();
    c.read_to_string(&mut text)?;
    let mut sent = 0.0;
    let mut reads = 0.0;
    for l in text.lines() {
        let Some((name, v)) = l.rsplit_once(' ') else {
            continue;
        };
        let v: f64 = v.parse().unwrap_or(0.0);
        if name == "etcd_network_client_grpc_sent_bytes_total" {
            sent += v;
        } else if name.starts_with("grpc_server_handled_total{")
            && name.contains("grpc_method=\"Range\"")
        {
            reads += v;
        }
    }
    Ok((sent, reads))
}

pub fn render(r: &ClusterReport) -> String {
    let mut o = String::new();
    use std::fmt::Write as _;
    let _ = writeln!(
        o,
        "cluster bench, {} ({} cores, {} MiB, Linux {}), {}; {}",
        r.machine.cpu, r.machine.cores, r.machine.mem_total_mib, r.machine.kernel, r.date, r.etcd
    );
    let _ = writeln!(o, "command: {}", r.command);
    if r.nodes > 0 {
        let _ = writeln!(
            o,
            "{} nodes, {} stand-ins, lease TTL {} s: placed in {:.1} s {:?}",
            r.nodes, r.agents, r.lease_ttl_s, r.placed_s, r.spread
        );
        let _ = writeln!(
            o,
            "etcd writes per agent start ({} agent adds): {:?}",
            r.agents_added, r.writes_per_agent_start
        );
        let _ = writeln!(o, "quiet cluster writes/s: {:?}", r.quiet_writes_per_s);
        for f in &r.failovers {
            let _ = writeln!(
                o,
                "SIGKILL {}: {} agents running elsewhere in {:.2} s",
                f.killed, f.agents_moved, f.seconds
            );
        }
        if let Some(p) = &r.failover_s {
            let _ = writeln!(
                o,
                "node death → all its agents elsewhere: p50 {:.2} s, max {:.2} s over {} runs",
                p.p50, p.max, p.n
            );
        }
    }
    for s in &r.sims {
        let _ = writeln!(
            o,
            "simulation {} nodes / {} agents: placed {:.1} s; etcd {:.1} % CPU ({:.0} MiB), leader {:.1} %, other nodes {:.2} % each; {:.1} writes/s; desired state {} B; etcd served {:.1} reads/s, {:.2} MB/s",
            s.nodes,
            s.agents,
            s.placed_s,
            s.etcd_cpu_pct,
            s.etcd_rss_mib,
            s.leader_cpu_pct,
            s.follower_cpu_pct_mean,
            s.writes_per_s,
            s.desired_state_bytes,
            s.reads_per_s,
            s.sent_bytes_per_s / 1e6
        );
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_fall_in_their_class() {
        for (k, c) in [
            ("d/fleets/bench", "d/fleets"),
            ("d/claims/bench/agent-1", "d/claims"),
            ("d/leader", "d/leader"),
            ("o/n1", "o"),
        ] {
            assert_eq!(class_of(k), c, "{k}");
        }
    }
}
