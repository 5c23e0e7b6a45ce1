//! `fleet-stub-agent`: a tiny stand-in for the OpenClaw gateway, for tests and scale benchmarks.
//! It copies what a supervisor can observe (config file, port, probes, token check, a setsid
//! helper process, signals, exit codes, a log file) and fakes failures on demand. It does none
//! of an agent's real work. Single-threaded std + libc with a poll(2) loop and no async runtime,
//! so that thousands fit in memory; argv is hand-parsed to keep the binary small.

use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

const EX_USAGE: i32 = 2;
const EX_CONFIG: i32 = 78;
/// A probe that has not sent its request line and headers by then is dropped, so one slow
/// client never holds a connection slot for long.
const READ_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a deliberately hung /healthz connection is held if the client never gives up.
const HANG_HOLD: Duration = Duration::from_secs(60);
const MAX_CONNS: usize = 256;
const MAX_REQUEST_BYTES: usize = 8 * 1024;
const MIB: usize = 1024 * 1024;
const PAGE: usize = 4096;
/// Leaks happen in ten steps per second so the growth looks continuous to a sampler.
const LEAK_TICK: Duration = Duration::from_millis(100);

const USAGE: &str = "usage: fleet-stub-agent [--no-config] [--bind-retry-ms N] [--bind-delay-ms N] [--ready-delay-ms N]
  [--no-helper] [--helper-orphan] [--helper-mb N] [--term-delay-ms N] [--ignore-sigterm]
  [--crash-after-ms N] [--exit-code N] [--abort-after-ms N] [--leak-mb-per-s N] [--spike-mb N] [--spike-ms N] [--spike-every-ms N]
  [--hang-healthz] [--hang-healthz-after-ms N] [--flood-bytes N] [--flood-stderr]
  [--line-bytes N] [--print-every-ms N]
Reads $HOME/.openclaw/openclaw.json (gateway.port, gateway.auth.token, logging.file);
OPENCLAW_GATEWAY_PORT overrides gateway.port. Serves GET /healthz, /readyz, /whoami on 127.0.0.1.
";

#[derive(Debug, Clone, PartialEq)]
struct Opts {
    no_config: bool,
    bind_retry_ms: u64,
    /// Wait this long before binding, like a gateway's cold start.
    bind_delay_ms: u64,
    ready_delay_ms: u64,
    no_helper: bool,
    helper_orphan: bool,
    /// Memory the helper touches and holds (a setsid helper that costs something).
    helper_mb: u64,
    term_delay_ms: u64,
    ignore_sigterm: bool,
    crash_after_ms: Option<u64>,
    exit_code: Option<i32>,
    abort_after_ms: Option<u64>,
    leak_mb_per_s: u64,
    spike_mb: u64,
    /// How long each spike holds its memory.
    spike_ms: u64,
    /// Repeat the spike this often (a single spike at start when absent).
    spike_every_ms: Option<u64>,
    hang_healthz: bool,
    hang_healthz_after_ms: Option<u64>,
    flood_bytes: u64,
    flood_stderr: bool,
    line_bytes: usize,
    print_every_ms: Option<u64>,
    help: bool,
}

impl Default for Opts {
    fn default() -> Self {
        Opts {
            no_config: false,
            bind_retry_ms: 200,
            bind_delay_ms: 0,
            ready_delay_ms: 0,
            no_helper: false,
            helper_orphan: false,
            helper_mb: 0,
            term_delay_ms: 0,
            ignore_sigterm: false,
            crash_after_ms: None,
            exit_code: None,
            abort_after_ms: None,
            leak_mb_per_s: 0,
            spike_mb: 0,
            spike_ms: 1000,
            spike_every_ms: None,
            hang_healthz: false,
            hang_healthz_after_ms: None,
            flood_bytes: 0,
            flood_stderr: false,
            line_bytes: 100,
            print_every_ms: None,
            help: false,
        }
    }
}

/// Parses argv (without the program name). Values may follow as `--flag N` or `--flag=N`.
fn parse_args(args: &[String]) -> Result<Opts, String> {
    fn num<T: std::str::FromStr>(flag: &str, v: Option<String>) -> Result<T, String> {
        let v = v.ok_or_else(|| format!("{flag}: missing value"))?;
        v.parse()
            .map_err(|_| format!("{flag}: {v:?} is not a valid number"))
    }
    let mut o = Opts::default();
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f, Some(v.to_string())),
            _ => (arg.as_str(), None),
        };
        let takes_value = matches!(
            flag,
            "--bind-retry-ms"
                | "--bind-delay-ms"
                | "--ready-delay-ms"
                | "--term-delay-ms"
                | "--helper-mb"
                | "--crash-after-ms"
                | "--exit-code"
                | "--abort-after-ms"
                | "--leak-mb-per-s"
                | "--spike-mb"
                | "--spike-ms"
                | "--spike-every-ms"
                | "--hang-healthz-after-ms"
                | "--flood-bytes"
                | "--line-bytes"
                | "--print-every-ms"
        );
        let val = if takes_value {
            inline.or_else(|| it.next().cloned())
        } else if inline.is_some() {
            return Err(format!("{flag}: takes no value"));
        } else {
            None
        };
        match flag {
            "--no-config" => o.no_config = true,
            "--no-helper" => o.no_helper = true,
            "--helper-orphan" => o.helper_orphan = true,
            "--ignore-sigterm" => o.ignore_sigterm = true,
            "--hang-healthz" => o.hang_healthz = true,
            "--flood-stderr" => o.flood_stderr = true,
            "--help" | "-h" => o.help = true,
            "--bind-retry-ms" => o.bind_retry_ms = num(flag, val)?,
            "--bind-delay-ms" => o.bind_delay_ms = num(flag, val)?,
            "--ready-delay-ms" => o.ready_delay_ms = num(flag, val)?,
            "--term-delay-ms" => o.term_delay_ms = num(flag, val)?,
            "--helper-mb" => o.helper_mb = num(flag, val)?,
            "--crash-after-ms" => o.crash_after_ms = Some(num(flag, val)?),
            "--exit-code" => {
                let c: i32 = num(flag, val)?;
                if !(0..=255).contains(&c) {
                    return Err(format!("{flag}: {c} is outside 0..=255"));
                }
                o.exit_code = Some(c);
            }
            "--abort-after-ms" => o.abort_after_ms = Some(num(flag, val)?),
            "--leak-mb-per-s" => o.leak_mb_per_s = num(flag, val)?,
            "--spike-mb" => o.spike_mb = num(flag, val)?,
            "--spike-ms" => o.spike_ms = num(flag, val)?,
            "--spike-every-ms" => o.spike_every_ms = Some(num(flag, val)?),
            "--hang-healthz-after-ms" => o.hang_healthz_after_ms = Some(num(flag, val)?),
            "--flood-bytes" => o.flood_bytes = num(flag, val)?,
            "--line-bytes" => {
                o.line_bytes = num(flag, val)?;
                if o.line_bytes == 0 {
                    return Err("--line-bytes: must be at least 1".into());
                }
            }
            "--print-every-ms" => {
                let n: u64 = num(flag, val)?;
                if n == 0 {
                    return Err("--print-every-ms: must be at least 1".into());
                }
                o.print_every_ms = Some(n);
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(o)
}

#[derive(Debug, Default, PartialEq)]
struct Config {
    port: Option<u16>,
    token: Option<String>,
    log_file: Option<PathBuf>,
}

/// Reads the fields the gateway would; like the real one it refuses a config it cannot use,
/// but unlike it (which now starts with a random token) it demands a token, so tests notice
/// a supervisor that forgot to inject one.
fn parse_config(text: &[u8]) -> Result<Config, String> {
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
fn resolve_port(env: Option<&str>, config: Option<u16>) -> Result<u16, String> {
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

#[derive(Debug, PartialEq)]
struct Request<'a> {
    method: &'a str,
    path: &'a str,
    bearer: Option<&'a str>,
}

#[derive(Debug, PartialEq)]
enum Parsed<'a> {
    Incomplete,
    Bad,
    Done(Request<'a>),
}

/// Parses a request head; the body (if any) is ignored since no route takes one.
fn parse_request(buf: &[u8]) -> Parsed<'_> {
    let end = match find(buf, b"\r\n\r\n").or_else(|| find(buf, b"\n\n")) {
        Some(e) => e,
        None => return Parsed::Incomplete,
    };
    let head = match std::str::from_utf8(&buf[..end]) {
        Ok(h) => h,
        Err(_) => return Parsed::Bad,
    };
    let mut lines = head.lines();
    let mut first = lines.next().unwrap_or("").split_ascii_whitespace();
    let (method, target, version) = match (first.next(), first.next(), first.next()) {
        (Some(m), Some(t), Some(v)) => (m, t, v),
        _ => return Parsed::Bad,
    };
    if !version.starts_with("HTTP/1.") {
        return Parsed::Bad;
    }
    let path = target.split(['?', '#']).next().unwrap_or(target);
    let mut bearer = None;
    for line in lines {
        if let Some((name, value)) = line.split_once(':') {
            if name.trim().eq_ignore_ascii_case("authorization") {
                let value = value.trim();
                if value.len() > 7 && value[..7].eq_ignore_ascii_case("bearer ") {
                    bearer = Some(value[7..].trim());
                }
            }
        }
    }
    Parsed::Done(Request {
        method,
        path,
        bearer,
    })
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[derive(Debug, PartialEq)]
enum Answer {
    Reply(u16, &'static str),
    Hang,
}

fn route(req: &Request, token: Option<&str>, ready: bool, hang_healthz: bool) -> Answer {
    if req.method != "GET" {
        return Answer::Reply(404, r#"{"ok":false,"error":"not found"}"#);
    }
    match req.path {
        "/healthz" if hang_healthz => Answer::Hang,
        "/healthz" => Answer::Reply(200, r#"{"ok":true,"status":"live"}"#),
        "/readyz" if ready => Answer::Reply(200, r#"{"ready":true}"#),
        "/readyz" => Answer::Reply(503, r#"{"ready":false}"#),
        "/whoami" => match (token, req.bearer) {
            (Some(t), Some(b)) if t == b => Answer::Reply(200, r#"{"ok":true}"#),
            _ => Answer::Reply(401, r#"{"ok":false,"error":"unauthorized"}"#),
        },
        _ => Answer::Reply(404, r#"{"ok":false,"error":"not found"}"#),
    }
}

fn response(code: u16, body: &str) -> String {
    let reason = match code {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        503 => "Service Unavailable",
        _ => "Status",
    };
    format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// Builds `len` bytes of the flood stream starting at `pos`: `line` repeated, with the very
/// last byte of the stream forced to a newline so the output ends on a whole line.
fn flood_chunk(line: &[u8], pos: u64, total: u64, out: &mut [u8]) -> usize {
    let n = (total.saturating_sub(pos)).min(out.len() as u64) as usize;
    for (i, b) in out[..n].iter_mut().enumerate() {
        let p = pos + i as u64;
        *b = if p + 1 == total {
            b'\n'
        } else {
            line[(p % line.len() as u64) as usize]
        };
    }
    n
}

fn flood_line(len: usize) -> Vec<u8> {
    let mut line: Vec<u8> = b"stub-agent flood ".iter().copied().take(len - 1).collect();
    line.resize(len - 1, b'x');
    line.push(b'\n');
    line
}

// ---------------------------------------------------------------------------------------------
// Process plumbing: raw writes, the self-pipe, the helper, memory games.

/// Writes all of `buf` to a raw fd, ignoring errors: a stand-in must keep running when nobody
/// reads its console (std's `println!` would panic on EPIPE).
fn write_fd(fd: RawFd, buf: &[u8]) {
    let mut done = 0;
    while done < buf.len() {
        let n = unsafe { libc::write(fd, buf[done..].as_ptr().cast(), buf.len() - done) };
        if n > 0 {
            done += n as usize;
        } else if n < 0 && std::io::Error::last_os_error().kind() == ErrorKind::Interrupted {
            continue;
        } else {
            return;
        }
    }
}

fn say(line: &str) {
    write_fd(1, format!("{line}\n").as_bytes());
}

fn warn(line: &str) {
    write_fd(2, format!("{line}\n").as_bytes());
}

fn die(code: i32, msg: &str) -> ! {
    warn(msg);
    std::process::exit(code)
}

static SIG_PIPE_WR: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_signal(sig: libc::c_int) {
    // Only async-signal-safe calls here: one write to the self-pipe, errno preserved.
    unsafe {
        let errno = *libc::__errno_location();
        let b = sig as u8;
        libc::write(
            SIG_PIPE_WR.load(Ordering::Relaxed),
            (&b as *const u8).cast(),
            1,
        );
        *libc::__errno_location() = errno;
    }
}

fn set_handler(sig: libc::c_int, handler: libc::sighandler_t) {
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = handler;
        sa.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(sig, &sa, std::ptr::null_mut());
    }
}

/// Returns the read end of the self-pipe the signal handler writes signal numbers into.
fn install_signals() -> RawFd {
    let mut fds = [0; 2];
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
        die(1, "stub-agent: cannot create the signal pipe");
    }
    SIG_PIPE_WR.store(fds[1], Ordering::Relaxed);
    let h = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
    for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGCHLD] {
        set_handler(sig, h);
    }
    // Like the real gateway: no SIGHUP handler, it just dies (even if started under nohup).
    set_handler(libc::SIGHUP, libc::SIG_DFL);
    fds[0]
}

/// Forks the spawn-broker look-alike: a process in a session of its own that waits forever and
/// outlives the stub, so a supervisor has to find and stop it. Returns its pid once it has
/// called setsid, so a caller looking at /proc never sees it half set up.
fn spawn_helper(orphan: bool, mb: u64) -> Option<i32> {
    let mut fds = [0; 2];
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return None;
    }
    let (rd, wr) = (fds[0], fds[1]);
    let child = unsafe { libc::fork() };
    if child == 0 {
        unsafe { helper_main(wr, orphan, mb) }
    }
    unsafe { libc::close(wr) };
    let mut pid = None;
    if child > 0 {
        let mut b = [0u8; 4];
        let mut got = 0;
        while got < 4 {
            let n = unsafe { libc::read(rd, b[got..].as_mut_ptr().cast(), 4 - got) };
            if n > 0 {
                got += n as usize;
            } else if n < 0 && std::io::Error::last_os_error().kind() == ErrorKind::Interrupted {
                continue;
            } else {
                break;
            }
        }
        if got == 4 {
            pid = Some(i32::from_ne_bytes(b));
        }
        if orphan {
            // The intermediate child exits at once; reap it so it leaves no zombie.
            unsafe { libc::waitpid(child, std::ptr::null_mut(), 0) };
        }
    }
    unsafe { libc::close(rd) };
    pid
}

/// Runs in the forked helper: async-signal-safe calls only and no allocation, so the helper's
/// private memory stays at the few pages fork had to copy.
unsafe fn helper_main(report: RawFd, orphan: bool, mb: u64) -> ! {
    if orphan {
        match libc::fork() {
            -1 => libc::_exit(1),
            0 => {}
            _ => libc::_exit(0),
        }
    }
    libc::setsid();
    let pid = libc::getpid().to_ne_bytes();
    libc::write(report, pid.as_ptr().cast(), 4);
    // Keep stdio (a Node child inherits the console too) but nothing else: holding the
    // listening socket would keep the port busy after the stub is gone.
    if libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) != 0 {
        for fd in 3..1024 {
            libc::close(fd);
        }
    }
    if mb > 0 {
        let bytes = mb as usize * MIB;
        let p = libc::mmap(
            std::ptr::null_mut(),
            bytes,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        if p != libc::MAP_FAILED {
            let p = p as *mut u8;
            let mut off = 0;
            while off < bytes {
                std::ptr::write_volatile(p.add(off), 1);
                off += PAGE;
            }
        }
    }
    loop {
        libc::pause();
    }
}

/// Maps and touches `bytes` of anonymous memory; mmap directly so that freeing really returns
/// the pages and malloc's own thresholds play no part.
fn touch_alloc(bytes: usize) -> Option<(*mut u8, usize)> {
    if bytes == 0 {
        return None;
    }
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            bytes,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        warn(&format!("stub-agent: cannot map {bytes} bytes"));
        return None;
    }
    let p = p as *mut u8;
    for off in (0..bytes).step_by(PAGE) {
        unsafe { std::ptr::write_volatile(p.add(off), 1) };
    }
    Some((p, bytes))
}

fn epoch_ms() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0)
}

/// Appends one line to the agent's own log file (mode 0600, parents created), as the gateway
/// does with `logging.file`. Failure is a warning, never fatal.
fn log_line(path: &Option<PathBuf>, what: &str) {
    let Some(path) = path else { return };
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let res = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| {
            writeln!(
                f,
                "{} stub-agent {what} pid={}",
                epoch_ms(),
                std::process::id()
            )
        });
    if let Err(e) = res {
        warn(&format!(
            "stub-agent warning: cannot write log file {}: {e}",
            path.display()
        ));
    }
}

fn reap_children() {
    loop {
        let r = unsafe { libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) };
        if r <= 0 {
            return;
        }
    }
}

fn bind(port: u16, retry: Duration) -> TcpListener {
    let start = Instant::now();
    loop {
        match TcpListener::bind(("127.0.0.1", port)) {
            Ok(l) => return l,
            Err(e) if e.kind() == ErrorKind::AddrInUse && start.elapsed() < retry => {
                std::thread::sleep(Duration::from_millis(20).min(retry));
            }
            Err(e) => die(1, &format!("stub-agent: cannot bind 127.0.0.1:{port}: {e}")),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The serving loop.

struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
    deadline: Instant,
    hanging: bool,
}

enum ConnStep {
    Keep,
    Close,
}

struct Server {
    opts: Opts,
    start: Instant,
    token: Option<String>,
    log_file: Option<PathBuf>,
    listener: TcpListener,
    sig_rd: RawFd,
    conns: Vec<Conn>,
    exit_at: Option<Instant>,
    leak: Vec<(*mut u8, usize)>,
    next_leak: Option<Instant>,
    spike: Option<(*mut u8, usize)>,
    spike_until: Instant,
    next_spike: Option<Instant>,
    next_beat: Option<Instant>,
    beats: u64,
    flood_done: u64,
    flood_line: Vec<u8>,
}

impl Server {
    fn at(&self, ms: u64) -> Instant {
        self.start + Duration::from_millis(ms)
    }

    fn healthz_hangs(&self, now: Instant) -> bool {
        self.opts.hang_healthz
            || self
                .opts
                .hang_healthz_after_ms
                .is_some_and(|ms| now >= self.at(ms))
    }

    fn flood_fd(&self) -> Option<RawFd> {
        (self.flood_done < self.opts.flood_bytes).then_some(if self.opts.flood_stderr {
            2
        } else {
            1
        })
    }

    /// Runs the timers that are due and returns the next instant one is due, if any.
    fn run_timers(&mut self, now: Instant) -> Option<Instant> {
        let mut next: Option<Instant> = None;
        let mut want = |t: Instant| next = Some(next.map_or(t, |n| n.min(t)));

        if let Some(ms) = self.opts.crash_after_ms {
            let code = self.opts.exit_code.unwrap_or(1);
            if now >= self.at(ms) {
                die(code, &format!("stub-agent: crashing with exit code {code}"));
            }
            want(self.at(ms));
        }
        if let Some(ms) = self.opts.abort_after_ms {
            if now >= self.at(ms) {
                warn("stub-agent: aborting");
                unsafe {
                    // No core file: thousands of stubs would fill the disk.
                    let zero = libc::rlimit {
                        rlim_cur: 0,
                        rlim_max: 0,
                    };
                    libc::setrlimit(libc::RLIMIT_CORE, &zero);
                    libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0);
                    set_handler(libc::SIGABRT, libc::SIG_DFL);
                    libc::raise(libc::SIGABRT);
                    libc::raise(libc::SIGKILL);
                }
            }
            want(self.at(ms));
        }
        if let Some(t) = self.exit_at {
            if now >= t {
                log_line(&self.log_file, "stopped");
                std::process::exit(0);
            }
            want(t);
        }
        if let Some(t) = self.next_leak {
            if now >= t {
                let step = self.opts.leak_mb_per_s as usize * MIB / 10;
                if let Some(m) = touch_alloc(step) {
                    self.leak.push(m);
                }
                self.next_leak = Some(t + LEAK_TICK);
            }
            want(self.next_leak.unwrap_or(t));
        }
        if let Some((p, len)) = self.spike {
            if now >= self.spike_until {
                unsafe { libc::munmap(p.cast(), len) };
                self.spike = None;
            } else {
                want(self.spike_until);
            }
        }
        if self.spike.is_none() {
            if let (Some(t), Some(every)) = (self.next_spike, self.opts.spike_every_ms) {
                if now >= t {
                    self.spike = touch_alloc(self.opts.spike_mb as usize * MIB);
                    self.spike_until = now + Duration::from_millis(self.opts.spike_ms);
                    self.next_spike = Some(t + Duration::from_millis(every.max(1)));
                    want(self.spike_until);
                } else {
                    want(t);
                }
            }
        }
        if let (Some(t), Some(every)) = (self.next_beat, self.opts.print_every_ms) {
            if now >= t {
                self.beats += 1;
                say(&format!(
                    "stub-agent heartbeat n={} uptime_ms={}",
                    self.beats,
                    now.duration_since(self.start).as_millis()
                ));
                self.next_beat = Some(t + Duration::from_millis(every));
            }
            want(self.next_beat.unwrap_or(t));
        }
        for c in &self.conns {
            want(c.deadline);
        }
        next
    }

    fn on_signals(&mut self) {
        let mut b = [0u8; 64];
        loop {
            let n = unsafe { libc::read(self.sig_rd, b.as_mut_ptr().cast(), b.len()) };
            if n <= 0 {
                return;
            }
            for &sig in &b[..n as usize] {
                let sig = sig as libc::c_int;
                if sig == libc::SIGCHLD {
                    reap_children();
                } else if sig == libc::SIGTERM && self.opts.ignore_sigterm {
                    say("stub-agent: ignoring SIGTERM");
                } else if self.exit_at.is_none() {
                    say("stub-agent: shutting down");
                    self.exit_at =
                        Some(Instant::now() + Duration::from_millis(self.opts.term_delay_ms));
                }
            }
        }
    }

    fn accept_all(&mut self) {
        while self.conns.len() < MAX_CONNS {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if stream.set_nonblocking(true).is_ok() {
                        self.conns.push(Conn {
                            stream,
                            buf: Vec::new(),
                            deadline: Instant::now() + READ_TIMEOUT,
                            hanging: false,
                        });
                    }
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => return,
            }
        }
    }

    fn on_readable(&mut self, i: usize, now: Instant) -> ConnStep {
        let hang = self.healthz_hangs(now);
        let ready = now >= self.at(self.opts.ready_delay_ms);
        let c = &mut self.conns[i];
        let mut chunk = [0u8; 1024];
        loop {
            match c.stream.read(&mut chunk) {
                Ok(0) => return ConnStep::Close,
                Ok(_) if c.hanging => continue,
                Ok(n) => {
                    c.buf.extend_from_slice(&chunk[..n]);
                    if c.buf.len() > MAX_REQUEST_BYTES {
                        let _ = c.stream.write(response(400, "{}").as_bytes());
                        return ConnStep::Close;
                    }
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(_) => return ConnStep::Close,
            }
        }
        if c.hanging {
            return ConnStep::Keep;
        }
        let answer = match parse_request(&c.buf) {
            Parsed::Incomplete => return ConnStep::Keep,
            Parsed::Bad => Answer::Reply(400, r#"{"ok":false,"error":"bad request"}"#),
            Parsed::Done(req) => route(&req, self.token.as_deref(), ready, hang),
        };
        match answer {
            Answer::Hang => {
                c.hanging = true;
                c.deadline = now + HANG_HOLD;
                c.buf = Vec::new();
                ConnStep::Keep
            }
            Answer::Reply(code, body) => {
                // A fresh socket's send buffer always holds these few hundred bytes.
                let _ = c.stream.write(response(code, body).as_bytes());
                ConnStep::Close
            }
        }
    }

    fn flood(&mut self, fd: RawFd) {
        let mut chunk = [0u8; PAGE];
        let n = flood_chunk(
            &self.flood_line,
            self.flood_done,
            self.opts.flood_bytes,
            &mut chunk,
        );
        let w = unsafe { libc::write(fd, chunk.as_ptr().cast(), n) };
        if w > 0 {
            self.flood_done += w as u64;
        } else if w < 0 {
            let e = std::io::Error::last_os_error().kind();
            if e != ErrorKind::Interrupted && e != ErrorKind::WouldBlock {
                self.flood_done = self.opts.flood_bytes; // reader gone: stop flooding
            }
        }
    }

    fn run(mut self) -> ! {
        let mut pfds: Vec<libc::pollfd> = Vec::with_capacity(8);
        loop {
            let now = Instant::now();
            let next = self.run_timers(now);
            self.conns.retain(|c| c.deadline > now);

            // The flood fd, when pending, is polled for POLLOUT and wakes the loop by itself.
            let flood_fd = self.flood_fd();
            let timeout = next.map_or(-1, |t| {
                let d = t.saturating_duration_since(now);
                let ms = d.as_millis() + u128::from(d.subsec_nanos() % 1_000_000 != 0);
                ms.min(i32::MAX as u128) as i32
            });

            pfds.clear();
            let pfd = |fd: RawFd, events: libc::c_short| libc::pollfd {
                fd,
                events,
                revents: 0,
            };
            pfds.push(pfd(self.sig_rd, libc::POLLIN));
            let accepting = self.conns.len() < MAX_CONNS;
            pfds.push(pfd(
                if accepting {
                    self.listener.as_raw_fd()
                } else {
                    -1
                },
                libc::POLLIN,
            ));
            pfds.push(pfd(flood_fd.unwrap_or(-1), libc::POLLOUT));
            for c in &self.conns {
                pfds.push(pfd(c.stream.as_raw_fd(), libc::POLLIN));
            }
            let n = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, timeout) };
            if n <= 0 {
                continue;
            }
            let now = Instant::now();
            // Connections first (indices match `self.conns` before accept adds new ones).
            let mut closed = Vec::new();
            for i in 0..self.conns.len() {
                let re = pfds[3 + i].revents;
                if re == 0 {
                    continue;
                }
                if let ConnStep::Close = self.on_readable(i, now) {
                    closed.push(i);
                }
            }
            for i in closed.into_iter().rev() {
                self.conns.swap_remove(i);
            }
            if pfds[0].revents != 0 {
                self.on_signals();
            }
            if pfds[1].revents != 0 {
                self.accept_all();
            }
            if let Some(fd) = flood_fd {
                if pfds[2].revents & (libc::POLLOUT | libc::POLLERR | libc::POLLHUP) != 0 {
                    self.flood(fd);
                }
            }
        }
    }
}

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
