# Build: docker build -t chatwoot-bridge .
# Run:   docker run --rm -v $PWD/bridge.yaml:/etc/chatwoot-bridge/bridge.yaml:ro \
#          -v $PWD/secrets:/run/secrets:ro -p 127.0.0.1:9464:9464 \
#          chatwoot-bridge run --config /etc/chatwoot-bridge/bridge.yaml
# (bridge.yaml names each secret file with a `*_file` key; deploy/compose.yaml is a whole setup.)
FROM rust:1-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends cmake pkg-config && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked && strip target/release/chatwoot-bridge

FROM debian:bookworm-slim
# librdkafka (inside the binary) links the system libcurl, OpenSSL and zlib dynamically.
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates libcurl4 libssl3 zlib1g && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /var/lib/chatwoot-bridge && chown 65532:65532 /var/lib/chatwoot-bridge
COPY --from=build /src/target/release/chatwoot-bridge /usr/local/bin/chatwoot-bridge
USER 65532:65532
# The allocator is built without huge-page advice; this also keeps huge pages off where the
# host's transparent_hugepage is `always` (2 MiB pages zeroed as the heap grows, a larger RSS).
ENV MIMALLOC_ALLOW_THP=0
WORKDIR /var/lib/chatwoot-bridge
# The admin endpoint, when the config has `admin: { listen: "0.0.0.0:9464" }`: /metrics, the
# probes, /status.
EXPOSE 9464
# /healthz through the binary itself (the image has no curl): unhealthy when a sink loop or the
# ingest died, or when nothing answers on CHATWOOT_BRIDGE_ADMIN (127.0.0.1:9464 unless set), so a
# config without `admin:` shows as unhealthy. The start period covers opening a large spool.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["/usr/local/bin/chatwoot-bridge", "healthcheck", "--path", "/healthz"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/chatwoot-bridge"]
CMD ["run", "--config", "/etc/chatwoot-bridge/bridge.yaml"]
