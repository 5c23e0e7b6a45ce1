//! A hostile tenant against its neighbour, the daemon and the host, with a real daemon, in
//! both isolation modes:
//! - `uid`: fleetd as root, so each agent runs as a uid of its own with no capabilities,
//!   `no_new_privs` and its Landlock sandbox;
//! - `landlock`: fleetd as an unprivileged user (started through `setpriv` when the test runs
//!   as root), so the agents share the daemon's uid and Landlock alone separates them.
//!
//! The attacker is a shell script given as its fleet's `command`; from inside its own agent
//! process it tries to read the neighbour's config, token, logs and HOME, list and read the
//! registry and vault, drive the fleet through the control socket (directly, and from a new
//! session with the agent marker removed), signal the neighbour and the daemon, read the
//! neighbour's environment, bind a port of the neighbour's block, write into the OpenClaw
//! install and the neighbour's compile cache, gain privileges (a setuid-root binary, setpriv,
//! capsh) and fork without bound. Each attempt has its own assertion, judged by what the
//! test sees itself (the neighbour's files and process, the kernel's view of the attacker)
//! and by the attacker's error, which must be a refusal, not a wrong path.
//!
//! The neighbour is a real OpenClaw gateway (FLEET_OPENCLAW_BIN, set by scripts/test.sh)
//! under the same confinement: it must reach /readyz and keep serving through the attacks.

mod common;

use common::{http_get, marked_pids, read_file, wait_until, Daemon, FLEETCTL, STUB};
use serde_json::Value;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The unprivileged user the landlock-mode daemon runs as: outside the default agent uid
/// range, and no user of the host.
const UNPRIVILEGED: u32 = 1_400_000;
/// The attacker fleet's pids limit: its fork bomb must stop there.
const ATTACKER_PIDS: u64 = 64;
const START: Duration = Duration::from_secs(300);

fn is_root() -> bool {
    unsafe { libc::geteuid() == 0 }
}

#[test]
fn a_hostile_tenant_with_a_uid_of_its_own_reaches_nothing_of_others() {
    if !is_root() {
        common::skipped("isolation uid: needs the test to run as root (fleetd gives agents uids)");
        return;
    }
    scenario(Mode::Uid);
}

#[test]
fn a_hostile_tenant_under_landlock_alone_reaches_nothing_of_others() {
    if landlock_abi() == 0 {
        common::skipped("isolation landlock: this kernel has no Landlock");
        return;
    }
    scenario(Mode::Landlock);
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    Uid,
    Landlock,
}

fn landlock_abi() -> i64 {
    unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<libc::c_void>(),
            0usize,
            1u32,
        )
    }
    .max(0)
}

/// Files the attacker runs: world-readable, root's (the setuid binary must be root's).
struct Tools {
    dir: tempfile::TempDir,
    attack: PathBuf,
    suid: Option<PathBuf>,
}

impl Tools {
    fn new() -> Tools {
        // Not under /tmp: an agent with a private /tmp would not see it.
        let dir = tempfile::Builder::new()
            .prefix("fleet-hostile")
            .tempdir_in("/var/tmp")
            .unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let suid = is_root().then(|| {
            let p = dir.path().join("suid-id");
            std::fs::copy("/usr/bin/id", &p).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o4755)).unwrap();
            p
        });
        Tools {
            attack: dir.path().join("attack.sh"),
            dir,
            suid,
        }
    }
}

/// The neighbour is a tenant with a secret (`secret.txt` beside the spec): its value is in
/// fleetd's vault, in the neighbour's environment and in its HOME, and must leak from none.
fn spec_text(victim_real: bool, attacker: Option<&str>) -> String {
    let mut s = if victim_real {
        "[[fleet]]\nname = \"v\"\nprofile = \"lean\"\n".to_string()
    } else {
        format!("[[fleet]]\nname = \"v\"\ncommand = \"{STUB} --no-helper\"\nstride = 2\n")
    };
    s.push_str("[[fleet.agents]]\nid = \"agent-1\"\nsecrets = { TENANT_KEY = \"secret.txt\" }\n");
    if let Some(cmd) = attacker {
        s.push_str(&format!(
            "\n[[fleet]]\nname = \"a\"\nagents = 1\ncommand = \"{cmd}\"\nstride = 1\n\
             [fleet.cgroup]\npids_max = {ATTACKER_PIDS}\n"
        ));
    }
    s
}

fn row(d: &Daemon, fleet: &str) -> Value {
    d.agent(fleet, "agent-1")
        .unwrap_or_else(|| panic!("no {fleet}/agent-1 in status"))
}

fn status_of(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default()
}

/// A process's start time (field 22 of /proc/<pid>/stat): with the pid, its identity.
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(19)?
        .parse()
        .ok()
}

/// What bounds the attacker's processes, as the kernel holds it: its cgroup's pids.max when
/// its cgroup has one; else its RLIMIT_NPROC. Under its own uid that is its pids_max; shared
/// with the daemon and the neighbour (landlock, no delegated cgroup) it is the uid's tasks at
/// the spawn plus pids_max, so the attacker gets more when the others' threads exit meanwhile.
fn pids_bound(pid: u32) -> (u64, &'static str) {
    let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
    let path = cgroup
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .unwrap_or("/");
    // Only fleetd's own cgroup for this agent (`…/agents/a.agent-1.<incarnation>`): without
    // delegation the agent sits in the daemon's cgroup, whose pids.max (a systemd TasksMax,
    // say) is not its limit.
    let ours = path
        .trim()
        .rsplit_once("/agents/")
        .is_some_and(|(_, leaf)| leaf.starts_with("a.agent-1."));
    let max = ours
        .then(|| std::fs::read_to_string(format!("/sys/fs/cgroup{}/pids.max", path.trim())).ok())
        .flatten()
        .and_then(|s| s.trim().parse::<u64>().ok());
    if let Some(max) = max {
        assert_eq!(max, ATTACKER_PIDS, "the attacker's cgroup {path}");
        return (max, "its cgroup's pids.max");
    }
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let soft = limits
        .lines()
        .find(|l| l.starts_with("Max processes"))
        .and_then(|l| l.split_whitespace().nth(2))
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no RLIMIT_NPROC on the attacker: {limits}"));
    assert!(
        (ATTACKER_PIDS..=ATTACKER_PIDS + 4096).contains(&soft),
        "the attacker's RLIMIT_NPROC {soft} is not its pids_max plus the uid's tasks"
    );
    (soft, "its RLIMIT_NPROC")
}

fn field<'a>(status: &'a str, name: &str) -> &'a str {
    status
        .lines()
        .find_map(|l| l.strip_prefix(name))
        .map(str::trim)
        .unwrap_or("")
}

fn scenario(mode: Mode) {
    let openclaw = std::env::var_os("FLEET_OPENCLAW_BIN")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from);
    if openclaw.is_none() {
        common::skipped(&format!(
            "isolation {mode:?}: the neighbour is a stub, not a real gateway (FLEET_OPENCLAW_BIN unset)"
        ));
    }
    let real = openclaw.is_some();
    let tools = Tools::new();
    let spec = tools.dir.path().join("fleets.toml");
    let secret = format!("tenant-secret-{}", std::process::id());
    let secret_file = tools.dir.path().join("secret.txt");
    std::fs::write(&secret_file, &secret).unwrap();
    std::fs::set_permissions(&secret_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::write(&spec, spec_text(real, None)).unwrap();
    std::fs::set_permissions(&spec, std::fs::Permissions::from_mode(0o644)).unwrap();
    let args = ["--spec", spec.to_str().unwrap()];
    // Not under /tmp: HOMEs there get no private /tmp, and production state is elsewhere.
    let parent = Path::new("/var/tmp");
    let d = match mode {
        Mode::Uid => Daemon::start_in(parent, None, &args),
        Mode::Landlock if is_root() => Daemon::start_in(parent, Some(UNPRIVILEGED), &args),
        Mode::Landlock => Daemon::start_in(parent, None, &args),
    };

    // The neighbour: up, ready, confined like any agent.
    let v = wait_until(START, "the neighbour to be ready", |seen| {
        let r = row(&d, "v");
        *seen = r.to_string();
        (r["state"] == "running" && r["ready"] == true).then_some(r)
    });
    let want_level = match mode {
        Mode::Uid => "uid",
        Mode::Landlock => "landlock",
    };
    assert_eq!(v["isolation"]["level"], want_level, "{v}");
    let vhome = PathBuf::from(v["home"].as_str().unwrap());
    let vpid = v["pid"].as_u64().unwrap() as u32;
    let vstart = start_time(vpid);
    let vport = v["port"].as_u64().unwrap() as u16;
    let token = d.ctl(&["token", "v/agent-1"]).trim().to_string();
    assert_eq!(token.len(), 64, "{token}");
    let vowner = std::fs::metadata(&vhome).unwrap();
    let canary = format!("canary-{}", std::process::id());
    let canary_file = vhome.join("canary.txt");
    std::fs::write(&canary_file, &canary).unwrap();
    std::os::unix::fs::chown(&canary_file, Some(vowner.uid()), Some(vowner.gid())).unwrap();
    std::fs::set_permissions(&canary_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let state = d.state_dir();
    let install = openclaw.as_ref().map(|b| {
        let real = b.canonicalize().unwrap();
        real.ancestors()
            .find(|a| a.file_name().is_some_and(|n| n == "node_modules"))
            .and_then(Path::parent)
            .unwrap()
            .to_path_buf()
    });
    let package_json = install
        .as_ref()
        .map(|i| i.join("node_modules/openclaw/package.json"));
    let package_before = package_json.as_ref().map(|p| std::fs::read(p).unwrap());

    // The attacker, next to it.
    let planted = PathBuf::from(format!("/tmp/attacker-was-here-{}", std::process::id()));
    // The pids the attacker sees: in the agents' PID namespace (fleetd as root) the
    // neighbour has another number and the daemon none at all; pid 1 is the namespace's init.
    let nspid: u32 = field(&status_of(vpid), "NSpid:")
        .split_whitespace()
        .last()
        .unwrap()
        .parse()
        .unwrap();
    let daemon_visible = nspid == vpid;
    let script = attack_script(
        &planted,
        &vhome,
        &state,
        nspid,
        daemon_visible.then(|| d.pid()),
        vport + 1,
        install.as_deref(),
    );
    std::fs::write(&tools.attack, script).unwrap();
    std::fs::set_permissions(&tools.attack, std::fs::Permissions::from_mode(0o755)).unwrap();
    let suid_arg = tools
        .suid
        .as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "/usr/bin/id".into());
    let cmd = format!("sh {} {FLEETCTL} {suid_arg} {STUB}", tools.attack.display());
    std::fs::write(&spec, spec_text(real, Some(&cmd))).unwrap();
    d.ctl(&["reload"]);
    let a = wait_until(START, "the attacker to finish", |seen| {
        let r = row(&d, "a");
        let home = PathBuf::from(r["home"].as_str()?);
        let log = std::fs::read_to_string(home.join("logs/agent.log")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(5).collect();
        *seen = format!("{r} log: {tail:?}");
        home.join("done").exists().then_some(r)
    });
    let ahome = PathBuf::from(a["home"].as_str().unwrap());
    let report = |name: &str| read_file(&ahome.join("report").join(name));

    // Who the attacker is, as the kernel sees it (one of its fork bomb's sleeps: the agent
    // itself may be restarting by now, its limit reached).
    let prefix = format!("{}/a/", d.node_id());
    let members = marked_pids(&prefix);
    let apid = *members.first().expect("attacker processes");
    let st = status_of(apid);
    let auid: u32 = field(&st, "Uid:")
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    match mode {
        Mode::Uid => {
            assert_ne!(auid, 0, "the attacker runs as root: {st}");
            assert_ne!(auid, vowner.uid(), "attacker and neighbour share a uid");
            assert_eq!(a["isolation"]["uid"], auid, "{a}");
        }
        Mode::Landlock => assert_eq!(auid, vowner.uid(), "landlock agents run as the daemon"),
    }
    for cap in ["CapInh:", "CapPrm:", "CapEff:", "CapBnd:", "CapAmb:"] {
        assert_eq!(
            field(&st, cap),
            "0000000000000000",
            "{cap} of the attacker: {st}"
        );
    }
    assert_eq!(field(&st, "NoNewPrivs:"), "1", "{st}");
    assert_eq!(field(&st, "Groups:"), "", "supplementary groups: {st}");

    // What each attempt met, for a reader of a failed run (shown with --nocapture).
    for e in std::fs::read_dir(ahome.join("report")).unwrap().flatten() {
        let text = read_file(&e.path());
        eprintln!(
            "{mode:?} {}:\n{}",
            e.file_name().to_string_lossy(),
            text.trim_end()
        );
    }
    // Each attack, refused, for the right reason.
    let refused = |name: &str, out: &str| {
        assert!(
            !out.contains("rc=0"),
            "{name}: an attempt succeeded:\n{out}"
        );
        assert!(
            out.contains("Permission denied") || out.contains("Operation not permitted"),
            "{name}: not refused by permission (a wrong path?):\n{out}"
        );
    };
    for name in ["read-config", "read-log", "read-home", "registry"] {
        let out = report(name);
        refused(name, &out);
        assert!(
            !out.contains(&token),
            "{name}: the neighbour's token leaked"
        );
        assert!(
            !out.contains(&canary),
            "{name}: the neighbour's file leaked"
        );
        assert!(
            !out.contains(&secret),
            "{name}: the neighbour's secret leaked"
        );
    }
    assert!(
        state.join("vault.json").exists(),
        "no vault: the registry attack read nothing worth reading"
    );
    assert!(
        !report("registry").contains("fleetd.sock"),
        "the state dir was listed"
    );
    for name in ["socket", "socket-hidden"] {
        let out = report(name);
        assert_eq!(
            out.matches("rc=").count(),
            3,
            "{name}: three attempts: {out}"
        );
        assert!(
            !out.contains("rc=0"),
            "{name}: a command went through:\n{out}"
        );
        assert!(
            !out.contains(&token),
            "{name}: the token leaked through the socket"
        );
    }
    let signal = report("signal");
    refused("signal", &signal);
    assert!(
        !report("environ").contains(&secret),
        "the neighbour's env leaked"
    );
    assert!(!report("environ").contains(&token));
    refused("environ", &report("environ"));
    let bind = report("bind");
    assert!(
        !bind.contains("bound"),
        "bound the neighbour's port: {bind}"
    );
    assert!(bind.contains("Permission denied"), "bind: {bind}");
    refused("cache", &report("cache"));
    assert!(!vhome.join("tmp/node-compile-cache/planted").exists());
    if let (Some(install), Some(pj), Some(before)) = (&install, &package_json, &package_before) {
        refused("install", &report("install"));
        assert!(
            !install.join("pwned").exists(),
            "a file was planted in the install"
        );
        assert_eq!(
            &std::fs::read(pj).unwrap(),
            before,
            "the install was changed"
        );
    }
    if tools.suid.is_some() {
        let suid = report("suid");
        assert!(
            !suid.contains("euid=0"),
            "the setuid binary gave root: {suid}"
        );
        assert!(suid.contains(&format!("uid={auid}")), "suid: {suid}");
    } else {
        common::skipped("isolation: the setuid-root binary needs the test to run as root");
    }
    let privs = report("privs");
    assert!(!privs.contains("rc=0"), "privileges gained: {privs}");
    // Its /tmp: its own under uid (TMPDIR mounted over it), none at all under landlock.
    let tmp = report("tmp");
    assert!(
        !planted.exists(),
        "the attacker wrote into the host's /tmp: {tmp}"
    );
    match mode {
        Mode::Uid => {
            assert!(tmp.contains("rc=0"), "{tmp}");
            assert!(ahome
                .join("tmp")
                .join(planted.file_name().unwrap())
                .exists());
        }
        Mode::Landlock => refused("tmp", &tmp),
    }

    // The fork bomb stopped at the attacker's limit.
    let fork = report("fork");
    assert!(fork.contains("forked"), "{fork}");
    let held = members.len() as u64;
    let (bound, by) = pids_bound(apid);
    assert!(
        held <= bound + 1,
        "the attacker holds {held} processes, its limit is {bound} ({by})"
    );
    assert!(
        fork.contains("fork") || fork.contains("Resource temporarily unavailable"),
        "no fork failed: {fork}"
    );

    // The neighbour and the daemon did not notice.
    d.ctl(&["fleet", "stop", "a"]);
    let v_after = row(&d, "v");
    assert_eq!(v_after["pid"].as_u64(), Some(vpid as u64), "{v_after}");
    assert_eq!(start_time(vpid), vstart, "the neighbour's process changed");
    assert_eq!(v_after["state"], "running", "{v_after}");
    if real {
        assert_eq!(
            http_get(vport, "/readyz"),
            Some(200),
            "the gateway stopped serving"
        );
    }
    assert_eq!(d.ctl(&["token", "v/agent-1"]).trim(), token);
    assert_eq!(std::fs::read_to_string(&canary_file).unwrap(), canary);
}

/// The attacker's script. `$1` fleetctl, `$2` a setuid-root `id`, `$3` the stub it becomes.
fn attack_script(
    planted: &Path,
    vhome: &Path,
    state: &Path,
    vpid: u32,
    dpid: Option<u32>,
    port: u16,
    install: Option<&Path>,
) -> String {
    let vh = vhome.display();
    let st = state.display();
    let planted = planted.display();
    let kill_daemon = dpid
        .map(|p| format!("try signal kill -TERM {p}"))
        .unwrap_or_default();
    let install = install
        .map(|i| i.display().to_string())
        .unwrap_or_else(|| "/nonexistent-install".into());
    format!(
        r#"#!/bin/sh
FLEETCTL="$1"; SUID="$2"; STUB="$3"
[ -e "$HOME/done" ] && exec "$STUB" --no-helper
R="$HOME/report"; mkdir -p "$R"
try() {{ name="$1"; shift; {{ "$@"; echo "rc=$?"; }} >> "$R/$name" 2>&1; }}
try read-config cat "{vh}/.openclaw/openclaw.json"
try read-log cat "{vh}/logs/agent.log"
try read-log cat "{vh}/logs/openclaw.log"
try read-home ls -la "{vh}"
try read-home cat "{vh}/canary.txt"
try read-home cat "{vh}/.openclaw/secrets/TENANT_KEY"
try registry ls "{st}"
try registry cat "{st}/registry.json"
try registry cat "{st}/vault.json"
for c in "token v/agent-1" "agent stop v/agent-1" "shutdown"; do
    try socket "$FLEETCTL" --socket "{st}/fleetd.sock" $c
    try socket-hidden setsid -w env -u FLEET_COMMANDER_AGENT "$FLEETCTL" --socket "{st}/fleetd.sock" $c
done
try signal kill -TERM {vpid}
try signal kill -KILL 1
{kill_daemon}
try environ cat /proc/{vpid}/environ
try bind perl -MIO::Socket::INET -e 'IO::Socket::INET->new(LocalAddr => "127.0.0.1", LocalPort => $ARGV[0], Listen => 1, ReuseAddr => 1) or die "bind: $!\n"; print "bound\n"' {port}
try install sh -c 'echo pwned > "$0/pwned"' "{install}"
try install sh -c 'echo pwned >> "$0/node_modules/openclaw/package.json"' "{install}"
try cache mkdir -p "{vh}/tmp/node-compile-cache/planted"
try suid "$SUID"
try privs setpriv --reuid=0 id -u
try tmp touch "{planted}"
[ -x /usr/sbin/capsh ] && try privs /usr/sbin/capsh --user=root -- -c 'id -u'
# In a subshell: a shell whose fork fails exits (status 2), and this one must go on.
( i=0; while [ $i -lt 2000 ]; do sleep 120 & i=$((i+1)); done ) 2>> "$R/fork"
echo forked >> "$R/fork"
# Builtins only from here: its limit is reached, nothing can fork until the test counts.
: > "$HOME/done"
exec "$STUB" --no-helper
"#
    )
}
