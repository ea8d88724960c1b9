#!/usr/bin/env python3
"""Profile stepflow-lb under the rps load (HTTP/1.1 keep-alive POST, 64 connections) or, with
--load h2, the h2.py load (h2c prior knowledge, h2load 16 connections x 10 streams, same POST).

    python3 bench/profile.py [--tool callgrind|perf|syscalls] [--load http1|h2] [--config off|log|trace]
                             [--duration 10] [--top 40]

  callgrind  valgrind --tool=callgrind on a release build with -g (build-prof/): user-space
             instructions, inclusive and exclusive, per function (the load is much slower
             under valgrind, but instruction counts per request are what matter). Counters are
             zeroed just before the measured load, so start-up and warm-up are left out and the
             report's first line gives instructions per request.
  perf       perf record -e cpu-clock --call-graph dwarf: time samples, kernel included
             (hardware counters are not available on these VMs). --proxy haproxy (or nginx)
             profiles that proxy under the same load instead.
  syscalls   perf stat on the syscalls:sys_enter_* tracepoints (and page faults, context switches,
             migrations, task-clock): system calls and those counts per request for
             stepflow-lb, HAProxy and nginx side by side (most of a proxy's CPU is kernel time).
  massif     valgrind --tool=massif with --streams (default 2,000) open SSE streams held through
             stepflow-lb (bench/sse_server.py backends): heap bytes per stream by allocation site.

STEPFLOW_LB names a binary to profile instead of build-prof/stepflow-lb. Reports and raw data go
to .bench-out/profile-<tool>-<time>.txt (callgrind.out.*, perf.data.*).
"""
import argparse
import os
import re
import shutil
import subprocess
import time

import benchlib as B
import h2
import rps

SYSCALLS = ["read", "readv", "recvfrom", "recvmsg", "write", "writev", "sendto", "sendmsg",
            "epoll_wait", "epoll_pwait", "epoll_ctl", "accept4", "connect", "close", "shutdown",
            "setsockopt", "getsockopt", "futex", "gettimeofday", "clock_gettime", "splice", "ioctl", "poll", "ppoll"]


def build_prof():
    path = os.environ.get("STEPFLOW_LB")
    if path:
        return path
    build = os.path.join(B.REPO, "build-prof")
    if not os.path.exists(os.path.join(build, "build.ninja")):
        subprocess.run(["meson", "setup", build, "-Dbuildtype=release", "-Ddebug=true", "-Dtests=false"],
                       cwd=B.REPO, check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["ninja", "-C", build, "stepflow-lb"], check=True, stdout=subprocess.DEVNULL)
    return os.path.join(build, "stepflow-lb")


def run_load(args, port, seconds, pid=None):
    """The measured load; returns at least {"requests": n}."""
    if args.load == "h2":
        return h2.h2load(port, 16, 10, seconds=seconds, pid=pid, rate=args.rate)
    if args.rate:  # wrk cannot hold a rate: h2load --h1, one request at a time per connection
        return h2.h2load(port, 64, 1, seconds=seconds, pid=pid, rate=args.rate, h1=True)
    return rps.run_wrk(port, seconds, 64, pid=pid)


def load_name(args):
    return (f"{args.rate:,} req/s, " if args.rate else "") + ("h2c POST, h2load 16 connections x 10 streams" if args.load == "h2"
            else "HTTP/1.1 keep-alive POST, 64 connections")


# --config: the balancer's configurations of rps.py's stepflow-lb, stepflow-lb+log, stepflow-lb+trace.
CONFIGS = {
    "off": lambda: ["--access-log", "off", "--log-level", "warn"],
    "log": lambda: ["--access-log", "on", "--log-level", "info"],
    "trace": lambda: ["--access-log", "on", "--log-level", "info", "--trace-enabled", "true",
                      "--otlp-endpoint", f"http://127.0.0.1:{B.otlp_collector_port()}"],
}
CONFIG = "off"


def start_lb(prefix, backends):
    port, admin = B.free_port(), B.free_port()
    argv = prefix + [build_prof(), "--listen", f"127.0.0.1:{port}", "--admin-listen", f"127.0.0.1:{admin}",
                     "--backends", ",".join(f"127.0.0.1:{b}" for b in backends), "--threads", "1",
                     *CONFIGS[CONFIG](), "--drain-timeout", "1s"]
    proc = B.start(argv, cpu=B.PROXY_CPU, name="profiled")
    B.wait_port(admin, timeout=60, proc=proc)
    B.wait_http_ok(admin, "/ready", timeout=60)
    B.wait_http_ok(port, "/", timeout=30, method_body=B.RPC_BODY)
    return port, proc


def callgrind(args, backends, stamp):
    data = os.path.join(B.OUT, f"callgrind.out.{stamp}")
    port, proc = start_lb(["valgrind", "--tool=callgrind", f"--callgrind-out-file={data}"], backends)
    run_load(args, port, 2)  # warm-up (pool connections, lazily created events): not counted
    subprocess.run(["callgrind_control", "--zero", str(proc.pid)], check=True, stdout=subprocess.DEVNULL)
    res = run_load(args, port, args.duration, pid=proc.pid)
    B.log(f"under callgrind: {res}")
    B.stop(proc)
    # Calls still on the stack when the counters were zeroed are written as "calls=0", which
    # callgrind_annotate then counts as the caller's own cost: make them one call.
    with open(data) as f:
        raw = f.read()
    with open(data, "w") as f:
        f.write(re.sub(r"^calls=0 ", "calls=1 ", raw, flags=re.M))
    annotated = {}
    for inclusive in ("yes", "no"):
        annotated[inclusive] = subprocess.run(["callgrind_annotate", f"--inclusive={inclusive}", "--threshold=99", data],
                                              capture_output=True, text=True, check=True).stdout
    m = re.search(r"^\s*([\d,]+)\s+(?:\(100.0%\)\s+)?PROGRAM TOTALS", annotated["no"], re.M)
    total = int(m.group(1).replace(",", "")) if m else 0
    text = (f"{load_name(args)}: {total / max(1, res['requests']):,.0f} instructions per request "
            f"({total:,} instructions, {res['requests']} requests (+ a few health probes), {args.duration} s under valgrind)\n")
    for inclusive in ("yes", "no"):
        text += f"===== callgrind_annotate --inclusive={inclusive}\n" + annotated[inclusive]
    return text, data


def perf(args, backends, stamp):
    data = os.path.join(B.OUT, f"perf.data.{stamp}")
    if args.proxy == "stepflow-lb":
        port, proc = start_lb([], backends)
    else:  # the same load through another proxy, for a side-by-side kernel profile
        port = B.free_port()
        proc = B.start_proxy(args.proxy, port, backends, h2=args.load == "h2")
        B.wait_port(port, proc=proc)
    run_load(args, port, 2)  # warm-up, not recorded
    rec = B.start(["perf", "record", "-e", "cpu-clock", "-F", "999", "--call-graph", "dwarf,16384",
                   "-o", data, "-p", str(proc.pid)], name="perf")
    time.sleep(0.5)
    res = run_load(args, port, args.duration, pid=proc.pid)
    rec.send_signal(2)
    rec.wait(timeout=120)
    B.log(f"under perf: {res}")
    text = ""
    for children in ("--children", "--no-children"):
        text += f"===== perf report {children}\n"
        text += subprocess.run(["perf", "report", "-i", data, children, "--stdio", "-g", "none",
                                "--percent-limit", "0.5", "--sort", "dso,symbol"],
                               capture_output=True, text=True).stdout
    return text, data


# Software counters beside the system calls: what a request costs the kernel apart from its calls.
SOFTWARE = ["page-faults", "context-switches", "cpu-migrations", "task-clock"]


def syscalls(args, backends, stamp):
    events = ",".join(f"syscalls:sys_enter_{s}" for s in SYSCALLS) + "," + ",".join(SOFTWARE)
    rows, per, soft = [], {}, {}
    kinds = [{"off": "stepflow-lb", "log": "stepflow-lb+log", "trace": "stepflow-lb+trace"}[CONFIG]
             if k == "stepflow-lb" else k for k in B.PROXIES]
    for kind in kinds:
        port = B.free_port()
        proc = B.start_proxy(kind, port, backends, h2=args.load == "h2")
        if args.load == "h2":
            B.wait_port(port, proc=proc)  # some only speak h2c on this port
        else:
            B.wait_http_ok(port, "/", method_body=B.RPC_BODY)
        run_load(args, port, 2)
        pids = ",".join(str(p) for p in B.family(proc.pid))
        out = os.path.join(B.tmpdir(), "perf-stat.txt")
        stat = B.start(["perf", "stat", "-x", ",", "-o", out, "-e", events, "-p", pids], name="perf-stat")
        time.sleep(0.3)
        res = run_load(args, port, args.duration, pid=proc.pid)
        stat.send_signal(2)
        stat.wait(timeout=30)
        B.stop(proc)
        counts = {}
        for line in open(out):
            m = re.match(r"(\d+),,syscalls:sys_enter_(\w+)", line)
            if m and int(m.group(1)):
                counts[m.group(2)] = int(m.group(1)) / res["requests"]
            m = re.match(r"([\d.]+),[^,]*,(%s)," % "|".join(SOFTWARE), line)
            if m:
                soft.setdefault(kind, {})[m.group(2)] = float(m.group(1)) / res["requests"]
        per[kind] = counts
        B.log(f"{kind}: {res['requests']} requests, {counts}")
    names = sorted({n for c in per.values() for n in c}, key=lambda n: -max(c.get(n, 0) for c in per.values()))
    for n in names:
        rows.append([n] + [f"{per[k].get(n, 0):.2f}" for k in kinds])
    rows.append(["total"] + [f"{sum(per[k].values()):.2f}" for k in kinds])
    for n in SOFTWARE:  # task-clock in ms: shown as microseconds
        scale = 1000 if n == "task-clock" else 1
        rows.append([n + (" (us)" if scale > 1 else "")] +
                    [f"{soft.get(k, {}).get(n, 0) * scale:.3f}" for k in kinds])
    return f"### System calls per request ({load_name(args)})\n\n" + \
        B.table(["syscall"] + kinds, rows), None


def massif(args, backends, stamp):
    import asyncio
    import sys
    import sse
    data = os.path.join(B.OUT, f"massif.out.{stamp}")
    sse_ports = [B.free_port(), B.free_port()]
    server = B.start([sys.executable, os.path.join(B.BENCH, "sse_server.py")] + [str(p) for p in sse_ports],
                     cpu=B.LOAD_CPU, name="sse-server")
    for p in sse_ports:
        B.wait_port(p, proc=server)
    port, proc = start_lb(["valgrind", "--tool=massif", "--detailed-freq=1", "--max-snapshots=200",
                           f"--massif-out-file={data}"], sse_ports)

    async def hold():
        streams, tasks = await sse.open_streams(port, "n=0", args.streams, parallel=50)
        await asyncio.sleep(2)
        proc.terminate()  # massif writes its snapshots at exit; the streams are still open
        proc.wait(timeout=120)
        await sse.close_streams(streams, tasks)

    asyncio.run(hold())
    full = subprocess.run(["ms_print", "--threshold=1.0", data], capture_output=True, text=True).stdout
    return massif_summary(full, args.streams) + "\n\n" + full, data


def massif_summary(text, streams):
    """Heap bytes per open stream at the peak, by top-level allocation site and its first caller
    in our code."""
    peak = re.search(r"Detailed snapshots: \[.*?(\d+) \(peak\)", text, re.S).group(1)
    block = text[re.search(rf"^\s*{peak}\s+[\d,]+\s+[\d,]+", text, re.M).start():].splitlines()
    total, useful, extra = (int(x.replace(",", "")) for x in block[0].split()[2:5])
    rows, site, child_done = [], None, True
    for line in block[1:]:
        if re.match(r"^\s*\d+\s+[\d,]+\s+[\d,]+", line):
            break  # next snapshot
        top = re.match(r"^->[\d.]+% \(([\d,]+)B\) (?:0x\w+: )?(.*?)(?: \(in /.*)?$", line)
        if top:
            site = [int(top.group(1).replace(",", "")), top.group(2)[:50], []]
            rows.append(site)
            child_done = False
        elif site is not None:
            if line.startswith("| ->"):
                child_done = False  # a new second-level subtree: look for its first frame of ours
            frame = re.search(r"(stepflow::[\w:~<>]+)\(.*\) \((\w+\.\w+:\d+)\)", line)
            if frame and not child_done:
                name = f"{frame.group(1).removeprefix('stepflow::')} ({frame.group(2)})"
                if name not in site[2]:
                    site[2].append(name)
                child_done = True
    out = [f"### Heap per open SSE stream at the peak ({streams} streams): "
           f"{total / streams:.0f} B ({useful / streams:.0f} B asked for + {extra / streams:.0f} B malloc overhead)",
           "", "| B/stream | allocated in | first frames in stepflow-lb |", "|---|---|---|"]
    out += [f"| {b / streams:.0f} | {fn} | {', '.join(callers)} |" for b, fn, callers in rows if b / streams >= 8]
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tool", choices=("callgrind", "perf", "syscalls", "massif"), default="callgrind")
    ap.add_argument("--load", choices=("http1", "h2"), default="http1",
                    help="callgrind, perf, syscalls: wrk HTTP/1.1 (rps.py) or h2load h2c (h2.py)")
    ap.add_argument("--config", choices=tuple(CONFIGS), default="off",
                    help="callgrind, perf, syscalls: access log off (default), on, or on with 100%% sampled tracing "
                         "to tests/otlp/receiver.mjs (npm ci there first)")
    ap.add_argument("--proxy", default="stepflow-lb",
                    help="perf: profile this proxy kind of rps.py (haproxy, nginx) instead of stepflow-lb")
    ap.add_argument("--streams", type=int, default=2000, help="open SSE streams for --tool massif")
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--rate", type=int, default=0,
                    help="callgrind, perf, syscalls: offer this many requests per second (h2load) instead of "
                         "full speed; http1 then runs h2load --h1 with 64 connections, one request each at a time")
    ap.add_argument("--top", type=int, default=40)
    args = ap.parse_args()
    global CONFIG
    CONFIG = args.config
    os.makedirs(B.OUT, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    backends = [B.free_port(), B.free_port()]
    B.start_nginx_backends(backends)
    text, data = {"callgrind": callgrind, "perf": perf, "syscalls": syscalls, "massif": massif}[args.tool](args, backends, stamp)
    report = os.path.join(B.OUT, f"profile-{args.tool}-{stamp}.txt")
    with open(report, "w") as f:
        f.write(text)
    print("\n".join(line[:200] for line in text.splitlines()[:args.top + 30]))
    B.log(f"report: {os.path.relpath(report, B.REPO)}" + (f", raw data: {os.path.relpath(data, B.REPO)}" if data else ""))


if __name__ == "__main__":
    main()
