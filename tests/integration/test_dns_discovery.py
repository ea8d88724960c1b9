"""DNS discovery (--discovery dns / UPSTREAM_SERVICE), the drop-in mode of the balancer we
replace: a name re-resolved on an interval, off the event loops, every address health-checked."""

import time

from harness import Balancer, Worker, check, test, wait_for, run_tests


@test
def name_resolves_to_health_checked_backends():
    w = Worker("dns")
    lb = Balancer(args=["--upstream-service", "localhost:%d" % w.port, "--dns-interval", "200ms"], wait_ready=False)
    lb.wait_healthy(1)
    check(any(b["address"] == "127.0.0.1:%d" % w.port for b in lb.backends()), "localhost's IPv4 address")
    r = lb.execute("/echo", {"x": 1})
    check(r.status == 200, "routed")
    # Re-resolution runs on its own thread: it keeps ticking and the admin port stays quick.
    first = lb.metric("stepflow_lb_discovery_operations_total", operation="resolve", result="success")
    wait_for(lambda: lb.metric("stepflow_lb_discovery_operations_total", operation="resolve",
                               result="success") >= first + 3, 5, "re-resolutions")
    t0 = time.monotonic()
    lb.admin_get("/health")
    check(time.monotonic() - t0 < 0.5, "admin answers while resolving")
    check(b'"discovery":"dns (localhost:' in lb.admin_get("/health")[1], "discovery named in /health")


@test
def upstream_service_env_and_resolution_failure_keeps_running():
    lb = Balancer(env={"UPSTREAM_SERVICE": "no-such-host.invalid:8080", "STEPFLOW_LB_DNS_INTERVAL": "200ms"},
                  wait_ready=False)
    wait_for(lambda: (lb.metric("stepflow_lb_discovery_operations_total", operation="resolve",
                                result="error") or 0) >= 2, 15, "resolution errors counted")
    check(lb.proc.poll() is None, "still running")
    check(lb.backends() == [], "no backends")
    # Never resolved: discovery has not synced once, so this replica is not ready.
    status, body = lb.admin_get("/ready")
    check(status == 503 and b'"discoverySynced":false' in body, body)


if __name__ == "__main__":
    run_tests()
