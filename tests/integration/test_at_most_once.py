"""At most once, by its deadline (issue 21).

Purpose-built raw workers (plain sockets, HTTP/1.1 keep-alive) count every call they start, so
a test can tell a call that ran twice from one that ran once:
- crash-after-read: reads a request, starts it, then closes without answering (a worker
  OOM-killed mid-call): the balancer must not run it elsewhere;
- reset-before-read: closes with the request unread, so the kernel resets the connection: the
  call provably never ran and goes elsewhere;
- forever -32300: always at capacity: a request is refused at most --retries + 1 times and
  answered at its queue deadline, which holds across re-queues;
- stuck at capacity among healthy workers: probed about once per cool-down, never tried first.
"""

import json
import signal
import socket
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import h2raw
from h2raw import H2Client
from harness import Balancer, Worker, check, client, run_tests, test, wait_for
from raw_worker import read_request


class RawWorker:
    """A Stepflow worker on a raw socket. `behave(worker, conn, head, body, nth_on_conn)` decides
    what happens to each POST; it returns True when it answered (the connection stays open)."""

    def __init__(self, instance_id, behave):
        self.instance_id = instance_id
        self.behave = behave
        self.started = {}  # JSON-RPC id -> calls started here
        self.posts = 0     # POSTs whose head and body were read
        self.asked = {}    # JSON-RPC id -> times refused (always_at_capacity)
        self.lock = threading.Lock()
        self.srv = socket.socket()
        self.srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.srv.bind(("127.0.0.1", 0))
        self.srv.listen(128)
        self.address = f"127.0.0.1:{self.srv.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.srv.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def start_call(self, body):
        rpc_id = json.loads(body).get("id")
        with self.lock:
            self.started[rpc_id] = self.started.get(rpc_id, 0) + 1
        return rpc_id

    def _handle(self, conn):
        buf = b""
        nth = 0
        try:
            while True:
                if b"\r\n\r\n" not in buf:
                    if self.behave is reset_before_read and buf == b"":
                        # Wait for the request without reading it: a close now leaves it unread.
                        peek = conn.recv(16, socket.MSG_PEEK)
                        if not peek:
                            return
                        if peek.startswith(b"POST"):
                            return abort(conn)
                request = read_request(conn, buf)
                if request is None:
                    return
                lines, _, body, buf = request
                head = lines[0].encode("latin-1")
                if head.startswith(b"GET /health"):
                    send_json(conn, 200, {"status": "healthy", "instanceId": self.instance_id})
                    continue
                nth += 1
                with self.lock:
                    self.posts += 1
                if not self.behave(self, conn, head, body, nth):
                    return
        except OSError:
            pass
        finally:
            conn.close()

    def runs(self, rpc_id):
        with self.lock:
            return self.started.get(rpc_id, 0)

    def close(self):
        self.srv.close()


def send_json(conn, status, doc, extra=b""):
    body = json.dumps(doc).encode()
    reason = {200: b"OK", 503: b"Service Unavailable"}[status]
    conn.sendall(b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n" % (status, reason, len(body))
                 + extra + b"\r\n" + body)


def abort(conn):
    """Close with SO_LINGER 0: a reset, whatever is unread."""
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()


def answer(worker, conn, head, body, nth):
    rpc_id = worker.start_call(body)
    send_json(conn, 200, {"jsonrpc": "2.0", "id": rpc_id, "result": {"ran_on": worker.instance_id}})
    return True


def crash_on_reuse(worker, conn, head, body, nth):
    """Answers the first call on a connection; the next one on it is read, started, then the
    worker dies: what an OOM kill mid-execution looks like, on a reused keep-alive connection."""
    if nth == 1:
        return answer(worker, conn, head, body, nth)
    worker.start_call(body)
    time.sleep(0.05)
    return False  # closes (FIN) without a byte of response


def crash_after_read(worker, conn, head, body, nth):
    worker.start_call(body)
    time.sleep(0.05)
    return False


def reset_before_read(worker, conn, head, body, nth):
    raise AssertionError("handled in _handle: the request is never read")


def always_at_capacity(worker, conn, head, body, nth):
    rpc_id = json.loads(body).get("id")
    with worker.lock:
        worker.asked[rpc_id] = worker.asked.get(rpc_id, 0) + 1
    send_json(conn, 503, {"jsonrpc": "2.0", "id": rpc_id, "error": {"code": -32300, "message": "Worker at capacity"}})
    return True


def rpc(rpc_id, method="components/execute"):
    return {"jsonrpc": "2.0", "id": rpc_id, "method": method, "params": {"component": "/echo", "input": {}}}


def post(lb, rpc_id, headers=None, timeout=30, method="POST"):
    body = json.dumps(rpc(rpc_id)).encode()
    with client.HttpConnection("127.0.0.1", lb.port, timeout=timeout) as conn:
        return conn.request(method, "/", body, {"Content-Type": "application/json", **(headers or {})})


# --------------------------------------------------------------------------- at most once

@test
def a_call_read_by_a_crashing_worker_runs_exactly_once():
    crashy = RawWorker("crashy", crash_on_reuse)
    good = RawWorker("good", answer)
    lb = Balancer([crashy.address, good.address], args=["--retries", "2", "--max-failures", "1000"], threads=1)
    lb.wait_healthy(2)

    def call(i):
        r = post(lb, f"c{i}")
        return i, r.status, r.json()

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(call, range(100)))
    may_have_run = 0
    for i, status, doc in results:
        rid = f"c{i}"
        runs = crashy.runs(rid) + good.runs(rid)
        check(runs == 1, f"{rid} ran {runs} times (crashy {crashy.runs(rid)}, good {good.runs(rid)})")
        check(doc.get("id") == rid, f"the answer echoes the id: {doc}")
        if status == 200:
            check(doc["result"]["ran_on"] in ("crashy", "good"), doc)
        else:
            may_have_run += 1
            err = doc["error"]
            check(status == 502 and err["code"] == -32002 and "may have run" in err["message"],
                  f"{rid}: the 'may have run' 502, got {status} {doc}")
            check(crashy.runs(rid) == 1, f"{rid}: a 502 only for the call the crashing worker started")
    check(may_have_run > 0, "some calls met the crash (the test exercised the case)")
    check(lb.metric("stepflow_lb_may_have_run_total") == may_have_run,
          f"counted: {lb.metric('stepflow_lb_may_have_run_total')} vs {may_have_run}")
    # Log lines leave in batches (up to 20 ms behind): wait for all of them.
    logged = wait_for(lambda: len(lb.logs("not retried: the call may have run")) >= may_have_run and
                      lb.logs("not retried: the call may have run"), 5, "the 'may have run' lines")
    check(logged and all(r.get("instance") == "crashy" for r in logged), f"logged with the instance: {logged[:2]}")
    crashy.close()
    good.close()


@test
def a_reset_before_read_is_retried_and_runs_once():
    resetter = RawWorker("resetter", reset_before_read)
    good = RawWorker("good", answer)
    lb = Balancer([resetter.address, good.address], args=["--retries", "2", "--max-failures", "1000"], threads=1)
    lb.wait_healthy(2)
    for i in range(10):
        r = post(lb, f"r{i}")
        check(r.status == 200 and r.json()["result"]["ran_on"] == "good", f"retried elsewhere: {r.status} {r.body!r}")
        check(good.runs(f"r{i}") == 1, "ran once")
    check(resetter.posts == 0, "the resetting worker never read a request")
    check(lb.metric("stepflow_lb_retries_total", reason="reset") >= 1, "counted as a retry after a reset")
    resetter.close()
    good.close()


@test
def idempotent_requests_are_retried_after_an_orderly_close():
    crashy = RawWorker("crashy", crash_after_read)
    good = RawWorker("good", answer)
    lb = Balancer([crashy.address, good.address], args=["--retries", "2", "--max-failures", "1000"], threads=1)
    lb.wait_healthy(2)
    # Until a call lands on the crashing worker first (least load picks at random among ties).
    for i in range(20):
        for method, headers in (("GET", {}), ("PUT", {}), ("POST", {"Idempotency-Key": f"k{i}"})):
            rid = f"{method}-{i}"
            r = post(lb, rid, headers=headers, method=method)
            check(r.status == 200 and r.json()["result"]["ran_on"] == "good", f"{method}: {r.status} {r.body!r}")
    check(crashy.posts > 0, "the crashing worker was met")
    check(lb.metric("stepflow_lb_retries_total", reason="may-have-run") >= 1, "retried as repeatable")
    crashy.close()
    good.close()


@test
def the_idempotency_key_can_be_switched_off():
    crashy = RawWorker("crashy", crash_after_read)
    lb = Balancer([crashy.address], args=["--retries", "2", "--max-failures", "1000",
                                          "--trust-idempotency-key", "false"], threads=1)
    lb.wait_healthy(1)
    r = post(lb, "k-off", headers={"Idempotency-Key": "abc"})
    check(r.status == 502 and r.json()["error"]["code"] == -32002, f"not retried: {r.status} {r.body!r}")
    check(crashy.runs("k-off") == 1, "ran once")
    crashy.close()


# --------------------------------------------------------------------------- deadlines and capacity

@test
def a_worker_refusing_forever_costs_a_request_its_retries_and_ends_at_its_queue_deadline():
    full = RawWorker("full", always_at_capacity)
    # A short cool-down: the refusing worker could be probed every 200 ms while the requests wait.
    timeout, tick, retries = 2.0, 0.1, 2
    lb = Balancer([full.address], args=["--queue-timeout", f"{timeout}s", "--retries", str(retries),
                                        "--capacity-recovery-interval", "200ms"], threads=1)
    lb.wait_healthy(1)

    def timed(i):
        t0 = time.monotonic()
        r = post(lb, f"q{i}", timeout=20)
        return r, time.monotonic() - t0

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(timed, range(4)))
    for r, _ in results:
        check(r.status == 503 and r.json()["error"]["data"]["reason"] == "queue-timeout", f"{r.status} {r.body!r}")
    times = sorted(round(t, 3) for _, t in results)
    asked = {f"q{i}": full.asked.get(f"q{i}", 0) for i in range(4)}
    print(f"  answers after {times} s; worker asked {asked}")
    # The deadline runs from the first wait, a little after arrival: never earlier than the
    # timeout, and no later than one admission tick (plus scheduling on a busy machine). The
    # balancer reads libevent's coarse monotonic clock (CLOCK_MONOTONIC_COARSE = 6 on Linux),
    # which lags the client's clock by up to its resolution: that much early is still on time.
    coarse = time.clock_getres(6)
    check(all(timeout - coarse <= t <= timeout + tick + 0.3 for t in times),
          f"answered at the queue deadline: {times} (clock resolution {coarse} s)")
    check(all(n <= retries + 1 for n in asked.values()), f"at most --retries + 1 attempts each: {asked}")
    full.close()


@test
def a_worker_stuck_at_capacity_is_probed_not_tried_first():
    stuck = RawWorker("stuck", always_at_capacity)
    a = RawWorker("a", answer)
    b = RawWorker("b", answer)
    lb = Balancer([stuck.address, a.address, b.address], args=["--retries", "2"], threads=1)
    lb.wait_healthy(3)
    t0 = time.monotonic()
    ok = 0
    while time.monotonic() - t0 < 3.0:
        r = post(lb, f"s{ok}")
        check(r.status == 200 and r.json()["result"]["ran_on"] in ("a", "b"), f"{r.status} {r.body!r}")
        ok += 1
    elapsed = time.monotonic() - t0
    # One refusal to learn it is full, then about one probe per --capacity-recovery-interval (1 s).
    check(stuck.posts <= elapsed + 2, f"{stuck.posts} attempts on the stuck worker in {elapsed:.1f}s ({ok} calls)")
    state = lb.backend(stuck.address)["capacity"]
    check(state["state"] in ("cooling", "probing") and state["refusals"] >= 1, f"/debug/backends: {state}")
    stuck.close()
    a.close()
    b.close()


@test
def requests_still_queued_at_sigterm_are_answered_before_the_drain_timeout():
    w = Worker("drain", max_concurrency=1)
    lb = Balancer([w.address], args=["--drain-timeout", "3s", "--queue-timeout", "60s"], threads=1)
    lb.wait_healthy(1)
    held = client.SseReader("127.0.0.1", lb.port, HOLD)  # the only slot, held past the drain
    check(held.next_event(timeout=10) is not None, "the slot is held")
    results = []
    waiter = threading.Thread(target=lambda: results.append(post(lb, "queued-1", timeout=20)))
    waiter.start()
    wait_for(lambda: lb.metric("stepflow_lb_queue_depth") == 1, 10, "a request queued")
    t0 = time.monotonic()
    lb.signal(signal.SIGTERM)
    waiter.join(timeout=20)
    elapsed = time.monotonic() - t0
    check(results, "the queued request got an answer")
    r = results[0]
    check(r.status == 503 and r.json()["id"] == "queued-1" and r.json()["error"]["data"]["reason"] == "queue-timeout",
          f"503 queue-timeout with the id: {r.status} {r.body!r}")
    check(elapsed < 3.0, f"before the 3 s drain timeout closed it: {elapsed:.2f}s")
    held.close()


# --------------------------------------------------------------------------- HTTP/2 windows

class WindowedH2(H2Client):
    """An HTTP/2 client that honours the server's connection window, as real clients do."""

    def conn_window(self):
        credit = 65535 + sum(struct.unpack(">I", f.payload)[0] & 0x7FFFFFFF for f in self.frames
                             if f.type == h2raw.WINDOW_UPDATE and f.stream_id == 0)
        return credit - self.sent

    def send_body(self, sid, data, end_stream, timeout):
        """Sends as much as the connection window allows, as it opens (down to the last byte, as
        a real client fills it); False when it stayed shut for `timeout`."""
        pos = 0
        while pos < len(data):
            deadline = time.monotonic() + timeout
            while self.conn_window() <= 0:
                if time.monotonic() > deadline:
                    return False
                self.poll(0.05)
            piece = data[pos:pos + min(16384, self.conn_window())]
            pos += len(piece)
            self.send_frame(h2raw.DATA, h2raw.END_STREAM if (end_stream and pos == len(data)) else 0, sid, piece)
            self.sent += len(piece)
        return True


HOLD = {"jsonrpc": "2.0", "id": "hold", "method": "components/execute",
        "params": {"component": "/stream", "input": {"events": 1, "interval_ms": 0, "hold": True}}}


@test
def a_pinned_callback_never_waits_behind_queued_uploads_on_its_connection():
    w = Worker("h2w", max_concurrency=1)
    lb = Balancer([w.address], args=["--max-in-flight-per-instance", "1", "--queue-timeout", "30s"], threads=1)
    lb.wait_healthy(1)
    iid = w.instance_id
    held = client.SseReader("127.0.0.1", lb.port, HOLD)  # takes the only slot: new work queues
    check(held.next_event(timeout=10) is not None, "the slot is held")
    c = WindowedH2("127.0.0.1", lb.port)
    c.sent = 0
    c.poll(0.2)
    upload = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "components/execute",
                         "params": {"component": "/echo", "input": {"pad": "x" * (64 * 1024 - 120)}}}).encode()
    queued = []
    for i in range(90):  # 90 x 64 KiB = 5.6 MiB of queued uploads, beyond a 4 MiB connection window
        sid = c.request(headers=[], end_stream=False, body=b"", content_length=False)
        if not c.send_body(sid, upload, True, timeout=2.0):
            break
        queued.append(sid)
    wait_for(lambda: lb.metric("stepflow_lb_queue_depth") >= 1, 10, "uploads queued")
    # A callback answer for the held execution's instance, on the same connection.
    t0 = time.monotonic()
    note = json.dumps({"jsonrpc": "2.0", "method": "notifications/progress", "params": {"n": 1}}).encode()
    sid = c.request(headers=[("stepflow-instance-id", iid)], end_stream=False, body=b"", content_length=False)
    sent = c.send_body(sid, note, True, timeout=5.0)
    check(sent, f"the callback's body found window (uploads sent: {len(queued)} of 90)")
    c.wait(lambda: c.streams[sid].closed, timeout=5, what="the callback's answer")
    elapsed = time.monotonic() - t0
    check(c.streams[sid].status == 202, f"answered by the worker: {c.streams[sid].status}")
    check(len(queued) == 90, f"every queued upload was taken: {len(queued)}")
    check(elapsed < 2.0, f"at once, not at the queue timeout: {elapsed:.2f}s")
    held.close()
    c.close()


@test
def an_http2_stream_answered_locally_after_a_failed_exchange_gets_the_body_deadline():
    w = Worker("gone")
    lb = Balancer([w.address], args=["--health-interval", "1h", "--max-failures", "1000",
                                     "--local-body-timeout", "1s"], threads=1)
    lb.wait_healthy(1)
    iid = w.instance_id
    w.kill()  # still listed and healthy: the connect fails, the body never left the stream
    c = H2Client("127.0.0.1", lb.port)
    sid = c.request(headers=[("stepflow-instance-id", iid)], end_stream=False, body=b"", content_length=False)
    c.send_data(sid, b'{"jsonrpc":"2.0","id":"cb-9","result":', end_stream=False)  # and never the rest
    t0 = time.monotonic()
    c.wait(lambda: c.streams[sid].closed, timeout=8, what="a local answer")
    elapsed = time.monotonic() - t0
    check(c.streams[sid].status == 503, f"503: {c.streams[sid].status} {bytes(c.streams[sid].data)!r}")
    check(elapsed < 4, f"within --local-body-timeout, not --request-body-timeout: {elapsed:.2f}s")
    c.close()


if __name__ == "__main__":
    run_tests()
