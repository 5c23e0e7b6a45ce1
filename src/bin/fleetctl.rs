//! fleetctl: sends one command to a running fleetd over its control socket and prints the
//! reply. Exit 0 on success; non-zero with the error on stderr otherwise.

use anyhow::Result;
use clap::Parser;
use fleet_commander::admin::client::Client;
use fleet_commander::admin::parse::parse_words;
use fleet_commander::admin::render::{render, render_event};
use fleet_commander::admin::socket::Frame;
use fleet_commander::context::{default_socket, default_state_dir};
use fleet_commander::messages::command::{Command, Reply};
use fleet_commander::FleetError;
use std::io::Write;
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
    if words.first().map(String::as_str) == Some("exec") {
        return exec(&socket, &words[1..]);
    }
    // A template path is read by the daemon: make it absolute here, where it was typed.
    if let Some(i) = words.iter().position(|w| w == "--template") {
        if let Some(p) = words.get(i + 1) {
            if let Ok(abs) = std::fs::canonicalize(p) {
                words[i + 1] = abs.display().to_string();
            }
        }
    }
    // Parsed here and sent typed (one JSON line): no byte of an argument can end the request
    // or smuggle a second one, whatever it holds.
    let mut req = match parse_words(&words) {
        Ok(r) => r,
        Err(e) => {
            // The same answer, and exit code, as the daemon gives a bad line.
            let reply = Reply::Error(FleetError::from(e));
            eprintln!("{}", render(&reply, args.json));
            return Ok(1);
        }
    };
    req.json |= args.json;
    let stream = matches!(
        req.command,
        Command::Events | Command::Logs { follow: true, .. }
    );
    let mut client = Client::connect(&socket)?;
    client.send(&req)?;
    let mut code = 0;
    while let Some(frame) = client.next_frame()? {
        match frame {
            Frame::Reply { reply, json } => {
                let text = render(&reply, json);
                if let Reply::Error(_) = reply {
                    eprintln!("{text}");
                    code = 1;
                } else if !text.is_empty() {
                    println!("{text}");
                }
                // `doctor` answers, and exits 1 when a check failed; so does an upgrade that
                // had to stop.
                let failed = match &reply {
                    Reply::Doctor(checks) => checks
                        .iter()
                        .any(|c| c.level == fleet_commander::doctor::Level::Fail),
                    Reply::Upgrade(r) => {
                        r.state != fleet_commander::upgrade::Rollout::Done
                            && r.state != fleet_commander::upgrade::Rollout::RolledBack
                            && !matches!(req.command, Command::FleetUpgradeStatus { .. })
                    }
                    _ => false,
                };
                if failed {
                    code = 1;
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
    // A stream ends when the daemon goes away; a one-shot command must have had its answer.
    if !stream {
        anyhow::bail!(
            "fleetd at {} closed the connection without answering",
            socket.display()
        );
    }
    Ok(code)
}

/// Confines this process as the agent's own processes are (its uid, no capabilities,
/// `no_new_privs`, its Landlock sandbox) before the program replaces it: what runs in a
/// tenant's HOME may be the tenant's code (OpenClaw loads plugins from it).
fn confine_like_the_agent(
    isolation: Option<fleet_commander::isolation::IsolationStatus>,
    home: &str,
    env: &[(String, String)],
    program: &str,
    args: &[String],
    port: u16,
    ports: u16,
) -> Result<()> {
    use fleet_commander::isolation::{confine, sandbox, tenant_fs::Identity, Isolation};
    let Some(iso) = isolation else {
        anyhow::bail!("this host cannot give the agent's fleet the isolation it asks for");
    };
    if iso.level == Isolation::None {
        return Ok(());
    }
    let home = std::path::Path::new(home);
    let tmp = env
        .iter()
        .find(|(k, _)| k == "TMPDIR")
        .map(|(_, v)| std::path::PathBuf::from(v))
        .unwrap_or_else(|| home.join("tmp"));
    let path = env
        .iter()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    // Looked up as the spawner looks up an agent's program: in the agent's PATH.
    let resolved =
        fleet_commander::process::spawn::resolve_program(std::path::Path::new(program), env)
            .unwrap_or_else(|_| std::path::PathBuf::from(program));
    let mut program_paths = sandbox::program_paths(&resolved, args, None);
    // Its PATH names the OpenClaw install and its Node: they are what it runs.
    for dir in std::env::split_paths(&path) {
        program_paths.extend(sandbox::program_paths(&dir, &[], None));
    }
    let landlock = if sandbox::kernel_abi() > 0 {
        sandbox::build(&sandbox::plan(&sandbox::AgentScope {
            home,
            tmp: &tmp,
            program_paths,
            // OpenClaw's lifecycle locks, in /tmp whatever TMPDIR says (fleetd made it).
            extra_rw: vec![std::path::PathBuf::from(format!(
                "/tmp/openclaw-state-locks-{}",
                iso.uid.unwrap_or_else(|| nix::unistd::geteuid().as_raw())
            ))],
            first_port: port,
            ports,
        }))
        .map_err(anyhow::Error::msg)?
    } else {
        None
    };
    let c = confine::Confinement {
        identity: iso.uid.map(Identity::of_uid),
        drop_privileges: true,
        landlock,
        nproc: None,
        private_tmp: None,
    };
    let prepared = c.prepare()?;
    // Safety: raw system calls on this process's own credentials, right before exec.
    if let Err(step) = unsafe { confine::drop_privileges(&prepared, false) } {
        anyhow::bail!(
            "{}: {}",
            confine::Step::name(step).unwrap_or("confining"),
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// `fleetctl exec <fleet>/<agent> [--] PROGRAM [ARGS…]`: asks the daemon for the agent's
/// context (HOME, environment with its secrets, PATH with its openclaw) and replaces this
/// process with the program in it, so the terminal, signals and the exit status are the
/// program's own.
fn exec(socket: &std::path::Path, words: &[String]) -> Result<i32> {
    use std::os::unix::process::CommandExt;
    let usage = "usage: fleetctl exec <fleet>/<agent> -- PROGRAM [ARGS…]";
    let Some(path) = words.first() else {
        eprintln!("fleetctl: exec: missing <fleet>/<agent>; {usage}");
        return Ok(2);
    };
    let (fleet, agent) = match fleet_commander::ids::parse_agent_path(path) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("fleetctl: exec: {e}; {usage}");
            return Ok(2);
        }
    };
    let rest = match words.get(1).map(String::as_str) {
        Some("--") => &words[2..],
        _ => &words[1..],
    };
    let Some(program) = rest.first() else {
        eprintln!("fleetctl: exec: missing PROGRAM; {usage}");
        return Ok(2);
    };
    let mut client = Client::connect(socket)?;
    client.send(&fleet_commander::messages::command::Request {
        command: Command::ExecContext { fleet, agent },
        json: false,
    })?;
    let (cwd, env, isolation, port, ports) = match client.next_frame()? {
        Some(Frame::Reply {
            reply:
                Reply::Exec {
                    cwd,
                    env,
                    isolation,
                    port,
                    ports,
                },
            ..
        }) => (cwd, env, isolation, port, ports),
        Some(Frame::Reply { reply, json }) => {
            eprintln!("{}", render(&reply, json));
            return Ok(1);
        }
        _ => anyhow::bail!(
            "fleetd at {} did not answer the exec request",
            socket.display()
        ),
    };
    if let Err(e) = confine_like_the_agent(isolation, &cwd, &env, program, &rest[1..], port, ports)
    {
        eprintln!("fleetctl: exec: cannot take the agent's isolation: {e}");
        return Ok(1);
    }
    let err = std::process::Command::new(program)
        .args(&rest[1..])
        .env_clear()
        .envs(env)
        .current_dir(&cwd)
        .exec();
    eprintln!("fleetctl: exec: cannot run {program:?} in {cwd}: {err}");
    Ok(127)
}
