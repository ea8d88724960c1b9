"""Admission end to end (docs/admission.md): per-instance capacity, the shared queue, retries of new
work, pinned work bypassing both, and the JSON-RPC id echoed on every 503 the balancer writes.
Real binary, real example workers with a concurrency limit, loopback only."""

import concurrent.futures
import hashlib
import json
import socket
import struct
import subprocess
import threading
import time

from harness import Balancer, Worker, check, client, run_tests, test, wait_for
from raw_worker import read_request

HOLD = {"jsonrpc": "2.0", "id": "hold", "method": "components/execute",
        "params": {"component": "/stream", "input": {"events": 1, "interval_ms": 0, "hold": True}}}


def sleep_call(lb, i, ms=150, timeout=30):
    return lb.execute("/sleep", {"ms": ms}, id=f"call-{i}", timeout=timeout)


def at_capacity_seen(result):
    try:
        return result.json().get("error", {}).get("code") == -32300
    except ValueError:
        return False


def hold_slot(lb):
    r = client.SseReader("127.0.0.1", lb.port, HOLD)
    check(r.next_event(timeout=10) is not None, "held stream started")
    return r


@test
def a_burst_beyond_fleet_capacity_all_succeeds_without_overloading_a_worker():
    workers = [Worker(f"cap{i}", max_concurrency=2) for i in range(3)]
    lb = Balancer([w.address for w in workers])
    lb.wait_healthy(3)
    wait_for(lambda: all(b["limit"] == 2 and b["limitSource"] == "health" for b in lb.backends()), 10,
             "limits learned from /health")
    with concurrent.futures.ThreadPoolExecutor(24) as pool:
        results = list(pool.map(lambda i: sleep_call(lb, i), range(24)))
    statuses = [r.status for r in results]
    check(statuses.count(200) == 24, f"all 24 succeeded: {statuses}")
    check(not any(at_capacity_seen(r) for r in results), "no client saw -32300")
    for w in workers:
        h = w.health()
        # (A request sent at once on a freed slot could still meet a -32300 from a worker that frees
        # its slot after answering; it is retried, never shown.)
        check(h["maxInFlight"] <= 2, f"worker stayed within its limit: {h}")
    check(lb.metric("stepflow_lb_queue_wait_seconds_count") >= 1, "some requests waited in the queue")
    # Log lines leave in batches (up to 20 ms behind).
    wait_for(lambda: [x for x in lb.logs("request") if x.get("queue_wait_ms", 0) > 0], 5,
             "the access log records queue waits")


@test
def queue_full_and_queue_timeout_answer_503_with_the_id():
    w = Worker("qf", max_concurrency=8, extra=["--capacity-report", "none"])
    lb = Balancer([w.address], args=["--max-in-flight-per-instance", "1", "--queue-size", "1",
                                     "--queue-timeout", "1500ms"])
    lb.wait_healthy(1)
    held = hold_slot(lb)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        queued = pool.submit(lambda: lb.execute("/echo", {}, id="queued-1", timeout=20))
        wait_for(lambda: lb.metric("stepflow_lb_queue_depth") == 1, 10, "one request queued")
        full = lb.execute("/echo", {}, id=4242)
        body = full.json()
        check(full.status == 503 and body["id"] == 4242, f"queue full: 503 with the id: {full.status} {body}")
        check(body["error"]["data"]["reason"] == "queue-full" and "retry-after" in full.headers, body)
        timed_out = queued.result()
    body = timed_out.json()
    check(timed_out.status == 503 and body["id"] == "queued-1", f"queue timeout: 503 with the id: {body}")
    check(body["error"]["data"]["reason"] == "queue-timeout" and "retry-after" in timed_out.headers, body)
    check(lb.metric("stepflow_lb_queue_rejections_total", reason="queue-full") == 1, "queue-full counted")
    check(lb.metric("stepflow_lb_queue_rejections_total", reason="queue-timeout") == 1, "queue-timeout counted")
    check(w.health()["executions"] == 1, "neither rejected request reached the worker")
    held.close()


@test
def a_client_that_leaves_the_queue_is_never_dispatched():
    w = Worker("ql", max_concurrency=8, extra=["--capacity-report", "none"])
    lb = Balancer([w.address], args=["--max-in-flight-per-instance", "1"])
    lb.wait_healthy(1)
    held = hold_slot(lb)
    conn = client.HttpConnection("127.0.0.1", lb.port, 10)
    conn.send_request("POST", "/", json.dumps({"jsonrpc": "2.0", "id": "gone", "method": "components/execute",
                                               "params": {"component": "/echo", "input": {}}}).encode(),
                      {"Content-Type": "application/json"})
    wait_for(lambda: lb.metric("stepflow_lb_queue_depth") == 1, 10, "the request queued")
    conn.close(abort=True)
    wait_for(lambda: lb.metric("stepflow_lb_queue_depth") == 0, 5, "it left the queue at once")
    held.close()
    wait_for(lambda: lb.in_flight_total() == 0, 10, "the held slot freed")
    r = lb.execute("/echo", {}, id="after")
    check(r.status == 200, f"the next request runs: {r.status}")
    check(w.health()["executions"] == 2, f"the departed request never ran: {w.health()}")


@test
def callbacks_flow_while_every_slot_is_full():
    w = Worker("cb", max_concurrency=1)
    lb = Balancer([w.address])
    lb.wait_healthy(1)
    wait_for(lambda: lb.backends()[0]["limit"] == 1, 10, "limit 1 from /health")
    queued_seen = threading.Event()

    def answer_once_another_waits(req):
        # The first session answers its callbacks only while the second waits in the queue for
        # the only slot: the answers (pinned) must not queue behind it.
        if not queued_seen.is_set():
            wait_for(lambda: lb.metric("stepflow_lb_queue_depth") == 1, 10, "the second session queued")
            queued_seen.set()
        return client.default_answer(req)

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        first = pool.submit(lambda: lb.session(3, answer=answer_once_another_waits, timeout=30))
        wait_for(lambda: lb.backends()[0]["newWorkInFlight"] == 1, 10, "the first session holds the only slot")
        second = pool.submit(lambda: lb.session(2, timeout=30))
        a, b = first.result(), second.result()
    check(queued_seen.is_set(), "callbacks were answered while the slot was full and work was queued")
    check(a.ok and b.ok, f"both sessions completed, the second after queueing: {a} {b}")
    check(w.health()["atCapacity"] == 0, "the worker never answered -32300")


def raw_server(handle, backlog=64):
    """A loopback listener that hands each accepted connection to `handle` on a thread of its own;
    closing the returned socket stops it."""
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", 0))
    srv.listen(backlog)

    def serve():
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            threading.Thread(target=handle, args=(conn,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    return srv


def flaky_keepalive_server(instance_id):
    """A worker that answers one request per connection with keep-alive, then resets the
    connection when the next request arrives on it (either framing), without running it: to the
    balancer this is what a request meeting a connection the worker had closed looks like.
    A worker that read the request and then closed is another case (test_at_most_once.py)."""
    served = {"requests": 0}

    def handle(conn):
        buf, answered = b"", 0
        try:
            while True:
                got = read_request(conn, buf)
                if got is None:
                    return
                lines, _, _, buf = got
                if lines[0].startswith("GET /health"):
                    body = json.dumps({"status": "healthy", "instanceId": instance_id}).encode()
                else:
                    if answered >= 1:
                        # A reset, as the kernel sends for a request reaching a closed socket.
                        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                        return
                    answered += 1
                    served["requests"] += 1
                    body = json.dumps({"jsonrpc": "2.0", "id": 1, "result": {"flaky": True}}).encode()
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                             + str(len(body)).encode() + b"\r\n\r\n" + body)
        except OSError:
            pass
        finally:
            conn.close()

    return raw_server(handle), served


@test
def a_stale_pooled_connection_is_retried_not_answered_502():
    srv, served = flaky_keepalive_server("flaky-1")
    w = Worker("st")
    lb = Balancer([f"127.0.0.1:{srv.getsockname()[1]}", w.address], threads=1)
    lb.wait_healthy(2)
    statuses = []
    for i in range(12):
        r = lb.execute("/echo", {"i": i}, id=i)
        statuses.append(r.status)
    check(statuses.count(200) == 12, f"every request answered 200: {statuses}")
    check(served["requests"] >= 1, "the flaky worker served some requests (its connections were pooled)")
    check(lb.metric("stepflow_lb_retries_total", reason="stale-connection") >= 1, "stale connections retried")
    srv.close()


@test
def a_retried_chunked_request_reaches_the_next_worker_whole():
    # The replay copy keeps the payload, not the chunked bytes as sent: the retry frames it again.
    srv, _ = flaky_keepalive_server("flaky-c")
    w = Worker("dg")
    lb = Balancer([f"127.0.0.1:{srv.getsockname()[1]}", w.address], threads=1)
    lb.wait_healthy(2)
    digests = 0
    for i in range(12):
        msg = {"jsonrpc": "2.0", "id": i, "method": "components/execute",
               "params": {"component": "/digest", "input": {"pad": "x" * (300 + i)}}}
        raw = json.dumps(msg, separators=(",", ":")).encode()
        r = lb.post(raw, chunked=True, chunk_size=100)
        check(r.status == 200, f"request {i}: {r.status}")
        result = r.json()["result"]
        if "sha256" in result:
            digests += 1
            check(result["bytes"] == len(raw) and result["sha256"] == hashlib.sha256(raw).hexdigest(),
                  f"request {i}: the worker got the body whole: {result}")
    check(digests >= 1, "some requests reached the digest worker")
    check(lb.metric("stepflow_lb_retries_total", reason="stale-connection") >= 1, "stale connections retried")
    srv.close()


def body_then_close_server(instance_id):
    """A worker that reads a whole chunked request body and then closes without answering: the
    body has left the balancer, so the id can only come from the copy it kept."""

    def handle(conn):
        buf = b""
        try:
            while True:
                data = conn.recv(65536)
                if not data:
                    return
                buf += data
                if buf.startswith(b"GET /health") and b"\r\n\r\n" in buf:
                    body = json.dumps({"status": "healthy", "instanceId": instance_id}).encode()
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
                                 b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
                    return
                if b"\r\n0\r\n\r\n" in buf:
                    return  # the whole chunked body read, no answer
        except OSError:
            pass
        finally:
            conn.close()

    return raw_server(handle)


@test
def a_pinned_chunked_request_cut_after_its_body_gets_503_with_its_id():
    srv = body_then_close_server("chunky-1")
    lb = Balancer([f"127.0.0.1:{srv.getsockname()[1]}"], args=["--max-failures", "1000"])
    lb.wait_healthy(1)
    body = json.dumps({"jsonrpc": "2.0", "id": "cb-chunked-9", "result": {"ok": True}}).encode()
    req = (b"POST / HTTP/1.1\r\nHost: a\r\nConnection: close\r\nContent-Type: application/json\r\n"
           b"Stepflow-Instance-Id: chunky-1\r\nTransfer-Encoding: chunked\r\n\r\n"
           + b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n")
    raw = client.raw_request("127.0.0.1", lb.port, req, responses=None, timeout=10)
    check(raw.startswith(b"HTTP/1.1 503"), raw[:200])
    doc = json.loads(raw.partition(b"\r\n\r\n")[2])
    check(doc["id"] == "cb-chunked-9" and doc["error"]["message"] == "Instance not available", doc)
    srv.close()


@test
def a_pinned_request_to_a_refusing_instance_gets_503_with_its_id():
    w = Worker("pin")
    lb = Balancer([w.address], args=["--health-interval", "1h", "--max-failures", "1000"])
    lb.wait_healthy(1)
    iid = w.instance_id
    w.kill()
    msg = {"jsonrpc": "2.0", "id": "cb-77", "result": {"ok": True}}
    r = lb.post(msg, headers={"Stepflow-Instance-Id": iid})
    body = r.json()
    check(r.status == 503 and body["id"] == "cb-77", f"HTTP/1.1: 503 with the id: {r.status} {body}")
    check(body["error"]["message"] == "Instance not available" and body["error"]["data"]["instanceId"] == iid, body)
    # HTTP/2 (h2c prior knowledge), the same answer.
    out = subprocess.run(["curl", "-s", "--http2-prior-knowledge", "-H", "Content-Type: application/json",
                          "-H", f"Stepflow-Instance-Id: {iid}", "--data-binary", json.dumps(msg),
                          f"http://127.0.0.1:{lb.port}/"], capture_output=True, text=True, timeout=20)
    body = json.loads(out.stdout)
    check(body["id"] == "cb-77" and body["error"]["message"] == "Instance not available", f"HTTP/2: {body}")


@test
def capacity_from_the_load_report_header():
    w = Worker("hdr", max_concurrency=3, extra=["--capacity-report", "header"])
    lb = Balancer([w.address])
    lb.wait_healthy(1)
    check(lb.backends()[0]["limit"] == 0, "no limit before the worker reports one")
    check(lb.execute("/echo", {}).status == 200, "a request")
    b = lb.backends()[0]
    check(b["limit"] == 3 and b["limitSource"] == "header", f"limit from endpoint-load-metrics: {b}")


@test
def a_worker_that_stops_reporting_falls_back_to_the_flag():
    w = Worker("stale", max_concurrency=3, extra=["--capacity-report", "header"])
    # The report lives max(3 health intervals, 10 recovery intervals): 1.5 s here.
    lb = Balancer([w.address], args=["--max-in-flight-per-instance", "1", "--health-interval", "500ms",
                                      "--capacity-recovery-interval", "100ms"])
    lb.wait_healthy(1)
    check(lb.backends()[0]["limitSource"] == "flag", "the flag until the worker reports")
    t0 = time.monotonic()
    check(lb.execute("/echo", {}).status == 200, "a request")
    b = lb.backends()[0]
    check(b["limit"] == 3 and b["limitSource"] == "header", f"the report wins: {b}")
    seen = []
    wait_for(lambda: seen.append(lb.backends()[0]) or seen[-1]["limitSource"] == "flag", 10,
             "the report goes stale")
    check(time.monotonic() - t0 >= 1.5, "not before its TTL")
    check(seen[-1]["limit"] == 1 and seen[-1]["capacity"]["flagLimit"] == 1, f"back to the flag: {seen[-1]}")
    check(lb.execute("/echo", {}).status == 200, "another request")
    check(lb.backends()[0]["limitSource"] == "header", "a new report wins again")


@test
def capacity_learned_from_worker_at_capacity_then_recovers():
    w = Worker("lrn", max_concurrency=2, extra=["--capacity-report", "none"])
    lb = Balancer([w.address], args=["--capacity-recovery-interval", "300ms"])
    lb.wait_healthy(1)
    check(lb.backends()[0]["limit"] == 0, "unlimited at first")
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda i: sleep_call(lb, i, ms=300), range(6)))
    check([r.status for r in results].count(200) == 6, f"all succeeded: {[r.status for r in results]}")
    check(not any(at_capacity_seen(r) for r in results), "no client saw -32300")
    check(lb.metric("stepflow_lb_worker_at_capacity_total") >= 1, "the worker did answer -32300")
    check(lb.metric("stepflow_lb_retries_total", reason="worker-at-capacity") >= 1, "and those were retried")
    check(w.health()["maxInFlight"] <= 2, "the worker itself never ran more than 2")
    seen = []
    wait_for(lambda: seen.append(lb.backends()[0]) or seen[-1]["limitSource"] == "none", 15,
             "the learned limit grows back and goes")
    check(any(b["limitSource"] == "learned" and 1 <= b["limit"] <= 2 for b in seen) or
          any(x.get("message") == "request" for x in lb.logs()), f"learned limits seen: {seen[:3]}")


@test
def two_balancers_in_front_of_the_same_workers_pass_no_worker_at_capacity_to_clients():
    workers = [Worker(f"two{i}", max_concurrency=2) for i in range(3)]
    lbs = [Balancer([w.address for w in workers]) for _ in range(2)]
    for lb in lbs:
        lb.wait_healthy(3)
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        futures = [pool.submit(sleep_call, lbs[i % 2], i, 150) for i in range(32)]
        results = [f.result() for f in futures]
    failed = [r.status for r in results if r.status != 200]
    print(f"  two balancers, 32 calls on 6 slots: {len(failed)} failed {failed}")
    check(not any(at_capacity_seen(r) for r in results), "no client saw -32300")
    check(not failed, f"none failed: {failed}")


if __name__ == "__main__":
    run_tests()
