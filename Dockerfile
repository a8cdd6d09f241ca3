# syntax=docker/dockerfile:1

# invalidator as a container image: the release binary on debian:bookworm-slim, running as the
# unprivileged uid 10001. Build with `docker build -t invalidator .` (BuildKit, the default in
# current Docker). See deploy/README.md for how docker-compose.yml, Kubernetes and systemd use it.

# Build stage: the release binary, from the committed Cargo.lock (--locked). Only what the build
# reads is copied (Cargo.toml, Cargo.lock, src/; .dockerignore keeps the context to those), so an
# edit of the README, the tests or the rules does not invalidate this layer. Cargo does not need
# the [[test]] and [[bench]] files the manifest names to build the binary.
FROM rust:1-bookworm AS builder
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
# The registry and target caches survive between builds (BuildKit); the binary is copied out of
# the cache mount before the step ends. `install -s` strips its symbol table (about 3 of 13 MB):
# a panic still prints its message and source location, a backtrace no function names.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin invalidator \
    && install -s -m 0755 target/release/invalidator /usr/local/bin/invalidator

# Runtime stage: the binary, CA roots for rediss:// and TLS to Postgres, and nothing else. The
# same Debian release as the builder, so the binary finds the glibc it was linked against.
# bookworm-slim rather than a distroless base: its bash is what docker-compose.yml's healthcheck
# speaks HTTP with (no curl or wget here), and a shell helps when debugging a live container;
# a distroless/cc base would be smaller and need no change but that healthcheck.
FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*
RUN groupadd --system --gid 10001 invalidator \
    && useradd --system --uid 10001 --gid invalidator --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin invalidator
COPY --from=builder /usr/local/bin/invalidator /usr/local/bin/invalidator

LABEL org.opencontainers.image.title="invalidator" \
      org.opencontainers.image.description="Deletes Redis keys when committed Postgres changes make them stale"

# No configuration is baked in: mount it at /etc/invalidator/invalidator.toml and the rules at
# /etc/invalidator/rules (docker-compose.yml, deploy/kubernetes/), or give every setting as an
# INVALIDATOR_* variable and override the command without --config. Set
# INVALIDATOR_HTTP_LISTEN=0.0.0.0:9187 (the default, 127.0.0.1, is unreachable from outside the
# container). With the working directory beside the config, its relative `path = "rules"` finds
# the rules either way it may be resolved. Nothing is written: the root filesystem can be
# read-only.
WORKDIR /etc/invalidator
# Numeric, so Kubernetes' runAsNonRoot can verify it.
USER 10001:10001
# /metrics, /healthz, /readyz (when INVALIDATOR_HTTP_LISTEN or [http] listen says so).
EXPOSE 9187
# No HEALTHCHECK: the port is configurable and the image has no HTTP client, Kubernetes ignores
# HEALTHCHECK in favour of its probes, and docker-compose.yml declares its own. invalidator is
# PID 1 and handles SIGTERM itself (finish the batch in flight, acknowledge, exit 0), so no init
# process is needed; give it a stop timeout of 30 s.
ENTRYPOINT ["invalidator"]
CMD ["run", "--config", "/etc/invalidator/invalidator.toml"]
