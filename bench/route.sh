#!/usr/bin/env bash
# Micro-benchmarks (Google Benchmark). `route` (default): the routing decision, pinned and
# least-load on fleets of 10, 100, 1,000 and 5,000 instances. `session`: what --session-header adds
# per request (table lookup/remember at 1k..1M sessions, seal/unseal). Builds build-bench/ (release,
# -Dbenchmarks=true) if needed, runs pinned to one core, prints median (min..max) of 5 repetitions
# and writes .bench-out/<name>-*.{json,md}.
#   bench/route.sh [route|session] [extra Google Benchmark flags]
set -euo pipefail
cd "$(dirname "$0")/.."
build=${BENCH_BUILD_DIR:-build-bench}
[ -f "$build/build.ninja" ] || meson setup "$build" -Dbuildtype=release -Dtests=false -Dbenchmarks=true >/dev/null
name=route
case "${1:-}" in route|session) name=$1; shift ;; esac
ninja -C "$build" "bench/$name-bench" >/dev/null
mkdir -p .bench-out
stamp=$(date +%Y%m%d-%H%M%S)
json=.bench-out/$name-$stamp.json
taskset -c "${BENCH_PROXY_CPU:-0}" "$build/bench/$name-bench" --benchmark_repetitions=5 \
  --benchmark_min_time=0.3 --benchmark_out="$json" --benchmark_out_format=json "$@" >/dev/null 2>".bench-out/$name-$stamp.log"
python3 - "$json" ".bench-out/$name-$stamp.md" "$name" <<'PY'
import json, statistics, sys
bench = sys.argv[3]
runs, sizes = {}, {}
for b in json.load(open(sys.argv[1]))["benchmarks"]:
    if b.get("run_type") == "iteration":
        if "bytes_per_session" in b:  # a memory figure, not a time
            sizes.setdefault(b["run_name"], []).append(b["bytes_per_session"])
            continue
        runs.setdefault(b["run_name"], []).append(b["cpu_time"])
if bench == "route":
    rows = ["| benchmark | instances | ns per decision, median (min..max) | target at 1,000 (≤ 200 ns) |",
            "|---|---|---|---|"]
else:
    rows = ["| benchmark | sessions | ns per operation, median (min..max) | |", "|---|---|---|---|"]
for name, ts in runs.items():
    fn, n = name.rsplit("/", 1) if "/" in name else (name, "-")
    target = ""
    if n == "1000" and fn in ("BM_RoutePinned", "BM_RouteLeastLoad"):
        target = "met" if statistics.median(ts) <= 200 else "NOT met"
    rows.append(f"| {fn[3:]} | {n} | {statistics.median(ts):.1f} ({min(ts):.1f}..{max(ts):.1f}) | {target} |")
if sizes:
    rows += ["", "| table | sessions | heap bytes per session (36-byte id) |", "|---|---|---|"]
    for name, bs in sizes.items():
        fn, n = name.split("/")[:2]
        rows.append(f"| {fn[3:]} | {n} | {statistics.median(bs):.1f} |")
title = "Routing decision" if bench == "route" else "Session lookup and sealing"
text = f"### {title} (Google Benchmark, 5 repetitions, one core)\n\n" + "\n".join(rows)
print(text)
open(sys.argv[2], "w").write(text + "\n")
open(sys.argv[2].rsplit("/", 1)[0] + f"/{bench}-latest.md", "w").write(text + "\n")
PY
