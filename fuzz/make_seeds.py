#!/usr/bin/env python3
"""Writes the hand-made seed inputs of every fuzz target into fuzz/corpus/<target>/seed-*.

Run once after changing a seed here; inputs found by fuzzing live next to them (named by their
SHA-1, as libFuzzer names them) and are never written by this script."""
import json
import os
import struct

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")


def put(target, name, data):
    d = os.path.join(ROOT, target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(d, "seed-" + name), "wb") as f:
        f.write(data)


# --- HTTP/1.1 heads -----------------------------------------------------------------------
requests = {
    "get": "GET / HTTP/1.1\r\nHost: a\r\n\r\n",
    "post-length": "POST /rpc?x=1 HTTP/1.1\r\nHost: a\r\nContent-Length: 12\r\nX-A:  v  \r\n\r\n",
    "chunked": "POST /mcp HTTP/1.1\r\nHost: lb\r\nTransfer-Encoding: chunked\r\nContent-Type: application/json\r\n\r\n",
    "http10": "GET /health HTTP/1.0\r\n\r\n",
    "connection": "GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, X-Foo\r\nX-Foo: 1\r\nTE: trailers\r\nUpgrade: h2c\r\n\r\n",
    "expect": "PUT /x HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n",
    "cl-te": "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
    "dup-cl": "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 5, 5\r\n\r\n",
    "absolute": "GET http://example.com:80/p HTTP/1.1\r\nHost: example.com\r\nX-Forwarded-For: 1.2.3.4\r\n\r\n",
    "obs-fold": "GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n  b\r\n\r\n",
    "bare-lf": "GET / HTTP/1.1\nHost: a\n\n",
    "options": "OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n",
    "connect": "CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n",
    "head": "HEAD / HTTP/1.1\r\nHost: a\r\nProxy-Connection: keep-alive\r\nKeep-Alive: 5\r\n\r\n",
}
for k, v in requests.items():
    put("http1_request", k, v)

responses = {
    "ok-length": "\0HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: application/json\r\n\r\n",
    "chunked": "\0HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
    "sse": "\0HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n\r\n",
    "until-close": "\0HTTP/1.0 200 OK\r\nConnection: close\r\n\r\n",
    "no-content": "\0HTTP/1.1 204 No Content\r\n\r\n",
    "not-modified": "\0HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n",
    "head": "\1HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n",
    "continue": "\0HTTP/1.1 100 Continue\r\n\r\n",
    "no-reason": "\0HTTP/1.1 503\r\nRetry-After: 1\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\n\r\n",
    "te-cl": "\0HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\nContent-Length: 3\r\n\r\n",
    # A worker writing a header of its own into the reason phrase (issue 22): refused.
    "reason-lf": "\0HTTP/1.1 200 OK\nSet-Cookie: injected=1\r\nContent-Length: 0\r\n\r\n",
    "reason-cr": "\0HTTP/1.1 200 OK\rSet-Cookie: injected=1\r\n\r\n",
    "reason-nul": "\0HTTP/1.1 200 O\0K\r\n\r\n",
    "reason-obs-text": "\0HTTP/1.1 200 \tOK \xe9t\xe9\r\nX-A: caf\xe9\r\n\r\n",
    "value-lf": "\0HTTP/1.1 200 OK\r\nX-A: a\nSet-Cookie: injected=1\r\n\r\n",
}
for k, v in responses.items():
    put("http1_response", k, v)

# --- chunked bodies (first byte: bit 0 chunked output, bits 1-7 read size) ----------------------
chunked = {
    "simple": "5\r\nhello\r\n0\r\n\r\n",
    "two": "3\r\nabc\r\n0a\r\n0123456789\r\n0\r\n\r\n",
    "ext": "4;name=value\r\nwxyz\r\n0;last\r\n\r\n",
    "trailers": "1\r\nx\r\n0\r\nX-Trailer: 1\r\nY: 2\r\n\r\n",
    "upper": "A\r\n0123456789\r\n0\r\n\r\n",
    "bad-size": "zz\r\nx\r\n0\r\n\r\n",
    "huge": "ffffffffffffffffff\r\nx\r\n",
    "bare-lf": "2\nab\n0\n\n",
}
for i, (k, v) in enumerate(chunked.items()):
    put("chunked_body", k, bytes([i * 37 % 256]) + v.encode())

# --- JSON-RPC ids --------------------------------------------------------------------------------
for k, v in {
    "int": '{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{}}',
    "string": '{"jsonrpc":"2.0","method":"x","id":"abc\\"\\u00e9"}',
    "null": '{"jsonrpc":"2.0","id":null,"method":"x"}',
    "float": '{"jsonrpc":"2.0","id":1.5e3,"method":"x"}',
    "object-id": '{"jsonrpc":"2.0","id":{"a":1},"method":"x"}',
    "batch": '[{"jsonrpc":"2.0","id":1,"method":"a"},{"jsonrpc":"2.0","id":2,"method":"b"}]',
    "no-id": '{"jsonrpc":"2.0","method":"notifications/initialized"}',
    "broken": '{"jsonrpc":"2.0","id":',
    "late-id": '{"jsonrpc":"2.0","method":"x","params":{"id":3,"deep":[1,2,{"id":4}]},"id":5}',
    "big-int": '{"id":123456789012345678901234567890}',
}.items():
    put("jsonrpc_id", k, v)

# --- JSON strings around bytes we did not choose ----------------------------------------------
for k, v in {
    "ascii": b"/mcp/tools?x=1",
    "escapes": b'say "hi"\\\n\t\x00\x1f\x7f',
    "utf8": "h\u00e9llo \u2713 \U0001f600".encode(),
    "latin1": b"/caf\xe9",
    "stray": b"\xff\x80\xfe",
    "overlong": b"\xc0\xaf\xe0\x80\xaf\xf0\x80\x80\xaf",
    "surrogate": b"\xed\xa0\x80\xed\xbf\xbf",
    "above-max": b"\xf4\x90\x80\x80\xf5\x80",
    "cut-short": b"\xe2\x9c" + b"A" + b"\xf0\x9f\x98",
    "long-mixed": (b"abcdefghijklmno\xe2\x9c\x93" * 3) + b"\xe2\x9c",
}.items():
    put("json_string", k, v)

# --- /health bodies ------------------------------------------------------------------------------
for k, v in {
    "healthy": '{"status":"healthy","instanceId":"worker-1"}',
    "unhealthy": '{"status":"draining","instanceId":"w"}',
    "no-id": '{"status":"healthy"}',
    "wrong-types": '{"status":1,"instanceId":["x"]}',
    "not-json": "OK",
    "escaped": '{"status":"healthy","instanceId":"w\\u0000\\n"}',
}.items():
    put("health_body", k, v)

# --- Kubernetes ----------------------------------------------------------------------------------
def slice_obj(name, rv, ips, port=8080, pname="http", ready=True, terminating=False):
    return {
        "kind": "EndpointSlice", "apiVersion": "discovery.k8s.io/v1",
        "metadata": {"name": name, "resourceVersion": rv, "labels": {"kubernetes.io/service-name": "workers"}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": [ip], "conditions": {"ready": ready, "serving": True, "terminating": terminating},
                       "targetRef": {"kind": "Pod", "namespace": "ns", "name": "w-" + ip.split(".")[-1]}}
                      for ip in ips],
        "ports": [{"name": pname, "port": port, "protocol": "TCP"}],
    }


def endpoints_obj(rv, ready, not_ready, ports):
    return {
        "kind": "Endpoints", "apiVersion": "v1", "metadata": {"name": "workers", "resourceVersion": rv},
        "subsets": [{"addresses": [{"ip": ip, "targetRef": {"kind": "Pod", "name": "w-" + ip}} for ip in ready],
                     "notReadyAddresses": [{"ip": ip} for ip in not_ready],
                     "ports": [{"name": n, "port": p, "protocol": "TCP"} for n, p in ports]}],
    }


def lines(*docs):
    return "\n".join(json.dumps(d, separators=(",", ":")) for d in docs) + "\n"


slices_list = {"kind": "EndpointSliceList", "apiVersion": "discovery.k8s.io/v1",
               "metadata": {"resourceVersion": "99", "continue": "tok"},
               "items": [slice_obj("a", "1", ["10.0.0.1", "10.0.0.2"]), slice_obj("b", "2", ["10.0.0.2"], ready=False)]}
put("k8s_endpointslices", "list-watch", lines(
    slices_list,
    {"type": "ADDED", "object": slice_obj("c", "3", ["10.0.0.3"], terminating=True)},
    {"type": "MODIFIED", "object": slice_obj("a", "4", ["10.0.0.1"], port=9000, pname="metrics")},
    {"type": "DELETED", "object": slice_obj("b", "5", [])},
    {"type": "BOOKMARK", "object": {"kind": "EndpointSlice", "metadata": {"resourceVersion": "6",
                                    "annotations": {"k8s.io/initial-events-end": "true"}}}},
    {"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                                 "message": "too old resource version: 1 (5)", "reason": "Expired", "code": 410}}))
put("k8s_endpointslices", "null-items", lines({"metadata": {"resourceVersion": "3"}, "items": None},
                                              {"type": "ADDED", "object": {"metadata": {"name": "x", "resourceVersion": "1"},
                                                                           "endpoints": None, "ports": None}}))
put("k8s_endpointslices", "ipv6", lines({"metadata": {"resourceVersion": "1"}, "items": [
    dict(slice_obj("v6", "1", []), addressType="IPv6",
         endpoints=[{"addresses": ["fd00::1"], "conditions": {}}])]}))
put("k8s_endpointslices", "status", '{"kind":"Status","apiVersion":"v1","status":"Failure","message":"forbidden","code":403}\n')

ep_list = {"kind": "EndpointsList", "metadata": {"resourceVersion": "7"},
           "items": [endpoints_obj("6", ["10.1.0.1"], ["10.1.0.2"], [("http", 8080), ("metrics", 9090)])]}
put("k8s_endpoints", "list-watch", lines(
    ep_list,
    {"type": "MODIFIED", "object": endpoints_obj("8", ["10.1.0.1", "10.1.0.3"], [], [("", 8080)])},
    {"type": "DELETED", "object": endpoints_obj("9", [], [], [])}))
put("k8s_endpoints", "null-subsets", lines({"metadata": {"resourceVersion": "1"},
                                            "items": [{"metadata": {"name": "workers"}, "subsets": None}]}))

watch = lines({"type": "ADDED", "object": slice_obj("a", "1", ["10.0.0.1"])},
              {"type": "DELETED", "object": slice_obj("a", "2", [])})
put("k8s_lines", "events", b"\x10" + watch.encode())
put("k8s_lines", "crlf-blank", b"\x02" + b"a\r\n\r\n\nb\r\nc")
put("k8s_lines", "long", b"\xff" + b"x" * 600 + b"\n" + b"y\n")


# --- HTTP/2 (first byte: read size / 8 - 1; the harness sends the preface) -------------------------
def frame(ftype, flags, stream, payload=b""):
    return struct.pack(">I", len(payload))[1:] + bytes([ftype, flags]) + struct.pack(">I", stream) + payload


DATA, HEADERS, PRIORITY, RST, SETTINGS, PUSH, PING, GOAWAY, WINDOW, CONT = range(10)
END_STREAM, ACK, END_HEADERS, PADDED, PRIO = 1, 1, 4, 8, 0x20


def lit(name, value):  # literal header field without indexing, new name, no Huffman
    n, v = name.encode(), value.encode()
    return b"\x00" + bytes([len(n)]) + n + bytes([len(v)]) + v


def settings(*pairs):
    return frame(SETTINGS, 0, 0, b"".join(struct.pack(">HI", k, v) for k, v in pairs))


GET = b"\x82\x86\x84" + lit(":authority", "lb")  # :method GET, :scheme http, :path /
POST = b"\x83\x86" + lit(":path", "/mcp") + lit(":authority", "lb") + lit("content-type", "application/json")
body = b'{"jsonrpc":"2.0","id":1,"method":"tools/list"}'
hello = settings((3, 100), (4, 65535)) + frame(SETTINGS, ACK, 0)

put("h2_client", "get", b"\xff" + hello + frame(HEADERS, END_STREAM | END_HEADERS, 1, GET))
put("h2_client", "post", b"\x07" + hello + frame(HEADERS, END_HEADERS, 1, POST)
    + frame(DATA, 0, 1, body[:10]) + frame(DATA, END_STREAM, 1, body[10:]))
put("h2_client", "streams", b"\x01" + hello
    + frame(HEADERS, END_STREAM | END_HEADERS, 1, GET) + frame(HEADERS, END_HEADERS, 3, POST)
    + frame(RST, 0, 3, struct.pack(">I", 8)) + frame(PING, 0, 0, b"12345678")
    + frame(WINDOW, 0, 0, struct.pack(">I", 1 << 20)) + frame(WINDOW, 0, 1, struct.pack(">I", 100))
    + frame(HEADERS, END_STREAM | END_HEADERS, 5, GET) + frame(GOAWAY, 0, 0, struct.pack(">II", 5, 0)))
put("h2_client", "continuation", b"\x20" + hello + frame(HEADERS, END_STREAM, 1, GET[:3])
    + frame(CONT, 0, 1, GET[3:8]) + frame(CONT, END_HEADERS, 1, GET[8:]))
put("h2_client", "padded-priority", b"\x00" + hello
    + frame(HEADERS, END_STREAM | END_HEADERS | PADDED | PRIO, 1, b"\x04" + struct.pack(">IB", 0, 15) + GET + b"\0" * 4)
    + frame(PRIORITY, 0, 3, struct.pack(">IB", 1, 7)))
put("h2_client", "zero-window", b"\x03" + settings((4, 0), (5, 16384)) + frame(SETTINGS, ACK, 0)
    + frame(HEADERS, END_HEADERS, 1, POST) + frame(DATA, END_STREAM, 1, body)
    + frame(WINDOW, 0, 1, struct.pack(">I", 10)) + frame(WINDOW, 0, 1, struct.pack(">I", 1000)))
put("h2_client", "bad-header", b"\x10" + hello
    + frame(HEADERS, END_STREAM | END_HEADERS, 1, GET + lit("Upper", "x") + lit("connection", "close"))
    + frame(HEADERS, END_STREAM | END_HEADERS, 3, b"\x83\x86" + lit(":path", "/x") + lit("content-length", "5"))
    + frame(DATA, END_STREAM, 3, b"123"))
put("h2_client", "trailers", b"\x08" + hello + frame(HEADERS, END_HEADERS, 1, POST) + frame(DATA, 0, 1, body)
    + frame(HEADERS, END_STREAM | END_HEADERS, 1, lit("x-trailer", "1")))
put("h2_client", "push-and-garbage", b"\x02" + hello + frame(PUSH, END_HEADERS, 1, b"\0\0\0\2" + GET)
    + b"\xde\xad\xbe\xef")
