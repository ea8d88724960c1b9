"""HTTP/2 requests as an HTTP/1.1 worker receives them (issue 22, point 3; RFC 9113 §8.2, §8.3).

Each rule listed in docs/http2-tls.md ("From HTTP/2 to HTTP/1.1") has a case here, driven by raw
HTTP/2 frames (tests/integration/h2raw.py) against a worker that keeps the exact request heads it
receives (tests/integration/raw_worker.py). The rules nghttp2 enforces as stream errors
(connection-specific fields, upper-case names, misplaced pseudo-headers, ...) are tested in
test_h2_tls.py (malformed_requests_are_stream_errors_that_never_reach_a_worker).
"""

import h2raw
from harness import Balancer, check, run_tests, test
from raw_worker import RawWorker

BODY = b'{"jsonrpc":"2.0","id":3,"method":"components/list"}'


def setup():
    w = RawWorker()
    lb = Balancer([w.address], args=["--health-check", "tcp"])
    lb.wait_healthy(1)
    return w, lb


def send(lb, fields, body=BODY, path="/", method="POST", authority="lb.test", with_authority=True):
    """One stream with the given regular fields; returns (status, response body)."""
    c = h2raw.H2Client("127.0.0.1", lb.port)
    sid = c.new_stream_id()
    pseudo = [(":method", method), (":scheme", "http")]
    if with_authority:
        pseudo.append((":authority", authority))
    pseudo.append((":path", path))
    regular = list(fields)
    if body:
        regular.append(("content-length", str(len(body))))
        c.send_headers(sid, pseudo + regular)
        c.send_data(sid, body, end_stream=True)
    else:
        c.send_headers(sid, pseudo + regular, end_stream=True)
    c.wait(lambda: c.streams[sid].closed, what="the answer")
    s = c.streams[sid]
    c.close()
    return s.status, bytes(s.data)


def last_head(w):
    line, fields, body = w.received()[-1]
    return line, fields, body


def values(fields, name):
    return [v for n, v in fields if n.lower() == name]


@test
def cookie_crumbs_are_joined_into_one_field():
    w, lb = setup()
    # RFC 9113 §8.2.3: several cookie fields, in order, become one "; "-joined Cookie.
    status, _ = send(lb, [("cookie", "a=1"), ("x-other", "between"), ("cookie", "b=2"), ("cookie", "c=3; d=4")])
    check(status == 200, status)
    _, fields, body = last_head(w)
    check(values(fields, "cookie") == ["a=1; b=2; c=3; d=4"], f"one joined Cookie: {fields}")
    check(values(fields, "x-other") == ["between"] and body == BODY, fields)
    # One field: as sent. Empty crumbs add nothing.
    send(lb, [("cookie", "only=1")])
    check(values(last_head(w)[1], "cookie") == ["only=1"], last_head(w)[1])
    send(lb, [("cookie", "a=1"), ("cookie", ""), ("cookie", "b=2")])
    check(values(last_head(w)[1], "cookie") == ["a=1; b=2"], last_head(w)[1])
    # A large number of crumbs (each its own field, as HPACK-friendly clients send them).
    crumbs = [f"k{i}=v{i}" for i in range(60)]
    send(lb, [("cookie", c) for c in crumbs])
    check(values(last_head(w)[1], "cookie") == ["; ".join(crumbs)], "sixty crumbs joined in order")
    w.close()


@test
def pseudo_headers_become_the_request_line_and_host():
    w, lb = setup()
    # §8.3.1: :method and :path make the request line; :authority becomes Host.
    send(lb, [("x-a", "1")], path="/mcp?x=1")
    line, fields, _ = last_head(w)
    check(line == "POST /mcp?x=1 HTTP/1.1", line)
    check(values(fields, "host") == ["lb.test"], fields)
    check(not [n for n, _ in fields if n.startswith(":")], f"no pseudo-header reaches the worker: {fields}")
    # A host field naming the same authority (any case): one Host.
    send(lb, [("host", "LB.test")])
    check(values(last_head(w)[1], "host") == ["lb.test"], last_head(w)[1])
    # No :authority: the host field is the Host.
    send(lb, [("host", "only-host.test")], with_authority=False)
    check(values(last_head(w)[1], "host") == ["only-host.test"], last_head(w)[1])
    # Neither: malformed for an http or https request (nghttp2: stream error), never forwarded.
    before = len(w.received())
    c = h2raw.H2Client("127.0.0.1", lb.port)
    sid = c.new_stream_id()
    c.send_headers(sid, [(":method", "GET"), (":scheme", "http"), (":path", "/")], end_stream=True)
    c.wait(lambda: c.streams[sid].closed, what="the answer")
    check(c.streams[sid].reset_code == h2raw.PROTOCOL_ERROR, f"no authority: {c.streams[sid].reset_code}")
    c.close()
    check(len(w.received()) == before, "it never reached the worker")
    w.close()


@test
def a_host_that_differs_from_authority_is_refused():
    w, lb = setup()
    before = len(w.received())
    status, body = send(lb, [("host", "other.test")])
    check(status == 400 and b"host differs from :authority" in body, f"{status} {body!r}")
    check(len(w.received()) == before, "it never reached the worker")
    w.close()


@test
def te_trailers_and_client_trailers_stay_on_the_http2_hop():
    w, lb = setup()
    # §8.2.2: te may only say "trailers", and it is hop-by-hop: HTTP/1.1 would need Connection: TE.
    c = h2raw.H2Client("127.0.0.1", lb.port)
    sid = c.new_stream_id()
    c.send_headers(sid, [(":method", "POST"), (":scheme", "http"), (":authority", "lb.test"), (":path", "/"),
                         ("te", "trailers"), ("content-length", str(len(BODY)))])
    c.send_data(sid, BODY)
    # Trailers (§8.1): a HEADERS frame ending the stream after the DATA; not forwarded.
    c.send_headers(sid, [("x-trailer", "t")], end_stream=True)
    c.wait(lambda: c.streams[sid].closed, what="the answer")
    check(c.streams[sid].status == 200, c.streams[sid].status)
    c.close()
    _, fields, body = last_head(w)
    names = [n.lower() for n, _ in fields]
    check("te" not in names and "x-trailer" not in names, f"te and trailers dropped: {fields}")
    check(body == BODY, body)
    w.close()


@test
def values_pass_unchanged_and_bad_values_never_reach_the_worker():
    w, lb = setup()
    # §8.2.1: obs-text and inner whitespace are valid values and pass unchanged.
    send(lb, [("x-v", "caf\u00e9 au\tlait")])
    check(values(last_head(w)[1], "x-v") == ["caf\u00c3\u00a9 au\tlait"], last_head(w)[1])  # UTF-8 seen as latin-1
    before = len(w.received())
    # Leading or trailing whitespace, CR, LF or NUL in a value: malformed (stream error).
    for bad in (" lead", "trail ", "a\rb", "a\nb", "a\0b"):
        c = h2raw.H2Client("127.0.0.1", lb.port)
        sid = c.request(BODY, headers=[("x-v", bad)])
        c.wait(lambda: c.streams[sid].closed, what="the answer")
        s = c.streams[sid]
        check(s.reset_code == h2raw.PROTOCOL_ERROR or (s.status is not None and 400 <= s.status < 500),
              f"{bad!r}: RST {s.reset_code} status {s.status}")
        c.close()
    check(len(w.received()) == before, "none reached the worker")
    w.close()


run_tests()
