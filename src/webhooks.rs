//! Webhook channels: which of an agent's channels take webhooks (its effective config sets the
//! channel's `webhookUrl`), the loopback port each listener gets inside the agent's own leased
//! block, the secret each agent's listener checks, and the front door: an nginx or Caddy
//! config that routes `<public url>/<fleet>/<agent>/<channel>` to that port, written and
//! reloaded whenever the routes change. Plain functions; the node calls them.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// Channels whose OpenClaw config runs a local webhook listener, and the config keys of it.
/// (Telegram is the one OpenClaw 2026.9 has; a channel added here gets a port the same way.)
pub const WEBHOOK_CHANNELS: &[&str] = &["telegram"];

/// The path OpenClaw's listener serves (its default, enforced so the routes can name it).
pub const LISTENER_PATH: &str = "/telegram-webhook";

/// The channels of a config (a rendered or effective template) in webhook mode, in
/// `WEBHOOK_CHANNELS` order: those with a non-empty `channels.<name>.webhookUrl` that are not
/// switched off.
pub fn channels(config: Option<&Value>) -> Vec<&'static str> {
    let Some(ch) = config.and_then(|c| c.get("channels")) else {
        return Vec::new();
    };
    WEBHOOK_CHANNELS
        .iter()
        .copied()
        .filter(|name| {
            let c = &ch[*name];
            c.get("enabled") != Some(&Value::Bool(false))
                && c["webhookUrl"].as_str().is_some_and(|u| !u.is_empty())
        })
        .collect()
}

/// The port of the `index`-th webhook listener of an agent whose block is `base..base+stride`:
/// above what OpenClaw derives from its base (up to base+110) in a full block, right after the
/// base in a small one (a lean gateway listens on its base only). `None` when the block has no
/// room for it.
pub fn port(base: u16, stride: u16, index: usize) -> Option<u16> {
    let offset = if stride >= 128 { 120 } else { 1 } + index as u32;
    (offset < stride as u32)
        .then(|| base as u32 + offset)
        .filter(|p| *p <= u16::MAX as u32)
        .map(|p| p as u16)
}

/// Each webhook channel of a config and its port, in order.
pub fn ports(config: Option<&Value>, base: u16, stride: u16) -> Vec<(&'static str, Option<u16>)> {
    channels(config)
        .into_iter()
        .enumerate()
        .map(|(i, c)| (c, port(base, stride, i)))
        .collect()
}

/// The secret Telegram sends in `X-Telegram-Bot-Api-Secret-Token` and the agent's listener
/// checks: derived from the agent's gateway token, so it is the agent's alone, is never stored
/// apart from it, and changes when the token is rotated. Telegram allows `A-Za-z0-9_-`.
pub fn secret(gateway_token: &str) -> String {
    use sha2::Digest;
    let d = sha2::Sha256::digest(format!("fleet-commander webhook secret\0{gateway_token}"));
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// The public URL of one agent's channel: `<base>/<fleet>/<agent>/<channel>`.
pub fn public_url(base: &str, fleet: &str, agent: &str, channel: &str) -> String {
    format!("{}/{fleet}/{agent}/{channel}", base.trim_end_matches('/'))
}

/// Why `v` cannot be the public base URL (`--public-url`).
pub fn public_url_problem(v: &str) -> Option<String> {
    let rest = v
        .strip_prefix("https://")
        .or_else(|| v.strip_prefix("http://"));
    let Some(rest) = rest else {
        return Some(format!("{v:?} must start with https:// (or http://)"));
    };
    let host = rest.split('/').next().unwrap_or("");
    if host.is_empty()
        || v.len() > 512
        || v.chars()
            .any(|c| c.is_control() || c.is_whitespace() || "\"'`;{}\\$#?".contains(c))
    {
        return Some(format!(
            "{v:?} must be a plain URL: a host, an optional path, no spaces, quotes, ';', '{{', '}}', '$', '#' or '?'"
        ));
    }
    None
}

/// The path part of the public base (`https://h/hooks/` → `/hooks`), where the routes live.
pub fn base_path(base: &str) -> String {
    let rest = base
        .strip_prefix("https://")
        .or_else(|| base.strip_prefix("http://"))
        .unwrap_or(base);
    match rest.find('/') {
        Some(i) => rest[i..].trim_end_matches('/').to_string(),
        None => String::new(),
    }
}

/// One route of the front door.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Route {
    pub fleet: String,
    pub agent: String,
    pub channel: String,
    pub port: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    Nginx,
    Caddy,
}

impl std::str::FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "nginx" => Ok(Format::Nginx),
            "caddy" => Ok(Format::Caddy),
            _ => Err(format!("{s:?}: expected nginx or caddy")),
        }
    }
}

impl Format {
    pub fn file_name(self) -> &'static str {
        match self {
            Format::Nginx => "fleet-commander-webhooks.conf",
            Format::Caddy => "fleet-commander-webhooks.caddy",
        }
    }

    /// The command that makes the proxy read its config again when fleetd is given none.
    pub fn default_reload(self) -> Vec<String> {
        match self {
            Format::Nginx => vec!["nginx".into(), "-s".into(), "reload".into()],
            Format::Caddy => vec![
                "caddy".into(),
                "reload".into(),
                "--config".into(),
                "/etc/caddy/Caddyfile".into(),
            ],
        }
    }
}

/// The config text: to be included inside the operator's `server { … }` (nginx) or site block
/// (Caddy), which holds the TLS part. Only the listed paths are routed; anything else under
/// the base path (when the public URL has one) gets 404 from the proxy itself.
pub fn render(format: Format, base: &str, routes: &[Route]) -> String {
    let prefix = base_path(base);
    let mut out = String::from(
        "# Generated by fleetd: every agent's webhook route. Do not edit: rewritten on every change.\n",
    );
    match format {
        Format::Nginx => {
            for r in routes {
                out.push_str(&format!(
                    "location = {prefix}/{}/{}/{} {{\n    limit_except POST {{ deny all; }}\n    client_max_body_size 1m;\n    proxy_pass http://127.0.0.1:{}{LISTENER_PATH};\n    proxy_set_header Host 127.0.0.1;\n    proxy_set_header X-Forwarded-For $remote_addr;\n}}\n",
                    r.fleet, r.agent, r.channel, r.port
                ));
            }
            // Only under a path of its own: at the site's root it would shadow every other
            // route of the operator's server.
            if !prefix.is_empty() {
                out.push_str(&format!("location ^~ {prefix}/ {{\n    return 404;\n}}\n"));
            }
        }
        Format::Caddy => {
            for r in routes {
                out.push_str(&format!(
                    "handle {prefix}/{}/{}/{} {{\n    request_body {{\n        max_size 1MB\n    }}\n    rewrite * {LISTENER_PATH}\n    reverse_proxy 127.0.0.1:{}\n}}\n",
                    r.fleet, r.agent, r.channel, r.port
                ));
            }
            if !prefix.is_empty() {
                out.push_str(&format!("handle {prefix}/* {{\n    respond 404\n}}\n"));
            }
        }
    }
    out
}

/// How long a proxy's reload command may take.
const RELOAD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Writes the config into `dir` (atomically: a temporary file renamed over the old one) and
/// runs `reload` (at most 30 s). A reload that fails leaves the new file: it holds the routes
/// as they are, what the proxy reads at its next start or reload (fleetd tries again at the
/// next change). Err: what failed, with the proxy's own words.
pub fn apply(dir: &Path, format: Format, text: &str, reload: &[String]) -> Result<PathBuf, String> {
    let path = dir.join(format.file_name());
    write_atomic(dir, &path, format, text.as_bytes())?;
    let Some((prog, args)) = reload.split_first() else {
        return Ok(path);
    };
    run_with_timeout(prog, args).map_err(|e| format!("{} failed: {e}", reload.join(" ")))?;
    Ok(path)
}

fn write_atomic(dir: &Path, path: &Path, format: Format, bytes: &[u8]) -> Result<(), String> {
    use std::io::Write;
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        format.file_name(),
        std::process::id()
    ));
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .map_err(|e| format!("writing {}: {e}", tmp.display()))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(|e| format!("writing {}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| format!("writing {}: {e}", path.display()))
}

fn run_with_timeout(prog: &str, args: &[String]) -> Result<(), String> {
    let mut child = std::process::Command::new(prog)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("running {prog}: {e}"))?;
    let deadline = std::time::Instant::now() + RELOAD_TIMEOUT;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => {
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    use std::io::Read;
                    let _ = (&mut e).take(8192).read_to_string(&mut err);
                }
                return if status.success() {
                    Ok(())
                } else {
                    Err(format!("{status}: {}", err.trim()))
                };
            }
            Ok(None) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("no answer within {} s", RELOAD_TIMEOUT.as_secs()));
            }
            Err(e) => return Err(e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn webhook_channels_and_ports() {
        let polling = json!({"channels": {"telegram": {"botToken": "x"}}});
        assert!(channels(Some(&polling)).is_empty());
        let hook = json!({"channels": {"telegram": {"webhookUrl": "auto"}}});
        assert_eq!(channels(Some(&hook)), vec!["telegram"]);
        let off = json!({"channels": {"telegram": {"webhookUrl": "auto", "enabled": false}}});
        assert!(channels(Some(&off)).is_empty());
        assert!(channels(None).is_empty());
        for (base, stride, i, want) in [
            (20000, 128, 0, Some(20120)),
            (20000, 128, 1, Some(20121)),
            (20000, 4, 0, Some(20001)),
            (20000, 4, 2, Some(20003)),
            (20000, 4, 3, None),
            (20000, 1, 0, None),
            (65534, 4, 0, Some(65535)),
            (65535, 4, 0, None),
        ] {
            assert_eq!(port(base, stride, i), want, "{base} {stride} {i}");
        }
    }

    #[test]
    fn secrets_are_per_token_and_telegram_safe() {
        let a = secret("token-a");
        assert_ne!(a, secret("token-b"));
        assert_eq!(a, secret("token-a"));
        assert_eq!(a.len(), 64);
        assert!(a.bytes().all(|b| b.is_ascii_alphanumeric()));
    }

    #[test]
    fn urls() {
        assert_eq!(
            public_url("https://h.example/hooks/", "f", "a", "telegram"),
            "https://h.example/hooks/f/a/telegram"
        );
        assert_eq!(base_path("https://h.example/hooks/"), "/hooks");
        assert_eq!(base_path("https://h.example"), "");
        for (v, ok) in [
            ("https://h.example", true),
            ("http://127.0.0.1:8080/x", true),
            ("ftp://h", false),
            ("https://", false),
            ("https://h/x;y", false),
            ("https://h/{x}", false),
            ("https://h/a b", false),
        ] {
            assert_eq!(public_url_problem(v).is_none(), ok, "{v}");
        }
    }

    #[test]
    fn rendered_configs_route_each_agent_to_its_port() {
        let routes = vec![
            Route {
                fleet: "f".into(),
                agent: "alice".into(),
                channel: "telegram".into(),
                port: 21001,
            },
            Route {
                fleet: "f".into(),
                agent: "bob".into(),
                channel: "telegram".into(),
                port: 21005,
            },
        ];
        let n = render(Format::Nginx, "https://h/hooks", &routes);
        assert!(n.contains("location = /hooks/f/alice/telegram {"), "{n}");
        assert!(
            n.contains("proxy_pass http://127.0.0.1:21005/telegram-webhook;"),
            "{n}"
        );
        assert!(n.contains("location ^~ /hooks/ {\n    return 404;"), "{n}");
        let c = render(Format::Caddy, "https://h", &routes);
        assert!(c.contains("handle /f/bob/telegram {"), "{c}");
        assert!(
            !c.contains("handle /* "),
            "no catch-all at the site's root: {c}"
        );
        let n = render(Format::Nginx, "https://h", &routes);
        assert!(!n.contains("location ^~ / "), "{n}");
        assert!(c.contains("reverse_proxy 127.0.0.1:21001"), "{c}");
    }
}
