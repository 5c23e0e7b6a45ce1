//! The state of each messaging channel (Telegram, …) an agent's config sets up, as `status`,
//! events and metrics show it. A gateway whose process is healthy may still have a dead bot
//! (a bad or revoked token: OpenClaw's `/readyz` is 503 with the channel in `failing` while
//! `/healthz` stays 200), so this is told apart from the agent's own state. A plain function,
//! table-tested below; the agent actor feeds it what its prober saw.

use crate::state::AgentState;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChannelState {
    /// The gateway runs and has not reported this channel up yet.
    Starting,
    Ready,
    /// The gateway reports it failing (after it was up, or past the start grace).
    Failed,
    /// The agent does not run.
    Stopped,
    /// OpenClaw's crash-loop breaker keeps it off while the gateway's probes stay green.
    Off,
}

impl std::fmt::Display for ChannelState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ChannelState::Starting => "starting",
            ChannelState::Ready => "ready",
            ChannelState::Failed => "failed",
            ChannelState::Stopped => "stopped",
            ChannelState::Off => "off",
        })
    }
}

/// One channel in `status --json`'s `channels`. Field names are a contract.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelStatus {
    pub state: ChannelState,
    pub error: Option<String>,
}

/// What the agent's prober and lifecycle say, for `channel_states`.
#[derive(Debug, Clone, Default)]
pub struct Seen<'a> {
    pub running: bool,
    pub ready: bool,
    /// This incarnation was ready once.
    pub was_ready: bool,
    pub failing: &'a [String],
    /// How long this incarnation has run.
    pub up_for: Duration,
    /// How long a start may take before a failing channel counts as failed.
    pub grace: Duration,
    /// This incarnation's stderr said the crash-loop breaker tripped.
    pub breaker: bool,
}

/// Each configured channel's state.
pub fn channel_states(configured: &[String], seen: &Seen) -> BTreeMap<String, ChannelStatus> {
    configured
        .iter()
        .map(|c| {
            let listed = seen.failing.iter().any(|f| f == c);
            let (state, error) = if !seen.running {
                (ChannelState::Stopped, None)
            } else if seen.breaker {
                (
                    ChannelState::Off,
                    Some("OpenClaw's crash-loop breaker tripped (3 unclean exits within 5 minutes): it keeps every channel off until those exits age out, while /healthz and /readyz stay 200; restart the agent after that".into()),
                )
            } else if seen.ready {
                (ChannelState::Ready, None)
            } else if listed && (seen.was_ready || seen.up_for >= seen.grace) {
                (
                    ChannelState::Failed,
                    Some(format!(
                        "the gateway's /readyz lists {c} as failing (bad or revoked token, or the channel was disconnected); `fleetctl exec <fleet>/<agent> -- openclaw channels status --json` tells more"
                    )),
                )
            } else if seen.was_ready && !seen.failing.is_empty() {
                // Not listed while others fail: still up.
                (ChannelState::Ready, None)
            } else {
                (ChannelState::Starting, None)
            };
            (c.clone(), ChannelStatus { state, error })
        })
        .collect()
}

/// The states a transition is worth an event for: what changed, by channel.
pub fn changed<'a>(
    old: &BTreeMap<String, ChannelStatus>,
    new: &'a BTreeMap<String, ChannelStatus>,
) -> Vec<(&'a String, &'a ChannelStatus)> {
    new.iter()
        .filter(|(k, v)| old.get(*k).map(|o| o.state) != Some(v.state))
        .collect()
}

/// The agent's state counts as running for its channels.
pub fn process_running(s: AgentState) -> bool {
    matches!(
        s,
        AgentState::Starting | AgentState::Running | AgentState::Unhealthy
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use ChannelState::*;

    #[test]
    fn states_from_what_the_prober_saw() {
        let tg = vec!["telegram".to_string()];
        let failing = vec!["telegram".to_string()];
        let other = vec!["discord".to_string()];
        let none: Vec<String> = vec![];
        let grace = Duration::from_secs(60);
        let at = |s| Duration::from_secs(s);
        let cases: Vec<(&str, Seen, ChannelState)> = vec![
            (
                "not running",
                Seen {
                    running: false,
                    ready: true,
                    grace,
                    ..Seen::default()
                },
                Stopped,
            ),
            (
                "ready",
                Seen {
                    running: true,
                    ready: true,
                    grace,
                    ..Seen::default()
                },
                Ready,
            ),
            (
                "early, listed",
                Seen {
                    running: true,
                    failing: &failing,
                    up_for: at(5),
                    grace,
                    ..Seen::default()
                },
                Starting,
            ),
            (
                "early, nothing listed",
                Seen {
                    running: true,
                    failing: &none,
                    up_for: at(500),
                    grace,
                    ..Seen::default()
                },
                Starting,
            ),
            (
                "past grace, listed",
                Seen {
                    running: true,
                    failing: &failing,
                    up_for: at(61),
                    grace,
                    ..Seen::default()
                },
                Failed,
            ),
            (
                "revoked after ready",
                Seen {
                    running: true,
                    was_ready: true,
                    failing: &failing,
                    up_for: at(5),
                    grace,
                    ..Seen::default()
                },
                Failed,
            ),
            (
                "another one failing",
                Seen {
                    running: true,
                    was_ready: true,
                    failing: &other,
                    up_for: at(5),
                    grace,
                    ..Seen::default()
                },
                Ready,
            ),
        ];
        for (what, seen, want) in cases {
            let got = channel_states(&tg, &seen);
            assert_eq!(got["telegram"].state, want, "{what}");
            assert_eq!(
                got["telegram"].error.is_some(),
                matches!(want, Failed | Off),
                "{what}"
            );
        }
        assert!(channel_states(&[], &Seen::default()).is_empty());
    }

    #[test]
    fn only_changed_states_are_events() {
        let s = |st| ChannelStatus {
            state: st,
            error: None,
        };
        let old: BTreeMap<_, _> = [("a".to_string(), s(Ready)), ("b".to_string(), s(Ready))].into();
        let new: BTreeMap<_, _> =
            [("a".to_string(), s(Ready)), ("b".to_string(), s(Failed))].into();
        let c = changed(&old, &new);
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].0, "b");
    }
}
