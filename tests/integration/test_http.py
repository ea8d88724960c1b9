"""HTTP/1.1 behaviour of the data path: streaming bodies in both framings, strict framing with
answers that never reach a worker, SSE delivered event by event, client cancel, header rules."""

import hashlib
import json
import socket
import time

from harness import Balancer, Worker, check, client, connections_to, run_tests, test, wait_for

import example_worker  # noqa: E402  (harness puts tests/worker on the path)

MB = 1024 * 1024


def upstream_responses(lb):
    return lb.metric("stepflow_lb_upstream_responses_total") or 0


@test
def multi_megabyte_bodies_are_byte_identical_in_both_framings():
    w = Worker("big")
    lb = Balancer([w.address])
    pad = "".join(chr(33 + (i * 7919) % 90) for i in range(6 * MB))
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "components/execute",
                       "params": {"component": "/digest", "input": {"pad": pad}}}).encode()
    expected = hashlib.sha256(body).hexdigest()
    for chunked in (False, True):
        r = lb.post(body, chunked=chunked, chunk_size=100003, timeout=60)
        check(r.status == 200, r.status)
        res = r.json()["result"]
        check(res["bytes"] == len(body) and res["sha256"] == expected, f"request body intact (chunked={chunked})")
    for chunked in (False, True):
        r = lb.execute("/blob", {"bytes": 7 * MB + 13, "chunked": chunked, "seed": 5}, timeout=60)
        check(r.status == 200 and len(r.body) == 7 * MB + 13, f"blob length (chunked={chunked})")
        check(hashlib.sha256(r.body).hexdigest() == example_worker.blob_sha256(7 * MB + 13, 5),
              f"response body intact (chunked={chunked})")


@test
def malformed_requests_are_answered_without_a_worker():
    w = Worker("strict")
    lb = Balancer([w.address], args=["--max-header-size", "4096", "--max-headers", "20"])
    before = upstream_responses(lb)
    big_header = b"X-Big: " + b"a" * 5000 + b"\r\n"
    many = b"".join(b"X-%d: v\r\n" % i for i in range(30))
    cases = [
        ("content-length and chunked", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", 400),
        ("two content-lengths", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!", 400),
        ("bad chunk size", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n", 400),
        ("unsupported coding", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
        ("bad request line", b"POST /  HTTP/1.1\r\nHost: a\r\n\r\n", 400),
        ("garbage", b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03\r\n\r\n", 400),
        ("missing host", b"GET / HTTP/1.1\r\n\r\n", 400),
        ("two hosts", b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
        ("header folding", b"GET / HTTP/1.1\r\nHost: a\r\nX-A: 1\r\n  2\r\n\r\n", 400),
        ("oversized head", b"GET / HTTP/1.1\r\nHost: a\r\n" + big_header + b"\r\n", 431),
        ("too many fields", b"GET / HTTP/1.1\r\nHost: a\r\n" + many + b"\r\n", 431),
        ("http/2 version", b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", 505),
    ]
    for name, data, status in cases:
        raw = client.raw_request("127.0.0.1", lb.port, data)
        check(raw.startswith(b"HTTP/1.1 %d " % status), f"{name}: expected {status}, got {raw[:60]!r}")
        check(b"connection: close" in raw.lower(), f"{name}: connection closed after the error")
    check(upstream_responses(lb) == before, "no request reached the worker")
    check(lb.metric("stepflow_lb_rejected_requests_total") == len(cases), "rejections counted")


@test
def slow_request_head_gets_408():
    w = Worker("slow")
    lb = Balancer([w.address], args=["--request-header-timeout", "300ms"])
    start = time.monotonic()
    raw = client.raw_request("127.0.0.1", lb.port, b"POST / HTTP/1.1\r\nHost: a\r\n", timeout=10)
    check(raw.startswith(b"HTTP/1.1 408 "), raw[:80])
    check(time.monotonic() - start < 5, "answered at the deadline, not later")


@test
def a_408_on_a_kept_alive_connection_is_logged_as_its_own_request():
    """The 408 for a head that never completed is a request of its own in the access log: it
    must not carry the previous request's trace id, method, path or instance."""
    w = Worker("slow-second")
    lb = Balancer([w.address], args=["--request-header-timeout", "300ms"])
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "components/execute",
                       "params": {"component": "/echo", "input": {}}}).encode()
    first = (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\n"
             b"traceparent: 00-" + trace_id.encode() + b"-00f067aa0ba902b7-01\r\n"
             b"Content-Length: %d\r\n\r\n" % len(body) + body)
    raw = client.raw_request("127.0.0.1", lb.port, first + b"GET /second HTTP/1.1\r\nHost: a\r\n", timeout=10,
                             responses=2)
    check(raw.startswith(b"HTTP/1.1 200 ") and b"HTTP/1.1 408 " in raw, raw[:200])

    def lines():
        return [r for r in lb.logs("request") if r.get("status") in (200, 408)]
    wait_for(lambda: len(lines()) == 2, 5, "both requests logged")
    ok, timed_out = sorted(lines(), key=lambda r: r["status"])
    check(ok.get("trace_id") == trace_id and ok.get("method") == "POST" and ok.get("instance"), ok)
    check(timed_out.get("trace_id") != trace_id, f"408 logged with the previous request's trace: {timed_out}")
    check(timed_out.get("method") != "POST" and not timed_out.get("instance"), timed_out)


@test
def idle_keepalive_connection_is_closed_silently():
    w = Worker("idle")
    lb = Balancer([w.address], args=["--keepalive-idle-timeout", "300ms"])
    start = time.monotonic()
    raw = client.raw_request("127.0.0.1", lb.port, b"GET /health HTTP/1.1\r\nHost: a\r\n\r\n", timeout=10,
                             responses=None)
    check(raw.startswith(b"HTTP/1.1 200 ") and raw.count(b"HTTP/1.1") == 1, raw[:80])
    check(time.monotonic() - start < 5, "closed after the idle timeout, not at the reader's deadline")


@test
def slow_worker_gets_504_and_stays_healthy():
    w = Worker("slowhead")
    lb = Balancer([w.address], args=["--upstream-header-timeout", "300ms"])
    start = time.monotonic()
    r = lb.post({"jsonrpc": "2.0", "id": 5, "method": "components/execute",
                 "params": {"component": "/sleep", "input": {"ms": 3000}}})
    check(r.status == 504, r.status)
    check(time.monotonic() - start < 2.5, "answered at the upstream header deadline, not when the worker replied")
    check(lb.metric("stepflow_lb_backend_health", backend=w.address) == 1, "a slow worker is not marked unhealthy")


@test
def quiet_stream_is_cut_after_the_stream_idle_timeout():
    w = Worker("quiet")
    lb = Balancer([w.address], args=["--stream-idle-timeout", "300ms"])
    hold = {"jsonrpc": "2.0", "id": "q", "method": "components/execute",
            "params": {"component": "/stream", "input": {"events": 1, "hold": True}}}
    before = w.health()["cancelledStreams"]
    reader = client.SseReader("127.0.0.1", lb.port, hold)
    check(reader.next_event(timeout=10) is not None, "first event")
    check(reader.next_event(timeout=10) is None and reader.ended_abnormally, "the client sees the stream break")
    wait_for(lambda: w.health()["cancelledStreams"] == before + 1, 10, "the worker saw the cancel")
    wait_for(lambda: lb.in_flight_total() == 0, 5, "in-flight back to 0")


@test
def idle_pooled_connections_close_after_the_upstream_idle_timeout():
    w = Worker("pool", extra=["--keepalive-timeout", "120"])  # only the balancer may close it
    lb = Balancer([w.address], args=["--upstream-idle-timeout", "300ms"])
    r = lb.post({"jsonrpc": "2.0", "id": 6, "method": "components/execute",
                 "params": {"component": "/echo", "input": {}}})
    check(r.status == 200, r.status)
    port = int(w.address.rsplit(":", 1)[1])
    check(connections_to(port) >= 1, "the connection was kept for reuse")
    wait_for(lambda: connections_to(port) == 0, 10, "idle connection closed")


@test
def first_sse_event_arrives_while_the_stream_is_open():
    w = Worker("sse")
    lb = Balancer([w.address])
    body = {"jsonrpc": "2.0", "id": "s1", "method": "components/execute",
            "params": {"component": "/callbacks", "input": {"count": 1}}}
    reader = client.SseReader("127.0.0.1", lb.port, body)
    check(reader.status == 200 and reader.is_sse, "SSE response")
    check(reader.headers.get("transfer-encoding") == "chunked", reader.headers)
    first = reader.next_event(timeout=10)
    # The worker cannot go on until we answer, so the stream is necessarily still open here.
    check(first is not None and first.json()["method"] == "runs/submit", first)
    check(not reader.ended, "stream still open when the first event arrived")
    answer = client.post_json("127.0.0.1", lb.port, {"jsonrpc": "2.0", "id": first.json()["id"], "result": {"r": 1}},
                              headers={"Stepflow-Instance-Id": reader.instance_id})
    check(answer.status == 202, answer.status)
    final = reader.next_event(timeout=10)
    check(final.json()["result"]["answers"] == [{"r": 1}], final)
    check(reader.next_event(timeout=10) is None and not reader.ended_abnormally, "clean end")
    check(lb.metric("stepflow_lb_sse_streams_total") == 1, "SSE stream counted")
    wait_for(lambda: lb.metric("stepflow_lb_sse_streams_open") == 0, 5, "no SSE stream open")


@test
def client_disconnect_cancels_the_worker_request():
    w = Worker("cancel")
    lb = Balancer([w.address])
    hold = {"jsonrpc": "2.0", "id": "h", "method": "components/execute",
            "params": {"component": "/stream", "input": {"events": 1, "hold": True}}}
    for abort in (False, True):
        before = w.health()["cancelledStreams"]
        reader = client.SseReader("127.0.0.1", lb.port, hold)
        check(reader.next_event(timeout=10) is not None, "first event")
        wait_for(lambda: lb.in_flight_total() == 1, 5, "stream in flight")
        reader.close(abort=abort)
        wait_for(lambda: w.health()["cancelledStreams"] == before + 1, 10, "worker saw the cancel")
        wait_for(lambda: lb.in_flight_total() == 0, 5, "in-flight back to 0")


@test
def headers_trace_forwarding_and_hop_by_hop():
    w = Worker("hdrs")
    lb = Balancer([w.address])
    tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    r = lb.post({"jsonrpc": "2.0", "id": 1, "method": "components/execute",
                 "params": {"component": "/echo", "input": {}}},
                headers={"traceparent": tp, "tracestate": "a=1", "baggage": "k=v", "X-Forwarded-For": "10.9.8.7",
                         "Connection": "X-Private", "X-Private": "secret", "Keep-Alive": "timeout=5"})
    check(r.status == 200, r.status)
    check(r.headers.get("x-seen-traceparent") == tp, "traceparent unchanged")
    check(r.headers.get("x-seen-tracestate") == "a=1" and r.headers.get("x-seen-baggage") == "k=v", r.headers)
    check(r.headers.get("x-seen-forwarded-for") == "10.9.8.7, 127.0.0.1", r.headers.get("x-seen-forwarded-for"))
    check(r.headers.get("x-seen-forwarded-proto") == "http", r.headers)
    check("x-seen-connection" not in r.headers, "Connection not forwarded")
    check(r.headers.get("x-stepflow-routing-decision") == "least-load", r.headers)


@test
def keepalive_pipelining_and_http10():
    w = Worker("ka")
    lb = Balancer([w.address])
    one = (b'POST / HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\nContent-Length: 86\r\n\r\n'
           b'{"jsonrpc":"2.0","id":1,"method":"components/execute","params":{"component":"/echo"}} ')
    check(len(one.split(b"\r\n\r\n", 1)[1]) == 86, "fixture length")
    raw = client.raw_request("127.0.0.1", lb.port, one * 3, responses=3)
    check(raw.count(b"HTTP/1.1 200 OK") == 3, raw[:300])
    conn = client.HttpConnection("127.0.0.1", lb.port)
    for i in range(5):
        r = conn.request("POST", "/", json.dumps({"jsonrpc": "2.0", "id": i, "method": "components/list"}).encode(),
                         {"Content-Type": "application/json"})
        check(r.status == 200 and r.json()["id"] == i, r)
    conn.close()
    raw = client.raw_request("127.0.0.1", lb.port,
                             b'POST / HTTP/1.0\r\nContent-Type: application/json\r\nContent-Length: 86\r\n\r\n'
                             b'{"jsonrpc":"2.0","id":1,"method":"components/execute","params":{"component":"/echo"}} ',
                             responses=None)
    check(raw.startswith(b"HTTP/1.1 200 ") and b"connection: close" in raw.lower(), raw[:200])
    # an SSE answer to an HTTP/1.0 client is delimited by the close
    sse = b'{"jsonrpc":"2.0","id":1,"method":"components/execute","params":{"component":"/stream","input":{}}}'
    raw = client.raw_request("127.0.0.1", lb.port,
                             b'POST / HTTP/1.0\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s'
                             % (len(sse), sse), responses=None)
    check(b"transfer-encoding" not in raw.lower() and raw.count(b"data: ") >= 2, raw[:400])


@test
def expect_100_continue_is_relayed():
    w = Worker("exp")
    lb = Balancer([w.address])
    body = b'{"jsonrpc":"2.0","id":1,"method":"components/list"}'
    s = socket.create_connection(("127.0.0.1", lb.port), timeout=10)
    s.sendall(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\nExpect: 100-continue\r\n"
              b"Content-Length: %d\r\n\r\n" % len(body))
    got = s.recv(4096)
    check(got.startswith(b"HTTP/1.1 100 Continue"), got)
    s.sendall(body)
    data = b""
    while b'"result"' not in data:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    s.close()
    check(b"HTTP/1.1 200 OK" in data, data[:200])


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def blob_response_left_unread(lb, size, chunked, seed):
    """Asks for a `size`-byte blob over a socket with a small receive buffer and reads only the
    response head: the body then waits on the balancer's side. Returns the socket."""
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "components/execute",
                       "params": {"component": "/blob", "input": {"bytes": size, "chunked": chunked, "seed": seed}}}).encode()
    s = socket.create_connection(("127.0.0.1", lb.port), timeout=30)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    s.sendall(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
              % (len(body), body))
    head = b""
    while b"\r\n\r\n" not in head:
        head += s.recv(1)
    check(head.startswith(b"HTTP/1.1 200"), head[:100])
    return s


@test
def slow_reader_applies_back_pressure_instead_of_buffering():
    w = Worker("slowread")
    lb = Balancer([w.address], threads=1)
    size = 96 * MB
    s = blob_response_left_unread(lb, size, chunked=False, seed=3)
    baseline = rss_kib(lb.proc.pid)
    # Unthrottled, the worker would hand the balancer all 96 MiB within a second or two. While the
    # client reads nothing, the balancer's memory must stay within its per-stream bounds.
    peak = baseline
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        peak = max(peak, rss_kib(lb.proc.pid))
        time.sleep(0.05)
    check(peak - baseline < 16 * 1024, f"balancer grew {peak - baseline} KiB while the client read nothing")
    digest = hashlib.sha256()
    got = 0
    while got < size:
        chunk = s.recv(1 << 20)
        check(chunk, f"connection ended after {got} of {size} bytes")
        digest.update(chunk)
        got += len(chunk)
    s.close()
    check(digest.hexdigest() == example_worker.blob_sha256(size, 3), "body intact after the stall")


@test
def client_that_takes_nothing_is_disconnected_after_the_send_timeout():
    w = Worker("stuck")
    lb = Balancer([w.address], threads=1, args=["--client-send-timeout", "500ms"])
    size = 32 * MB
    s = blob_response_left_unread(lb, size, chunked=True, seed=4)
    wait_for(lambda: lb.in_flight_total() == 1, 5, "response in flight")
    # The client takes nothing more: the balancer must give up on it and cancel the worker's request.
    wait_for(lambda: lb.in_flight_total() == 0, 10, "exchange ended by the send timeout")
    got = 0
    try:
        while True:
            chunk = s.recv(1 << 20)
            if not chunk:
                break
            got += len(chunk)
    except ConnectionResetError:
        pass
    s.close()
    check(got < size, f"the connection was cut ({got} of {size} bytes arrived)")


if __name__ == "__main__":
    run_tests()
