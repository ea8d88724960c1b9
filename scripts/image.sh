#!/usr/bin/env bash
# Builds the container image (default tag stepflow-lb:local) from the Dockerfile with docker if
# its daemon answers, else with podman (installed through `scripts/install-deps.sh image`).
# The builder stage's base is debian:bookworm when the engine has it or can pull it; where no
# registry can be reached it is made here with `mmdebstrap --variant=minbase bookworm`, imported
# as localhost/stepflow-lb-base:bookworm-<key>, and cached (the tarball in $STEPFLOW_LB_CACHE,
# the image in the engine's store). A cached base older than STEPFLOW_LB_BASE_MAX_AGE_DAYS (7),
# or made from another recipe (the key), is made again. See docs/container.md.
#
#   scripts/image.sh [TAG]
#
# Environment: STEPFLOW_LB_ENGINE=docker|podman (default: detect), STEPFLOW_LB_BASE=auto|local
# (local: never try a registry), STEPFLOW_LB_CACHE (default /var/cache/stepflow-lb as root,
# else ${XDG_CACHE_HOME:-~/.cache}/stepflow-lb). Prints the engine's name on the last line of
# stdout, for scripts (tests/image/test_image.py) that run the image afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
tag="${1:-stepflow-lb:local}"
say() { echo "image.sh: $*" >&2; }

engine="${STEPFLOW_LB_ENGINE:-}"
if [ -z "$engine" ]; then
  if command -v docker >/dev/null 2>&1 && timeout 20 docker info >/dev/null 2>&1; then
    engine=docker
  else
    engine=podman
  fi
fi
if [ "$engine" = podman ]; then
  scripts/install-deps.sh image
fi
command -v "$engine" >/dev/null 2>&1 || { say "$engine is not installed"; exit 1; }
if [ "$engine" = podman ] && [ "$(podman info --format '{{.Store.GraphDriverName}}' 2>/dev/null)" = vfs ]; then
  say "podman stores images with vfs here (rootless, no storage.conf): a warm build takes about a" \
      "minute, not seconds. With driver = \"overlay\" in ~/.config/containers/storage.conf" \
      "(kernel >= 5.13; then \`podman system reset\`) it takes seconds."
fi

# Engine flags. podman: runc, not crun (crun fails on hybrid cgroup v1/v2 hosts), and explicit
# ulimits (podman's defaults, e.g. nofile 1048576, are refused where the host's hard limits
# are lower): nofile at most this shell's hard limit, nproc small (the build runs a compiler).
flags=()
if [ "$engine" = podman ]; then
  command -v runc >/dev/null 2>&1 && flags+=(--runtime runc)
  nofile=$(ulimit -Hn)
  { [ "$nofile" = unlimited ] || [ "$nofile" -gt 65536 ]; } && nofile=65536
  flags+=(--ulimit "nofile=$nofile:$nofile" --ulimit nproc=4096:4096)
fi

have_image() { "$engine" image inspect "$1" >/dev/null 2>&1; }

# --- the builder's base ---------------------------------------------------------------------
suite=bookworm
arch=$(dpkg --print-architecture 2>/dev/null || echo amd64)
base=""
if [ "${STEPFLOW_LB_BASE:-auto}" = auto ]; then
  if have_image "debian:$suite"; then
    base="debian:$suite"
  elif timeout 120 "$engine" pull -q "docker.io/library/debian:$suite" >/dev/null 2>&1; then
    base="docker.io/library/debian:$suite"
  fi
fi
if [ -z "$base" ]; then
  scripts/install-deps.sh image  # mmdebstrap (docker users may not have it yet)
  if [ "$(id -u)" -eq 0 ]; then
    cache="${STEPFLOW_LB_CACHE:-/var/cache/stepflow-lb}"
  else
    cache="${STEPFLOW_LB_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/stepflow-lb}"
  fi
  mkdir -p "$cache"
  # The key names the recipe: change any part of it and the cache is made again.
  recipe="mmdebstrap --variant=minbase $suite arch=$arch $(mmdebstrap --version 2>/dev/null)"
  key=$(printf '%s' "$recipe" | sha256sum | cut -c1-12)
  base="localhost/stepflow-lb-base:$suite-$key"
  tarball="$cache/$suite-minbase-$arch-$key.tar"
  max_age_min=$(( ${STEPFLOW_LB_BASE_MAX_AGE_DAYS:-7} * 24 * 60 ))
  # One builder of the cache at a time (the test and a user may run this at once).
  exec 9>"$cache/lock"
  flock 9
  if [ -f "$tarball" ] && [ -n "$(find "$tarball" -mmin "+$max_age_min")" ]; then
    say "cached base $tarball is older than ${STEPFLOW_LB_BASE_MAX_AGE_DAYS:-7} days: making it again"
    rm -f "$tarball"
    "$engine" image rm "$base" >/dev/null 2>&1 || true
  fi
  if [ ! -f "$tarball" ]; then
    say "no registry answered: making the $suite base with mmdebstrap (about a minute)"
    rm -f "$cache/$suite-minbase-$arch-"*.tar  # older recipes
    mmdebstrap --quiet --format=tar --variant=minbase --architectures="$arch" "$suite" "$tarball.part"
    mv "$tarball.part" "$tarball"
    "$engine" image rm "$base" >/dev/null 2>&1 || true
  fi
  if ! have_image "$base"; then
    "$engine" import --change "LABEL org.stepflow-lb.base-recipe=$key" "$tarball" "$base" >/dev/null
    say "imported $tarball as $base"
  fi
  exec 9>&-
fi

# --- the image --------------------------------------------------------------------------------
build=("$engine" build --network host --build-arg "BASE=$base" -t "$tag" -f Dockerfile)
if [ "$engine" = podman ]; then
  # --pull=never: the base is local by now; chroot isolation needs no OCI runtime for RUN.
  build+=(--pull=never --isolation chroot --layers "${flags[@]}")
fi
say "building $tag with $engine on $base"
start=$(date +%s)
"${build[@]}" . >&2
size=$("$engine" image inspect --format '{{.Size}}' "$tag")
say "built $tag in $(( $(date +%s) - start )) s: $(( size / 1000000 )) MB"
echo "$engine"
