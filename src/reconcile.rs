//! Reconciling: the desired fleets against what runs, as a list of actions. `plan` is a plain
//! function (table-tested below) that knows nothing of actors, files or stores; the node
//! carries the actions out. It serves a spec reload (desired: the new spec; running: the
//! fleets the spec owns), the daemon's start (desired: the registry; running: nothing yet) and,
//! later, a store that pushes changes (an etcd watch gives a new desired state: plan again).

use crate::spec::FleetSpec;
use std::collections::BTreeMap;

/// What differs between two versions of a fleet that its agents can only take by
/// restarting, by field name; empty when a restart is not needed.
pub fn run_differences(old: &FleetSpec, new: &FleetSpec) -> Vec<&'static str> {
    let mut v = Vec::new();
    if old.command != new.command {
        v.push("command");
    }
    if old.env != new.env {
        v.push("env");
    }
    if old.template != new.template {
        v.push("template");
    } else if old.template_config != new.template_config {
        v.push("template content");
    }
    if old.profile != new.profile {
        v.push("profile");
    }
    if old.stride != new.stride {
        v.push("stride");
    }
    if old.node_flags != new.node_flags {
        v.push("node_flags");
    }
    // A running agent's prober is started with it: probes switched on or off take a restart.
    if old.health.enabled != new.health.enabled {
        v.push("health.enabled");
    }
    v
}

/// What differs in one agent's own settings between two versions of its fleet, by field
/// name; an agent restarts for these alone, its siblings do not.
pub fn agent_differences(old: &FleetSpec, new: &FleetSpec, agent: &str) -> Vec<&'static str> {
    let none = crate::spec::AgentSettings::default();
    let o = old.tenant(agent).unwrap_or(&none);
    let n = new.tenant(agent).unwrap_or(&none);
    let mut v = Vec::new();
    if o.template != n.template {
        v.push("its template");
    } else if o.template_config != n.template_config {
        v.push("its template content");
    }
    if o.env != n.env {
        v.push("its env");
    }
    if o.secrets != n.secrets || o.accepted.secrets != n.accepted.secrets {
        v.push("its secrets");
    }
    if o.files != n.files || o.accepted.files != n.accepted.files {
        v.push("its files");
    }
    // The version it runs, whoever sets it: an upgrade that ends by moving the fleet's
    // version to what each agent already runs restarts nobody.
    if old.openclaw_version_of(agent) != new.openclaw_version_of(agent) {
        v.push("its openclaw version");
    }
    v
}

/// One change in words, by name: what the log and the reply of `reload` say.
pub fn describe(c: &Action, old: &[FleetSpec], new: &[FleetSpec]) -> String {
    let find = |v: &[FleetSpec], name: &str| v.iter().find(|s| s.name == name).cloned();
    match c {
        Action::AddFleet(s) => format!("create fleet {} ({} agents)", s.name, s.agents.len()),
        Action::RemoveFleet(f) => format!("remove fleet {f}"),
        Action::UpdateFleet { fleet, .. } => format!("update fleet {fleet}'s settings"),
        Action::AddAgent { fleet, agent } => format!("add agent {fleet}/{agent}"),
        Action::RemoveAgent { fleet, agent } => format!("remove agent {fleet}/{agent}"),
        Action::RestartAgent { fleet, agent } => {
            let why = match (find(old, fleet), find(new, fleet)) {
                (Some(o), Some(n)) => {
                    let mut v = run_differences(&o, &n);
                    v.extend(agent_differences(&o, &n, agent));
                    v.join(", ")
                }
                _ => String::new(),
            };
            format!("restart agent {fleet}/{agent} ({why} changed)")
        }
    }
}

/// One step of bringing what runs (`old`) to what is desired (`new`). The consumer
/// records the new specs; `AddAgent` and `RestartAgent` run with the new spec's settings.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    AddFleet(FleetSpec),
    RemoveFleet(String),
    /// The fleet's settings changed: the consumer records `spec` (without restarting anyone
    /// for it; what must restart comes as `RestartAgent`).
    UpdateFleet {
        fleet: String,
        spec: FleetSpec,
    },
    AddAgent {
        fleet: String,
        agent: String,
    },
    RemoveAgent {
        fleet: String,
        agent: String,
    },
    /// What runs changed (command, env, template, profile, stride): each agent that stays
    /// restarts.
    RestartAgent {
        fleet: String,
        agent: String,
    },
}

/// Changes from `old` to `new`: fleets by name; within a fleet `UpdateFleet`, then
/// `RemoveAgent` (old order), `RestartAgent` and `AddAgent` (new spec order).
pub fn plan(old: &[FleetSpec], new: &[FleetSpec]) -> Vec<Action> {
    let old_by: BTreeMap<&str, &FleetSpec> = old.iter().map(|f| (f.name.as_str(), f)).collect();
    let new_by: BTreeMap<&str, &FleetSpec> = new.iter().map(|f| (f.name.as_str(), f)).collect();
    let mut names: Vec<&str> = old_by.keys().chain(new_by.keys()).copied().collect();
    names.sort_unstable();
    names.dedup();
    let mut out = Vec::new();
    for name in names {
        match (old_by.get(name), new_by.get(name)) {
            (Some(_), None) => out.push(Action::RemoveFleet(name.to_string())),
            (None, Some(n)) => out.push(Action::AddFleet((*n).clone())),
            (Some(o), Some(n)) => diff_fleet(o, n, &mut out),
            (None, None) => {}
        }
    }
    out
}

fn diff_fleet(old: &FleetSpec, new: &FleetSpec, out: &mut Vec<Action>) {
    let fleet = || new.name.clone();
    let runs_differently = !run_differences(old, new).is_empty();
    let staying_old: Vec<&String> = old
        .agents
        .iter()
        .filter(|a| new.agents.contains(a))
        .collect();
    let staying_new: Vec<&String> = new
        .agents
        .iter()
        .filter(|a| old.agents.contains(a))
        .collect();
    // Anything else that differs is hot-applicable, including fields added to FleetSpec later.
    let mut rest = old.clone();
    rest.agents = new.agents.clone();
    rest.command = new.command.clone();
    rest.env = new.env.clone();
    rest.template = new.template.clone();
    rest.template_config = new.template_config.clone();
    rest.profile = new.profile;
    rest.stride = new.stride;
    rest.tenants = new.tenants.clone();
    let tenants_differ = old.tenants != new.tenants;
    // A change of what runs is an update too: agents added after it (or a fleet whose agents
    // are all replaced) must start with the new settings.
    if rest != *new || staying_old != staying_new || runs_differently || tenants_differ {
        out.push(Action::UpdateFleet {
            fleet: fleet(),
            spec: new.clone(),
        });
    }
    for a in old.agents.iter().filter(|a| !new.agents.contains(a)) {
        out.push(Action::RemoveAgent {
            fleet: fleet(),
            agent: a.clone(),
        });
    }
    for a in staying_new {
        if runs_differently || !agent_differences(old, new, a).is_empty() {
            out.push(Action::RestartAgent {
                fleet: fleet(),
                agent: a.clone(),
            });
        }
    }
    for a in new.agents.iter().filter(|a| !old.agents.contains(a)) {
        out.push(Action::AddAgent {
            fleet: fleet(),
            agent: a.clone(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{Profile, Strategy};

    fn fleet(name: &str, agents: &[&str]) -> FleetSpec {
        let mut s = FleetSpec::new(name);
        s.agents = agents.iter().map(|a| a.to_string()).collect();
        s
    }

    fn restart(f: &str, a: &str) -> Action {
        Action::RestartAgent {
            fleet: f.into(),
            agent: a.into(),
        }
    }

    #[test]
    fn from_nothing_every_fleet_is_added_in_name_order() {
        let desired = [fleet("b", &["x"]), fleet("a", &["y", "z"])];
        let actions = plan(&[], &desired);
        assert_eq!(
            actions,
            vec![
                Action::AddFleet(desired[1].clone()),
                Action::AddFleet(desired[0].clone())
            ]
        );
        assert_eq!(
            plan(&desired, &[]).len(),
            2,
            "and to nothing every fleet goes"
        );
    }

    #[test]
    fn a_fleet_whose_agents_are_all_replaced_still_takes_its_new_settings() {
        let mut old = fleet("f", &["a"]);
        old.command = Some(vec!["/bin/v1".into()]);
        let mut new = fleet("f", &["b"]);
        new.command = Some(vec!["/bin/v2".into()]);
        assert_eq!(
            plan(&[old], std::slice::from_ref(&new)),
            vec![
                Action::UpdateFleet {
                    fleet: "f".into(),
                    spec: new.clone()
                },
                Action::RemoveAgent {
                    fleet: "f".into(),
                    agent: "a".into()
                },
                Action::AddAgent {
                    fleet: "f".into(),
                    agent: "b".into()
                },
            ]
        );
    }

    #[test]
    fn diff_unchanged_is_empty() {
        let specs = vec![fleet("a", &["x", "y"]), fleet("b", &["z"])];
        assert_eq!(plan(&specs, &specs.clone()), vec![]);
    }

    #[test]
    fn diff_adds_and_removes_fleets_in_name_order() {
        let old = vec![fleet("m", &["x"]), fleet("b", &["x"])];
        let new = vec![fleet("z", &["x"]), fleet("m", &["x"]), fleet("a", &[])];
        assert_eq!(
            plan(&old, &new),
            vec![
                Action::AddFleet(fleet("a", &[])),
                Action::RemoveFleet("b".into()),
                Action::AddFleet(fleet("z", &["x"])),
            ]
        );
    }

    #[test]
    fn diff_adds_and_removes_agents() {
        let old = vec![fleet("f", &["a", "b", "c"])];
        let new = vec![fleet("f", &["a", "c", "e", "d"])];
        assert_eq!(
            plan(&old, &new),
            vec![
                Action::RemoveAgent {
                    fleet: "f".into(),
                    agent: "b".into()
                },
                Action::AddAgent {
                    fleet: "f".into(),
                    agent: "e".into()
                },
                Action::AddAgent {
                    fleet: "f".into(),
                    agent: "d".into()
                },
            ]
        );
    }

    #[test]
    fn diff_changed_command_restarts_remaining_agents_of_that_fleet_only() {
        let old = vec![fleet("f", &["a", "b", "c"]), fleet("g", &["a"])];
        let mut f2 = fleet("f", &["c", "a", "new"]);
        f2.command = Some(vec!["/bin/other".into()]);
        let new = vec![f2, fleet("g", &["a"])];
        let changes = plan(&old, &new);
        let restarts: Vec<_> = changes
            .iter()
            .filter(|c| matches!(c, Action::RestartAgent { .. }))
            .cloned()
            .collect();
        assert_eq!(restarts, vec![restart("f", "c"), restart("f", "a")]);
        assert!(
            changes.contains(&Action::RemoveAgent {
                fleet: "f".into(),
                agent: "b".into()
            }),
            "{changes:?}"
        );
        assert!(changes.iter().all(|c| !matches!(c,
            Action::RestartAgent { fleet, .. } | Action::UpdateFleet { fleet, .. } if fleet == "g")));
    }

    #[test]
    fn diff_each_run_setting_restarts() {
        let base = fleet("f", &["a"]);
        let mut cases: Vec<(&str, FleetSpec)> = Vec::new();
        let mut s = base.clone();
        s.env.insert("K".into(), "v".into());
        cases.push(("env", s));
        let mut s = base.clone();
        s.template = Some("t.json".into());
        cases.push(("template", s));
        let mut s = base.clone();
        s.profile = Profile::Lean;
        cases.push(("profile", s));
        let mut s = base.clone();
        s.stride = Some(200);
        cases.push(("stride", s));
        let mut s = base.clone();
        s.node_flags = vec!["--optimize-for-size".into()];
        cases.push(("node_flags", s));
        let mut s = base.clone();
        s.health.enabled = false;
        cases.push(("health.enabled", s));
        for (what, new) in cases {
            // The fleet records its new spec first, then its agent restarts on it.
            assert_eq!(
                plan(std::slice::from_ref(&base), std::slice::from_ref(&new)),
                vec![
                    Action::UpdateFleet {
                        fleet: "f".into(),
                        spec: new.clone()
                    },
                    restart("f", "a")
                ],
                "changing {what}"
            );
        }
    }

    #[test]
    fn an_agents_own_settings_restart_that_agent_only() {
        use crate::spec::{AgentSettings, Secret};
        let mut base = fleet("f", &["a", "b", "c"]);
        let mut t = AgentSettings::default();
        t.secrets.insert("TG_BOT_TOKEN".into(), "/s/a".into());
        t.accepted
            .secrets
            .insert("TG_BOT_TOKEN".into(), Secret::new("1:first-value".into()));
        base.tenants.insert("a".into(), t);
        let tenant = |s: &mut FleetSpec, a: &str| s.tenants.entry(a.into()).or_default().clone();
        let mut cases: Vec<(&str, &str, FleetSpec)> = Vec::new();
        let mut s = base.clone();
        let mut t = tenant(&mut s, "a");
        t.accepted
            .secrets
            .insert("TG_BOT_TOKEN".into(), Secret::new("1:second-value".into()));
        s.tenants.insert("a".into(), t);
        cases.push(("a", "its secrets", s));
        let mut s = base.clone();
        let mut t = tenant(&mut s, "b");
        t.env.insert("TZ".into(), "Europe/Madrid".into());
        s.tenants.insert("b".into(), t);
        cases.push(("b", "its env", s));
        let mut s = base.clone();
        let mut t = tenant(&mut s, "c");
        t.files.insert("SOUL.md".into(), "/s/soul".into());
        t.accepted.files.insert("SOUL.md".into(), b"x".to_vec());
        s.tenants.insert("c".into(), t);
        cases.push(("c", "its files", s));
        let mut s = base.clone();
        let mut t = tenant(&mut s, "a");
        t.template = Some("/s/a.json".into());
        t.template_config = Some(serde_json::json!({}));
        s.tenants.insert("a".into(), t);
        cases.push(("a", "its template", s));
        let mut s = base.clone();
        s.tenants.remove("a");
        cases.push(("a", "its secrets", s));
        for (agent, why, new) in cases {
            let old = std::slice::from_ref(&base);
            let actions = plan(old, std::slice::from_ref(&new));
            assert_eq!(
                actions,
                vec![
                    Action::UpdateFleet {
                        fleet: "f".into(),
                        spec: new.clone()
                    },
                    restart("f", agent)
                ],
                "{why} of {agent}"
            );
            let said = describe(&actions[1], old, std::slice::from_ref(&new));
            assert!(said.contains(why), "{said}");
        }
        // The same secret read again: nothing to do.
        assert_eq!(plan(std::slice::from_ref(&base), &[base.clone()]), vec![]);
    }

    #[test]
    fn diff_changed_strategy_is_update_only() {
        let old = vec![fleet("f", &["a", "b"])];
        let mut s = fleet("f", &["a", "b"]);
        s.strategy = Strategy::OneForAll;
        s.health.grace_ms = 1;
        s.max_memory = Some(1 << 30);
        assert_eq!(
            plan(&old, &[s.clone()]),
            vec![Action::UpdateFleet {
                fleet: "f".into(),
                spec: s
            }]
        );
    }

    #[test]
    fn diff_reordered_agents_update_the_fleet() {
        let old = vec![fleet("f", &["a", "b"])];
        let new = vec![fleet("f", &["b", "a"])];
        assert_eq!(
            plan(&old, &new),
            vec![Action::UpdateFleet {
                fleet: "f".into(),
                spec: new[0].clone()
            }]
        );
    }
}
