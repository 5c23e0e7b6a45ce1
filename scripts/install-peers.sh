#!/usr/bin/env bash
# Installs the peer supervisors fleet-bench compares fleetd with, into a cache directory
# outside the repo: supervisord (pip into a venv) and PM2 (npm), both pinned. Idempotent: a
# working install is recognised and nothing is downloaded. s6 is not installed here: the bench
# uses it only when its Debian package (`apt-get install s6`) is already present.
#
# Usage: scripts/install-peers.sh [supervisord] [pm2]   (default: both)
#        scripts/install-peers.sh --print               only print the paths (exit 1 if missing)
# Env:   FLEET_PEERS_HOME  install prefix (default $HOME/.cache/fleet-commander/peers)
# Output: one line per peer, SUPERVISORD_BIN=<path> / SUPERVISORCTL_BIN=<path> / PM2_BIN=<path>.
set -euo pipefail

SUPERVISOR_VERSION="4.3.0"
PM2_VERSION="7.0.4"

PREFIX="${FLEET_PEERS_HOME:-${HOME:?HOME is not set}/.cache/fleet-commander/peers}"
VENV="$PREFIX/venv"
SUPERVISORD_BIN="$VENV/bin/supervisord"
SUPERVISORCTL_BIN="$VENV/bin/supervisorctl"
PM2_DIR="$PREFIX/pm2"
PM2_BIN="$PM2_DIR/node_modules/.bin/pm2"

die() { echo "install-peers: $*" >&2; exit 1; }
say() { echo "install-peers: $*" >&2; }

supervisord_ok() {
    [[ -x "$SUPERVISORD_BIN" && -x "$SUPERVISORCTL_BIN" ]] || return 1
    [[ "$("$SUPERVISORD_BIN" --version 2>/dev/null)" == "$SUPERVISOR_VERSION" ]]
}

pm2_ok() {
    [[ -x "$PM2_BIN" ]] || return 1
    # The version from the installed package.json: any pm2 command, even `--version`, starts a
    # PM2 daemon that outlives this script.
    local v
    v="$(sed -n 's/^ *"version": *"\([^"]*\)".*/\1/p' "$PM2_DIR/node_modules/pm2/package.json" 2>/dev/null | head -n1)"
    [[ "$v" == "$PM2_VERSION" ]]
}

install_supervisord() {
    if supervisord_ok; then say "supervisord $SUPERVISOR_VERSION already installed"; return; fi
    command -v python3 >/dev/null || die "python3 not found: needed for supervisord"
    say "installing supervisor==$SUPERVISOR_VERSION into $VENV"
    mkdir -p "$PREFIX"
    python3 -m venv "$VENV" || die "python3 -m venv $VENV failed"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check "supervisor==$SUPERVISOR_VERSION" \
        || die "pip install supervisor==$SUPERVISOR_VERSION failed"
    supervisord_ok || die "supervisord at $SUPERVISORD_BIN does not report version $SUPERVISOR_VERSION"
}

install_pm2() {
    if pm2_ok; then say "pm2 $PM2_VERSION already installed"; return; fi
    command -v npm >/dev/null || die "npm not found: needed for pm2"
    say "installing pm2@$PM2_VERSION into $PM2_DIR"
    mkdir -p "$PM2_DIR"
    npm install --silent --no-audit --no-fund --prefix "$PM2_DIR" "pm2@$PM2_VERSION" >&2 \
        || die "npm install pm2@$PM2_VERSION failed"
    pm2_ok || die "pm2 at $PM2_BIN does not report version $PM2_VERSION"
}

print_paths() {
    local want="$1" missing=0
    if [[ "$want" == *supervisord* ]]; then
        if supervisord_ok; then
            echo "SUPERVISORD_BIN=$SUPERVISORD_BIN"
            echo "SUPERVISORCTL_BIN=$SUPERVISORCTL_BIN"
        else missing=1; fi
    fi
    if [[ "$want" == *pm2* ]]; then
        if pm2_ok; then echo "PM2_BIN=$PM2_BIN"; else missing=1; fi
    fi
    return $missing
}

main() {
    local print=0 peers=()
    for a in "$@"; do
        case "$a" in
            --print) print=1 ;;
            supervisord|pm2) peers+=("$a") ;;
            -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
            *) die "unknown argument $a (expected supervisord, pm2 or --print)" ;;
        esac
    done
    [[ ${#peers[@]} -gt 0 ]] || peers=(supervisord pm2)
    if [[ $print -eq 1 ]]; then
        print_paths "${peers[*]}"
        exit $?
    fi
    for p in "${peers[@]}"; do
        case "$p" in
            supervisord) install_supervisord ;;
            pm2) install_pm2 ;;
        esac
    done
    print_paths "${peers[*]}"
}

main "$@"
