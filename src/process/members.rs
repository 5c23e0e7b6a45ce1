//! Which processes belong to which agent, for memory accounting and `top`: the same rule a
//! stop uses (`tree::answer`): an agent's processes are its main process's descendants plus
//! every process carrying its environment marker, so a helper that double-forked and called
//! `setsid` is counted as well as stopped. Markers are read only for processes outside every
//! agent's tree and younger than the daemon, and remembered by pid and start time, so a
//! sample costs one `environ` read per new orphan, not one per process.

use super::procfs::ProcInfo;
use super::tree::MARKER_VAR;
use std::collections::{HashMap, HashSet};

pub type AgentKey = (String, String);

/// Remembers, across samples, which agent (if any) each orphaned process's marker names.
#[derive(Debug, Default)]
pub struct Membership {
    markers: HashMap<(u32, u64), Option<AgentKey>>,
}

impl Membership {
    /// The processes of each agent in `agents` (key and main pid), from one `/proc` scan.
    /// `node_prefix` is `<node-id>/`; `since` the daemon's start time in clock ticks.
    pub fn assign<'a>(
        &mut self,
        procs: &'a [ProcInfo],
        agents: &[(AgentKey, u32)],
        node_prefix: &str,
        since: u64,
    ) -> HashMap<AgentKey, Vec<&'a ProcInfo>> {
        let markers = &mut self.markers;
        let out = assign_with(procs, agents, |p| {
            if p.start_time < since {
                return None;
            }
            markers
                .entry((p.pid, p.start_time))
                .or_insert_with(|| read_marker(p.pid, node_prefix))
                .clone()
        });
        let live: HashSet<(u32, u64)> = procs.iter().map(|p| (p.pid, p.start_time)).collect();
        self.markers.retain(|k, _| live.contains(k));
        out
    }
}

/// The rule itself, with the marker lookup given: each agent's tree from its main pid, then
/// every process in no agent's tree whose marker names an agent of `agents`.
pub fn assign_with<'a>(
    procs: &'a [ProcInfo],
    agents: &[(AgentKey, u32)],
    mut marker_of: impl FnMut(&ProcInfo) -> Option<AgentKey>,
) -> HashMap<AgentKey, Vec<&'a ProcInfo>> {
    let forest = super::procfs::Forest::new(procs);
    let mut out: HashMap<AgentKey, Vec<&'a ProcInfo>> = HashMap::new();
    let mut claimed: HashSet<u32> = HashSet::new();
    for (key, pid) in agents {
        let members: Vec<&'a ProcInfo> = forest
            .tree(*pid)
            .into_iter()
            .filter(|p| p.state != 'Z')
            .collect();
        claimed.extend(members.iter().map(|p| p.pid));
        out.insert(key.clone(), members);
    }
    for p in procs.iter().filter(|p| p.state != 'Z') {
        if claimed.contains(&p.pid) {
            continue;
        }
        if let Some(key) = marker_of(p) {
            if let Some(v) = out.get_mut(&key) {
                v.push(p);
            }
        }
    }
    out
}

/// The agent a process's marker names, when it is one of this node's.
fn read_marker(pid: u32, node_prefix: &str) -> Option<AgentKey> {
    let value = super::procfs::env_var(pid, MARKER_VAR)?;
    parse_marker(&value, node_prefix)
}

/// `<node>/<fleet>/<agent>/<incarnation>` → (fleet, agent), for this node only.
pub fn parse_marker(value: &str, node_prefix: &str) -> Option<AgentKey> {
    let rest = value.strip_prefix(node_prefix)?;
    let mut parts = rest.splitn(3, '/');
    let fleet = parts.next()?;
    let agent = parts.next()?;
    parts.next()?;
    Some((fleet.to_string(), agent.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(pid: u32, ppid: u32, rss: u64) -> ProcInfo {
        ProcInfo {
            pid,
            ppid,
            pgid: pid,
            sid: pid,
            start_time: 100,
            state: 'S',
            comm: "x".into(),
            utime: 0,
            stime: 0,
            rss_pages: rss,
        }
    }

    fn key(f: &str, a: &str) -> AgentKey {
        (f.into(), a.into())
    }

    #[test]
    fn trees_and_marked_orphans_are_counted_once_each() {
        // 10: agent a's main, 11 its child; 20: agent b's main; 30: a's double-forked helper
        // (reparented to 1); 31: an unrelated process; 40: a helper marked for an agent that
        // is not being sampled.
        let procs = vec![
            p(1, 0, 1),
            p(10, 5, 100),
            p(11, 10, 10),
            p(20, 5, 200),
            p(30, 1, 2080),
            p(31, 1, 7),
            p(40, 1, 9),
        ];
        let agents = vec![(key("f", "a"), 10), (key("f", "b"), 20)];
        let got = assign_with(&procs, &agents, |p| match p.pid {
            30 => Some(key("f", "a")),
            40 => Some(key("f", "gone")),
            // 11 is in a's tree already: its marker must not count it a second time.
            11 => Some(key("f", "a")),
            _ => None,
        });
        let pids = |k: &AgentKey| {
            let mut v: Vec<u32> = got[k].iter().map(|p| p.pid).collect();
            v.sort();
            v
        };
        assert_eq!(pids(&key("f", "a")), vec![10, 11, 30]);
        assert_eq!(pids(&key("f", "b")), vec![20]);
        let rss: u64 = got[&key("f", "a")].iter().map(|p| p.rss_pages).sum();
        assert_eq!(rss, 2190);
    }

    #[test]
    fn zombies_count_for_nobody() {
        let mut z = p(30, 1, 0);
        z.state = 'Z';
        let procs = vec![p(10, 1, 5), z];
        let got = assign_with(&procs, &[(key("f", "a"), 10)], |_| Some(key("f", "a")));
        assert_eq!(got[&key("f", "a")].len(), 1);
    }

    #[test]
    fn markers_of_other_nodes_are_not_ours() {
        assert_eq!(
            parse_marker("n1/f/a/7", "n1/"),
            Some(("f".into(), "a".into()))
        );
        assert_eq!(parse_marker("n2/f/a/7", "n1/"), None);
        assert_eq!(parse_marker("n1/f", "n1/"), None);
    }
}
