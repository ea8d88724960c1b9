#!/usr/bin/env python3
"""h2c (HTTP/2 over cleartext, prior knowledge) POST through stepflow-lb, HAProxy and nginx.

    python3 bench/h2.py [--rounds 5] [--duration 8] [--clients 16] [--streams 10] [--rate N] [--h1]

h2load opens 16 connections with 10 concurrent streams each and POSTs the small JSON-RPC body;
the proxies speak HTTP/1.1 to the nginx backends. Same figures and method as rps.py: req/s, p50
and p99 (from h2load's per-request log) and the balancer's CPU time per request. A proxy that
does not accept h2c is reported as "not supported yet" instead of failing the run. Disturbed
runs are handled as in rps.py.

--rate N offers N requests per second in all (h2load --rps, spread over the clients) instead of
as many as the proxy answers. At full speed a slower configuration also changes the machine's
rhythm (fewer requests per wake-up and per system call, a receiver on the load core taking time
from the load generator), so its CPU per request mixes its own cost with that; at one rate below
every proxy's capacity, CPU per request compares the work alone. --h1 sends the same load as
HTTP/1.1 keep-alive requests (h2load --h1; --streams 1 for one request at a time per connection,
as wrk does in rps.py, which cannot hold a rate).
"""
import argparse
import os
import re
import subprocess

import benchlib as B


def body_file():
    path = os.path.join(B.tmpdir(), "body.json")
    with open(path, "wb") as f:
        f.write(B.RPC_BODY)
    return path


def h2load(port, clients, streams, seconds=None, requests=None, pid=None, logfile=None, rate=None, h1=False):
    argv = ["taskset", "-c", B.LOAD_CPU, "h2load", "-t1", f"-c{clients}", f"-m{streams}",
            "-d", body_file(), "-H", "content-type: application/json"] + (["--h1"] if h1 else [])
    if rate:
        argv.append(f"--rps={max(1, rate // clients)}")
    argv += [f"-D{seconds}"] if seconds else [f"-n{requests}"]
    if logfile:
        argv += [f"--log-file={logfile}"]
    argv.append(f"http://127.0.0.1:{port}/")
    if pid:
        B.wait_quiet()
    with B.Foreign() as foreign:
        u0, s0 = B.cpu_split(pid) if pid else (0.0, 0.0)
        r = subprocess.run(argv, capture_output=True, text=True, timeout=(seconds or 10) + 30)
        u1, s1 = B.cpu_split(pid) if pid else (0.0, 0.0)
    out = r.stdout + r.stderr
    m = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
                  r"(\d+) errored, (\d+) timeout", out)
    if not m:
        return {"ok": 0, "errors": -1, "output": out[-500:]}
    ok = int(m.group(4))
    res = {"ok": ok, "errors": int(m.group(5)) + int(m.group(6)) + int(m.group(7)),
           "requests": int(m.group(3)), "foreign_cores": round(foreign.cores, 2)}
    st = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
    res["non2xx"] = sum(int(x) for x in st.groups()[1:]) if st else 0
    if seconds:
        rps = re.search(r"finished in [\d.]+\w*, ([\d.]+) req/s", out)
        res["rps"] = float(rps.group(1)) if rps else ok / seconds
    if logfile:
        durations = []
        with open(logfile) as f:
            for line in f:
                parts = line.split("\t")
                if len(parts) >= 3 and parts[1].startswith("2"):
                    durations.append(int(parts[2]))
        os.unlink(logfile)
        durations.sort()
        if durations:
            res["p50_ms"] = durations[len(durations) // 2] / 1e3
            res["p99_ms"] = durations[min(len(durations) - 1, int(len(durations) * 0.99))] / 1e3
    if pid:
        B.add_cpu_per_request(res, (u0, s0), (u1, s1))
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--duration", type=int, default=8, help="seconds per run")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--streams", type=int, default=10)
    ap.add_argument("--rate", type=int, default=0, help="requests per second offered in all (0: as fast as answered)")
    ap.add_argument("--h1", action="store_true", help="HTTP/1.1 keep-alive instead of h2c")
    ap.add_argument("--retries", type=int, default=1, help="repeats of a run disturbed by other processes")
    ap.add_argument("--proxies", default=",".join(B.PROXIES))
    args = ap.parse_args()

    backends = [B.free_port(), B.free_port()]
    B.start_nginx_backends(backends)
    procs, unsupported = {}, {}
    for kind in args.proxies.split(","):
        port = B.free_port()
        proc = B.start_proxy(kind, port, backends, h2=not args.h1)
        probe = h2load(port, 1, 1, requests=20, h1=args.h1)
        if probe["ok"] < 20:
            unsupported[kind] = probe
            B.log(f"{kind}: h2c not accepted ({probe}); reported as not supported yet")
            B.stop(proc)
            continue
        h2load(port, args.clients, args.streams, seconds=2, h1=args.h1)  # warm-up
        procs[kind] = (port, proc)
        B.log(f"{kind} ready on :{port}")

    rounds = []
    logfile = os.path.join(B.tmpdir(), "h2load.log")
    for r in range(args.rounds):
        rnd = {}
        for kind, (port, proc) in procs.items():
            rnd[kind] = B.quietest(lambda: h2load(port, args.clients, args.streams, seconds=args.duration,
                                                  pid=proc.pid, logfile=logfile, rate=args.rate, h1=args.h1),
                                   args.retries)
            B.log(f"round {r + 1} {kind}: {rnd[kind]}")
        rounds.append(rnd)

    rows = []
    for kind in args.proxies.split(","):
        if kind in unsupported:
            rows.append([kind, "not supported yet", "", "", "", "", "", "", "", ""])
            continue
        rows.append(B.throughput_row(rounds, kind, kind != "haproxy" and "haproxy" in procs,
                                     sum(rnd[kind]["errors"] + rnd[kind]["non2xx"] for rnd in rounds)))
    offered = f", {args.rate} req/s offered" if args.rate else ""
    text = (f"### {'HTTP/1.1 keep-alive' if args.h1 else 'h2c'} POST, {args.clients} connections x {args.streams} streams{offered}, {args.rounds} rounds x "
            f"{args.duration} s (median (min..max); ratios per round)\n\n" + B.table(B.THROUGHPUT_HEAD, rows)
            + B.noise_note(rounds))
    print(text)
    B.save("h1-rate" if args.h1 else "h2", {"args": vars(args), "versions": B.versions(), "rounds": rounds,
                  "unsupported": list(unsupported)}, text)


if __name__ == "__main__":
    main()
