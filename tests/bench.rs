//! fleet-bench at a small N, so the benchmark cannot rot: it must complete, leave nothing
//! running, and report every figure for fleetd. No timing is asserted; speed figures belong
//! in `docs/bench.md`.

// The bench lives in its binary, not in the library: its report types are compiled in here
// from the same files, so the test reads the very shape the binary writes.
#[allow(dead_code)]
#[path = "../src/bin/fleet-bench/bench/mod.rs"]
mod bench;

use bench::report::{labels, Report};
use std::process::Command;

const BENCH: &str = env!("CARGO_BIN_EXE_fleet-bench");
const FLEETD: &str = env!("CARGO_BIN_EXE_fleetd");

/// Runs the bench at N = 20 (1 s idle window, 5 kills, no peers) on its own port range.
fn bench(range: &str, extra: &[&str]) -> String {
    let out = Command::new(BENCH)
        .args([
            "--n",
            "20",
            "--idle-secs",
            "1",
            "--kills",
            "5",
            "--status-samples",
            "5",
            "--port-range",
            range,
            "--fleetd",
            FLEETD,
        ])
        .args(extra)
        .output()
        .expect("running fleet-bench");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "fleet-bench failed: {}\nstdout:\n{stdout}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[test]
fn json_report_has_every_fleetd_figure() {
    let text = bench("61000-61099", &["--json"]);
    let r: Report = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    let f = r
        .runs
        .iter()
        .find(|f| f.subject == "fleetd" && f.n == 20)
        .unwrap_or_else(|| panic!("no fleetd run at N=20 in {text}"));
    let missing: Vec<&str> = [
        ("add_ports_s", f.add_ports_s.is_none()),
        ("add_view_s", f.add_view_s.is_none()),
        ("add_all_s", f.add_all_s.is_none()),
        ("rss_per_child_kib", f.rss_per_child_kib.is_none()),
        ("pss_per_child_kib", f.pss_per_child_kib.is_none()),
        ("idle_cpu_pct", f.idle_cpu_pct.is_none()),
        ("kill_new_pid_ms", f.kill_new_pid_ms.is_none()),
        ("kill_healthy_ms", f.kill_healthy_ms.is_none()),
        ("kill_port_ms", f.kill_port_ms.is_none()),
        ("status_ms", f.status_ms.is_none()),
        ("stop_s", f.stop_s.is_none()),
        ("fds_n", f.fds_n.is_none()),
    ]
    .into_iter()
    .filter_map(|(name, none)| none.then_some(name))
    .collect();
    assert!(missing.is_empty(), "figures missing: {missing:?}\n{text}");
    assert_eq!(f.add_missing, 0, "ports never answered: {text}");
    assert_eq!(f.stop_left, 0, "children left after stop: {text}");
    assert_eq!(f.kills_failed, 0, "kills not recovered: {text}");
    let k = f.kill_port_ms.unwrap();
    assert_eq!(k.n, 5, "5 kills asked for: {text}");
    assert!(f.notes.is_empty(), "notes: {:?}", f.notes);
}

#[test]
fn human_report_prints_every_figure() {
    let text = bench("61100-61199", &[]);
    for label in labels() {
        let line = text
            .lines()
            .find(|l| l.contains(label))
            .unwrap_or_else(|| panic!("no row {label:?} in:\n{text}"));
        // The fleetd cell (first after the label) holds a figure, not "-".
        let cell = line.split('|').nth(2).unwrap_or("").trim();
        assert!(
            !cell.is_empty() && cell != "-",
            "row {label:?} has no fleetd figure: {line}\n{text}"
        );
    }
}
