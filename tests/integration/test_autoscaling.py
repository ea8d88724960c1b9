"""Demand drives the fleet (issue 24, docs/autoscaling.md): a balancer whose fleet is empty stays
ready, holds new work until the first instance is routable, and tells KEDA's external scaler at
once; GetMetrics sums the demand over replicas.

Real parts throughout: the balancer binary, example workers, the Kubernetes API stand-in
(tests/k8s/fake_apiserver.py) and a real gRPC client (Debian's python3-grpcio, run with
/usr/bin/python3; stubs generated from proxy/externalscaler.proto at each run). Every wait polls a
condition to a deadline.
"""

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "k8s"))

import harness  # noqa: E402
from harness import Balancer, Worker, check, test, wait_for, run_tests  # noqa: E402
from fake_apiserver import FakeApiServer, endpoint  # noqa: E402

client = harness.client
SYSTEM_PYTHON = "/usr/bin/python3"
SCALER_CLIENT = os.path.join(HERE, "scaler_client.py")


def scaler(lb, *args):
    """Runs one scaler_client.py command against `lb` and returns its output line, parsed."""
    out = subprocess.run([SYSTEM_PYTHON, SCALER_CLIENT, "127.0.0.1:%d" % lb.scaler_port, *args],
                         capture_output=True, text=True, timeout=30)
    if out.returncode != 0:
        raise AssertionError("scaler client failed: " + out.stderr[-2000:])
    line = out.stdout.strip().splitlines()[-1]
    return json.loads(line) if line[:1] in "[{" else line


class Stream:
    """StreamIsActive, held open by a gRPC client process; lines arrive on a queue."""

    def __init__(self, lb):
        self.proc = subprocess.Popen([SYSTEM_PYTHON, SCALER_CLIENT, "127.0.0.1:%d" % lb.scaler_port, "stream"],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        harness._started.append(self.proc)
        self.lines = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.put(line.strip())

    def next(self, timeout=10):
        try:
            return self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError("no StreamIsActive message within %ss" % timeout)

    def wait_for(self, want, timeout=10):
        while True:
            line = self.next(timeout)
            if line == want:
                return

    def close(self):
        self.proc.kill()
        self.proc.wait(timeout=10)


def with_scaler(lb_args):
    return lb_args + ["--scaler-listen", "127.0.0.1:0"]


def scaler_port(lb):
    return int(lb.logs("listening")[0]["scaler"].rsplit(":", 1)[1])


def balancer(api, extra=None, **kw):
    lb = Balancer(args=with_scaler(api.balancer_args(extra=extra)), wait_ready=False, **kw)
    lb.scaler_port = scaler_port(lb)
    return lb


def in_thread(fn):
    result = {}

    def run():
        try:
            result["value"] = fn()
        except Exception as e:  # noqa: BLE001 - reported by the caller's check
            result["error"] = e
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, result


def held(lb, count):
    return lambda: (lb.metric("stepflow_lb_queue_depth") or 0) >= count


# --------------------------------------------------------------------------- readiness

@test
def ready_with_an_empty_fleet_and_503_on_sigterm():
    api = FakeApiServer().start()
    try:
        api.put_slice("workers-a", [], port=9)
        lb = Balancer(args=api.balancer_args(), wait_ready=False)
        wait_for(lambda: lb.ready()[0] == 200, 10, "/ready 200 once discovery synced")
        status, body = lb.ready()
        check(body["healthyInstances"] == 0 and body["notRoutable"] == [] and body["discoverySynced"], body)
        lb.signal(signal.SIGTERM)
        wait_for(lambda: lb.proc.poll() is not None or lb.ready()[0] == 503, 5, "/ready 503 on SIGTERM")
        lb.wait_exit(30)
    finally:
        api.stop()


@test
def ready_requires_instance_keeps_the_old_meaning():
    api = FakeApiServer().start()
    w = Worker("old-ready")
    try:
        api.put_slice("workers-a", [], port=w.port)
        lb = Balancer(args=api.balancer_args(extra=["--ready-requires-instance"]), wait_ready=False)
        wait_for(lambda: lb.ready()[1].get("discoverySynced"), 10, "discovery synced")
        check(lb.ready()[0] == 503, "503 with no instance")
        api.put_slice("workers-a", [endpoint("127.0.0.1", "pod-0")], port=w.port)
        wait_for(lambda: lb.ready()[0] == 200, 10, "200 once an instance is routable")
    finally:
        api.stop()


# --------------------------------------------------------------------------- scale from zero

@test
def held_request_wakes_the_scaler_and_completes_on_the_first_instance():
    api = FakeApiServer().start()
    try:
        api.put_slice("workers-a", [], port=9)
        # One health check only (the first, when the endpoint appears), and a rise of 5: the new
        # instance must be routable after that single check (rise is for recovering instances).
        lb = balancer(api, extra=["--health-interval", "1h", "--health-rise", "5"])
        wait_for(lambda: lb.ready()[0] == 200, 10, "ready with an empty fleet")
        stream = Stream(lb)
        stream.wait_for("open")
        check(stream.next() == "active false", "nothing waits yet")
        t, result = in_thread(lambda: lb.execute("/echo", {"wake": 1}, id="cold-1", timeout=30))
        stream.wait_for("active true", timeout=5)  # pushed when the request is held, not at a poll
        check(scaler(lb, "isactive") == {"result": True}, "IsActive while a request waits")
        check(lb.metric("stepflow_lb_cold_start_holds_total") == 1, lb.metric("stepflow_lb_cold_start_holds_total"))
        check(lb.metric("stepflow_lb_demand") == 1, lb.metric("stepflow_lb_demand"))
        # The "pod" becomes ready: a worker starts and its endpoint is published.
        w = Worker("woken")
        api.put_slice("workers-a", [endpoint("127.0.0.1", "pod-0")], port=w.port)
        t.join(20)
        check("value" in result, result)
        r = result["value"]
        check(r.status == 200 and r.json()["id"] == "cold-1", (r.status, r.body))
        check(r.json()["result"]["output"] == {"wake": 1}, r.body)
        wait_for(lambda: scaler(lb, "isactive") == {"result": False}, 10, "inactive once answered")
        stream.wait_for("active false", timeout=5)
        stream.close()
    finally:
        api.stop()


@test
def queue_timeout_and_queue_full_at_zero_answer_503_with_the_id():
    api = FakeApiServer().start()
    try:
        api.put_slice("workers-a", [], port=9)
        lb = Balancer(args=api.balancer_args(extra=["--cold-start-timeout", "300ms", "--queue-size", "1"]),
                      wait_ready=False)
        wait_for(lambda: lb.ready()[0] == 200, 10, "ready")
        r = lb.execute("/echo", {}, id="late-1", timeout=10)
        check(r.status == 503 and r.json()["id"] == "late-1", (r.status, r.body))
        check(r.headers.get("retry-after") is not None, r.headers)
        check(lb.metric("stepflow_lb_cold_start_timeouts_total") == 1, "counted")
        # One waits (the queue holds one), the next is refused at once.
        t, result = in_thread(lambda: lb.execute("/echo", {}, id="first", timeout=10))
        wait_for(held(lb, 1), 5, "one request held")
        r = lb.execute("/echo", {}, id="full-1", timeout=10)
        check(r.status == 503 and r.json()["id"] == "full-1", (r.status, r.body))
        check(lb.metric("stepflow_lb_queue_rejections_total", reason="queue-full") == 1, "queue-full counted")
        t.join(10)
        check(result["value"].status == 503 and result["value"].json()["id"] == "first", result)
    finally:
        api.stop()


@test
def pinned_work_for_a_missing_instance_fails_at_once():
    api = FakeApiServer().start()
    try:
        api.put_slice("workers-a", [], port=9)
        lb = Balancer(args=api.balancer_args(), wait_ready=False)
        wait_for(lambda: lb.ready()[0] == 200, 10, "ready")
        r = lb.post({"jsonrpc": "2.0", "id": "p1", "result": {}}, headers={"Stepflow-Instance-Id": "gone"}, timeout=5)
        check(r.status == 503 and r.json()["id"] == "p1", (r.status, r.body))
    finally:
        api.stop()


# --------------------------------------------------------------------------- demand over replicas

@test
def get_metrics_sums_demand_over_two_replicas():
    dead = Worker("dead")  # its address stays in both fleets, never routable: work is held
    port = dead.port
    dead.kill()
    backends = ["127.0.0.1:%d" % port]
    b = Balancer(backends, wait_ready=False)
    a = Balancer(backends, args=["--scaler-listen", "127.0.0.1:0", "--peers", "127.0.0.1:%d" % b.admin_port],
                 wait_ready=False)
    a.scaler_port = scaler_port(a)
    threads = [in_thread(lambda: b.execute("/echo", {}, timeout=30)) for _ in range(3)]
    wait_for(held(b, 3), 10, "three held at replica b")
    # Work waits only at the peer: a's stream starts from its own view, then the peers' demand.
    stream = Stream(a)
    stream.wait_for("open")
    check(stream.next() == "active false", "nothing waits at a itself")
    stream.wait_for("active true", timeout=10)
    stream.close()
    threads += [in_thread(lambda: a.execute("/echo", {}, timeout=30)) for _ in range(2)]
    wait_for(held(a, 2), 10, "two held at replica a")
    values = scaler(a, "metrics", "stepflow_lb_demand")
    print("    GetMetrics over two replicas:", values)
    check(values == [{"metricName": "stepflow_lb_demand", "metricValue": 5, "metricValueFloat": 5.0}], values)
    check(a.metric("stepflow_lb_scaler_peers_reached") == 1, "one peer reached")
    check(scaler(a, "isactive") == {"result": True}, "active")
    check(scaler(a, "spec", "4") == [{"metricName": "stepflow_lb_demand", "targetSize": 4}], "spec")
    check(scaler(a, "unknown") == "UNIMPLEMENTED", "StreamMetricSpec is not served")
    # A peer that is gone is left out, not waited for.
    b.proc.kill()
    b.proc.wait()
    values = scaler(a, "metrics", "stepflow_lb_demand")
    check(values[0]["metricValue"] == 2, values)
    check(a.metric("stepflow_lb_scaler_peers_reached") == 0, "no peer reached")
    a.proc.kill()  # its held requests would hold a drain for --drain-timeout
    a.proc.wait()



@test
def peers_found_through_the_balancers_own_service():
    # Two replicas share an admin port on two loopback addresses, as pods do; their own Service
    # "lb" lists both (port "metrics"). Replica a skips itself by pod name (its hostname).
    probe = socket.socket()
    probe.bind(("127.0.0.20", 0))
    port = probe.getsockname()[1]
    probe.close()
    api = FakeApiServer().start()
    try:
        api.put_slice("workers-a", [], port=9)
        api.put_slice("lb-a", [endpoint("127.0.0.20", socket.gethostname()), endpoint("127.0.0.21", "lb-b"),
                               endpoint("127.0.0.22", "lb-old", ready=False, serving=True, terminating=True)],
                      ports=[("http", 8080), ("metrics", port)], service="lb")
        # a's admin on 127.0.0.1 (the harness reads it there); its own entry is skipped by name anyway.
        b = Balancer(args=api.balancer_args(extra=["--admin-listen", "127.0.0.21:%d" % port]), wait_ready=False)
        a = balancer(api, extra=["--admin-listen", "127.0.0.1:%d" % port, "--peer-service", "lb"])
        wait_for(lambda: a.logs("balancer peers changed"), 10, "peers discovered")
        threads = [in_thread(lambda: a.execute("/echo", {}, timeout=30)) for _ in range(1)]
        threads += [in_thread(lambda: b.execute("/echo", {}, timeout=30)) for _ in range(2)]
        wait_for(held(a, 1), 10, "one held at replica a")
        b_demand = lambda: json.loads(urllib.request.urlopen("http://127.0.0.21:%d/demand" % port, timeout=5).read())
        wait_for(lambda: b_demand()["queued"] == 2, 10, "two held at replica b")
        values = scaler(a, "metrics", "stepflow_lb_demand")
        check(values[0]["metricValue"] == 3, values)
        check(a.metric("stepflow_lb_scaler_peers_reached") == 1, "one peer asked and reached (itself and the "
              "terminating replica left out)")
        check(a.metric("stepflow_lb_scaler_peer_queries_total", result="missed") == 0, "none missed")
        for lb in (a, b):
            lb.proc.kill()
            lb.proc.wait()
    finally:
        api.stop()


if __name__ == "__main__":
    run_tests()
