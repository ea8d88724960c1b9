#!/usr/bin/env python3
"""A faulty fleet: at most once, measured (issue 21), stepflow-lb next to HAProxy and nginx.

Three workers, each in its own process on raw sockets, so that every call they read is counted
as an execution where it ran. Like real Stepflow workers they run at most --capacity executions at
once (--service-ms each), answer more with 503 / -32300 "Worker at capacity" (nothing ran), report
that limit in /health (`maxConcurrency`), and come back from a restart with a new instance id.
One of them dies mid-call every --every of its executions: it reads the call, starts it, then drops
every connection it has (FIN) and stops listening for --down-ms before it comes back, as a worker
OOM-killed and restarted does. A closed-loop client keeps --concurrency calls (POST
components/execute, unique ids) going through each proxy in turn for --duration seconds: by
default as many as the fleet runs at once, so a fleet short of one worker is over capacity.
Reported:

- duplicated: calls that ran on two workers or more (the failure this issue is about);
- failed: calls the client got no 200 for (stepflow-lb's "may have run" 502 and relayed
  "Worker at capacity" 503s included);
- lost: calls the client got no answer at all for (connection dropped or timed out);
- goodput: 200s per second.

The proxies run as their users run them: HAProxy with its default `retry-on conn-failure`
(`retries 3`, `option redispatch`), nginx with its default `proxy_next_upstream error timeout`
(which never passes a sent POST to the next server), stepflow-lb with its defaults.

A second scenario (--keepalive) checks pooled-connection reuse: one worker closes idle keep-alive
connections after 1 s; calls come one at a time every 0.9-1.1 s, so the worker's close and the
next request meet. Reported: failed and duplicated calls.

  bench/faulty_fleet.py [--duration 20] [--concurrency 12] [--capacity 4] [--service-ms 20] [--every 300]
                        [--down-ms 1000] [--keepalive-calls 40] [--rounds 1] [--proxies stepflow-lb,haproxy,nginx]
"""
import argparse
import http.client
import itertools
import json
import multiprocessing
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
    """A Stepflow worker on raw sockets that counts executions by JSON-RPC id. Like a real one it
    runs at most `max_concurrency` executions at once and answers more with 503 / -32300 "Worker at
    capacity" (nothing ran), reports that limit in /health, and names a new instance id after each
    restart."""

    def __init__(self, name, die_every=0, down_ms=200, idle_close_s=0.0, service_ms=2, max_concurrency=0):
        self.name = name
        self.die_every = die_every
        self.down_ms = down_ms
        self.idle_close_s = idle_close_s
        self.service_ms = service_ms
        self.max_concurrency = max_concurrency
        self.lock = threading.Lock()
        self.ran = {}
        self.calls = 0
        self.deaths = 0
        self.refused = 0
        self.running = 0
        self.generation = 0
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
        """Every connection dropped, not listening for down_ms, then back as a new instance."""
        with self.lock:
            conns, self.conns = list(self.conns), set()
            self.deaths += 1
            self.generation += 1
        self._close_listener()
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

    def _execute(self, body):
        rpc_id = json.loads(body).get("id")
        with self.lock:
            if self.max_concurrency and self.running >= self.max_concurrency:
                self.refused += 1
                return 503, {"jsonrpc": "2.0", "id": rpc_id, "error": {"code": -32300, "message": "Worker at capacity"}}
            self.running += 1
            self.ran[rpc_id] = self.ran.get(rpc_id, 0) + 1
            self.calls += 1
            die = self.die_every and self.calls % self.die_every == 0
        try:
            time.sleep(self.service_ms / 1000)
            if die:
                self._die()
                return None, None
        finally:
            with self.lock:
                self.running -= 1
        return 200, {"jsonrpc": "2.0", "id": rpc_id, "result": {"ran_on": self.name}}

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
                    status, answer = 200, {"status": "healthy", "instanceId": f"{self.name}-{self.generation}"}
                    if self.max_concurrency:
                        answer["maxConcurrency"] = self.max_concurrency
                else:
                    status, answer = self._execute(body)
                    if status is None:
                        return  # died mid-call
                out = json.dumps(answer).encode()
                reason = b"OK" if status == 200 else b"Service Unavailable"
                conn.sendall(b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                             % (status, reason, len(out)) + out)
        except OSError:
            pass
        finally:
            with self.lock:
                self.conns.discard(conn)
            try:
                conn.close()
            except OSError:
                pass

    def _close_listener(self):
        # shutdown() first: close() alone leaves a socket that another thread is blocked in
        # accept() on listening (and taking connections) until that accept returns.
        for end in (lambda: self.srv.shutdown(socket.SHUT_RDWR), self.srv.close):
            try:
                end()
            except OSError:
                pass

    def stop(self):
        self.stopped = True
        self._close_listener()


def _worker_process(pipe, kwargs):
    w = Worker(**kwargs)
    pipe.send(w.port)
    pipe.recv()  # stop
    w.stop()
    with w.lock:
        pipe.send({"ran": w.ran, "calls": w.calls, "deaths": w.deaths, "refused": w.refused})


class WorkerProcess:
    """A Worker in its own process, so that the workers and the client do not share one
    interpreter lock (the client's pace would otherwise be the workers' and the other way round)."""

    def __init__(self, **kwargs):
        self.pipe, child = multiprocessing.Pipe()
        self.proc = multiprocessing.get_context("fork").Process(target=_worker_process, args=(child, kwargs),
                                                                daemon=True)
        self.proc.start()
        self.port = self.pipe.recv()
        self.ran, self.calls, self.deaths, self.refused = {}, 0, 0, 0

    def stop(self):
        self.pipe.send("stop")
        r = self.pipe.recv()
        self.proc.join(5)
        self.ran, self.calls, self.deaths, self.refused = r["ran"], r["calls"], r["deaths"], r["refused"]


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
    fleet = dict(service_ms=args.service_ms, max_concurrency=args.capacity)
    workers = [WorkerProcess(name="w1", die_every=args.every, down_ms=args.down_ms, **fleet),
               WorkerProcess(name="w2", **fleet), WorkerProcess(name="w3", **fleet)]
    ports = [w.port for w in workers]
    port = B.free_port()
    lb_args = os.environ.get("STEPFLOW_LB_ARGS", "").split()  # as for every bench
    if kind == "stepflow-lb":
        proc = B.start_stepflow_lb(port, ports, extra=lb_args)
    elif kind == "stepflow-lb-base":
        # Another build (STEPFLOW_LB_BASE), e.g. the one before this issue, for comparison.
        os.environ["STEPFLOW_LB"], saved = os.environ["STEPFLOW_LB_BASE"], os.environ.get("STEPFLOW_LB", "")
        try:
            proc = B.start_stepflow_lb(port, ports, extra=lb_args)
        finally:
            os.environ["STEPFLOW_LB"] = saved
    elif kind == "haproxy":
        proc = B.start_haproxy(port, ports, backend_extra="  retries 3\n  option redispatch\n")
    else:
        proc = B.start_nginx_proxy(port, ports)
    if kind in ("haproxy", "nginx"):
        B.wait_http_ok(port, "/health")
    time.sleep(0.5)
    # A closed loop for a fixed time (not a fixed number of calls): a proxy that fails calls fast
    # does not get a shorter run, and the worker dies and comes back as often for every proxy.
    ids = itertools.count()
    t0 = time.monotonic()
    deadline = t0 + args.duration

    def client(_):
        local, out = threading.local(), []
        while time.monotonic() < deadline:
            status = call(port, f"{kind}-{next(ids)}", local)
            out.append(status)
            if status != 200 and args.backoff_ms:
                time.sleep(args.backoff_ms / 1000)  # as a client does before its next try
        return out

    with ThreadPoolExecutor(args.concurrency) as pool:
        statuses = [s for out in pool.map(client, range(args.concurrency)) for s in out]
    elapsed = time.monotonic() - t0
    B.stop(proc)
    for w in workers:
        w.stop()
    calls = len(statuses)
    ok = sum(1 for s in statuses if s == 200)
    lost = sum(1 for s in statuses if s == "lost")
    runs = {}
    for w in workers:
        for rid, n in w.ran.items():
            runs[rid] = runs.get(rid, 0) + n
    dup = sum(1 for n in runs.values() if n > 1)
    answered = {}
    for s in statuses:
        answered[str(s)] = answered.get(str(s), 0) + 1
    return {"proxy": kind, "calls": calls, "ok": ok, "failed": calls - ok, "lost": lost,
            "duplicated": dup, "executions": sum(runs.values()), "goodput": ok / elapsed,
            "seconds": elapsed, "deaths": workers[0].deaths, "statuses": answered,
            "worker_refusals": sum(w.refused for w in workers)}


def keepalive(args):
    w = WorkerProcess(name="ka", idle_close_s=1.0)
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
    ap.add_argument("--duration", type=float, default=20.0, help="seconds of load per proxy and round")
    ap.add_argument("--concurrency", type=int, default=12)
    ap.add_argument("--every", type=int, default=300)
    ap.add_argument("--down-ms", type=int, default=1000)
    ap.add_argument("--service-ms", type=int, default=20)
    ap.add_argument("--capacity", type=int, default=4)
    ap.add_argument("--backoff-ms", type=int, default=100,
                    help="a client thread's pause after a failed call (0: it sends the next one at once)")
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
    text = (f"# Faulty fleet ({args.rounds} x {args.duration:.0f} s per proxy, {args.concurrency} calls at once; 3 workers of "
            f"{args.capacity} executions at once, {args.service_ms} ms each; one of them dies mid-call every "
            f"{args.every} of its calls, back after {args.down_ms} ms as a new instance)\n\n"
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
