#!/usr/bin/env bash
# Discovery latency: EndpointSlice change -> routing change, median and p99.
# The measurement itself belongs to the discovery work; this entry point runs whichever
# bench/discovery_* script it provides (Python or executable), passing the arguments on.
#   bench/discovery.sh [args]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
for f in "$here"/discovery_*; do
  [ -e "$f" ] || continue
  case "$f" in
    *.py) exec python3 "$f" "$@" ;;
    *) [ -x "$f" ] && exec "$f" "$@" ;;
  esac
done
echo "discovery benchmark: not available yet (expects bench/discovery_*.py from the discovery work)" >&2
exit 0
