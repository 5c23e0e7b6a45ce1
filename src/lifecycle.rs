//! The agent's lifecycle transitions as plain functions: what the end of a process means,
//! given why it was being stopped (if it was), and whether a new stop reason overrides the one
//! in progress. The AgentActor carries the answers out; `restart::decide` takes over when an
//! exit counts as a crash.

use crate::restart::ExitCause;
use crate::state::ExitInfo;

/// Why the supervisor is stopping the current process.
#[derive(Debug, Clone, PartialEq)]
pub enum Purpose {
    /// Operator or fleet stop: end in `stopped`.
    Stop,
    /// Stop then start again, without counting a restart (operator, strategy, token rotation).
    Restart,
    /// The fleet gave up: end in `failed`.
    Fail(String),
    /// Liveness failed: counts as a crash.
    Health,
    /// Over max_memory: counts as a crash.
    Memory,
}

/// What follows the end of the agent's main process.
#[derive(Debug, Clone, PartialEq)]
pub enum Next {
    /// It counts as a crash (or a clean exit nobody asked for): ask `restart::decide`.
    Decide(ExitCause),
    /// Settle in `stopped` and answer the stops waiting.
    Stopped,
    /// Settle in `failed` with this reason and answer the stops waiting.
    Failed(String),
    /// Start again at once (a restart that was asked for), counting nothing.
    StartAgain,
}

/// The exit `exit` of a process that was being stopped for `purpose` (`None`: nobody asked).
pub fn after_exit(purpose: Option<Purpose>, exit: ExitInfo, want_running: bool) -> Next {
    match purpose {
        None => Next::Decide(ExitCause::Exited(exit)),
        Some(Purpose::Health) => Next::Decide(ExitCause::HealthFailed),
        Some(Purpose::Memory) => Next::Decide(ExitCause::MemoryLimit),
        Some(Purpose::Stop) => Next::Stopped,
        Some(Purpose::Fail(reason)) => Next::Failed(reason),
        Some(Purpose::Restart) if want_running => Next::StartAgain,
        Some(Purpose::Restart) => Next::Stopped,
    }
}

/// Whether a stop for `new` replaces the one in progress: an operator's stop or the fleet's
/// failure is never turned back into a restart by a later restart, probe or memory reason.
pub fn replaces(current: Option<&Purpose>, new: &Purpose) -> bool {
    let final_stop = matches!(current, Some(Purpose::Stop) | Some(Purpose::Fail(_)));
    let restarting = matches!(new, Purpose::Restart | Purpose::Health | Purpose::Memory);
    !(final_stop && restarting)
}

/// An OpenClaw gateway counts a SIGTERM in its first seconds as an unclean exit, and three
/// of those in five minutes trip its crash-loop breaker, which keeps every channel off while
/// its probes stay green (OPENCLAW.md). A restart asked for that early waits until then.
pub const EARLY_STOP_HOLD: std::time::Duration = std::time::Duration::from_secs(5);

/// How long to hold a stop of a process `age` old before its SIGTERM: only restarts of an
/// OpenClaw gateway young enough to count it as unclean. A stop that ends the agent, a
/// failed probe or the memory limit are never held.
pub fn hold_before_stop(
    purpose: &Purpose,
    runs_openclaw: bool,
    age: std::time::Duration,
) -> Option<std::time::Duration> {
    (runs_openclaw && matches!(purpose, Purpose::Restart) && age < EARLY_STOP_HOLD)
        .then(|| EARLY_STOP_HOLD - age)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_an_exit_means() {
        let sig = ExitInfo::Signal(9);
        let cases = [
            (None, true, Next::Decide(ExitCause::Exited(sig))),
            (None, false, Next::Decide(ExitCause::Exited(sig))),
            (
                Some(Purpose::Health),
                true,
                Next::Decide(ExitCause::HealthFailed),
            ),
            (
                Some(Purpose::Memory),
                true,
                Next::Decide(ExitCause::MemoryLimit),
            ),
            (Some(Purpose::Stop), true, Next::Stopped),
            (
                Some(Purpose::Fail("f".into())),
                true,
                Next::Failed("f".into()),
            ),
            (Some(Purpose::Restart), true, Next::StartAgain),
            (Some(Purpose::Restart), false, Next::Stopped),
        ];
        for (purpose, want_running, want) in cases {
            assert_eq!(
                after_exit(purpose.clone(), sig, want_running),
                want,
                "{purpose:?} want_running={want_running}"
            );
        }
    }

    #[test]
    fn only_early_restarts_of_a_gateway_are_held() {
        use std::time::Duration as D;
        let cases = [
            (
                Purpose::Restart,
                true,
                D::from_secs(1),
                Some(D::from_secs(4)),
            ),
            (Purpose::Restart, true, D::from_secs(5), None),
            (Purpose::Restart, false, D::from_secs(1), None),
            (Purpose::Stop, true, D::from_secs(1), None),
            (Purpose::Health, true, D::ZERO, None),
            (Purpose::Memory, true, D::ZERO, None),
        ];
        for (p, oc, age, want) in cases {
            assert_eq!(hold_before_stop(&p, oc, age), want, "{p:?} {oc} {age:?}");
        }
    }

    #[test]
    fn a_final_stop_is_never_turned_back_into_a_restart() {
        use Purpose::*;
        let fail = Fail("x".into());
        let cases = [
            (None, Stop, true),
            (None, Restart, true),
            (Some(Restart), Stop, true),
            (Some(Restart), Health, true),
            (Some(Health), Stop, true),
            (Some(Stop), Restart, false),
            (Some(Stop), Health, false),
            (Some(Stop), Memory, false),
            (Some(fail.clone()), Restart, false),
            (Some(Stop), fail.clone(), true),
            (Some(fail.clone()), Stop, true),
        ];
        for (current, new, want) in cases {
            assert_eq!(
                replaces(current.as_ref(), &new),
                want,
                "{current:?} then {new:?}"
            );
        }
    }
}
