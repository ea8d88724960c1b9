"""Kubernetes discovery end to end: the real stepflow-lb binary watching the API server stand-in
(tests/k8s/fake_apiserver.py, TLS + token) while real example workers play the pods.

Each "pod" is an example worker on its own loopback address (127.0.0.2, 127.0.0.3, ...) and one
common port, as pods of a Deployment are; the slices list those addresses. Every wait polls a
condition against a deadline.
"""

import os
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "k8s"))

import harness  # noqa: E402
from harness import Balancer, check, test, wait_for, run_tests  # noqa: E402
from fake_apiserver import FakeApiServer, endpoint  # noqa: E402

client = harness.client


class Pod:
    def __init__(self, name, ip, worker):
        self.name, self.ip, self.worker = name, ip, worker
        self.ready, self.serving, self.terminating = True, True, False

    @property
    def address(self):
        return "%s:%d" % (self.ip, self.worker.port)

    def endpoint(self):
        return endpoint(self.ip, self.name, ready=self.ready, serving=self.serving, terminating=self.terminating)


class Cluster:
    """Worker pods behind one Service whose endpoints are spread over several slices."""

    def __init__(self, api, service="workers"):
        self.api, self.service = api, service
        self.port = None
        self.pods = {}
        self.slices = {}  # slice name -> [pod names]
        self._next_ip = 2

    def add_pod(self, name, slice_name="workers-a", write=True):
        for _ in range(20):
            ip = "127.0.0.%d" % self._next_ip
            self._next_ip += 1
            try:
                w = harness.Worker(name, extra=["--host", ip, "--port", str(self.port or 0)])
                break
            except RuntimeError:
                continue  # that address:port was taken: try the next address
        else:
            raise RuntimeError("no free loopback address for a worker")
        self.port = self.port or w.port
        pod = Pod(name, ip, w)
        self.pods[name] = pod
        self.slices.setdefault(slice_name, []).append(name)
        if write:
            self.write(slice_name)
        return pod

    def write(self, slice_name):
        self.api.put_slice(slice_name, [self.pods[n].endpoint() for n in self.slices[slice_name]],
                           port=self.port, service=self.service)

    def slice_of(self, pod_name):
        return next(s for s, names in self.slices.items() if pod_name in names)

    def set_conditions(self, name, ready, serving, terminating):
        p = self.pods[name]
        p.ready, p.serving, p.terminating = ready, serving, terminating
        self.write(self.slice_of(name))

    def remove(self, name):
        s = self.slice_of(name)
        self.slices[s].remove(name)
        self.write(s)


def start(pods=2, slices=1, api=None, extra=None, wait_healthy=True):
    api = api or FakeApiServer().start()
    cluster = Cluster(api)
    for i in range(pods):
        cluster.add_pod("pod-%d" % i, "workers-%d" % (i % slices))
    lb = Balancer(args=api.balancer_args(extra=extra), wait_ready=False)
    if wait_healthy and pods:
        lb.wait_healthy(pods)
    return api, cluster, lb


def state_of(lb, pod):
    b = lb.backend(pod.address)
    return b["state"] if b else None


def spread(lb, n=8, ms=300):
    """n concurrent /sleep executions: the instance ids that served them (least-load spreads them)."""
    ids, errors = [], []

    def one():
        try:
            r = lb.execute("/sleep", {"ms": ms})
            if r.status == 200:
                ids.append(r.json()["result"]["instanceId"])
            else:
                errors.append(r.status)
        except Exception as e:  # reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    check(not errors, "requests failed: %r" % errors)
    return ids


def instance_of(lb, pod):
    return wait_for(lambda: (lb.backend(pod.address) or {}).get("instanceId"), 10, "instance id of " + pod.name)


@test
def series_of_a_backend_that_left_are_removed_from_metrics():
    # Rolling updates replace pods all week: series labelled with a gone backend must not pile up.
    api, cluster, lb = start(pods=2)
    spread(lb, 8)
    gone = cluster.pods["pod-0"]
    label = 'backend="%s"' % gone.address
    text = lb.metrics_text()
    check(any(l.startswith("stepflow_lb_requests_total{") and label in l for l in text.splitlines()),
          "requests_total has a series for pod-0 before it leaves")
    cluster.remove("pod-0")
    wait_for(lambda: lb.backend(gone.address) is None, 5, "pod-0 to leave the fleet")
    wait_for(lambda: label not in lb.metrics_text(), 5, "every series of pod-0 removed from /metrics")
    spread(lb, 4)  # the remaining pod still counts
    check('backend="%s"' % cluster.pods["pod-1"].address in lb.metrics_text(), "pod-1's series kept")


@test
def scale_up_then_down():
    api, cluster, lb = start(pods=2)
    p2 = cluster.add_pod("pod-2")
    lb.wait_healthy(3)
    b = lb.backend(p2.address)
    check(b["pod"] == "pod-2", "pod name from targetRef in /debug/backends: %r" % b)
    new_id = instance_of(lb, p2)
    check(new_id in spread(lb, 9), "new pod got no work")
    gone = cluster.pods["pod-0"]
    gone_id = instance_of(lb, gone)
    cluster.remove("pod-0")
    wait_for(lambda: lb.backend(gone.address) is None, 5, "pod-0 to leave the fleet")
    check(gone_id not in spread(lb, 8), "removed pod still got work")
    wait_for(lambda: any(r.get("pod") == "pod-0" for r in lb.logs("backend removed")), 5, "pod name in the removal log")
    check(lb.metric("stepflow_lb_backend_pool_size") == 2, "pool size follows the fleet")


@test
def pod_not_ready_gets_no_traffic():
    api, cluster, lb = start(pods=2)
    p0 = cluster.pods["pod-0"]
    p0_id = instance_of(lb, p0)
    cluster.set_conditions("pod-0", ready=False, serving=False, terminating=False)
    wait_for(lambda: state_of(lb, p0) == "not-serving", 5, "pod-0 not serving")
    check(p0_id not in spread(lb, 4), "a not-ready pod got work")
    cluster.set_conditions("pod-0", ready=True, serving=True, terminating=False)
    wait_for(lambda: state_of(lb, p0) == "healthy", 5, "pod-0 ready again")


@test
def terminating_but_serving_finishes_pinned_session():
    api, cluster, lb = start(pods=2)
    ids = {instance_of(lb, p): p for p in cluster.pods.values()}
    seen = {}

    def answer(req):
        step = (req.get("params") or {}).get("step")
        if not seen:
            # The session's pod starts terminating while it waits for our first answer.
            busy = [b for b in lb.backends() if b["inFlight"] > 0]
            check(len(busy) == 1, "exactly one pod holds the session: %r" % busy)
            pod = ids[busy[0]["instanceId"]]
            seen["pod"] = pod
            cluster.set_conditions(pod.name, ready=False, serving=True, terminating=True)
            wait_for(lambda: state_of(lb, pod) == "draining", 5, "session pod draining")
            other = [i for i in ids if i != busy[0]["instanceId"]]
            seen["unpinned"] = spread(lb, 4, ms=50)
            seen["other"] = other[0]
        return {"runId": "run-%s" % step, "step": step}

    result = lb.session(3, answer=answer, timeout=30)
    check(result.ok, "pinned session completed through the draining pod: %r" % result)
    check(result.callback_statuses == [202, 202, 202], "every callback reached the draining pod")
    check(set(seen["unpinned"]) == {seen["other"]}, "no new work on the draining pod: %r" % seen["unpinned"])
    # When it disappears from the slices, it leaves the fleet.
    cluster.remove(seen["pod"].name)
    wait_for(lambda: lb.backend(seen["pod"].address) is None, 5, "draining pod to leave")


@test
def deleted_pod_pinned_request_gets_503():
    api, cluster, lb = start(pods=2)
    p1 = cluster.pods["pod-1"]
    p1_id = instance_of(lb, p1)
    # A stream open on pod-1 when it leaves the slices still finishes cleanly.
    reader = client.SseReader("127.0.0.1", lb.port, {"jsonrpc": "2.0", "id": 1, "method": "components/execute",
                                                     "params": {"component": "/stream",
                                                                "input": {"events": 3, "interval_ms": 300}}},
                              headers={"Stepflow-Instance-Id": p1_id}, timeout=20)
    check(reader.is_sse, "stream started")
    cluster.remove("pod-1")
    wait_for(lambda: lb.backend(p1.address) is None, 5, "pod-1 to leave")
    r = lb.post({"jsonrpc": "2.0", "id": 7, "result": {}}, headers={"Stepflow-Instance-Id": p1_id})
    check(r.status == 503, "pinned request to a deleted pod: %r" % (r,))
    body = r.json()
    check(body["error"]["code"] == -32000 and p1_id in str(body["error"].get("data")), "JSON-RPC error: %r" % body)
    check(r.headers.get("retry-after") is not None, "Retry-After on the 503")
    events = list(reader)
    check(not reader.ended_abnormally and events, "the open stream finished cleanly: %r" % reader.error)


@test
def relist_after_410_mid_stream_and_at_watch_start():
    api, cluster, lb = start(pods=1)
    lists_before = api.count("list")
    # Mid-stream: the open watch gets an ERROR 410 event; a change lands meanwhile.
    api.expire_watches()
    p1 = cluster.add_pod("pod-1")
    lb.wait_healthy(2)
    wait_for(lambda: api.count("list") > lists_before, 5, "a relist")
    # At watch start: the stream breaks and history is compacted, so the re-watch from the last
    # version is refused (first as an ERROR event, then as an HTTP 410).
    for http_410 in (False, True):
        api.http_410_at_watch = http_410
        lists = api.count("list")
        since = time.monotonic()
        api.compact()
        api.drop_watches()
        wait_for(lambda: api.count("list", since=since) >= 1, 5, "relist after a 410 at watch start")
        api.wait_watching(5, since=since)
    check(lb.metric("stepflow_lb_k8s_relists_total") >= 3, "relists counted")
    cluster.remove("pod-0")
    wait_for(lambda: lb.backend(cluster.pods["pod-0"].address) is None, 5, "changes still followed")
    check(lb.backend(p1.address) is not None, "pod-1 kept")


@test
def api_outage_keeps_last_fleet_then_recovers():
    api, cluster, lb = start(pods=2)
    api.set_outage("refuse")
    since = time.monotonic()
    deadline = since + 3
    served = 0
    while time.monotonic() < deadline:
        r = lb.execute("/echo", {"n": served})
        check(r.status == 200, "routing continues during the outage: %r" % (r,))
        served += 1
    check(len(lb.backends()) == 2, "fleet kept")
    attempts = api.count("refused", since=since)
    check(1 <= attempts <= 8, "backoff bounds API calls during a 3 s outage: %d" % attempts)
    check((lb.metric("stepflow_lb_k8s_api_errors_total", code="network") or 0) >= 1, "network errors counted")
    # 5xx during the outage's second half, then recovery.
    api.set_outage(503)
    wait_for(lambda: api.count("list", status=503) + api.count("watch", status=503) >= 1, 15, "a 503 answer")
    api.set_outage(None)
    cluster.add_pod("pod-2")
    lb.wait_healthy(3, timeout=20)
    check((lb.metric("stepflow_lb_k8s_api_errors_total", code="503") or 0) >= 1, "503 counted")
    check(lb.metric("stepflow_lb_k8s_watch_restarts_total") >= 1, "watch restarts counted")


@test
def token_rotation():
    api, cluster, lb = start(pods=1)
    api.set_token("token-2")  # the file is rewritten and only the new token is accepted
    since = time.monotonic()
    api.drop_watches()
    api.wait_watching(10, since=since)
    cluster.add_pod("pod-1")
    lb.wait_healthy(2)
    with api.cond:
        recent = [r for r in api.requests if r["time"] >= since and r["kind"] in ("list", "watch")]
    check(recent and recent[-1]["token"] == "token-2", "new token in use: %r" % recent[-3:])
    check(api.count(status=401, since=since) <= 2, "at most a retry or two on 401")


@test
def errors_500_and_429_back_off_and_honour_retry_after():
    api = FakeApiServer().start()
    api.fail_next(500, kind="list")
    api.fail_next(429, kind="list", retry_after=1)
    api.fail_next(500, kind="watch")
    t0 = time.monotonic()
    api_, cluster, lb = start(pods=1, api=api)
    with api.cond:
        lists = [r for r in api.requests if r["kind"] == "list"]
    check([r["status"] for r in lists[:3]] == [500, 429, 200], "list answers: %r" % [r["status"] for r in lists])
    check(lists[2]["time"] - lists[1]["time"] >= 0.95, "Retry-After honoured: %.3f" % (lists[2]["time"] - lists[1]["time"]))
    wait_for(lambda: api.count("watch", status=500) == 1 and api.count("watch", status=200) >= 1, 5, "watch retried")
    check(lb.metric("stepflow_lb_k8s_api_errors_total", code="429") == 1, "429 counted")
    check(lb.metric("stepflow_lb_k8s_api_errors_total", code="500") == 2, "500s counted")
    check(lb.metric("stepflow_lb_discovery_operations_total", operation="list", result="error") == 2, "list errors")
    check(time.monotonic() - t0 < 10, "synced quickly")


@test
def pages_several_slices_split_events_and_moves():
    api = FakeApiServer().start()
    api.page_size = 1
    api.split_events = True
    api_, cluster, lb = start(pods=3, slices=3, api=api)
    check(api.count("list") >= 3, "paginated list")
    check(lb.metric("stepflow_lb_k8s_last_sync_timestamp_seconds") > time.time() - 60, "last sync time set")
    # pod-0 moves from workers-0 to workers-1 in two writes: added there first, then removed here.
    p0 = cluster.pods["pod-0"]
    cluster.slices["workers-1"].append("pod-0")
    cluster.write("workers-1")
    cluster.slices["workers-0"].remove("pod-0")
    cluster.write("workers-0")
    api.delete_slice("workers-0")
    cluster.add_pod("pod-3", "workers-2")
    lb.wait_healthy(4)
    check(lb.backend(p0.address)["state"] == "healthy", "moved pod kept")
    check(not [r for r in lb.logs("backend removed") if r.get("pod") == "pod-0"], "moved pod never left the fleet")
    check((lb.metric("stepflow_lb_k8s_watch_events_total", type="MODIFIED") or 0) >= 2, "events counted")
    check((lb.metric("stepflow_lb_k8s_watch_events_total", type="DELETED") or 0) >= 1, "deletes counted")


@test
def list_pages_and_watch_share_one_kept_alive_connection():
    api = FakeApiServer().start()
    api.page_size = 1
    for i in range(30):
        api.put_slice("extra-%02d" % i, [endpoint("10.1.%d.1" % i)], port=1, service="other")  # other Services' slices
    api_, cluster, lb = start(pods=12, slices=12, api=api)
    api.wait_watching()
    lists = [r for r in api.requests if r["kind"] == "list"]
    check(len(lists) >= 12, "a list of many pages: %d" % len(lists))
    conns = {r["conn"] for r in api.requests if r["kind"] in ("list", "watch")}
    check(len(conns) == 1, "%d list pages and the watch on one connection, not %d" % (len(lists), len(conns)))
    check(api.connections == 1, "one TLS connection accepted, not %d" % api.connections)
    # The server now closes every connection after its answer without saying so (as an idle
    # timeout does): the balancer dials again whenever it finds its kept connection closed.
    api.close_after_response = True
    since = time.monotonic()
    api.compact()
    api.expire_watches()  # 410: relist all pages, each on a fresh connection
    cluster.add_pod("pod-12", "workers-3")
    lb.wait_healthy(13)
    relisted = [r for r in api.requests if r["kind"] == "list" and r["time"] >= since]
    check(len(relisted) >= 12 and all(r["status"] == 200 for r in relisted), "relisted page by page: %r" % relisted)
    check(not lb.logs("kubernetes API request failed"), "no failed request: %r" % lb.logs("kubernetes API request failed"))


@test
def bookmarks_move_the_rewatch_version():
    api, cluster, lb = start(pods=1)
    api.put_slice("unrelated", [endpoint("10.9.9.9")], port=1, service="other")  # not ours: only moves the version
    since = time.monotonic()
    api.send_bookmarks()
    wait_for(lambda: (lb.metric("stepflow_lb_k8s_watch_events_total", type="BOOKMARK") or 0) >= 1, 5, "a bookmark")
    api.end_watches()  # clean end, as timeoutSeconds does
    api.wait_watching(5, since=since)
    with api.cond:
        last = [r for r in api.requests if r["kind"] == "watch"][-1]
    check("resourceVersion=%d" % api.rv in last["path"], "re-watch from the bookmark: %s" % last["path"])
    check(api.count("list", since=since) == 0, "no relist needed")
    for i in range(6):  # a few more watches, to see their timeout vary
        since = time.monotonic()
        api.send_bookmarks()  # a watch that carried something is renewed at once
        wait_for(lambda: lb.metric("stepflow_lb_k8s_watch_events_total", type="BOOKMARK") >= i + 2, 5, "bookmark")
        api.end_watches()
        api.wait_watching(5, since=since)
    with api.cond:
        asked = [int(r["path"].split("timeoutSeconds=")[1].split("&")[0]) for r in api.requests if r["kind"] == "watch"]
    check(len(asked) >= 8 and all(290 <= t <= 580 for t in asked), f"each watch asks for 1 to 2 times 290 s: {asked}")
    check(len(set(asked)) > 1, f"drawn anew for each watch: {asked}")


@test
def port_selection():
    api = FakeApiServer().start()
    cluster = Cluster(api)
    p = cluster.add_pod("pod-0", write=False)
    api.put_slice("workers-0", [p.endpoint()], ports=[("http", p.worker.port), ("metrics", 1)])
    lb = Balancer(args=api.balancer_args(), wait_ready=False)
    code = lb.wait_exit(10)
    check(code == 2, "ambiguous port is a start-up error (exit %r)" % code)
    check("--port-name" in lb.log_text(), "the message names the flag: " + lb.log_text())
    lb2 = Balancer(args=api.balancer_args(extra=["--port-name", "http"]), wait_ready=False)
    lb2.wait_healthy(1)
    lb3 = Balancer(args=api.balancer_args(extra=["--port", str(p.worker.port)]), wait_ready=False)
    lb3.wait_healthy(1)


@test
def endpoints_api_fallback():
    api = FakeApiServer().start()
    cluster = Cluster(api)
    a = cluster.add_pod("pod-a", write=False)
    b = cluster.add_pod("pod-b", write=False)
    port = cluster.port
    api.put_endpoints("workers", [{"addresses": [{"ip": a.ip, "targetRef": {"kind": "Pod", "name": "pod-a"}}],
                                   "notReadyAddresses": [{"ip": b.ip, "targetRef": {"kind": "Pod", "name": "pod-b"}}],
                                   "ports": [{"name": "http", "port": port, "protocol": "TCP"},
                                             {"name": "admin", "port": 1, "protocol": "TCP"}]}])
    api.put_endpoints("other", [{"addresses": [{"ip": "10.0.0.1"}], "ports": [{"name": "http", "port": 1}]}])
    lb = Balancer(args=api.balancer_args(extra=["--k8s-api", "endpoints", "--port-name", "http"]), wait_ready=False)
    lb.wait_healthy(1)
    check(state_of(lb, b) == "not-serving", "notReadyAddresses take no traffic")
    check(lb.backend(a.address)["pod"] == "pod-a", "pod name")
    check(len(lb.backends()) == 2, "only the named Endpoints object")
    api.put_endpoints("workers", [{"addresses": [{"ip": a.ip}, {"ip": b.ip}],
                                   "ports": [{"name": "http", "port": port}]}])
    lb.wait_healthy(2)
    api.delete_endpoints("workers")
    wait_for(lambda: lb.backends() == [], 5, "fleet empty after the Endpoints object is deleted")


@test
def plain_http_without_token_and_ipv6():
    api = FakeApiServer(tls=False, token=None).start()
    w = harness.Worker("v6", extra=["--host", "::1"])
    api.put_slice("workers-v6", [endpoint("::1", "pod-v6")], port=w.port, address_type="IPv6")
    lb = Balancer(args=api.balancer_args(), wait_ready=False)
    lb.wait_healthy(1)
    check(lb.backends()[0]["address"] == "[::1]:%d" % w.port, "IPv6 address: %r" % lb.backends())
    r = lb.execute("/echo", {"v": 6})
    check(r.status == 200, "routed over IPv6")
    check(all(req["token"] is None for req in api.requests), "no token sent")


if __name__ == "__main__":
    run_tests()
