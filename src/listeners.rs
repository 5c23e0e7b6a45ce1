//! Which TCP ports a probe of `127.0.0.1:<port>` would reach a listener on, from one read of
//! `/proc/net/tcp` and `/proc/net/tcp6` shared by every prober. Between its HTTP probes a
//! healthy agent is checked here (its port still listens): one read costs ~1.8 ms for 1000
//! listeners and serves every prober for a few seconds, where an HTTP probe is a TCP round
//! trip each (at 1000 agents, 100 probes a second were ~1.2 % of a core).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Local ports in state LISTEN (`0A`) on an address that takes a connection to 127.0.0.1:
/// 127.0.0.1 or any (IPv4), `::ffff:127.0.0.1` or any (IPv6, dual stack), from the text of
/// `/proc/net/tcp` or `/proc/net/tcp6`. Lines that do not parse are skipped.
pub fn listening_ports(text: &str) -> Vec<u16> {
    const REACHABLE: [&str; 4] = [
        "0100007F",
        "00000000",
        "0000000000000000FFFF00000100007F",
        "00000000000000000000000000000000",
    ];
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let _slot = f.next()?;
            let local = f.next()?;
            let _remote = f.next()?;
            let state = f.next()?;
            let (addr, port) = local.split_once(':')?;
            (state == "0A" && REACHABLE.contains(&addr))
                .then(|| u16::from_str_radix(port, 16).ok())
                .flatten()
        })
        .collect()
}

/// The shared snapshot.
#[derive(Default)]
pub struct ListenerTable {
    snapshot: Mutex<Option<(Instant, Arc<HashSet<u16>>)>>,
}

impl ListenerTable {
    /// Whether `port` has a listener, by a snapshot at most `max_age` old (read now when the
    /// last one is older). `None`: no answer (`/proc` unreadable, or another prober is
    /// reading it this moment): the caller probes over HTTP instead.
    pub fn listening(&self, port: u16, max_age: Duration) -> Option<bool> {
        let mut guard = self.snapshot.try_lock().ok()?;
        let fresh = guard
            .as_ref()
            .filter(|(at, _)| at.elapsed() <= max_age)
            .map(|(_, s)| s.clone());
        let ports = match fresh {
            Some(s) => s,
            None => {
                let s = Arc::new(read_listening()?);
                *guard = Some((Instant::now(), s.clone()));
                s
            }
        };
        Some(ports.contains(&port))
    }

    /// As `listening`, but when another prober holds the snapshot this moment, reads
    /// `/proc/net/tcp*` itself rather than answering `None`: a probe about to be excused
    /// on a saturated host needs an answer, and on such a host probers meet on the lock
    /// most.
    pub fn listening_or_read(&self, port: u16, max_age: Duration) -> Option<bool> {
        self.listening(port, max_age)
            .or_else(|| Some(read_listening()?.contains(&port)))
    }
}

/// Every reachable listening port in `/proc/net/tcp` and `tcp6`; `None` when `tcp` cannot be
/// read (a kernel without IPv6 has no `tcp6`).
fn read_listening() -> Option<HashSet<u16>> {
    let mut set = HashSet::new();
    for f in ["/proc/net/tcp", "/proc/net/tcp6"] {
        if let Ok(text) = std::fs::read_to_string(f) {
            set.extend(listening_ports(&text));
        } else if f.ends_with("tcp") {
            return None;
        }
    }
    Some(set)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listeners_a_loopback_probe_reaches() {
        let tcp = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:F02C 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0
   1: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2 1 0 100 0 0 10 0
   2: 0A00000A:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 3 1 0 100 0 0 10 0
   3: 0100007F:F02D 0100007F:A000 01 00000000:00000000 00:00000000 00000000     0        0 4 1 0 100 0 0 10 0
   4: garbage
";
        // 61484 on loopback and 22 on any: yes; 8080 on 10.0.0.10 only: no; an established
        // connection's local port: no.
        assert_eq!(listening_ports(tcp), vec![61484, 22]);
        let tcp6 =
            "  sl  local_address                         remote_address                        st
   0: 00000000000000000000000000000000:1F91 00000000000000000000000000000000:0000 0A
   1: 00000000000000000000000001000000:1F92 00000000000000000000000000000000:0000 0A
   2: 0000000000000000FFFF00000100007F:1F93 00000000000000000000000000000000:0000 0A
";
        // :: (dual stack) and ::ffff:127.0.0.1 take a connection to 127.0.0.1; ::1 does not.
        assert_eq!(listening_ports(tcp6), vec![8081, 8083]);
    }

    #[test]
    fn a_live_listener_is_seen_and_a_closed_port_is_not() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let t = ListenerTable::default();
        assert_eq!(t.listening(port, Duration::from_secs(5)), Some(true));
        drop(l);
        // The snapshot is kept while young; an older one is read again.
        assert_eq!(t.listening(port, Duration::from_secs(5)), Some(true));
        assert_eq!(t.listening(port, Duration::ZERO), Some(false));
    }

    #[test]
    fn a_prober_that_finds_the_snapshot_locked_reads_proc_itself() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let closed = {
            let c = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            c.local_addr().unwrap().port()
        };
        let t = ListenerTable::default();
        let _held = t.snapshot.lock().unwrap(); // another prober, this moment
        assert_eq!(t.listening(port, Duration::ZERO), None);
        assert_eq!(t.listening_or_read(port, Duration::ZERO), Some(true));
        assert_eq!(t.listening_or_read(closed, Duration::ZERO), Some(false));
    }
}
