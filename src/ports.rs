//! Port block leasing: which block of ports each agent gets, and what the host already has
//! bound. Pure logic plus two small host probes; persisting leases is the registry's job and
//! serialising access is the PortAllocator actor's.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::FleetError;

/// An inclusive range of ports that blocks are carved from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl Default for PortRange {
    fn default() -> Self {
        PortRange {
            first: 20000,
            last: 59999,
        }
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.first, self.last)
    }
}

impl PortRange {
    /// Parses `"20000-59999"`: two ports, first ≤ last, port 0 excluded.
    pub fn parse(s: &str) -> Result<PortRange, FleetError> {
        let bad = |reason: String| FleetError::invalid("port_range", reason);
        let (a, b) = s
            .trim()
            .split_once('-')
            .ok_or_else(|| bad(format!("{s:?} is not of the form FIRST-LAST")))?;
        let port = |t: &str| -> Result<u16, FleetError> {
            match t.trim().parse::<u16>() {
                Ok(0) => Err(bad(format!("{s:?}: port 0 cannot be leased"))),
                Ok(p) => Ok(p),
                Err(_) => Err(bad(format!("{s:?}: {t:?} is not a port (1-65535)"))),
            }
        };
        let (first, last) = (port(a)?, port(b)?);
        if first > last {
            return Err(bad(format!("{s:?}: first port is above the last")));
        }
        Ok(PortRange { first, last })
    }

    /// Number of ports in the range.
    pub fn len(&self) -> u32 {
        u32::from(self.last) + 1 - u32::from(self.first)
    }

    pub fn is_empty(&self) -> bool {
        self.last < self.first
    }

    /// How many aligned blocks of `stride` ports fit in the range.
    pub fn blocks(&self, stride: u16) -> u32 {
        if stride == 0 || self.is_empty() {
            return 0;
        }
        self.len() / u32::from(stride)
    }
}

/// One agent's block: ports `base ..= base + stride - 1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub base: u16,
    pub stride: u16,
}

impl Lease {
    /// One past the last port, as u32 so a block ending at 65535 does not overflow.
    pub fn end(&self) -> u32 {
        u32::from(self.base) + u32::from(self.stride)
    }

    pub fn last(&self) -> u16 {
        (self.end() - 1) as u16
    }

    pub fn contains(&self, port: u16) -> bool {
        port >= self.base && u32::from(port) < self.end()
    }

    fn overlaps(&self, base: u32, end: u32) -> bool {
        u32::from(self.base) < end && base < self.end()
    }
}

impl fmt::Display for Lease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.base, self.last())
    }
}

#[derive(Debug, Clone)]
struct Held {
    fleet: String,
    agent: String,
    stride: u16,
}

/// All leases of this host, keyed by (fleet, agent). Leases never overlap; `by_base` keeps
/// them sorted so a search can jump over leased spans instead of probing port by port.
#[derive(Debug, Clone, Default)]
pub struct Leases {
    by_base: BTreeMap<u16, Held>,
    /// fleet → agent → base
    owners: HashMap<String, HashMap<String, u16>>,
}

impl Leases {
    pub fn get(&self, fleet: &str, agent: &str) -> Option<Lease> {
        let base = *self.owners.get(fleet)?.get(agent)?;
        let held = self.by_base.get(&base)?;
        Some(Lease {
            base,
            stride: held.stride,
        })
    }

    /// The lease whose span overlaps `[base, end)`, if any. Leases are disjoint, so only the
    /// last one starting below `end` can.
    fn overlapping(&self, base: u32, end: u32) -> Option<(Lease, &Held)> {
        let upper = u16::try_from(end).unwrap_or(u16::MAX);
        let mut range = if end > u32::from(u16::MAX) {
            self.by_base.range(..=upper)
        } else {
            self.by_base.range(..upper)
        };
        let (&b, held) = range.next_back()?;
        let lease = Lease {
            base: b,
            stride: held.stride,
        };
        lease.overlaps(base, end).then_some((lease, held))
    }

    /// Restores a lease (from the registry). Replaces this agent's previous lease; refuses a
    /// block that overlaps another owner's or does not fit in 1..=65535.
    pub fn insert(&mut self, fleet: &str, agent: &str, lease: Lease) -> Result<(), FleetError> {
        if lease.stride == 0 || lease.base == 0 || lease.end() > 65536 {
            return Err(FleetError::invalid(
                "port lease",
                format!(
                    "{fleet}/{agent}: block base {} stride {} does not fit in ports 1-65535",
                    lease.base, lease.stride
                ),
            ));
        }
        let previous = self.release(fleet, agent);
        if let Some((other, held)) = self.overlapping(u32::from(lease.base), lease.end()) {
            let err = FleetError::invalid(
                "port lease",
                format!(
                    "{fleet}/{agent}: block {lease} overlaps block {other} of {}/{}",
                    held.fleet, held.agent
                ),
            );
            if let Some(prev) = previous {
                self.put(fleet, agent, prev);
            }
            return Err(err);
        }
        self.put(fleet, agent, lease);
        Ok(())
    }

    fn put(&mut self, fleet: &str, agent: &str, lease: Lease) {
        self.by_base.insert(
            lease.base,
            Held {
                fleet: fleet.to_owned(),
                agent: agent.to_owned(),
                stride: lease.stride,
            },
        );
        self.owners
            .entry(fleet.to_owned())
            .or_default()
            .insert(agent.to_owned(), lease.base);
    }

    pub fn release(&mut self, fleet: &str, agent: &str) -> Option<Lease> {
        let agents = self.owners.get_mut(fleet)?;
        let base = agents.remove(agent)?;
        if agents.is_empty() {
            self.owners.remove(fleet);
        }
        let held = self.by_base.remove(&base)?;
        Some(Lease {
            base,
            stride: held.stride,
        })
    }

    /// Every lease as (fleet, agent, lease), in port order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str, Lease)> {
        self.by_base.iter().map(|(&base, h)| {
            (
                h.fleet.as_str(),
                h.agent.as_str(),
                Lease {
                    base,
                    stride: h.stride,
                },
            )
        })
    }

    pub fn len(&self) -> usize {
        self.by_base.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_base.is_empty()
    }

    /// Leases a block of `stride` ports to (fleet, agent): the lowest block start aligned to
    /// `range.first + k * stride` whose ports all lie in `range`, overlap no other lease and
    /// are not `busy`. Idempotent: an agent already holding a lease of that stride gets it
    /// back without rechecking `busy` (its own process may be the one bound there). An agent
    /// holding a lease of another stride gives it up for the new one, or keeps it if none is
    /// free.
    pub fn allocate(
        &mut self,
        fleet: &str,
        agent: &str,
        stride: u16,
        range: PortRange,
        busy: &dyn Fn(u16) -> bool,
    ) -> Result<Lease, FleetError> {
        if let Some(l) = self.get(fleet, agent) {
            if l.stride == stride {
                return Ok(l);
            }
        }
        if stride == 0 {
            return Err(FleetError::invalid(
                "port stride",
                format!("{fleet}/{agent}: a block needs at least one port"),
            ));
        }
        let previous = self.release(fleet, agent);
        match self.find_free(stride, range, busy) {
            Some(lease) => {
                self.put(fleet, agent, lease);
                Ok(lease)
            }
            None => {
                if let Some(prev) = previous {
                    self.put(fleet, agent, prev);
                }
                Err(FleetError::PortRangeExhausted {
                    fleet: fleet.to_owned(),
                    agent: agent.to_owned(),
                    range: range.to_string(),
                    needed: u32::from(stride),
                    held: range.blocks(stride),
                })
            }
        }
    }

    /// The search behind `allocate`: one walk over the leases in port order alongside the
    /// candidate block. Each step skips past a whole lease or past a busy port, so it costs
    /// O(leases + ports probed) and no port is probed twice.
    fn find_free(
        &self,
        stride: u16,
        range: PortRange,
        busy: &dyn Fn(u16) -> bool,
    ) -> Option<Lease> {
        let first = u32::from(range.first);
        let stride32 = u32::from(stride);
        let limit = u32::from(range.last) + 1; // one past the last usable port
                                               // The smallest aligned block start ≥ `at`.
        let align_up = |at: u32| first + at.saturating_sub(first).div_ceil(stride32) * stride32;
        let mut leases = self.by_base.iter().peekable();
        let mut base = first;
        'candidates: while base + stride32 <= limit {
            let end = base + stride32;
            while let Some((&b, held)) = leases.peek() {
                let lease = Lease {
                    base: b,
                    stride: held.stride,
                };
                if lease.end() <= base {
                    leases.next();
                    continue;
                }
                if lease.overlaps(base, end) {
                    base = align_up(lease.end());
                    continue 'candidates;
                }
                break;
            }
            if let Some(port) = (base..end).find(|&p| busy(p as u16)) {
                base = align_up(port + 1);
                continue;
            }
            return Some(Lease {
                base: base as u16,
                stride,
            });
        }
        None
    }
}

/// Local ports of the entries of one /proc/net/{tcp,udp}{,6} table; with `listen_only`,
/// only sockets in state 0A (TCP_LISTEN).
fn parse_net_table(text: &str, listen_only: bool, out: &mut HashSet<u16>) {
    for line in text.lines().skip(1) {
        let mut fields = line.split_ascii_whitespace();
        let (Some(_sl), Some(local), Some(_remote), Some(state)) =
            (fields.next(), fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        if listen_only && state != "0A" {
            continue;
        }
        let Some((_, port_hex)) = local.rsplit_once(':') else {
            continue;
        };
        if let Ok(port) = u16::from_str_radix(port_hex, 16) {
            if port != 0 {
                out.insert(port);
            }
        }
    }
}

/// Every TCP port in LISTEN state and every bound UDP port in this network namespace, any
/// address. Tables that cannot be read (IPv6 disabled) are skipped.
pub fn listening_ports() -> HashSet<u16> {
    let mut out = HashSet::new();
    let mut buf = String::new();
    for (path, listen_only) in [
        ("/proc/net/tcp", true),
        ("/proc/net/tcp6", true),
        ("/proc/net/udp", false),
        ("/proc/net/udp6", false),
    ] {
        buf.clear();
        if let Ok(mut f) = std::fs::File::open(path) {
            use std::io::Read;
            if f.read_to_string(&mut buf).is_ok() {
                parse_net_table(&buf, listen_only, &mut out);
            }
        }
    }
    out
}

/// Whether 127.0.0.1:`port` can be bound right now: a quick recheck of one port before
/// handing it out. Port 0 is never "bindable" (it would mean any port).
pub fn port_is_bindable(port: u16) -> bool {
    port != 0 && std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn never(_: u16) -> bool {
        false
    }

    #[test]
    fn range_parse_and_blocks() {
        assert_eq!(
            PortRange::parse("20000-59999").unwrap(),
            PortRange::default()
        );
        assert_eq!(PortRange::default().blocks(120), 333);
        assert_eq!(PortRange::default().blocks(0), 0);
        assert_eq!(PortRange::parse(" 1-65535 ").unwrap().blocks(1), 65535);
        for bad in ["", "20000", "9-1", "0-10", "1-70000", "a-b"] {
            let e = PortRange::parse(bad).unwrap_err();
            assert!(e.to_string().contains("port_range"), "{bad:?}: {e}");
        }
    }

    #[test]
    fn thousand_mixed_allocations_never_overlap() {
        let mut leases = Leases::default();
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let range = PortRange::default();
        let strides = [111u16, 120, 5, 37];
        for i in 0..1000 {
            let stride = strides[rng.gen_range(0..strides.len())];
            let agent = format!("a{i}");
            let got = leases.allocate("f", &agent, stride, range, &never);
            if got.is_err() {
                // The range is finite; free some space and go on, so releases are exercised.
                leases.release("f", &format!("a{}", rng.gen_range(0..i)));
                continue;
            }
            if i % 7 == 0 {
                leases.release("f", &format!("a{}", rng.gen_range(0..=i)));
            }
        }
        let all: Vec<(String, Lease)> = leases
            .iter()
            .map(|(f, a, l)| (format!("{f}/{a}"), l))
            .collect();
        assert!(all.len() > 100, "only {} leases left", all.len());
        let mut owner = vec![None::<&str>; 65536];
        for (who, l) in &all {
            assert!(l.base >= range.first && l.last() <= range.last, "{who} {l}");
            assert_eq!(
                (u32::from(l.base) - u32::from(range.first)) % u32::from(l.stride),
                0,
                "{who} {l} unaligned"
            );
            for port in l.base..=l.last() {
                if let Some(prev) = owner[usize::from(port)] {
                    panic!("port {port} leased to {prev} and {who}");
                }
                owner[usize::from(port)] = Some(who);
            }
        }
    }

    #[test]
    fn busy_port_skips_its_whole_block() {
        let mut leases = Leases::default();
        let range = PortRange::parse("1000-1999").unwrap();
        let busy = |p: u16| p == 1105;
        let a = leases.allocate("f", "a", 100, range, &busy).unwrap();
        assert_eq!(
            a,
            Lease {
                base: 1000,
                stride: 100
            }
        );
        let b = leases.allocate("f", "b", 100, range, &busy).unwrap();
        assert_eq!(
            b,
            Lease {
                base: 1200,
                stride: 100
            },
            "block 1100-1199 holds busy 1105"
        );
        let probed = std::cell::RefCell::new(Vec::new());
        let record = |p: u16| {
            probed.borrow_mut().push(p);
            false
        };
        let c = leases.allocate("f", "c", 100, range, &record).unwrap();
        assert_eq!(c.base, 1100);
        let probed = probed.into_inner();
        assert!(
            probed.iter().all(|p| (1100..1200).contains(p)),
            "leased spans must be skipped, not probed: {probed:?}"
        );
    }

    #[test]
    fn allocate_is_idempotent_and_release_frees() {
        let mut leases = Leases::default();
        let range = PortRange::default();
        let a = leases.allocate("f", "a", 120, range, &never).unwrap();
        let b = leases.allocate("f", "b", 120, range, &never).unwrap();
        assert_ne!(a, b);
        let everything_busy = |_: u16| true;
        assert_eq!(
            leases.allocate("f", "a", 120, range, &everything_busy),
            Ok(a)
        );
        assert_eq!(leases.len(), 2);
        assert_eq!(leases.release("f", "a"), Some(a));
        assert_eq!(leases.get("f", "a"), None);
        assert_eq!(leases.release("f", "a"), None);
        let c = leases.allocate("g", "c", 120, range, &never).unwrap();
        assert_eq!(c, a, "the lowest free block is the released one");
    }

    #[test]
    fn restride_moves_or_keeps_the_lease() {
        let mut leases = Leases::default();
        let range = PortRange::parse("1000-1239").unwrap();
        let a = leases.allocate("f", "a", 120, range, &never).unwrap();
        leases.allocate("f", "b", 120, range, &never).unwrap();
        let e = leases.allocate("f", "a", 240, range, &never).unwrap_err();
        assert!(matches!(e, FleetError::PortRangeExhausted { .. }), "{e}");
        assert_eq!(
            leases.get("f", "a"),
            Some(a),
            "a failed re-stride keeps the old lease"
        );
        let small = leases.allocate("f", "a", 60, range, &never).unwrap();
        assert_eq!(
            small,
            Lease {
                base: 1000,
                stride: 60
            }
        );
        assert_eq!(leases.len(), 2);
    }

    #[test]
    fn insert_refuses_overlap_with_another_owner() {
        let mut leases = Leases::default();
        leases
            .insert(
                "f",
                "a",
                Lease {
                    base: 20000,
                    stride: 120,
                },
            )
            .unwrap();
        let e = leases
            .insert(
                "g",
                "b",
                Lease {
                    base: 20100,
                    stride: 120,
                },
            )
            .unwrap_err();
        let text = e.to_string();
        assert!(
            text.contains("g/b") && text.contains("f/a") && text.contains("20000-20119"),
            "{text}"
        );
        assert_eq!(leases.get("g", "b"), None);
        // The same owner may move its own lease, even onto an overlapping span.
        leases
            .insert(
                "f",
                "a",
                Lease {
                    base: 20060,
                    stride: 120,
                },
            )
            .unwrap();
        assert_eq!(
            leases.get("f", "a"),
            Some(Lease {
                base: 20060,
                stride: 120
            })
        );
        assert_eq!(leases.len(), 1);
        // Adjacent is fine; the top of the port space too.
        leases
            .insert(
                "g",
                "b",
                Lease {
                    base: 20180,
                    stride: 10,
                },
            )
            .unwrap();
        leases
            .insert(
                "g",
                "c",
                Lease {
                    base: 65526,
                    stride: 10,
                },
            )
            .unwrap();
        assert!(leases
            .insert(
                "g",
                "d",
                Lease {
                    base: 65530,
                    stride: 10
                }
            )
            .is_err());
        assert!(leases
            .insert(
                "g",
                "d",
                Lease {
                    base: 0,
                    stride: 10
                }
            )
            .is_err());
        // A refused move keeps the owner's previous lease.
        assert!(leases
            .insert(
                "g",
                "b",
                Lease {
                    base: 20100,
                    stride: 10
                }
            )
            .is_err());
        assert_eq!(
            leases.get("g", "b"),
            Some(Lease {
                base: 20180,
                stride: 10
            })
        );
    }

    #[test]
    fn exhaustion_names_range_and_count() {
        let mut leases = Leases::default();
        let range = PortRange::parse("30000-30359").unwrap();
        for agent in ["a", "b", "c"] {
            leases.allocate("f", agent, 120, range, &never).unwrap();
        }
        let e = leases.allocate("f", "d", 120, range, &never).unwrap_err();
        assert_eq!(
            e,
            FleetError::PortRangeExhausted {
                fleet: "f".into(),
                agent: "d".into(),
                range: "30000-30359".into(),
                needed: 120,
                held: 3,
            }
        );
        let text = e.to_string();
        assert!(
            text.contains("30000-30359") && text.contains("3 blocks"),
            "{text}"
        );
        // Busy ports exhaust it as well, and the error is the same shape.
        let mut empty = Leases::default();
        let e = empty
            .allocate("f", "a", 120, range, &|p| p % 100 == 0)
            .unwrap_err();
        assert!(
            matches!(e, FleetError::PortRangeExhausted { held: 3, .. }),
            "{e}"
        );
    }

    #[test]
    fn five_thousand_leases_stay_fast() {
        let mut leases = Leases::default();
        let range = PortRange::parse("1024-65535").unwrap();
        let start = std::time::Instant::now();
        for i in 0..5000 {
            leases
                .allocate("f", &format!("a{i}"), 12, range, &never)
                .unwrap();
        }
        // The last allocation must jump over 4999 leases rather than probe 60 000 ports.
        let probes = std::cell::Cell::new(0u32);
        leases
            .allocate("f", "last", 12, range, &|_| {
                probes.set(probes.get() + 1);
                false
            })
            .unwrap();
        assert_eq!(probes.get(), 12);
        assert!(
            start.elapsed() < std::time::Duration::from_secs(10),
            "{:?}",
            start.elapsed()
        );
    }

    #[test]
    fn net_table_parse() {
        let tcp = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0000000000000000 100 0 0 10 0\n\
   1: 0100007F:D431 0100007F:1F90 01 00000000:00000000 00:00000000 00000000     0        0 2 1 0000000000000000 20 4 30 10 -1\n";
        let mut out = HashSet::new();
        parse_net_table(tcp, true, &mut out);
        assert_eq!(out, HashSet::from([8080]));
        let tcp6 = "  sl  local_address                         remote_address                        st\n\
   0: 00000000000000000000000001000000:4E20 00000000000000000000000000000000:0000 0A 0\n";
        parse_net_table(tcp6, true, &mut out);
        assert_eq!(out, HashSet::from([8080, 20000]));
        let udp = "  sl  local_address rem_address   st\n  5: 00000000:0044 00000000:0000 07 0\n";
        parse_net_table(udp, false, &mut out);
        assert!(out.contains(&68));
    }

    #[test]
    fn listening_ports_sees_a_real_listener() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        // A port that was bound and then closed is, barring a race with another process,
        // not listening.
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let ports = listening_ports();
        assert!(
            ports.contains(&port),
            "{port} missing from {} ports",
            ports.len()
        );
        assert!(
            !ports.contains(&closed),
            "closed port {closed} reported as listening"
        );
        assert!(!port_is_bindable(port), "{port} is held by this test");
        assert!(port_is_bindable(closed) || listening_ports().contains(&closed));
        drop(listener);
    }
}
