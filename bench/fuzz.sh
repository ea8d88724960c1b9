#!/usr/bin/env bash
# Builds the libFuzzer targets (build-fuzz/: clang-16, ASan + UBSan, -Dfuzz=true) and runs each
# for SECONDS (default 60) on one core, starting from its corpus in fuzz/corpus/<target>/. New
# interesting inputs go to build-fuzz/fuzz-out/<target>/ (not the repository: minimize and copy
# the worthwhile ones by hand, see docs/fuzzing.md); crashes to build-fuzz/fuzz-out/crash-*.
# Usage: bench/fuzz.sh [seconds-per-target] [target...]
set -uo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-60}"
shift || true
scripts/install-deps.sh fuzz
dir=build-fuzz
if [ ! -f "$dir/build.ninja" ]; then
  CC=clang-16 CXX=clang++-16 meson setup "$dir" -Dfuzz=true -Dtests=false -Db_sanitize=address,undefined \
    -Db_lundef=false -Dbuildtype=debugoptimized >/dev/null || exit 1
fi
ninja -C "$dir" >/dev/null || { ninja -C "$dir"; exit 1; }

targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  for f in "$dir"/fuzz/fuzz-*; do [ -x "$f" ] && [ -f "$f" ] && targets+=("${f##*/fuzz-}"); done
fi
export ASAN_OPTIONS="detect_leaks=1:abort_on_error=1:allocator_may_return_null=1"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
out="$dir/fuzz-out"
mkdir -p "$out"
printf '%-20s %12s %10s %8s\n' target executions exec/s crashes
total_crashes=0
for t in "${targets[@]}"; do
  mkdir -p "$out/$t"
  log="$out/$t.log"
  "$dir/fuzz/fuzz-$t" "$out/$t" "fuzz/corpus/$t" -max_total_time="$seconds" -jobs=1 -workers=1 \
    -max_len=65536 -timeout=10 -rss_limit_mb=2048 -artifact_prefix="$out/crash-$t-" -print_final_stats=1 \
    >"$log" 2>&1
  # -jobs=1 writes the run's output to fuzz-0.log in the current directory.
  [ -f fuzz-0.log ] && mv fuzz-0.log "$log"
  execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1)
  rate=$(grep -o 'stat::average_exec_per_sec: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1)
  crashes=$(find "$out" -maxdepth 1 -name "crash-$t-*" | wc -l)
  total_crashes=$((total_crashes + crashes))
  printf '%-20s %12s %10s %8s\n' "$t" "${execs:-?}" "${rate:-?}" "$crashes"
done
echo "crashes: $total_crashes (inputs in $out/crash-*, logs in $out/<target>.log)"
[ "$total_crashes" -eq 0 ]
