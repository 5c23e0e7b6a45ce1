//! What an agent's archive says about itself: which agent it holds, from which OpenClaw
//! version, and every entry with its size and checksum, so a restore can refuse a corrupt,
//! truncated or foreign archive before it touches anything.

use serde::{Deserialize, Serialize};

/// Format this build writes and reads.
pub const MANIFEST_FORMAT: u32 = 1;
/// The manifest's name in the archive (its last entry: the checksums are known only once
/// every file has been written).
pub const MANIFEST_NAME: &str = "manifest.json";
/// Every entry of the HOME sits under this directory of the archive.
pub const HOME_PREFIX: &str = "home";

/// What is left out of an archive because it rebuilds itself (paths relative to HOME).
pub const EXCLUDED_DIRS: &[&str] = &[
    // npm's and Node's caches, OpenClaw's asset cache (54 MB of control-UI assets).
    ".cache",
    ".npm",
    ".openclaw/cache",
    // Scratch: TMPDIR (with the per-agent compile cache), OpenClaw's lock payloads.
    "tmp",
    ".openclaw/tmp",
    // OpenClaw's own log files: fleetd keeps the agent's output in its own log directory.
    "logs",
];
/// SQLite's side files: each database is copied whole and consistent by SQLite's backup API,
/// so its journal and WAL are not needed (and would not match the copy).
pub const EXCLUDED_SUFFIXES: &[&str] = &["-wal", "-shm", "-journal"];

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: u32,
    pub fleet: String,
    pub agent: String,
    /// The OpenClaw version whose state this is (`None`: a fleet with its own command).
    pub openclaw_version: Option<String>,
    /// RFC 3339, UTC.
    pub created: String,
    pub created_unix: u64,
    pub files: Vec<FileEntry>,
    pub dirs: Vec<DirEntry>,
    #[serde(default)]
    pub symlinks: Vec<LinkEntry>,
    /// Sum of the files' sizes.
    pub bytes: u64,
    /// Files copied through SQLite's backup API rather than read as they lay.
    #[serde(default)]
    pub sqlite: Vec<String>,
    /// What was left out, as rules (`tmp/`, `*-wal`).
    #[serde(default)]
    pub excluded: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    /// Relative to HOME.
    pub path: String,
    pub size: u64,
    /// Lower-case hex.
    pub sha256: String,
    pub mode: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DirEntry {
    pub path: String,
    pub mode: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkEntry {
    pub path: String,
    pub target: String,
}

/// Whether `rel` (relative to HOME, `/`-separated) is left out of an archive.
pub fn excluded(rel: &str) -> bool {
    EXCLUDED_DIRS
        .iter()
        .any(|d| rel == *d || rel.strip_prefix(d).is_some_and(|r| r.starts_with('/')))
        || EXCLUDED_SUFFIXES.iter().any(|s| rel.ends_with(s))
}

/// The exclusion rules in words, for the manifest and the README.
pub fn exclusion_rules() -> Vec<String> {
    EXCLUDED_DIRS
        .iter()
        .map(|d| format!("{d}/"))
        .chain(EXCLUDED_SUFFIXES.iter().map(|s| format!("*{s}")))
        .collect()
}

/// Why `rel`, a path an archive names inside HOME, cannot be written there: absolute, `..`,
/// empty or `.` components, a NUL or control byte, too long.
pub fn entry_path_problem(rel: &str) -> Option<&'static str> {
    if rel.is_empty() {
        return Some("is empty");
    }
    if rel.len() > 4096 {
        return Some("is longer than 4096 bytes");
    }
    if rel.starts_with('/') {
        return Some("is absolute");
    }
    if rel.chars().any(|c| c.is_control()) {
        return Some("holds a control character");
    }
    for part in rel.split('/') {
        match part {
            "" | "." => return Some("has an empty or '.' component"),
            ".." => return Some("climbs out with '..'"),
            _ => {}
        }
    }
    None
}

/// Whether a link at `path` pointing to `target` stays inside HOME, judged on the words alone
/// (nothing on disk is consulted: the restore writes into an empty directory). A target may
/// not climb with `..` at all: judged one by one, `s -> .` and `t -> s/..` would each pass and
/// together lead out; without `..` every link leads down from where it is.
pub fn link_stays_inside(path: &str, target: &str) -> bool {
    if target.is_empty()
        || target.starts_with('/')
        || target.chars().any(|c| c.is_control())
        || target.split('/').any(|p| p == "..")
    {
        return false;
    }
    let mut depth: Vec<&str> = path.split('/').collect();
    depth.pop(); // the link itself
    for part in target.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                if depth.pop().is_none() {
                    return false;
                }
            }
            p => depth.push(p),
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exclusions() {
        for (rel, out) in [
            ("tmp", true),
            ("tmp/node-compile-cache/x", true),
            ("tmpfile", false),
            (".openclaw/cache/control-ui-assets/a.js", true),
            (".openclaw/state/openclaw.sqlite", false),
            (".openclaw/state/openclaw.sqlite-wal", true),
            (".openclaw/state/openclaw.sqlite-shm", true),
            (".openclaw/openclaw.json", false),
            ("logs/openclaw.log", true),
            (".openclaw/logs/stability/x.json", false),
            (".npm/_logs/1.log", true),
        ] {
            assert_eq!(excluded(rel), out, "{rel}");
        }
    }

    #[test]
    fn entry_paths() {
        for (rel, ok) in [
            (".openclaw/openclaw.json", true),
            ("a/b/c", true),
            ("", false),
            ("/etc/passwd", false),
            ("../x", false),
            ("a/../../x", false),
            ("a//b", false),
            ("./a", false),
            ("a\nb", false),
        ] {
            assert_eq!(entry_path_problem(rel).is_none(), ok, "{rel:?}");
        }
    }

    #[test]
    fn links() {
        for (path, target, ok) in [
            ("a/link", "b", true),
            ("a/link", "../b", false),
            ("t", "s/..", false),
            ("a/link", "../../b", false),
            ("link", "/etc/shadow", false),
            ("a/b/link", "c/d", true),
            ("a/b/link", "../../../c", false),
            ("link", "", false),
        ] {
            assert_eq!(link_stays_inside(path, target), ok, "{path} -> {target}");
        }
    }
}
