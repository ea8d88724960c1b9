"""Short scale check (bench/scale.py with 1,000 endpoints instead of 5,000): 10 EndpointSlices
listed in pages of 2, every endpoint answering /health from tests/k8s/health_fleet.py, then two
rounds of 10 % of the endpoints turning not serving and back over the watch. Asserts correctness
only: every endpoint known and healthy, each change reflected exactly in /debug/backends, the
paginated list on one API connection. No timing thresholds (those are bench/scale.py's)."""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(HERE)), "bench"))

import harness  # noqa: E402
from harness import check, test, run_tests  # noqa: E402
import scale  # noqa: E402


@test
def thousand_endpoints_converge_through_pages_and_watch():
    # run() raises unless all 1,000 become healthy and each round's changes all show in /debug/backends.
    res = scale.run(harness.lb_binary(), endpoints=1000, slices=10, rounds=2, page=2, idle_s=0.5)
    check(res["list_requests"] >= 5, "the list came in pages: %d requests" % res["list_requests"])
    check(res["api_connections"] == 1, "one API connection for the pages and the watch: %d" % res["api_connections"])
    check(len(res["samples"]["not-serving"]) == 2 and len(res["samples"]["ready"]) == 2, "both rounds ran")
    check(res["changed_per_round"] == 100, "10 %% changed per round: %d" % res["changed_per_round"])


if __name__ == "__main__":
    run_tests()
