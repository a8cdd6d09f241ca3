# syntax=docker/dockerfile:1

# Build stage: the release binary, from the committed Cargo.lock (--locked).
FROM rust:1-bookworm AS builder
WORKDIR /src
COPY . .
# The registry and target caches survive between builds (BuildKit); the binary is copied out of
# the cache mount before the step ends.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked \
    && install -m 0755 target/release/invalidator /usr/local/bin/invalidator

# Runtime stage: the binary, CA roots for rediss:// and TLS to Postgres, and nothing else.
FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*
RUN groupadd --system --gid 10001 invalidator \
    && useradd --system --uid 10001 --gid invalidator --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin invalidator
COPY --from=builder /usr/local/bin/invalidator /usr/local/bin/invalidator

# Mount the configuration at /etc/invalidator/invalidator.toml and the rules at
# /etc/invalidator/rules (see docker-compose.yml). With the working directory beside the
# config, its relative `path = "rules"` finds them either way it may be resolved.
WORKDIR /etc/invalidator
# Numeric, so Kubernetes' runAsNonRoot can verify it.
USER 10001:10001
EXPOSE 9187
ENTRYPOINT ["invalidator"]
CMD ["run", "--config", "/etc/invalidator/invalidator.toml"]
