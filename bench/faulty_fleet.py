#!/usr/bin/env python3
"""A faulty fleet: at most once, measured (issue 21), stepflow-lb next to HAProxy and nginx.

Three workers (raw sockets in this process, so each execution is counted where it runs): every
call they read is an execution. One of them dies mid-call every --every calls: it reads the call,
starts it, then drops every connection it has (FIN) and stops listening for --down-ms before it
comes back, as a worker OOM-killed and restarted does. A closed-loop client sends --calls POSTs
(components/execute, unique ids) with --concurrency threads through each proxy in turn. Reported:

- duplicated: calls that ran on two workers or more (the failure this issue is about);
- failed: calls the client got no 200 for (stepflow-lb's "may have run" 502 included);
- lost: calls the client got no answer at all for (connection dropped or timed out);
- goodput: 200s per second.

The proxies run as their users run them: HAProxy with its default `retry-on conn-failure`
(`retries 3`, `option redispatch`), nginx with its default `proxy_next_upstream error timeout`
(which never passes a sent POST to the next server), stepflow-lb with its defaults.

A second scenario (--keepalive) checks pooled-connection reuse: one worker closes idle keep-alive
connections after 1 s; calls come one at a time every 0.9-1.1 s, so the worker's close and the
next request meet. Reported: failed and duplicated calls.

  bench/faulty_fleet.py [--calls 3000] [--concurrency 8] [--every 50] [--keepalive-calls 40] [--rounds 1]
"""
import argparse
import http.client
import json
import os
import random
import socket
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "integration"))
import benchlib as B  # noqa: E402
from raw_worker import read_request  # noqa: E402  (tests/integration: the test workers' reader)


class Worker:
    """A Stepflow worker on raw sockets that counts executions by JSON-RPC id."""

    def __init__(self, name, die_every=0, down_ms=200, idle_close_s=0.0, service_ms=2):
        self.name = name
        self.die_every = die_every
        self.down_ms = down_ms
        self.idle_close_s = idle_close_s
        self.service_ms = service_ms
        self.lock = threading.Lock()
        self.ran = {}
        self.calls = 0
        self.conns = set()
        self.port = B.free_port()
        self.srv = None
        self.stopped = False
        self._listen()

    def _listen(self):
        srv = socket.socket()
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            srv.bind(("127.0.0.1", self.port))
        except OSError:
            srv.close()
            raise
        srv.listen(512)
        self.srv = srv
        threading.Thread(target=self._accept, args=(srv,), daemon=True).start()

    def _accept(self, srv):
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            with self.lock:
                self.conns.add(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _die(self):
        """Every connection dropped, not listening for down_ms, then back (a restart)."""
        with self.lock:
            conns, self.conns = list(self.conns), set()
        try:
            self.srv.close()
        except OSError:
            pass
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

        def back():
            time.sleep(self.down_ms / 1000)
            while not self.stopped:
                try:
                    return self._listen()
                except OSError:  # its dropped connections still hold the port a moment
                    time.sleep(0.01)
        threading.Thread(target=back, daemon=True).start()

    def _serve(self, conn):
        buf = b""
        try:
            while True:
                # The idle keep-alive timeout applies while waiting for the next request.
                conn.settimeout(self.idle_close_s or None)
                try:
                    request = read_request(conn, buf)
                except socket.timeout:
                    return  # idle keep-alive timeout: close
                if request is None:
                    return
                conn.settimeout(None)
                lines, _, body, buf = request
                head = lines[0].encode("latin-1")
                if head.startswith(b"GET /health"):
                    out = json.dumps({"status": "healthy", "instanceId": self.name}).encode()
                else:
                    rpc_id = json.loads(body).get("id")
                    with self.lock:
                        self.ran[rpc_id] = self.ran.get(rpc_id, 0) + 1
                        self.calls += 1
                        die = self.die_every and self.calls % self.die_every == 0
                    time.sleep(self.service_ms / 1000)
                    if die:
                        self._die()
                        return
                    out = json.dumps({"jsonrpc": "2.0", "id": rpc_id, "result": {"ran_on": self.name}}).encode()
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                             % len(out) + out)
        except OSError:
            pass
        finally:
            with self.lock:
                self.conns.discard(conn)
            try:
                conn.close()
            except OSError:
                pass

    def stop(self):
        self.stopped = True
        try:
            self.srv.close()
        except OSError:
            pass


def call(port, rpc_id, local):
    body = json.dumps({"jsonrpc": "2.0", "id": rpc_id, "method": "components/execute",
                       "params": {"component": "/echo", "input": {}}})
    conn = getattr(local, "conn", None)
    if conn is None:
        conn = local.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    try:
        conn.request("POST", "/", body, {"Content-Type": "application/json"})
        r = conn.getresponse()
        r.read()
        if r.getheader("Connection", "").lower() == "close":
            conn.close()
            local.conn = None
        return r.status
    except (socket.timeout, OSError, http.client.HTTPException):
        # No answer: the proxy dropped the connection (or never answered). Not resent: the
        # client cannot know whether the call ran.
        conn.close()
        local.conn = None
        return "lost"


def run(kind, args):
    workers = [Worker("w1", die_every=args.every, down_ms=args.down_ms), Worker("w2"), Worker("w3")]
    ports = [w.port for w in workers]
    port = B.free_port()
    if kind == "stepflow-lb":
        proc = B.start_stepflow_lb(port, ports)
    elif kind == "stepflow-lb-base":
        # Another build (STEPFLOW_LB_BASE), e.g. the one before this issue, for comparison.
        os.environ["STEPFLOW_LB"], saved = os.environ["STEPFLOW_LB_BASE"], os.environ.get("STEPFLOW_LB", "")
        try:
            proc = B.start_stepflow_lb(port, ports)
        finally:
            os.environ["STEPFLOW_LB"] = saved
    elif kind == "haproxy":
        proc = B.start_haproxy(port, ports, backend_extra="  retries 3\n  option redispatch\n")
    else:
        proc = B.start_nginx_proxy(port, ports)
    if kind in ("haproxy", "nginx"):
        B.wait_http_ok(port, "/health")
    time.sleep(0.5)
    local = threading.local()
    t0 = time.monotonic()
    with ThreadPoolExecutor(args.concurrency) as pool:
        statuses = list(pool.map(lambda i: (i, call(port, f"{kind}-{i}", local)), range(args.calls)))
    elapsed = time.monotonic() - t0
    B.stop(proc)
    for w in workers:
        w.stop()
    ok = sum(1 for _, s in statuses if s == 200)
    lost = sum(1 for _, s in statuses if s == "lost")
    runs = {}
    for w in workers:
        for rid, n in w.ran.items():
            runs[rid] = runs.get(rid, 0) + n
    dup = sum(1 for n in runs.values() if n > 1)
    return {"proxy": kind, "calls": args.calls, "ok": ok, "failed": args.calls - ok, "lost": lost,
            "duplicated": dup, "executions": sum(runs.values()), "goodput": ok / elapsed,
            "seconds": elapsed, "deaths": workers[0].calls // args.every}


def keepalive(args):
    w = Worker("ka", idle_close_s=1.0)
    port = B.free_port()
    proc = B.start_stepflow_lb(port, [w.port])
    local = threading.local()
    failed = 0
    for i in range(args.keepalive_calls):
        time.sleep(random.uniform(0.9, 1.1))
        if call(port, f"ka-{i}", local) != 200:
            failed += 1
    B.stop(proc)
    w.stop()
    dup = sum(1 for n in w.ran.values() if n > 1)
    return {"calls": args.keepalive_calls, "failed": failed, "duplicated": dup}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=3000)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--every", type=int, default=50)
    ap.add_argument("--down-ms", type=int, default=200)
    ap.add_argument("--keepalive-calls", type=int, default=40)
    ap.add_argument("--proxies", default="stepflow-lb,haproxy,nginx")
    ap.add_argument("--rounds", type=int, default=1)
    args = ap.parse_args()
    rows, data = [], {"faulty": [], "keepalive": None, "versions": B.versions()}
    kinds = args.proxies.split(",")
    results = {kind: [] for kind in kinds}
    # Rounds interleave the proxies so that a noisy stretch of the shared machine hits all of them;
    # counts are summed over the rounds, goodput is the median round.
    for rnd in range(args.rounds):
        for kind in kinds:
            B.log(f"faulty fleet through {kind} (round {rnd + 1}/{args.rounds})")
            r = run(kind, args)
            r["round"] = rnd + 1
            data["faulty"].append(r)
            results[kind].append(r)
    for kind in kinds:
        rs = results[kind]
        total = lambda key: sum(r[key] for r in rs)
        goodputs = sorted(r["goodput"] for r in rs)
        rows.append([kind, str(total("calls")), str(total("deaths")), str(total("duplicated")), str(total("lost")),
                     str(total("failed")), f"{statistics.median(goodputs):.0f} ({goodputs[0]:.0f}..{goodputs[-1]:.0f})"])
    text = (f"# Faulty fleet ({args.rounds} x {args.calls} calls, {args.concurrency} at once; one of 3 workers dies "
            f"mid-call every {args.every} of its calls, back after {args.down_ms} ms)\n\n"
            + B.table(["proxy", "calls", "worker deaths", "duplicated", "lost", "failed",
                       "goodput calls/s, median (min..max)"], rows))
    if args.keepalive_calls:
        B.log("pooled reuse against a 1 s keep-alive worker")
        k = keepalive(args)
        data["keepalive"] = k
        text += (f"\n\nWorker keep-alive 1 s, one call every 0.9-1.1 s through stepflow-lb: {k['calls']} calls, "
                 f"{k['failed']} failed, {k['duplicated']} duplicated.")
    print(text)
    B.save("faulty-fleet", data, text)


if __name__ == "__main__":
    main()
