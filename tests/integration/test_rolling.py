"""Rolling updates under load (issue 14, points 2 and 3), short variants of bench/soak/rolling.py.

A client keeps multi-callback sessions and SSE executions flowing while (1) the API-server
stand-in rolls the six worker pods twice, maxSurge 1 / maxUnavailable 0, each old pod
terminating-but-serving through its grace period before it leaves the slice and gets SIGTERM,
and (2) two balancer replicas behind a round-robin TCP front that checks their /ready are
replaced one after the other. Nothing may fail and no callback may reach another worker than
the one holding its session. The driver is tests/integration/rolling_lib.py.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import rolling_lib  # noqa: E402,F401  (puts tests/k8s on the path)
from harness import Balancer, check, run_tests, test, wait_for  # noqa: E402
from fake_apiserver import FakeApiServer  # noqa: E402
from rolling_lib import BalancerSet, Load, TcpFront, WorkerFleet  # noqa: E402

LB_ARGS = ["--access-log", "off"]


def check_counts(load, fleet):
    c = load.counts
    v = c.snapshot()
    print(c.summary(), flush=True)
    failures = "\n".join(c.failures[:10])
    check(v["sessions_started"] >= 20 and v["streams_started"] >= 5, "load ran: %r" % v)
    check(v["sessions_failed"] == 0 and v["sessions_completed"] == v["sessions_started"],
          "every session completed: %r\n%s" % (v, failures))
    check(v["callbacks_misrouted"] == 0 and fleet.misrouted_seen_by_workers() == 0,
          "no callback misrouted: %r\n%s" % (v, failures))
    check(v["callbacks_failed"] == 0 and v["callbacks_completed"] == v["callbacks_sent"],
          "every callback answered 202: %r\n%s" % (v, failures))
    check(v["streams_failed"] == 0, "every SSE execution completed: %r\n%s" % (v, failures))


@test
def workers_rolling_update_under_load():
    api = FakeApiServer().start()
    fleet = WorkerFleet(api)
    fleet.scale_up(6, prefix="workers-r1")
    lb = Balancer(args=api.balancer_args(extra=LB_ARGS), wait_ready=False)
    lb.wait_healthy(6)
    load = Load("127.0.0.1", lb.port, sessions=6, callbacks=3, answer_delay=(0.02, 0.15), streams=2).start()
    wait_for(lambda: load.counts["sessions_completed"] >= 6, 20, "load flowing")

    def busy(pod):
        # Turn a pod terminating while a session is open on it, so its drain has work to keep.
        wait_for(lambda: (lb.backend(pod.address) or {}).get("inFlight", 0) > 0, 10, "work on " + pod.name)

    old_ids = {p.instance_id for p in fleet.pods}
    fleet.rolling_update(2, grace=2.0, before_terminate=busy)
    mid_ids = {p.instance_id for p in fleet.pods}
    fleet.rolling_update(3, grace=2.0, before_terminate=busy)
    new_ids = {p.instance_id for p in fleet.pods}
    wait_for(lambda: sum(load.counts.per_instance[i] for i in new_ids) >= 6, 20, "work on the new pods")
    load.stop()
    check_counts(load, fleet)
    straddled = sum(load.counts.open_at(p.instance_id, p.terminating_at) for p in fleet.stopped)
    check(len(fleet.stopped) == 12, "twelve pods replaced: %d" % len(fleet.stopped))
    # Each pod turned terminating once work was seen on it; that work may end just before.
    check(straddled >= 6, "executions open on their pod when it began terminating: %d" % straddled)
    check(old_ids.isdisjoint(new_ids) and mid_ids.isdisjoint(new_ids), "the fleet was replaced")
    check(lb.metric("stepflow_lb_pinned_misses_total") in (None, 0.0), "no pinned misses")
    check(not [r for r in lb.logs() if r.get("level") == "error"], "no error logged:\n" + lb.log_text())


@test
def balancer_rolling_update_under_load():
    api = FakeApiServer().start()
    fleet = WorkerFleet(api)
    fleet.scale_up(6)
    front = TcpFront(check_interval=0.1)
    try:
        lbs = BalancerSet(front, api.balancer_args(extra=LB_ARGS), replicas=2)
        lbs.wait_healthy(6)
        load = Load("127.0.0.1", front.port, sessions=6, callbacks=3, answer_delay=(0.02, 0.15),
                    streams=2).start()
        wait_for(lambda: load.counts["sessions_completed"] >= 6, 20, "load flowing")
        lbs.rolling_update()
        done = load.counts["sessions_completed"]
        wait_for(lambda: load.counts["sessions_completed"] >= done + 6, 20, "load through the new replicas")
        load.stop()
        print("replaced: %r" % lbs.retired, flush=True)
        check_counts(load, fleet)
        for r in lbs.retired:
            check(r["exit"] == 0 and not r["cut_at_drain_timeout"], "drained and exited 0: %r" % r)
            check(r["in_flight_at_sigterm"] > 0, "SIGTERM landed with work in flight: %r" % r)
        check(front.failed == 0, "the front always found a replica")
        lbs.stop()
    finally:
        front.close()


if __name__ == "__main__":
    run_tests()
