//! `--spec` in cluster mode: a node's spec file declares fleets of the cluster's desired
//! state. `reload` (and SIGHUP, and the node's start) brings etcd to the file: it creates
//! the fleets the file adds, replaces the settings of those it changed and removes those it
//! dropped. A fleet made by commands, or declared by another node's file, is never touched:
//! a file that names one is refused whole. As in single-host mode the file owns what it
//! declares, so commands that would change a declared fleet's agents are refused.

use super::front::{done, Front};
use super::keys::{FleetDoc, SpecFile};
use crate::messages::command::Reply;
use crate::node::NodeHandle;
use crate::spec::FleetSpec;
use crate::FleetError;
use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Create(String),
    Update(String),
    Remove(String),
}

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Change::Create(n) => write!(f, "create fleet {n}"),
            Change::Update(n) => write!(f, "update fleet {n}"),
            Change::Remove(n) => write!(f, "remove fleet {n}"),
        }
    }
}

/// What `owner`'s file (`file`, its fleets as accepted) changes in the cluster's fleets.
pub fn plan(
    owner: &SpecFile,
    file: &[FleetSpec],
    cluster: &BTreeMap<String, FleetDoc>,
) -> Result<Vec<Change>, FleetError> {
    let mut out = Vec::new();
    let mut conflicts = Vec::new();
    for spec in file {
        match cluster.get(&spec.name) {
            None => out.push(Change::Create(spec.name.clone())),
            Some(doc) if doc.declared_by.as_ref() != Some(owner) => conflicts.push(format!(
                "fleet {} already exists in the cluster, {}",
                spec.name,
                made_by(doc)
            )),
            Some(doc) if !same_settings(&doc.spec, spec) => {
                out.push(Change::Update(spec.name.clone()))
            }
            Some(_) => {}
        }
    }
    for (name, doc) in cluster {
        if doc.declared_by.as_ref() == Some(owner) && !file.iter().any(|s| &s.name == name) {
            out.push(Change::Remove(name.clone()));
        }
    }
    if !conflicts.is_empty() {
        return Err(FleetError::Spec {
            reason: format!(
                "{}: {}; nothing was changed",
                owner.path,
                conflicts.join("; ")
            ),
        });
    }
    Ok(out)
}

fn made_by(doc: &FleetDoc) -> String {
    match &doc.declared_by {
        None => "made by commands".into(),
        Some(o) => format!("declared by {o}"),
    }
}

/// The file's settings against etcd's, leaving out what only etcd holds (the token seed
/// and rotations).
fn same_settings(in_etcd: &FleetSpec, in_file: &FleetSpec) -> bool {
    let mut a = in_etcd.clone();
    a.token_seed = None;
    a.token_epochs.clear();
    let mut b = in_file.clone();
    b.token_seed = None;
    b.token_epochs.clear();
    a == b
}

/// A command's change of a fleet a spec file declares: refused, naming the file.
pub fn imperative(doc: &FleetDoc, what: String) -> Result<(), FleetError> {
    match &doc.declared_by {
        Some(o) => Err(FleetError::OwnedBySpec {
            what,
            spec: o.to_string(),
        }),
        None => Ok(()),
    }
}

impl Front {
    /// `reload` in cluster mode: this node's `--spec` file into etcd (see the module).
    pub(super) async fn reload(
        &self,
        local: &NodeHandle,
        dry_run: bool,
    ) -> Result<Reply, FleetError> {
        let Some(path) = local.spec_path().map(std::path::Path::to_path_buf) else {
            return Err(FleetError::invalid(
                "reload",
                "the daemon was started without --spec",
            ));
        };
        let owner = SpecFile {
            node: self.cfg.node_name.clone(),
            path: path.display().to_string(),
        };
        let specs = tokio::task::spawn_blocking(move || crate::specfile::load_spec(&path))
            .await
            .map_err(FleetError::internal)??;
        let mut file = Vec::new();
        for s in specs {
            s.check()?;
            file.push(crate::provision::accepted_spec(s).await?);
        }
        let snap = self.etcd.snapshot(false).await?;
        let docs: BTreeMap<String, FleetDoc> =
            snap.fleets.into_iter().map(|(k, (d, _))| (k, d)).collect();
        let changes = plan(&owner, &file, &docs)?;
        if changes.is_empty() {
            return Ok(done(format!(
                "nothing to change: the cluster holds what {owner} declares"
            )));
        }
        let words: Vec<String> = changes.iter().map(Change::to_string).collect();
        if dry_run {
            return Ok(done(format!("would (cluster-wide): {}", words.join("; "))));
        }
        for (i, c) in changes.iter().enumerate() {
            if let Err(e) = self.carry_out(&owner, &file, c).await {
                let failed = format!("{c}: {e}");
                return Err(if i == 0 {
                    e
                } else {
                    FleetError::Partial {
                        done: words[..i].join("; "),
                        failed,
                    }
                });
            }
        }
        Ok(done(format!(
            "reloaded {owner} (cluster-wide): {}",
            words.join("; ")
        )))
    }

    async fn carry_out(
        &self,
        owner: &SpecFile,
        file: &[FleetSpec],
        change: &Change,
    ) -> Result<(), FleetError> {
        let find = |n: &str| file.iter().find(|s| s.name == n).cloned();
        let not_ours = |name: &str, doc: &FleetDoc| FleetError::Spec {
            reason: format!("fleet {name} is {} now; nothing was changed", made_by(doc)),
        };
        match change {
            Change::Create(name) => {
                let mut spec = find(name).ok_or_else(|| FleetError::internal("planned fleet"))?;
                spec.token_seed =
                    Some(crate::spec::Secret::new(crate::provision::generate_token()?));
                self.etcd
                    .update_fleet(name, |old| match old {
                        Some(d) => Err(not_ours(name, &d)),
                        None => Ok(Some(FleetDoc {
                            spec: spec.clone(),
                            stopped: Default::default(),
                            declared_by: Some(owner.clone()),
                        })),
                    })
                    .await
            }
            Change::Update(name) => {
                let new = find(name).ok_or_else(|| FleetError::internal("planned fleet"))?;
                self.etcd
                    .update_fleet(name, |old| {
                        let Some(mut doc) = old else {
                            return Err(FleetError::NoSuchFleet {
                                fleet: name.clone(),
                            });
                        };
                        if doc.declared_by.as_ref() != Some(owner) {
                            return Err(not_ours(name, &doc));
                        }
                        let seed = doc.spec.token_seed.take();
                        let mut epochs = std::mem::take(&mut doc.spec.token_epochs);
                        epochs.retain(|a, _| new.agents.contains(a));
                        doc.spec = new.clone();
                        doc.spec.token_seed = seed;
                        doc.spec.token_epochs = epochs;
                        doc.stopped.retain(|a| new.agents.contains(a));
                        Ok(Some(doc))
                    })
                    .await
            }
            Change::Remove(name) => {
                self.etcd
                    .update_fleet(name, |old| match old {
                        Some(d) if d.declared_by.as_ref() != Some(owner) => Err(not_ours(name, &d)),
                        _ => Ok(None),
                    })
                    .await
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, agents: &[&str]) -> FleetSpec {
        let mut s = FleetSpec::new(name);
        s.agents = agents.iter().map(|a| a.to_string()).collect();
        s
    }

    fn doc(s: FleetSpec, by: Option<&SpecFile>) -> FleetDoc {
        FleetDoc {
            spec: s,
            stopped: Default::default(),
            declared_by: by.cloned(),
        }
    }

    #[test]
    fn a_spec_file_changes_only_the_fleets_it_declares() {
        let me = SpecFile {
            node: "n1".into(),
            path: "/etc/f.toml".into(),
        };
        let other = SpecFile {
            node: "n2".into(),
            path: "/etc/f.toml".into(),
        };
        let mut seeded = spec("same", &["a"]);
        seeded.token_seed = Some(crate::spec::Secret::new("x".into()));
        seeded.token_epochs.insert("a".into(), 1);
        let cluster: BTreeMap<String, FleetDoc> = [
            ("same", doc(seeded, Some(&me))),
            ("grown", doc(spec("grown", &["a"]), Some(&me))),
            ("dropped", doc(spec("dropped", &["a"]), Some(&me))),
            ("by-hand", doc(spec("by-hand", &["a"]), None)),
            ("theirs", doc(spec("theirs", &["a"]), Some(&other))),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let c = |s: &str| Change::Create(s.into());
        let u = |s: &str| Change::Update(s.into());
        let r = |s: &str| Change::Remove(s.into());
        type Want = Result<Vec<Change>, &'static str>;
        let cases: Vec<(&str, Vec<FleetSpec>, Want)> = vec![
            (
                "new, changed, same, dropped",
                vec![
                    spec("new", &["a"]),
                    spec("grown", &["a", "b"]),
                    spec("same", &["a"]),
                ],
                Ok(vec![c("new"), u("grown"), r("dropped")]),
            ),
            (
                "an empty file drops what it declared",
                vec![],
                Ok(vec![r("dropped"), r("grown"), r("same")]),
            ),
            (
                "a fleet made by commands",
                vec![spec("by-hand", &["a"]), spec("new", &["a"])],
                Err("fleet by-hand already exists in the cluster, made by commands"),
            ),
            (
                "another node's",
                vec![spec("theirs", &["a"])],
                Err("declared by /etc/f.toml on node n2"),
            ),
        ];
        for (what, file, want) in cases {
            match (plan(&me, &file, &cluster), want) {
                (Ok(got), Ok(want)) => assert_eq!(got, want, "{what}"),
                (Err(e), Err(w)) => {
                    let e = e.to_string();
                    assert!(
                        e.contains(w) && e.contains("nothing was changed"),
                        "{what}: {e}"
                    )
                }
                (got, want) => panic!("{what}: got {got:?}, want {want:?}"),
            }
        }
    }
}
