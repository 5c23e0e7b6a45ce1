//! Process plumbing: raw writes, the self-pipe for signals, the setsid helper, memory games,
//! the log file, reaping, binding.

use super::*;

/// Writes all of `buf` to a raw fd, ignoring errors: a stand-in must keep running when nobody
/// reads its console (std's `println!` would panic on EPIPE).
pub(crate) fn write_fd(fd: RawFd, buf: &[u8]) {
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

pub(crate) fn say(line: &str) {
    write_fd(1, format!("{line}\n").as_bytes());
}

pub(crate) fn warn(line: &str) {
    write_fd(2, format!("{line}\n").as_bytes());
}

pub(crate) fn die(code: i32, msg: &str) -> ! {
    warn(msg);
    std::process::exit(code)
}

pub(crate) static SIG_PIPE_WR: AtomicI32 = AtomicI32::new(-1);

pub(crate) extern "C" fn on_signal(sig: libc::c_int) {
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

pub(crate) fn set_handler(sig: libc::c_int, handler: libc::sighandler_t) {
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = handler;
        sa.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(sig, &sa, std::ptr::null_mut());
    }
}

/// Returns the read end of the self-pipe the signal handler writes signal numbers into.
pub(crate) fn install_signals() -> RawFd {
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
pub(crate) fn spawn_helper(orphan: bool, mb: u64) -> Option<i32> {
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
pub(crate) unsafe fn helper_main(report: RawFd, orphan: bool, mb: u64) -> ! {
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
pub(crate) fn touch_alloc(bytes: usize) -> Option<(*mut u8, usize)> {
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

pub(crate) fn epoch_ms() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0)
}

/// Appends one line to the agent's own log file (mode 0600, parents created), as the gateway
/// does with `logging.file`. Failure is a warning, never fatal.
pub(crate) fn log_line(path: &Option<PathBuf>, what: &str) {
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

pub(crate) fn reap_children() {
    loop {
        let r = unsafe { libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) };
        if r <= 0 {
            return;
        }
    }
}

pub(crate) fn bind(port: u16, retry: Duration) -> TcpListener {
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
