//! Embedding Fleet Commander in a larger Rust server: the server owns its tokio runtime,
//! starts a node inside it, drives it through typed async methods (no REPL, no control
//! socket), prints the node's lifecycle events, and shuts it down cleanly.
//!
//! ```text
//! cargo build --bin fleet-stub-agent
//! cargo run --example embed -- [--agents N] [--state-dir DIR] [--stub PATH] [--port-range A-B]
//! ```
//!
//! The fleet runs stand-in agents (`fleet-stub-agent`, found beside this example's binary or
//! through `$FLEET_STUB_AGENT`), so no OpenClaw install is needed. `tests/embedding.rs` runs
//! `run` below in the test suite.

use anyhow::{bail, Context, Result};
use fleet_commander::admin::render::render_event;
use fleet_commander::messages::events::Event;
use fleet_commander::ports::PortRange;
use fleet_commander::spec::FleetSpec;
use fleet_commander::state::AgentState;
use fleet_commander::{Node, NodeConfig};
use std::collections::BTreeSet;
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;
use tokio::sync::broadcast::{error::RecvError, Receiver};

/// What the example is asked to do.
pub struct Options {
    pub state_dir: PathBuf,
    pub agents: u32,
    /// The stand-in agent program.
    pub stub: PathBuf,
    /// Ports leased to agents (`None`: the library's default range).
    pub port_range: Option<String>,
}

/// What the run did, for the caller to check.
pub struct Summary {
    pub node_id: String,
    /// Event lines printed.
    pub events: usize,
}

const FLEET: &str = "demo";
const WAIT: Duration = Duration::from_secs(30);

/// Starts a node, runs a fleet of stand-in agents through start, one restart and a stop,
/// printing every event to `out`, then shuts the node down. Must run inside a tokio runtime.
pub async fn run(opts: Options, out: &mut (dyn Write + Send)) -> Result<Summary> {
    let mut config = NodeConfig::new(&opts.state_dir);
    if let Some(r) = &opts.port_range {
        config.port_range = PortRange::parse(r).map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    let node = Node::start(config)
        .await
        .with_context(|| format!("starting a node on {}", opts.state_dir.display()))?;
    writeln!(
        out,
        "node {} started on {} ({}, default isolation {})",
        node.node_id(),
        opts.state_dir.display(),
        node.containment().as_str(),
        node.default_isolation()
    )?;
    // Subscribe before the first command so no transition is missed.
    let mut events = node.subscribe();
    let mut printed = 0;

    let outcome = async {
        let mut spec = FleetSpec::new(FLEET);
        spec.agents = FleetSpec::numbered_agents(opts.agents);
        spec.command = Some(vec![opts.stub.display().to_string(), "--no-helper".into()]);
        spec.stride = Some(1);
        spec.health.interval_ms = 500;
        spec.stop_timeout_ms = 5_000;
        node.create_fleet(spec).await?;
        let all: BTreeSet<String> = FleetSpec::numbered_agents(opts.agents)
            .into_iter()
            .collect();
        until_running(&mut events, out, &mut printed, all).await?;

        for row in node.status(Some(FLEET), None).await? {
            writeln!(
                out,
                "status {}/{}: {} pid={} port={}",
                row.fleet,
                row.agent,
                row.state,
                row.pid.map_or("-".into(), |p| p.to_string()),
                row.port.map_or("-".into(), |p| p.to_string()),
            )?;
        }

        node.restart_agent(FLEET, "agent-1").await?;
        until_running(
            &mut events,
            out,
            &mut printed,
            BTreeSet::from(["agent-1".to_string()]),
        )
        .await?;

        // Returns once every agent's process tree is gone.
        node.stop_fleet(FLEET).await?;
        anyhow::Ok(())
    }
    .await;

    // Shut down whatever happened above: an embedder must never leave agents behind.
    node.shutdown().await;
    while let Ok(ev) = events.try_recv() {
        print_event(out, &mut printed, &ev)?;
    }
    outcome?;
    writeln!(out, "node stopped; {printed} events")?;
    Ok(Summary {
        node_id: node.node_id().to_string(),
        events: printed,
    })
}

fn print_event(out: &mut (dyn Write + Send), printed: &mut usize, ev: &Event) -> Result<()> {
    writeln!(out, "event {}", render_event(ev, false))?;
    *printed += 1;
    Ok(())
}

/// Prints events until each agent in `waiting` has reached `running`.
async fn until_running(
    events: &mut Receiver<Event>,
    out: &mut (dyn Write + Send),
    printed: &mut usize,
    mut waiting: BTreeSet<String>,
) -> Result<()> {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !waiting.is_empty() {
        let ev = match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Ok(ev)) => ev,
            Ok(Err(RecvError::Lagged(n))) => {
                writeln!(out, "({n} events missed)")?;
                continue;
            }
            Ok(Err(RecvError::Closed)) => bail!("the node's event channel closed"),
            Err(_) => bail!("not running within {WAIT:?}: {waiting:?}"),
        };
        print_event(out, printed, &ev)?;
        if let Event::Agent(t) = &ev {
            if t.fleet == FLEET && t.new == AgentState::Running {
                waiting.remove(&t.agent);
            }
        }
    }
    Ok(())
}

/// `$FLEET_STUB_AGENT`, else `fleet-stub-agent` in the directory above this example's binary
/// (`target/<profile>/examples/embed` → `target/<profile>/fleet-stub-agent`).
fn find_stub() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("FLEET_STUB_AGENT") {
        return Ok(p.into());
    }
    let exe = std::env::current_exe().context("locating this example's binary")?;
    let stub = exe
        .parent()
        .and_then(|d| d.parent())
        .map(|d| d.join("fleet-stub-agent"))
        .context("no parent directory for the stub")?;
    if !stub.is_file() {
        bail!(
            "stand-in agent not found at {}: run `cargo build --bin fleet-stub-agent` or set FLEET_STUB_AGENT",
            stub.display()
        );
    }
    Ok(stub)
}

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let mut agents = 3;
    let mut state_dir = None;
    let mut stub = None;
    let mut port_range = None;
    while let Some(a) = args.next() {
        let mut value = || args.next().with_context(|| format!("{a}: missing value"));
        match a.as_str() {
            "--agents" => agents = value()?.parse().context("--agents: expected a number")?,
            "--state-dir" => state_dir = Some(PathBuf::from(value()?)),
            "--stub" => stub = Some(PathBuf::from(value()?)),
            "--port-range" => port_range = Some(value()?),
            other => bail!("unknown argument {other:?} (see the example's header)"),
        }
    }
    // Without --state-dir the example works in a fresh directory it deletes afterwards.
    let temp = tempfile::Builder::new().prefix("fleet-embed").tempdir()?;
    let opts = Options {
        state_dir: state_dir.unwrap_or_else(|| temp.path().join("state")),
        agents,
        stub: match stub {
            Some(s) => s,
            None => find_stub()?,
        },
        port_range,
    };
    // The host server's own runtime; the node is one more set of tasks inside it.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("host-server")
        .build()?;
    let summary = rt.block_on(run(opts, &mut std::io::stdout()))?;
    eprintln!("node {} shut down cleanly", summary.node_id);
    Ok(())
}
