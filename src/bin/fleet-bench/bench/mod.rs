//! The side-by-side supervisor benchmark behind `fleet-bench`: one measurement procedure
//! (`measure`) run against any `Subject` (fleetd, supervisord, PM2), so every supervisor is
//! timed by the same code from the outside (HTTP probes and /proc), plus the few figures only
//! fleetd can give (its own view of health, `status` latency). Drivers live in `fleetd.rs`
//! and `peers.rs`, the table and JSON in `report.rs`.

pub mod fleetd;
pub mod peers;
pub mod probe;
pub mod report;

use anyhow::Result;
use probe::Pctl;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::time::{Duration, Instant};

/// A supervisor under test, already running with no children.
pub trait Subject {
    fn name(&self) -> String;
    /// The processes that make up the supervisor itself (memory and CPU are summed over them).
    fn supervisor_pids(&self) -> Vec<u32>;
    /// Adds one child per port (a supervisor that allocates ports itself may ignore them).
    fn add(&mut self, ports: &[u16]) -> Result<()>;
    /// The ports its `n` children listen on, once it knows them all.
    fn ports(&mut self, n: usize, given: &[u16]) -> Result<Option<Vec<u16>>>;
    /// Its own view: have all `n` children passed a health check? None: no such view.
    fn view_all_healthy(&mut self, _n: usize) -> Result<Option<bool>> {
        Ok(None)
    }
    /// Its own view of the child on `port`: (pid, healthy). None: no such view.
    fn child_view(&mut self, _port: u16) -> Result<Option<(Option<u32>, bool)>> {
        Ok(None)
    }
    /// One full `status` round trip through its control interface. None: not measured.
    fn status_round_trip(&mut self) -> Result<Option<Duration>> {
        Ok(None)
    }
    /// Stops every child (the supervisor keeps running).
    fn stop_all(&mut self) -> Result<()>;
    /// Ends the supervisor and anything of it still running, by pid.
    fn shutdown(&mut self) -> Result<()>;
}

/// Knobs of one measurement.
#[derive(Debug, Clone)]
pub struct Plan {
    /// argv[0] of the child program, to find its processes in /proc.
    pub program: String,
    pub idle: Duration,
    pub kills: usize,
    pub status_samples: usize,
    pub add_deadline: Duration,
    pub restart_deadline: Duration,
    pub stop_deadline: Duration,
    /// fleetd's fleet probes nothing (`fleet create --no-probes`): like for like with the
    /// peers, none of which probes health.
    pub no_probes: bool,
}

/// Every figure of one supervisor at one N. `None` means not measured (or not applicable),
/// and the reason is in `notes`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Figures {
    pub subject: String,
    pub n: usize,
    /// add N → every port answers /healthz (probed by the bench), seconds.
    pub add_ports_s: Option<f64>,
    /// add N → every child healthy in the supervisor's own view, seconds.
    pub add_view_s: Option<f64>,
    /// add N → both of the above, seconds.
    pub add_all_s: Option<f64>,
    /// Ports that never answered within the deadline.
    pub add_missing: usize,
    pub supervisor_rss_0_kib: f64,
    pub supervisor_rss_n_kib: f64,
    pub supervisor_pss_0_kib: f64,
    pub supervisor_pss_n_kib: f64,
    /// (memory at N − memory at 0) / N.
    pub rss_per_child_kib: Option<f64>,
    pub pss_per_child_kib: Option<f64>,
    /// Open fds of the main supervisor process at 0 and at N.
    pub fds_0: Option<usize>,
    pub fds_n: Option<usize>,
    pub threads_n: Option<usize>,
    /// PSS of one child (mean over up to 10), for the memory limit of the largest N.
    pub child_pss_kib: Option<f64>,
    pub idle_window_s: f64,
    pub idle_cpu_pct: Option<f64>,
    /// SIGKILL a child → a new pid in the supervisor's view, ms.
    pub kill_new_pid_ms: Option<Pctl>,
    /// SIGKILL a child → healthy again in the supervisor's view, ms.
    pub kill_healthy_ms: Option<Pctl>,
    /// SIGKILL a child → its port answers /healthz again, ms.
    pub kill_port_ms: Option<Pctl>,
    pub kills_failed: usize,
    /// `status --json` round trip at N, ms.
    pub status_ms: Option<Pctl>,
    /// stop all → no child left, seconds.
    pub stop_s: Option<f64>,
    pub stop_left: usize,
    pub notes: Vec<String>,
}

fn kib(b: u64) -> f64 {
    b as f64 / 1024.0
}

/// Runs the whole procedure on a supervisor that is up with no children; leaves it up with
/// its children stopped. `ports`: what the bench offers each child (peers use them as given).
pub fn measure(subject: &mut dyn Subject, n: usize, ports: &[u16], plan: &Plan) -> Figures {
    let mut f = Figures {
        subject: subject.name(),
        n,
        idle_window_s: plan.idle.as_secs_f64(),
        ..Figures::default()
    };
    if let Err(e) = measure_into(subject, n, ports, plan, &mut f) {
        f.notes.push(format!("aborted: {e:#}"));
    }
    f
}

fn measure_into(
    subject: &mut dyn Subject,
    n: usize,
    given: &[u16],
    plan: &Plan,
    f: &mut Figures,
) -> Result<()> {
    let main_pid = subject.supervisor_pids().first().copied();
    let m0 = probe::mem_sum(&subject.supervisor_pids());
    f.supervisor_rss_0_kib = kib(m0.rss);
    f.supervisor_pss_0_kib = kib(m0.pss);
    f.fds_0 = main_pid.and_then(probe::fd_count);

    // add N → all running
    let t0 = Instant::now();
    subject.add(given)?;
    let deadline = t0 + plan.add_deadline;
    let mut ports: Option<Vec<u16>> = None;
    let mut pending: Vec<u16> = Vec::new();
    let mut ports_done: Option<Duration> = None;
    let mut view_done: Option<Option<Duration>> = None;
    loop {
        if ports.is_none() {
            if let Some(p) = subject.ports(n, given)? {
                pending = p.clone();
                ports = Some(p);
            }
        }
        if ports.is_some() && ports_done.is_none() {
            pending.retain(|&p| !probe::healthz(p, Duration::from_millis(200)));
            if pending.is_empty() {
                ports_done = Some(t0.elapsed());
            }
        }
        if view_done.is_none() {
            match subject.view_all_healthy(n)? {
                None => view_done = Some(None),
                Some(true) => view_done = Some(Some(t0.elapsed())),
                Some(false) => {}
            }
        }
        if ports_done.is_some() && view_done.is_some() {
            break;
        }
        if Instant::now() >= deadline {
            f.add_missing = if ports.is_some() { pending.len() } else { n };
            f.notes.push(format!(
                "add: after {:?}, {} ports not answering{}",
                plan.add_deadline,
                f.add_missing,
                if view_done.is_none() {
                    "; supervisor's view not all healthy"
                } else {
                    ""
                }
            ));
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    f.add_ports_s = ports_done.map(|d| d.as_secs_f64());
    f.add_view_s = view_done.flatten().map(|d| d.as_secs_f64());
    f.add_all_s = match (ports_done, view_done) {
        (Some(p), Some(Some(v))) => Some(p.max(v).as_secs_f64()),
        (Some(p), Some(None)) => Some(p.as_secs_f64()),
        _ => None,
    };
    let ports = ports.unwrap_or_default();
    let port_set: HashSet<u16> = ports.iter().copied().collect();

    // idle CPU with N children: let start-up work (first probes, logs) settle first.
    std::thread::sleep(Duration::from_secs(1));
    let pids = subject.supervisor_pids();
    let ticks = |pids: &[u32]| {
        pids.iter()
            .filter_map(|&p| probe::cpu_ticks(p))
            .sum::<u64>()
    };
    let (c0, w0) = (ticks(&pids), Instant::now());
    std::thread::sleep(plan.idle);
    let (c1, w1) = (ticks(&pids), w0.elapsed());
    f.idle_cpu_pct = Some(
        (c1.saturating_sub(c0)) as f64 / probe::clock_ticks_per_sec() as f64 / w1.as_secs_f64()
            * 100.0,
    );

    // memory with N children, steady state
    let mn = probe::mem_sum(&subject.supervisor_pids());
    f.supervisor_rss_n_kib = kib(mn.rss);
    f.supervisor_pss_n_kib = kib(mn.pss);
    if n > 0 {
        f.rss_per_child_kib = Some((mn.rss as f64 - m0.rss as f64) / 1024.0 / n as f64);
        f.pss_per_child_kib = Some((mn.pss as f64 - m0.pss as f64) / 1024.0 / n as f64);
    }
    f.fds_n = main_pid.and_then(probe::fd_count);
    f.threads_n = main_pid.and_then(probe::thread_count);
    let some: Vec<u32> = probe::workload(&plan.program, &port_set)
        .into_values()
        .take(10)
        .collect();
    if !some.is_empty() {
        f.child_pss_kib = Some(kib(probe::mem_sum(&some).pss) / some.len() as f64);
    }

    // status latency at N
    let mut st = Vec::new();
    for _ in 0..plan.status_samples {
        match subject.status_round_trip()? {
            Some(d) => st.push(d.as_secs_f64() * 1000.0),
            None => break,
        }
    }
    f.status_ms = probe::percentiles(&st);

    // SIGKILL children one by one
    kill_children(subject, &ports, &port_set, plan, f)?;

    // stop all → no child left
    let t = Instant::now();
    subject.stop_all()?;
    let deadline = t + plan.stop_deadline;
    loop {
        let left = probe::workload(&plan.program, &port_set).len();
        if left == 0 {
            f.stop_s = Some(t.elapsed().as_secs_f64());
            break;
        }
        if Instant::now() >= deadline {
            f.stop_left = left;
            f.notes.push(format!(
                "stop: {left} children still running after {:?}",
                plan.stop_deadline
            ));
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

fn kill_children(
    subject: &mut dyn Subject,
    ports: &[u16],
    port_set: &HashSet<u16>,
    plan: &Plan,
    f: &mut Figures,
) -> Result<()> {
    if plan.kills == 0 || ports.is_empty() {
        return Ok(());
    }
    let live = probe::workload(&plan.program, port_set);
    let mut victims: Vec<u16> = ports
        .iter()
        .copied()
        .filter(|p| live.contains_key(p))
        .collect();
    victims.shuffle(&mut rand::thread_rng());
    victims.truncate(plan.kills);
    let (mut new_pid, mut healthy, mut port_ok) = (Vec::new(), Vec::new(), Vec::new());
    for port in victims {
        let old = live[&port];
        let t = Instant::now();
        if nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(old as i32),
            nix::sys::signal::SIGKILL,
        )
        .is_err()
        {
            f.kills_failed += 1;
            continue;
        }
        // Until the old process is dead its listening socket may still accept.
        while probe::alive(old) && t.elapsed() < Duration::from_secs(2) {
            std::hint::spin_loop();
        }
        let deadline = t + plan.restart_deadline;
        let (mut got_pid, mut got_healthy, mut got_port) = (None, None, None);
        let mut has_view = true;
        loop {
            if got_port.is_none() && probe::healthz(port, Duration::from_millis(100)) {
                got_port = Some(t.elapsed());
            }
            if has_view && (got_pid.is_none() || got_healthy.is_none()) {
                match subject.child_view(port)? {
                    None => has_view = false,
                    Some((pid, ok)) => {
                        let fresh = pid.is_some_and(|p| p != old);
                        if fresh && got_pid.is_none() {
                            got_pid = Some(t.elapsed());
                        }
                        if fresh && ok && got_healthy.is_none() {
                            got_healthy = Some(t.elapsed());
                        }
                    }
                }
            }
            let view_done = !has_view || (got_pid.is_some() && got_healthy.is_some());
            if got_port.is_some() && view_done {
                break;
            }
            if Instant::now() >= deadline {
                f.kills_failed += 1;
                f.notes.push(format!(
                    "kill: port {port} (old pid {old}) not back within {:?} (port {}, new pid {}, healthy {})",
                    plan.restart_deadline,
                    got_port.is_some(),
                    got_pid.is_some(),
                    got_healthy.is_some()
                ));
                break;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        new_pid.extend(got_pid.map(ms));
        healthy.extend(got_healthy.map(ms));
        port_ok.extend(got_port.map(ms));
    }
    f.kill_new_pid_ms = probe::percentiles(&new_pid);
    f.kill_healthy_ms = probe::percentiles(&healthy);
    f.kill_port_ms = probe::percentiles(&port_ok);
    Ok(())
}

/// `n` loopback ports from `first..=last` that nothing listens on now.
pub fn free_ports(first: u16, last: u16, n: usize) -> Result<Vec<u16>> {
    let mut out = Vec::with_capacity(n);
    for p in first..=last {
        if out.len() == n {
            break;
        }
        if std::net::TcpListener::bind(("127.0.0.1", p)).is_ok() {
            out.push(p);
        }
    }
    if out.len() < n {
        anyhow::bail!(
            "port range {first}-{last}: only {} free ports, {n} needed",
            out.len()
        );
    }
    Ok(out)
}
