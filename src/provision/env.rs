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
    /// Shared `NODE_COMPILE_CACHE` directory (one 48 MB copy for the whole fleet).
    pub compile_cache: &'a Path,
    pub node_bin_dir: Option<&'a Path>,
    pub profile: Profile,
    /// Value of `FLEET_COMMANDER_AGENT`, by which the supervisor finds every descendant.
    pub marker: &'a str,
    /// The spec's `env`; wins over everything except HOME and FLEET_COMMANDER_AGENT.
    pub extra: &'a BTreeMap<String, String>,
    /// False for a custom command: it gets no OpenClaw/Node tuning it did not ask for.
    pub runs_openclaw: bool,
}

pub const MARKER_VAR: &str = "FLEET_COMMANDER_AGENT";
pub(super) const LEAN_NODE_OPTIONS: &str = "--max-old-space-size=256 --max-semi-space-size=1";

/// The agent's whole environment (nothing is inherited), sorted by name, no duplicates.
///
/// For a custom command (`runs_openclaw == false`) the shared compile cache and the lean
/// profile's heap cap are left out: both were measured for OpenClaw only, and a heap cap of
/// 256 MB can break an arbitrary Node program. `extra` can add them back.
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
            input.compile_cache.to_string_lossy().into_owned(),
        );
        // NODE_COMPILE_CACHE alone makes the launcher re-spawn itself (OPENCLAW.md).
        put("OPENCLAW_PACKAGED_COMPILE_CACHE_RESPAWNED", "1".into());
        if input.profile == Profile::Lean {
            put("NODE_OPTIONS", LEAN_NODE_OPTIONS.into());
            put("MALLOC_ARENA_MAX", "2".into());
            put("OPENCLAW_DISABLE_BONJOUR", "1".into());
            put("OPENCLAW_NO_AUTO_UPDATE", "1".into());
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
    env.into_iter().collect()
}
