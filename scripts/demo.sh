#!/usr/bin/env bash
# The README's first command: builds fleetd (release), installs OpenClaw if missing, starts a
# loopback fake Telegram Bot API and model server (fleet-fakes: no account, no internet), and
# runs the 3-tenant demo fleet of fleets/demo/ (real gateways, lean profile, each with its own
# bot token, model key and persona) with the REPL on this terminal. Watch the agents go
# starting → running and their bots come up, then try: say demo/alice hello, status,
# agent config demo/bob, logs demo/carol, top, help, shutdown.
#
# State (registry, vault, agent HOMEs, logs, socket) lives in target/demo-state inside the repo
# (as root in a checkout other users cannot search: under /var/tmp, since each agent runs as
# a uid of its own; override with FLEET_DEMO_STATE_DIR); the generated spec and the demo secrets in
# target/demo/spec. `rm -rf target/demo-state target/demo` forgets both.
# Ports come from 20000-59999 (override with FLEET_DEMO_PORTS=FIRST-LAST).
# Works with a pipe too, e.g. `printf 'status\nshutdown\n' | scripts/demo.sh`; EOF on stdin
# does not stop the daemon, so end piped input with `shutdown`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT="$PWD"

# protoc, which the etcd client's build needs (the demo itself runs one host, no etcd).
scripts/install-etcd.sh >/dev/null || { echo "demo: scripts/install-etcd.sh failed (message above)" >&2; exit 1; }
echo "demo: building fleetd (release)…" >&2
cargo build --release --quiet --bin fleetd --bin fleetctl --bin fleet-fakes

if ! out="$(scripts/install-openclaw.sh)"; then
    echo "demo: installing OpenClaw failed (message above)" >&2
    exit 1
fi
OPENCLAW_BIN="$(sed -n 's/^OPENCLAW_BIN=//p' <<<"$out")"

TENANTS=(alice bob carol)
declare -A BOT=([alice]=2001:AAdemo-alice-bot-token [bob]=2002:AAdemo-bob-bot-token [carol]=2003:AAdemo-carol-bot-token)

# The fakes, on ports the kernel picks; they print where they listen.
FAKES_OUT="$(mktemp)"
"$ROOT/target/release/fleet-fakes" $(for t in "${TENANTS[@]}"; do printf -- '--bot %s ' "${BOT[$t]}"; done) >"$FAKES_OUT" &
FAKES_PID=$!
trap 'kill "$FAKES_PID" 2>/dev/null || true; rm -f "$FAKES_OUT"' EXIT
for _ in $(seq 100); do
    grep -q '^model ' "$FAKES_OUT" && break
    kill -0 "$FAKES_PID" 2>/dev/null || { echo "demo: fleet-fakes did not start" >&2; exit 1; }
    sleep 0.1
done
TELEGRAM="$(sed -n 's/^telegram //p' "$FAKES_OUT")"
MODEL="$(sed -n 's/^model //p' "$FAKES_OUT")"
[ -n "$TELEGRAM" ] && [ -n "$MODEL" ] || { echo "demo: fleet-fakes gave no addresses" >&2; exit 1; }

# The spec with the fakes' addresses, and each tenant's secrets in files of its own.
SPEC="$ROOT/target/demo/spec"
rm -rf "$SPEC"
mkdir -p "$SPEC/tenants" && mkdir -m 0700 "$SPEC/secrets"
cp "$ROOT/fleets/demo/fleets.toml" "$SPEC/"
cp "$ROOT"/fleets/demo/tenants/*.SOUL.md "$SPEC/tenants/"
sed "s|@MODEL@|$MODEL|" "$ROOT/fleets/demo/fleet.json" >"$SPEC/fleet.json"
for t in "${TENANTS[@]}"; do
    sed "s|@TELEGRAM@|$TELEGRAM|" "$ROOT/fleets/demo/tenants/$t.json" >"$SPEC/tenants/$t.json"
    (umask 077; printf '%s\n' "${BOT[$t]}" >"$SPEC/secrets/$t.tg"; printf 'sk-demo-%s-key\n' "$t" >"$SPEC/secrets/$t.key")
done

STATE="${FLEET_DEMO_STATE_DIR:-$ROOT/target/demo-state}"
source "$ROOT/scripts/lib/reachable.sh"
if [[ -z "${FLEET_DEMO_STATE_DIR:-}" && "$(id -u)" == "0" ]] && ! searchable_by_others "$ROOT"; then
    # Each agent runs as a uid of its own and must reach its HOME.
    STATE="$(outside_checkout demo)/state"
fi
mkdir -p -m 0700 "$STATE"  # what fleetd would create; it refuses a dir others can write
echo "demo: fake Telegram Bot API $TELEGRAM, fake model $MODEL (loopback only)" >&2
echo "demo: state in $STATE; control socket $STATE/fleetd.sock (fleetctl --socket … status)" >&2
echo "demo: starting 3 OpenClaw gateways; a cold start takes 10-40 s each on 2 cores." >&2
echo "demo: once a bot is ready, try: say demo/alice hello" >&2
"$ROOT/target/release/fleetd" \
    --state-dir "$STATE" \
    --spec "$SPEC/fleets.toml" \
    --openclaw "$OPENCLAW_BIN" \
    --port-range "${FLEET_DEMO_PORTS:-20000-59999}" \
    --repl
