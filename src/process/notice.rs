//! Lines of a gateway's stderr that say more than its exit status can: V8's heap
//! out-of-memory abort (the exit alone is only `signal 6 (SIGABRT)`) and OpenClaw's
//! crash-loop breaker (after 3 unclean exits in 5 minutes it keeps every channel off while its
//! probes stay green: no probe shows it). The owner looks at each stderr line as it logs it.

/// What a line says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Notice {
    /// `FATAL ERROR: … JavaScript heap out of memory`.
    HeapOutOfMemory,
    /// `restart-loop breaker tripped: … suppressing channel/provider account auto-start`.
    Breaker,
}

/// What one line of stderr says, if anything worth knowing.
pub fn classify(line: &[u8]) -> Option<Notice> {
    let has = |needle: &[u8]| line.windows(needle.len()).any(|w| w == needle);
    if has(b"JavaScript heap out of memory") {
        Some(Notice::HeapOutOfMemory)
    } else if has(b"restart-loop breaker tripped") {
        Some(Notice::Breaker)
    } else {
        None
    }
}

/// What an incarnation's stderr said so far.
#[derive(Debug, Default, Clone, Copy)]
pub struct Notes {
    pub heap_oom: bool,
    pub breaker: bool,
    /// The breaker was already reported.
    pub breaker_told: bool,
}

impl Notes {
    pub fn see(&mut self, line: &[u8]) {
        match classify(line) {
            Some(Notice::HeapOutOfMemory) => self.heap_oom = true,
            Some(Notice::Breaker) => self.breaker = true,
            None => {}
        }
    }

    /// True once, the first time after the breaker line was seen.
    pub fn take_breaker(&mut self) -> bool {
        let new = self.breaker && !self.breaker_told;
        self.breaker_told |= new;
        new
    }
}

/// The heap cap (`--max-old-space-size`, MiB) in a NODE_OPTIONS value, if set.
pub fn heap_cap_mib(node_options: &str) -> Option<u64> {
    node_options
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("--max-old-space-size="))
        .filter_map(|v| v.parse().ok())
        .next_back()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_that_matter() {
        let cases: [(&[u8], Option<Notice>); 5] = [
            (b"FATAL ERROR: Ineffective mark-compacts near heap limit Allocation failed - JavaScript heap out of memory", Some(Notice::HeapOutOfMemory)),
            (b"[gateway] restart-loop breaker tripped: 3 unclean exits in 300s; suppressing channel/provider account auto-start", Some(Notice::Breaker)),
            (b"memory pressure: level=critical heap=224 MiB", None),
            (b"", None),
            (b"\xff\xfe not utf-8", None),
        ];
        for (line, want) in cases {
            assert_eq!(classify(line), want, "{}", String::from_utf8_lossy(line));
        }
        let mut n = Notes::default();
        n.see(cases[1].0);
        assert!(n.take_breaker());
        assert!(!n.take_breaker(), "told once");
    }

    #[test]
    fn heap_cap_is_the_last_setting() {
        assert_eq!(
            heap_cap_mib("--max-old-space-size=256 --max-semi-space-size=1"),
            Some(256)
        );
        assert_eq!(
            heap_cap_mib("--max-old-space-size=256 --max-old-space-size=512"),
            Some(512)
        );
        assert_eq!(heap_cap_mib("--jitless"), None);
        assert_eq!(heap_cap_mib("--max-old-space-size=lots"), None);
    }
}
