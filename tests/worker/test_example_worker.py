#!/usr/bin/env python3
"""Self-test of example_worker.py and stepflow_client.py (stdlib only).

Run: python3 tests/worker/test_example_worker.py
Starts real worker processes on port 0, prints each check, ends with
"N passed, M failed" and exits non-zero if anything failed.
"""

import hashlib
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "integration"))
sys.path.insert(0, HERE)

import stepflow_client as sc  # noqa: E402
from example_worker import blob_sha256  # noqa: E402

WORKER = os.path.join(HERE, "example_worker.py")
HOST = "127.0.0.1"

passed = 0
failed = 0


def check(name, cond, detail=""):
    global passed, failed
    if cond:
        passed += 1
        print("PASS  %s" % name)
    else:
        failed += 1
        print("FAIL  %s%s" % (name, (": " + str(detail)) if detail else ""))
    sys.stdout.flush()
    return cond


def wait_until(fn, timeout=5.0, interval=0.05):
    """Poll fn() until it returns a truthy value or the deadline passes; returns last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


class Worker:
    """A worker subprocess; its stderr goes to a temp file, shown if a check fails."""

    def __init__(self, name, *extra):
        self.name = name
        self.log = tempfile.NamedTemporaryFile(prefix="worker-%s-" % name, suffix=".log", delete=False)
        self.proc = subprocess.Popen(
            [sys.executable, WORKER, "--port", "0", "--name", name] + list(extra),
            stdout=subprocess.PIPE, stderr=self.log, stdin=subprocess.DEVNULL)
        try:
            self.port = self._read_port(10.0)
            self.id = sc.health(HOST, self.port)[1]["instanceId"]
        except BaseException:
            self.close()
            raise

    def _read_port(self, timeout):
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise RuntimeError("worker %s did not print LISTENING" % self.name)
        line = self.proc.stdout.readline().decode()
        m = re.fullmatch(r"LISTENING (\d+)\n", line)
        if not m:
            raise RuntimeError("worker %s printed %r" % (self.name, line))
        return int(m.group(1))

    def health(self):
        return sc.health(HOST, self.port)[1]

    def kill(self, sig=signal.SIGKILL):
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def wait(self, timeout):
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def close(self):
        """Kill (by PID) and reap the process, release its pipe and log file."""
        self.kill(signal.SIGKILL)
        self.wait(5)
        self.proc.stdout.close()
        self.log.close()

    def log_tail(self, n=20):
        try:
            with open(self.log.name, "r", errors="replace") as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return ""


def rpc_body(method, params=None, id="t1"):
    msg = {"jsonrpc": "2.0", "id": id, "method": method}
    if params is not None:
        msg["params"] = params
    return msg


# --------------------------------------------------------------------------- #

def test_health(w1, w2):
    s1, h1 = sc.health(HOST, w1.port)
    s2, h2 = sc.health(HOST, w2.port)
    check("health: both 200 healthy", s1 == 200 and s2 == 200 and h1["status"] == h2["status"] == "healthy",
          (s1, s2, h1, h2))
    check("health: instance id is <name>-<16 hex>",
          re.fullmatch(r"w1-[0-9a-f]{16}", h1["instanceId"]) and re.fullmatch(r"w2-[0-9a-f]{16}", h2["instanceId"]),
          (h1["instanceId"], h2["instanceId"]))
    check("health: counters present", all(k in h1 for k in
          ("inFlight", "misroutedCallbacks", "executions", "cancelledStreams")), h1)
    r = sc.get(HOST, w1.port, "/health")
    check("health: application/json with Content-Length",
          r.headers.get("content-type") == "application/json" and r.headers.get("content-length") == str(len(r.body)),
          r.headers)

    sc.set_health(HOST, w1.port, False)
    s, h = sc.health(HOST, w1.port)
    check("health: toggled unhealthy -> 503", s == 503 and h["status"] == "unhealthy" and h["instanceId"] == w1.id, (s, h))
    sc.set_health(HOST, w1.port, True)
    s, h = sc.health(HOST, w1.port)
    check("health: toggled back -> 200", s == 200 and h["status"] == "healthy", (s, h))


def test_rpc_basics(w1, w2):
    r = sc.rpc(HOST, w1.port, "initialize", {}, id=7)
    body = r.json()
    check("initialize: result with instanceId", r.status == 200 and body["id"] == 7
          and body["result"]["instanceId"] == w1.id and body["result"]["protocolVersion"] == "1.0", r)

    r = sc.rpc(HOST, w1.port, "components/list")
    names = [c["component"] for c in r.json()["result"]["components"]]
    check("components/list: all components",
          set(names) == {"/echo", "/sleep", "/digest", "/blob", "/callbacks", "/stream"}, names)

    r = sc.rpc(HOST, w1.port, "components/info", {"component": "/echo"})
    check("components/info: result", r.status == 200 and r.json()["result"]["info"]["component"] == "/echo", r)
    r = sc.rpc(HOST, w1.port, "components/infer_schema", {"component": "/echo"})
    check("components/infer_schema: result", r.status == 200 and "result" in r.json(), r)

    r = sc.notify(HOST, w1.port, "notifications/initialized")
    check("notification: 202 empty, Content-Length 0",
          r.status == 202 and r.body == b"" and r.headers.get("content-length") == "0", r)

    r = sc.rpc(HOST, w1.port, "no/such/method")
    check("unknown method: 200 -32601", r.status == 200 and r.json()["error"]["code"] == -32601, r)

    r = sc.post_json(HOST, w1.port, b'{"jsonrpc": "2.0", "id": 1, "method": ')
    check("malformed JSON: 400 -32700", r.status == 400 and r.json()["error"]["code"] == -32700, r)

    with sc.HttpConnection(HOST, w1.port) as conn:
        first = conn.request("POST", "/", json.dumps(rpc_body("initialize")).encode(),
                             {"Content-Type": "application/json"})
        sock = conn.sock
        second = conn.request("POST", "/", json.dumps(rpc_body("components/list")).encode(),
                              {"Content-Type": "application/json"})
        check("keep-alive: two requests on one connection",
              first.status == 200 and second.status == 200 and conn.sock is sock and conn.requests_sent == 2,
              (first.status, second.status, conn.requests_sent))
        nodelay = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        check("client sets TCP_NODELAY", nodelay != 0)

    # Two pipelined requests in one write must get two framed responses.
    one = json.dumps(rpc_body("initialize")).encode()
    req = (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
           % (len(one), one))
    raw = sc.raw_request(HOST, w1.port, req + req, responses=2)
    check("pipelined requests: two responses", raw.count(b"HTTP/1.1 200 ") == 2, raw[:300])

    bad = (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
           b"0\r\n\r\n")
    raw = sc.raw_request(HOST, w1.port, bad)
    parsed = sc.parse_response(raw)
    check("CL + TE request: 400 and Connection: close",
          parsed.status == 400 and parsed.headers.get("connection") == "close", raw[:300])


def test_echo(w1, w2):
    tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    inp = {"text": "héllo", "n": [1, 2, 3]}
    r = sc.execute(HOST, w1.port, "/echo", inp, id="e1",
                   headers={"traceparent": tp, "X-Forwarded-For": "10.1.2.3", "Connection": "keep-alive"})
    body = r.json()
    check("echo: output equals input", r.status == 200 and body["id"] == "e1"
          and body["result"]["output"] == inp and body["result"]["instanceId"] == w1.id, r)
    check("echo: X-Seen-Traceparent / Forwarded-For / Connection",
          r.headers.get("x-seen-traceparent") == tp and r.headers.get("x-seen-forwarded-for") == "10.1.2.3"
          and r.headers.get("x-seen-connection") == "keep-alive", r.headers)
    r = sc.execute(HOST, w1.port, "/nope", {})
    check("unknown component: -32602", r.status == 200 and r.json()["error"]["code"] == -32602, r)


def test_digest(w1, w2):
    pad = "x" * (3 * 1024 * 1024)
    body = json.dumps({"jsonrpc": "2.0", "id": "d1", "method": "components/execute",
                       "params": {"component": "/digest", "input": {"pad": pad}}}).encode()
    want = hashlib.sha256(body).hexdigest()
    for label, kw in (("chunked", {"chunked": True, "chunk_size": 100003}), ("content-length", {})):
        r = sc.post_json(HOST, w1.port, body, **kw)
        res = r.json().get("result", {})
        check("digest: 3 MB %s request body arrives byte-identical" % label,
              r.status == 200 and res.get("bytes") == len(body) and res.get("sha256") == want,
              (r.status, res.get("bytes"), len(body)))


def test_blob(w1, w2):
    n = 5 * 1024 * 1024
    want = blob_sha256(n, 42)
    for chunked in (False, True):
        r = sc.execute(HOST, w1.port, "/blob", {"bytes": n, "chunked": chunked, "seed": 42}, timeout=60)
        framing_ok = (r.headers.get("transfer-encoding") == "chunked" and "content-length" not in r.headers
                      if chunked else r.headers.get("content-length") == str(n))
        check("blob: 5 MB %s, sha256 matches" % ("chunked" if chunked else "content-length"),
              r.status == 200 and len(r.body) == n and hashlib.sha256(r.body).hexdigest() == want
              and r.headers.get("x-blob-sha256") == want and framing_ok
              and r.headers.get("content-type") == "application/octet-stream",
              (r.status, len(r.body), r.headers))


def test_session(w1, w2):
    before = w1.health()
    tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    s = sc.run_session(HOST, w1.port, 3, answer=lambda req: {"ok": req["params"]["step"]},
                       headers={"traceparent": tp})
    check("session: completes ok", s.ok, s)
    check("session: SSE headers", s.status == 200 and s.instance_id == w1.id
          and s.headers.get("content-type") == "text/event-stream"
          and s.headers.get("cache-control") == "no-cache"
          and s.headers.get("transfer-encoding") == "chunked", s.headers)
    check("session: 3 callbacks answered 202", s.callback_statuses == [202, 202, 202], s.callback_statuses)
    check("session: callback requests are runs/submit from this instance",
          [r["method"] for r in s.callback_requests] == ["runs/submit"] * 3
          and [r["params"]["step"] for r in s.callback_requests] == [1, 2, 3]
          and all(r["params"]["instanceId"] == w1.id for r in s.callback_requests), s.callback_requests)
    res = s.result or {}
    check("session: final result has the answers",
          s.final.get("id") == s.request_id and res.get("callbacks") == 3
          and res.get("answers") == [{"ok": 1}, {"ok": 2}, {"ok": 3}] and res.get("instanceId") == w1.id, s.final)
    after = w1.health()
    check("session: no misroutes, nothing pending, inFlight back to 0",
          after["misroutedCallbacks"] == before["misroutedCallbacks"] and after["pendingCallbacks"] == 0
          and after["inFlight"] == 0 and after["executions"] == before["executions"] + 1, after)


def test_misroute(w1, w2):
    before = w2.health()["misroutedCallbacks"]
    body = rpc_body("components/execute", {"component": "/callbacks", "input": {"count": 1}}, id="m1")
    with sc.SseReader(HOST, w1.port, body, timeout=10) as reader:
        ev = reader.next_event(timeout=5).json()
        cb_id = ev["id"]
        answer = {"jsonrpc": "2.0", "id": cb_id, "result": {"runId": "r1"}}
        hdrs = {"Stepflow-Instance-Id": reader.instance_id}
        wrong = sc.post_json(HOST, w2.port, answer, headers=hdrs)
        err = wrong.json()
        check("misroute: wrong worker answers 404 -32001",
              wrong.status == 404 and err["id"] == cb_id and err["error"]["code"] == -32001
              and err["error"]["message"] == "Unknown pending request", wrong)
        check("misroute: counted on the wrong worker", w2.health()["misroutedCallbacks"] == before + 1)
        right = sc.post_json(HOST, w1.port, answer, headers=hdrs)
        check("misroute: right worker answers 202", right.status == 202 and right.body == b"", right)
        final = reader.next_event(timeout=5)
        check("misroute: stream then finishes with the answer",
              final is not None and final.json()["result"]["answers"] == [{"runId": "r1"}], final)
        check("misroute: stream ends cleanly",
              reader.next_event(timeout=5) is None and not reader.ended_abnormally, reader.error)


def test_capacity(w1, w2):
    n = 5  # default --max-concurrency 4, plus one
    barrier = threading.Barrier(n)
    results = [None] * n

    def call(i):
        barrier.wait()
        try:
            results[i] = sc.execute(HOST, w2.port, "/sleep", {"ms": 2000}, timeout=20)
        except Exception as e:
            results[i] = e

    threads = [threading.Thread(target=call, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    statuses = sorted(getattr(r, "status", repr(r)) for r in results)
    busy = [r for r in results if getattr(r, "status", None) == 503]
    check("capacity: 4 succeed, exactly one 503", statuses == [200, 200, 200, 200, 503], statuses)
    check("capacity: 503 carries JSON-RPC -32300",
          len(busy) == 1 and busy[0].json()["error"]["code"] == -32300
          and busy[0].json()["error"]["message"] == "Worker at capacity"
          and busy[0].headers.get("content-type") == "application/json", busy)
    check("capacity: inFlight back to 0", wait_until(lambda: w2.health()["inFlight"] == 0))


def test_stream(w1, w2):
    body = rpc_body("components/execute", {"component": "/stream", "input": {"events": 3, "interval_ms": 100}},
                    id="s1")
    with sc.SseReader(HOST, w1.port, body, timeout=10) as reader:
        events = list(reader)
    msgs = [e.json() for e in events]
    check("stream: 3 progress events then the result",
          [m.get("method") for m in msgs] == ["progress"] * 3 + [None]
          and msgs[-1]["id"] == "s1" and msgs[-1]["result"]["events"] == 3, msgs)
    check("stream: clean end", reader.ended and not reader.ended_abnormally, reader.error)
    spread = events[2].received_at - events[0].received_at
    check("stream: events arrive incrementally (>=150 ms apart overall)", spread >= 0.15, spread)


def test_hold_cancel(w1, w2):
    before = w1.health()["cancelledStreams"]
    body = rpc_body("components/execute", {"component": "/stream", "input": {"events": 3, "hold": True}}, id="h1")
    reader = sc.SseReader(HOST, w1.port, body, timeout=10)
    try:
        first = reader.next_event(timeout=5)
        check("hold: first event arrives while the stream is open",
              first is not None and first.json()["params"]["i"] == 1 and not reader.ended, first)
        try:
            reader.next_event(timeout=0.5)
            check("hold: no further event while held", False)
        except TimeoutError:
            check("hold: no further event while held", True)
        check("hold: counted in flight", wait_until(lambda: w1.health()["inFlight"] == 1))
    finally:
        reader.close()
    h = wait_until(lambda: (lambda h: h if h["cancelledStreams"] == before + 1 and h["inFlight"] == 0 else None)
                   (w1.health()), timeout=5)
    check("hold: client disconnect noticed (cancelledStreams +1, inFlight 0)", h, w1.health())


def test_concurrent_connections(w1, w2):
    n = 200
    socks = []
    try:
        for _ in range(n):
            socks.append(socket.create_connection((HOST, w2.port), timeout=10))
        one = json.dumps(rpc_body("initialize")).encode()
        req = (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
               % (len(one), one))
        for s in socks:
            s.sendall(req)
        ok = 0
        for s in socks:
            buf = b""
            while b"\r\n\r\n" not in buf:
                chunk = s.recv(4096)
                if not chunk:
                    break
                buf += chunk
            ok += buf.startswith(b"HTTP/1.1 200 ")
        check("200 concurrent connections all answered", ok == n, "%d of %d" % (ok, n))
    finally:
        for s in socks:
            s.close()


def test_callback_timeout_and_kill(w3):
    s = sc.run_session(HOST, w3.port, 2, answer=lambda req: sc.NO_ANSWER, timeout=20)
    err = (s.final or {}).get("error") or {}
    check("callback timeout: final error event -32002, stream ends cleanly",
          s.error is None and err.get("code") == -32002 and len(s.callback_requests) == 1, s)
    before = w3.health()
    late = sc.post_json(HOST, w3.port, {"jsonrpc": "2.0", "id": s.callback_requests[0]["id"], "result": {}},
                        headers={"Stepflow-Instance-Id": w3.id})
    after = w3.health()
    check("callback timeout: late answer 404, counted late not misrouted",
          late.status == 404 and after["lateCallbacks"] == before["lateCallbacks"] + 1
          and after["misroutedCallbacks"] == before["misroutedCallbacks"], (late, after))

    body = rpc_body("components/execute", {"component": "/stream", "input": {"events": 1, "hold": True}}, id="k1")
    with sc.SseReader(HOST, w3.port, body, timeout=10) as reader:
        first = reader.next_event(timeout=5)
        w3.kill(signal.SIGKILL)
        end = reader.next_event(timeout=5)
        check("kill mid-stream: reader reports abnormal end",
              first is not None and end is None and reader.ended_abnormally
              and "incomplete chunked" in (reader.error or ""), reader.error)
    # Same through run_session: must report, not raise.
    s = sc.run_session(HOST, w3.port, 1, timeout=5)
    check("run_session against a dead worker reports an error", s.error is not None and not s.ok, s)


def test_sigterm(workers):
    for w in workers:
        w.kill(signal.SIGTERM)
    codes = [w.wait(5) for w in workers]
    check("SIGTERM: workers exit 0", codes == [0] * len(workers), codes)


def main():
    workers = []
    try:
        # Append each as soon as it exists so the finally block always kills it.
        for name, extra in (("w1", ()), ("w2", ()), ("w3", ("--callback-timeout", "1"))):
            workers.append(Worker(name, *extra))
        w1, w2, w3 = workers
        check("workers started with distinct ids", len({w1.id, w2.id, w3.id}) == 3)
        tests = [test_health, test_rpc_basics, test_echo, test_digest, test_blob, test_session,
                 test_misroute, test_capacity, test_stream, test_hold_cancel, test_concurrent_connections]
        for t in tests:
            try:
                t(w1, w2)
            except Exception:
                check("%s raised" % t.__name__, False, traceback.format_exc())
        try:
            test_callback_timeout_and_kill(w3)
        except Exception:
            check("test_callback_timeout_and_kill raised", False, traceback.format_exc())
        test_sigterm([w1, w2])
    except Exception:
        check("setup", False, traceback.format_exc())
    finally:
        for w in workers:
            w.close()
        if failed:
            for w in workers:
                print("--- stderr of %s ---\n%s" % (w.name, w.log_tail()))
        for w in workers:
            try:
                os.unlink(w.log.name)
            except OSError:
                pass
    print("%d passed, %d failed" % (passed, failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
