//! Telling "etcd is down for everyone" from "this node is cut off", without peers.
//!
//! A lease can only expire under a leader, and a member that becomes leader extends every
//! lease by its whole TTL first (etcd's lessor `Promote`). So when every etcd member was seen
//! refusing connections at some moment after `t` (its process not listening: the host's
//! kernel said so), whichever member leads next was down after `t`, and this node's lease
//! cannot expire before `t + TTL`: the probe counts as a renewal sent at `t` (its refusals
//! all within half the fence's margin of `t`). A node that is cut off sees timeouts, not
//! refusals, and stops its agents as before. This holds when every voting member is reached
//! through one of the endpoints (each endpoint asked which member it is, against etcd's
//! member list, while etcd answers), etcd keeps its data, lease checkpointing is off
//! (etcd's default), and no firewall answers etcd's port with a reject: `--etcd-outage stop`
//! is for a network that does.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

/// How long one endpoint's connect may take before it counts as "not refused".
const PROBE_TIMEOUT: Duration = Duration::from_millis(500);

/// `http://host:port/` → `host:port` (lowercase). `None` without an explicit port: the
/// client's default (80 or 443) and etcd's (2379) differ, so what would be probed is not
/// surely what the client uses, and such a node does not ride out.
pub fn host_port(url: &str) -> Option<String> {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let rest = rest
        .split('/')
        .next()
        .unwrap_or_default()
        .to_ascii_lowercase();
    if rest.contains('@') {
        return None;
    }
    let i = rest.rfind(':')?;
    let port = &rest[i + 1..];
    (!rest.ends_with(']') && !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()))
        .then_some(rest)
}

/// Whether refusals from every endpoint can mean that no etcd member is up: every endpoint
/// has an explicit port and answered as one member (`reached`: endpoint → member id), and
/// every voting member is one of those (learners never lead).
pub fn every_member_reached(
    voting: &BTreeSet<u64>,
    reached: &BTreeMap<String, u64>,
    endpoints: &[String],
) -> bool {
    let ids: BTreeSet<u64> = reached.values().copied().collect();
    !voting.is_empty()
        && endpoints
            .iter()
            .all(|e| host_port(e).is_some() && reached.contains_key(e))
        && voting.is_subset(&ids)
}

/// Whether every endpoint refuses a TCP connection, all within `within` of the start (the
/// probes run side by side; anything that accepts, times out or fails otherwise, or a
/// probe slower than `within`, gives `false`).
pub async fn every_endpoint_refuses(endpoints: &[String], within: Duration) -> bool {
    let began = tokio::time::Instant::now();
    let mut probes = tokio::task::JoinSet::new();
    for e in endpoints {
        let Some(addr) = host_port(e) else {
            return false;
        };
        probes.spawn(async move {
            matches!(
                tokio::time::timeout(PROBE_TIMEOUT, tokio::net::TcpStream::connect(addr)).await,
                Ok(Err(err)) if err.kind() == std::io::ErrorKind::ConnectionRefused
            )
        });
    }
    let mut all = !endpoints.is_empty();
    while let Some(refused) = probes.join_next().await {
        all &= refused.unwrap_or(false);
    }
    all && began.elapsed() <= within
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_compare_by_host_and_port() {
        let cases = [
            ("http://127.0.0.1:2379", Some("127.0.0.1:2379")),
            ("https://Etcd-1.example:2379/", Some("etcd-1.example:2379")),
            ("http://[::1]:2381", Some("[::1]:2381")),
            // No explicit port: the client's default is not etcd's.
            ("http://etcd", None),
            ("http://[::1]", None),
            ("http://etcd:", None),
            ("http://user:pw@etcd:2379", None),
        ];
        for (url, want) in cases {
            assert_eq!(host_port(url).as_deref(), want, "{url}");
        }
    }

    #[test]
    fn refusals_mean_etcd_is_down_only_when_every_voting_member_is_reached() {
        let v = |s: &[&str]| s.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let at = |pairs: &[(&str, u64)]| -> BTreeMap<String, u64> {
            pairs.iter().map(|(e, id)| (e.to_string(), *id)).collect()
        };
        let voting: BTreeSet<u64> = [1, 2].into_iter().collect();
        let (e1, e2) = ("http://127.0.0.1:2379", "http://127.0.0.1:2381");
        let cases = [
            (v(&[e1, e2]), at(&[(e1, 1), (e2, 2)]), true),
            // One member reached by no endpoint (two reach the same one).
            (v(&[e1, e2]), at(&[(e1, 1), (e2, 1)]), false),
            // An endpoint that did not answer: which member it is, is unknown.
            (v(&[e1, e2]), at(&[(e1, 1)]), false),
            (v(&[e1]), at(&[(e1, 1)]), false),
            // Without a port it cannot be probed as the client uses it.
            (
                v(&[e1, "http://etcd"]),
                at(&[(e1, 1), ("http://etcd", 2)]),
                false,
            ),
        ];
        for (endpoints, reached, want) in cases {
            assert_eq!(
                every_member_reached(&voting, &reached, &endpoints),
                want,
                "{endpoints:?} {reached:?}"
            );
        }
        assert!(!every_member_reached(
            &BTreeSet::new(),
            &at(&[(e1, 1)]),
            &v(&[e1])
        ));
    }

    #[tokio::test]
    async fn a_closed_port_refuses_and_a_listening_one_does_not() {
        let open = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (open_at, closed_at) = (
            format!("http://{}", open.local_addr().unwrap()),
            format!("http://{}", closed.local_addr().unwrap()),
        );
        drop(closed);
        let s = Duration::from_secs(1);
        assert!(every_endpoint_refuses(std::slice::from_ref(&closed_at), s).await);
        assert!(!every_endpoint_refuses(&[closed_at.clone(), open_at.clone()], s).await);
        assert!(!every_endpoint_refuses(std::slice::from_ref(&open_at), s).await);
        assert!(!every_endpoint_refuses(&[], s).await);
        // Refused, but not within the bound: not proof of one moment.
        assert!(!every_endpoint_refuses(&[closed_at], Duration::ZERO).await);
    }
}
