"""What a worker writes into its response head never reaches a client unchecked (issue 22, point 1).

A worker (tests/integration/raw_worker.py, answers written byte for byte) puts a CR, LF or NUL in
its reason phrase, a bare LF inside a field value, a space in a field name, a folded line: the
client gets 502 with a JSON-RPC error echoing its id, over HTTP/1.1 and HTTP/2, never the
worker's bytes; the refusal is counted and charged to the instance.
"""

import json
import socket

import h2raw
from harness import Balancer, check, run_tests, test, wait_for
from raw_worker import RawWorker, ok

BODY = b'{"jsonrpc":"2.0","id":"rq-7","method":"components/execute","params":{}}'

# name -> the worker's whole response (the body is well-formed; only the head is not)
BAD_HEADS = {
    "LF in the reason phrase": b"HTTP/1.1 200 OK\nSet-Cookie: injected=1\r\nContent-Length: 2\r\n\r\n{}",
    "CR in the reason phrase": b"HTTP/1.1 200 OK\rSet-Cookie: injected=1\r\nContent-Length: 2\r\n\r\n{}",
    "NUL in the reason phrase": b"HTTP/1.1 200 O\0K injected=1\r\nContent-Length: 2\r\n\r\n{}",
    "DEL in the reason phrase": b"HTTP/1.1 200 O\x7fK injected=1\r\nContent-Length: 2\r\n\r\n{}",
    "LF inside a field value": b"HTTP/1.1 200 OK\r\nX-A: a\nSet-Cookie: injected=1\r\nContent-Length: 2\r\n\r\n{}",
    "NUL inside a field value": b"HTTP/1.1 200 OK\r\nX-A: injected=1\0\r\nContent-Length: 2\r\n\r\n{}",
    "space in a field name": b"HTTP/1.1 200 OK\r\nSet Cookie: injected=1\r\nContent-Length: 2\r\n\r\n{}",
    "folded field": b"HTTP/1.1 200 OK\r\nX-A: a\r\n injected=1\r\nContent-Length: 2\r\n\r\n{}",
    "LF in an interim reason phrase": b"HTTP/1.1 103 Early\nSet-Cookie: injected=1\r\n\r\n"
                                      b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}",
}


def worker_answering(table):
    """A raw worker answering each request with table[X-Case header]."""
    def respond(lines, body):
        case = next(line.split(":", 1)[1].strip() for line in lines if line.lower().startswith("x-case:"))
        return table[case]
    return RawWorker(respond)


def h1_exchange(port, case, body=BODY):
    """One HTTP/1.1 request; returns every byte the balancer answered (it closes after)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(b"POST / HTTP/1.1\r\nHost: lb\r\nConnection: close\r\nContent-Type: application/json\r\n"
              + b"X-Case: " + case.encode() + b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    out = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        out += chunk
    s.close()
    return out


def check_502(case, raw):
    head, _, body = raw.partition(b"\r\n\r\n")
    check(head.startswith(b"HTTP/1.1 502 "), f"{case}: {head[:60]!r}")
    check(b"injected" not in raw, f"{case}: the worker's bytes reached the client: {raw!r}")
    error = json.loads(body)
    check(error["id"] == "rq-7" and error["error"]["code"] == -32000
          and error["error"]["data"]["reason"] == "bad-response", f"{case}: {error}")


@test
def malformed_worker_heads_are_502_over_http1_and_http2():
    w = worker_answering({name: resp for name, resp in BAD_HEADS.items()})
    lb = Balancer([w.address], args=["--health-check", "tcp", "--max-failures", "1000"])
    lb.wait_healthy(1)
    before = lb.metric("stepflow_lb_upstream_bad_responses_total") or 0
    for case in BAD_HEADS:
        check_502(case, h1_exchange(lb.port, case))
    c = h2raw.H2Client("127.0.0.1", lb.port)
    sids = {case: c.request(BODY, headers=[("x-case", case)]) for case in BAD_HEADS}
    c.wait(lambda: all(c.streams[s].ended or c.streams[s].closed for s in sids.values()), what="every answer")
    for case, sid in sids.items():
        s = c.streams[sid]
        data = bytes(s.data)
        check(s.status == 502 and b"injected" not in data, f"h2 {case}: {s.status} {data!r}")
        error = json.loads(data)
        check(error["id"] == "rq-7" and error["error"]["data"]["reason"] == "bad-response", f"h2 {case}: {error}")
    c.close()
    counted = lb.metric("stepflow_lb_upstream_bad_responses_total") - before
    check(counted == 2 * len(BAD_HEADS), f"every refusal counted: {counted} of {2 * len(BAD_HEADS)}")
    w.close()


@test
def well_formed_heads_are_relayed_byte_for_byte():
    # obs-text and HTAB are allowed in a reason phrase and in values (RFC 9110 §5.5, RFC 9112 §4).
    reason = b"Tr\xe8s\tBien"
    w = RawWorker(lambda lines, body: b"HTTP/1.1 200 " + reason + b"\r\nContent-Length: 2\r\nX-Note: caf\xe9 au\tlait"
                  + b"\r\n\r\n{}")
    lb = Balancer([w.address], args=["--health-check", "tcp"])
    lb.wait_healthy(1)
    raw = h1_exchange(lb.port, "ok")
    head = raw.partition(b"\r\n\r\n")[0].split(b"\r\n")
    check(head[0] == b"HTTP/1.1 200 " + reason, head[0])
    check(b"X-Note: caf\xe9 au\tlait" in head, head)
    check((lb.metric("stepflow_lb_upstream_bad_responses_total") or 0) == 0, "nothing refused")
    w.close()


@test
def a_worker_sending_malformed_heads_is_charged_as_failing():
    w = worker_answering(BAD_HEADS)
    lb = Balancer([w.address], args=["--health-check", "tcp", "--max-failures", "2"])
    lb.wait_healthy(1)
    check_502("first", h1_exchange(lb.port, "LF in the reason phrase"))
    check(not lb.logs("instance marked unhealthy"), "one failure is not enough")
    check_502("second", h1_exchange(lb.port, "LF inside a field value"))
    wait_for(lambda: lb.logs("instance marked unhealthy"), 5, "the instance marked unhealthy")
    record = lb.logs("instance marked unhealthy")[0]
    check(record["reason"] == "bad header value", record)
    w.close()


run_tests()
