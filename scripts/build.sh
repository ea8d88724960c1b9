#!/usr/bin/env bash
# Configures (once) and builds stepflow-lb into BUILD_DIR (default: build).
# Extra meson options go in MESON_ARGS, e.g. MESON_ARGS="-Db_sanitize=address,undefined".
# Quiet when it works; on failure shows the end of meson's or ninja's output (compiler errors).
set -euo pipefail
cd "$(dirname "$0")/.."
dir="${1:-build}"
run_quiet() {
  local out
  out="$(mktemp)"
  if ! "$@" >"$out" 2>&1; then
    tail -n 80 "$out" >&2
    rm -f "$out"
    echo "build failed: $*" >&2
    exit 1
  fi
  rm -f "$out"
}
if [ ! -f "$dir/build.ninja" ]; then
  # shellcheck disable=SC2086
  run_quiet meson setup "$dir" ${MESON_ARGS:-}
elif [ -n "${MESON_ARGS:-}" ]; then
  # shellcheck disable=SC2086
  run_quiet meson configure "$dir" ${MESON_ARGS}
fi
run_quiet ninja -C "$dir"
echo "built $dir/stepflow-lb" >&2
