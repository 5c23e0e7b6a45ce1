//! What the bench observes from outside every supervisor alike: a blocking `GET /healthz` of
//! a loopback port, /proc readings (RSS, PSS, CPU ticks, open fds, the children of a
//! workload found by program and port), and percentiles. No supervisor-specific code here.

use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// `true` when `GET /healthz` on 127.0.0.1:`port` answers 200 within `timeout`.
pub fn healthz(port: u16, timeout: Duration) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let Ok(mut s) = TcpStream::connect_timeout(&addr, timeout) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(timeout));
    let _ = s.set_write_timeout(Some(timeout));
    let _ = s.set_nodelay(true);
    let req =
        format!("GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n");
    if s.write_all(req.as_bytes()).is_err() {
        return false;
    }
    let mut buf = [0u8; 64];
    let mut got = 0;
    // The status line is all we need; stop reading once it is in.
    while got < 12 {
        match s.read(&mut buf[got..]) {
            Ok(0) | Err(_) => break,
            Ok(n) => got += n,
        }
    }
    got >= 12 && (buf.starts_with(b"HTTP/1.1 200") || buf.starts_with(b"HTTP/1.0 200"))
}

/// One reading of a process's memory, in bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Mem {
    pub rss: u64,
    pub pss: u64,
}

impl std::ops::Add for Mem {
    type Output = Mem;
    fn add(self, o: Mem) -> Mem {
        Mem {
            rss: self.rss + o.rss,
            pss: self.pss + o.pss,
        }
    }
}

/// VmRSS from /proc/<pid>/status and Pss from /proc/<pid>/smaps_rollup (0 when unreadable).
pub fn mem(pid: u32) -> Mem {
    let field = |path: String, key: &str| -> u64 {
        std::fs::read_to_string(path)
            .ok()
            .and_then(|t| {
                t.lines()
                    .find(|l| l.starts_with(key))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|v| v.parse::<u64>().ok())
            })
            .map(|kib| kib * 1024)
            .unwrap_or(0)
    };
    Mem {
        rss: field(format!("/proc/{pid}/status"), "VmRSS:"),
        pss: field(format!("/proc/{pid}/smaps_rollup"), "Pss:"),
    }
}

/// Sum of `mem` over `pids`.
pub fn mem_sum(pids: &[u32]) -> Mem {
    pids.iter()
        .map(|&p| mem(p))
        .fold(Mem::default(), |a, b| a + b)
}

/// utime + stime of `pid` in clock ticks, with its threads (None when it is gone).
pub fn cpu_ticks(pid: u32) -> Option<u64> {
    let t = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which may hold spaces, start after the last ')'.
    let rest = &t[t.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest[0] is field 3 (state); utime is field 14, stime field 15.
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

pub fn clock_ticks_per_sec() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as u64
    } else {
        100
    }
}

/// Open file descriptors of `pid`.
pub fn fd_count(pid: u32) -> Option<usize> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count())
}

/// Threads of `pid`.
pub fn thread_count(pid: u32) -> Option<usize> {
    Some(std::fs::read_dir(format!("/proc/{pid}/task")).ok()?.count())
}

/// `true` while `pid` exists and is not a zombie (a zombie has closed its sockets already).
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(t) => match t.rfind(')') {
            Some(i) => !matches!(t.as_bytes().get(i + 2), Some(b'Z') | Some(b'X')),
            None => false,
        },
        Err(_) => false,
    }
}

/// Parent pid of `pid`.
pub fn ppid(pid: u32) -> Option<u32> {
    let t = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &t[t.rfind(')')? + 2..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// argv[0] of `pid`.
pub fn argv0(pid: u32) -> Option<String> {
    let c = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let first = c.split(|&b| b == 0).next()?;
    Some(String::from_utf8_lossy(first).into_owned())
}

fn env_value(pid: u32, key: &str) -> Option<String> {
    let e = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    let prefix = format!("{key}=");
    e.split(|&b| b == 0)
        .find(|kv| kv.starts_with(prefix.as_bytes()))
        .map(|kv| String::from_utf8_lossy(&kv[prefix.len()..]).into_owned())
}

fn all_pids() -> Vec<u32> {
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect()
}

/// Children of the workload: live processes whose argv[0] is `program` and whose
/// `OPENCLAW_GATEWAY_PORT` is one of `ports`, as port → pid. Works for every supervisor, since
/// it asks only the kernel.
pub fn workload(program: &str, ports: &HashSet<u16>) -> HashMap<u16, u32> {
    let mut out = HashMap::new();
    for pid in all_pids() {
        if argv0(pid).as_deref() != Some(program) || !alive(pid) {
            continue;
        }
        if let Some(p) = env_value(pid, "OPENCLAW_GATEWAY_PORT").and_then(|v| v.parse().ok()) {
            if ports.contains(&p) {
                out.insert(p, pid);
            }
        }
    }
    out
}

/// Direct children of `parent` (by /proc scan).
pub fn children_of(parent: u32) -> Vec<u32> {
    all_pids()
        .into_iter()
        .filter(|&p| ppid(p) == Some(parent))
        .collect()
}

/// How many processes exist on the host (for the pids limit).
pub fn process_count() -> usize {
    all_pids().len()
}

/// p50 / p99 / max of a sample set, in the unit given.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Pctl {
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
    pub n: usize,
}

/// Nearest-rank percentiles; None for an empty set.
pub fn percentiles(samples: &[f64]) -> Option<Pctl> {
    if samples.is_empty() {
        return None;
    }
    let mut s = samples.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let rank = |q: f64| {
        let i = ((q * s.len() as f64).ceil() as usize).clamp(1, s.len()) - 1;
        s[i]
    };
    Some(Pctl {
        p50: rank(0.50),
        p99: rank(0.99),
        max: s[s.len() - 1],
        n: s.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        let p = percentiles(&v).unwrap();
        assert_eq!((p.p50, p.p99, p.max, p.n), (50.0, 99.0, 100.0, 100));
        let p = percentiles(&[7.0, 3.0]).unwrap();
        assert_eq!((p.p50, p.p99), (3.0, 7.0));
        assert!(percentiles(&[]).is_none());
    }

    #[test]
    fn own_process_is_readable() {
        let me = std::process::id();
        assert!(mem(me).rss > 0);
        assert!(cpu_ticks(me).is_some());
        assert!(alive(me));
        assert!(fd_count(me).unwrap() > 0);
    }
}
