"""A worker whose answers the test writes byte for byte, and which keeps every request head it
received: for what a real worker never does (a malformed status line, a header split by a bare
LF) and for checking what the balancer sent upstream (cookies joined, session ids unsealed).

    w = RawWorker(lambda head, body: b"HTTP/1.1 200 OK\\r\\nContent-Length: 2\\r\\n\\r\\n{}")
    Balancer([w.address], args=["--health-check", "tcp"])
    w.heads  # [(request line, [(name, value), ...], body), ...] of the non-/health requests

Standard library only; one thread per connection; keep-alive unless the answer says otherwise.
"""

import json
import socket
import threading


def ok(body=b'{"jsonrpc":"2.0","id":1,"result":{}}', extra=b""):
    """A well-formed 200 with `body` and extra header lines (bytes, each ending in CRLF)."""
    return (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: " + str(len(body)).encode()
            + b"\r\n" + extra + b"\r\n" + body)


def read_request(conn, buf):
    """One HTTP/1.1 request from `conn`, `buf` holding bytes already read -> (head lines, [(name,
    value)], body, bytes after it), or None when the peer closed first. Content-Length and chunked
    bodies; the test workers' one reader."""
    while b"\r\n\r\n" not in buf:
        chunk = conn.recv(65536)
        if not chunk:
            return None
        buf += chunk
    head, _, buf = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    fields = [tuple(part.strip() for part in line.split(":", 1)) for line in lines[1:]]
    length = next((int(v) for n, v in fields if n.lower() == "content-length"), 0)
    body = b""
    if any(n.lower() == "transfer-encoding" for n, _ in fields):
        while True:
            while b"\r\n" not in buf:
                chunk = conn.recv(65536)
                if not chunk:
                    return None
                buf += chunk
            size_line, _, buf = buf.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            while len(buf) < size + 2:
                chunk = conn.recv(65536)
                if not chunk:
                    return None
                buf += chunk
            body += buf[:size]
            buf = buf[size + 2:]
            if size == 0:
                return lines, fields, body, buf
    while len(buf) < length:
        chunk = conn.recv(65536)
        if not chunk:
            return None
        buf += chunk
    return lines, fields, buf[:length], buf[length:]


class RawWorker:
    def __init__(self, respond=None, instance_id="raw-1"):
        self.respond = respond or (lambda head, body: ok())
        self.instance_id = instance_id
        self.heads = []
        self._lock = threading.Lock()
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def received(self):
        with self._lock:
            return list(self.heads)

    def close(self):
        self._closed = True
        try:
            self.sock.close()
        except OSError:
            pass

    def _accept(self):
        while not self._closed:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        buf = b""
        try:
            while True:
                request = read_request(conn, buf)
                if request is None:
                    return
                lines, fields, body, buf = request
                if lines[0].split(" ")[1:2] == ["/health"]:
                    answer = json.dumps({"status": "healthy", "instanceId": self.instance_id}).encode()
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                                 + str(len(answer)).encode() + b"\r\n\r\n" + answer)
                    continue
                with self._lock:
                    self.heads.append((lines[0], fields, body))
                out = self.respond(lines, body)
                conn.sendall(out)
                if b"connection: close" in out.split(b"\r\n\r\n", 1)[0].lower():
                    return
        except OSError:
            return
        finally:
            conn.close()


def raw_request(port, method="POST", path="/", fields=(), body=b""):
    """One HTTP/1.1 request written as given (fields: (name, value) pairs, repeats kept) on a fresh
    connection -> (status, [(lower-case name, value)], body bytes). Reads to the close."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    head = f"{method} {path} HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n"
    head += "".join(f"{n}: {v}\r\n" for n, v in fields)
    if body or method == "POST":
        head += f"Content-Length: {len(body)}\r\n"
    s.sendall(head.encode("latin-1") + b"\r\n" + body)
    out = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        out += chunk
    s.close()
    head, _, rest = out.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = [(n.strip().lower(), v.strip()) for n, _, v in (line.partition(":") for line in lines[1:])]
    if any(n == "transfer-encoding" for n, _ in headers):  # de-chunk
        body_out = b""
        while rest:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                break
            body_out += rest[:size]
            rest = rest[size + 2:]
        rest = body_out
    return int(lines[0].split(" ")[1]), headers, rest
