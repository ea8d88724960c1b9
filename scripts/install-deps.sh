#!/usr/bin/env bash
# Installs the Debian 12 packages stepflow-lb needs. Idempotent; asks apt only when something
# is missing. Profiles: build (compile only), run (build + the example workers), test (default:
# build and run every test), bench (test + HAProxy, nginx, wrk for bench/), image (podman and
# mmdebstrap for scripts/image.sh; part of test, which builds and runs the image), fuzz (build +
# clang, libFuzzer and the sanitizer runtimes for bench/fuzz.sh).
set -euo pipefail
profile="${1:-test}"

build=(g++ meson ninja-build pkg-config libevent-dev libnghttp2-dev libssl-dev libsimdjson-dev
       prometheus-cpp-dev libcli11-dev libprotobuf-dev protobuf-compiler)
run=(python3)
test=(catch2 python3 python3-yaml curl nghttp2-client openssl prometheus procps iproute2 util-linux)
image=(podman runc mmdebstrap uidmap)
bench=(haproxy nginx wrk nghttp2-client valgrind libbenchmark-dev linux-perf)
fuzz=(clang-16 libfuzzer-16-dev libclang-rt-16-dev)
# The KEDA external scaler's test runs a real gRPC client (Debian's /usr/bin/python3 modules).
test+=(python3-grpcio python3-grpc-tools python3-protobuf)

case "$profile" in
  build) pkgs=("${build[@]}") ;;
  run) pkgs=("${build[@]}" "${run[@]}") ;;
  test) pkgs=("${build[@]}" "${run[@]}" "${test[@]}" "${image[@]}") ;;
  bench) pkgs=("${build[@]}" "${run[@]}" "${test[@]}" "${image[@]}" "${bench[@]}") ;;
  image) pkgs=("${image[@]}") ;;
  fuzz) pkgs=("${build[@]}" "${fuzz[@]}") ;;
  *) echo "usage: $0 [build|run|test|bench|image|fuzz]" >&2; exit 2 ;;
esac

missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# The MCP tests run the official TypeScript SDK: Node.js from Debian unless a node and npm are
# already there (e.g. NodeSource's, whose nodejs package bundles npm).
if [ "$profile" = test ] || [ "$profile" = bench ]; then
  { command -v node && command -v npm; } >/dev/null 2>&1 || missing+=(nodejs npm)
fi

if [ ${#missing[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  echo "installing: ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # Debian starts these daemons on install; the project only ever runs its own instances.
  for svc in nginx haproxy prometheus prometheus-node-exporter; do
    if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet "$svc" 2>/dev/null; then
      $sudo systemctl stop "$svc" || true
    fi
  done
fi

# The MCP SDK and the OpenTelemetry JS packages of the OTLP test receiver, exactly as their
# package-lock.json files pin them (npm ci: the lockfile or nothing).
if [ "$profile" = test ] || [ "$profile" = bench ]; then
  here="$(cd "$(dirname "$0")/.." && pwd)"
  for dir in tests/mcp tests/otlp; do
    lock="$here/$dir/package-lock.json" installed="$here/$dir/node_modules/.package-lock.json"
    if [ ! -f "$installed" ] || [ "$lock" -nt "$installed" ]; then
      echo "installing $dir (npm ci)" >&2
      npm ci --prefix "$here/$dir" --no-audit --no-fund --loglevel=error >/dev/null
    fi
  done
fi
