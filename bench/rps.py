#!/usr/bin/env python3
"""HTTP/1.1 keep-alive POST of a small JSON-RPC body through stepflow-lb, HAProxy and nginx.

    python3 bench/rps.py [--rounds 5] [--duration 8] [--connections 64]

The balancer runs on one core, wrk and the nginx backends on the other. Rounds interleave the
proxies (A, B, C, A, B, C, ...). Per run: req/s, p50, p99 (wrk --latency) and the balancer's CPU
time per request (utime+stime from /proc/PID/stat over the run). Ratios are to HAProxy in the
same round. A final "direct" row (wrk straight to the backend) shows the load side's ceiling.
Before each run the script waits (10 s at most) for other processes to go quiet; a run during
which they used more than 0.3 cores is repeated once and the less disturbed one is kept.
"""
import argparse
import os
import re
import subprocess

import benchlib as B

UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def to_ms(text):
    m = re.match(r"([\d.]+)(us|ms|s)$", text)
    return float(m.group(1)) * UNITS[m.group(2)]


def wrk_script(headers=None, name="post"):
    """A wrk script POSTing RPC_BODY, with `headers` (a dict) added."""
    path = os.path.join(B.tmpdir(), name + ".lua")
    with open(path, "w") as f:
        f.write('wrk.method = "POST"\n'
                f"wrk.body = '{B.RPC_BODY.decode()}'\n"
                'wrk.headers["Content-Type"] = "application/json"\n'
                'wrk.headers["Accept"] = "application/json, text/event-stream"\n')
        for key, value in (headers or {}).items():
            f.write(f'wrk.headers["{key}"] = "{value}"\n')
    return path


def run_wrk(port, seconds, connections, pid=None, script=None):
    argv = ["taskset", "-c", B.LOAD_CPU, "wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency",
            "-s", script or wrk_script(), f"http://127.0.0.1:{port}/"]
    if pid:
        B.wait_quiet()
    with B.Foreign() as foreign:
        u0, s0 = B.cpu_split(pid) if pid else (0.0, 0.0)
        out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30).stdout
        u1, s1 = B.cpu_split(pid) if pid else (0.0, 0.0)
    res = {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
           "requests": int(re.search(r"(\d+) requests in", out).group(1)),
           "foreign_cores": round(foreign.cores, 2)}
    for pct, key in (("50", "p50_ms"), ("99", "p99_ms")):
        res[key] = to_ms(re.search(rf"^\s+{pct}%\s+(\S+)", out, re.M).group(1))
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock = re.search(r"Socket errors: (.*)", out)
    res["errors"] = (int(bad.group(1)) if bad else 0)
    if sock:
        res["errors"] += sum(int(x) for x in re.findall(r"\d+", sock.group(1)))
    if pid:
        B.add_cpu_per_request(res, (u0, s0), (u1, s1))
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--duration", type=int, default=8, help="seconds per run")
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--retries", type=int, default=1, help="repeats of a run disturbed by other processes")
    ap.add_argument("--proxies", default=",".join(B.PROXIES))
    ap.add_argument("--no-direct", action="store_true", help="skip the direct-to-backend row")
    args = ap.parse_args()
    kinds = args.proxies.split(",")

    backends = [B.free_port(), B.free_port()]
    B.start_nginx_backends(backends)
    procs = {}
    for kind in kinds:
        port = B.free_port()
        procs[kind] = (port, B.start_proxy(kind, port, backends))
        B.wait_http_ok(port, "/", method_body=B.RPC_BODY)
        run_wrk(port, 2, args.connections)  # warm-up: connections, pools, caches
        B.log(f"{kind} ready on :{port}")

    rounds = []
    for r in range(args.rounds):
        rnd = {}
        for kind in kinds:
            port, proc = procs[kind]
            rnd[kind] = B.quietest(lambda: run_wrk(port, args.duration, args.connections, pid=proc.pid),
                                   args.retries)
            B.log(f"round {r + 1} {kind}: {rnd[kind]}")
        if not args.no_direct:
            rnd["direct"] = run_wrk(backends[0], args.duration, args.connections)
            B.log(f"round {r + 1} direct: {rnd['direct']}")
        rounds.append(rnd)

    rows = [B.throughput_row(rounds, kind, (kind.startswith("stepflow-lb") or kind == "nginx") and "haproxy" in kinds,
                             sum(rnd[kind]["errors"] for rnd in rounds), with_cpu=kind != "direct")
            for kind in kinds + ([] if args.no_direct else ["direct"])]
    text = (f"### HTTP/1.1 keep-alive POST, {args.connections} connections, {args.rounds} rounds x "
            f"{args.duration} s (median (min..max); ratios per round)\n\n" + B.table(B.THROUGHPUT_HEAD, rows)
            + B.noise_note(rounds))
    print(text)
    B.save("rps", {"args": vars(args), "versions": B.versions(), "rounds": rounds}, text)


if __name__ == "__main__":
    main()
