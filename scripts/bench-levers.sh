#!/usr/bin/env bash
# The density levers of docs/bench.md, one after the other: one talking tenant per run (a
# message every 10 s for MINUTES, default 4), each lever over the lean profile. Figures in
# $OUT/<lever>.txt and .json (default OUT=/tmp/fleet-levers). Needs the release build and
# FLEET_OPENCLAW_BIN (scripts/install-openclaw.sh --print).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
B=target/release/fleet-bench
[[ -x $B ]] || { echo "bench-levers: build first: cargo build --release" >&2; exit 1; }
: "${FLEET_OPENCLAW_BIN:?set it: eval \"\$(scripts/install-openclaw.sh --print)\" or export it}"
export FLEET_OPENCLAW_BIN
OUT=${OUT:-/tmp/fleet-levers}
MINUTES=${MINUTES:-4}
mkdir -p "$OUT"
run() {
    local name=$1
    shift
    echo "bench-levers: $name ($(date -u +%H:%MZ))" >&2
    "$B" --real 1 --talk 6 --minutes "$MINUTES" --json-out "$OUT/$name.json" "$@" \
        > "$OUT/$name.txt" 2> "$OUT/$name.err" || echo "bench-levers: $name failed" >&2
    cat "$OUT/$name.txt"
}
run baseline
run jitless --node-options="--max-old-space-size=384 --max-semi-space-size=1 --jitless"
run optsize --node-flags="--optimize-for-size"
run optsize-stgc --node-flags="--optimize-for-size --single-threaded-gc"
run lite --node-flags="--lite-mode"
run heap320 --node-options="--max-old-space-size=320 --max-semi-space-size=1"
run semi16 --node-options="--max-old-space-size=384 --max-semi-space-size=16"
run heap512 --node-options="--max-old-space-size=512 --max-semi-space-size=1"
