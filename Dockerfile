# Build: docker build -t sluice .
FROM rust:1-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends cmake libssl-dev pkg-config \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src src
COPY benches benches
COPY tests tests
RUN cargo build --release --locked --bin sluice

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends libssl3 ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --home /var/lib/sluice --create-home sluice
COPY --from=build /src/target/release/sluice /usr/local/bin/sluice
COPY config /etc/sluice
COPY migrations /usr/share/sluice/migrations
USER sluice
WORKDIR /var/lib/sluice
EXPOSE 9464
ENTRYPOINT ["sluice"]
CMD ["run", "--config", "/etc/sluice/docker.toml"]
