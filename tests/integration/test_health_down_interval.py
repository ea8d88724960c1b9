"""--health-interval-down: a backend that health keeps out of routing is checked at that interval,
so a worker that restarts quickly is back in rotation in about interval-down x --health-rise, not
--health-interval x --health-rise. Every balancer here checks healthy instances only every 60 s:
a recovery within the 10 s these tests wait at most can only come from the down interval.
Real binary, real example workers, loopback only; every wait polls a condition to a deadline."""

import os
import subprocess
import time

import stepflow_client as client
from harness import Balancer, Worker, check, free_port, lb_binary, run_tests, test, wait_for

SLOW_UP = ["--health-interval", "60s", "--health-interval-down", "200ms", "--cold-start-timeout", "0"]


def take_out_with_live_traffic(lb, w):
    """Sends calls to the stopped worker until live connect failures mark it unhealthy."""
    def out():
        lb.execute("/echo", {}, timeout=5)
        return lb.backend(w.address)["state"] == "unhealthy"
    wait_for(out, 10, "stopped worker taken out by live failures")


def routable_and_serving(lb, address, instance_id):
    b = lb.backend(address)
    if not (b and b["routable"] and b["instanceId"] == instance_id):
        return False
    r = lb.execute("/echo", {"back": True}, timeout=5)
    return r.status == 200 and r.json()["result"]["instanceId"] == instance_id


@test
def a_restarted_worker_with_its_old_id_returns_after_rise_checks_at_the_down_interval():
    w = Worker("same", extra=["--instance-id", "same-1"])
    lb = Balancer([w.address], args=SLOW_UP + ["--health-rise", "2"])
    lb.wait_healthy(1)
    check(lb.backend(w.address)["checkIntervalMs"] == 60000, lb.backend(w.address))
    w.stop()
    take_out_with_live_traffic(lb, w)
    # Live failures took it out on a request thread: its checks now run at the down pace, and
    # faster still (100ms) once a check finds the connect refused so soon after a pass.
    wait_for(lambda: lb.backend(w.address)["checkIntervalMs"] in (200, 100), 5, "checks at the down interval")
    failed = lb.metric("stepflow_lb_health_checks_total", result="failure") or 0
    wait_for(lambda: (lb.metric("stepflow_lb_health_checks_total", result="failure") or 0) >= failed + 3, 10,
             "failed checks every 100-200ms while the worker is down")
    w2 = Worker("same", extra=["--instance-id", "same-1"], port=w.port)
    restarted = time.monotonic()
    passed = lb.metric("stepflow_lb_health_checks_total", result="success") or 0
    wait_for(lambda: routable_and_serving(lb, w2.address, "same-1"), 10, "restarted worker routable again")
    print(f"  routable again {time.monotonic() - restarted:.2f}s after the restart (2 x 200ms; 60s interval when up)")
    after = lb.metric("stepflow_lb_health_checks_total", result="success") or 0
    check(after - passed >= 2, f"back after {after - passed} passed checks, not the 2 of --health-rise")
    # Healthy again: back to the normal interval.
    check(lb.backend(w2.address)["checkIntervalMs"] == 60000, lb.backend(w2.address))


@test
def a_restarted_worker_with_a_new_id_returns_after_one_check_at_the_down_interval():
    w = Worker("new")
    old_id = w.instance_id
    lb = Balancer([w.address], args=SLOW_UP + ["--health-rise", "5"])
    lb.wait_healthy(1)
    w.stop()
    take_out_with_live_traffic(lb, w)
    w2 = Worker("new", port=w.port)
    new_id = w2.instance_id
    check(new_id != old_id, (old_id, new_id))
    restarted = time.monotonic()
    # A new instance needs one passed check, whatever --health-rise says.
    wait_for(lambda: routable_and_serving(lb, w2.address, new_id), 10, "new instance routable")
    print(f"  new instance routable {time.monotonic() - restarted:.2f}s after the restart (200ms down interval)")
    check(lb.backend(w2.address)["checkIntervalMs"] == 60000, lb.backend(w2.address))


@test
def a_worker_refusing_connections_soon_after_passing_is_checked_every_100ms_until_it_listens():
    """A container restart: the pod's host answers, its process does not listen for a moment.
    A refused check is one round trip, so such a backend is checked every 100ms (for 30 s after
    its last pass) and the restarted worker takes work about as soon as it listens, even with a
    long down interval. Without this, the checks keep the 5 s down pace."""
    w = Worker("restarting")
    lb = Balancer([w.address], args=["--health-interval", "60s", "--health-interval-down", "5s",
                                     "--cold-start-timeout", "0"])
    lb.wait_healthy(1)
    w.stop()
    take_out_with_live_traffic(lb, w)
    wait_for(lambda: lb.backend(w.address)["checkIntervalMs"] == 100, 10, "refused checks every 100ms")
    w2 = Worker("restarting", port=w.port)
    restarted = time.monotonic()
    wait_for(lambda: routable_and_serving(lb, w2.address, w2.instance_id), 10, "restarted worker routable")
    print(f"  routable {time.monotonic() - restarted:.2f}s after the restart (5 s down interval)")
    check(lb.backend(w2.address)["checkIntervalMs"] == 60000, lb.backend(w2.address))


@test
def a_backend_that_never_answered_is_checked_at_the_down_interval_set_by_the_environment():
    up = Worker("up")
    port = free_port()
    late = f"127.0.0.1:{port}"
    lb = Balancer([up.address, late], args=["--health-interval", "60s", "--cold-start-timeout", "0"],
                  env={"STEPFLOW_LB_HEALTH_INTERVAL_DOWN": "200ms"})
    lb.wait_healthy(1)
    wait_for(lambda: lb.backend(late)["state"] == "unreachable", 5, "late backend unreachable")
    # It refuses connections, but has never passed: the down interval, not the restart pace.
    check(lb.backend(late)["checkIntervalMs"] == 200, lb.backend(late))
    check(lb.backend(up.address)["checkIntervalMs"] == 60000, lb.backend(up.address))
    w = Worker("late", port=port)
    wait_for(lambda: (lb.backend(late) or {}).get("routable"), 10, "late worker routable")
    check(lb.backend(late)["instanceId"] == w.instance_id, lb.backend(late))
    check(lb.backend(late)["checkIntervalMs"] == 60000, lb.backend(late))


@test
def zero_or_a_longer_down_interval_means_the_health_interval():
    w = Worker("same-pace")
    for value in ("0", "10s"):
        lb = Balancer([w.address, f"127.0.0.1:{free_port()}"],
                      args=["--health-interval", "2s", "--health-interval-down", value])
        dead = [b for b in lb.backends() if b["address"] != w.address][0]["address"]
        wait_for(lambda: lb.backend(dead)["state"] == "unreachable", 5, "dead backend unreachable")
        check(lb.backend(dead)["checkIntervalMs"] == 2000, (value, lb.backend(dead)))
        lb.stop()


@test
def a_bad_down_interval_is_refused_at_start_up():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KUBERNETES_", "STEPFLOW_"))}
    for value in ("soon", "-1s", "50ms"):
        out = subprocess.run([lb_binary(), "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0",
                              "--backends", "127.0.0.1:1", "--health-interval-down", value],
                             capture_output=True, text=True, timeout=20, env=env)
        check(out.returncode == 2, f"{value}: exit {out.returncode}, stderr {out.stderr!r}")
        check("--health-interval-down" in out.stderr, f"{value}: message names the flag: {out.stderr!r}")


@test
def a_routable_instance_whose_check_failed_is_rechecked_at_the_down_interval():
    # --max-failures 1000 keeps it routable while its checks fail, so the pace in force can be
    # read at leisure: the down interval from the first failed check until one passes.
    w = Worker("flaky")
    lb = Balancer([w.address], args=["--health-interval", "2s", "--health-interval-down", "200ms",
                                     "--max-failures", "1000"])
    lb.wait_healthy(1)
    check(lb.backend(w.address)["checkIntervalMs"] == 2000, lb.backend(w.address))
    client.set_health("127.0.0.1", w.port, False)
    wait_for(lambda: lb.backend(w.address)["consecutiveFailures"] >= 1, 10, "a failed check")
    b = lb.backend(w.address)
    check(b["state"] == "healthy" and b["routable"], f"still routable after one failed check: {b}")
    check(b["checkIntervalMs"] == 200, f"rechecked at the down interval, not every 2 s: {b}")
    wait_for(lambda: lb.backend(w.address)["consecutiveFailures"] >= 3, 5, "more failed checks at the quick pace")
    client.set_health("127.0.0.1", w.port, True)
    wait_for(lambda: lb.backend(w.address)["consecutiveFailures"] == 0, 5, "a passed check")
    check(lb.backend(w.address)["checkIntervalMs"] == 2000, f"back to the normal pace: {lb.backend(w.address)}")


run_tests()
