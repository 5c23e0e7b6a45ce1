//! Peer supervisors as bench subjects, each with its own defaults and a private home under the
//! bench's temporary directory: supervisord 4.3 (one `[program:x]` per child, added with
//! `supervisorctl update`), PM2 7 (an ecosystem file with N apps, private `PM2_HOME`) and s6
//! 2.11 (one service directory per child under a private `s6-svscan`). The first two are
//! installed by `scripts/install-peers.sh`, s6 by its Debian package; every process they leave
//! is ended by pid.

use super::{probe, Subject};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Where `scripts/install-peers.sh` puts the peers.
pub fn peers_home() -> PathBuf {
    if let Some(p) = std::env::var_os("FLEET_PEERS_HOME") {
        return PathBuf::from(p);
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    PathBuf::from(home).join(".cache/fleet-commander/peers")
}

/// Runs `cmd` to completion within `timeout`, killing it by pid past that. Returns stdout.
pub fn run(cmd: &mut Command, what: &str, timeout: Duration) -> Result<String> {
    let out_path = std::env::temp_dir().join(format!(
        "fleet-bench-out-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    ));
    let out = std::fs::File::create(&out_path).context("temp output file")?;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .spawn()
        .with_context(|| format!("starting {what}"))?;
    let Some(status) = exit_within(&mut child, timeout)? else {
        let _ = std::fs::remove_file(&out_path);
        bail!(
            "{what}: no exit within {timeout:?}, killed pid {}",
            child.id()
        );
    };
    let text = std::fs::read_to_string(&out_path).unwrap_or_default();
    let _ = std::fs::remove_file(&out_path);
    if !status.success() {
        bail!("{what}: {status}: {}", text.trim());
    }
    Ok(text)
}

/// Waits up to `timeout` for `child` to exit; past that kills and reaps it and returns `None`.
fn exit_within(child: &mut Child, timeout: Duration) -> Result<Option<std::process::ExitStatus>> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(st) = child.try_wait()? {
            return Ok(Some(st));
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn wait_gone(pid: u32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while probe::alive(pid) {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    true
}

fn kill_pid(pid: u32) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::SIGKILL,
    );
}

// ---------------------------------------------------------------------------------------

pub struct Supervisord {
    child: Child,
    ctl: PathBuf,
    conf: PathBuf,
    dir: PathBuf,
    command: Vec<String>,
}

impl Supervisord {
    pub fn start(dir: &Path, command: Vec<String>) -> Result<Supervisord> {
        let bin = peers_home().join("venv/bin");
        let (d, ctl) = (bin.join("supervisord"), bin.join("supervisorctl"));
        if !d.exists() {
            bail!(
                "supervisord not installed at {}: run scripts/install-peers.sh",
                d.display()
            );
        }
        std::fs::create_dir_all(dir.join("conf.d"))?;
        std::fs::create_dir_all(dir.join("childlogs"))?;
        let conf = dir.join("supervisord.conf");
        let p = |s: &str| dir.join(s).display().to_string();
        std::fs::write(
            &conf,
            format!(
                "[unix_http_server]\nfile={sock}\n\n[supervisord]\nnodaemon=true\nlogfile={log}\n\
                 pidfile={pid}\nchildlogdir={cl}\n\n[rpcinterface:supervisor]\n\
                 supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface\n\n\
                 [supervisorctl]\nserverurl=unix://{sock}\n\n[include]\nfiles = {inc}/*.conf\n",
                sock = p("supervisor.sock"),
                log = p("supervisord.log"),
                pid = p("supervisord.pid"),
                cl = p("childlogs"),
                inc = p("conf.d"),
            ),
        )?;
        let out = std::fs::File::create(dir.join("supervisord.out"))?;
        let child = Command::new(&d)
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {}", d.display()))?;
        let s = Supervisord {
            child,
            ctl,
            conf,
            dir: dir.to_path_buf(),
            command,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while s.ctl(&["pid"], Duration::from_secs(5)).is_err() {
            if Instant::now() >= deadline {
                bail!("supervisord did not answer supervisorctl within 20 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(s)
    }

    fn ctl(&self, args: &[&str], timeout: Duration) -> Result<String> {
        run(
            Command::new(&self.ctl).arg("-c").arg(&self.conf).args(args),
            &format!("supervisorctl {}", args.join(" ")),
            timeout,
        )
    }
}

impl Subject for Supervisord {
    fn name(&self) -> String {
        "supervisord".into()
    }
    fn supervisor_pids(&self) -> Vec<u32> {
        vec![self.child.id()]
    }
    fn add(&mut self, ports: &[u16]) -> Result<()> {
        let cmd = shell_words::join(&self.command);
        let mut conf = String::new();
        for (i, p) in ports.iter().enumerate() {
            conf.push_str(&format!(
                "[program:c{i}]\ncommand={cmd}\nenvironment=OPENCLAW_GATEWAY_PORT=\"{p}\"\n\n"
            ));
        }
        std::fs::write(self.dir.join("conf.d/bench.conf"), conf)?;
        let out = self.ctl(&["update"], Duration::from_secs(300))?;
        if !out.contains("added") {
            bail!("supervisorctl update added nothing: {}", out.trim());
        }
        Ok(())
    }
    fn ports(&mut self, _n: usize, given: &[u16]) -> Result<Option<Vec<u16>>> {
        Ok(Some(given.to_vec()))
    }
    fn stop_all(&mut self) -> Result<()> {
        self.ctl(&["stop", "all"], Duration::from_secs(300))
            .map(|_| ())
    }
    fn shutdown(&mut self) -> Result<()> {
        let _ = self.ctl(&["shutdown"], Duration::from_secs(30));
        let pid = self.child.id();
        if exit_within(&mut self.child, Duration::from_secs(30))?.is_none() {
            bail!("supervisord pid {pid} ignored shutdown for 30 s: killed");
        }
        Ok(())
    }
}

impl Drop for Supervisord {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

// ---------------------------------------------------------------------------------------

pub struct Pm2 {
    bin: PathBuf,
    home: PathBuf,
    dir: PathBuf,
    god: u32,
    command: Vec<String>,
}

impl Pm2 {
    pub fn start(dir: &Path, command: Vec<String>) -> Result<Pm2> {
        let bin = peers_home().join("pm2/node_modules/.bin/pm2");
        if !bin.exists() {
            bail!(
                "pm2 not installed at {}: run scripts/install-peers.sh",
                bin.display()
            );
        }
        let home = dir.join("pm2home");
        std::fs::create_dir_all(&home)?;
        let mut p = Pm2 {
            bin,
            home,
            dir: dir.to_path_buf(),
            god: 0,
            command,
        };
        // `pm2 ping` starts the daemon (the "God" process) and returns once it answers.
        p.pm2(&["ping"], Duration::from_secs(60))?;
        let pid_file = p.home.join("pm2.pid");
        let text = std::fs::read_to_string(&pid_file)
            .with_context(|| format!("reading {}", pid_file.display()))?;
        p.god = text
            .trim()
            .parse()
            .with_context(|| format!("{}: not a pid: {text:?}", pid_file.display()))?;
        Ok(p)
    }

    fn pm2(&self, args: &[&str], timeout: Duration) -> Result<String> {
        run(
            Command::new(&self.bin)
                .args(args)
                .env("PM2_HOME", &self.home)
                .env("PM2_DISABLE_VERSION_CHECK", "true"),
            &format!("pm2 {}", args.join(" ")),
            timeout,
        )
    }
}

impl Subject for Pm2 {
    fn name(&self) -> String {
        "pm2".into()
    }
    fn supervisor_pids(&self) -> Vec<u32> {
        vec![self.god]
    }
    fn add(&mut self, ports: &[u16]) -> Result<()> {
        let apps: Vec<serde_json::Value> = ports
            .iter()
            .enumerate()
            .map(|(i, p)| {
                serde_json::json!({
                    "name": format!("c{i}"),
                    "script": self.command[0],
                    "args": self.command[1..],
                    "interpreter": "none",
                    "env": { "OPENCLAW_GATEWAY_PORT": p.to_string() },
                })
            })
            .collect();
        let eco = self.dir.join("ecosystem.config.js");
        std::fs::write(
            &eco,
            format!(
                "module.exports = {};\n",
                serde_json::json!({ "apps": apps })
            ),
        )?;
        self.pm2(
            &["start", &eco.display().to_string()],
            Duration::from_secs(600),
        )
        .map(|_| ())
    }
    fn ports(&mut self, _n: usize, given: &[u16]) -> Result<Option<Vec<u16>>> {
        Ok(Some(given.to_vec()))
    }
    fn stop_all(&mut self) -> Result<()> {
        self.pm2(&["stop", "all"], Duration::from_secs(600))
            .map(|_| ())
    }
    fn shutdown(&mut self) -> Result<()> {
        let r = self.pm2(&["kill"], Duration::from_secs(120));
        if !wait_gone(self.god, Duration::from_secs(10)) {
            kill_pid(self.god);
            bail!("pm2 daemon pid {} outlived `pm2 kill`: killed", self.god);
        }
        r.map(|_| ())
    }
}

impl Drop for Pm2 {
    fn drop(&mut self) {
        if self.god > 0 && probe::alive(self.god) {
            kill_pid(self.god);
        }
    }
}

// ---------------------------------------------------------------------------------------

/// s6 2.11 (Debian package `s6`): one `s6-svscan` over a scan directory, one service
/// directory per child with a `run` script, picked up by `s6-svscanctl -a`. Its supervisor
/// is s6-svscan plus one `s6-supervise` per child, so memory counts all of them.
pub struct S6 {
    child: Child,
    scandir: PathBuf,
    dir: PathBuf,
    command: Vec<String>,
    services: Vec<PathBuf>,
}

/// Services one bench s6-svscan may supervise (its default, 500, is below N = 1000).
const S6_MAX_SERVICES: usize = 12_000;

/// `name` on the PATH, if any.
fn on_path(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

impl S6 {
    pub fn start(dir: &Path, command: Vec<String>) -> Result<S6> {
        let Some(svscan) = on_path("s6-svscan") else {
            bail!("s6 is not installed (Debian: apt-get install s6)");
        };
        let scandir = dir.join("scan");
        std::fs::create_dir_all(&scandir)?;
        std::fs::create_dir_all(dir.join("staging"))?;
        let out = std::fs::File::create(dir.join("s6-svscan.out"))?;
        // -c: s6-svscan supervises at most 500 services by default; a thousand need more. Its
        // tables are sized by this up front, which the memory figure (N minus 0) leaves out.
        let child = Command::new(&svscan)
            .arg("-c")
            .arg(S6_MAX_SERVICES.to_string())
            .arg(&scandir)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {}", svscan.display()))?;
        let s = S6 {
            child,
            scandir,
            dir: dir.to_path_buf(),
            command,
            services: Vec::new(),
        };
        let control = s.scandir.join(".s6-svscan/control");
        let deadline = Instant::now() + Duration::from_secs(20);
        while !control.exists() {
            if Instant::now() >= deadline {
                bail!("s6-svscan did not create {} within 20 s", control.display());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(s)
    }

    /// Writes one command byte to a supervisor's control FIFO, as `s6-svc` does.
    fn svc(service: &Path, cmd: &[u8]) -> Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let fifo = service.join("supervise/control");
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&fifo)
            .with_context(|| format!("opening {}", fifo.display()))?;
        f.write_all(cmd)
            .with_context(|| format!("writing {}", fifo.display()))
    }
}

impl Subject for S6 {
    fn name(&self) -> String {
        "s6".into()
    }
    fn supervisor_pids(&self) -> Vec<u32> {
        let root = self.child.id();
        let mut pids = vec![root];
        pids.extend(
            fleet_commander::process::procfs::scan()
                .into_iter()
                .filter(|p| p.ppid == root && p.comm == "s6-supervise")
                .map(|p| p.pid),
        );
        pids
    }
    fn add(&mut self, ports: &[u16]) -> Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let cmd = shell_words::join(&self.command);
        for (i, p) in ports.iter().enumerate() {
            // Made whole outside the scan directory, then moved in: s6-svscan never sees a
            // half-written service.
            let staged = self.dir.join(format!("staging/c{i}"));
            std::fs::create_dir_all(&staged)?;
            let run = staged.join("run");
            std::fs::write(
                &run,
                format!("#!/bin/sh\nOPENCLAW_GATEWAY_PORT={p} exec {cmd}\n"),
            )?;
            std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o755))?;
            let live = self.scandir.join(format!("c{i}"));
            std::fs::rename(&staged, &live)?;
            self.services.push(live);
        }
        run(
            Command::new("s6-svscanctl").arg("-a").arg(&self.scandir),
            "s6-svscanctl -a",
            Duration::from_secs(60),
        )
        .map(|_| ())
    }
    fn ports(&mut self, _n: usize, given: &[u16]) -> Result<Option<Vec<u16>>> {
        Ok(Some(given.to_vec()))
    }
    fn stop_all(&mut self) -> Result<()> {
        for s in &self.services {
            Self::svc(s, b"d")?;
        }
        Ok(())
    }
    fn shutdown(&mut self) -> Result<()> {
        let pids = self.supervisor_pids();
        // -t: bring every service down and exit.
        let r = run(
            Command::new("s6-svscanctl").arg("-t").arg(&self.scandir),
            "s6-svscanctl -t",
            Duration::from_secs(60),
        );
        if exit_within(&mut self.child, Duration::from_secs(30))?.is_none() {
            bail!("s6-svscan ignored -t for 30 s: killed");
        }
        for p in pids.into_iter().skip(1) {
            if !wait_gone(p, Duration::from_secs(5)) {
                kill_pid(p);
            }
        }
        r.map(|_| ())
    }
}

impl Drop for S6 {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            for p in self.supervisor_pids().into_iter().skip(1) {
                kill_pid(p);
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
