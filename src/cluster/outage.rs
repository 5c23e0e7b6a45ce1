//! Telling "etcd is down for everyone" from "this node is cut off", without peers.
//!
//! A lease can only expire under a leader, and a member that becomes leader extends every
//! lease by its whole TTL first (etcd's lessor `Promote`). So when every etcd member was seen
//! refusing connections at some moment after `t` (its process not listening: the host's
//! kernel said so), whichever member leads next was down after `t`, and this node's lease
//! cannot expire before `t + TTL`: the probe counts as a renewal sent at `t`. A node that
//! is cut off sees timeouts, not refusals, and stops its agents as before. This holds when
//! the endpoints name every member (checked against etcd's member list), etcd keeps its
//! data, lease checkpointing is off (etcd's default), and no firewall answers etcd's port
//! with a reject: `--etcd-outage stop` is for a network that does.

use std::time::Duration;

/// How long one endpoint's connect may take before it counts as "not refused".
const PROBE_TIMEOUT: Duration = Duration::from_millis(500);

/// `http://host:port/` → `host:port` (lowercase; etcd's default client port when none).
pub fn host_port(url: &str) -> String {
    let rest = url
        .split_once("://")
        .map_or(url, |(_, r)| r)
        .trim_end_matches('/');
    let rest = rest
        .split('/')
        .next()
        .unwrap_or_default()
        .to_ascii_lowercase();
    let has_port = match rest.rfind(':') {
        Some(i) => !rest.ends_with(']') && rest[i + 1..].bytes().all(|b| b.is_ascii_digit()),
        None => false,
    };
    if has_port {
        rest
    } else {
        format!("{rest}:2379")
    }
}

/// Whether every member (its advertised client URLs) has one URL among `endpoints`: only
/// then can refusals from every endpoint mean that no member is up.
pub fn every_member_listed(members: &[Vec<String>], endpoints: &[String]) -> bool {
    let ours: std::collections::BTreeSet<String> = endpoints.iter().map(|e| host_port(e)).collect();
    !members.is_empty()
        && members
            .iter()
            .all(|urls| urls.iter().any(|u| ours.contains(&host_port(u))))
}

/// Whether every endpoint refuses a TCP connection now (the first that does not, by
/// accepting, timing out or failing otherwise, ends the probe with `false`).
pub async fn every_endpoint_refuses(endpoints: &[String]) -> bool {
    for e in endpoints {
        let addr = host_port(e);
        match tokio::time::timeout(PROBE_TIMEOUT, tokio::net::TcpStream::connect(&addr)).await {
            Ok(Err(err)) if err.kind() == std::io::ErrorKind::ConnectionRefused => {}
            _ => return false,
        }
    }
    !endpoints.is_empty()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_compare_by_host_and_port() {
        let cases = [
            ("http://127.0.0.1:2379", "127.0.0.1:2379"),
            ("https://Etcd-1.example:2379/", "etcd-1.example:2379"),
            ("http://etcd", "etcd:2379"),
            ("http://[::1]:2381", "[::1]:2381"),
            ("http://[::1]", "[::1]:2379"),
        ];
        for (url, want) in cases {
            assert_eq!(host_port(url), want, "{url}");
        }
    }

    #[test]
    fn refusals_mean_etcd_is_down_only_when_every_member_is_listed() {
        let v = |s: &[&str]| s.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let members = vec![
            v(&["http://127.0.0.1:2379"]),
            v(&["http://127.0.0.1:2381", "http://10.0.0.2:2379"]),
        ];
        let cases = [
            (v(&["http://127.0.0.1:2379", "http://10.0.0.2:2379"]), true),
            (
                v(&["http://127.0.0.1:2379", "http://127.0.0.1:2381/"]),
                true,
            ),
            // One member unnamed: it may lead, and expire this lease, unseen.
            (v(&["http://127.0.0.1:2379"]), false),
            // A load balancer in front of the members names none of them.
            (v(&["http://etcd-vip:2379"]), false),
        ];
        for (endpoints, want) in cases {
            assert_eq!(
                every_member_listed(&members, &endpoints),
                want,
                "{endpoints:?}"
            );
        }
        assert!(!every_member_listed(&[], &v(&["http://127.0.0.1:2379"])));
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
        assert!(every_endpoint_refuses(std::slice::from_ref(&closed_at)).await);
        assert!(!every_endpoint_refuses(&[closed_at.clone(), open_at.clone()]).await);
        assert!(!every_endpoint_refuses(&[open_at]).await);
        assert!(!every_endpoint_refuses(&[]).await);
    }
}
