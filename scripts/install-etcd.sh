#!/usr/bin/env bash
# Makes etcd available for cluster mode (tests/cluster.rs, scripts/cluster-demo.sh), from
# Debian's own `etcd-server` package: the etcd on PATH if there is one, else the .deb fetched
# with `apt-get download` and unpacked (no install, no service started) into a cache
# directory. Also makes sure `protoc` is there: the etcd client crate compiles etcd's
# protobuf definitions when fleet-commander builds (Debian's `protobuf-compiler`, installed
# with apt-get as root; without root it says what to install). Idempotent.
#
# Usage: scripts/install-etcd.sh
# Env:    FLEET_ETCD_HOME   unpack prefix (default /opt/fleet-commander/etcd for root, else
#                           $HOME/.cache/fleet-commander/etcd)
# Output: the last line is ETCD_BIN=<path>.
set -euo pipefail

say() { echo "install-etcd: $*" >&2; }
die() { echo "install-etcd: $*" >&2; exit 1; }

if ! command -v protoc >/dev/null 2>&1; then
    if [[ "$(id -u)" == "0" ]] && command -v apt-get >/dev/null 2>&1; then
        say "installing Debian's protobuf-compiler (protoc, for the etcd client's build)"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q protobuf-compiler >&2 \
            || { apt-get update -q >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q protobuf-compiler >&2; } \
            || die "apt-get install protobuf-compiler failed (see above)"
    else
        die "protoc is missing (the etcd client's build needs it): install Debian's protobuf-compiler (sudo apt-get install protobuf-compiler) or set PROTOC"
    fi
fi

works() { "$1" --version >/dev/null 2>&1; }

if command -v etcd >/dev/null 2>&1 && works "$(command -v etcd)"; then
    echo "ETCD_BIN=$(command -v etcd)"
    exit 0
fi
if [[ "$(id -u)" == "0" ]]; then
    DEFAULT_PREFIX="/opt/fleet-commander/etcd"
else
    DEFAULT_PREFIX="${HOME:?HOME is not set}/.cache/fleet-commander/etcd"
fi
PREFIX="${FLEET_ETCD_HOME:-$DEFAULT_PREFIX}"
BIN="$PREFIX/usr/bin/etcd"
if [[ -x "$BIN" ]] && works "$BIN"; then
    echo "ETCD_BIN=$BIN"
    exit 0
fi
command -v apt-get >/dev/null 2>&1 || die "no etcd on PATH and no apt-get to fetch Debian's etcd-server package"
mkdir -p "$PREFIX"
STAGE="$(mktemp -d "$PREFIX/.staging.XXXXXX")"
trap 'rm -rf "$STAGE"' EXIT
say "fetching Debian's etcd-server package into $PREFIX"
(cd "$STAGE" && { apt-get download etcd-server >&2 || { apt-get update -q >&2 && apt-get download etcd-server >&2; }; }) \
    || die "apt-get download etcd-server failed (see above)"
deb="$(ls "$STAGE"/etcd-server_*.deb 2>/dev/null | head -1)"
[[ -n "$deb" ]] || die "apt-get download left no etcd-server_*.deb"
dpkg-deb -x "$deb" "$STAGE/root" || die "dpkg-deb -x $deb failed"
[[ -x "$STAGE/root/usr/bin/etcd" ]] || die "the package holds no usr/bin/etcd"
works "$STAGE/root/usr/bin/etcd" || die "the unpacked etcd does not run"
rm -rf "$PREFIX/usr"
mv "$STAGE/root/usr" "$PREFIX/usr"
chmod -R a+rX "$PREFIX"
say "done: $("$BIN" --version 2>&1 | head -1)"
echo "ETCD_BIN=$BIN"
