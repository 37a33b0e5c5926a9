#!/bin/sh
# walsync's container entrypoint: restore what the disk lost, then run the app
# as walsync's child, so that every commit is shipped within a second and the
# app's last write is shipped when it exits.
#
#   entrypoint.sh APP [ARGS...]
#
# WALSYNC_CONFIG  the walsync.toml to use (default /etc/walsync.toml)
# WALSYNC_BIN     the walsync binary (default: walsync on PATH)
#
# On a fresh volume every database in storage is restored to its configured
# path; databases whose file exists are left alone, and an empty storage (the
# very first deployment) is no error. Then `walsync watch --exec` starts the
# app once every database has been synced once, passes SIGINT/SIGTERM on to
# it, and exits with its status after a final sync.
set -eu

config="${WALSYNC_CONFIG:-/etc/walsync.toml}"
walsync="${WALSYNC_BIN:-walsync}"

if [ "$#" -eq 0 ]; then
    echo "usage: entrypoint.sh APP [ARGS...]" >&2
    exit 64
fi

"$walsync" restore-all --config "$config" --if-db-not-exists --if-replica-exists

# --exec takes one string and splits it like a shell: quote every argument.
command=""
for arg in "$@"; do
    # The trailing "." keeps the argument's own trailing newlines, which
    # command substitution would strip; it is taken off again below.
    quoted=$(printf '%s.' "$arg" | sed "s/'/'\\\\''/g")
    quoted=${quoted%.}
    command="$command '$quoted'"
done
exec "$walsync" watch --config "$config" --exec "$command"
