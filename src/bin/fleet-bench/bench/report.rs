//! The bench's output: the whole run as one serde `Report` (`--json`) and as human tables, one
//! per N, supervisors side by side, with the targets for fleetd at N = 1000.

use super::probe::Pctl;
use super::Figures;
use comfy_table::Table;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Machine {
    pub cpu: String,
    pub cores: usize,
    pub mem_total_mib: u64,
    pub kernel: String,
}

impl Machine {
    pub fn read() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split(':').nth(1))
            .map(|s| s.trim().to_string())
            .unwrap_or_default();
        let mem_total_mib = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|t| {
                t.lines()
                    .find(|l| l.starts_with("MemTotal:"))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|v| v.parse::<u64>().ok())
            })
            .unwrap_or(0)
            / 1024;
        Machine {
            cpu,
            cores: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            mem_total_mib,
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
                .to_string(),
        }
    }
}

/// How the largest N was chosen: every host limit considered, and the one that bound.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct MaxN {
    /// (limit, the N it allows).
    pub limits: Vec<(String, usize)>,
    pub chosen: usize,
    pub bound_by: String,
}

/// Real-gateway figures for one profile (`--real K`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RealFigures {
    pub profile: String,
    pub agents: usize,
    /// create → every agent ready (`/readyz`) in fleetd's view, seconds.
    pub cold_start_ready_s: Option<f64>,
    /// Per agent, summed over its process tree.
    pub rss_per_agent_mib: Option<f64>,
    pub pss_per_agent_mib: Option<f64>,
    /// `fleet restart` → every agent ready again (warm compile cache), seconds.
    pub warm_restart_ready_s: Option<f64>,
    pub notes: Vec<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Report {
    pub date: String,
    pub machine: Machine,
    pub command: String,
    /// The child program every supervisor ran.
    pub program: String,
    pub runs: Vec<Figures>,
    pub max_n: Option<MaxN>,
    pub real: Vec<RealFigures>,
    pub notes: Vec<String>,
}

fn secs(v: Option<f64>) -> String {
    v.map(|s| format!("{s:.3} s")).unwrap_or_else(|| "-".into())
}

fn kib(v: Option<f64>) -> String {
    v.map(|k| format!("{k:.1} KiB"))
        .unwrap_or_else(|| "-".into())
}

fn pctl(v: &Option<Pctl>) -> String {
    v.map(|p| format!("{:.1} / {:.1} ms (n={})", p.p50, p.p99, p.n))
        .unwrap_or_else(|| "-".into())
}

/// Whether fleetd met a target: "met", "MISSED", or "" when there is none.
fn verdict(ok: Option<bool>) -> String {
    match ok {
        Some(true) => "met".into(),
        Some(false) => "MISSED".into(),
        None => String::new(),
    }
}

/// One row of a table: label, a cell per run, the target and fleetd's verdict.
type Row = (
    &'static str,
    fn(&Figures) -> String,
    &'static str,
    fn(&Figures) -> Option<bool>,
);

const ROWS: &[Row] = &[
    (
        "supervisor memory per child (RSS)",
        |f| kib(f.rss_per_child_kib),
        "≤ 12 KiB",
        |f| f.rss_per_child_kib.map(|k| k <= 12.0),
    ),
    (
        "supervisor memory per child (PSS)",
        |f| kib(f.pss_per_child_kib),
        "",
        |_| None,
    ),
    (
        "add N → every port answers /healthz",
        |f| secs(f.add_ports_s),
        "",
        |_| None,
    ),
    (
        "add N → all healthy in own view",
        |f| secs(f.add_view_s),
        "",
        |_| None,
    ),
    (
        "add N → all running (both)",
        |f| secs(f.add_all_s),
        "≤ 1.0 s",
        |f| f.add_all_s.map(|s| s <= 1.0),
    ),
    (
        "SIGKILL → port answers again p50/p99",
        |f| pctl(&f.kill_port_ms),
        "≤ 3 / ≤ 10 ms",
        |f| f.kill_port_ms.map(|p| p.p50 <= 3.0 && p.p99 <= 10.0),
    ),
    (
        "SIGKILL → new pid in own view p50/p99",
        |f| pctl(&f.kill_new_pid_ms),
        "",
        |_| None,
    ),
    (
        "SIGKILL → healthy in own view p50/p99",
        |f| pctl(&f.kill_healthy_ms),
        "",
        |_| None,
    ),
    (
        "status --json round trip p50/p99",
        |f| pctl(&f.status_ms),
        "",
        |_| None,
    ),
    (
        "stop all → no child left",
        |f| format!("{} ({} left)", secs(f.stop_s), f.stop_left),
        "≤ 0.2 s, 0 left",
        |f| f.stop_s.map(|s| s <= 0.2 && f.stop_left == 0),
    ),
    (
        "supervisor idle CPU",
        |f| {
            f.idle_cpu_pct
                .map(|c| format!("{c:.3} % over {:.0} s", f.idle_window_s))
                .unwrap_or_else(|| "-".into())
        },
        "≤ 0.1 %",
        |f| f.idle_cpu_pct.map(|c| c <= 0.1),
    ),
    (
        "supervisor RSS at 0 → at N",
        |f| {
            format!(
                "{:.0} → {:.0} KiB",
                f.supervisor_rss_0_kib, f.supervisor_rss_n_kib
            )
        },
        "",
        |_| None,
    ),
    (
        "open fds at 0 → at N; threads",
        |f| match (f.fds_0, f.fds_n, f.threads_n) {
            (Some(a), Some(b), Some(t)) => format!("{a} → {b}; {t}"),
            _ => "-".into(),
        },
        "",
        |_| None,
    ),
];

/// The figure labels every human report prints, in order.
#[allow(dead_code)] // read by tests/bench.rs, which compiles this module too
pub fn labels() -> Vec<&'static str> {
    ROWS.iter().map(|r| r.0).collect()
}

/// Human tables: one per N, supervisors side by side.
pub fn human(r: &Report) -> String {
    let mut out = format!(
        "fleet-bench {} on {} ({} cores, {} MiB, Linux {})\ncommand: {}\nchild: {}\n",
        r.date,
        r.machine.cpu,
        r.machine.cores,
        r.machine.mem_total_mib,
        r.machine.kernel,
        r.command,
        r.program
    );
    let mut ns: Vec<usize> = r.runs.iter().map(|f| f.n).collect();
    ns.dedup();
    for n in ns {
        let runs: Vec<&Figures> = r.runs.iter().filter(|f| f.n == n).collect();
        let mut t = Table::new();
        let mut head = vec![format!("N = {n}")];
        head.extend(runs.iter().map(|f| f.subject.clone()));
        head.push("target (N=1000)".into());
        head.push("fleetd".into());
        t.set_header(head);
        let fleetd = runs.iter().find(|f| f.subject == "fleetd");
        for (label, cell, target, ok) in ROWS {
            let mut row = vec![label.to_string()];
            row.extend(runs.iter().map(|f| cell(f)));
            row.push(target.to_string());
            row.push(if target.is_empty() {
                String::new()
            } else {
                verdict(fleetd.and_then(|f| ok(f)))
            });
            t.add_row(row);
        }
        out.push_str(&format!("\n{t}\n"));
        for f in &runs {
            for note in &f.notes {
                out.push_str(&format!("note ({} N={}): {note}\n", f.subject, f.n));
            }
        }
    }
    if let Some(m) = &r.max_n {
        out.push_str(&format!(
            "\nlargest N: {} (bound by {}); limits: {}\n",
            m.chosen,
            m.bound_by,
            m.limits
                .iter()
                .map(|(l, v)| format!("{l} → {v}"))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    for g in &r.real {
        out.push_str(&format!(
            "\nreal gateway, profile {}, {} agents: cold start → ready {}, warm restart → ready {}, per agent RSS {} PSS {}\n",
            g.profile,
            g.agents,
            secs(g.cold_start_ready_s),
            secs(g.warm_restart_ready_s),
            g.rss_per_agent_mib.map(|m| format!("{m:.1} MiB")).unwrap_or_else(|| "-".into()),
            g.pss_per_agent_mib.map(|m| format!("{m:.1} MiB")).unwrap_or_else(|| "-".into()),
        ));
        for n in &g.notes {
            out.push_str(&format!("note (real {}): {n}\n", g.profile));
        }
    }
    for n in &r.notes {
        out.push_str(&format!("note: {n}\n"));
    }
    out
}
