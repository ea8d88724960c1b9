#!/usr/bin/env python3
"""Admission under overload: offered load at 2x the fleet's capacity, stepflow-lb next to HAProxy.

Three example workers (tests/worker/example_worker.py) with --max-concurrency 2 each run
components/execute of /sleep with a fixed service time, so the fleet holds 6 executions at once.
An open-loop client offers twice what the fleet can serve for a fixed time, then waits for every
answer. Reported per proxy: goodput (200s per second of the run), share of requests failed
(anything but 200, -32300 included), p50/p99 of the time spent queued in the proxy.

HAProxy is configured the way its users do admission: `maxconn 2` per server, `timeout queue`,
`retry-on 503 conn-failure response-timeout` with `retries 2` and `option redispatch`; its
queue time is the %Tw field of its log. stepflow-lb learns the limit from the workers' /health
and logs queue_wait_ms per request.

  bench/admission.py [--seconds 10] [--service-ms 100] [--rounds 2]
"""
import argparse
import concurrent.futures
import http.client
import json
import os
import statistics
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib as B  # noqa: E402

WORKER = os.path.join(B.REPO, "tests", "worker", "example_worker.py")


def start_workers(n, limit):
    ports = []
    for i in range(n):
        port = B.free_port()
        B.start([sys.executable, WORKER, "--port", str(port), "--name", f"adm{i}", "--max-concurrency", str(limit)],
                cpu=B.LOAD_CPU, name=f"worker{i}")
        ports.append(port)
    for p in ports:
        B.wait_port(p)
    return ports


def start_lb(port, backends, log_path):
    admin = B.free_port()
    argv = [B.find_lb(), "--listen", f"127.0.0.1:{port}", "--admin-listen", f"127.0.0.1:{admin}",
            "--backends", ",".join(f"127.0.0.1:{b}" for b in backends), "--threads", "1",
            "--log-level", "info", "--log-format", "json", "--health-interval", "1s"]
    logf = open(log_path, "wb")
    p = subprocess.Popen(["taskset", "-c", B.PROXY_CPU] + argv, stdout=subprocess.DEVNULL, stderr=logf)
    B._procs.append(p)
    B.wait_port(admin, proc=p)
    B.wait_http_ok(admin, "/ready")
    # The limit comes from /health: wait until every instance reports it.
    deadline = time.time() + 10
    while time.time() < deadline:
        body = json.loads(B.http_get(admin, "/debug/backends")[1])
        if all(b.get("limit") for b in body["backends"]) and len(body["backends"]) == len(backends):
            break
        time.sleep(0.1)
    return p


def start_haproxy(port, backends, limit, log_path):
    servers = "".join(f"  server w{i} 127.0.0.1:{b} maxconn {limit} check inter 1s\n" for i, b in enumerate(backends))
    conf = os.path.join(B._tmp, "haproxy-admission.cfg")
    with open(conf, "w") as f:
        f.write(f"""global
  nbthread 1
  log stdout format raw local0
defaults
  mode http
  log global
  log-format "%Tw %ST"
  timeout connect 5s
  timeout client 600s
  timeout server 600s
  timeout queue 30s
  retries 2
  option redispatch
  retry-on 503 conn-failure response-timeout
frontend fe
  bind 127.0.0.1:{port}
  default_backend workers
backend workers
  balance leastconn
  option httpchk GET /health
{servers}""")
    logf = open(log_path, "wb")
    p = subprocess.Popen(["taskset", "-c", B.PROXY_CPU, "haproxy", "-db", "-f", conf], stdout=logf,
                         stderr=subprocess.STDOUT)
    B._procs.append(p)
    B.wait_port(port, proc=p)
    time.sleep(1.5)  # first health checks
    return p


def one_call(port, i, service_ms):
    body = json.dumps({"jsonrpc": "2.0", "id": i, "method": "components/execute",
                       "params": {"component": "/sleep", "input": {"ms": service_ms}}}).encode()
    try:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        c.request("POST", "/", body, {"Content-Type": "application/json", "Accept": "application/json"})
        r = c.getresponse()
        data = r.read()
        c.close()
        code = None
        try:
            code = json.loads(data).get("error", {}).get("code")
        except ValueError:
            pass
        return r.status, code
    except OSError as e:
        return 0, str(e)


def offer(port, rate, seconds, service_ms):
    total = int(rate * seconds)
    results = [None] * total
    start = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(total, 1200)) as pool:
        futures = []
        for i in range(total):
            at = start + i / rate
            delay = at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            futures.append(pool.submit(one_call, port, i, service_ms))
        for i, f in enumerate(futures):
            results[i] = f.result()
    elapsed = time.monotonic() - start
    return results, elapsed


def pct(values, q):
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def queue_waits_lb(path):
    waits = []
    with open(path, errors="replace") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if rec.get("message") == "request":
                waits.append(float(rec.get("queue_wait_ms", 0)))
    return waits


def queue_waits_haproxy(path):
    waits = []
    with open(path, errors="replace") as f:
        for line in f:
            parts = line.split()
            if len(parts) == 2 and parts[0].lstrip("-").isdigit():
                waits.append(max(0.0, float(parts[0])))
    return waits


def run(kind, args, backends):
    port = B.free_port()
    log_path = os.path.join(B._tmp, f"{kind}-{time.time_ns()}.log")
    p = start_lb(port, backends, log_path) if kind == "stepflow-lb" else start_haproxy(port, backends, 2, log_path)
    capacity_rps = 3 * 2 * 1000.0 / args.service_ms
    results, elapsed = offer(port, 2 * capacity_rps, args.seconds, args.service_ms)
    B.stop(p)
    ok = sum(1 for s, _ in results if s == 200)
    at_cap = sum(1 for s, c in results if c == -32300)
    waits = queue_waits_lb(log_path) if kind == "stepflow-lb" else queue_waits_haproxy(log_path)
    return {"requests": len(results), "ok": ok, "goodput_rps": ok / elapsed, "failed_share": 1 - ok / len(results),
            "worker_at_capacity_seen": at_cap, "qwait_p50_ms": pct(waits, 0.5), "qwait_p99_ms": pct(waits, 0.99),
            "elapsed_s": elapsed, "statuses": sorted({s for s, _ in results})}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--service-ms", type=float, default=100)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    backends = start_workers(3, 2)
    rounds = []
    for r in range(args.rounds):
        rnd = {}
        for kind in ("stepflow-lb", "haproxy"):
            B.log(f"round {r + 1}: {kind}")
            rnd[kind] = run(kind, args, backends)
            B.log(f"  {rnd[kind]}")
        rounds.append(rnd)
    capacity = 3 * 2 * 1000.0 / args.service_ms
    rows = []
    for kind in ("stepflow-lb", "haproxy"):
        col = lambda key: [rnd[kind][key] for rnd in rounds]
        rows.append([kind, B.med_range(col("goodput_rps"), "{:.1f}"),
                     B.med_range([x * 100 for x in col("failed_share")], "{:.1f}"),
                     B.med_range(col("worker_at_capacity_seen"), "{:.0f}"),
                     B.med_range(col("qwait_p50_ms"), "{:.0f}"), B.med_range(col("qwait_p99_ms"), "{:.0f}")])
    text = (f"Offered {2 * capacity:.0f} req/s for {args.seconds:.0f} s to a fleet of 3 workers x 2 slots x "
            f"{args.service_ms:.0f} ms (capacity {capacity:.0f} req/s); medians (min..max) of {args.rounds} rounds.\n\n"
            + B.table(["proxy", "goodput req/s", "failed %", "-32300 seen", "queue wait p50 ms", "p99 ms"], rows))
    print(text)
    B.save("admission", {"rounds": rounds, "versions": B.versions()}, text)


if __name__ == "__main__":
    main()
