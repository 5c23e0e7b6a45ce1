#!/usr/bin/env bash
# The README's first command: builds fleetd (release), installs OpenClaw if missing, and runs
# the 3-agent demo fleet of fleets/demo.toml (real gateways, lean profile) with the REPL on
# this terminal. Watch the agents go starting → running, then try: status, logs demo/agent-1,
# agent restart demo/agent-2, top, help, shutdown.
#
# State (registry, agent HOMEs, logs, socket) lives in target/demo-state inside the repo
# (override with FLEET_DEMO_STATE_DIR); `cargo clean` or `rm -rf target/demo-state` forgets it.
# Ports come from 20000-59999 (override with FLEET_DEMO_PORTS=FIRST-LAST).
# Works with a pipe too, e.g. `printf 'status\nshutdown\n' | scripts/demo.sh`; EOF on stdin
# does not stop the daemon, so end piped input with `shutdown`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT="$PWD"

echo "demo: building fleetd (release)…" >&2
cargo build --release --quiet --bin fleetd --bin fleetctl

if ! out="$(scripts/install-openclaw.sh)"; then
    echo "demo: installing OpenClaw failed (message above)" >&2
    exit 1
fi
OPENCLAW_BIN="$(sed -n 's/^OPENCLAW_BIN=//p' <<<"$out")"

STATE="${FLEET_DEMO_STATE_DIR:-$ROOT/target/demo-state}"
mkdir -p -m 0700 "$STATE"  # what fleetd would create; it refuses a dir others can write
echo "demo: state in $STATE; control socket $STATE/fleetd.sock (fleetctl --socket … status)" >&2
echo "demo: starting 3 OpenClaw gateways; a cold start takes 10-40 s each on 2 cores" >&2
exec "$ROOT/target/release/fleetd" \
    --state-dir "$STATE" \
    --spec "$ROOT/fleets/demo.toml" \
    --openclaw "$OPENCLAW_BIN" \
    --port-range "${FLEET_DEMO_PORTS:-20000-59999}" \
    --repl
