//! TEMPORARY minimal writer; replaced by the full module on merge.
use std::io::Write;
use std::path::PathBuf;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stream {
    Out,
    Err,
}
pub const MAX_LINE_BYTES: usize = 16 * 1024;

#[derive(Default)]
pub struct LineSplitter {
    buf: Vec<u8>,
}
impl LineSplitter {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn push(&mut self, chunk: &[u8], out: &mut impl FnMut(&[u8], usize)) {
        for &b in chunk {
            if b == b'\n' {
                out(&self.buf, 0);
                self.buf.clear();
            } else if self.buf.len() < MAX_LINE_BYTES {
                self.buf.push(b);
            }
        }
    }
    pub fn finish(&mut self, out: &mut impl FnMut(&[u8], usize)) {
        if !self.buf.is_empty() {
            out(&self.buf, 0);
            self.buf.clear();
        }
    }
}

pub struct LogWriter {
    path: PathBuf,
    file: Option<std::fs::File>,
    dropped: u64,
}
impl LogWriter {
    pub fn open(path: PathBuf, _max_bytes: u64, _keep: u32) -> Self {
        LogWriter {
            path,
            file: None,
            dropped: 0,
        }
    }
    pub fn write_line(&mut self, stream: Stream, line: &[u8], _cut: usize) {
        if self.file.is_none() {
            self.file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)
                .ok();
        }
        let tag = if stream == Stream::Out { "out" } else { "err" };
        match &mut self.file {
            Some(f) => {
                let _ = writeln!(f, "{} {}", tag, String::from_utf8_lossy(line));
            }
            None => self.dropped += 1,
        }
    }
    pub fn flush(&mut self) {}
    pub fn take_dropped_report(&mut self) -> Option<u64> {
        None
    }
}
