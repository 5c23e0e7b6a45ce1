//! fleetd as a bench subject: a real `fleetd` child on a temporary state directory, driven
//! only through its control socket (one connection per request, as `fleetctl` does).

use super::{probe, Subject};
use anyhow::{bail, Context, Result};
use fleet_commander::admin::parse::{join_words, parse_words};
use fleet_commander::messages::command::{AgentStatus, Reply};
use fleet_commander::state::AgentState;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const FLEET: &str = "bench";

pub struct Fleetd {
    child: Child,
    pub socket: PathBuf,
    exe: String,
    /// The child program and its arguments (`None`: the real gateway).
    command: Option<Vec<String>>,
    profile: Option<String>,
    agent_of_port: HashMap<u16, String>,
    /// Create the fleet with `--no-probes`.
    pub no_probes: bool,
}

impl Fleetd {
    /// Starts `fleetd` on a state directory under `dir` and waits for its socket.
    pub fn start(
        exe: &Path,
        dir: &Path,
        port_range: &str,
        command: Option<Vec<String>>,
        profile: Option<String>,
    ) -> Result<Fleetd> {
        Self::start_with(exe, dir, port_range, command, profile, &[])
    }

    /// `start` with more flags on fleetd's command line (cluster mode's `--etcd`, …).
    pub fn start_with(
        exe: &Path,
        dir: &Path,
        port_range: &str,
        command: Option<Vec<String>>,
        profile: Option<String>,
        extra: &[String],
    ) -> Result<Fleetd> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let socket = dir.join("fleetd.sock");
        let log = std::fs::File::create(dir.join("fleetd.log")).context("fleetd.log")?;
        let child = Command::new(exe)
            .arg("--state-dir")
            .arg(dir.join("state"))
            .arg("--socket")
            .arg(&socket)
            .arg("--no-repl")
            .arg("--port-range")
            .arg(port_range)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", exe.display()))?;
        let mut d = Fleetd {
            child,
            socket,
            exe: exe.display().to_string(),
            command,
            profile,
            agent_of_port: HashMap::new(),
            no_probes: false,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Reply::Fleets(_)) = d.request(&["fleet", "list"]) {
                break;
            }
            if let Ok(Some(st)) = d.child.try_wait() {
                bail!(
                    "fleetd exited with {st} before its socket answered; see {}",
                    dir.join("fleetd.log").display()
                );
            }
            if Instant::now() >= deadline {
                let _ = d.shutdown();
                bail!(
                    "fleetd socket {} did not answer within 20 s",
                    d.socket.display()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(d)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL, reaped: a node that dies without a word.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends one command (words as typed after `fleetctl`) and returns the reply.
    pub fn request(&self, words: &[&str]) -> Result<Reply> {
        let words: Vec<String> = words.iter().map(|w| w.to_string()).collect();
        let req = parse_words(&words).map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(fleet_commander::admin::client::request(&self.socket, &req)?)
    }

    /// `status [<path>] --json`; an empty path asks for every agent.
    pub fn status(&self, path: &str) -> Result<Vec<AgentStatus>> {
        let words: &[&str] = if path.is_empty() {
            &["status", "--json"]
        } else {
            &["status", path, "--json"]
        };
        match self.request(words)? {
            Reply::Status(s) => Ok(s),
            other => bail!("status {path}: unexpected reply {other:?}"),
        }
    }

    /// Creates the bench fleet with `n` agents.
    pub fn create(&self, n: usize) -> Result<()> {
        let n = n.to_string();
        let mut words = vec!["fleet", "create", FLEET, "--agents", &n];
        let cmd;
        if let Some(c) = &self.command {
            cmd = join_words(c);
            words.extend(["--command", &cmd, "--stride", "1"]);
        }
        if let Some(p) = &self.profile {
            words.extend(["--profile", p]);
        }
        if self.no_probes {
            words.push("--no-probes");
        }
        match self.request(&words)? {
            Reply::Error(e) => bail!("fleet create: {e}"),
            _ => Ok(()),
        }
    }
}

impl Subject for Fleetd {
    fn name(&self) -> String {
        "fleetd".into()
    }

    fn supervisor_pids(&self) -> Vec<u32> {
        // fleetd plus the PID-namespace guardian it forks (same argv[0]); agents are not it.
        let me = self.pid();
        let mut v = vec![me];
        let a0 = probe::argv0(me);
        v.extend(
            probe::children_of(me).into_iter().filter(|&c| {
                probe::argv0(c) == a0 || probe::argv0(c).as_deref() == Some(&self.exe)
            }),
        );
        v
    }

    fn add(&mut self, _ports: &[u16]) -> Result<()> {
        self.create(_ports.len())
    }

    fn ports(&mut self, n: usize, _given: &[u16]) -> Result<Option<Vec<u16>>> {
        let st = self.status(FLEET)?;
        let known: Vec<(u16, String)> = st
            .iter()
            .filter_map(|a| a.port.map(|p| (p, a.agent.clone())))
            .collect();
        if known.len() < n {
            return Ok(None);
        }
        self.agent_of_port = known.iter().cloned().collect();
        Ok(Some(known.into_iter().map(|(p, _)| p).collect()))
    }

    fn view_all_healthy(&mut self, n: usize) -> Result<Option<bool>> {
        let st = self.status(FLEET)?;
        let ok = st
            .iter()
            .filter(|a| a.state == AgentState::Running && a.healthy)
            .count();
        Ok(Some(ok >= n))
    }

    fn child_view(&mut self, port: u16) -> Result<Option<(Option<u32>, bool)>> {
        let Some(agent) = self.agent_of_port.get(&port) else {
            return Ok(None);
        };
        let st = self.status(&format!("{FLEET}/{agent}"))?;
        Ok(st
            .first()
            .map(|a| (a.pid, a.state == AgentState::Running && a.healthy)))
    }

    fn status_round_trip(&mut self) -> Result<Option<Duration>> {
        let t = Instant::now();
        let st = self.status("")?;
        let d = t.elapsed();
        if st.is_empty() {
            bail!("status --json returned no agents");
        }
        Ok(Some(d))
    }

    fn stop_all(&mut self) -> Result<()> {
        match self.request(&["fleet", "stop", FLEET])? {
            Reply::Error(e) => bail!("fleet stop: {e}"),
            _ => Ok(()),
        }
    }

    fn shutdown(&mut self) -> Result<()> {
        let _ = self.request(&["shutdown"]);
        // Gateways with replies in flight drain on SIGTERM up to the fleet's stop timeout
        // (30 s by default) before fleetd kills them: give it that and a margin.
        let deadline = Instant::now() + SHUTDOWN_WAIT;
        loop {
            if self.child.try_wait()?.is_some() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                bail!(
                    "fleetd pid {} ignored `shutdown` for {} s: killed",
                    self.pid(),
                    SHUTDOWN_WAIT.as_secs()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

const SHUTDOWN_WAIT: Duration = Duration::from_secs(60);

impl Drop for Fleetd {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
