//! fleetctl: sends one command to a running fleetd over its control socket and prints the
//! reply. Exit 0 on success; non-zero with the error on stderr otherwise.

use anyhow::{Context, Result};
use clap::Parser;
use fleet_commander::admin::parse::join_words;
use fleet_commander::admin::render::{render, render_event};
use fleet_commander::admin::socket::Frame;
use fleet_commander::context::{default_socket, default_state_dir};
use fleet_commander::messages::command::Reply;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    name = "fleetctl",
    version,
    about = "Send one command to fleetd",
    trailing_var_arg = true
)]
struct Args {
    /// Control socket (default: fleetd.sock in the state directory).
    #[arg(long)]
    socket: Option<PathBuf>,
    /// State directory used to find the default socket.
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Print the reply as JSON.
    #[arg(long)]
    json: bool,
    /// The command, e.g. `status`, `fleet create bots --agents 3`.
    #[arg(required = true, allow_hyphen_values = true)]
    command: Vec<String>,
}

fn main() {
    match run() {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("fleetctl: {e:#}");
            std::process::exit(2);
        }
    }
}

fn run() -> Result<i32> {
    let args = Args::parse();
    let socket = args.socket.clone().unwrap_or_else(|| {
        default_socket(&args.state_dir.clone().unwrap_or_else(default_state_dir))
    });
    let mut words = args.command.clone();
    // A template path is read by the daemon: make it absolute here, where it was typed.
    if let Some(i) = words.iter().position(|w| w == "--template") {
        if let Some(p) = words.get(i + 1) {
            if let Ok(abs) = std::fs::canonicalize(p) {
                words[i + 1] = abs.display().to_string();
            }
        }
    }
    if args.json && !words.iter().any(|w| w == "--json") {
        words.push("--json".into());
    }
    let mut stream = UnixStream::connect(&socket).with_context(|| {
        format!(
            "connecting to fleetd at {} (is it running?)",
            socket.display()
        )
    })?;
    let mut line = join_words(&words);
    line.push('\n');
    // If the write fails the daemon may still have answered (a refused peer gets its reason
    // before the connection closes): read that first, report the write error otherwise.
    let sent = stream.write_all(line.as_bytes());
    let reader = BufReader::new(stream.try_clone().context("socket")?);
    let mut code = 0;
    let stream = is_stream(&words);
    for l in reader.lines() {
        let l = match (l, &sent) {
            (Ok(l), _) => l,
            (Err(_), Err(e)) => return Err(anyhow::anyhow!("sending the command: {e}")),
            (Err(e), Ok(())) => return Err(e).context("reading the reply"),
        };
        let frame: Frame =
            serde_json::from_str(&l).with_context(|| format!("bad reply from fleetd: {l}"))?;
        match frame {
            Frame::Reply { reply, json } => {
                let text = render(&reply, json);
                if let Reply::Error(_) = reply {
                    eprintln!("{text}");
                    code = 1;
                } else if !text.is_empty() {
                    println!("{text}");
                }
                // One reply ends a one-shot command; streams go on with Event/Line frames.
                if !stream || code != 0 {
                    return Ok(code);
                }
            }
            Frame::Event { event, json } => println!("{}", render_event(&event, json)),
            Frame::Line { line } => println!("{line}"),
        }
        let _ = std::io::stdout().flush();
    }
    sent.context("sending the command")?;
    // A stream ends when the daemon goes away; a one-shot command must have had its answer.
    if !stream {
        anyhow::bail!(
            "fleetd at {} closed the connection without answering",
            socket.display()
        );
    }
    Ok(code)
}

fn is_stream(words: &[String]) -> bool {
    words.first().map(String::as_str) == Some("events")
        || (words.first().map(String::as_str) == Some("logs")
            && words.iter().any(|w| w == "--follow" || w == "-f"))
}
