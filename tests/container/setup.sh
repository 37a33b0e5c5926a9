#!/usr/bin/env bash
# Make rootful podman usable on this CI machine (Debian bookworm, root, hybrid
# cgroup v1, no container registry reachable) and build a local base image
# with python3 + CA certificates. Idempotent: each step is skipped when done.
#
#   tests/container/setup.sh          # then: tests/container/e2e.sh
#
# BASE_IMAGE  tag of the base image (default localhost/walsync-base:bookworm)
# MIRROR      Debian mirror for debootstrap (default: the first URIs of the
#             host's apt sources, else http://deb.debian.org/debian)
set -euo pipefail

BASE_IMAGE=${BASE_IMAGE:-localhost/walsync-base:bookworm}
CONF=/etc/containers/containers.conf.d/50-walsync-ci.conf

step() { printf '[setup %4ds] %s\n' "$SECONDS" "$*"; }

# 1. Packages. Rootful podman needs no uidmap/slirp4netns/fuse-overlayfs.
#    runc satisfies podman's "crun | runc", so crun is not pulled in.
if ! command -v podman >/dev/null || ! command -v runc >/dev/null || ! command -v debootstrap >/dev/null; then
    step "apt-get install podman runc debootstrap"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        podman runc debootstrap >/dev/null
fi

# 2. containers.conf (a drop-in, so the system file stays as it is):
#    - runtime = "runc": crun (if ever installed) refuses this host's hybrid cgroups;
#    - default_ulimits = []: podman otherwise raises RLIMIT_NOFILE for root
#      containers past this sandbox's hard limit, and runc fails with
#      "error setting rlimit type 7: operation not permitted".
if [ ! -f "$CONF" ]; then
    step "write $CONF"
    mkdir -p "$(dirname "$CONF")"
    cat >"$CONF" <<'EOF'
[containers]
default_ulimits = []

[engine]
runtime = "runc"
EOF
fi

# 3. Base image: a minbase bookworm with python3 (sqlite3 module included) and
#    ca-certificates, apt caches and docs dropped (~120 MB).
if ! podman image exists "$BASE_IMAGE"; then
    if [ -z "${MIRROR:-}" ]; then
        MIRROR=$(sed -n 's/^URIs: *\([^ ]*\).*/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null | grep -v security | head -1)
        MIRROR=${MIRROR:-http://deb.debian.org/debian}
    fi
    rootfs=$(mktemp -d /var/tmp/walsync-rootfs.XXXXXX)
    trap 'rm -rf "$rootfs"' EXIT
    step "debootstrap bookworm from $MIRROR"
    debootstrap --variant=minbase --include=python3,ca-certificates \
        bookworm "$rootfs" "$MIRROR" >"$rootfs.log" 2>&1 \
        || { tail -30 "$rootfs.log"; exit 1; }
    rm -f "$rootfs.log"
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
        "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/locale/* \
        "$rootfs"/var/log/*.log "$rootfs"/var/cache/debconf/*-old
    step "podman import $BASE_IMAGE"
    tar -C "$rootfs" -c . | podman import -q --change 'CMD ["/bin/bash"]' - "$BASE_IMAGE" >/dev/null
    rm -rf "$rootfs"
    trap - EXIT
fi

step "check"
podman run --rm --network=host "$BASE_IMAGE" \
    python3 -c 'import sqlite3, ssl; print("base image ok: sqlite", sqlite3.sqlite_version)'
