//! The durable desired state (which fleets and agents should exist, their specs, tokens and
//! port bases, and the process each agent was last seen running) behind the `Store` trait,
//! with its first implementation: a crash-safe local JSON file. It does not decide anything:
//! reconciling this against what is observed is the node's job, and an etcd store will sit
//! beside `FileStore` later.

use crate::FleetError;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Format version this build reads and writes.
pub const REGISTRY_VERSION: u32 = 1;

/// Whether something should be running.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Desired {
    Running,
    Stopped,
}

/// The OS process an agent was started as: enough to find it again after a daemon restart
/// without ever mistaking a reused pid for it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProcessRecord {
    pub pid: u32,
    pub pgid: u32,
    /// Clock ticks since boot, `/proc/<pid>/stat` field 22.
    pub start_time: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentRecord {
    pub desired: Desired,
    pub port_base: Option<u16>,
    pub stride: u16,
    pub token: String,
    pub process: Option<ProcessRecord>,
    /// The uid (and gid) it runs as under `isolation = "uid"`, leased for the record's life
    /// from `NodeConfig::agent_uids` (None when the daemon cannot change uids).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    /// Tokens this agent had before, newest last (at most `PREVIOUS_TOKENS`): its old log
    /// lines still carry them, and `logs` redacts them too.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub previous_tokens: Vec<String>,
    /// Values its secrets had before, newest last (at most `PREVIOUS_SECRETS`), for
    /// redaction like `previous_tokens`; kept in the vault, never in the registry.
    #[serde(skip)]
    pub previous_secrets: Vec<crate::spec::Secret>,
}

impl AgentRecord {
    /// A new agent's record: its port block, token and uid, nothing run yet.
    pub fn new(
        desired: Desired,
        lease: &crate::ports::Lease,
        token: String,
        uid: Option<u32>,
    ) -> Self {
        AgentRecord {
            desired,
            port_base: Some(lease.base),
            stride: lease.stride,
            token,
            process: None,
            uid,
            previous_tokens: vec![],
            previous_secrets: vec![],
        }
    }
}

/// How many earlier secret values an agent record keeps for redaction.
pub const PREVIOUS_SECRETS: usize = 16;

/// How many earlier tokens an agent record keeps for redaction.
pub const PREVIOUS_TOKENS: usize = 8;

impl AgentRecord {
    /// Takes `token` as the current one, keeping the old one for redaction.
    pub fn replace_token(&mut self, token: String) {
        let old = std::mem::replace(&mut self.token, token);
        self.previous_tokens.push(old);
        let extra = self.previous_tokens.len().saturating_sub(PREVIOUS_TOKENS);
        self.previous_tokens.drain(..extra);
    }

    /// Every token to redact from this agent's logs: the current one and the earlier ones.
    pub fn all_tokens(&self) -> Vec<String> {
        let mut v = self.previous_tokens.clone();
        v.push(self.token.clone());
        v
    }

    /// Keeps values its secrets no longer have, for redaction.
    pub fn remember_secrets(&mut self, old: impl IntoIterator<Item = crate::spec::Secret>) {
        for s in old {
            if !self.previous_secrets.contains(&s) {
                self.previous_secrets.push(s);
            }
        }
        let extra = self.previous_secrets.len().saturating_sub(PREVIOUS_SECRETS);
        self.previous_secrets.drain(..extra);
    }
}

/// Who made a fleet, and so who may change or remove it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Origin {
    /// A command (`fleet create`, the library API): `reload` never touches it.
    Command,
    /// The spec file: only `reload` changes or removes it.
    Spec,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FleetRecord {
    pub spec: crate::spec::FleetSpec,
    pub desired: Desired,
    pub agents: BTreeMap<String, AgentRecord>,
    /// `None` in registries written before origins were recorded: such a fleet is adopted
    /// by the spec when the spec declares it, and otherwise left alone by `reload`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<Origin>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct RegistryData {
    /// Format version, `REGISTRY_VERSION`. `save` stamps it, so a `Default` value is fine.
    pub version: u32,
    pub node_id: String,
    pub fleets: BTreeMap<String, FleetRecord>,
}

impl RegistryData {
    pub fn new(node_id: impl Into<String>) -> Self {
        RegistryData {
            version: REGISTRY_VERSION,
            node_id: node_id.into(),
            fleets: BTreeMap::new(),
        }
    }
}

/// Where the desired state lives. Implementations must be usable from any thread.
pub trait Store: Send + Sync + 'static {
    /// `Ok(None)`: no registry yet (first start).
    fn load(&self) -> Result<Option<RegistryData>, FleetError>;
    fn save(&self, data: &RegistryData) -> Result<(), FleetError>;
}

/// Writes the registry off the actors' handlers: a task owns the store and saves snapshots in
/// a blocking thread. Saves that queue up while one is being written are committed together
/// (only the newest snapshot is written, and every one of them is answered by that write), so a
/// burst of changes costs one fsync. A caller that awaits `save` has its change durable (or an
/// error) before it replies.
#[derive(Clone)]
pub struct Writer {
    tx: tokio::sync::mpsc::Sender<(
        RegistryData,
        tokio::sync::oneshot::Sender<Result<(), FleetError>>,
    )>,
}

impl Writer {
    pub fn start(store: Box<dyn Store>) -> Writer {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<(
            RegistryData,
            tokio::sync::oneshot::Sender<Result<(), FleetError>>,
        )>(64);
        let store: std::sync::Arc<dyn Store> = std::sync::Arc::from(store);
        tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                let mut batch = vec![first];
                while let Ok(more) = rx.try_recv() {
                    batch.push(more);
                }
                // The newest snapshot is written as it came, not copied: a copy of a
                // thousand agents' records is thousands of small allocations that leave holes
                // between the agents' long-lived ones.
                let (data, newest_done) = batch.pop().expect("one at least");
                let store = store.clone();
                let r = tokio::task::spawn_blocking(move || store.save(&data))
                    .await
                    .unwrap_or_else(|e| Err(FleetError::internal(e)));
                for (_, done) in batch {
                    let _ = done.send(r.clone());
                }
                let _ = newest_done.send(r);
            }
        });
        Writer { tx }
    }

    /// Saves `data`; returns once it is durable.
    pub async fn save(&self, data: RegistryData) -> Result<(), FleetError> {
        let (done, wait) = tokio::sync::oneshot::channel();
        self.tx
            .send((data, done))
            .await
            .map_err(|_| FleetError::internal("the registry writer stopped"))?;
        wait.await
            .map_err(|_| FleetError::internal("the registry writer stopped"))?
    }
}

/// `<state_dir>/registry.json`, replaced atomically on every save; the file it replaced is
/// kept as `registry.json.bak` when it was valid.
pub struct FileStore {
    path: PathBuf,
    bak: PathBuf,
    tmp: PathBuf,
    /// `vault.json`: the secret values and file contents (see `vault`).
    vault: PathBuf,
    vault_tmp: PathBuf,
    /// The vault's bytes as last written or read, so a save that changed no secret does not
    /// rewrite it.
    vault_written: std::sync::Mutex<Option<Vec<u8>>>,
    /// Length and digest of the registry bytes this store last wrote: a file that still holds
    /// them is a valid registry without being parsed again (`keep_backup`).
    registry_written: std::sync::Mutex<Option<(usize, u64)>>,
}

/// What `save` writes: the data with this build's format version, serialized straight from
/// the caller's value (no intermediate `serde_json::Value`, which allocated every key and
/// field of every agent again).
#[derive(Serialize)]
struct Stamped<'a> {
    version: u32,
    node_id: &'a str,
    fleets: &'a BTreeMap<String, FleetRecord>,
}

fn digest(bytes: &[u8]) -> (usize, u64) {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut h);
    (bytes.len(), h.finish())
}

impl FileStore {
    pub fn new(state_dir: &Path) -> Self {
        FileStore {
            path: state_dir.join("registry.json"),
            bak: state_dir.join("registry.json.bak"),
            tmp: state_dir.join(".registry.json.tmp"),
            vault: state_dir.join("vault.json"),
            vault_tmp: state_dir.join(".vault.json.tmp"),
            vault_written: std::sync::Mutex::new(None),
            registry_written: std::sync::Mutex::new(None),
        }
    }

    pub fn vault_path(&self) -> &Path {
        &self.vault
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn backup_path(&self) -> &Path {
        &self.bak
    }

    fn dir(&self) -> &Path {
        self.path.parent().unwrap_or(Path::new("."))
    }

    /// The vault goes first: a registry that names a secret finds its value there. Returns
    /// the vault's previous bytes when it was replaced, so a failed registry write can put
    /// them back (an error must mean nothing changed, on disk too).
    fn save_vault(&self, data: &RegistryData) -> Result<Option<Vec<u8>>, FleetError> {
        let bytes = crate::vault::encode(data);
        if bytes.len() as u64 > crate::vault::MAX_VAULT_BYTES {
            return Err(FleetError::Store {
                reason: format!(
                    "the secrets and files of every tenant would take {} bytes in {}, more than the limit of {} bytes: nothing was changed",
                    bytes.len(),
                    self.vault.display(),
                    crate::vault::MAX_VAULT_BYTES
                ),
            });
        }
        let mut written = self.vault_written.lock().unwrap_or_else(|p| p.into_inner());
        if written.as_deref() == Some(&bytes[..]) {
            return Ok(None);
        }
        if written.is_none() && data.fleets.values().all(|f| f.spec.tenants.is_empty()) {
            // Nothing secret ever held: no vault file needed.
            if !self.vault.exists() {
                *written = Some(bytes);
                return Ok(None);
            }
        }
        self.replace_vault(&bytes)?;
        Ok(written
            .replace(bytes)
            .or_else(|| Some(crate::vault::empty())))
    }

    fn replace_vault(&self, bytes: &[u8]) -> Result<(), FleetError> {
        write_tmp_file(&self.vault_tmp, bytes)?;
        if let Err(e) = fs::rename(&self.vault_tmp, &self.vault) {
            let _ = fs::remove_file(&self.vault_tmp);
            return Err(io_err("replacing", &self.vault, e));
        }
        File::open(self.dir())
            .and_then(|d| d.sync_all())
            .map_err(|e| io_err("syncing directory", self.dir(), e))
    }

    /// Puts the vault back as it was before a save whose registry write failed.
    fn restore_vault(&self, previous: Option<Vec<u8>>) {
        let Some(prev) = previous else { return };
        let mut written = self.vault_written.lock().unwrap_or_else(|p| p.into_inner());
        match self.replace_vault(&prev) {
            Ok(()) => *written = Some(prev),
            Err(e) => {
                // The next save rewrites it from the state in memory.
                *written = None;
                tracing::error!(error = %e, "could not put the vault back after a failed registry save");
            }
        }
    }

    /// Keeps the current file as the backup, but only if it is a valid registry: a corrupt
    /// file must never push the last good version out.
    fn keep_backup(&self) -> Result<(), FleetError> {
        let current = match fs::read(&self.path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io_err("reading", &self.path, e)),
        };
        let ours = *self
            .registry_written
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            == Some(digest(&current));
        if !ours && parse(&current, &self.path, &self.bak).is_err() {
            return Ok(());
        }
        match fs::remove_file(&self.bak) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("removing old backup", &self.bak, e)),
        }
        if fs::hard_link(&self.path, &self.bak).is_err() {
            fs::write(&self.bak, &current).map_err(|e| io_err("writing backup", &self.bak, e))?;
        }
        Ok(())
    }
}

impl Store for FileStore {
    fn load(&self) -> Result<Option<RegistryData>, FleetError> {
        use crate::operator_file::{read_bounded, ReadError, MAX_REGISTRY_BYTES};
        let bytes = match read_bounded(&self.path, MAX_REGISTRY_BYTES) {
            Ok(b) => b,
            Err(ReadError::NotFound) => return Ok(None),
            Err(e) => {
                return Err(FleetError::Store {
                    reason: format!("reading {}: it {e}", self.path.display()),
                })
            }
        };
        let mut data = parse(&bytes, &self.path, &self.bak)?;
        match read_bounded(&self.vault, crate::vault::MAX_VAULT_BYTES) {
            Ok(v) => {
                crate::vault::decode_into(&v, &self.vault, &mut data)?;
                *self.vault_written.lock().unwrap_or_else(|p| p.into_inner()) = Some(v);
            }
            Err(ReadError::NotFound) => {}
            Err(e) => {
                return Err(FleetError::Store {
                    reason: format!("reading {}: it {e}", self.vault.display()),
                })
            }
        }
        Ok(Some(data))
    }

    fn save(&self, data: &RegistryData) -> Result<(), FleetError> {
        // Every field by name: one added to RegistryData fails to compile here until it is
        // written too.
        let RegistryData {
            version: _,
            node_id,
            fleets,
        } = data;
        let stamped = Stamped {
            version: REGISTRY_VERSION,
            node_id,
            fleets,
        };
        let mut bytes = serde_json::to_vec_pretty(&stamped).map_err(|e| FleetError::Store {
            reason: format!("cannot serialize the registry: {e}"),
        })?;
        bytes.push(b'\n');
        fs::create_dir_all(self.dir()).map_err(|e| io_err("creating", self.dir(), e))?;
        let previous = self.save_vault(data)?;
        let fail = |e: FleetError| {
            let _ = fs::remove_file(&self.tmp);
            self.restore_vault(previous.clone());
            e
        };
        write_tmp_file(&self.tmp, &bytes).map_err(fail)?;
        self.keep_backup().map_err(fail)?;
        if let Err(e) = fs::rename(&self.tmp, &self.path) {
            return Err(fail(io_err("replacing", &self.path, e)));
        }
        *self
            .registry_written
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(digest(&bytes));
        // Without this the rename itself may not survive a power loss.
        File::open(self.dir())
            .and_then(|d| d.sync_all())
            .map_err(|e| io_err("syncing directory", self.dir(), e))
    }
}

/// Writes `tmp` completely and durably, mode 0600 (it may hold secrets), before anything else
/// is touched, so a failure at any step leaves the file it will replace as it was.
fn write_tmp_file(tmp: &Path, bytes: &[u8]) -> Result<(), FleetError> {
    // A temp file left by a crash is garbage; create_new afterwards refuses to follow a
    // symlink someone planted there.
    match fs::remove_file(tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err("removing stale", tmp, e)),
    }
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(tmp)?;
        f.write_all(bytes)?;
        f.sync_all()
    })();
    result.map_err(|e| {
        let _ = fs::remove_file(tmp);
        io_err("writing", tmp, e)
    })
}

fn io_err(what: &str, path: &Path, e: io::Error) -> FleetError {
    FleetError::Store {
        reason: format!("{what} {}: {e}", path.display()),
    }
}

/// Everything a hand-edited or damaged registry could hold that the daemon must not act on,
/// as the first problem found, located by its JSON path (`fleets.bots.agents.a1.port_base`).
/// The registry is input like any other: an id with `..` would put a HOME outside the state
/// dir, a lease outside the range or overlapping another would run two agents on one port.
pub fn validate(data: &RegistryData, range: &crate::ports::PortRange) -> Result<(), String> {
    use crate::ids::{is_valid_id, ID_RULE};
    if !data
        .node_id
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-')
        || data.node_id.len() > 64
    {
        return Err(format!(
            "node_id: {:?} must be at most 64 letters, digits or '-'",
            data.node_id
        ));
    }
    let mut leases: Vec<(u32, u32, String)> = Vec::new();
    let mut uids: std::collections::BTreeMap<u32, String> = Default::default();
    for (name, f) in &data.fleets {
        let at = format!("fleets.{name}");
        if !is_valid_id(name) {
            return Err(format!("fleets: {name:?} must be {ID_RULE}"));
        }
        if &f.spec.name != name {
            return Err(format!(
                "{at}.spec.name: {:?} differs from its key {name:?}",
                f.spec.name
            ));
        }
        if let Some(p) = f.spec.validate().into_iter().next() {
            return Err(format!("{at}.spec.{}: {}", p.field, p.reason));
        }
        let listed: std::collections::BTreeSet<&String> = f.spec.agents.iter().collect();
        let recorded: std::collections::BTreeSet<&String> = f.agents.keys().collect();
        if listed != recorded {
            return Err(format!(
                "{at}: spec.agents {:?} and agents {:?} name different agents",
                f.spec.agents,
                f.agents.keys().collect::<Vec<_>>()
            ));
        }
        for (id, a) in &f.agents {
            let at = format!("{at}.agents.{id}");
            if !is_valid_id(id) {
                return Err(format!("{at}: {id:?} must be {ID_RULE}"));
            }
            if a.stride == 0 {
                return Err(format!("{at}.stride: must be at least 1"));
            }
            if a.token.is_empty() || !a.token.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(format!("{at}.token: must be a non-empty printable token"));
            }
            let Some(base) = a.port_base else {
                return Err(format!(
                    "{at}.port_base: missing (every agent holds a lease)"
                ));
            };
            {
                let end = base as u32 + a.stride as u32 - 1;
                if base < range.first || end > range.last as u32 {
                    return Err(format!(
                        "{at}.port_base: block {base}-{end} is outside the port range {}-{} (start fleetd with the --port-range its leases were made in)",
                        range.first, range.last
                    ));
                }
                leases.push((base as u32, end, at.clone()));
            }
            if let Some(uid) = a.uid {
                if !(1000..1 << 31).contains(&uid) {
                    return Err(format!("{at}.uid: {uid} is not an agent uid (1000..2^31)"));
                }
                if let Some(other) = uids.insert(uid, at.clone()) {
                    return Err(format!("{at}.uid: {uid} is {other}'s uid too"));
                }
            }
            if let Some(p) = &a.process {
                if p.pid == 0 || p.pid > i32::MAX as u32 {
                    return Err(format!("{at}.process.pid: {} is not a pid", p.pid));
                }
            }
        }
    }
    leases.sort();
    for w in leases.windows(2) {
        if w[1].0 <= w[0].1 {
            return Err(format!(
                "{}.port_base: block {}-{} overlaps {}'s block {}-{}",
                w[1].2, w[1].0, w[1].1, w[0].2, w[0].0, w[0].1
            ));
        }
    }
    Ok(())
}

fn parse(bytes: &[u8], path: &Path, bak: &Path) -> Result<RegistryData, FleetError> {
    let fallback = if bak.exists() {
        format!("{} holds the previous good version", bak.display())
    } else {
        format!("there is no backup ({} does not exist)", bak.display())
    };
    let data: RegistryData = serde_json::from_slice(bytes).map_err(|e| {
        let full = e.to_string();
        let suffix = format!(" at line {} column {}", e.line(), e.column());
        let reason = full.strip_suffix(&suffix).unwrap_or(&full);
        FleetError::Store {
            reason: format!(
                "{} is corrupt at line {}, column {}: {reason}; the file was left untouched and {fallback}",
                path.display(),
                e.line(),
                e.column()
            ),
        }
    })?;
    if data.version != REGISTRY_VERSION {
        return Err(FleetError::Store {
            reason: format!(
                "{} has format version {}, this build reads version {REGISTRY_VERSION}; the file was left untouched and {fallback}",
                path.display(),
                data.version
            ),
        });
    }
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::FleetSpec;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    fn sample(node: &str, agents: &[&str]) -> RegistryData {
        let mut spec = FleetSpec::new("bots");
        spec.agents = agents.iter().map(|a| a.to_string()).collect();
        spec.env.insert("K".into(), "v".into());
        let mut fleet = FleetRecord {
            spec,
            desired: Desired::Running,
            agents: BTreeMap::new(),
            origin: None,
        };
        for (i, a) in agents.iter().enumerate() {
            fleet.agents.insert(
                a.to_string(),
                AgentRecord {
                    desired: if i == 0 {
                        Desired::Stopped
                    } else {
                        Desired::Running
                    },
                    port_base: Some(20_000 + 128 * i as u16),
                    stride: 128,
                    token: format!("tok-{a}"),
                    uid: None,
                    process: (i > 0).then_some(ProcessRecord {
                        pid: 1000 + i as u32,
                        pgid: 1000 + i as u32,
                        start_time: 987_654 + i as u64,
                    }),
                    previous_tokens: vec![],
                    previous_secrets: vec![],
                },
            );
        }
        let mut d = RegistryData::new(node);
        d.fleets.insert("bots".into(), fleet);
        d
    }

    fn reason(e: FleetError) -> String {
        match e {
            FleetError::Store { reason } => reason,
            other => panic!("expected a Store error, got {other:?}"),
        }
    }

    #[test]
    fn missing_file_is_first_start() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::new(dir.path());
        assert_eq!(store.path(), dir.path().join("registry.json"));
        assert_eq!(store.load().unwrap(), None);
    }

    #[test]
    fn save_load_round_trip_with_owner_only_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::new(dir.path());
        let data = sample("node-a", &["a1", "a2", "a3"]);
        store.save(&data).unwrap();
        let loaded = FileStore::new(dir.path()).load().unwrap();
        assert_eq!(loaded.as_ref(), Some(&data));
        let mode = fs::metadata(store.path()).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "registry.json mode is {mode:o}");
        assert!(!dir.path().join(".registry.json.tmp").exists());
    }

    #[test]
    fn a_failed_registry_write_leaves_the_vault_as_it_was() {
        use crate::spec::{AgentSettings, Secret};
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::new(dir.path());
        let mut data = sample("node-a", &["a1"]);
        let with = |data: &mut RegistryData, v: &str| {
            let f = data.fleets.values_mut().next().unwrap();
            let mut t = AgentSettings::default();
            t.secrets.insert("API_KEY".into(), "/s/k".into());
            t.accepted
                .secrets
                .insert("API_KEY".into(), Secret::new(v.into()));
            f.spec.tenants.insert("a1".into(), t);
        };
        with(&mut data, "old-secret-value");
        store.save(&data).unwrap();
        let vault = fs::read_to_string(store.vault_path()).unwrap();
        assert!(vault.contains("old-secret-value"));
        assert_eq!(
            fs::metadata(store.vault_path())
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o600
        );
        // The registry's temp name taken by a directory: its write fails after the vault's.
        fs::create_dir(dir.path().join(".registry.json.tmp")).unwrap();
        with(&mut data, "new-secret-value");
        assert!(store.save(&data).is_err());
        assert_eq!(fs::read_to_string(store.vault_path()).unwrap(), vault);
        let loaded = FileStore::new(dir.path()).load().unwrap().unwrap();
        let t = &loaded.fleets.values().next().unwrap().spec.tenants["a1"];
        assert_eq!(t.accepted.secrets["API_KEY"].expose(), "old-secret-value");
        // Once the way is clear the new value lands in both.
        fs::remove_dir(dir.path().join(".registry.json.tmp")).unwrap();
        store.save(&data).unwrap();
        assert!(fs::read_to_string(store.vault_path())
            .unwrap()
            .contains("new-secret-value"));
    }

    #[test]
    fn save_stamps_the_format_version() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::new(dir.path());
        let data = RegistryData {
            node_id: "n".into(),
            ..Default::default()
        };
        store.save(&data).unwrap();
        let loaded = store.load().unwrap().expect("saved registry");
        assert_eq!(loaded.version, REGISTRY_VERSION);
        assert_eq!(loaded.node_id, "n");
    }

    #[test]
    fn second_save_keeps_previous_file_as_backup() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::new(dir.path());
        let first = sample("n", &["a1"]);
        let second = sample("n", &["a1", "a2"]);
        store.save(&first).unwrap();
        assert!(
            !store.backup_path().exists(),
            "first save has nothing to back up"
        );
        store.save(&second).unwrap();
        let bak: RegistryData =
            serde_json::from_slice(&fs::read(store.backup_path()).unwrap()).unwrap();
        assert_eq!(bak, first);
        assert_eq!(store.load().unwrap(), Some(second));
        // The backup is a separate inode from the live file.
        let ino = |p: &Path| fs::metadata(p).unwrap().ino();
        assert_ne!(ino(store.path()), ino(store.backup_path()));
    }

    #[test]
    fn corrupt_file_is_reported_and_left_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::new(dir.path());
        store.save(&sample("n", &["a1"])).unwrap();
        store.save(&sample("n", &["a1", "a2"])).unwrap();
        let corrupt =
            b"{\n  \"version\": 1,\n  \"node_id\": \"n\",\n  \"fleets\": {\n    \"bots\": 42\n  }\n}\n";
        fs::write(store.path(), corrupt).unwrap();
        let before = fs::metadata(store.path()).unwrap();

        let msg = reason(store.load().unwrap_err());
        let path = store.path().display().to_string();
        assert!(msg.contains(&path), "{msg}");
        assert!(msg.contains("at line 5, column 14:"), "{msg}");
        assert!(msg.contains("invalid type"), "serde reason missing: {msg}");
        assert!(
            msg.contains("registry.json.bak holds the previous good version"),
            "{msg}"
        );
        assert!(!msg.contains('\n'), "one line: {msg}");

        assert_eq!(fs::read(store.path()).unwrap(), corrupt);
        let after = fs::metadata(store.path()).unwrap();
        assert_eq!(before.ino(), after.ino(), "file was replaced");
        assert_eq!(
            before.mtime_nsec(),
            after.mtime_nsec(),
            "file was rewritten"
        );
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names.len(), 2, "unexpected files: {names:?}");
    }

    #[test]
    fn truncated_file_without_backup_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::new(dir.path());
        fs::write(store.path(), b"{\"version\": 1, \"node_").unwrap();
        let msg = reason(store.load().unwrap_err());
        assert!(msg.contains("line 1, column"), "{msg}");
        assert!(msg.contains("there is no backup"), "{msg}");
    }

    #[test]
    fn unknown_version_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::new(dir.path());
        let text = b"{\"version\": 7, \"node_id\": \"n\", \"fleets\": {}}";
        fs::write(store.path(), text).unwrap();
        let msg = reason(store.load().unwrap_err());
        assert!(msg.contains("format version 7"), "{msg}");
        assert_eq!(fs::read(store.path()).unwrap(), text);
    }

    #[test]
    fn unreadable_file_names_path_and_os_error() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::new(dir.path());
        // A directory in its place fails to read even for root.
        fs::create_dir(store.path()).unwrap();
        let msg = reason(store.load().unwrap_err());
        assert!(msg.contains(&store.path().display().to_string()), "{msg}");
        assert!(msg.contains("directory"), "OS error missing: {msg}");
    }

    #[test]
    fn corrupt_file_never_replaces_good_backup() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::new(dir.path());
        let good = sample("n", &["a1"]);
        store.save(&good).unwrap();
        store.save(&sample("n", &["a1", "a2"])).unwrap();
        fs::write(store.path(), b"garbage").unwrap();
        let newest = sample("n", &["a9"]);
        store.save(&newest).unwrap();
        let bak: RegistryData =
            serde_json::from_slice(&fs::read(store.backup_path()).unwrap()).unwrap();
        assert_eq!(bak, good);
        assert_eq!(store.load().unwrap(), Some(newest));
    }

    #[test]
    fn failed_rename_leaves_previous_file_and_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::new(dir.path());
        // A non-empty directory at registry.json: rename over it fails (EISDIR/ENOTEMPTY)
        // regardless of privileges.
        fs::create_dir(store.path()).unwrap();
        fs::write(store.path().join("keep"), b"x").unwrap();
        let msg = reason(store.save(&sample("n", &["a1"])).unwrap_err());
        assert!(msg.contains(&store.path().display().to_string()), "{msg}");
        assert!(msg.contains("os error"), "{msg}");
        assert_eq!(fs::read(store.path().join("keep")).unwrap(), b"x");
        assert!(!dir.path().join(".registry.json.tmp").exists());
    }

    #[test]
    fn failed_write_names_path_and_keeps_previous_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::new(dir.path());
        let good = sample("n", &["a1"]);
        store.save(&good).unwrap();
        let before = fs::read(store.path()).unwrap();
        // The temp path is occupied by a non-empty directory: the write cannot proceed.
        let tmp = dir.path().join(".registry.json.tmp");
        fs::create_dir(&tmp).unwrap();
        fs::write(tmp.join("x"), b"x").unwrap();
        let msg = reason(store.save(&sample("n", &["a1", "a2"])).unwrap_err());
        assert!(msg.contains(&tmp.display().to_string()), "{msg}");
        assert!(msg.contains("os error"), "{msg}");
        assert_eq!(fs::read(store.path()).unwrap(), before);
        assert_eq!(store.load().unwrap(), Some(good));
    }

    #[test]
    fn state_dir_that_is_a_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let not_dir = dir.path().join("f");
        fs::write(&not_dir, b"").unwrap();
        let store = FileStore::new(&not_dir);
        let msg = reason(store.save(&sample("n", &[])).unwrap_err());
        assert!(msg.contains(&not_dir.display().to_string()), "{msg}");
    }

    #[test]
    fn validate_refuses_every_kind_of_damage_by_its_path() {
        let range = crate::ports::PortRange {
            first: 20000,
            last: 30000,
        };
        let good = sample("node-a", &["a1", "a2", "a3"]);
        assert_eq!(validate(&good, &range), Ok(()));
        type Edit = fn(&mut RegistryData);
        let cases: Vec<(&str, Edit, &str)> = vec![
            (
                "dotdot id",
                |d| {
                    let f = d.fleets.get_mut("bots").unwrap();
                    let a = f.agents.remove("a2").unwrap();
                    f.agents.insert("../../x".into(), a);
                    f.spec.agents[1] = "../../x".into();
                },
                "fleets.bots.spec.agents[1]",
            ),
            (
                "shared uid",
                |d| {
                    let f = d.fleets.get_mut("bots").unwrap();
                    f.agents.get_mut("a1").unwrap().uid = Some(1_500_000);
                    f.agents.get_mut("a3").unwrap().uid = Some(1_500_000);
                },
                "fleets.bots.agents.a3.uid: 1500000 is fleets.bots.agents.a1's uid too",
            ),
            (
                "root uid",
                |d| {
                    let f = d.fleets.get_mut("bots").unwrap();
                    f.agents.get_mut("a2").unwrap().uid = Some(0);
                },
                "fleets.bots.agents.a2.uid: 0 is not an agent uid",
            ),
            (
                "fleet key",
                |d| {
                    let f = d.fleets.remove("bots").unwrap();
                    d.fleets.insert("..".into(), f);
                },
                "fleets: \"..\"",
            ),
            (
                "port outside",
                |d| {
                    d.fleets
                        .get_mut("bots")
                        .unwrap()
                        .agents
                        .get_mut("a2")
                        .unwrap()
                        .port_base = Some(50000);
                },
                "fleets.bots.agents.a2.port_base: block 50000-50127 is outside",
            ),
            (
                "stride 0",
                |d| {
                    d.fleets
                        .get_mut("bots")
                        .unwrap()
                        .agents
                        .get_mut("a2")
                        .unwrap()
                        .stride = 0;
                },
                "fleets.bots.agents.a2.stride",
            ),
            (
                "duplicate base",
                |d| {
                    let f = d.fleets.get_mut("bots").unwrap();
                    let b = f.agents["a2"].port_base;
                    f.agents.get_mut("a3").unwrap().port_base = b;
                },
                "overlaps",
            ),
            (
                "empty command",
                |d| {
                    d.fleets.get_mut("bots").unwrap().spec.command = Some(vec![]);
                },
                "fleets.bots.spec.command",
            ),
            (
                "agent lists differ",
                |d| {
                    d.fleets.get_mut("bots").unwrap().spec.agents.pop();
                },
                "name different agents",
            ),
            (
                "empty token",
                |d| {
                    d.fleets
                        .get_mut("bots")
                        .unwrap()
                        .agents
                        .get_mut("a1")
                        .unwrap()
                        .token
                        .clear();
                },
                "fleets.bots.agents.a1.token",
            ),
            ("node id", |d| d.node_id = "a/b".into(), "node_id"),
            (
                "no lease",
                |d| {
                    d.fleets
                        .get_mut("bots")
                        .unwrap()
                        .agents
                        .get_mut("a1")
                        .unwrap()
                        .port_base = None;
                },
                "fleets.bots.agents.a1.port_base: missing",
            ),
        ];
        for (what, edit, want) in cases {
            let mut d = good.clone();
            edit(&mut d);
            let e = validate(&d, &range).expect_err(what);
            assert!(e.contains(want), "{what}: {e}");
        }
    }

    /// Counts saves, each taking a while, and keeps the last data it was given.
    struct SlowStore {
        saves: std::sync::atomic::AtomicUsize,
        last: std::sync::Mutex<Option<RegistryData>>,
    }

    /// Shared with the test, which reads what it counted.
    impl Store for std::sync::Arc<SlowStore> {
        fn load(&self) -> Result<Option<RegistryData>, FleetError> {
            Ok(None)
        }
        fn save(&self, data: &RegistryData) -> Result<(), FleetError> {
            std::thread::sleep(std::time::Duration::from_millis(50));
            self.saves.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            *self.last.lock().unwrap() = Some(data.clone());
            Ok(())
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_writer_commits_queued_saves_together_and_answers_each() {
        let store = std::sync::Arc::new(SlowStore {
            saves: Default::default(),
            last: Default::default(),
        });
        let writer = Writer::start(Box::new(store.clone()));
        let mut waits = Vec::new();
        for i in 0..20 {
            let w = writer.clone();
            waits.push(tokio::spawn(async move {
                w.save(RegistryData::new(format!("n{i}"))).await
            }));
        }
        for w in waits {
            w.await.unwrap().unwrap();
        }
        let saves = store.saves.load(std::sync::atomic::Ordering::SeqCst);
        assert!((1..20).contains(&saves), "{saves} writes for 20 saves");
        // Whatever was queued last is what is on disk.
        writer.save(RegistryData::new("final")).await.unwrap();
        assert_eq!(
            store.last.lock().unwrap().as_ref().unwrap().node_id,
            "final"
        );
    }

    #[test]
    fn stale_temp_file_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::new(dir.path());
        fs::write(dir.path().join(".registry.json.tmp"), b"half a registry").unwrap();
        let data = sample("n", &["a1"]);
        store.save(&data).unwrap();
        assert_eq!(store.load().unwrap(), Some(data));
    }
}
