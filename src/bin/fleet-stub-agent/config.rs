//! Reading `openclaw.json` the way the gateway does: port, token, log file.

use super::*;

#[derive(Debug, Default, PartialEq)]
pub(crate) struct Config {
    pub(crate) port: Option<u16>,
    pub(crate) token: Option<String>,
    pub(crate) log_file: Option<PathBuf>,
}

/// Reads the fields the gateway would; like the real one it refuses a config it cannot use,
/// but unlike it (which now starts with a random token) it demands a token, so tests notice
/// a supervisor that forgot to inject one.
pub(crate) fn parse_config(text: &[u8]) -> Result<Config, String> {
    let v: serde_json::Value =
        serde_json::from_slice(text).map_err(|e| format!("invalid JSON: {e}"))?;
    if !v.is_object() {
        return Err("top level is not a JSON object".into());
    }
    let port = match v.pointer("/gateway/port") {
        None | Some(serde_json::Value::Null) => None,
        Some(p) => Some(
            p.as_u64()
                .filter(|n| (1..=65535).contains(n))
                .map(|n| n as u16)
                .ok_or_else(|| format!("gateway.port: {p} is not a port number"))?,
        ),
    };
    let token = v
        .pointer("/gateway/auth/token")
        .and_then(|t| t.as_str())
        .filter(|t| !t.is_empty())
        .map(str::to_string);
    if token.is_none() {
        return Err("gateway.auth.token: missing or empty".into());
    }
    let log_file = v
        .pointer("/logging/file")
        .and_then(|f| f.as_str())
        .filter(|f| !f.is_empty())
        .map(PathBuf::from);
    Ok(Config {
        port,
        token,
        log_file,
    })
}

/// `OPENCLAW_GATEWAY_PORT` wins over `gateway.port`, as in the real gateway.
pub(crate) fn resolve_port(env: Option<&str>, config: Option<u16>) -> Result<u16, String> {
    match env.map(str::trim).filter(|s| !s.is_empty()) {
        Some(s) => s
            .parse::<u16>()
            .ok()
            .filter(|&p| p != 0)
            .ok_or_else(|| format!("OPENCLAW_GATEWAY_PORT: {s:?} is not a port number")),
        None => config.ok_or_else(|| {
            "no port: set OPENCLAW_GATEWAY_PORT or gateway.port in the config".to_string()
        }),
    }
}
