#!/usr/bin/env bash
# Installs, builds, starts three example workers and stepflow-lb in front of them (static
# discovery), and prints how to send a request. Ctrl-C stops everything it started.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh run
scripts/build.sh build

LISTEN="${LISTEN:-127.0.0.1:8080}"
ADMIN="${ADMIN:-127.0.0.1:9090}"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

backends=()
for i in 1 2 3; do
  port=$((8000 + i))
  python3 tests/worker/example_worker.py --host 127.0.0.1 --port "$port" --name "worker-$i" >/dev/null &
  pids+=($!)
  backends+=("127.0.0.1:$port")
done

host="${LISTEN%:*}"; port="${LISTEN##*:}"; ahost="${ADMIN%:*}"; aport="${ADMIN##*:}"
./build/stepflow-lb --listen "$LISTEN" --admin-listen "$ADMIN" --backends "$(IFS=,; echo "${backends[*]}")" \
  --log-format text "$@" &
lb=$!
pids+=($lb)

# Say "try it" only once a request would be routed at once: /ready names the healthy instances
# (it answers 200 before any, since requests then wait for the first one; see docs/autoscaling.md).
python3 - "$ahost" "$aport" "$lb" <<'PY' || exit 1
import json, os, sys, time, urllib.request
host, port, lb = sys.argv[1], sys.argv[2], int(sys.argv[3])
deadline = time.time() + 30
while time.time() < deadline:
    try:
        os.kill(lb, 0)
    except OSError:
        sys.exit("stepflow-lb exited during start-up (its log is above)")
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/ready", timeout=1) as r:
            healthy = json.load(r)["healthyInstances"]
        if healthy > 0:
            print(f"ready: {healthy} healthy instances")
            sys.exit(0)
    except OSError:
        pass
    time.sleep(0.2)
sys.exit(f"no instance became healthy within 30 s: see http://{host}:{port}/debug/backends")
PY
cat <<MSG

stepflow-lb is running on http://$LISTEN with workers ${backends[*]}. Try:

  curl -s http://$host:$port/ -H 'Content-Type: application/json' \\
    -d '{"jsonrpc":"2.0","id":1,"method":"components/execute","params":{"component":"/echo","input":{"hello":"world"}}}'

  # a component that streams Server-Sent Events:
  curl -sN http://$host:$port/ -H 'Content-Type: application/json' -H 'Accept: application/json, text/event-stream' \\
    -d '{"jsonrpc":"2.0","id":2,"method":"components/execute","params":{"component":"/stream","input":{"events":5,"interval_ms":300}}}'

  curl -s http://$ahost:$aport/debug/backends     # instances, states, in-flight
  curl -s http://$ahost:$aport/metrics            # Prometheus

Ctrl-C stops the balancer and the workers.

MSG
wait "$lb"
