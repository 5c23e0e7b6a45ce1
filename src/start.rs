//! The start pipeline, off the actor: everything between "start this agent" and a running
//! child (port re-check and move, provisioning of HOME and config, admission against
//! MemAvailable, the start gate, the cgroup, the spawn), and the helpers that kill a child
//! nobody wants any more. The AgentActor decides when to start and what a result means; this
//! module only does the work and reports back.

use crate::context::NodeContext;
use crate::error::FleetError;
use crate::isolation::confine::Confinement;
use crate::isolation::tenant_fs::{self, Identity};
use crate::isolation::{sandbox, Isolation};
use crate::logs::writer::LogWriter;
use crate::messages::agent::{SpawnFailure, Spawned};
use crate::messages::fleet::FleetMsg;
use crate::process::owner::{self, OwnerEvent};
use crate::process::spawn::SpawnRequest;
use crate::provision::{self, AgentPaths};
use crate::spec::FleetSpec;
use crate::spec::DEFAULT_PIDS_MAX;
use ractor::ActorRef;
use std::os::fd::AsRawFd;
use std::os::unix::fs::DirBuilderExt;
use std::sync::Arc;
use std::time::Duration;

/// A child whose actor is gone. No log (its HOME may be being purged): kill its group and
/// reap it. It started a moment ago; its helpers, if any, are in its group or its cgroup.
pub fn kill_orphan(sp: Spawned) {
    let mut child = sp.child;
    let _ = nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGKILL,
    );
    let cgroup = sp.cgroup;
    tokio::spawn(async move {
        let _ = child.wait().await;
        if let Some(cg) = cgroup {
            let _ = tokio::task::spawn_blocking(move || cg.kill_and_remove(Duration::from_secs(2)))
                .await;
        }
    });
}

/// The agent's log writer, counting into the node's log metrics.
pub fn open_log(ctx: &NodeContext, spec: &FleetSpec, paths: &AgentPaths) -> LogWriter {
    // The daemon's own file, outside the HOME: written with the daemon's rights.
    let mut log = LogWriter::open(paths.agent_log.clone(), spec.logs.max_bytes, spec.logs.keep);
    log.count_into(ctx.services.metrics.log_bytes.clone());
    log
}

/// A child its agent no longer wants (the start was cancelled while it spawned): an owner
/// kills it and everything it started, as for any stop, and reports to `on_event` (last
/// `TreeGone`). What it printed meanwhile goes to the agent's log.
pub fn kill_unwanted(
    sp: Spawned,
    ctx: &NodeContext,
    spec: &FleetSpec,
    paths: &AgentPaths,
    marker: String,
    on_event: impl Fn(OwnerEvent) + Send + 'static,
) {
    let log = open_log(ctx, spec, paths);
    let handle = owner::own(
        sp.child,
        marker,
        ctx.services.sweeper.clone(),
        sp.cgroup,
        log,
        on_event,
    );
    handle.kill();
}

/// A directory in the world-writable /tmp that must be `owner`'s (or the daemon's) alone:
/// one another user made first (squatting a predictable name) is removed and made again.
fn own_dir(dir: &std::path::Path, owner: Option<Identity>) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let want = owner.map_or_else(|| nix::unistd::geteuid().as_raw(), |o| o.uid);
    for _ in 0..3 {
        match std::fs::symlink_metadata(dir) {
            Ok(m) if m.is_dir() && m.uid() == want && m.mode() & 0o077 == 0 => return Ok(()),
            Ok(m) if m.is_dir() => std::fs::remove_dir_all(dir)?,
            Ok(_) => std::fs::remove_file(dir)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        match std::fs::DirBuilder::new().mode(0o700).create(dir) {
            Ok(()) => {
                if let Some(o) = owner {
                    std::os::unix::fs::lchown(dir, Some(o.uid), Some(o.gid))?;
                }
                return Ok(());
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(std::io::Error::other("another user keeps re-creating it"))
}

/// Looks at a taken base port this many times, 100 ms apart, before moving the agent.
const PORT_RECHECKS: u32 = 10;

/// Everything between "start" and a running child, off the actor.
pub struct StartJob {
    pub fleet: String,
    pub agent: String,
    pub ctx: Arc<NodeContext>,
    pub spec: Arc<FleetSpec>,
    pub paths: AgentPaths,
    pub port: u16,
    pub token: String,
    pub marker: String,
    pub gen: u64,
    /// Its uid lease (`isolation = "uid"`).
    pub uid: Option<u32>,
    /// The agent's current incarnation: once it is not `gen`, this start is cancelled.
    pub current: tokio::sync::watch::Receiver<u64>,
    /// Where a port move is asked for (the fleet keeps the recipe, the node the lease).
    pub fleet_ref: ActorRef<FleetMsg>,
    /// Its heap cap as raised after out-of-memory aborts (`heap_raise`).
    pub heap_mib: Option<u32>,
}

impl StartJob {
    pub async fn run(mut self) -> Result<Spawned, SpawnFailure> {
        let fail = |reason: String| SpawnFailure {
            reason,
            permanent: false,
        };
        // A fault in what was asked for: no retry can fix it.
        let fail_e = |e: FleetError| SpawnFailure {
            permanent: matches!(e, FleetError::Spec { .. } | FleetError::InvalidId { .. }),
            reason: e.to_string(),
        };
        let permanent = |reason: String| SpawnFailure {
            reason,
            permanent: true,
        };
        let level = self
            .ctx
            .host
            .resolve(self.spec.isolation)
            .map_err(|r| permanent(format!("isolation: {r}")))?;
        let owner = match level {
            Isolation::Uid => Some(Identity::of_uid(self.uid.ok_or_else(|| {
                permanent("isolation uid: the agent has no uid lease".into())
            })?)),
            _ => None,
        };
        self.port = self.free_port().await.map_err(|e| fail(e.to_string()))?;
        let (program, args, node_bin_dir) = match &self.spec.command {
            Some(cmd) => (cmd[0].clone().into(), cmd[1..].to_vec(), None),
            None => {
                // A version that is not installed stays so until an operator installs it.
                let inst = provision::resolve_openclaw_version(
                    self.ctx.config.openclaw_bin.as_deref(),
                    self.spec.openclaw_version_of(&self.agent),
                )
                .map_err(|e| permanent(e.to_string()))?;
                let (program, args) = provision::gateway_invocation(&inst, &self.spec.node_flags)
                    .map_err(permanent)?;
                (program, args, inst.node_bin_dir)
            }
        };
        let (paths, spec, token, port) = (
            self.paths.clone(),
            self.spec.clone(),
            self.token.clone(),
            self.port,
        );
        let marker = self.marker.clone();
        let agent = self.agent.clone();
        let stride = self.spec.effective_stride();
        let heap_mib = self.heap_mib;
        let public_url = self.ctx.config.public_url.clone();
        let (fleet_name, agent_name) = (self.fleet.clone(), self.agent.clone());
        let provision_err = move |reason: String| FleetError::Provision {
            fleet: fleet_name.clone(),
            agent: agent_name.clone(),
            reason,
        };
        let perr = provision_err.clone();
        let node_dir = node_bin_dir.clone();
        let exe = program.clone();
        let env =
            tokio::task::spawn_blocking(move || -> Result<Vec<(String, String)>, FleetError> {
                provision::ensure_home(&paths, owner)?;
                // After ensure_home, which opens the fleet directory to other uids: a sibling
                // that created it a moment ago may not have yet.
                if let Some(id) = owner {
                    let unreachable = |r: String| FleetError::Spec {
                        reason: format!("{}/{agent}: {r}", spec.name),
                    };
                    tenant_fs::check_reachable(&paths.home, id, "HOME").map_err(unreachable)?;
                    if exe.is_absolute() {
                        tenant_fs::check_reachable(&exe, id, "program").map_err(unreachable)?;
                    }
                }
                // What was accepted, never the file as it is now (an edit takes a reload).
                let template = match (&spec.template_config, &spec.template) {
                    (None, Some(t)) => {
                        let mut s = (*spec).clone();
                        s.template_config = Some(provision::load_template(t)?);
                        provision::effective_template(&s, &agent)
                    }
                    _ => provision::effective_template(&spec, &agent),
                };
                let extra = provision::extra_env(&spec, &agent)?;
                let hook_secret = crate::webhooks::secret(&token);
                let enforced = provision::Enforced {
                    token: &token,
                    port,
                    log_file: &paths.openclaw_log,
                    log_max_bytes: spec.logs.max_bytes,
                    profile: spec.profile,
                    stride,
                    webhook_secret: &hook_secret,
                    public: public_url
                        .as_deref()
                        .map(|u| (u, spec.name.as_str(), agent.as_str())),
                };
                let (config, warnings) = provision::render_config(template.as_ref(), &enforced)?;
                for w in warnings {
                    tracing::warn!(fleet = %spec.name, "{w}");
                }
                // With the tenant's own file rights: its HOME is its to rearrange.
                tenant_fs::as_tenant(owner, || -> Result<(), FleetError> {
                    provision::place_tenant_files(&paths, spec.tenant(&agent))?;
                    provision::write_config_atomic(&paths.config, &config)
                })
                .map_err(|e| perr(format!("switching to the agent's uid: {e}")))??;
                Ok(provision::agent_env(&provision::EnvInput {
                    paths: &paths,
                    port,
                    node_bin_dir: node_dir.as_deref(),
                    profile: spec.profile,
                    marker: &marker,
                    extra: &extra,
                    runs_openclaw: spec.runs_openclaw(),
                    heap_mib,
                }))
            })
            .await
            .map_err(|e| fail(format!("provisioning task failed: {e}")))?
            .map_err(fail_e)?;
        self.admit().map_err(|e| fail(e.to_string()))?;
        // Only expensive starts (OpenClaw by default) queue behind the gate.
        let permit = if self.spec.gated() {
            use std::sync::atomic::Ordering;
            self.ctx
                .services
                .gate_waiting
                .fetch_add(1, Ordering::Relaxed);
            let gen = self.gen;
            let mut current = self.current.clone();
            let p = tokio::select! {
                p = self.ctx.services.gate.clone().acquire_owned() => Some(p),
                _ = current.wait_for(|g| *g != gen) => None,
            };
            self.ctx
                .services
                .gate_waiting
                .fetch_sub(1, Ordering::Relaxed);
            match p {
                None => return Err(fail("start cancelled".into())),
                Some(p) => Some(p.map_err(|_| fail("start gate closed".into()))?),
            }
        } else {
            None
        };
        // Last look before a process exists: a stop that came meanwhile wins.
        if *self.current.borrow() != self.gen {
            return Err(fail("start cancelled".into()));
        }
        // Created last, so a start that waits at the gate or fails before leaves no cgroup.
        let mut cgroup = match &self.ctx.services.cgroups {
            Some(tree) => Some(
                tree.create(&self.fleet, &self.agent, self.gen, &self.spec.cgroup)
                    .map_err(|e| fail(format!("cgroup: {e}")))?,
            ),
            None => None,
        };
        let confine = self
            .confinement(level, owner, &program, &args, node_bin_dir.as_deref(), &env)
            .map_err(|r| fail(provision_err(r).to_string()))?;
        let req = SpawnRequest {
            program: program.clone(),
            args,
            env,
            confine,
            ksm: self
                .spec
                .merges_pages(crate::process::procfs::ksm_available()),
            cwd: self.paths.home.clone(),
            cgroup_procs: cgroup
                .as_ref()
                .and_then(|c| c.procs_fd())
                .map(|fd| fd.as_raw_fd()),
        };
        let spawned = self.ctx.services.spawner.spawn(req).await;
        if let Some(cg) = &mut cgroup {
            cg.spawned();
        }
        let child = match spawned {
            Ok(child) => child,
            Err(e) => {
                if let Some(cg) = cgroup {
                    let _ = tokio::task::spawn_blocking(move || {
                        cg.kill_and_remove(Duration::from_secs(2))
                    })
                    .await;
                }
                return Err(fail(format!("cannot run {}: {e}", program.display())));
            }
        };
        Ok(Spawned {
            child,
            port: self.port,
            permit,
            cgroup,
        })
    }

    /// What the agent's process is confined with at `level` (see `isolation`).
    fn confinement(
        &self,
        level: Isolation,
        owner: Option<Identity>,
        program: &std::path::Path,
        args: &[String],
        node_bin_dir: Option<&std::path::Path>,
        env: &[(String, String)],
    ) -> Result<Confinement, String> {
        if level == Isolation::None {
            return Ok(Confinement::default());
        }
        let uid_mode = level == Isolation::Uid;
        let resolved = crate::process::spawn::resolve_program(program, env)
            .unwrap_or_else(|_| program.to_path_buf());
        // A private /tmp (the agent's TMPDIR mounted over it) would hide a HOME that lives
        // under /tmp itself.
        let private_tmp = uid_mode && !self.paths.home.starts_with("/tmp");
        let mut extra_rw = Vec::new();
        if !private_tmp {
            // OpenClaw keeps lifecycle locks in a /tmp directory named after the uid, whatever
            // TMPDIR says: made here, the agent's own, and (with Landlock) all it gets of /tmp.
            let uid = owner.map_or_else(|| nix::unistd::geteuid().as_raw(), |o| o.uid);
            let locks = std::path::PathBuf::from(format!("/tmp/openclaw-state-locks-{uid}"));
            own_dir(&locks, owner).map_err(|e| format!("{}: {e}", locks.display()))?;
            extra_rw.push(locks);
        }
        let landlock = if self.ctx.host.landlock_abi > 0 {
            let plan = sandbox::plan(&sandbox::AgentScope {
                home: &self.paths.home,
                tmp: &self.paths.tmp,
                program_paths: sandbox::program_paths(&resolved, args, node_bin_dir),
                extra_rw,
                first_port: self.port,
                ports: self.spec.effective_stride(),
            });
            sandbox::build(&plan)?
        } else {
            None
        };
        let pids = self.spec.cgroup.pids_max.unwrap_or(DEFAULT_PIDS_MAX);
        let cgroup_pids = self
            .ctx
            .services
            .cgroups
            .as_ref()
            .is_some_and(|t| t.controllers().pids);
        let nproc = if uid_mode {
            // Its uid is its alone: the limit is the agent's own.
            Some(pids)
        } else if !cgroup_pids {
            // Shared with the daemon and every sibling: only a floor that keeps a fork bomb
            // from taking the whole host (siblings can still be starved; a delegated cgroup
            // gives each agent its own pids.max).
            Some(crate::process::procfs::tasks_of_uid(nix::unistd::getuid().as_raw()) + pids)
        } else {
            None
        };
        Ok(Confinement {
            identity: owner,
            drop_privileges: true,
            landlock,
            nproc,
            private_tmp: private_tmp.then(|| self.paths.tmp.clone()),
        })
    }

    /// Node admission: refuse a start that would take MemAvailable below the reserve.
    fn admit(&self) -> Result<(), FleetError> {
        let Some(avail) = crate::memory::mem_available(&self.ctx.config.meminfo_path) else {
            return Ok(()); // no reading, no basis to refuse
        };
        let estimate = crate::memory::estimate(&self.spec, &self.ctx.observed_rss(&self.fleet));
        crate::memory::admit(avail, self.ctx.config.memory_reserve, estimate)
            .map_err(|reason| FleetError::NotAdmitted { reason })
    }

    /// The agent's base port, or a new block when another process now holds it (checked at
    /// lease time and again before every start).
    async fn free_port(&self) -> Result<u16, FleetError> {
        // A previous process of this agent that is still exiting holds the port for a few
        // milliseconds; only a port that stays taken is someone else's.
        for _ in 0..PORT_RECHECKS {
            if crate::ports::port_is_bindable(self.port) {
                return Ok(self.port);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tracing::warn!(fleet = %self.fleet, agent = %self.agent, port = self.port, "base port is bound by another process; leasing a new block");
        // Through the lease's owner (fleet, then node), so the recipe and the registry know.
        let agent = self.agent.clone();
        match self
            .fleet_ref
            .call(
                |r| crate::messages::fleet::FleetMsg::MovePort { agent, reply: r },
                Some(Duration::from_secs(15)),
            )
            .await
        {
            Ok(ractor::rpc::CallResult::Success(r)) => r,
            _ => Err(FleetError::Timeout {
                what: "the fleet to move the agent's port".into(),
            }),
        }
    }
}
