#!/usr/bin/env bash
# Cluster mode on one machine: a real etcd plus three fleetd nodes (n1, n2, n3) on loopback,
# a fleet of 12 stand-in agents (fleet-stub-agent) spread over them, and the REPL of n1 on
# this terminal. Every command acts cluster-wide from any node: try `status` (the NODE
# column), `node list`, `node drain n3`, `node uncordon n3`, `agent stop demo/agent-1`,
# `fleet create more --agents 6 --command <stub>`; from another terminal SIGKILL a node
# (the pids are printed) and watch its agents come back on the others within TTL + a few s.
# The nodes share $STATE/handover (--handover-dir): a drained agent's HOME moves with it,
# and each node archives its agents there live every 60 s (--snapshot-every), so a SIGKILLed
# node's agents come back with their HOMEs as of then.
# `shutdown` stops n1 (EOF leaves it serving its socket, as fleetd does); the script then
# stops the rest and etcd.
#
# State lives in target/cluster-demo (under /var/tmp as root in a checkout other users cannot
# search); `rm -rf` it to forget. Ports: etcd 52479/52480, agents 36000-38999.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

out="$(scripts/install-etcd.sh)" || { echo "cluster-demo: scripts/install-etcd.sh failed (above)" >&2; exit 1; }
ETCD="$(sed -n 's/^ETCD_BIN=//p' <<<"$out")"
echo "cluster-demo: building fleetd (release)…" >&2
cargo build --release --quiet --bin fleetd --bin fleetctl --bin fleet-stub-agent
BIN="$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/release"

source scripts/lib/reachable.sh
STATE="$PWD/target/cluster-demo"
if [[ "$(id -u)" == "0" ]] && ! searchable_by_others .; then
    STATE="$(outside_checkout cluster-demo)"
fi
mkdir -p "$STATE" "$STATE/handover"
chmod 711 "$STATE"
chmod 700 "$STATE/handover"
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
}
trap cleanup EXIT

"$ETCD" --name demo --data-dir "$STATE/etcd" \
    --listen-client-urls http://127.0.0.1:52479 --advertise-client-urls http://127.0.0.1:52479 \
    --listen-peer-urls http://127.0.0.1:52480 --initial-advertise-peer-urls http://127.0.0.1:52480 \
    --initial-cluster demo=http://127.0.0.1:52480 >"$STATE/etcd.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 100); do
    (exec 3<>/dev/tcp/127.0.0.1/52479) 2>/dev/null && break
    sleep 0.1
done

node_args() {
    local n="$1" i="$2"
    echo --state-dir "$STATE/$n" --etcd http://127.0.0.1:52479 --node-name "$n" \
        --port-range "$((36000 + i * 1000))-$((36999 + i * 1000))" \
        --agent-uids "$((1800000 + i * 1000))-$((1800999 + i * 1000))" --cgroup off \
        --handover-dir "$STATE/handover" --snapshot-every 60
    # Off root there is no PID-namespace guardian to fence a frozen node: say so on purpose.
    [[ "$(id -u)" == "0" ]] || echo --unfenced
}
for i in 1 2; do
    n="n$((i + 1))"
    # shellcheck disable=SC2046
    "$BIN/fleetd" --no-repl $(node_args "$n" "$i") >"$STATE/$n.log" 2>&1 &
    pids+=($!)
    echo "cluster-demo: node $n is pid $! (log $STATE/$n.log)" >&2
done
(
    for _ in $(seq 1 200); do
        [[ -S "$STATE/n1/fleetd.sock" ]] && "$BIN/fleetctl" --socket "$STATE/n1/fleetd.sock" node list >/dev/null 2>&1 && break
        sleep 0.1
    done
    "$BIN/fleetctl" --socket "$STATE/n1/fleetd.sock" fleet create demo --agents 12 \
        --command "$BIN/fleet-stub-agent" --stride 1 >&2 || true
) &
echo "cluster-demo: node n1 (this REPL) is pid $$'s child; etcd at http://127.0.0.1:52479" >&2
# shellcheck disable=SC2046
"$BIN/fleetd" --repl $(node_args n1 0)
