#!/usr/bin/env bash
# Configures (once) and builds stepflow-lb into BUILD_DIR (default: build).
# Extra meson options go in MESON_ARGS, e.g. MESON_ARGS="-Db_sanitize=address,undefined".
set -euo pipefail
cd "$(dirname "$0")/.."
dir="${1:-build}"
if [ ! -f "$dir/build.ninja" ]; then
  # shellcheck disable=SC2086
  meson setup "$dir" ${MESON_ARGS:-} >/dev/null
elif [ -n "${MESON_ARGS:-}" ]; then
  # shellcheck disable=SC2086
  meson configure "$dir" ${MESON_ARGS} >/dev/null
fi
ninja -C "$dir" >/dev/null
echo "built $dir/stepflow-lb" >&2
