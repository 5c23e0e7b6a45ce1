//! The timing of a node's right to run its agents, as plain functions.
//!
//! etcd renews a lease when it receives the keep-alive, so the lease lives at least TTL
//! after the moment the keep-alive was *sent*. The node's agents must be dead before that:
//! the guardian's deadline is `sent + TTL − margin`, and fleetd stops them itself (cleanly,
//! SIGTERM first) half a margin earlier when no renewal came. Renewals go out every TTL/4,
//! so about TTL/2 of etcd silence is borne without stopping anything.

/// What separates the guardian's deadline from the lease's earliest expiry: room for the
/// kill itself and for clocks that tick at slightly different rates.
pub fn margin_ms(ttl_s: u64) -> u64 {
    (ttl_s * 1000 / 5).max(1000)
}

/// The guardian's deadline for a keep-alive (or grant) sent at `sent_ms`.
pub fn deadline_ms(sent_ms: u64, ttl_s: u64) -> u64 {
    (sent_ms + ttl_s * 1000).saturating_sub(margin_ms(ttl_s))
}

/// How often the lease is renewed.
pub fn renew_every_ms(ttl_s: u64) -> u64 {
    (ttl_s * 1000 / 4).max(250)
}

/// fleetd stops its agents itself (before the guardian has to): no renewal came in time.
pub fn must_stop(now_ms: u64, deadline_ms: u64, ttl_s: u64) -> bool {
    deadline_ms != 0 && now_ms + margin_ms(ttl_s) / 2 >= deadline_ms
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table() {
        // (ttl, sent, now) → (deadline, must stop)
        let cases = [
            (10, 1_000, 1_000, 9_000, false),
            (10, 1_000, 7_900, 9_000, false),
            (10, 1_000, 8_000, 9_000, true),
            (3, 0, 1_400, 2_000, false),
            (3, 0, 1_500, 2_000, true),
        ];
        for (ttl, sent, now, want_deadline, want_stop) in cases {
            let d = deadline_ms(sent, ttl);
            assert_eq!(d, want_deadline, "ttl {ttl} sent {sent}");
            assert_eq!(must_stop(now, d, ttl), want_stop, "ttl {ttl} now {now}");
            // Always strictly before the lease could expire.
            assert!(d < sent + ttl * 1000, "ttl {ttl}");
            // And renewals come several times before it.
            assert!(renew_every_ms(ttl) * 2 <= ttl * 1000, "ttl {ttl}");
        }
    }
}
