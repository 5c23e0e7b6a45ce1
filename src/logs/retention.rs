//! Log retention: one scan of an agent's log directory and the pure decision of which
//! archives to delete (too old, then oldest first until under the disk budget). It never
//! deletes anything itself (the LogRotator carries the plan out) and never picks a current
//! file.

use std::cmp::Reverse;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use super::tail::archive_index;

/// The file our writer appends agent output to.
pub const AGENT_LOG: &str = "agent.log";
/// OpenClaw's own log (`logging.file`), placed beside ours by provisioning.
pub const OPENCLAW_LOG: &str = "openclaw.log";

#[derive(Clone, Debug, PartialEq)]
pub struct LogFile {
    pub path: PathBuf,
    pub bytes: u64,
    pub modified: SystemTime,
    pub is_archive: bool,
}

/// Whether `name` is one of the current files (`Some(false)`), an archive of one
/// (`Some(true)`), or not a log of ours (`None`). Archives: our `agent.log.N[.gz]`,
/// OpenClaw's `openclaw.N.log`, and anything else named `<current>.<suffix>` (compression
/// temp files, leftovers of other rotation schemes).
fn classify(name: &str) -> Option<bool> {
    for current in [AGENT_LOG, OPENCLAW_LOG] {
        if name == current {
            return Some(false);
        }
        let suffixed = name
            .strip_prefix(current)
            .is_some_and(|r| r.len() > 1 && r.starts_with('.'));
        if suffixed || archive_index(current, name).is_some() {
            return Some(true);
        }
    }
    None
}

/// Every log file of one agent in `log_dir`: `agent.log*`, `openclaw.log` and OpenClaw's
/// archives. A missing directory is an agent that never logged: no files.
pub fn scan_agent_logs(log_dir: &Path) -> io::Result<Vec<LogFile>> {
    let entries = match fs::read_dir(log_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        let Some(is_archive) = name.to_str().and_then(classify) else {
            continue;
        };
        // Deleted or replaced since read_dir (a rotation in progress): skip it this round.
        let Ok(meta) = entry.metadata() else {
            continue;
        };
        if !meta.is_file() {
            continue;
        }
        out.push(LogFile {
            path: entry.path(),
            bytes: meta.len(),
            modified: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
            is_archive,
        });
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct PrunePlan {
    pub delete: Vec<PathBuf>,
    pub bytes_freed: u64,
}

/// Archive number from the file name (`agent.log.3.gz` → 3), to order archives whose
/// modification times are equal: a higher number is older.
fn archive_number(path: &Path) -> u32 {
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return 0;
    };
    [AGENT_LOG, OPENCLAW_LOG]
        .iter()
        .find_map(|c| archive_index(c, name))
        .map_or(0, |(n, _)| n)
}

/// Archives older than `retention` go; then, while current files plus remaining archives
/// exceed `budget_bytes`, the oldest archives go. Current files are never deleted, even when
/// they alone exceed the budget.
pub fn plan_prune(
    files: &[LogFile],
    budget_bytes: u64,
    retention: Duration,
    now: SystemTime,
) -> PrunePlan {
    let mut plan = PrunePlan::default();
    let mut kept: Vec<&LogFile> = Vec::new();
    let mut total: u64 = 0;
    for f in files {
        // A modification time in the future counts as age zero.
        let age = now.duration_since(f.modified).unwrap_or_default();
        if f.is_archive && age > retention {
            plan.delete.push(f.path.clone());
            plan.bytes_freed += f.bytes;
        } else {
            total += f.bytes;
            if f.is_archive {
                kept.push(f);
            }
        }
    }
    kept.sort_by_key(|f| (f.modified, Reverse(archive_number(&f.path)), f.path.clone()));
    for f in kept {
        if total <= budget_bytes {
            break;
        }
        plan.delete.push(f.path.clone());
        plan.bytes_freed += f.bytes;
        total -= f.bytes;
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: u64 = 86_400;

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn file(name: &str, bytes: u64, modified: u64) -> LogFile {
        LogFile {
            path: PathBuf::from("/l").join(name),
            bytes,
            modified: at(modified),
            is_archive: classify(name) == Some(true),
        }
    }

    #[test]
    fn classify_names() {
        let cases = [
            ("agent.log", Some(false)),
            ("openclaw.log", Some(false)),
            ("agent.log.1", Some(true)),
            ("agent.log.3.gz", Some(true)),
            ("agent.log.gz-tmp-9-1", Some(true)),
            ("openclaw.2.log", Some(true)),
            ("openclaw.log.old", Some(true)),
            ("agent.log.", None),
            ("agentXlog", None),
            ("notes.txt", None),
            ("openclaw-2026-01-01.log", None),
        ];
        for (name, want) in cases {
            assert_eq!(classify(name), want, "{name}");
        }
    }

    #[test]
    fn plan_prune_table() {
        let now = 100 * DAY;
        struct Case {
            what: &'static str,
            files: Vec<LogFile>,
            budget: u64,
            retention_days: u64,
            delete: Vec<&'static str>,
        }
        let cases = vec![
            Case {
                what: "under budget, all young: nothing",
                files: vec![
                    file("agent.log", 50, now),
                    file("agent.log.1.gz", 10, now - DAY),
                ],
                budget: 100,
                retention_days: 7,
                delete: vec![],
            },
            Case {
                what: "archives past retention go even under budget",
                files: vec![
                    file("agent.log", 5, now),
                    file("agent.log.1.gz", 10, now - 3 * DAY),
                    file("agent.log.2.gz", 10, now - 8 * DAY),
                    file("openclaw.3.log", 10, now - 9 * DAY),
                ],
                budget: 1000,
                retention_days: 7,
                delete: vec!["agent.log.2.gz", "openclaw.3.log"],
            },
            Case {
                what: "over budget: oldest archives first, across both logs",
                files: vec![
                    file("agent.log", 40, now),
                    file("openclaw.log", 40, now),
                    file("agent.log.1.gz", 30, now - 100),
                    file("openclaw.1.log", 30, now - 300),
                    file("agent.log.2.gz", 30, now - 200),
                ],
                budget: 120,
                retention_days: 7,
                delete: vec!["openclaw.1.log", "agent.log.2.gz"],
            },
            Case {
                what: "equal mtimes: the higher archive number is older",
                files: vec![
                    file("agent.log", 10, now),
                    file("agent.log.1", 10, now - 5),
                    file("agent.log.3.gz", 10, now - 5),
                    file("agent.log.2.gz", 10, now - 5),
                ],
                budget: 25,
                retention_days: 7,
                delete: vec!["agent.log.3.gz", "agent.log.2.gz"],
            },
            Case {
                what: "current files alone over budget: never deleted",
                files: vec![
                    file("agent.log", 500, now - 30 * DAY),
                    file("openclaw.log", 500, now - 30 * DAY),
                    file("agent.log.1.gz", 10, now),
                ],
                budget: 100,
                retention_days: 7,
                delete: vec!["agent.log.1.gz"],
            },
            Case {
                what: "modification time in the future is age zero",
                files: vec![file("agent.log.1.gz", 10, now + DAY)],
                budget: 100,
                retention_days: 0,
                delete: vec![],
            },
            Case {
                what: "exactly at budget: nothing",
                files: vec![
                    file("agent.log", 60, now),
                    file("agent.log.1.gz", 40, now - 1),
                ],
                budget: 100,
                retention_days: 7,
                delete: vec![],
            },
        ];
        for c in cases {
            let plan = plan_prune(
                &c.files,
                c.budget,
                Duration::from_secs(c.retention_days * DAY),
                at(now),
            );
            let got: Vec<String> = plan
                .delete
                .iter()
                .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
                .collect();
            assert_eq!(got, c.delete, "{}", c.what);
            let freed: u64 = c
                .files
                .iter()
                .filter(|f| plan.delete.contains(&f.path))
                .map(|f| f.bytes)
                .sum();
            assert_eq!(plan.bytes_freed, freed, "{}", c.what);
            assert!(
                c.files
                    .iter()
                    .all(|f| f.is_archive || !plan.delete.contains(&f.path)),
                "{}: a current file was planned for deletion",
                c.what
            );
        }
    }

    #[test]
    fn scan_finds_our_and_openclaw_logs_only() {
        let dir = tempfile::tempdir().unwrap();
        let names = [
            ("agent.log", 3),
            ("agent.log.1.gz", 5),
            ("openclaw.log", 7),
            ("openclaw.1.log", 11),
            ("notes.txt", 13),
        ];
        for (n, len) in names {
            fs::write(dir.path().join(n), vec![b'x'; len]).unwrap();
        }
        fs::create_dir(dir.path().join("agent.log.9")).unwrap();
        let got: Vec<(String, u64, bool)> = scan_agent_logs(dir.path())
            .unwrap()
            .into_iter()
            .map(|f| {
                (
                    f.path.file_name().unwrap().to_string_lossy().into_owned(),
                    f.bytes,
                    f.is_archive,
                )
            })
            .collect();
        let want = [
            ("agent.log", 3, false),
            ("agent.log.1.gz", 5, true),
            ("openclaw.1.log", 11, true),
            ("openclaw.log", 7, false),
        ];
        let want: Vec<(String, u64, bool)> = want
            .iter()
            .map(|(n, b, a)| (n.to_string(), *b, *a))
            .collect();
        assert_eq!(got, want);
        assert!(scan_agent_logs(&dir.path().join("missing"))
            .unwrap()
            .is_empty());
    }
}
