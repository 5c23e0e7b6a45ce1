//! Prometheus metrics: counters and histograms that move with events (restarts by reason,
//! probe latency, dropped log lines), and gauges read from the node's shared views at each
//! scrape (agents by fleet and state, RSS per agent, port leases, start-gate queue). Served as
//! Prometheus text on `--metrics-addr` by `serve`.

use crate::context::NodeContext;
use crate::messages::events::Event;
use crate::state::AgentState;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::atomic::Ordering;
use std::sync::Arc;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FleetReason {
    fleet: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FleetLabel {
    fleet: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FleetState {
    fleet: String,
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ChannelLabels {
    fleet: String,
    agent: String,
    channel: String,
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AgentLabels {
    fleet: String,
    agent: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LeaseState {
    state: String,
}

/// The metrics that accumulate between scrapes.
#[derive(Clone)]
pub struct Metrics {
    restarts: Family<FleetReason, Counter>,
    log_dropped: Family<FleetLabel, Counter>,
    /// Bytes every agent log writer wrote.
    pub log_bytes: Counter,
    /// Liveness probe latency, every probe.
    pub probe_latency: Histogram,
    /// Probe timeouts not counted toward a restart: the host's CPU was saturated and the
    /// agent's port still listened (`health::failure_counts`).
    pub probes_excused: Counter,
    /// Start graces given once more on a saturated host (`health::extend_grace`).
    pub graces_extended: Counter,
    /// Leased blocks and free ports, kept by the PortAllocator.
    pub leases_used: Gauge,
    pub ports_free: Gauge,
    /// Agent backups by result (`ok`, `failed`): commands, fleet backups and upgrades.
    backups: Family<LeaseState, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            restarts: Family::default(),
            log_dropped: Family::default(),
            log_bytes: Counter::default(),
            probe_latency: Histogram::new(exponential_buckets(0.0005, 2.0, 14)),
            probes_excused: Counter::default(),
            graces_extended: Counter::default(),
            leases_used: Gauge::default(),
            ports_free: Gauge::default(),
            backups: Family::default(),
        }
    }
}

/// The reason label of a restart, from the transition's reason text.
pub fn restart_reason(reason: &str) -> &'static str {
    if reason.starts_with("js heap out of memory") {
        "js_heap_oom"
    } else if reason.starts_with("memory limit") {
        "memory_limit"
    } else if reason.contains("/healthz") {
        "health"
    } else if reason.starts_with("signal") {
        "signal"
    } else if reason.starts_with("exit") {
        "exit"
    } else {
        "other"
    }
}

impl Metrics {
    /// One agent backup ended.
    pub fn backup_done(&self, ok: bool) {
        self.backups
            .get_or_create(&LeaseState {
                state: if ok { "ok" } else { "failed" }.into(),
            })
            .inc();
    }

    /// Called for every published event.
    pub fn observe_event(&self, ev: &Event) {
        match ev {
            Event::Agent(t) if t.new == AgentState::Backoff => {
                let reason = restart_reason(t.reason.as_deref().unwrap_or("")).to_string();
                self.restarts
                    .get_or_create(&FleetReason {
                        fleet: t.fleet.clone(),
                        reason,
                    })
                    .inc();
            }
            Event::LogLinesDropped { fleet, lines, .. } => {
                self.log_dropped
                    .get_or_create(&FleetLabel {
                        fleet: fleet.clone(),
                    })
                    .inc_by(*lines);
            }
            _ => {}
        }
    }
}

/// Prometheus text exposition of the node's metrics now.
pub fn render(ctx: &NodeContext) -> String {
    let m = &ctx.services.metrics;
    let mut reg = Registry::with_prefix("fleet");
    let agents = Family::<FleetState, Gauge>::default();
    for fleet in ctx.views.fleet_specs.iter() {
        for s in AgentState::ALL {
            let _ = agents.get_or_create(&FleetState {
                fleet: fleet.key().clone(),
                state: s.as_str().into(),
            });
        }
    }
    for v in ctx.views.status.iter() {
        agents
            .get_or_create(&FleetState {
                fleet: v.key().0.clone(),
                state: v.row.state.as_str().into(),
            })
            .inc();
    }
    reg.register("agents", "Agents by fleet and state", agents);
    let rss = Family::<AgentLabels, Gauge>::default();
    for e in ctx.views.memory.iter() {
        rss.get_or_create(&AgentLabels {
            fleet: e.key().0.clone(),
            agent: e.key().1.clone(),
        })
        .set(e.rss as i64);
    }
    let channels = Family::<ChannelLabels, Gauge>::default();
    for v in ctx.views.status.iter() {
        for (name, c) in &v.row.channels {
            channels
                .get_or_create(&ChannelLabels {
                    fleet: v.key().0.clone(),
                    agent: v.key().1.clone(),
                    channel: name.clone(),
                    state: c.state.to_string(),
                })
                .set(1);
        }
    }
    reg.register(
        "agent_channel",
        "1 for each agent's messaging channel in its current state (ready, starting, failed, stopped)",
        channels,
    );
    let ksm = Family::<AgentLabels, Gauge>::default();
    if crate::process::procfs::ksm_available() {
        for v in ctx.views.status.iter() {
            if let Some(pages) = v
                .row
                .pid
                .and_then(crate::process::procfs::ksm_merging_pages)
            {
                ksm.get_or_create(&AgentLabels {
                    fleet: v.key().0.clone(),
                    agent: v.key().1.clone(),
                })
                .set(pages as i64);
            }
        }
    }
    reg.register(
        "agent_ksm_merging_pages",
        "Pages of each agent's main process that KSM merged with other processes' (ksm = true)",
        ksm,
    );
    reg.register(
        "agent_rss_bytes",
        "Resident memory of each agent's whole process tree",
        rss,
    );
    reg.register(
        "restarts",
        "Agent restarts by fleet and reason",
        m.restarts.clone(),
    );
    reg.register(
        "probe_latency_seconds",
        "Latency of liveness probes",
        m.probe_latency.clone(),
    );
    reg.register(
        "probe_timeouts_excused",
        "Liveness probe timeouts not counted toward a restart: host CPU saturated, port listening",
        m.probes_excused.clone(),
    );
    reg.register(
        "start_graces_extended",
        "Start graces given once more because the host's CPU was saturated",
        m.graces_extended.clone(),
    );
    for state in ["ok", "failed"] {
        let _ = m.backups.get_or_create(&LeaseState {
            state: state.into(),
        });
    }
    reg.register(
        "backups",
        "Agent backups by result (ok, failed)",
        m.backups.clone(),
    );
    reg.register(
        "log_bytes",
        "Bytes written to agent logs",
        m.log_bytes.clone(),
    );
    reg.register(
        "log_lines_dropped",
        "Agent log lines lost (disk full, write errors)",
        m.log_dropped.clone(),
    );
    let leases = Family::<LeaseState, Gauge>::default();
    leases
        .get_or_create(&LeaseState {
            state: "used".into(),
        })
        .set(m.leases_used.get());
    reg.register("port_leases", "Port blocks leased to agents", leases);
    reg.register(
        "ports_free",
        "Ports of the range not leased",
        m.ports_free.clone(),
    );
    let gate = Gauge::<i64>::default();
    gate.set(ctx.services.gate_waiting.load(Ordering::Relaxed));
    reg.register("start_gate_queue", "Starts waiting at the start gate", gate);
    let mut out = String::new();
    let _ = prometheus_client::encoding::text::encode(&mut out, &reg);
    out
}

/// Serves `GET /metrics` (anything else: 404) until the task is dropped.
/// Most scrape connections open at once (a scraper needs one): the port is reachable by every
/// local user, and each idle connection would hold one of the daemon's descriptors.
pub const MAX_CONNECTIONS: usize = 16;
/// A connection gets this long for its request and the answer, then it is closed.
pub const CONNECTION_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

pub async fn serve(listener: tokio::net::TcpListener, ctx: Arc<NodeContext>) {
    use hyper::service::service_fn;
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let mut backoff = crate::admin::socket::AcceptBackoff::default();
    while let Some((slot, (stream, _))) =
        crate::admin::socket::accept_capped(&slots, &mut backoff, "metrics", || listener.accept())
            .await
    {
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let ctx = ctx.clone();
                async move {
                    let (status, body) = if req.uri().path() == "/metrics" {
                        (200, render(&ctx))
                    } else {
                        (404, "not found\n".to_string())
                    };
                    hyper::Response::builder()
                        .status(status)
                        .header(
                            "content-type",
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )
                        .body(http_body_util::Full::new(bytes::Bytes::from(body)))
                }
            });
            // One request per connection, within a deadline: a slow or idle client cannot
            // keep its slot.
            let conn = hyper::server::conn::http1::Builder::new()
                .keep_alive(false)
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(CONNECTION_TIMEOUT)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc);
            let _ = tokio::time::timeout(CONNECTION_TIMEOUT, conn).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons() {
        assert_eq!(restart_reason("memory limit: 900 MiB"), "memory_limit");
        assert_eq!(
            restart_reason("3 failed /healthz probes in a row"),
            "health"
        );
        assert_eq!(
            restart_reason("no healthy /healthz within the 120000 ms start grace"),
            "health"
        );
        assert_eq!(
            restart_reason("signal 9 (SIGKILL); restart in 0 ms"),
            "signal"
        );
        assert_eq!(restart_reason("exit 1; restart in 0 ms"), "exit");
    }
}
