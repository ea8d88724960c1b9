#!/usr/bin/env python3
"""Scale from zero: the time from the first request at an empty fleet to its answer, split into
its parts, and a burst of calls arriving at zero (docs/autoscaling.md).

The balancer watches the Kubernetes API stand-in (tests/k8s/fake_apiserver.py) with an empty
worker Service and serves KEDA's external scaler. A real gRPC client (/usr/bin/python3 with
python3-grpcio) holds StreamIsActive open, as KEDA's external-push trigger does. When it sees
`true`, the bench plays KEDA and the kubelet: it starts an example worker and publishes its ready
endpoint ("pod ready", simulated: a local process start, not a real pod's scheduling and image
pull). Reported per run, from the first request's send:

  wake-up signal      StreamIsActive pushed true
  pod ready (sim.)    worker started and its endpoint published
  first health check  the balancer logged the instance as discovered (routable)
  dispatch            the held request answered

Then the burst: N calls sent at once at zero, all held, all answered once the fleet is up.

  bench/cold_start.py [--runs 5] [--burst 200] [--workers 2]
"""
import argparse
import concurrent.futures
import datetime
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(REPO, "tests", "integration"))
sys.path.insert(0, os.path.join(REPO, "tests", "k8s"))

import harness  # noqa: E402
import test_autoscaling as A  # noqa: E402
from fake_apiserver import FakeApiServer, endpoint  # noqa: E402


def log_time(record):
    return datetime.datetime.strptime(record["time"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(
        tzinfo=datetime.timezone.utc).timestamp()


def one_run(burst, workers, service):
    api = FakeApiServer().start()
    started = []
    try:
        api.put_slice(service, [], port=9)
        lb = A.balancer(api, extra=["--access-log", "off", "--cold-start-timeout", "60s"])
        harness.wait_for(lambda: lb.ready()[0] == 200, 10, "ready")
        stream = A.Stream(lb)
        stream.wait_for("open", timeout=30)
        stream.wait_for("active false", timeout=30)
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, burst))
        t0 = time.time()
        futures = [pool.submit(lb.execute, "/echo", {"i": i}, None, "call-%d" % i, 90) for i in range(burst)]
        stream.wait_for("active true", timeout=30)
        t_wake = time.time()
        pods = []
        for i in range(workers):
            w = harness.Worker("cold%d" % i, max_concurrency=8)
            started.append(w)
            pods.append(w)
        # One slice per pod: each example worker listens on its own port.
        for i, w in enumerate(pods):
            api.put_slice("%s-%d" % (service, i), [endpoint("127.0.0.1", "pod-%d" % i)], port=w.port,
                          service=service)
        t_ready = time.time()
        results = [f.result() for f in futures]
        t_done = time.time()
        discovered = [log_time(r) for r in lb.logs("instance discovered")]
        t_check = min(discovered) if discovered else float("nan")
        ok = sum(1 for r in results if r.status == 200)
        stream.close()
        lb.proc.kill()
        lb.proc.wait()
        return {"wake": t_wake - t0, "pod": t_ready - t_wake, "check": t_check - t_ready,
                "dispatch": t_done - t_check, "total": t_done - t0, "ok": ok, "n": burst}
    finally:
        for w in started:
            w.kill()
        api.stop()


def ms(xs):
    return "p50 %6.1f ms  max %6.1f ms" % (statistics.median(xs) * 1000, max(xs) * 1000)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--burst", type=int, default=200)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    singles = [one_run(1, 1, "workers") for _ in range(args.runs)]
    print("cold start, one request at zero (%d runs):" % args.runs)
    for key, label in (("wake", "wake-up signal"), ("pod", "pod ready (simulated)"),
                       ("check", "first health check"), ("dispatch", "dispatch"), ("total", "total")):
        print("  %-22s %s" % (label, ms([r[key] for r in singles])))
    print("  answered: %d of %d" % (sum(r["ok"] for r in singles), len(singles)))
    burst = one_run(args.burst, args.workers, "workers")
    print("burst of %d calls at zero, %d workers: %d answered 200, %d failed; first answer path: wake %.1f ms, "
          "pod %.1f ms, check %.1f ms; all answered %.1f ms after the first was sent"
          % (burst["n"], args.workers, burst["ok"], burst["n"] - burst["ok"], burst["wake"] * 1000,
             burst["pod"] * 1000, burst["check"] * 1000, burst["total"] * 1000))
    return 0 if all(r["ok"] == r["n"] for r in singles + [burst]) else 1


if __name__ == "__main__":
    sys.exit(main())
