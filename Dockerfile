# walsync as a container sidecar: build a static-enough binary, ship it in a
# small Debian image with the entrypoint that restores, then runs the app.
#
#   docker build -t walsync .
#   docker run -v data:/data -v ./walsync.toml:/etc/walsync.toml:ro \
#       -e AWS_ACCESS_KEY_ID -e AWS_SECRET_ACCESS_KEY walsync your-app --flags
#
# To put your app in the same image, start FROM this one (or copy
# /usr/local/bin/walsync and /usr/local/bin/walsync-entrypoint into yours),
# and COPY your walsync.toml to /etc/walsync.toml.

FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY .cargo .cargo
COPY src src
RUN cargo build --release --locked --bin walsync \
 && strip target/release/walsync

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /data --create-home walsync
COPY --from=build /src/target/release/walsync /usr/local/bin/walsync
COPY deploy/entrypoint.sh /usr/local/bin/walsync-entrypoint
USER walsync
WORKDIR /data
VOLUME /data
ENV WALSYNC_CONFIG=/etc/walsync.toml
ENTRYPOINT ["/usr/local/bin/walsync-entrypoint"]
