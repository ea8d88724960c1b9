"""Shared plumbing for the bench/ scripts: processes, pinning, configs, CPU/RSS sampling, tables.

Every process a script starts is recorded here and killed (by PID, nothing else) when the script
ends, however it ends. Everything listens on 127.0.0.1; temporary files live in one temp dir that
is removed at exit. Results go to <repo>/.bench-out/.
"""
import atexit
import json
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(REPO, "bench")
OUT = os.path.join(REPO, ".bench-out")
CLK_TCK = os.sysconf("SC_CLK_TCK")

# Two cores: the balancer under test gets one, the load generator and the backends the other.
PROXY_CPU = os.environ.get("BENCH_PROXY_CPU", "0")
LOAD_CPU = os.environ.get("BENCH_LOAD_CPU", "1")

RPC_BODY = b'{"jsonrpc":"2.0","id":1,"method":"components/list","params":{}}'
RPC_RESULT = '{"jsonrpc":"2.0","id":1,"result":{"components":[]}}'

_procs = []
_tmp = tempfile.mkdtemp(prefix="stepflow-bench-")


def tmpdir():
    return _tmp


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def _cleanup():
    for p in reversed(_procs):
        if p.poll() is None:
            try:
                p.terminate()
            except OSError:
                pass
    deadline = time.time() + 3
    for p in reversed(_procs):
        try:
            p.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    shutil.rmtree(_tmp, ignore_errors=True)


atexit.register(_cleanup)
signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
signal.signal(signal.SIGINT, lambda *_: sys.exit(130))


def start(argv, cpu=None, name="proc", env=None):
    """Starts argv (pinned to `cpu` with taskset), logging to the temp dir; returns the Popen."""
    if cpu is not None:
        argv = ["taskset", "-c", str(cpu)] + list(argv)
    logf = open(os.path.join(_tmp, name + ".log"), "ab")
    p = subprocess.Popen(argv, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    p.bench_name = name
    _procs.append(p)
    return p


def stop(p):
    if p.poll() is None:
        p.terminate()
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def proc_log(name):
    try:
        with open(os.path.join(_tmp, name + ".log"), errors="replace") as f:
            return f.read()[-2000:]
    except OSError:
        return ""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, timeout=10.0, proc=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.bench_name} exited: {proc_log(proc.bench_name)}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"port {port} did not open")


def http_get(port, path, timeout=2.0):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, b""
    except OSError:
        return 0, b""


def wait_http_ok(port, path, timeout=15.0, method_body=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=method_body,
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=1) as r:
                if 200 <= r.status < 300:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"127.0.0.1:{port}{path} never answered 2xx")


# ---------------------------------------------------------------- process accounting

def family(pid):
    """pid and its direct children (nginx master + workers)."""
    pids = [pid]
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            pids += [int(x) for x in f.read().split()]
    except OSError:
        pass
    return pids


def cpu_split(pid):
    """(utime, stime) in seconds of pid and its children processes, from /proc/PID/stat."""
    user = system = 0
    for p in family(pid):
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            user += int(fields[11])  # utime: field 14 of stat
            system += int(fields[12])  # stime: field 15
        except OSError:
            pass
    return user / CLK_TCK, system / CLK_TCK


def add_cpu_per_request(res, before, after):
    """Adds user/system CPU seconds and CPU µs per request (res["requests"]) to a run's result."""
    (u0, s0), (u1, s1) = before, after
    res["cpu_user_s"], res["cpu_sys_s"] = round(u1 - u0, 2), round(s1 - s0, 2)
    res["cpu_us_per_req"] = (u1 - u0 + s1 - s0) * 1e6 / max(1, res["requests"])


def cpu_seconds(pid):
    return sum(cpu_split(pid))


def _machine_busy():
    """user+nice+system seconds over all CPUs (irq/softirq time belongs to no process: left out)."""
    with open("/proc/stat") as f:
        fields = f.readline().split()
    return (int(fields[1]) + int(fields[2]) + int(fields[3])) / CLK_TCK


def _ours():
    """CPU seconds of everything this script runs: itself, waited children, live started processes."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    live = sum(cpu_seconds(p.pid) for p in _procs if p.poll() is None)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime + live


class Foreign:
    """Measures CPU used by processes that are not ours during a `with` block (in cores), so that
    runs disturbed by other work on the machine can be told apart."""

    def __init__(self, quiet=False):
        self.quiet = quiet

    def __enter__(self):
        self.t, self.busy, self.ours = time.time(), _machine_busy(), _ours()
        return self

    def __exit__(self, *exc):
        dt = max(1e-3, time.time() - self.t)
        self.cores = max(0.0, (_machine_busy() - self.busy) - (_ours() - self.ours)) / dt
        if self.cores > 0.1 and not self.quiet:
            log(f"  note: other processes used {self.cores:.2f} cores during this run")


NOISY = 0.3  # cores used by others during a run above which the run is repeated


def quietest(run, retries):
    """Calls run() up to 1 + retries times while others disturb it; keeps the least disturbed."""
    best = None
    for attempt in range(1 + retries):
        res = run()
        if best is None or res.get("foreign_cores", 0) < best.get("foreign_cores", 0):
            best = res
        if res.get("foreign_cores", 0) <= NOISY:
            break
        if attempt < retries:
            log(f"  disturbed run (others used {res['foreign_cores']:.2f} cores): repeating")
    return best


def wait_quiet(limit=0.15, max_wait=10):
    """Waits (at most max_wait s) until processes not ours use less than `limit` cores."""
    start = time.time()
    while True:
        with Foreign(quiet=True) as f:
            time.sleep(0.5)
        waited = time.time() - start
        if f.cores < limit:
            if waited > 1:
                log(f"  quiet after {waited:.0f} s")
            return
        if waited > max_wait:
            log(f"  machine still busy after {max_wait} s (others use {f.cores:.2f} cores): measuring anyway")
            return


def rss_bytes(pid):
    total = 0
    for p in family(pid):
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


# ---------------------------------------------------------------- the things we run

def find_lb():
    path = os.environ.get("STEPFLOW_LB", os.path.join(REPO, "build-release", "stepflow-lb"))
    if not os.path.exists(path):
        log(f"building {path} ...")
        build = os.path.dirname(path)
        if not os.path.exists(os.path.join(build, "build.ninja")):
            subprocess.run(["meson", "setup", build, "-Dbuildtype=release", "-Dtests=false"],
                           cwd=REPO, check=True, stdout=subprocess.DEVNULL)
        subprocess.run(["ninja", "-C", build], check=True, stdout=subprocess.DEVNULL)
    return path


def versions():
    def first_line(argv):
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=5)
            return (r.stdout + r.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.SubprocessError):
            return "?"
    lb = find_lb()
    rev = os.environ.get("STEPFLOW_LB_REV") or first_line(["git", "-C", REPO, "log", "-1", "--format=%h"])
    return {
        "stepflow-lb": f"{lb} (commit {rev})",
        "stepflow-lb@base": os.environ.get("STEPFLOW_LB_BASE", "-"),
        "haproxy": first_line(["haproxy", "-v"]),
        "nginx": first_line(["nginx", "-v"]),
        "wrk": first_line(["wrk", "-v"]),
        "h2load": first_line(["h2load", "--version"]),
        "kernel": os.uname().release,
        "cpu": next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?"),
        "cores": os.cpu_count(),
    }


NGINX_COMMON = """
daemon off;
worker_processes 1;
worker_rlimit_nofile 100000;
error_log {d}/{name}-error.log warn;
pid {d}/{name}.pid;
events {{ worker_connections 50000; multi_accept on; }}
http {{
  access_log off;
  client_body_temp_path {d}/{name}-body;
  proxy_temp_path {d}/{name}-proxy;
  fastcgi_temp_path {d}/{name}-fcgi;
  uwsgi_temp_path {d}/{name}-uwsgi;
  scgi_temp_path {d}/{name}-scgi;
  keepalive_requests 100000000;
  keepalive_timeout 600s;
{body}
}}
"""


def start_nginx_backends(ports, cpu=LOAD_CPU, session_header=None):
    """One nginx worker answering /health with an instanceId per port and POST / with RPC_RESULT.
    With `session_header`, every answer of backend i also carries `<session_header>: sess-i`."""
    servers = []
    for i, port in enumerate(ports, 1):
        health = json.dumps({"status": "healthy", "instanceId": f"nginx-{i}"})
        session = f"add_header {session_header} sess-{i} always; " if session_header else ""
        servers.append(f"""
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    default_type application/json;
    location = /health {{ return 200 '{health}'; }}
    location / {{ {session}return 200 '{RPC_RESULT}'; }}
  }}""")
    return _start_nginx("backend", "".join(servers), cpu, ports[0])


def _start_nginx(name, body, cpu, port):
    d = _tmp
    conf = os.path.join(d, name + ".conf")
    with open(conf, "w") as f:
        f.write(NGINX_COMMON.format(d=d, name=name, body=body))
    p = start(["nginx", "-c", conf, "-p", d, "-e", os.path.join(d, name + "-error.log")], cpu=cpu, name=name)
    wait_port(port, proc=p)
    return p


def start_nginx_proxy(port, backends, h2=False, sse=False, balance="least_conn"):
    servers = "".join(f"    server 127.0.0.1:{b};\n" for b in backends)
    extra = "proxy_buffering off; proxy_read_timeout 600s;" if sse else ""
    body = f"""
  upstream workers {{
    {balance};
{servers}    keepalive 128;
    keepalive_requests 100000000;
    keepalive_timeout 600s;
  }}
  server {{
    listen 127.0.0.1:{port}{' http2' if h2 else ''} backlog=4096;
    http2_max_concurrent_streams 128;
    location / {{
      proxy_pass http://workers;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      {extra}
    }}
  }}"""
    return _start_nginx("nginx-proxy", body, PROXY_CPU, port)


def start_haproxy(port, backends, h2=False, sse=False, backend_extra=""):
    servers = "".join(f"  server w{i} 127.0.0.1:{b} check inter 5s\n" for i, b in enumerate(backends, 1))
    conf = os.path.join(_tmp, "haproxy.cfg")
    # HAProxy asks for 2 descriptors per connection and refuses to start above the hard limit.
    maxconn = min(50000, (resource.getrlimit(resource.RLIMIT_NOFILE)[1] - 100) // 2)
    with open(conf, "w") as f:
        f.write(f"""global
  nbthread 1
  maxconn {maxconn}
defaults
  mode http
  timeout connect 5s
  timeout client 600s
  timeout server 600s
  timeout http-keep-alive 600s
  http-reuse always
  {'option http-no-delay' if sse else ''}
frontend fe
  bind 127.0.0.1:{port}{' proto h2' if h2 else ''}
  default_backend workers
backend workers
  balance leastconn
  option httpchk GET /health
{backend_extra}{servers}""")
    p = start(["haproxy", "-db", "-f", conf], cpu=PROXY_CPU, name="haproxy")
    wait_port(port, proc=p)
    return p


def start_stepflow_lb(port, backends, extra=(), name="stepflow-lb", binary=None):
    admin = free_port()
    argv = [binary or find_lb(), "--listen", f"127.0.0.1:{port}", "--admin-listen", f"127.0.0.1:{admin}",
            "--backends", ",".join(f"127.0.0.1:{b}" for b in backends), "--threads", "1",
            "--access-log", "off", "--log-level", "warn", *extra]
    p = start(argv, cpu=PROXY_CPU, name=name)
    wait_port(admin, proc=p)
    wait_http_ok(admin, "/ready")
    return p


PROXIES = ("stepflow-lb", "haproxy", "nginx")
# More stepflow-lb configurations for --proxies: the default access log on (to a file, as stderr
# redirected), and that plus tracing every request to an OTLP receiver on the load core.
# Any stepflow-lb kind with the suffix "@base" (e.g. stepflow-lb+log@base) runs the binary named
# by STEPFLOW_LB_BASE instead, so a change and its baseline are measured in the same run
# ("stepflow-lb-base" is stepflow-lb@base).
LB_VARIANTS = ("stepflow-lb+log", "stepflow-lb+trace")

_collector = None


# The collector runs on the load generator's core. By default it acknowledges each export
# without decoding it ("sink"): decoding ~200 KB batches in JavaScript took that core from the
# load generator, so the balancer saw smaller batches per wake-up and its CPU per request rose
# for a reason that is not its own. BENCH_COLLECTOR=count-only decodes and counts every span.
COLLECTOR_MODE = os.environ.get("BENCH_COLLECTOR", "sink")


def otlp_collector_port():
    """tests/otlp/receiver.mjs, acknowledging exports (npm ci in tests/otlp first)."""
    global _collector
    if _collector is None:
        grpc_port, http_port = free_port(), free_port()
        receiver = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "otlp",
                                "receiver.mjs")
        start(["node", receiver, str(grpc_port), str(http_port), COLLECTOR_MODE], cpu=LOAD_CPU, name="otlp-receiver")
        wait_port(grpc_port)
        _collector = grpc_port
    return _collector


def base_lb():
    path = os.environ.get("STEPFLOW_LB_BASE")
    if not path or not os.path.exists(path):
        raise SystemExit("a proxy kind ending in @base needs STEPFLOW_LB_BASE=<a stepflow-lb binary>")
    return path


def start_proxy(kind, port, backends, h2=False, sse=False):
    # STEPFLOW_LB_ARGS: extra flags for every stepflow-lb (e.g. "--max-in-flight-per-instance 1000").
    lb_args = os.environ.get("STEPFLOW_LB_ARGS", "").split()
    binary, suffix = None, ""
    if kind == "stepflow-lb-base":
        kind = "stepflow-lb@base"
    if kind.startswith("stepflow-lb") and kind.endswith("@base"):
        kind, binary, suffix = kind[:-len("@base")], base_lb(), "-base"
    if kind == "stepflow-lb":
        return start_stepflow_lb(port, backends, lb_args, name="stepflow-lb" + suffix, binary=binary)
    if kind == "stepflow-lb+log":
        return start_stepflow_lb(port, backends, ["--access-log", "on", "--log-level", "info", *lb_args],
                                 name="stepflow-lb-log" + suffix, binary=binary)
    if kind == "stepflow-lb+trace":
        return start_stepflow_lb(port, backends, ["--access-log", "on", "--log-level", "info", "--trace-enabled", "true",
                                                  "--otlp-endpoint", f"http://127.0.0.1:{otlp_collector_port()}",
                                                  *lb_args],
                                 name="stepflow-lb-trace" + suffix, binary=binary)
    if kind == "haproxy":
        return start_haproxy(port, backends, h2=h2, sse=sse)
    return start_nginx_proxy(port, backends, h2=h2, sse=sse)


# ---------------------------------------------------------------- numbers and tables

def med_range(values, fmt="{:.1f}"):
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    m = statistics.median(values)
    if len(values) == 1:
        return fmt.format(m)
    return f"{fmt.format(m)} ({fmt.format(min(values))}..{fmt.format(max(values))})"


def table(headers, rows):
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"
    out = [line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in rows]
    return "\n".join(out)


def ratios(rounds, kind, key, ref="haproxy"):
    """Per-round kind/ref ratios of `key`, for rounds where both were measured."""
    out = []
    for r in rounds:
        a, b = r.get(kind, {}).get(key), r.get(ref, {}).get(key)
        if a is not None and b:
            out.append(a / b)
    return out


THROUGHPUT_HEAD = ["proxy", "req/s", "x HAProxy", "p50 ms", "p99 ms", "x HAProxy", "CPU µs/req", "user + sys",
                   "x HAProxy", "errors"]


def throughput_row(rounds, kind, with_ratios, errors, with_cpu=True):
    """One row under THROUGHPUT_HEAD (rps.py, h2.py): medians (min..max) over the rounds; ratios to
    HAProxy taken per round; CPU as total and as the median user + system split."""
    col = lambda key: [rnd[kind].get(key) for rnd in rounds]
    ratio = lambda key: med_range(ratios(rounds, kind, key), "{:.2f}") if with_ratios else ""
    per_req = lambda key: statistics.median(r[kind][key] * 1e6 / max(1, r[kind]["requests"]) for r in rounds)
    return [kind, med_range(col("rps"), "{:.0f}"), ratio("rps"),
            med_range(col("p50_ms"), "{:.2f}"), med_range(col("p99_ms"), "{:.2f}"), ratio("p99_ms"),
            med_range(col("cpu_us_per_req"), "{:.1f}") if with_cpu else "-",
            f"{per_req('cpu_user_s'):.1f} + {per_req('cpu_sys_s'):.1f}" if with_cpu else "-",
            ratio("cpu_us_per_req"), errors]


def noise_note(rounds):
    values = [run["foreign_cores"] for rnd in rounds for run in rnd.values() if "foreign_cores" in run]
    if not values:
        return ""
    return (f"\n\nCPU used by other processes during a measured run: median {statistics.median(values):.2f}, "
            f"max {max(values):.2f} cores.")


def save(name, data, text):
    os.makedirs(OUT, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    with open(os.path.join(OUT, f"{name}-{stamp}.json"), "w") as f:
        json.dump(data, f, indent=1)
    with open(os.path.join(OUT, f"{name}-{stamp}.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(OUT, f"{name}-latest.md"), "w") as f:
        f.write(text + "\n")
    log(f"results: .bench-out/{name}-{stamp}.json, .bench-out/{name}-latest.md")
