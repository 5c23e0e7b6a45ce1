//! The serving loop: one poll(2) loop over the listener, the connections, the signal pipe
//! and the timers for crashes, leaks, spikes and floods.

use super::*;

// ---------------------------------------------------------------------------------------------

pub(crate) struct Conn {
    pub(crate) stream: TcpStream,
    pub(crate) buf: Vec<u8>,
    pub(crate) deadline: Instant,
    pub(crate) hanging: bool,
}

pub(crate) enum ConnStep {
    Keep,
    Close,
}

pub(crate) struct Server {
    pub(crate) opts: Opts,
    pub(crate) start: Instant,
    pub(crate) token: Option<String>,
    pub(crate) log_file: Option<PathBuf>,
    pub(crate) listener: TcpListener,
    pub(crate) sig_rd: RawFd,
    pub(crate) conns: Vec<Conn>,
    pub(crate) exit_at: Option<Instant>,
    pub(crate) leak: Vec<(*mut u8, usize)>,
    pub(crate) next_leak: Option<Instant>,
    pub(crate) spike: Option<(*mut u8, usize)>,
    pub(crate) spike_until: Instant,
    pub(crate) next_spike: Option<Instant>,
    pub(crate) next_beat: Option<Instant>,
    pub(crate) beats: u64,
    pub(crate) flood_done: u64,
    pub(crate) flood_line: Vec<u8>,
}

impl Server {
    pub(crate) fn at(&self, ms: u64) -> Instant {
        self.start + Duration::from_millis(ms)
    }

    pub(crate) fn healthz_hangs(&self, now: Instant) -> bool {
        self.opts.hang_healthz
            || self
                .opts
                .hang_healthz_after_ms
                .is_some_and(|ms| now >= self.at(ms))
    }

    pub(crate) fn flood_fd(&self) -> Option<RawFd> {
        (self.flood_done < self.opts.flood_bytes).then_some(if self.opts.flood_stderr {
            2
        } else {
            1
        })
    }

    /// Runs the timers that are due and returns the next instant one is due, if any.
    pub(crate) fn run_timers(&mut self, now: Instant) -> Option<Instant> {
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

    pub(crate) fn on_signals(&mut self) {
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

    pub(crate) fn accept_all(&mut self) {
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

    pub(crate) fn on_readable(&mut self, i: usize, now: Instant) -> ConnStep {
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

    pub(crate) fn flood(&mut self, fd: RawFd) {
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

    pub(crate) fn run(mut self) -> ! {
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
