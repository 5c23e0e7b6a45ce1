//! The REPL on the daemon's stdin. On a terminal: a prompt, line editing and history
//! (rustyline), and agent transitions printed live above the prompt. On a pipe: plain lines,
//! one reply each, so scripts can feed it. `events` and `logs --follow` stream until the next
//! input line (Enter on a terminal).

use crate::admin::parse::parse_line;
use crate::admin::render::{render, render_event};
use crate::error::FleetError;
use crate::messages::command::{Command, Reply};
use crate::node::NodeHandle;
use std::io::BufRead;
use std::time::Duration;
use tokio::sync::mpsc;

/// How the REPL ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplEnd {
    /// stdin reached EOF (a daemon that serves a socket keeps running).
    Eof,
    /// The operator typed `shutdown`.
    Shutdown,
}

enum Input {
    Line(String),
    /// A line that is no command at all (not UTF-8, too long): answered with this error, as
    /// the control socket answers the same bytes.
    Bad(String),
    Eof,
}

/// Runs the REPL until EOF or `shutdown`. `history`: file for the terminal's history.
pub async fn run(node: NodeHandle, tty: bool, history: Option<std::path::PathBuf>) -> ReplEnd {
    let (tx, mut rx) = mpsc::channel::<Input>(1);
    let (ack_tx, ack_rx) = std::sync::mpsc::channel::<()>();
    let (printer_tx, printer_rx) = std::sync::mpsc::channel::<Box<dyn FnMut(String) + Send>>();
    std::thread::Builder::new()
        .name("fleet-repl".into())
        .spawn(move || read_lines(tty, history, tx, ack_rx, printer_tx))
        .expect("spawn REPL thread");
    let watching = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    if tty {
        if let Ok(mut print) = printer_rx.recv_timeout(Duration::from_secs(2)) {
            let mut events = node.subscribe();
            let on = watching.clone();
            tokio::spawn(async move {
                while let Ok(ev) = events.recv().await {
                    if on.load(std::sync::atomic::Ordering::Relaxed) {
                        print(render_event(&ev, false));
                    }
                }
            });
        }
    }
    loop {
        let line = match rx.recv().await {
            Some(Input::Line(line)) => line,
            Some(Input::Bad(why)) => {
                println!("error: {why}");
                let _ = ack_tx.send(());
                continue;
            }
            Some(Input::Eof) | None => return ReplEnd::Eof,
        };
        let req = match parse_line(&line) {
            Ok(Some(r)) => r,
            Ok(None) => {
                let _ = ack_tx.send(());
                continue;
            }
            Err(e) => {
                println!("error: {e}");
                let _ = ack_tx.send(());
                continue;
            }
        };
        let json = req.json;
        match req.command {
            Command::Shutdown => {
                println!("{}", render(&node.execute(Command::Shutdown).await, json));
                let _ = ack_tx.send(());
                return ReplEnd::Shutdown;
            }
            Command::Watch { on } => {
                watching.store(on, std::sync::atomic::Ordering::Relaxed);
                println!(
                    "{}",
                    match (on, tty) {
                        (true, true) => "printing agent and channel transitions",
                        (false, true) =>
                            "transitions are no longer printed (watch on to see them again)",
                        (_, false) =>
                            "transitions are printed on a terminal only; use `events` here",
                    }
                );
                let _ = ack_tx.send(());
            }
            Command::Events => {
                if tty {
                    println!("(streaming events; press Enter to stop)");
                }
                let mut events = node.subscribe();
                let _ = ack_tx.send(());
                loop {
                    tokio::select! {
                        ev = events.recv() => match ev {
                            Ok(ev) => println!("{}", render_event(&ev, json)),
                            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                            Err(_) => break,
                        },
                        input = rx.recv() => {
                            if !matches!(input, Some(Input::Line(_) | Input::Bad(_))) {
                                return ReplEnd::Eof;
                            }
                            break;
                        }
                    }
                }
                let _ = ack_tx.send(());
            }
            Command::Logs {
                fleet,
                agent,
                lines,
                follow: true,
            } => {
                let mut follow = match node.follow_logs(&fleet, &agent, lines).await {
                    Ok((first, follow)) => {
                        println!("{}", render(&Reply::Logs(first), json));
                        follow
                    }
                    Err(e) => {
                        println!("{}", render(&Reply::Error(e), json));
                        let _ = ack_tx.send(());
                        continue;
                    }
                };
                let _ = ack_tx.send(());
                let mut tick = tokio::time::interval(Duration::from_millis(250));
                loop {
                    tokio::select! {
                        _ = tick.tick() => {
                            for l in follow.poll().await {
                                println!("{l}");
                            }
                        }
                        input = rx.recv() => {
                            if !matches!(input, Some(Input::Line(_) | Input::Bad(_))) {
                                return ReplEnd::Eof;
                            }
                            break;
                        }
                    }
                }
                let _ = ack_tx.send(());
            }
            cmd => {
                let reply = node.execute(cmd).await;
                if let Reply::Error(FleetError::ShuttingDown) = reply {
                    println!("{}", render(&reply, json));
                    let _ = ack_tx.send(());
                    return ReplEnd::Shutdown;
                }
                println!("{}", render(&reply, json));
                let _ = ack_tx.send(());
            }
        }
    }
}

/// The blocking reader: rustyline on a terminal, plain lines otherwise. Waits for each line
/// to be handled before prompting again, so replies never interleave with the prompt.
fn read_lines(
    tty: bool,
    history: Option<std::path::PathBuf>,
    tx: mpsc::Sender<Input>,
    ack: std::sync::mpsc::Receiver<()>,
    printer: std::sync::mpsc::Sender<Box<dyn FnMut(String) + Send>>,
) {
    if tty {
        if let Ok(mut rl) = rustyline::DefaultEditor::new() {
            if let Some(h) = &history {
                let _ = rl.load_history(h);
            }
            if let Ok(mut p) = rl.create_external_printer() {
                use rustyline::ExternalPrinter;
                let _ = printer.send(Box::new(move |s: String| {
                    let _ = p.print(format!("{s}\n"));
                }));
            }
            loop {
                match rl.readline("fleet> ") {
                    Ok(line) => {
                        if !line.trim().is_empty() {
                            let _ = rl.add_history_entry(line.as_str());
                            if let Some(h) = &history {
                                let _ = rl.append_history(h);
                            }
                        }
                        if tx.blocking_send(Input::Line(line)).is_err() {
                            return;
                        }
                        if ack.recv().is_err() {
                            return;
                        }
                    }
                    Err(rustyline::error::ReadlineError::Interrupted) => {
                        // Ctrl-C at the prompt only clears the line: stopping every fleet
                        // takes a deliberate `shutdown` (or SIGTERM).
                        println!("(type `shutdown` to stop the daemon and its agents, Ctrl-D to leave the REPL)");
                        continue;
                    }
                    Err(_) => {
                        let _ = tx.blocking_send(Input::Eof);
                        return;
                    }
                }
            }
        }
    }
    drop(printer);
    let stdin = std::io::stdin();
    let mut input = stdin.lock();
    loop {
        let item = match read_line_bounded(&mut input, crate::admin::parse::MAX_LINE_BYTES) {
            Ok(PipeLine::Eof) | Err(_) => break,
            Ok(PipeLine::TooLong) => Input::Bad(format!(
                "line longer than {} bytes; it was discarded",
                crate::admin::parse::MAX_LINE_BYTES
            )),
            Ok(PipeLine::Line(bytes)) => match String::from_utf8(bytes) {
                Ok(line) => Input::Line(line),
                Err(_) => Input::Bad("line is not valid UTF-8".into()),
            },
        };
        if tx.blocking_send(item).is_err() || ack.recv().is_err() {
            return;
        }
    }
    let _ = tx.blocking_send(Input::Eof);
}

/// One line of a pipe.
#[derive(Debug, PartialEq)]
enum PipeLine {
    Line(Vec<u8>),
    TooLong,
    Eof,
}

/// Reads one line (without its `\n` or `\r\n`), never holding more than `limit` bytes of it:
/// the bytes of a longer line are read and dropped.
fn read_line_bounded(r: &mut impl BufRead, limit: usize) -> std::io::Result<PipeLine> {
    let mut buf = Vec::new();
    let mut too_long = false;
    let mut any = false;
    loop {
        let chunk = r.fill_buf()?;
        if chunk.is_empty() {
            break;
        }
        any = true;
        let (take, end) = match chunk.iter().position(|b| *b == b'\n') {
            Some(i) => (i + 1, true),
            None => (chunk.len(), false),
        };
        if !too_long {
            if buf.len() + take > limit + 2 {
                too_long = true;
                buf.clear();
            } else {
                buf.extend_from_slice(&chunk[..take]);
            }
        }
        r.consume(take);
        if end {
            break;
        }
    }
    if !any {
        return Ok(PipeLine::Eof);
    }
    if too_long {
        return Ok(PipeLine::TooLong);
    }
    while matches!(buf.last(), Some(b'\n' | b'\r')) {
        buf.pop();
    }
    Ok(PipeLine::Line(buf))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pipe_lines_survive_bad_bytes_and_long_lines() {
        let mut input: Vec<u8> = Vec::new();
        input.extend_from_slice(b"status\n");
        input.extend_from_slice(&[0xff, 0xfe, b'\n']);
        input.extend(std::iter::repeat_n(b'x', 100));
        input.extend_from_slice(b"\nshutdown\r\n");
        input.extend_from_slice(b"last");
        let mut r = std::io::BufReader::with_capacity(8, &input[..]);
        let mut got = Vec::new();
        loop {
            match read_line_bounded(&mut r, 50).unwrap() {
                PipeLine::Eof => break,
                other => got.push(other),
            }
        }
        assert_eq!(
            got,
            vec![
                PipeLine::Line(b"status".to_vec()),
                PipeLine::Line(vec![0xff, 0xfe]),
                PipeLine::TooLong,
                PipeLine::Line(b"shutdown".to_vec()),
                PipeLine::Line(b"last".to_vec()),
            ]
        );
    }
}
