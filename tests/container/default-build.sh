#!/usr/bin/env bash
# The Dockerfile's default target (built from source in a Rust image), built
# and run here, where no registry is reachable: a local stand-in for
# rust:1-bookworm is made from the local base image, Debian's C toolchain
# and this machine's Rust toolchain; then the image is built from the
# repository and put through tests/container/e2e.sh. Not in .ci/run (about
# 7 minutes of both cores; the prebuilt e2e covers the same runtime image):
# run it when the Dockerfile, .dockerignore, Cargo.lock or .cargo/ change.
#
#   tests/container/setup.sh && tests/container/default-build.sh    (as root)
set -euo pipefail

REPO=$(cd "$(dirname "$0")/../.." && pwd)
BASE_IMAGE=${BASE_IMAGE:-localhost/walsync-base:bookworm}
RUST_IMAGE=${RUST_IMAGE:-localhost/rust:bookworm}
IMAGE=localhost/walsync-default:test
TOOLCHAIN=${TOOLCHAIN:-$(rustc --print sysroot)}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/walsync-default.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

if ! podman image exists "$RUST_IMAGE"; then
    mkdir -p "$WORK/ctx/toolchain/bin" "$WORK/ctx/toolchain/lib"
    cp -a "$TOOLCHAIN/bin/cargo" "$TOOLCHAIN/bin/rustc" "$WORK/ctx/toolchain/bin/"
    cp -a "$TOOLCHAIN/lib/." "$WORK/ctx/toolchain/lib/"
    # The host's CA bundle: where egress goes through a TLS-inspecting
    # proxy (this sandbox's does), cargo needs it to reach crates.io.
    cp /etc/ssl/certs/ca-certificates.crt "$WORK/ctx/ca-certificates.crt"
    cat >"$WORK/ctx/Containerfile" <<'CF'
ARG BASE
FROM ${BASE}
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        gcc libc6-dev binutils pkg-config make \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb
COPY ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
COPY toolchain/ /usr/local/
ENV CARGO_HOME=/usr/local/cargo PATH=/usr/local/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
RUN cargo --version && cc --version | head -1
CF
    podman build --network=host --build-arg "BASE=$BASE_IMAGE" -t "$RUST_IMAGE" "$WORK/ctx"
fi

time podman build --network=host \
    --build-arg "RUST_IMAGE=$RUST_IMAGE" --build-arg "BASE=$BASE_IMAGE" \
    -f "$REPO/Dockerfile" --ignorefile "$REPO/.dockerignore" -t "$IMAGE" "$REPO"
podman run --rm --entrypoint /usr/local/bin/walsync "$IMAGE" --version
USE_IMAGE=$IMAGE "$REPO/tests/container/e2e.sh"
