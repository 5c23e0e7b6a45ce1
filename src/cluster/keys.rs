//! Where the cluster's state lives in etcd, under one prefix (default `/fleet-commander/`),
//! and the records stored there. `d/` holds what nodes coordinate on and read every round;
//! `o/` what they observed, read only by `status`.
//!
//! | key | value | lease |
//! |---|---|---|
//! | `d/fleets/<fleet>` | `FleetDoc`: the spec (agents included) and which agents are stopped | none |
//! | `d/nodes/<node>` | `NodeInfo`: socket, capacity | the node's |
//! | `d/cordon/<node>` | `cordon` or `drain` | none (outlives the node) |
//! | `d/leader` | the node that places agents | the leader's |
//! | `d/assign/<fleet>/<agent>` | the node it is placed on | none (written by the leader) |
//! | `d/claims/<fleet>/<agent>` | the node running it: the right to run it | the node's |
//! | `o/<node>` | `Vec<AgentStatus>` of that node | the node's |
//! | `h/<fleet>/<agent>` | `handover::Handover`: the archive of a moved agent's HOME | none |

use crate::messages::command::AgentStatus;
use crate::spec::FleetSpec;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// A fleet's desired state in the cluster. Its tenants' accepted values (secrets, file
/// contents: never serialized with a spec) travel beside the spec in `vault`, so a node
/// that starts the agent provisions its HOME from etcd alone, never from the files of the
/// host that accepted the command.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(into = "FleetDocWire", try_from = "FleetDocWire")]
pub struct FleetDoc {
    pub spec: FleetSpec,
    /// Agents the operator stopped (`agent stop`, `fleet stop`).
    pub stopped: BTreeSet<String>,
    /// The spec file that declares the fleet (`reload` keeps it in step); `None`: created
    /// by commands.
    pub declared_by: Option<SpecFile>,
}

/// A node's `--spec` file, as the owner of the fleets it declares.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpecFile {
    pub node: String,
    pub path: String,
}

impl std::fmt::Display for SpecFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} on node {}", self.path, self.node)
    }
}

#[derive(Serialize, Deserialize)]
struct FleetDocWire {
    spec: FleetSpec,
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    stopped: BTreeSet<String>,
    /// Agent → its accepted values.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    vault: BTreeMap<String, crate::vault::Held>,
    /// The fleet's `token_seed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    token_seed: Option<String>,
    /// The fleet's `token_epochs`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    token_epochs: BTreeMap<String, u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    declared_by: Option<SpecFile>,
}

impl From<FleetDoc> for FleetDocWire {
    fn from(d: FleetDoc) -> Self {
        let vault = d
            .spec
            .tenants
            .iter()
            .map(|(a, t)| (a.clone(), crate::vault::Held::of(t)))
            .filter(|(_, h)| !h.is_empty())
            .collect();
        let token_seed = d.spec.token_seed.as_ref().map(|s| s.expose().to_string());
        let token_epochs = d.spec.token_epochs.clone();
        FleetDocWire {
            spec: d.spec,
            stopped: d.stopped,
            vault,
            token_seed,
            token_epochs,
            declared_by: d.declared_by,
        }
    }
}

impl TryFrom<FleetDocWire> for FleetDoc {
    type Error = String;
    fn try_from(w: FleetDocWire) -> Result<Self, String> {
        let mut spec = w.spec;
        spec.token_seed = w.token_seed.map(crate::spec::Secret::new);
        spec.token_epochs = w.token_epochs;
        for (a, held) in w.vault {
            if let Some(t) = spec.tenants.get_mut(&a) {
                held.restore(t).map_err(|why| format!("vault.{a}: {why}"))?;
            }
        }
        Ok(FleetDoc {
            spec,
            stopped: w.stopped,
            declared_by: w.declared_by,
        })
    }
}

/// What a node publishes about itself while its lease lives.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeInfo {
    pub name: String,
    /// Its control socket on its own host.
    pub socket: String,
    pub pid: u32,
    pub capacity: NodeCapacity,
}

/// The `capacity` figures of a node's host, and the bound placement uses.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeCapacity {
    /// At most this many agents are placed on it (`--max-agents`, else its port range / 10).
    pub agents_max: u64,
    pub memory_available: u64,
    pub ports: u64,
    pub fds_free: u64,
    pub pids_free: u64,
}

/// An operator's mark on a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mark {
    /// Takes no new agents, keeps its own.
    Cordon,
    /// Takes no new agents and gives its own away.
    Drain,
}

impl Mark {
    pub fn as_str(self) -> &'static str {
        match self {
            Mark::Cordon => "cordon",
            Mark::Drain => "drain",
        }
    }
}

/// The keys under one prefix.
#[derive(Debug, Clone)]
pub struct Keys {
    pub prefix: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Keys {
        let mut prefix = prefix.to_string();
        if !prefix.ends_with('/') {
            prefix.push('/');
        }
        Keys { prefix }
    }
    pub fn desired(&self) -> String {
        format!("{}d/", self.prefix)
    }
    pub fn observed_all(&self) -> String {
        format!("{}o/", self.prefix)
    }
    pub fn fleet(&self, fleet: &str) -> String {
        format!("{}d/fleets/{fleet}", self.prefix)
    }
    pub fn node(&self, node: &str) -> String {
        format!("{}d/nodes/{node}", self.prefix)
    }
    pub fn cordon(&self, node: &str) -> String {
        format!("{}d/cordon/{node}", self.prefix)
    }
    pub fn leader(&self) -> String {
        format!("{}d/leader", self.prefix)
    }
    pub fn assign(&self, agent: &str) -> String {
        format!("{}d/assign/{agent}", self.prefix)
    }
    pub fn claim(&self, agent: &str) -> String {
        format!("{}d/claims/{agent}", self.prefix)
    }
    pub fn observed(&self, node: &str) -> String {
        format!("{}o/{node}", self.prefix)
    }
    /// A fleet's last upgrade (`upgrade::UpgradeRecord`), outside `d/`: its steps are no
    /// change of what runs where.
    pub fn upgrade(&self, fleet: &str) -> String {
        format!("{}u/records/{fleet}", self.prefix)
    }
    /// Held on the lease of the node driving an upgrade or rollback of the fleet.
    pub fn upgrade_lock(&self, fleet: &str) -> String {
        format!("{}u/locks/{fleet}", self.prefix)
    }
    /// A moved agent's HOME, archived by the node that let it go (`handover`).
    pub fn handover(&self, agent: &str) -> String {
        format!("{}h/{agent}", self.prefix)
    }
    /// Every handover of `fleet`, or of the cluster (`None`).
    pub fn handovers(&self, fleet: Option<&str>) -> String {
        match fleet {
            Some(f) => format!("{}h/{f}/", self.prefix),
            None => format!("{}h/", self.prefix),
        }
    }
    /// Requests to one node (`mailbox`): `m/<node>/<id>`.
    pub fn mailbox(&self, node: &str) -> String {
        format!("{}m/{node}/", self.prefix)
    }
    pub fn request(&self, node: &str, id: &str) -> String {
        format!("{}m/{node}/{id}", self.prefix)
    }
    pub fn reply(&self, id: &str) -> String {
        format!("{}r/{id}", self.prefix)
    }
    /// A request's attached bytes, in order: `x/<id>/<n>`.
    pub fn blob(&self, id: &str) -> String {
        format!("{}x/{id}/", self.prefix)
    }
}

/// One consistent read of `d/` (and, for `status`, `o/`).
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub revision: i64,
    /// The revision of the full read this snapshot was made from. A watch event at or below
    /// it is in the read already and is not applied again: a watch that outlives a re-read
    /// still delivers what it lagged behind, and replaying an old delete would drop a claim
    /// the read holds.
    pub read_revision: i64,
    /// Fleet → (doc, mod revision for compare-and-swap).
    pub fleets: BTreeMap<String, (FleetDoc, i64)>,
    pub nodes: BTreeMap<String, NodeInfo>,
    pub marks: BTreeMap<String, Mark>,
    pub leader: Option<String>,
    /// `fleet/agent` → node.
    pub assign: BTreeMap<String, String>,
    pub claims: BTreeMap<String, String>,
    pub observed: BTreeMap<String, Vec<AgentStatus>>,
    /// Keys whose values did not parse (a newer build's, or damage): named in logs, ignored.
    pub unreadable: Vec<String>,
}

impl Snapshot {
    /// Takes one key-value pair read under `keys.prefix`.
    pub fn take(&mut self, keys: &Keys, key: &str, value: &[u8], mod_revision: i64) {
        let Some(rest) = key.strip_prefix(&keys.prefix) else {
            return;
        };
        let text = String::from_utf8_lossy(value).to_string();
        let ok = match rest.split_once('/') {
            Some(("d", "leader")) => {
                self.leader = Some(text);
                true
            }
            Some(("d", rest)) => match rest.split_once('/') {
                Some(("fleets", f)) => serde_json::from_slice::<FleetDoc>(value)
                    .map(|d| self.fleets.insert(f.to_string(), (d, mod_revision)))
                    .is_ok(),
                Some(("nodes", n)) => serde_json::from_slice::<NodeInfo>(value)
                    .map(|i| self.nodes.insert(n.to_string(), i))
                    .is_ok(),
                Some(("cordon", n)) => {
                    serde_json::from_value::<Mark>(serde_json::Value::String(text.clone()))
                        .map(|m| self.marks.insert(n.to_string(), m))
                        .is_ok()
                }
                Some(("assign", a)) => {
                    self.assign.insert(a.to_string(), text);
                    true
                }
                Some(("claims", a)) => {
                    self.claims.insert(a.to_string(), text);
                    true
                }
                _ => false,
            },
            Some(("o", n)) => serde_json::from_slice::<Vec<AgentStatus>>(value)
                .map(|v| self.observed.insert(n.to_string(), v))
                .is_ok(),
            _ => false,
        };
        if !ok {
            self.unreadable.push(key.to_string());
        }
    }

    /// Applies one event of a watch on `d/` (delivered in revision order after the read
    /// this snapshot was made from).
    pub fn apply(&mut self, keys: &Keys, ev: &etcd_client::Event) {
        let Some(kv) = ev.kv() else {
            return;
        };
        let key = String::from_utf8_lossy(kv.key());
        let value = match ev.event_type() {
            etcd_client::EventType::Put => Some(kv.value()),
            etcd_client::EventType::Delete => None,
        };
        self.change(keys, &key, value, kv.mod_revision());
    }

    /// One key put (`Some(value)`) or deleted (`None`) at `mod_revision`.
    pub fn change(&mut self, keys: &Keys, key: &str, value: Option<&[u8]>, mod_revision: i64) {
        if mod_revision <= self.read_revision {
            return;
        }
        self.unreadable.retain(|k| k != key);
        self.revision = self.revision.max(mod_revision);
        // A put that does not parse leaves the key unreadable, as a fresh read would, not
        // holding its old value.
        self.forget(keys, key);
        if let Some(v) = value {
            self.take(keys, key, v, mod_revision);
        }
    }

    /// Drops what `key` held (it was deleted).
    pub fn forget(&mut self, keys: &Keys, key: &str) {
        let Some(rest) = key.strip_prefix(&keys.prefix) else {
            return;
        };
        match rest.split_once('/') {
            Some(("d", "leader")) => self.leader = None,
            Some(("d", rest)) => match rest.split_once('/') {
                Some(("fleets", f)) => drop(self.fleets.remove(f)),
                Some(("nodes", n)) => drop(self.nodes.remove(n)),
                Some(("cordon", n)) => drop(self.marks.remove(n)),
                Some(("assign", a)) => drop(self.assign.remove(a)),
                Some(("claims", a)) => drop(self.claims.remove(a)),
                _ => {}
            },
            Some(("o", n)) => drop(self.observed.remove(n)),
            _ => {}
        }
    }

    /// The doc of a fleet that has `agent`, else the error naming what is missing.
    pub fn doc_with(&self, fleet: &str, agent: &str) -> Result<&FleetDoc, crate::FleetError> {
        let Some((doc, _)) = self.fleets.get(fleet) else {
            return Err(crate::FleetError::NoSuchFleet {
                fleet: fleet.into(),
            });
        };
        if !doc.spec.agents.iter().any(|a| a == agent) {
            return Err(crate::FleetError::NoSuchAgent {
                fleet: fleet.into(),
                agent: agent.into(),
            });
        }
        Ok(doc)
    }

    /// Every desired agent as `fleet/agent`, in fleet then spec order.
    pub fn agents(&self) -> Vec<String> {
        self.fleets
            .iter()
            .flat_map(|(f, (d, _))| d.spec.agents.iter().map(move |a| format!("{f}/{a}")))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_parse_back_into_a_snapshot() {
        let k = Keys::new("/fc");
        assert_eq!(k.fleet("bots"), "/fc/d/fleets/bots");
        let mut s = Snapshot::default();
        let mut spec = FleetSpec::new("bots");
        spec.agents = vec!["a1".into(), "a2".into()];
        let doc = FleetDoc {
            spec,
            stopped: BTreeSet::new(),
            declared_by: None,
        };
        s.take(&k, &k.fleet("bots"), &serde_json::to_vec(&doc).unwrap(), 7);
        s.take(&k, &k.assign("bots/a1"), b"n1", 8);
        s.take(&k, &k.claim("bots/a1"), b"n1", 9);
        s.take(&k, &k.cordon("n2"), b"drain", 9);
        s.take(&k, &k.leader(), b"n1", 9);
        s.take(&k, &k.node("n1"), b"{not json", 9);
        s.take(&k, "/fc/d/unknown/x", b"", 9);
        assert_eq!(s.fleets["bots"].1, 7);
        assert_eq!(s.agents(), vec!["bots/a1", "bots/a2"]);
        assert_eq!(s.assign["bots/a1"], "n1");
        assert_eq!(s.claims["bots/a1"], "n1");
        assert_eq!(s.marks["n2"], Mark::Drain);
        assert_eq!(s.leader.as_deref(), Some("n1"));
        assert_eq!(s.unreadable, vec!["/fc/d/nodes/n1", "/fc/d/unknown/x"]);
    }

    #[test]
    fn a_deleted_key_leaves_the_snapshot_and_only_its_own_entry_goes() {
        let k = Keys::new("/fc");
        let mut spec = FleetSpec::new("bots");
        spec.agents = vec!["a1".into()];
        let doc = FleetDoc {
            spec,
            stopped: BTreeSet::new(),
            declared_by: None,
        };
        let fill = |s: &mut Snapshot| {
            s.take(&k, &k.fleet("bots"), &serde_json::to_vec(&doc).unwrap(), 7);
            s.take(&k, &k.fleet("other"), &serde_json::to_vec(&doc).unwrap(), 7);
            s.take(&k, &k.assign("bots/a1"), b"n1", 8);
            s.take(&k, &k.assign("other/a1"), b"n1", 8);
            s.take(&k, &k.claim("bots/a1"), b"n1", 9);
            s.take(&k, &k.claim("other/a1"), b"n1", 9);
            s.take(&k, &k.cordon("n2"), b"drain", 9);
            s.take(&k, &k.cordon("n3"), b"cordon", 9);
            s.take(&k, &k.leader(), b"n1", 10);
        };
        let mut full = Snapshot::default();
        fill(&mut full);
        type Holds = fn(&Snapshot) -> bool;
        let cases: [(String, Holds); 5] = [
            (k.fleet("bots"), |s| {
                !s.fleets.contains_key("bots") && s.fleets.contains_key("other")
            }),
            (k.assign("bots/a1"), |s| {
                !s.assign.contains_key("bots/a1") && s.assign.contains_key("other/a1")
            }),
            (k.claim("bots/a1"), |s| {
                !s.claims.contains_key("bots/a1") && s.claims.contains_key("other/a1")
            }),
            (k.cordon("n2"), |s| {
                !s.marks.contains_key("n2") && s.marks.contains_key("n3")
            }),
            (k.leader(), |s| s.leader.is_none() && s.fleets.len() == 2),
        ];
        for (key, holds) in cases {
            let mut s = Snapshot::default();
            fill(&mut s);
            s.forget(&k, &key);
            assert!(holds(&s), "{key}: {s:?}");
            // Put back, it reads as before.
            fill(&mut s);
            assert_eq!(format!("{s:?}"), format!("{full:?}"), "{key}");
        }
    }

    /// The cache a watch feeds: any run of puts and deletes applied to a snapshot leaves
    /// it as a fresh read of the resulting keys would be.
    #[test]
    fn changes_applied_in_order_match_a_fresh_read_of_the_result() {
        let k = Keys::new("/fc");
        let doc = |agents: &[&str]| {
            let mut spec = FleetSpec::new("bots");
            spec.agents = agents.iter().map(|a| a.to_string()).collect();
            serde_json::to_vec(&FleetDoc {
                spec,
                stopped: BTreeSet::new(),
                declared_by: None,
            })
            .unwrap()
        };
        let start: Vec<(String, Vec<u8>)> = vec![
            (k.fleet("bots"), doc(&["a1"])),
            (k.assign("bots/a1"), b"n1".to_vec()),
            (k.claim("bots/a1"), b"n1".to_vec()),
            (k.leader(), b"n1".to_vec()),
            (k.desired() + "nodes/n9", b"not json".to_vec()),
        ];
        type Step = (String, Option<Vec<u8>>);
        let runs: Vec<Vec<Step>> = vec![
            vec![],
            // A move: claim let go, placement changed, claimed elsewhere.
            vec![
                (k.claim("bots/a1"), None),
                (k.assign("bots/a1"), Some(b"n2".to_vec())),
                (k.claim("bots/a1"), Some(b"n2".to_vec())),
            ],
            // An agent added, then its fleet removed with everything of it.
            vec![
                (k.fleet("bots"), Some(doc(&["a1", "a2"]))),
                (k.assign("bots/a2"), Some(b"n1".to_vec())),
                (k.fleet("bots"), None),
                (k.assign("bots/a1"), None),
                (k.assign("bots/a2"), None),
                (k.claim("bots/a1"), None),
            ],
            // A leader change; an unreadable key mended; a cordon put and lifted.
            vec![
                (k.leader(), None),
                (k.leader(), Some(b"n2".to_vec())),
                (k.desired() + "nodes/n9", None),
                (k.cordon("n1"), Some(b"drain".to_vec())),
                (k.cordon("n1"), None),
            ],
            // A readable fleet doc overwritten by one that does not parse (a newer build's).
            vec![(k.fleet("bots"), Some(b"not json".to_vec()))],
        ];
        for (i, run) in runs.into_iter().enumerate() {
            let mut cached = Snapshot::default();
            let mut keys: BTreeMap<String, (Vec<u8>, i64)> = BTreeMap::new();
            for (rev, (key, v)) in start.iter().enumerate() {
                cached.take(&k, key, v, rev as i64 + 1);
                keys.insert(key.clone(), (v.clone(), rev as i64 + 1));
            }
            cached.revision = start.len() as i64;
            cached.read_revision = cached.revision;
            for (n, (key, v)) in run.into_iter().enumerate() {
                let rev = (start.len() + n) as i64 + 1;
                cached.change(&k, &key, v.as_deref(), rev);
                match v {
                    Some(v) => drop(keys.insert(key, (v, rev))),
                    None => drop(keys.remove(&key)),
                }
            }
            let mut fresh = Snapshot {
                revision: cached.revision,
                read_revision: cached.read_revision,
                ..Default::default()
            };
            for (key, (v, rev)) in &keys {
                fresh.take(&k, key, v, *rev);
            }
            cached.unreadable.sort();
            fresh.unreadable.sort();
            assert_eq!(format!("{cached:?}"), format!("{fresh:?}"), "run {i}");
        }
    }

    /// A watch that outlives a full read delivers what it lagged behind: events the read
    /// already holds change nothing, later ones apply.
    #[test]
    fn watch_events_the_full_read_already_holds_are_not_applied_again() {
        let k = Keys::new("/fc");
        let mut s = Snapshot::default();
        // The read at revision 10: a1 claimed by n1 again at 9, after a delete at 8.
        s.take(&k, &k.claim("bots/a1"), b"n1", 9);
        s.take(&k, &k.leader(), b"n1", 3);
        (s.revision, s.read_revision) = (10, 10);
        // The lagging watch: the delete at 8, the put at 9, a leader change at 10.
        s.change(&k, &k.claim("bots/a1"), None, 8);
        s.change(&k, &k.claim("bots/a1"), Some(b"n1"), 9);
        s.change(&k, &k.leader(), Some(b"n2"), 10);
        assert_eq!(s.claims.get("bots/a1").map(String::as_str), Some("n1"));
        assert_eq!(s.leader.as_deref(), Some("n1"));
        assert_eq!(s.revision, 10);
        // What came after the read applies, both events of one transaction included.
        s.change(&k, &k.claim("bots/a1"), None, 11);
        s.change(&k, &k.leader(), None, 11);
        assert!(s.claims.is_empty() && s.leader.is_none(), "{s:?}");
        assert_eq!(s.revision, 11);
    }

    #[test]
    fn a_doc_carries_its_tenants_accepted_values_and_a_damaged_one_is_refused() {
        let mut spec = FleetSpec::new("bots");
        spec.agents = vec!["a1".into()];
        let mut t = crate::spec::AgentSettings::default();
        t.secrets
            .insert("TG_BOT_TOKEN".into(), "/host-a/a1.tg".into());
        t.files.insert("SOUL.md".into(), "/host-a/soul.md".into());
        t.accepted.secrets.insert(
            "TG_BOT_TOKEN".into(),
            crate::spec::Secret::new("123:value-from-host-a".into()),
        );
        t.accepted.files.insert("SOUL.md".into(), vec![0, 1, 255]);
        spec.tenants.insert("a1".into(), t);
        spec.token_seed = Some(crate::spec::Secret::new("seed-of-the-fleet".into()));
        spec.token_epochs.insert("a1".into(), 3);
        let doc = FleetDoc {
            spec,
            stopped: ["a1".to_string()].into_iter().collect(),
            declared_by: Some(SpecFile {
                node: "n1".into(),
                path: "/etc/fleet.toml".into(),
            }),
        };
        let bytes = serde_json::to_vec(&doc).unwrap();
        let back: FleetDoc = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(back, doc, "accepted values survive the trip through etcd");
        // Without the vault the spec alone does not hold the values (they never serialize
        // with it): what another host would lack.
        let alone: FleetSpec = serde_json::from_value(
            serde_json::from_slice::<serde_json::Value>(&bytes).unwrap()["spec"].clone(),
        )
        .unwrap();
        assert_ne!(alone, doc.spec);
        let mut v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        v["vault"]["a1"]["files"]["SOUL.md"] = "not base64!".into();
        let e = serde_json::from_value::<FleetDoc>(v)
            .unwrap_err()
            .to_string();
        assert!(e.contains("vault.a1") && e.contains("SOUL.md"), "{e}");
    }
}
