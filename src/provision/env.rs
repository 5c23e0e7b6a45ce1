//! The agent's whole environment: nothing inherited, the marker, the profile's tuning, then
//! the fleet's `env`.

use super::*;
use crate::spec::Profile;
use std::collections::BTreeMap;
use std::path::Path;

/// What `agent_env` needs to know about one agent.
#[derive(Debug, Clone)]
pub struct EnvInput<'a> {
    pub paths: &'a AgentPaths,
    pub port: u16,
    pub node_bin_dir: Option<&'a Path>,
    pub profile: Profile,
    /// Value of `FLEET_COMMANDER_AGENT`, by which the supervisor finds every descendant.
    pub marker: &'a str,
    /// The spec's `env`; wins over everything except HOME and FLEET_COMMANDER_AGENT.
    pub extra: &'a BTreeMap<String, String>,
    /// False for a custom command: it gets no OpenClaw/Node tuning it did not ask for.
    pub runs_openclaw: bool,
    /// A heap cap raised after out-of-memory aborts (`heap_raise`): replaces whatever
    /// `--max-old-space-size` NODE_OPTIONS has.
    pub heap_mib: Option<u32>,
}

pub const MARKER_VAR: &str = "FLEET_COMMANDER_AGENT";
/// The lean heap cap is sized under conversation, not idle: at 256 MiB (enough idle) two
/// talking tenants (6 messages a minute) aborted with V8's heap out-of-memory every 2-2.5
/// minutes (7 aborts in 10 minutes); at 384 MiB the same load ran 10 minutes with no restart,
/// reply p50 1.5 s (`fleet-bench --real 2 --talk 6 --minutes 10`, docs/bench.md).
pub const LEAN_NODE_OPTIONS: &str = "--max-old-space-size=384 --max-semi-space-size=1";

/// What the lean profile adds to an OpenClaw agent's environment beside its NODE_OPTIONS:
/// a smaller allocator footprint, no mDNS, no self-update.
pub const LEAN_ENV: &[(&str, &str)] = &[
    ("MALLOC_ARENA_MAX", "2"),
    ("OPENCLAW_DISABLE_BONJOUR", "1"),
    ("OPENCLAW_NO_AUTO_UPDATE", "1"),
];

/// The agent's whole environment (nothing is inherited), sorted by name, no duplicates.
///
/// For a custom command (`runs_openclaw == false`) the compile cache setting and the lean
/// profile's heap cap are left out: both were measured for OpenClaw only, and a heap cap
/// can break an arbitrary Node program. `extra` can add them back.
///
/// The compile cache is the agent's own (`$TMPDIR/node-compile-cache`, where the launcher
/// puts it by itself): a cache shared between tenants is code one tenant could plant for
/// another's Node to load. A shared warm cache measured no start-up gain (OPENCLAW.md).
pub fn agent_env(input: &EnvInput) -> Vec<(String, String)> {
    let p = input.paths;
    let home = p.home.to_string_lossy().into_owned();
    let mut path = String::new();
    if let Some(dir) = input.node_bin_dir {
        path.push_str(&dir.to_string_lossy());
        path.push(':');
    }
    path.push_str("/usr/local/bin:/usr/bin:/bin");
    let mut env: BTreeMap<String, String> = BTreeMap::new();
    let mut put = |k: &str, v: String| {
        env.insert(k.to_string(), v);
    };
    put("HOME", home.clone());
    put("PATH", path);
    put("TMPDIR", p.tmp.to_string_lossy().into_owned());
    put("OPENCLAW_GATEWAY_PORT", input.port.to_string());
    // Without it the CLI may re-exec itself and the pid we hold is not the gateway.
    put("OPENCLAW_NO_RESPAWN", "1".into());
    put("NODE_ENV", "production".into());
    put("NO_COLOR", "1".into());
    put(MARKER_VAR, input.marker.to_string());
    if input.runs_openclaw {
        put(
            "NODE_COMPILE_CACHE",
            p.tmp
                .join("node-compile-cache")
                .to_string_lossy()
                .into_owned(),
        );
        // NODE_COMPILE_CACHE alone makes the launcher re-spawn itself (OPENCLAW.md).
        put("OPENCLAW_PACKAGED_COMPILE_CACHE_RESPAWNED", "1".into());
        if input.profile == Profile::Lean {
            put("NODE_OPTIONS", LEAN_NODE_OPTIONS.into());
            for (k, v) in LEAN_ENV {
                put(k, v.to_string());
            }
        }
    }
    for (k, v) in input.extra {
        // Names the spec validation already rejects would make the spawn itself fail.
        let bad = k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0');
        if bad || k == "HOME" || k == MARKER_VAR {
            continue;
        }
        env.insert(k.clone(), v.clone());
    }
    if let Some(mib) = input.heap_mib {
        let others: Vec<&str> = env
            .get("NODE_OPTIONS")
            .map(|o| {
                o.split_whitespace()
                    .filter(|w| !w.starts_with("--max-old-space-size="))
                    .collect()
            })
            .unwrap_or_default();
        let mut opts = others.join(" ");
        if !opts.is_empty() {
            opts.push(' ');
        }
        opts.push_str(&format!("--max-old-space-size={mib}"));
        env.insert("NODE_OPTIONS".into(), opts);
    }
    env.into_iter().collect()
}

/// The environment an agent adds to fleetd's own (`EnvInput::extra`): its fleet's `env`,
/// then its own `env`, then each of its secrets by name. A secret the registry names but
/// whose value fleetd no longer holds (a lost vault) is an error naming it.
pub fn extra_env(
    spec: &crate::spec::FleetSpec,
    agent: &str,
) -> Result<BTreeMap<String, String>, crate::FleetError> {
    let mut env = spec.env.clone();
    let Some(t) = spec.tenant(agent) else {
        return Ok(env);
    };
    env.extend(t.env.iter().map(|(k, v)| (k.clone(), v.clone())));
    for name in t.secrets.keys() {
        match t.accepted.secrets.get(name) {
            Some(v) => {
                env.insert(name.clone(), v.expose().to_string());
            }
            None => {
                return Err(crate::FleetError::Spec {
                    reason: format!(
                        "agent {}/{agent}: secret {name} has no value in fleetd's vault: set it again (agent secret {}/{agent} set {name} FILE)",
                        spec.name, spec.name
                    ),
                })
            }
        }
    }
    Ok(env)
}

/// Writes an agent's secrets (`.openclaw/secrets/<NAME>`, for settings that read a file) and
/// the files its settings copy into its HOME, each 0600; drops secret files it no longer has.
pub fn place_tenant_files(
    paths: &AgentPaths,
    t: Option<&crate::spec::AgentSettings>,
) -> Result<(), crate::FleetError> {
    use crate::spec::SECRETS_DIR_IN_HOME;
    let fail = |e: String| paths.err(e);
    let names: Vec<&str> = t
        .map(|t| t.accepted.secrets.keys().map(String::as_str).collect())
        .unwrap_or_default();
    // No secrets now and none before: no secrets directory to tidy.
    if !names.is_empty() || paths.home.join(SECRETS_DIR_IN_HOME).exists() {
        prune_in_home(&paths.home, SECRETS_DIR_IN_HOME, &names).map_err(fail)?;
    }
    let Some(t) = t else { return Ok(()) };
    for (name, v) in &t.accepted.secrets {
        write_in_home(
            &paths.home,
            &format!("{SECRETS_DIR_IN_HOME}/{name}"),
            v.expose().as_bytes(),
        )
        .map_err(fail)?;
    }
    for (dest, content) in &t.accepted.files {
        write_in_home(&paths.home, dest, content).map_err(fail)?;
    }
    Ok(())
}
