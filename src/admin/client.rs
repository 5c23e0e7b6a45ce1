//! The control socket's client side, shared by `fleetctl`, the bench and the tests: a typed
//! `Request` goes out as one JSON line (so no byte of any argument can end it or start a second
//! request), `Frame`s come back one JSON line each. Blocking on purpose: its users are
//! one-shot programs and test threads.

use crate::admin::socket::Frame;
use crate::messages::command::{Reply, Request};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

/// Why a request got no reply.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("connecting to fleetd at {path} (is it running?): {source}")]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("sending the request: {0}")]
    Send(std::io::Error),
    #[error("reading the reply: {0}")]
    Read(std::io::Error),
    #[error("bad frame from fleetd: {0}")]
    BadFrame(String),
    #[error("fleetd closed the connection without answering")]
    Closed,
}

/// One connection to a daemon.
pub struct Client {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    /// Set when the write failed: the daemon may still have answered (a refused peer gets its
    /// reason before the connection closes), so reading goes first.
    send_error: Option<std::io::Error>,
}

impl Client {
    pub fn connect(path: &Path) -> Result<Client, ClientError> {
        let s = UnixStream::connect(path).map_err(|source| ClientError::Connect {
            path: path.to_path_buf(),
            source,
        })?;
        let writer = s.try_clone().map_err(ClientError::Send)?;
        Ok(Client {
            reader: BufReader::new(s),
            writer,
            send_error: None,
        })
    }

    /// Sends one request; its frames are read with `next_frame`.
    pub fn send(&mut self, req: &Request) -> Result<(), ClientError> {
        let mut line = serde_json::to_vec(req).map_err(|e| ClientError::BadFrame(e.to_string()))?;
        line.push(b'\n');
        if let Err(e) = self.writer.write_all(&line) {
            self.send_error = Some(e);
        }
        Ok(())
    }

    /// The next frame; `Ok(None)` when the daemon closed the connection.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, ClientError> {
        let mut l = String::new();
        match self.reader.read_line(&mut l) {
            Ok(0) => match self.send_error.take() {
                Some(e) => Err(ClientError::Send(e)),
                None => Ok(None),
            },
            Ok(_) => serde_json::from_str(&l)
                .map(Some)
                .map_err(|_| ClientError::BadFrame(l.trim_end().to_string())),
            Err(e) => Err(match self.send_error.take() {
                Some(s) => ClientError::Send(s),
                None => ClientError::Read(e),
            }),
        }
    }

    /// Sends a one-shot request and returns its reply.
    pub fn request(&mut self, req: &Request) -> Result<Reply, ClientError> {
        self.send(req)?;
        loop {
            match self.next_frame()? {
                Some(Frame::Reply { reply, .. }) => return Ok(reply),
                Some(_) => continue,
                None => return Err(ClientError::Closed),
            }
        }
    }
}

/// Connects, sends `req`, returns its reply.
pub fn request(path: &Path, req: &Request) -> Result<Reply, ClientError> {
    Client::connect(path)?.request(req)
}
