"""A Kubernetes API server stand-in for discovery tests (Python 3 standard library only).

It speaks the real wire format for the two resources the balancer reads, over TLS with a bearer
token (or plain HTTP, as `kubectl proxy` does):

  GET /apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices?labelSelector=...&limit=&continue=
  GET /api/v1/namespaces/{ns}/endpoints?fieldSelector=metadata.name=...   (and .../endpoints/{name})
  ... &watch=1&resourceVersion=RV&allowWatchBookmarks=true&timeoutSeconds=N
      -> 200, chunked, one JSON event per line: {"type":"ADDED|MODIFIED|DELETED|BOOKMARK|ERROR",
         "object":{...}}; a version older than the compaction point gets an ERROR event with a
         410 Status (what the real server does), or an HTTP 410 when `http_410_at_watch` is set.
  plus the discovery documents kubectl asks for (/api, /apis, /api/v1, /apis/discovery.k8s.io/v1).

A test runs it in-process (start() starts a thread) and scripts it directly: put_slice /
delete_slice / put_endpoints change state (each write is one resourceVersion and one watch event,
like etcd), compact() expires old versions, expire_watches() sends 410 mid-stream, drop_watches()
cuts streams without their last chunk, end_watches() ends them cleanly (like timeoutSeconds),
fail_next() queues error answers (500, 429 with Retry-After, 403, 410 ...), set_outage() refuses
or fails everything, set_token() rotates the accepted token, split_events writes every event
across several chunks, page_size caps list pages, and `requests` records every request seen.

Certificates: a throw-away CA and a server certificate for 127.0.0.1 / ::1 / localhost are made
with the `openssl` command line into a temporary directory.
"""

import base64
import http.server
import json
import os
import socket
import ssl
import subprocess
import tempfile
import threading
import time
import urllib.parse

SERVICE_LABEL = "kubernetes.io/service-name"


def make_certs(directory):
    """Writes ca.crt, server.crt, server.key into `directory`; returns their paths."""
    ca_key, ca_crt = os.path.join(directory, "ca.key"), os.path.join(directory, "ca.crt")
    key, csr, crt = (os.path.join(directory, n) for n in ("server.key", "server.csr", "server.crt"))
    ext = os.path.join(directory, "server.ext")
    with open(ext, "w") as f:
        f.write("subjectAltName=IP:127.0.0.1,IP:::1,DNS:localhost\n"
                "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
                "extendedKeyUsage=serverAuth\n")
    run = lambda *a: subprocess.run(a, check=True, capture_output=True)  # noqa: E731
    run("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", ca_key, "-out", ca_crt, "-days", "2", "-subj", "/CN=fake-apiserver-ca")
    run("openssl", "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", key, "-out", csr, "-subj", "/CN=kube-apiserver")
    run("openssl", "x509", "-req", "-in", csr, "-CA", ca_crt, "-CAkey", ca_key, "-CAcreateserial",
        "-out", crt, "-days", "2", "-extfile", ext)
    return ca_crt, crt, key


def endpoint(ip, pod=None, ready=True, serving=None, terminating=None, conditions=True):
    """One EndpointSlice endpoint. serving/terminating left None are omitted (as old servers do)."""
    e = {"addresses": [ip]}
    if conditions:
        c = {"ready": ready}
        if serving is not None:
            c["serving"] = serving
        if terminating is not None:
            c["terminating"] = terminating
        e["conditions"] = c
    if pod:
        e["targetRef"] = {"kind": "Pod", "namespace": "", "name": pod, "uid": "uid-" + pod}
    return e


def status_object(code, reason, message):
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}


REASONS = {401: "Unauthorized", 403: "Forbidden", 404: "NotFound", 410: "Expired", 429: "TooManyRequests",
           500: "InternalError", 503: "ServiceUnavailable"}


class _Watch:
    """An open watch stream (its handler thread writes; tests signal it)."""

    def __init__(self, kind, ns, selector, rv):
        self.kind, self.ns, self.selector, self.rv = kind, ns, selector, rv
        self.command = None  # "drop" | "end" | "expire"


class FakeApiServer:
    def __init__(self, tls=True, token="token-1", namespace="ns"):
        self.tls = tls
        self.namespace = namespace
        self.dir = tempfile.mkdtemp(prefix="fake-apiserver-")
        self.ca_file = None
        if tls:
            self.ca_file, self._crt, self._key = make_certs(self.dir)
        self.token_file = os.path.join(self.dir, "token")
        self.cond = threading.Condition()
        self.tokens = {token} if token else None
        if token:
            with open(self.token_file, "w") as f:
                f.write(token + "\n")
        self.rv = 1000
        self.objects = {"endpointslices": {}, "endpoints": {}}  # kind -> (ns, name) -> object
        self.history = []  # (rv, kind, type, object)
        self.compacted_rv = 0  # watching from a version below this gets 410
        self.page_size = None
        self.split_events = False
        self.http_410_at_watch = False
        self.bookmark_interval = None  # seconds; None: bookmarks only on request
        self.failures = []  # dicts: status, kind ("list"|"watch"|"any"), retry_after, remaining
        self.outage = None  # None | "refuse" | HTTP status
        self.watches = set()
        self.requests = []  # dicts: time, kind ("list"|"watch"|"other"|"refused"), path, status, token, conn
        self.connections = 0  # connections accepted (HTTP/1.1 keep-alive serves many requests on one)
        self.close_after_response = False  # close each connection after a response, unannounced (an idle timeout)
        self._snapshots = {}  # continue token -> (rv, remaining items)
        self._httpd = None

    # ------------------------------------------------------------------ lifecycle
    def start(self):
        server = self

        class Handler(_Handler):
            api = server

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True
            block_on_close = False
            allow_reuse_address = True

            def handle_error(self, request, client_address):
                pass  # refused connections and cut streams are the point, not noise

        self._httpd = Server(("127.0.0.1", 0), Handler)
        if self.tls:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(self._crt, self._key)
            self._ssl = ctx
        self.port = self._httpd.server_address[1]
        threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()
        return self

    @property
    def url(self):
        return ("https" if self.tls else "http") + "://127.0.0.1:%d" % self.port

    def stop(self):
        if self._httpd:
            self.drop_watches()
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def balancer_args(self, service="workers", extra=None):
        args = ["--discovery", "kubernetes", "--k8s-api-server", self.url, "--namespace", self.namespace,
                "--service", service]
        if self.tls:
            args += ["--k8s-ca-file", self.ca_file]
        if self.tokens is not None:
            args += ["--k8s-token-file", self.token_file]
        return args + (extra or [])

    # ------------------------------------------------------------------ state changes
    def _write(self, kind, ns, name, obj, event_type):
        with self.cond:
            self.rv += 1
            key = (ns, name)
            if obj is None:
                old = self.objects[kind].pop(key, None)
                if old is None:
                    return self.rv
                old = json.loads(json.dumps(old))
                old["metadata"]["resourceVersion"] = str(self.rv)
                self.history.append((self.rv, kind, "DELETED", old))
            else:
                obj["metadata"]["resourceVersion"] = str(self.rv)
                self.objects[kind][key] = obj
                self.history.append((self.rv, kind, event_type, json.loads(json.dumps(obj))))
            self.cond.notify_all()
            return self.rv

    def put_slice(self, name, endpoints, port=None, ports=None, service="workers", address_type="IPv4", ns=None,
                  raw_ports=False):
        """Creates or replaces an EndpointSlice. `ports`: [(name, number)]; `port`: one unnamed-free
        port named "http". raw_ports=True sends ports as given (None -> null)."""
        ns = ns or self.namespace
        if raw_ports:
            port_list = ports
        else:
            port_list = [{"name": n, "port": p, "protocol": "TCP"} for n, p in (ports or [("http", port)])]
        key = (ns, name)
        existed = key in self.objects["endpointslices"]
        obj = {"kind": "EndpointSlice", "apiVersion": "discovery.k8s.io/v1",
               "metadata": {"name": name, "namespace": ns, "uid": "uid-" + name,
                            "generateName": service + "-",
                            "labels": {SERVICE_LABEL: service,
                                       "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"},
                            "creationTimestamp": "2024-01-01T00:00:00Z"},
               "addressType": address_type, "endpoints": endpoints, "ports": port_list}
        return self._write("endpointslices", ns, name, obj, "MODIFIED" if existed else "ADDED")

    def delete_slice(self, name, ns=None):
        return self._write("endpointslices", ns or self.namespace, name, None, "DELETED")

    def put_endpoints(self, name, subsets, ns=None):
        ns = ns or self.namespace
        existed = (ns, name) in self.objects["endpoints"]
        obj = {"kind": "Endpoints", "apiVersion": "v1",
               "metadata": {"name": name, "namespace": ns, "uid": "uid-ep-" + name}, "subsets": subsets}
        return self._write("endpoints", ns, name, obj, "MODIFIED" if existed else "ADDED")

    def delete_endpoints(self, name, ns=None):
        return self._write("endpoints", ns or self.namespace, name, None, "DELETED")

    def compact(self):
        """Forget history: any watch from an older version now gets 410 Gone."""
        with self.cond:
            self.rv += 1  # as if unrelated writes happened: every version we handed out is now too old
            self.compacted_rv = self.rv
            self.history = []
            self._snapshots.clear()

    def _signal_watches(self, command):
        with self.cond:
            for w in self.watches:
                w.command = command
            self.cond.notify_all()

    def expire_watches(self):
        """Compact and send every open watch an ERROR 410 event (mid-stream expiry)."""
        self.compact()
        self._signal_watches("expire")

    def drop_watches(self):
        """Cut every open watch without its terminating chunk (a broken stream)."""
        self._signal_watches("drop")

    def end_watches(self):
        """End every open watch cleanly, as timeoutSeconds does."""
        self._signal_watches("end")

    def send_bookmarks(self):
        self._signal_watches("bookmark")

    def fail_next(self, status, count=1, kind="any", retry_after=None):
        with self.cond:
            self.failures.append({"status": status, "kind": kind, "retry_after": retry_after, "remaining": count})

    def set_outage(self, mode):
        """None: serve; "refuse": close every connection at once; an int: answer that status."""
        with self.cond:
            self.outage = mode
        if mode is not None:
            self.drop_watches()

    def set_token(self, token, write_file=True):
        """Rotate: only `token` is accepted from now on (open watches are cut, as on re-auth)."""
        with self.cond:
            self.tokens = {token}
        if write_file:
            tmp = self.token_file + ".tmp"
            with open(tmp, "w") as f:
                f.write(token + "\n")
            os.replace(tmp, self.token_file)  # atomic, like the kubelet's symlink swap

    def open_watches(self):
        with self.cond:
            return len(self.watches)

    def count(self, kind=None, since=0.0, status=None):
        with self.cond:
            return sum(1 for r in self.requests if r["time"] >= since and (kind is None or r["kind"] == kind)
                       and (status is None or r["status"] == status))

    def wait_watching(self, timeout=10.0, since=0.0):
        """Blocks until a watch opened after `since` is open (polls; for tests)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.cond:
                if any(w.opened_at >= since for w in self.watches):
                    return True
            time.sleep(0.01)
        raise AssertionError("no watch opened in %.1fs" % timeout)

    # ------------------------------------------------------------------ request handling helpers
    def _take_failure(self, kind):
        with self.cond:
            for f in self.failures:
                if f["kind"] in ("any", kind) and f["remaining"] > 0:
                    f["remaining"] -= 1
                    if f["remaining"] == 0:
                        self.failures.remove(f)
                    return f
        return None

    def _matching(self, kind, ns, selector):
        items = []
        for (ons, name), obj in sorted(self.objects[kind].items()):
            if ons == ns and _matches(kind, obj, selector):
                items.append(obj)
        return items


def _matches(kind, obj, selector):
    for key, value in selector.items():
        if key == "metadata.name":
            if obj["metadata"]["name"] != value:
                return False
        elif (obj["metadata"].get("labels") or {}).get(key) != value:
            return False
    return True


def _parse_selector(text):
    out = {}
    for part in filter(None, (text or "").split(",")):
        k, _, v = part.partition("=")
        out[k.strip()] = v.strip().lstrip("=")
    return out


DISCOVERY = {
    "/api": {"kind": "APIVersions", "versions": ["v1"],
             "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1:443"}]},
    "/apis": {"kind": "APIGroupList", "apiVersion": "v1", "groups": [
        {"name": "discovery.k8s.io", "versions": [{"groupVersion": "discovery.k8s.io/v1", "version": "v1"}],
         "preferredVersion": {"groupVersion": "discovery.k8s.io/v1", "version": "v1"}}]},
    "/api/v1": {"kind": "APIResourceList", "groupVersion": "v1", "resources": [
        {"name": "endpoints", "singularName": "endpoints", "namespaced": True, "kind": "Endpoints",
         "verbs": ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"],
         "shortNames": ["ep"]}]},
    "/apis/discovery.k8s.io/v1": {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": "discovery.k8s.io/v1",
                                  "resources": [{"name": "endpointslices", "singularName": "endpointslice",
                                                 "namespaced": True, "kind": "EndpointSlice",
                                                 "verbs": ["create", "delete", "deletecollection", "get", "list",
                                                           "patch", "update", "watch"]}]},
    "/version": {"major": "1", "minor": "32", "gitVersion": "v1.32.0-fake", "platform": "linux/amd64"},
}


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    api = None  # set by FakeApiServer.start

    def log_message(self, fmt, *args):
        pass

    def setup(self):
        api = self.api
        with api.cond:
            api.connections += 1
            self.conn_id = api.connections
        if api.outage == "refuse":
            # An unreachable API: the connection is reset before any byte (no TLS handshake).
            with api.cond:
                api.requests.append({"time": time.monotonic(), "kind": "refused", "path": None, "status": 0,
                                     "token": None, "conn": self.conn_id})
            self.request.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            self.request.close()
            raise ConnectionAbortedError("outage")
        if api.tls:
            self.request.settimeout(10)
            self.request = api._ssl.wrap_socket(self.request, server_side=True)
            self.request.settimeout(None)
        super().setup()

    def handle(self):
        try:
            super().handle()
        except (ConnectionError, ssl.SSLError, OSError):
            pass

    def finish(self):
        try:
            super().finish()
        except (ConnectionError, ssl.SSLError, OSError):
            pass

    # ------------------------------------------------------------------
    def _record(self, kind, status, token):
        with self.api.cond:
            self.api.requests.append({"time": time.monotonic(), "kind": kind, "path": self.path, "status": status,
                                      "token": token, "conn": self.conn_id})

    def _send_json(self, status, obj, extra=None):
        body = json.dumps(obj, separators=(",", ":")).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()
        if self.api.close_after_response:
            self.close_connection = True

    def _send_status(self, code, message, extra=None):
        self._send_json(code, status_object(code, REASONS.get(code, "Unknown"), message), extra)

    def do_GET(self):
        api = self.api
        url = urllib.parse.urlsplit(self.path)
        query = dict(urllib.parse.parse_qsl(url.query))
        path = url.path.rstrip("/") or "/"
        auth = self.headers.get("Authorization", "")
        token = auth[len("Bearer "):] if auth.startswith("Bearer ") else None
        parts = path.strip("/").split("/")
        kind = None
        ns = name = None
        if len(parts) >= 6 and parts[:3] == ["apis", "discovery.k8s.io", "v1"] and parts[3] == "namespaces" \
                and parts[5] == "endpointslices":
            kind, ns = "endpointslices", parts[4]
            name = parts[6] if len(parts) > 6 else None
        elif len(parts) >= 5 and parts[:2] == ["api", "v1"] and parts[2] == "namespaces" and parts[4] == "endpoints":
            kind, ns = "endpoints", parts[3]
            name = parts[5] if len(parts) > 5 else None
        watching = query.get("watch") in ("1", "true")
        req_kind = "other" if kind is None else ("watch" if watching else "list")

        if api.tokens is not None and token not in api.tokens:
            self._record(req_kind, 401, token)
            return self._send_status(401, "Unauthorized")
        if isinstance(api.outage, int):
            self._record(req_kind, api.outage, token)
            return self._send_status(api.outage, "the server is currently unable to handle the request")
        if kind is None:
            if path in DISCOVERY:
                self._record("other", 200, token)
                return self._send_json(200, DISCOVERY[path])
            self._record("other", 404, token)
            return self._send_status(404, "the server could not find the requested resource")
        failure = api._take_failure(req_kind)
        if failure:
            self._record(req_kind, failure["status"], token)
            extra = {"Retry-After": str(failure["retry_after"])} if failure["retry_after"] is not None else None
            message = "too old resource version" if failure["status"] == 410 else "injected failure"
            return self._send_status(failure["status"], message, extra)

        selector = _parse_selector(query.get("labelSelector"))
        selector.update(_parse_selector(query.get("fieldSelector")))
        if name:
            selector["metadata.name"] = name
        if watching:
            return self._watch(kind, ns, selector, query, token)
        if name and "watch" not in query and "labelSelector" not in query and "fieldSelector" not in query:
            with api.cond:
                obj = api.objects[kind].get((ns, name))
            if obj is None:
                self._record("list", 404, token)
                return self._send_status(404, '%s "%s" not found' % (kind, name))
            self._record("list", 200, token)
            return self._send_json(200, obj)
        return self._list(kind, ns, selector, query, token)

    def _list(self, kind, ns, selector, query, token):
        api = self.api
        limit = int(query.get("limit") or 0)
        if api.page_size:
            limit = min(limit, api.page_size) if limit else api.page_size
        cont = query.get("continue")
        with api.cond:
            if cont:
                snap = api._snapshots.pop(cont, None)
                if snap is None:
                    self._record("list", 410, token)
                    return self._send_status(410, "The provided continue parameter is too old to display a "
                                                  "consistent list result. You can start a new list without the "
                                                  "continue parameter.")
                rv, items = snap
            else:
                rv, items = api.rv, json.loads(json.dumps(api._matching(kind, ns, selector)))
            page, rest = (items[:limit], items[limit:]) if limit else (items, [])
            meta = {"resourceVersion": str(rv)}
            if rest:
                token_text = base64.urlsafe_b64encode(os.urandom(12)).decode()
                api._snapshots[token_text] = (rv, rest)
                meta["continue"] = token_text
                meta["remainingItemCount"] = len(rest)
        list_kind = "EndpointSliceList" if kind == "endpointslices" else "EndpointsList"
        api_version = "discovery.k8s.io/v1" if kind == "endpointslices" else "v1"
        self._record("list", 200, token)
        # Go marshals an empty list as null for some list types; the client must cope.
        self._send_json(200, {"kind": list_kind, "apiVersion": api_version, "metadata": meta,
                              "items": page if page else None})

    def _write_chunk(self, data):
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _write_events(self, events):
        lines = b"".join(json.dumps(e, separators=(",", ":")).encode() + b"\n" for e in events)
        if not self.api.split_events:
            self._write_chunk(lines)  # several events share one chunk when several are pending
            return
        # Split every event across chunks at awkward places, each piece sent on its own.
        cuts = [1, 7, 13, 29]
        pos = 0
        for cut in cuts:
            if pos + cut >= len(lines):
                break
            self._write_chunk(lines[pos:pos + cut])
            pos += cut
            time.sleep(0.002)
        while pos < len(lines):
            self._write_chunk(lines[pos:pos + 100])
            pos += 100
            time.sleep(0.001)

    def _watch(self, kind, ns, selector, query, token):
        api = self.api
        try:
            rv = int(query.get("resourceVersion") or 0)
        except ValueError:
            rv = 0
        timeout = float(query.get("timeoutSeconds") or 1800)
        if api.http_410_at_watch and rv and rv < api.compacted_rv:
            self._record("watch", 410, token)
            return self._send_status(410, "too old resource version: %d (%d)" % (rv, api.compacted_rv))
        self._record("watch", 200, token)
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.flush()
        w = _Watch(kind, ns, selector, rv)
        w.opened_at = time.monotonic()
        deadline = time.monotonic() + timeout
        next_bookmark = time.monotonic() + api.bookmark_interval if api.bookmark_interval else None
        if rv and rv < api.compacted_rv:
            # The real server answers 200 and then one ERROR event with a 410 Status.
            self._write_events([{"type": "ERROR", "object": status_object(
                410, "Expired", "too old resource version: %d (%d)" % (rv, api.compacted_rv))}])
            return self._end_stream()
        with api.cond:
            api.watches.add(w)
        try:
            while True:
                with api.cond:
                    pending = [(erv, t, o) for erv, k, t, o in api.history
                               if k == kind and erv > w.rv and o["metadata"]["namespace"] == ns
                               and _matches(kind, o, selector)]
                    command = w.command
                    w.command = None
                    if not pending and command is None:
                        wait = deadline - time.monotonic()
                        if next_bookmark:
                            wait = min(wait, next_bookmark - time.monotonic())
                        if wait > 0:
                            api.cond.wait(min(wait, 0.5))
                        pending = [(erv, t, o) for erv, k, t, o in api.history
                                   if k == kind and erv > w.rv and o["metadata"]["namespace"] == ns
                                   and _matches(kind, o, selector)]
                        command = w.command
                        w.command = None
                    latest = api.rv
                if pending:
                    w.rv = max(p[0] for p in pending)
                    self._write_events([{"type": t, "object": o} for _, t, o in pending])
                if command == "drop":
                    self.close_connection = True
                    self.request.shutdown(socket.SHUT_RDWR)
                    return
                if command == "end":
                    return self._end_stream()
                if command == "expire":
                    self._write_events([{"type": "ERROR", "object": status_object(
                        410, "Expired", "too old resource version: %d (%d)" % (w.rv, api.compacted_rv))}])
                    return self._end_stream()
                now = time.monotonic()
                if command == "bookmark" or (next_bookmark and now >= next_bookmark):
                    w.rv = max(w.rv, latest)
                    self._write_events([{"type": "BOOKMARK", "object": {
                        "kind": "EndpointSlice" if kind == "endpointslices" else "Endpoints",
                        "apiVersion": "discovery.k8s.io/v1" if kind == "endpointslices" else "v1",
                        "metadata": {"resourceVersion": str(w.rv), "creationTimestamp": None}}}])
                    if next_bookmark:
                        next_bookmark = now + api.bookmark_interval
                if now >= deadline:
                    return self._end_stream()
        except (ConnectionError, ssl.SSLError, OSError):
            self.close_connection = True
        finally:
            with api.cond:
                api.watches.discard(w)

    def _end_stream(self):
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()
        self.close_connection = True
