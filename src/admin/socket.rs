//! The control socket: a Unix socket (mode 0600; peers checked by uid, and never an agent's
//! process whatever its uid: see `peer`). A request is one
//! line: a JSON `Request` (what `fleetctl` sends: no byte of an argument can end it) or, for a
//! person at `socat`, a line of the command language. Every answer is one or more JSON `Frame`
//! lines: a reply closes a one-shot command; `events` and `logs --follow` stream frames until
//! the client hangs up. A malformed request (unknown word, bad id, empty line, over-long line,
//! invalid UTF-8, bad JSON) gets an error reply and the connection goes on. Connections are
//! capped, a request must arrive within `REQUEST_TIMEOUT` and a frame be taken within
//! `WRITE_TIMEOUT`, so idle, slow or many clients cannot hold the daemon's descriptors.

use crate::admin::parse::{parse_line, MAX_LINE_BYTES};
use crate::error::FleetError;
use crate::messages::command::{Command, Reply, Request};
use crate::messages::events::Event;
use crate::node::NodeHandle;
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

/// One line on the wire from the daemon.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "frame", rename_all = "snake_case")]
pub enum Frame {
    /// The answer to a request; `json` echoes whether the request asked for JSON output.
    Reply { reply: Reply, json: bool },
    /// One lifecycle event of an `events` stream.
    Event { event: Event, json: bool },
    /// One log line of `logs --follow`.
    Line { line: String },
}

/// Most control connections open at once; more wait in the listen backlog.
pub const MAX_CONNECTIONS: usize = 64;
/// A request line must be complete this long after the daemon starts waiting for it.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// A frame must be taken by the client within this.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Binds the socket with owner-only permissions. Only a stale socket (one nobody serves) is
/// ever replaced: any other file at the path is an operator's and stays.
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    if check_path(path)? {
        std::fs::remove_file(path)?;
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    // The umask covers the window between bind and chmod.
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let l = UnixListener::bind(path);
    nix::sys::stat::umask(old);
    let l = l?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

/// Whether `bind` may use `path`, without changing anything: `Ok(true)` when a stale socket
/// is there to be replaced, `Ok(false)` when nothing is; an error for a socket another daemon
/// serves and for any other kind of file. fleetd asks before it starts its node.
pub fn check_path(path: &Path) -> std::io::Result<bool> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::AddrInUse,
                    format!("{} is served by another running daemon", path.display()),
                ));
            }
            Ok(true)
        }
        Ok(m) => Err(std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            format!(
                "{} exists and is {}; refusing to replace it (only a stale socket is replaced)",
                path.display(),
                crate::operator_file::kind_of(&m.file_type())
            ),
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// Removes the socket at `path` only if it is still a socket (an operator may have put
/// something else there since).
pub fn unlink(path: &Path) {
    use std::os::unix::fs::FileTypeExt;
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
        let _ = std::fs::remove_file(path);
    }
}

/// Delay after a failed `accept` (EMFILE, ENFILE, ENOMEM): doubling up to a second, so a
/// descriptor shortage is not turned into a busy loop, reset by the next success.
#[derive(Debug, Default)]
pub struct AcceptBackoff {
    failures: u32,
}

impl AcceptBackoff {
    pub fn failed(&mut self) -> Duration {
        self.failures = (self.failures + 1).min(10);
        Duration::from_millis((5u64 << self.failures).min(1000))
    }
    pub fn ok(&mut self) {
        self.failures = 0;
    }
}

/// Takes a connection slot, then the next connection: a full door stops accepting (clients
/// wait in the listen backlog) instead of holding more descriptors, and a failed accept backs
/// off instead of spinning. `None` when the slots are gone (the door is closing).
pub async fn accept_capped<S, F, Fut>(
    slots: &std::sync::Arc<tokio::sync::Semaphore>,
    backoff: &mut AcceptBackoff,
    door: &str,
    mut accept: F,
) -> Option<(tokio::sync::OwnedSemaphorePermit, S)>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = std::io::Result<S>>,
{
    loop {
        let slot = slots.clone().acquire_owned().await.ok()?;
        match accept().await {
            Ok(stream) => {
                backoff.ok();
                return Some((slot, stream));
            }
            Err(e) => {
                let wait = backoff.failed();
                tracing::warn!(error = %e, door, retry_ms = wait.as_millis() as u64, "accept failed");
                tokio::time::sleep(wait).await;
            }
        }
    }
}

/// Serves connections until the listener fails. `on_shutdown` is called after a `shutdown`
/// request was answered.
pub async fn serve(
    listener: UnixListener,
    node: NodeHandle,
    on_shutdown: std::sync::Arc<tokio::sync::Notify>,
) {
    let me = nix::unistd::geteuid().as_raw();
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let mut backoff = AcceptBackoff::default();
    while let Some((slot, (stream, _))) =
        accept_capped(&slots, &mut backoff, "control socket", || listener.accept()).await
    {
        let node = node.clone();
        let on_shutdown = on_shutdown.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let refused = match stream.peer_cred() {
                Ok(c) if c.uid() == me || c.uid() == 0 => {
                    let pid = c.pid().unwrap_or(0);
                    let n = node.clone();
                    tokio::task::spawn_blocking(move || n.agent_peer_refusal(pid))
                        .await
                        .unwrap_or(Some("the peer check failed".into()))
                }
                _ => Some("only the daemon's user may use this socket".into()),
            };
            if let Some(why) = &refused {
                tracing::warn!(reason = %why, "control connection refused");
            }
            if let Err(e) = connection(stream, node, on_shutdown, refused).await {
                tracing::debug!(error = %e, "control connection ended");
            }
        });
    }
}

async fn send(w: &mut tokio::net::unix::OwnedWriteHalf, f: &Frame) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(f).map_err(std::io::Error::other)?;
    line.push(b'\n');
    match tokio::time::timeout(WRITE_TIMEOUT, w.write_all(&line)).await {
        Ok(r) => r,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "client did not take its reply",
        )),
    }
}

/// A request line as the daemon takes it: a JSON `Request`, or the command language.
fn parse_request(line: &str) -> Result<Option<Request>, FleetError> {
    if line.starts_with('{') {
        let req: Request = serde_json::from_str(line)
            .map_err(|e| FleetError::invalid("request", format!("not a valid request: {e}")))?;
        req.command.check_ids()?;
        return Ok(Some(req));
    }
    parse_line(line).map_err(|e| FleetError::invalid("command", e.to_string()))
}

fn error_reply(e: FleetError, json: bool) -> Frame {
    Frame::Reply {
        reply: Reply::Error(e),
        json,
    }
}

async fn connection(
    stream: UnixStream,
    node: NodeHandle,
    on_shutdown: std::sync::Arc<tokio::sync::Notify>,
    refused: Option<String>,
) -> std::io::Result<()> {
    let (r, mut w) = stream.into_split();
    let mut reader = BufReader::new(r);
    let mut buf = Vec::new();
    if let Some(why) = refused {
        // Take the request first, so the client's write completes and it reads the reason
        // instead of failing on a closed socket.
        let _ =
            tokio::time::timeout(Duration::from_secs(2), read_request(&mut reader, &mut buf)).await;
        return send(
            &mut w,
            &error_reply(FleetError::invalid("peer", why), false),
        )
        .await;
    }
    loop {
        let too_long = match tokio::time::timeout(
            REQUEST_TIMEOUT,
            read_request(&mut reader, &mut buf),
        )
        .await
        {
            Err(_) => {
                let why = format!(
                    "no complete request within {} s; closing",
                    REQUEST_TIMEOUT.as_secs()
                );
                let _ = send(
                    &mut w,
                    &error_reply(FleetError::invalid("request", why), false),
                )
                .await;
                return Ok(());
            }
            Ok(r) => match r? {
                None => return Ok(()),
                Some(too_long) => too_long,
            },
        };
        // One reply per line, even for lines that hold no command: a client that writes a
        // line can always wait for exactly one answer.
        let refuse = |reason: String| error_reply(FleetError::invalid("request", reason), false);
        if too_long {
            send(
                &mut w,
                &refuse(format!(
                    "line longer than {MAX_LINE_BYTES} bytes; it was discarded"
                )),
            )
            .await?;
            continue;
        }
        let Ok(line) = std::str::from_utf8(&buf) else {
            send(&mut w, &refuse("line is not valid UTF-8".into())).await?;
            continue;
        };
        let req = match parse_request(line.trim_end_matches(['\n', '\r'])) {
            Ok(Some(r)) => r,
            Ok(None) => {
                send(
                    &mut w,
                    &refuse("empty line: expected a command, try `help`".into()),
                )
                .await?;
                continue;
            }
            Err(e) => {
                send(&mut w, &error_reply(e, false)).await?;
                continue;
            }
        };
        let json = req.json;
        match req.command {
            Command::Events => return stream_events(&node, &mut w, json, &mut reader).await,
            Command::Logs {
                fleet,
                agent,
                lines,
                follow: true,
            } => match node.follow_logs(&fleet, &agent, lines).await {
                Err(e) => send(&mut w, &error_reply(e, json)).await?,
                Ok((first, follow)) => {
                    let reply = Reply::Logs(first);
                    send(&mut w, &Frame::Reply { reply, json }).await?;
                    return follow_log(follow, &mut w, &mut reader).await;
                }
            },
            Command::Shutdown => {
                let reply = node.execute(Command::Shutdown).await;
                send(&mut w, &Frame::Reply { reply, json }).await?;
                on_shutdown.notify_one();
                return Ok(());
            }
            cmd => {
                let reply = node.execute(cmd).await;
                send(&mut w, &Frame::Reply { reply, json }).await?;
            }
        }
    }
}

/// Reads one request line into `buf` (newline included). `None` at EOF before any byte;
/// `Some(true)` when the line was longer than the parser accepts: its bytes past the limit are
/// read and dropped, never buffered, so a client cannot make the daemon hold an endless line.
async fn read_request<R: tokio::io::AsyncBufRead + Unpin>(
    reader: &mut R,
    buf: &mut Vec<u8>,
) -> std::io::Result<Option<bool>> {
    // Room for the limit plus `\r\n`; `parse_line` reports lengths in between exactly.
    let cap = MAX_LINE_BYTES + 2;
    buf.clear();
    let mut too_long = false;
    let mut read_any = false;
    loop {
        let chunk = reader.fill_buf().await?;
        if chunk.is_empty() {
            return Ok(read_any.then_some(too_long));
        }
        read_any = true;
        let (take, end) = match chunk.iter().position(|b| *b == b'\n') {
            Some(i) => (i + 1, true),
            None => (chunk.len(), false),
        };
        if !too_long {
            if buf.len() + take > cap {
                too_long = true;
                buf.clear();
            } else {
                buf.extend_from_slice(&chunk[..take]);
            }
        }
        reader.consume(take);
        if end {
            return Ok(Some(too_long));
        }
    }
}

/// Streams events until the client hangs up (its read side reaches EOF).
async fn stream_events<R: tokio::io::AsyncBufRead + Unpin>(
    node: &NodeHandle,
    w: &mut tokio::net::unix::OwnedWriteHalf,
    json: bool,
    reader: &mut R,
) -> std::io::Result<()> {
    let mut rx = node.subscribe();
    let mut sink = [0u8; 1024];
    loop {
        tokio::select! {
            ev = rx.recv() => match ev {
                Ok(event) => send(w, &Frame::Event { event, json }).await?,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    tracing::warn!(missed = n, "events subscriber fell behind");
                }
                Err(_) => return Ok(()),
            },
            // Whatever the client sends now is thrown away, a bounded chunk at a time.
            n = reader.read(&mut sink) => {
                if n.unwrap_or(0) == 0 { return Ok(()); }
            }
        }
    }
}

async fn follow_log<R: tokio::io::AsyncBufRead + Unpin>(
    mut follow: crate::node::LogFollow,
    w: &mut tokio::net::unix::OwnedWriteHalf,
    reader: &mut R,
) -> std::io::Result<()> {
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let mut sink = [0u8; 1024];
    loop {
        tokio::select! {
            _ = tick.tick() => {
                for line in follow.poll().await {
                    send(w, &Frame::Line { line }).await?;
                }
            }
            // Whatever the client sends now is thrown away, a bounded chunk at a time.
            n = reader.read(&mut sink) => {
                if n.unwrap_or(0) == 0 { return Ok(()); }
            }
        }
    }
}
