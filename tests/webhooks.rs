//! Webhook channels behind a real front door: two tenants whose Telegram channel is in webhook
//! mode get listeners on ports of their own blocks, register `<public url>/<fleet>/<agent>/
//! telegram` with a secret of their own, and a real nginx, configured by fleetd and reloaded by
//! it on every change, routes each tenant's path to that tenant's gateway. Loopback only: the
//! Bot API and the model are the test suite's fakes.

mod common;
#[path = "common/openclaw.rs"]
mod openclaw;

use common::fakes::{dm_update, FakeModel, FakeTelegram};
use common::{searchable, wait_until, Daemon};
use openclaw::{install, serial, START_DEADLINE};
use serde_json::Value;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

struct Tenant {
    id: &'static str,
    bot: &'static str,
    key: &'static str,
    user: i64,
}

const TENANTS: [Tenant; 2] = [
    Tenant {
        id: "alice",
        bot: "2001:AAalice-hook-token-0001",
        key: "sk-alice-hook-00001",
        user: 6001,
    },
    Tenant {
        id: "bob",
        bot: "2002:AAbob-hook-token-00002",
        key: "sk-bob-hook-000002",
        user: 6002,
    },
];

/// The nginx `scripts/install-nginx.sh` provides (`scripts/test.sh` exports its path).
fn nginx_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("FLEET_NGINX_BIN").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    let out = std::process::Command::new("scripts/install-nginx.sh")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run scripts/install-nginx.sh");
    let text = String::from_utf8_lossy(&out.stdout);
    let bin = text
        .lines()
        .find_map(|l| l.strip_prefix("NGINX_BIN="))
        .unwrap_or_else(|| {
            panic!(
                "the webhook test needs nginx: scripts/install-nginx.sh failed: {}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    PathBuf::from(bin)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One HTTP/1.0 POST on loopback: (status, headers lower-cased, body).
fn post(port: u16, path: &str, secret: &str, body: &str) -> (u16, String, String) {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let req = format!(
        "POST {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nX-Telegram-Bot-Api-Secret-Token: {secret}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let (head, rest) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, head.to_lowercase(), rest.to_string())
}

fn durable(head: &str) -> bool {
    head.contains("x-openclaw-delivery-accepted: durable")
}

struct Nginx {
    child: std::process::Child,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM: the master stops its workers and exits.
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
    }
}

fn nginx_conf(dir: &Path, port: u16, door: &Path) -> PathBuf {
    for sub in ["body", "proxy", "fastcgi", "uwsgi", "scgi", "logs"] {
        std::fs::create_dir_all(dir.join(sub)).unwrap();
    }
    let conf = dir.join("nginx.conf");
    let d = dir.display();
    std::fs::write(
        &conf,
        format!(
            "daemon off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/logs/error.log info;\n\
             user root;\nevents {{ worker_connections 64; }}\n\
             http {{\n  access_log {d}/logs/access.log;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
             server {{\n    listen 127.0.0.1:{port};\n    server_name _;\n    include {door}/fleet-commander-webhooks.conf;\n    location / {{ return 404; }}\n  }}\n}}\n",
            door = door.display()
        ),
    )
    .unwrap();
    conf
}

#[test]
fn webhook_tenants_behind_a_real_nginx() {
    let Some(inst) = install("webhook_tenants_behind_a_real_nginx") else {
        return;
    };
    let _one = serial();
    let nginx = nginx_bin();
    let tg = FakeTelegram::start();
    let model = FakeModel::start("the model answers with key {key}");
    for t in &TENANTS {
        tg.add_bot(t.bot);
    }
    let work = tempfile::tempdir().unwrap();
    let dir = work.path();
    searchable(dir);
    let door = dir.join("door");
    let ngx_dir = dir.join("nginx");
    std::fs::create_dir_all(&door).unwrap();
    let ngx_port = free_port();
    let conf = nginx_conf(&ngx_dir, ngx_port, &door);
    std::fs::write(
        dir.join("fleet.json"),
        serde_json::json!({
            "models": {"providers": {"fake": {"baseUrl": model.base_url(),
                "apiKey": "${OPENAI_API_KEY}", "models": [{"id": "m", "name": "m"}]}}},
            "agents": {"defaults": {"model": {"primary": "fake/m"}, "heartbeat": {"every": "0m"}}}
        })
        .to_string(),
    )
    .unwrap();
    for t in &TENANTS {
        std::fs::write(dir.join(format!("{}.tg", t.id)), t.bot).unwrap();
        std::fs::write(dir.join(format!("{}.key", t.id)), t.key).unwrap();
        std::fs::write(
            dir.join(format!("{}.json", t.id)),
            serde_json::json!({"channels": {"telegram": {
                "botToken": "${TG_BOT_TOKEN}", "apiRoot": tg.api_root(),
                "dmPolicy": "allowlist", "allowFrom": [t.user.to_string()],
                // Webhook mode; fleetd replaces the URL with its front door's.
                "webhookUrl": "auto", "webhookPort": 8787}}})
            .to_string(),
        )
        .unwrap();
    }
    let public = format!("http://127.0.0.1:{ngx_port}/hooks");
    let reload = format!(
        "{} -p {} -c {} -s reload",
        nginx.display(),
        ngx_dir.display(),
        conf.display()
    );
    let bin = inst.openclaw.display().to_string();
    let d = Daemon::start_with(&[
        "--openclaw",
        &bin,
        "--public-url",
        &public,
        "--webhooks-dir",
        door.to_str().unwrap(),
        "--webhooks-reload",
        &reload,
    ]);
    let tpl = dir.join("fleet.json");
    d.ctl(&[
        "fleet",
        "create",
        "hooks",
        "--profile",
        "lean",
        "--template",
        tpl.to_str().unwrap(),
    ]);
    for t in &TENANTS {
        let p = |s: &str| dir.join(format!("{}.{s}", t.id)).display().to_string();
        d.ctl(&[
            "agent",
            "add",
            "hooks",
            t.id,
            "--template",
            &p("json"),
            "--secret",
            &format!("TG_BOT_TOKEN={}", p("tg")),
            "--secret",
            &format!("OPENAI_API_KEY={}", p("key")),
        ]);
    }
    let rows = d.wait_running("hooks", 2, START_DEADLINE);

    // Each listener on a port of its own block, on loopback, not the template's 8787.
    let mut hook_port = std::collections::BTreeMap::new();
    for r in &rows {
        let base = r["port"].as_u64().unwrap() as u16;
        let p = r["webhooks"]["telegram"]
            .as_u64()
            .unwrap_or_else(|| panic!("{r}")) as u16;
        assert!(p > base && p < base + 4, "{r}");
        hook_port.insert(r["agent"].as_str().unwrap().to_string(), p);
    }
    assert_ne!(hook_port["alice"], hook_port["bob"]);
    let ports: Value = serde_json::from_str(&d.ctl(&["--json", "ports"])).unwrap();
    for row in ports.as_array().unwrap() {
        let a = row["agent"].as_str().unwrap();
        assert_eq!(row["webhooks"]["telegram"], hook_port[a], "{ports}");
    }
    let cfg: Value =
        serde_json::from_str(&d.ctl(&["--json", "agent", "config", "hooks/alice"])).unwrap();
    let tgc = &cfg["config"]["channels"]["telegram"];
    assert_eq!(tgc["webhookHost"], "127.0.0.1", "{tgc}");
    assert_eq!(
        tgc["webhookSecret"], "[REDACTED]",
        "the secret is never shown: {tgc}"
    );
    assert_eq!(tgc["webhookUrl"], format!("{public}/hooks/alice/telegram"));

    // Each gateway registered its own URL with its own secret.
    let mut secret = std::collections::BTreeMap::new();
    for t in &TENANTS {
        let (url, s) = wait_until(START_DEADLINE, &format!("{}'s setWebhook", t.id), |seen| {
            *seen = format!("{:?}", tg.calls(t.bot));
            tg.webhook(t.bot)
        });
        assert_eq!(url, format!("{public}/hooks/{}/telegram", t.id));
        let token: Value =
            serde_json::from_str(&d.ctl(&["--json", "token", &format!("hooks/{}", t.id)])).unwrap();
        assert_eq!(
            s,
            fleet_commander::webhooks::secret(token["token"].as_str().unwrap())
        );
        secret.insert(t.id, s);
    }
    assert_ne!(secret["alice"], secret["bob"]);
    for t in &TENANTS {
        wait_until(START_DEADLINE, &format!("{}'s listener", t.id), |_| {
            std::net::TcpStream::connect(("127.0.0.1", hook_port[t.id])).ok()
        });
    }

    // The front door: nginx with the config fleetd wrote.
    let routes = std::fs::read_to_string(door.join("fleet-commander-webhooks.conf")).unwrap();
    assert!(
        routes.contains("location = /hooks/hooks/alice/telegram"),
        "{routes}"
    );
    let _nginx = Nginx {
        child: std::process::Command::new(&nginx)
            .args([
                "-p",
                ngx_dir.to_str().unwrap(),
                "-c",
                conf.to_str().unwrap(),
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(ngx_dir.join("logs/stderr.log")).unwrap())
            .spawn()
            .expect("start nginx"),
    };
    wait_until(Duration::from_secs(20), "nginx to listen", |_| {
        std::net::TcpStream::connect(("127.0.0.1", ngx_port)).ok()
    });

    // A DM posted to each tenant's path with its secret reaches that tenant's bot.
    let mut id = 50_000;
    for t in &TENANTS {
        id += 1;
        let update = dm_update(id, t.user, "hello through the front door").to_string();
        let path = format!("/hooks/hooks/{}/telegram", t.id);
        let (code, head, body) = post(ngx_port, &path, &secret[t.id], &update);
        assert!(
            code == 200 && durable(&head),
            "{}: {code} {head} {body}",
            t.id
        );
        let m = wait_until(
            Duration::from_secs(120),
            &format!("{}'s reply", t.id),
            |seen| {
                let sent = tg.sent(t.bot);
                *seen = format!("{sent:?}");
                sent.into_iter()
                    .find(|m| m.text.contains("the model answers"))
            },
        );
        assert_eq!(m.chat_id, t.user.to_string());
        assert!(
            m.text.contains(t.key),
            "{}'s bot answered with another key: {}",
            t.id,
            m.text
        );
    }
    // The wrong secret, another tenant's secret on a path, an unknown path: refused.
    let update = dm_update(60_001, TENANTS[0].user, "x").to_string();
    let (code, head, _) = post(
        ngx_port,
        "/hooks/hooks/alice/telegram",
        "wrong-secret",
        &update,
    );
    assert!(
        code != 200 && !durable(&head),
        "a wrong secret is refused: {code} {head}"
    );
    let (code, head, _) = post(
        ngx_port,
        "/hooks/hooks/bob/telegram",
        &secret["alice"],
        &update,
    );
    assert!(
        code != 200 && !durable(&head),
        "alice's secret opens not bob's path: {code} {head}"
    );
    let (code, _, _) = post(
        ngx_port,
        "/hooks/hooks/carol/telegram",
        &secret["alice"],
        &update,
    );
    assert_eq!(code, 404, "no such agent");

    // Throughput and the proxy's cost: the same accepted update (from a user the allowlist
    // drops after durable admission, so no model turn), through nginx and straight.
    let n = 200;
    let mut timing = |port: u16, path: &str| -> (f64, f64) {
        let t0 = Instant::now();
        for _ in 0..n {
            id += 1;
            let u = dm_update(id, 999_999, "load").to_string();
            let (code, head, _) = post(port, path, &secret["alice"], &u);
            assert!(code == 200 && durable(&head), "{code} {head}");
        }
        let s = t0.elapsed().as_secs_f64();
        (n as f64 / s, s / n as f64 * 1000.0)
    };
    let (rps_door, ms_door) = timing(ngx_port, "/hooks/hooks/alice/telegram");
    let (rps_direct, ms_direct) =
        timing(hook_port["alice"], fleet_commander::webhooks::LISTENER_PATH);
    eprintln!(
        "FIGURE webhook front door: {rps_door:.0} req/s through nginx ({ms_door:.2} ms each) vs {rps_direct:.0} req/s straight ({ms_direct:.2} ms): the proxy hop adds {:.2} ms",
        ms_door - ms_direct
    );

    // Removing an agent removes its route, and nginx is reloaded with it.
    d.ctl(&["agent", "rm", "hooks/bob"]);
    wait_until(Duration::from_secs(60), "bob's route gone", |seen| {
        let (code, _, _) = post(
            ngx_port,
            "/hooks/hooks/bob/telegram",
            &secret["bob"],
            &update,
        );
        *seen = code.to_string();
        (code == 404).then_some(())
    });
    let routes = std::fs::read_to_string(door.join("fleet-commander-webhooks.conf")).unwrap();
    assert!(!routes.contains("/bob/"), "{routes}");
    let (code, head, _) = post(
        ngx_port,
        "/hooks/hooks/alice/telegram",
        &secret["alice"],
        &dm_update(id + 1, 999_999, "still").to_string(),
    );
    assert!(
        code == 200 && durable(&head),
        "alice still routed: {code} {head}"
    );
}
