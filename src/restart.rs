//! Restart policy of one agent as a plain function: restart type, the exit-78 rule, restart
//! intensity and exponential backoff with jitter. The AgentActor only carries out the
//! `Decision`; everything here is testable without processes or clocks.

use crate::spec::{BackoffSpec, FleetSpec, Intensity, RestartType};
use crate::state::{ExitInfo, EXIT_CONFIG};
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Why the process is gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitCause {
    /// The process ended by itself (or by a signal nobody here sent).
    Exited(ExitInfo),
    /// Liveness probes failed; the supervisor killed it.
    HealthFailed,
    /// The process tree stayed above the fleet's `max_memory`; the supervisor killed it.
    MemoryLimit,
    /// The start itself failed (provisioning, admission, spawn); `permanent` when what was
    /// asked for is at fault and no retry can fix it.
    StartFailed { permanent: bool },
}

impl ExitCause {
    fn abnormal(self) -> bool {
        match self {
            ExitCause::Exited(e) => !e.is_clean(),
            ExitCause::HealthFailed | ExitCause::MemoryLimit | ExitCause::StartFailed { .. } => {
                true
            }
        }
    }

    pub fn describe(self) -> String {
        match self {
            ExitCause::Exited(ExitInfo::Code(EXIT_CONFIG)) => {
                "exit 78 (EX_CONFIG): config, lock or port conflict".into()
            }
            ExitCause::Exited(e) => e.to_string(),
            ExitCause::HealthFailed => "health check failed".into(),
            ExitCause::MemoryLimit => "memory limit".into(),
            ExitCause::StartFailed { .. } => "start failed".into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    Restart {
        after: Duration,
    },
    /// Not restarted, and that is a failure (escalates to the fleet).
    GiveUp {
        reason: String,
    },
    /// Not restarted by policy (temporary, or transient after a clean exit).
    Stay {
        reason: String,
    },
}

/// What the policy remembers about one agent's past restarts.
#[derive(Debug, Clone, Default)]
pub struct History {
    /// Restart times, oldest first, trimmed to the intensity window.
    restarts: VecDeque<Instant>,
    /// Failures since the agent last stayed healthy for `reset_after_s`.
    pub consecutive: u32,
}

impl History {
    /// Records that a restart was carried out.
    pub fn record_restart(&mut self, now: Instant, window: Duration) {
        self.trim(now, window);
        self.restarts.push_back(now);
        self.consecutive += 1;
    }

    fn trim(&mut self, now: Instant, window: Duration) {
        while let Some(&t) = self.restarts.front() {
            if now.saturating_duration_since(t) > window {
                self.restarts.pop_front();
            } else {
                break;
            }
        }
    }

    /// Restarts within `window` before `now`.
    pub fn recent(&self, now: Instant, window: Duration) -> usize {
        self.restarts
            .iter()
            .filter(|&&t| now.saturating_duration_since(t) <= window)
            .count()
    }

    /// Forgets everything: an operator's explicit start gives a fresh budget.
    pub fn reset(&mut self) {
        self.restarts.clear();
        self.consecutive = 0;
    }
}

/// Decides what happens after the agent's process is gone.
///
/// `healthy_for` is how long the process had been continuously healthy before it ended
/// (`None` if it never became healthy). `rand01` is a random number in `[0, 1)` for jitter.
pub fn decide(
    spec: &FleetSpec,
    history: &History,
    cause: ExitCause,
    healthy_for: Option<Duration>,
    now: Instant,
    rand01: f64,
) -> Decision {
    if cause == (ExitCause::StartFailed { permanent: true }) {
        return Decision::GiveUp {
            reason: "start failed on what was asked for; not retried".into(),
        };
    }
    if cause == ExitCause::Exited(ExitInfo::Code(EXIT_CONFIG)) {
        return Decision::GiveUp {
            reason: format!("{}; not restarted", cause.describe()),
        };
    }
    match spec.restart {
        RestartType::Temporary => {
            return Decision::Stay {
                reason: format!("{}; restart=temporary", cause.describe()),
            }
        }
        RestartType::Transient if !cause.abnormal() => {
            return Decision::Stay {
                reason: format!("{}; restart=transient", cause.describe()),
            }
        }
        _ => {}
    }
    if intensity_exceeded(&spec.intensity, history, now) {
        return Decision::GiveUp {
            reason: format!(
                "{}; restart intensity exceeded ({} restarts within {}s)",
                cause.describe(),
                spec.intensity.max_restarts,
                spec.intensity.window_s
            ),
        };
    }
    let reset = healthy_for.is_some_and(|h| h >= Duration::from_secs(spec.backoff.reset_after_s));
    let consecutive = if reset { 0 } else { history.consecutive };
    Decision::Restart {
        after: backoff_delay(&spec.backoff, consecutive + 1, rand01),
    }
}

/// True when one more restart would exceed `max_restarts` within the window.
pub fn intensity_exceeded(intensity: &Intensity, history: &History, now: Instant) -> bool {
    history.recent(now, intensity.window()) >= intensity.max_restarts as usize
}

/// Delay before the `n`-th consecutive restart (n >= 1): the first is immediate (a crash after
/// a healthy run costs no waiting, as in OTP and PM2), then `initial * multiplier^(n-2)`,
/// capped, with `±jitter` applied and the cap held.
pub fn backoff_delay(b: &BackoffSpec, n: u32, rand01: f64) -> Duration {
    if n <= 1 {
        return Duration::ZERO;
    }
    let exp = (n - 2).min(64) as i32;
    let base = (b.initial_ms as f64 * b.multiplier.powi(exp)).min(b.max_ms as f64);
    let jittered = base * (1.0 + b.jitter * (2.0 * rand01.clamp(0.0, 1.0) - 1.0));
    Duration::from_millis(jittered.clamp(0.0, b.max_ms as f64).round() as u64)
}

/// The fleet-level intensity: agents that gave up within the window.
#[derive(Debug, Clone, Default)]
pub struct FleetHistory {
    failures: History,
}

impl FleetHistory {
    /// Records one escalated agent failure; true when the fleet itself must give up.
    pub fn escalate(&mut self, intensity: &Intensity, now: Instant) -> bool {
        let exceeded = intensity_exceeded(intensity, &self.failures, now);
        self.failures.record_restart(now, intensity.window());
        exceeded
    }

    pub fn reset(&mut self) {
        self.failures.reset();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> FleetSpec {
        let mut s = FleetSpec::new("f");
        s.backoff = BackoffSpec {
            initial_ms: 100,
            max_ms: 1_000,
            multiplier: 2.0,
            jitter: 0.0,
            reset_after_s: 10,
        };
        s.intensity = Intensity {
            max_restarts: 3,
            window_s: 60,
        };
        s
    }

    const CRASH: ExitCause = ExitCause::Exited(ExitInfo::Code(1));

    #[test]
    fn a_failed_start_follows_the_restart_policy_unless_it_is_permanent() {
        let spec = FleetSpec::new("f");
        let now = Instant::now();
        let transient = ExitCause::StartFailed { permanent: false };
        let history = History::default();
        assert_eq!(
            decide(&spec, &history, transient, None, now, 0.5),
            Decision::Restart {
                after: Duration::ZERO
            }
        );
        assert!(matches!(
            decide(
                &spec,
                &history,
                ExitCause::StartFailed { permanent: true },
                None,
                now,
                0.5
            ),
            Decision::GiveUp { .. }
        ));
        let mut temp = spec.clone();
        temp.restart = RestartType::Temporary;
        assert!(matches!(
            decide(&temp, &history, transient, None, now, 0.5),
            Decision::Stay { .. }
        ));
        let mut busy = History::default();
        for _ in 0..spec.intensity.max_restarts {
            busy.record_restart(now, spec.intensity.window());
        }
        assert!(matches!(
            decide(&spec, &busy, transient, None, now, 0.5),
            Decision::GiveUp { .. }
        ));
    }

    #[test]
    fn backoff_schedule_table() {
        let b = spec().backoff;
        let cases = [
            (1, 0),
            (2, 100),
            (3, 200),
            (4, 400),
            (5, 800),
            (6, 1000),
            (40, 1000),
        ];
        for (n, ms) in cases {
            assert_eq!(
                backoff_delay(&b, n, 0.5),
                Duration::from_millis(ms),
                "n={n}"
            );
        }
    }

    #[test]
    fn jitter_stays_within_bounds_and_cap() {
        let mut b = spec().backoff;
        b.jitter = 0.5;
        assert_eq!(backoff_delay(&b, 3, 0.0), Duration::from_millis(100));
        assert_eq!(backoff_delay(&b, 3, 1.0), Duration::from_millis(300));
        // the cap holds even with jitter upwards
        assert_eq!(backoff_delay(&b, 10, 1.0), Duration::from_millis(1000));
    }

    #[test]
    fn decisions_table() {
        let now = Instant::now();
        let mut h = History::default();
        let s = spec();
        assert_eq!(
            decide(&s, &h, CRASH, None, now, 0.5),
            Decision::Restart {
                after: Duration::ZERO
            }
        );
        h.record_restart(now, s.intensity.window());
        assert_eq!(
            decide(&s, &h, CRASH, None, now, 0.5),
            Decision::Restart {
                after: Duration::from_millis(100)
            }
        );
        // healthy long enough: consecutive count resets, restart at once
        assert_eq!(
            decide(&s, &h, CRASH, Some(Duration::from_secs(10)), now, 0.5),
            Decision::Restart {
                after: Duration::ZERO
            }
        );
        h.record_restart(now, s.intensity.window());
        h.record_restart(now, s.intensity.window());
        match decide(&s, &h, CRASH, None, now, 0.5) {
            Decision::GiveUp { reason } => assert!(reason.contains("intensity"), "{reason}"),
            d => panic!("expected GiveUp, got {d:?}"),
        }
        // outside the window the budget is back
        let later = now + Duration::from_secs(61);
        assert!(matches!(
            decide(&s, &h, CRASH, None, later, 0.5),
            Decision::Restart { .. }
        ));
    }

    #[test]
    fn exit_78_is_never_restarted_whatever_the_type() {
        for t in [
            RestartType::Permanent,
            RestartType::Transient,
            RestartType::Temporary,
        ] {
            let mut s = spec();
            s.restart = t;
            let d = decide(
                &s,
                &History::default(),
                ExitCause::Exited(ExitInfo::Code(78)),
                None,
                Instant::now(),
                0.5,
            );
            match d {
                Decision::GiveUp { reason } => assert!(reason.contains("78"), "{reason}"),
                d => panic!("{t:?}: {d:?}"),
            }
        }
    }

    #[test]
    fn restart_types() {
        let now = Instant::now();
        let h = History::default();
        let clean = ExitCause::Exited(ExitInfo::Code(0));
        let sig = ExitCause::Exited(ExitInfo::Signal(9));
        let mut s = spec();
        s.restart = RestartType::Transient;
        assert!(matches!(
            decide(&s, &h, clean, None, now, 0.5),
            Decision::Stay { .. }
        ));
        assert!(matches!(
            decide(&s, &h, sig, None, now, 0.5),
            Decision::Restart { .. }
        ));
        assert!(matches!(
            decide(&s, &h, ExitCause::HealthFailed, None, now, 0.5),
            Decision::Restart { .. }
        ));
        s.restart = RestartType::Temporary;
        assert!(matches!(
            decide(&s, &h, sig, None, now, 0.5),
            Decision::Stay { .. }
        ));
        s.restart = RestartType::Permanent;
        assert!(matches!(
            decide(&s, &h, clean, None, now, 0.5),
            Decision::Restart { .. }
        ));
    }

    #[test]
    fn fleet_intensity() {
        let i = Intensity {
            max_restarts: 2,
            window_s: 60,
        };
        let now = Instant::now();
        let mut f = FleetHistory::default();
        assert!(!f.escalate(&i, now));
        assert!(!f.escalate(&i, now));
        assert!(f.escalate(&i, now));
        let mut g = FleetHistory::default();
        g.escalate(&i, now);
        g.escalate(&i, now);
        assert!(!g.escalate(&i, now + Duration::from_secs(61)));
    }
}
