#!/usr/bin/env python3
"""Soak: stepflow-lb under mixed traffic for --minutes, sampling its RSS and open descriptors.

The fleet: 3 example workers behind the API stand-in (tests/k8s/fake_apiserver.py); every
--restart-every seconds one worker is replaced the way a Deployment does it (new pod ready,
old pod terminating-but-serving for a grace period, out of the slice, SIGTERM). The traffic, all
on loopback, all the time: multi-callback sessions pinned to their instance and SSE executions
(tests/integration/rolling_lib.Load, via stepflow_client.py), a thread of HTTP/1.1 /echo
executions, and h2load bursts over h2c (prior knowledge) every 10 s.

Every --sample seconds: RSS (VmRSS) and the count of /proc/PID/fd. Reported: the RSS slope after
--warmup seconds (least squares, KiB/min), fd growth (last - first after warm-up), and the
error counters of /metrics at start and end, next to the failures the clients saw.

    python3 bench/soak.py [--minutes 10] [--restart-every 60] [--sample 10] [--warmup 60]
Exit status 1 when a client saw a failure, an error counter rose, or the idle balancer holds more
descriptors after the traffic than before it.
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "integration"))
sys.path.insert(0, os.path.join(ROOT, "tests", "k8s"))

import harness  # noqa: E402
import rolling_lib  # noqa: E402
from fake_apiserver import FakeApiServer  # noqa: E402

ERROR_COUNTERS = ("stepflow_lb_upstream_connect_errors_total", "stepflow_lb_no_healthy_instance_total",
                  "stepflow_lb_pinned_misses_total", "stepflow_lb_rejected_requests_total",
                  "stepflow_lb_upstream_retries_total", "stepflow_lb_discovery_operations_total{result=error}")
RPC = b'{"jsonrpc":"2.0","id":1,"method":"components/execute","params":{"component":"/echo","input":{"v":1}}}'


def rss_kib(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def fds(pid):
    return len(os.listdir("/proc/%d/fd" % pid))


def slope_per_min(points):
    """Least-squares slope of (seconds, value) points, per minute."""
    n = len(points)
    if n < 2:
        return 0.0
    mx = sum(t for t, _ in points) / n
    my = sum(v for _, v in points) / n
    sxx = sum((t - mx) ** 2 for t, _ in points)
    return 60.0 * sum((t - mx) * (v - my) for t, v in points) / sxx if sxx else 0.0


def counters(lb):
    text = lb.metrics_text()
    out = {}
    for name in ERROR_COUNTERS:
        base, _, want = name.partition("{")
        total = 0.0
        for line in text.splitlines():
            if line.startswith(base) and (not want or want.rstrip("}").replace("=", '="') + '"' in line):
                if line.split("{", 1)[0].split(" ", 1)[0] == base:
                    total += float(line.rsplit(" ", 1)[1])
        out[name] = total
    return out


class Traffic:
    """HTTP/1.1 executions in a loop and h2load bursts, counting what failed."""

    def __init__(self, port):
        self.port = port
        self.stop = threading.Event()
        self.h1_ok = self.h1_failed = self.h2_ok = self.h2_failed = 0
        self.failures = []
        self.body = tempfile.NamedTemporaryFile(delete=False, suffix=".json")
        self.body.write(RPC)
        self.body.close()
        self.threads = [threading.Thread(target=self._h1, daemon=True), threading.Thread(target=self._h2, daemon=True)]

    def start(self):
        for t in self.threads:
            t.start()
        return self

    def finish(self):
        self.stop.set()
        for t in self.threads:
            t.join(60)

    def _h1(self):
        conn = harness.client.HttpConnection("127.0.0.1", self.port, timeout=30)
        while not self.stop.is_set():
            try:
                r = conn.request("POST", "/", RPC, {"Content-Type": "application/json"})
                ok = r.status == 200
            except Exception as e:  # counted and shown
                ok = False
                self.failures.append("h1: %r" % e)
                conn.close()
                conn = harness.client.HttpConnection("127.0.0.1", self.port, timeout=30)
            if ok:
                self.h1_ok += 1
            else:
                self.h1_failed += 1
            time.sleep(0.01)
        conn.close()

    def _h2(self):
        while not self.stop.wait(10):
            r = subprocess.run(["h2load", "-t1", "-c2", "-m4", "-n400", "-d", self.body.name,
                                "-H", "content-type: application/json", "http://127.0.0.1:%d/" % self.port],
                               capture_output=True, text=True, timeout=60)
            m = re.search(r"requests: \d+ total, \d+ started, \d+ done, (\d+) succeeded, (\d+) failed, "
                          r"(\d+) errored", r.stdout)
            if not m:
                self.h2_failed += 400
                self.failures.append("h2load: " + r.stdout[-200:] + r.stderr[-200:])
                continue
            self.h2_ok += int(m.group(1))
            self.h2_failed += int(m.group(2)) + int(m.group(3))


def soak(minutes, restart_every, sample, warmup, log=print):
    api = FakeApiServer().start()
    fleet = rolling_lib.WorkerFleet(api, max_concurrency=8)
    fleet.scale_up(3)
    lb = harness.Balancer(args=api.balancer_args(extra=["--access-log", "off"]), wait_ready=False)
    lb.wait_healthy(3)
    pid = lb.proc.pid
    c0 = counters(lb)
    # The descriptors of an idle balancer (listeners, API connections, event fds): the least of a
    # few samples, as a health check briefly holds one more.
    fd_idle_before = min(fds(pid) for _ in range(5) if time.sleep(0.2) is None)
    load = rolling_lib.Load("127.0.0.1", lb.port, sessions=3, callbacks=3, streams=2).start()
    traffic = Traffic(lb.port).start()
    t0 = time.monotonic()
    end = t0 + minutes * 60
    samples = []  # (seconds, rss KiB, fds)
    next_sample, next_restart, revision, restarts = t0, t0 + restart_every, 2, 0
    while True:
        now = time.monotonic()
        if now >= next_sample:
            samples.append((now - t0, rss_kib(pid), fds(pid)))
            log("  t=%4.0fs rss=%d KiB fds=%d" % samples[-1])
            next_sample += sample
        if now >= end:
            break
        if now >= next_restart:
            # Replace the oldest pod: a new one joins ready, the old one drains for 5 s, then stops.
            old = next(p for p in fleet.pods if not p.terminating)
            new = fleet.start_pod("workers-r%d" % revision)
            revision += 1
            fleet.add_ready(new)
            fleet.terminate(old, 5.0)
            restarts += 1
            next_restart += restart_every
        time.sleep(min(1.0, max(0.0, min(next_sample, next_restart, end) - time.monotonic())))
    counts = load.stop()
    traffic.finish()
    fleet.wait_terminations(60)
    # With the traffic gone, every client and pooled upstream connection closes (the pool's idle
    # timeout is 4 s): the descriptor count must come back to where it started.
    fd_idle_after, deadline = fds(pid), time.monotonic() + 20
    while fd_idle_after > fd_idle_before and time.monotonic() < deadline:
        time.sleep(0.2)
        fd_idle_after = min(fd_idle_after, fds(pid))
    c1 = counters(lb)
    after = [s for s in samples if s[0] >= warmup]
    res = {
        "minutes": minutes, "restarts": restarts, "samples": samples,
        "rss_slope_kib_min": slope_per_min([(t, r) for t, r, _ in after]), "after_samples": len(after),
        "rss_first_kib": after[0][1] if after else 0, "rss_last_kib": after[-1][1] if after else 0,
        "fd_first": after[0][2] if after else 0, "fd_last": after[-1][2] if after else 0,
        "fd_max": max(f for _, _, f in after) if after else 0,
        "fd_idle_before": fd_idle_before, "fd_idle_after": fd_idle_after,
        "counters_before": c0, "counters_after": c1, "load": counts.snapshot(), "load_failures": counts.failures[:10],
        "h1_ok": traffic.h1_ok, "h1_failed": traffic.h1_failed, "h2_ok": traffic.h2_ok, "h2_failed": traffic.h2_failed,
        "traffic_failures": traffic.failures[:10], "misrouted_at_workers": fleet.misrouted_seen_by_workers(),
    }
    lb.stop()
    harness._kill_all()
    api.stop()
    return res


def report(res):
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    v = res["load"]
    lines = [
        "soak: %.1f min, %d worker replacements, load average %s" % (res["minutes"], res["restarts"], " ".join(load)),
        "  RSS after warm-up: %d -> %d KiB, slope %.1f KiB/min (least squares over %d samples)" % (
            res["rss_first_kib"], res["rss_last_kib"], res["rss_slope_kib_min"], res["after_samples"]),
        "  open fds after warm-up: first %d, last %d, max %d (growth %+d)" % (
            res["fd_first"], res["fd_last"], res["fd_max"], res["fd_last"] - res["fd_first"]),
        "  open fds of the idle balancer: %d before the traffic, %d after it (growth %+d)" % (
            res["fd_idle_before"], res["fd_idle_after"], res["fd_idle_after"] - res["fd_idle_before"]),
        "  HTTP/1.1: %d ok, %d failed; h2c (h2load): %d ok, %d failed" % (
            res["h1_ok"], res["h1_failed"], res["h2_ok"], res["h2_failed"]),
        "  sessions: %d started, %d completed, %d failed; callbacks %d sent, %d failed, %d misrouted; "
        "SSE %d started, %d completed, %d failed" % (
            v["sessions_started"], v["sessions_completed"], v["sessions_failed"], v["callbacks_sent"],
            v["callbacks_failed"], v["callbacks_misrouted"], v["streams_started"], v["streams_completed"],
            v["streams_failed"]),
        "  misrouted callbacks seen by the workers: %d" % res["misrouted_at_workers"],
    ]
    for k in res["counters_after"]:
        lines.append("  %s: %s -> %s" % (k, res["counters_before"][k], res["counters_after"][k]))
    for f in res["load_failures"] + res["traffic_failures"]:
        lines.append("  failure: " + f)
    return "\n".join(lines)


def failed(res):
    v = res["load"]
    return bool(res["h1_failed"] or res["h2_failed"] or v["sessions_failed"] or v["callbacks_failed"]
                or v["callbacks_misrouted"] or v["streams_failed"] or res["misrouted_at_workers"]
                or res["fd_idle_after"] > res["fd_idle_before"]
                or any(res["counters_after"][k] != res["counters_before"][k] for k in ERROR_COUNTERS))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lb", default=os.path.join(ROOT, "build", "stepflow-lb"))
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--restart-every", type=float, default=60)
    ap.add_argument("--sample", type=float, default=10)
    ap.add_argument("--warmup", type=float, default=60)
    args = ap.parse_args()
    os.environ["STEPFLOW_LB_BIN"] = os.path.abspath(args.lb)
    res = soak(args.minutes, args.restart_every, args.sample, args.warmup)
    print(report(res))
    sys.exit(1 if failed(res) else 0)


if __name__ == "__main__":
    main()
