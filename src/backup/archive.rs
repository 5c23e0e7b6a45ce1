//! Writing an agent's HOME into a gzipped tar and reading one back. Plain blocking functions:
//! the caller runs them off the actors, with the tenant's file rights for everything inside a
//! HOME (`tenant_fs::as_tenant`), and with the daemon's for the archive file it opened.
//!
//! An archive is `home/<path>` entries (directories, regular files, links that stay inside)
//! and, last, `manifest.json` with every entry's size and SHA-256. A restore reads the whole
//! archive once to check it against its manifest before it writes anything, then once more to
//! write it, checking every file again.

use super::manifest::*;
use crate::operator_file::{below, fd_path, open_dir};
use flate2::read::GzDecoder;
use flate2::write::GzEncoder;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

/// Bounds on what one archive may hold, both ways.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Sum of the files' sizes.
    pub max_bytes: u64,
    pub max_entries: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_bytes: DEFAULT_MAX_BYTES,
            max_entries: 200_000,
        }
    }
}

/// 4 GiB of files per agent.
pub const DEFAULT_MAX_BYTES: u64 = 4 << 30;
const MAX_MANIFEST_BYTES: u64 = 64 << 20;
const SQLITE_MAGIC: &[u8; 16] = b"SQLite format 3\0";

/// Who the archive is for.
#[derive(Debug, Clone)]
pub struct Meta {
    pub fleet: String,
    pub agent: String,
    pub openclaw_version: Option<String>,
}

struct Hashing<R> {
    inner: R,
    hash: Sha256,
    n: u64,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let k = self.inner.read(buf)?;
        self.hash.update(&buf[..k]);
        self.n += k as u64;
        Ok(k)
    }
}

fn hex(d: impl AsRef<[u8]>) -> String {
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

fn header(kind: tar::EntryType, mode: u32, size: u64, mtime: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode & 0o777);
    h.set_size(size);
    h.set_mtime(mtime);
    h
}

/// Writes `home` into `out` (opened by the caller, with its rights) and returns the manifest
/// it appended. Runs with the rights it is called with: the caller switches to the tenant's.
pub fn write_archive(
    home: &Path,
    out: File,
    meta: &Meta,
    limits: &Limits,
) -> Result<Manifest, String> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mut m = Manifest {
        format: MANIFEST_FORMAT,
        fleet: meta.fleet.clone(),
        agent: meta.agent.clone(),
        openclaw_version: meta.openclaw_version.clone(),
        created: time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default(),
        created_unix: now,
        files: vec![],
        dirs: vec![],
        symlinks: vec![],
        bytes: 0,
        sqlite: vec![],
        excluded: exclusion_rules(),
    };
    let gz = GzEncoder::new(BufWriter::new(out), flate2::Compression::fast());
    let mut tar = tar::Builder::new(gz);
    let io = |what: &str, rel: &str, e: io::Error| format!("{what} {rel}: {e}");
    // Every name is looked up below an open directory (`/proc/self/fd/<fd>/<name>`, final
    // component never followed), never by a path from the HOME down: a tenant that swaps a
    // directory for a link while the walk runs cannot lead it out of its HOME, whatever rights
    // the walk has.
    let root = open_dir(home).map_err(|e| format!("opening the HOME {}: {e}", home.display()))?;
    // (relative path, the directory it is in, its name there): opened when its turn comes.
    let mut stack: Vec<(String, std::sync::Arc<File>, Option<String>)> =
        vec![(String::new(), std::sync::Arc::new(root), None)];
    let mut entries = 0usize;
    while let Some((dir, parent, name)) = stack.pop() {
        let here = match name {
            None => parent,
            Some(n) => match open_dir(&below(&parent, &n)) {
                Ok(f) => std::sync::Arc::new(f),
                // Replaced by something else since it was listed: not a directory now.
                Err(e)
                    if e.raw_os_error() == Some(libc::ELOOP)
                        || e.raw_os_error() == Some(libc::ENOTDIR) =>
                {
                    continue
                }
                Err(e) => return Err(io("opening directory", &dir, e)),
            },
        };
        let mut names: Vec<_> = fs::read_dir(fd_path(&here))
            .map_err(|e| io("reading directory", &dir, e))?
            .filter_map(|e| e.ok())
            .collect();
        names.sort_by_key(|e| e.file_name());
        for e in names {
            let Some(name) = e.file_name().to_str().map(str::to_string) else {
                continue; // not UTF-8: no manifest can name it
            };
            let rel = if dir.is_empty() {
                name.clone()
            } else {
                format!("{dir}/{name}")
            };
            if excluded(&rel) || entry_path_problem(&rel).is_some() {
                continue;
            }
            entries += 1;
            if entries > limits.max_entries {
                return Err(format!(
                    "the HOME holds more than {} entries, the backup limit",
                    limits.max_entries
                ));
            }
            let path = below(&here, &name);
            let md = fs::symlink_metadata(&path).map_err(|e| io("reading", &rel, e))?;
            let ft = md.file_type();
            let name_in = format!("{HOME_PREFIX}/{rel}");
            if ft.is_dir() {
                let mode = md.mode() & 0o777;
                let mut h = header(tar::EntryType::Directory, mode, 0, md.mtime() as u64);
                tar.append_data(&mut h, &name_in, io::empty())
                    .map_err(|e| io("writing", &rel, e))?;
                m.dirs.push(DirEntry {
                    path: rel.clone(),
                    mode,
                });
                stack.push((rel, here.clone(), Some(name)));
            } else if ft.is_symlink() {
                let target = fs::read_link(&path).map_err(|e| io("reading link", &rel, e))?;
                let Some(target) = target.to_str().map(str::to_string) else {
                    continue;
                };
                if !link_stays_inside(&rel, &target) {
                    continue; // a restore would refuse it
                }
                let mut h = header(tar::EntryType::Symlink, 0o777, 0, md.mtime() as u64);
                tar.append_link(&mut h, &name_in, &target)
                    .map_err(|e| io("writing", &rel, e))?;
                m.symlinks.push(LinkEntry { path: rel, target });
            } else if ft.is_file() {
                // Before a byte is read: a huge (or sparse) file must not be streamed whole
                // first.
                if m.bytes.saturating_add(md.len()) > limits.max_bytes {
                    return Err(format!(
                        "the HOME holds more than {} bytes of files, the backup limit",
                        limits.max_bytes
                    ));
                }
                let mode = md.mode() & 0o777;
                let (size, sha, db) =
                    append_file(&mut tar, &path, &rel, &name_in, mode, md.mtime() as u64)?;
                m.bytes += size;
                if m.bytes > limits.max_bytes {
                    return Err(format!(
                        "the HOME holds more than {} bytes of files, the backup limit",
                        limits.max_bytes
                    ));
                }
                if db {
                    m.sqlite.push(rel.clone());
                }
                m.files.push(FileEntry {
                    path: rel,
                    size,
                    sha256: sha,
                    mode,
                });
            }
            // Sockets, FIFOs and devices are nothing a restore could use.
        }
    }
    let json = serde_json::to_vec_pretty(&m).map_err(|e| e.to_string())?;
    let mut h = header(tar::EntryType::Regular, 0o600, json.len() as u64, now);
    tar.append_data(&mut h, MANIFEST_NAME, json.as_slice())
        .map_err(|e| format!("writing the manifest: {e}"))?;
    let gz = tar
        .into_inner()
        .map_err(|e| format!("finishing the archive: {e}"))?;
    let buf = gz
        .finish()
        .map_err(|e| format!("finishing the archive: {e}"))?;
    let file = buf
        .into_inner()
        .map_err(|e| format!("writing the archive: {}", e.error()))?;
    file.sync_all()
        .map_err(|e| format!("writing the archive: {e}"))?;
    Ok(m)
}

/// One regular file: a SQLite database through SQLite's backup API (a consistent copy while
/// the gateway writes it), anything else as it lies. Returns (size, sha256, was a database).
fn append_file<W: Write>(
    tar: &mut tar::Builder<W>,
    path: &Path,
    rel: &str,
    name_in: &str,
    mode: u32,
    mtime: u64,
) -> Result<(u64, String, bool), String> {
    let mut f =
        crate::operator_file::open_regular(path).map_err(|e| format!("opening {rel}: {e}"))?;
    let size = f
        .metadata()
        .map_err(|e| format!("reading {rel}: {e}"))?
        .len();
    let mut magic = [0u8; 16];
    let is_db = size >= 512 && f.read_exact(&mut magic).is_ok() && &magic == SQLITE_MAGIC;
    if is_db {
        let bytes = sqlite_copy(path).map_err(|e| format!("copying database {rel}: {e}"))?;
        let mut h = header(tar::EntryType::Regular, mode, bytes.len() as u64, mtime);
        tar.append_data(&mut h, name_in, bytes.as_slice())
            .map_err(|e| format!("writing {rel}: {e}"))?;
        return Ok((bytes.len() as u64, hex(Sha256::digest(&bytes)), true));
    }
    let f = crate::operator_file::open_regular(path).map_err(|e| format!("opening {rel}: {e}"))?;
    let mut r = Hashing {
        inner: f.take(size),
        hash: Sha256::new(),
        n: 0,
    };
    let mut h = header(tar::EntryType::Regular, mode, size, mtime);
    tar.append_data(&mut h, name_in, &mut r)
        .map_err(|e| format!("writing {rel}: {e}"))?;
    // tar pads by what it read, not by the header: a file that shrank meanwhile would leave
    // an archive its manifest contradicts.
    if r.n != size {
        return Err(format!(
            "{rel} shrank from {size} to {} bytes while it was read; try again",
            r.n
        ));
    }
    Ok((size, hex(r.hash.finalize()), false))
}

/// The database at `path`, copied page by page by SQLite's online backup into memory.
fn sqlite_copy(path: &Path) -> rusqlite::Result<Vec<u8>> {
    use rusqlite::{Connection, OpenFlags};
    // Read-write without create: a WAL database's reader must be able to map its -shm.
    // SQLite resolves the path itself (it needs the directory for the -wal and -shm), so the
    // `/proc/self/fd/<dir>/<name>` path is expanded again: outside `uid` isolation a tenant
    // racing a directory swap in this instant could redirect the copy (README, backups).
    let src = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    src.busy_timeout(Duration::from_secs(10))?;
    let mut mem = Connection::open_in_memory()?;
    {
        let b = rusqlite::backup::Backup::new(&src, &mut mem)?;
        b.run_to_completion(256, Duration::from_millis(2), None)?;
    }
    Ok(mem.serialize("main")?.to_vec())
}

/// What a pass over an archive found: the manifest and what each entry really holds.
struct Seen {
    manifest: Option<Manifest>,
    files: BTreeMap<String, (u64, String)>,
    dirs: BTreeSet<String>,
    links: BTreeMap<String, String>,
}

/// Opens the archive at `path` (the operator's: it may be anything) for reading, with the
/// caller's rights (the daemon's: a restore then writes with the tenant's).
pub fn open_archive(path: &Path) -> Result<File, String> {
    let f = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let ft = f
        .metadata()
        .map_err(|e| format!("{}: {e}", path.display()))?
        .file_type();
    if !ft.is_file() {
        return Err(format!(
            "{} is {}, not a regular file",
            path.display(),
            crate::operator_file::kind_of(&ft)
        ));
    }
    Ok(f)
}

/// One pass over the archive. With `into`, every entry is also written below that (empty)
/// directory; without, nothing is written anywhere.
fn pass(file: &File, limits: &Limits, into: Option<&Path>) -> Result<Seen, String> {
    use std::io::Seek;
    let mut f = file;
    f.seek(io::SeekFrom::Start(0))
        .map_err(|e| format!("reading the archive: {e}"))?;
    let mut ar = tar::Archive::new(GzDecoder::new(io::BufReader::new(f)));
    let mut seen = Seen {
        manifest: None,
        files: BTreeMap::new(),
        dirs: BTreeSet::new(),
        links: BTreeMap::new(),
    };
    let corrupt = |e: io::Error| format!("the archive is corrupt or truncated: {e}");
    let mut bytes = 0u64;
    let mut count = 0usize;
    for entry in ar.entries().map_err(corrupt)? {
        let mut entry = entry.map_err(corrupt)?;
        count += 1;
        if count > limits.max_entries + 1 {
            return Err(format!("it holds more than {} entries", limits.max_entries));
        }
        if seen.manifest.is_some() {
            return Err("an entry follows the manifest (it must be last)".into());
        }
        let raw = entry.path_bytes().into_owned();
        let name =
            String::from_utf8(raw).map_err(|_| "an entry's name is not UTF-8".to_string())?;
        let kind = entry.header().entry_type();
        if name == MANIFEST_NAME {
            if !kind.is_file() || entry.size() > MAX_MANIFEST_BYTES {
                return Err("its manifest is not a regular file of at most 64 MiB".into());
            }
            let mut buf = Vec::new();
            (&mut entry)
                .take(MAX_MANIFEST_BYTES)
                .read_to_end(&mut buf)
                .map_err(corrupt)?;
            let m: Manifest = serde_json::from_slice(&buf)
                .map_err(|e| format!("its manifest is not valid: {e}"))?;
            if m.format != MANIFEST_FORMAT {
                return Err(format!(
                    "its manifest has format {}, this fleetd reads {MANIFEST_FORMAT}",
                    m.format
                ));
            }
            seen.manifest = Some(m);
            continue;
        }
        let rel = name
            .trim_end_matches('/')
            .strip_prefix(&format!("{HOME_PREFIX}/"))
            .ok_or_else(|| format!("entry {name:?} is outside {HOME_PREFIX}/"))?
            .to_string();
        if let Some(why) = entry_path_problem(&rel) {
            return Err(format!("entry {name:?} {why}"));
        }
        // Nothing may be written through a link the archive made, nor twice.
        let mut prefix = String::new();
        for part in rel.split('/') {
            if !prefix.is_empty() {
                if seen.links.contains_key(&prefix) || seen.files.contains_key(&prefix) {
                    return Err(format!("entry {name:?} lies below a link or a file"));
                }
                prefix.push('/');
            }
            prefix.push_str(part);
        }
        if seen.files.contains_key(&rel)
            || seen.dirs.contains(&rel)
            || seen.links.contains_key(&rel)
        {
            return Err(format!("entry {name:?} appears twice"));
        }
        let dest = into.map(|d| d.join(&rel));
        match kind {
            tar::EntryType::Directory => {
                if let Some(d) = &dest {
                    fs::create_dir(d).map_err(|e| format!("creating {rel}: {e}"))?;
                }
                seen.dirs.insert(rel);
            }
            tar::EntryType::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .map(|t| String::from_utf8_lossy(&t).into_owned())
                    .unwrap_or_default();
                if !link_stays_inside(&rel, &target) {
                    return Err(format!(
                        "entry {name:?} is a link to {target:?}, outside the HOME"
                    ));
                }
                if let Some(d) = &dest {
                    std::os::unix::fs::symlink(&target, d)
                        .map_err(|e| format!("creating link {rel}: {e}"))?;
                }
                seen.links.insert(rel, target);
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let size = entry.size();
                bytes = bytes.saturating_add(size);
                if bytes > limits.max_bytes {
                    return Err(format!(
                        "its files add up to more than {} bytes, the restore limit",
                        limits.max_bytes
                    ));
                }
                let mut r = Hashing {
                    inner: &mut entry,
                    hash: Sha256::new(),
                    n: 0,
                };
                match &dest {
                    Some(d) => {
                        let mut out = fs::OpenOptions::new()
                            .write(true)
                            .create_new(true)
                            .mode(0o600)
                            .custom_flags(libc::O_NOFOLLOW)
                            .open(d)
                            .map_err(|e| format!("creating {rel}: {e}"))?;
                        io::copy(&mut r, &mut out).map_err(corrupt)?;
                        out.sync_all().map_err(|e| format!("writing {rel}: {e}"))?;
                    }
                    None => {
                        io::copy(&mut r, &mut io::sink()).map_err(corrupt)?;
                    }
                }
                if r.n != size {
                    return Err(format!("entry {name:?} is truncated"));
                }
                seen.files.insert(rel, (size, hex(r.hash.finalize())));
            }
            other => {
                return Err(format!(
                    "entry {name:?} is a {other:?}: only directories, files and links are restored"
                ))
            }
        }
    }
    // Read to the end of the gzip stream, so its CRC is checked: tar stops at its end
    // marker and would never see a corrupt tail. What follows the marker is padding.
    let mut rest = ar.into_inner().take(TRAILER_LIMIT + 1);
    let n = io::copy(&mut rest, &mut io::sink()).map_err(corrupt)?;
    if n > TRAILER_LIMIT {
        return Err("it has more than 1 MiB of data after its last entry".into());
    }
    Ok(seen)
}

/// Padding tar writes after its end marker is at most a record (10 KiB).
const TRAILER_LIMIT: u64 = 1 << 20;

/// Whether what an archive holds is exactly what its manifest lists.
fn matches(seen: &Seen) -> Result<Manifest, String> {
    let m = seen
        .manifest
        .clone()
        .ok_or("it has no manifest (truncated, or not an agent backup)")?;
    let listed: BTreeMap<String, (u64, String)> = m
        .files
        .iter()
        .map(|f| (f.path.clone(), (f.size, f.sha256.clone())))
        .collect();
    for (p, got) in &seen.files {
        match listed.get(p) {
            None => return Err(format!("{p} is not in its manifest")),
            Some(want) if want != got => {
                return Err(format!(
                    "{p} does not match its manifest (size or checksum): the archive is corrupt"
                ))
            }
            Some(_) => {}
        }
    }
    if let Some(p) = listed.keys().find(|p| !seen.files.contains_key(*p)) {
        return Err(format!("{p} is in its manifest but not in the archive"));
    }
    let dirs: BTreeSet<String> = m.dirs.iter().map(|d| d.path.clone()).collect();
    let links: BTreeMap<String, String> = m
        .symlinks
        .iter()
        .map(|l| (l.path.clone(), l.target.clone()))
        .collect();
    if dirs != seen.dirs || links != seen.links {
        return Err("its directories or links differ from its manifest".into());
    }
    Ok(m)
}

/// Reads the whole archive and checks it against its manifest; writes nothing.
pub fn verify(path: &Path, limits: &Limits) -> Result<Manifest, String> {
    verify_file(&open_archive(path)?, limits)
}

/// `verify` of an archive already open.
pub fn verify_file(file: &File, limits: &Limits) -> Result<Manifest, String> {
    matches(&pass(file, limits, None)?)
}

/// Writes the archive's HOME into `into` (an empty directory), checking every file against
/// `manifest` again (the archive may have changed since it was verified), then gives each
/// file and directory its recorded mode. Runs with the rights it is called with.
pub fn extract(
    file: &File,
    into: &Path,
    manifest: &Manifest,
    limits: &Limits,
) -> Result<(), String> {
    let seen = pass(file, limits, Some(into))?;
    if matches(&seen)? != *manifest {
        return Err("the archive changed while it was restored".into());
    }
    for f in &manifest.files {
        fs::set_permissions(
            into.join(&f.path),
            fs::Permissions::from_mode(f.mode & 0o777),
        )
        .map_err(|e| format!("setting the mode of {}: {e}", f.path))?;
    }
    // Deepest first: a directory without write permission must get it last.
    let mut dirs: Vec<&DirEntry> = manifest.dirs.iter().collect();
    dirs.sort_by_key(|d| std::cmp::Reverse(d.path.matches('/').count()));
    for d in dirs {
        fs::set_permissions(
            into.join(&d.path),
            fs::Permissions::from_mode(d.mode & 0o777),
        )
        .map_err(|e| format!("setting the mode of {}: {e}", d.path))?;
    }
    Ok(())
}
