//! Which node runs which agent: a pure function of (desired agents, nodes with their room,
//! current assignment), table-tested. The leader applies its answer to etcd.
//!
//! Rules, in order: an agent stays where it is while that node is live, not draining, and
//! within its capacity (stable: a node that comes back takes new agents, not old ones); every
//! other agent goes to the live, uncordoned node with the most free room (ties by name);
//! an agent with nowhere to go stays unassigned (shown as such) rather than overfill a node.

use std::collections::BTreeMap;

/// A node as placement sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeView {
    pub name: String,
    /// How many agents it may hold at most.
    pub capacity: u64,
    /// Takes no new agents (cordoned or draining); keeps its own unless draining.
    pub cordoned: bool,
    /// Gives its agents away.
    pub draining: bool,
}

/// `agents`: every desired agent (`fleet/agent`); `nodes`: the live ones only; `current`:
/// the assignment in etcd. Returns the new assignment (agents without a node left out).
pub fn place(
    agents: &[String],
    nodes: &[NodeView],
    current: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    let by_name: BTreeMap<&str, &NodeView> = nodes.iter().map(|n| (n.name.as_str(), n)).collect();
    let mut count: BTreeMap<&str, u64> = nodes.iter().map(|n| (n.name.as_str(), 0)).collect();
    let mut out = BTreeMap::new();
    let mut homeless = Vec::new();
    for a in agents {
        let keep = current
            .get(a)
            .and_then(|n| by_name.get(n.as_str()))
            .filter(|n| {
                !n.draining && count.get(n.name.as_str()).copied().unwrap_or(0) < n.capacity
            });
        match keep {
            Some(n) => {
                *count.entry(n.name.as_str()).or_default() += 1;
                out.insert(a.clone(), n.name.clone());
            }
            None => homeless.push(a),
        }
    }
    for a in homeless {
        let best = nodes
            .iter()
            .filter(|n| !n.cordoned && !n.draining)
            .map(|n| (n, n.capacity.saturating_sub(count[n.name.as_str()])))
            .filter(|(_, free)| *free > 0)
            // Most free room first, then the name: deterministic for every leader.
            .max_by(|(x, fx), (y, fy)| fx.cmp(fy).then_with(|| y.name.cmp(&x.name)));
        if let Some((n, _)) = best {
            *count.entry(n.name.as_str()).or_default() += 1;
            out.insert(a.clone(), n.name.clone());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, capacity: u64) -> NodeView {
        NodeView {
            name: name.into(),
            capacity,
            cordoned: false,
            draining: false,
        }
    }

    fn agents(n: usize) -> Vec<String> {
        (1..=n).map(|i| format!("f/a{i:02}")).collect()
    }

    fn counts(p: &BTreeMap<String, String>) -> BTreeMap<String, usize> {
        let mut c = BTreeMap::new();
        for n in p.values() {
            *c.entry(n.clone()).or_default() += 1;
        }
        c
    }

    fn cur(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(a, n)| (a.to_string(), n.to_string()))
            .collect()
    }

    #[test]
    fn table() {
        struct Case {
            name: &'static str,
            agents: Vec<String>,
            nodes: Vec<NodeView>,
            current: BTreeMap<String, String>,
            want_counts: &'static [(&'static str, usize)],
        }
        let cordoned = NodeView {
            cordoned: true,
            ..node("c", 100)
        };
        let draining = NodeView {
            cordoned: true,
            draining: true,
            ..node("c", 100)
        };
        let cases = vec![
            Case {
                name: "spread evenly over equal nodes",
                agents: agents(30),
                nodes: vec![node("a", 100), node("b", 100), node("c", 100)],
                current: BTreeMap::new(),
                want_counts: &[("a", 10), ("b", 10), ("c", 10)],
            },
            Case {
                name: "by free room: the roomier node fills until both have as much left",
                agents: agents(12),
                nodes: vec![node("a", 4), node("b", 10)],
                current: BTreeMap::new(),
                want_counts: &[("a", 3), ("b", 9)],
            },
            Case {
                name: "never above capacity: the rest stays unassigned",
                agents: agents(10),
                nodes: vec![node("a", 3), node("b", 3)],
                current: BTreeMap::new(),
                want_counts: &[("a", 3), ("b", 3)],
            },
            Case {
                name: "a dead node's agents go to the survivors",
                agents: agents(4),
                nodes: vec![node("a", 100), node("b", 100)],
                current: cur(&[
                    ("f/a01", "a"),
                    ("f/a02", "b"),
                    ("f/a03", "x"),
                    ("f/a04", "x"),
                ]),
                want_counts: &[("a", 2), ("b", 2)],
            },
            Case {
                name: "cordoned keeps its agents and takes no new ones",
                agents: agents(4),
                nodes: vec![node("a", 100), cordoned.clone()],
                current: cur(&[("f/a01", "c"), ("f/a02", "c")]),
                want_counts: &[("a", 2), ("c", 2)],
            },
            Case {
                name: "draining gives every agent away",
                agents: agents(4),
                nodes: vec![node("a", 100), node("b", 100), draining],
                current: cur(&[
                    ("f/a01", "c"),
                    ("f/a02", "c"),
                    ("f/a03", "c"),
                    ("f/a04", "a"),
                ]),
                want_counts: &[("a", 2), ("b", 2)],
            },
            Case {
                name: "no node at all: nothing assigned",
                agents: agents(3),
                nodes: vec![],
                current: cur(&[("f/a01", "a")]),
                want_counts: &[],
            },
            Case {
                name: "a node over its lowered capacity sheds the excess",
                agents: agents(4),
                nodes: vec![node("a", 2), node("b", 100)],
                current: cur(&[
                    ("f/a01", "a"),
                    ("f/a02", "a"),
                    ("f/a03", "a"),
                    ("f/a04", "a"),
                ]),
                want_counts: &[("a", 2), ("b", 2)],
            },
        ];
        for c in cases {
            let got = place(&c.agents, &c.nodes, &c.current);
            let want: BTreeMap<String, usize> = c
                .want_counts
                .iter()
                .map(|(n, k)| (n.to_string(), *k))
                .collect();
            assert_eq!(counts(&got), want, "{}: {got:?}", c.name);
            for (a, n) in &got {
                assert!(
                    c.agents.contains(a),
                    "{}: placed an unknown agent {a}",
                    c.name
                );
                assert!(
                    c.nodes.iter().any(|x| &x.name == n),
                    "{}: {a} on {n}",
                    c.name
                );
            }
        }
    }

    #[test]
    fn stable_a_node_that_comes_back_does_not_reshuffle() {
        let nodes2 = vec![node("a", 100), node("b", 100)];
        let first = place(&agents(20), &nodes2, &BTreeMap::new());
        let nodes3 = vec![node("a", 100), node("b", 100), node("c", 100)];
        let again = place(&agents(20), &nodes3, &first);
        assert_eq!(again, first, "healthy agents moved when c joined");
        // New agents go to the emptiest node, the newcomer.
        let more = place(&agents(24), &nodes3, &again);
        let new_ones: Vec<&String> = (21..=24).map(|i| &more[&format!("f/a{i:02}")]).collect();
        assert!(new_ones.iter().all(|n| *n == "c"), "{new_ones:?}");
    }

    #[test]
    fn the_same_answer_on_every_leader() {
        let nodes = vec![node("b", 10), node("a", 10), node("c", 10)];
        let mut rev = nodes.clone();
        rev.reverse();
        assert_eq!(
            place(&agents(7), &nodes, &BTreeMap::new()),
            place(&agents(7), &rev, &BTreeMap::new())
        );
    }
}
