# Sourced by scripts/test.sh and scripts/demo.sh.
#
# searchable_by_others DIR: true when every directory from / down to DIR lets other users
# search it. As root, fleetd runs each agent under a uid of its own (isolation = "uid"), and
# that uid must reach its HOME and the program it runs: a checkout inside a `mktemp -d` or
# /root hides both.
searchable_by_others() {
    local d
    d="$(cd "$1" && pwd -P)" || return 1
    while [[ "$d" != "/" ]]; do
        (( 0$(stat -c %a "$d") & 01 )) || return 1
        d="$(dirname "$d")"
    done
}

# outside_checkout NAME: a directory for NAME under /var/tmp, 0755, unique to this checkout.
outside_checkout() {
    local dir
    dir="/var/tmp/fleet-commander-$1-$(pwd -P | sha256sum | cut -c1-12)"
    mkdir -p -m 0755 "$dir"
    chmod 0755 "$dir"
    echo "$dir"
}
