//! Cluster mode: one fleet across many hosts, its desired state in a real etcd.
//!
//! Each `fleetd --etcd URL --node-name NAME` keeps its own node (actors, local registry,
//! ports, uids, HOMEs: what is per host) and runs one task here that brings it to what etcd
//! says this host should run. Desired state (fleets, specs, agents, who is stopped) lives
//! under one key prefix (`keys`); observed state (status rows) is published per node at most
//! once a second.
//!
//! - Membership: a lease per node (`--lease-ttl`, default 10 s), `d/nodes/<name>` on it.
//! - Placement: the holder of `d/leader` (created on its lease by a transaction, so never two
//!   at once) writes `d/assign/…` from `placement::place`.
//! - At most one instance: a node starts an agent only while it holds `d/claims/<agent>`,
//!   created on its lease by a transaction that succeeds only if nobody holds it; it lets go
//!   of a claim only after the agent is stopped. The claim dies with the lease, and before
//!   the lease can expire the node's agents are dead: fleetd stops them when renewals fail,
//!   and the PID-namespace guardian kills them at `fence::deadline_ms` even when fleetd is
//!   frozen (`process::spawn::Fence`), which also refuses every spawn after it. A probe
//!   that finds every etcd member refusing connections counts as a renewal (`outage`): etcd
//!   down for everyone stops nothing.
//! - A leader that has not itself been connected for a full TTL does not move agents off
//!   nodes it cannot see: after etcd comes back, their owners get the time to renew.

pub mod declared;
pub mod fence;
pub mod front;
pub mod handover;
pub mod keys;
pub mod mailbox;
pub mod outage;
pub mod placement;
mod remote;
mod upgrades;

use crate::messages::command::{AgentStatus, Command, Reply};
use crate::node::NodeHandle;
use crate::spec::FleetSpec;
use crate::FleetError;
use etcd_client::{Client, Compare, CompareOp, ConnectOptions, GetOptions, PutOptions, Txn, TxnOp};
use keys::{FleetDoc, Keys, NodeCapacity, NodeInfo, Snapshot};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How a node joins a cluster.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    pub endpoints: Vec<String>,
    pub node_name: String,
    /// Key prefix; default `/fleet-commander/`.
    pub prefix: String,
    /// Seconds, 3..=300.
    pub lease_ttl: u64,
    /// etcd user and password (`--etcd-user`, `--etcd-password-file`).
    pub auth: Option<(String, String)>,
    /// Bound on the agents placed here; `None`: the port range's size / 10.
    pub max_agents: Option<u64>,
    /// This node's control socket, published for operators and peers.
    pub socket: String,
    /// TLS to etcd (`https://` endpoints): the CA that signed etcd's certificate and, for
    /// etcd's `--client-cert-auth`, this node's certificate and key, all PEM.
    pub tls: Option<ClusterTls>,
    /// A directory every node mounts at this path: a moved agent's HOME goes through it
    /// (`handover`). `None`: a move keeps the desired state, not the old HOME.
    pub handover_dir: Option<std::path::PathBuf>,
    /// `--snapshot-every`: each agent running here is archived live into `handover_dir`
    /// this often, so a node that dies hands over its agents' HOMEs as of then. `None`: off.
    pub snapshot_every: Option<Duration>,
    /// `--unfenced`: join without the PID-namespace guardian (no root or CAP_SYS_ADMIN). A
    /// frozen fleetd's agents then outlive its lease: at most one instance holds only while
    /// fleetd itself runs to stop them.
    pub unfenced: bool,
    /// `--etcd-outage ride-out` (the default): while every etcd member refuses connections,
    /// this node's agents keep running (`outage`); `false` (`stop`): they stop about TTL/2
    /// into any etcd silence, as when the node is cut off.
    pub ride_out: bool,
}

#[derive(Clone)]
pub struct ClusterTls {
    pub ca_pem: Vec<u8>,
    /// Certificate and private key.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl std::fmt::Debug for ClusterTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterTls")
            .field("client_certificate", &self.identity.is_some())
            .finish_non_exhaustive()
    }
}

impl ClusterConfig {
    /// Every problem with the settings, naming the flag.
    pub fn validate(&self) -> Result<(), FleetError> {
        if self.endpoints.is_empty() {
            return Err(FleetError::invalid("--etcd", "no endpoint given"));
        }
        for e in &self.endpoints {
            let ok = (e.starts_with("http://") || e.starts_with("https://"))
                && e.len() <= 256
                && e.bytes().all(|b| b.is_ascii_graphic());
            if !ok {
                return Err(FleetError::invalid(
                    "--etcd",
                    format!("{e:?} is not an http(s)://host:port URL"),
                ));
            }
        }
        let https = self
            .endpoints
            .iter()
            .filter(|e| e.starts_with("https://"))
            .count();
        if https != 0 && https != self.endpoints.len() {
            return Err(FleetError::invalid(
                "--etcd",
                "mixes http:// and https:// endpoints: one cluster speaks one of them",
            ));
        }
        match (https > 0, self.tls.is_some()) {
            (true, false) => {
                return Err(FleetError::invalid(
                    "--etcd-ca",
                    "https:// endpoints need the CA that signed etcd's certificate",
                ))
            }
            (false, true) => {
                return Err(FleetError::invalid(
                    "--etcd-ca",
                    "given with http:// endpoints: TLS needs https:// URLs",
                ))
            }
            _ => {}
        }
        crate::ids::validate_id("node", &self.node_name)
            .map_err(|e| FleetError::invalid("--node-name", e.to_string()))?;
        if let Some(d) = &self.handover_dir {
            if !d.is_absolute() {
                return Err(FleetError::invalid(
                    "--handover-dir",
                    format!("{} is not an absolute path", d.display()),
                ));
            }
            match std::fs::metadata(d) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => {
                    return Err(FleetError::invalid(
                        "--handover-dir",
                        format!("{} is not a directory", d.display()),
                    ))
                }
                Err(e) => {
                    return Err(FleetError::invalid(
                        "--handover-dir",
                        format!("{}: {e}", d.display()),
                    ))
                }
            }
        }
        if let Some(every) = self.snapshot_every {
            if self.handover_dir.is_none() {
                return Err(FleetError::invalid(
                    "--snapshot-every",
                    "needs --handover-dir: the archives go there",
                ));
            }
            if every < Duration::from_secs(10) {
                return Err(FleetError::invalid(
                    "--snapshot-every",
                    format!(
                        "{} s: at least 10 seconds (0 turns it off)",
                        every.as_secs()
                    ),
                ));
            }
        }
        if !(3..=300).contains(&self.lease_ttl) {
            return Err(FleetError::invalid(
                "--lease-ttl",
                format!("{} s: must be 3 to 300 seconds", self.lease_ttl),
            ));
        }
        if !self.prefix.starts_with('/')
            || self.prefix.len() > 128
            || !self.prefix.bytes().all(|b| b.is_ascii_graphic())
        {
            return Err(FleetError::invalid(
                "--etcd-prefix",
                format!(
                    "{:?}: must start with / and be printable ASCII",
                    self.prefix
                ),
            ));
        }
        Ok(())
    }
}

/// A connection to etcd with every request bounded in time.
#[derive(Clone)]
pub struct Etcd {
    client: Client,
    pub keys: Keys,
    /// `--handover-dir`: where the archives that `update_fleet` drops with their agents are.
    handover_dir: Option<std::path::PathBuf>,
}

/// Bound on one etcd request: a node that waits longer would miss its renewals.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

fn down(e: impl std::fmt::Display) -> FleetError {
    FleetError::Cluster {
        reason: format!("etcd: {e}"),
    }
}

async fn bounded<T>(
    f: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, FleetError> {
    match tokio::time::timeout(REQUEST_TIMEOUT, f).await {
        Ok(r) => r.map_err(down),
        Err(_) => Err(FleetError::Cluster {
            reason: "etcd did not answer within 2 s (unreachable?); nothing was changed".into(),
        }),
    }
}

impl Etcd {
    pub async fn connect(cfg: &ClusterConfig) -> Result<Etcd, FleetError> {
        let client = bounded(Client::connect(
            cfg.endpoints.clone(),
            Some(Self::options(cfg)),
        ))
        .await?;
        Ok(Etcd {
            client,
            keys: Keys::new(&cfg.prefix),
            handover_dir: cfg.handover_dir.clone(),
        })
    }

    /// How every client of this node talks to etcd (timeouts, auth, TLS).
    fn options(cfg: &ClusterConfig) -> ConnectOptions {
        let mut opts = ConnectOptions::new()
            .with_connect_timeout(REQUEST_TIMEOUT)
            .with_timeout(REQUEST_TIMEOUT)
            .with_keep_alive(Duration::from_secs(2), REQUEST_TIMEOUT);
        if let Some((u, p)) = &cfg.auth {
            opts = opts.with_user(u.clone(), p.clone());
        }
        if let Some(t) = &cfg.tls {
            let mut tls = etcd_client::TlsOptions::new()
                .ca_certificate(etcd_client::Certificate::from_pem(&t.ca_pem));
            if let Some((cert, key)) = &t.identity {
                tls = tls.identity(etcd_client::Identity::from_pem(cert, key));
            }
            opts = opts.with_tls(tls);
        }
        opts
    }

    /// One consistent read of `d/` (and `o/` when `observed`).
    pub async fn snapshot(&self, observed: bool) -> Result<Snapshot, FleetError> {
        let mut c = self.client.clone();
        let r = bounded(c.get(self.keys.desired(), Some(GetOptions::new().with_prefix()))).await?;
        let revision = r.header().map_or(0, |h| h.revision());
        let mut s = Snapshot {
            revision,
            read_revision: revision,
            ..Default::default()
        };
        for kv in r.kvs() {
            s.take(
                &self.keys,
                &String::from_utf8_lossy(kv.key()),
                kv.value(),
                kv.mod_revision(),
            );
        }
        if observed {
            // At the revision of the first read: one point in time.
            let r = bounded(c.get(
                self.keys.observed_all(),
                Some(GetOptions::new().with_prefix().with_revision(s.revision)),
            ))
            .await?;
            for kv in r.kvs() {
                s.take(
                    &self.keys,
                    &String::from_utf8_lossy(kv.key()),
                    kv.value(),
                    kv.mod_revision(),
                );
            }
        }
        Ok(s)
    }

    pub async fn txn(&self, txn: Txn) -> Result<bool, FleetError> {
        let mut c = self.client.clone();
        Ok(bounded(c.txn(txn)).await?.succeeded())
    }

    /// Puts `value` at `key` on `lease` unless the key exists: how a node's registration,
    /// the leader's key and an agent's claim are taken (exactly one taker wins).
    pub async fn create_on_lease(
        &self,
        key: String,
        value: impl Into<Vec<u8>>,
        lease: i64,
    ) -> Result<bool, FleetError> {
        self.create_all_on_lease(&[key], value, lease).await
    }

    /// `create_on_lease` of every key in one transaction: all or none.
    pub async fn create_all_on_lease(
        &self,
        keys: &[String],
        value: impl Into<Vec<u8>>,
        lease: i64,
    ) -> Result<bool, FleetError> {
        let value = value.into();
        let absent: Vec<Compare> = keys
            .iter()
            .map(|k| Compare::create_revision(k.clone(), CompareOp::Equal, 0))
            .collect();
        let puts: Vec<TxnOp> = keys
            .iter()
            .map(|k| {
                TxnOp::put(
                    k.clone(),
                    value.clone(),
                    Some(PutOptions::new().with_lease(lease)),
                )
            })
            .collect();
        self.txn(Txn::new().when(absent).and_then(puts)).await
    }

    pub async fn put(
        &self,
        key: String,
        value: Vec<u8>,
        lease: Option<i64>,
    ) -> Result<(), FleetError> {
        let mut c = self.client.clone();
        let opts = lease.map(|l| PutOptions::new().with_lease(l));
        bounded(c.put(key, value, opts)).await.map(drop)
    }

    pub async fn delete(&self, key: String) -> Result<(), FleetError> {
        let mut c = self.client.clone();
        bounded(c.delete(key, None)).await.map(drop)
    }

    /// Changes one fleet's doc by compare-and-swap on its revision, retried on a race.
    /// `f` returns the new doc, `None` to delete it, or an error that changes nothing. The
    /// handover records of agents the change removes go in the same transaction (so a name
    /// added again later never starts from an earlier tenant's HOME, whichever path removed
    /// it: a command, a spec file's reload), and then their archives where this node sees
    /// the handover dir.
    pub async fn update_fleet(
        &self,
        fleet: &str,
        mut f: impl FnMut(Option<FleetDoc>) -> Result<Option<FleetDoc>, FleetError>,
    ) -> Result<(), FleetError> {
        let key = self.keys.fleet(fleet);
        for _ in 0..16 {
            let mut c = self.client.clone();
            let r = bounded(c.get(key.clone(), None)).await?;
            let (old, rev) = match r.kvs().first() {
                Some(kv) => (
                    Some(serde_json::from_slice::<FleetDoc>(kv.value()).map_err(|e| {
                        FleetError::Cluster {
                            reason: format!(
                                "{key} holds no readable fleet ({e}); nothing was changed"
                            ),
                        }
                    })?),
                    kv.mod_revision(),
                ),
                None => (None, 0),
            };
            let before: BTreeSet<String> = old
                .as_ref()
                .map(|d| d.spec.agents.iter().cloned().collect())
                .unwrap_or_default();
            let guard = if rev == 0 {
                Compare::create_revision(key.clone(), CompareOp::Equal, 0)
            } else {
                Compare::mod_revision(key.clone(), CompareOp::Equal, rev)
            };
            let new = f(old)?;
            let after: BTreeSet<&String> = new
                .as_ref()
                .map(|d| d.spec.agents.iter().collect())
                .unwrap_or_default();
            let mut when = vec![guard];
            let mut then = vec![match &new {
                Some(doc) => TxnOp::put(
                    key.clone(),
                    serde_json::to_vec(doc).map_err(FleetError::internal)?,
                    None,
                ),
                None => TxnOp::delete(key.clone(), None),
            }];
            let removed: Vec<String> = before
                .iter()
                .filter(|a| !after.contains(a))
                .map(|a| format!("{fleet}/{a}"))
                .collect();
            let mut dropped = Vec::new();
            if !removed.is_empty() {
                // The records as of one revision, and a guard that none under the fleet was
                // written after it: a record committed between this read and the change fails
                // the change, and the next try drops it too.
                let prefix = self.keys.handovers(Some(fleet));
                let r =
                    bounded(c.get(prefix.clone(), Some(GetOptions::new().with_prefix()))).await?;
                let at = r.header().map_or(0, |h| h.revision());
                when.push(
                    Compare::mod_revision(prefix.clone(), CompareOp::Less, at + 1).with_prefix(),
                );
                for kv in r.kvs() {
                    let k = String::from_utf8_lossy(kv.key()).to_string();
                    let Some(id) = k.strip_prefix(&self.keys.handovers(None)) else {
                        continue;
                    };
                    if removed.iter().any(|x| x == id) {
                        if let Ok(h) = serde_json::from_slice::<handover::Handover>(kv.value()) {
                            dropped.push((id.to_string(), h));
                        }
                        if new.is_some() {
                            then.push(TxnOp::delete(k, None));
                        }
                    }
                }
                if new.is_none() {
                    then.push(TxnOp::delete(
                        prefix,
                        Some(etcd_client::DeleteOptions::new().with_prefix()),
                    ));
                }
            }
            // etcd takes at most 128 operations per transaction by default.
            if when.len() + then.len() > 120 {
                return Err(FleetError::Cluster {
                    reason: format!(
                        "removing {} agents of {fleet} at once is more than one etcd transaction holds; remove them in smaller steps; nothing was changed",
                        removed.len()
                    ),
                });
            }
            if self.txn(Txn::new().when(when).and_then(then)).await? {
                if let Some(dir) = &self.handover_dir {
                    for (id, h) in &dropped {
                        handover::remove_archive(&handover::archive_path(dir, id, h));
                    }
                }
                return Ok(());
            }
        }
        Err(FleetError::Cluster {
            reason: format!("fleet {fleet} changed 16 times while this change was made; nothing was changed, try again"),
        })
    }
}

/// Starts cluster mode on a running node: fences it (nothing starts before it holds a
/// lease and the agents' claims), makes every command act cluster-wide, and runs the
/// reconcile task until the node shuts down.
pub async fn join(node: &NodeHandle, cfg: ClusterConfig) -> Result<(), FleetError> {
    cfg.validate()?;
    let containment = node.containment();
    if containment != crate::process::spawn::Containment::PidNamespace && !cfg.unfenced {
        return Err(FleetError::invalid(
            "--etcd",
            format!(
                "cluster mode needs the PID-namespace guardian, which kills a frozen fleetd's agents before its lease expires (root or CAP_SYS_ADMIN); this node has {}; pass --unfenced to join without it",
                containment.as_str()
            ),
        ));
    }
    if cfg.unfenced {
        tracing::warn!(containment = containment.as_str(), "--unfenced: a frozen fleetd's agents outlive its lease; at most one instance holds only while fleetd runs");
    }
    let fence = node.fence();
    fence.arm(1);
    let etcd = Etcd::connect(&cfg).await?;
    let ride_out = cfg.ride_out;
    let cfg = Arc::new(cfg);
    let ride_cfg = cfg.clone();
    let door = Arc::new(front::Front::new(etcd.clone(), cfg.clone()));
    node.set_cluster(door.clone())?;
    tokio::spawn(mailbox::serve(node.clone(), etcd.clone(), door.clone()));
    let runner = Runner {
        door,
        node: node.clone(),
        etcd,
        cfg,
        fence,
        lease: None,
        connected_since: None,
        applied: None,
        stopped_here: BTreeSet::new(),
        published: None,
        cache: None,
        watch: None,
        last_error: None,
        handed: BTreeMap::new(),
        to_consume: Vec::new(),
        swept: None,
        live_at: BTreeMap::new(),
        live_mine: BTreeMap::new(),
        restore_due: BTreeSet::new(),
        snapping: None,
        ride_out: ride_out.then(|| {
            Arc::new(RideOut {
                cfg: ride_cfg,
                every_member_reached: false.into(),
            })
        }),
    };
    tokio::spawn(runner.run());
    Ok(())
}

struct Lease {
    id: i64,
    renewal: Arc<Renewal>,
}

/// What the renewal task needs to ride out an etcd that is down for everyone (`outage`).
struct RideOut {
    cfg: Arc<ClusterConfig>,
    /// Every voting member is reached through one of the endpoints (`check_members`, while
    /// etcd answers); off until that is known, and as soon as it is not.
    every_member_reached: std::sync::atomic::AtomicBool,
}

/// What the lease's renewal task (`renew`) tells the reconcile loop.
#[derive(Default)]
struct Renewal {
    /// etcd answered that the lease is gone: the claims went with it.
    expired: std::sync::atomic::AtomicBool,
    /// The last keep-alive got no answer.
    failing: std::sync::atomic::AtomicBool,
}

struct Runner {
    door: Arc<front::Front>,
    node: NodeHandle,
    etcd: Etcd,
    cfg: Arc<ClusterConfig>,
    fence: Arc<crate::process::spawn::Fence>,
    lease: Option<Lease>,
    /// Since when every request succeeded (None: the last one failed).
    connected_since: Option<Instant>,
    /// The local spec last applied.
    applied: Option<Vec<FleetSpec>>,
    /// Local agents this task stopped because the operator asked (`agent stop`).
    stopped_here: BTreeSet<String>,
    /// What was last published to `o/<node>` (without its self-changing figures), and when.
    published: Option<(Vec<u8>, Instant)>,
    last_error: Option<(String, Instant)>,
    /// The last full read of `d/`, and when; a watch on `d/` from just after it says when
    /// it is stale, so a quiet cluster is not read in full by every node every round.
    cache: Option<(Snapshot, Instant)>,
    watch: Option<etcd_client::WatchStream>,
    /// Agents this node let go of and archived for the node that takes them next, until
    /// the record goes into etcd with the release of the claim.
    /// With the fleet doc's revision of the read in which the agent was archived: the
    /// record's guard (a doc changed since may have removed and re-added the name).
    handed: BTreeMap<String, (handover::Handover, i64)>,
    /// Handover records taken in (restored or not) whose deletion etcd did not confirm.
    to_consume: Vec<(String, i64)>,
    /// When the handover directory was last swept of archives no record names.
    swept: Option<Instant>,
    /// `--snapshot-every`: when each local agent was last archived live (or tried).
    live_at: BTreeMap<String, Instant>,
    /// The live records this node wrote, until replaced: a release that records a handover
    /// over one deletes its archive.
    live_mine: BTreeMap<String, handover::Handover>,
    /// The live archive being made, with the fleet doc's revision it was started at.
    snapping: Option<LiveJob>,
    /// Agents whose handover was to be restored when the local apply was deferred: a HOME
    /// that apply provisioned meanwhile is not theirs, so their archive is still restored.
    restore_due: BTreeSet<String>,
    /// `--etcd-outage ride-out`; `None`: `stop`.
    ride_out: Option<Arc<RideOut>>,
}

/// A live archive under way (`--snapshot-every`).
struct LiveJob {
    agent: String,
    /// The fleet doc's revision and the lease when it began: its record is guarded by both.
    fleet_rev: i64,
    lease: i64,
    /// Its agent was let go or taken in again since: the archive is deleted, not recorded.
    void: bool,
    task: tokio::task::JoinHandle<Result<handover::Handover, FleetError>>,
}

const TICK: Duration = Duration::from_millis(500);
/// However the watch goes, `d/` is read in full this often (a backstop: the watch delivers
/// every change in order, and says when it cannot).
const FULL_READ_EVERY: Duration = Duration::from_secs(30);
/// A transaction's compares and puts count against etcd's 128 operations (its default
/// `--max-txn-ops`).
const CLAIMS_PER_TXN: usize = 60;
/// How often a node with a handover directory sweeps it (`sweep_orphans`).
const SWEEP_EVERY: Duration = Duration::from_secs(3600);
/// A live archive that came to nothing (not recorded, voided) is tried again this soon.
const LIVE_RETRY: Duration = Duration::from_secs(60);

impl Runner {
    async fn run(mut self) {
        loop {
            if self.node.is_shutting_down() {
                // The node stops its agents; the lease must live until they are (and
                // `NodeHandle::shutdown` gives it back then).
                // (`renew` keeps renewing it on its own until then.)
                if self.door.lease.load(std::sync::atomic::Ordering::SeqCst) == 0 {
                    return;
                }
                tokio::time::sleep(TICK).await;
                continue;
            }
            let door = self.door.clone();
            let round = door.round.lock().await;
            // A shutdown that began while this waited hands the agents over itself.
            if self.node.is_shutting_down() {
                continue;
            }
            let result = self.round().await;
            drop(round);
            match result {
                Ok(()) => {
                    self.connected_since.get_or_insert_with(Instant::now);
                }
                Err(e) => {
                    self.connected_since = None;
                    self.say(&e);
                }
            }
            let now = crate::process::spawn::boottime_ms();
            if fence::must_stop(now, self.fence.deadline_ms(), self.cfg.lease_ttl)
                && self.applied.as_ref().is_some_and(|a| !a.is_empty())
            {
                tracing::error!(
                    node = %self.cfg.node_name,
                    "no lease renewal in time: stopping every agent of this node before its lease can expire"
                );
                self.stop_everything().await;
            }
            tokio::time::sleep(TICK).await;
        }
    }

    fn say(&mut self, e: &FleetError) {
        let msg = e.to_string();
        let repeat = self
            .last_error
            .as_ref()
            .is_some_and(|(m, at)| *m == msg && at.elapsed() < Duration::from_secs(30));
        if !repeat {
            tracing::warn!(node = %self.cfg.node_name, error = %msg, "cluster round failed; retrying");
            self.last_error = Some((msg, Instant::now()));
        }
    }

    async fn round(&mut self) -> Result<(), FleetError> {
        self.keep_lease().await?;
        let Some(lease) = self.lease.as_ref().map(|l| l.id) else {
            return Ok(());
        };
        let snap = self.desired().await?;
        let me = self.cfg.node_name.clone();
        if snap.leader.is_none() {
            let k = self.etcd.keys.leader();
            self.etcd.create_on_lease(k, me.clone(), lease).await?;
        } else if snap.leader.as_deref() == Some(me.as_str()) {
            self.lead(&snap).await?;
        }
        self.follow(&snap, lease).await?;
        self.publish(lease).await?;
        self.sweep_orphans();
        self.snapshot_step(snap_fleet_revs(&snap), lease).await
    }

    /// `--snapshot-every`: records the live archive that finished, else starts the next
    /// one due (one at a time, in a task of its own so no round waits for a backup).
    async fn snapshot_step(
        &mut self,
        fleet_revs: BTreeMap<String, i64>,
        lease: i64,
    ) -> Result<(), FleetError> {
        let (Some(dir), Some(every)) = (self.cfg.handover_dir.clone(), self.cfg.snapshot_every)
        else {
            return Ok(());
        };
        if let Some(job) = self.snapping.take() {
            if !job.task.is_finished() {
                self.snapping = Some(job);
                return Ok(());
            }
            let id = job.agent.clone();
            let Ok(made) = job.task.await else {
                tracing::error!(agent = %id, "its live archive's task panicked; tried again later");
                self.retry_live_later(&id, every);
                return Ok(());
            };
            let h = match made {
                Ok(h) => h,
                Err(e) => {
                    self.live_at.insert(id.clone(), Instant::now());
                    tracing::warn!(agent = %id, error = %e, "its live archive failed; tried again at the next interval");
                    return Ok(());
                }
            };
            let path = handover::archive_path(&dir, &id, &h);
            // Begun under another claim (let go, taken in again, a new lease): what it read
            // may be older than what the agent's present claim started from.
            if job.void || job.lease != lease {
                handover::remove_archive(&path);
                self.retry_live_later(&id, every);
                return Ok(());
            }
            let prev = handover::pending(&self.etcd, id.split('/').next())
                .await
                .inspect_err(|_| handover::remove_archive(&path))?
                .remove(&id);
            // An etcd error leaves the archive: the record may have been written.
            let recorded = handover::record_live(
                &self.etcd,
                &id,
                job.fleet_rev,
                lease,
                &h,
                prev.as_ref().map(|p| p.1),
            )
            .await?;
            if !recorded {
                // Let go, moved, removed, or its fleet's doc changed meanwhile: tried again
                // after `LIVE_RETRY` if it is still here.
                tracing::debug!(agent = %id, "its live archive was not recorded (claim, fleet or record changed meanwhile)");
                handover::remove_archive(&path);
                self.retry_live_later(&id, every);
                return Ok(());
            }
            self.live_at.insert(id.clone(), Instant::now());
            // Only this node's own live archive is replaced for good; another record (a
            // handover whose deletion failed) names an archive kept for the operator.
            let me = self.cfg.node_name.as_str();
            if let Some((p, _)) = prev.filter(|(p, _)| p.live && p.node == me && p.file != h.file) {
                handover::remove_archive(&handover::archive_path(&dir, &id, &p));
            }
            self.live_mine.insert(id, h);
            return Ok(());
        }
        let local: BTreeSet<String> = self
            .applied
            .iter()
            .flatten()
            .flat_map(|s| s.agents.iter().map(move |a| format!("{}/{a}", s.name)))
            .filter(|a| !self.stopped_here.contains(a))
            .collect();
        self.live_at.retain(|a, _| local.contains(a));
        self.live_mine.retain(|a, _| local.contains(a));
        let next = handover::next_live(
            local.iter().map(|a| (a, self.live_at.get(a).copied())),
            every,
        );
        let Some(id) = next.cloned() else {
            return Ok(());
        };
        let Some(&fleet_rev) = id.split('/').next().and_then(|f| fleet_revs.get(f)) else {
            return Ok(());
        };
        let (node, me, a) = (self.node.clone(), self.cfg.node_name.clone(), id.clone());
        self.snapping = Some(LiveJob {
            agent: id,
            fleet_rev,
            lease,
            void: false,
            task: tokio::spawn(async move { handover::archive(&node, &dir, &me, &a, true).await }),
        });
        Ok(())
    }

    /// An agent whose live archive came to nothing is due again after `LIVE_RETRY`, not at
    /// once: it stays the most overdue, and a fleet whose doc changes faster than one
    /// archive takes would otherwise have this one agent archived over and over and the
    /// node's others never.
    fn retry_live_later(&mut self, agent: &str, every: Duration) {
        let at = handover::tried_at(Instant::now(), every, LIVE_RETRY);
        self.live_at.insert(agent.to_string(), at);
    }

    /// The live archive under way of `agent` (`None`: any) is not to be recorded: its agent
    /// was let go, taken in again, or everything here was stopped.
    fn void_live_job(&mut self, agent: Option<&str>) {
        if let Some(j) = self.snapping.as_mut() {
            if agent.is_none_or(|a| a == j.agent) {
                j.void = true;
            }
        }
    }

    /// Deletes the handover archives no record names once they are `ORPHAN_KEEP` old (a
    /// refused restore's, a skipped one's, one a shutdown's bound cut off from its record):
    /// without this the shared directory grows with every such move. Every node with the
    /// directory sweeps, in a task of its own (a shared directory may be slow and large);
    /// two deleting one file is harmless.
    fn sweep_orphans(&mut self) {
        let Some(dir) = self.cfg.handover_dir.clone() else {
            return;
        };
        if self.swept.is_some_and(|t| t.elapsed() < SWEEP_EVERY) {
            return;
        }
        self.swept = Some(Instant::now());
        let etcd = self.etcd.clone();
        let mine: Vec<std::path::PathBuf> = self
            .handed
            .iter()
            .map(|(id, (h, _))| handover::archive_path(&dir, id, h))
            .collect();
        tokio::spawn(async move {
            let waiting = match handover::pending(&etcd, None).await {
                Ok(w) => w,
                Err(e) => {
                    tracing::warn!(error = %e, "the handover directory's sweep could not read the records; tried again in an hour");
                    return;
                }
            };
            let mut named: BTreeSet<std::path::PathBuf> = waiting
                .iter()
                .map(|(id, (h, _))| handover::archive_path(&dir, id, h))
                .collect();
            named.extend(mine);
            let deleted = tokio::task::spawn_blocking(move || {
                let found = handover::orphans(
                    &dir,
                    &named,
                    std::time::SystemTime::now(),
                    handover::ORPHAN_KEEP,
                );
                found.iter().for_each(|p| handover::remove_archive(p));
                found
            })
            .await
            .unwrap_or_default();
            for p in deleted {
                tracing::info!(path = %p.display(), "deleted a handover archive no record names, 7 days old");
            }
        });
    }

    /// The desired state: the last full read with what the watch on `d/` delivered since
    /// applied to it, while the watch holds and the read is younger than `FULL_READ_EVERY`;
    /// else a new full read. A quiet or busy cluster alike costs each node one full read
    /// per `FULL_READ_EVERY`, not one per change.
    async fn desired(&mut self) -> Result<Snapshot, FleetError> {
        let mut stale = self.watch.is_none() || self.cache.is_none();
        if let Some(w) = self.watch.as_mut() {
            // What the watch has already delivered, without waiting for more.
            loop {
                match tokio::time::timeout(Duration::ZERO, w.message()).await {
                    Err(_) => break,
                    Ok(Ok(Some(r))) if r.canceled() => {
                        stale = true;
                        self.watch = None;
                        break;
                    }
                    Ok(Ok(Some(r))) => {
                        if let Some((snap, _)) = self.cache.as_mut() {
                            for ev in r.events() {
                                snap.apply(&self.etcd.keys, ev);
                            }
                        }
                    }
                    Ok(Ok(None)) | Ok(Err(_)) => {
                        stale = true;
                        self.watch = None;
                        break;
                    }
                }
            }
        }
        if let Some((snap, at)) = &self.cache {
            if !stale && at.elapsed() < FULL_READ_EVERY {
                return Ok(snap.clone());
            }
        }
        let snap = self.etcd.snapshot(false).await?;
        for k in &snap.unreadable {
            tracing::warn!(key = %k, "an etcd key of the cluster is unreadable; ignored");
        }
        if self.watch.is_none() {
            let mut c = self.etcd.client.clone();
            let opts = etcd_client::WatchOptions::new()
                .with_prefix()
                .with_start_revision(snap.revision + 1);
            self.watch = bounded(c.watch(self.etcd.keys.desired(), Some(opts)))
                .await
                .ok();
        }
        self.cache = Some((snap.clone(), Instant::now()));
        Ok(snap)
    }

    /// Grants the lease, registers the node and starts the lease's renewal task; after
    /// that, says what the renewals met.
    async fn keep_lease(&mut self) -> Result<(), FleetError> {
        use std::sync::atomic::Ordering::SeqCst;
        let ttl = self.cfg.lease_ttl;
        if let Some(lease) = &self.lease {
            if lease.renewal.expired.load(SeqCst) {
                tracing::error!(node = %self.cfg.node_name, lease = lease.id, "this node's lease expired: stopping its agents, then joining again");
                self.stop_everything().await;
                self.lease = None;
                self.door.lease.store(0, SeqCst);
                return Ok(());
            }
            if lease.renewal.failing.load(SeqCst) {
                return Err(FleetError::Cluster {
                    reason: "etcd: the lease keep-alive got no answer".into(),
                });
            }
            return Ok(());
        }
        let sent = crate::process::spawn::boottime_ms();
        let mut c = self.etcd.client.clone();
        let id = bounded(c.lease_grant(ttl as i64, None)).await?.id();
        let key = self.etcd.keys.node(&self.cfg.node_name);
        let info = serde_json::to_vec(&self.info()).map_err(FleetError::internal)?;
        let mine = self.etcd.create_on_lease(key, info, id).await?;
        if !mine {
            let _ = bounded(c.lease_revoke(id)).await;
            return Err(FleetError::Cluster {
                reason: format!(
                    "node name {:?} is held by another live fleetd (or by this one's previous run, until its lease expires in at most {ttl} s)",
                    self.cfg.node_name
                ),
            });
        }
        tracing::info!(node = %self.cfg.node_name, lease = id, ttl, "joined the cluster");
        self.fence.arm(fence::deadline_ms(sent, ttl));
        self.door.lease.store(id, SeqCst);
        if let Some(r) = &self.ride_out {
            tokio::spawn(check_members(
                r.clone(),
                self.etcd.clone(),
                self.door.clone(),
                id,
                ttl,
            ));
        }
        let renewal = Arc::new(Renewal::default());
        tokio::spawn(renew(
            self.etcd.clone(),
            ttl,
            id,
            self.fence.clone(),
            self.door.clone(),
            renewal.clone(),
            self.ride_out.clone(),
        ));
        self.lease = Some(Lease { id, renewal });
        Ok(())
    }

    fn info(&self) -> NodeInfo {
        let host = crate::process::procfs::host_info();
        let ports = u64::from(self.node.port_range().len());
        NodeInfo {
            name: self.cfg.node_name.clone(),
            socket: self.cfg.socket.clone(),
            pid: std::process::id(),
            capacity: NodeCapacity {
                agents_max: self.cfg.max_agents.unwrap_or((ports / 10).max(1)),
                memory_available: host.mem_available,
                ports,
                fds_free: host.nofile_soft.saturating_sub(host.fds_in_use),
                pids_free: host.pid_max.saturating_sub(host.pids_in_use),
            },
        }
    }

    /// The leader's part: place every desired agent, write what changed.
    async fn lead(&mut self, snap: &Snapshot) -> Result<(), FleetError> {
        let nodes: Vec<placement::NodeView> = snap
            .nodes
            .values()
            .map(|n| {
                let mark = snap.marks.get(&n.name);
                placement::NodeView {
                    name: n.name.clone(),
                    capacity: n.capacity.agents_max,
                    cordoned: mark.is_some(),
                    draining: mark == Some(&keys::Mark::Drain),
                }
            })
            .collect();
        let agents = snap.agents();
        let mut want = placement::place(&agents, &nodes, &snap.assign);
        let settled = self
            .connected_since
            .is_some_and(|t| t.elapsed() >= Duration::from_secs(self.cfg.lease_ttl));
        if !settled {
            // Not yet sure an absent node is dead rather than unseen: leave its agents.
            for (a, n) in &snap.assign {
                if !snap.nodes.contains_key(n) && agents.contains(a) {
                    want.insert(a.clone(), n.clone());
                }
            }
        }
        let mut ops = Vec::new();
        for (a, n) in &want {
            if snap.assign.get(a) != Some(n) {
                ops.push(TxnOp::put(self.etcd.keys.assign(a), n.clone(), None));
            }
        }
        for a in snap.assign.keys() {
            if !want.contains_key(a) {
                ops.push(TxnOp::delete(self.etcd.keys.assign(a), None));
            }
        }
        // etcd takes at most 128 operations per transaction by default.
        for chunk in ops.chunks(100) {
            let guard = Compare::value(
                self.etcd.keys.leader(),
                CompareOp::Equal,
                self.cfg.node_name.clone(),
            );
            if !self
                .etcd
                .txn(Txn::new().when([guard]).and_then(chunk.to_vec()))
                .await?
            {
                return Ok(());
            }
        }
        if !ops.is_empty() {
            tracing::info!(changes = ops.len(), "placement written");
        }
        Ok(())
    }

    /// This node's part: claim what is placed here, let go of what is not (after it is
    /// stopped), and make the local node run exactly the claimed agents.
    async fn follow(&mut self, snap: &Snapshot, lease: i64) -> Result<(), FleetError> {
        let me = self.cfg.node_name.as_str();
        let desired: BTreeSet<String> = snap.agents().into_iter().collect();
        let placed: BTreeSet<String> = snap
            .assign
            .iter()
            .filter(|(a, n)| n.as_str() == me && desired.contains(*a))
            .map(|(a, _)| a.clone())
            .collect();
        let mut held: BTreeSet<String> = snap
            .claims
            .iter()
            .filter(|(_, n)| n.as_str() == me)
            .map(|(a, _)| a.clone())
            .collect();
        // Claims are not taken while the fence would not let the agent start anyway.
        if !self.fence.lapsed() {
            let free: Vec<&String> = placed
                .iter()
                .filter(|a| !snap.claims.contains_key(*a))
                .collect();
            // All of a chunk in one transaction (each claim still conditional on nobody
            // holding it); a chunk that loses any race is taken claim by claim.
            for chunk in free.chunks(CLAIMS_PER_TXN) {
                let keys: Vec<String> = chunk.iter().map(|a| self.etcd.keys.claim(a)).collect();
                if chunk.len() > 1 && self.etcd.create_all_on_lease(&keys, me, lease).await? {
                    held.extend(chunk.iter().map(|a| (*a).clone()));
                    continue;
                }
                for (a, k) in chunk.iter().zip(keys) {
                    if self.etcd.create_on_lease(k, me, lease).await? {
                        held.insert((*a).clone());
                    }
                }
            }
        }
        let release: Vec<String> = held.difference(&placed).cloned().collect();
        self.drop_stale_archives(&release, &held).await;
        self.let_go(snap, &release, &desired).await;
        let run: BTreeSet<&String> = held.intersection(&placed).collect();
        let local = local_specs(snap, &run);
        let mut incoming = BTreeMap::new();
        if self.applied.as_ref() != Some(&local) {
            // New here: taken over from another node, whose archive of its HOME may wait.
            let new: Vec<&String> = run
                .iter()
                .filter(|a| !applied_has(self.applied.as_deref(), a))
                .copied()
                .collect();
            if !new.is_empty() {
                let mut waiting = handover::pending(&self.etcd, None).await?;
                for a in new {
                    let Some((h, rev)) = waiting.remove(a) else {
                        continue;
                    };
                    // Its own live archive of a HOME still here (fleetd restarted) is older
                    // than that HOME: it stays the record, and the HOME is kept.
                    let own_home = h.live
                        && h.node == self.cfg.node_name
                        && !self.restore_due.contains(a)
                        && a.split_once('/').is_some_and(|(f, ag)| {
                            crate::provision::AgentPaths::new(self.node.state_dir(), f, ag)
                                .home
                                .is_dir()
                        });
                    if own_home {
                        self.live_mine.insert(a.clone(), h);
                    } else {
                        incoming.insert(a.clone(), (h, rev));
                    }
                }
            }
            let hold = incoming.keys().cloned().collect();
            match self.node.apply_spec_holding(local.clone(), hold).await {
                Ok(msg) => {
                    tracing::info!(result = %msg, "cluster: local agents brought to the placement");
                    self.applied = Some(local.clone());
                    self.restore_due.clear();
                }
                Err(e) => {
                    // Most often a removal still running: the next round tries again. The
                    // released claims wait until what they guard is gone.
                    tracing::debug!(error = %e, "cluster: local apply deferred");
                    self.restore_due.extend(incoming.into_keys());
                    return Ok(());
                }
            }
        }
        // An etcd error here must not keep the agents taken in from their restore and start
        // (they are applied now, so no later round would see them as new).
        let mut failed = None;
        for a in &release {
            if self.node.local_agent_gone(a) {
                if let Err(e) = self.release_claim(a, desired.contains(a)).await {
                    failed.get_or_insert(e);
                }
            }
        }
        // The restores run side by side, a few at a time (a dead node's whole share arrives
        // at once, and one restore takes about a second); each agent starts once its own is
        // done.
        let gate = Arc::new(tokio::sync::Semaphore::new(RESTORES_AT_ONCE));
        let mut restores = tokio::task::JoinSet::new();
        let mut of_task = BTreeMap::new();
        for (a, (h, rev)) in incoming {
            let (node, dir, gate) = (
                self.node.clone(),
                self.cfg.handover_dir.clone(),
                gate.clone(),
            );
            let id = a.clone();
            let task = restores.spawn(async move {
                let _turn = gate.acquire_owned().await;
                restore_handed(&node, dir.as_deref(), &id, &h).await;
            });
            of_task.insert(task.id(), (a, rev));
        }
        while let Some(done) = restores.join_next_with_id().await {
            let task = match done {
                Ok((task, ())) => task,
                // Its restore's outcome is unknown: it starts from what its HOME holds.
                Err(e) => {
                    tracing::error!(error = %e, "a handover's restore task failed");
                    e.id()
                }
            };
            if let Some((a, rev)) = of_task.remove(&task) {
                self.hand_in(snap, &a, rev).await;
            }
        }
        let mut unconfirmed = Vec::new();
        for (a, rev) in std::mem::take(&mut self.to_consume) {
            if handover::consume(&self.etcd, &a, rev).await.is_err() {
                unconfirmed.push((a, rev));
            }
        }
        self.to_consume = unconfirmed;
        // The operator's stop and start, agent by agent.
        for a in &run {
            let Some((f, ag)) = a.split_once('/') else {
                continue;
            };
            let want_stopped = snap
                .fleets
                .get(f)
                .is_some_and(|(d, _)| d.stopped.contains(ag));
            let is_stopped = self.stopped_here.contains(*a);
            if want_stopped != is_stopped {
                let cmd = if want_stopped {
                    Command::AgentStop {
                        fleet: f.into(),
                        agent: ag.into(),
                    }
                } else {
                    Command::AgentStart {
                        fleet: f.into(),
                        agent: ag.into(),
                    }
                };
                if !matches!(self.node.execute_local(cmd).await, Reply::Error(_)) {
                    if want_stopped {
                        self.stopped_here.insert((*a).clone());
                    } else {
                        self.stopped_here.remove(*a);
                    }
                }
            }
        }
        failed.map_or(Ok(()), Err)
    }

    /// Archives made for an agent this node no longer lets go of: it is placed here again
    /// (nothing was recorded: the claim is still held), or its claim went (its lease expired,
    /// or the release committed without its answer arriving: then the record names the
    /// archive, which must stay for the taker).
    async fn drop_stale_archives(&mut self, release: &[String], held: &BTreeSet<String>) {
        let stale: Vec<String> = self
            .handed
            .keys()
            .filter(|a| !release.contains(a))
            .cloned()
            .collect();
        for a in stale {
            let Some((h, _)) = self.handed.remove(&a) else {
                continue;
            };
            let recorded = !held.contains(&a)
                && match handover::pending(&self.etcd, a.split('/').next()).await {
                    Ok(w) => w.get(&a).is_some_and(|(r, _)| *r == h),
                    Err(_) => true, // unknown: a file left behind beats a record without one
                };
            if !recorded {
                if let Some(d) = &self.cfg.handover_dir {
                    handover::remove_archive(&handover::archive_path(d, &a, &h));
                }
            }
        }
    }

    /// Stops the agents this node lets go of, all at once (a drain waits for the slowest
    /// stop, not for their sum), and archives the HOME of each that moves elsewhere.
    async fn let_go(&mut self, snap: &Snapshot, release: &[String], desired: &BTreeSet<String>) {
        let mut work = tokio::task::JoinSet::new();
        for a in release {
            if self.handed.contains_key(a) {
                continue;
            }
            let dir = self
                .cfg
                .handover_dir
                .clone()
                .filter(|_| desired.contains(a));
            work.spawn(handover::stop_and_archive(
                self.node.clone(),
                dir,
                self.cfg.node_name.clone(),
                a.clone(),
            ));
        }
        while let Some(r) = work.join_next().await {
            if let Ok(Some((a, h))) = r {
                let rev = a
                    .split('/')
                    .next()
                    .and_then(|f| snap.fleets.get(f))
                    .map_or(0, |(_, rev)| *rev);
                self.handed.insert(a, (h, rev));
            }
        }
    }

    /// Gives up the claim of a stopped agent, with its handover's record when it moves: both
    /// in one transaction, which also fails when the fleet changed since the read in which
    /// the HOME was archived (then that archive is dropped and the next round archives
    /// again: a record never carries a HOME across a removal and re-adding of the name).
    async fn release_claim(&mut self, a: &str, moving: bool) -> Result<(), FleetError> {
        self.void_live_job(Some(a));
        let me = self.cfg.node_name.as_str();
        let k = self.etcd.keys.claim(a);
        let mut when = vec![Compare::value(k.clone(), CompareOp::Equal, me)];
        let mut then = vec![TxnOp::delete(k, None)];
        let handed = self.handed.get(a).filter(|_| moving);
        let mut recorded = false;
        if let Some((h, rev)) = handed {
            let (guard, put) = handover::guarded_record(&self.etcd.keys, a, *rev, h)?;
            when.push(guard);
            then.push(put);
            recorded = true;
        }
        let ok = self.etcd.txn(Txn::new().when(when).and_then(then)).await?;
        if let Some((h, _)) = self.handed.remove(a) {
            if !(ok && recorded) {
                if let Some(d) = &self.cfg.handover_dir {
                    handover::remove_archive(&handover::archive_path(d, a, &h));
                }
            }
        }
        // A handover recorded over this node's live record: that archive is read by nobody.
        if let Some(h) = self.live_mine.remove(a).filter(|_| ok && recorded) {
            if let Some(d) = &self.cfg.handover_dir {
                handover::remove_archive(&handover::archive_path(d, a, &h));
            }
        }
        if !ok {
            if !recorded {
                // Only the claim's compare could fail: it is not this node's any more.
                self.stopped_here.remove(a);
            }
            return Ok(());
        }
        if recorded {
            tracing::info!(agent = %a, "released, its HOME handed over");
        }
        self.stopped_here.remove(a);
        Ok(())
    }

    /// An agent taken over with a handover, its archive restored (`restore_handed`): starts
    /// it unless the operator stopped it, and has its record deleted.
    async fn hand_in(&mut self, snap: &Snapshot, a: &str, rev: i64) {
        self.void_live_job(Some(a));
        let Some((f, ag)) = a.split_once('/') else {
            return;
        };
        self.to_consume.push((a.to_string(), rev));
        self.node.handed_in(f, ag);
        let want_stopped = snap
            .fleets
            .get(f)
            .is_some_and(|(d, _)| d.stopped.contains(ag));
        let start = Command::AgentStart {
            fleet: f.into(),
            agent: ag.into(),
        };
        // Held as stopped, so the next round's start/stop pass starts it again if this fails.
        if want_stopped || matches!(self.node.execute_local(start).await, Reply::Error(_)) {
            self.stopped_here.insert(a.to_string());
        }
    }

    /// Publishes this node's status rows (at most once a second; at least every 10 s).
    async fn publish(&mut self, lease: i64) -> Result<(), FleetError> {
        if self
            .published
            .as_ref()
            .is_some_and(|(_, at)| at.elapsed() < Duration::from_secs(1))
        {
            return Ok(());
        }
        let mut rows = match self
            .node
            .execute_local(Command::Status {
                fleet: None,
                agent: None,
            })
            .await
        {
            Reply::Status(r) => r,
            _ => return Ok(()),
        };
        for r in &mut rows {
            r.node = Some(self.cfg.node_name.clone());
            r.held_stopped = Some(
                self.stopped_here
                    .contains(&format!("{}/{}", r.fleet, r.agent)),
            );
        }
        // What changes every second on its own (uptime, memory) is refreshed every 10 s;
        // anything else (a state, a pid, health, a restart) goes out within a second.
        let settled = serde_json::to_vec(&settled(&rows)).map_err(FleetError::internal)?;
        if self
            .published
            .as_ref()
            .is_some_and(|(b, at)| *b == settled && at.elapsed() < Duration::from_secs(10))
        {
            return Ok(());
        }
        let bytes = serde_json::to_vec(&rows).map_err(FleetError::internal)?;
        self.etcd
            .put(
                self.etcd.keys.observed(&self.cfg.node_name),
                bytes,
                Some(lease),
            )
            .await?;
        self.published = Some((settled, Instant::now()));
        Ok(())
    }

    /// Stops and removes every local agent (their HOMEs stay); bounded.
    async fn stop_everything(&mut self) {
        self.void_live_job(None);
        let names: Vec<(String, String)> = self
            .applied
            .iter()
            .flatten()
            .flat_map(|s| s.agents.iter().map(move |a| (s.name.clone(), a.clone())))
            .collect();
        for (f, a) in names {
            let _ = tokio::time::timeout(
                Duration::from_secs(30),
                self.node
                    .execute_local(Command::AgentStop { fleet: f, agent: a }),
            )
            .await;
        }
        if self.node.apply_spec(Vec::new()).await.is_ok() {
            self.applied = Some(Vec::new());
        } else {
            self.applied = None;
        }
        self.stopped_here.clear();
    }
}

/// Renews lease `id` every TTL/4 and moves the fence's deadline with each answer, in a
/// task of its own: no round of the reconcile loop (a drain's stops, a handover's archives,
/// a restore) can hold a renewal back. Ends when the node gives the lease up or etcd says
/// it expired.
async fn renew(
    etcd: Etcd,
    ttl: u64,
    id: i64,
    fence: Arc<crate::process::spawn::Fence>,
    door: Arc<front::Front>,
    state: Arc<Renewal>,
    ride_out: Option<Arc<RideOut>>,
) {
    use std::sync::atomic::Ordering::SeqCst;
    let every = Duration::from_millis(fence::renew_every_ms(ttl));
    let mut keeper = None;
    let mut wait = every;
    // Riding an outage out now; rode one out since the last renewal.
    let (mut riding, mut rode) = (false, false);
    loop {
        tokio::time::sleep(wait).await;
        if door.lease.load(SeqCst) != id {
            return;
        }
        wait = TICK;
        if riding {
            // While every member refuses, a keep-alive only waits out its bound: probe first,
            // so a short TTL is re-armed in time.
            riding = ride_out_step(ride_out.as_deref(), &fence, ttl, riding).await;
            if riding {
                continue;
            }
        }
        let sent = crate::process::spawn::boottime_ms();
        match keep_alive(&etcd, id, &mut keeper, every).await {
            Some(true) => {
                fence.arm(fence::deadline_ms(sent, ttl));
                state.failing.store(false, SeqCst);
                if std::mem::take(&mut rode) {
                    tracing::info!(
                        lease = id,
                        "etcd answers again: the lease is renewed, nothing was stopped"
                    );
                }
                wait = every;
            }
            Some(false) => {
                state.expired.store(true, SeqCst);
                return;
            }
            None => {
                keeper = None;
                state.failing.store(true, SeqCst);
                riding = ride_out_step(ride_out.as_deref(), &fence, ttl, riding).await;
                rode |= riding;
                // The client answers a keep-alive of a lease etcd no longer has with an
                // error, not with TTL 0: ask etcd whether it still has it.
                if !riding && lease_gone(&etcd, id).await {
                    state.expired.store(true, SeqCst);
                    return;
                }
            }
        }
    }
}

/// One keep-alive of lease `id` on `keeper` (opened first when there is none), answered
/// within `within`: `Some(true)` renewed, `Some(false)` etcd says the lease is gone,
/// `None` no answer.
async fn keep_alive(
    etcd: &Etcd,
    id: i64,
    keeper: &mut Option<(etcd_client::LeaseKeeper, etcd_client::LeaseKeepAliveStream)>,
    within: Duration,
) -> Option<bool> {
    if keeper.is_none() {
        let mut c = etcd.client.clone();
        *keeper = Some(bounded(c.lease_keep_alive(id)).await.ok()?);
    }
    let (k, stream) = keeper.as_mut()?;
    let renewed = async {
        k.keep_alive().await?;
        stream.message().await
    };
    // Within a renewal interval: a short TTL's deadline leaves no room to wait longer
    // before the probe that may ride an outage out.
    match tokio::time::timeout(REQUEST_TIMEOUT.min(within), renewed).await {
        Ok(Ok(Some(r))) => Some(r.ttl() > 0),
        Ok(Ok(None)) | Ok(Err(_)) | Err(_) => None,
    }
}

/// After a failed renewal: when every etcd member refuses connections (and the endpoints
/// name them all), the probe counts as a renewal sent when it began (`outage`), so the
/// agents keep running; never once the fence has lapsed. Whether the node rides it out.
async fn ride_out_step(
    ride_out: Option<&RideOut>,
    fence: &crate::process::spawn::Fence,
    ttl: u64,
    riding: bool,
) -> bool {
    use std::sync::atomic::Ordering::SeqCst;
    let Some(r) = ride_out.filter(|r| r.every_member_reached.load(SeqCst)) else {
        return false;
    };
    let began = crate::process::spawn::boottime_ms();
    let within = Duration::from_millis(fence::margin_ms(ttl) / 2);
    if fence.deadline_ms() <= began
        || !outage::every_endpoint_refuses(&r.cfg.endpoints, within).await
    {
        return false;
    }
    fence.arm(fence::deadline_ms(began, ttl));
    if !riding {
        tracing::warn!("etcd is down everywhere (every member refuses connections): this node's agents keep running; nothing is rescheduled until etcd is back");
    }
    true
}

/// While lease `id` is this node's: once a TTL, etcd's voting members (one cheap request),
/// and every `FULL_READ_EVERY` (or while unknown) which member each endpoint reaches (a
/// client of its own per endpoint): `RideOut::every_member_reached`. A member added that no
/// endpoint reaches turns ride-out off within a TTL, long before the endpoints could all be
/// gone.
async fn check_members(r: Arc<RideOut>, etcd: Etcd, door: Arc<front::Front>, id: i64, ttl: u64) {
    use std::sync::atomic::Ordering::SeqCst;
    let mut reached: BTreeMap<String, u64> = BTreeMap::new();
    let mut mapped: Option<Instant> = None;
    let mut said: Option<bool> = None;
    // One client per endpoint, kept between checks: a connect (with TLS, a handshake) to each
    // endpoint every FULL_READ_EVERY was work for nothing while it answers.
    let mut clients: HashMap<String, Client> = HashMap::new();
    while door.lease.load(SeqCst) == id {
        let mut c = etcd.client.clone();
        let voting: Option<BTreeSet<u64>> = bounded(c.member_list()).await.ok().map(|m| {
            m.members()
                .iter()
                .filter(|m| !m.is_learner())
                .map(|m| m.id())
                .collect()
        });
        let incomplete = r.cfg.endpoints.iter().any(|e| !reached.contains_key(e));
        if voting.is_some() && (incomplete || mapped.is_none_or(|t| t.elapsed() >= FULL_READ_EVERY))
        {
            reached.clear();
            for e in &r.cfg.endpoints {
                let kept = clients.remove(e);
                let one = async {
                    let mut one = match kept {
                        Some(c) => c,
                        None => Client::connect([e.as_str()], Some(Etcd::options(&r.cfg))).await?,
                    };
                    let st = one.status().await?;
                    Ok::<_, etcd_client::Error>((one, st))
                };
                // A client that failed is dropped: the next check connects afresh.
                if let Ok(Ok((one, st))) = tokio::time::timeout(REQUEST_TIMEOUT, one).await {
                    if let Some(h) = st.header() {
                        reached.insert(e.clone(), h.member_id());
                    }
                    clients.insert(e.clone(), one);
                }
            }
            mapped = Some(Instant::now());
        }
        if let Some(voting) = &voting {
            let listed = outage::every_member_reached(voting, &reached, &r.cfg.endpoints);
            r.every_member_reached.store(listed, SeqCst);
            if said != Some(listed) {
                if listed {
                    tracing::info!("every etcd member is reached through --etcd: an outage of all of them is ridden out");
                } else {
                    tracing::warn!(endpoints = ?reached, voting = ?voting, "the --etcd endpoints do not reach every etcd member (or name no port): an etcd outage is ridden out only about TTL/2, as a cut-off node's");
                }
                said = Some(listed);
            }
        }
        tokio::time::sleep(Duration::from_secs(ttl)).await;
    }
}

/// etcd answered that it has no lease `id` (expired or revoked); `false` when it did not
/// answer.
async fn lease_gone(etcd: &Etcd, id: i64) -> bool {
    let mut c = etcd.client.clone();
    matches!(bounded(c.lease_time_to_live(id, None)).await, Ok(r) if r.ttl() <= 0)
}

/// Whether the applied specs run `fleet/agent`.
fn applied_has(applied: Option<&[FleetSpec]>, a: &str) -> bool {
    let Some((f, ag)) = a.split_once('/') else {
        return false;
    };
    applied
        .unwrap_or_default()
        .iter()
        .any(|s| s.name == f && s.agents.iter().any(|x| x == ag))
}

/// Restores of handed-over HOMEs run at most this many at a time.
const RESTORES_AT_ONCE: usize = 4;

/// Restores the archive of `h` into the HOME `a` was added with (stopped, held). A restore
/// that fails leaves the HOME as provisioned (the desired state's) and the archive in place.
async fn restore_handed(
    node: &NodeHandle,
    dir: Option<&std::path::Path>,
    a: &str,
    h: &handover::Handover,
) {
    let Some((f, ag)) = a.split_once('/') else {
        return;
    };
    match handover::take(h, dir, f) {
        handover::Take::Restore(path) => {
            let cmd = Command::AgentRestore {
                fleet: f.into(),
                agent: ag.into(),
                from: path.clone(),
                force: false,
            };
            match node.execute_local(cmd).await {
                // Restored, whatever its token rotation answered.
                Reply::Done { .. } | Reply::Error(FleetError::Partial { .. }) => {
                    tracing::info!(agent = %a, from = %h.node, bytes = h.bytes, live = h.live, "its HOME was handed over");
                    handover::remove_archive(&path);
                }
                other => {
                    // Kept `ORPHAN_KEEP` from now, for the operator: its record goes.
                    handover::touch(&path);
                    tracing::warn!(agent = %a, archive = %path.display(), answer = ?other, "the handover archive was not restored: it starts from the desired state alone (the archive stays)");
                }
            }
        }
        handover::Take::Skip(why) => {
            tracing::warn!(agent = %a, reason = %why, "no handover: it starts from the desired state alone");
        }
    }
}

/// Each fleet's doc revision in `snap` (a live archive's record is guarded by it).
fn snap_fleet_revs(snap: &Snapshot) -> BTreeMap<String, i64> {
    snap.fleets
        .iter()
        .map(|(f, (_, rev))| (f.clone(), *rev))
        .collect()
}

/// The specs the local node must run: each fleet with only the agents this node holds.
fn local_specs(snap: &Snapshot, run: &BTreeSet<&String>) -> Vec<FleetSpec> {
    let mut out = Vec::new();
    for (name, (doc, _)) in &snap.fleets {
        let mut spec = doc.spec.clone();
        spec.agents.retain(|a| run.contains(&format!("{name}/{a}")));
        if spec.agents.is_empty() {
            continue;
        }
        let keep: BTreeSet<String> = spec.agents.iter().cloned().collect();
        spec.tenants.retain(|a, _| keep.contains(a));
        out.push(spec);
    }
    out
}

/// Observed rows without the figures that change by themselves every second.
fn settled(rows: &[AgentStatus]) -> Vec<AgentStatus> {
    rows.iter()
        .cloned()
        .map(|mut r| {
            r.uptime_s = 0;
            r.rss_bytes = None;
            r
        })
        .collect()
}

/// `status` of the whole cluster: every node's published rows (with `node`), and a row for
/// each desired agent no node runs.
pub fn cluster_status(snap: &Snapshot) -> Vec<AgentStatus> {
    let mut rows: BTreeMap<(String, String), AgentStatus> = BTreeMap::new();
    for (node, list) in &snap.observed {
        // A node's rows count only for agents it holds the claim of: a stale row of an
        // agent that moved is not shown twice.
        for r in list {
            let key = format!("{}/{}", r.fleet, r.agent);
            if snap.claims.get(&key) != Some(node) {
                continue;
            }
            let mut r = r.clone();
            r.node = Some(node.clone());
            rows.insert((r.fleet.clone(), r.agent.clone()), r);
        }
    }
    for (f, (doc, _)) in &snap.fleets {
        for a in &doc.spec.agents {
            rows.entry((f.clone(), a.clone())).or_insert_with(|| {
                let key = format!("{f}/{a}");
                let reason = match (snap.assign.get(&key), snap.claims.get(&key)) {
                    (None, _) => "not placed: no live, uncordoned node with room".to_string(),
                    (Some(n), Some(h)) if n != h => {
                        format!("moving: placed on {n}, {h} still stopping it")
                    }
                    (Some(n), _) => format!("placed on {n}, not started there yet"),
                };
                AgentStatus::placeholder(f, a, snap.assign.get(&key).cloned(), reason)
            });
        }
    }
    rows.into_values().collect()
}
