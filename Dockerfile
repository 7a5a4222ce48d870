# kvstore container image: a release build in a Rust builder, copied alone into a distroless
# runtime (glibc, CA certificates, no shell, no package manager) running as a non-root UID.
#
#   docker build --build-arg VERSION=0.1.0 --build-arg REVISION=$(git rev-parse --short=12 HEAD) -t kvstore:dev .
#   (or: just image)

# A pinned toolchain (the one the tests run with), so that two builds of one commit compile
# alike; Dependabot proposes the next one. bookworm, as the runtime's Debian 12 glibc needs.
FROM rust:1.95-bookworm AS builder
WORKDIR /build

# 1. Dependencies only, in their own layer: this layer is rebuilt only when Cargo.toml,
#    Cargo.lock or build.rs change, not on every source edit. A stub crate with the same
#    targets stands in for the real sources.
COPY Cargo.toml Cargo.lock build.rs ./
RUN mkdir src \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs \
    && cargo build --release --locked \
    && rm -rf src

# 2. The service. sql/ (migrations) and openapi.json are embedded at compile time.
COPY sql ./sql
COPY openapi.json ./
COPY src ./src

# Version and revision shown by `/`, `kvstore --version` and the kvstore_build_info metric
# (build.rs reads them at compile time; unset = Cargo.toml version / "unknown").
ARG VERSION=""
ARG REVISION=""
# touch: COPY keeps the sources' modification times, which can be older than the stub
# build above, and cargo would then keep the stub binary.
RUN touch src/main.rs src/lib.rs \
    && if [ -n "$VERSION" ]; then export KVSTORE_VERSION="$VERSION"; fi \
    && if [ -n "$REVISION" ]; then export KVSTORE_REVISION="$REVISION"; fi \
    && cargo build --release --locked --bin kvstore \
    && ./target/release/kvstore --version


# The runtime: only the binary. CA certificates come with the distroless base.
FROM gcr.io/distroless/cc-debian12:nonroot

ARG VERSION=""
ARG REVISION=""
LABEL org.opencontainers.image.title="kvstore" \
      org.opencontainers.image.description="A key/value REST service for Kubernetes: warp + moka cache in front of MySQL" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/kvstore/kvstore" \
      org.opencontainers.image.url="https://github.com/kvstore/kvstore" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.base.name="gcr.io/distroless/cc-debian12:nonroot"

COPY --from=builder /build/target/release/kvstore /usr/local/bin/kvstore

# 65532 is distroless's "nonroot"; numeric so that Kubernetes' runAsNonRoot can verify it.
USER 65532:65532

# 8080: the API, /healthz, /readyz; 9090: /metrics.
EXPOSE 8080 9090

# No HEALTHCHECK: the image has no shell or curl to run one, and Kubernetes ignores
# HEALTHCHECK anyway; the Deployment's httpGet probes on /healthz and /readyz do that job.
# checkov:skip=CKV_DOCKER_2:No shell or HTTP client in distroless to run a HEALTHCHECK; Kubernetes ignores it and probes /healthz and /readyz itself

ENTRYPOINT ["/usr/local/bin/kvstore"]
CMD ["serve"]
