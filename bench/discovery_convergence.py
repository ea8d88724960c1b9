#!/usr/bin/env python3
"""Discovery benchmark: how fast an EndpointSlice change reaches routing, and how hard the
balancer knocks on an API server that is down.

Convergence: the real stepflow-lb watches the API stand-in (tests/k8s/fake_apiserver.py, TLS +
token) with two example workers as pods. Each round flips pod B between ready and neither ready
nor serving with one slice write, and times from just before the write to the first request whose
routing reflects it. The probe is a request pinned to B's instance: while B serves, the worker
itself answers it; once B is not serving, the balancer answers 503 without contacting it. Probes
go back to back on a keep-alive connection, so the figure includes one probe round trip.

Outage: for --outage seconds the stand-in resets every connection (an unreachable API); the
number of connection attempts shows the backoff. Then the same with every request answered 503.

    python3 bench/discovery_convergence.py [--lb build/stepflow-lb] [--rounds 100] [--outage 10]
"""

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "k8s"))
sys.path.insert(0, os.path.join(ROOT, "tests", "integration"))

import harness  # noqa: E402
from fake_apiserver import FakeApiServer, endpoint  # noqa: E402

client = harness.client


def percentile(values, p):
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100.0 * (len(s) - 1))))]


def convergence(api, rounds):
    a = harness.Worker("a", extra=["--host", "127.0.0.2"])
    b = harness.Worker("b", extra=["--host", "127.0.0.3", "--port", str(a.port)])
    port = a.port

    def write(b_ready):
        api.put_slice("workers-a", [endpoint("127.0.0.2", "pod-a"),
                                    endpoint("127.0.0.3", "pod-b", ready=b_ready, serving=b_ready,
                                             terminating=False)], port=port)

    write(True)
    lb = harness.Balancer(args=api.balancer_args(extra=["--access-log", "off"]),
                          wait_ready=False)
    lb.wait_healthy(2)
    b_id = lb.backend("127.0.0.3:%d" % port)["instanceId"]
    conn = client.HttpConnection("127.0.0.1", lb.port, timeout=10)
    probe = b'{"jsonrpc":"2.0","id":"probe","result":{}}'
    headers = {"Content-Type": "application/json", "Stepflow-Instance-Id": b_id}

    def routed_to_b():
        r = conn.request("POST", "/", probe, headers)
        return r.status != 503

    samples = {"not-serving": [], "ready": []}
    for i in range(rounds):
        for b_ready, name in ((False, "not-serving"), (True, "ready")):
            t0 = time.perf_counter()
            write(b_ready)
            deadline = t0 + 10
            while routed_to_b() != b_ready:
                if time.perf_counter() > deadline:
                    raise RuntimeError("no convergence within 10 s")
            samples[name].append((time.perf_counter() - t0) * 1000)
    conn.close()
    lb.stop()
    return samples


def outage(api, seconds, mode):
    a = harness.Worker("a")
    api.put_slice("workers-o", [endpoint("127.0.0.1", "pod-o")], port=a.port, service="outage")
    lb = harness.Balancer(args=api.balancer_args(service="outage", extra=["--access-log", "off"]), wait_ready=False)
    lb.wait_healthy(1)
    since = time.monotonic()
    api.set_outage(mode)
    served = failed = 0
    while time.monotonic() - since < seconds:
        try:
            ok = lb.execute("/echo", {}).status == 200
        except OSError:
            ok = False
        served += ok
        failed += not ok
        time.sleep(0.005)  # a steady trickle, not a connection storm
    api.set_outage(None)
    calls = api.count("refused", since=since) + api.count("list", since=since) + api.count("watch", since=since)
    with api.cond:
        times = [r["time"] - since for r in api.requests if r["time"] >= since]
    lb.stop()
    return calls, served, failed, times


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lb", default=os.path.join(ROOT, "build", "stepflow-lb"))
    ap.add_argument("--rounds", type=int, default=100)
    ap.add_argument("--outage", type=float, default=10.0)
    args = ap.parse_args()
    os.environ["STEPFLOW_LB_BIN"] = os.path.abspath(args.lb)

    api = FakeApiServer().start()
    samples = convergence(api, args.rounds)
    print("convergence: EndpointSlice write at the API -> first request routed accordingly (ms)")
    for name, values in samples.items():
        print("  B -> %-12s n=%d  median %.2f  p99 %.2f  max %.2f" % (
            name, len(values), statistics.median(values), percentile(values, 99), max(values)))
    both = samples["not-serving"] + samples["ready"]
    print("  all             n=%d  median %.2f  p99 %.2f" % (len(both), statistics.median(both), percentile(both, 99)))
    harness._kill_all()

    for mode, label in (("refuse", "connections reset"), (503, "every request answered 503")):
        api2 = FakeApiServer().start()
        calls, served, failed, times = outage(api2, args.outage, mode)
        print("API outage of %.0f s (%s): %d API calls, at +%s s; requests meanwhile: %d routed, %d failed" % (
            args.outage, label, calls, ", ".join("%.2f" % t for t in times), served, failed))
        harness._kill_all()
        api2.stop()
    api.stop()


if __name__ == "__main__":
    main()
