"""Short soak (bench/soak.py, 45 s instead of 10 min): mixed traffic (HTTP/1.1, h2c via h2load,
pinned multi-callback sessions, SSE) while workers are replaced every 15 s. Asserts correctness
only: no client failure, no error counter rising, no misrouted callback, and the idle balancer's
descriptor count back where it started once the traffic is gone. No timing thresholds."""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(HERE)), "bench"))

from harness import check, test, run_tests  # noqa: E402
import soak  # noqa: E402


@test
def mixed_traffic_with_worker_replacements_leaks_nothing():
    res = soak.soak(minutes=0.75, restart_every=15, sample=5, warmup=10, log=lambda line: None)
    text = soak.report(res)
    print(text)
    check(res["restarts"] >= 2, "workers replaced: %d" % res["restarts"])
    check(res["h1_ok"] > 0 and res["h2_ok"] > 0 and res["load"]["callbacks_sent"] > 0
          and res["load"]["streams_completed"] > 0, "every kind of traffic ran:\n" + text)
    check(not soak.failed(res), "soak failed:\n" + text)


if __name__ == "__main__":
    run_tests()
