//! Who may use the control socket: the daemon's own user (or root), and never a process that
//! belongs to an agent, whatever its uid. An agent runs an LLM with shell tools; if it ran as
//! the daemon's user it could otherwise read every tenant's token or stop the fleet through
//! the socket. A process belongs to an agent when it, or any of its ancestors, lives in the
//! agents' PID namespace (every agent and everything it starts, nested namespaces included),
//! is an agent's main process, or carries an agent's marker in its environment.

use std::os::unix::fs::MetadataExt;

/// How far up the parent chain to look (deeper chains are refused: no operator's shell is
/// nested that deep).
const MAX_ANCESTORS: usize = 128;

/// What the check needs to know about the node.
pub struct Agents<'a> {
    /// Host pid of the agents' PID namespace's init (0: no namespace).
    pub guardian: u32,
    /// Main pids of the agents now, with their names.
    pub roots: &'a [(u32, String)],
}

fn pid_ns(pid: u32) -> Option<u64> {
    std::fs::metadata(format!("/proc/{pid}/ns/pid"))
        .ok()
        .map(|m| m.ino())
}

fn ppid(pid: u32) -> Option<u32> {
    crate::process::procfs::read_proc(pid).map(|p| p.ppid)
}

/// Why a connection from `pid` (the peer's pid as the kernel gave it) is refused, if it is.
pub fn refusal(pid: i32, agents: &Agents) -> Option<String> {
    if pid <= 0 {
        // The peer is outside our PID namespace (a parent's): it is no agent of ours.
        return None;
    }
    let pid = pid as u32;
    let agents_ns = (agents.guardian != 0)
        .then(|| pid_ns(agents.guardian))
        .flatten();
    let me = std::process::id();
    let mut at = pid;
    let mut reached_top = false;
    for _ in 0..MAX_ANCESTORS {
        if at == me || at <= 1 {
            reached_top = true;
            break;
        }
        if agents_ns.is_some() && pid_ns(at) == agents_ns {
            return Some("a process inside the agents' PID namespace (an agent, or something it started) may not use the control socket".into());
        }
        if let Some((_, name)) = agents.roots.iter().find(|(p, _)| *p == at) {
            return Some(format!(
                "a process of agent {name} may not use the control socket"
            ));
        }
        match ppid(at) {
            Some(p) => at = p,
            // A peer (or an ancestor) gone before it could be looked at may have been an
            // agent's short-lived child that handed the connection on: not known, not let in.
            None => break,
        }
    }
    if !reached_top {
        return Some("the peer's process ancestry could not be followed to the top (it exited, or the chain is too deep): refused, as it could be an agent's".into());
    }
    if crate::process::procfs::env_var(pid, crate::provision::MARKER_VAR).is_some() {
        return Some("a process carrying an agent's marker may not use the control socket".into());
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_agents_descendant_is_refused_and_others_are_not() {
        // A child of this test process stands in for an agent's main pid.
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        let cpid = child.id();
        let roots = vec![(cpid, "f/a".to_string())];
        let agents = Agents {
            guardian: 0,
            roots: &roots,
        };
        let why = refusal(cpid as i32, &agents).expect("the agent itself is refused");
        assert!(why.contains("agent f/a"), "{why}");
        assert_eq!(refusal(std::process::id() as i32, &agents), None);
        assert_eq!(refusal(0, &agents), None);
        let _ = child.kill();
        let _ = child.wait();
    }
}
