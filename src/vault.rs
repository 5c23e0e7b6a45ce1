//! Where the registry's file store keeps what must never be in the registry in clear: each
//! tenant's secret values (current and earlier, for redaction) and the contents of the files
//! its settings copy into its HOME. One JSON file, `<state_dir>/vault.json`, mode 0600,
//! written atomically before `registry.json` on every save that changed it, read back at
//! load. The registry itself names each secret and its source file only.

use crate::registry::RegistryData;
use crate::spec::Secret;
use crate::FleetError;
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

const VAULT_VERSION: u32 = 1;
/// Largest vault fleetd reads (64 secrets of 64 KiB and 64 files of 1 MiB for a few agents
/// would pass; a registry's worth of tenants with ordinary values is far below it).
pub const MAX_VAULT_BYTES: u64 = 1024 * 1024 * 1024;

#[derive(Debug, Default, Serialize, Deserialize)]
struct VaultFile {
    version: u32,
    /// `fleet/agent` → what it holds.
    agents: BTreeMap<String, Entry>,
}

#[derive(Debug, Default, Serialize, Deserialize, PartialEq)]
struct Entry {
    #[serde(flatten)]
    held: Held,
    /// Earlier secret values, newest last: old log lines still carry them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    previous: Vec<String>,
}

/// One tenant's accepted values in the form they are stored in: the vault file here, the
/// fleet's doc in etcd in cluster mode.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Held {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    secrets: BTreeMap<String, String>,
    /// Destination → base64 content.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    files: BTreeMap<String, String>,
}

impl Held {
    /// What `t` accepted.
    pub fn of(t: &crate::spec::AgentSettings) -> Held {
        let b64 = base64::engine::general_purpose::STANDARD;
        Held {
            secrets: t
                .accepted
                .secrets
                .iter()
                .map(|(k, s)| (k.clone(), s.expose().to_string()))
                .collect(),
            files: t
                .accepted
                .files
                .iter()
                .map(|(k, c)| (k.clone(), b64.encode(c)))
                .collect(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.secrets.is_empty() && self.files.is_empty()
    }

    /// Puts the values back into `t`: only those its settings still name. The error names
    /// the file whose content does not decode.
    pub fn restore(self, t: &mut crate::spec::AgentSettings) -> Result<(), String> {
        let b64 = base64::engine::general_purpose::STANDARD;
        for (k, s) in self.secrets {
            if t.secrets.contains_key(&k) {
                t.accepted.secrets.insert(k, Secret::new(s));
            }
        }
        for (k, c) in self.files {
            if t.files.contains_key(&k) {
                let c = b64
                    .decode(c.as_bytes())
                    .map_err(|e| format!("file {k:?}: {e}"))?;
                t.accepted.files.insert(k, c);
            }
        }
        Ok(())
    }
}

/// The bytes of a vault holding nothing.
pub fn empty() -> Vec<u8> {
    encode(&RegistryData::default())
}

/// The vault's bytes for `data`.
pub fn encode(data: &RegistryData) -> Vec<u8> {
    let mut v = VaultFile {
        version: VAULT_VERSION,
        agents: BTreeMap::new(),
    };
    for (fname, f) in &data.fleets {
        for (aname, rec) in &f.agents {
            let mut e = Entry {
                previous: rec
                    .previous_secrets
                    .iter()
                    .map(|s| s.expose().to_string())
                    .collect(),
                ..Entry::default()
            };
            if let Some(t) = f.spec.tenant(aname) {
                e.held = Held::of(t);
            }
            if e != Entry::default() {
                v.agents.insert(format!("{fname}/{aname}"), e);
            }
        }
    }
    let mut bytes = serde_json::to_vec(&v).expect("the vault serializes");
    bytes.push(b'\n');
    bytes
}

/// Puts the vault's values back into `data` (as loaded from `registry.json`). What the
/// registry names and the vault lacks stays missing: that agent's start says so.
pub fn decode_into(bytes: &[u8], path: &Path, data: &mut RegistryData) -> Result<(), FleetError> {
    let bad = |why: String| FleetError::Store {
        reason: format!("{}: {why}; the file was left untouched", path.display()),
    };
    let v: VaultFile =
        serde_json::from_slice(bytes).map_err(|e| bad(format!("is corrupt: {e}")))?;
    if v.version != VAULT_VERSION {
        return Err(bad(format!(
            "has format version {}, this build reads version {VAULT_VERSION}",
            v.version
        )));
    }
    for (key, e) in v.agents {
        let Some((fname, aname)) = key.split_once('/') else {
            continue;
        };
        let Some(f) = data.fleets.get_mut(fname) else {
            continue;
        };
        if let Some(rec) = f.agents.get_mut(aname) {
            rec.previous_secrets = e.previous.into_iter().map(Secret::new).collect();
        }
        let Some(t) = f.spec.tenants.get_mut(aname) else {
            continue;
        };
        e.held
            .restore(t)
            .map_err(|why| bad(format!("{key}: {why}")))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::{AgentRecord, Desired, FleetRecord};
    use crate::spec::{AgentSettings, FleetSpec};

    #[test]
    fn values_round_trip_and_never_reach_the_registry_json() {
        let mut spec = FleetSpec::new("f");
        spec.agents = vec!["a".into(), "b".into()];
        let mut t = AgentSettings::default();
        t.secrets.insert("TG_BOT_TOKEN".into(), "/s/a.tg".into());
        t.files.insert("SOUL.md".into(), "/s/soul.md".into());
        t.accepted.secrets.insert(
            "TG_BOT_TOKEN".into(),
            Secret::new("123:secret-value".into()),
        );
        t.accepted
            .files
            .insert("SOUL.md".into(), vec![0, 1, 2, 255]);
        spec.tenants.insert("a".into(), t);
        let rec = |prev: Vec<Secret>| AgentRecord {
            desired: Desired::Running,
            port_base: Some(1),
            stride: 1,
            token: "t".repeat(64),
            process: None,
            uid: None,
            previous_tokens: vec![],
            previous_secrets: prev,
        };
        let mut data = RegistryData::new("n");
        data.fleets.insert(
            "f".into(),
            FleetRecord {
                spec,
                desired: Desired::Running,
                agents: [
                    (
                        "a".to_string(),
                        rec(vec![Secret::new("old-value-1".into())]),
                    ),
                    ("b".to_string(), rec(vec![])),
                ]
                .into_iter()
                .collect(),
                origin: None,
            },
        );
        let registry = serde_json::to_string(&data).unwrap();
        for v in ["123:secret-value", "old-value-1"] {
            assert!(!registry.contains(v), "{v} in the registry: {registry}");
        }
        assert!(registry.contains("TG_BOT_TOKEN") && registry.contains("/s/a.tg"));
        let bytes = encode(&data);
        let mut back: RegistryData = serde_json::from_str(&registry).unwrap();
        assert_ne!(back, data, "values are not in the registry alone");
        decode_into(&bytes, Path::new("vault.json"), &mut back).unwrap();
        assert_eq!(back, data);
        let e = decode_into(b"{", Path::new("/x/vault.json"), &mut back).unwrap_err();
        assert!(e.to_string().contains("/x/vault.json"), "{e}");
    }
}
