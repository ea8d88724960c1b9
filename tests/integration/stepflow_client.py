"""Orchestrator side of the Stepflow "Streamable HTTP" protocol, as a test library.

Python 3 standard library only. Everything speaks HTTP/1.1 over raw sockets with
its own incremental response parser, so a test can see exactly what arrived and
when: SSE events are yielded as their bytes arrive, and a truncated chunked body
or a reset connection is reported (``ended_abnormally`` / ``error``) rather than
hidden or raised out of a session.

Main entry points:
  post_json(host, port, body, headers=None, timeout=30, ...) -> HttpResult
  execute(host, port, component, input, id=None, headers=None, ...) -> HttpResult
  rpc(host, port, method, params=None, id=None, ...) -> HttpResult
  get(host, port, path, ...) -> HttpResult;  health(host, port) -> (status, dict|None)
  set_health(host, port, healthy, delay_ms=None) -> HttpResult   (example worker hook)
  run_session(host, port, count, answer=..., headers=None, timeout=60, ...) -> SessionResult
  SseReader(host, port, body, headers=None, timeout=30)  -- iterate events as they arrive
  raw_request(host, port, data, timeout=5, responses=1) -> bytes
  parse_response(raw) -> HttpResult
  HttpConnection(host, port) -- a reusable keep-alive connection

HttpResult is a (status, headers, body) named tuple; header names are lower-cased
(repeated headers joined with ", "), body is the decoded (de-chunked) bytes.
"""

import codecs
import collections
import json
import re
import socket
import struct
import time
import uuid

__all__ = [
    "HttpResult", "ProtocolError", "EmptyResponse", "HttpConnection", "SseEvent", "SseParser",
    "SseReader", "SessionResult", "CallbackError", "NO_ANSWER", "post_json", "execute", "rpc",
    "notify", "get", "health", "set_health", "run_session", "raw_request", "parse_response",
]

ACCEPT_BOTH = "application/json, text/event-stream"


class HttpResult(collections.namedtuple("HttpResult", "status headers body")):
    """(status, headers with lower-cased names, decoded body bytes)."""

    def json(self):
        return json.loads(self.body)


class ProtocolError(Exception):
    """The peer broke HTTP framing or closed the connection mid-response."""


class EmptyResponse(ProtocolError):
    """The connection closed before a single response byte arrived."""


# --------------------------------------------------------------------------- #
# Incremental HTTP/1.1 response parser
# --------------------------------------------------------------------------- #

_HEAD_END = re.compile(rb"\r?\n\r?\n")
_HEX = re.compile(rb"[0-9A-Fa-f]+\Z")


class _ResponseParser:
    """Push parser for one response: feed() socket bytes, get decoded body bytes back.

    State survives socket timeouts, so a reader can wait for an event with a
    timeout and carry on afterwards (socket.makefile readers cannot).
    """

    HEAD, LENGTH, CHUNK_SIZE, CHUNK_DATA, CHUNK_END, TRAILER, UNTIL_CLOSE, DONE = range(8)
    MAX_HEAD = 256 * 1024

    def __init__(self, method="POST"):
        self.method = method.upper()
        self.state = self.HEAD
        self.buf = bytearray()
        self.version = self.status = self.reason = None
        self.headers = {}
        self.header_list = []
        self.interim = []  # 1xx statuses seen before the final head
        self.framing = None  # "length" | "chunked" | "close" | "none"
        self.remaining = 0
        self.head_complete = False
        self.bytes_received = 0
        self.body_bytes = 0

    @property
    def done(self):
        return self.state == self.DONE

    @property
    def leftover(self):
        """Bytes received after the end of this response (a pipelined next one)."""
        return bytes(self.buf) if self.done else b""

    def feed(self, data):
        self.bytes_received += len(data)
        if self.state == self.UNTIL_CLOSE:
            self.body_bytes += len(data)
            return bytes(data)
        self.buf += data
        out = []
        buf = self.buf
        while True:
            st = self.state
            if st == self.HEAD:
                m = _HEAD_END.search(buf)
                if not m:
                    if len(buf) > self.MAX_HEAD:
                        raise ProtocolError("response head too large")
                    break
                head = bytes(buf[:m.start()])
                del buf[:m.end()]
                self._parse_head(head)
            elif st in (self.LENGTH, self.CHUNK_DATA):
                if not buf:
                    break
                take = min(self.remaining, len(buf))
                out.append(bytes(buf[:take]))
                del buf[:take]
                self.remaining -= take
                if self.remaining == 0:
                    self.state = self.DONE if st == self.LENGTH else self.CHUNK_END
            elif st == self.CHUNK_SIZE:
                i = buf.find(b"\n")
                if i < 0:
                    if len(buf) > 4096:
                        raise ProtocolError("chunk size line too long")
                    break
                line = bytes(buf[:i]).rstrip(b"\r")
                del buf[:i + 1]
                size_text = line.split(b";", 1)[0].strip()
                if not _HEX.match(size_text):
                    raise ProtocolError("bad chunk size line %r" % line[:40])
                size = int(size_text, 16)
                if size == 0:
                    self.state = self.TRAILER
                else:
                    self.remaining = size
                    self.state = self.CHUNK_DATA
            elif st == self.CHUNK_END:
                if buf[:2] == b"\r\n":
                    del buf[:2]
                elif buf[:1] == b"\n":
                    del buf[:1]
                elif buf == b"\r" or not buf:
                    break
                else:
                    raise ProtocolError("missing CRLF after chunk data")
                self.state = self.CHUNK_SIZE
            elif st == self.TRAILER:
                i = buf.find(b"\n")
                if i < 0:
                    if len(buf) > 65536:
                        raise ProtocolError("trailer too long")
                    break
                line = bytes(buf[:i]).rstrip(b"\r")
                del buf[:i + 1]
                if not line:
                    self.state = self.DONE
            elif st == self.UNTIL_CLOSE:
                if buf:
                    out.append(bytes(buf))
                    buf.clear()
                break
            else:  # DONE: anything left belongs to the next response
                break
        data = b"".join(out)
        self.body_bytes += len(data)
        return data

    def feed_eof(self):
        """The peer closed the connection; raise if the response was incomplete."""
        if self.state in (self.UNTIL_CLOSE, self.DONE):
            self.state = self.DONE
            return
        if self.state == self.HEAD:
            if self.bytes_received == 0:
                raise EmptyResponse("connection closed before any response byte")
            raise ProtocolError("connection closed inside the response head")
        if self.state == self.LENGTH:
            raise ProtocolError("connection closed mid-body: %d bytes short of Content-Length"
                                % self.remaining)
        raise ProtocolError("connection closed mid-body: incomplete chunked encoding "
                            "(%d body bytes received)" % self.body_bytes)

    def _parse_head(self, head):
        lines = head.split(b"\n")
        status_line = lines[0].rstrip(b"\r").decode("latin-1")
        parts = status_line.split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/") or not re.fullmatch(r"\d{3}", parts[1]):
            raise ProtocolError("bad status line %r" % status_line[:80])
        status = int(parts[1])
        header_list = []
        for raw in lines[1:]:
            line = raw.rstrip(b"\r").decode("latin-1")
            if not line:
                continue
            if line[0] in " \t" and header_list:  # obsolete line folding
                name, value = header_list[-1]
                header_list[-1] = (name, value + " " + line.strip())
                continue
            name, sep, value = line.partition(":")
            if not sep or not name or name != name.strip():
                raise ProtocolError("bad header line %r" % line[:80])
            header_list.append((name, value.strip()))
        if 100 <= status < 200 and status != 101:
            self.interim.append(status)  # e.g. 100 Continue; the real head follows
            return
        self.version, self.status = parts[0], status
        self.reason = parts[2] if len(parts) > 2 else ""
        self.header_list = header_list
        headers = {}
        for name, value in header_list:
            key = name.lower()
            headers[key] = headers[key] + ", " + value if key in headers else value
        self.headers = headers
        self.head_complete = True

        te = headers.get("transfer-encoding")
        if self.method == "HEAD" or status in (204, 304) or status < 200:
            self.framing, self.state = "none", self.DONE
        elif te is not None:
            if te.split(",")[-1].strip().lower() == "chunked":
                self.framing, self.state = "chunked", self.CHUNK_SIZE
            else:
                self.framing, self.state = "close", self.UNTIL_CLOSE
        elif "content-length" in headers:
            values = {v.strip() for v in headers["content-length"].split(",")}
            value = values.pop()
            if values or not value.isdigit():
                raise ProtocolError("bad Content-Length %r" % headers["content-length"])
            self.framing = "length"
            self.remaining = int(value)
            self.state = self.LENGTH if self.remaining else self.DONE
        else:
            self.framing, self.state = "close", self.UNTIL_CLOSE


def parse_response(raw, method="POST"):
    """Parse one complete raw HTTP response (bytes) into an HttpResult.

    Raises ProtocolError if it is malformed or incomplete.
    """
    parser = _ResponseParser(method)
    body = parser.feed(raw)
    if not parser.done:
        parser.feed_eof()
    return HttpResult(parser.status, parser.headers, body)


# --------------------------------------------------------------------------- #
# Connections
# --------------------------------------------------------------------------- #

def _host_header(host, port):
    return "[%s]:%d" % (host, port) if ":" in host else "%s:%d" % (host, port)


def _request_head(method, path, host, port, headers, body_len, chunked):
    """Request head bytes. Framing headers given by the caller are replaced by ours."""
    fields = [("Host", _host_header(host, port))]
    for name, value in (headers or {}).items():
        low = name.lower()
        if low in ("content-length", "transfer-encoding"):
            continue
        if low == "host":
            fields[0] = ("Host", value)
            continue
        fields.append((name, str(value)))
    if chunked:
        fields.append(("Transfer-Encoding", "chunked"))
    elif body_len or method.upper() in ("POST", "PUT", "PATCH"):
        fields.append(("Content-Length", str(body_len)))
    lines = ["%s %s HTTP/1.1" % (method, path)] + ["%s: %s" % f for f in fields]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


class HttpConnection:
    """One client connection, reused for sequential requests (keep-alive).

    request() does a whole exchange; send_request()/read_head()/read_some()
    let a caller consume a body incrementally.
    """

    def __init__(self, host, port, timeout=30):
        self.host, self.port, self.timeout = host, port, timeout
        self.sock = None
        self.parser = None
        self.requests_sent = 0  # on the current socket
        self._pending = []

    def connect(self):
        self.close()
        self.sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.requests_sent = 0

    def close(self, abort=False):
        """Close the socket; abort=True sends a TCP RST instead of a FIN."""
        if self.sock is None:
            return
        try:
            if abort:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.sock.close()
        except OSError:
            pass
        self.sock = None

    def send_request(self, method, path, body=b"", headers=None, chunked=False, chunk_size=65536):
        if self.sock is None:
            self.connect()
        body = body or b""
        head = _request_head(method, path, self.host, self.port, headers, len(body), chunked)
        self.parser = _ResponseParser(method)
        self._pending = []
        self.requests_sent += 1
        self.sock.settimeout(self.timeout)
        if chunked:
            self.sock.sendall(head)
            view = memoryview(body)
            for pos in range(0, len(body), chunk_size):
                piece = view[pos:pos + chunk_size]
                self.sock.sendall(b"".join((b"%x\r\n" % len(piece), piece, b"\r\n")))
            self.sock.sendall(b"0\r\n\r\n")
        elif len(body) < 65536:
            self.sock.sendall(head + body)
        else:
            self.sock.sendall(head)
            self.sock.sendall(body)

    def _recv(self, timeout):
        """One recv into the parser; returns decoded body bytes (maybe empty)."""
        self.sock.settimeout(max(timeout, 0.001) if timeout is not None else None)
        data = self.sock.recv(262144)
        if not data:
            try:
                self.parser.feed_eof()
            finally:
                self.close()
            return b""
        return self.parser.feed(data)

    def read_head(self, timeout=None):
        """Block until the response head arrived; returns the parser (status, headers)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.parser.head_complete:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise TimeoutError("no response head within %.1fs" % timeout)
            if self.sock is None:
                raise ProtocolError("connection closed")
            data = self._recv(remaining)
            if data:
                self._pending.append(data)
        return self.parser

    def read_some(self, timeout=None):
        """Next decoded body bytes; b"" once the body is complete.

        Raises TimeoutError (state kept, may call again), ProtocolError or
        OSError (connection broken; abnormal end).
        """
        if self._pending:
            data = b"".join(self._pending)
            self._pending = []
            return data
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.parser.done:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise TimeoutError("no body bytes within %.1fs" % timeout)
            if self.sock is None:
                raise ProtocolError("connection closed")
            data = self._recv(remaining)
            if data:
                return data
        self._finish_response()
        return b""

    def _finish_response(self):
        p = self.parser
        tokens = [t.strip().lower() for t in p.headers.get("connection", "").split(",")]
        if (p.framing == "close" or "close" in tokens or p.version != "HTTP/1.1" or p.buf):
            self.close()

    def request(self, method, path, body=b"", headers=None, timeout=None, chunked=False,
                chunk_size=65536):
        """Send a request and read the whole response -> HttpResult.

        A reused keep-alive connection that the server had already closed is
        retried once on a fresh one (nothing was processed in that case).
        """
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        for attempt in (0, 1):
            reused = self.sock is not None and self.requests_sent > 0
            try:
                self.send_request(method, path, body, headers, chunked, chunk_size)
                self.read_head(deadline - time.monotonic())
                break
            except (EmptyResponse, BrokenPipeError, ConnectionResetError):
                self.close()
                if not reused or attempt:
                    raise
            except BaseException:
                self.close()
                raise
        parts = []
        try:
            while True:
                data = self.read_some(deadline - time.monotonic())
                if not data:
                    break
                parts.append(data)
        except BaseException:
            self.close()
            raise
        return HttpResult(self.parser.status, self.parser.headers, b"".join(parts))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# --------------------------------------------------------------------------- #
# Simple calls
# --------------------------------------------------------------------------- #

def _json_bytes(body):
    if isinstance(body, (bytes, bytearray, memoryview)):
        return bytes(body)
    return json.dumps(body, separators=(",", ":")).encode()


def post_json(host, port, body, headers=None, timeout=30, chunked=False, chunk_size=65536, path="/"):
    """POST one JSON-RPC message (dict, or bytes sent verbatim) -> HttpResult.

    Sends the orchestrator's headers (Content-Type: application/json, Accept:
    application/json, text/event-stream) unless `headers` overrides them.
    chunked=True frames the request body with Transfer-Encoding: chunked.
    Reads the whole response on a fresh connection; an SSE answer is read to its
    end. Raises ProtocolError / OSError / TimeoutError if the exchange breaks.
    """
    hdrs = {"Content-Type": "application/json", "Accept": ACCEPT_BOTH}
    hdrs.update(headers or {})
    with HttpConnection(host, port, timeout) as conn:
        return conn.request("POST", path, _json_bytes(body), hdrs, timeout, chunked, chunk_size)


def rpc(host, port, method, params=None, id=None, headers=None, timeout=30, **kw):
    """Call a JSON-RPC method (id defaults to a fresh uuid) -> HttpResult."""
    msg = {"jsonrpc": "2.0", "id": id if id is not None else uuid.uuid4().hex, "method": method}
    if params is not None:
        msg["params"] = params
    return post_json(host, port, msg, headers, timeout, **kw)


def notify(host, port, method, params=None, headers=None, timeout=30):
    """Send a JSON-RPC notification (no id) -> HttpResult (expect 202)."""
    msg = {"jsonrpc": "2.0", "method": method}
    if params is not None:
        msg["params"] = params
    return post_json(host, port, msg, headers, timeout)


def execute(host, port, component, input, id=None, headers=None, timeout=30, **kw):
    """components/execute of `component` (e.g. "/echo") with `input` -> HttpResult."""
    return rpc(host, port, "components/execute", {"component": component, "input": input},
               id=id, headers=headers, timeout=timeout, **kw)


def get(host, port, path="/health", headers=None, timeout=10):
    """GET `path` -> HttpResult."""
    with HttpConnection(host, port, timeout) as conn:
        return conn.request("GET", path, b"", headers, timeout)


def health(host, port, timeout=5):
    """GET /health -> (status, parsed JSON or None)."""
    r = get(host, port, "/health", timeout=timeout)
    try:
        return r.status, json.loads(r.body)
    except ValueError:
        return r.status, None


def set_health(host, port, healthy, delay_ms=None, timeout=5):
    """Example-worker hook: make /health answer 503 (healthy=False) or delay it."""
    body = {"healthy": bool(healthy)}
    if delay_ms is not None:
        body["delay_ms"] = int(delay_ms)
    return post_json(host, port, body, timeout=timeout, path="/_control/health")


# --------------------------------------------------------------------------- #
# Server-Sent Events
# --------------------------------------------------------------------------- #

class SseEvent:
    """One SSE event: data (str), event type, last event id, arrival time (monotonic)."""

    __slots__ = ("data", "event", "id", "received_at")

    def __init__(self, data, event="message", id=None, received_at=None):
        self.data, self.event, self.id = data, event, id
        self.received_at = time.monotonic() if received_at is None else received_at

    def json(self):
        return json.loads(self.data)

    def __repr__(self):
        return "SseEvent(%r)" % (self.data[:200],)


_LINE_END = re.compile(r"\r\n|\r|\n")


class SseParser:
    """Incremental text/event-stream parser (WHATWG rules): feed bytes, get events."""

    def __init__(self):
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._buf = ""
        self._data = []
        self._event = None
        self._last_id = None
        self.comments = 0

    @property
    def partial(self):
        """True if bytes of an unterminated event are buffered."""
        return bool(self._buf or self._data)

    def feed(self, data):
        self._buf += self._decoder.decode(data)
        events = []
        pos = 0
        for m in _LINE_END.finditer(self._buf):
            if m.group() == "\r" and m.end() == len(self._buf):
                break  # may be the first half of a CRLF split across reads
            self._line(self._buf[pos:m.start()], events)
            pos = m.end()
        self._buf = self._buf[pos:]
        return events

    def _line(self, line, events):
        if not line:
            if self._data:
                events.append(SseEvent("\n".join(self._data), self._event or "message", self._last_id))
            self._data, self._event = [], None
            return
        if line.startswith(":"):
            self.comments += 1
            return
        field, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if field == "data":
            self._data.append(value)
        elif field == "event":
            self._event = value
        elif field == "id" and "\0" not in value:
            self._last_id = value


class SseReader:
    """A streaming POST whose SSE events can be consumed one by one as they arrive.

        with SseReader(host, port, execute_body) as r:
            assert r.status == 200 and r.is_sse
            first = r.next_event(timeout=5)   # arrives while the stream is open
            r.close()                         # client cancel

    Attributes: status, headers (lower-case names), instance_id (Stepflow-Instance-Id),
    is_sse, body (whole body when the answer is not an event stream), events (all
    events so far), ended, ended_abnormally, error (text), end_time.
    The constructor raises if no response head arrives (connect refused, timeout,
    connection closed early); everything after the head is reported, not raised,
    except TimeoutError from next_event (the stream is then still open).
    """

    def __init__(self, host, port, body, headers=None, timeout=30, path="/", chunked=False):
        self.timeout = timeout
        self.events = []
        self.ended = False
        self.ended_abnormally = False
        self.error = None
        self.end_time = None
        self.body = b""
        self._queue = collections.deque()
        self._sse = SseParser()
        hdrs = {"Content-Type": "application/json", "Accept": ACCEPT_BOTH}
        hdrs.update(headers or {})
        self._conn = HttpConnection(host, port, timeout)
        try:
            self._conn.send_request("POST", path, _json_bytes(body), hdrs, chunked)
            head = self._conn.read_head(timeout)
        except BaseException:
            self._conn.close()
            raise
        self.status = head.status
        self.headers = head.headers
        self.instance_id = head.headers.get("stepflow-instance-id")
        self.is_sse = head.headers.get("content-type", "").split(";")[0].strip().lower() == "text/event-stream"
        if not self.is_sse:
            self._read_plain_body()

    def _read_plain_body(self):
        parts = []
        deadline = time.monotonic() + self.timeout
        try:
            while True:
                data = self._conn.read_some(max(0.0, deadline - time.monotonic()))
                if not data:
                    break
                parts.append(data)
        except TimeoutError:
            self._abnormal("timed out reading a non-SSE body")
        except (ProtocolError, OSError) as e:
            self._abnormal(str(e) or repr(e))
        else:
            self._end()
        self.body = b"".join(parts)

    def _end(self):
        self.ended = True
        self.end_time = time.monotonic()
        self._conn.close()

    def _abnormal(self, why):
        self.ended_abnormally = True
        self.error = why
        self._end()

    def next_event(self, timeout=None):
        """The next event, or None at the end of the stream (check ended_abnormally).

        Raises TimeoutError if nothing arrives within `timeout` (default: the
        reader's timeout); the reader stays usable.
        """
        if self._queue:
            return self._queue.popleft()
        if self.ended:
            return None
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while not self._queue:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no SSE event within %.1fs" % timeout)
            try:
                data = self._conn.read_some(remaining)
            except TimeoutError:
                raise TimeoutError("no SSE event within %.1fs" % timeout)
            except (ProtocolError, OSError) as e:
                self._abnormal(str(e) or repr(e))
                return None
            if not data:
                self._end()  # clean end of the chunked / length-framed body
                return None
            for ev in self._sse.feed(data):
                self.events.append(ev)
                self._queue.append(ev)
        return self._queue.popleft()

    def __iter__(self):
        while True:
            ev = self.next_event()
            if ev is None:
                return
            yield ev

    def close(self, abort=False):
        """Client cancel: close the connection (abort=True sends RST)."""
        if not self.ended:
            self.ended = True
            self.end_time = time.monotonic()
        self._conn.close(abort)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# --------------------------------------------------------------------------- #
# Bidirectional session (what the orchestrator does)
# --------------------------------------------------------------------------- #

NO_ANSWER = object()  # return from `answer` to leave a callback unanswered


class CallbackError:
    """Return from `answer` to answer a callback with a JSON-RPC error."""

    def __init__(self, code, message, data=None):
        self.code, self.message, self.data = code, message, data

    def to_json(self):
        err = {"code": self.code, "message": self.message}
        if self.data is not None:
            err["data"] = self.data
        return err


def default_answer(req):
    """Answer a runs/submit callback with a made-up run id."""
    params = req.get("params") or {}
    return {"runId": uuid.uuid4().hex, "step": params.get("step")}


class SessionResult:
    """Outcome of run_session.

    status/headers: of the SSE response; instance_id: its Stepflow-Instance-Id;
    events: all parsed event messages (non-JSON events as {"_raw": text});
    callback_requests: the worker's requests; callback_statuses: HTTP status of
    each answer POST (None if that POST failed, reason in callback_errors);
    callback_responses: their HttpResults; final: the final JSON-RPC message for
    the original id (or the JSON body of a non-SSE answer); error: why the session
    did not complete normally (None if it did); request_id; duration (seconds).
    """

    def __init__(self, request_id):
        self.request_id = request_id
        self.status = None
        self.headers = {}
        self.instance_id = None
        self.events = []
        self.callback_requests = []
        self.callback_statuses = []
        self.callback_responses = []
        self.callback_errors = []
        self.final = None
        self.error = None
        self.duration = None

    @property
    def ok(self):
        """Stream ended cleanly with a final result (not an error) and every answer got 202."""
        return (self.error is None and isinstance(self.final, dict) and "result" in self.final
                and all(s == 202 for s in self.callback_statuses))

    @property
    def result(self):
        return self.final.get("result") if isinstance(self.final, dict) else None

    def __repr__(self):
        return ("SessionResult(status=%r, instance_id=%r, callbacks=%r, final=%r, error=%r)"
                % (self.status, self.instance_id, self.callback_statuses, self.final, self.error))


def run_session(host, port, count, answer=default_answer, headers=None, timeout=60,
                component="/callbacks", input=None, request_id=None, callback_headers=None):
    """Run one bidirectional session the way the Stepflow orchestrator does.

    POSTs components/execute of `component` (input defaults to {"count": count})
    with Accept: application/json, text/event-stream; reads the SSE stream as it
    arrives; answers each callback request with a new POST (on a second
    keep-alive connection) of {"jsonrpc":"2.0","id":<cbid>,"result":answer(req)}
    carrying Stepflow-Instance-Id from the SSE response head. `headers` go on the
    execute POST and on every answer (e.g. traceparent); `callback_headers` only
    on answers and override. `answer` may return NO_ANSWER or a CallbackError.
    Never raises for network/protocol trouble: see SessionResult.error.
    """
    rid = request_id if request_id is not None else "session-" + uuid.uuid4().hex
    result = SessionResult(rid)
    start = time.monotonic()
    deadline = start + timeout
    body = {"jsonrpc": "2.0", "id": rid, "method": "components/execute",
            "params": {"component": component, "input": input if input is not None else {"count": count}}}
    try:
        reader = SseReader(host, port, body, headers=headers, timeout=timeout)
    except Exception as e:
        result.error = "execute request failed: %r" % (e,)
        result.duration = time.monotonic() - start
        return result
    cb_conn = HttpConnection(host, port, timeout)
    try:
        result.status, result.headers, result.instance_id = reader.status, reader.headers, reader.instance_id
        if not reader.is_sse:
            try:
                result.final = json.loads(reader.body)
            except ValueError:
                pass
            if reader.ended_abnormally:
                result.error = "response ended abnormally: %s" % reader.error
            elif reader.status != 200 or not isinstance(result.final, dict):
                result.error = "HTTP %s without an event stream" % reader.status
            return result
        while True:
            remaining = deadline - time.monotonic()
            try:
                if remaining <= 0:
                    raise TimeoutError
                ev = reader.next_event(timeout=remaining)
            except TimeoutError:
                result.error = "session timed out after %.1fs (stream still open)" % timeout
                break
            if ev is None:
                if reader.ended_abnormally:
                    result.error = "stream ended abnormally: %s" % reader.error
                elif result.final is None:
                    result.error = "stream ended without a final result"
                break
            try:
                msg = ev.json()
            except ValueError:
                msg = {"_raw": ev.data}
            result.events.append(msg)
            if not isinstance(msg, dict):
                continue
            if "method" in msg and "id" in msg:
                result.callback_requests.append(msg)
                _answer_callback(msg, answer, result, cb_conn, headers, callback_headers,
                                 deadline - time.monotonic())
            elif msg.get("id") == rid and ("result" in msg or "error" in msg):
                result.final = msg
    except Exception as e:  # a bug in `answer` or similar: report, don't raise
        result.error = "session aborted: %r" % (e,)
    finally:
        reader.close()
        cb_conn.close()
        result.duration = time.monotonic() - start
    return result


def _answer_callback(req, answer, result, conn, headers, callback_headers, timeout):
    value = answer(req)
    if value is NO_ANSWER:
        return
    reply = {"jsonrpc": "2.0", "id": req["id"]}
    if isinstance(value, CallbackError):
        reply["error"] = value.to_json()
    else:
        reply["result"] = value
    hdrs = {"Content-Type": "application/json", "Accept": ACCEPT_BOTH}
    hdrs.update(headers or {})
    if result.instance_id is not None:
        hdrs["Stepflow-Instance-Id"] = result.instance_id
    hdrs.update(callback_headers or {})
    try:
        r = conn.request("POST", "/", _json_bytes(reply), hdrs, max(timeout, 0.1))
    except Exception as e:
        conn.close()
        result.callback_statuses.append(None)
        result.callback_responses.append(None)
        result.callback_errors.append("%r" % (e,))
        return
    result.callback_statuses.append(r.status)
    result.callback_responses.append(r)


# --------------------------------------------------------------------------- #
# Raw bytes
# --------------------------------------------------------------------------- #

def raw_request(host, port, data, timeout=5, responses=1, half_close=False):
    """Send raw bytes on a new connection and return the raw bytes received.

    Reading stops at EOF, after `timeout` seconds in total, on a reset, or once
    `responses` complete responses were parsed (None: only EOF/timeout end it).
    half_close=True shuts down the sending side after `data`.
    """
    out = bytearray()
    sock = socket.create_connection((host, port), timeout=timeout)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        deadline = time.monotonic() + timeout
        try:
            sock.sendall(data)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the server may answer (e.g. 400) and close before reading it all
        parser = _ResponseParser() if responses else None
        complete = 0
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            sock.settimeout(remaining)
            try:
                chunk = sock.recv(65536)
            except (TimeoutError, OSError):
                break
            if not chunk:
                break
            out += chunk
            if parser is None:
                continue
            try:
                parser.feed(chunk)
                while parser.done:
                    complete += 1
                    if complete >= responses:
                        return bytes(out)
                    leftover = parser.leftover
                    parser = _ResponseParser()
                    parser.feed(leftover)
            except ProtocolError:
                parser = None  # not parseable: fall back to EOF / timeout
    finally:
        sock.close()
    return bytes(out)
