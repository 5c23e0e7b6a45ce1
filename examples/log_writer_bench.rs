//! Throughput of the agent log path: 200 MB of 100-byte lines through `LineSplitter` and
//! `LogWriter` (max_bytes 10 MiB, keep 5, gzip in the background), in a temp directory.
//! Prints MB/s of input. Not a test: no thresholds.

use std::time::{Duration, Instant};

use fleet_commander::logs::writer::{LineSplitter, LogWriter, Stream};

fn main() {
    const TOTAL: usize = 200 * 1000 * 1000;
    const LINE: usize = 100;
    const CHUNK: usize = 64 * 1024; // what one pipe read typically returns under load

    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("agent.log");
    let mut writer = LogWriter::open(path.clone(), 10 * 1024 * 1024, 5);
    let mut splitter = LineSplitter::new();

    // A chunk of whole 100-byte lines, so chunk borders fall mid-line like real pipe reads.
    let mut line = vec![b'a'; LINE - 1];
    line.push(b'\n');
    let pattern: Vec<u8> = line.iter().copied().cycle().take(CHUNK + LINE).collect();

    let start = Instant::now();
    let mut fed = 0usize;
    let mut offset = 0usize;
    while fed < TOTAL {
        let n = CHUNK.min(TOTAL - fed);
        let chunk = &pattern[offset..offset + n];
        splitter.push(chunk, &mut |l: &[u8], cut| {
            writer.write_line(Stream::Out, l, cut)
        });
        writer.flush();
        fed += n;
        offset = (offset + n) % LINE;
    }
    splitter.finish(&mut |l: &[u8], cut| writer.write_line(Stream::Out, l, cut));
    writer.flush();
    let hot = start.elapsed();

    let deadline = Instant::now() + Duration::from_secs(120);
    while writer.compressions_running() > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let all = start.elapsed();

    let mb = fed as f64 / 1e6;
    println!(
        "input {mb:.0} MB, written {:.0} MB, dropped {} lines",
        writer.bytes_written() as f64 / 1e6,
        writer.dropped()
    );
    println!(
        "hot path: {:.2} s = {:.0} MB/s; including background gzip: {:.2} s = {:.0} MB/s",
        hot.as_secs_f64(),
        mb / hot.as_secs_f64(),
        all.as_secs_f64(),
        mb / all.as_secs_f64()
    );
    let mut files: Vec<(String, u64)> = std::fs::read_dir(dir.path())
        .expect("read dir")
        .flatten()
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                e.metadata().map(|m| m.len()).unwrap_or(0),
            )
        })
        .collect();
    files.sort();
    for (name, len) in files {
        println!("  {name}: {len} bytes");
    }
}
