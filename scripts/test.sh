#!/usr/bin/env bash
# The README's test command: installs the pinned OpenClaw (cached under $FLEET_OPENCLAW_HOME,
# by default /opt/fleet-commander/openclaw for root, else ~/.cache/fleet-commander/openclaw;
# a re-run takes 0.1 s), exports
# FLEET_OPENCLAW_BIN for the real-gateway tests (tests/real_openclaw.rs), then runs every test.
# Extra arguments go to `cargo test`.
#
# A failed install fails this script: the real-gateway tests are never skipped silently.
# A developer without npm or network may opt out knowingly with FLEET_SKIP_REAL_OPENCLAW=1
# (those tests then print SKIPPED); under CI=true the opt-out is refused.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# etcd for the cluster tests (tests/cluster.rs), and protoc, which the etcd client's build
# needs before anything compiles.
if ! etcd_out="$(scripts/install-etcd.sh)"; then
    echo "test.sh: scripts/install-etcd.sh failed (message above)" >&2
    exit 1
fi
FLEET_ETCD_BIN="$(sed -n 's/^ETCD_BIN=//p' <<<"$etcd_out")"
export FLEET_ETCD_BIN
echo "test.sh: FLEET_ETCD_BIN=$FLEET_ETCD_BIN" >&2

if [[ "${FLEET_SKIP_REAL_OPENCLAW:-}" == "1" ]]; then
    if [[ "${CI:-}" == "true" ]]; then
        echo "test.sh: FLEET_SKIP_REAL_OPENCLAW=1 is not allowed under CI=true" >&2
        exit 1
    fi
    echo "test.sh: FLEET_SKIP_REAL_OPENCLAW=1: the real-gateway tests will be SKIPPED" >&2
else
    if ! out="$(scripts/install-openclaw.sh)"; then
        echo "test.sh: scripts/install-openclaw.sh failed (message above); the real-gateway tests" \
             "cannot run. Fix the install, or set FLEET_SKIP_REAL_OPENCLAW=1 to skip them knowingly." >&2
        exit 1
    fi
    FLEET_OPENCLAW_BIN="$(sed -n 's/^OPENCLAW_BIN=//p' <<<"$out")"
    [[ -x "$FLEET_OPENCLAW_BIN" ]] \
        || { echo "test.sh: install-openclaw.sh printed no usable OPENCLAW_BIN: $out" >&2; exit 1; }
    export FLEET_OPENCLAW_BIN
    echo "test.sh: FLEET_OPENCLAW_BIN=$FLEET_OPENCLAW_BIN" >&2
    # The upgrade tests (tests/day2.rs) move a fleet from an older published version to the
    # pinned one: that version is installed side by side.
    if ! scripts/install-openclaw.sh 2026.9.5 >/dev/null; then
        echo "test.sh: scripts/install-openclaw.sh 2026.9.5 failed (message above)" >&2
        exit 1
    fi
    # The webhook front-door test (tests/webhooks.rs) routes through a real nginx.
    if ! ngx="$(scripts/install-nginx.sh)"; then
        echo "test.sh: scripts/install-nginx.sh failed (message above)" >&2
        exit 1
    fi
    FLEET_NGINX_BIN="$(sed -n 's/^NGINX_BIN=//p' <<<"$ngx")"
    export FLEET_NGINX_BIN
    echo "test.sh: FLEET_NGINX_BIN=$FLEET_NGINX_BIN" >&2
fi

# As root, the daemons the tests start give every agent a uid of its own (isolation = "uid"),
# and those uids must be able to run the test binaries (the stub agent). A checkout inside a
# directory other users cannot search (a `mktemp -d`, /root) would hide them: build into a
# target directory they can reach instead.
source scripts/lib/reachable.sh
if [[ "$(id -u)" == "0" && -z "${CARGO_TARGET_DIR:-}" ]] && ! searchable_by_others .; then
    CARGO_TARGET_DIR="$(outside_checkout target)"
    export CARGO_TARGET_DIR
    echo "test.sh: $(pwd -P) is not searchable by other users; building into $CARGO_TARGET_DIR so agent uids can run the test binaries" >&2
fi

# Checks that cannot run on this machine say so through tests/common's `skipped`, into this
# file; they are counted here, never passed off as passing.
FLEET_SKIP_LOG="$(mktemp)"
export FLEET_SKIP_LOG
trap 'rm -f "$FLEET_SKIP_LOG"' EXIT
status=0
cargo test --all-targets "$@" || status=$?
skipped="$(grep -c . "$FLEET_SKIP_LOG" || true)"
echo "test.sh: ${skipped:-0} checks skipped on this machine" >&2
if [[ "${skipped:-0}" != "0" ]]; then
    sed 's/^/test.sh:   skipped: /' "$FLEET_SKIP_LOG" >&2
fi
exit "$status"
