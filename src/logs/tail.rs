//! Reading agent logs back: the list of a log's files across archives (plain or gzip), the
//! last N lines, secret redaction, and a `Follower` that keeps up with appends and
//! rotations. It never writes or deletes files (`writer` and `retention` do).

use std::collections::{BTreeMap, VecDeque};
use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use flate2::read::MultiGzDecoder;

/// Index of `candidate` as an archive of the log file named `current`, and whether it is
/// gzipped. Our writer names archives `agent.log.N[.gz]`; OpenClaw inserts the number before
/// the extension (`openclaw.N.log`, per docs.openclaw.ai/logging): both are recognised.
pub(crate) fn archive_index(current: &str, candidate: &str) -> Option<(u32, bool)> {
    let (body, gz) = match candidate.strip_suffix(".gz") {
        Some(b) => (b, true),
        None => (candidate, false),
    };
    let num = |s: &str| -> Option<u32> {
        if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
            s.parse().ok()
        } else {
            None
        }
    };
    if let Some(n) = body
        .strip_prefix(current)
        .and_then(|r| r.strip_prefix('.'))
        .and_then(num)
    {
        return Some((n, gz));
    }
    let (stem, ext) = current.rsplit_once('.')?;
    let n = body
        .strip_prefix(stem)?
        .strip_prefix('.')?
        .strip_suffix(ext)?
        .strip_suffix('.')
        .and_then(num)?;
    Some((n, gz))
}

/// The current file (if it exists) and its archives, newest first: `agent.log`,
/// `agent.log.1[.gz]`, `agent.log.2[.gz]`, … When both `.N` and `.N.gz` exist (a compression
/// just finished), the complete `.gz` is listed.
pub fn log_files(log_path: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if log_path.is_file() {
        out.push(log_path.to_path_buf());
    }
    let (Some(dir), Some(name)) = (log_path.parent(), log_path.file_name()) else {
        return out;
    };
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let Some(name) = name.to_str() else {
        return out;
    };
    let Ok(entries) = fs::read_dir(dir) else {
        return out;
    };
    let mut archives: BTreeMap<u32, PathBuf> = BTreeMap::new();
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let Some(candidate) = file_name.to_str() else {
            continue;
        };
        if let Some((n, gz)) = archive_index(name, candidate) {
            let slot = archives.entry(n).or_insert_with(|| entry.path());
            if gz {
                *slot = entry.path();
            }
        }
    }
    out.extend(archives.into_values());
    out
}

/// The last `n` lines across the current file and its archives, oldest first. The current
/// file and plain archives are read from the end; gzip archives are streamed.
pub fn last_lines(log_path: &Path, n: usize) -> io::Result<Vec<String>> {
    let mut per_file: Vec<Vec<String>> = Vec::new();
    let mut remaining = n;
    for path in log_files(log_path) {
        if remaining == 0 {
            break;
        }
        let lines = match read_last(&path, remaining) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                // `.N` vanished because its `.N.gz` just replaced it.
                let mut gz = path.clone().into_os_string();
                gz.push(".gz");
                let gz = PathBuf::from(gz);
                if path != log_path && !is_gz(&path) && gz.exists() {
                    read_last(&gz, remaining)?
                } else {
                    continue;
                }
            }
            other => other?,
        };
        remaining -= lines.len();
        per_file.push(lines);
    }
    Ok(per_file.into_iter().rev().flatten().collect())
}

fn is_gz(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "gz")
}

fn read_last(path: &Path, n: usize) -> io::Result<Vec<String>> {
    if is_gz(path) {
        last_lines_gz(crate::operator_file::open_regular(path)?, n)
    } else {
        last_lines_plain(crate::operator_file::open_regular(path)?, n)
    }
}

fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Reads blocks backwards from the end until `n` line breaks are seen.
fn last_lines_plain(mut f: File, n: usize) -> io::Result<Vec<String>> {
    const BLOCK: u64 = 16 * 1024;
    let len = f.metadata()?.len();
    let mut start = len;
    let mut data: Vec<u8> = Vec::new();
    loop {
        let body = data.strip_suffix(b"\n").unwrap_or(&data);
        let breaks = body.iter().filter(|&&b| b == b'\n').count();
        if start == 0 || breaks >= n {
            break;
        }
        let from = start.saturating_sub(BLOCK);
        let mut block = vec![0u8; (start - from) as usize];
        f.seek(SeekFrom::Start(from))?;
        f.read_exact(&mut block)?;
        block.extend_from_slice(&data);
        data = block;
        start = from;
    }
    let body = data.strip_suffix(b"\n").unwrap_or(&data);
    if body.is_empty() {
        return Ok(Vec::new());
    }
    let mut segments: Vec<&[u8]> = body.split(|&b| b == b'\n').collect();
    if start > 0 {
        // The first segment starts mid-line.
        segments.remove(0);
    }
    let skip = segments.len().saturating_sub(n);
    Ok(segments[skip..].iter().map(|s| lossy(s)).collect())
}

/// A gzip stream cannot be read backwards: keep a ring of the last `n` lines.
fn last_lines_gz(f: File, n: usize) -> io::Result<Vec<String>> {
    let mut reader = BufReader::new(MultiGzDecoder::new(BufReader::new(f)));
    let mut ring: VecDeque<Vec<u8>> = VecDeque::with_capacity(n.min(1024));
    let mut buf = Vec::new();
    loop {
        buf.clear();
        if reader.read_until(b'\n', &mut buf)? == 0 {
            break;
        }
        if buf.last() == Some(&b'\n') {
            buf.pop();
        }
        let mut line = if ring.len() == n {
            ring.pop_front().unwrap_or_default()
        } else {
            Vec::new()
        };
        line.clear();
        line.extend_from_slice(&buf);
        ring.push_back(line);
    }
    Ok(ring.iter().map(|l| lossy(l)).collect())
}

/// `line` with every secret of at least 8 bytes replaced by `[REDACTED]` (shorter ones
/// would blank out ordinary words). Longer secrets go first, so one that contains another
/// is still removed whole.
pub fn redact(line: &str, secrets: &[&str]) -> String {
    let mut sorted: Vec<&str> = secrets.iter().copied().filter(|s| s.len() >= 8).collect();
    sorted.sort_by_key(|s| std::cmp::Reverse(s.len()));
    let mut out = line.to_string();
    for s in sorted {
        if out.contains(s) {
            out = out.replace(s, "[REDACTED]");
        }
    }
    out
}

/// Most bytes one `poll` reads, so a burst cannot make one call hold the whole file.
const POLL_MAX_BYTES: u64 = 4 * 1024 * 1024;

/// Follows a log file like `tail -F`: starts at the current end, returns complete new lines,
/// and after a rotation finishes the old file (still open) before moving to the new one.
pub struct Follower {
    path: PathBuf,
    file: Option<File>,
    ino: u64,
    dev: u64,
    offset: u64,
    partial: Vec<u8>,
}

impl Follower {
    /// Starts at the current end of `log_path`; a file that does not exist yet is read from
    /// its beginning once it appears.
    pub fn new(log_path: &Path) -> Self {
        let mut f = Follower {
            path: log_path.to_path_buf(),
            file: None,
            ino: 0,
            dev: 0,
            offset: 0,
            partial: Vec::new(),
        };
        if let Ok(file) = crate::operator_file::open_regular(log_path) {
            if let Ok(meta) = file.metadata() {
                f.ino = meta.ino();
                f.dev = meta.dev();
                f.offset = meta.len();
                f.file = Some(file);
            }
        }
        f
    }

    /// New complete lines since the last poll, oldest first.
    pub fn poll(&mut self) -> io::Result<Vec<String>> {
        let mut lines = Vec::new();
        if self.file.is_some() && !self.read_available(&mut lines)? {
            // Budget used up: continue next poll, before looking for a rotation.
            return Ok(lines);
        }
        let meta = match fs::metadata(&self.path) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(lines),
            Err(e) => return Err(e),
        };
        let replaced = self.file.is_none() || meta.ino() != self.ino || meta.dev() != self.dev;
        if replaced {
            // The old file is complete: a torn last line is still a line.
            if !self.partial.is_empty() {
                lines.push(lossy(&std::mem::take(&mut self.partial)));
            }
            let file = match crate::operator_file::open_regular(&self.path) {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(lines),
                Err(e) => return Err(e),
            };
            let m = file.metadata()?;
            self.ino = m.ino();
            self.dev = m.dev();
            self.offset = 0;
            self.file = Some(file);
        } else if meta.len() < self.offset {
            // Truncated in place (copytruncate): start over. A truncation refilled to at
            // least the old length before a poll cannot be told apart (as with `tail -F`);
            // our writer never truncates, it renames.
            self.offset = 0;
            self.partial.clear();
        }
        self.read_available(&mut lines)?;
        Ok(lines)
    }

    /// Reads from `offset` to EOF (at most `POLL_MAX_BYTES`) into complete lines. Returns
    /// false when it stopped at the byte budget rather than at EOF.
    fn read_available(&mut self, lines: &mut Vec<String>) -> io::Result<bool> {
        let Some(file) = self.file.as_mut() else {
            return Ok(true);
        };
        file.seek(SeekFrom::Start(self.offset))?;
        let mut chunk = Vec::new();
        let got = file.by_ref().take(POLL_MAX_BYTES).read_to_end(&mut chunk)?;
        self.offset += got as u64;
        let mut rest = &chunk[..];
        while let Some(i) = rest.iter().position(|&b| b == b'\n') {
            if self.partial.is_empty() {
                lines.push(lossy(&rest[..i]));
            } else {
                self.partial.extend_from_slice(&rest[..i]);
                lines.push(lossy(&std::mem::take(&mut self.partial)));
            }
            rest = &rest[i + 1..];
        }
        self.partial.extend_from_slice(rest);
        Ok((got as u64) < POLL_MAX_BYTES)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::write::GzEncoder;
    use flate2::Compression;
    use std::io::Write;

    fn numbered(range: std::ops::Range<usize>) -> String {
        range.map(|i| format!("line {i}\n")).collect()
    }

    fn write_gz(path: &Path, text: &str) {
        let mut enc = GzEncoder::new(File::create(path).unwrap(), Compression::default());
        enc.write_all(text.as_bytes()).unwrap();
        enc.finish().unwrap();
    }

    fn names(v: &[String]) -> Vec<usize> {
        v.iter().map(|l| l[5..].parse().unwrap()).collect()
    }

    fn append(path: &Path, text: &str) {
        let mut f = fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(path)
            .unwrap();
        f.write_all(text.as_bytes()).unwrap();
    }

    #[test]
    fn archive_names_are_recognised() {
        let cases = [
            ("agent.log", "agent.log.1", Some((1, false))),
            ("agent.log", "agent.log.12.gz", Some((12, true))),
            ("agent.log", "agent.log", None),
            ("agent.log", "agent.log.gz", None),
            ("agent.log", "agent.log.x", None),
            ("agent.log", "agent.log.gz-tmp-1-2", None),
            ("agent.log", "agent.logger.1", None),
            ("openclaw.log", "openclaw.3.log", Some((3, false))),
            ("openclaw.log", "openclaw.3.log.gz", Some((3, true))),
            ("openclaw.log", "openclaw..log", None),
            ("openclaw.log", "openclaw-2026-01-01.1.log", None),
        ];
        for (current, candidate, want) in cases {
            assert_eq!(
                archive_index(current, candidate),
                want,
                "{current} / {candidate}"
            );
        }
    }

    #[test]
    fn log_files_newest_first_preferring_complete_gz() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("agent.log");
        for name in [
            "agent.log",
            "agent.log.2.gz",
            "agent.log.1",
            "agent.log.1.gz",
            "agent.log.10",
            "other.log",
            "agent.log.gz-tmp-1-1",
        ] {
            fs::write(dir.path().join(name), "x\n").unwrap();
        }
        let got: Vec<String> = log_files(&p)
            .iter()
            .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            got,
            [
                "agent.log",
                "agent.log.1.gz",
                "agent.log.2.gz",
                "agent.log.10"
            ]
        );
    }

    #[test]
    fn last_lines_span_current_and_two_archives_one_gz() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("agent.log");
        write_gz(&dir.path().join("agent.log.2.gz"), &numbered(0..5));
        fs::write(dir.path().join("agent.log.1"), numbered(5..10)).unwrap();
        fs::write(&p, numbered(10..13)).unwrap();

        assert_eq!(names(&last_lines(&p, 2).unwrap()), [11, 12]);
        assert_eq!(
            names(&last_lines(&p, 7).unwrap()),
            (6..13).collect::<Vec<_>>()
        );
        assert_eq!(
            names(&last_lines(&p, 10).unwrap()),
            (3..13).collect::<Vec<_>>()
        );
        assert_eq!(
            names(&last_lines(&p, 100).unwrap()),
            (0..13).collect::<Vec<_>>()
        );
        assert!(last_lines(&p, 0).unwrap().is_empty());
        assert!(last_lines(&dir.path().join("none.log"), 5)
            .unwrap()
            .is_empty());
    }

    #[test]
    fn last_lines_of_a_large_file_read_from_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("agent.log");
        // Over many 16 KiB blocks, and no trailing newline on the last line.
        let mut text = numbered(0..50_000);
        text.push_str("line 50000");
        fs::write(&p, &text).unwrap();
        assert_eq!(names(&last_lines(&p, 3).unwrap()), [49_998, 49_999, 50_000]);
        let many = last_lines(&p, 5000).unwrap();
        assert_eq!(names(&many), (45_001..50_001).collect::<Vec<_>>());
    }

    #[test]
    fn redact_replaces_long_secrets_only() {
        let secrets = ["tok_12345678", "short", "", "tok_12345678_longer"];
        let line = "a tok_12345678_longer b tok_12345678 c short tok_12345678";
        assert_eq!(
            redact(line, &secrets),
            "a [REDACTED] b [REDACTED] c short [REDACTED]"
        );
        assert_eq!(redact("nothing here", &secrets), "nothing here");
    }

    #[test]
    fn follower_sees_appends_from_its_start_point() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("agent.log");
        fs::write(&p, "old 1\nold 2\n").unwrap();
        let mut f = Follower::new(&p);
        assert!(f.poll().unwrap().is_empty());
        append(&p, "new 1\nnew 2\npart");
        assert_eq!(f.poll().unwrap(), ["new 1", "new 2"]);
        assert!(f.poll().unwrap().is_empty());
        append(&p, "ial\n");
        assert_eq!(f.poll().unwrap(), ["partial"]);
    }

    #[test]
    fn follower_survives_rotation_and_reads_the_old_tail() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("agent.log");
        fs::write(&p, "a\n").unwrap();
        let mut f = Follower::new(&p);
        append(&p, "b\n");
        // Rotated before the follower saw "b": it must still read it from the old file.
        fs::rename(&p, dir.path().join("agent.log.1")).unwrap();
        assert!(f.poll().unwrap() == ["b"]);
        fs::write(&p, "c\nd\n").unwrap();
        assert_eq!(f.poll().unwrap(), ["c", "d"]);
        append(&p, "e\n");
        fs::rename(&p, dir.path().join("agent.log.1")).unwrap();
        fs::write(&p, "f\n").unwrap();
        assert_eq!(f.poll().unwrap(), ["e", "f"]);
        // Truncated in place, seen while shorter than what was read.
        fs::write(&p, "").unwrap();
        assert!(f.poll().unwrap().is_empty());
        append(&p, "g\n");
        assert_eq!(f.poll().unwrap(), ["g"]);
    }

    #[test]
    fn follower_keeps_up_with_the_writers_own_rotations() {
        use crate::logs::writer::{LogWriter, Stream};
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("agent.log");
        let mut w = LogWriter::open(p.clone(), 1024, 2);
        let mut f = Follower::new(&p);
        let mut seen = Vec::new();
        for i in 0..200 {
            w.write_line(Stream::Out, format!("line {i}").as_bytes(), 0);
            w.flush();
            seen.extend(f.poll().unwrap().into_iter().map(|l| l[29..].to_string()));
        }
        assert!(log_files(&p).len() >= 2, "no rotation happened");
        let want: Vec<String> = (0..200).map(|i| format!("line {i}")).collect();
        assert_eq!(seen, want);
    }

    #[test]
    fn follower_of_a_missing_file_reads_it_from_the_start_once_created() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("agent.log");
        let mut f = Follower::new(&p);
        assert!(f.poll().unwrap().is_empty());
        fs::write(&p, "first\n").unwrap();
        assert_eq!(f.poll().unwrap(), ["first"]);
    }
}
