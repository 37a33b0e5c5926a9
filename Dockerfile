# walsync as a container sidecar: build a static-enough binary, ship it in a
# small Debian image with the entrypoint that restores, then runs the app.
#
#   docker build -t walsync .
#   docker run -v data:/data -v ./walsync.toml:/etc/walsync.toml:ro \
#       -e AWS_ACCESS_KEY_ID -e AWS_SECRET_ACCESS_KEY walsync your-app --flags
#
# With a binary built beforehand (no Rust image, no network if BASE is local
# and already has CA certificates):
#
#   cargo build --release --locked --bin walsync
#   docker build --target prebuilt -t walsync .
#   podman build --target prebuilt --build-arg BASE=localhost/walsync-base:bookworm -t walsync .
#
# WALSYNC_BIN names the binary inside the build context (default
# target/release/walsync, as cargo leaves it). BuildKit (Docker's default
# builder) and podman skip the stages a target does not need; the legacy
# builder (DOCKER_BUILDKIT=0) runs them all, and then the default build too
# needs that binary in the context.
#
# To put your app in the same image, start FROM this one (or copy
# /usr/local/bin/walsync and /usr/local/bin/walsync-entrypoint into yours),
# and COPY your walsync.toml to /etc/walsync.toml.

ARG BASE=debian:bookworm-slim
ARG RUST_IMAGE=rust:1-bookworm

# What both final images share: CA certificates (installed only if BASE lacks
# them, so that a local base needs no package mirror) and the walsync user.
FROM ${BASE} AS runtime
RUN if [ ! -s /etc/ssl/certs/ca-certificates.crt ]; then \
        apt-get update \
     && apt-get install -y --no-install-recommends ca-certificates \
     && rm -rf /var/lib/apt/lists/*; \
    fi \
 && useradd --system --uid 10001 --home-dir /data --create-home walsync
COPY deploy/entrypoint.sh /usr/local/bin/walsync-entrypoint
WORKDIR /data
VOLUME /data
ENV WALSYNC_CONFIG=/etc/walsync.toml
ENTRYPOINT ["/usr/local/bin/walsync-entrypoint"]

# --target prebuilt: the binary comes from the build context. This stage
# stands before the Rust stage so that builders without stage skipping
# (older buildah/podman) never reach it.
FROM runtime AS prebuilt
ARG WALSYNC_BIN=target/release/walsync
COPY ${WALSYNC_BIN} /usr/local/bin/walsync
USER walsync

FROM ${RUST_IMAGE} AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY .cargo .cargo
COPY src src
RUN cargo build --release --locked --bin walsync \
 && strip target/release/walsync

# The default (last) stage: built from source, as before.
FROM runtime
COPY --from=build /src/target/release/walsync /usr/local/bin/walsync
USER walsync
