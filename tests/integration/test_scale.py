"""Short scale check (bench/scale.py with 1,000 endpoints instead of 5,000): 10 EndpointSlices
listed in pages of 2, every endpoint answering /health from tests/k8s/health_fleet.py, then two
rounds of 10 % of the endpoints turning not serving and back over the watch. Asserts correctness
only: every endpoint known and healthy, each change reflected exactly in /debug/backends, the
paginated list on one API connection. No timing thresholds (those are bench/scale.py's)."""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(HERE)), "bench"))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "k8s"))

import harness  # noqa: E402
from harness import Balancer, check, test, run_tests, wait_for  # noqa: E402
from fake_apiserver import FakeApiServer, endpoint  # noqa: E402
import scale  # noqa: E402


@test
def thousand_endpoints_converge_through_pages_and_watch():
    # run() raises unless all 1,000 become healthy and each round's changes all show in /debug/backends.
    res = scale.run(harness.lb_binary(), endpoints=1000, slices=10, rounds=2, page=2, idle_s=0.5)
    check(res["list_requests"] >= 5, "the list came in pages: %d requests" % res["list_requests"])
    check(res["api_connections"] == 1, "one API connection for the pages and the watch: %d" % res["api_connections"])
    check(len(res["samples"]["not-serving"]) == 2 and len(res["samples"]["ready"]) == 2, "both rounds ran")
    check(res["changed_per_round"] == 100, "10 %% changed per round: %d" % res["changed_per_round"])


@test
def slice_events_that_arrive_together_are_published_once():
    # A rolling update touches many slices at once. Each publication rebuilds the endpoint set
    # (O(fleet)), so events that arrive together must be applied as one change.
    api = FakeApiServer().start()
    slices, per_slice, port = 20, 2, 9

    def pods(s, not_ready=()):
        return [endpoint("127.88.%d.%d" % (s, k + 1), "pod-%d-%d" % (s, k), ready=k not in not_ready)
                for k in range(per_slice)]

    for s in range(slices):
        api.put_slice("workers-%d" % s, pods(s), port=port)
    lb = Balancer(args=api.balancer_args(extra=["--health-check", "off"]), wait_ready=False)
    try:
        wait_for(lambda: len(lb.backends()) == slices * per_slice, 15, "every endpoint known")
        before = lb.metric("stepflow_lb_discovery_operations_total", operation="update", result="success")
        with api.cond:  # one write of the watch: every event in the same chunk
            for s in range(slices):
                api.put_slice("workers-%d" % s, pods(s, not_ready=(0,)), port=port)
        wait_for(lambda: sum(not b["ready"] for b in lb.backends()) == slices, 15, "every slice's change applied")
        updates = lb.metric("stepflow_lb_discovery_operations_total", operation="update", result="success") - before
        print("      %d slice events arriving together: %d fleet update(s)" % (slices, updates), flush=True)
        check(1 <= updates <= 3, "%d events published as %d updates (want one per read, not one per event)"
              % (slices, updates))
    finally:
        lb.stop()
        api.stop()


if __name__ == "__main__":
    run_tests()
