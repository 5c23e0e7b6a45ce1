//! fleetd: the Fleet Commander daemon. Starts a node on a state directory, serves the control
//! socket, optionally applies a spec file and runs the REPL on stdin, and stops every agent
//! gracefully on SIGTERM/SIGINT. SIGHUP re-reads the spec file.

use anyhow::{bail, Context, Result};
use clap::Parser;
use fleet_commander::admin::{repl, socket};
use fleet_commander::context::{default_socket, default_state_dir};
use fleet_commander::ports::PortRange;
use fleet_commander::{specfile, Node, NodeConfig};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;
use tokio::signal::unix::{signal, SignalKind};

#[derive(Parser, Debug)]
#[command(
    name = "fleetd",
    version,
    about = "Fleet Commander daemon: supervises fleets of OpenClaw agents as native processes"
)]
struct Args {
    /// State directory (registry, agent HOMEs, socket). Default: $FLEET_STATE_DIR, else
    /// /var/lib/fleet-commander for root, else $XDG_STATE_HOME/fleet-commander or
    /// ~/.local/state/fleet-commander.
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Control socket path. Default: fleetd.sock in the state directory.
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Declarative fleet spec (TOML) applied at start, on SIGHUP and on `reload`.
    #[arg(long)]
    spec: Option<PathBuf>,
    /// Run the REPL on stdin even when it is not a terminal.
    #[arg(long, conflicts_with = "no_repl")]
    repl: bool,
    /// Never run the REPL.
    #[arg(long)]
    no_repl: bool,
    /// Log format on stderr.
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    /// The `openclaw` binary (default: the install of scripts/install-openclaw.sh, then PATH).
    #[arg(long)]
    openclaw: Option<PathBuf>,
    /// Ports leased to agents, FIRST-LAST.
    #[arg(long, default_value = "20000-59999")]
    port_range: String,
    /// OpenClaw agents allowed to be starting at once (default: number of cores).
    #[arg(long)]
    max_concurrent_starts: Option<usize>,
    /// Do not run agents in a PID namespace even when the host allows it.
    #[arg(long)]
    no_pid_namespace: bool,
    /// Serve Prometheus metrics on this address: `PORT` alone binds loopback, `HOST:PORT` any
    /// address. Off unless given.
    #[arg(long)]
    metrics_addr: Option<String>,
    /// Refuse agent starts that would leave less than this MemAvailable, in MiB.
    #[arg(long, default_value_t = 512)]
    memory_reserve_mib: u64,
    /// Per-agent cgroups: `auto` uses the daemon's own cgroup where the host delegates
    /// cgroup v2 to it (systemd: Delegate=yes), `off` never, or a cgroup v2 directory.
    #[arg(long, default_value = "auto", value_name = "auto|off|DIR")]
    cgroup: fleet_commander::context::CgroupMode,
    /// Uids (each agent's gid equals its uid) leased to agents under `isolation = "uid"`,
    /// FIRST-LAST; none of them may belong to a user or group of the host.
    #[arg(long, default_value = fleet_commander::isolation::uids::DEFAULT_RANGE, value_parser = fleet_commander::isolation::uids::UidRange::parse)]
    agent_uids: fleet_commander::isolation::uids::UidRange,
    /// The public HTTPS base of the webhook front door: each webhook channel registers
    /// `<URL>/<fleet>/<agent>/<channel>`.
    #[arg(long, value_name = "URL")]
    public_url: Option<String>,
    /// Keep the front door's config in this directory, rewritten (and the proxy reloaded)
    /// whenever the webhook routes change.
    #[arg(long, value_name = "DIR", requires = "public_url")]
    webhooks_dir: Option<PathBuf>,
    /// The proxy the front door config is for.
    #[arg(long, default_value = "nginx", value_parser = ["nginx", "caddy"])]
    webhooks_format: String,
    /// The command that reloads the proxy (default `nginx -s reload`, or `caddy reload
    /// --config /etc/caddy/Caddyfile`).
    #[arg(long, value_name = "COMMAND")]
    webhooks_reload: Option<String>,
    /// Cluster mode: join the fleet whose desired state this etcd holds, URL[,URL…]
    /// (http://host:port). Without it, one host on its local registry.
    #[arg(
        long,
        value_name = "URL[,URL…]",
        value_delimiter = ',',
        requires = "node_name"
    )]
    etcd: Vec<String>,
    /// Cluster mode: this node's name, unique in the cluster ([a-z0-9-]).
    #[arg(long, value_name = "NAME", requires = "etcd")]
    node_name: Option<String>,
    /// Cluster mode: the node's etcd lease, in seconds (3-300). Its agents die before it
    /// can expire, even when fleetd is frozen.
    #[arg(long, default_value_t = 10, requires = "etcd")]
    lease_ttl: u64,
    /// Cluster mode: the etcd key prefix the cluster lives under.
    #[arg(long, default_value = "/fleet-commander/", requires = "etcd")]
    etcd_prefix: String,
    /// Cluster mode: etcd user (with --etcd-password-file).
    #[arg(long, requires_all = ["etcd", "etcd_password_file"])]
    etcd_user: Option<String>,
    /// Cluster mode: a file holding the etcd user's password (first line).
    #[arg(long, requires = "etcd_user")]
    etcd_password_file: Option<PathBuf>,
    /// Cluster mode, https:// endpoints: the CA certificate (PEM) that signed etcd's.
    #[arg(long, requires = "etcd")]
    etcd_ca: Option<PathBuf>,
    /// Cluster mode: this node's client certificate (PEM), for etcd's --client-cert-auth.
    #[arg(long, requires_all = ["etcd_ca", "etcd_key"])]
    etcd_cert: Option<PathBuf>,
    /// Cluster mode: the private key (PEM) of --etcd-cert.
    #[arg(long, requires = "etcd_cert")]
    etcd_key: Option<PathBuf>,
    /// Cluster mode: at most this many agents are placed on this node (default: the port
    /// range's size / 10).
    #[arg(long, requires = "etcd")]
    max_agents: Option<u64>,
    /// Cluster mode: a directory every node mounts at the same path; an agent that moves
    /// takes its HOME (sessions, memory) along through it. Without it a move keeps what
    /// etcd holds (config, token, tenant settings) and starts with a fresh HOME.
    #[arg(long, value_name = "DIR", requires = "etcd")]
    handover_dir: Option<PathBuf>,
    /// Cluster mode with --handover-dir: archive each running agent's HOME there this often
    /// (seconds, default 900; 0: never), so a node that dies hands its agents over too.
    #[arg(long, value_name = "SECS", requires = "handover_dir")]
    snapshot_every: Option<u64>,
    /// Cluster mode without the PID-namespace guardian (no root or CAP_SYS_ADMIN): a
    /// frozen fleetd's agents then outlive its lease. Refused without this flag.
    #[arg(long, requires = "etcd")]
    unfenced: bool,
    /// What an etcd outage does to this node's agents: `ride-out` keeps them running while
    /// every etcd member refuses connections (etcd down for everyone); `stop` stops them
    /// about TTL/2 into any etcd silence (for a network whose firewall rejects etcd's port
    /// instead of dropping it, which makes a cut-off node look like an outage).
    #[arg(long, value_name = "ride-out|stop", default_value = "ride-out",
          value_parser = ["ride-out", "stop"], requires = "etcd")]
    etcd_outage: String,
}

/// Exit status for a start refused on what the operator gave (a damaged registry, a bad spec,
/// a state dir or socket path that is refused, a state dir another daemon holds): EX_CONFIG,
/// which the unit file's `RestartPreventExitStatus=78` keeps from becoming a restart loop.
const EXIT_CONFIG: i32 = 78;

/// Marks an error as `EXIT_CONFIG`.
#[derive(Debug)]
struct Refused;

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("refused")
    }
}

impl std::error::Error for Refused {}

fn refused(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow::Error::new(Refused).context(e.to_string())
}

fn main() {
    match start() {
        Ok(()) => {}
        Err(e) => {
            let config = e.chain().any(|c| c.is::<Refused>());
            if config {
                // The outermost context says it all; `Refused` itself is only a marker.
                eprintln!("fleetd: {e}");
            } else {
                eprintln!("fleetd: {e:#}");
            }
            std::process::exit(if config { EXIT_CONFIG } else { 1 });
        }
    }
}

fn start() -> Result<()> {
    let args = Args::parse();
    init_tracing(&args.log_format);
    match fleet_commander::process::procfs::raise_nofile_limit() {
        Ok((old, new)) if new > old => tracing::info!(old, new, "raised RLIMIT_NOFILE"),
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "could not raise RLIMIT_NOFILE"),
    }
    one_malloc_arena();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("fleetd")
        .build()
        .context("starting the tokio runtime")?;
    rt.block_on(run(args))
}

/// glibc gives each thread that allocates an arena of its own (the runtime's workers, the
/// blocking pool's threads that come and go); a thousand agents' small, long-lived
/// allocations spread over five of them left ~5 KiB per agent in fragments (anonymous memory
/// 28.8 → 23.7 MB with 1000 agents, heaptrack's live heap 15.7 MB). One arena, before any
/// thread starts; two cores do not contend for it measurably. `MALLOC_ARENA_MAX` in the
/// environment still decides where the operator set it.
fn one_malloc_arena() {
    #[cfg(target_env = "gnu")]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only changes the allocator's tuning, before other threads exist.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 1);
        }
    }
}

fn init_tracing(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("FLEET_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour codes only for a person at a terminal, never into a journal or a file.
        .with_ansi(std::io::stderr().is_terminal());
    if format == "json" {
        b.json().init();
    } else {
        b.init();
    }
}

async fn run(args: Args) -> Result<()> {
    let state_dir = args.state_dir.clone().unwrap_or_else(default_state_dir);
    let socket_path = args
        .socket
        .clone()
        .unwrap_or_else(|| default_socket(&state_dir));
    let mut config = NodeConfig::new(&state_dir);
    config.port_range = PortRange::parse(&args.port_range).context("--port-range")?;
    config.openclaw_bin = args.openclaw.clone();
    config.pid_namespace = !args.no_pid_namespace;
    config.memory_reserve = args.memory_reserve_mib * 1024 * 1024;
    config.cgroup = args.cgroup.clone();
    config.agent_uids = args.agent_uids;
    if let Some(u) = &args.public_url {
        if let Some(why) = fleet_commander::webhooks::public_url_problem(u) {
            return Err(refused(format!("--public-url: {why}")));
        }
        config.public_url = Some(u.trim_end_matches('/').to_string());
    }
    if let Some(dir) = &args.webhooks_dir {
        let format: fleet_commander::webhooks::Format =
            args.webhooks_format.parse().map_err(refused)?;
        let reload = match &args.webhooks_reload {
            Some(c) => {
                shell_words::split(c).map_err(|e| refused(format!("--webhooks-reload: {e}")))?
            }
            None => format.default_reload(),
        };
        let dir = std::fs::canonicalize(dir)
            .map_err(|e| refused(format!("--webhooks-dir {}: {e}", dir.display())))?;
        if !dir.is_dir() {
            return Err(refused(format!(
                "--webhooks-dir {}: not a directory",
                dir.display()
            )));
        }
        config.front_door = Some(fleet_commander::context::FrontDoor {
            dir,
            format,
            reload,
        });
    }
    if let Some(n) = args.max_concurrent_starts {
        if n == 0 {
            bail!("--max-concurrent-starts must be at least 1");
        }
        config.max_concurrent_starts = n;
    }
    let spec_path = match &args.spec {
        Some(p) => {
            Some(std::fs::canonicalize(p).with_context(|| format!("--spec {}", p.display()))?)
        }
        None => None,
    };
    config.spec_path = spec_path.clone();
    // A bad spec stops the start before anything runs.
    let specs = match &spec_path {
        Some(p) => Some(specfile::load_spec(p).map_err(refused)?),
        None => None,
    };
    // Before anything else: a state dir held by another daemon is refused naming its pid
    // (the node takes the lock for good below; this look only gives the right message).
    drop(
        fleet_commander::state_dir::take(&state_dir)
            .map_err(|e| refused(format!("starting the node on {}: {e}", state_dir.display())))?,
    );
    // Before the node starts: a path that names an operator's file, or a socket another
    // daemon serves, must stop this one before it touches any agent.
    socket::check_path(&socket_path)
        .map_err(|e| refused(format!("control socket {}: {e}", socket_path.display())))?;
    // Installed before the node starts: a SIGTERM while fleets come back up (systemd stopping
    // a slow start) is then a graceful stop once the node runs, not an abrupt death.
    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let mut hup = signal(SignalKind::hangup()).context("SIGHUP handler")?;
    let cluster = match &args.node_name {
        None => None,
        Some(name) => {
            let auth = match (&args.etcd_user, &args.etcd_password_file) {
                (Some(u), Some(p)) => {
                    let text = fleet_commander::operator_file::read_text(p, 4096).map_err(|e| {
                        refused(format!("--etcd-password-file {}: it {e}", p.display()))
                    })?;
                    let pw = text.lines().next().unwrap_or("").to_string();
                    if pw.is_empty() {
                        return Err(refused(format!(
                            "--etcd-password-file {}: empty",
                            p.display()
                        )));
                    }
                    Some((u.clone(), pw))
                }
                _ => None,
            };
            // PEM files: small, regular, read once at start (a FIFO or a device is refused).
            let pem = |flag: &str, p: &PathBuf| -> anyhow::Result<Vec<u8>> {
                let b = fleet_commander::operator_file::read_bounded(p, 1024 * 1024)
                    .map_err(|e| refused(format!("{flag} {}: it {e}", p.display())))?;
                if !String::from_utf8_lossy(&b).contains("-----BEGIN ") {
                    return Err(refused(format!(
                        "{flag} {}: not a PEM file (no -----BEGIN line)",
                        p.display()
                    )));
                }
                Ok(b)
            };
            let tls = match &args.etcd_ca {
                None => None,
                Some(ca) => Some(fleet_commander::cluster::ClusterTls {
                    ca_pem: pem("--etcd-ca", ca)?,
                    identity: match (&args.etcd_cert, &args.etcd_key) {
                        (Some(c), Some(k)) => Some((pem("--etcd-cert", c)?, pem("--etcd-key", k)?)),
                        _ => None,
                    },
                }),
            };
            let c = fleet_commander::cluster::ClusterConfig {
                endpoints: args.etcd.clone(),
                node_name: name.clone(),
                prefix: args.etcd_prefix.clone(),
                lease_ttl: args.lease_ttl,
                auth,
                max_agents: args.max_agents,
                socket: socket_path.display().to_string(),
                tls,
                handover_dir: args.handover_dir.clone(),
                snapshot_every: match (&args.handover_dir, args.snapshot_every) {
                    (_, Some(0)) | (None, _) => None,
                    (Some(_), s) => Some(std::time::Duration::from_secs(s.unwrap_or(900))),
                },
                unfenced: args.unfenced,
                ride_out: args.etcd_outage == "ride-out",
            };
            c.validate().map_err(refused)?;
            config.cluster = true;
            Some(c)
        }
    };
    let node = Node::start(config).await.map_err(|e| match e {
        // The state dir, its lock or its registry: what the operator must fix.
        fleet_commander::FleetError::Store { .. } => {
            refused(format!("starting the node on {}: {e}", state_dir.display()))
        }
        other => anyhow::anyhow!("starting the node on {}: {other}", state_dir.display()),
    })?;
    tracing::info!(state_dir = %state_dir.display(), socket = %socket_path.display(), node_id = node.node_id(), "fleetd started");
    let shutdown = Arc::new(tokio::sync::Notify::new());
    let listener = socket::bind(&socket_path)
        .with_context(|| format!("binding the control socket {}", socket_path.display()))?;
    // Cluster mode: the spec file declares fleets of the cluster's desired state, written
    // into etcd (once this node can reach it) rather than applied here.
    let specs = match cluster {
        Some(c) => {
            let name = c.node_name.clone();
            if let Err(e) = fleet_commander::cluster::join(&node, c).await {
                // As a spec that cannot be applied: nothing left running, no socket left.
                node.shutdown().await;
                socket::unlink(&socket_path);
                return Err(match e {
                    // What the operator gave (or the host lacks): not worth a restart loop.
                    fleet_commander::FleetError::InvalidArgument { .. } => {
                        refused(format!("joining the cluster as node {name}: {e}"))
                    }
                    e => {
                        anyhow::Error::new(e).context(format!("joining the cluster as node {name}"))
                    }
                });
            }
            tracing::info!(node = %name, "cluster mode: desired state from etcd");
            if specs.is_some() {
                tokio::spawn(declare_when_joined(node.clone()));
            }
            None
        }
        None => specs,
    };
    tokio::spawn(socket::serve(listener, node.clone(), shutdown.clone()));
    if let Some(a) = &args.metrics_addr {
        let addr: std::net::SocketAddr = match a.parse::<u16>() {
            Ok(port) => std::net::SocketAddr::from(([127, 0, 0, 1], port)),
            Err(_) => a
                .parse()
                .with_context(|| format!("--metrics-addr {a:?}: expected PORT or HOST:PORT"))?,
        };
        let bound = node
            .serve_metrics(addr)
            .await
            .with_context(|| format!("binding the metrics address {addr}"))?;
        tracing::info!(%bound, "serving Prometheus metrics on /metrics");
    }
    if let Some(specs) = specs {
        // A spec that parses but cannot be applied is a failed start, never READY=1.
        match node.apply_spec(specs).await {
            Ok(msg) => tracing::info!("{msg}"),
            Err(e) => {
                node.shutdown().await;
                socket::unlink(&socket_path);
                return Err(refused(format!(
                    "applying the spec {}: {e}",
                    spec_path
                        .as_ref()
                        .map(|p| p.display().to_string())
                        .unwrap_or_default()
                )));
            }
        }
    }
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);

    let stdin_tty = std::io::stdin().is_terminal();
    if !args.no_repl && (args.repl || stdin_tty) {
        let node = node.clone();
        let shutdown = shutdown.clone();
        let history = state_dir.join("repl_history");
        tokio::spawn(async move {
            match repl::run(node, stdin_tty, Some(history)).await {
                repl::ReplEnd::Shutdown => shutdown.notify_one(),
                // The socket still serves: EOF on stdin does not stop the daemon.
                repl::ReplEnd::Eof => {
                    tracing::info!("stdin closed; still serving the control socket")
                }
            }
        });
    }

    loop {
        tokio::select! {
            _ = term.recv() => { tracing::info!("SIGTERM: stopping every fleet"); break; }
            _ = int.recv() => { tracing::info!("SIGINT: stopping every fleet"); break; }
            _ = shutdown.notified() => { tracing::info!("shutdown requested: stopping every fleet"); break; }
            _ = hup.recv() => {
                match &spec_path {
                    None => tracing::warn!("SIGHUP ignored: started without --spec"),
                    // In a task: a SIGTERM during a long reload is still taken at once.
                    Some(_) => {
                        let node = node.clone();
                        tokio::spawn(async move {
                            use fleet_commander::messages::command::{Command, Reply};
                            match node.execute(Command::Reload { dry_run: false }).await {
                                Reply::Error(e) => tracing::error!(error = %e, "SIGHUP reload"),
                                other => tracing::info!("SIGHUP reload: {}", fleet_commander::admin::render::render(&other, false)),
                            }
                        });
                    }
                }
            }
        }
    }
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    node.shutdown().await;
    socket::unlink(&socket_path);
    tracing::info!("fleetd stopped");
    Ok(())
}

/// Cluster mode with `--spec`: the file's fleets into etcd, retried while etcd (or this
/// node's lease) is not there yet; a file the cluster refuses is logged and left.
async fn declare_when_joined(node: fleet_commander::NodeHandle) {
    use fleet_commander::messages::command::{Command, Reply};
    use fleet_commander::FleetError;
    for _ in 0..300 {
        if node.is_shutting_down() {
            return;
        }
        match node.execute(Command::Reload { dry_run: false }).await {
            Reply::Error(FleetError::Cluster { reason }) => {
                tracing::debug!(%reason, "spec file not declared to the cluster yet; retrying")
            }
            Reply::Error(e) => {
                tracing::error!(error = %e, "the spec file was not declared to the cluster");
                return;
            }
            other => {
                tracing::info!(
                    "spec file declared to the cluster: {}",
                    fleet_commander::admin::render::render(&other, false)
                );
                return;
            }
        }
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
    tracing::error!("the spec file was not declared to the cluster: etcd stayed out of reach for 5 minutes; `reload` tries again");
}
