//! The agent's `openclaw.json`: the fleet's template (read once, when accepted) under the
//! values the commander enforces, written atomically.

use super::*;
use crate::error::FleetError;
use crate::spec::Profile;
use serde_json::{Map, Value};
use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// The values the commander writes into every agent's config whatever the template says.
#[derive(Debug, Clone)]
pub struct Enforced<'a> {
    pub token: &'a str,
    pub port: u16,
    pub log_file: &'a Path,
    pub log_max_bytes: u64,
    pub profile: Profile,
    /// Ports leased to the agent from `port` on: a webhook listener gets one of them.
    pub stride: u16,
    /// What each webhook listener checks (`webhooks::secret`).
    pub webhook_secret: &'a str,
    /// `(public base URL, fleet, agent)`: the `webhookUrl` each listener registers.
    pub public: Option<(&'a str, &'a str, &'a str)>,
}

/// Merges the fleet's template (a JSON object) under the enforced values. Returns the config
/// and one warning per template value that was overridden; warnings never carry a token.
pub fn render_config(
    template: Option<&Value>,
    enforced: &Enforced,
) -> Result<(Value, Vec<String>), FleetError> {
    if enforced.token.is_empty() {
        return Err(FleetError::invalid(
            "gateway.auth.token",
            "must not be empty",
        ));
    }
    if enforced.port == 0 {
        return Err(FleetError::invalid("gateway.port", "must not be 0"));
    }
    if !enforced.log_file.is_absolute() {
        return Err(FleetError::invalid(
            "logging.file",
            format!("must be absolute, got {}", enforced.log_file.display()),
        ));
    }
    let mut root = match template {
        None => Map::new(),
        Some(Value::Object(m)) => m.clone(),
        Some(other) => {
            return Err(FleetError::invalid(
                "template",
                format!("must be a JSON object, got {}", json_kind(other)),
            ))
        }
    };
    let mut warnings = Vec::new();
    let hooks = crate::webhooks::ports(
        Some(&Value::Object(root.clone())),
        enforced.port,
        enforced.stride,
    );
    let mut no_public = Vec::new();
    let log_file = enforced.log_file.to_string_lossy().into_owned();
    let mut set = |path: &[&str], value: Value, secret: bool| {
        enforce(&mut root, path, value, secret, &mut warnings)
    };
    set(&["gateway", "mode"], "local".into(), false);
    set(&["gateway", "bind"], "loopback".into(), false);
    set(&["gateway", "auth", "mode"], "token".into(), false);
    set(&["gateway", "auth", "token"], enforced.token.into(), true);
    set(&["gateway", "port"], enforced.port.into(), false);
    set(&["logging", "file"], log_file.into(), false);
    set(
        &["logging", "maxFileBytes"],
        enforced.log_max_bytes.into(),
        false,
    );
    // A channel in webhook mode listens on loopback, on a port of the agent's own block, at
    // the path the front door routes to, checking the agent's own secret.
    for (ch, port) in hooks {
        let Some(port) = port else {
            return Err(FleetError::invalid(
                format!("channels.{ch}.webhookUrl"),
                format!(
                    "a webhook listener needs a port of the agent's block, and its {} ports leave none: use a stride of at least 2",
                    enforced.stride
                ),
            ));
        };
        set(&["channels", ch, "webhookHost"], "127.0.0.1".into(), false);
        set(&["channels", ch, "webhookPort"], port.into(), false);
        set(
            &["channels", ch, "webhookPath"],
            crate::webhooks::LISTENER_PATH.into(),
            false,
        );
        set(
            &["channels", ch, "webhookSecret"],
            enforced.webhook_secret.into(),
            true,
        );
        match enforced.public {
            Some((base, fleet, agent)) => set(
                &["channels", ch, "webhookUrl"],
                crate::webhooks::public_url(base, fleet, agent, ch).into(),
                false,
            ),
            None => no_public.push(ch),
        }
    }
    if enforced.profile == Profile::Lean {
        set(&["gateway", "controlUi", "enabled"], false.into(), false);
        // An explicit plugins section is the operator's informed choice; only fill the gap.
        if !root.contains_key("plugins") {
            // A channel the config sets up is a plugin too: keep it on (OPENCLAW.md).
            let mut allow = vec![Value::from("openai")];
            allow.extend(configured_channels(&root).into_iter().map(Value::from));
            root.insert(
                "plugins".into(),
                serde_json::json!({"allow": allow, "slots": {"memory": "none"}}),
            );
        }
    }
    for ch in no_public {
        warnings.push(format!(
            "channels.{ch}.webhookUrl kept as the template gives it: fleetd has no --public-url to derive it from"
        ));
    }
    // A hostile template could plant the token's value anywhere a warning quotes. (A token
    // under 8 characters is no secret worth mangling every warning for.)
    for w in &mut warnings {
        for secret in [enforced.token, enforced.webhook_secret] {
            if secret.len() >= 8 && w.contains(secret) {
                *w = w.replace(secret, "<redacted>");
            }
        }
    }
    Ok((Value::Object(root), warnings))
}

/// The channels a config sets up (`channels.<name>`, unless `enabled` is false), by name.
pub fn configured_channels(root: &Map<String, Value>) -> Vec<String> {
    match root.get("channels") {
        Some(Value::Object(ch)) => ch
            .iter()
            .filter(|(_, c)| c.get("enabled") != Some(&Value::Bool(false)))
            .map(|(k, _)| k.clone())
            .collect(),
        _ => Vec::new(),
    }
}

pub(super) fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

pub(super) fn shown(v: &Value) -> String {
    let s = v.to_string();
    if s.chars().count() > 80 {
        format!("{}…", s.chars().take(80).collect::<String>())
    } else {
        s
    }
}

/// Sets `path` in `root`, replacing non-object intermediates, and records what it overrode.
pub(super) fn enforce(
    root: &mut Map<String, Value>,
    path: &[&str],
    value: Value,
    secret: bool,
    warnings: &mut Vec<String>,
) {
    let (last, parents) = path.split_last().expect("enforced paths are non-empty");
    let mut node = root;
    for (i, key) in parents.iter().enumerate() {
        let entry = node
            .entry((*key).to_string())
            .or_insert_with(|| Value::Object(Map::new()));
        if !entry.is_object() {
            warnings.push(format!(
                "template {} is {}, replaced by an object",
                path[..=i].join("."),
                json_kind(entry)
            ));
            *entry = Value::Object(Map::new());
        }
        node = entry.as_object_mut().expect("made an object above");
    }
    let dotted = path.join(".");
    match node.get(*last) {
        Some(old) if *old == value => {}
        Some(_) if secret => warnings.push(format!(
            "template {dotted} ignored: the commander sets its own"
        )),
        Some(old) => warnings.push(format!(
            "template {dotted}={} overridden with {}",
            shown(old),
            shown(&value)
        )),
        None => {}
    }
    node.insert((*last).to_string(), value);
}

/// Replaces `path` with `value` so a reader never sees a half-written file: temp file in the
/// same directory (mode 0600, it holds the token), fsync, rename, fsync of the directory.
pub fn write_config_atomic(path: &Path, value: &Value) -> Result<(), FleetError> {
    let fail = |what: &str, e: &dyn std::fmt::Display| {
        FleetError::invalid(
            format!("config file {}", path.display()),
            format!("{what}: {e}"),
        )
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| fail("no file name", &"path ends in '..' or '/'"))?;
    let mut body = serde_json::to_vec_pretty(value).map_err(|e| fail("serialize", &e))?;
    body.push(b'\n');
    // Restarts rewrite the same config: leave the file (and its inode) alone.
    // The agent can write its own HOME: the old file may be a FIFO or huge. Never block on it.
    if crate::operator_file::read_bounded(path, body.len() as u64).is_ok_and(|old| old == body) {
        return Ok(());
    }
    let mut suffix = [0u8; 6];
    getrandom::getrandom(&mut suffix).map_err(|e| fail("random temp name", &e))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}-{}",
        name.to_string_lossy(),
        std::process::id(),
        hex(&suffix)
    ));
    let result = (|| {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| fail(&format!("create {}", tmp.display()), &e))?;
        f.set_permissions(fs::Permissions::from_mode(0o600))
            .map_err(|e| fail("chmod 0600", &e))?;
        f.write_all(&body).map_err(|e| fail("write", &e))?;
        // No fsync: the config is derived from the registry (which is fsynced) and rewritten
        // before every start, so a crash costs nothing the next start does not restore; the
        // rename still means a reader never sees a half-written file.
        fs::rename(&tmp, path).map_err(|e| fail("rename into place", &e))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// `gateway.auth.token` of an existing config, so a re-provisioned agent keeps its token.
pub fn read_token(config: &Path) -> Option<String> {
    let bytes = crate::operator_file::read_bounded(config, 4 << 20).ok()?;
    let v: Value = serde_json::from_slice(&bytes).ok()?;
    v.pointer("/gateway/auth/token")
        .and_then(Value::as_str)
        .filter(|t| !t.is_empty())
        .map(str::to_string)
}

/// Reads a fleet's JSON template; errors name the file and, for bad JSON, line and column.
pub fn load_template(path: &Path) -> Result<Value, FleetError> {
    let spec = |reason: String| FleetError::Spec {
        reason: format!("template {}: {reason}", path.display()),
    };
    let text = crate::operator_file::read_text(path, crate::operator_file::MAX_TEMPLATE_BYTES)
        .map_err(|e| spec(format!("it {e}")))?;
    let v: Value = serde_json::from_str(&text).map_err(|e| {
        let full = e.to_string();
        let msg = full
            .rsplit_once(" at line ")
            .map_or(full.as_str(), |(m, _)| m);
        spec(format!(
            "invalid JSON at line {} column {}: {msg}",
            e.line(),
            e.column()
        ))
    })?;
    if !v.is_object() {
        return Err(spec(format!(
            "must be a JSON object, got {}",
            json_kind(&v)
        )));
    }
    Ok(v)
}

/// Reads and checks what a fleet's spec names on disk, at the moment the command or reload
/// arrives: the template's content becomes part of the desired state (`template_config`), so
/// a later edit, a deleted file or a FIFO put in its place can never change or break a start
/// that was accepted; a custom command's program must exist and be executable.
pub fn accept_files(spec: &mut crate::spec::FleetSpec) -> Result<(), FleetError> {
    let fleet = spec.name.clone();
    // Read once: a spec that already carries its template's content (a loaded spec file, a
    // registry record) keeps the version that was read, never a second, later reading.
    if spec.template_config.is_none() {
        spec.template_config = match &spec.template {
            Some(t) => Some(load_template(t).map_err(|e| match e {
                FleetError::Spec { reason } => FleetError::Spec {
                    reason: format!("fleet {fleet:?}: {reason}"),
                },
                other => other,
            })?),
            None => None,
        };
    }
    for (agent, t) in spec.tenants.iter_mut() {
        accept_tenant_files(t).map_err(|reason| FleetError::Spec {
            reason: format!("fleet {fleet:?}: agent {agent:?}: {reason}"),
        })?;
    }
    if let Some(cmd) = &spec.command {
        let Some(program) = cmd.first() else {
            return Ok(()); // validate() names an empty command
        };
        let path = spec
            .env
            .get("PATH")
            .cloned()
            .unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
        crate::process::spawn::resolve_program(Path::new(program), &[("PATH".into(), path)])
            .and_then(|p| {
                use std::os::unix::fs::PermissionsExt;
                let m = fs::metadata(&p)?;
                if m.is_file() && m.permissions().mode() & 0o111 != 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::other(format!(
                        "{} is not an executable file",
                        p.display()
                    )))
                }
            })
            .map_err(|e| FleetError::Spec {
                reason: format!("fleet {fleet:?}: command: {program:?} cannot be run: {e}"),
            })?;
    }
    Ok(())
}

/// `accept_files` off the async runtime's threads (it reads operator files).
pub async fn accepted_spec(
    mut spec: crate::spec::FleetSpec,
) -> Result<crate::spec::FleetSpec, FleetError> {
    tokio::task::spawn_blocking(move || accept_files(&mut spec).map(|()| spec))
        .await
        .map_err(FleetError::internal)?
}

/// `accept_tenant_files` off the async runtime's threads.
pub async fn accepted_tenant(
    mut t: crate::spec::AgentSettings,
) -> Result<crate::spec::AgentSettings, FleetError> {
    tokio::task::spawn_blocking(move || {
        accept_tenant_files(&mut t)
            .map(|()| t)
            .map_err(|reason| FleetError::Spec { reason })
    })
    .await
    .map_err(FleetError::internal)?
}

/// An agent's settings after `change` over `old`, with what they name read (off the async
/// runtime's threads); an error names the agent and says nothing changed.
pub async fn accepted_change(
    change: &crate::messages::command::AgentChange,
    old: &crate::spec::AgentSettings,
    fleet: &str,
    agent: &str,
) -> Result<crate::spec::AgentSettings, FleetError> {
    accepted_tenant(change.apply(old)?)
        .await
        .map_err(|e| e.of_agent(fleet, agent))
}

/// Reads what one agent's settings name and was not read yet (a registry record or a spec
/// that already carries the contents keeps them); forgets contents no longer named.
pub fn accept_tenant_files(t: &mut crate::spec::AgentSettings) -> Result<(), String> {
    if t.template_config.is_none() {
        if let Some(path) = &t.template {
            t.template_config = Some(load_template(path).map_err(|e| match e {
                FleetError::Spec { reason } => reason,
                other => other.to_string(),
            })?);
        }
    }
    if t.template.is_none() {
        t.template_config = None;
    }
    let names: Vec<String> = t.secrets.keys().cloned().collect();
    t.accepted.secrets.retain(|k, _| names.contains(k));
    for (name, src) in &t.secrets {
        if !t.accepted.secrets.contains_key(name) {
            let v = read_secret(src).map_err(|e| format!("secrets.{name}: {e}"))?;
            t.accepted.secrets.insert(name.clone(), v);
        }
    }
    let dests: Vec<String> = t.files.keys().cloned().collect();
    t.accepted.files.retain(|k, _| dests.contains(k));
    for (dest, src) in &t.files {
        if !t.accepted.files.contains_key(dest) {
            let bytes = crate::operator_file::read_bounded(src, crate::spec::MAX_FILE_BYTES)
                .map_err(|e| format!("files.{dest:?}: {}: it {e}", src.display()))?;
            t.accepted.files.insert(dest.clone(), bytes);
        }
    }
    Ok(())
}

/// A secret's value from the operator's file: a regular file (symlinks followed), at most
/// `MAX_SECRET_BYTES`, UTF-8 without NUL, one trailing newline dropped (`echo … > file`), and
/// at least `MIN_SECRET_BYTES` left. The error names the file, never its content.
pub fn read_secret(path: &Path) -> Result<crate::spec::Secret, String> {
    use crate::spec::{Secret, MAX_SECRET_BYTES, MIN_SECRET_BYTES};
    let bytes = crate::operator_file::read_bounded(path, MAX_SECRET_BYTES)
        .map_err(|e| format!("{}: it {e}", path.display()))?;
    let mut text = String::from_utf8(bytes)
        .map_err(|_| format!("{}: it is not UTF-8 text", path.display()))?;
    if text.ends_with('\n') {
        text.pop();
        if text.ends_with('\r') {
            text.pop();
        }
    }
    if text.contains('\0') {
        return Err(format!("{}: it contains a NUL byte", path.display()));
    }
    if text.trim().is_empty() {
        return Err(format!("{}: it is empty", path.display()));
    }
    if text.len() < MIN_SECRET_BYTES {
        return Err(format!(
            "{}: it holds {} bytes, fewer than {MIN_SECRET_BYTES}: too short to be a secret (or to be redacted from logs)",
            path.display(),
            text.len()
        ));
    }
    Ok(Secret::new(text))
}

/// `over` deep-merged into `base`: objects merge key by key, anything else replaces. How an
/// agent's own template layer goes over its fleet's.
pub fn merge_json(base: &mut Value, over: &Value) {
    match (base, over) {
        (Value::Object(b), Value::Object(o)) => {
            for (k, v) in o {
                match b.get_mut(k) {
                    Some(slot) => merge_json(slot, v),
                    None => {
                        b.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        (slot, v) => *slot = v.clone(),
    }
}

/// The template an agent's starts render: its fleet's, with its own layer over it.
pub fn effective_template(spec: &crate::spec::FleetSpec, agent: &str) -> Option<Value> {
    let fleet = spec.template_config.clone();
    match spec.tenant(agent).and_then(|t| t.template_config.as_ref()) {
        None => fleet,
        Some(own) => {
            let mut v = fleet.unwrap_or_else(|| Value::Object(Map::new()));
            merge_json(&mut v, own);
            Some(v)
        }
    }
}
