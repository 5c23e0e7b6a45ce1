//! Turns a `Reply` (or an `Event`) into what an operator or a script reads: aligned tables for
//! people, serde JSON for scripts. Pure formatting: no I/O, and no JSON built by hand. Output
//! carries no trailing newline; the caller prints it as one block.

use crate::messages::command::{
    json, AgentStatus, CapacityRow, FleetInfo, NodeRow, PortLeaseRow, Reply, TopRow,
};
use crate::messages::events::{AgentTransition, Event};
use crate::state::ExitInfo;
use crate::FleetError;
use comfy_table::{presets::NOTHING, Table};
use serde::Serialize;

/// The reply as JSON (`json`) or as text for a terminal.
pub fn render(reply: &Reply, json: bool) -> String {
    if json {
        render_json(reply)
    } else {
        render_human(reply)
    }
}

/// One line per event: `<time> fleet/agent old → new pid=… reason=…`, or its JSON.
pub fn render_event(ev: &Event, json: bool) -> String {
    if json {
        return to_json(ev);
    }
    match ev {
        Event::Agent(t) => agent_event(t),
        Event::Fleet {
            fleet,
            old,
            new,
            reason,
            at_ms,
        } => format!(
            "{} {fleet} {old} → {new} reason={}",
            timestamp(*at_ms),
            opt(reason)
        ),
        Event::LogsPruned {
            bytes_freed,
            files_deleted,
            at_ms,
        } => format!(
            "{} logs pruned files={files_deleted} freed={}",
            timestamp(*at_ms),
            mib(*bytes_freed)
        ),
        Event::LogLinesDropped {
            fleet,
            agent,
            lines,
            reason,
            at_ms,
        } => format!(
            "{} {fleet}/{agent} log lines dropped lines={lines} reason={reason}",
            timestamp(*at_ms)
        ),
        Event::Channel {
            fleet,
            agent,
            channel,
            state,
            error,
            at_ms,
        } => format!(
            "{} {fleet}/{agent} channel {channel} {state}{}",
            timestamp(*at_ms),
            error
                .as_ref()
                .map(|e| format!(" error={e}"))
                .unwrap_or_default()
        ),
        Event::Upgrade {
            fleet,
            agent,
            step,
            detail,
            at_ms,
        } => upgrade_event(fleet, agent, step, detail, *at_ms),
        Event::BackupFailed {
            fleet,
            agent,
            reason,
            at_ms,
        } => format!(
            "{} {fleet}/{agent} backup failed reason={reason}",
            timestamp(*at_ms)
        ),
    }
}

fn upgrade_event(
    fleet: &str,
    agent: &Option<String>,
    step: &str,
    detail: &Option<String>,
    at_ms: u64,
) -> String {
    format!(
        "{} {fleet}{} upgrade {step}{}",
        timestamp(at_ms),
        agent.as_ref().map(|a| format!("/{a}")).unwrap_or_default(),
        detail
            .as_ref()
            .map(|d| format!(" reason={d}"))
            .unwrap_or_default()
    )
}

fn agent_event(t: &AgentTransition) -> String {
    let exit = match t.exit {
        Some(e) => format!(" {}", exit_kv(e)),
        None => String::new(),
    };
    format!(
        "{} {}/{} {} → {} pid={} restarts={}{exit} reason={}",
        timestamp(t.at_ms),
        t.fleet,
        t.agent,
        t.old,
        t.new,
        opt(&t.pid),
        t.restarts,
        opt(&t.reason)
    )
}

/// `exit=78` or `signal=SIGKILL`: one key=value word, so event lines split on spaces.
fn exit_kv(e: ExitInfo) -> String {
    match e {
        ExitInfo::Code(c) => format!("exit={c}"),
        ExitInfo::Signal(s) => match nix::sys::signal::Signal::try_from(s) {
            Ok(sig) => format!("signal={}", sig.as_str()),
            Err(_) => format!("signal={s}"),
        },
    }
}

/// UTC with milliseconds, e.g. `2025-03-01T12:00:05.123Z`.
fn timestamp(at_ms: u64) -> String {
    let format = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(at_ms) * 1_000_000)
        .ok()
        .and_then(|t| t.format(&format).ok())
        .unwrap_or_else(|| format!("@{at_ms}ms"))
}

// ---------------------------------------------------------------------------------------------
// JSON: the payload itself, so `status --json` is a bare array of AgentStatus.

fn to_json<T: Serialize + ?Sized>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_else(|e| {
        // Unreachable for these types (no maps with non-string keys); still answer in JSON.
        let e = FleetError::internal(e);
        let shape = json::Error {
            message: e.to_string(),
            error: e,
        };
        serde_json::to_string(&shape).unwrap_or_default()
    })
}

fn render_json(reply: &Reply) -> String {
    match reply {
        Reply::Done { message } => to_json(&json::Done {
            ok: true,
            message: message.clone(),
        }),
        Reply::Fleets(rows) => to_json(rows),
        Reply::Status(rows) => to_json(rows),
        Reply::Ports(rows) => to_json(rows),
        Reply::Top(rows) => to_json(rows),
        Reply::Capacity(rows) => to_json(rows),
        Reply::Nodes(rows) => to_json(rows),
        Reply::Logs(lines) => to_json(&json::Logs {
            lines: lines.clone(),
        }),
        Reply::Token {
            fleet,
            agent,
            token,
        } => to_json(&json::Token {
            fleet: fleet.clone(),
            agent: agent.clone(),
            token: token.clone(),
        }),
        Reply::Help { text } => to_json(&json::Help { help: text.clone() }),
        Reply::Config {
            fleet,
            agent,
            config,
            env,
            secrets,
            files,
        } => to_json(&json::Config {
            fleet: fleet.clone(),
            agent: agent.clone(),
            config: config.clone(),
            env: env.clone(),
            secrets: secrets.clone(),
            files: files.clone(),
        }),
        // Never printed: the context carries secrets in clear for `fleetctl exec` alone.
        Reply::Exec { .. } => to_json(&json::Done {
            ok: true,
            message: "exec context (not shown)".into(),
        }),
        Reply::Backups(rows) => to_json(rows),
        Reply::Doctor(rows) => to_json(rows),
        Reply::Upgrade(rec) => to_json(rec),
        Reply::Webhooks {
            format,
            routes,
            config,
            applied,
        } => to_json(&serde_json::json!({
            "format": format,
            "routes": routes,
            "config": config,
            "applied": applied,
        })),
        Reply::Error(e) => to_json(&json::Error {
            error: e.clone(),
            message: e.to_string(),
        }),
    }
}

// ---------------------------------------------------------------------------------------------
// Human.

fn render_human(reply: &Reply) -> String {
    match reply {
        Reply::Done { message } => message.clone(),
        Reply::Fleets(rows) if rows.is_empty() => "no fleets".into(),
        Reply::Fleets(rows) => fleets_table(rows),
        Reply::Status(rows) if rows.is_empty() => "no agents".into(),
        Reply::Status(rows) => status_table(rows),
        Reply::Ports(rows) if rows.is_empty() => "no port leases".into(),
        Reply::Ports(rows) => ports_table(rows),
        Reply::Top(rows) if rows.is_empty() => "no agents".into(),
        Reply::Top(rows) => top_table(rows),
        Reply::Capacity(rows) if rows.is_empty() => "no fleets".into(),
        Reply::Capacity(rows) => capacity_table(rows),
        Reply::Nodes(rows) if rows.is_empty() => "no nodes".into(),
        Reply::Nodes(rows) => nodes_table(rows),
        Reply::Logs(lines) => lines.join("\n"),
        // Just the token, so `$(fleetctl token f/a)` works.
        Reply::Token { token, .. } => token.clone(),
        Reply::Help { text } => text.clone(),
        Reply::Config {
            config,
            env,
            secrets,
            files,
            ..
        } => {
            let mut out = String::from("openclaw.json:\n");
            out.push_str(&serde_json::to_string_pretty(config).unwrap_or_default());
            out.push_str("\nenvironment:\n");
            for (k, v) in env {
                out.push_str(&format!("  {k}={v}\n"));
            }
            if !secrets.is_empty() {
                out.push_str(&format!("secrets: {}\n", secrets.join(" ")));
            }
            if !files.is_empty() {
                out.push_str(&format!("files: {}\n", files.join(" ")));
            }
            out.trim_end().to_string()
        }
        Reply::Exec { .. } => "exec context (not shown)".into(),
        Reply::Backups(rows) if rows.is_empty() => "no agents".into(),
        Reply::Backups(rows) => table(
            &["AGENT", "FILES", "SIZE", "ARCHIVE", "TIME", "PATH"],
            rows.iter().map(|b| {
                vec![
                    match &b.node {
                        Some(n) => format!("{}/{} (on {n})", b.fleet, b.agent),
                        None => format!("{}/{}", b.fleet, b.agent),
                    },
                    b.files.to_string(),
                    mib(b.bytes),
                    mib(b.archive_bytes),
                    format!("{:.1}s", b.elapsed_ms as f64 / 1000.0),
                    b.path.display().to_string(),
                ]
            }),
        ),
        Reply::Doctor(rows) => {
            let fails = rows
                .iter()
                .filter(|c| c.level == crate::doctor::Level::Fail)
                .count();
            let warns = rows
                .iter()
                .filter(|c| c.level == crate::doctor::Level::Warn)
                .count();
            let mut out = table(
                &["LEVEL", "CHECK", "SUBJECT", "DETAIL"],
                rows.iter().map(|c| {
                    vec![
                        c.level.to_string(),
                        c.check.clone(),
                        c.subject.clone(),
                        c.detail.clone(),
                    ]
                }),
            );
            out.push_str(&format!(
                "\n{} checks: {fails} fail, {warns} warn",
                rows.len()
            ));
            out
        }
        Reply::Upgrade(rec) => upgrade_view(rec),
        Reply::Webhooks {
            config, applied, ..
        } => match applied {
            Some(p) => format!("{}\n# written to {p}; proxy reloaded", config.trim_end()),
            None => config.trim_end().to_string(),
        },
        Reply::Error(e) => format!("error: {e}"),
    }
}

fn upgrade_view(rec: &crate::upgrade::UpgradeRecord) -> String {
    let mut out = format!(
        "fleet {} upgrade {} → {}: {:?}{} ({:.1}s)\n",
        rec.fleet,
        rec.from.as_deref().unwrap_or("?"),
        rec.to,
        rec.state,
        rec.reason
            .as_ref()
            .map(|r| format!(": {r}"))
            .unwrap_or_default(),
        rec.elapsed_ms as f64 / 1000.0
    );
    out.push_str(&table(
        &["AGENT", "FROM", "STEP", "UNAVAILABLE", "REASON"],
        rec.agents.iter().map(|a| {
            vec![
                a.agent.clone(),
                a.from.clone().unwrap_or_else(|| "-".into()),
                a.step.name().to_string(),
                a.unavailable_ms
                    .map(|m| format!("{:.1}s", m as f64 / 1000.0))
                    .unwrap_or_else(|| "-".into()),
                a.reason.clone().unwrap_or_default(),
            ]
        }),
    ));
    out
}

/// Borderless, left-aligned, two spaces between columns, no trailing blanks.
fn table(headers: &[&str], rows: impl IntoIterator<Item = Vec<String>>) -> String {
    let mut t = Table::new();
    t.load_preset(NOTHING);
    t.set_header(headers.to_vec());
    for r in rows {
        t.add_row(r);
    }
    for c in t.column_iter_mut() {
        c.set_padding((0, 2));
    }
    t.trim_fmt()
}

fn opt<T: std::fmt::Display>(v: &Option<T>) -> String {
    match v {
        Some(v) => v.to_string(),
        None => "-".into(),
    }
}

fn yes_no(b: bool) -> String {
    if b { "yes" } else { "no" }.into()
}

/// `45s`, `12m05s`, `1h02m`, `3d04h`: two units at most, enough to read at a glance.
pub fn uptime(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m{:02}s", s / 60, s % 60),
        s if s < 86_400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        s => format!("{}d{:02}h", s / 86_400, s % 86_400 / 3600),
    }
}

/// Bytes as MiB with one decimal: `123.4 MiB`.
pub fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

fn status_table(rows: &[AgentStatus]) -> String {
    let headers = [
        "FLEET",
        "AGENT",
        "STATE",
        "PID",
        "PORT",
        "RESTARTS",
        "HEALTHY",
        "READY",
        "UPTIME",
        "RSS",
        "LAST EXIT",
        "CHANNELS",
        "REASON",
    ];
    // Cluster mode: which node runs each agent, after its name.
    let cluster = rows.iter().any(|r| r.node.is_some());
    let mut headers = headers.to_vec();
    if cluster {
        headers.insert(2, "NODE");
    }
    table(
        &headers,
        rows.iter().map(|r| {
            let mut cells = vec![
                r.fleet.clone(),
                r.agent.clone(),
                r.state.to_string(),
                opt(&r.pid),
                opt(&r.port),
                r.restarts.to_string(),
                yes_no(r.healthy),
                yes_no(r.ready),
                // A stopped agent has no uptime, whatever the counter says.
                if r.state.has_process() {
                    uptime(r.uptime_s)
                } else {
                    "-".into()
                },
                opt(&r.rss_bytes.map(mib)),
                opt(&r.last_exit),
                if r.channels.is_empty() {
                    "-".into()
                } else {
                    r.channels
                        .iter()
                        .map(|(k, c)| format!("{k}:{}", c.state))
                        .collect::<Vec<_>>()
                        .join(",")
                },
                match (&r.reason, &r.drift) {
                    (Some(why), Some(_)) => format!("{why}; files changed, see --json drift"),
                    (None, Some(_)) => "files changed on disk: reload to apply".into(),
                    (reason, None) => opt(reason),
                },
            ];
            if cluster {
                cells.insert(2, opt(&r.node));
            }
            cells
        }),
    )
}

fn nodes_table(rows: &[NodeRow]) -> String {
    table(
        &[
            "NODE", "LEASE", "MARK", "LEADER", "AGENTS", "PLACED", "MAX", "MEM FREE", "SOCKET",
        ],
        rows.iter().map(|r| {
            vec![
                r.node.clone(),
                r.lease.clone(),
                opt(&r.mark),
                yes_no(r.leader),
                r.agents.to_string(),
                r.placed.to_string(),
                opt(&r.capacity.as_ref().map(|c| c.agents_max)),
                opt(&r.capacity.as_ref().map(|c| mib(c.memory_available))),
                opt(&r.socket),
            ]
        }),
    )
}

fn fleets_table(rows: &[FleetInfo]) -> String {
    let headers = [
        "FLEET", "STATE", "STRATEGY", "RESTART", "AGENTS", "RUNNING", "REASON",
    ];
    table(
        &headers,
        rows.iter().map(|r| {
            vec![
                r.fleet.clone(),
                r.state.to_string(),
                r.strategy.to_string(),
                r.restart.to_string(),
                r.agents.to_string(),
                r.running.to_string(),
                opt(&r.reason),
            ]
        }),
    )
}

fn ports_table(rows: &[PortLeaseRow]) -> String {
    // The webhook column only when some agent has a webhook listener.
    let hooks = rows.iter().any(|r| !r.webhooks.is_empty());
    let mut headers = vec!["FLEET", "AGENT", "BASE", "STRIDE", "PORTS"];
    if hooks {
        headers.push("WEBHOOKS");
    }
    table(
        &headers,
        rows.iter().map(|r| {
            let last = (u32::from(r.base) + u32::from(r.stride)).saturating_sub(1);
            let mut row = vec![
                r.fleet.clone(),
                r.agent.clone(),
                r.base.to_string(),
                r.stride.to_string(),
                format!("{}-{last}", r.base),
            ];
            if hooks {
                row.push(
                    r.webhooks
                        .iter()
                        .map(|(c, p)| format!("{c}:{p}"))
                        .collect::<Vec<_>>()
                        .join(" "),
                );
            }
            row
        }),
    )
}

fn top_table(rows: &[TopRow]) -> String {
    table(
        &[
            "FLEET", "AGENT", "STATE", "PID", "PROCS", "RSS", "PSS", "CPU", "KSM",
        ],
        rows.iter().map(|r| {
            vec![
                r.fleet.clone(),
                r.agent.clone(),
                r.state.to_string(),
                opt(&r.pid),
                r.processes.to_string(),
                mib(r.rss_bytes),
                opt(&r.pss_bytes.map(mib)),
                format!("{:.1}%", r.cpu_percent),
                opt(&r
                    .ksm_pages
                    .map(|p| mib(p * crate::process::procfs::page_size()))),
            ]
        }),
    )
}

fn capacity_table(rows: &[CapacityRow]) -> String {
    table(
        &[
            "FLEET",
            "BY MEMORY",
            "BY PORTS",
            "BY FDS",
            "BY PIDS",
            "FITS",
            "BINDING",
        ],
        rows.iter().map(|r| {
            vec![
                r.fleet.clone(),
                opt(&r.by_memory),
                r.by_ports.to_string(),
                opt(&r.by_fds),
                opt(&r.by_pids),
                r.fits.to_string(),
                r.binding.clone(),
            ]
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::FleetError;
    use crate::spec::{RestartType, Strategy};
    use crate::state::{AgentState, FleetState};

    fn row(agent: &str, state: AgentState) -> AgentStatus {
        AgentStatus {
            fleet: "demo".into(),
            agent: agent.into(),
            state,
            pid: Some(4242),
            port: Some(18789),
            home: "/var/lib/fleet/demo/a".into(),
            restarts: 3,
            healthy: true,
            ready: false,
            uptime_s: 3720,
            rss_bytes: Some(150 * 1024 * 1024 + 512 * 1024),
            last_exit: Some(ExitInfo::Code(78)),
            reason: Some("config conflict".into()),
            drift: None,
            isolation: None,
            openclaw_version: Some("2026.9.6".into()),
            webhooks: Default::default(),
            node: None,
            held_stopped: None,
            channels: [(
                "telegram".to_string(),
                crate::channels::ChannelStatus {
                    state: crate::channels::ChannelState::Failed,
                    error: Some("revoked".into()),
                },
            )]
            .into(),
        }
    }

    fn sample() -> Vec<AgentStatus> {
        let mut stopped = row("agent-10", AgentState::Stopped);
        stopped.pid = None;
        stopped.port = None;
        stopped.rss_bytes = None;
        stopped.last_exit = Some(ExitInfo::Signal(9));
        stopped.reason = None;
        vec![row("agent-1", AgentState::Running), stopped]
    }

    #[test]
    fn status_json_is_a_bare_array_with_the_contract_fields() {
        let out = render(&Reply::Status(sample()), true);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        let arr = v
            .as_array()
            .unwrap_or_else(|| panic!("not an array: {out}"));
        assert_eq!(arr.len(), 2, "{out}");
        let mut want = vec![
            "fleet",
            "agent",
            "state",
            "pid",
            "port",
            "home",
            "restarts",
            "healthy",
            "ready",
            "uptime_s",
            "rss_bytes",
            "last_exit",
            "reason",
            "drift",
            "channels",
            "isolation",
            "openclaw_version",
        ];
        want.sort_unstable();
        for obj in arr {
            let mut keys: Vec<&str> = obj
                .as_object()
                .unwrap_or_else(|| panic!("not an object: {obj}"))
                .keys()
                .map(String::as_str)
                .collect();
            keys.sort_unstable();
            assert_eq!(keys, want, "{obj}");
        }
        assert_eq!(arr[0]["state"], "running", "{out}");
        assert_eq!(arr[0]["pid"], 4242, "{out}");
        assert!(arr[1]["pid"].is_null(), "{out}");
        // And it is the very payload: it reads back into the rows.
        let back: Vec<AgentStatus> = serde_json::from_str(&out).unwrap();
        assert_eq!(back, sample());
    }

    #[test]
    fn other_json_shapes() {
        let parse = |r: Reply| -> serde_json::Value {
            let s = render(&r, true);
            serde_json::from_str(&s).unwrap_or_else(|e| panic!("{s}: {e}"))
        };
        let done = parse(Reply::Done {
            message: "fleet demo created".into(),
        });
        assert_eq!(done["ok"], true);
        assert_eq!(done["message"], "fleet demo created");
        let logs = parse(Reply::Logs(vec!["a".into(), "b \"q\"".into()]));
        assert_eq!(logs["lines"][1], "b \"q\"", "{logs}");
        let tok = parse(Reply::Token {
            fleet: "f".into(),
            agent: "a".into(),
            token: "t0k".into(),
        });
        assert_eq!(
            (
                tok["fleet"].as_str(),
                tok["agent"].as_str(),
                tok["token"].as_str()
            ),
            (Some("f"), Some("a"), Some("t0k"))
        );
        let help = parse(Reply::Help {
            text: "usage".into(),
        });
        assert_eq!(help["help"], "usage");
        let fleets = parse(Reply::Fleets(vec![]));
        assert!(fleets.as_array().is_some_and(|a| a.is_empty()), "{fleets}");
        let ports = parse(Reply::Ports(vec![PortLeaseRow {
            fleet: "f".into(),
            agent: "a".into(),
            base: 18789,
            stride: 128,
            webhooks: Default::default(),
        }]));
        assert_eq!(ports[0]["base"], 18789, "{ports}");
    }

    #[test]
    fn error_names_the_field_in_both_forms() {
        let e = FleetError::invalid("agents", "expected a whole number 0..=10000, got \"x\"");
        let human = render(&Reply::Error(e.clone()), false);
        assert!(human.starts_with("error: "), "{human}");
        assert!(
            human.contains("agents") && human.contains("\"x\""),
            "{human}"
        );
        let v: serde_json::Value =
            serde_json::from_str(&render(&Reply::Error(e.clone()), true)).unwrap();
        assert_eq!(v["error"]["error"], "invalid_argument", "{v}");
        assert_eq!(v["error"]["field"], "agents", "{v}");
        assert_eq!(v["message"], e.to_string(), "{v}");
    }

    /// Start offset of each header, found by its name in the header line.
    fn header_offsets(header: &str, names: &[&str]) -> Vec<usize> {
        let mut from = 0;
        names
            .iter()
            .map(|n| {
                let at = from
                    + header[from..]
                        .find(n)
                        .unwrap_or_else(|| panic!("{n} not in {header:?}"));
                from = at + n.len();
                at
            })
            .collect()
    }

    #[test]
    fn status_table_columns_line_up() {
        let out = render(&Reply::Status(sample()), false);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 3, "header + 2 rows:\n{out}");
        let names = [
            "FLEET",
            "AGENT",
            "STATE",
            "PID",
            "PORT",
            "RESTARTS",
            "HEALTHY",
            "READY",
            "UPTIME",
            "RSS",
            "LAST EXIT",
            "CHANNELS",
            "REASON",
        ];
        let offs = header_offsets(lines[0], &names);
        assert_eq!(offs[0], 0, "{out}");
        let expect: [[&str; 13]; 2] = [
            [
                "demo",
                "agent-1",
                "running",
                "4242",
                "18789",
                "3",
                "yes",
                "no",
                "1h02m",
                "150.5 MiB",
                "exit 78",
                "telegram:failed",
                "config conflict",
            ],
            [
                "demo",
                "agent-10",
                "stopped",
                "-",
                "-",
                "3",
                "yes",
                "no",
                "-",
                "-",
                "signal 9 (SIGKILL)",
                "telegram:failed",
                "-",
            ],
        ];
        for (line, cells) in lines[1..].iter().zip(expect) {
            for ((off, cell), name) in offs.iter().zip(cells).zip(names) {
                let at = line.get(*off..).unwrap_or("");
                assert!(
                    at.starts_with(cell),
                    "column {name} at {off}: want {cell:?}, line {line:?}\n{out}"
                );
                // Starting at the offset, not running on from the previous column.
                if *off > 0 {
                    assert_eq!(
                        &line[off - 1..*off],
                        " ",
                        "column {name} in {line:?}\n{out}"
                    );
                }
            }
            assert_eq!(line.trim_end(), *line, "no trailing blanks: {line:?}");
        }
    }

    #[test]
    fn other_tables_line_up_and_empty_lists_say_so() {
        let fleets = render(
            &Reply::Fleets(vec![FleetInfo {
                fleet: "a-long-fleet-name".into(),
                state: FleetState::Running,
                strategy: Strategy::RestForOne,
                restart: RestartType::Transient,
                agents: 12,
                running: 11,
                reason: None,
            }]),
            false,
        );
        let l: Vec<&str> = fleets.lines().collect();
        let offs = header_offsets(l[0], &["FLEET", "STATE", "STRATEGY", "RESTART", "AGENTS"]);
        for (off, cell) in offs.iter().zip([
            "a-long-fleet-name",
            "running",
            "rest_for_one",
            "transient",
            "12",
        ]) {
            assert!(l[1][*off..].starts_with(cell), "{cell} at {off}:\n{fleets}");
        }
        let ports = render(
            &Reply::Ports(vec![PortLeaseRow {
                fleet: "f".into(),
                agent: "a".into(),
                base: 18789,
                stride: 128,
                webhooks: Default::default(),
            }]),
            false,
        );
        assert!(ports.contains("18789-18916"), "{ports}");
        assert_eq!(render(&Reply::Status(vec![]), false), "no agents");
        assert_eq!(render(&Reply::Fleets(vec![]), false), "no fleets");
        assert_eq!(
            render(
                &Reply::Done {
                    message: "ok then".into()
                },
                false
            ),
            "ok then"
        );
        assert_eq!(
            render(&Reply::Logs(vec!["x".into(), "y".into()]), false),
            "x\ny"
        );
    }

    #[test]
    fn uptime_and_mib_formats() {
        for (s, want) in [
            (0, "0s"),
            (45, "45s"),
            (60, "1m00s"),
            (725, "12m05s"),
            (3720, "1h02m"),
            (90_000, "1d01h"),
        ] {
            assert_eq!(uptime(s), want, "{s}");
        }
        assert_eq!(mib(0), "0.0 MiB");
        assert_eq!(mib(1024 * 1024 * 3 / 2), "1.5 MiB");
    }

    #[test]
    fn events_render_as_one_line() {
        let ev = Event::Agent(AgentTransition {
            fleet: "f".into(),
            agent: "a".into(),
            old: AgentState::Running,
            new: AgentState::Backoff,
            pid: Some(77),
            exit: Some(ExitInfo::Signal(9)),
            restarts: 2,
            reason: Some("health check failed".into()),
            at_ms: 1_700_000_000_123,
        });
        let line = render_event(&ev, false);
        assert_eq!(
            line,
            "2023-11-14T22:13:20.123Z f/a running → backoff pid=77 restarts=2 signal=SIGKILL reason=health check failed"
        );
        let v: serde_json::Value = serde_json::from_str(&render_event(&ev, true)).unwrap();
        assert_eq!(v["event"], "agent", "{v}");
        let fleet = Event::Fleet {
            fleet: "f".into(),
            old: FleetState::Running,
            new: FleetState::Failed,
            reason: None,
            at_ms: 0,
        };
        assert_eq!(
            render_event(&fleet, false),
            "1970-01-01T00:00:00.000Z f running → failed reason=-"
        );
        for ev in [
            Event::LogsPruned {
                bytes_freed: 1 << 20,
                files_deleted: 3,
                at_ms: 5,
            },
            Event::LogLinesDropped {
                fleet: "f".into(),
                agent: "a".into(),
                lines: 9,
                reason: "slow reader".into(),
                at_ms: 5,
            },
        ] {
            let line = render_event(&ev, false);
            assert!(
                !line.contains('\n') && line.starts_with("1970-01-01T00:00:00.005Z "),
                "{line}"
            );
        }
    }
}
