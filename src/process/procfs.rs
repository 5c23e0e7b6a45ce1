//! Reading /proc: process table scans, process trees, identity checks (pid + start time),
//! environment markers, memory figures and host limits. Plain synchronous functions only; it
//! never signals, spawns or changes anything except this process's own RLIMIT_NOFILE.

use std::fmt::Write as _;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::Serialize;

/// One line of `/proc/<pid>/stat`, reduced to what supervision needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcInfo {
    pub pid: u32,
    pub ppid: u32,
    pub pgid: u32,
    pub sid: u32,
    /// Field 22: clock ticks since boot. Together with the pid it names one process for the
    /// whole uptime of the host, which is what makes a reused pid recognisable.
    pub start_time: u64,
    pub state: char,
    pub comm: String,
    pub utime: u64,
    pub stime: u64,
    pub rss_pages: u64,
}

/// Parses the text of `/proc/<pid>/stat`. The comm field may contain spaces and `)`, so the
/// fixed fields are taken after the *last* `)`.
pub fn parse_stat(pid: u32, text: &str) -> Option<ProcInfo> {
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    if close < open {
        return None;
    }
    let comm = &text[open + 1..close];
    // Fields after the comm, numbered as in proc(5): index 0 here is field 3.
    let mut fields = text[close + 1..].split_ascii_whitespace();
    let mut next = || fields.next();
    let state = next()?.chars().next()?;
    let ppid = next()?.parse().ok()?;
    let pgid = next()?.parse().ok()?;
    let sid = next()?.parse().ok()?;
    // tty_nr, tpgid, flags, minflt, cminflt, majflt, cmajflt (fields 7..=13)
    for _ in 0..7 {
        next()?;
    }
    let utime = next()?.parse().ok()?;
    let stime = next()?.parse().ok()?;
    // cutime, cstime, priority, nice, num_threads, itrealvalue (fields 16..=21)
    for _ in 0..6 {
        next()?;
    }
    let start_time = next()?.parse().ok()?;
    next()?; // vsize
    let rss: i64 = next()?.parse().ok()?;
    Some(ProcInfo {
        pid,
        ppid,
        pgid,
        sid,
        start_time,
        state,
        comm: comm.to_owned(),
        utime,
        stime,
        rss_pages: rss.max(0) as u64,
    })
}

/// Reads a whole file into `buf` (cleared first). /proc files report size 0, so this reads
/// to the end rather than trusting metadata.
fn read_into(path: &Path, buf: &mut String) -> bool {
    buf.clear();
    match std::fs::File::open(path) {
        Ok(mut f) => f.read_to_string(buf).is_ok(),
        Err(_) => false,
    }
}

fn read_bytes_into(path: &Path, buf: &mut Vec<u8>) -> bool {
    buf.clear();
    match std::fs::File::open(path) {
        Ok(mut f) => f.read_to_end(buf).is_ok(),
        Err(_) => false,
    }
}

fn proc_path(pid: u32, file: &str) -> PathBuf {
    PathBuf::from(format!("/proc/{pid}/{file}"))
}

pub fn read_proc(pid: u32) -> Option<ProcInfo> {
    let mut buf = String::with_capacity(512);
    if !read_into(&proc_path(pid, "stat"), &mut buf) {
        return None;
    }
    parse_stat(pid, &buf)
}

/// Every process on the host. A process that exits between listing and reading is skipped
/// silently; so is anything whose stat does not parse.
pub fn scan() -> Vec<ProcInfo> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut out = Vec::with_capacity(1024);
    // One path and one text buffer reused for every process keeps a scan of thousands of
    // processes at one allocation each (the comm).
    let mut path = String::with_capacity(32);
    let mut text = String::with_capacity(512);
    for entry in dir.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        path.clear();
        let _ = write!(path, "/proc/{pid}/stat");
        if !read_into(Path::new(&path), &mut text) {
            continue;
        }
        if let Some(info) = parse_stat(pid, &text) {
            out.push(info);
        }
    }
    out
}

/// Every live process below `roots` (the roots themselves excluded), found by following
/// `/proc/<pid>/task/<tid>/children` down from them: a few reads when the trees are small,
/// where `scan` reads every process on the host. `None` when the kernel does not offer the
/// children files (CONFIG_PROC_CHILDREN) or the first root is gone, so the caller scans.
pub fn subtrees(roots: &[u32]) -> Option<Vec<ProcInfo>> {
    let mut out: Vec<ProcInfo> = Vec::new();
    let mut seen: std::collections::HashSet<u32> = roots.iter().copied().collect();
    let mut queue: Vec<u32> = roots.to_vec();
    let mut text = String::with_capacity(256);
    let mut first = true;
    while let Some(pid) = queue.pop() {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            if first {
                return None;
            }
            continue; // exited meanwhile
        };
        let mut any_children_file = false;
        for task in tasks.flatten() {
            let path = task.path().join("children");
            if !read_into(&path, &mut text) {
                continue;
            }
            any_children_file = true;
            for child in text
                .split_whitespace()
                .filter_map(|c| c.parse::<u32>().ok())
            {
                if seen.insert(child) {
                    if let Some(info) = read_proc(child) {
                        out.push(info);
                        queue.push(child);
                    }
                }
            }
        }
        if first && !any_children_file {
            return None;
        }
        first = false;
    }
    Some(out)
}

/// Transitive children of `root` in `procs` (root itself excluded), parents before children.
/// Follows ppid only, so helpers that moved to their own process group or session are still
/// found as long as their parent is alive. For many roots over one scan, build a `Forest`.
pub fn descendants(root: u32, procs: &[ProcInfo]) -> Vec<ProcInfo> {
    Forest::new(procs).descendants(root)
}

/// One scan indexed by parent: the trees of many roots without re-sorting the table for each
/// (the memory sampler asks for a thousand trees every round).
pub struct Forest<'a> {
    procs: &'a [ProcInfo],
    /// (ppid, index) sorted by ppid: children of any pid are one binary search away.
    by_parent: Vec<(u32, usize)>,
}

impl<'a> Forest<'a> {
    pub fn new(procs: &'a [ProcInfo]) -> Self {
        let mut by_parent: Vec<(u32, usize)> =
            procs.iter().enumerate().map(|(i, p)| (p.ppid, i)).collect();
        by_parent.sort_unstable();
        Forest { procs, by_parent }
    }

    /// Transitive children of `root`, parents before children (root excluded).
    pub fn descendants(&self, root: u32) -> Vec<ProcInfo> {
        self.walk(root).map(|i| self.procs[i].clone()).collect()
    }

    /// `root` (if present) and its descendants.
    pub fn tree(&self, root: u32) -> Vec<&'a ProcInfo> {
        let procs = self.procs;
        procs
            .iter()
            .filter(|p| p.pid == root)
            .chain(self.walk(root).map(|i| &procs[i]))
            .collect()
    }

    fn walk(&self, root: u32) -> impl Iterator<Item = usize> + '_ {
        let mut out = Vec::new();
        let mut frontier = vec![root];
        // Each index is taken at most once, so even a malformed table with a cycle terminates.
        while let Some(parent) = frontier.pop() {
            let start = self.by_parent.partition_point(|&(pp, _)| pp < parent);
            for &(pp, i) in &self.by_parent[start..] {
                if pp != parent {
                    break;
                }
                if out.contains(&i) || self.procs[i].pid == root {
                    continue;
                }
                out.push(i);
                frontier.push(self.procs[i].pid);
            }
        }
        out.into_iter()
    }
}

/// True when `pid` exists, has exactly this start time and is not a zombie: the only safe
/// test before signalling a pid recorded by an earlier daemon.
pub fn is_same_process(pid: u32, start_time: u64) -> bool {
    match read_proc(pid) {
        Some(p) => p.start_time == start_time && p.state != 'Z' && p.state != 'X',
        None => false,
    }
}

/// The value of `key` in a NUL-separated environ block.
fn find_env<'a>(environ: &'a [u8], key: &str) -> Option<&'a [u8]> {
    let key = key.as_bytes();
    environ.split(|&b| b == 0).find_map(|entry| {
        if entry.len() > key.len() && entry.starts_with(key) && entry[key.len()] == b'=' {
            Some(&entry[key.len() + 1..])
        } else {
            None
        }
    })
}

/// Reads `key` from `/proc/<pid>/environ` (the environment the process was exec'd with).
/// None if unreadable (other user, gone) or absent. Measured: for a moment right after
/// `spawn()` returns, environ of the new program reads empty (the kernel sets it up after
/// the parent is released), so do not conclude "not ours" from a process seconds old.
pub fn env_var(pid: u32, key: &str) -> Option<String> {
    let mut buf = Vec::new();
    if !read_bytes_into(&proc_path(pid, "environ"), &mut buf) {
        return None;
    }
    find_env(&buf, key).map(|v| String::from_utf8_lossy(v).into_owned())
}

/// The processes whose environ holds `key` with a value starting with `value_prefix`. This is
/// how a restarted daemon finds agents (and their reparented helpers) it started before.
/// Processes whose environ cannot be read are skipped.
pub fn with_env_marker(procs: &[ProcInfo], key: &str, value_prefix: &str) -> Vec<ProcInfo> {
    let mut path = String::with_capacity(32);
    let mut buf = Vec::with_capacity(4096);
    let mut out = Vec::new();
    for p in procs {
        path.clear();
        let _ = write!(path, "/proc/{}/environ", p.pid);
        if !read_bytes_into(Path::new(&path), &mut buf) {
            continue;
        }
        if find_env(&buf, key).is_some_and(|v| v.starts_with(value_prefix.as_bytes())) {
            out.push(p.clone());
        }
    }
    out
}

/// The value of a `Name:   123 kB` line, in bytes.
fn kb_field(text: &str, name: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(name)?.strip_prefix(':')?;
        let mut parts = rest.split_ascii_whitespace();
        let value: u64 = parts.next()?.parse().ok()?;
        match parts.next() {
            Some("kB") => Some(value * 1024),
            None => Some(value),
            Some(_) => None,
        }
    })
}

/// VmRSS of one process in bytes (None for kernel threads and vanished processes).
/// Tasks (threads) whose real uid is `uid`: what RLIMIT_NPROC counts.
pub fn tasks_of_uid(uid: u32) -> u64 {
    let mut n = 0;
    for_each_status(|real_uid, threads| {
        if real_uid == uid {
            n += threads;
        }
    });
    n
}

/// The real uids of every process running now.
pub fn uids_running() -> std::collections::BTreeSet<u32> {
    let mut out = std::collections::BTreeSet::new();
    for_each_status(|uid, _| {
        out.insert(uid);
    });
    out
}

/// (real uid, threads) of each process in /proc.
fn for_each_status(mut f: impl FnMut(u32, u64)) {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return;
    };
    for e in dir.flatten() {
        let name = e.file_name();
        if !name.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(status) = std::fs::read_to_string(e.path().join("status")) else {
            continue;
        };
        let real_uid = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u32>().ok());
        let threads = status
            .lines()
            .find_map(|l| l.strip_prefix("Threads:"))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(1);
        if let Some(uid) = real_uid {
            f(uid, threads);
        }
    }
}

pub fn rss_bytes(pid: u32) -> Option<u64> {
    let mut buf = String::new();
    if !read_into(&proc_path(pid, "status"), &mut buf) {
        return None;
    }
    kb_field(&buf, "VmRSS")
}

/// Proportional set size from `/proc/<pid>/smaps_rollup`: shared pages (node's binary, the
/// compile cache) divided among their users, so summing over agents does not double count.
pub fn pss_bytes(pid: u32) -> Option<u64> {
    let mut buf = String::new();
    if !read_into(&proc_path(pid, "smaps_rollup"), &mut buf) {
        return None;
    }
    kb_field(&buf, "Pss")
}

/// RSS of `root` and all its descendants, in bytes, from one scan's `rss_pages`.
pub fn tree_rss_bytes(root: u32, procs: &[ProcInfo]) -> u64 {
    let own = procs
        .iter()
        .find(|p| p.pid == root)
        .map_or(0, |p| p.rss_pages);
    let pages: u64 = own
        + descendants(root, procs)
            .iter()
            .map(|p| p.rss_pages)
            .sum::<u64>();
    pages * page_size()
}

/// PSS of `root` and all its descendants, in bytes; processes whose smaps_rollup cannot be
/// read count as 0. Costlier than RSS (the kernel walks every mapping), so sample it rarely.
pub fn tree_pss_bytes(root: u32, procs: &[ProcInfo]) -> u64 {
    std::iter::once(root)
        .chain(descendants(root, procs).iter().map(|p| p.pid))
        .filter_map(pss_bytes)
        .sum()
}

pub fn page_size() -> u64 {
    sysconf_or(nix::unistd::SysconfVar::PAGE_SIZE, 4096)
}

pub fn clock_ticks_per_sec() -> u64 {
    sysconf_or(nix::unistd::SysconfVar::CLK_TCK, 100)
}

fn sysconf_or(var: nix::unistd::SysconfVar, default: u64) -> u64 {
    match nix::unistd::sysconf(var) {
        Ok(Some(v)) if v > 0 => v as u64,
        _ => default,
    }
}

/// Host capacity figures used for admission: memory, pids and this process's descriptors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct HostInfo {
    /// Bytes.
    pub mem_total: u64,
    /// Bytes (MemAvailable: what can be allocated without swapping).
    pub mem_available: u64,
    pub pid_max: u64,
    /// Kernel scheduling entities (threads included, as they consume pids too).
    pub pids_in_use: u64,
    pub nofile_soft: u64,
    pub nofile_hard: u64,
    /// Open descriptors of this process.
    pub fds_in_use: u64,
}

/// (MemTotal, MemAvailable) in bytes from the text of /proc/meminfo.
pub fn parse_meminfo(text: &str) -> Option<(u64, u64)> {
    Some((kb_field(text, "MemTotal")?, kb_field(text, "MemAvailable")?))
}

/// The `total` of the `running/total` field of /proc/loadavg.
fn parse_loadavg_entities(text: &str) -> Option<u64> {
    let field = text.split_ascii_whitespace().nth(3)?;
    field.split_once('/')?.1.parse().ok()
}

/// Host figures; any that cannot be read are 0.
pub fn host_info() -> HostInfo {
    let mut buf = String::new();
    let (mem_total, mem_available) = if read_into(Path::new("/proc/meminfo"), &mut buf) {
        parse_meminfo(&buf).unwrap_or((0, 0))
    } else {
        (0, 0)
    };
    let pid_max = if read_into(Path::new("/proc/sys/kernel/pid_max"), &mut buf) {
        buf.trim().parse().unwrap_or(0)
    } else {
        0
    };
    let pids_in_use = if read_into(Path::new("/proc/loadavg"), &mut buf) {
        parse_loadavg_entities(&buf).unwrap_or(0)
    } else {
        0
    };
    let (nofile_soft, nofile_hard) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
            .unwrap_or((0, 0));
    // read_dir holds one descriptor of its own on /proc/self/fd while listing it.
    let fds_in_use = std::fs::read_dir("/proc/self/fd")
        .map(|d| (d.count() as u64).saturating_sub(1))
        .unwrap_or(0);
    HostInfo {
        mem_total,
        mem_available,
        pid_max,
        pids_in_use,
        nofile_soft,
        nofile_hard,
        fds_in_use,
    }
}

/// Raises this process's soft RLIMIT_NOFILE to its hard limit (every agent costs the daemon
/// several descriptors). Returns (old soft, new soft).
pub fn raise_nofile_limit() -> std::io::Result<(u64, u64)> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(std::io::Error::from)?;
    // An unlimited hard limit cannot be the soft one: the kernel caps descriptors at nr_open.
    let target = if hard == libc::RLIM_INFINITY {
        std::fs::read_to_string("/proc/sys/fs/nr_open")
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .unwrap_or(1 << 20)
    } else {
        hard
    };
    if soft >= target {
        return Ok((soft, soft));
    }
    setrlimit(Resource::RLIMIT_NOFILE, target, hard).map_err(std::io::Error::from)?;
    Ok((soft, target))
}

/// The unified-hierarchy path of this process from /proc/self/cgroup (`0::/path`).
fn parse_cgroup_v2_path(text: &str) -> Option<&str> {
    text.lines().find_map(|l| l.strip_prefix("0::"))
}

/// The root (field 4) of the cgroup2 filesystem mounted exactly at `mount_point`, from the
/// text of /proc/self/mountinfo. A cgroup2 mount elsewhere (the hybrid layout's
/// `/sys/fs/cgroup/unified`) does not count.
fn cgroup2_mount_root<'a>(mountinfo: &'a str, mount_point: &str) -> Option<&'a str> {
    mountinfo.lines().find_map(|line| {
        let (pre, post) = line.split_once(" - ")?;
        let mut pre_fields = pre.split(' ');
        let root = pre_fields.nth(3)?;
        let point = pre_fields.next()?;
        let fstype = post.split(' ').next()?;
        (point == mount_point && fstype == "cgroup2").then_some(root)
    })
}

/// The directory of this process's cgroup on a pure cgroup v2 host, given both files' text.
fn cgroup_v2_dir(self_cgroup: &str, mountinfo: &str) -> Option<PathBuf> {
    const MOUNT: &str = "/sys/fs/cgroup";
    let path = parse_cgroup_v2_path(self_cgroup)?;
    let root = cgroup2_mount_root(mountinfo, MOUNT)?;
    // Inside a container without a cgroup namespace the mount's root is our own subtree.
    let rel = if root == "/" {
        path
    } else {
        path.strip_prefix(root)?
    };
    let rel = rel.trim_start_matches('/');
    Some(if rel.is_empty() {
        PathBuf::from(MOUNT)
    } else {
        Path::new(MOUNT).join(rel)
    })
}

/// Some(dir) when this process sits in a cgroup v2 directory it may manage: unified hierarchy
/// at /sys/fs/cgroup and the directory writable (which controllers it offers is for
/// `cgroup::CgroupTree` to find out). None otherwise (cgroup v1 and hybrid hosts included).
pub fn cgroup_v2_delegated() -> Option<PathBuf> {
    let self_cgroup = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let dir = cgroup_v2_dir(&self_cgroup, &mountinfo)?;
    nix::unistd::access(&dir, nix::unistd::AccessFlags::W_OK).ok()?;
    Some(dir)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::CommandExt;
    use std::process::{Child, Command, Stdio};
    use std::time::{Duration, Instant};

    /// Kills what a test spawned: the child's whole process group (the test puts each child
    /// in its own group, so this reaches only what the test started), then reaps the child.
    struct Spawned {
        child: Child,
    }

    impl Spawned {
        fn new(cmd: &mut Command) -> Spawned {
            let child = cmd
                .process_group(0)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn test child");
            Spawned { child }
        }
        fn pid(&self) -> u32 {
            self.child.id()
        }
    }

    impl Drop for Spawned {
        fn drop(&mut self) {
            // The child is not reaped before this point, so its pid (= its pgid) cannot have
            // been reused.
            let pgid = nix::unistd::Pid::from_raw(self.child.id() as i32);
            let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
            let _ = self.child.wait();
        }
    }

    /// Polls `probe` until it returns Some, for at most `limit`; panics with `what` and the
    /// last value `last` produced.
    fn wait_for<T, L: std::fmt::Debug>(
        what: &str,
        limit: Duration,
        mut probe: impl FnMut() -> Result<T, L>,
    ) -> T {
        let deadline = Instant::now() + limit;
        loop {
            match probe() {
                Ok(v) => return v,
                Err(last) if Instant::now() >= deadline => {
                    panic!("timed out waiting for {what}; last saw {last:?}")
                }
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    }

    fn p(pid: u32, ppid: u32) -> ProcInfo {
        ProcInfo {
            pid,
            ppid,
            pgid: pid,
            sid: pid,
            start_time: 1000 + pid as u64,
            state: 'S',
            comm: format!("p{pid}"),
            utime: 0,
            stime: 0,
            rss_pages: pid as u64,
        }
    }

    #[test]
    fn parse_stat_normal_line() {
        let line = "1234 (node) S 1 1234 1234 0 -1 4194560 5000 0 12 0 345 67 0 0 20 0 11 0 98765 1234567890 4321 18446744073709551615 1 1 0 0 0 0 0 16781312 17922 0 0 0 17 1 0 0 0 0 0\n";
        let p = parse_stat(1234, line).expect("parses");
        assert_eq!(
            p,
            ProcInfo {
                pid: 1234,
                ppid: 1,
                pgid: 1234,
                sid: 1234,
                start_time: 98765,
                state: 'S',
                comm: "node".into(),
                utime: 345,
                stime: 67,
                rss_pages: 4321,
            }
        );
    }

    #[test]
    fn parse_stat_comm_with_spaces_and_parens() {
        let line = "77 (a b) c) R 5 6 7 0 -1 0 0 0 0 0 1 2 0 0 20 0 1 0 555 100 9 0 0";
        let p = parse_stat(77, line).expect("parses");
        assert_eq!(p.comm, "a b) c");
        assert_eq!((p.state, p.ppid, p.pgid, p.sid), ('R', 5, 6, 7));
        assert_eq!(
            (p.utime, p.stime, p.start_time, p.rss_pages),
            (1, 2, 555, 9)
        );
    }

    #[test]
    fn parse_stat_rejects_truncated() {
        assert_eq!(parse_stat(1, "1 (x) S 0 1 1 0"), None);
        assert_eq!(parse_stat(1, "garbage"), None);
    }

    #[test]
    fn descendants_three_levels_excludes_unrelated() {
        // 10 -> 11 -> 13 -> 15 ; 10 -> 12 ; unrelated: 20 -> 21, and 1.
        let table = vec![
            p(1, 0),
            p(10, 1),
            p(11, 10),
            p(12, 10),
            p(13, 11),
            p(15, 13),
            p(20, 1),
            p(21, 20),
        ];
        let mut got: Vec<u32> = descendants(10, &table).iter().map(|x| x.pid).collect();
        got.sort_unstable();
        assert_eq!(got, vec![11, 12, 13, 15]);
        assert!(descendants(15, &table).is_empty());
        assert!(descendants(999, &table).is_empty());
    }

    #[test]
    fn descendants_terminates_on_cycle() {
        let table = vec![p(1, 2), p(2, 1), p(3, 2)];
        let mut got: Vec<u32> = descendants(1, &table).iter().map(|x| x.pid).collect();
        got.sort_unstable();
        assert_eq!(got, vec![2, 3]);
    }

    #[test]
    fn tree_rss_sums_root_and_descendants() {
        let table = vec![p(10, 1), p(11, 10), p(12, 11), p(20, 1)];
        assert_eq!(tree_rss_bytes(10, &table), (10 + 11 + 12) * page_size());
    }

    #[test]
    fn find_env_matches_whole_key_only() {
        let env = b"FOOBAR=1\0FOO=two\0EMPTY=\0";
        assert_eq!(find_env(env, "FOO"), Some(&b"two"[..]));
        assert_eq!(find_env(env, "FOOB"), None);
        assert_eq!(find_env(env, "EMPTY"), Some(&b""[..]));
        assert_eq!(find_env(env, "MISSING"), None);
    }

    #[test]
    fn parse_meminfo_sample() {
        let text = "MemTotal:       16303348 kB\nMemFree:          623640 kB\nMemAvailable:    9830004 kB\nBuffers:          402520 kB\n";
        assert_eq!(parse_meminfo(text), Some((16303348 * 1024, 9830004 * 1024)));
        assert_eq!(parse_meminfo("MemTotal: 1 kB\n"), None);
    }

    #[test]
    fn loadavg_entities() {
        assert_eq!(
            parse_loadavg_entities("0.17 0.20 0.18 1/91 9747\n"),
            Some(91)
        );
    }

    #[test]
    fn cgroup_dir_pure_v2_hybrid_and_container() {
        let pure = "24 1 0:22 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(
            cgroup_v2_dir("0::/user.slice/u.service\n", pure),
            Some(PathBuf::from("/sys/fs/cgroup/user.slice/u.service"))
        );
        let hybrid = "31 23 0:28 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n\
                      41 31 0:38 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n";
        assert_eq!(cgroup_v2_dir("1:cpu:/\n0::/x\n", hybrid), None);
        let container = "24 1 0:22 /docker/abc /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n";
        assert_eq!(
            cgroup_v2_dir("0::/docker/abc/sub\n", container),
            Some(PathBuf::from("/sys/fs/cgroup/sub"))
        );
        assert_eq!(cgroup_v2_dir("0::/elsewhere\n", container), None);
    }

    #[test]
    fn scan_finds_this_process() {
        let me = std::process::id();
        let all = scan();
        let mine = all.iter().find(|x| x.pid == me);
        let direct = read_proc(me);
        let key = |p: &ProcInfo| (p.pid, p.ppid, p.pgid, p.sid, p.start_time, p.comm.clone());
        assert!(
            mine.is_some(),
            "scan of {} processes misses {me}",
            all.len()
        );
        assert_eq!(mine.map(key), direct.as_ref().map(key));
    }

    #[test]
    fn raise_nofile_reaches_hard_limit() {
        let (old, new) = raise_nofile_limit().expect("raise");
        let h = host_info();
        assert!(old <= new, "old {old} new {new}");
        assert_eq!(h.nofile_soft, new, "{h:?}");
    }

    #[test]
    fn real_child_identity_env_marker_and_rss() {
        let marker = format!(
            "procfs-test-{}-{}",
            std::process::id(),
            rand::random::<u64>()
        );
        let child = Spawned::new(
            Command::new("sleep")
                .arg("30")
                .env("FLEET_TEST_MARKER", &marker),
        );
        let pid = child.pid();
        // spawn() returns once the child has left the parent's memory, which is before the
        // kernel has filled in the new environ: wait for both comm and environ.
        let (info, env) = wait_for("sleep to finish exec", Duration::from_secs(5), || {
            let info = read_proc(pid);
            let env = env_var(pid, "FLEET_TEST_MARKER");
            match (&info, &env) {
                (Some(i), Some(_)) if i.comm == "sleep" => Ok((info.unwrap(), env.unwrap())),
                _ => Err((info, env)),
            }
        });
        assert_eq!(env, marker);
        assert_eq!(info.ppid, std::process::id());
        assert_eq!(info.pgid, pid, "child was put in its own process group");
        assert!(is_same_process(pid, info.start_time));
        assert!(!is_same_process(pid, info.start_time + 1));

        let all = scan();
        let found: Vec<u32> = with_env_marker(&all, "FLEET_TEST_MARKER", &marker[..20])
            .iter()
            .map(|x| x.pid)
            .collect();
        assert!(
            found.contains(&pid),
            "marker search found {found:?}, not {pid}"
        );
        assert!(
            !found.contains(&std::process::id()),
            "found the test itself: {found:?}"
        );

        let rss = rss_bytes(pid);
        assert!(rss.is_some_and(|r| r > 0), "rss of sleep: {rss:?}");
    }

    #[test]
    fn shell_background_child_is_a_descendant() {
        let shell = Spawned::new(Command::new("sh").args(["-c", "sleep 30 & wait"]));
        let sh_pid = shell.pid();
        let sleeper = wait_for("sh to start its sleep", Duration::from_secs(5), || {
            let all = scan();
            let desc = descendants(sh_pid, &all);
            match desc.iter().find(|d| d.comm == "sleep") {
                Some(s) => Ok(s.clone()),
                None => Err(desc),
            }
        });
        assert_eq!(sleeper.ppid, sh_pid);
        assert!(is_same_process(sleeper.pid, sleeper.start_time));
        // What the supervisor's memory accounting sees: the tree is bigger than the shell.
        let all = scan();
        let shell_rss = all.iter().find(|x| x.pid == sh_pid).map(|x| x.rss_pages);
        assert!(tree_rss_bytes(sh_pid, &all) > shell_rss.unwrap_or(0) * page_size());
    }

    #[test]
    fn subtrees_find_the_same_tree_as_a_full_scan() {
        // A grandchild in a session of its own, as OpenClaw's helpers are.
        let shell = Spawned::new(
            Command::new("sh").args(["-c", "sleep 30 & sh -c 'setsid sleep 31 & wait' & wait"]),
        );
        let sh_pid = shell.pid();
        let pids = |v: &[ProcInfo]| {
            let mut p: Vec<u32> = v.iter().map(|x| x.pid).collect();
            p.sort();
            p
        };
        let from_scan = wait_for("the shell's tree", Duration::from_secs(5), || {
            let desc = descendants(sh_pid, &scan());
            if desc.iter().filter(|d| d.comm == "sleep").count() == 2 {
                Ok(desc)
            } else {
                Err(desc)
            }
        });
        let from_children = subtrees(&[sh_pid]).expect("children files on this kernel");
        assert_eq!(pids(&from_children), pids(&from_scan));
        assert!(!from_children.iter().any(|p| p.pid == sh_pid));
        // A root that is gone: the caller must fall back to a scan.
        assert!(subtrees(&[u32::MAX]).is_none());
    }

    #[test]
    fn host_info_is_plausible() {
        let h = host_info();
        assert!(h.mem_total > 0 && h.mem_available <= h.mem_total, "{h:?}");
        assert!(
            h.pid_max > 0 && h.pids_in_use > 0 && h.pids_in_use <= h.pid_max,
            "{h:?}"
        );
        assert!(h.nofile_soft > 0 && h.nofile_soft <= h.nofile_hard, "{h:?}");
        assert!(h.fds_in_use > 0, "{h:?}");
        assert!(page_size() >= 4096 && clock_ticks_per_sec() > 0);
    }
}

/// `ksm_merging_pages` of `/proc/<pid>/ksm_stat`: its pages KSM merged with others'. `None`
/// when the kernel has no KSM (no such file) or the process is gone.
pub fn ksm_merging_pages(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/ksm_stat")).ok()?;
    parse_ksm_stat(&text).map(|k| k.merging_pages)
}

/// What `/proc/<pid>/ksm_stat` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KsmStat {
    pub merging_pages: u64,
    /// `ksm_merge_any: yes`: the process asked for merging of all its memory.
    pub merge_any: bool,
}

pub fn parse_ksm_stat(text: &str) -> Option<KsmStat> {
    let mut pages = None;
    let mut any = false;
    for line in text.lines() {
        if let Some(v) = line.strip_prefix("ksm_merging_pages ") {
            pages = v.trim().parse().ok();
        } else if let Some(v) = line.strip_prefix("ksm_merge_any:") {
            any = v.trim() == "yes";
        }
    }
    Some(KsmStat {
        merging_pages: pages?,
        merge_any: any,
    })
}

/// Whether this kernel can merge pages of chosen processes (Linux >= 6.4 exposes
/// `/proc/self/ksm_stat` with `ksm_merge_any`).
pub fn ksm_available() -> bool {
    std::fs::read_to_string("/proc/self/ksm_stat").is_ok_and(|t| t.contains("ksm_merge_any"))
}
