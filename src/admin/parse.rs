//! The command parser: one grammar for the REPL, the control socket and `fleetctl`, turning a
//! line (or already-split words) into a typed `Request`, plus the help text generated from the
//! same command table. It only parses: no I/O, no side effects, no knowledge of what exists.

use crate::error::FleetError;
use crate::ids::{parse_agent_path, validate_id};
use crate::messages::command::{Command, Request};
use crate::spec::{Profile, RestartType, Strategy};
use std::path::PathBuf;
use std::str::FromStr;

/// Longest line accepted; longer lines are refused before they are split.
pub const MAX_LINE_BYTES: usize = 8192;

/// Most agents `fleet create --agents N` may name at once.
pub const MAX_AGENTS: u32 = 10_000;

/// Default and maximum of `logs -n`.
pub const DEFAULT_LOG_LINES: usize = 50;
pub const MAX_LOG_LINES: usize = 100_000;

/// Why a line is not a command, and the closest valid spelling when there is one.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message}{}", did_you_mean(.suggestion))]
pub struct ParseError {
    pub message: String,
    pub suggestion: Option<String>,
}

fn did_you_mean(s: &Option<String>) -> String {
    match s {
        Some(s) => format!(" (did you mean `{s}`?)"),
        None => String::new(),
    }
}

impl ParseError {
    fn new(message: impl Into<String>) -> Self {
        ParseError {
            message: message.into(),
            suggestion: None,
        }
    }
    fn suggest(message: impl Into<String>, suggestion: Option<String>) -> Self {
        ParseError {
            message: message.into(),
            suggestion,
        }
    }
}

/// The socket answers a bad line with `Reply::Error`, so a parse error must become one.
impl From<ParseError> for FleetError {
    fn from(e: ParseError) -> Self {
        FleetError::invalid("command", e.to_string())
    }
}

// ---------------------------------------------------------------------------------------------
// The command table: grammar and help come from the same rows so they cannot drift apart.

struct Flag {
    name: &'static str,
    /// `Some(hint)` when the flag takes a value (`--agents N`), `None` for a switch.
    value: Option<&'static str>,
    help: &'static str,
    /// May be given more than once (`--env K=V …`).
    repeat: bool,
}

struct Spec {
    /// `fleet create`, `status`, …
    name: &'static str,
    /// Positionals as shown in usage.
    args: &'static str,
    summary: &'static str,
    max_pos: usize,
    flags: &'static [Flag],
    build: fn(&Args) -> Result<Command, ParseError>,
}

const fn switch(name: &'static str, help: &'static str) -> Flag {
    Flag {
        name,
        value: None,
        help,
        repeat: false,
    }
}
const fn valued(name: &'static str, hint: &'static str, help: &'static str) -> Flag {
    Flag {
        name,
        value: Some(hint),
        help,
        repeat: false,
    }
}
const fn repeated(name: &'static str, hint: &'static str, help: &'static str) -> Flag {
    Flag {
        name,
        value: Some(hint),
        help,
        repeat: true,
    }
}

const TENANT_TEMPLATE: Flag = valued(
    "--template",
    "FILE",
    "the agent's own JSON template layer, deep-merged over its fleet's",
);
const TENANT_ENV: Flag = repeated(
    "--env",
    "K=V",
    "set a variable for this agent only (over the fleet's env); repeatable",
);
const TENANT_SECRET: Flag = repeated(
    "--secret",
    "NAME=FILE",
    "read a secret from FILE now; the agent gets it as $NAME and as ~/.openclaw/secrets/NAME; repeatable",
);
const TENANT_FILE: Flag = repeated(
    "--file",
    "DEST=SRC",
    "copy SRC (read now) to DEST inside the agent's HOME at every start; repeatable",
);
const ADD_FLAGS: &[Flag] = &[TENANT_TEMPLATE, TENANT_ENV, TENANT_SECRET, TENANT_FILE];
const SET_FLAGS: &[Flag] = &[
    TENANT_TEMPLATE,
    switch("--no-template", "drop the agent's own template layer"),
    TENANT_ENV,
    repeated(
        "--unset-env",
        "K",
        "drop one of the agent's own variables; repeatable",
    ),
    TENANT_SECRET,
    TENANT_FILE,
    repeated(
        "--rm-file",
        "DEST",
        "stop copying DEST into the HOME; repeatable",
    ),
    valued(
        "--openclaw-version",
        "V",
        "run this agent on its own OpenClaw version (over its fleet's)",
    ),
    switch(
        "--no-openclaw-version",
        "run this agent on its fleet's OpenClaw version again",
    ),
];

const PURGE: Flag = switch("--purge", "also delete its HOME, logs and tokens");

const CREATE_FLAGS: &[Flag] = &[
    valued(
        "--agents",
        "N",
        "create agents agent-1 … agent-N (0..=10000, default 0)",
    ),
    valued(
        "--strategy",
        "S",
        "one_for_one|one_for_all|rest_for_one: which siblings restart with a crashed agent (default one_for_one)",
    ),
    valued(
        "--command",
        "\"PROGRAM ARGS\"",
        "run this instead of `openclaw gateway run`; split with shell quoting rules",
    ),
    valued(
        "--template",
        "FILE",
        "JSON config template merged under the enforced values",
    ),
    valued(
        "--restart",
        "R",
        "permanent|transient|temporary: when an exited agent is restarted (default permanent)",
    ),
    valued("--stride", "N", "ports leased per agent (1..=65535)"),
    valued("--profile", "P", "default|lean: memory/start-up profile"),
    valued(
        "--isolation",
        "I",
        "uid|landlock|none: how agents are kept apart (default: the strongest this host gives)",
    ),
    valued(
        "--openclaw-version",
        "V",
        "the OpenClaw version its agents run (installed by scripts/install-openclaw.sh V)",
    ),
    switch(
        "--no-probes",
        "custom commands: probe no /healthz, a spawned agent counts as running (as supervisord runs)",
    ),
];

static SPECS: &[Spec] = &[
    Spec {
        name: "fleet create",
        args: "<fleet>",
        summary: "create a fleet and start its agents",
        max_pos: 1,
        flags: CREATE_FLAGS,
        build: build_fleet_create,
    },
    Spec {
        name: "fleet list",
        args: "",
        summary: "list fleets",
        max_pos: 0,
        flags: &[],
        build: |_| Ok(Command::FleetList),
    },
    Spec {
        name: "fleet start",
        args: "<fleet>",
        summary: "start every agent of a fleet",
        max_pos: 1,
        flags: &[],
        build: |a| Ok(Command::FleetStart { fleet: a.fleet()? }),
    },
    Spec {
        name: "fleet stop",
        args: "<fleet>",
        summary: "stop every agent of a fleet",
        max_pos: 1,
        flags: &[],
        build: |a| Ok(Command::FleetStop { fleet: a.fleet()? }),
    },
    Spec {
        name: "fleet restart",
        args: "<fleet>",
        summary: "restart every agent of a fleet",
        max_pos: 1,
        flags: &[],
        build: |a| Ok(Command::FleetRestart { fleet: a.fleet()? }),
    },
    Spec {
        name: "fleet rm",
        args: "<fleet>",
        summary: "stop and remove a fleet",
        max_pos: 1,
        flags: &[PURGE],
        build: |a| {
            Ok(Command::FleetRm {
                fleet: a.fleet()?,
                purge: a.switch("--purge"),
            })
        },
    },
    Spec {
        name: "agent add",
        args: "<fleet> <agent>",
        summary: "add an agent (a tenant, with its own settings and secrets) to a fleet and start it",
        max_pos: 2,
        flags: ADD_FLAGS,
        build: build_agent_add,
    },
    Spec {
        name: "agent set",
        args: "<fleet>/<agent>",
        summary: "change one agent's own settings; restarts that agent only",
        max_pos: 1,
        flags: SET_FLAGS,
        build: build_agent_set,
    },
    Spec {
        name: "agent secret",
        args: "<fleet>/<agent> set NAME FILE | rm NAME",
        summary: "set (read from FILE now) or remove one secret of an agent; restarts that agent only",
        max_pos: 4,
        flags: &[],
        build: build_agent_secret,
    },
    Spec {
        name: "agent config",
        args: "<fleet>/<agent>",
        summary: "print the agent's effective openclaw.json and environment, secrets redacted",
        max_pos: 1,
        flags: &[],
        build: |a| {
            let (fleet, agent) = a.agent_path()?;
            Ok(Command::AgentConfig { fleet, agent })
        },
    },
    Spec {
        name: "agent start",
        args: "<fleet>/<agent>",
        summary: "start one agent",
        max_pos: 1,
        flags: &[],
        build: |a| {
            let (fleet, agent) = a.agent_path()?;
            Ok(Command::AgentStart { fleet, agent })
        },
    },
    Spec {
        name: "agent stop",
        args: "<fleet>/<agent>",
        summary: "stop one agent",
        max_pos: 1,
        flags: &[],
        build: |a| {
            let (fleet, agent) = a.agent_path()?;
            Ok(Command::AgentStop { fleet, agent })
        },
    },
    Spec {
        name: "agent restart",
        args: "<fleet>/<agent>",
        summary: "restart one agent",
        max_pos: 1,
        flags: &[],
        build: |a| {
            let (fleet, agent) = a.agent_path()?;
            Ok(Command::AgentRestart { fleet, agent })
        },
    },
    Spec {
        name: "agent rm",
        args: "<fleet>/<agent>",
        summary: "stop and remove one agent",
        max_pos: 1,
        flags: &[PURGE],
        build: |a| {
            let (fleet, agent) = a.agent_path()?;
            Ok(Command::AgentRm {
                fleet,
                agent,
                purge: a.switch("--purge"),
            })
        },
    },
    Spec {
        name: "agent backup",
        args: "<fleet>/<agent>",
        summary: "write a consistent archive (0600, with a manifest) of the agent's HOME, running or not",
        max_pos: 1,
        flags: &[valued(
            "--out",
            "FILE",
            "the new archive (default <state>/backups/<fleet>/<agent>/<agent>-<time>.tar.gz)",
        )],
        build: |a| {
            let (fleet, agent) = a.agent_path()?;
            Ok(Command::AgentBackup {
                fleet,
                agent,
                out: a.value("--out").map(|v| path_value(a, "--out", v)).transpose()?,
            })
        },
    },
    Spec {
        name: "fleet backup",
        args: "<fleet>",
        summary: "back up every agent of a fleet, one archive each",
        max_pos: 1,
        flags: &[valued(
            "--dir",
            "DIR",
            "where the archives go (default <state>/backups/<fleet>/<agent>/)",
        )],
        build: |a| {
            Ok(Command::FleetBackup {
                fleet: a.fleet()?,
                dir: a.value("--dir").map(|v| path_value(a, "--dir", v)).transpose()?,
            })
        },
    },
    Spec {
        name: "agent restore",
        args: "<fleet>/<agent>",
        summary: "replace a stopped agent's HOME with an archive's (checked whole first); rotates its token",
        max_pos: 1,
        flags: &[
            valued("--from", "FILE", "the archive (from agent backup)"),
            switch("--force", "take an archive of another agent"),
        ],
        build: |a| {
            let (fleet, agent) = a.agent_path()?;
            let from = a
                .value("--from")
                .ok_or_else(|| a.err("missing --from FILE"))?;
            Ok(Command::AgentRestore {
                fleet,
                agent,
                from: path_value(a, "--from", from)?,
                force: a.switch("--force"),
            })
        },
    },
    Spec {
        name: "fleet upgrade",
        args: "<fleet>",
        summary: "move a fleet to another OpenClaw version agent by agent, rolling back one that does not come up ready",
        max_pos: 1,
        flags: &[
            valued("--to", "VERSION", "the version (installed by scripts/install-openclaw.sh VERSION)"),
            valued("--canary", "N", "upgrade N agents first, alone (default 1)"),
            valued("--max-unavailable", "N", "agents upgraded at once after the canaries (default 1)"),
            valued("--ready-timeout", "S", "seconds an agent has to be running and ready (default 120)"),
            switch("--status", "show the fleet's last upgrade instead"),
        ],
        build: |a| {
            let fleet = a.fleet()?;
            if a.switch("--status") {
                if let Some(f) = ["--to", "--canary", "--max-unavailable", "--ready-timeout"]
                    .into_iter()
                    .find(|f| a.value(f).is_some())
                {
                    return Err(a.err(format!("{f} cannot be given with --status")));
                }
                return Ok(Command::FleetUpgradeStatus { fleet });
            }
            let to = a.value("--to").ok_or_else(|| a.err("missing --to VERSION"))?;
            if let Some(reason) = crate::spec::version_problem(to) {
                return Err(a.err(format!("--to: {reason}")));
            }
            let count = |f: &str| {
                a.value(f)
                    .map(|v| number(f, v, 1, 10_000).map(|n| n as u32))
                    .transpose()
            };
            Ok(Command::FleetUpgrade {
                fleet,
                to: to.to_string(),
                canary: count("--canary")?,
                max_unavailable: count("--max-unavailable")?,
                ready_timeout_s: a
                    .value("--ready-timeout")
                    .map(|v| number("--ready-timeout", v, 1, 3600))
                    .transpose()?,
            })
        },
    },
    Spec {
        name: "fleet rollback",
        args: "<fleet>",
        summary: "put every agent the last upgrade moved back on its version, with its backup",
        max_pos: 1,
        flags: &[],
        build: |a| Ok(Command::FleetRollback { fleet: a.fleet()? }),
    },
    Spec {
        name: "webhooks",
        args: "",
        summary: "print the reverse proxy's config that routes <public-url>/<fleet>/<agent>/<channel> to each agent's webhook listener",
        max_pos: 0,
        flags: &[
            valued("--format", "F", "nginx|caddy (default: fleetd's --webhooks-format, else nginx)"),
            valued("--apply", "DIR", "also write it into DIR and reload the proxy"),
        ],
        build: |a| {
            Ok(Command::Webhooks {
                format: a
                    .value("--format")
                    .map(|v| v.parse().map_err(|e: String| a.err(format!("--format: {e}"))))
                    .transpose()?,
                apply: a.value("--apply").map(|v| path_value(a, "--apply", v)).transpose()?,
            })
        },
    },
    Spec {
        name: "doctor",
        args: "[<fleet>[/<agent>]]",
        summary: "read-only checks of the node, fleets and agents: ok|warn|fail each, exit 1 on a fail",
        max_pos: 1,
        flags: &[],
        build: |a| {
            let (fleet, agent) = match a.pos.first() {
                None => (None, None),
                Some(p) => match p.split_once('/') {
                    Some((f, ag)) => (Some(f.to_string()), Some(ag.to_string())),
                    None => (Some(p.clone()), None),
                },
            };
            Ok(Command::Doctor { fleet, agent })
        },
    },
    Spec {
        name: "say",
        args: "<fleet>/<agent> TEXT…",
        summary: "(demo) send a Telegram DM to the agent's bot through the loopback fake Bot API and print its reply",
        max_pos: 64,
        flags: &[],
        build: |a| {
            let (fleet, agent) = a.agent_path()?;
            let text = a.pos[1..].join(" ");
            if text.trim().is_empty() {
                return Err(a.err("missing TEXT"));
            }
            Ok(Command::Say { fleet, agent, text })
        },
    },
    Spec {
        name: "watch",
        args: "on|off",
        summary: "(REPL) print agent and channel transitions as they happen, or stop printing them",
        max_pos: 1,
        flags: &[],
        build: |a| match a.required(0, "on|off")? {
            "on" => Ok(Command::Watch { on: true }),
            "off" => Ok(Command::Watch { on: false }),
            other => Err(a.err(format!("expected on or off, got {other:?}"))),
        },
    },
    Spec {
        name: "exec",
        args: "<fleet>/<agent> -- PROGRAM [ARGS…]",
        summary: "(fleetctl only) run a program as the agent runs: its HOME, env with secrets, its openclaw on PATH; exits with the program's status",
        max_pos: 1,
        flags: &[],
        build: |a| {
            let (fleet, agent) = a.agent_path()?;
            Err(a.err(format!(
                "runs a program on your terminal: use `fleetctl exec {fleet}/{agent} -- PROGRAM [ARGS…]`"
            )))
        },
    },
    Spec {
        name: "status",
        args: "[<fleet>[/<agent>]]",
        summary: "show agents: state, pid, port, restarts, health, memory",
        max_pos: 1,
        flags: &[],
        build: build_status,
    },
    Spec {
        name: "logs",
        args: "<fleet>/<agent>",
        summary: "show an agent's recent output",
        max_pos: 1,
        flags: &[
            valued("-n", "N", "how many lines (default 50, at most 100000)"),
            switch("--follow", "keep printing new lines"),
        ],
        build: build_logs,
    },
    Spec {
        name: "token",
        args: "<fleet>/<agent>",
        summary: "show an agent's gateway token",
        max_pos: 1,
        flags: &[switch(
            "--rotate",
            "issue a new token and restart the agent with it",
        )],
        build: |a| {
            let (fleet, agent) = a.agent_path()?;
            Ok(Command::Token {
                fleet,
                agent,
                rotate: a.switch("--rotate"),
            })
        },
    },
    Spec {
        name: "node list",
        args: "",
        summary: "cluster mode: every node, its lease, mark, capacity and agents",
        max_pos: 0,
        flags: &[],
        build: |_| Ok(Command::NodeList),
    },
    Spec {
        name: "node cordon",
        args: "<node>",
        summary: "cluster mode: the node takes no new agents (it keeps its own)",
        max_pos: 1,
        flags: &[],
        build: |a| {
            Ok(Command::NodeCordon {
                node: a.id("node", a.required(0, "<node>")?)?,
            })
        },
    },
    Spec {
        name: "node uncordon",
        args: "<node>",
        summary: "cluster mode: the node takes new agents again",
        max_pos: 1,
        flags: &[],
        build: |a| {
            Ok(Command::NodeUncordon {
                node: a.id("node", a.required(0, "<node>")?)?,
            })
        },
    },
    Spec {
        name: "node drain",
        args: "<node>",
        summary: "cluster mode: cordon the node and move every agent off it",
        max_pos: 1,
        flags: &[],
        build: |a| {
            Ok(Command::NodeDrain {
                node: a.id("node", a.required(0, "<node>")?)?,
            })
        },
    },
    Spec {
        name: "ports",
        args: "",
        summary: "list port leases",
        max_pos: 0,
        flags: &[],
        build: |_| Ok(Command::Ports),
    },
    Spec {
        name: "top",
        args: "",
        summary: "show processes, memory and CPU per agent",
        max_pos: 0,
        flags: &[],
        build: |_| Ok(Command::Top),
    },
    Spec {
        name: "capacity",
        args: "",
        summary: "estimate how many more agents fit, and what limits them",
        max_pos: 0,
        flags: &[],
        build: |_| Ok(Command::Capacity),
    },
    Spec {
        name: "events",
        args: "",
        summary: "stream lifecycle events",
        max_pos: 0,
        flags: &[],
        build: |_| Ok(Command::Events),
    },
    Spec {
        name: "reload",
        args: "",
        summary: "re-read the spec file and apply the differences (it changes only the fleets it declares)",
        max_pos: 0,
        flags: &[switch(
            "--dry-run",
            "only list, by name, what would be created, removed and restarted",
        )],
        build: |a| {
            Ok(Command::Reload {
                dry_run: a.switch("--dry-run"),
            })
        },
    },
    Spec {
        name: "help",
        args: "[command]",
        summary: "show all commands, or one command's usage",
        max_pos: 2,
        flags: &[],
        build: build_help,
    },
    Spec {
        name: "shutdown",
        args: "",
        summary: "stop every agent and exit the daemon",
        max_pos: 0,
        flags: &[],
        build: |_| Ok(Command::Shutdown),
    },
];

/// Verbs that only group sub-verbs.
const GROUPS: [&str; 3] = ["fleet", "agent", "node"];

const JSON_FLAG: &str = "--json";

fn spec(name: &str) -> Option<&'static Spec> {
    SPECS.iter().find(|s| s.name == name)
}

fn subverbs(group: &str) -> impl Iterator<Item = &'static str> + '_ {
    SPECS.iter().filter_map(move |s| {
        s.name
            .strip_prefix(group)
            .and_then(|rest| rest.strip_prefix(' '))
    })
}

// ---------------------------------------------------------------------------------------------
// Entry points.

/// Parses one line. `Ok(None)` for an empty line or a `#` comment.
pub fn parse_line(line: &str) -> Result<Option<Request>, ParseError> {
    if line.len() > MAX_LINE_BYTES {
        return Err(ParseError::new(format!(
            "line too long: {} bytes, the limit is {MAX_LINE_BYTES} bytes",
            line.len()
        )));
    }
    let words = split_line(line)?;
    if words.is_empty() {
        return Ok(None);
    }
    parse_split(&words).map(Some)
}

/// Splits a line into words with shell quoting rules; a `#` starting a word begins a comment.
pub fn split_line(line: &str) -> Result<Vec<String>, ParseError> {
    shell_words::split(line).map_err(|_| {
        ParseError::new("unbalanced quotes: a quoted word is not closed before the end of the line")
    })
}

/// Quotes words so that `parse_line(&join_words(w))` sees exactly `w` again.
pub fn join_words(words: &[String]) -> String {
    shell_words::join(words)
}

/// Parses words that are already split (fleetctl's argv).
pub fn parse_words(words: &[String]) -> Result<Request, ParseError> {
    // fleetctl sends these words as one line: refuse here what the daemon would refuse there.
    let joined = join_words(words).len();
    if joined > MAX_LINE_BYTES {
        return Err(ParseError::new(format!(
            "line too long: {joined} bytes, the limit is {MAX_LINE_BYTES} bytes"
        )));
    }
    parse_split(words)
}

/// The grammar proper, on words whose length was already checked in the caller's form.
fn parse_split(words: &[String]) -> Result<Request, ParseError> {
    let json_count = words.iter().filter(|w| *w == JSON_FLAG).count();
    if json_count > 1 {
        return Err(ParseError::new(format!("{JSON_FLAG} given twice")));
    }
    let words: Vec<&str> = words
        .iter()
        .map(String::as_str)
        .filter(|w| *w != JSON_FLAG)
        .collect();
    let (spec, rest) = resolve_verb(&words)?;
    let command = match parse_args(spec, rest)? {
        Parsed::Args(args) => (spec.build)(&args)?,
        Parsed::Help => Command::Help {
            topic: Some(spec.name.to_string()),
        },
    };
    Ok(Request {
        command,
        json: json_count == 1,
    })
}

/// The overview (no topic), a group's commands (`fleet`) or one command's usage.
pub fn help_text(topic: Option<&str>) -> Result<String, ParseError> {
    let topic = match topic.map(normalize_topic) {
        None => return Ok(overview()),
        Some(t) if t.is_empty() => return Ok(overview()),
        Some(t) => t,
    };
    if let Some(s) = spec(&topic) {
        return Ok(command_help(s));
    }
    if GROUPS.contains(&topic.as_str()) {
        let mut out = format!("{topic} commands:\n");
        for s in SPECS
            .iter()
            .filter(|s| s.name.starts_with(&format!("{topic} ")))
        {
            out.push_str(&format!("  {}\n      {}\n", usage(s), s.summary));
        }
        return Ok(out.trim_end().to_string());
    }
    Err(ParseError::suggest(
        format!("help: no command {topic:?}"),
        suggest_topic(&topic),
    ))
}

// ---------------------------------------------------------------------------------------------
// Verb resolution and argument collection.

fn resolve_verb<'w, 'a>(
    words: &'w [&'a str],
) -> Result<(&'static Spec, &'w [&'a str]), ParseError> {
    let Some(&verb) = words.first() else {
        return Err(ParseError::new("empty command: try `help`"));
    };
    if GROUPS.contains(&verb) {
        let subs: Vec<&str> = subverbs(verb).collect();
        let Some(&sub) = words.get(1) else {
            return Err(ParseError::new(format!(
                "{verb}: missing subcommand, one of {}",
                subs.join("|")
            )));
        };
        return match spec(&format!("{verb} {sub}")) {
            Some(s) => Ok((s, &words[2..])),
            None => {
                let other = GROUPS.iter().find(|g| **g != verb).copied().unwrap_or(verb);
                let suggestion = closest(sub, subs.iter().copied())
                    .map(|s| format!("{verb} {s}"))
                    .or_else(|| spec(&format!("{other} {sub}")).map(|s| s.name.to_string()));
                Err(ParseError::suggest(
                    format!(
                        "{verb}: unknown subcommand {sub:?}, expected one of {}",
                        subs.join("|")
                    ),
                    suggestion,
                ))
            }
        };
    }
    match spec(verb) {
        Some(s) => Ok((s, &words[1..])),
        None => Err(ParseError::suggest(
            format!("unknown command {verb:?}: try `help`"),
            suggest_topic(verb),
        )),
    }
}

/// What a command's words said, before they are checked against its meaning.
struct Args {
    cmd: &'static str,
    pos: Vec<String>,
    flags: Vec<(&'static str, Option<String>)>,
}

enum Parsed {
    Args(Args),
    /// `--help`/`-h` among the words: show this command's usage instead.
    Help,
}

fn parse_args(spec: &'static Spec, words: &[&str]) -> Result<Parsed, ParseError> {
    let cmd = spec.name;
    let mut args = Args {
        cmd,
        pos: Vec::new(),
        flags: Vec::new(),
    };
    let mut i = 0;
    while i < words.len() {
        let word = words[i];
        i += 1;
        if !word.starts_with('-') || word == "-" {
            if args.pos.len() >= spec.max_pos {
                return Err(ParseError::new(format!("{cmd}: unexpected word {word:?}")));
            }
            args.pos.push(word.to_string());
            continue;
        }
        if word == "--help" || word == "-h" {
            return Ok(Parsed::Help);
        }
        let (name, inline) = match word.split_once('=') {
            Some((n, v)) => (n, Some(v)),
            None => (word, None),
        };
        if name == JSON_FLAG {
            return Err(ParseError::new(format!("{JSON_FLAG} takes no value")));
        }
        let Some(flag) = spec.flags.iter().find(|f| f.name == name) else {
            let names = spec.flags.iter().map(|f| f.name).chain([JSON_FLAG]);
            return Err(ParseError::suggest(
                format!("{cmd}: unknown flag {name}"),
                closest(name, names).map(str::to_string),
            ));
        };
        if !flag.repeat && args.flags.iter().any(|(n, _)| *n == flag.name) {
            return Err(ParseError::new(format!("{cmd}: {} given twice", flag.name)));
        }
        let value = match (flag.value, inline) {
            (None, None) => None,
            (None, Some(_)) => {
                return Err(ParseError::new(format!("{}: takes no value", flag.name)))
            }
            (Some(_), Some(v)) => Some(v.to_string()),
            // A following `--word` is another flag, not this one's value; `--flag=--x` is the
            // way to pass such a value.
            (Some(_), None) => match words.get(i) {
                Some(v) if !v.starts_with("--") => {
                    i += 1;
                    Some(v.to_string())
                }
                _ => {
                    return Err(ParseError::new(format!(
                        "{}: missing value (see `help {cmd}`)",
                        flag.name
                    )))
                }
            },
        };
        args.flags.push((flag.name, value));
    }
    Ok(Parsed::Args(args))
}

impl Args {
    fn err(&self, msg: impl std::fmt::Display) -> ParseError {
        ParseError::new(format!("{}: {msg}", self.cmd))
    }

    fn required(&self, i: usize, what: &str) -> Result<&str, ParseError> {
        self.pos
            .get(i)
            .map(String::as_str)
            .ok_or_else(|| self.err(format!("missing {what}")))
    }

    fn id(&self, kind: &'static str, id: &str) -> Result<String, ParseError> {
        validate_id(kind, id).map_err(|e| self.err(e))?;
        Ok(id.to_string())
    }

    fn fleet(&self) -> Result<String, ParseError> {
        self.id("fleet", self.required(0, "<fleet>")?)
    }

    fn path(&self, path: &str) -> Result<(String, String), ParseError> {
        parse_agent_path(path).map_err(|e| match e {
            FleetError::InvalidArgument { .. } => {
                self.err(format!("expected <fleet>/<agent>, got {path:?}"))
            }
            other => self.err(other),
        })
    }

    fn agent_path(&self) -> Result<(String, String), ParseError> {
        self.path(self.required(0, "<fleet>/<agent>")?)
    }

    fn switch(&self, name: &str) -> bool {
        self.flags.iter().any(|(n, _)| *n == name)
    }

    fn values(&self, name: &str) -> impl Iterator<Item = &str> {
        let name = name.to_string();
        self.flags
            .iter()
            .filter(move |(n, _)| *n == name)
            .filter_map(|(_, v)| v.as_deref())
    }

    fn value(&self, name: &str) -> Option<&str> {
        self.flags
            .iter()
            .find(|(n, _)| *n == name)
            .and_then(|(_, v)| v.as_deref())
    }
}

// ---------------------------------------------------------------------------------------------
// Builders: positionals and flag values to a typed command.

fn build_fleet_create(a: &Args) -> Result<Command, ParseError> {
    let fleet = a.fleet()?;
    let agents = match a.value("--agents") {
        Some(v) => number("--agents", v, 0, MAX_AGENTS as u64)? as u32,
        None => 0,
    };
    let command = match a.value("--command") {
        Some(v) => {
            let words = shell_words::split(v)
                .map_err(|_| ParseError::new(format!("--command: unbalanced quotes in {v:?}")))?;
            if words.is_empty() || words[0].trim().is_empty() {
                return Err(ParseError::new(
                    "--command: expected a program and its arguments, got nothing",
                ));
            }
            Some(words)
        }
        None => None,
    };
    let template = match a.value("--template") {
        Some("") => {
            return Err(ParseError::new(
                "--template: expected a file path, got \"\"",
            ))
        }
        Some(v) => Some(PathBuf::from(v)),
        None => None,
    };
    Ok(Command::FleetCreate {
        fleet,
        agents,
        strategy: a
            .value("--strategy")
            .map(|v| choice::<Strategy>("--strategy", v))
            .transpose()?,
        command,
        template,
        restart: a
            .value("--restart")
            .map(|v| choice::<RestartType>("--restart", v))
            .transpose()?,
        stride: a
            .value("--stride")
            .map(|v| number("--stride", v, 1, u16::MAX as u64).map(|n| n as u16))
            .transpose()?,
        profile: a
            .value("--profile")
            .map(|v| choice::<Profile>("--profile", v))
            .transpose()?,
        isolation: a
            .value("--isolation")
            .map(|v| choice::<crate::isolation::Isolation>("--isolation", v))
            .transpose()?,
        openclaw_version: a
            .value("--openclaw-version")
            .map(|v| match crate::spec::version_problem(v) {
                Some(reason) => Err(a.err(format!("--openclaw-version: {reason}"))),
                None => Ok(v.to_string()),
            })
            .transpose()?,
        no_probes: a.switch("--no-probes"),
    })
}

fn build_agent_add(a: &Args) -> Result<Command, ParseError> {
    let first = a.required(0, "<fleet>")?;
    let settings = agent_change(a)?;
    // `agent add f/a` is what the other agent verbs look like; accept it too.
    if first.contains('/') {
        if let Some(extra) = a.pos.get(1) {
            return Err(a.err(format!("unexpected word {extra:?}")));
        }
        let (fleet, agent) = a.path(first)?;
        return Ok(Command::AgentAdd {
            fleet,
            agent,
            settings,
        });
    }
    let fleet = a.id("fleet", first)?;
    let agent = a.id("agent", a.required(1, "<agent>")?)?;
    Ok(Command::AgentAdd {
        fleet,
        agent,
        settings,
    })
}

fn build_agent_set(a: &Args) -> Result<Command, ParseError> {
    let (fleet, agent) = a.agent_path()?;
    let change = agent_change(a)?;
    if change.is_empty() {
        return Err(a.err("nothing to change: give at least one flag (see `help agent set`)"));
    }
    Ok(Command::AgentSet {
        fleet,
        agent,
        change,
    })
}

fn build_agent_secret(a: &Args) -> Result<Command, ParseError> {
    let (fleet, agent) = a.agent_path()?;
    let mut change = crate::messages::command::AgentChange::default();
    let name = |i: usize| -> Result<String, ParseError> {
        let n = a.required(i, "NAME")?;
        match crate::spec::secret_name_problem(n) {
            Some(why) => Err(a.err(why)),
            None => Ok(n.to_string()),
        }
    };
    match a.pos.get(1).map(String::as_str) {
        Some("set") => {
            let n = name(2)?;
            let file = path_value(a, "FILE", a.required(3, "FILE")?)?;
            change.secrets.insert(n, file);
        }
        Some("rm") => {
            if let Some(extra) = a.pos.get(3) {
                return Err(a.err(format!("unexpected word {extra:?}")));
            }
            change.rm_secrets.push(name(2)?);
        }
        Some(other) => return Err(a.err(format!("expected set or rm, got {other:?}"))),
        None => return Err(a.err("missing set NAME FILE or rm NAME")),
    }
    Ok(Command::AgentSet {
        fleet,
        agent,
        change,
    })
}

/// A path the operator typed, made absolute against the parsing process's directory (the
/// daemon reads it, and its directory is not the operator's).
fn path_value(a: &Args, what: &str, v: &str) -> Result<PathBuf, ParseError> {
    if v.is_empty() {
        return Err(a.err(format!("{what}: expected a file path, got \"\"")));
    }
    Ok(std::path::absolute(v).unwrap_or_else(|_| PathBuf::from(v)))
}

/// `K=V` of a repeatable flag, the key checked by `check`.
fn pair<'v>(
    a: &Args,
    flag: &str,
    v: &'v str,
    check: impl Fn(&str) -> Option<String>,
) -> Result<(String, &'v str), ParseError> {
    let Some((k, val)) = v.split_once('=') else {
        return Err(a.err(format!("{flag}: expected KEY=VALUE, got {v:?}")));
    };
    if let Some(why) = check(k) {
        return Err(a.err(format!("{flag} {k}: {why}")));
    }
    Ok((k.to_string(), val))
}

/// The tenant flags of `agent add` and `agent set`.
fn agent_change(a: &Args) -> Result<crate::messages::command::AgentChange, ParseError> {
    use crate::spec::{env_problem, home_path_problem, secret_name_problem};
    let mut c = crate::messages::command::AgentChange::default();
    if let Some(t) = a.value("--template") {
        c.template = Some(path_value(a, "--template", t)?);
    }
    c.no_template = a.switch("--no-template");
    for v in a.values("--env") {
        let (k, val) = pair(a, "--env", v, |k| env_problem(k, ""))?;
        if val.contains('\0') {
            return Err(a.err(format!("--env {k}: value contains a NUL byte")));
        }
        if c.env.insert(k.clone(), val.to_string()).is_some() {
            return Err(a.err(format!("--env {k} given twice")));
        }
    }
    for k in a.values("--unset-env") {
        c.unset_env.push(k.to_string());
    }
    for v in a.values("--secret") {
        let (k, file) = pair(a, "--secret", v, secret_name_problem)?;
        let file = path_value(a, &format!("--secret {k}"), file)?;
        if c.secrets.insert(k.clone(), file).is_some() {
            return Err(a.err(format!("--secret {k} given twice")));
        }
    }
    for v in a.values("--file") {
        let (dest, src) = pair(a, "--file", v, home_path_problem)?;
        let src = path_value(a, &format!("--file {dest}"), src)?;
        if c.files.insert(dest.clone(), src).is_some() {
            return Err(a.err(format!("--file {dest} given twice")));
        }
    }
    for d in a.values("--rm-file") {
        c.rm_files.push(d.to_string());
    }
    if let Some(v) = a.value("--openclaw-version") {
        if let Some(reason) = crate::spec::version_problem(v) {
            return Err(a.err(format!("--openclaw-version: {reason}")));
        }
        c.openclaw_version = Some(v.to_string());
    }
    c.no_openclaw_version = a.switch("--no-openclaw-version");
    Ok(c)
}

fn build_status(a: &Args) -> Result<Command, ParseError> {
    match a.pos.first() {
        None => Ok(Command::Status {
            fleet: None,
            agent: None,
        }),
        Some(p) if p.contains('/') => {
            let (fleet, agent) = a.path(p)?;
            Ok(Command::Status {
                fleet: Some(fleet),
                agent: Some(agent),
            })
        }
        Some(f) => Ok(Command::Status {
            fleet: Some(a.id("fleet", f)?),
            agent: None,
        }),
    }
}

fn build_logs(a: &Args) -> Result<Command, ParseError> {
    let (fleet, agent) = a.agent_path()?;
    let lines = match a.value("-n") {
        Some(v) => number("-n", v, 0, MAX_LOG_LINES as u64)? as usize,
        None => DEFAULT_LOG_LINES,
    };
    Ok(Command::Logs {
        fleet,
        agent,
        lines,
        follow: a.switch("--follow"),
    })
}

fn build_help(a: &Args) -> Result<Command, ParseError> {
    if a.pos.is_empty() {
        return Ok(Command::Help { topic: None });
    }
    let topic = a.pos.join(" ");
    // Refuse unknown topics here so a typo gets its suggestion before reaching the node.
    help_text(Some(&topic))?;
    Ok(Command::Help {
        topic: Some(normalize_topic(&topic)),
    })
}

fn number(flag: &str, v: &str, lo: u64, hi: u64) -> Result<u64, ParseError> {
    let bad = || {
        ParseError::new(format!(
            "{flag}: expected a whole number {lo}..={hi}, got {v:?}"
        ))
    };
    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    match v.parse::<u64>() {
        Ok(n) if (lo..=hi).contains(&n) => Ok(n),
        _ => Err(bad()),
    }
}

fn choice<T: FromStr<Err = String>>(flag: &str, v: &str) -> Result<T, ParseError> {
    v.parse::<T>()
        .map_err(|e| ParseError::new(format!("{flag}: {e}, got {v:?}")))
}

// ---------------------------------------------------------------------------------------------
// Suggestions.

/// Optimal string alignment distance: Levenshtein plus adjacent transpositions, so that
/// `stauts` is one edit from `status`.
fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut d = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in d[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut v = (d[i - 1][j] + 1)
                .min(d[i][j - 1] + 1)
                .min(d[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                v = v.min(d[i - 2][j - 2] + 1);
            }
            d[i][j] = v;
        }
    }
    d[a.len()][b.len()]
}

/// The nearest candidate close enough to be a typo; the first one wins a tie.
fn closest<'c>(word: &str, candidates: impl IntoIterator<Item = &'c str>) -> Option<&'c str> {
    let mut best: Option<(usize, &str)> = None;
    for c in candidates {
        let d = edit_distance(word, c);
        let limit = if c.chars().count() <= 4 { 1 } else { 2 };
        if d <= limit && d < word.chars().count() && best.is_none_or(|(bd, _)| d < bd) {
            best = Some((d, c));
        }
    }
    best.map(|(_, c)| c)
}

/// A command name near `word`: whole names (`stauts` → `status`), group names, or a bare
/// sub-verb (`create` → `fleet create`).
fn suggest_topic(word: &str) -> Option<String> {
    let names = SPECS
        .iter()
        .map(|s| s.name)
        .filter(|n| !n.contains(' '))
        .chain(GROUPS);
    if let Some(c) = closest(word, names) {
        return Some(c.to_string());
    }
    if let Some((g, sub)) = word.split_once(' ') {
        if GROUPS.contains(&g) {
            return closest(sub, subverbs(g)).map(|s| format!("{g} {s}"));
        }
    }
    let by_sub = SPECS
        .iter()
        .filter_map(|s| s.name.split_once(' ').map(|(_, sub)| (sub, s.name)));
    let subs: Vec<(&str, &str)> = by_sub.collect();
    closest(word, subs.iter().map(|(sub, _)| *sub))
        .and_then(|hit| subs.iter().find(|(sub, _)| *sub == hit))
        .map(|(_, name)| name.to_string())
}

// ---------------------------------------------------------------------------------------------
// Help text.

fn normalize_topic(t: &str) -> String {
    t.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// One line: the flags themselves when there are few, `[options]` when they would not fit.
fn usage(s: &Spec) -> String {
    let mut u = s.name.to_string();
    if !s.args.is_empty() {
        u.push(' ');
        u.push_str(s.args);
    }
    if s.flags.len() > 2 {
        u.push_str(" [options]");
        return u;
    }
    for f in s.flags {
        match f.value {
            Some(hint) => u.push_str(&format!(" [{} {hint}]", f.name)),
            None => u.push_str(&format!(" [{}]", f.name)),
        }
    }
    u
}

fn overview() -> String {
    let mut out = String::from("commands (add --json to any command for JSON output):\n");
    for s in SPECS {
        out.push_str(&format!("  {}\n      {}\n", usage(s), s.summary));
    }
    out.push_str("`help <command>` shows one command's options.");
    out
}

fn command_help(s: &Spec) -> String {
    let mut out = format!("usage: {}\n  {}", usage(s), s.summary);
    let shown = |f: &Flag| match f.value {
        Some(hint) => format!("{} {hint}", f.name),
        None => f.name.to_string(),
    };
    let width = s
        .flags
        .iter()
        .map(|f| shown(f).len())
        .max()
        .unwrap_or(0)
        .max(JSON_FLAG.len());
    for f in s.flags.iter() {
        out.push_str(&format!("\n  {:width$}  {}", shown(f), f.help));
    }
    out.push_str(&format!("\n  {JSON_FLAG:width$}  print the answer as JSON"));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::command::AgentChange;

    fn err(line: &str) -> ParseError {
        match parse_line(line) {
            Err(e) => e,
            Ok(r) => panic!("{line:?} should fail, gave {r:?}"),
        }
    }

    fn s(v: &str) -> String {
        v.to_string()
    }

    fn create(fleet: &str) -> Command {
        Command::FleetCreate {
            fleet: s(fleet),
            agents: 0,
            strategy: None,
            command: None,
            template: None,
            restart: None,
            stride: None,
            profile: None,
            isolation: None,
            openclaw_version: None,
            no_probes: false,
        }
    }

    fn with(c: Command, f: impl FnOnce(&mut Command)) -> Command {
        let mut c = c;
        f(&mut c);
        c
    }

    #[test]
    fn every_form_parses() {
        let cases: Vec<(&str, Command)> = vec![
            ("fleet create f", create("f")),
            (
                "fleet create f --no-probes",
                with(create("f"), |c| {
                    if let Command::FleetCreate { no_probes, .. } = c {
                        *no_probes = true;
                    }
                }),
            ),
            (
                "fleet create f --agents 3 --strategy rest_for_one --command \"python3 agent.py --flag\" --template t.json --restart transient --stride 200 --profile lean --isolation landlock",
                Command::FleetCreate {
                    fleet: s("f"),
                    agents: 3,
                    strategy: Some(Strategy::RestForOne),
                    command: Some(vec![s("python3"), s("agent.py"), s("--flag")]),
                    template: Some(PathBuf::from("t.json")),
                    restart: Some(RestartType::Transient),
                    stride: Some(200),
                    profile: Some(Profile::Lean),
                    isolation: Some(crate::isolation::Isolation::Landlock),
                    openclaw_version: None,
                    no_probes: false,
                },
            ),
            (
                "fleet create f --agents=10000 --strategy=one_for_all --restart=temporary --profile=default --stride=1",
                Command::FleetCreate {
                    fleet: s("f"),
                    agents: 10000,
                    strategy: Some(Strategy::OneForAll),
                    command: None,
                    template: None,
                    restart: Some(RestartType::Temporary),
                    stride: Some(1),
                    profile: Some(Profile::Default),
                    isolation: None,
                    openclaw_version: None,
                    no_probes: false,
                },
            ),
            (
                "fleet create f --command='sh -c \"echo $HOME\"'",
                with(create("f"), |c| {
                    if let Command::FleetCreate { command, .. } = c {
                        *command = Some(vec![s("sh"), s("-c"), s("echo $HOME")]);
                    }
                }),
            ),
            ("fleet create f --agents 0 --strategy one_for_one", with(create("f"), |c| {
                if let Command::FleetCreate { strategy, .. } = c {
                    *strategy = Some(Strategy::OneForOne);
                }
            })),
            ("fleet list", Command::FleetList),
            ("fleet start f-1", Command::FleetStart { fleet: s("f-1") }),
            ("fleet stop f", Command::FleetStop { fleet: s("f") }),
            ("fleet restart f", Command::FleetRestart { fleet: s("f") }),
            ("fleet rm f", Command::FleetRm { fleet: s("f"), purge: false }),
            ("fleet rm f --purge", Command::FleetRm { fleet: s("f"), purge: true }),
            ("agent add f a", Command::AgentAdd { fleet: s("f"), agent: s("a"), settings: Default::default() }),
            ("agent add f/a", Command::AgentAdd { fleet: s("f"), agent: s("a"), settings: Default::default() }),
            ("agent add f a --env TZ=UTC --env A=b=c --secret TG_BOT_TOKEN=/s/tg --file x/SOUL.md=/s/soul --template /t.json", Command::AgentAdd {
                fleet: s("f"),
                agent: s("a"),
                settings: AgentChange {
                    template: Some("/t.json".into()),
                    env: [(s("TZ"), s("UTC")), (s("A"), s("b=c"))].into_iter().collect(),
                    secrets: [(s("TG_BOT_TOKEN"), "/s/tg".into())].into_iter().collect(),
                    files: [(s("x/SOUL.md"), "/s/soul".into())].into_iter().collect(),
                    ..Default::default()
                },
            }),
            ("agent set f/a --unset-env TZ --rm-file x --no-template", Command::AgentSet {
                fleet: s("f"),
                agent: s("a"),
                change: AgentChange {
                    no_template: true,
                    unset_env: vec![s("TZ")],
                    rm_files: vec![s("x")],
                    ..Default::default()
                },
            }),
            ("agent secret f/a set OPENAI_API_KEY /k", Command::AgentSet {
                fleet: s("f"),
                agent: s("a"),
                change: AgentChange {
                    secrets: [(s("OPENAI_API_KEY"), "/k".into())].into_iter().collect(),
                    ..Default::default()
                },
            }),
            ("agent secret f/a rm OPENAI_API_KEY", Command::AgentSet {
                fleet: s("f"),
                agent: s("a"),
                change: AgentChange {
                    rm_secrets: vec![s("OPENAI_API_KEY")],
                    ..Default::default()
                },
            }),
            ("agent config f/a", Command::AgentConfig { fleet: s("f"), agent: s("a") }),
            ("agent start f/a", Command::AgentStart { fleet: s("f"), agent: s("a") }),
            ("agent stop f/a", Command::AgentStop { fleet: s("f"), agent: s("a") }),
            ("agent restart f/a", Command::AgentRestart { fleet: s("f"), agent: s("a") }),
            ("agent rm f/a", Command::AgentRm { fleet: s("f"), agent: s("a"), purge: false }),
            ("agent rm --purge f/a", Command::AgentRm { fleet: s("f"), agent: s("a"), purge: true }),
            ("status", Command::Status { fleet: None, agent: None }),
            ("status f", Command::Status { fleet: Some(s("f")), agent: None }),
            ("status f/agent-2", Command::Status { fleet: Some(s("f")), agent: Some(s("agent-2")) }),
            ("logs f/a", Command::Logs { fleet: s("f"), agent: s("a"), lines: 50, follow: false }),
            ("logs f/a -n 7 --follow", Command::Logs { fleet: s("f"), agent: s("a"), lines: 7, follow: true }),
            ("logs f/a -n=100000", Command::Logs { fleet: s("f"), agent: s("a"), lines: 100000, follow: false }),
            ("token f/a", Command::Token { fleet: s("f"), agent: s("a"), rotate: false }),
            ("token f/a --rotate", Command::Token { fleet: s("f"), agent: s("a"), rotate: true }),
            ("ports", Command::Ports),
            ("top", Command::Top),
            ("capacity", Command::Capacity),
            ("events", Command::Events),
            ("reload", Command::Reload { dry_run: false }),
            ("reload --dry-run", Command::Reload { dry_run: true }),
            ("help", Command::Help { topic: None }),
            ("help status", Command::Help { topic: Some(s("status")) }),
            ("help fleet   create", Command::Help { topic: Some(s("fleet create")) }),
            ("help fleet", Command::Help { topic: Some(s("fleet")) }),
            ("fleet create --help", Command::Help { topic: Some(s("fleet create")) }),
            ("shutdown", Command::Shutdown),
            ("  status   f  ", Command::Status { fleet: Some(s("f")), agent: None }),
            ("status f # trailing comment", Command::Status { fleet: Some(s("f")), agent: None }),
        ];
        for (line, want) in cases {
            let got = parse_line(line).unwrap_or_else(|e| panic!("{line:?}: {e}"));
            let got = got.unwrap_or_else(|| panic!("{line:?} parsed as nothing"));
            assert_eq!(got.command, want, "{line:?}");
            assert!(!got.json, "{line:?} has no --json");
        }
    }

    #[test]
    fn json_anywhere_sets_the_flag_only() {
        for line in [
            "status --json",
            "--json status",
            "fleet --json list",
            "fleet create f --json --agents 2",
            "logs f/a --json -n 3",
            "help --json",
        ] {
            let with = parse_line(line).unwrap().unwrap();
            assert!(with.json, "{line:?}");
            let without: Vec<String> = split_line(line)
                .unwrap()
                .into_iter()
                .filter(|w| w != "--json")
                .collect();
            assert_eq!(
                with.command,
                parse_words(&without).unwrap().command,
                "{line:?}"
            );
        }
        let e = err("status --json --json");
        assert!(e.message.contains("--json given twice"), "{e}");
        let e = err("status --json=yes");
        assert!(e.message.contains("--json takes no value"), "{e}");
    }

    #[test]
    fn empty_and_comment_lines_are_nothing() {
        for line in [
            "",
            "   ",
            "\t",
            "# a comment",
            "   # indented comment",
            "\n",
        ] {
            assert_eq!(parse_line(line), Ok(None), "{line:?}");
        }
    }

    #[test]
    fn malformed_lines_name_what_is_wrong() {
        let long_id = "a".repeat(41);
        let cases: Vec<(String, Vec<&str>)> = vec![
            (s("stauts"), vec!["unknown command", "\"stauts\""]),
            (s("frobnicate"), vec!["unknown command", "frobnicate"]),
            (s("fleet"), vec!["fleet: missing subcommand", "create"]),
            (
                s("fleet crate f"),
                vec!["fleet: unknown subcommand", "\"crate\""],
            ),
            (s("fleet create"), vec!["fleet create: missing <fleet>"]),
            (s("fleet start"), vec!["fleet start: missing <fleet>"]),
            (s("agent add f"), vec!["agent add: missing <agent>"]),
            (
                s("agent start"),
                vec!["agent start: missing <fleet>/<agent>"],
            ),
            (s("logs"), vec!["logs: missing <fleet>/<agent>"]),
            (
                s("agent stop f"),
                vec!["agent stop", "expected <fleet>/<agent>", "\"f\""],
            ),
            (
                s("fleet create ../x"),
                vec!["fleet create", "invalid fleet id", "\"../x\"", "a-z"],
            ),
            (
                s("fleet create A"),
                vec!["invalid fleet id", "\"A\"", "a-z"],
            ),
            (s("fleet create a_b"), vec!["invalid fleet id", "\"a_b\""]),
            (
                format!("fleet create {long_id}"),
                vec!["invalid fleet id", &long_id, "1-40"],
            ),
            (s("agent add f A"), vec!["invalid agent id", "\"A\""]),
            (
                s("agent add f a --env NOEQUALS"),
                vec!["--env", "KEY=VALUE"],
            ),
            (
                s("agent add f a --env HOME=/x"),
                vec!["--env HOME", "set by fleetd"],
            ),
            (
                s("agent add f a --secret lower=/x"),
                vec!["--secret lower", "A-Z"],
            ),
            (
                s("agent add f a --secret K=/x --secret K=/y"),
                vec!["--secret K given twice"],
            ),
            (
                s("agent add f a --file ../x=/s"),
                vec!["--file ../x", "inside the HOME"],
            ),
            (
                s("agent add f a --file /etc/x=/s"),
                vec!["--file /etc/x", "inside the HOME"],
            ),
            (
                s("agent add f a --file .openclaw/openclaw.json=/s"),
                vec!["written by fleetd"],
            ),
            (
                s("agent add f a --file logs/x=/s"),
                vec!["written by fleetd"],
            ),
            (s("agent set f/a"), vec!["agent set", "nothing to change"]),
            (s("agent secret f/a"), vec!["agent secret", "set NAME FILE"]),
            (
                s("agent secret f/a add K /x"),
                vec!["expected set or rm", "\"add\""],
            ),
            (s("agent secret f/a set K"), vec!["missing FILE"]),
            (s("exec f/a"), vec!["fleetctl exec f/a --"]),
            (s("agent start f/a_b"), vec!["invalid agent id", "\"a_b\""]),
            (s("agent start F/a"), vec!["invalid fleet id", "\"F\""]),
            (
                // A `/` makes it a path, so the fleet half is what is refused.
                s("status ../x"),
                vec!["status", "invalid fleet id", "\"..\""],
            ),
            (s("status f/../x"), vec!["invalid agent id", "\"../x\""]),
            (
                s("fleet create f --agents x"),
                vec!["--agents: expected a whole number 0..=10000, got \"x\""],
            ),
            (
                s("fleet create f --agents 10001"),
                vec!["--agents", "0..=10000", "\"10001\""],
            ),
            (s("fleet create f --agents -1"), vec!["--agents", "\"-1\""]),
            (
                s("fleet create f --agents"),
                vec!["--agents: missing value"],
            ),
            (
                s("fleet create f --agents --purge"),
                vec!["--agents: missing value"],
            ),
            (
                s("fleet create f --strategy best"),
                vec![
                    "--strategy: expected one of one_for_one|one_for_all|rest_for_one",
                    "\"best\"",
                ],
            ),
            (
                s("fleet create f --restart sometimes"),
                vec!["--restart", "permanent|transient|temporary"],
            ),
            (
                s("fleet create f --profile fat"),
                vec!["--profile", "default|lean"],
            ),
            (
                s("fleet create f --stride 0"),
                vec!["--stride", "1..=65535", "\"0\""],
            ),
            (
                s("fleet create f --stride 70000"),
                vec!["--stride", "\"70000\""],
            ),
            (
                s("fleet create f --command ''"),
                vec!["--command", "program"],
            ),
            (
                s("fleet create f --command 'sh \"x'"),
                vec!["--command", "unbalanced"],
            ),
            (
                s("fleet create f --template ''"),
                vec!["--template", "file"],
            ),
            (
                s("logs f/a -n 100001"),
                vec!["-n: expected a whole number 0..=100000", "\"100001\""],
            ),
            (s("logs f/a -n many"), vec!["-n", "\"many\""]),
            (
                s("fleet create f --agnets 3"),
                vec!["fleet create: unknown flag --agnets"],
            ),
            (s("status --purge"), vec!["status: unknown flag --purge"]),
            (s("logs f/a -x"), vec!["logs: unknown flag -x"]),
            (s("fleet rm f --purge=yes"), vec!["--purge: takes no value"]),
            (
                s("fleet create f --agents 1 --agents 2"),
                vec!["fleet create: --agents given twice"],
            ),
            (
                s("fleet rm f --purge --purge"),
                vec!["fleet rm: --purge given twice"],
            ),
            (s("logs f/a -n 1 -n=2"), vec!["logs: -n given twice"]),
            (s("status x y"), vec!["status: unexpected word \"y\""]),
            (s("fleet list x"), vec!["fleet list: unexpected word \"x\""]),
            (s("ports now"), vec!["ports: unexpected word \"now\""]),
            (
                s("agent add f a b"),
                vec!["agent add: unexpected word \"b\""],
            ),
            (
                s("agent add f/a b"),
                vec!["agent add: unexpected word \"b\""],
            ),
            (
                s("fleet create f g"),
                vec!["fleet create: unexpected word \"g\""],
            ),
            (
                s("help nothing-here"),
                vec!["help: no command", "nothing-here"],
            ),
            (s("status \"f"), vec!["unbalanced quotes"]),
            (
                s("fleet create f --command 'python3 x.py"),
                vec!["unbalanced quotes"],
            ),
        ];
        for (line, needles) in cases {
            let e = err(&line);
            let shown = e.to_string();
            for n in needles {
                assert!(
                    shown.contains(n),
                    "{line:?}: {shown:?} should contain {n:?}"
                );
            }
        }
    }

    #[test]
    fn an_over_long_line_is_refused_before_parsing() {
        // Malformed past the limit too: only the length may be reported.
        let line = format!("status \"{}", "x".repeat(10 * 1024));
        let e = err(&line);
        assert!(e.message.contains("8192"), "{e}");
        assert!(e.message.contains(&line.len().to_string()), "{e}");
        assert!(!e.message.contains("quote"), "{e}");
        let words = vec![
            s("fleet"),
            s("create"),
            s("f"),
            s("--command"),
            "y".repeat(9000),
        ];
        let e = parse_words(&words).unwrap_err();
        assert!(e.message.contains("8192"), "{e}");
        // Exactly at the limit is still a line.
        let at_limit = format!("status{}", " ".repeat(MAX_LINE_BYTES - 6));
        assert_eq!(at_limit.len(), MAX_LINE_BYTES);
        assert!(parse_line(&at_limit).unwrap().is_some());
    }

    #[test]
    fn suggestions_point_at_the_nearest_spelling() {
        let cases = [
            ("stauts", "status"),
            ("stats", "status"),
            ("fleet crate f", "fleet create"),
            ("fleet stpo f", "fleet stop"),
            ("agent strat f/a", "agent start"),
            ("fleet add f a", "agent add"),
            ("create f", "fleet create"),
            ("fleat list", "fleet"),
            ("fleet create f --agnets 3", "--agents"),
            ("fleet create f --strategi one_for_one", "--strategy"),
            ("logs f/a --folow", "--follow"),
            ("status --jsno", "--json"),
            ("help stauts", "status"),
            ("tpo", "top"),
        ];
        for (line, want) in cases {
            let e = err(line);
            assert_eq!(e.suggestion.as_deref(), Some(want), "{line:?}: {e}");
            assert!(
                e.to_string()
                    .ends_with(&format!(" (did you mean `{want}`?)")),
                "{line:?}: {e}"
            );
        }
        for line in ["xyzzy", "fleet qqqqq f", "status --zzzzzz"] {
            let e = err(line);
            assert_eq!(e.suggestion, None, "{line:?}: {e}");
            assert!(!e.to_string().contains("did you mean"), "{e}");
        }
    }

    #[test]
    fn edit_distance_counts_transpositions_once() {
        assert_eq!(edit_distance("stauts", "status"), 1);
        assert_eq!(edit_distance("crate", "create"), 1);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
    }

    #[test]
    fn join_words_round_trips_through_parse_line() {
        let tricky = [
            "with space",
            "it's",
            "\"double\"",
            "$HOME",
            "${X}",
            "a\\b",
            "#hash",
            "--flag=value",
            "",
            "tab\there",
            "*?[]",
            "`cmd`",
            "ünïcødé",
            "'",
        ];
        for w in tricky {
            let words = vec![s("fleet"), s("create"), s("f"), s("--command"), s(w)];
            let line = join_words(&words);
            assert_eq!(split_line(&line).unwrap(), words, "{w:?} via {line:?}");
            assert_eq!(
                parse_line(&line).map(|r| r.map(|r| r.command)),
                parse_words(&words).map(|r| Some(r.command)),
                "{w:?} via {line:?}"
            );
            // And as the program's own argument, through --command's second split.
            let inner = join_words(&[s("prog"), s(w)]);
            let words = vec![
                s("fleet"),
                s("create"),
                s("f"),
                format!("--command={inner}"),
            ];
            let got = parse_line(&join_words(&words)).unwrap().unwrap().command;
            match got {
                Command::FleetCreate { command, .. } => {
                    assert_eq!(command, Some(vec![s("prog"), s(w)]), "{w:?}")
                }
                other => panic!("{w:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn help_covers_every_command() {
        let all = help_text(None).unwrap();
        for spec in SPECS {
            assert!(all.contains(&usage(spec)), "overview lacks {}", spec.name);
            let one = help_text(Some(spec.name)).unwrap();
            assert!(one.starts_with(&format!("usage: {}", spec.name)), "{one}");
            for f in spec.flags {
                assert!(one.contains(f.help), "{} help lacks {}", spec.name, f.name);
            }
        }
        let fleet = help_text(Some("fleet")).unwrap();
        assert!(
            fleet.contains("fleet create") && !fleet.contains("agent add"),
            "{fleet}"
        );
        let e = help_text(Some("fleet crate")).unwrap_err();
        assert_eq!(e.suggestion.as_deref(), Some("fleet create"), "{e}");
    }

    #[test]
    fn parse_error_becomes_an_invalid_argument() {
        let fe: FleetError = err("stauts").into();
        let shown = fe.to_string();
        assert!(
            shown.contains("command") && shown.contains("stauts"),
            "{shown}"
        );
    }
}
