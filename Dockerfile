# stepflow-lb container image.
#
#   scripts/image.sh              # docker or podman; makes the Debian base if no registry answers
#   docker build -t stepflow-lb:local .   # BuildKit (docker's default since 23.0)
#
# The builder stage runs exactly the scripts that the README and CI run
# (scripts/install-deps.sh, then scripts/build.sh). The runtime stage starts
# from nothing and holds only what scripts/image-rootfs.sh assembled: the
# stripped binary, the shared libraries it loads (found by ldd) and the
# dynamic loader, the CA bundle, /etc/passwd and /etc/group for UID 1000, and
# /etc/nsswitch.conf. No shell, no package manager (docs/container.md).

# The builder's base; scripts/image.sh passes a locally made one
# (mmdebstrap --variant=minbase bookworm) where no registry can be reached.
ARG BASE=debian:bookworm

############################ builder ############################
FROM ${BASE} AS builder

ARG DEBIAN_FRONTEND=noninteractive
WORKDIR /src

# The toolchain and -dev packages first, from install-deps.sh alone, so that
# this layer stays cached while the sources change. ca-certificates is the CA
# bundle the runtime stage copies; ccache (which meson picks up) keeps a
# recompile after a source change short, through the cache mount below.
COPY scripts/install-deps.sh scripts/
RUN bash scripts/install-deps.sh build \
 && apt-get install -y -qq --no-install-recommends ca-certificates ccache >/dev/null \
 && rm -rf /var/lib/apt/lists/*

# Only what the build reads, so that a change to docs/ or tests/ reuses the
# compiled layer below.
COPY meson.build meson_options.txt ./
COPY core/ core/
COPY proxy/ proxy/
COPY discovery/ discovery/
COPY scripts/build.sh scripts/image-rootfs.sh scripts/

# build.sh appends $MESON_ARGS to `meson setup`; the image needs no tests.
# image-rootfs.sh fails the build, not the first pod start, if the
# assembled tree lacks a library (it runs the loader's --list and the
# binary's --help inside that tree).
# The build directory is dropped: only /rootfs goes on.
ENV MESON_ARGS="-Dtests=false -Dbuildtype=release" CCACHE_DIR=/root/.cache/ccache
RUN --mount=type=cache,target=/root/.cache/ccache \
    bash scripts/build.sh build \
 && bash scripts/image-rootfs.sh build/stepflow-lb /rootfs \
 && rm -rf build

############################ runtime ############################
FROM scratch AS runtime

COPY --from=builder /rootfs/ /

# Numeric so that Kubernetes can verify runAsNonRoot without a runAsUser;
# UID 1000 is the `stepflow` user in /etc/passwd.
USER 1000:1000

# 8080: proxied traffic (BIND_ADDRESS); 9090: admin — /health, /ready,
# /metrics, /debug/backends (METRICS_ADDRESS).
EXPOSE 8080 9090

ENTRYPOINT ["/usr/local/bin/stepflow-lb"]
