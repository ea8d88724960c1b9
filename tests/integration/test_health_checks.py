"""Active health checks that cannot be silenced, and instance ids that are validated (issue 15
points 2 and 7). Real binary, real example workers, loopback only; every wait polls a condition
until a deadline."""

import http.client
import os
import resource
import threading
import time

from harness import Balancer, Worker, check, client, run_tests, test, wait_for


def state(lb, worker):
    return (lb.backend(worker.address) or {}).get("state")


@test
def a_worker_that_never_answers_health_is_marked_down_within_interval_plus_timeout():
    # The harness runs checks every 200ms with a 1s timeout: a check outlives the next tick,
    # which used to drop it and re-arm its deadline, so the timeout never fired.
    w = Worker("hung")
    lb = Balancer([w.address], args=["--max-failures", "1"])
    lb.wait_healthy(1)
    client.set_health("127.0.0.1", w.port, True, delay_ms=60000)
    hung_at = time.monotonic()
    # interval + timeout = 1.2s; the rest of the deadline is slack for a loaded machine.
    wait_for(lambda: state(lb, w) == "unhealthy", 4.0, "hung worker marked unhealthy")
    took = time.monotonic() - hung_at
    check("timed out" in (lb.backend(w.address)["lastError"] or ""), lb.backend(w.address))
    print(f"  hung worker marked down after {took:.2f}s (interval 0.2s + timeout 1s)")


@test
def live_successes_do_not_hide_a_failing_health_endpoint():
    w = Worker("sick", max_concurrency=16)
    lb = Balancer([w.address])  # --max-failures 3
    lb.wait_healthy(1)
    stop = threading.Event()
    served = [0]

    def traffic():
        while not stop.is_set():
            if lb.execute("/echo", {"x": 1}, timeout=5).status == 200:
                served[0] += 1

    threads = [threading.Thread(target=traffic, daemon=True) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: served[0] > 20, 10, "live traffic flowing")
        client.set_health("127.0.0.1", w.port, False)
        wait_for(lambda: state(lb, w) == "unhealthy", 5, "instance with a failing /health taken out under load")
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    check(served[0] > 20, f"traffic was flowing: {served[0]} answers")


@test
def an_instance_that_failed_returns_after_rise_passed_checks():
    w = Worker("rise")
    lb = Balancer([w.address], args=["--max-failures", "1", "--health-rise", "3"])
    lb.wait_healthy(1)
    client.set_health("127.0.0.1", w.port, False)
    wait_for(lambda: state(lb, w) == "unhealthy", 5, "marked unhealthy")
    before = lb.metric("stepflow_lb_health_checks_total", result="success") or 0
    client.set_health("127.0.0.1", w.port, True)
    wait_for(lambda: state(lb, w) == "healthy", 5, "healthy again")
    after = lb.metric("stepflow_lb_health_checks_total", result="success") or 0
    check(after - before >= 3, f"healthy again after {after - before} passed checks, not the 3 of --health-rise")


def accepted(lb, client_port):
    """True once the balancer process holds the server side of our connection (accept() ran)."""
    inode = None
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == lb.port and int(fields[2].rsplit(":", 1)[1], 16) == client_port:
                inode = fields[9]
    fd_dir = f"/proc/{lb.proc.pid}/fd"
    return inode is not None and any(os.readlink(os.path.join(fd_dir, fd)) == f"socket:[{inode}]"
                                     for fd in os.listdir(fd_dir))


@test
def our_own_descriptor_exhaustion_is_never_charged_to_an_instance():
    w = Worker("fds")
    lb = Balancer([w.address], args=["--max-failures", "1"])
    lb.wait_healthy(1)
    # A client connection accepted before the shortage; its request then needs a new socket to
    # the worker (nothing was pooled yet).
    conn = http.client.HTTPConnection("127.0.0.1", lb.port, timeout=10)
    conn.connect()
    wait_for(lambda: accepted(lb, conn.sock.getsockname()[1]), 10, "client connection accepted")
    body = b'{"jsonrpc":"2.0","id":1,"method":"components/execute","params":{"component":"/echo","input":1}}'
    headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
    soft, hard = resource.prlimit(lb.proc.pid, resource.RLIMIT_NOFILE)
    # No new descriptor at all: every socket() fails with EMFILE; open ones keep working.
    resource.prlimit(lb.proc.pid, resource.RLIMIT_NOFILE, (0, hard))
    try:
        wait_for(lambda: len(lb.logs("health check not run: no resources on our side")) >= 3, 10,
                 "health checks skipped for want of descriptors")
        conn.request("POST", "/", body, headers)
        r = conn.getresponse()
        r.read()
        check(r.status == 503, f"a request that could not get a socket: {r.status}")
    finally:
        resource.prlimit(lb.proc.pid, resource.RLIMIT_NOFILE, (soft, hard))
    conn.close()
    check(not lb.logs("instance marked unhealthy"), "an instance was charged for our descriptor shortage")
    check(state(lb, w) == "healthy", lb.backend(w.address))


def refused(lb, worker):
    b = lb.backend(worker.address) or {}
    return b if b.get("state") == "refused" else None


@test
def unusable_instance_ids_are_refused_and_never_routed():
    bad = [Worker("sp", extra=["--instance-id", "has space"]),
           Worker("ctl", extra=["--instance-id", "a\r\nX-Injected: 1"]),
           Worker("long", extra=["--instance-id", "x" * 254]),
           Worker("none", extra=["--omit-instance-id"])]
    good = Worker("good")
    lb = Balancer([w.address for w in bad] + [good.address])
    lb.wait_healthy(1)
    for w in bad:
        b = wait_for(lambda: refused(lb, w), 10, f"{w.name} refused")
        check(b["instanceId"] is None, b)
        check("instanceId" in (b["lastError"] or ""), b)
    missing = lb.backend(bad[3].address)
    check("names no instanceId" in missing["lastError"], missing)
    errors = wait_for(lambda: len(lb.logs("worker's instanceId refused: instance not routable")) >= 4 and
                      lb.logs("worker's instanceId refused: instance not routable"), 5, "4 refusals logged")
    check(len(errors) == 4 and all(e["level"] == "error" for e in errors), errors)
    good_id = good.instance_id
    for i in range(12):
        r = lb.execute("/echo", {"i": i})
        check(r.status == 200, f"echo {i}: {r.status}")
        check(r.headers.get("x-stepflow-routed-instance") == good_id, r.headers)
    # A pinned request naming the bad id finds no such instance.
    r = lb.execute("/echo", {}, headers={"Stepflow-Instance-Id": "has space"})
    check(r.status == 503, f"pinned to a refused id: {r.status}")


@test
def an_instance_whose_id_turns_unusable_leaves_the_fleet():
    w = Worker("turn", extra=["--instance-id", "ok-id"])
    lb = Balancer([w.address], args=["--cold-start-timeout", "0"])  # the 503 at once, not a held request
    lb.wait_healthy(1)
    w.stop()
    w2 = Worker("turn2", port=w.port, extra=["--omit-instance-id"])
    wait_for(lambda: refused(lb, w2), 10, "restarted worker without an id refused")
    r = lb.execute("/echo", {})
    check(r.status == 503, f"no routable instance left: {r.status}")


run_tests()
