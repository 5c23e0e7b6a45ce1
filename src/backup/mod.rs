//! Backups of an agent's HOME and their restore. `archive` writes and reads the archive;
//! this module puts it where it belongs without ever leaving half a file or half a HOME:
//! an archive is written under a temporary name and linked into place (never over an existing
//! file), a restore is checked whole, written into a fresh directory beside the HOME and
//! swapped in by rename.

pub mod archive;
pub mod manifest;
pub mod schedule;

pub use archive::{Limits, Meta};
pub use manifest::Manifest;

use crate::isolation::tenant_fs::{self, Identity};
use std::fs::{self, File};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// What one backup made.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct BackupDone {
    pub fleet: String,
    pub agent: String,
    pub path: PathBuf,
    /// Sum of the files' sizes.
    pub bytes: u64,
    pub files: usize,
    /// The archive's size.
    pub archive_bytes: u64,
    pub elapsed_ms: u64,
    /// Cluster mode: the node whose disk holds the archive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

/// `<dir>/<agent>-<UTC time>.tar.gz`, the name scheduled and default backups get.
pub fn archive_name(agent: &str) -> String {
    let t = time::OffsetDateTime::now_utc();
    format!(
        "{agent}-{:04}{:02}{:02}T{:02}{:02}{:02}.{:03}Z.tar.gz",
        t.year(),
        t.month() as u8,
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.millisecond()
    )
}

/// Makes `dir` (and its parents) with mode 0700 where it creates them.
pub fn make_private_dir(dir: &Path) -> Result<(), String> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let md = fs::metadata(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    if !md.is_dir() {
        return Err(format!("{} is not a directory", dir.display()));
    }
    Ok(())
}

/// Backs up `home` into the new file `out` (mode 0600, refused if it exists). Everything
/// inside the HOME is looked up from the open directory above it, never through a link (a
/// link the tenant planted, or a directory it swaps for one mid-walk, leads nowhere), and read
/// with `owner`'s file rights when the agent has a uid of its own; the archive is written with
/// the daemon's.
pub fn backup_home(
    home: &Path,
    owner: Option<Identity>,
    out: &Path,
    meta: &Meta,
    limits: &Limits,
) -> Result<BackupDone, String> {
    let started = std::time::Instant::now();
    if !out.is_absolute() {
        return Err(format!("{} is not an absolute path", out.display()));
    }
    let (dir, name) = match (out.parent(), out.file_name()) {
        (Some(d), Some(n)) => (d, n.to_string_lossy().into_owned()),
        _ => return Err(format!("{} names no file", out.display())),
    };
    if !dir.is_dir() {
        return Err(format!("{} is not a directory", dir.display()));
    }
    if fs::symlink_metadata(out).is_ok() {
        return Err(format!(
            "{} exists: a backup never overwrites a file",
            out.display()
        ));
    }
    let tmp = dir.join(format!(".{name}.partial-{}", std::process::id()));
    let _ = fs::remove_file(&tmp);
    let file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)
        .map_err(|e| format!("creating {}: {e}", tmp.display()))?;
    let written = tenant_fs::as_tenant(owner, || archive::write_archive(home, file, meta, limits))
        .map_err(|e| format!("switching to the agent's uid: {e}"))
        .and_then(|r| r);
    let m = match written {
        Ok(m) => m,
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
    };
    // A link, not a rename: it fails rather than replace a file made meanwhile.
    let linked = fs::hard_link(&tmp, out);
    let _ = fs::remove_file(&tmp);
    linked.map_err(|e| format!("placing {}: {e}", out.display()))?;
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    let archive_bytes = fs::metadata(out).map(|m| m.len()).unwrap_or(0);
    Ok(BackupDone {
        fleet: meta.fleet.clone(),
        agent: meta.agent.clone(),
        path: out.to_path_buf(),
        bytes: m.bytes,
        files: m.files.len(),
        archive_bytes,
        elapsed_ms: started.elapsed().as_millis() as u64,
        node: None,
    })
}

/// Who a restore expects the archive to be of.
#[derive(Debug, Clone)]
pub struct Expect<'a> {
    pub fleet: &'a str,
    pub agent: &'a str,
    /// Take an archive of another agent.
    pub force: bool,
}

/// Checks the archive at `from` whole (every entry against its manifest, nothing outside the
/// HOME), then replaces `home` with its content: written into a fresh directory beside it,
/// with `owner`'s file rights, and swapped in by rename. On any error the HOME is as it was.
/// The agent must not be running (the caller's check).
pub fn restore_home(
    home: &Path,
    owner: Option<Identity>,
    from: &Path,
    expect: &Expect,
    limits: &Limits,
) -> Result<Manifest, String> {
    let file = archive::open_archive(from)?;
    let m = archive::verify_file(&file, limits)?;
    if !expect.force && (m.fleet != expect.fleet || m.agent != expect.agent) {
        return Err(format!(
            "it is a backup of {}/{}, not of {}/{} (--force takes it anyway)",
            m.fleet, m.agent, expect.fleet, expect.agent
        ));
    }
    let parent = home
        .parent()
        .ok_or_else(|| format!("{} has no parent", home.display()))?;
    let leaf = home
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let nonce = std::process::id();
    let staging = parent.join(format!(".{leaf}.restore-{nonce}"));
    let old = parent.join(format!(".{leaf}.replaced-{nonce}"));
    remove_tree(&staging, owner);
    remove_tree(&old, owner);
    fs::DirBuilder::new()
        .mode(0o700)
        .create(&staging)
        .map_err(|e| format!("creating {}: {e}", staging.display()))?;
    if let Some(id) = owner {
        std::os::unix::fs::chown(&staging, Some(id.uid), Some(id.gid))
            .map_err(|e| format!("handing {} to uid {}: {e}", staging.display(), id.uid))?;
    }
    let written = tenant_fs::as_tenant(owner, || archive::extract(&file, &staging, &m, limits))
        .map_err(|e| format!("switching to the agent's uid: {e}"))
        .and_then(|r| r);
    if let Err(e) = written {
        remove_tree(&staging, owner);
        return Err(e);
    }
    let _ = fs::set_permissions(&staging, fs::Permissions::from_mode(0o700));
    let had_home = fs::symlink_metadata(home).is_ok();
    if had_home {
        fs::rename(home, &old).map_err(|e| {
            remove_tree(&staging, owner);
            format!("moving the old HOME aside: {e}")
        })?;
    }
    if let Err(e) = fs::rename(&staging, home) {
        if had_home {
            let _ = fs::rename(&old, home);
        }
        remove_tree(&staging, owner);
        return Err(format!("moving the restored HOME into place: {e}"));
    }
    if let Ok(d) = File::open(parent) {
        let _ = d.sync_all();
    }
    remove_tree(&old, owner);
    Ok(m)
}

/// Removes a tree the tenant may have shaped, with its rights (links are not followed).
fn remove_tree(p: &Path, owner: Option<Identity>) {
    if fs::symlink_metadata(p).is_err() {
        return;
    }
    let _ = tenant_fs::as_tenant(owner, || fs::remove_dir_all(p));
    // What the tenant could not remove (it made it unwritable) goes with the daemon's rights:
    // remove_dir_all never follows a link.
    let _ = fs::remove_dir_all(p);
}

/// The archives of `dir` that `archive_name` made for `agent`, oldest first.
pub fn archives_of(dir: &Path, agent: &str) -> Vec<PathBuf> {
    let prefix = format!("{agent}-");
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            n.starts_with(&prefix)
                && n.ends_with(".tar.gz")
                && n[prefix.len()..].starts_with(|c: char| c.is_ascii_digit())
                && e.file_type().is_ok_and(|t| t.is_file())
        })
        .map(|e| e.path())
        .collect();
    v.sort();
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn meta() -> Meta {
        Meta {
            fleet: "f".into(),
            agent: "a".into(),
            openclaw_version: Some("2026.9.6".into()),
        }
    }

    fn sample_home(root: &Path) -> PathBuf {
        let home = root.join("home");
        fs::create_dir_all(home.join(".openclaw/state")).unwrap();
        fs::create_dir_all(home.join("tmp/node-compile-cache")).unwrap();
        fs::write(home.join(".openclaw/openclaw.json"), b"{\"a\":1}").unwrap();
        fs::write(home.join("tmp/node-compile-cache/blob"), vec![7u8; 4096]).unwrap();
        fs::write(home.join(".openclaw/state/db.sqlite-wal"), b"wal").unwrap();
        std::os::unix::fs::symlink("openclaw.json", home.join(".openclaw/link")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", home.join("escape")).unwrap();
        let db = rusqlite::Connection::open(home.join(".openclaw/state/db.sqlite")).unwrap();
        db.execute_batch(
            "PRAGMA journal_mode=WAL; CREATE TABLE t(x); INSERT INTO t VALUES ('kept');",
        )
        .unwrap();
        drop(db);
        home
    }

    #[test]
    fn backup_then_restore_round_trips_and_leaves_out_caches() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().to_path_buf();
        let home = sample_home(&d);
        let out = d.join("b.tar.gz");
        let done = backup_home(&home, None, &out, &meta(), &Limits::default()).unwrap();
        assert_eq!(
            fs::metadata(&out).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let m = archive::verify(&out, &Limits::default()).unwrap();
        let paths: Vec<&str> = m.files.iter().map(|f| f.path.as_str()).collect();
        assert!(paths.contains(&".openclaw/openclaw.json"), "{paths:?}");
        assert!(paths.contains(&".openclaw/state/db.sqlite"), "{paths:?}");
        assert!(
            !paths
                .iter()
                .any(|p| p.starts_with("tmp") || p.ends_with("-wal")),
            "{paths:?}"
        );
        assert_eq!(m.sqlite, vec![".openclaw/state/db.sqlite".to_string()]);
        assert_eq!(done.files, m.files.len());
        assert!(m.symlinks.iter().all(|l| l.path != "escape"));
        // A second backup to the same file is refused; the first is untouched.
        let again = backup_home(&home, None, &out, &meta(), &Limits::default());
        assert!(again.unwrap_err().contains("never overwrites"));

        fs::write(home.join(".openclaw/openclaw.json"), b"changed").unwrap();
        let expect = Expect {
            fleet: "f",
            agent: "a",
            force: false,
        };
        restore_home(&home, None, &out, &expect, &Limits::default()).unwrap();
        assert_eq!(
            fs::read(home.join(".openclaw/openclaw.json")).unwrap(),
            b"{\"a\":1}"
        );
        assert!(!home.join("tmp").exists());
        let db = rusqlite::Connection::open(home.join(".openclaw/state/db.sqlite")).unwrap();
        let x: String = db.query_row("SELECT x FROM t", [], |r| r.get(0)).unwrap();
        assert_eq!(x, "kept");
        assert_eq!(
            fs::read_link(home.join(".openclaw/link")).unwrap(),
            Path::new("openclaw.json")
        );
        // No staging or old tree is left beside the HOME.
        let left: Vec<_> = fs::read_dir(&d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with('.'))
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }

    #[test]
    fn another_agents_archive_needs_force() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().to_path_buf();
        let home = sample_home(&d);
        let out = d.join("b.tar.gz");
        backup_home(&home, None, &out, &meta(), &Limits::default()).unwrap();
        let e = restore_home(
            &home,
            None,
            &out,
            &Expect {
                fleet: "f",
                agent: "other",
                force: false,
            },
            &Limits::default(),
        )
        .unwrap_err();
        assert!(e.contains("not of f/other"), "{e}");
        restore_home(
            &home,
            None,
            &out,
            &Expect {
                fleet: "f",
                agent: "other",
                force: true,
            },
            &Limits::default(),
        )
        .unwrap();
    }

    /// Archives made by hand: every one is refused and the HOME is left as it was.
    #[test]
    fn hostile_and_broken_archives_change_nothing() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().to_path_buf();
        let home = sample_home(&d);
        let good = d.join("good.tar.gz");
        backup_home(&home, None, &good, &meta(), &Limits::default()).unwrap();
        let bytes = fs::read(&good).unwrap();
        let manifest_json =
            serde_json::to_vec(&archive::verify(&good, &Limits::default()).unwrap()).unwrap();

        let build = |entries: &dyn Fn(&mut tar::Builder<Vec<u8>>)| -> Vec<u8> {
            let mut b = tar::Builder::new(Vec::new());
            entries(&mut b);
            let raw = b.into_inner().unwrap();
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            gz.write_all(&raw).unwrap();
            gz.finish().unwrap()
        };
        let file = |b: &mut tar::Builder<Vec<u8>>, name: &str, data: &[u8]| {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o600);
            h.set_entry_type(tar::EntryType::Regular);
            // set_path refuses '..': write the name bytes directly, as an attacker would.
            let n = name.as_bytes();
            h.as_old_mut().name[..n.len()].copy_from_slice(n);
            h.set_cksum();
            b.append(&h, data).unwrap();
        };
        let mut cases: Vec<(&str, Vec<u8>, &str)> = vec![
            (
                "truncated",
                bytes[..bytes.len() / 2].to_vec(),
                "corrupt or truncated",
            ),
            ("not gzip", b"hello".to_vec(), "corrupt or truncated"),
            ("empty", Vec::new(), "corrupt or truncated"),
        ];
        let mut flipped = bytes.clone();
        let mid = flipped.len() / 2;
        flipped[mid] ^= 0xff;
        cases.push(("flipped byte", flipped, ""));
        cases.push((
            "dot-dot",
            build(&|b| file(b, "home/../../etc/x", b"x")),
            "'..'",
        ));
        cases.push((
            "absolute",
            build(&|b| file(b, "/etc/x", b"x")),
            "outside home/",
        ));
        cases.push((
            "link out",
            build(&|b| {
                let mut h = tar::Header::new_gnu();
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_size(0);
                b.append_link(&mut h, "home/escape", "/etc").unwrap();
            }),
            "outside the HOME",
        ));
        cases.push((
            "through a link",
            build(&|b| {
                let mut h = tar::Header::new_gnu();
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_size(0);
                b.append_link(&mut h, "home/d", "x").unwrap();
                file(b, "home/d/f", b"x");
            }),
            "below a link",
        ));
        cases.push((
            "device",
            build(&|b| {
                let mut h = tar::Header::new_gnu();
                h.set_entry_type(tar::EntryType::Char);
                h.set_size(0);
                h.set_path("home/dev").unwrap();
                h.set_cksum();
                b.append(&h, std::io::empty()).unwrap();
            }),
            "only directories",
        ));
        cases.push((
            "unlisted file",
            build(&|b| {
                file(b, "home/extra", b"x");
                file(b, "manifest.json", &manifest_json);
            }),
            "not in its manifest",
        ));
        cases.push((
            "after manifest",
            build(&|b| {
                file(b, "manifest.json", &manifest_json);
                file(b, "home/late", b"x");
            }),
            "follows the manifest",
        ));
        let before = fs::read(home.join(".openclaw/openclaw.json")).unwrap();
        for (what, data, want) in cases {
            let p = d.join(format!("{}.tar.gz", what.replace(' ', "-")));
            fs::write(&p, &data).unwrap();
            let e = restore_home(
                &home,
                None,
                &p,
                &Expect {
                    fleet: "f",
                    agent: "a",
                    force: true,
                },
                &Limits::default(),
            )
            .expect_err(what);
            assert!(e.contains(want), "{what}: {e}");
            assert_eq!(
                fs::read(home.join(".openclaw/openclaw.json")).unwrap(),
                before,
                "{what}"
            );
            assert!(!d.join("etc").exists(), "{what}");
        }
        // A FIFO given as the archive is refused without blocking.
        let fifo = d.join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let e = archive::verify(&fifo, &Limits::default()).unwrap_err();
        assert!(e.contains("not a regular file"), "{e}");
        // The limit is enforced both ways.
        let tiny = Limits {
            max_bytes: 10,
            max_entries: 1000,
        };
        assert!(archive::verify(&good, &tiny).unwrap_err().contains("limit"));
        let e = backup_home(&home, None, &d.join("big.tar.gz"), &meta(), &tiny).unwrap_err();
        assert!(e.contains("limit"), "{e}");
        assert!(!d.join("big.tar.gz").exists());
    }
}
