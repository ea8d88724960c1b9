#!/usr/bin/env python3
"""Tens of thousands of open SSE streams: memory per stream of stepflow-lb (2 threads), HAProxy
and nginx, in the same run.

    python3 bench/sse_many.py [--streams 19500] [--per-connection 100] [--proxies ...]

The clients are h2load over h2c (--per-connection streams on each connection, so the client side
costs a few hundred descriptors); each stream is a POST to bench/sse_server.py that gets one
event and then stays open (n=0). Each proxied stream costs the proxy one worker connection, so
the proxy's descriptor limit bounds the count: on a machine whose hard RLIMIT_NOFILE is 20,000
(and no CAP_SYS_RESOURCE to raise it) 19,500 streams is about the most one process can carry.
Two backend processes (one port each) share the streams.

Per proxy, started fresh: RSS (all its processes) after a warm-up of 200 short streams; RSS
once all --streams are open (counted as established worker connections of the proxy); RSS after
the client went away and every stream closed. Memory per stream = (open - warm) / streams. --rounds rounds (default 3); the table shows each
proxy's median round.
"""
import argparse
import os
import resource
import subprocess
import sys
import time

import benchlib as B

sys.path.insert(0, os.path.join(B.REPO, "tests", "integration"))
import harness  # noqa: E402

BODY = b'{"jsonrpc":"2.0","id":7,"method":"components/execute","params":{}}'


def worker_connections(ports):
    """Established connections of the proxy to the backends (their remote end is a backend port)."""
    return sum(harness.connections_to(p) for p in ports)


def h2load(port, streams, per_connection, query, body_file):
    conns = max(1, streams // per_connection)
    argv = ["h2load", "-c", str(conns), "-m", str(per_connection), "-n", str(streams),
            "-d", body_file, "-H", "content-type: application/json", "-H", "accept: text/event-stream",
            f"http://127.0.0.1:{port}/?{query}"]
    return B.start(argv, name="h2load")


def start(kind, port, backends):
    if kind == "stepflow-lb":
        admin = B.free_port()
        argv = [B.find_lb(), "--listen", f"127.0.0.1:{port}", "--admin-listen", f"127.0.0.1:{admin}",
                "--backends", ",".join(f"127.0.0.1:{b}" for b in backends), "--threads", "2",
                "--access-log", "off", "--log-level", "warn"]
        p = B.start(argv, name="stepflow-lb")
        B.wait_port(admin, proc=p)
        B.wait_http_ok(admin, "/ready")
        return p
    return B.start_proxy(kind, port, backends, h2=True, sse=True)


def measure(kind, backends, streams, per_connection, body_file, open_timeout):
    port = B.free_port()
    proxy = start(kind, port, backends)
    try:
        warm = h2load(port, 200, per_connection, "n=1", body_file)
        warm.wait(timeout=60)
        base = B.rss_bytes(proxy.pid)
        started = time.monotonic()
        load = h2load(port, streams, per_connection, "n=0", body_file)
        deadline = started + open_timeout
        opened = 0
        while time.monotonic() < deadline:
            opened = worker_connections(backends)
            if opened >= streams or load.poll() is not None:
                break
            time.sleep(0.5)
        open_s = time.monotonic() - started
        time.sleep(1.0)  # the last streams' first events
        rss_open = B.rss_bytes(proxy.pid)
        opened = worker_connections(backends)
        B.stop(load)
        deadline = time.monotonic() + 60
        while worker_connections(backends) > 0 and time.monotonic() < deadline:
            time.sleep(0.5)
        time.sleep(1.0)
        rss_after = B.rss_bytes(proxy.pid)
        return {"proxy": kind, "streams": opened, "open_s": open_s, "rss_warm": base, "rss_open": rss_open,
                "rss_after": rss_after, "per_stream": (rss_open - base) / max(opened, 1)}
    finally:
        B.stop(proxy)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--streams", type=int, default=19500)
    ap.add_argument("--per-connection", type=int, default=100)
    ap.add_argument("--proxies", default=",".join(B.PROXIES))
    ap.add_argument("--open-timeout", type=float, default=180)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if args.streams + args.streams // args.per_connection + 200 > hard:
        print(f"note: {args.streams} streams need more descriptors than the hard limit {hard} allows the proxy",
              flush=True)
    body_file = os.path.join(B.tmpdir(), "body.json")
    with open(body_file, "wb") as f:
        f.write(BODY)
    backends = [B.free_port(), B.free_port()]
    servers = [B.start([sys.executable, os.path.join(B.BENCH, "sse_server.py"), str(p)], name=f"sse-server-{p}")
               for p in backends]
    for p, s in zip(backends, servers):
        B.wait_port(p, proc=s)

    runs = {kind: [] for kind in args.proxies.split(",")}
    for _ in range(args.rounds):
        for kind in runs:
            r = measure(kind, backends, args.streams, args.per_connection, body_file, args.open_timeout)
            runs[kind].append(r)
            print(f"{kind}: {r['streams']} streams open in {r['open_s']:.1f} s; RSS warm {r['rss_warm'] / 2**20:.1f} "
                  f"MiB, open {r['rss_open'] / 2**20:.1f} MiB, after {r['rss_after'] / 2**20:.1f} MiB; "
                  f"{r['per_stream'] / 1024:.2f} KiB per stream", flush=True)
    # The median round by memory per stream, per proxy.
    rows = [sorted(rs, key=lambda r: r["per_stream"])[len(rs) // 2] for rs in runs.values()]
    ref = next((r for r in rows if r["proxy"] == "haproxy"), None)
    print("\n| proxy | streams open | RSS warm / open / after (MiB) | KiB per stream | x HAProxy |")
    print("|---|---|---|---|---|")
    for r in rows:
        ratio = f"{r['per_stream'] / ref['per_stream']:.2f}" if ref and ref["per_stream"] > 0 else "n/a"
        print(f"| {r['proxy']} | {r['streams']} | {r['rss_warm'] / 2**20:.1f} / {r['rss_open'] / 2**20:.1f} / "
              f"{r['rss_after'] / 2**20:.1f} | {r['per_stream'] / 1024:.2f} | {ratio} |")


if __name__ == "__main__":
    main()
