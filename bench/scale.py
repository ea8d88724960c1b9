#!/usr/bin/env python3
"""Scale: stepflow-lb watching a fleet of N endpoints (default 5,000 in 50 EndpointSlices) served
by the API stand-in (tests/k8s/fake_apiserver.py, TLS + token), with every endpoint answering
/health from tests/k8s/health_fleet.py (one process, one loopback address per pod, 127.77.S.K).

  initial   balancer start -> all N known (list in pages: --page slices per page, limit/continue)
            and -> all N healthy (each endpoint's first /health passed).
  rounds    each round changes 10 % of the endpoints (in every slice a tenth turns not serving,
            one slice write each, delivered on the watch), then turns them back; time from the
            first write to the first request routed accordingly for the LAST endpoint changed
            (a request pinned to its instance answers 503 once it is not serving); the pool size
            then /debug/backends must show exactly the changed endpoints not serving, so all changes,
            not just the last, landed.
  cost      CPU seconds of the control thread (the main thread: discovery, health checks, admin)
            over the rounds and while idle with N endpoints probed; RSS of the balancer.

    python3 bench/scale.py [--endpoints 5000] [--slices 50] [--rounds 20] [--page 5]
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "k8s"))
sys.path.insert(0, os.path.join(ROOT, "tests", "integration"))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import harness  # noqa: E402
from fake_apiserver import FakeApiServer, endpoint  # noqa: E402
from health_fleet import address, instance_id  # noqa: E402

client = harness.client
CLK_TCK = os.sysconf("SC_CLK_TCK")


def percentile(values, p):
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100.0 * (len(s) - 1))))]


def thread_cpu(pid, tid):
    with open("/proc/%d/task/%d/stat" % (pid, tid)) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_kib(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def metric(lb, name):
    """One sample of /metrics (it lists every backend: with thousands it is big, so no 2 s limit)."""
    with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % lb.admin_port, timeout=60) as r:
        text = r.read().decode()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


def not_serving(lb):
    """(backends known, backends discovery reports not serving), from /debug/backends."""
    with urllib.request.urlopen("http://127.0.0.1:%d/debug/backends" % lb.admin_port, timeout=60) as r:
        backends = json.loads(r.read())["backends"]
    return len(backends), sum(1 for b in backends if b.get("serving") is False)


def raise_nofile(n):
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (n, max(n, hard)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(n, hard), hard))


class Fleet:
    """The health fleet process and the slices that list its pods."""

    def __init__(self, api, endpoints, slices):
        self.api, self.n, self.slices = api, endpoints, slices
        self.proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "k8s", "health_fleet.py"),
                                      "--count", str(endpoints), "--procs", str(max(1, endpoints // 1500))], stdout=subprocess.PIPE, text=True)
        harness._started.append(self.proc)
        line = self.proc.stdout.readline()
        if not line.startswith("port "):
            raise RuntimeError("health fleet did not start")
        self.port = int(line.split()[1])
        self.per_slice = endpoints // slices
        self.down = set()

    def members(self, s):
        return range(s * self.per_slice, (s + 1) * self.per_slice)

    def write(self, s):
        eps = [endpoint(address(i), "pod-%d" % i, ready=i not in self.down, serving=i not in self.down,
                        terminating=False) for i in self.members(s)]
        self.api.put_slice("workers-%03d" % s, eps, port=self.port)

    def write_all(self):
        for s in range(self.slices):
            self.write(s)


def run(lb_bin, endpoints, slices, rounds, page, idle_s):
    os.environ["STEPFLOW_LB_BIN"] = lb_bin
    raise_nofile(4 * endpoints + 4096)
    api = FakeApiServer().start()
    api.page_size = page
    fleet = Fleet(api, endpoints, slices)
    fleet.write_all()
    t0 = time.monotonic()
    lb = harness.Balancer(args=api.balancer_args(extra=["--access-log", "off", "--health-interval", "5s",
                                                        "--health-timeout", "2s"]), wait_ready=False)
    pid = lb.proc.pid
    known_at = healthy_at = None
    deadline = t0 + 300
    while healthy_at is None:
        if time.monotonic() > deadline:
            raise RuntimeError("no convergence within 300 s")
        known = metric(lb, "stepflow_lb_backends_known")
        pool = metric(lb, "stepflow_lb_backend_pool_size")
        now = time.monotonic()
        if known_at is None and known >= endpoints:
            known_at = now - t0
        if pool >= endpoints:
            healthy_at = now - t0
        time.sleep(0.2)
    res = {"endpoints": endpoints, "slices": slices, "list_requests": api.count("list"),
           "api_connections": api.connections, "known_s": known_at, "healthy_s": healthy_at,
           "rss_kib_converged": rss_kib(pid)}

    conn = client.HttpConnection("127.0.0.1", lb.port, timeout=10)
    probe = b'{"jsonrpc":"2.0","id":"probe","result":{}}'

    def routed(i):
        r = conn.request("POST", "/", probe, {"Content-Type": "application/json",
                                              "Stepflow-Instance-Id": instance_id(address(i))})
        return r.status != 503

    samples = {"not-serving": [], "ready": []}
    cpu0 = thread_cpu(pid, pid)
    for r in range(rounds):
        per = fleet.per_slice
        chosen = [s * per + (r * 7 + k) % per for s in range(slices) for k in range(per // 10)]
        last = chosen[-1]
        for down, name in ((True, "not-serving"), (False, "ready")):
            if down:
                fleet.down.update(chosen)
            else:
                fleet.down.difference_update(chosen)
            t = time.perf_counter()
            fleet.write_all()
            limit = t + 60
            while routed(last) == down:
                if time.perf_counter() > limit:
                    raise RuntimeError("round %d: no convergence within 60 s" % r)
            samples[name].append((time.perf_counter() - t) * 1000)
            # Every change landed, not just the last one (health is not the question here: on a
            # busy machine a check may time out, so the pool size is not compared).
            want = (endpoints, len(fleet.down))
            harness.wait_for(lambda: not_serving(lb) == want, 30, "%d known, %d not serving" % want)
    res["rounds_control_cpu_s"] = thread_cpu(pid, pid) - cpu0
    res["rounds"] = rounds
    res["changed_per_round"] = len(chosen)
    res["rss_kib_after_rounds"] = rss_kib(pid)
    conn.close()
    cpu0, t = thread_cpu(pid, pid), time.monotonic()
    time.sleep(idle_s)
    res["idle_control_cpu_pct"] = 100 * (thread_cpu(pid, pid) - cpu0) / (time.monotonic() - t)
    res["samples"] = samples
    lb.stop()
    harness._kill_all()
    api.stop()
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lb", default=os.path.join(ROOT, "build", "stepflow-lb"))
    ap.add_argument("--endpoints", type=int, default=5000)
    ap.add_argument("--slices", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--page", type=int, default=5, help="slices per list page (the server caps limit)")
    ap.add_argument("--idle", type=float, default=20.0, help="seconds of idle probing to measure")
    args = ap.parse_args()
    try:
        res = run(os.path.abspath(args.lb), args.endpoints, args.slices, args.rounds, args.page, args.idle)
    finally:
        harness._kill_all()
    with open("/proc/loadavg") as f:
        load = f.read().split()[0]
    print("scale: %d endpoints in %d slices, %d list pages on %d API connection(s); load average %s" % (
        res["endpoints"], res["slices"], res["list_requests"], res["api_connections"], load))
    print("  start -> all known %.2f s, all healthy %.2f s; RSS %.1f MiB" % (
        res["known_s"], res["healthy_s"], res["rss_kib_converged"] / 1024))
    both = []
    for name, values in res["samples"].items():
        both += values
        print("  %d endpoints -> %-11s n=%d  median %.1f ms  p99 %.1f ms  max %.1f ms" % (
            res["changed_per_round"], name, len(values), statistics.median(values), percentile(values, 99),
            max(values)))
    print("  all changes           n=%d  median %.1f ms  p99 %.1f ms" % (len(both), statistics.median(both),
                                                                         percentile(both, 99)))
    print("  control thread CPU: %.2f s over %d rounds (%.1f ms per 10 %% change); %.1f %% of a core idle "
          "(health checks of %d endpoints); RSS after rounds %.1f MiB" % (
              res["rounds_control_cpu_s"], res["rounds"], 1000 * res["rounds_control_cpu_s"] / (2 * res["rounds"]),
              res["idle_control_cpu_pct"], res["endpoints"], res["rss_kib_after_rounds"] / 1024))


if __name__ == "__main__":
    main()
