"""A plain HTTP backend that keeps sessions the way MCP Streamable HTTP servers do, for tests.

No /health route (it answers 404 there, as most non-Stepflow servers do). A POST without an
Mcp-Session-Id header starts a session: the answer carries a fresh 64-character id. A request
naming a session this process does not know gets 404; DELETE ends one. Every answer names the
server, so a test sees which process served it. GET /stats (direct, not through the balancer)
tells how many requests arrived and which session ids they named.

Prints "LISTENING <port>" once bound.
"""

import argparse
import json
import secrets
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HEADER = "Mcp-Session-Id"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--name", default="s")
    args = ap.parse_args()
    lock = threading.Lock()
    sessions = set()
    stats = {"requests": 0, "session_ids": []}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def answer(self, status, body, headers=()):
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in headers:
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

        def handle_one(self):
            if self.path == "/stats":
                with lock:
                    return self.answer(200, stats)
            if self.path == "/ok":  # what nginx-style health routes say
                return self.answer(200, {"status": "ok"})
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                self.rfile.read(length)
            sid = self.headers.get(HEADER)
            with lock:
                stats["requests"] += 1
                if sid:
                    stats["session_ids"].append(sid)
                known = sid in sessions
            if self.path == "/health" and self.command == "GET":
                return self.answer(404, {"error": "no such route"})
            if not sid:
                if self.command != "POST":
                    return self.answer(400, {"error": "no session"})
                new = secrets.token_hex(32)
                with lock:
                    sessions.add(new)
                return self.answer(200, {"server": args.name, "session": new}, [(HEADER, new)])
            if not known:
                return self.answer(404, {"jsonrpc": "2.0", "id": None,
                                         "error": {"code": -32001, "message": "Session not found"}})
            if self.command == "DELETE":
                with lock:
                    sessions.discard(sid)
                return self.answer(200, {"server": args.name, "ended": True})
            return self.answer(200, {"server": args.name, "session": sid}, [(HEADER, sid)])

        do_GET = do_POST = do_DELETE = handle_one

    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    server.daemon_threads = True
    print(f"LISTENING {server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
