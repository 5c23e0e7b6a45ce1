//! The conversation workload (`--real K --talk R --minutes M`): K real OpenClaw tenants, each
//! with its own bot on the loopback fake Bot API and its own key on the fake model, each sent
//! R messages a minute for M minutes. What a hosting business pays for is memory per bot that
//! is answering: this reports, per agent and over time, whole-tree RSS and PSS, restarts with
//! their reasons, and reply latency p50/p99.

#[path = "../fleet-fakes/fakes.rs"]
mod fakes;

use crate::bench::fleetd::Fleetd;
use crate::bench::Subject;
use anyhow::{bail, Context, Result};
use fleet_commander::messages::command::Reply;
use fleet_commander::process::procfs;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

const FLEET: &str = "talk";

/// One agent's figures over the run.
#[derive(Debug, Default, Serialize)]
pub struct AgentTalk {
    pub agent: String,
    pub sent: usize,
    pub answered: usize,
    pub restarts: u32,
    pub reasons: Vec<String>,
    pub latency_p50_s: Option<f64>,
    pub latency_p99_s: Option<f64>,
    pub rss_max_mib: f64,
    pub pss_max_mib: f64,
    pub pss_last_mib: f64,
    /// CPU seconds its tree used between the first and the last sample (user + system of the
    /// processes alive at each), as a share of one core.
    pub cpu_share: Option<f64>,
}

/// One sample of every agent's tree.
#[derive(Debug, Default, Serialize)]
pub struct Sample {
    pub at_s: f64,
    /// Agent → (RSS MiB, PSS MiB).
    pub trees: BTreeMap<String, (f64, f64)>,
    /// Agent → CPU seconds of its tree's live processes so far.
    pub cpu_s: BTreeMap<String, f64>,
    /// Agent → each process of its tree (label, PSS MiB): which part a lever moves.
    pub parts: BTreeMap<String, Vec<(String, f64)>>,
}

#[derive(Debug, Default, Serialize)]
pub struct TalkReport {
    pub agents: usize,
    pub per_minute: f64,
    pub minutes: f64,
    pub profile: String,
    pub node_options: Option<String>,
    pub node_flags: Option<String>,
    pub config: Option<String>,
    pub ready_s: Option<f64>,
    /// The host's KSM over the talk: `/sys/kernel/mm/ksm/run`, ksmd's CPU as a share of one
    /// core, and what it saved at the end (`general_profit`, MiB).
    pub ksm_run: Option<String>,
    pub ksmd_cpu_share: Option<f64>,
    pub ksm_profit_mib: Option<f64>,
    pub per_agent: Vec<AgentTalk>,
    pub samples: Vec<Sample>,
    pub notes: Vec<String>,
}

fn quantile(v: &mut [f64], q: f64) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    let i = ((v.len() as f64 - 1.0) * q).round() as usize;
    Some(v[i.min(v.len() - 1)])
}

pub struct TalkArgs<'a> {
    pub fleetd: &'a Path,
    pub dir: &'a Path,
    pub port_range: &'a str,
    pub agents: usize,
    pub per_minute: f64,
    pub minutes: f64,
    pub profile: &'a str,
    pub node_options: Option<&'a str>,
    /// Node/V8 flags for the node command line (those NODE_OPTIONS refuses, such as
    /// `--optimize-for-size`): the tenants then run `node FLAGS openclaw.mjs gateway run` as
    /// a custom command, with the environment the profile gives an OpenClaw agent.
    pub node_flags: Option<&'a str>,
    /// OpenClaw config merged over the fleet template (`--talk-config`).
    pub config: Option<&'a str>,
}

pub fn run(a: &TalkArgs) -> Result<TalkReport> {
    if a.per_minute <= 0.0 || a.minutes <= 0.0 || a.agents == 0 {
        bail!("--talk, --minutes and --real must be positive");
    }
    let mut r = TalkReport {
        agents: a.agents,
        per_minute: a.per_minute,
        minutes: a.minutes,
        profile: a.profile.into(),
        node_options: a.node_options.map(str::to_string),
        node_flags: a.node_flags.map(str::to_string),
        config: a.config.map(str::to_string),
        ..TalkReport::default()
    };
    let tg = fakes::FakeTelegram::start();
    let model = fakes::FakeModel::start("an answer from the loopback model for key {key}");
    std::fs::create_dir_all(a.dir)?;
    let fleet_tpl = a.dir.join("fleet.json");
    let mut template = serde_json::json!({
        "models": {"providers": {"fake": {"baseUrl": model.base_url(),
            "apiKey": "${OPENAI_API_KEY}", "models": [{"id": "m", "name": "m"}]}}},
        "agents": {"defaults": {"model": {"primary": "fake/m"}, "heartbeat": {"every": "0m"}}}
    });
    if let Some(extra) = a.config {
        let extra: serde_json::Value =
            serde_json::from_str(extra).context("--talk-config: not JSON")?;
        if !extra.is_object() {
            bail!("--talk-config: expected a JSON object, got {extra}");
        }
        fleet_commander::provision::merge_json(&mut template, &extra);
    }
    std::fs::write(&fleet_tpl, template.to_string())?;
    let d = Fleetd::start(a.fleetd, &a.dir.join("fleetd"), a.port_range, None, None)?;
    let mut create = vec![
        "fleet".to_string(),
        "create".into(),
        FLEET.into(),
        "--profile".into(),
        a.profile.into(),
        "--template".into(),
        fleet_tpl.display().to_string(),
    ];
    if let Some(flags) = a.node_flags {
        let bin = std::env::var_os("FLEET_OPENCLAW_BIN").map(std::path::PathBuf::from);
        let inst = fleet_commander::provision::resolve_openclaw_version(bin.as_deref(), None)
            .map_err(|e| anyhow::anyhow!("--node-flags: {e}"))?;
        let node = inst
            .node_bin_dir
            .map(|d| d.join("node"))
            .unwrap_or_else(|| "node".into());
        let script = inst
            .openclaw
            .canonicalize()
            .context("the openclaw script")?;
        create.extend([
            "--command".into(),
            format!(
                "{} {flags} {} gateway run",
                node.display(),
                script.display()
            ),
        ]);
    }
    let ok = |reply: Reply, what: &str| -> Result<()> {
        match reply {
            Reply::Error(e) => bail!("{what}: {e}"),
            _ => Ok(()),
        }
    };
    let create: Vec<&str> = create.iter().map(String::as_str).collect();
    ok(d.request(&create)?, "fleet create")?;
    let mut bots = Vec::new();
    let t0 = Instant::now();
    for i in 0..a.agents {
        let id = format!("t{}", i + 1);
        let bot = format!("{}:AAtalk-bench-token-{i:04}", 3000 + i);
        let user = 7000 + i as i64;
        tg.add_bot(&bot);
        let tpl = a.dir.join(format!("{id}.json"));
        std::fs::write(
            &tpl,
            serde_json::json!({"channels": {"telegram": {"botToken": bot, "apiRoot": tg.api_root(),
                "dmPolicy": "allowlist", "allowFrom": [user.to_string()]}}})
            .to_string(),
        )?;
        let key = a.dir.join(format!("{id}.key"));
        std::fs::write(&key, format!("sk-talk-bench-{i:04}"))?;
        let mut words = vec![
            "agent".to_string(),
            "add".into(),
            FLEET.into(),
            id.clone(),
            "--template".into(),
            tpl.display().to_string(),
            "--secret".into(),
            format!("OPENAI_API_KEY={}", key.display()),
        ];
        let options = a.node_options.or(a
            .node_flags
            .map(|_| fleet_commander::provision::LEAN_NODE_OPTIONS));
        if let Some(o) = options {
            words.extend(["--env".into(), format!("NODE_OPTIONS={o}")]);
        }
        if a.node_flags.is_some() {
            // What fleetd gives a lean OpenClaw agent and a custom command does not get by
            // itself (provision/env.rs).
            let respawned = [("OPENCLAW_PACKAGED_COMPILE_CACHE_RESPAWNED", "1")];
            for (k, v) in respawned.iter().chain(fleet_commander::provision::LEAN_ENV) {
                words.extend(["--env".into(), format!("{k}={v}")]);
            }
        }
        let w: Vec<&str> = words.iter().map(String::as_str).collect();
        ok(d.request(&w)?, "agent add")?;
        bots.push((id, bot, user));
    }
    let deadline = Instant::now() + Duration::from_secs(300 + 60 * a.agents as u64);
    loop {
        let st = d.status(FLEET)?;
        if st.iter().filter(|s| s.ready).count() >= a.agents {
            r.ready_s = Some(t0.elapsed().as_secs_f64());
            break;
        }
        if Instant::now() >= deadline {
            r.notes
                .push("not every agent got ready; talking anyway".into());
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    crate::say(format!(
        "talk: {} agents ready after {:.0} s; {} messages/min each for {} min",
        a.agents,
        t0.elapsed().as_secs_f64(),
        a.per_minute,
        a.minutes
    ));

    r.ksm_run = read_trim("/sys/kernel/mm/ksm/run");
    let ksmd = ksmd_ticks();
    let ksmd_t0 = Instant::now();
    let gap = Duration::from_secs_f64(60.0 / a.per_minute);
    let stagger = gap / a.agents as u32;
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(a.minutes * 60.0);
    let mut next: Vec<Instant> = (0..a.agents).map(|i| start + stagger * i as u32).collect();
    // Per agent, the message waiting for its answer: (sent at, replies seen before it). One at
    // a time: every reply is the same text, so only order tells which message it answers; a
    // message still unanswered when the next is due is replaced, so it counts as lost (sent
    // minus answered: a crash dropped it).
    let mut pending: Vec<Option<(Instant, usize)>> = vec![None; a.agents];
    let mut latencies: Vec<Vec<f64>> = vec![Vec::new(); a.agents];
    let mut sent = vec![0usize; a.agents];
    let mut reasons: Vec<Vec<String>> = vec![Vec::new(); a.agents];
    let mut last_restarts: BTreeMap<String, u32> = BTreeMap::new();
    let mut next_sample = start;
    let mut n = 0u64;
    while Instant::now() < end {
        let now = Instant::now();
        for (i, (_, bot, user)) in bots.iter().enumerate() {
            if now >= next[i] {
                n += 1;
                let seen = tg.sent(bot).len();
                tg.send_dm(bot, *user, &format!("message {n}: how are you today?"));
                pending[i] = Some((now, seen));
                sent[i] += 1;
                next[i] += gap;
            }
            if let Some((at, idx)) = pending[i] {
                if let Some(m) = tg.sent(bot).get(idx) {
                    latencies[i].push(m.at.saturating_duration_since(at).as_secs_f64());
                    pending[i] = None;
                }
            }
        }
        if now >= next_sample {
            next_sample += Duration::from_secs(30);
            let procs = procfs::scan();
            let mut s = Sample {
                at_s: start.elapsed().as_secs_f64(),
                ..Sample::default()
            };
            for row in d.status(FLEET).unwrap_or_default() {
                if let Some(pid) = row.pid {
                    let rss = procfs::tree_rss_bytes(pid, &procs) as f64 / 1048576.0;
                    let pss = procfs::tree_pss_bytes(pid, &procs) as f64 / 1048576.0;
                    s.trees.insert(row.agent.clone(), (rss, pss));
                    s.parts.insert(row.agent.clone(), tree_parts(pid, &procs));
                    let forest = procfs::Forest::new(&procs);
                    let ticks: u64 = forest.tree(pid).iter().map(|p| p.utime + p.stime).sum();
                    s.cpu_s.insert(
                        row.agent.clone(),
                        ticks as f64 / procfs::clock_ticks_per_sec() as f64,
                    );
                }
                let before = last_restarts.insert(row.agent.clone(), row.restarts);
                if before.is_some_and(|b| row.restarts > b)
                    || (before.is_none() && row.restarts > 0)
                {
                    if let Some(i) = bots.iter().position(|(id, _, _)| *id == row.agent) {
                        let why = row
                            .reason
                            .clone()
                            .or(row.last_exit.map(|e| e.to_string()))
                            .unwrap_or_default();
                        reasons[i].push(format!("at {:.0} s: {why}", s.at_s));
                    }
                }
            }
            crate::say(format!(
                "talk: {:.0} s: {}",
                s.at_s,
                s.trees
                    .iter()
                    .map(|(k, (r, p))| format!("{k} rss {r:.0} pss {p:.0} MiB"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
            r.samples.push(s);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    if let (Some(before), Some(after)) = (ksmd, ksmd_ticks()) {
        let secs = (after - before) as f64 / procfs::clock_ticks_per_sec() as f64;
        r.ksmd_cpu_share = Some(secs / ksmd_t0.elapsed().as_secs_f64());
    }
    r.ksm_profit_mib = read_trim("/sys/kernel/mm/ksm/general_profit")
        .and_then(|v| v.parse::<f64>().ok())
        .map(|b| b / 1048576.0);
    let status = d.status(FLEET).unwrap_or_default();
    for (i, (id, _, _)) in bots.iter().enumerate() {
        // The abort line is in the agent's own log whatever the sampling saw.
        let log = a
            .dir
            .join(format!("fleetd/state/fleets/{FLEET}/{id}/logs/agent.log"));
        let ooms = std::fs::read_to_string(&log)
            .map(|t| t.matches("JavaScript heap out of memory").count())
            .unwrap_or(0);
        if ooms > 0 {
            reasons[i].push(format!("{ooms} V8 heap out-of-memory aborts in its log"));
        }
        let row = status.iter().find(|s| s.agent == *id);
        let trees: Vec<(f64, f64)> = r
            .samples
            .iter()
            .filter_map(|s| s.trees.get(id).copied())
            .collect();
        r.per_agent.push(AgentTalk {
            agent: id.clone(),
            sent: sent[i],
            answered: latencies[i].len(),
            restarts: row.map(|s| s.restarts).unwrap_or(0),
            reasons: reasons[i].clone(),
            latency_p50_s: quantile(&mut latencies[i], 0.5),
            latency_p99_s: quantile(&mut latencies[i], 0.99),
            rss_max_mib: trees.iter().map(|t| t.0).fold(0.0, f64::max),
            pss_max_mib: trees.iter().map(|t| t.1).fold(0.0, f64::max),
            pss_last_mib: trees.last().map(|t| t.1).unwrap_or(0.0),
            cpu_share: cpu_share(&r.samples, id),
        });
    }
    let mut d = d;
    if let Err(e) = d.shutdown() {
        // The figures stand; a gateway that would not drain is one more of them.
        r.notes.push(format!("shutting fleetd down: {e:#}"));
    }
    Ok(r)
}

fn read_trim(path: &str) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_string())
}

/// CPU ticks of the kernel's `ksmd` thread so far.
fn ksmd_ticks() -> Option<u64> {
    procfs::scan()
        .into_iter()
        .find(|p| p.comm == "ksmd" && p.ppid == 2)
        .map(|p| p.utime + p.stime)
}

/// CPU share of one core the agent's tree used from its first sample to its last, when it
/// did not restart in between (a new tree starts its count again).
fn cpu_share(samples: &[Sample], agent: &str) -> Option<f64> {
    let seen: Vec<(f64, f64)> = samples
        .iter()
        .filter_map(|s| Some((s.at_s, *s.cpu_s.get(agent)?)))
        .collect();
    let (first, last) = (seen.first()?, seen.last()?);
    (last.0 > first.0 && last.1 >= first.1).then(|| (last.1 - first.1) / (last.0 - first.0))
}

/// Each process of the tree at `root`, labelled by the script it runs (a Node worker's
/// `…/worker.js`) or its name, with its PSS in MiB.
fn tree_parts(root: u32, procs: &[procfs::ProcInfo]) -> Vec<(String, f64)> {
    let forest = procfs::Forest::new(procs);
    forest
        .tree(root)
        .into_iter()
        .map(|p| {
            let cmdline = std::fs::read(format!("/proc/{}/cmdline", p.pid)).unwrap_or_default();
            let script = cmdline
                .split(|b| *b == 0)
                .filter_map(|a| std::str::from_utf8(a).ok())
                .find(|a| a.ends_with(".js") || a.ends_with(".mjs"))
                .and_then(|a| a.rsplit('/').next())
                .map(str::to_string);
            let label = script.unwrap_or_else(|| p.comm.clone());
            let pss = procfs::pss_bytes(p.pid).unwrap_or(0) as f64 / 1048576.0;
            (label, pss)
        })
        .collect()
}

/// The report as a table.
pub fn render(r: &TalkReport) -> String {
    let mut out = format!(
        "conversation workload: {} {} agents, {} messages/min each, {} min{}{}{}; ready after {}\n",
        r.agents,
        r.profile,
        r.per_minute,
        r.minutes,
        r.node_options
            .as_ref()
            .map(|o| format!(", NODE_OPTIONS={o}"))
            .unwrap_or_default(),
        r.node_flags
            .as_ref()
            .map(|o| format!(", node {o}"))
            .unwrap_or_default(),
        r.config
            .as_ref()
            .map(|c| format!(", config {c}"))
            .unwrap_or_default(),
        r.ready_s.map(|s| format!("{s:.0} s")).unwrap_or("-".into())
    );
    out.push_str(
        "agent  sent  answered  restarts  p50 s  p99 s  RSS max MiB  PSS max MiB  PSS last MiB  CPU %\n",
    );
    for a in &r.per_agent {
        let f = |v: Option<f64>| v.map(|v| format!("{v:.1}")).unwrap_or("-".into());
        out.push_str(&format!(
            "{:<5}  {:>4}  {:>8}  {:>8}  {:>5}  {:>5}  {:>11.0}  {:>11.0}  {:>12.0}  {:>5}\n",
            a.agent,
            a.sent,
            a.answered,
            a.restarts,
            f(a.latency_p50_s),
            f(a.latency_p99_s),
            a.rss_max_mib,
            a.pss_max_mib,
            a.pss_last_mib,
            a.cpu_share
                .map(|c| format!("{:.1}", c * 100.0))
                .unwrap_or("-".into())
        ));
        for why in &a.reasons {
            out.push_str(&format!("       restart {why}\n"));
        }
    }
    if let Some(last) = r.samples.last() {
        for (agent, parts) in &last.parts {
            let list: Vec<String> = parts.iter().map(|(l, p)| format!("{l} {p:.0}")).collect();
            out.push_str(&format!(
                "{agent} at {:.0} s, PSS MiB by process: {}\n",
                last.at_s,
                list.join(", ")
            ));
        }
    }
    out.push_str(&format!(
        "KSM: run={} ksmd CPU {} saved at the end {}\n",
        r.ksm_run.as_deref().unwrap_or("-"),
        r.ksmd_cpu_share
            .map(|c| format!("{:.1} %", c * 100.0))
            .unwrap_or("-".into()),
        r.ksm_profit_mib
            .map(|m| format!("{m:.0} MiB"))
            .unwrap_or("-".into())
    ));
    for n in &r.notes {
        out.push_str(&format!("note: {n}\n"));
    }
    out
}
