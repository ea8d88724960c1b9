#!/usr/bin/env bash
# Installs what the tests need, builds, runs every test, and ends with "N passed, N failed".
# SANITIZE=1 builds and tests with AddressSanitizer and UndefinedBehaviorSanitizer instead.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh test
if [ "${SANITIZE:-0}" = 1 ]; then
  dir=build-asan
  MESON_ARGS="-Db_sanitize=address,undefined -Db_lundef=false -Dbuildtype=debug ${MESON_ARGS:-}" scripts/build.sh "$dir"
  export ASAN_OPTIONS="detect_leaks=1:abort_on_error=1" UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
else
  dir=build
  scripts/build.sh "$dir"
fi
ulimit -n 20000 2>/dev/null || true
status=0
meson test -C "$dir" --print-errorlogs --num-processes 2 "$@" >"$dir/meson-test.out" 2>&1 || status=$?
tail -n 40 "$dir/meson-test.out"
python3 scripts/summarize-tests.py "$dir/meson-logs/testlog.json"
exit $status
