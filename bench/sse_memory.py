#!/usr/bin/env python3
"""Memory per open SSE stream, HTTP/1.1 and h2c, of stepflow-lb beside HAProxy and nginx in the
same run (issue 26).

    python3 bench/sse_memory.py [--rounds 3] [--streams 2000,9000] [--protocols h1,h2c]
                                [--proxies stepflow-lb,haproxy,nginx] [--lb before=PATH ...]

Each proxy runs on one thread (one core: BENCH_PROXY_CPU), with the access log off, and is
started fresh for every (round, protocol, proxy). The backends are bench/sse_server.py (two
ports, one process): a stream gets one event and then stays open until the client goes away.

  baseline  RSS (all the proxy's processes) once 50 streams were opened and closed again and
            RSS stopped moving (plateau: unchanged for 1 s);
  open      streams are opened up to each count of --streams, in order (2,000, then 7,000 more
            for 9,000); once all are open RSS is read at its plateau again;
  figure    (plateau - baseline) / open streams, in KiB. The table shows the median of the
            rounds (min..max) and its ratio to HAProxy's in the same round.

HTTP/1.1 streams are POSTs from this script (asyncio, one connection each, 200 being opened at a
time); h2c streams come from h2load (100 streams per connection, two connections at a time, so
9,000 streams are 90 client connections). Opening them in steps, as clients arrive, rather than in
one burst matters: a burst leaves the heap as large as its peak, when every stream still holds
its request state, and that is another figure. A stream
counts as open once the proxy holds its worker connection (h2c) or its first event arrived
(HTTP/1.1). `--lb LABEL=PATH` adds another stepflow-lb binary (for example the build before a
change) as a column of its own in the same run.
"""
import argparse
import asyncio
import os
import resource
import statistics
import subprocess
import sys
import time

import benchlib as B
import sse  # the HTTP/1.1 SSE client (Stream, open_streams, close_streams)

sys.path.insert(0, os.path.join(B.REPO, "tests", "integration"))
import harness  # noqa: E402

BODY = sse.RPC.encode()


def plateau_rss(pid, still=1.0, limit=15.0):
    """RSS once it has not changed for `still` seconds (at most `limit` seconds of waiting)."""
    last, since = B.rss_bytes(pid), time.monotonic()
    deadline = since + limit
    while time.monotonic() < deadline:
        time.sleep(0.2)
        now = B.rss_bytes(pid)
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= still:
            break
    return last


def worker_connections(backends):
    return sum(harness.connections_to(p) for p in backends)


def wait_open(backends, count, proc=None, limit=180.0):
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        n = worker_connections(backends)
        if n >= count or (proc is not None and proc.poll() is not None):
            return n
        time.sleep(0.25)
    return worker_connections(backends)


H2_STEP = 200


def h2load(port, streams, query, body_file, per_connection=100):
    conns = max(1, (streams + per_connection - 1) // per_connection)
    argv = ["h2load", "-c", str(conns), "-m", str(per_connection), "-n", str(streams), "-d", body_file,
            "-H", "content-type: application/json", "-H", "accept: text/event-stream",
            f"http://127.0.0.1:{port}/?{query}"]
    return B.start(argv, cpu=B.LOAD_CPU, name="h2load")


def measure_h1(pid, port, backends, counts):
    async def run():
        s, t = await sse.open_streams(port, "n=0", 50)
        await sse.close_streams(s, t)
        await asyncio.sleep(0.5)
        base = plateau_rss(pid)
        streams, tasks, res = [], [], {}
        try:
            for count in counts:
                more_s, more_t = await sse.open_streams(port, "n=0", count - len(streams))
                streams += more_s
                tasks += more_t
                opened = worker_connections(backends)
                rss = await asyncio.get_running_loop().run_in_executor(None, plateau_rss, pid)
                res[count] = {"open": opened, "per_stream": (rss - base) / count, "rss": rss}
        finally:
            await sse.close_streams(streams, tasks)
        return base, res

    return asyncio.run(run())


def measure_h2c(pid, port, backends, counts, body_file):
    warm = h2load(port, 50, "n=1", body_file)
    warm.wait(timeout=60)
    time.sleep(0.5)
    base = plateau_rss(pid)
    loads, res, have = [], {}, 0
    try:
        for count in counts:
            while have < count:  # 200 streams (two connections) at a time, as for HTTP/1.1
                step = min(H2_STEP, count - have)
                loads.append(h2load(port, step, "n=0", body_file))
                have += step
                opened = wait_open(backends, have, loads[-1], limit=60)
            time.sleep(0.5)  # the last streams' first events
            rss = plateau_rss(pid)
            res[count] = {"open": opened, "per_stream": (rss - base) / max(opened, 1), "rss": rss}
    finally:
        for p in loads:
            B.stop(p)
    return base, res


def start(kind, lbs, port, backends, h2):
    if kind in lbs:
        os.environ["STEPFLOW_LB"] = lbs[kind]
        return B.start_stepflow_lb(port, backends)
    return B.start_proxy(kind, port, backends, h2=h2, sse=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--streams", default="2000,9000")
    ap.add_argument("--protocols", default="h1,h2c")
    ap.add_argument("--proxies", default=",".join(B.PROXIES))
    ap.add_argument("--lb", action="append", default=[], metavar="LABEL=PATH",
                    help="another stepflow-lb binary, shown as stepflow-lb@LABEL")
    args = ap.parse_args()
    counts = sorted(int(c) for c in args.streams.split(","))
    protocols = args.protocols.split(",")

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max(20000, 2 * max(counts) + 4096)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(want, hard)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    os.sched_setaffinity(0, {int(B.LOAD_CPU)})

    lbs = {"stepflow-lb": B.find_lb()}
    kinds = []
    for kind in args.proxies.split(","):
        kinds.append(kind)
        if kind == "stepflow-lb":
            for spec in args.lb:
                label, _, path = spec.partition("=")
                lbs[f"stepflow-lb@{label}"] = os.path.abspath(path)
                kinds.append(f"stepflow-lb@{label}")

    body_file = os.path.join(B.tmpdir(), "body.json")
    with open(body_file, "wb") as f:
        f.write(BODY)
    backends = [B.free_port(), B.free_port()]
    server = B.start([sys.executable, os.path.join(B.BENCH, "sse_server.py")] + [str(p) for p in backends],
                     cpu=B.LOAD_CPU, name="sse-server")
    for p in backends:
        B.wait_port(p, proc=server)

    results = {}  # (protocol, kind, count) -> [per_stream per round]
    rounds = []
    for r in range(args.rounds):
        rnd = {}
        for proto in protocols:
            for kind in kinds:
                port = B.free_port()
                proc = start(kind, lbs, port, backends, h2=proto == "h2c")
                try:
                    if proto == "h1":
                        base, res = measure_h1(proc.pid, port, backends, counts)
                    else:
                        base, res = measure_h2c(proc.pid, port, backends, counts, body_file)
                finally:
                    B.stop(proc)
                # the backends must have let go of every stream before the next proxy starts
                deadline = time.monotonic() + 60
                while worker_connections(backends) > 0 and time.monotonic() < deadline:
                    time.sleep(0.25)
                rnd[f"{proto}/{kind}"] = {"base": base, **{str(c): v for c, v in res.items()}}
                for c, v in res.items():
                    results.setdefault((proto, kind, c), []).append(v["per_stream"])
                B.log(f"round {r + 1} {proto} {kind}: baseline {base / 2**20:.1f} MiB; " + "; ".join(
                    f"{c} streams ({v['open']} open): {v['per_stream'] / 1024:.2f} KiB each" for c, v in res.items()))
        rounds.append(rnd)

    def ratio(proto, kind, c):
        ours, ref = results.get((proto, kind, c)), results.get((proto, "haproxy", c))
        if not ours or not ref or kind == "haproxy":
            return ""
        return B.med_range([a / b for a, b in zip(ours, ref) if b > 0], "{:.2f}")

    head = ["protocol", "proxy"]
    for c in counts:
        head += [f"KiB/stream @{c}", "x HAProxy"]
    rows = []
    for proto in protocols:
        for kind in kinds:
            row = [proto, kind]
            for c in counts:
                row += [B.med_range([v / 1024 for v in results[(proto, kind, c)]], "{:.2f}"), ratio(proto, kind, c)]
            rows.append(row)
    text = (f"### Memory per open SSE stream: RSS plateau minus baseline, one proxy thread "
            f"({args.rounds} rounds, median (min..max))\n\n" + B.table(head, rows))
    print(text)
    B.save("sse_memory", {"args": vars(args), "versions": B.versions(), "lbs": lbs, "rounds": rounds,
                          "medians_kib": {f"{p}/{k}/{c}": statistics.median(v) / 1024
                                          for (p, k, c), v in results.items()}}, text)


if __name__ == "__main__":
    main()
