"""Local port exhaustion is our shortage, not the worker's failure (issue 15 point 2).

When every local port towards a worker is taken, connect() fails at once with EADDRNOTAVAIL. That
says nothing about the worker, so the request gets 503 `socket-failed` and the instance stays
healthy. The test runs in its own network namespace (unshare as an unprivileged user) so that it
can shrink net.ipv4.ip_local_port_range to two ports without touching the machine's settings."""

import json
import os
import shutil
import socket
import subprocess
import sys

IN_NAMESPACE = "STEPFLOW_LB_TEST_NETNS"

if os.environ.get(IN_NAMESPACE) != "1":
    # Re-run this file inside a fresh user + network namespace, where only loopback exists.
    unshare = shutil.which("unshare")
    if unshare is None:
        print("FAIL  unshare (util-linux) is not installed: run scripts/install-deps.sh test")
        print("0 passed, 1 failed")
        sys.exit(1)
    env = dict(os.environ, **{IN_NAMESPACE: "1"})
    sys.exit(subprocess.call([unshare, "--net", "--map-root-user", sys.executable, os.path.abspath(__file__)]
                             + sys.argv[1:], env=env))

from harness import Balancer, Worker, check, client, run_tests, test, wait_for  # noqa: E402

HOLD = {"jsonrpc": "2.0", "id": "hold", "method": "components/execute",
        "params": {"component": "/stream", "input": {"events": 1, "interval_ms": 0, "hold": True}}}
PORT_RANGE = "/proc/sys/net/ipv4/ip_local_port_range"


def bring_up_loopback():
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)


def set_port_range(low, high):
    with open(PORT_RANGE, "w") as f:
        f.write(f"{low} {high}")


class BoundConnection(client.HttpConnection):
    """A client connection from a chosen local port: the two ephemeral ones are taken."""

    def __init__(self, port, local_port):
        super().__init__("127.0.0.1", port, timeout=30)
        self.local_port = local_port

    def connect(self):
        self.close()
        self.sock = socket.create_connection((self.host, self.port), timeout=self.timeout,
                                             source_address=("127.0.0.1", self.local_port))
        self.requests_sent = 0


def execute_from_port(port, local_port, rpc_id):
    body = json.dumps({"jsonrpc": "2.0", "id": rpc_id, "method": "components/execute",
                       "params": {"component": "/echo", "input": {"x": 1}}}).encode()
    with BoundConnection(port, local_port) as conn:
        return conn.request("POST", "/", body, {"Content-Type": "application/json"})


@test
def exhausted_local_ports_answer_503_without_charging_the_worker():
    bring_up_loopback()
    w = Worker("ports")
    # One failure would take the instance out if it were charged; no active check runs again.
    lb = Balancer([w.address], args=["--health-interval", "1h", "--health-timeout", "2s",
                                     "--max-failures", "1", "--threads", "1"])
    lb.wait_healthy(1)
    # Above the default range (32768-60999) the listeners took their ports from, so no clash.
    low = 61000
    # From here on, connect() has two local ports per destination. Other destinations (the
    # balancer's own ports, from this test) can use the same two ports, so only the balancer's
    # connections to the worker run short.
    set_port_range(low, low + 1)
    held = [client.SseReader("127.0.0.1", lb.port, dict(HOLD, id=f"hold-{i}")) for i in range(2)]
    for r in held:
        check(r.next_event(timeout=10) is not None, "a held stream started")
    wait_for(lambda: lb.backends()[0]["inFlight"] == 2, 10, "both streams in flight")

    third = execute_from_port(lb.port, low + 2, "third")
    check(third.status == 503, f"no local port: 503, got {third.status} {third.body!r}")
    body = third.json()
    check(body.get("id") == "third", f"the 503 echoes the id: {body}")
    check(body["error"]["data"]["reason"] == "socket-failed", f"reason socket-failed: {body}")
    b = lb.backends()[0]
    check(b["state"] == "healthy" and b["routable"] and b["consecutiveFailures"] == 0, f"the worker was not charged: {b}")

    for r in held:
        r.close()
    wait_for(lambda: lb.backends()[0]["inFlight"] == 0, 10, "the streams ended")
    set_port_range(32768, 60999)
    again = lb.execute("/echo", {"x": 2}, id="again", timeout=30)
    check(again.status == 200, f"ports free again: the worker answers, got {again.status}")


def post_from_port(port, local_port, rpc_id, headers):
    body = json.dumps({"jsonrpc": "2.0", "id": rpc_id, "result": {"ok": True}}).encode()
    with BoundConnection(port, local_port) as conn:
        return conn.request("POST", "/", body, {"Content-Type": "application/json", **headers})


@test
def a_pinned_request_meeting_our_port_shortage_is_told_it_is_ours():
    """Issue 21 point 7: pinned work is tried once more after our own shortage, then answered
    with a message naming the balancer's shortage, not "Instance not available" (on which the
    orchestrator abandons the step)."""
    bring_up_loopback()
    w = Worker("ports-pin")
    lb = Balancer([w.address], args=["--health-interval", "1h", "--health-timeout", "2s",
                                     "--max-failures", "1", "--threads", "1"])
    lb.wait_healthy(1)
    iid = w.instance_id
    low = 61100
    set_port_range(low, low + 1)
    try:
        held = [client.SseReader("127.0.0.1", lb.port, dict(HOLD, id=f"hold-{i}")) for i in range(2)]
        for r in held:
            check(r.next_event(timeout=10) is not None, "a held stream started")
        wait_for(lambda: lb.backends()[0]["inFlight"] == 2, 10, "both streams in flight")
        r = post_from_port(lb.port, low + 2, "cb-1", {"Stepflow-Instance-Id": iid})
        check(r.status == 503, f"503, got {r.status} {r.body!r}")
        err = r.json()["error"]
        check(r.json()["id"] == "cb-1", f"the id is echoed: {r.body!r}")
        check(err["code"] == -32003 and err["message"] != "Instance not available"
              and "Balancer" in err["message"], f"names our shortage: {err}")
        check(err["data"]["reason"] == "socket-failed", err)
        b = lb.backends()[0]
        check(b["state"] == "healthy" and b["consecutiveFailures"] == 0, f"the worker was not charged: {b}")
        for h in held:
            h.close()
    finally:
        set_port_range(32768, 60999)


run_tests()
