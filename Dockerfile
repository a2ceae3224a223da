# The Lockstep server, its push worker and its dashboard (one image, three binaries). Built by docker-compose.yml; not built on the development
# machine (it has no Docker engine), so keep it to plain, well-known steps.
FROM rust:1.95-bookworm AS build
# rdkafka builds its bundled librdkafka with make, gcc and g++ (no cmake), with TLS
# (and SASL PLAIN/SCRAM) against OpenSSL.
RUN apt-get update && apt-get install -y --no-install-recommends make gcc g++ pkg-config libssl-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin lockstep --bin lockstep-push --bin lockstep-dashboard

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates libssl3 && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /var/lib/lockstep --create-home lockstep \
    && install -d -o lockstep -m 0700 /var/lib/lockstep-push
COPY --from=build /src/target/release/lockstep /src/target/release/lockstep-push /src/target/release/lockstep-dashboard /usr/local/bin/
USER lockstep
ENV LOCKSTEP_LISTEN=0.0.0.0:50051 \
    LOCKSTEP_DATA_DIR=/var/lib/lockstep
VOLUME ["/var/lib/lockstep"]
EXPOSE 50051
ENTRYPOINT ["/usr/local/bin/lockstep"]
