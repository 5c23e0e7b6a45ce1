//! fleet-bench: measures fleetd (the release build next to this binary) against peer
//! supervisors on the same workload, N children of one tiny HTTP server added to an
//! already-running supervisor with default settings, and prints them side by side (human
//! tables or `--json`). The procedure itself lives in `bench` (a module of this binary, not of the library).

mod bench;
mod cluster;
mod talk;

use crate::bench::fleetd::{Fleetd, FLEET};
use crate::bench::peers::{Pm2, Supervisord, S6};
use crate::bench::report::{self, MaxN, RealFigures, Report};
use crate::bench::{free_ports, measure, probe, Figures, Plan, Subject};
use anyhow::{bail, Context, Result};
use clap::Parser;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(Parser, Debug)]
#[command(
    name = "fleet-bench",
    about = "Benchmark fleetd against peer supervisors (supervisord, PM2) on N tiny HTTP children"
)]
struct Args {
    /// Fleet sizes to measure, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "100,1000")]
    n: Vec<usize>,
    /// Also measure fleetd at the largest N the host allows, at most this (0: skip).
    #[arg(long, default_value_t = 0)]
    max_n: usize,
    /// Idle CPU window, seconds.
    #[arg(long, default_value_t = 30.0)]
    idle_secs: f64,
    /// Children SIGKILLed one by one (restart latency samples).
    #[arg(long, default_value_t = 50)]
    kills: usize,
    /// `status --json` round trips timed at each N.
    #[arg(long, default_value_t = 200)]
    status_samples: usize,
    /// Peers to run beside fleetd: supervisord, pm2, s6.
    #[arg(long, value_delimiter = ',')]
    vs: Vec<String>,
    /// The child program and its arguments (default: bench/child/healthz.c, compiled here).
    /// It must serve GET /healthz on 127.0.0.1:$OPENCLAW_GATEWAY_PORT.
    #[arg(long)]
    command: Option<String>,
    /// The C source of the default child.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/bench/child/healthz.c"))]
    child_src: PathBuf,
    /// Ports for the children, FIRST-LAST (kept out of the ephemeral range by default).
    #[arg(long, default_value = "61500-65499")]
    port_range: String,
    /// The fleetd binary (default: next to this one).
    #[arg(long)]
    fleetd: Option<PathBuf>,
    /// Also measure K real OpenClaw agents per profile (default and lean): cold start to
    /// /readyz, warm restart to /readyz, RSS/PSS per agent.
    #[arg(long, default_value_t = 0)]
    real: usize,
    /// The conversation workload instead of the supervisor figures: `--real K` tenants on
    /// the loopback fake Bot API and model, each sent this many messages a minute.
    #[arg(long, default_value_t = 0.0)]
    talk: f64,
    /// How long the conversation workload runs, minutes.
    #[arg(long, default_value_t = 10.0)]
    minutes: f64,
    /// Profile of the talking tenants.
    #[arg(long, default_value = "lean")]
    talk_profile: String,
    /// NODE_OPTIONS for every talking tenant (e.g. "--max-old-space-size=384"), over the
    /// profile's.
    #[arg(long)]
    node_options: Option<String>,
    /// Node/V8 flags on the tenants' node command line (for those NODE_OPTIONS refuses, e.g.
    /// "--optimize-for-size --single-threaded-gc").
    #[arg(long, allow_hyphen_values = true)]
    node_flags: Option<String>,
    /// OpenClaw config (a JSON object) merged over the talking tenants' fleet template, to
    /// measure a config lever (e.g. '{"diagnostics":{"enabled":false}}').
    #[arg(long)]
    talk_config: Option<String>,
    /// Create fleetd's fleet with `--no-probes` (no /healthz probing, as the peers run).
    #[arg(long)]
    no_probes: bool,
    /// The cluster benchmark instead: NODESxAGENTS (e.g. 3x300) stand-ins on fleetd nodes
    /// against a real etcd on loopback (scripts/install-etcd.sh); "0x0" runs only the
    /// simulation.
    #[arg(long)]
    cluster: Option<String>,
    /// Node deaths measured (SIGKILL, a different node each time).
    #[arg(long, default_value_t = 5)]
    cluster_runs: usize,
    /// The nodes' lease TTL, seconds.
    #[arg(long, default_value_t = 10)]
    lease_ttl: u64,
    /// With --cluster: also simulate clusters of these many fleetd nodes (comma-separated).
    #[arg(long, value_delimiter = ',')]
    sim_nodes: Vec<usize>,
    /// Stand-ins per simulated node.
    #[arg(long, default_value_t = 4)]
    sim_agents: usize,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// Also write the JSON report to this file (the human tables still go to stdout).
    #[arg(long)]
    json_out: Option<PathBuf>,
    /// Keep the temporary directory (logs, configs) for inspection.
    #[arg(long)]
    keep: bool,
}

/// Share of the descriptor limit the largest-N estimate may plan for.
const FD_HEADROOM: f64 = 0.95;

fn main() {
    let args = Args::parse();
    let dir = std::env::temp_dir().join(format!(
        "fleet-bench-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    ));
    let r = run(&args, &dir);
    if args.keep {
        eprintln!("fleet-bench: kept {}", dir.display());
    } else {
        let _ = std::fs::remove_dir_all(&dir);
    }
    if let Err(e) = r {
        eprintln!("fleet-bench: {e:#}");
        std::process::exit(1);
    }
}

fn say(msg: impl AsRef<str>) {
    eprintln!("fleet-bench: {}", msg.as_ref());
}

fn run(args: &Args, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let fleetd_exe = match &args.fleetd {
        Some(p) => p.clone(),
        None => std::env::current_exe()
            .context("locating fleet-bench")?
            .with_file_name("fleetd"),
    };
    if !fleetd_exe.exists() {
        bail!(
            "no fleetd at {}: build it (cargo build --release --bin fleetd) or pass --fleetd",
            fleetd_exe.display()
        );
    }
    if args.talk > 0.0 {
        let r = talk::run(&talk::TalkArgs {
            fleetd: &fleetd_exe,
            dir: &dir.join("talk"),
            port_range: &args.port_range,
            agents: args.real.max(1),
            per_minute: args.talk,
            minutes: args.minutes,
            profile: &args.talk_profile,
            node_options: args.node_options.as_deref(),
            node_flags: args.node_flags.as_deref(),
            config: args.talk_config.as_deref(),
        })?;
        return emit(args, &r, talk::render);
    }
    if let Some(shape) = &args.cluster {
        let (nodes, per) = shape
            .split_once('x')
            .and_then(|(n, a)| Some((n.parse::<usize>().ok()?, a.parse::<usize>().ok()?)))
            .with_context(|| format!("--cluster {shape:?}: expected NODESxAGENTS, e.g. 3x300"))?;
        if nodes == 1 || (nodes == 0) != (per == 0) {
            bail!("--cluster {shape:?}: at least 2 nodes with at least 1 agent each, or 0x0 (simulation only)");
        }
        if !(3..=300).contains(&args.lease_ttl) {
            bail!("--lease-ttl {}: between 3 and 300 s", args.lease_ttl);
        }
        let child = vec![compile_child(&args.child_src, dir)?];
        let r = cluster::run(
            &cluster::ClusterArgs {
                fleetd: &fleetd_exe,
                dir,
                child: &child,
                nodes,
                agents_per_node: per,
                runs: args.cluster_runs,
                ttl: args.lease_ttl,
                sim_nodes: &args.sim_nodes,
                sim_agents_per_node: args.sim_agents,
                ports: parse_range(&args.port_range)?,
            },
            now_utc(),
            std::env::args().collect::<Vec<_>>().join(" "),
        )?;
        return emit(args, &r, cluster::render);
    }
    let command = match &args.command {
        Some(c) => {
            let w = shell_words::split(c).with_context(|| format!("--command {c:?}"))?;
            if w.is_empty() {
                bail!("--command: expected a program, got nothing");
            }
            w
        }
        None => vec![compile_child(&args.child_src, dir)?],
    };
    let (first, last) = parse_range(&args.port_range)?;
    let plan = |n: usize| Plan {
        program: command[0].clone(),
        idle: Duration::from_secs_f64(args.idle_secs),
        kills: args.kills,
        status_samples: args.status_samples,
        add_deadline: Duration::from_secs(30) + Duration::from_millis(30) * n as u32,
        restart_deadline: Duration::from_secs(10),
        stop_deadline: Duration::from_secs(120),
        no_probes: args.no_probes,
    };
    let mut report = Report {
        date: now_utc(),
        machine: report::Machine::read(),
        command: std::env::args().collect::<Vec<_>>().join(" "),
        program: shell_words::join(&command),
        ..Report::default()
    };
    let mut peers: Vec<String> = Vec::new();
    for p in &args.vs {
        match p.as_str() {
            "supervisord" | "pm2" | "s6" => peers.push(p.clone()),
            other => bail!("--vs: unknown peer {other:?} (supervisord, pm2, s6)"),
        }
    }

    for (i, &n) in args.n.iter().enumerate() {
        let sub = dir.join(format!("n{n}-{i}"));
        report.runs.push(run_fleetd(
            &fleetd_exe,
            &sub,
            &args.port_range,
            &command,
            n,
            &plan(n),
        )?);
        for p in &peers {
            let ports = free_ports(first, last, n)?;
            report
                .runs
                .push(run_peer(p, &sub.join(p), &command, n, &ports, &plan(n)));
        }
    }

    if args.max_n > 0 {
        let m = choose_max_n(args.max_n, first, last, &report.runs);
        say(format!("largest N: {} (bound by {})", m.chosen, m.bound_by));
        let ran = report
            .runs
            .iter()
            .any(|f| f.subject == "fleetd" && f.n == m.chosen);
        if m.chosen > 0 && !ran {
            let sub = dir.join(format!("max{}", m.chosen));
            report.runs.push(run_fleetd(
                &fleetd_exe,
                &sub,
                &args.port_range,
                &command,
                m.chosen,
                &plan(m.chosen),
            )?);
        }
        report.max_n = Some(m);
    }

    if args.real > 0 {
        for profile in ["default", "lean"] {
            report.real.push(run_real(
                &fleetd_exe,
                &dir.join(format!("real-{profile}")),
                args,
                profile,
            ));
        }
    }

    if let Some(p) = &args.json_out {
        std::fs::write(p, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("{}", report::human(&report));
    }
    Ok(())
}

/// A report as JSON (`--json`, and to `--json-out`) or as the human text.
fn emit<R: serde::Serialize>(args: &Args, r: &R, human: fn(&R) -> String) -> Result<()> {
    let json = serde_json::to_string_pretty(r)?;
    if let Some(p) = &args.json_out {
        std::fs::write(p, &json).with_context(|| format!("writing {}", p.display()))?;
    }
    if args.json {
        println!("{json}");
    } else {
        print!("{}", human(r));
    }
    Ok(())
}

fn parse_range(s: &str) -> Result<(u16, u16)> {
    let (a, b) = s
        .split_once('-')
        .with_context(|| format!("--port-range {s:?}: expected FIRST-LAST"))?;
    let (a, b): (u16, u16) = (
        a.trim()
            .parse()
            .with_context(|| format!("--port-range {s:?}: first"))?,
        b.trim()
            .parse()
            .with_context(|| format!("--port-range {s:?}: last"))?,
    );
    if a == 0 || b < a {
        bail!("--port-range {s:?}: FIRST must be 1..=LAST");
    }
    Ok((a, b))
}

/// Compiles the default child with `cc -O2` into `dir`; its path is unique to this run, so
/// its processes are found in /proc by argv[0] alone.
fn compile_child(src: &Path, dir: &Path) -> Result<String> {
    let out = dir.join("healthz");
    let st = std::process::Command::new("cc")
        .arg("-O2")
        .arg("-o")
        .arg(&out)
        .arg(src)
        .status()
        .with_context(|| format!("running cc on {}", src.display()))?;
    if !st.success() {
        bail!("cc -O2 {}: {st}", src.display());
    }
    Ok(out.display().to_string())
}

fn now_utc() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// Ends children of the workload that outlived their supervisor, by pid, and says so.
fn reap_leftovers(program: &str, ports: &HashSet<u16>, f: &mut Figures) {
    let left = probe::workload(program, ports);
    if !left.is_empty() {
        f.notes.push(format!(
            "{} children outlived the supervisor's shutdown; killed by pid",
            left.len()
        ));
        for pid in left.values() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(*pid as i32),
                nix::sys::signal::SIGKILL,
            );
        }
    }
}

fn run_fleetd(
    exe: &Path,
    dir: &Path,
    range: &str,
    command: &[String],
    n: usize,
    plan: &Plan,
) -> Result<Figures> {
    say(format!("fleetd, N = {n}"));
    let mut d = Fleetd::start(exe, dir, range, Some(command.to_vec()), None)?;
    d.no_probes = plan.no_probes;
    // Let the daemon finish its own start-up before the baseline reading.
    std::thread::sleep(Duration::from_millis(500));
    // fleetd allocates ports itself; the slice only carries N.
    let dummy = vec![0u16; n];
    let mut f = measure(&mut d, n, &dummy, plan);
    let ports: HashSet<u16> = d
        .status(FLEET)
        .map(|s| s.iter().filter_map(|a| a.port).collect())
        .unwrap_or_default();
    if let Err(e) = d.shutdown() {
        f.notes.push(format!("shutdown: {e:#}"));
    }
    reap_leftovers(&plan.program, &ports, &mut f);
    Ok(f)
}

fn run_peer(
    peer: &str,
    dir: &Path,
    command: &[String],
    n: usize,
    ports: &[u16],
    plan: &Plan,
) -> Figures {
    say(format!("{peer}, N = {n}"));
    let started: Result<Box<dyn Subject>> = match peer {
        "supervisord" => Supervisord::start(dir, command.to_vec()).map(|s| Box::new(s) as _),
        "s6" => S6::start(dir, command.to_vec()).map(|s| Box::new(s) as _),
        _ => Pm2::start(dir, command.to_vec()).map(|s| Box::new(s) as _),
    };
    let mut f = match started {
        Ok(mut s) => {
            std::thread::sleep(Duration::from_millis(500));
            let mut f = measure(s.as_mut(), n, ports, plan);
            if let Err(e) = s.shutdown() {
                f.notes.push(format!("shutdown: {e:#}"));
            }
            f
        }
        Err(e) => Figures {
            subject: peer.into(),
            n,
            notes: vec![format!("not started: {e:#}")],
            ..Figures::default()
        },
    };
    reap_leftovers(&plan.program, &ports.iter().copied().collect(), &mut f);
    f
}

/// The largest N this host allows fleetd, from the limits and what the runs so far cost.
fn choose_max_n(flag: usize, first: u16, last: u16, runs: &[Figures]) -> MaxN {
    let mut limits: Vec<(String, usize)> = vec![
        ("--max-n".into(), flag),
        (
            format!("port range {first}-{last} (stride 1)"),
            (last - first) as usize + 1,
        ),
        (
            "fleet create --agents cap".into(),
            fleet_commander::admin::parse::MAX_AGENTS as usize,
        ),
    ];
    let big = runs
        .iter()
        .filter(|f| f.subject == "fleetd" && f.n > 0)
        .max_by_key(|f| f.n);
    if let Some(f) = big {
        if let (Some(a), Some(b)) = (f.fds_0, f.fds_n) {
            let per = (b.saturating_sub(a) as f64 / f.n as f64).max(0.01);
            let hard = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
                .map(|(_, h)| h)
                .unwrap_or(1024);
            // Steady state is `per` each; probes in flight, log rotation and control
            // connections need descriptors on top (a run at the exact quotient left 37 agents
            // unable to start).
            let spare = (hard as f64 - a as f64) * FD_HEADROOM - 64.0;
            limits.push((
                format!("fleetd RLIMIT_NOFILE {hard} at {per:.1} fds/agent, 5 % kept spare"),
                (spare.max(0.0) / per) as usize,
            ));
        }
        let per_child_kib =
            f.pss_per_child_kib.unwrap_or(0.0).max(0.0) + f.child_pss_kib.unwrap_or(1024.0);
        if let Some(avail) = mem_available_kib() {
            limits.push((
                format!("MemAvailable at {per_child_kib:.0} KiB per child incl. supervisor"),
                (avail as f64 * 0.8 / per_child_kib) as usize,
            ));
        }
    }
    let read = |p: &str| {
        std::fs::read_to_string(p)
            .ok()
            .and_then(|t| t.trim().parse::<usize>().ok())
    };
    let procs = probe::process_count();
    for p in [
        "/proc/sys/kernel/pid_max",
        "/proc/sys/kernel/threads-max",
        "/sys/fs/cgroup/pids.max",
    ] {
        if let Some(v) = read(p) {
            limits.push((
                format!("{p} (minus {procs} processes)"),
                v.saturating_sub(procs),
            ));
        }
    }
    let (bound_by, chosen) = limits
        .iter()
        .min_by_key(|(_, v)| *v)
        .cloned()
        .unwrap_or_default();
    MaxN {
        limits,
        chosen,
        bound_by,
    }
}

fn mem_available_kib() -> Option<u64> {
    std::fs::read_to_string("/proc/meminfo").ok().and_then(|t| {
        t.lines()
            .find(|l| l.starts_with("MemAvailable:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
    })
}

/// K real gateway agents with one profile: cold start → ready, RSS/PSS per agent (process
/// tree), `fleet restart` → ready again (warm compile cache).
fn run_real(exe: &Path, dir: &Path, args: &Args, profile: &str) -> RealFigures {
    let mut g = RealFigures {
        profile: profile.into(),
        agents: args.real,
        ..RealFigures::default()
    };
    say(format!(
        "real gateway, profile {profile}, {} agents",
        args.real
    ));
    let d = match Fleetd::start(exe, dir, &args.port_range, None, Some(profile.into())) {
        Ok(d) => d,
        Err(e) => {
            g.notes.push(format!("fleetd: {e:#}"));
            return g;
        }
    };
    let wait_ready = |old: &HashSet<u32>| -> Result<f64> {
        let t = Instant::now();
        let deadline = t + Duration::from_secs(300);
        loop {
            let st = d.status(FLEET)?;
            let ready = st
                .iter()
                .filter(|a| a.ready && a.pid.is_some_and(|p| !old.contains(&p)))
                .count();
            if ready >= args.real {
                return Ok(t.elapsed().as_secs_f64());
            }
            if Instant::now() >= deadline {
                bail!("{ready} of {} agents ready after 300 s", args.real);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let t = Instant::now();
    if let Err(e) = d.create(args.real) {
        g.notes.push(format!("create: {e:#}"));
        return g;
    }
    match wait_ready(&HashSet::new()) {
        Ok(_) => g.cold_start_ready_s = Some(t.elapsed().as_secs_f64()),
        Err(e) => g.notes.push(format!("cold start: {e:#}")),
    }
    if let Ok(st) = d.status(FLEET) {
        let procs = fleet_commander::process::procfs::scan();
        let roots: Vec<u32> = st.iter().filter_map(|a| a.pid).collect();
        if !roots.is_empty() {
            let k = roots.len() as f64;
            let rss: u64 = roots
                .iter()
                .map(|&r| fleet_commander::process::procfs::tree_rss_bytes(r, &procs))
                .sum();
            let pss: u64 = roots
                .iter()
                .map(|&r| fleet_commander::process::procfs::tree_pss_bytes(r, &procs))
                .sum();
            g.rss_per_agent_mib = Some(rss as f64 / k / 1048576.0);
            g.pss_per_agent_mib = Some(pss as f64 / k / 1048576.0);
        }
        let old: HashSet<u32> = roots.into_iter().collect();
        let t = Instant::now();
        match d.request(&["fleet", "restart", FLEET]) {
            Ok(_) => match wait_ready(&old) {
                Ok(_) => g.warm_restart_ready_s = Some(t.elapsed().as_secs_f64()),
                Err(e) => g.notes.push(format!("warm restart: {e:#}")),
            },
            Err(e) => g.notes.push(format!("fleet restart: {e:#}")),
        }
    }
    let mut d = d;
    if let Err(e) = d.shutdown() {
        g.notes.push(format!("shutdown: {e:#}"));
    }
    g
}
