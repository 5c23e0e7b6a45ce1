#!/usr/bin/env bash
# Makes an nginx binary available for the webhook front-door tests (tests/webhooks.rs), from
# Debian's own package: the nginx on PATH if there is one, else Debian's `nginx` .deb fetched
# with `apt-get download` and unpacked (no install, no service started) into a cache
# directory. Idempotent.
#
# Usage: scripts/install-nginx.sh
# Env:    FLEET_NGINX_HOME   unpack prefix (default /opt/fleet-commander/nginx for root, else
#                            $HOME/.cache/fleet-commander/nginx)
# Output: the last line is NGINX_BIN=<path>.
set -euo pipefail

say() { echo "install-nginx: $*" >&2; }
die() { echo "install-nginx: $*" >&2; exit 1; }

works() { "$1" -v >/dev/null 2>&1; }

if command -v nginx >/dev/null 2>&1 && works "$(command -v nginx)"; then
    echo "NGINX_BIN=$(command -v nginx)"
    exit 0
fi
if [[ "$(id -u)" == "0" ]]; then
    DEFAULT_PREFIX="/opt/fleet-commander/nginx"
else
    DEFAULT_PREFIX="${HOME:?HOME is not set}/.cache/fleet-commander/nginx"
fi
PREFIX="${FLEET_NGINX_HOME:-$DEFAULT_PREFIX}"
BIN="$PREFIX/usr/sbin/nginx"
if [[ -x "$BIN" ]] && works "$BIN"; then
    echo "NGINX_BIN=$BIN"
    exit 0
fi
command -v apt-get >/dev/null 2>&1 || die "no nginx on PATH and no apt-get to fetch Debian's package"
mkdir -p "$PREFIX"
STAGE="$(mktemp -d "$PREFIX/.staging.XXXXXX")"
trap 'rm -rf "$STAGE"' EXIT
say "fetching Debian's nginx package into $PREFIX"
# apt-get download writes into the current directory, as the calling user.
(cd "$STAGE" && apt-get download nginx >&2) || die "apt-get download nginx failed (see above)"
deb="$(ls "$STAGE"/nginx_*.deb 2>/dev/null | head -1)"
[[ -n "$deb" ]] || die "apt-get download left no nginx_*.deb"
dpkg-deb -x "$deb" "$STAGE/root" || die "dpkg-deb -x $deb failed"
[[ -x "$STAGE/root/usr/sbin/nginx" ]] || die "the package holds no usr/sbin/nginx"
works "$STAGE/root/usr/sbin/nginx" || die "the unpacked nginx does not run (missing libraries?)"
rm -rf "$PREFIX/usr"
mv "$STAGE/root/usr" "$PREFIX/usr"
chmod -R a+rX "$PREFIX"
say "done: $("$BIN" -v 2>&1)"
echo "NGINX_BIN=$BIN"
