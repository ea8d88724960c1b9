#!/usr/bin/env python3
"""Example Stepflow component worker speaking "Streamable HTTP" (Stepflow flavour).

A real worker process for the demo and the integration tests of stepflow-lb.
Python 3 standard library only (runs on Debian 12's /usr/bin/python3, 3.11).

Protocol summary (see docs GUIDE section 2):
  * POST /  one JSON-RPC 2.0 message per request.
      - notifications (no "id")                -> 202, empty body
      - responses (callback answers to a stream) -> 202 if this process holds the
        pending call, else 404 + JSON-RPC error -32001 (counted as misrouted)
      - initialize, components/list, components/info, components/infer_schema
      - components/execute (limited by --max-concurrency, else 503 / -32300)
  * GET /health                 instance id and counters (503 when toggled unhealthy)
  * POST /_control/health       {"healthy": bool, "delay_ms": N}  test hook
  * POST /_noread?hold_ms=N     test hook: never reads the body, answers 200 after N ms
  * POST /_interim?count=N      test hook: N "103 Early Hints" interim responses, then 200

Components (input -> answer):
  /echo      any                    -> {"output": input, "instanceId"}
  /sleep     {"ms"}                 -> {"sleptMs", "instanceId"} after ms milliseconds
  /digest    any (e.g. {"pad"})     -> {"bytes", "sha256"} of the raw (de-chunked) request body
  /blob      {"bytes","chunked","seed"} -> application/octet-stream blob_bytes(bytes, seed),
             Content-Length or chunked (irregular chunk sizes), header X-Blob-Sha256
  /callbacks {"count"}              -> SSE: count runs/submit requests, each waiting for the
             orchestrator's answer POST, then {"callbacks", "answers", "instanceId"}; an answer
             that is a JSON-RPC error appears in "answers" as {"error": ...}; a callback not
             answered within --callback-timeout ends the stream with error -32002
  /stream    {"events","interval_ms","hold"} -> SSE: progress events then {"events",
             "instanceId"}; hold=true keeps the stream open after the first event until the
             client leaves (counted in cancelledStreams) or the process dies
Every response echoes traceparent/tracestate/baggage/X-Forwarded-*/Forwarded/X-Request-Id/
Connection/Host request headers as X-Seen-<Name>.

CLI:
  example_worker.py [--host H] [--port P] [--name NAME] [--max-concurrency N]
                    [--callback-timeout S] [--keepalive-timeout S] [--verbose]
After binding it prints exactly "LISTENING <port>" on stdout.
"""

import argparse
import collections
import hashlib
import http.server
import json
import os
import select
import signal
import socket
import sys
import threading
import time
import uuid

# JSON-RPC error codes used by this worker.
PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
UNKNOWN_PENDING = -32001
CALLBACK_TIMEOUT = -32002
WORKER_AT_CAPACITY = -32300

# Request headers echoed back as X-Seen-<Name> so tests can check pass-through.
ECHOED_HEADERS = (
    ("traceparent", "X-Seen-Traceparent"),
    ("tracestate", "X-Seen-Tracestate"),
    ("baggage", "X-Seen-Baggage"),
    ("x-forwarded-for", "X-Seen-Forwarded-For"),
    ("x-forwarded-proto", "X-Seen-Forwarded-Proto"),
    ("x-forwarded-host", "X-Seen-Forwarded-Host"),
    ("forwarded", "X-Seen-Forwarded"),
    ("x-request-id", "X-Seen-Request-Id"),
    ("connection", "X-Seen-Connection"),
    ("host", "X-Seen-Host"),
)

MAX_BODY = 512 * 1024 * 1024  # refuse absurd bodies rather than exhausting memory
BLOB_SEGMENT = 64 * 1024
# Deliberately irregular chunk sizes so a proxy's chunk parser is exercised
# (tiny chunks, odd sizes, chunks larger than typical read buffers).
BLOB_CHUNK_SIZES = (65536, 1, 65536, 300, 16384, 65535, 7, 131072)


def log(msg):
    try:
        sys.stderr.write("worker: %s\n" % msg)
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


# --------------------------------------------------------------------------- #
# Deterministic blob content, shared with tests.
# --------------------------------------------------------------------------- #

def blob_bytes(n, seed=0):
    """The n bytes /blob returns for `seed`.

    Concatenation of SHAKE-256(b"stepflow-blob:<seed>:<i>") 64 KiB segments.
    Not periodic, so a duplicated or reordered chunk changes the digest.
    """
    if n <= 0:
        return b""
    parts = []
    for i in range((n + BLOB_SEGMENT - 1) // BLOB_SEGMENT):
        parts.append(hashlib.shake_256(b"stepflow-blob:%d:%d" % (seed, i)).digest(BLOB_SEGMENT))
    data = b"".join(parts)
    return data[:n]


def blob_sha256(n, seed=0):
    """Hex sha256 of blob_bytes(n, seed)."""
    return hashlib.sha256(blob_bytes(n, seed)).hexdigest()


# --------------------------------------------------------------------------- #
# Process-wide state: counters, health, pending callbacks.
# --------------------------------------------------------------------------- #

class PendingCallback:
    """A callback request sent on a stream, waiting for the orchestrator's answer."""

    def __init__(self, cb_id):
        self.id = cb_id
        self.event = threading.Event()
        self.message = None


class WorkerState:
    def __init__(self, instance_id, max_concurrency, callback_timeout):
        self.instance_id = instance_id
        self.max_concurrency = max_concurrency
        self.callback_timeout = callback_timeout
        self.lock = threading.Lock()
        self.healthy = True
        self.health_delay_ms = 0
        self.in_flight = 0
        self.max_in_flight = 0  # high-water mark of in_flight
        self.at_capacity = 0    # executions answered -32300
        self.capacity_report = "health"
        self.executions = 0
        self.misrouted = 0
        self.late_callbacks = 0
        self.cancelled_streams = 0
        self.pending = {}
        # Ids we gave up on; a late answer for them is not "misrouted".
        self.expired = collections.OrderedDict()

    def try_acquire(self):
        """Take an execution slot; False means at capacity (nothing created)."""
        with self.lock:
            if self.in_flight >= self.max_concurrency:
                self.at_capacity += 1
                return False
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            self.executions += 1
            return True

    def release(self):
        with self.lock:
            self.in_flight -= 1

    def register(self, cb_id):
        pending = PendingCallback(cb_id)
        with self.lock:
            self.pending[cb_id] = pending
        return pending

    def abandon(self, cb_id):
        with self.lock:
            if self.pending.pop(cb_id, None) is not None:
                self.expired[cb_id] = True
                while len(self.expired) > 10000:
                    self.expired.popitem(last=False)

    def deliver(self, cb_id, message):
        """Hand an answer to the waiting stream. Returns "delivered", "late" or "unknown"."""
        with self.lock:
            pending = self.pending.pop(cb_id, None)
            if pending is None:
                if cb_id in self.expired:
                    self.late_callbacks += 1
                    return "late"
                self.misrouted += 1
                return "unknown"
        pending.message = message
        pending.event.set()
        return "delivered"

    def stream_cancelled(self):
        with self.lock:
            self.cancelled_streams += 1

    def snapshot(self):
        with self.lock:
            snap = {
                "status": "healthy" if self.healthy else "unhealthy",
                "instanceId": self.instance_id,
                "inFlight": self.in_flight,
                "misroutedCallbacks": self.misrouted,
                "executions": self.executions,
                "cancelledStreams": self.cancelled_streams,
                "lateCallbacks": self.late_callbacks,
                "pendingCallbacks": len(self.pending),
                "maxInFlight": self.max_in_flight,
                "atCapacity": self.at_capacity,
            }
            if getattr(self, "omit_instance_id", False):
                del snap["instanceId"]
            if self.capacity_report == "health":
                snap["maxConcurrency"] = self.max_concurrency
            return snap


class BadRequest(Exception):
    """Malformed HTTP framing: answer 400 and close the connection."""


class ClientGone(Exception):
    """The client closed or reset the connection while we were streaming."""


class _BodyWriter:
    """Writes a response body either chunked (HTTP/1.1) or raw until close (HTTP/1.0)."""

    def __init__(self, handler, chunked):
        self.handler = handler
        self.chunked = chunked

    def write(self, data):
        if not data:
            return  # an empty chunk would terminate the stream
        try:
            if self.chunked:
                self.handler.wfile.write(b"".join((b"%x\r\n" % len(data), data, b"\r\n")))
            else:
                self.handler.wfile.write(data)
        except OSError as e:
            raise ClientGone(str(e))

    def finish(self):
        self.handler.release_slot()  # the execution is over before its last bytes go out
        try:
            if self.chunked:
                self.handler.wfile.write(b"0\r\n\r\n")
        except OSError as e:
            raise ClientGone(str(e))


# --------------------------------------------------------------------------- #
# HTTP handler
# --------------------------------------------------------------------------- #

class WorkerHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "stepflow-example-worker/1.0"
    sys_version = ""
    disable_nagle_algorithm = True  # StreamRequestHandler sets TCP_NODELAY for us

    @property
    def state(self):
        return self.server.state

    def version_string(self):
        return self.server_version

    # -- logging --------------------------------------------------------------
    def log_message(self, fmt, *args):
        if self.server.verbose:
            log("%s %s" % (self.address_string(), fmt % args))

    # -- request body ---------------------------------------------------------
    def read_body(self):
        """Read the whole request body, framed by Content-Length or chunked."""
        te = self.headers.get_all("Transfer-Encoding") or []
        cl = self.headers.get_all("Content-Length") or []
        if te and cl:
            # Both present is a request-smuggling signal; refuse (RFC 9112 6.3).
            raise BadRequest("both Transfer-Encoding and Content-Length")
        if te:
            codings = [c.strip().lower() for v in te for c in v.split(",") if c.strip()]
            if codings != ["chunked"]:
                raise BadRequest("unsupported Transfer-Encoding %r" % ",".join(codings))
            return self._read_chunked()
        if cl:
            values = {v.strip() for item in cl for v in item.split(",")}
            if len(values) != 1:
                raise BadRequest("conflicting Content-Length")
            value = values.pop()
            if not value.isdigit():
                raise BadRequest("invalid Content-Length")
            length = int(value)
            if length > MAX_BODY:
                raise BadRequest("body too large")
            data = self.rfile.read(length)
            if len(data) != length:
                raise BadRequest("body shorter than Content-Length")
            return data
        return b""

    def _read_chunked(self):
        parts = []
        total = 0
        while True:
            line = self.rfile.readline(4097)
            if not line.endswith(b"\n"):
                raise BadRequest("bad chunk size line")
            size_text = line.split(b";", 1)[0].strip()
            if not size_text or any(c not in b"0123456789abcdefABCDEF" for c in size_text):
                raise BadRequest("bad chunk size %r" % size_text[:20])
            size = int(size_text, 16)
            if size == 0:
                break
            total += size
            if total > MAX_BODY:
                raise BadRequest("body too large")
            data = self.rfile.read(size)
            if len(data) != size:
                raise BadRequest("truncated chunk")
            parts.append(data)
            crlf = self.rfile.readline(3)
            if crlf not in (b"\r\n", b"\n"):
                raise BadRequest("missing CRLF after chunk")
        # Trailer section: header lines up to an empty line; ignored.
        for _ in range(100):
            line = self.rfile.readline(8193)
            if not line.endswith(b"\n"):
                raise BadRequest("bad trailer")
            if line in (b"\r\n", b"\n"):
                return b"".join(parts)
        raise BadRequest("too many trailers")

    # -- response helpers -----------------------------------------------------
    def _load_report(self):
        if self.state.capacity_report == "header":
            self.send_header("endpoint-load-metrics", "TEXT named_metrics.capacity=%d, named_metrics.inflight=%d"
                             % (self.state.max_concurrency, self.state.in_flight))

    def _common_headers(self):
        for name, echo in ECHOED_HEADERS:
            value = self.headers.get(name)
            if value is not None:
                self.send_header(echo, value)
        if self.close_connection:
            self.send_header("Connection", "close")

    def release_slot(self):
        """Ends this connection's execution, if one holds a slot. Called before its answer is
        written, as a worker whose handler returns before the server sends the response does:
        a balancer that sees the answer complete may send the next call at once."""
        if getattr(self, "slot_held", False):
            self.slot_held = False
            self.state.release()

    def send_bytes(self, status, body, content_type="application/json", extra=None):
        self.release_slot()
        self.send_response(status)
        if body:
            self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self._load_report()
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self._common_headers()
        self.end_headers()
        if body and self.command != "HEAD":
            self.wfile.write(body)

    def send_json(self, status, obj, extra=None):
        self.send_bytes(status, json.dumps(obj, separators=(",", ":")).encode(), extra=extra)

    def send_rpc_result(self, rpc_id, result, status=200):
        self.send_json(status, {"jsonrpc": "2.0", "id": rpc_id, "result": result})

    def send_rpc_error(self, rpc_id, code, message, status=200, data=None):
        err = {"code": code, "message": message}
        if data is not None:
            err["data"] = data
        self.send_json(status, {"jsonrpc": "2.0", "id": rpc_id, "error": err})

    def start_stream(self, status=200, content_type="text/event-stream", extra=None):
        """Send the head of a streamed response; returns a _BodyWriter."""
        chunked = self.request_version != "HTTP/1.0"
        if not chunked:
            self.close_connection = True  # HTTP/1.0: body ends at close
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        if content_type == "text/event-stream":
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Stepflow-Instance-Id", self.state.instance_id)
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self._common_headers()
        self.end_headers()
        return _BodyWriter(self, chunked)

    def send_event(self, writer, obj):
        writer.write(b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n")

    def client_gone(self, timeout):
        """Wait up to `timeout` seconds; True if the peer closed/reset the connection.

        A streaming handler has nothing to read, so EOF is only visible by
        polling the socket (a write to a closed socket may still succeed once).
        """
        poller = select.poll()
        poller.register(self.connection, select.POLLIN | select.POLLPRI | select.POLLERR | select.POLLHUP)
        try:
            events = poller.poll(max(0, int(timeout * 1000)))
        except (OSError, ValueError):
            return True
        if not events:
            return False
        try:
            data = self.connection.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return False
        except OSError:
            return True
        if data == b"":
            return True
        # Client sent more bytes (pipelining) while we stream: not a disconnect;
        # avoid a busy loop by sleeping the rest of the interval.
        time.sleep(timeout)
        return False

    # -- routing --------------------------------------------------------------
    def do_GET(self):
        path = self.path.split("?", 1)[0]
        if path == "/health":
            delay = self.state.health_delay_ms
            if delay:
                time.sleep(delay / 1000.0)
            snap = self.state.snapshot()
            if snap["status"] == "healthy":
                self.send_json(200, snap)
            else:
                self.send_json(503, snap)
            return
        self.send_json(404, {"error": "not found", "path": path})

    def do_HEAD(self):
        self.do_GET()

    def do_POST(self):
        path = self.path.split("?", 1)[0]
        if path == "/_noread":
            return self.hold_unread()
        try:
            body = self.read_body()
        except BadRequest as e:
            log("bad request: %s" % e)
            self.close_connection = True
            self.send_json(400, {"error": "bad request", "detail": str(e)})
            return
        if path == "/_interim":
            return self.interim_flood()
        if path == "/_control/health":
            self.control_health(body)
        elif path == "/":
            self.handle_rpc(body)
        else:
            self.send_json(404, {"error": "not found", "path": path})

    def _query_number(self, key, default):
        for part in self.path.partition("?")[2].split("&"):
            name, _, value = part.partition("=")
            if name == key and value.isdigit():
                return int(value)
        return default

    def hold_unread(self):
        """Test hook: never reads the request body; after hold_ms (default 60000) or once the
        client leaves, answers 200 and closes."""
        self.close_connection = True
        self.client_gone(self._query_number("hold_ms", 60000) / 1000.0)
        try:
            self.send_json(200, {"held": True})
        except OSError:
            pass

    def interim_flood(self):
        """Test hook: sends count (default 10) 103 Early Hints interim responses, then 200."""
        for _ in range(self._query_number("count", 10)):
            self.wfile.write(b"HTTP/1.1 103 Early Hints\r\nLink: </a>; rel=preload\r\n\r\n")
        self.send_json(200, {"interim": True})

    def control_health(self, body):
        try:
            cmd = json.loads(body or b"{}")
            if not isinstance(cmd, dict):
                raise ValueError("not an object")
        except ValueError as e:
            self.send_json(400, {"error": "bad json", "detail": str(e)})
            return
        with self.state.lock:
            if "healthy" in cmd:
                self.state.healthy = bool(cmd["healthy"])
            if "delay_ms" in cmd:
                self.state.health_delay_ms = max(0, int(cmd["delay_ms"]))
        log("health set to %s" % ("healthy" if self.state.healthy else "unhealthy"))
        self.send_json(200, {"healthy": self.state.healthy, "delay_ms": self.state.health_delay_ms,
                             "instanceId": self.state.instance_id})

    def handle_rpc(self, body):
        try:
            msg = json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            self.send_rpc_error(None, PARSE_ERROR, "Parse error", status=400, data=str(e))
            return
        if not isinstance(msg, dict):
            self.send_rpc_error(None, INVALID_REQUEST, "Invalid Request (batches unsupported)", status=400)
            return
        rpc_id = msg.get("id")
        if "method" not in msg:
            if "id" in msg and ("result" in msg or "error" in msg):
                self.handle_callback_answer(msg)
            else:
                self.send_rpc_error(rpc_id, INVALID_REQUEST, "Invalid Request", status=400)
            return
        if "id" not in msg:
            self.send_bytes(202, b"")  # notification
            return
        method = msg["method"]
        params = msg.get("params") or {}
        if method == "initialize":
            self.send_rpc_result(rpc_id, {"protocolVersion": "1.0", "instanceId": self.state.instance_id})
        elif method == "components/list":
            self.send_rpc_result(rpc_id, {"components": [{"component": name} for name in COMPONENTS]})
        elif method == "components/info":
            name = _component_name(params)
            if name not in COMPONENTS:
                self.send_rpc_error(rpc_id, INVALID_PARAMS, "Unknown component", data=params.get("component"))
            else:
                self.send_rpc_result(rpc_id, {"info": {"component": name,
                                                       "description": COMPONENTS[name][1],
                                                       "input_schema": {"type": "object"}}})
        elif method == "components/infer_schema":
            name = _component_name(params)
            if name not in COMPONENTS:
                self.send_rpc_error(rpc_id, INVALID_PARAMS, "Unknown component", data=params.get("component"))
            else:
                self.send_rpc_result(rpc_id, {"output_schema": {"type": "object"}})
        elif method == "components/execute":
            self.execute(rpc_id, params, body)
        else:
            self.send_rpc_error(rpc_id, METHOD_NOT_FOUND, "Method not found", data=method)

    def handle_callback_answer(self, msg):
        cb_id = msg["id"]
        header_id = self.headers.get("Stepflow-Instance-Id")
        outcome = "unknown"
        if isinstance(cb_id, (str, int)) and not isinstance(cb_id, bool):
            outcome = self.state.deliver(cb_id, msg)
        else:
            with self.state.lock:
                self.state.misrouted += 1
        if outcome == "delivered":
            if header_id is not None and header_id != self.state.instance_id:
                log("callback %s delivered but carried Stepflow-Instance-Id %s" % (cb_id, header_id))
            self.send_bytes(202, b"")
        else:
            if outcome == "unknown":
                log("misrouted callback %r (Stepflow-Instance-Id %s)" % (cb_id, header_id))
            self.send_rpc_error(cb_id, UNKNOWN_PENDING, "Unknown pending request", status=404)

    # -- components -----------------------------------------------------------
    def execute(self, rpc_id, params, raw_body):
        if not isinstance(params, dict):
            self.send_rpc_error(rpc_id, INVALID_PARAMS, "params must be an object")
            return
        name = _component_name(params)
        if name not in COMPONENTS:
            self.send_rpc_error(rpc_id, INVALID_PARAMS, "Unknown component", data=params.get("component"))
            return
        inp = params.get("input")
        if inp is None:
            inp = {}
        if not self.state.try_acquire():
            self.send_rpc_error(rpc_id, WORKER_AT_CAPACITY, "Worker at capacity", status=503)
            return
        self.slot_held = True
        try:
            COMPONENTS[name][0](self, rpc_id, inp, raw_body)
        except ClientGone as e:
            self.close_connection = True
            self.state.stream_cancelled()
            if self.server.verbose:
                log("client went away during %s: %s" % (name, e))
        finally:
            self.release_slot()

    def comp_echo(self, rpc_id, inp, raw_body):
        self.send_rpc_result(rpc_id, {"output": inp, "instanceId": self.state.instance_id})

    def comp_sleep(self, rpc_id, inp, raw_body):
        ms = _number(inp, "ms", 0)
        if ms is None:
            self.send_rpc_error(rpc_id, INVALID_PARAMS, "input.ms must be a number")
            return
        time.sleep(max(0.0, ms) / 1000.0)
        self.send_rpc_result(rpc_id, {"sleptMs": ms, "instanceId": self.state.instance_id})

    def comp_digest(self, rpc_id, inp, raw_body):
        self.send_rpc_result(rpc_id, {"bytes": len(raw_body),
                                      "sha256": hashlib.sha256(raw_body).hexdigest(),
                                      "instanceId": self.state.instance_id})

    def comp_blob(self, rpc_id, inp, raw_body):
        n = _number(inp, "bytes", 0)
        seed = _number(inp, "seed", 0)
        if n is None or seed is None or n < 0 or n > MAX_BODY:
            self.send_rpc_error(rpc_id, INVALID_PARAMS, "input.bytes/seed must be numbers")
            return
        data = blob_bytes(int(n), int(seed))
        extra = {"X-Blob-Sha256": hashlib.sha256(data).hexdigest(),
                 "Stepflow-Instance-Id": self.state.instance_id}
        if not (isinstance(inp, dict) and inp.get("chunked")):
            self.send_bytes(200, data, content_type="application/octet-stream", extra=extra)
            return
        writer = self.start_stream(content_type="application/octet-stream", extra=extra)
        view = memoryview(data)
        pos, i = 0, 0
        while pos < len(data):
            size = BLOB_CHUNK_SIZES[i % len(BLOB_CHUNK_SIZES)]
            writer.write(view[pos:pos + size])
            pos += size
            i += 1
        writer.finish()

    def comp_callbacks(self, rpc_id, inp, raw_body):
        count = _number(inp, "count", 1)
        if count is None or count < 0:
            self.send_rpc_error(rpc_id, INVALID_PARAMS, "input.count must be a number")
            return
        count = int(count)
        st = self.state
        writer = self.start_stream()
        answers = []
        for step in range(1, count + 1):
            cb_id = uuid.uuid4().hex
            # Register before emitting, so a fast answer can never race ahead of us.
            pending = st.register(cb_id)
            try:
                self.send_event(writer, {"jsonrpc": "2.0", "id": cb_id, "method": "runs/submit",
                                         "params": {"step": step, "instanceId": st.instance_id}})
                deadline = time.monotonic() + st.callback_timeout
                while not pending.event.wait(0.1):
                    if self.client_gone(0):
                        raise ClientGone("disconnected while waiting for callback %s" % cb_id)
                    if time.monotonic() >= deadline:
                        break
            finally:
                if not pending.event.is_set():
                    st.abandon(cb_id)
            if not pending.event.is_set():
                log("callback %s (step %d) timed out" % (cb_id, step))
                self.send_event(writer, {"jsonrpc": "2.0", "id": rpc_id, "error": {
                    "code": CALLBACK_TIMEOUT, "message": "Callback timed out",
                    "data": {"callbackId": cb_id, "step": step, "instanceId": st.instance_id}}})
                writer.finish()
                return
            answer = pending.message
            answers.append(answer["result"] if "result" in answer else {"error": answer.get("error")})
        self.send_event(writer, {"jsonrpc": "2.0", "id": rpc_id, "result": {
            "callbacks": count, "answers": answers, "instanceId": st.instance_id}})
        writer.finish()

    def comp_stream(self, rpc_id, inp, raw_body):
        events = _number(inp, "events", 1)
        interval_ms = _number(inp, "interval_ms", 0)
        if events is None or interval_ms is None:
            self.send_rpc_error(rpc_id, INVALID_PARAMS, "input.events/interval_ms must be numbers")
            return
        hold = bool(isinstance(inp, dict) and inp.get("hold"))
        writer = self.start_stream()
        for i in range(1, int(events) + 1):
            if i > 1 and interval_ms > 0 and self.client_gone(interval_ms / 1000.0):
                raise ClientGone("disconnected between events")
            self.send_event(writer, {"jsonrpc": "2.0", "method": "progress", "params": {"i": i}})
            if hold:
                # Keep the stream open until the client leaves or the process dies.
                while not self.client_gone(0.2):
                    pass
                raise ClientGone("disconnected during hold")
        self.send_event(writer, {"jsonrpc": "2.0", "id": rpc_id, "result": {
            "events": int(events), "instanceId": self.state.instance_id}})
        writer.finish()


def _component_name(params):
    name = params.get("component") if isinstance(params, dict) else None
    if not isinstance(name, str):
        return None
    return name if name.startswith("/") else "/" + name


def _number(inp, key, default):
    """inp[key] as a number, `default` if absent, None if not a number."""
    value = inp.get(key, default) if isinstance(inp, dict) else default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return value


COMPONENTS = {
    "/echo": (WorkerHandler.comp_echo, "Returns its input."),
    "/sleep": (WorkerHandler.comp_sleep, "Sleeps input.ms milliseconds."),
    "/digest": (WorkerHandler.comp_digest, "Length and sha256 of the raw request body."),
    "/blob": (WorkerHandler.comp_blob, "input.bytes deterministic bytes (seed), optionally chunked."),
    "/callbacks": (WorkerHandler.comp_callbacks, "SSE: input.count runs/submit callbacks, then result."),
    "/stream": (WorkerHandler.comp_stream, "SSE: input.events progress events; hold keeps it open."),
}


class WorkerServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # never wait for held streams on shutdown
    request_queue_size = 1024  # bursts of hundreds of connects must not hit SYN drops

    def handle_error(self, request, client_address):
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError, ClientGone)):
            return
        log("error serving %s: %r" % (client_address, exc))


def main(argv=None):
    ap = argparse.ArgumentParser(description="Example Stepflow component worker (Streamable HTTP).")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0, help="0 picks a free port")
    ap.add_argument("--name", default="", help="instance id prefix")
    ap.add_argument("--max-concurrency", type=int, default=4)
    ap.add_argument("--callback-timeout", type=float, default=30.0, help="seconds")
    ap.add_argument("--keepalive-timeout", type=float, default=0.0,
                    help="close connections idle this many seconds (0 = never)")
    ap.add_argument("--capacity-report", choices=["health", "header", "none"], default="health",
                    help="how the worker reports --max-concurrency: /health maxConcurrency, an "
                         "endpoint-load-metrics response header, or not at all")
    ap.add_argument("--verbose", action="store_true", help="log every request")
    ap.add_argument("--instance-id", default=None,
                    help="report exactly this instanceId, valid or not (tests of id validation)")
    ap.add_argument("--omit-instance-id", action="store_true", help="/health names no instanceId")
    args = ap.parse_args(argv)

    suffix = os.urandom(8).hex()
    instance_id = "%s-%s" % (args.name, suffix) if args.name else suffix
    if args.instance_id is not None:
        instance_id = args.instance_id

    if args.keepalive_timeout > 0:
        WorkerHandler.timeout = args.keepalive_timeout
    if ":" in args.host:
        WorkerServer.address_family = socket.AF_INET6
    server = WorkerServer((args.host, args.port), WorkerHandler)
    server.state = WorkerState(instance_id, args.max_concurrency, args.callback_timeout)
    server.state.omit_instance_id = args.omit_instance_id
    server.state.capacity_report = args.capacity_report
    server.verbose = args.verbose
    port = server.server_address[1]

    stop = threading.Event()

    def on_signal(signum, frame):
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True).start()
    sys.stdout.write("LISTENING %d\n" % port)
    sys.stdout.flush()
    log("instance %s listening on %s:%d (max-concurrency %d)"
        % (instance_id, args.host, port, args.max_concurrency))

    while not stop.wait(0.5):
        pass
    log("instance %s stopping" % instance_id)
    server.shutdown()
    server.server_close()
    # Handler threads may still hold open streams; skip interpreter teardown
    # (daemon threads writing during finalization can crash it).
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
    os._exit(0)


if __name__ == "__main__":
    main()
