//! Host CPU pressure: whether a liveness probe that got no answer in time says more about the
//! host than about the agent.
//!
//! Ten talking lean tenants on two cores (docs/bench.md, issue 21) pushed the load average to
//! 37; probes of healthy gateways starved past their timeout, each restart cost ~16
//! CPU-seconds of cold start on a host already short of them, and the restarts fed a storm.
//! kubelet restarts on such timeouts all the same (supervisord does not probe); fleetd does
//! not count a timeout toward a restart while the host's CPU is saturated and the agent's
//! port still listens, for a bounded number of probes (`health::failure_counts`), so a real
//! hang is still acted on, later.

/// PSI `some avg10` (the share of the last 10 s in which at least one runnable task waited for
/// a CPU) at or above this is a saturated host. A busy but keeping-up host measured here sat at
/// 5-20 %; ten tenants on two cores kept it near 100 %.
pub const SATURATED_PSI_PCT: f64 = 50.0;
/// Where the kernel has no PSI (`CONFIG_PSI` off or `psi=0`): the one-minute load average at
/// or above this many times the CPU count is a saturated host.
pub const SATURATED_LOAD_PER_CPU: f64 = 2.0;

/// `some avg10` from `/proc/pressure/cpu` (`some avg10=6.40 avg60=6.50 avg300=4.82 total=…`).
pub fn parse_psi_some_avg10(text: &str) -> Option<f64> {
    let line = text.lines().find(|l| l.starts_with("some "))?;
    let field = line
        .split_whitespace()
        .find_map(|f| f.strip_prefix("avg10="))?;
    field.parse().ok().filter(|v: &f64| v.is_finite())
}

/// The one-minute load average from `/proc/loadavg` (`0.52 0.58 0.59 1/467 12345`).
pub fn parse_loadavg1(text: &str) -> Option<f64> {
    text.split_whitespace()
        .next()?
        .parse()
        .ok()
        .filter(|v: &f64| v.is_finite())
}

/// What the host's CPU looked like at one moment.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HostCpu {
    pub psi_some_avg10: Option<f64>,
    pub load1: Option<f64>,
    pub cpus: usize,
}

impl HostCpu {
    /// Reads `/proc/pressure/cpu` and `/proc/loadavg` now (two small procfs reads: done only
    /// when a probe has already timed out, never on a healthy tick).
    pub fn now() -> HostCpu {
        let read = |p: &str| std::fs::read_to_string(p).ok();
        HostCpu {
            psi_some_avg10: read("/proc/pressure/cpu")
                .as_deref()
                .and_then(parse_psi_some_avg10),
            load1: read("/proc/loadavg").as_deref().and_then(parse_loadavg1),
            // The host's online CPUs, as the load average counts the whole host (a cgroup
            // quota or affinity mask would make `available_parallelism` smaller).
            cpus: usize::try_from(unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) })
                .unwrap_or(1),
        }
    }

    /// Why the host counts as CPU-saturated, or None. PSI decides where the kernel has it:
    /// load counts tasks in uninterruptible sleep too (a slow disk), so it is only the
    /// fallback.
    pub fn saturated(&self) -> Option<String> {
        match self.psi_some_avg10 {
            Some(p) if p >= SATURATED_PSI_PCT => Some(format!("host CPU pressure {p:.0} %")),
            Some(_) => None,
            None => {
                let load = self.load1?;
                let per_cpu = load / self.cpus.max(1) as f64;
                (per_cpu >= SATURATED_LOAD_PER_CPU)
                    .then(|| format!("host load {load:.1} on {} CPUs", self.cpus))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn psi_and_loadavg_parse() {
        let psi = "some avg10=6.40 avg60=6.50 avg300=4.82 total=27117855\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=0\n";
        assert_eq!(parse_psi_some_avg10(psi), Some(6.4));
        assert_eq!(parse_psi_some_avg10("full avg10=1.00\n"), None);
        assert_eq!(parse_psi_some_avg10("some avg10=nan\n"), None);
        assert_eq!(parse_psi_some_avg10(""), None);
        assert_eq!(parse_loadavg1("0.52 0.58 0.59 1/467 12345\n"), Some(0.52));
        assert_eq!(parse_loadavg1("x"), None);
        assert_eq!(parse_loadavg1(""), None);
    }

    #[test]
    fn saturation_from_psi_first_then_load() {
        let cpu = |psi, load, cpus| HostCpu {
            psi_some_avg10: psi,
            load1: load,
            cpus,
        };
        let cases = [
            (cpu(Some(93.0), Some(1.0), 2), true),
            (cpu(Some(50.0), None, 2), true),
            (cpu(Some(49.9), Some(37.0), 2), false), // PSI decides where present
            (cpu(None, Some(4.0), 2), true),
            (cpu(None, Some(3.9), 2), false),
            (cpu(None, Some(1.0), 0), false), // a CPU count of 0 reads as 1
            (cpu(None, None, 2), false),
        ];
        for (host, want) in cases {
            assert_eq!(host.saturated().is_some(), want, "{host:?}");
        }
    }
}
