//! Per-agent cgroup v2 directories, where the host delegates a cgroup to the daemon: each
//! incarnation of an agent runs in `<base>/agents/<fleet>.<agent>.<incarnation>`, with the
//! fleet's `memory.max`, `pids.max` and `cpu.max` written before the process starts, and
//! `cgroup.kill` ends everything in it at once, helpers that left the agent's process tree
//! and cleared its environment marker included.
//!
//! Why one directory per incarnation and not per agent: a crashed agent is restarted before
//! its leftovers are swept, so two incarnations can briefly coexist; the old one's kill must
//! never reach the new one.
//!
//! Layout (cgroup v2's "no internal processes" rule forbids enabling controllers for the
//! children of a cgroup that holds processes itself, so the daemon moves into a leaf):
//! ```text
//! <base>/                  delegated to the daemon's user (systemd: Delegate=yes)
//!   fleetd/                the daemon, when it was in <base> itself
//!   agents/                +memory +pids +cpu (those the host offers)
//!     <fleet>.<agent>.<n>/ one incarnation; ids never contain '.'
//! ```
//! Where no cgroup v2 is delegated (cgroup v1 and hybrid hosts, or no delegation), none of
//! this runs and limits fall back to /proc sampling (`memory`).

use crate::spec::CgroupLimits;
use std::fs::OpenOptions;
use std::io::{self, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The controllers Fleet Commander sets limits with, as enabled under `<base>/agents`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Controllers {
    pub memory: bool,
    pub pids: bool,
    pub cpu: bool,
}

impl Controllers {
    /// From the text of a `cgroup.controllers` or `cgroup.subtree_control` file.
    pub fn parse(text: &str) -> Controllers {
        let has = |c: &str| text.split_ascii_whitespace().any(|x| x == c);
        Controllers {
            memory: has("memory"),
            pids: has("pids"),
            cpu: has("cpu"),
        }
    }

    /// The line that enables these for a cgroup's children (`+memory +pids`).
    pub fn enable_line(self) -> String {
        [
            (self.memory, "+memory"),
            (self.pids, "+pids"),
            (self.cpu, "+cpu"),
        ]
        .iter()
        .filter(|(on, _)| *on)
        .map(|(_, s)| *s)
        .collect::<Vec<_>>()
        .join(" ")
    }

    pub fn names(self) -> String {
        let line = self.enable_line().replace('+', "");
        if line.is_empty() {
            "none".into()
        } else {
            line
        }
    }
}

/// `cpu.max` period: 100 ms, the kernel's default.
const CPU_PERIOD_US: u64 = 100_000;

/// The interface files and values for `limits`. Memory and pids are always limited: an unset
/// one gets its default (`DEFAULT_MEMORY_MAX`, `DEFAULT_PIDS_MAX`), so a fork bomb or a
/// runaway heap in one tenant cannot starve the others; an unset cpu limit is `max` (lifted,
/// never left at an earlier value). Files of controllers the host does not offer are left
/// out.
pub fn limit_writes(limits: &CgroupLimits, available: Controllers) -> Vec<(&'static str, String)> {
    let mut out = Vec::new();
    if available.memory {
        let v = limits.memory_max.unwrap_or(crate::spec::DEFAULT_MEMORY_MAX);
        out.push(("memory.max", v.to_string()));
    }
    if available.pids {
        let v = limits.pids_max.unwrap_or(crate::spec::DEFAULT_PIDS_MAX);
        out.push(("pids.max", v.to_string()));
    }
    if available.cpu {
        let quota = limits
            .cpu_max
            .map(|pct| (u64::from(pct) * CPU_PERIOD_US / 100).to_string());
        out.push((
            "cpu.max",
            format!("{} {CPU_PERIOD_US}", quota.as_deref().unwrap_or("max")),
        ));
    }
    out
}

/// Limits the spec sets whose controller the host does not offer (said once per fleet).
pub fn unenforced(limits: &CgroupLimits, available: Controllers) -> Vec<&'static str> {
    let mut out = Vec::new();
    if limits.memory_max.is_some() && !available.memory {
        out.push("memory_max");
    }
    if limits.pids_max.is_some() && !available.pids {
        out.push("pids_max");
    }
    if limits.cpu_max.is_some() && !available.cpu {
        out.push("cpu_max");
    }
    out
}

/// The directory name of one incarnation, and the prefix every incarnation of a fleet shares.
pub fn incarnation_name(fleet: &str, agent: &str, incarnation: u64) -> String {
    format!("{fleet}.{agent}.{incarnation}")
}

fn fleet_prefix(fleet: &str) -> String {
    format!("{fleet}.")
}

fn write_file(path: &Path, value: &str) -> io::Result<()> {
    // Interface files take one write each; `fs::write` would create a missing file instead
    // of failing on a directory that is not a cgroup.
    let mut f = OpenOptions::new().write(true).open(path)?;
    f.write_all(value.as_bytes())
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))
}

/// The daemon's delegated cgroup, set up for agents.
#[derive(Debug)]
pub struct CgroupTree {
    base: PathBuf,
    agents: PathBuf,
    controllers: Controllers,
}

impl CgroupTree {
    /// Prepares `base` (a cgroup v2 directory this process may manage): moves the daemon into
    /// `fleetd/` if it sits in `base` itself, creates `agents/` with every controller the
    /// host offers enabled, and stops what an earlier run of the daemon left in `agents/`.
    pub fn setup(base: &Path) -> io::Result<CgroupTree> {
        if !base.join("cgroup.procs").is_file() || !base.join("cgroup.kill").exists() {
            return Err(io::Error::other(format!(
                "{} is not a cgroup v2 directory with cgroup.kill (Linux 5.14 or later)",
                base.display()
            )));
        }
        let me = std::process::id().to_string();
        let procs = std::fs::read_to_string(base.join("cgroup.procs"))?;
        if procs.lines().any(|l| l.trim() == me) {
            let leaf = base.join("fleetd");
            mkdir(&leaf)?;
            // Moves every thread of the daemon (cgroup.procs is per process in v2).
            write_file(&leaf.join("cgroup.procs"), &me)?;
        }
        let offered =
            Controllers::parse(&std::fs::read_to_string(base.join("cgroup.controllers"))?);
        let agents = base.join("agents");
        let mut controllers = offered;
        let line = offered.enable_line();
        if !line.is_empty() {
            let enabled = write_file(&base.join("cgroup.subtree_control"), &line);
            mkdir(&agents)?;
            let enabled =
                enabled.and_then(|_| write_file(&agents.join("cgroup.subtree_control"), &line));
            if let Err(e) = enabled {
                // Typically EBUSY: another process still sits in `base`.
                tracing::warn!(cgroup = %base.display(), error = %e, "cannot enable cgroup controllers for agents: limits are off, cgroup.kill still ends every agent's processes");
                controllers = Controllers::default();
            }
        }
        mkdir(&agents)?;
        let tree = CgroupTree {
            base: base.to_path_buf(),
            agents,
            controllers,
        };
        let left = tree.sweep_all();
        if left > 0 {
            tracing::warn!(
                count = left,
                "killed processes left in agent cgroups by a previous run"
            );
        }
        Ok(tree)
    }

    pub fn base(&self) -> &Path {
        &self.base
    }

    pub fn controllers(&self) -> Controllers {
        self.controllers
    }

    /// Creates the cgroup of one incarnation with `limits` written, ready for a process to
    /// move in through `procs_fd`.
    pub fn create(
        &self,
        fleet: &str,
        agent: &str,
        incarnation: u64,
        limits: &CgroupLimits,
    ) -> io::Result<AgentCgroup> {
        let dir = self
            .agents
            .join(incarnation_name(fleet, agent, incarnation));
        mkdir(&dir)?;
        let cg = AgentCgroup {
            dir,
            procs_fd: None,
        };
        let opened = apply_limits(&cg.dir, limits, self.controllers).and_then(|_| {
            OpenOptions::new()
                .write(true)
                .open(cg.dir.join("cgroup.procs"))
                .map(OwnedFd::from)
        });
        match opened {
            Ok(fd) => Ok(AgentCgroup {
                procs_fd: Some(fd),
                ..cg
            }),
            Err(e) => {
                let _ = std::fs::remove_dir(&cg.dir);
                Err(e)
            }
        }
    }

    /// Writes a fleet's (changed) limits into the cgroups of its running incarnations.
    pub fn apply_fleet_limits(&self, fleet: &str, limits: &CgroupLimits) -> io::Result<usize> {
        let mut n = 0;
        for dir in self.incarnations(Some(fleet))? {
            apply_limits(&dir, limits, self.controllers)?;
            n += 1;
        }
        Ok(n)
    }

    fn incarnations(&self, fleet: Option<&str>) -> io::Result<Vec<PathBuf>> {
        let prefix = fleet.map(fleet_prefix);
        let mut out = Vec::new();
        for e in std::fs::read_dir(&self.agents)?.flatten() {
            let name = e.file_name();
            let name = name.to_string_lossy();
            if prefix.as_deref().is_none_or(|p| name.starts_with(p)) && e.path().is_dir() {
                out.push(e.path());
            }
        }
        Ok(out)
    }

    /// Kills and removes every agent cgroup; returns how many processes were in them.
    fn sweep_all(&self) -> usize {
        let mut n = 0;
        for dir in self.incarnations(None).unwrap_or_default() {
            let cg = AgentCgroup {
                dir,
                procs_fd: None,
            };
            n += cg.pids().len();
            cg.kill_and_remove(Duration::from_secs(2));
        }
        n
    }
}

fn mkdir(dir: &Path) -> io::Result<()> {
    match std::fs::create_dir(dir) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => Err(io::Error::new(
            e.kind(),
            format!("cannot create cgroup {}: {e}", dir.display()),
        )),
        _ => Ok(()),
    }
}

fn apply_limits(dir: &Path, limits: &CgroupLimits, available: Controllers) -> io::Result<()> {
    for (file, value) in limit_writes(limits, available) {
        write_file(&dir.join(file), &value)?;
    }
    Ok(())
}

/// One incarnation's cgroup.
#[derive(Debug)]
pub struct AgentCgroup {
    dir: PathBuf,
    /// `cgroup.procs`, open for writing: the spawned child writes "0" to it between fork and
    /// exec, so nothing of the agent ever runs outside its cgroup. Closed once spawned.
    procs_fd: Option<OwnedFd>,
}

impl AgentCgroup {
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn procs_fd(&self) -> Option<&OwnedFd> {
        self.procs_fd.as_ref()
    }

    /// The spawn is done: the descriptor is no longer needed.
    pub fn spawned(&mut self) {
        self.procs_fd = None;
    }

    /// Every process in the cgroup (empty once it is gone or unreadable).
    pub fn pids(&self) -> Vec<u32> {
        std::fs::read_to_string(self.dir.join("cgroup.procs"))
            .map(|t| t.lines().filter_map(|l| l.trim().parse().ok()).collect())
            .unwrap_or_default()
    }

    /// True while any process is in the cgroup (from `cgroup.events`).
    pub fn populated(&self) -> bool {
        std::fs::read_to_string(self.dir.join("cgroup.events"))
            .map(|t| t.lines().any(|l| l.trim() == "populated 1"))
            .unwrap_or(false)
    }

    /// SIGKILL to every process in the cgroup, atomically: a process forking meanwhile cannot
    /// escape it.
    pub fn kill(&self) -> io::Result<()> {
        write_file(&self.dir.join("cgroup.kill"), "1")
    }

    /// Kills what is left, waits (bounded) until the kernel has emptied the cgroup, and
    /// removes it. Blocking. Returns false if it could not be removed in time.
    pub fn kill_and_remove(&self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        if self.populated() {
            let _ = self.kill();
        }
        loop {
            match std::fs::remove_dir(&self.dir) {
                Ok(()) => return true,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return true,
                Err(_) if Instant::now() < deadline => {
                    // Killed processes leave the cgroup once the kernel has torn them down.
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => {
                    tracing::warn!(cgroup = %self.dir.display(), error = %e, "agent cgroup not removed");
                    return false;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controllers_from_the_kernel_files() {
        let c = Controllers::parse("cpuset cpu io memory hugetlb pids rdma misc\n");
        assert_eq!(
            c,
            Controllers {
                memory: true,
                pids: true,
                cpu: true
            }
        );
        assert_eq!(c.enable_line(), "+memory +pids +cpu");
        let hybrid = Controllers::parse("hugetlb\n");
        assert_eq!(hybrid, Controllers::default());
        assert_eq!(hybrid.enable_line(), "");
        assert_eq!(hybrid.names(), "none");
        assert_eq!(Controllers::parse("pids cpuset").names(), "pids");
    }

    #[test]
    fn limits_become_interface_values() {
        let all = Controllers::parse("memory pids cpu");
        let l = CgroupLimits {
            memory_max: Some(768 << 20),
            pids_max: Some(256),
            cpu_max: Some(150),
        };
        assert_eq!(
            limit_writes(&l, all),
            vec![
                ("memory.max", "805306368".to_string()),
                ("pids.max", "256".to_string()),
                ("cpu.max", "150000 100000".to_string()),
            ]
        );
        // Unset memory and pids limits get their defaults; cpu is lifted, never left at an
        // earlier value.
        assert_eq!(
            limit_writes(&CgroupLimits::default(), all),
            vec![
                ("memory.max", (4u64 << 30).to_string()),
                ("pids.max", "1024".to_string()),
                ("cpu.max", "max 100000".to_string()),
            ]
        );
        let only_pids = Controllers::parse("pids");
        assert_eq!(
            limit_writes(&l, only_pids),
            vec![("pids.max", "256".to_string())]
        );
        assert_eq!(unenforced(&l, only_pids), vec!["memory_max", "cpu_max"]);
        assert!(unenforced(&CgroupLimits::default(), Controllers::default()).is_empty());
    }

    #[test]
    fn incarnations_of_one_fleet_share_a_prefix_no_other_fleet_has() {
        // Ids never contain '.', so "a.b" cannot be mistaken for fleet "a" agent "b…".
        let n = incarnation_name("web", "agent-1", 7);
        assert_eq!(n, "web.agent-1.7");
        assert!(n.starts_with(&fleet_prefix("web")));
        assert!(!incarnation_name("web-2", "a", 1).starts_with(&fleet_prefix("web")));
    }

    #[test]
    fn setup_refuses_a_directory_that_is_not_a_cgroup() {
        let dir = tempfile::tempdir().unwrap();
        let err = CgroupTree::setup(dir.path()).unwrap_err();
        assert!(
            err.to_string().contains("not a cgroup v2 directory"),
            "{err}"
        );
    }
}
