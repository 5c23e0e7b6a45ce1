//! `fleet-stub-agent`: a tiny stand-in for the OpenClaw gateway, for tests and scale benchmarks.
//! It copies what a supervisor can observe (config file, port, probes, token check, a setsid
//! helper process, signals, exit codes, a log file) and fakes failures on demand. It does none
//! of an agent's real work. Single-threaded std + libc with a poll(2) loop and no async runtime,
//! so that thousands fit in memory; argv is hand-parsed to keep the binary small.

mod config;
mod http;
mod opts;
mod plumbing;
mod server;

use config::*;
use http::*;
use opts::*;
use plumbing::*;
use server::*;

use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

pub(crate) const EX_USAGE: i32 = 2;
pub(crate) const EX_CONFIG: i32 = 78;
/// A probe that has not sent its request line and headers by then is dropped, so one slow
/// client never holds a connection slot for long.
pub(crate) const READ_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a deliberately hung /healthz connection is held if the client never gives up.
pub(crate) const HANG_HOLD: Duration = Duration::from_secs(60);
pub(crate) const MAX_CONNS: usize = 256;
pub(crate) const MAX_REQUEST_BYTES: usize = 8 * 1024;
pub(crate) const MIB: usize = 1024 * 1024;
pub(crate) const PAGE: usize = 4096;
/// Leaks happen in ten steps per second so the growth looks continuous to a sampler.
pub(crate) const LEAK_TICK: Duration = Duration::from_millis(100);

fn main() {
    let start = Instant::now();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let opts = match parse_args(&args) {
        Ok(o) => o,
        Err(e) => {
            warn(&format!("fleet-stub-agent: {e}"));
            write_fd(2, USAGE.as_bytes());
            std::process::exit(EX_USAGE);
        }
    };
    if opts.help {
        write_fd(1, USAGE.as_bytes());
        std::process::exit(0);
    }
    warn("stub-agent warning: this is a stand-in");
    if let (Some(code), None) = (opts.exit_code, opts.crash_after_ms) {
        die(
            code,
            &format!("stub-agent: exiting at once with code {code}"),
        );
    }

    let config = if opts.no_config {
        Config::default()
    } else {
        let home = std::env::var_os("HOME")
            .unwrap_or_else(|| die(EX_CONFIG, "stub-agent: config: HOME is not set"));
        let path = PathBuf::from(home).join(".openclaw/openclaw.json");
        let text = std::fs::read(&path).unwrap_or_else(|e| {
            die(
                EX_CONFIG,
                &format!("stub-agent: config {}: {e}", path.display()),
            )
        });
        parse_config(&text).unwrap_or_else(|e| {
            die(
                EX_CONFIG,
                &format!("stub-agent: config {}: {e}", path.display()),
            )
        })
    };
    let env_port = std::env::var("OPENCLAW_GATEWAY_PORT").ok();
    let port = resolve_port(env_port.as_deref(), config.port)
        .unwrap_or_else(|e| die(EX_CONFIG, &format!("stub-agent: {e}")));

    if opts.bind_delay_ms > 0 {
        std::thread::sleep(Duration::from_millis(opts.bind_delay_ms));
    }
    let listener = bind(port, Duration::from_millis(opts.bind_retry_ms));
    if listener.set_nonblocking(true).is_err() {
        die(1, "stub-agent: cannot make the listener non-blocking");
    }
    // Fork before any handler is installed so the helper keeps default dispositions.
    let helper = if opts.no_helper {
        None
    } else {
        let h = spawn_helper(opts.helper_orphan, opts.helper_mb);
        if h.is_none() {
            warn("stub-agent warning: could not start the helper process");
        }
        h
    };
    let sig_rd = install_signals();

    say(&format!(
        "stub-agent listening on 127.0.0.1:{port} pid={}",
        std::process::id()
    ));
    if let Some(h) = helper {
        say(&format!("helper pid={h}"));
    }
    log_line(&config.log_file, &format!("started port={port}"));

    let spike = touch_alloc(opts.spike_mb as usize * MIB);
    let server = Server {
        start,
        token: config.token,
        log_file: config.log_file,
        listener,
        sig_rd,
        conns: Vec::new(),
        exit_at: None,
        leak: Vec::new(),
        next_leak: (opts.leak_mb_per_s > 0).then(|| start + LEAK_TICK),
        spike,
        spike_until: start + Duration::from_millis(opts.spike_ms),
        next_spike: opts
            .spike_every_ms
            .filter(|_| opts.spike_mb > 0)
            .map(|ms| start + Duration::from_millis(ms)),
        next_beat: opts
            .print_every_ms
            .map(|ms| start + Duration::from_millis(ms)),
        beats: 0,
        flood_done: 0,
        flood_line: if opts.flood_bytes > 0 {
            flood_line(opts.line_bytes)
        } else {
            Vec::new()
        },
        opts,
    };
    server.run()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn parses_flags_with_separate_and_inline_values() {
        let o = parse_args(&args(
            "--no-helper --crash-after-ms 300 --exit-code=3 --line-bytes 10 --flood-stderr",
        ))
        .unwrap();
        assert!(o.no_helper && o.flood_stderr && !o.helper_orphan);
        assert_eq!(o.crash_after_ms, Some(300));
        assert_eq!(o.exit_code, Some(3));
        assert_eq!(o.line_bytes, 10);
        assert_eq!(o.bind_retry_ms, 200, "default kept");
    }

    #[test]
    fn rejects_unknown_missing_and_bad_values() {
        for bad in [
            "--frobnicate",
            "--crash-after-ms",
            "--crash-after-ms x",
            "--exit-code 256",
            "--line-bytes 0",
            "--no-helper=1",
            "positional",
        ] {
            assert!(parse_args(&args(bad)).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn config_needs_json_and_a_token() {
        assert!(parse_config(b"{not json")
            .unwrap_err()
            .contains("invalid JSON"));
        assert!(parse_config(b"[]").is_err());
        let no_token = parse_config(br#"{"gateway":{"port":1234}}"#).unwrap_err();
        assert!(no_token.contains("gateway.auth.token"), "{no_token}");
        let empty = br#"{"gateway":{"auth":{"token":""}}}"#;
        assert!(parse_config(empty).is_err());
        let bad_port = br#"{"gateway":{"port":70000,"auth":{"token":"t"}}}"#;
        assert!(parse_config(bad_port).unwrap_err().contains("gateway.port"));
    }

    #[test]
    fn config_reads_port_token_and_log_file() {
        let c = parse_config(
            br#"{"gateway":{"mode":"local","port":4100,"auth":{"mode":"token","token":"s3"}},
                 "logging":{"file":"/tmp/x/a.log"}}"#,
        )
        .unwrap();
        assert_eq!(c.port, Some(4100));
        assert_eq!(c.token.as_deref(), Some("s3"));
        assert_eq!(c.log_file, Some(PathBuf::from("/tmp/x/a.log")));
    }

    #[test]
    fn env_port_wins_and_bad_env_port_is_an_error() {
        assert_eq!(resolve_port(Some("5000"), Some(4000)), Ok(5000));
        assert_eq!(resolve_port(None, Some(4000)), Ok(4000));
        assert_eq!(resolve_port(Some(""), Some(4000)), Ok(4000));
        assert!(resolve_port(None, None).is_err());
        assert!(resolve_port(Some("0"), Some(4000)).is_err());
        assert!(resolve_port(Some("http"), None).is_err());
    }

    #[test]
    fn parses_request_head_and_bearer() {
        let raw = b"GET /whoami?x=1 HTTP/1.1\r\nHost: a\r\nauthorization: bearer  tok \r\n\r\n";
        assert_eq!(
            parse_request(raw),
            Parsed::Done(Request {
                method: "GET",
                path: "/whoami",
                bearer: Some("tok")
            })
        );
        assert_eq!(
            parse_request(b"GET /healthz HTTP/1.1\r\nHost"),
            Parsed::Incomplete
        );
        assert_eq!(parse_request(b"GET /healthz\r\n\r\n"), Parsed::Bad);
        assert_eq!(parse_request(b"GET / SPDY/3\r\n\r\n"), Parsed::Bad);
        assert_eq!(parse_request(b"\xff\xfe x HTTP/1.1\r\n\r\n"), Parsed::Bad);
    }

    #[test]
    fn routes_like_the_gateway() {
        let get = |path, bearer| Request {
            method: "GET",
            path,
            bearer,
        };
        let tok = Some("right");
        let code = |a: Answer| match a {
            Answer::Reply(c, _) => c,
            Answer::Hang => 0,
        };
        assert_eq!(code(route(&get("/healthz", None), tok, false, false)), 200);
        assert_eq!(route(&get("/healthz", None), tok, true, true), Answer::Hang);
        assert_eq!(code(route(&get("/readyz", None), tok, false, false)), 503);
        assert_eq!(code(route(&get("/readyz", None), tok, true, false)), 200);
        assert_eq!(
            code(route(&get("/whoami", Some("right")), tok, true, false)),
            200
        );
        assert_eq!(
            code(route(&get("/whoami", Some("wrong")), tok, true, false)),
            401
        );
        assert_eq!(code(route(&get("/whoami", None), tok, true, false)), 401);
        assert_eq!(
            code(route(&get("/whoami", Some("x")), None, true, false)),
            401
        );
        assert_eq!(code(route(&get("/nope", None), tok, true, false)), 404);
        let post = Request {
            method: "POST",
            path: "/healthz",
            bearer: None,
        };
        assert_eq!(code(route(&post, tok, true, false)), 404);
    }

    #[test]
    fn response_has_length_and_close() {
        let r = response(200, r#"{"ok":true}"#);
        assert!(r.starts_with("HTTP/1.1 200 OK\r\n"));
        assert!(r.contains("Content-Length: 11\r\n"));
        assert!(r.contains("Connection: close\r\n"));
        assert!(r.ends_with("\r\n\r\n{\"ok\":true}"));
    }

    #[test]
    fn flood_stream_is_whole_lines_of_the_asked_size() {
        let line = flood_line(10);
        assert_eq!(line.len(), 10);
        let total = 25u64;
        let mut out = Vec::new();
        let mut buf = [0u8; 7]; // chunk size that does not divide the line size
        let mut pos = 0;
        while pos < total {
            let n = flood_chunk(&line, pos, total, &mut buf);
            assert!(n > 0);
            out.extend_from_slice(&buf[..n]);
            pos += n as u64;
        }
        assert_eq!(out.len(), 25);
        let lines: Vec<&[u8]> = out.split_inclusive(|&b| b == b'\n').collect();
        assert_eq!(
            lines.iter().map(|l| l.len()).collect::<Vec<_>>(),
            [10, 10, 5]
        );
        assert!(lines.iter().all(|l| l.ends_with(b"\n")));
        assert_eq!(flood_chunk(&line, total, total, &mut buf), 0);
        assert_eq!(flood_line(1), b"\n");
    }
}
