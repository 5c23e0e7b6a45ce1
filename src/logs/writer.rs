//! Writing what agents print: `LineSplitter` turns raw pipe chunks into bounded lines, and
//! `LogWriter` appends them to `agent.log`, rotates it by size, gzips archives on a background
//! thread and survives a full disk by dropping and counting lines. It does not read pipes (the
//! pump task does) and does not prune by age or disk budget (`retention` decides that).

use std::collections::HashMap;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, BufWriter, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use flate2::write::GzEncoder;
use flate2::Compression;

/// Which pipe a line came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stream {
    Out,
    Err,
}

impl Stream {
    /// The spelling used in log lines: `out` / `err`.
    pub fn as_str(self) -> &'static str {
        match self {
            Stream::Out => "out",
            Stream::Err => "err",
        }
    }
}

impl fmt::Display for Stream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Longer lines are cut to this many bytes and marked with ` …[cut N bytes]`.
pub const MAX_LINE_BYTES: usize = 16 * 1024;

/// Buffers above this are released once their line is done, so thousands of mostly idle
/// agents do not each keep the memory of their longest line.
const KEEP_CAPACITY: usize = 4 * 1024;
/// A batch larger than this is written out even before the caller's `flush()`.
const FLUSH_AT: usize = 64 * 1024;
/// After a failed open, write or rotation, nothing is retried before this much time passed.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// Accumulates raw chunks from a pipe and yields complete lines (without their `\n`; a `\r`
/// before it stays part of the line). Never holds more than `MAX_LINE_BYTES` of one line.
#[derive(Debug, Default)]
pub struct LineSplitter {
    buf: Vec<u8>,
    /// Bytes of the line being assembled that were discarded past `MAX_LINE_BYTES`.
    cut: usize,
}

impl LineSplitter {
    pub fn new() -> Self {
        LineSplitter::default()
    }

    /// Feeds one chunk; `out(line, bytes_cut)` is called for every line it completes.
    pub fn push(&mut self, chunk: &[u8], out: &mut impl FnMut(&[u8], usize)) {
        let mut rest = chunk;
        while let Some(i) = rest.iter().position(|&b| b == b'\n') {
            let seg = &rest[..i];
            if self.buf.is_empty() && self.cut == 0 {
                // Whole line inside this chunk: hand it out without copying.
                if seg.len() <= MAX_LINE_BYTES {
                    out(seg, 0);
                } else {
                    out(&seg[..MAX_LINE_BYTES], seg.len() - MAX_LINE_BYTES);
                }
            } else {
                self.append(seg);
                out(&self.buf, self.cut);
                self.reset();
            }
            rest = &rest[i + 1..];
        }
        if !rest.is_empty() {
            self.append(rest);
        }
    }

    /// Flushes a trailing partial line at EOF.
    pub fn finish(&mut self, out: &mut impl FnMut(&[u8], usize)) {
        if !self.buf.is_empty() || self.cut > 0 {
            out(&self.buf, self.cut);
            self.reset();
        }
    }

    fn append(&mut self, bytes: &[u8]) {
        let room = MAX_LINE_BYTES - self.buf.len();
        let take = room.min(bytes.len());
        let need = self.buf.len() + take;
        if need > self.buf.capacity() {
            // Grow by doubling as usual, but never past the line bound.
            let want = need.max(self.buf.capacity() * 2).min(MAX_LINE_BYTES);
            self.buf.reserve_exact(want - self.buf.len());
        }
        self.buf.extend_from_slice(&bytes[..take]);
        self.cut += bytes.len() - take;
    }

    fn reset(&mut self) {
        self.cut = 0;
        if self.buf.capacity() > KEEP_CAPACITY {
            self.buf = Vec::new();
        } else {
            self.buf.clear();
        }
    }
}

/// Path of archive `n` of `path`: `agent.log.3` or `agent.log.3.gz`.
pub(crate) fn archive_path(path: &Path, n: u32, gz: bool) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(format!(".{n}"));
    if gz {
        s.push(".gz");
    }
    PathBuf::from(s)
}

/// Rotation generation of one log path, shared by its writer and its compressors: the lock
/// serialises shifting archives with a compressor renaming its result, and the counter tells
/// a compressor where its archive has moved to meanwhile (`.1` of generation g is
/// `.{1 + now - g}` once more rotations happened).
type Slot = Arc<Mutex<u64>>;

/// One slot per path in the whole process, so a writer reopened on the same file (agent
/// restarted) agrees with compressors a previous writer left running.
fn slot_for(path: &Path) -> Slot {
    static SLOTS: OnceLock<Mutex<HashMap<PathBuf, Weak<Mutex<u64>>>>> = OnceLock::new();
    let mut map = SLOTS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    if let Some(slot) = map.get(path).and_then(Weak::upgrade) {
        return slot;
    }
    if map.len() >= 1024 && map.len().is_power_of_two() {
        map.retain(|_, w| w.strong_count() > 0);
    }
    let slot = Arc::new(Mutex::new(0));
    map.insert(path.to_path_buf(), Arc::downgrade(&slot));
    slot
}

/// Runs `f` while no writer or compressor of the log file `path` can rotate or rename its
/// archives, so a pruner's scan, decision and deletions see one consistent set of files.
pub fn with_rotation_lock<T>(path: &Path, f: impl FnOnce() -> T) -> T {
    let slot = slot_for(path);
    let _guard = slot.lock().unwrap_or_else(|p| p.into_inner());
    f()
}

/// Appends formatted lines to one log file and rotates it. Never fails: a line that cannot
/// be written is dropped and counted, and the file is reopened at most once per second.
pub struct LogWriter {
    path: PathBuf,
    max_bytes: u64,
    keep: u32,
    file: Option<File>,
    /// Size of the current file as far as this writer knows (excludes `pending`).
    size: u64,
    /// Formatted lines not yet written; grows on need, released when large.
    pending: Vec<u8>,
    pending_lines: u64,
    /// While closed after a failure: no open attempt before this instant.
    retry_at: Option<Instant>,
    /// After a failed rotation: keep appending, but no new attempt before this instant.
    rotate_retry_at: Option<Instant>,
    dropped: u64,
    unreported: u64,
    /// The last write attempt succeeded (a drop report waits for this).
    healthy: bool,
    bytes_written: u64,
    /// Cached `YYYY-MM-DDTHH:MM:SS` of `ts_secs`: formatting dates per line is the costly part.
    ts_secs: u64,
    ts_prefix: [u8; 19],
    fail_writes: bool,
    slot: Slot,
    compressors: Vec<JoinHandle<()>>,
    /// Node-wide count of bytes written to agent logs (the metrics).
    counter: Option<prometheus_client::metrics::counter::Counter>,
}

impl LogWriter {
    /// Opens (creating it and its directory if needed) `path` for appending. An open error is
    /// not returned: the writer retries later and counts lines lost meanwhile.
    pub fn open(path: PathBuf, max_bytes: u64, keep: u32) -> Self {
        let slot = slot_for(&path);
        let mut w = LogWriter {
            path,
            max_bytes,
            keep,
            file: None,
            size: 0,
            pending: Vec::new(),
            pending_lines: 0,
            retry_at: None,
            rotate_retry_at: None,
            dropped: 0,
            unreported: 0,
            healthy: true,
            bytes_written: 0,
            counter: None,
            ts_secs: u64::MAX,
            ts_prefix: [b'0'; 19],
            fail_writes: false,
            slot,
            compressors: Vec::new(),
        };
        w.try_open(Instant::now(), true);
        w
    }

    /// Appends one line (without its `\n`); `cut` is how many bytes the splitter discarded.
    /// Written to disk at the latest on the next `flush()`.
    pub fn write_line(&mut self, stream: Stream, line: &[u8], cut: usize) {
        self.write_line_at(stream, line, cut, Instant::now());
    }

    pub fn flush(&mut self) {
        self.flush_at(Instant::now());
    }

    /// Like `flush`, but tries to reopen a closed file even before its retry is due: the last
    /// chance for held lines (the writer is going away).
    fn flush_final(&mut self) {
        let now = Instant::now();
        if self.file.is_none() && !self.pending.is_empty() {
            self.try_open(now, true);
        }
        self.flush_at(now);
        if self.file.is_none() && self.pending_lines > 0 {
            self.drop_lines(self.pending_lines);
            self.pending_lines = 0;
            self.pending.clear();
        }
    }

    /// Lines lost since open (disk full, file not openable, …).
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Lines dropped since the last report, returned once writing works again, so the caller
    /// emits one event per episode.
    pub fn take_dropped_report(&mut self) -> Option<u64> {
        if self.healthy && self.unreported > 0 {
            Some(std::mem::take(&mut self.unreported))
        } else {
            None
        }
    }

    /// Bytes written to disk since open, across rotations.
    /// Also adds every byte written to `counter` (shared by all agents' writers).
    pub fn count_into(&mut self, counter: prometheus_client::metrics::counter::Counter) {
        self.counter = Some(counter);
    }

    pub fn bytes_written(&self) -> u64 {
        self.bytes_written
    }

    /// Test hook: make every write fail as if the disk were full.
    #[doc(hidden)]
    pub fn set_fail_writes(&mut self, fail: bool) {
        self.fail_writes = fail;
    }

    /// Flushes and waits for this writer's background compressions, so nothing writes into
    /// the log directory afterwards (a purge that follows cannot race a late `.gz`).
    /// Blocking: call it off the async runtime.
    pub fn close(mut self) {
        self.flush_final();
        for h in std::mem::take(&mut self.compressors) {
            let _ = h.join();
        }
    }

    /// Test/bench hook: background compressions still running.
    #[doc(hidden)]
    pub fn compressions_running(&mut self) -> usize {
        self.compressors.retain(|h| !h.is_finished());
        self.compressors.len()
    }

    fn write_line_at(&mut self, stream: Stream, line: &[u8], cut: usize, now: Instant) {
        if self.file.is_none() {
            self.try_open(now, false);
        }
        // Rotate before the line that would pass the bound, so files stay within max_bytes
        // (unless one line alone is larger). While closed, lines are only held (see
        // `flush_at`), and the size is known again once reopened.
        let line_len = (30 + line.len() + if cut > 0 { 24 } else { 0 }) as u64;
        let cur = self.size + self.pending.len() as u64;
        if self.file.is_some()
            && cur > 0
            && cur + line_len > self.max_bytes
            && self.rotate_retry_at.is_none_or(|t| now >= t)
        {
            self.flush_at(now);
            if self.file.is_some() {
                self.rotate(now);
            }
        }
        self.format_line(stream, line, cut);
        self.pending_lines += 1;
        if self.pending.len() >= FLUSH_AT {
            self.flush_at(now);
        }
    }

    fn format_line(&mut self, stream: Stream, line: &[u8], cut: usize) {
        let since = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let secs = since.as_secs();
        if secs != self.ts_secs {
            self.ts_secs = secs;
            self.ts_prefix = format_prefix(secs);
        }
        let ms = since.subsec_millis();
        let p = &mut self.pending;
        p.extend_from_slice(&self.ts_prefix);
        p.extend_from_slice(&[
            b'.',
            b'0' + (ms / 100) as u8,
            b'0' + (ms / 10 % 10) as u8,
            b'0' + (ms % 10) as u8,
            b'Z',
            b' ',
        ]);
        p.extend_from_slice(stream.as_str().as_bytes());
        p.push(b' ');
        p.extend_from_slice(String::from_utf8_lossy(line).as_bytes());
        if cut > 0 {
            let _ = write!(p, " …[cut {cut} bytes]");
        }
        p.push(b'\n');
    }

    /// Writes the held lines. While the file is closed after a failure, lines are held (at
    /// most `FLUSH_AT` bytes) until the retry is due or the hold is full; only lines whose
    /// write was attempted and failed are dropped, so lines an agent prints after space came
    /// back are kept even inside the retry pause.
    fn flush_at(&mut self, now: Instant) {
        if self.pending.is_empty() {
            return;
        }
        if self.file.is_none() {
            let hold_full = self.pending.len() >= FLUSH_AT;
            if !self.try_open(now, hold_full) && !hold_full {
                return; // keep holding until the retry is due
            }
        }
        let res = match self.file.as_mut() {
            None => Err(io::Error::from(io::ErrorKind::NotConnected)),
            Some(_) if self.fail_writes => Err(io::Error::from_raw_os_error(libc::ENOSPC)),
            Some(f) => f.write_all(&self.pending),
        };
        match res {
            Ok(()) => {
                let n = self.pending.len() as u64;
                self.size += n;
                self.bytes_written += n;
                if let Some(c) = &self.counter {
                    c.inc_by(n);
                }
                self.healthy = true;
            }
            Err(_) => {
                self.drop_lines(self.pending_lines);
                self.close_after_failure(now);
            }
        }
        self.pending_lines = 0;
        // Idle agents far outnumber busy ones: a busy one pays one allocation per batch.
        if self.pending.capacity() > KEEP_CAPACITY {
            self.pending = Vec::new();
        } else {
            self.pending.clear();
        }
    }

    fn drop_lines(&mut self, n: u64) {
        self.dropped += n;
        self.unreported += n;
        if n > 0 {
            self.healthy = false;
        }
    }

    fn close_after_failure(&mut self, now: Instant) {
        self.file = None;
        self.retry_at = Some(now + RETRY_AFTER);
    }

    /// Opens the file unless a retry is not yet due (`force` ignores that). Returns whether it
    /// is open.
    fn try_open(&mut self, now: Instant, force: bool) -> bool {
        if self.file.is_some() {
            return true;
        }
        if !force && self.retry_at.is_some_and(|t| now < t) {
            return false;
        }
        match open_append(&self.path) {
            Ok(f) => {
                self.size = f.metadata().map(|m| m.len()).unwrap_or(0);
                // A write cut short by a crash or a full disk left a torn last line: end it,
                // so the next line starts on its own.
                let mut last = [0u8; 1];
                if self.size > 0
                    && f.read_at(&mut last, self.size - 1).ok() == Some(1)
                    && last[0] != b'\n'
                {
                    self.pending.insert(0, b'\n');
                }
                self.file = Some(f);
                self.retry_at = None;
                true
            }
            Err(_) => {
                self.healthy = false;
                self.close_after_failure(now);
                false
            }
        }
    }

    /// `agent.log` → `.1`, `.N[.gz]` → `.N+1[.gz]`, the oldest beyond `keep` deleted; then a
    /// fresh current file and a background gzip of `.1`.
    fn rotate(&mut self, now: Instant) {
        self.file = None;
        let slot = self.slot.clone();
        let mut generation = slot.lock().unwrap_or_else(|p| p.into_inner());
        let mut source = None;
        if self.keep == 0 {
            if let Err(e) = fs::remove_file(&self.path) {
                if e.kind() != io::ErrorKind::NotFound {
                    self.rotate_retry_at = Some(now + RETRY_AFTER);
                }
            }
        } else {
            for i in (1..=self.keep).rev() {
                for gz in [false, true] {
                    let from = archive_path(&self.path, i, gz);
                    let res = if i == self.keep {
                        fs::remove_file(&from)
                    } else {
                        fs::rename(&from, archive_path(&self.path, i + 1, gz))
                    };
                    // Missing archives are normal (fewer rotations so far, or pruned).
                    let _ = res;
                }
            }
            let first = archive_path(&self.path, 1, false);
            match fs::rename(&self.path, &first) {
                Ok(()) => source = File::open(&first).ok(),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                // Cannot rename: keep appending to the same file, try again later.
                Err(_) => self.rotate_retry_at = Some(now + RETRY_AFTER),
            }
        }
        *generation += 1;
        let gen_now = *generation;
        drop(generation);
        if let Some(src) = source {
            self.spawn_compressor(src, gen_now);
        }
        self.size = 0;
        self.try_open(now, true);
    }

    fn spawn_compressor(&mut self, src: File, generation: u64) {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        self.compressors.retain(|h| !h.is_finished());
        let mut tmp = self.path.as_os_str().to_owned();
        tmp.push(format!(
            ".gz-tmp-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let job = CompressJob {
            src,
            tmp: PathBuf::from(tmp),
            path: self.path.clone(),
            keep: self.keep,
            generation,
            slot: self.slot.clone(),
        };
        // If no thread can be started the archive simply stays uncompressed.
        if let Ok(h) = std::thread::Builder::new()
            .name("fleet-log-gzip".into())
            .spawn(move || job.run())
        {
            self.compressors.push(h);
        }
    }
}

impl Drop for LogWriter {
    fn drop(&mut self) {
        self.flush_final();
    }
}

fn open_append(path: &Path) -> io::Result<File> {
    let mut opts = OpenOptions::new();
    // Agent output can carry secrets: owner-only, like OpenClaw's own log. The log sits
    // outside the agent's HOME (`AgentPaths::daemon_log_dir`), yet a FIFO or a link in its
    // place (a restored backup, an older layout) must never block or redirect the daemon.
    opts.read(true)
        .append(true)
        .create(true)
        .mode(0o600)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW | libc::O_NOCTTY);
    let f = match opts.open(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            if let Some(dir) = path.parent() {
                fs::create_dir_all(dir)?;
            }
            opts.open(path)
        }
        other => other,
    }?;
    if !f.metadata()?.is_file() {
        return Err(io::Error::other(format!(
            "{} is not a regular file",
            path.display()
        )));
    }
    Ok(f)
}

fn format_prefix(secs: u64) -> [u8; 19] {
    let mut out = [b'0'; 19];
    let Ok(dt) = time::OffsetDateTime::from_unix_timestamp(secs as i64) else {
        return out;
    };
    let s = format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}",
        dt.year(),
        dt.month() as u8,
        dt.day(),
        dt.hour(),
        dt.minute(),
        dt.second()
    );
    if s.len() == out.len() {
        out.copy_from_slice(s.as_bytes());
    }
    out
}

/// Gzips one freshly rotated archive into a temp file, then (under the path's slot lock)
/// renames it to wherever the archive sits now and deletes the uncompressed one.
struct CompressJob {
    src: File,
    tmp: PathBuf,
    path: PathBuf,
    keep: u32,
    generation: u64,
    slot: Slot,
}

impl CompressJob {
    fn run(self) {
        if self.compress().is_err() {
            let _ = fs::remove_file(&self.tmp);
            return;
        }
        let guard = self.slot.lock().unwrap_or_else(|p| p.into_inner());
        let index = 1 + (*guard - self.generation);
        if index > self.keep as u64 {
            // Shifted out and deleted while being compressed.
            let _ = fs::remove_file(&self.tmp);
            return;
        }
        let index = index as u32;
        if fs::rename(&self.tmp, archive_path(&self.path, index, true)).is_ok() {
            let _ = fs::remove_file(archive_path(&self.path, index, false));
        } else {
            let _ = fs::remove_file(&self.tmp);
        }
        drop(guard);
    }

    fn compress(&self) -> io::Result<()> {
        let out = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&self.tmp)?;
        // Level 1: logs still shrink several times, and this runs on a busy 2-core host.
        let mut enc = GzEncoder::new(
            BufWriter::with_capacity(64 * 1024, out),
            Compression::fast(),
        );
        io::copy(
            &mut BufReader::with_capacity(64 * 1024, &self.src),
            &mut enc,
        )?;
        let file = enc.finish()?.into_inner().map_err(|e| e.into_error())?;
        // Retention judges an archive by its age: that of its last line, not of its gzip.
        if let Ok(t) = self.src.metadata().and_then(|m| m.modified()) {
            let _ = file.set_modified(t);
        }
        // The uncompressed copy is deleted next: the gzip must be on disk first.
        file.sync_all()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logs::tail::{last_lines, log_files};

    fn split_all(chunks: &[&[u8]]) -> (Vec<(Vec<u8>, usize)>, LineSplitter) {
        let mut s = LineSplitter::new();
        let mut got = Vec::new();
        for c in chunks {
            s.push(c, &mut |l: &[u8], cut| got.push((l.to_vec(), cut)));
        }
        (got, s)
    }

    fn read_text(path: &Path) -> String {
        String::from_utf8(fs::read(path).unwrap()).unwrap()
    }

    /// Waits (bounded) for `cond`, returning what it last saw on failure.
    fn wait_for(what: &str, mut cond: impl FnMut() -> (bool, String)) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let (ok, seen) = cond();
            if ok {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; last saw {seen}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn dir_names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn splitter_joins_lines_split_over_chunks() {
        let (got, mut s) = split_all(&[b"ab", b"c\nde", b"f", b"\n\ng", b"h"]);
        let lines: Vec<&[u8]> = got.iter().map(|(l, _)| l.as_slice()).collect();
        assert_eq!(lines, vec![&b"abc"[..], b"def", b""]);
        assert!(got.iter().all(|(_, cut)| *cut == 0));
        let mut tail = Vec::new();
        s.finish(&mut |l: &[u8], cut| tail.push((l.to_vec(), cut)));
        assert_eq!(tail, vec![(b"gh".to_vec(), 0)]);
        // Nothing left to flush a second time.
        s.finish(&mut |l: &[u8], _| panic!("unexpected line {l:?}"));
    }

    #[test]
    fn splitter_keeps_cr_of_crlf_as_content() {
        let (got, _) = split_all(&[b"one\r\ntw", b"o\r", b"\n"]);
        assert_eq!(got, vec![(b"one\r".to_vec(), 0), (b"two\r".to_vec(), 0)]);
    }

    #[test]
    fn splitter_cuts_a_megabyte_line_with_bounded_memory() {
        let total = 1024 * 1024;
        let mut s = LineSplitter::new();
        let mut got = Vec::new();
        let chunk = vec![b'x'; 4096];
        let mut max_cap = 0;
        for _ in 0..total / chunk.len() {
            s.push(&chunk, &mut |l: &[u8], cut| got.push((l.len(), cut)));
            max_cap = max_cap.max(s.buf.capacity());
        }
        s.push(b"\nnext\n", &mut |l: &[u8], cut| got.push((l.len(), cut)));
        assert!(max_cap <= MAX_LINE_BYTES, "splitter held {max_cap} bytes");
        assert_eq!(got, vec![(MAX_LINE_BYTES, total - MAX_LINE_BYTES), (4, 0)]);
        // Memory of the long line is released once it is done.
        assert!(
            s.buf.capacity() <= KEEP_CAPACITY,
            "kept {}",
            s.buf.capacity()
        );

        // The same line arriving in one chunk is cut without buffering at all.
        let mut one = vec![b'y'; total];
        one.push(b'\n');
        let (got, s) = split_all(&[&one]);
        assert_eq!(got.len(), 1);
        assert_eq!(
            (got[0].0.len(), got[0].1),
            (MAX_LINE_BYTES, total - MAX_LINE_BYTES)
        );
        assert_eq!(s.buf.capacity(), 0);
    }

    #[test]
    fn splitter_flushes_a_cut_trailing_partial_at_finish() {
        let long = vec![b'z'; MAX_LINE_BYTES + 10];
        let (got, mut s) = split_all(&[&long]);
        assert!(got.is_empty());
        let mut tail = Vec::new();
        s.finish(&mut |l: &[u8], cut| tail.push((l.len(), cut)));
        assert_eq!(tail, vec![(MAX_LINE_BYTES, 10)]);
    }

    #[test]
    fn writer_formats_timestamp_stream_lossy_text_and_cut_marker() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("logs/agent.log");
        let mut w = LogWriter::open(path.clone(), 1 << 20, 2);
        w.write_line(Stream::Out, b"hello", 0);
        w.write_line(Stream::Err, b"bad \xff\xfe end", 0);
        w.write_line(Stream::Out, b"abc", 7);
        w.flush();
        let text = read_text(&path);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text:?}");
        for l in &lines {
            let b = l.as_bytes();
            // 2026-01-02T03:04:05.678Z
            let digits = [0, 1, 2, 3, 5, 6, 8, 9, 11, 12, 14, 15, 17, 18, 20, 21, 22];
            assert!(digits.iter().all(|&i| b[i].is_ascii_digit()), "{l}");
            assert_eq!(
                (b[4], b[7], b[10], b[13], b[16], b[19]),
                (b'-', b'-', b'T', b':', b':', b'.'),
                "{l}"
            );
            assert_eq!(&l[23..25], "Z ", "{l}");
        }
        assert_eq!(&lines[0][25..], "out hello");
        assert_eq!(&lines[1][25..], "err bad \u{FFFD}\u{FFFD} end");
        assert_eq!(&lines[2][25..], "out abc …[cut 7 bytes]");
        assert_eq!(w.bytes_written(), text.len() as u64);
        assert_eq!(w.dropped(), 0);
        assert_eq!(w.take_dropped_report(), None);
    }

    #[test]
    fn rotation_keeps_exactly_keep_gz_archives_readable_by_last_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.log");
        let max = 2048;
        let mut w = LogWriter::open(path.clone(), max, 3);
        let total = 400;
        for i in 0..total {
            w.write_line(
                Stream::Out,
                format!("line {i:05} {}", "p".repeat(80)).as_bytes(),
                0,
            );
            w.flush();
        }
        drop(w);
        wait_for("compression to finish", || {
            let names = dir_names(dir.path());
            let done = names
                == [
                    "agent.log",
                    "agent.log.1.gz",
                    "agent.log.2.gz",
                    "agent.log.3.gz",
                ];
            (done, format!("{names:?}"))
        });
        for f in log_files(&path) {
            let len = fs::metadata(&f).unwrap().len();
            if f == path {
                assert!(len > 0 && len <= max, "current file is {len} bytes");
            }
        }
        let all = last_lines(&path, 10_000).unwrap();
        // Oldest first, contiguous, ending with the last line written.
        let nums: Vec<usize> = all.iter().map(|l| l[34..39].parse().unwrap()).collect();
        assert_eq!(
            *nums.last().unwrap(),
            total - 1,
            "{:?}",
            &all[all.len() - 1]
        );
        assert!(nums.windows(2).all(|w| w[1] == w[0] + 1), "{nums:?}");
        // Four files of at most 2048 bytes with ~115-byte lines: 17 lines each at most.
        assert!(
            nums.len() > 3 * 15 && nums.len() <= 4 * 17,
            "{} lines",
            nums.len()
        );
        let last3 = last_lines(&path, 3).unwrap();
        assert_eq!(last3[..], all[all.len() - 3..]);
    }

    #[test]
    fn keep_zero_rotates_without_archives() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.log");
        let mut w = LogWriter::open(path.clone(), 1024, 0);
        for i in 0..100 {
            w.write_line(
                Stream::Err,
                format!("{i:04} {}", "q".repeat(60)).as_bytes(),
                0,
            );
        }
        w.flush();
        assert_eq!(dir_names(dir.path()), ["agent.log"]);
        assert!(fs::metadata(&path).unwrap().len() <= 1024);
        assert!(read_text(&path).ends_with(&format!("0099 {}\n", "q".repeat(60))));
    }

    #[test]
    fn write_failure_drops_counts_reports_once_and_recovers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.log");
        let mut w = LogWriter::open(path.clone(), 1 << 20, 2);
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);

        w.write_line_at(Stream::Out, b"before", 0, at(0));
        w.flush_at(at(0));
        w.set_fail_writes(true);
        w.write_line_at(Stream::Out, b"lost 1", 0, at(10));
        w.write_line_at(Stream::Out, b"lost 2", 0, at(10));
        w.flush_at(at(10));
        assert_eq!(w.dropped(), 2);
        assert_eq!(w.take_dropped_report(), None, "no report while failing");
        assert!(w.file.is_none(), "file stays open after a failed write");

        // Within the second: held without touching the disk.
        w.write_line_at(Stream::Out, b"lost 3", 0, at(500));
        w.flush_at(at(500));
        assert!(w.file.is_none() && w.retry_at == Some(at(1010)));
        assert_eq!(w.dropped(), 2, "a held line is not lost yet");
        // Retry due, disk still full: one attempt, the held lines go, next retry a second later.
        w.write_line_at(Stream::Out, b"lost 4", 0, at(1100));
        w.flush_at(at(1100));
        assert_eq!(w.dropped(), 4);
        assert_eq!(w.retry_at, Some(at(2100)));
        // Space is back before the retry is due: the line is held, not dropped.
        w.set_fail_writes(false);
        w.write_line_at(Stream::Out, b"held 5", 0, at(1500));
        w.flush_at(at(1500));
        assert_eq!(w.dropped(), 4);
        assert_eq!(w.take_dropped_report(), None);

        // The retry is due: it recovers by itself and writes what it held.
        w.write_line_at(Stream::Out, b"after", 0, at(2200));
        w.flush_at(at(2200));
        assert_eq!(w.take_dropped_report(), Some(4));
        assert_eq!(w.take_dropped_report(), None, "one report per episode");
        assert_eq!(w.dropped(), 4);
        let text = read_text(&path);
        let bodies: Vec<&str> = text.lines().map(|l| &l[25..]).collect();
        assert_eq!(
            bodies,
            ["out before", "out held 5", "out after"],
            "{text:?}"
        );
    }

    #[test]
    fn a_full_hold_is_attempted_before_the_retry_is_due() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.log");
        let mut w = LogWriter::open(path.clone(), 1 << 30, 2);
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        w.set_fail_writes(true);
        w.write_line_at(Stream::Out, b"x", 0, at(0));
        w.flush_at(at(0));
        assert_eq!(w.dropped(), 1);
        w.set_fail_writes(false);
        // A flood inside the retry pause: the hold fills and is written at once, not dropped.
        let line = vec![b'f'; 1000];
        let n = 2 * FLUSH_AT / line.len();
        for _ in 0..n {
            w.write_line_at(Stream::Out, &line, 0, at(100));
        }
        assert!(w.file.is_some(), "reopened when the hold filled");
        assert!(w.pending.len() < FLUSH_AT);
        drop(w);
        let text = read_text(&path);
        assert_eq!(text.lines().count(), n);
    }

    #[test]
    fn drop_writes_held_lines_when_the_disk_is_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.log");
        let mut w = LogWriter::open(path.clone(), 1 << 30, 2);
        w.set_fail_writes(true);
        w.write_line(Stream::Out, b"lost", 0);
        w.flush();
        w.set_fail_writes(false);
        w.write_line(Stream::Err, b"held", 0);
        w.flush();
        assert_eq!(w.dropped(), 1);
        w.close();
        let text = read_text(&path);
        let bodies: Vec<&str> = text.lines().map(|l| &l[25..]).collect();
        assert_eq!(bodies, ["err held"], "{text:?}");
    }

    #[test]
    fn reopen_ends_a_torn_last_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.log");
        fs::write(&path, "complete\ntorn wri").unwrap();
        let mut w = LogWriter::open(path.clone(), 1 << 20, 2);
        w.write_line(Stream::Out, b"fresh", 0);
        w.flush();
        let text = read_text(&path);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[..2], ["complete", "torn wri"]);
        assert_eq!(&lines[2][25..], "out fresh");
    }

    #[test]
    fn splitter_and_writer_sanity_many_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.log");
        let mut w = LogWriter::open(path.clone(), 1 << 30, 1);
        let mut s = LineSplitter::new();
        let mut input = Vec::new();
        for i in 0..1000 {
            input.extend_from_slice(format!("row {i}\n").as_bytes());
        }
        for chunk in input.chunks(777) {
            s.push(chunk, &mut |l: &[u8], cut| {
                w.write_line(Stream::Out, l, cut)
            });
            w.flush();
        }
        s.finish(&mut |l: &[u8], cut| w.write_line(Stream::Out, l, cut));
        w.flush();
        let text = read_text(&path);
        assert_eq!(w.bytes_written(), text.len() as u64);
        let rows: Vec<String> = text.lines().map(|l| l[29..].to_string()).collect();
        let want: Vec<String> = (0..1000).map(|i| format!("row {i}")).collect();
        assert_eq!(rows, want);
    }
}
