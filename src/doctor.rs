//! `doctor`: read-only checks of a node, its fleets and agents, one line each with `ok`,
//! `warn` or `fail`. Everything here only reads (files, /proc, /sys); the decisions are plain
//! functions of what was read, table-tested below. The node gathers the input (registry,
//! status rows) and runs `run` off its actor.

use crate::isolation::{Host, Isolation};
use crate::messages::command::AgentStatus;
use crate::provision::AgentPaths;
use crate::registry::RegistryData;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Level {
    Ok,
    Warn,
    Fail,
}

impl std::fmt::Display for Level {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Level::Ok => "ok",
            Level::Warn => "warn",
            Level::Fail => "fail",
        })
    }
}

/// One line of `doctor`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Check {
    /// What was checked (`home.mode`, `config.bind`, `port.foreign`…).
    pub check: String,
    /// What it was checked on: `node`, `<fleet>`, `<fleet>/<agent>`.
    pub subject: String,
    pub level: Level,
    pub detail: String,
}

/// What the node hands `run`.
pub struct Input {
    pub state_dir: PathBuf,
    pub openclaw_bin: Option<PathBuf>,
    pub memory_reserve: u64,
    pub cgroups_delegated: bool,
    pub host: Host,
    pub data: RegistryData,
    pub rows: Vec<AgentStatus>,
    pub fleet: Option<String>,
    pub agent: Option<String>,
}

/// Free space below this on the state directory's filesystem is a fail; below
/// `DISK_WARN` a warning.
const DISK_FAIL: u64 = 256 << 20;
const DISK_WARN: u64 = 2 << 30;

struct Out(Vec<Check>);

impl Out {
    fn push(&mut self, check: &str, subject: &str, level: Level, detail: impl Into<String>) {
        self.0.push(Check {
            check: check.into(),
            subject: subject.into(),
            level,
            detail: detail.into(),
        });
    }
}

pub fn run(i: &Input) -> Vec<Check> {
    let mut out = Out(Vec::new());
    let node_wide = i.fleet.is_none();
    if node_wide {
        node_checks(i, &mut out);
    }
    let tokens = token_owners(&i.data);
    let listeners = listeners_by_port();
    let mut versions: BTreeMap<Option<String>, Option<String>> = BTreeMap::new();
    for (fname, rec) in &i.data.fleets {
        if i.fleet.as_deref().is_some_and(|f| f != fname) {
            continue;
        }
        for agent in &rec.spec.agents {
            if i.agent.as_deref().is_some_and(|a| a != agent) {
                continue;
            }
            let Some(a) = rec.agents.get(agent) else {
                continue;
            };
            let subject = format!("{fname}/{agent}");
            let row = i
                .rows
                .iter()
                .find(|r| r.fleet == *fname && r.agent == *agent);
            let paths = AgentPaths::new(&i.state_dir, fname, agent);
            let level = i.host.resolve(rec.spec.isolation).ok();
            home_checks(&paths, a.uid, level, &subject, &mut out);
            if rec.spec.runs_openclaw() {
                config_checks(&paths, &a.token, &tokens, &subject, &mut out);
                breaker_check(&paths, &subject, &mut out);
                let want = rec.spec.openclaw_version_of(agent).map(str::to_string);
                let found = versions
                    .entry(want.clone())
                    .or_insert_with(|| installed(i, want.as_deref()))
                    .clone();
                version_check(want.as_deref(), found.as_deref(), &subject, &mut out);
            }
            if let (Some(base), Some(row)) = (a.port_base, row) {
                port_check(base, a.stride, row, &listeners, &subject, &mut out);
            }
            match row.and_then(|r| r.isolation.clone()) {
                Some(s) if s.off.is_empty() => out.push(
                    "isolation",
                    &subject,
                    if s.level == Isolation::None {
                        Level::Warn
                    } else {
                        Level::Ok
                    },
                    match s.uid {
                        Some(u) => format!("{} (uid {u})", s.level),
                        None => s.level.to_string(),
                    },
                ),
                Some(s) => out.push(
                    "isolation",
                    &subject,
                    Level::Warn,
                    format!("{}; off on this host: {}", s.level, s.off.join(", ")),
                ),
                None => out.push(
                    "isolation",
                    &subject,
                    Level::Fail,
                    "this host cannot give the isolation its fleet asks for",
                ),
            }
            log_check(&paths, &rec.spec.logs, &subject, &mut out);
        }
    }
    out.0
}

fn installed(i: &Input, want: Option<&str>) -> Option<String> {
    let inst = crate::provision::resolve_openclaw_version(i.openclaw_bin.as_deref(), want).ok()?;
    Some(crate::provision::installed_version(&inst.openclaw).unwrap_or_else(|| "unknown".into()))
}

/// The mode problem of a path the daemon keeps for itself: owned by `uid`, no write for
/// group or others, and no access at all for them when `private`.
pub fn mode_problem(mode: u32, owner: u32, uid: u32, private: bool) -> Option<String> {
    let perm = mode & 0o7777;
    if owner != uid {
        return Some(format!("owned by uid {owner}, not {uid}"));
    }
    if perm & 0o022 != 0 {
        return Some(format!("mode {perm:04o}: writable by group or others"));
    }
    if private && perm & 0o077 != 0 {
        return Some(format!(
            "mode {perm:04o}: open to group or others (want 0600/0700)"
        ));
    }
    None
}

fn mode_check(path: &Path, uid: u32, private: bool, check: &str, out: &mut Out) {
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => out.push(
            check,
            "node",
            Level::Fail,
            format!("{}: {e}", path.display()),
        ),
        Ok(m) if m.file_type().is_symlink() => out.push(
            check,
            "node",
            Level::Fail,
            format!("{} is a symlink", path.display()),
        ),
        Ok(m) => match mode_problem(m.mode(), m.uid(), uid, private) {
            None => out.push(
                check,
                "node",
                Level::Ok,
                format!("{} {:04o}", path.display(), m.mode() & 0o7777),
            ),
            Some(p) => out.push(
                check,
                "node",
                Level::Fail,
                format!("{}: {p}", path.display()),
            ),
        },
    }
}

fn node_checks(i: &Input, out: &mut Out) {
    let me = nix::unistd::geteuid().as_raw();
    let sd = &i.state_dir;
    mode_check(sd, me, false, "state.mode", out);
    mode_check(&sd.join("registry.json"), me, true, "registry.mode", out);
    mode_check(&sd.join("vault.json"), me, true, "vault.mode", out);
    mode_check(
        &crate::context::default_socket(sd),
        me,
        true,
        "socket.mode",
        out,
    );
    mode_check(&sd.join("logs"), me, true, "logs.mode", out);
    mode_check(&sd.join("backups"), me, true, "backups.mode", out);
    registry_checks(sd, out);
    match crate::provision::resolve_openclaw(i.openclaw_bin.as_deref()) {
        Ok(inst) => out.push(
            "openclaw.install",
            "node",
            Level::Ok,
            format!(
                "{} ({})",
                crate::provision::installed_version(&inst.openclaw)
                    .unwrap_or_else(|| "version unknown".into()),
                inst.openclaw.display()
            ),
        ),
        Err(e) => {
            let uses = i.data.fleets.values().any(|f| f.spec.runs_openclaw());
            out.push(
                "openclaw.install",
                "node",
                if uses { Level::Fail } else { Level::Warn },
                e.to_string(),
            )
        }
    }
    out.push(
        "cgroup.delegation",
        "node",
        if i.cgroups_delegated {
            Level::Ok
        } else {
            Level::Warn
        },
        if i.cgroups_delegated {
            "per-agent cgroup v2 limits are enforced".to_string()
        } else {
            "no delegated cgroup v2: memory.max and pids.max are not enforced (limits by sampling only)".to_string()
        },
    );
    let host = crate::process::procfs::host_info();
    let (level, detail) = memory_verdict(host.mem_available, i.memory_reserve);
    out.push("memory.reserve", "node", level, detail);
    match free_bytes(sd) {
        Some(free) => {
            let level = if free < DISK_FAIL {
                Level::Fail
            } else if free < DISK_WARN {
                Level::Warn
            } else {
                Level::Ok
            };
            let budget: u64 = i
                .data
                .fleets
                .values()
                .map(|f| f.spec.logs.budget_bytes)
                .sum();
            out.push(
                "disk.free",
                "node",
                if budget > free {
                    Level::Warn.max(level)
                } else {
                    level
                },
                format!(
                    "{} MiB free under {}; log budgets add up to {} MiB",
                    free >> 20,
                    sd.display(),
                    budget >> 20
                ),
            );
        }
        None => out.push("disk.free", "node", Level::Warn, "statvfs failed"),
    }
    let isolation = i.host.strongest();
    let off = i.host.missing(isolation);
    out.push(
        "isolation.host",
        "node",
        if isolation == Isolation::None {
            Level::Warn
        } else {
            Level::Ok
        },
        if off.is_empty() {
            format!("strongest level here: {isolation}")
        } else {
            format!("strongest level here: {isolation}; off: {}", off.join(", "))
        },
    );
    match std::fs::read_to_string("/sys/kernel/mm/ksm/run") {
        Ok(v) if v.trim() == "0" => out.push(
            "ksm",
            "node",
            Level::Warn,
            "KSM is off (/sys/kernel/mm/ksm/run is 0): identical pages of agents are not merged",
        ),
        Ok(v) => out.push("ksm", "node", Level::Ok, format!("ksm run = {}", v.trim())),
        Err(_) => out.push("ksm", "node", Level::Warn, "this kernel has no KSM"),
    }
    stale_lock_check(i, out);
}

/// MemAvailable against the admission reserve: below it, no agent is admitted.
pub fn memory_verdict(available: u64, reserve: u64) -> (Level, String) {
    let detail = format!(
        "{} MiB available, admission reserve {} MiB",
        available >> 20,
        reserve >> 20
    );
    if available == 0 {
        (Level::Warn, "MemAvailable cannot be read".into())
    } else if available < reserve {
        (Level::Fail, format!("{detail}: new agents are refused"))
    } else if available < reserve.saturating_mul(2) {
        (Level::Warn, format!("{detail}: close to the reserve"))
    } else {
        (Level::Ok, detail)
    }
}

fn free_bytes(p: &Path) -> Option<u64> {
    let s = nix::sys::statvfs::statvfs(p).ok()?;
    Some(s.blocks_available() as u64 * s.fragment_size() as u64)
}

fn registry_checks(sd: &Path, out: &mut Out) {
    let read = |p: &Path| -> Result<RegistryData, String> {
        let b = crate::operator_file::read_bounded(p, crate::operator_file::MAX_REGISTRY_BYTES)
            .map_err(|e| e.to_string())?;
        serde_json::from_slice(&b).map_err(|e| format!("not a registry: {e}"))
    };
    let cur = sd.join("registry.json");
    let bak = sd.join("registry.json.bak");
    match read(&cur) {
        Ok(d) => out.push(
            "registry",
            "node",
            Level::Ok,
            format!(
                "{} fleets, {} agents",
                d.fleets.len(),
                d.fleets.values().map(|f| f.agents.len()).sum::<usize>()
            ),
        ),
        Err(e) => out.push(
            "registry",
            "node",
            Level::Fail,
            format!("{}: {e}", cur.display()),
        ),
    }
    match read(&bak) {
        Ok(_) => out.push(
            "registry.backup",
            "node",
            Level::Ok,
            format!("{} is a valid registry", bak.display()),
        ),
        Err(e) if !bak.exists() => out.push(
            "registry.backup",
            "node",
            Level::Ok,
            format!("no backup yet ({e})"),
        ),
        Err(e) => out.push(
            "registry.backup",
            "node",
            Level::Warn,
            format!(
                "{}: {e} (a corrupt registry could not fall back to it)",
                bak.display()
            ),
        ),
    }
}

/// OpenClaw's lock files that no agent's HOME owns any more (it never deletes them):
/// `*.<first 8 hex of sha256("$HOME/.openclaw/state/openclaw.sqlite")>.lock.sqlite` under
/// `/tmp/openclaw-state-locks-<uid>/`.
fn stale_lock_check(i: &Input, out: &mut Out) {
    let mut live: BTreeSet<String> = BTreeSet::new();
    let mut uids: BTreeSet<u32> = BTreeSet::from([nix::unistd::getuid().as_raw()]);
    for (f, rec) in &i.data.fleets {
        for (a, r) in &rec.agents {
            let p = AgentPaths::new(&i.state_dir, f, a);
            live.insert(lock_hash(&p.openclaw_dir.join("state/openclaw.sqlite")));
            uids.extend(r.uid);
        }
    }
    let mut stale = 0usize;
    let mut dirs = Vec::new();
    for uid in uids {
        let dir = PathBuf::from(format!("/tmp/openclaw-state-locks-{uid}"));
        let Ok(rd) = std::fs::read_dir(&dir) else {
            continue;
        };
        let before = stale;
        for e in rd.flatten() {
            if let Some(h) = lock_file_hash(&e.file_name().to_string_lossy()) {
                if !live.contains(h) {
                    stale += 1;
                }
            }
        }
        if stale > before {
            dirs.push(dir.display().to_string());
        }
    }
    out.push(
        "openclaw.locks",
        "node",
        if stale == 0 { Level::Ok } else { Level::Warn },
        if stale == 0 {
            "no lock files of removed agents".to_string()
        } else {
            format!(
                "{stale} lock files of removed agents in {} (safe to delete)",
                dirs.join(", ")
            )
        },
    );
}

pub fn lock_hash(db: &Path) -> String {
    use sha2::Digest;
    let d = sha2::Sha256::digest(db.as_os_str().as_encoded_bytes());
    d.iter().take(4).map(|b| format!("{b:02x}")).collect()
}

/// The 8-hex HOME hash of an OpenClaw lock file's name, if it is one.
pub fn lock_file_hash(name: &str) -> Option<&str> {
    let stem = name.strip_suffix(".lock.sqlite")?;
    let (_, h) = stem.rsplit_once('.')?;
    (h.len() == 8 && h.bytes().all(|b| b.is_ascii_hexdigit())).then_some(h)
}

fn home_checks(
    paths: &AgentPaths,
    uid: Option<u32>,
    level: Option<Isolation>,
    subject: &str,
    out: &mut Out,
) {
    let want_uid = match level {
        Some(Isolation::Uid) => uid,
        _ => Some(nix::unistd::geteuid().as_raw()),
    };
    match std::fs::symlink_metadata(&paths.home) {
        Err(_) => out.push(
            "home.mode",
            subject,
            Level::Ok,
            "no HOME yet (made at its first start)",
        ),
        Ok(m) if !m.is_dir() => out.push(
            "home.mode",
            subject,
            Level::Fail,
            "the HOME is not a directory",
        ),
        Ok(m) => {
            let problem = match want_uid {
                Some(u) => mode_problem(m.mode(), m.uid(), u, true),
                None => Some("its fleet runs by uid but the agent has no uid lease".into()),
            };
            match problem {
                None => out.push(
                    "home.mode",
                    subject,
                    Level::Ok,
                    format!("{:04o} uid {}", m.mode() & 0o7777, m.uid()),
                ),
                Some(p) => out.push(
                    "home.mode",
                    subject,
                    Level::Fail,
                    format!("{}: {p}", paths.home.display()),
                ),
            }
        }
    }
}

/// Every agent's tokens, for the uniqueness check: token → agents that hold it.
fn token_owners(data: &RegistryData) -> BTreeMap<String, Vec<String>> {
    let mut m: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (f, rec) in &data.fleets {
        for (a, r) in &rec.agents {
            m.entry(r.token.clone())
                .or_default()
                .push(format!("{f}/{a}"));
        }
    }
    m
}

/// What is wrong with an agent's `openclaw.json` as it lies now: the bind, the auth and the
/// token fleetd enforces at every start (the tenant may have edited the file since).
pub fn config_problems(config: &serde_json::Value, token: &str) -> Vec<(&'static str, String)> {
    let mut v = Vec::new();
    let g = &config["gateway"];
    match g["bind"].as_str() {
        Some("loopback") => {}
        other => v.push((
            "config.bind",
            format!("gateway.bind is {other:?}, not \"loopback\""),
        )),
    }
    match (g["auth"]["mode"].as_str(), g["auth"]["token"].as_str()) {
        (Some("token"), Some(t)) if t == token => {}
        (Some("token"), Some(_)) => v.push((
            "config.token",
            "gateway.auth.token is not the token fleetd leased it".into(),
        )),
        (mode, _) => v.push((
            "config.auth",
            format!("gateway.auth.mode is {mode:?} with no token: want \"token\""),
        )),
    }
    v
}

fn config_checks(
    paths: &AgentPaths,
    token: &str,
    tokens: &BTreeMap<String, Vec<String>>,
    subject: &str,
    out: &mut Out,
) {
    // A tenant's file: opened from its HOME down without following any link, bounded.
    let text = crate::operator_file::open_beneath(&paths.home, ".openclaw/openclaw.json", false)
        .and_then(|f| {
            use std::io::Read;
            let mode = f.metadata()?.mode() & 0o7777;
            if mode & 0o077 != 0 {
                out.push(
                    "config.mode",
                    subject,
                    Level::Fail,
                    format!(
                        "openclaw.json is mode {mode:04o}: its token is open to group or others"
                    ),
                );
            }
            let mut s = String::new();
            f.take(4 << 20).read_to_string(&mut s)?;
            Ok(s)
        });
    match text {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => out.push(
            "config",
            subject,
            Level::Ok,
            "no openclaw.json yet (written at its first start)",
        ),
        Err(e) => out.push(
            "config",
            subject,
            Level::Fail,
            format!("{}: {e}", paths.config.display()),
        ),
        Ok(t) => match serde_json::from_str::<serde_json::Value>(&t) {
            Err(e) => out.push(
                "config",
                subject,
                Level::Fail,
                format!("openclaw.json is not JSON: {e}"),
            ),
            Ok(c) => {
                let problems = config_problems(&c, token);
                if problems.is_empty() {
                    out.push(
                        "config",
                        subject,
                        Level::Ok,
                        "loopback bind, token auth, its own token",
                    );
                }
                for (check, p) in problems {
                    out.push(
                        check,
                        subject,
                        Level::Fail,
                        format!("{p} (rewritten at its next start)"),
                    );
                }
            }
        },
    }
    if let Some(holders) = tokens.get(token).filter(|h| h.len() > 1) {
        out.push(
            "config.token.unique",
            subject,
            Level::Fail,
            format!("its token is shared by {}", holders.join(", ")),
        );
    }
}

fn breaker_check(paths: &AgentPaths, subject: &str, out: &mut Out) {
    let dir = paths.openclaw_dir.join("logs/stability");
    let opened = crate::operator_file::open_beneath(&paths.home, ".openclaw/logs/stability", true);
    let tripped: Vec<String> = opened
        .ok()
        .and_then(|d| std::fs::read_dir(crate::operator_file::fd_path(&d)).ok())
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("crash_loop_breaker"))
        .collect();
    if tripped.is_empty() {
        out.push(
            "openclaw.breaker",
            subject,
            Level::Ok,
            "crash-loop breaker not tripped",
        );
    } else {
        out.push(
            "openclaw.breaker",
            subject,
            Level::Warn,
            format!(
                "OpenClaw's crash-loop breaker tripped ({} in {}): its channels stay off until those exits age out",
                tripped.join(", "),
                dir.display()
            ),
        );
    }
}

fn version_check(want: Option<&str>, found: Option<&str>, subject: &str, out: &mut Out) {
    match (want, found) {
        (_, None) => out.push(
            "openclaw.version",
            subject,
            Level::Fail,
            format!(
                "{} is not installed",
                want.unwrap_or("the default OpenClaw")
            ),
        ),
        (Some(w), Some(f)) if f != w && f != "unknown" => out.push(
            "openclaw.version",
            subject,
            Level::Fail,
            format!("wants {w}, the install holds {f}"),
        ),
        (_, Some(f)) => out.push("openclaw.version", subject, Level::Ok, f.to_string()),
    }
}

/// Listening TCP sockets by local port: (port → socket inodes).
fn listeners_by_port() -> BTreeMap<u16, Vec<u64>> {
    let mut m: BTreeMap<u16, Vec<u64>> = BTreeMap::new();
    for t in ["/proc/net/tcp", "/proc/net/tcp6"] {
        if let Ok(text) = std::fs::read_to_string(t) {
            for (port, inode) in parse_listeners(&text) {
                m.entry(port).or_default().push(inode);
            }
        }
    }
    m
}

/// (local port, socket inode) of every LISTEN line of a /proc/net/tcp{,6} table.
pub fn parse_listeners(text: &str) -> Vec<(u16, u64)> {
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_ascii_whitespace().collect();
            if f.len() < 10 || f[3] != "0A" {
                return None;
            }
            let port = u16::from_str_radix(f[1].rsplit_once(':')?.1, 16).ok()?;
            Some((port, f[9].parse().ok()?))
        })
        .collect()
}

fn socket_inodes_of(pids: &[u32]) -> BTreeSet<u64> {
    let mut s = BTreeSet::new();
    for pid in pids {
        for e in std::fs::read_dir(format!("/proc/{pid}/fd"))
            .into_iter()
            .flatten()
            .flatten()
        {
            if let Ok(t) = std::fs::read_link(e.path()) {
                let t = t.to_string_lossy();
                if let Some(n) = t.strip_prefix("socket:[").and_then(|r| r.strip_suffix(']')) {
                    s.extend(n.parse::<u64>().ok());
                }
            }
        }
    }
    s
}

fn port_check(
    base: u16,
    stride: u16,
    row: &AgentStatus,
    listeners: &BTreeMap<u16, Vec<u64>>,
    subject: &str,
    out: &mut Out,
) {
    let end = base as u32 + stride.max(1) as u32;
    let mine = match row.pid {
        Some(pid) => {
            let procs = crate::process::procfs::scan();
            let mut pids: Vec<u32> = crate::process::procfs::descendants(pid, &procs)
                .iter()
                .map(|p| p.pid)
                .collect();
            pids.push(pid);
            socket_inodes_of(&pids)
        }
        None => BTreeSet::new(),
    };
    let foreign: Vec<u16> = listeners
        .range(base..=((end - 1).min(u16::MAX as u32) as u16))
        .filter(|(_, inodes)| inodes.iter().any(|i| !mine.contains(i)))
        .map(|(p, _)| *p)
        .collect();
    if foreign.is_empty() {
        out.push(
            "port.foreign",
            subject,
            Level::Ok,
            format!("no other listener on {base}..{}", end - 1),
        );
    } else {
        out.push(
            "port.foreign",
            subject,
            Level::Fail,
            format!(
                "another process listens on its leased port(s) {}",
                foreign
                    .iter()
                    .map(|p| p.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        );
    }
}

fn log_check(paths: &AgentPaths, logs: &crate::spec::LogSpec, subject: &str, out: &mut Out) {
    let used: u64 = std::fs::read_dir(&paths.daemon_log_dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.metadata().ok())
        .filter(|m| m.is_file())
        .map(|m| m.len())
        .sum();
    let cap = logs.max_bytes.saturating_mul(logs.keep as u64 + 1);
    out.push(
        "logs.size",
        subject,
        if used > cap.saturating_mul(2) {
            Level::Warn
        } else {
            Level::Ok
        },
        format!(
            "{} KiB of agent logs (rotation keeps about {} KiB)",
            used >> 10,
            cap >> 10
        ),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes() {
        for (mode, owner, private, ok) in [
            (0o700, 0, true, true),
            (0o600, 0, true, true),
            (0o711, 0, false, true),
            (0o711, 0, true, false),
            (0o722, 0, false, false),
            (0o700, 5, true, false),
            (0o1777, 0, false, false),
        ] {
            assert_eq!(
                mode_problem(mode, owner, 0, private).is_none(),
                ok,
                "{mode:o} {owner} {private}"
            );
        }
    }

    #[test]
    fn config_rules() {
        let good =
            serde_json::json!({"gateway":{"bind":"loopback","auth":{"mode":"token","token":"t"}}});
        assert!(config_problems(&good, "t").is_empty());
        let lan = serde_json::json!({"gateway":{"bind":"lan","auth":{"mode":"token","token":"t"}}});
        assert_eq!(config_problems(&lan, "t")[0].0, "config.bind");
        assert_eq!(config_problems(&good, "other")[0].0, "config.token");
        let open = serde_json::json!({"gateway":{"bind":"loopback","auth":{"mode":"none"}}});
        assert_eq!(config_problems(&open, "t")[0].0, "config.auth");
    }

    #[test]
    fn listeners_and_locks() {
        let t = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 0100007F:4E20 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 12345 1 0\n   1: 0100007F:4E21 0100007F:9C40 01 00000000:00000000 00:00000000 00000000     0        0 777 1 0\n";
        assert_eq!(parse_listeners(t), vec![(20000, 12345)]);
        assert_eq!(
            lock_file_hash("gateway.0123abcd.lock.sqlite"),
            Some("0123abcd")
        );
        assert_eq!(lock_file_hash("x.lock.sqlite"), None);
        assert_eq!(lock_file_hash("gateway.0123abcd.sqlite"), None);
        assert_eq!(
            lock_hash(Path::new("/h/.openclaw/state/openclaw.sqlite")).len(),
            8
        );
    }

    #[test]
    fn memory() {
        assert_eq!(memory_verdict(100 << 20, 512 << 20).0, Level::Fail);
        assert_eq!(memory_verdict(700 << 20, 512 << 20).0, Level::Warn);
        assert_eq!(memory_verdict(8 << 30, 512 << 20).0, Level::Ok);
        assert_eq!(memory_verdict(0, 512 << 20).0, Level::Warn);
    }
}
