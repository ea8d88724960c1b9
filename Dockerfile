# stepflow-lb container image.
#
#   docker build -t stepflow-lb:local .
#
# The builder stage runs exactly the scripts that the README and CI run
# (scripts/install-deps.sh, then scripts/build.sh), so CI, which has no
# container engine, still exercises every build step this image takes.
# The runtime stage carries only the shared libraries the binary links
# against and the binary itself.

############################ builder ############################
FROM debian:bookworm AS builder

ARG DEBIAN_FRONTEND=noninteractive
WORKDIR /src

# Install the toolchain and -dev packages first, from the scripts alone, so
# that this layer stays cached while only the sources change.
COPY scripts/ scripts/
RUN bash scripts/install-deps.sh build \
 && rm -rf /var/lib/apt/lists/*

COPY . .

# build.sh appends $MESON_ARGS to `meson setup`; the image needs no tests.
ENV MESON_ARGS="-Dtests=false -Dbuildtype=release"
RUN bash scripts/build.sh build \
 && install -D -m 0755 build/stepflow-lb /out/stepflow-lb

############################ runtime ############################
FROM debian:bookworm-slim AS runtime

ARG DEBIAN_FRONTEND=noninteractive

# Runtime libraries only: libevent (core, OpenSSL and pthreads glue),
# nghttp2, OpenSSL 3, simdjson, prometheus-cpp, and the CA bundle for TLS to
# the Kubernetes API.
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      ca-certificates \
      libevent-2.1-7 \
      libevent-openssl-2.1-7 \
      libevent-pthreads-2.1-7 \
      libnghttp2-14 \
      libprometheus-cpp-core1.0 \
      libsimdjson14 \
      libssl3 \
 && rm -rf /var/lib/apt/lists/*

# The unprivileged user the balancer runs as (the manifests pin runAsUser 1000).
RUN groupadd --system --gid 1000 stepflow \
 && useradd --system --uid 1000 --gid 1000 --no-create-home \
      --home-dir /nonexistent --shell /usr/sbin/nologin stepflow

COPY --from=builder /out/stepflow-lb /usr/local/bin/stepflow-lb

# Fail the image build, not the first pod start, if the package list above
# misses a shared library the binary was linked against.
RUN if ldd /usr/local/bin/stepflow-lb | grep 'not found'; then \
      echo 'stepflow-lb: a shared library is missing from the runtime stage (see the lines above)' >&2; \
      exit 1; \
    fi

# Numeric so that Kubernetes can verify runAsNonRoot without a runAsUser;
# UID 1000 is the `stepflow` user created above.
USER 1000:1000

# 8080: proxied traffic (BIND_ADDRESS); 9090: admin — /health, /ready,
# /metrics, /debug/backends (METRICS_ADDRESS).
EXPOSE 8080 9090

ENTRYPOINT ["/usr/local/bin/stepflow-lb"]
