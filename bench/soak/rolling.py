#!/usr/bin/env python3
"""Rolling updates under load, long variant (issue 14 points 2 and 3); the short one is
tests/integration/test_rolling.py, and both use tests/integration/rolling_lib.py.

  python3 bench/soak/rolling.py                    # both parts, about 5 minutes
  python3 bench/soak/rolling.py --part workers     # only the worker rollouts
  python3 bench/soak/rolling.py --part balancers --front relay   # Python relay instead of HAProxy

workers:   six example workers (max concurrency 4) behind the API-server stand-in, rolled
           --rollouts times (maxSurge 1, maxUnavailable 0, --grace seconds terminating-but-serving,
           then out of the slice and SIGTERM, --step-interval seconds between steps) under one
           balancer, while the load runs.
balancers: two balancer replicas (both discovering the same six workers through the stand-in)
           behind HAProxy `mode tcp` (roundrobin, `option httpchk GET /ready` on the admin port
           every 200 ms, `option redispatch`), each replaced --rollouts times: new replica ready,
           old one SIGTERM, out of HAProxy when /ready says 503, drained.
The load: --sessions threads of multi-callback sessions (--callbacks runs/submit callbacks each,
answered after a random --answer-delay) and --streams threads of SSE executions, without pause.
Prints the counts and writes them to .bench-out/rolling-latest.md. Exit status 1 if anything
failed or was misrouted.
"""
import argparse
import csv
import io
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "tests", "integration"))
os.environ.setdefault("STEPFLOW_LB_BIN", os.path.join(REPO, "build", "stepflow-lb"))

import rolling_lib  # noqa: E402
from rolling_lib import BalancerSet, Load, TcpFront, WorkerFleet, wait_for  # noqa: E402
from fake_apiserver import FakeApiServer  # noqa: E402


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class HaproxyTarget:
    def __init__(self, front, slot, name):
        self.front, self.slot, self.name = front, slot, name

    def _stat(self, field):
        row = self.front.stats().get(self.slot, {})
        return row.get(field, "")

    @property
    def up(self):
        return self._stat("status").startswith("UP")

    @property
    def connections(self):
        return int(self._stat("stot") or 0)

    @property
    def refused(self):
        return int(self._stat("econ") or 0)


class HaproxyFront:
    """HAProxy `mode tcp` with fixed server slots; a slot without a process is simply DOWN."""

    def __init__(self, slots=8, check_interval_ms=200):
        self.dir = tempfile.mkdtemp(prefix="rolling-haproxy-")
        self.sock = os.path.join(self.dir, "stats.sock")
        self.port = free_port()
        self.slots = [(free_port(), free_port()) for _ in range(slots)]
        self.next_slot = 0
        self.by_port = {}
        servers = "".join("  server s%d 127.0.0.1:%d check port %d\n" % (i, p, a)
                          for i, (p, a) in enumerate(self.slots))
        conf = os.path.join(self.dir, "haproxy.cfg")
        with open(conf, "w") as f:
            f.write("""global
  maxconn 4000
  stats socket %s mode 600 level admin
defaults
  mode tcp
  timeout connect 2s
  timeout client 300s
  timeout server 300s
  retries 3
  option redispatch
frontend fe
  bind 127.0.0.1:%d
  default_backend balancers
backend balancers
  balance roundrobin
  option httpchk GET /ready
  default-server inter %dms fall 1 rise 1
%s""" % (self.sock, self.port, check_interval_ms, servers))
        self.proc = subprocess.Popen(["haproxy", "-db", "-f", conf], stdout=subprocess.DEVNULL,
                                     stderr=open(os.path.join(self.dir, "haproxy.log"), "w"))
        rolling_lib.harness._started.append(self.proc)
        wait_for(lambda: os.path.exists(self.sock), 10, "haproxy stats socket")

    def stats(self):
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(self.sock)
            s.sendall(b"show stat\n")
            data = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        text = data.decode().lstrip("# ")
        return {row["svname"]: row for row in csv.DictReader(io.StringIO(text)) if row.get("pxname") == "balancers"}

    def reserve(self):
        slot = self.slots[self.next_slot]
        self.next_slot += 1
        return slot

    def add(self, name, port, admin_port):
        index = [p for p, _ in self.slots].index(port)
        return HaproxyTarget(self, "s%d" % index, name)

    def remove(self, target):
        pass

    @property
    def failed(self):
        fe = [r for r in self.stats().values()]
        return sum(int(r.get("econ") or 0) for r in fe if r["svname"] == "BACKEND")

    def up_names(self):
        return [n for n, r in self.stats().items() if r["status"].startswith("UP") and n != "BACKEND"]

    def close(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


def make_load(args, port):
    lo, hi = (float(x) for x in args.answer_delay.split(","))
    return Load("127.0.0.1", port, sessions=args.sessions, callbacks=args.callbacks, answer_delay=(lo, hi),
                streams=args.streams, stream_events=args.stream_events, interval_ms=args.interval_ms).start()


def report_counts(title, load, fleet, extra):
    v = load.counts.snapshot()
    v["worker_misrouted"] = fleet.misrouted_seen_by_workers()
    lines = ["### %s" % title, "", "| | started | completed | failed | misrouted |", "|---|---|---|---|---|",
             "| sessions | %d | %d | %d | |" % (v["sessions_started"], v["sessions_completed"], v["sessions_failed"]),
             "| callbacks | %d | %d | %d | %d (workers saw %d) |" % (
                 v["callbacks_sent"], v["callbacks_completed"], v["callbacks_failed"], v["callbacks_misrouted"],
                 v["worker_misrouted"]),
             "| SSE executions | %d | %d | %d | |" % (v["streams_started"], v["streams_completed"],
                                                     v["streams_failed"]),
             "", "Refused at capacity (503 -32300, nothing created, retried): %d sessions, %d SSE executions."
             % (v["sessions_refused"], v["streams_refused"])] + extra
    if load.counts.failures:
        lines += ["", "First failures:", ""] + ["    " + f for f in load.counts.failures[:10]]
    text = "\n".join(lines) + "\n"
    print(text, flush=True)
    bad = v["sessions_failed"] + v["callbacks_failed"] + v["callbacks_misrouted"] + v["streams_failed"] + \
        v["worker_misrouted"]
    return text, bad


def run_workers(args):
    api = FakeApiServer().start()
    fleet = WorkerFleet(api)
    fleet.scale_up(6, prefix="workers-r1")
    lb = rolling_lib.harness.Balancer(args=api.balancer_args(extra=["--access-log", "off"]),
                                      wait_ready=False)
    lb.wait_healthy(6)
    load = make_load(args, lb.port)
    t0 = time.monotonic()
    time.sleep(args.settle)
    for rev in range(2, 2 + args.rollouts):
        r0 = time.monotonic()
        fleet.rolling_update(rev, grace=args.grace, step_interval=args.step_interval)
        print("rollout %d: %.1f s" % (rev, time.monotonic() - r0), flush=True)
    time.sleep(args.settle)
    load.stop()
    duration = time.monotonic() - t0
    straddled = sum(load.counts.open_at(p.instance_id, p.terminating_at) for p in fleet.stopped)
    misses = lb.metric("stepflow_lb_pinned_misses_total") or 0
    extra = ["", "%d rollouts of 6 pods (%d pods replaced) in %.0f s of load; grace %.0f s, %.0f s between steps; "
             "%d sessions or SSE executions were open on a pod when it turned terminating; "
             "balancer pinned misses: %d." % (args.rollouts, len(fleet.stopped), duration, args.grace,
                                               args.step_interval, straddled, misses)]
    return report_counts("Rolling update of the workers (bench/soak/rolling.py --part workers)", load, fleet, extra)


def run_balancers(args):
    api = FakeApiServer().start()
    fleet = WorkerFleet(api)
    fleet.scale_up(6)
    front = HaproxyFront(slots=2 + 2 * args.rollouts) if args.front == "haproxy" else TcpFront(check_interval=0.2)
    try:
        lbs = BalancerSet(front, api.balancer_args(extra=["--access-log", "off"]),
                          replicas=2)
        lbs.wait_healthy(6)
        load = make_load(args, front.port)
        t0 = time.monotonic()
        time.sleep(args.settle)
        for _ in range(args.rollouts):
            for _ in range(2):
                r = lbs.replace(0)
                print("replaced %s" % r, flush=True)
                time.sleep(args.balancer_interval)
        time.sleep(args.settle)
        load.stop()
        duration = time.monotonic() - t0
        extra = ["", "Front: %s. %d balancer replacements in %.0f s of load:" % (
            "HAProxy mode tcp" if args.front == "haproxy" else "Python relay", len(lbs.retired), duration), "",
            "| replica | in flight at SIGTERM | out of the front after | exited after | exit | cut by drain timeout |",
            "|---|---|---|---|---|---|"]
        extra += ["| %s | %d | %.2f s | %.2f s | %d | %s |" % (r["name"], r["in_flight_at_sigterm"], r["out_of_front_s"],
                                                               r["drained_s"], r["exit"], r["cut_at_drain_timeout"])
                  for r in lbs.retired]
        lbs.stop()
        return report_counts("Rolling update of the balancer (bench/soak/rolling.py --part balancers)", load, fleet,
                             extra)
    finally:
        front.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", choices=("workers", "balancers", "both"), default="both")
    ap.add_argument("--front", choices=("haproxy", "relay"), default="haproxy")
    ap.add_argument("--rollouts", type=int, default=2)
    ap.add_argument("--grace", type=float, default=10.0, help="seconds a worker pod stays terminating-but-serving")
    ap.add_argument("--step-interval", type=float, default=8.0, help="seconds between rollout steps")
    ap.add_argument("--balancer-interval", type=float, default=15.0, help="seconds between balancer replacements")
    ap.add_argument("--settle", type=float, default=10.0, help="seconds of load before and after the updates")
    ap.add_argument("--sessions", type=int, default=10)
    ap.add_argument("--callbacks", type=int, default=5)
    ap.add_argument("--answer-delay", default="0.05,0.4", help="min,max seconds before a callback is answered")
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--stream-events", type=int, default=20)
    ap.add_argument("--interval-ms", type=int, default=100)
    args = ap.parse_args()
    if args.front == "haproxy" and args.part != "workers" and not shutil.which("haproxy"):
        sys.exit("haproxy not found: scripts/install-deps.sh bench, or --front relay")
    texts, bad = [], 0
    if args.part in ("workers", "both"):
        t, b = run_workers(args)
        texts.append(t)
        bad += b
    if args.part in ("balancers", "both"):
        t, b = run_balancers(args)
        texts.append(t)
        bad += b
    os.makedirs(os.path.join(REPO, ".bench-out"), exist_ok=True)
    with open(os.path.join(REPO, ".bench-out", "rolling-latest.md"), "w") as f:
        f.write("\n".join(texts))
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
