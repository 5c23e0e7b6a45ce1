//! The node's commands on one tenant: its own settings and secrets (`agent add` with
//! settings, `agent set`, `agent secret`), and what the operator may see or run of it
//! (`agent config`, the context of `fleetctl exec`). Each change restarts that agent only.

use super::*;
use crate::messages::command::AgentChange;
use crate::spec::AgentSettings;

impl NodeRuntime {
    /// The tenant settings an `agent add` asks for, read and checked before anything changes.
    pub(super) async fn new_tenant(
        &self,
        fleet: &str,
        agent: &str,
        change: &AgentChange,
    ) -> Result<Option<AgentSettings>, FleetError> {
        if change.is_empty() {
            return Ok(None);
        }
        provision::accepted_change(change, &AgentSettings::default(), fleet, agent)
            .await
            .map(Some)
    }

    /// `agent set` / `agent secret`: the agent's new settings are read and checked, saved
    /// (with the values its secrets had, for redaction), given to its fleet, and the agent
    /// restarts if it should run. An error changes nothing.
    pub(super) async fn set_tenant(
        &mut self,
        fleet: &str,
        agent: &str,
        change: AgentChange,
    ) -> Result<String, FleetError> {
        self.imperative_change(fleet, format!("agent {fleet}/{agent}'s settings"))?;
        self.agent_record(fleet, agent)?;
        self.check_not_removing(fleet, Some(agent))?;
        let old_spec = self.data.fleets[fleet].spec.clone();
        let old = old_spec.tenant(agent).cloned().unwrap_or_default();
        let new = provision::accepted_change(&change, &old, fleet, agent).await?;
        // The files were read off the actor: look again.
        self.agent_record(fleet, agent)?;
        self.check_not_removing(fleet, Some(agent))?;
        let mut new_spec = self.data.fleets[fleet].spec.clone();
        if new.is_empty() {
            new_spec.tenants.remove(agent);
        } else {
            new_spec.tenants.insert(agent.to_string(), new.clone());
        }
        self.check_host_gives(&new_spec)?;
        let why = reconcile::agent_differences(&old_spec, &new_spec, agent);
        if why.is_empty() {
            return Ok(format!("agent {fleet}/{agent}: nothing changed"));
        }
        let gone = old.secrets_dropped_by(Some(&new));
        let f = self.fleet_ref(fleet)?;
        let rec = self.data.fleets.get_mut(fleet).expect("checked above");
        let before = (
            std::mem::replace(&mut rec.spec, new_spec.clone()),
            rec.agents[agent].clone(),
        );
        if let Some(a) = rec.agents.get_mut(agent) {
            a.remember_secrets(gone);
        }
        if let Err(e) = self.save().await {
            let rec = self.data.fleets.get_mut(fleet).expect("checked above");
            rec.spec = before.0;
            rec.agents.insert(agent.to_string(), before.1);
            return Err(e);
        }
        let what = why.join(", ");
        tracing::info!(fleet, agent, changed = %what, "agent settings changed");
        let _ = f.send_message(FleetMsg::UpdateSpec(Arc::new(new_spec)));
        // Saved: the change is made; a restart that cannot be asked for now happens at the
        // agent's next start.
        if let Err(e) = self.restart_for_reload(fleet, agent) {
            tracing::warn!(fleet, agent, error = %e, "agent settings saved; restart not asked for");
        }
        Ok(format!("agent {fleet}/{agent}: {what} changed"))
    }

    /// What `agent config` and `fleetctl exec` show or use: the agent's effective config and
    /// environment. `redact`: every secret (and the gateway token) replaced by `[REDACTED]`.
    pub(super) fn agent_view(
        &self,
        fleet: &str,
        agent: &str,
        redact: bool,
    ) -> Result<Later, FleetError> {
        let rec = self.agent_record(fleet, agent)?.clone();
        let spec = self.data.fleets[fleet].spec.clone();
        let paths = AgentPaths::new(&self.ctx.config.state_dir, fleet, agent);
        let (ctx, fleet, agent) = (self.ctx.clone(), fleet.to_string(), agent.to_string());
        Ok(Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                agent_view(&ctx, &spec, &rec, &paths, &fleet, &agent, redact)
                    .unwrap_or_else(Reply::Error)
            })
            .await
            .unwrap_or_else(|e| Reply::Error(FleetError::internal(e)))
        }))
    }
}

impl NodeRuntime {
    /// `say`: the agent's bot gets a DM through the fake Bot API its config points at, and
    /// the answer is the bot's reply. Only a loopback `apiRoot` is ever called.
    pub(super) fn say(&self, fleet: &str, agent: &str, text: String) -> Result<Later, FleetError> {
        self.agent_record(fleet, agent)?;
        let spec = self.data.fleets[fleet].spec.clone();
        let (fleet, agent) = (fleet.to_string(), agent.to_string());
        Ok(Box::pin(async move {
            tokio::task::spawn_blocking(move || match say_blocking(&spec, &agent, &text) {
                Ok(reply) => Reply::Done {
                    message: format!("{fleet}/{agent}'s bot: {reply}"),
                },
                Err(why) => Reply::Error(FleetError::invalid("say", why)),
            })
            .await
            .unwrap_or_else(|e| Reply::Error(FleetError::internal(e)))
        }))
    }
}

/// The bot token the agent's Telegram channel uses, as the gateway would resolve it.
fn bot_token(tg: &serde_json::Value, env: &BTreeMap<String, String>) -> Result<String, String> {
    if let Some(t) = tg.get("botToken").and_then(|v| v.as_str()) {
        if let Some(var) = t.strip_prefix("${").and_then(|r| r.strip_suffix('}')) {
            return env
                .get(var)
                .cloned()
                .ok_or_else(|| format!("botToken is ${{{var}}} and the agent has no {var}"));
        }
        return Ok(t.to_string());
    }
    if let Some(f) = tg.get("tokenFile").and_then(|v| v.as_str()) {
        let b = crate::operator_file::read_bounded(std::path::Path::new(f), 4096)
            .map_err(|e| format!("tokenFile {f}: it {e}"))?;
        return Ok(String::from_utf8_lossy(&b).trim().to_string());
    }
    Err("its Telegram channel has no botToken or tokenFile".into())
}

fn say_blocking(spec: &FleetSpec, agent: &str, text: &str) -> Result<String, String> {
    use std::io::{Read, Write};
    let cfg = provision::effective_template(spec, agent).unwrap_or_default();
    let tg = cfg
        .pointer("/channels/telegram")
        .ok_or("the agent's config sets up no Telegram channel (channels.telegram)")?;
    let root = tg
        .get("apiRoot")
        .and_then(|v| v.as_str())
        .ok_or("say talks to a loopback fake Bot API only, and this bot has no apiRoot (it uses the real Telegram: message it from your phone)")?;
    let hostport = root
        .strip_prefix("http://127.0.0.1:")
        .map(|p| p.trim_end_matches('/'))
        .and_then(|p| p.parse::<u16>().ok())
        .ok_or_else(|| format!("apiRoot {root:?} is not http://127.0.0.1:PORT: say only talks to the demo's loopback fakes"))?;
    let env = provision::extra_env(spec, agent).map_err(|e| e.to_string())?;
    let token = bot_token(tg, &env)?;
    let from = tg
        .pointer("/allowFrom/0")
        .and_then(|v| {
            v.as_str()
                .map(str::to_string)
                .or_else(|| v.as_i64().map(|n| n.to_string()))
        })
        .and_then(|s| s.parse::<i64>().ok())
        .unwrap_or(4242);
    let body = serde_json::json!({"token": token, "from": from, "text": text, "timeout_s": 180})
        .to_string();
    let mut s = std::net::TcpStream::connect(("127.0.0.1", hostport)).map_err(|e| {
        format!("the fake Bot API at {root} does not answer ({e}): is fleet-fakes running?")
    })?;
    let _ = s.set_read_timeout(Some(std::time::Duration::from_secs(200)));
    write!(
        s,
        "POST /_fake/say HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .map_err(|e| format!("sending to {root}: {e}"))?;
    let mut out = Vec::new();
    let _ = (&mut s).take(1 << 20).read_to_end(&mut out);
    let out = String::from_utf8_lossy(&out);
    let json = out.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    let v: serde_json::Value = serde_json::from_str(json)
        .map_err(|_| format!("{root} answered no JSON: is it fleet-fakes?"))?;
    match v.get("reply").and_then(|r| r.as_str()) {
        Some(r) => Ok(r.to_string()),
        None => Err(v
            .get("description")
            .and_then(|d| d.as_str())
            .unwrap_or("no reply")
            .to_string()),
    }
}

const REDACTED: &str = "[REDACTED]";

/// Blocking: resolves the OpenClaw install and renders the agent's config and env.
fn agent_view(
    ctx: &NodeContext,
    spec: &FleetSpec,
    rec: &AgentRecord,
    paths: &AgentPaths,
    fleet: &str,
    agent: &str,
    redact: bool,
) -> Result<Reply, FleetError> {
    let port = rec.port_base.unwrap_or(0);
    let install = if spec.runs_openclaw() {
        provision::resolve_openclaw_version(
            ctx.config.openclaw_bin.as_deref(),
            spec.openclaw_version_of(agent),
        )
        .ok()
    } else {
        None
    };
    let node_bin_dir = install.as_ref().and_then(|i| i.node_bin_dir.clone());
    let mut extra = provision::extra_env(spec, agent)?;
    let tenant = spec.tenant(agent);
    let secret_names: Vec<String> = tenant
        .map(|t| t.secrets.keys().cloned().collect())
        .unwrap_or_default();
    let mut secret_values: Vec<String> = tenant
        .map(|t| {
            t.accepted
                .secrets
                .values()
                .map(|v| v.expose().to_string())
                .collect()
        })
        .unwrap_or_default();
    secret_values.push(rec.token.clone());
    if redact {
        for n in &secret_names {
            extra.insert(n.clone(), REDACTED.into());
        }
    }
    let env = provision::agent_env(&provision::EnvInput {
        paths,
        port,
        node_bin_dir: node_bin_dir.as_deref(),
        profile: spec.profile,
        marker: &format!("{fleet}/{agent}"),
        extra: &extra,
        runs_openclaw: spec.runs_openclaw(),
        heap_mib: None,
    });
    if !redact {
        // The operator's program is no member of the agent: no marker, and `openclaw` on PATH.
        let bin = install.as_ref().and_then(|i| {
            i.openclaw
                .parent()
                .map(|p| p.to_string_lossy().into_owned())
        });
        let env = env
            .into_iter()
            .filter(|(k, _)| k != provision::MARKER_VAR)
            .map(|(k, v)| match (&bin, k.as_str()) {
                (Some(b), "PATH") => (k, format!("{b}:{v}")),
                _ => (k, v),
            })
            .collect();
        return Ok(Reply::Exec {
            cwd: paths.home.to_string_lossy().into_owned(),
            env,
            isolation: crate::isolation::IsolationStatus::of(ctx.host, spec.isolation, rec.uid),
            port,
            ports: rec.stride,
        });
    }
    let template = provision::effective_template(spec, agent);
    let config = if spec.runs_openclaw() {
        let enforced = provision::Enforced {
            token: REDACTED,
            port,
            log_file: &paths.openclaw_log,
            log_max_bytes: spec.logs.max_bytes,
            profile: spec.profile,
            stride: rec.stride,
            webhook_secret: REDACTED,
            public: ctx.config.public_url.as_deref().map(|u| (u, fleet, agent)),
        };
        provision::render_config(template.as_ref(), &enforced)?.0
    } else {
        template.unwrap_or(serde_json::Value::Null)
    };
    // A template may hold a secret's value literally: it is redacted there too, in every
    // string (not in the JSON text, where escaping could hide it).
    let secrets: Vec<&str> = secret_values.iter().map(String::as_str).collect();
    let mut config = config;
    redact_strings(&mut config, &secrets);
    Ok(Reply::Config {
        fleet: fleet.to_string(),
        agent: agent.to_string(),
        config,
        env: env
            .into_iter()
            .map(|(k, v)| (k, crate::logs::tail::redact(&v, &secrets)))
            .collect(),
        secrets: secret_names,
        files: tenant
            .map(|t| t.files.keys().cloned().collect())
            .unwrap_or_default(),
    })
}

/// Every string in `v` (keys too) with the secrets replaced.
fn redact_strings(v: &mut serde_json::Value, secrets: &[&str]) {
    use serde_json::Value;
    match v {
        Value::String(s) => *s = crate::logs::tail::redact(s, secrets),
        Value::Array(a) => a.iter_mut().for_each(|x| redact_strings(x, secrets)),
        Value::Object(m) => {
            let old = std::mem::take(m);
            for (k, mut x) in old {
                redact_strings(&mut x, secrets);
                m.insert(crate::logs::tail::redact(&k, secrets), x);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn secrets_are_redacted_in_every_string_even_escaped_ones() {
        let secret = "se\"cret\\value";
        let mut v =
            serde_json::json!({"a": [format!("x{secret}y")], secret: {"b": secret}, "n": 1});
        super::redact_strings(&mut v, &[secret]);
        assert!(!v.to_string().contains("cret"), "{v}");
        assert_eq!(v["a"][0], "x[REDACTED]y");
        assert_eq!(v["[REDACTED]"]["b"], "[REDACTED]");
    }
}
