#!/usr/bin/env bash
# Runs every benchmark in turn (about 15 minutes) and gathers the latest tables into
# .bench-out/summary.md. Each part can also be run alone: see docs/benchmarks.md.
#   bench/all.sh
set -uo pipefail
cd "$(dirname "$0")/.."
mkdir -p .bench-out
status=0
bench/route.sh || status=1
python3 bench/rps.py || status=1
python3 bench/h2.py || status=1
python3 bench/sse.py || status=1
bench/discovery.sh ${STEPFLOW_LB:+--lb "$STEPFLOW_LB"} > .bench-out/discovery.txt 2>&1 || status=1
{ echo '### Discovery (bench/discovery.sh)'; echo; echo '```'; cat .bench-out/discovery.txt; echo '```'; } \
  > .bench-out/discovery-latest.md
{
  echo "# stepflow-lb benchmarks, $(date -u +%Y-%m-%dT%H:%MZ), commit ${STEPFLOW_LB_REV:-$(git log -1 --format=%h)}"
  for part in route rps h2 sse discovery; do
    [ -f ".bench-out/$part-latest.md" ] && { echo; cat ".bench-out/$part-latest.md"; }
  done
} > .bench-out/summary.md
cat .bench-out/summary.md
exit $status
