#!/usr/bin/env bash
# Log path throughput through the real daemon: builds release, starts fleetd on a temp state
# dir, floods FLOOD_MB (default 200) MB from one fleet-stub-agent (100-byte lines, default
# log settings: 10 MiB files, keep 5), and prints
#   - MB/s of agent output the daemon consumed (the stub's written bytes; it blocks on a full
#     64 KiB pipe, so it cannot run ahead of the daemon by more than that),
#   - MB/s the daemon wrote (fleetd's /proc wchar: agent.log + gzip archives),
#   - fleetd's CPU% over the flood (utime+stime deltas from /proc/<pid>/stat; 100% = 1 core;
#     includes the gzip threads),
#   - the final log directory.
# Cleans up (fleetd by pid, its agents with it, the temp dir) on every exit path.
# Not a test: no thresholds.
set -euo pipefail

FLOOD_MB=${FLOOD_MB:-200}
FLOOD=$((FLOOD_MB * 1000 * 1000))
cd "$(dirname "$0")/.."
cargo build --release --quiet --bin fleetd --bin fleetctl --bin fleet-stub-agent
BIN=$(cargo metadata --format-version 1 --no-deps 2>/dev/null |
	sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')/release
TMP=$(mktemp -d /tmp/bench-logs.XXXXXX)
FLEETD_PID=""

cleanup() {
	if [ -n "$FLEETD_PID" ] && kill -0 "$FLEETD_PID" 2>/dev/null; then
		"$BIN/fleetctl" --socket "$TMP/state/fleetd.sock" shutdown >/dev/null 2>&1 || true
		for _ in $(seq 100); do kill -0 "$FLEETD_PID" 2>/dev/null || break; sleep 0.1; done
		kill -9 "$FLEETD_PID" 2>/dev/null || true
	fi
	rm -rf "$TMP"
}
trap cleanup EXIT INT TERM

ctl() { "$BIN/fleetctl" --socket "$TMP/state/fleetd.sock" "$@"; }

"$BIN/fleetd" --state-dir "$TMP/state" --no-repl --port-range 47000-47999 \
	>"$TMP/fleetd.log" 2>&1 </dev/null &
FLEETD_PID=$!
for _ in $(seq 200); do ctl fleet list >/dev/null 2>&1 && break; sleep 0.05; done

stat_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
io_field() { awk -v k="$2:" '$1 == k {print $2}' "/proc/$1/io"; }
now_ns() { date +%s%N; }

t0=$(now_ns)
cpu0=$(stat_ticks "$FLEETD_PID")
w0=$(io_field "$FLEETD_PID" wchar)
ctl fleet create bench --agents 1 --stride 1 \
	--command "$BIN/fleet-stub-agent --no-helper --flood-bytes $FLOOD" >/dev/null

STUB_PID=""
for _ in $(seq 400); do
	STUB_PID=$(ctl --json status | sed -n 's/.*"pid": *\([0-9]*\).*/\1/p' | head -1)
	[ -n "$STUB_PID" ] && break
	sleep 0.02
done
[ -n "$STUB_PID" ] || { echo "stub did not start"; exit 1; }

# Done when the stub has written everything (bounded: 10 minutes).
for _ in $(seq 60000); do
	w=$(io_field "$STUB_PID" wchar 2>/dev/null || echo "$FLOOD")
	[ "$w" -ge "$FLOOD" ] && break
	sleep 0.01
done
t1=$(now_ns)
cpu1=$(stat_ticks "$FLEETD_PID")
w1=$(io_field "$FLEETD_PID" wchar)
hz=$(getconf CLK_TCK)

awk -v b="$FLOOD" -v w="$((w1 - w0))" -v ns="$((t1 - t0))" -v c="$((cpu1 - cpu0))" -v hz="$hz" 'BEGIN {
	s = ns / 1e9
	printf "flood %.0f MB in %.2f s (from fleet create, agent start included)\n", b / 1e6, s
	printf "agent output consumed: %.0f MB/s\n", b / 1e6 / s
	printf "daemon wrote:          %.0f MB/s (%.0f MB: agent.log + gzip archives)\n", w / 1e6 / s, w / 1e6
	printf "fleetd CPU:            %.0f%% of one core (%.2f s CPU)\n", 100 * c / hz / s, c / hz
}'
# Let the last gzip jobs finish before listing.
ctl agent stop bench/agent-1 >/dev/null
echo "log dir:"
ls -l "$TMP/state/fleets/bench/agent-1/logs" | tail -n +2
