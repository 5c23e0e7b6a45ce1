//! The stub's command line: its flags and their parsing.

pub(crate) const USAGE: &str = "usage: fleet-stub-agent [--no-config] [--bind-retry-ms N] [--bind-delay-ms N] [--ready-delay-ms N]
  [--no-helper] [--helper-orphan] [--helper-mb N] [--term-delay-ms N] [--ignore-sigterm]
  [--crash-after-ms N] [--exit-code N] [--abort-after-ms N] [--leak-mb-per-s N] [--spike-mb N] [--spike-ms N] [--spike-every-ms N]
  [--hang-healthz] [--hang-healthz-after-ms N] [--flood-bytes N] [--flood-stderr]
  [--line-bytes N] [--print-every-ms N]
Reads $HOME/.openclaw/openclaw.json (gateway.port, gateway.auth.token, logging.file);
OPENCLAW_GATEWAY_PORT overrides gateway.port. Serves GET /healthz, /readyz, /whoami on 127.0.0.1.
";

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Opts {
    pub(crate) no_config: bool,
    pub(crate) bind_retry_ms: u64,
    /// Wait this long before binding, like a gateway's cold start.
    pub(crate) bind_delay_ms: u64,
    pub(crate) ready_delay_ms: u64,
    pub(crate) no_helper: bool,
    pub(crate) helper_orphan: bool,
    /// Memory the helper touches and holds (a setsid helper that costs something).
    pub(crate) helper_mb: u64,
    pub(crate) term_delay_ms: u64,
    pub(crate) ignore_sigterm: bool,
    pub(crate) crash_after_ms: Option<u64>,
    pub(crate) exit_code: Option<i32>,
    pub(crate) abort_after_ms: Option<u64>,
    pub(crate) leak_mb_per_s: u64,
    pub(crate) spike_mb: u64,
    /// How long each spike holds its memory.
    pub(crate) spike_ms: u64,
    /// Repeat the spike this often (a single spike at start when absent).
    pub(crate) spike_every_ms: Option<u64>,
    pub(crate) hang_healthz: bool,
    pub(crate) hang_healthz_after_ms: Option<u64>,
    pub(crate) flood_bytes: u64,
    pub(crate) flood_stderr: bool,
    pub(crate) line_bytes: usize,
    pub(crate) print_every_ms: Option<u64>,
    pub(crate) help: bool,
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
pub(crate) fn parse_args(args: &[String]) -> Result<Opts, String> {
    pub(crate) fn num<T: std::str::FromStr>(flag: &str, v: Option<String>) -> Result<T, String> {
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
