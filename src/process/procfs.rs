//! TEMPORARY minimal /proc reader; replaced by the full module on merge.

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcInfo {
    pub pid: u32,
    pub ppid: u32,
    pub pgid: u32,
    pub sid: u32,
    pub start_time: u64,
    pub state: char,
    pub comm: String,
    pub utime: u64,
    pub stime: u64,
    pub rss_pages: u64,
}

pub fn parse_stat(pid: u32, text: &str) -> Option<ProcInfo> {
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let comm = text[open + 1..close].to_string();
    let f: Vec<&str> = text[close + 2..].split(' ').collect();
    Some(ProcInfo {
        pid,
        state: f.first()?.chars().next()?,
        ppid: f.get(1)?.parse().ok()?,
        pgid: f.get(2)?.parse().ok()?,
        sid: f.get(3)?.parse().ok()?,
        utime: f.get(11)?.parse().ok()?,
        stime: f.get(12)?.parse().ok()?,
        start_time: f.get(19)?.parse().ok()?,
        rss_pages: f.get(21)?.parse().ok()?,
        comm,
    })
}

pub fn read_proc(pid: u32) -> Option<ProcInfo> {
    let t = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(pid, &t)
}

pub fn scan() -> Vec<ProcInfo> {
    let mut v = Vec::new();
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            if let Some(pid) = e.file_name().to_str().and_then(|s| s.parse().ok()) {
                if let Some(p) = read_proc(pid) {
                    v.push(p);
                }
            }
        }
    }
    v
}

pub fn descendants(root: u32, procs: &[ProcInfo]) -> Vec<ProcInfo> {
    let mut out: Vec<ProcInfo> = Vec::new();
    let mut frontier = vec![root];
    while let Some(p) = frontier.pop() {
        for c in procs.iter().filter(|c| c.ppid == p) {
            if !out.iter().any(|o| o.pid == c.pid) {
                out.push(c.clone());
                frontier.push(c.pid);
            }
        }
    }
    out
}

pub fn is_same_process(pid: u32, start_time: u64) -> bool {
    read_proc(pid).is_some_and(|p| p.start_time == start_time && p.state != 'Z')
}

pub fn with_env_marker(procs: &[ProcInfo], key: &str, value_prefix: &str) -> Vec<ProcInfo> {
    let needle = format!("{key}={value_prefix}");
    procs
        .iter()
        .filter(|p| {
            std::fs::read(format!("/proc/{}/environ", p.pid))
                .map(|b| {
                    b.split(|c| *c == 0)
                        .any(|kv| kv.starts_with(needle.as_bytes()))
                })
                .unwrap_or(false)
        })
        .cloned()
        .collect()
}
