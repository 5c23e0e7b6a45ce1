//! HTTP probes of an agent's own port: liveness (`/healthz`, drives restarts) and readiness
//! (`/readyz`, shown only). The prober is a small task per agent that probes soon after the
//! spawn, backs off to the steady interval, and reports only changes, so a thousand idle
//! agents cost a thousand timers and no mailbox traffic.

use crate::spec::HealthSpec;
use bytes::Bytes;
use http_body_util::Empty;
use std::time::Duration;
use tokio::net::TcpStream;

/// First probe this soon after the spawn; the delay doubles until the steady interval.
pub const FIRST_PROBE: Duration = Duration::from_millis(10);

/// The status code of `GET http://127.0.0.1:<port><path>`, or why there was none.
pub async fn http_status(port: u16, path: &str, timeout: Duration) -> Result<u16, String> {
    let fut = async {
        let stream = TcpStream::connect(("127.0.0.1", port))
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let io = hyper_util::rt::TokioIo::new(stream);
        let (mut sender, conn) = hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(io)
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        let conn_task = tokio::spawn(conn);
        let req = hyper::Request::get(path)
            .header(hyper::header::HOST, format!("127.0.0.1:{port}"))
            .body(Empty::new())
            .map_err(|e| e.to_string())?;
        let res = sender
            .send_request(req)
            .await
            .map_err(|e| format!("request: {e}"));
        conn_task.abort();
        Ok(res?.status().as_u16())
    };
    match tokio::time::timeout(timeout, fut).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer within {} ms", timeout.as_millis())),
    }
}

/// One change worth telling the agent about.
#[derive(Debug, Clone, PartialEq)]
pub struct ProbeReport {
    pub healthy: bool,
    pub ready: bool,
    /// Failed liveness probes in a row (0 when healthy).
    pub failures: u32,
    pub latency: Duration,
    pub error: Option<String>,
}

/// Next delay of the probe schedule: doubling from `FIRST_PROBE` until the agent has been
/// healthy once, then the steady interval.
pub fn next_delay(current: Duration, ever_healthy: bool, spec: &HealthSpec) -> Duration {
    let steady = Duration::from_millis(spec.interval_ms);
    if ever_healthy {
        steady
    } else {
        (current * 2).min(steady)
    }
}

/// Probes until aborted. `report` is called on every change of (healthy, ready, failures).
pub fn spawn_prober(
    port: u16,
    spec: HealthSpec,
    latency_histogram: Option<prometheus_client::metrics::histogram::Histogram>,
    report: impl Fn(ProbeReport) + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let timeout = Duration::from_millis(spec.timeout_ms);
        let mut delay = FIRST_PROBE;
        let mut ever_healthy = false;
        let mut last: Option<(bool, bool, u32)> = None;
        let mut failures = 0u32;
        let mut ready_supported = true;
        loop {
            tokio::time::sleep(delay).await;
            let t0 = std::time::Instant::now();
            let live = http_status(port, "/healthz", timeout).await;
            let latency = t0.elapsed();
            if let Some(h) = &latency_histogram {
                h.observe(latency.as_secs_f64());
            }
            let (healthy, error) = match live {
                Ok(200) => (true, None),
                Ok(code) => (false, Some(format!("/healthz answered {code}"))),
                Err(e) => (false, Some(e)),
            };
            failures = if healthy { 0 } else { failures + 1 };
            let ready = if healthy && ready_supported {
                match http_status(port, "/readyz", timeout).await {
                    Ok(200) => true,
                    Ok(404) => {
                        // No readiness endpoint (a foreign program): ready means live.
                        ready_supported = false;
                        true
                    }
                    _ => false,
                }
            } else {
                healthy
            };
            ever_healthy |= healthy;
            let key = (healthy, ready, failures);
            if last != Some(key) {
                last = Some(key);
                report(ProbeReport {
                    healthy,
                    ready,
                    failures,
                    latency,
                    error,
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
    }

    #[tokio::test]
    async fn status_of_a_closed_port_is_an_error() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        drop(l);
        let e = http_status(port, "/healthz", Duration::from_millis(500))
            .await
            .unwrap_err();
        assert!(e.contains("connect"), "{e}");
    }
}
