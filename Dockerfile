# Build: docker build -t chatwoot-bridge .
# Run:   docker run --rm -v $PWD/bridge.yaml:/etc/chatwoot-bridge/bridge.yaml:ro \
#          -e CW_AGENT_TOKEN=... chatwoot-bridge run --config /etc/chatwoot-bridge/bridge.yaml
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
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/chatwoot-bridge"]
CMD ["run", "--config", "/etc/chatwoot-bridge/bridge.yaml"]
