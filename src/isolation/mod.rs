//! What keeps one tenant's agent from reaching another tenant or the daemon: the level a
//! fleet asks for (`isolation = "uid" | "landlock" | "none"`), what this host can give, and
//! the protections that follow. The pieces: `uids` (the range and the durable lease of a uid
//! per agent), `sandbox` (the Landlock ruleset of one agent), `tenant_fs` (daemon writes into
//! a HOME made with the tenant's own file credentials), `confine` (what the spawned child
//! applies to itself before exec).
//!
//! Why these levels: an OpenClaw agent is an LLM with shell and file tools, so its process
//! must be assumed hostile one day. Under `uid` it runs as a uid of its own with no
//! capability, `no_new_privs`, a private /tmp and Landlock on top where the kernel has it:
//! the kernel's own access checks separate tenants. Without root, `landlock` gives the same
//! file, signal, abstract-socket and port-binding walls by Landlock alone (same uid as the
//! daemon, so what Landlock does not cover stays shared; the README's security model lists
//! it). `none` is the supervisor of earlier versions.

pub mod confine;
pub mod sandbox;
pub mod tenant_fs;
pub mod uids;

use serde::{Deserialize, Serialize};

/// The isolation a fleet asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, Hash)]
#[serde(rename_all = "lowercase")]
pub enum Isolation {
    /// No isolation between agents beyond separate HOMEs: every agent runs as the daemon.
    None,
    /// Landlock only (the daemon's uid), for a daemon that is not root.
    Landlock,
    /// A uid of its own per agent, every capability dropped, `no_new_privs`, a private /tmp,
    /// plus Landlock where the kernel offers it. Needs fleetd as root.
    Uid,
}

impl Isolation {
    pub fn as_str(self) -> &'static str {
        match self {
            Isolation::None => "none",
            Isolation::Landlock => "landlock",
            Isolation::Uid => "uid",
        }
    }

    pub fn parse(s: &str) -> Result<Isolation, String> {
        match s {
            "uid" => Ok(Isolation::Uid),
            "landlock" => Ok(Isolation::Landlock),
            "none" => Ok(Isolation::None),
            other => Err(format!(
                "{other:?} is not an isolation level (expected uid, landlock or none)"
            )),
        }
    }
}

impl std::str::FromStr for Isolation {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Isolation::parse(s)
    }
}

impl std::fmt::Display for Isolation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One agent's isolation as `status --json` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IsolationStatus {
    pub level: Isolation,
    /// The uid it runs as (`uid` level).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    /// Protections of its level this host cannot give (an older kernel).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub off: Vec<String>,
}

impl IsolationStatus {
    /// What a fleet asking for `asked` gets here; None when the host cannot give it (its
    /// starts fail and say why).
    pub fn of(host: Host, asked: Option<Isolation>, uid: Option<u32>) -> Option<IsolationStatus> {
        let level = host.resolve(asked).ok()?;
        Some(IsolationStatus {
            level,
            uid: uid.filter(|_| level == Isolation::Uid),
            off: host.missing(level).into_iter().map(String::from).collect(),
        })
    }
}

/// What this host and this daemon can give agents, found once at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Host {
    /// The daemon can give agents uids of their own (effective uid 0 with CAP_SETUID).
    pub can_setuid: bool,
    /// The kernel's Landlock ABI (0: none).
    pub landlock_abi: i32,
}

/// Landlock ABI that first handles TCP ports (bind rules).
pub const LANDLOCK_NET_ABI: i32 = 4;
/// Landlock ABI that first scopes signals and abstract unix sockets to the sandbox.
pub const LANDLOCK_SCOPE_ABI: i32 = 6;

impl Host {
    pub fn detect() -> Host {
        Host {
            can_setuid: nix::unistd::geteuid().is_root() && has_cap_setuid(),
            landlock_abi: sandbox::kernel_abi(),
        }
    }

    /// The strongest level this host gives: the default of a fleet that names none.
    pub fn strongest(self) -> Isolation {
        if self.can_setuid {
            Isolation::Uid
        } else if self.landlock_abi > 0 {
            Isolation::Landlock
        } else {
            Isolation::None
        }
    }

    /// The level a fleet gets: what it asked for, or the strongest. Asking for more than the
    /// host gives is an error (the operator said what they need); the message names why.
    pub fn resolve(self, asked: Option<Isolation>) -> Result<Isolation, String> {
        match asked {
            None => Ok(self.strongest()),
            Some(Isolation::Uid) if !self.can_setuid => Err(
                "isolation uid needs fleetd running as root (it gives each agent a uid of its own); use landlock or none".into(),
            ),
            Some(Isolation::Landlock) if self.landlock_abi == 0 => Err(
                "isolation landlock needs a kernel with Landlock enabled (Linux 5.13+, lsm=landlock); use none".into(),
            ),
            Some(level) => Ok(level),
        }
    }

    /// The protections an agent at `level` gets on this host, each on or off, for the start
    /// message, `status --json` and `doctor`.
    pub fn protections(self, level: Isolation) -> Vec<(&'static str, bool)> {
        let uid = level == Isolation::Uid;
        let ll = level != Isolation::None && self.landlock_abi > 0;
        vec![
            ("own-uid", uid),
            ("no-capabilities", level != Isolation::None),
            ("no-new-privileges", level != Isolation::None),
            ("private-tmp", uid),
            ("landlock-files", ll),
            (
                "landlock-bind-ports",
                ll && self.landlock_abi >= LANDLOCK_NET_ABI,
            ),
            (
                "landlock-signals",
                ll && self.landlock_abi >= LANDLOCK_SCOPE_ABI,
            ),
            (
                "landlock-abstract-sockets",
                ll && self.landlock_abi >= LANDLOCK_SCOPE_ABI,
            ),
            ("nproc-per-uid", uid),
        ]
    }

    /// The protections `level` would have and this host cannot give (said once at start):
    /// `uid` wants all of them, `landlock` all but those only a uid of its own gives.
    pub fn missing(self, level: Isolation) -> Vec<&'static str> {
        const UID_ONLY: [&str; 3] = ["own-uid", "private-tmp", "nproc-per-uid"];
        self.protections(level)
            .into_iter()
            .filter(|(name, on)| match level {
                Isolation::None => false,
                Isolation::Landlock => !on && !UID_ONLY.contains(name),
                Isolation::Uid => !on,
            })
            .map(|(name, _)| name)
            .collect()
    }
}

fn has_cap_setuid() -> bool {
    // CapEff in /proc/self/status; bit 7 is CAP_SETUID.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .is_some_and(|caps| caps & (1 << 7) != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROOT_ABI7: Host = Host {
        can_setuid: true,
        landlock_abi: 7,
    };
    const USER_ABI7: Host = Host {
        can_setuid: false,
        landlock_abi: 7,
    };
    const USER_ABI3: Host = Host {
        can_setuid: false,
        landlock_abi: 3,
    };
    const BARE: Host = Host {
        can_setuid: false,
        landlock_abi: 0,
    };

    #[test]
    fn the_default_is_the_strongest_level_the_host_gives_and_more_is_refused() {
        let cases: &[(Host, Option<Isolation>, Result<Isolation, &str>)] = &[
            (ROOT_ABI7, None, Ok(Isolation::Uid)),
            (USER_ABI7, None, Ok(Isolation::Landlock)),
            (BARE, None, Ok(Isolation::None)),
            (
                ROOT_ABI7,
                Some(Isolation::Landlock),
                Ok(Isolation::Landlock),
            ),
            (ROOT_ABI7, Some(Isolation::None), Ok(Isolation::None)),
            (
                USER_ABI7,
                Some(Isolation::Uid),
                Err("needs fleetd running as root"),
            ),
            (BARE, Some(Isolation::Landlock), Err("Landlock enabled")),
            (BARE, Some(Isolation::None), Ok(Isolation::None)),
        ];
        for (host, asked, want) in cases {
            let got = host.resolve(*asked);
            match (want, &got) {
                (Ok(w), Ok(g)) => assert_eq!(w, g, "{host:?} {asked:?}"),
                (Err(w), Err(g)) => assert!(g.contains(w), "{host:?} {asked:?}: {g}"),
                _ => panic!("{host:?} {asked:?}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn what_an_old_kernel_cannot_give_is_named() {
        assert!(ROOT_ABI7.missing(Isolation::Uid).is_empty());
        assert!(USER_ABI7.missing(Isolation::Landlock).is_empty());
        assert_eq!(
            USER_ABI3.missing(Isolation::Landlock),
            [
                "landlock-bind-ports",
                "landlock-signals",
                "landlock-abstract-sockets"
            ]
        );
        let root_no_ll = Host {
            can_setuid: true,
            landlock_abi: 0,
        };
        assert_eq!(
            root_no_ll.missing(Isolation::Uid),
            [
                "landlock-files",
                "landlock-bind-ports",
                "landlock-signals",
                "landlock-abstract-sockets"
            ]
        );
        assert!(BARE.missing(Isolation::None).is_empty());
    }

    #[test]
    fn levels_parse_and_print_the_same_words() {
        for l in [Isolation::Uid, Isolation::Landlock, Isolation::None] {
            assert_eq!(Isolation::parse(l.as_str()), Ok(l));
            assert_eq!(
                serde_json::to_string(&l).unwrap(),
                format!("\"{}\"", l.as_str())
            );
        }
        assert!(Isolation::parse("root").unwrap_err().contains("\"root\""));
    }
}
