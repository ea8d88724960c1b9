"""Traces and logs (issue 23): the balancer is a hop of every distributed trace and its log lines
carry the trace ids. Spans are checked as a real OTLP decoder sees them: tests/otlp/receiver.mjs
decodes OTLP/gRPC and OTLP/HTTP with the OpenTelemetry JS SDK's protobuf definitions."""

import concurrent.futures
import http.server
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading

from h2raw import H2Client
from harness import (ROOT, Balancer, Worker, _started, check, client, free_port, lb_binary, run_tests, test,
                     wait_for)

RECEIVER = os.path.join(ROOT, "tests", "otlp", "receiver.mjs")
PARENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_SPAN = "00f067aa0ba902b7"
SERVER, CLIENT, INTERNAL = 2, 3, 1


class Receiver:
    def __init__(self, grpc_port=0, http_port=0, env=None):
        if not os.path.isdir(os.path.join(os.path.dirname(RECEIVER), "node_modules", "@opentelemetry")):
            raise AssertionError("node or the OpenTelemetry JS packages are missing: run scripts/install-deps.sh test "
                                 "(installs nodejs and runs npm ci in tests/otlp)")
        self.proc = subprocess.Popen(["node", RECEIVER, str(grpc_port), str(http_port)], stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True, cwd=os.path.dirname(RECEIVER),
                                     env={**os.environ, **(env or {})})
        _started.append(self.proc)
        ports = json.loads(self.proc.stdout.readline())
        self.grpc, self.http = ports["grpc"], ports["http"]

    def _call(self, method, path, body=None):
        c = socket.create_connection(("127.0.0.1", self.http), timeout=5)
        data = json.dumps(body).encode() if body is not None else b""
        c.sendall(f"{method} {path} HTTP/1.1\r\nHost: r\r\nContent-Length: {len(data)}\r\nConnection: close\r\n\r\n"
                  .encode() + data)
        out = b""
        while chunk := c.recv(65536):
            out += chunk
        c.close()
        return json.loads(out.split(b"\r\n\r\n", 1)[1])

    def spans(self, trace_id=None):
        return [s for s in self._call("GET", "/spans") if trace_id is None or s["traceId"] == trace_id]

    def stats(self):
        return self._call("GET", "/stats")

    def mode(self, mode, delay_ms=0, **extra):
        self._call("POST", "/mode", {"mode": mode, "delayMs": delay_ms, **extra})

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=10)

    def wait_trace(self, trace_id, count, what="spans"):
        wait_for(lambda: len(self.spans(trace_id)) >= count, 15, f"{count} {what} of trace {trace_id}")
        return self.spans(trace_id)


def tracing_args(receiver, protocol="grpc", extra=None):
    if protocol == "grpc":
        args = ["--trace-enabled", "true", "--otlp-endpoint", f"http://127.0.0.1:{receiver.grpc}"]
    else:
        args = ["--otel-exporter-otlp-protocol", "http/protobuf",
                "--otel-exporter-otlp-endpoint", f"http://127.0.0.1:{receiver.http}"]
    return args + ["--otel-bsp-schedule-delay", "50"] + (extra or [])


def traced_fleet_of_one():
    """A receiver, one worker and a balancer exporting to the receiver over OTLP/gRPC."""
    rx = Receiver()
    w = Worker("a")
    lb = Balancer([w.address], args=tracing_args(rx))
    lb.wait_healthy(1)
    return rx, w, lb


def one(spans, kind, **match):
    found = [s for s in spans if s["kind"] == kind and all(s.get(k) == v for k, v in match.items())]
    check(len(found) == 1, f"one span of kind {kind} {match}: {json.dumps(spans, indent=1)}")
    return found[0]


def seen_traceparent(r):
    value = r.headers.get("x-seen-traceparent", "")
    parts = value.split("-")
    check(len(parts) == 4 and parts[0] == "00", f"the worker received a traceparent: {value!r}")
    return parts


@test
def h1_request_continues_the_trace_and_the_worker_sees_its_attempt_span():
    rx = Receiver()
    w = Worker("a")
    lb = Balancer([w.address], args=tracing_args(rx, extra=["--otel-resource-attributes",
                                                            "deployment.environment=test,k8s.pod.name=lb-0"]))
    lb.wait_healthy(1)
    r = lb.execute("/echo", {"x": 1}, id=42, headers={"traceparent": f"00-{PARENT_TRACE}-{PARENT_SPAN}-01",
                                                      "tracestate": "vendor=abc,other=1",
                                                      "User-Agent": "orchestrator/1", "Mcp-Method": "tools/call"})
    check(r.status == 200, f"status {r.status}")
    _, trace_id, attempt_id, flags = seen_traceparent(r)
    check(trace_id == PARENT_TRACE and flags == "01", f"same trace, sampled: {trace_id} {flags}")
    check(attempt_id != PARENT_SPAN, "the worker's parent is the balancer's span, not the caller's")
    check(r.headers.get("x-seen-tracestate") == "vendor=abc,other=1", f"tracestate unchanged: {r.headers}")
    spans = rx.wait_trace(PARENT_TRACE, 2)
    server = one(spans, SERVER)
    client = one(spans, CLIENT)
    check(server["parentSpanId"] == PARENT_SPAN, f"server span continues the caller's: {server}")
    check(client["parentSpanId"] == server["spanId"] and client["spanId"] == attempt_id,
          f"client span under the server span, and it is what the worker saw: {client}")
    a = server["attributes"]
    for key, want in {"http.request.method": "POST", "http.response.status_code": 200, "url.path": "/",
                      "network.peer.address": "127.0.0.1", "user_agent.original": "orchestrator/1",
                      "stepflow.routing.decision": "least-load", "stepflow.instance.id": w.instance_id,
                      "stepflow.attempts": 1, "rpc.system": "jsonrpc", "rpc.method": "components/execute",
                      "rpc.jsonrpc.request_id": "42", "mcp.method.name": "tools/call"}.items():
        check(a.get(key) == want, f"server span {key} = {a.get(key)!r}, want {want!r}")
    check(a["http.request.body.size"] > 0 and a["http.response.body.size"] > 0, f"bytes: {a}")
    c = client["attributes"]
    for key, want in {"server.address": "127.0.0.1", "server.port": w.port, "stepflow.attempt": 1,
                      "http.response.status_code": 200, "stepflow.instance.id": w.instance_id}.items():
        check(c.get(key) == want, f"client span {key} = {c.get(key)!r}, want {want!r}")
    check(server["status"]["code"] == 0 and client["status"]["code"] == 0, "no error status on a 200")
    res = server["resource"]
    check(res.get("service.name") == "stepflow-lb" and res.get("deployment.environment") == "test"
          and res.get("k8s.pod.name") == "lb-0", f"resource: {res}")
    check(server["protocol"] == "grpc", "sent over OTLP/gRPC")
    # The access log line joins the trace.
    wait_for(lambda: lb.logs("request"), 5, "access log line")
    line = lb.logs("request")[-1]
    check(line.get("trace_id") == PARENT_TRACE and line.get("span_id") == server["spanId"], f"access log: {line}")


@test
def invalid_or_missing_traceparent_starts_a_new_trace_over_otlp_http():
    rx = Receiver()
    w = Worker("a")
    lb = Balancer([w.address], args=tracing_args(rx, protocol="http/protobuf"))
    lb.wait_healthy(1)
    for header in [None, f"00-{'0' * 32}-{PARENT_SPAN}-01", f"00-{PARENT_TRACE.upper()}-{PARENT_SPAN}-01",
                   "garbage"]:
        headers = {"tracestate": "vendor=abc"}
        if header:
            headers["traceparent"] = header
        r = lb.execute("/echo", 1, headers=headers)
        check(r.status == 200, f"status {r.status}")
        # W3C processing model: a tracestate without a valid traceparent is not passed on.
        check("x-seen-tracestate" not in r.headers, f"{header!r}: tracestate dropped: {r.headers}")
        _, trace_id, attempt_id, flags = seen_traceparent(r)
        check(trace_id not in (PARENT_TRACE, "0" * 32, PARENT_TRACE.upper()) and flags == "01",
              f"{header!r}: a new sampled trace, got {trace_id}-{flags}")
        spans = rx.wait_trace(trace_id, 2)
        server = one(spans, SERVER)
        check(server["parentSpanId"] == "", f"{header!r}: a root span: {server}")
        check(one(spans, CLIENT)["spanId"] == attempt_id, "the worker's parent is the attempt span")
        check(server["protocol"] == "http", "sent over OTLP/HTTP")


@test
def h2_request_is_traced_like_h1():
    rx, w, lb = traced_fleet_of_one()
    body = json.dumps({"jsonrpc": "2.0", "id": 7, "method": "components/execute",
                       "params": {"component": "/echo", "input": 1}})
    out = subprocess.run(["nghttp", "-v", "-d", "-", "-H", "content-type: application/json",
                          "-H", f"traceparent: 00-{PARENT_TRACE}-{PARENT_SPAN}-01", "-H", "tracestate: k=v",
                          f"http://127.0.0.1:{lb.port}/"], input=body, capture_output=True, text=True, timeout=20)
    seen = [l.split("x-seen-traceparent: ", 1)[1].strip() for l in out.stdout.splitlines() if "x-seen-traceparent: " in l]
    check(seen, f"nghttp output: {out.stdout[-2000:]}")
    _, trace_id, attempt_id, _ = seen[0].split("-")
    check(trace_id == PARENT_TRACE, f"same trace over h2: {seen}")
    check("x-seen-tracestate: k=v" in out.stdout, "tracestate forwarded over h2")
    spans = rx.wait_trace(PARENT_TRACE, 2)
    server = one(spans, SERVER)
    check(server["parentSpanId"] == PARENT_SPAN and one(spans, CLIENT)["spanId"] == attempt_id, f"{spans}")
    check(server["attributes"].get("rpc.jsonrpc.request_id") == "7", f"{server['attributes']}")


@test
def sse_streams_and_pinned_requests_are_spans_like_any_other():
    rx, w, lb = traced_fleet_of_one()
    sse = "5e" * 16
    r = lb.execute("/stream", {"events": 3, "interval_ms": 150},
                   headers={"traceparent": f"00-{sse}-{PARENT_SPAN}-01"})
    check(r.status == 200 and b"data:" in r.body, f"an SSE answer: {r.status} {r.body[:200]!r}")
    spans = rx.wait_trace(sse, 2)
    for span in (one(spans, SERVER), one(spans, CLIENT)):
        took_ms = (int(span["endTimeUnixNano"]) - int(span["startTimeUnixNano"])) / 1e6
        check(took_ms >= 300, f"the span ends when the stream ends: {took_ms:.0f} ms for 3 events 150 ms apart")
    pinned = "9a" * 16
    r = lb.execute("/echo", 1, headers={"traceparent": f"00-{pinned}-{PARENT_SPAN}-01",
                                        "Stepflow-Instance-Id": w.instance_id})
    check(r.status == 200, f"pinned: {r.status}")
    spans = rx.wait_trace(pinned, 2)
    check(one(spans, SERVER)["attributes"]["stepflow.routing.decision"] == "pinned", f"{spans}")
    check(one(spans, CLIENT)["attributes"]["stepflow.routing.decision"] == "pinned-header", f"{spans}")


@test
def an_unsampled_parent_exports_nothing_but_the_worker_gets_the_trace():
    rx, w, lb = traced_fleet_of_one()
    r = lb.execute("/echo", 1, headers={"traceparent": f"00-{PARENT_TRACE}-{PARENT_SPAN}-00"})
    _, trace_id, attempt_id, flags = seen_traceparent(r)
    check(trace_id == PARENT_TRACE and flags == "00" and attempt_id != PARENT_SPAN, f"{trace_id} {attempt_id} {flags}")
    # A sampled request after it is a barrier: once its spans are in, the unsampled ones would be too.
    other = "aaaabbbbccccddddeeeeffff00001111"
    lb.execute("/echo", 2, headers={"traceparent": f"00-{other}-{PARENT_SPAN}-01"})
    rx.wait_trace(other, 2)
    check(rx.spans(PARENT_TRACE) == [], "nothing exported for the unsampled trace")
    line = [l for l in lb.logs("request") if l.get("trace_id") == PARENT_TRACE]
    check(line, "the access log still names the unsampled trace")


@test
def trace_ids_in_logs_without_export_when_a_traceparent_arrived():
    w = Worker("a")
    lb = Balancer([w.address])
    lb.wait_healthy(1)
    incoming = f"00-{PARENT_TRACE}-{PARENT_SPAN}-01"
    r = lb.execute("/echo", 1, headers={"traceparent": incoming})
    check(r.headers.get("x-seen-traceparent") == incoming, "without tracing the traceparent passes untouched")
    lb.execute("/echo", 2)
    wait_for(lambda: len(lb.logs("request")) >= 2, 5, "two access log lines")
    lines = lb.logs("request")
    check(lines[0].get("trace_id") == PARENT_TRACE and lines[0].get("span_id") == PARENT_SPAN, f"{lines[0]}")
    check("trace_id" not in lines[1], f"no trace, no ids: {lines[1]}")


class Refuser(http.server.BaseHTTPRequestHandler):
    """A worker that is always at capacity (503 / -32300): new work sent there is retried."""
    protocol_version = "HTTP/1.1"

    def _send(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self._send(200, {"status": "healthy", "instanceId": "refuser-1"})

    def do_POST(self):
        n = int(self.headers.get("Content-Length", "0"))
        req = json.loads(self.rfile.read(n) or b"{}")
        self._send(503, {"jsonrpc": "2.0", "id": req.get("id"), "error": {"code": -32300, "message": "at capacity"}})

    def log_message(self, *a):
        pass


def worker_and_refuser(handler, recovery):
    """A receiver, worker "a" (one execution at a time) and a refusing worker behind one traced
    balancer thread. The caller shuts the refuser's server down."""
    rx = Receiver()
    w = Worker("a", max_concurrency=1)
    refuser = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=refuser.serve_forever, daemon=True).start()
    lb = Balancer([w.address, f"127.0.0.1:{refuser.server_address[1]}"],
                  args=tracing_args(rx, extra=["--capacity-recovery-interval", recovery, "--threads", "1",
                                               "--health-interval", "200ms"]))
    return rx, w, refuser, lb


@test
def a_retried_request_shows_two_attempts_under_one_server_span():
    rx, w, refuser, lb = worker_and_refuser(Refuser, "50ms")
    lb.wait_healthy(2)
    # Retried: a request the refuser turned away goes to the worker, a second attempt.
    retried = None
    for i in range(40):
        trace = f"{i + 1:032x}"
        r = lb.execute("/echo", i, headers={"traceparent": f"00-{trace}-{PARENT_SPAN}-01"})
        check(r.status == 200, f"status {r.status}")
        spans = rx.wait_trace(trace, 2)
        if len([s for s in spans if s["kind"] == CLIENT]) == 2:
            retried = rx.wait_trace(trace, 3)
            break
    check(retried, "a request went to the refuser first within 40 tries")
    server = one(retried, SERVER)
    attempts = sorted([s for s in retried if s["kind"] == CLIENT], key=lambda s: s["attributes"]["stepflow.attempt"])
    check([a["parentSpanId"] for a in attempts] == [server["spanId"]] * 2, "both attempts under the server span")
    check(attempts[0]["attributes"].get("stepflow.failure") == "worker-at-capacity"
          and attempts[0]["status"]["code"] == 2, f"first attempt failed, kind named: {attempts[0]}")
    check(attempts[1]["attributes"].get("stepflow.attempt") == 2 and attempts[1]["status"]["code"] == 0
          and attempts[1]["attributes"].get("stepflow.instance.id") == w.instance_id, f"second: {attempts[1]}")
    check(server["attributes"]["stepflow.retries"] == 1 and server["attributes"]["stepflow.attempts"] == 2, f"{server}")
    refuser.shutdown()
    refuser.server_close()
    print("EXAMPLE retried trace:", json.dumps(retried))


@test
def a_queued_request_shows_its_wait_as_a_child_span():
    rx = Receiver()
    w = Worker("a", max_concurrency=1)
    lb = Balancer([w.address], args=tracing_args(rx, extra=["--threads", "1"]))
    lb.wait_healthy(1)
    # The worker runs one request at a time (its /health says so); a second one waits for the first.
    held = threading.Thread(target=lambda: lb.execute("/sleep", {"ms": 600},
                                                       headers={"traceparent": f"00-{'e' * 32}-{PARENT_SPAN}-01"}))
    held.start()
    wait_for(lambda: lb.in_flight_total() == 1, 5, "the first request in flight")
    queued = "f" * 32
    r = lb.execute("/echo", 1, headers={"traceparent": f"00-{queued}-{PARENT_SPAN}-01"})
    held.join()
    check(r.status == 200, f"queued request answered: {r.status}")
    spans = rx.wait_trace(queued, 3)
    server = one(spans, SERVER)
    wait = one(spans, INTERNAL, name="admission queue")
    check(wait["parentSpanId"] == server["spanId"] and int(wait["endTimeUnixNano"]) > int(wait["startTimeUnixNano"]),
          f"queue wait is a child span: {wait}")
    check(server["attributes"]["stepflow.queue_wait_ms"] > 0, f"{server['attributes']}")
    print("EXAMPLE queued trace:", json.dumps(spans))


class LateRefuser(Refuser):
    """A Refuser whose /health fails until `ready` is set."""
    ready = threading.Event()

    def do_GET(self):
        if self.ready.is_set():
            return super().do_GET()
        self._send(503, {"status": "starting"})


@test
def a_call_refused_then_queued_shows_both_in_one_trace():
    # Worker "a" holds its one slot with a callback session whose answer waits until the traced
    # call is in the queue; the refuser turns calls away (-32300: not run) and becomes healthy
    # only once "a" is busy. So the traced call goes to the refuser, is refused, finds no instance
    # with room (the refuser cools down for 10 s) and waits in the queue until the session ends:
    # attempt 1, a queue wait, attempt 2, all in one trace, in that order by construction.
    rx, w, refuser, lb = worker_and_refuser(LateRefuser, "10s")
    lb.wait_healthy(1)

    def answer_once_queued(req):
        wait_for(lambda: lb.metric("stepflow_lb_queue_depth") == 1, 10, "the traced call refused and queued")
        return client.default_answer(req)

    holder = concurrent.futures.ThreadPoolExecutor(1)
    held = holder.submit(lambda: lb.session(1, answer=answer_once_queued, timeout=30))
    wait_for(lambda: lb.backend(w.address)["newWorkInFlight"] == 1, 10, "the session holds a's only slot")
    LateRefuser.ready.set()
    lb.wait_healthy(2)
    trace = "ab" * 16
    r = lb.execute("/echo", 1, headers={"traceparent": f"00-{trace}-{PARENT_SPAN}-01"})
    check(held.result().ok, f"the session completed: {held.result()}")
    holder.shutdown()
    check(r.status == 200, f"the call was answered: {r.status}")
    spans = rx.wait_trace(trace, 4)
    brief = [(s["kind"], s["name"], s["attributes"].get("stepflow.instance.id"), s["attributes"].get("stepflow.failure"),
              s["startTimeUnixNano"], s["endTimeUnixNano"]) for s in spans]
    server = one(spans, SERVER)
    wait = one(spans, INTERNAL, name="admission queue")
    attempts = sorted([s for s in spans if s["kind"] == CLIENT], key=lambda s: s["attributes"]["stepflow.attempt"])
    check(len(attempts) == 2, f"two attempts: {brief}")
    check({s["parentSpanId"] for s in attempts + [wait]} == {server["spanId"]}, "all under the server span")
    first, second = attempts
    check(first["attributes"].get("stepflow.failure") == "worker-at-capacity" and first["status"]["code"] == 2,
          f"the refuser turned the first attempt away: {first}")
    check(int(first["endTimeUnixNano"]) <= int(wait["startTimeUnixNano"])
          and int(wait["endTimeUnixNano"]) <= int(second["startTimeUnixNano"]),
          f"attempt 1, then the wait, then attempt 2: {first['endTimeUnixNano']} {wait['startTimeUnixNano']} "
          f"{wait['endTimeUnixNano']} {second['startTimeUnixNano']}")
    check(second["attributes"].get("stepflow.instance.id") == w.instance_id and second["status"]["code"] == 0,
          f"the worker ran it: {second}")
    check(server["attributes"]["stepflow.retries"] == 1 and server["attributes"]["stepflow.attempts"] == 2
          and server["attributes"]["stepflow.queue_wait_ms"] > 0, f"{server['attributes']}")
    refuser.shutdown()
    refuser.server_close()
    print("EXAMPLE refused, then queued trace:", json.dumps(spans))


def dropped(lb):
    return (lb.metric("stepflow_lb_trace_spans_dropped_total") or 0)


@test
def collector_absent_refusing_or_slow_never_fails_a_request_and_flow_resumes():
    port = free_port()  # nothing listens there yet: the collector is absent
    w = Worker("a", max_concurrency=64)
    lb = Balancer([w.address], args=["--trace-enabled", "true", "--otlp-endpoint", f"http://127.0.0.1:{port}",
                                     "--otel-bsp-schedule-delay", "50", "--otel-bsp-max-queue-size", "16",
                                     "--otel-bsp-max-export-batch-size", "8", "--otel-exporter-otlp-timeout", "300"])
    lb.wait_healthy(1)
    for i in range(100):
        check(lb.execute("/echo", i).status == 200, "requests succeed while the collector is absent")
    wait_for(lambda: dropped(lb) > 0 and (lb.metric("stepflow_lb_trace_export_failures_total") or 0) > 0, 15,
             "spans dropped and failures counted")
    absent_drops = dropped(lb)
    print(f"collector absent: {absent_drops:.0f} spans dropped, "
          f"{lb.metric('stepflow_lb_trace_export_failures_total'):.0f} failed exports, 100/100 requests answered")

    rx = Receiver(grpc_port=port)  # the collector comes up: spans flow again
    trace = "12" * 16
    def arrived():
        lb.execute("/echo", 0, headers={"traceparent": f"00-{trace}-{PARENT_SPAN}-01"})
        return len(rx.spans(trace)) >= 2
    wait_for(arrived, 30, "spans flow once the collector is back", interval=0.5)
    exported = lb.metric("stepflow_lb_trace_spans_exported_total")
    check(exported and exported > 0, f"exported counted: {exported}")

    rx.mode("refuse")
    failures = lb.metric("stepflow_lb_trace_export_failures_total")
    for i in range(40):
        check(lb.execute("/echo", i).status == 200, "requests succeed while the collector refuses")
    wait_for(lambda: lb.metric("stepflow_lb_trace_export_failures_total") > failures and rx.stats()["refused"] > 0, 15,
             "refused exports counted")
    rx.mode("slow", delay_ms=2000)  # slower than --otel-exporter-otlp-timeout
    before = lb.metric("stepflow_lb_trace_export_failures_total")
    for i in range(40):
        check(lb.execute("/echo", i, timeout=5).status == 200, "requests succeed while the collector is slow")
    wait_for(lambda: lb.metric("stepflow_lb_trace_export_failures_total") > before, 15, "timed-out exports counted")
    rx.mode("ok")
    trace = "34" * 16
    wait_for(arrived, 30, "spans flow again after refusing and slow", interval=0.5)
    print(f"after refusing and slow: {dropped(lb):.0f} spans dropped in all, "
          f"{lb.metric('stepflow_lb_trace_export_failures_total'):.0f} failed exports")


@test
def an_https_collector_is_reached_over_verified_tls():
    d = tempfile.mkdtemp(prefix="otlp-tls-")
    cert, key = os.path.join(d, "cert.pem"), os.path.join(d, "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
                    "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost"],
                   check=True, capture_output=True, timeout=30)
    rx = Receiver(env={"OTLP_TLS_CERT": cert, "OTLP_TLS_KEY": key})
    w = Worker("a")
    common = ["--trace-enabled", "true", "--otlp-endpoint", f"https://localhost:{rx.grpc}",
              "--otel-bsp-schedule-delay", "50", "--otel-exporter-otlp-timeout", "1000"]
    # Verified against the given CA (the self-signed certificate itself): spans arrive.
    lb = Balancer([w.address], args=common + ["--otel-exporter-otlp-certificate", cert])
    lb.wait_healthy(1)
    trace = "7e" * 16
    lb.execute("/echo", 1, headers={"traceparent": f"00-{trace}-{PARENT_SPAN}-01"})
    rx.wait_trace(trace, 2)
    lb.stop()
    # Against the system CA bundle the self-signed certificate is refused: nothing arrives, the
    # failures are counted, requests are unaffected.
    lb = Balancer([w.address], args=common)
    lb.wait_healthy(1)
    untrusted = "8e" * 16
    r = lb.execute("/echo", 1, headers={"traceparent": f"00-{untrusted}-{PARENT_SPAN}-01"})
    check(r.status == 200, f"status {r.status}")
    wait_for(lambda: (lb.metric("stepflow_lb_trace_export_failures_total") or 0) > 0, 15, "TLS failure counted")
    check(rx.spans(untrusted) == [], "no span crossed an unverified connection")
    shutil.rmtree(d, ignore_errors=True)


@test
def sigterm_flushes_the_queued_spans():
    rx = Receiver()
    w = Worker("a")
    lb = Balancer([w.address], args=["--trace-enabled", "true", "--otlp-endpoint", f"http://127.0.0.1:{rx.grpc}",
                                     "--otel-bsp-schedule-delay", "600000"])  # nothing leaves on its own
    lb.wait_healthy(1)
    trace = "56" * 16
    lb.execute("/echo", 1, headers={"traceparent": f"00-{trace}-{PARENT_SPAN}-01"})
    check(rx.spans(trace) == [], "not exported before the batch delay")
    lb.signal(signal.SIGTERM)
    check(lb.wait_exit(15) == 0, "clean exit")
    check(len(rx.spans(trace)) == 2, f"flushed at exit: {rx.spans(trace)}")


@test
def spans_a_collector_rejects_in_a_partial_success_are_counted_not_resent():
    # OTLP: a partial success must not be retried; the refused spans are lost, so counted and said.
    for protocol in ("grpc", "http"):
        rx = Receiver()
        rx.mode("partial", rejected=1, message="span too old")
        w = Worker("a")
        lb = Balancer([w.address], args=tracing_args(rx, protocol))
        lb.wait_healthy(1)
        trace = ("7a" if protocol == "grpc" else "7b") * 16
        lb.execute("/echo", 1, headers={"traceparent": f"00-{trace}-{PARENT_SPAN}-01"})
        rx.wait_trace(trace, 2)
        # The two spans usually leave in one export, possibly in two: each export has one refused.
        calls = lambda: rx.stats()["grpcCalls" if protocol == "grpc" else "httpCalls"]
        wait_for(lambda: lb.metric("stepflow_lb_trace_spans_dropped_total", reason="rejected") == calls(), 10,
                 f"{protocol}: the rejected spans counted")
        wait_for(lambda: lb.logs("collector rejected spans"), 5, "the rejection logged")
        said = lb.logs("collector rejected spans")[0]
        check(said.get("rejected") == 1 and said.get("reason") == "span too old", f"{protocol}: {said}")
        exported = lb.metric("stepflow_lb_trace_spans_exported_total")
        check(calls() in (1, 2) and exported == 2 - calls() and lb.metric("stepflow_lb_trace_export_failures_total") == 0,
              f"{protocol}: no export sent twice ({calls()} calls for 2 spans); {exported:.0f} taken")
        lb.stop()
        rx.stop()


@test
def an_otlp_http_answer_in_chunks_is_read_whole_and_its_connection_kept():
    rx = Receiver()
    rx.mode("partial", rejected=1, message="span too old", chunked=True)
    w = Worker("a")
    lb = Balancer([w.address], args=tracing_args(rx, "http"))
    lb.wait_healthy(1)
    for trace in ("7d" * 16, "7e" * 16):  # two exports at least, one per request
        lb.execute("/echo", 1, headers={"traceparent": f"00-{trace}-{PARENT_SPAN}-01"})
        rx.wait_trace(trace, 2)
        wait_for(lambda: lb.metric("stepflow_lb_trace_spans_dropped_total", reason="rejected") == rx.stats()["httpCalls"],
                 10, "each export's partial success read from its chunked answer")
    stats = rx.stats()
    check(stats["httpCalls"] >= 2 and stats["httpConnections"] == 1, f"the exports on one kept connection: {stats}")


@test
def an_export_the_collector_refuses_for_good_is_not_retried_and_its_reason_logged():
    # HTTP 400 with a google.rpc.Status; gRPC INVALID_ARGUMENT (grpc-message percent-encoded).
    for protocol, trace in (("http", "9a" * 16), ("grpc", "9b" * 16)):
        rx = Receiver()
        rx.mode("reject", message="span 3: bad trace id")
        w = Worker("a")
        lb = Balancer([w.address], args=tracing_args(rx, protocol))
        lb.wait_healthy(1)
        lb.execute("/echo", 1, headers={"traceparent": f"00-{trace}-{PARENT_SPAN}-01"})
        wait_for(lambda: lb.metric("stepflow_lb_trace_spans_dropped_total", reason="export-failed") == 2, 10,
                 f"{protocol}: both spans dropped")
        wait_for(lambda: lb.logs("trace export failed"), 5, "the failure logged")
        reason = lb.logs("trace export failed")[0].get("reason", "")
        want = "HTTP 400: span 3: bad trace id" if protocol == "http" else "grpc-status 3: span 3: bad trace id"
        calls = rx.stats()["refused"]
        check(reason == want and calls == lb.metric("stepflow_lb_trace_export_failures_total"),
              f"{protocol}: reason {reason!r}, want {want!r}; {calls} calls, each refused once")
        lb.stop()
        rx.stop()


@test
def an_otlp_http_answer_after_an_interim_100_is_taken_as_the_final_one():
    # A client must read past 1xx answers it did not ask for (RFC 9110 §15.2).
    rx = Receiver()
    rx.mode("ok", interim=True)
    w = Worker("a")
    lb = Balancer([w.address], args=tracing_args(rx, "http"))
    lb.wait_healthy(1)
    trace = "9c" * 16
    lb.execute("/echo", 1, headers={"traceparent": f"00-{trace}-{PARENT_SPAN}-01"})
    rx.wait_trace(trace, 2)
    wait_for(lambda: lb.metric("stepflow_lb_trace_spans_exported_total") == 2, 10, "both spans counted as exported")
    check(lb.metric("stepflow_lb_trace_export_failures_total") == 0, "no failed export")


@test
def a_retry_waits_as_long_as_the_collector_asks():
    # OTLP/HTTP: 429 with Retry-After; OTLP/gRPC: RESOURCE_EXHAUSTED with a RetryInfo.
    for protocol, trace in (("http", "7c" * 16), ("grpc", "7f" * 16)):
        rx = Receiver()
        rx.mode("throttle", retryAfter=2, times=1)
        w = Worker("a")
        lb = Balancer([w.address], args=tracing_args(rx, protocol))
        lb.wait_healthy(1)
        lb.execute("/echo", 1, headers={"traceparent": f"00-{trace}-{PARENT_SPAN}-01"})
        rx.wait_trace(trace, 2)
        times = rx.stats()["callTimesMs"]  # one export at a time: the second call is the retry
        check(len(times) >= 2 and times[1] - times[0] >= 2000,
              f"{protocol}: asked for 2 s, the retry came {times[1] - times[0] if len(times) >= 2 else times} ms later "
              "(the first backoff alone is 500..750 ms)")
        check(lb.metric("stepflow_lb_trace_export_failures_total") == 1, "the throttled attempt counted as failed")
        lb.stop()
        rx.stop()


def raw_exchange(port, request):
    """One HTTP/1.1 request written as bytes (with Connection: close); the answer's head and body."""
    c = socket.create_connection(("127.0.0.1", port), timeout=10)
    c.sendall(request)
    out = b""
    while chunk := c.recv(65536):
        out += chunk
    c.close()
    return out.split(b"\r\n\r\n", 1)


@test
def bytes_that_are_not_utf8_reach_logs_spans_and_answers_as_u_fffd():
    # A target and header values may hold any byte from 0x80 up; JSON and protobuf strings must
    # be UTF-8. The worker still gets the bytes as sent; our own records show U+FFFD instead.
    rx, w, lb = traced_fleet_of_one()
    trace = "6c" * 16
    path, agent = b"/caf\xe9/\xe2\x9c\x93/\xe2\x9c", b"agent\xff\xfe/1"
    head, _ = raw_exchange(lb.port, b"GET " + path + b"?q=\xe9 HTTP/1.1\r\nHost: lb\r\nUser-Agent: " + agent +
                           f"\r\ntraceparent: 00-{trace}-{PARENT_SPAN}-01\r\nConnection: close\r\n\r\n".encode())
    check(head.startswith(b"HTTP/1.1 "), f"answered: {head[:80]!r}")
    want_path, want_agent = path.decode("utf-8", "replace"), agent.decode("utf-8", "replace")
    # The harness reads the log as strict UTF-8 JSON: an ill-formed line would stop its reader.
    wait_for(lambda: any(r.get("path") == want_path for r in lb.logs("request")), 5,
             f"an access log line with path {want_path!r}")
    server = one(rx.wait_trace(trace, 2), SERVER)
    a = server["attributes"]
    check(a.get("url.path") == want_path and a.get("user_agent.original") == want_agent,
          f"decoded span: url.path {a.get('url.path')!r}, user_agent.original {a.get('user_agent.original')!r}")
    # The same over HTTP/2 (h2c): the same trace records.
    h2_trace = "6d" * 16
    c = H2Client("127.0.0.1", lb.port)
    sid = c.new_stream_id()
    c.send_headers(sid, [(":method", "GET"), (":scheme", "http"), (":authority", "lb"), (":path", path),
                         ("user-agent", agent), ("traceparent", f"00-{h2_trace}-{PARENT_SPAN}-01")], end_stream=True)
    c.wait(lambda: c.streams[sid].closed, what="the answer over h2")
    a = one(rx.wait_trace(h2_trace, 2), SERVER)["attributes"]
    check(a.get("url.path") == want_path and a.get("user_agent.original") == want_agent, f"h2 span: {a}")
    # A JSON answer of our own that quotes a header value (an unknown pinned instance).
    head, body = raw_exchange(lb.port, b"POST /echo HTTP/1.1\r\nHost: lb\r\nStepflow-Instance-Id: gone-\xff\r\n"
                                       b"Content-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}")
    check(head.startswith(b"HTTP/1.1 503"), f"unknown instance: {head[:80]!r}")
    text = body.decode("utf-8")  # strict
    check("gone-\\ufffd" in text and json.loads(text), f"answer: {text}")


@test
def two_traceparent_fields_start_a_new_trace():
    # As W3C Trace Context's test suite has it: neither is continued, and the worker gets one.
    rx, w, lb = traced_fleet_of_one()
    other = "0af7651916cd43dd8448eb211c80319c"
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "components/execute",
                       "params": {"component": "/echo", "input": 1}}).encode()
    head, _ = raw_exchange(lb.port, b"POST / HTTP/1.1\r\nHost: lb\r\nContent-Type: application/json\r\n" +
                           f"traceparent: 00-{PARENT_TRACE}-{PARENT_SPAN}-01\r\ntraceparent: 00-{other}-{PARENT_SPAN}-01\r\n"
                           "tracestate: vendor=abc\r\n"
                           f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
    seen = [l.split(b": ", 1)[1].decode() for l in head.split(b"\r\n") if l.lower().startswith(b"x-seen-traceparent:")]
    check(head.startswith(b"HTTP/1.1 200") and len(seen) == 1, f"one traceparent reached the worker: {head!r}")
    trace_id = seen[0].split("-")[1]
    check(trace_id not in (PARENT_TRACE, other), f"a new trace: {seen[0]}")
    check(b"x-seen-tracestate" not in head.lower(), f"and no tracestate: {head!r}")
    server = one(rx.wait_trace(trace_id, 2), SERVER)
    check(server["parentSpanId"] == "", f"a root span: {server}")


@test
def bad_tracing_values_are_startup_errors_naming_them():
    cases = [({"STEPFLOW_TRACE_ENABLED": "maybe"}, "STEPFLOW_TRACE_ENABLED"),
             ({"STEPFLOW_OTLP_ENDPOINT": "otel-collector:4317"}, "STEPFLOW_OTLP_ENDPOINT"),
             ({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"}, "OTEL_EXPORTER_OTLP_PROTOCOL"),
             ({"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/json"}, "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"),
             ({"OTEL_EXPORTER_OTLP_TRACES_HEADERS": "novalue"}, "OTEL_EXPORTER_OTLP_TRACES_HEADERS"),
             ({"OTEL_EXPORTER_OTLP_TRACES_TIMEOUT": "soon"}, "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT"),
             ({"OTEL_EXPORTER_OTLP_COMPRESSION": "zstd"}, "OTEL_EXPORTER_OTLP_COMPRESSION"),
             ({"OTEL_TRACES_SAMPLER": "sometimes"}, "OTEL_TRACES_SAMPLER"),
             ({"OTEL_TRACES_SAMPLER_ARG": "2"}, "OTEL_TRACES_SAMPLER_ARG"),
             ({"OTEL_SDK_DISABLED": "yes please"}, "OTEL_SDK_DISABLED"),
             ({"OTEL_EXPORTER_OTLP_HEADERS": "novalue"}, "OTEL_EXPORTER_OTLP_HEADERS"),
             ({"OTEL_RESOURCE_ATTRIBUTES": "=x"}, "OTEL_RESOURCE_ATTRIBUTES"),
             ({"OTEL_RESOURCE_ATTRIBUTES": "team=caf%E9"}, "OTEL_RESOURCE_ATTRIBUTES"),  # not UTF-8
             ({"OTEL_BSP_MAX_QUEUE_SIZE": "0"}, "OTEL_BSP_MAX_QUEUE_SIZE"),
             ({"OTEL_BSP_SCHEDULE_DELAY": "5s"}, "OTEL_BSP_SCHEDULE_DELAY"),
             ({"STEPFLOW_METRICS_ENABLED": "sure"}, "STEPFLOW_METRICS_ENABLED")]
    base = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "STEPFLOW_"))}
    for env, name in cases:
        p = subprocess.run([lb_binary(), "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0",
                            "--backends", "127.0.0.1:1"], env={**base, **env}, capture_output=True, text=True,
                           timeout=10)
        check(p.returncode == 2 and name in p.stderr, f"{env}: exit {p.returncode}, stderr {p.stderr!r}")


@test
def export_headers_reach_the_collector_and_traces_variables_win_over_general_ones():
    rx = Receiver()
    w = Worker("a")
    # The general variables: OTLP/gRPC, the headers as gRPC metadata (values percent-decoded).
    lb = Balancer([w.address], env={"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{rx.grpc}",
                                    "OTEL_EXPORTER_OTLP_HEADERS": "x-tenant=general,Authorization=Bearer%20abc",
                                    "OTEL_BSP_SCHEDULE_DELAY": "50"})
    lb.wait_healthy(1)
    lb.execute("/echo", 1, headers={"traceparent": f"00-{'8a' * 16}-{PARENT_SPAN}-01"})
    rx.wait_trace("8a" * 16, 2)
    got = rx.stats()["lastHeaders"]
    check(got.get("x-tenant") == "general" and got.get("authorization") == "Bearer abc", f"gRPC metadata: {got}")
    lb.stop()
    # Each traces-specific variable in place of its general one, as the OpenTelemetry SDKs read them.
    lb = Balancer([w.address], env={"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
                                    "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf",
                                    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"http://127.0.0.1:{rx.http}/v1/traces",
                                    "OTEL_EXPORTER_OTLP_HEADERS": "x-tenant=general",
                                    "OTEL_EXPORTER_OTLP_TRACES_HEADERS": "x-tenant=traces",
                                    "OTEL_EXPORTER_OTLP_TIMEOUT": "1",
                                    "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT": "10000",
                                    "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION": "gzip",
                                    "OTEL_BSP_SCHEDULE_DELAY": "50"})
    lb.wait_healthy(1)
    lb.execute("/echo", 1, headers={"traceparent": f"00-{'8b' * 16}-{PARENT_SPAN}-01"})
    spans = rx.wait_trace("8b" * 16, 2)
    got = rx.stats()["lastHeaders"]
    check(spans[0]["protocol"] == "http" and got.get("x-tenant") == "traces", f"{spans[0]['protocol']}, headers {got}")
    check(lb.logs("OTLP compression gzip is not supported: spans are exported uncompressed"),
          "gzip asked for: said at start-up")
    check(lb.metric("stepflow_lb_trace_export_failures_total") == 0, "the 10 s traces timeout, not the 1 ms one")


@test
def the_otel_variables_configure_export():
    rx = Receiver()
    w = Worker("a")
    lb = Balancer([w.address], env={"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"http://127.0.0.1:{rx.http}/v1/traces",
                                    "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf", "OTEL_SERVICE_NAME": "edge-lb",
                                    "OTEL_BSP_SCHEDULE_DELAY": "50", "STEPFLOW_METRICS_ENABLED": "true",
                                    "OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0"})
    lb.wait_healthy(1)
    # Ratio 0: new traces are not sampled; a sampled parent still is (parent-based).
    r = lb.execute("/echo", 1)
    check(seen_traceparent(r)[3] == "00", "a root trace at ratio 0 is unsampled")
    lb.execute("/echo", 1, headers={"traceparent": f"00-{PARENT_TRACE}-{PARENT_SPAN}-01"})
    spans = rx.wait_trace(PARENT_TRACE, 2)
    check(spans[0]["resource"]["service.name"] == "edge-lb" and spans[0]["protocol"] == "http", f"{spans[0]}")
    check(len(rx.spans()) == 2, "only the sampled trace was exported")


run_tests()
