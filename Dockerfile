# Build: docker build -t sluice .
# The debug info stays in the build stage (target/release/sluice.debug, linked from the
# binary by its debuglink): `docker build --target build` to get it for a crash dump.
FROM rust:1-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends cmake libssl-dev pkg-config libclang-dev librocksdb-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# Debian's RocksDB, linked rather than built (the crate's own build takes ~25 minutes).
ENV ROCKSDB_LIB_DIR=/usr/lib/x86_64-linux-gnu
# Dependencies in a layer of their own: it is rebuilt only when Cargo.toml or
# Cargo.lock change, not on every edit of the sources. The stubs stand in for the
# targets the manifest declares.
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src benches tests/it \
    && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
    && for b in checkpoint cluster e2e enrich hot_path latency state window; do echo 'fn main() {}' > "benches/$b.rs"; done \
    && touch tests/it/main.rs \
    && cargo build --release --locked --features rocksdb,s3 --bin sluice \
    && rm -rf src benches tests
COPY src src
COPY docs docs
COPY benches benches
COPY tests tests
RUN touch src/main.rs src/lib.rs \
    && cargo build --release --locked --features rocksdb,s3 --bin sluice \
    && objcopy --only-keep-debug target/release/sluice target/release/sluice.debug \
    && objcopy --strip-debug --strip-unneeded --add-gnu-debuglink=target/release/sluice.debug target/release/sluice

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends libssl3 ca-certificates librocksdb7.8 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 sluice \
    && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/sluice --create-home sluice
COPY --from=build /src/target/release/sluice /usr/local/bin/sluice
COPY config /etc/sluice
COPY migrations /usr/share/sluice/migrations
# A fixed numeric user: Kubernetes' runAsNonRoot can check it, volumes can be owned by it.
USER 10001:10001
WORKDIR /var/lib/sluice
# No ENV for config keys: an environment override would silently win over the file's
# `metrics.listen` (the shipped container configs listen on 0.0.0.0 themselves).
EXPOSE 9464
# sluice answers its own health check: no curl in the image.
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 CMD ["sluice", "health"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["sluice"]
CMD ["run", "--config", "/etc/sluice/docker.toml"]
