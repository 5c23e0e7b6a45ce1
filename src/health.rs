//! HTTP probes of an agent's own port: liveness (`/healthz`, drives restarts) and readiness
//! (`/readyz`, shown only). The prober is a small task per agent that probes soon after the
//! spawn, backs off to the steady interval, and reports only changes, so a thousand idle
//! agents cost a thousand timers and no mailbox traffic.

use crate::spec::HealthSpec;
use std::time::Duration;
use tokio::net::TcpStream;

/// First probe this soon after the spawn; the delay doubles up to `STARTING_PROBE_MAX`.
pub const FIRST_PROBE: Duration = Duration::from_millis(10);
/// Longest gap between probes of an agent that has not been healthy yet. Doubling on to the
/// steady interval would leave an agent that came up just after a probe unseen for as long
/// again (measured: the last of 1000 children added at once waited up to ~150 ms); a refused
/// connection costs microseconds, so probing a starting agent ten times a second is cheap.
pub const STARTING_PROBE_MAX: Duration = Duration::from_millis(100);
/// A ready agent's `/readyz` is asked again every this many liveness probes.
pub const READY_RECHECK_EVERY: u32 = 6;
/// A healthy, ready agent gets the HTTP probe every this many steady intervals; in between,
/// the node's shared listener table (`listeners`) confirms its port still listens. A hang
/// that leaves the port listening is seen by the next HTTP probe, and probes stay HTTP
/// until the agent passes again.
pub const HTTP_EVERY: u32 = 3;

/// Whether a steady tick may let the listener table stand in for the HTTP probe: the agent
/// was healthy and ready with no failure at its last probe, and fewer than `HTTP_EVERY` − 1
/// ticks in a row were already taken that way.
pub fn table_may_answer(healthy: bool, ready: bool, failures: u32, table_ticks: u32) -> bool {
    healthy && ready && failures == 0 && table_ticks + 1 < HTTP_EVERY
}

/// The status code of `GET http://127.0.0.1:<port><path>`, or why there was none.
///
/// Hand-rolled on purpose: a probe needs the status line only, and a thousand agents probed
/// every interval made hyper's client (a connection task and its buffers per probe) the
/// daemon's largest idle cost. The metrics server, which serves, uses hyper.
pub async fn http_status(port: u16, path: &str, timeout: Duration) -> Result<u16, ProbeError> {
    http_get(port, path, timeout, 0).await.map(|(code, _)| code)
}

/// Like `http_status`, plus up to `max_body` bytes of what follows the status line (headers
/// and body, as sent): enough for `/readyz`'s short JSON.
pub async fn http_get(
    port: u16,
    path: &str,
    timeout: Duration,
    max_body: usize,
) -> Result<(u16, Vec<u8>), ProbeError> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fut = async {
        let mut s = TcpStream::connect(("127.0.0.1", port))
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let req =
            format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes())
            .await
            .map_err(|e| format!("request: {e}"))?;
        let mut buf = [0u8; 32];
        let mut n = 0;
        while n < buf.len() && !buf[..n].contains(&b'\n') {
            match s.read(&mut buf[n..]).await {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) => return Err(format!("response: {e}")),
            }
        }
        let code = parse_status_line(&buf[..n]).ok_or_else(|| {
            format!(
                "not an HTTP response: {:?}",
                String::from_utf8_lossy(&buf[..n])
            )
        })?;
        let mut rest = buf[..n].to_vec();
        if max_body > 0 {
            // Read straight into the heap: a buffer on this future's stack would be held by
            // every agent's prober task, body or not.
            rest.reserve(max_body.saturating_sub(rest.len()));
            while rest.len() < max_body {
                let room = max_body - rest.len();
                match (&mut s).take(room as u64).read_buf(&mut rest).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        }
        Ok((code, rest))
    };
    match tokio::time::timeout(timeout, fut).await {
        Ok(r) => r.map_err(ProbeError::Failed),
        Err(_) => Err(ProbeError::Timeout(timeout)),
    }
}

/// Why a probe got no status code. A timeout is told apart: on a CPU-saturated host it may
/// be the host's fault, not the agent's (`failure_counts`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeError {
    Timeout(Duration),
    Failed(String),
}

impl std::fmt::Display for ProbeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ProbeError::Timeout(t) => write!(f, "no answer within {} ms", t.as_millis()),
            ProbeError::Failed(e) => f.write_str(e),
        }
    }
}

/// Timeouts a saturated host may excuse in one run of failed probes before they count again:
/// about 6 intervals (60 s at the default 10 s) more before a hang is acted on, time for a
/// starved gateway to answer again instead of a cold start (~16 CPU-seconds) on a host
/// already short of CPU (`pressure`).
pub const MAX_EXCUSED: u32 = 6;

/// Whether one failed liveness probe counts toward a restart. Only a timeout may be excused,
/// only while the host's CPU is saturated and the node's listener table shows the agent's
/// port still listening (a dead or closed listener is refused, not slow), and at most
/// `MAX_EXCUSED` times in one run of failures, so a real hang is still restarted.
pub fn failure_counts(
    timed_out: bool,
    host_saturated: bool,
    listening: Option<bool>,
    excused: u32,
) -> bool {
    !(timed_out && host_saturated && listening == Some(true) && excused < MAX_EXCUSED)
}

/// Whether a start grace that ran out is given once more: only while the host's CPU is
/// saturated (a cold start slowed by its neighbours, not a gateway that cannot come up), and
/// only once per start, so a start that cannot succeed is still given up on.
pub fn extend_grace(already_extended: bool, host_saturated: bool) -> bool {
    !already_extended && host_saturated
}

/// The channel names in a `/readyz` answer's `"failing"` list (OpenClaw:
/// `{"ready":false,"failing":["telegram"]}`), from the raw response; empty when none.
pub fn failing_from_readyz(raw: &[u8]) -> Vec<String> {
    let text = String::from_utf8_lossy(raw);
    let body = text.split_once("\r\n\r\n").map_or(&*text, |(_, b)| b);
    // Whatever framing (length or chunks): the JSON object is from the first `{` to the last `}`.
    let (Some(a), Some(b)) = (body.find('{'), body.rfind('}')) else {
        return Vec::new();
    };
    if b < a {
        return Vec::new();
    }
    let Ok(v) = serde_json::from_str::<serde_json::Value>(&body[a..=b]) else {
        return Vec::new();
    };
    v.get("failing")
        .and_then(|f| f.as_array())
        .map(|f| {
            f.iter()
                .filter_map(|x| x.as_str())
                .filter(|x| x.len() <= 64 && !x.chars().any(char::is_control))
                .take(32)
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

/// `HTTP/1.x NNN …` → NNN.
pub fn parse_status_line(b: &[u8]) -> Option<u16> {
    let line = std::str::from_utf8(b).ok()?;
    let mut parts = line.split(' ');
    if !parts.next()?.starts_with("HTTP/1.") {
        return None;
    }
    let code = parts.next()?.trim_end();
    (code.len() == 3).then(|| code.parse().ok()).flatten()
}

/// One change worth telling the agent about.
#[derive(Debug, Clone, PartialEq)]
pub struct ProbeReport {
    pub healthy: bool,
    pub ready: bool,
    /// Failed liveness probes that count toward a restart, in this run of failures (0 when
    /// healthy; a report may be unhealthy with 0 when every timeout was excused).
    pub failures: u32,
    /// Timeouts in this run of failures not counted: the host's CPU was saturated and the
    /// port still listened (`failure_counts`).
    pub excused: u32,
    pub latency: Duration,
    pub error: Option<String>,
    /// What `/readyz` listed as failing (channels), when it answered not ready.
    pub failing: Vec<String>,
}

impl ProbeReport {
    /// What an agent whose fleet probes nothing (`health.enabled = false`) counts as once
    /// spawned.
    pub fn unprobed() -> ProbeReport {
        ProbeReport {
            healthy: true,
            ready: true,
            failures: 0,
            excused: 0,
            latency: Duration::ZERO,
            error: None,
            failing: Vec::new(),
        }
    }
}

/// Steady probes wake on a shared grid of this step: a thousand agents' probes then come
/// in 4 runtime wake-ups a second in batches instead of ~100 lone ones (each a worker
/// unpark and an epoll turn). Each probe is due one interval after the last one was, moved
/// up to the next grid point: an interval that is a multiple of the step stays exact.
pub const PROBE_SLOT: Duration = Duration::from_millis(250);

/// The first point of the `slot` grid (counted from `epoch`) at or after `at`, both as
/// offsets from the epoch; a zero slot is no grid.
pub fn on_grid(at: Duration, slot: Duration) -> Duration {
    if slot.is_zero() {
        return at;
    }
    let step = slot.as_nanos();
    let n = at.as_nanos().div_ceil(step);
    Duration::from_nanos((n * step) as u64)
}

/// Where every prober's grid starts: one epoch per process, so all of them share it.
fn grid_epoch() -> tokio::time::Instant {
    static EPOCH: std::sync::OnceLock<tokio::time::Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(tokio::time::Instant::now)
}

/// Next delay of the probe schedule: doubling from `FIRST_PROBE` (at most
/// `STARTING_PROBE_MAX`, and never beyond the steady interval) until the agent has been
/// healthy once, then the steady interval.
pub fn next_delay(current: Duration, ever_healthy: bool, spec: &HealthSpec) -> Duration {
    let steady = Duration::from_millis(spec.interval_ms);
    if ever_healthy {
        steady
    } else {
        (current * 2).min(STARTING_PROBE_MAX).min(steady)
    }
}

/// The node's probe metrics a prober feeds.
#[derive(Clone)]
pub struct ProbeMetrics {
    pub latency: prometheus_client::metrics::histogram::Histogram,
    pub excused: prometheus_client::metrics::counter::Counter,
}

/// Probes until aborted. `report` is called on every change of (healthy, ready, failures,
/// excused, failing).
pub fn spawn_prober(
    port: u16,
    spec: HealthSpec,
    listeners: Option<std::sync::Arc<crate::listeners::ListenerTable>>,
    metrics: Option<ProbeMetrics>,
    report: impl Fn(ProbeReport) + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let timeout = Duration::from_millis(spec.timeout_ms);
        let mut delay = FIRST_PROBE;
        let mut ever_healthy = false;
        let mut last: Option<(bool, bool, u32, u32, Vec<String>)> = None;
        let mut failing: Vec<String> = Vec::new();
        let mut failures = 0u32;
        // Timeouts not counted in this run of failures (`failure_counts`).
        let mut excused = 0u32;
        let mut ready_supported = true;
        let mut ready = false;
        let mut ticks_since_ready_check = 0u32;
        let mut table_ticks = 0u32;
        // When the last steady probe was due: the next is due one interval after it, not
        // after the probe's own answer time, so the grid adds no drift.
        let mut last_due: Option<tokio::time::Instant> = None;
        loop {
            if ever_healthy {
                let epoch = grid_epoch();
                let now = tokio::time::Instant::now();
                let next = last_due
                    .map(|d| d + delay)
                    .filter(|n| *n >= now)
                    .unwrap_or(now + delay);
                // The step is at most a quarter of the interval, so a short one keeps its pace.
                let slot = PROBE_SLOT.min(delay / 4);
                let due = epoch + on_grid(next.saturating_duration_since(epoch), slot);
                last_due = Some(due);
                tokio::time::sleep_until(due).await;
            } else {
                last_due = None;
                tokio::time::sleep(delay).await;
            }
            let clean = last
                .as_ref()
                .is_some_and(|(h, r, f, _, _)| table_may_answer(*h, *r, *f, table_ticks));
            if ever_healthy && clean {
                let listening = listeners
                    .as_ref()
                    .and_then(|t| t.listening(port, delay / 2));
                if listening == Some(true) {
                    table_ticks += 1;
                    continue;
                }
            }
            table_ticks = 0;
            let t0 = std::time::Instant::now();
            let live = http_status(port, "/healthz", timeout).await;
            let latency = t0.elapsed();
            if let Some(m) = &metrics {
                m.latency.observe(latency.as_secs_f64());
            }
            let (healthy, mut error) = match &live {
                Ok(200) => (true, None),
                Ok(code) => (false, Some(format!("/healthz answered {code}"))),
                Err(e) => (false, Some(e.to_string())),
            };
            if healthy {
                failures = 0;
                excused = 0;
            } else {
                // Only a gateway that was healthy before is excused: while it starts, the start
                // grace decides (`extend_grace`), and failures restart nothing.
                let timed_out = ever_healthy && matches!(live, Err(ProbeError::Timeout(_)));
                // Read only once a probe has already timed out: a healthy tick costs nothing.
                let host = timed_out
                    .then(|| crate::pressure::HostCpu::now().saturated())
                    .flatten();
                let listening = match (&host, &listeners) {
                    (Some(_), Some(t)) => t.listening_or_read(port, delay / 2),
                    _ => None,
                };
                if failure_counts(timed_out, host.is_some(), listening, excused) {
                    failures += 1;
                } else {
                    excused += 1;
                    if let Some(m) = &metrics {
                        m.excused.inc();
                    }
                    if let (Some(e), Some(h)) = (&mut error, &host) {
                        e.push_str(&format!(
                            "; not counted: {h} and port {port} still listens ({excused} of {MAX_EXCUSED})"
                        ));
                    }
                }
            }
            // Readiness is only shown: once ready, it is re-checked every few probes, not at
            // each one, which halves the steady probing cost.
            ticks_since_ready_check += 1;
            let check_ready = !ready || ticks_since_ready_check >= READY_RECHECK_EVERY;
            ready = if !healthy {
                false
            } else if !ready_supported {
                true
            } else if check_ready {
                ticks_since_ready_check = 0;
                match http_get(port, "/readyz", timeout, 4096).await {
                    Ok((200, _)) => {
                        failing.clear();
                        true
                    }
                    Ok((404, _)) => {
                        // No readiness endpoint (a foreign program): ready means live.
                        ready_supported = false;
                        true
                    }
                    Ok((_, raw)) => {
                        failing = failing_from_readyz(&raw);
                        false
                    }
                    Err(_) => false,
                }
            } else {
                ready
            };
            ever_healthy |= healthy;
            if !healthy {
                failing.clear();
            }
            // Excused timeouts are part of the key: the agent's status says how many of how many.
            let key = (healthy, ready, failures, excused, failing.clone());
            if last.as_ref() != Some(&key) {
                last = Some(key);
                report(ProbeReport {
                    healthy,
                    ready,
                    failures,
                    excused,
                    latency,
                    error,
                    failing: failing.clone(),
                });
            }
            delay = next_delay(delay, ever_healthy, &spec);
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steady_probes_land_on_the_shared_grid() {
        let ms = Duration::from_millis;
        let cases = [
            (ms(0), ms(250), ms(0)),
            (ms(1), ms(250), ms(250)),
            (ms(250), ms(250), ms(250)),
            (ms(10_001), ms(250), ms(10_250)),
            (ms(10_249), ms(250), ms(10_250)),
            (ms(777), Duration::ZERO, ms(777)),
        ];
        for (at, slot, want) in cases {
            assert_eq!(on_grid(at, slot), want, "{at:?} on a {slot:?} grid");
        }
    }

    #[test]
    fn the_listener_table_stands_in_only_between_http_probes_of_a_clean_agent() {
        // (healthy, ready, failures, table ticks so far) → may the table answer
        let cases = [
            (true, true, 0, 0, true),
            (true, true, 0, 1, true),
            (true, true, 0, 2, false),  // every third tick is HTTP
            (true, false, 0, 0, false), // readiness changes are seen over HTTP
            (false, false, 1, 0, false),
            (true, true, 1, 0, false), // a failure: HTTP until it passes
        ];
        for (h, r, f, t, want) in cases {
            assert_eq!(table_may_answer(h, r, f, t), want, "{h} {r} {f} {t}");
        }
    }

    #[test]
    fn only_a_timeout_on_a_saturated_host_with_the_port_listening_is_excused_for_a_while() {
        // (timed out, host saturated, listening, excused so far) → counts
        let cases = [
            ((true, true, Some(true), 0), false),
            ((true, true, Some(true), MAX_EXCUSED - 1), false),
            ((true, true, Some(true), MAX_EXCUSED), true), // the bound: a hang is still seen
            ((false, true, Some(true), 0), true),          // refused or bad status: the agent's
            ((true, false, Some(true), 0), true),          // an idle host: the agent is slow
            ((true, true, Some(false), 0), true),          // its listener is gone
            ((true, true, None, 0), true),                 // no table: nothing proves it listens
        ];
        for ((t, sat, l, e), want) in cases {
            assert_eq!(failure_counts(t, sat, l, e), want, "{t} {sat} {l:?} {e}");
        }
        assert!(extend_grace(false, true));
        assert!(!extend_grace(true, true));
        assert!(!extend_grace(false, false));
    }

    #[test]
    fn schedule_backs_off_to_the_interval() {
        let spec = HealthSpec {
            interval_ms: 100,
            ..HealthSpec::default()
        };
        let mut d = FIRST_PROBE;
        let mut seen = vec![d];
        for _ in 0..6 {
            d = next_delay(d, false, &spec);
            seen.push(d);
        }
        let ms: Vec<u128> = seen.iter().map(|d| d.as_millis()).collect();
        assert_eq!(ms, [10, 20, 40, 80, 100, 100, 100]);
        assert_eq!(
            next_delay(FIRST_PROBE, true, &spec),
            Duration::from_millis(100)
        );
        // With the default 10 s interval a starting agent is still probed every 100 ms.
        let spec = HealthSpec::default();
        let mut d = FIRST_PROBE;
        for _ in 0..20 {
            d = next_delay(d, false, &spec);
        }
        assert_eq!(d, STARTING_PROBE_MAX);
        assert_eq!(
            next_delay(d, true, &spec),
            Duration::from_millis(spec.interval_ms)
        );
    }

    #[test]
    fn failing_channels_come_from_the_readyz_body() {
        let raw = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: 40\r\n\r\n{\"ready\":false,\"failing\":[\"telegram\"]}";
        assert_eq!(failing_from_readyz(raw), ["telegram"]);
        let chunked = b"HTTP/1.1 503 x\r\ntransfer-encoding: chunked\r\n\r\n2a\r\n{\"ready\":false,\"failing\":[\"telegram\",\"x\"]}\r\n0\r\n\r\n";
        assert_eq!(failing_from_readyz(chunked), ["telegram", "x"]);
        for junk in [
            &b"HTTP/1.1 503 x\r\n\r\nnot json"[..],
            b"",
            b"}{",
            b"{\"failing\":7}",
        ] {
            assert!(failing_from_readyz(junk).is_empty());
        }
    }

    #[test]
    fn status_lines() {
        assert_eq!(parse_status_line(b"HTTP/1.1 200 OK\r\n"), Some(200));
        assert_eq!(parse_status_line(b"HTTP/1.0 503 Service"), Some(503));
        assert_eq!(parse_status_line(b"SSH-2.0-OpenSSH"), None);
        assert_eq!(parse_status_line(b"HTTP/1.1 20"), None);
    }

    #[tokio::test]
    async fn status_of_a_live_server_and_a_closed_port() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut b = [0u8; 256];
            let _ = s.read(&mut b).await;
            let _ = s.write_all(b"HTTP/1.1 204 No Content\r\n\r\n").await;
        });
        assert_eq!(
            http_status(port, "/healthz", Duration::from_secs(2)).await,
            Ok(204)
        );
    }

    #[tokio::test]
    async fn status_of_a_closed_port_is_an_error() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        drop(l);
        let e = http_status(port, "/healthz", Duration::from_millis(500))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("connect"), "{e}");
    }
}
