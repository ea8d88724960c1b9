"""Operability end to end (issue 4): what /metrics says and whether Prometheus tooling accepts it,
that client input never mints a series, the access log, graceful shutdown, and the Grafana
dashboard. Real binary, real example workers, real `promtool` and `prometheus` (Debian package
`prometheus`, installed by scripts/install-deps.sh), loopback only."""

import datetime
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid

import harness
from harness import ROOT, Balancer, Worker, check, client, free_port, http_get, lb_binary, run_tests, test, wait_for

DASHBOARD = os.path.join(ROOT, "deploy", "grafana", "stepflow-lb.json")
METRICS_DOC = os.path.join(ROOT, "docs", "metrics.md")
LEVELS = {"trace", "debug", "info", "warn", "error"}
ACCESS_FIELDS = ("method", "path", "status", "instance", "decision", "duration_ms", "bytes_in", "bytes_out")


def execute_body(component, input, id="op"):
    return {"jsonrpc": "2.0", "id": id, "method": "components/execute",
            "params": {"component": component, "input": input}}


EXEC_HOLD = execute_body("/stream", {"events": 1, "interval_ms": 0, "hold": True}, id="hold")


def compact(obj):
    return json.dumps(obj, separators=(",", ":")).encode()


# --------------------------------------------------------------------------- #
# The text exposition, parsed
# --------------------------------------------------------------------------- #

_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_exposition(text):
    """-> (samples [(name, labels dict, value)], types {family: type})."""
    samples, types = [], {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, family, kind = line.split(" ", 3)
            types[family] = kind
            continue
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        check(m is not None, f"unparseable exposition line {line!r}")
        labels = dict(_LABEL.findall(m.group(2) or ""))
        samples.append((m.group(1), labels, float(m.group(3))))
    return samples, types


def snapshot(lb):
    """{(name, frozenset(labels)): value} of every sample /metrics shows now."""
    samples, _ = parse_exposition(lb.metrics_text())
    return {(name, frozenset(labels.items())): value for name, labels, value in samples}


def total(snap, name, **labels):
    want = set((k, str(v)) for k, v in labels.items())
    return sum(v for (n, ls), v in snap.items() if n == name and want <= ls)


def family_of(sample_name, types):
    for suffix in ("_bucket", "_sum", "_count"):
        base = sample_name[: -len(suffix)] if sample_name.endswith(suffix) else None
        if base and types.get(base) in ("histogram", "summary"):
            return base
    return sample_name


def documented_metrics():
    """{name: (type, set of label names)} from the tables of docs/metrics.md."""
    out = {}
    row = re.compile(r"^\|\s*`(stepflow_lb_[a-z0-9_]+)`\s*\|\s*(\w+)\s*\|([^|]*)\|")
    with open(METRICS_DOC) as f:
        for line in f:
            m = row.match(line)
            if m:
                out[m.group(1)] = (m.group(2), set(re.findall(r"`([a-z_]+)`", m.group(3))))
    return out


def dashboard_exprs():
    with open(DASHBOARD) as f:
        dash = json.load(f)
    exprs = []
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            exprs.append((panel["title"], target["expr"]))
    return dash, exprs


def metric_names_in(expr):
    return set(re.findall(r"\bstepflow_lb_[a-z0-9_]+", expr))


def grafana_to_promql(expr):
    return expr.replace("$__rate_interval", "1m").replace("$job", ".*")


# --------------------------------------------------------------------------- #
# Traffic
# --------------------------------------------------------------------------- #

def mixed_run(lb):
    """Unpinned calls, one pinned SSE session with a callback, one 503 for a made-up instance,
    one malformed request. Returns the session result."""
    for i in range(3):
        r = lb.execute("/echo", {"i": i})
        check(r.status == 200, f"echo {i}: {r.status}")
    session = lb.session(1)
    check(session.ok, f"pinned session: {session}")
    r = lb.post({"jsonrpc": "2.0", "id": 7, "result": {}}, headers={"Stepflow-Instance-Id": "made-up-instance"})
    check(r.status == 503, f"made-up instance: {r.status}")
    raw = client.raw_request("127.0.0.1", lb.port, b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n")
    check(raw.startswith(b"HTTP/1.1 400"), raw[:80])
    return session


def finish_marker(lb, tag):
    """A request whose access-log line marks that every earlier request was logged (one thread,
    requests sent one after another: lines are written in order, before the response leaves)."""
    r = client.get("127.0.0.1", lb.port, f"/marker-{tag}")
    check(r.status == 404, f"marker answered {r.status}")
    return wait_for(lambda: [x for x in lb.logs("request") if x.get("path") == f"/marker-{tag}"], 5,
                    "marker request logged")


# --------------------------------------------------------------------------- #
# Metrics: meaning, label safety, promtool, Prometheus
# --------------------------------------------------------------------------- #

@test
def metrics_keep_their_meaning():
    a, b, c = Worker("ma"), Worker("mb"), Worker("mc")
    lb = Balancer([a.address, b.address, c.address], args=["--max-failures", "1"])
    lb.wait_healthy(3)
    ids = {w.address: w.instance_id for w in (a, b, c)}
    # Pool size and health are the fleet as it is: every instance takes work.
    wait_for(lambda: lb.metric("stepflow_lb_backend_pool_size") == 3, 5, "pool size 3")
    for addr, iid in ids.items():
        check(lb.metric("stepflow_lb_backend_health", backend=addr, instance_id=iid) == 1, f"{iid} healthy")
    check(lb.metric("stepflow_lb_health_checks_total", result="success") >= 3, "health checks counted")
    check(lb.metric("stepflow_lb_discovery_operations_total", operation="update", result="success") >= 1,
          "the static endpoint set counts as one applied update")

    # A held SSE stream pinned to a: one request in flight on a, counted per backend and instance.
    held = client.SseReader("127.0.0.1", lb.port, EXEC_HOLD, headers={"Stepflow-Instance-Id": ids[a.address]})
    check(held.next_event(timeout=10) is not None, "held stream started")
    wait_for(lambda: lb.metric("stepflow_lb_active_connections", backend=a.address) == 1
             and lb.metric("stepflow_lb_instance_in_flight", instance_id=ids[a.address]) == 1
             and lb.metric("stepflow_lb_sse_streams_open") == 1, 5, "stream counted in flight and open")
    snap = snapshot(lb)
    check(total(snap, "stepflow_lb_active_connections", backend=b.address) == 0, "b idle")
    check(total(snap, "stepflow_lb_instance_in_flight", instance_id=ids[b.address]) == 0, "b idle per instance")
    check(total(snap, "stepflow_lb_sse_streams_total") == 1, "one stream started")
    check(total(snap, "stepflow_lb_routing_decisions_total", decision="pinned") == 1, "one pinned decision")

    # Pool size counts instances that take new work: c failing its checks leaves it.
    client.set_health("127.0.0.1", c.port, False)
    wait_for(lambda: lb.metric("stepflow_lb_backend_pool_size") == 2
             and lb.metric("stepflow_lb_backend_health", instance_id=ids[c.address]) == 0, 10, "c out of the pool")
    check(lb.metric("stepflow_lb_health_checks_total", result="failure") >= 1, "failed checks counted")
    check(lb.metric("stepflow_lb_backends_known") == 3, "c is still a known backend")

    # One 300 ms call: it goes to b (a has a stream, c is out) and lands in the right buckets.
    body = compact(execute_body("/sleep", {"ms": 300}))
    before = snapshot(lb)
    r = client.post_json("127.0.0.1", lb.port, body)
    after = snapshot(lb)
    check(r.status == 200 and r.headers.get("x-stepflow-routed-instance") == ids[b.address],
          f"sleep call went to b: {r.status} {r.headers.get('x-stepflow-routed-instance')}")

    def delta(name, **labels):
        return total(after, name, **labels) - total(before, name, **labels)

    check(delta("stepflow_lb_requests_total", backend=b.address, status=200, method="POST") == 1, "requests_total")
    check(delta("stepflow_lb_routing_decisions_total", decision="least-load") == 1, "least-load decision")
    check(delta("stepflow_lb_upstream_responses_total", **{"class": "2xx"}) == 1, "2xx response class")
    sec = "stepflow_lb_request_duration_seconds_bucket"
    check(delta(sec, decision="least-load", le="0.25") == 0 and delta(sec, decision="least-load", le="0.5") == 1,
          "seconds histogram: 0.25 < 300 ms <= 0.5")
    took = delta("stepflow_lb_request_duration_seconds_sum", decision="least-load")
    check(0.29 <= took < 5, f"seconds histogram sum grew by {took}")
    ms = "stepflow_lb_request_duration_ms_bucket"
    check(delta(ms, backend=b.address, method="POST", le="250") == 0
          and delta(ms, backend=b.address, method="POST", le="500") == 1, "compatible ms histogram: 250 < 300 <= 500")
    check(delta("stepflow_lb_client_received_bytes_total") == len(body), "request body bytes counted")
    check(delta("stepflow_lb_client_sent_bytes_total") == len(r.body), "response body bytes counted")

    held.close()
    wait_for(lambda: lb.metric("stepflow_lb_sse_streams_open") == 0
             and lb.metric("stepflow_lb_active_connections", backend=a.address) == 0
             and lb.metric("stepflow_lb_instance_in_flight", instance_id=ids[a.address]) == 0, 5,
             "stream closed: nothing in flight")


MCP_METHODS = {
    "initialize", "ping", "tools/list", "tools/call", "resources/list", "resources/read", "resources/templates/list",
    "resources/subscribe", "resources/unsubscribe", "prompts/list", "prompts/get", "completion/complete",
    "logging/setLevel", "roots/list", "sampling/createMessage", "elicitation/create", "notifications/initialized",
    "notifications/cancelled", "notifications/progress", "notifications/roots/list_changed", "tasks/get",
    "tasks/cancel"}


@test
def client_input_never_mints_series():
    w = Worker("ls")
    lb = Balancer([w.address], threads=1)
    wid = w.instance_id

    def forged_traffic(tag, methods):
        tokens = []
        for i in range(15):
            t = f"forged{tag}{uuid.uuid4().hex[:10]}"
            tokens.append(t)
            r = lb.post({"jsonrpc": "2.0", "id": t, "result": {}}, headers={"Stepflow-Instance-Id": t, "Mcp-Method": t},
                        chunked=(i % 3 == 0))
            check(r.status == 503 and r.json()["error"]["data"]["instanceId"] == t, f"forged pin: {r.status}")
        for m in methods:
            t = f"forged{tag}{uuid.uuid4().hex[:10]}"
            tokens.append(t)
            head = (f"{m} /{t}?{t}=1 HTTP/1.1\r\nHost: {t}\r\nX-Forwarded-For: {t}\r\nUser-Agent: {t}\r\n"
                    f"Content-Length: 0\r\n\r\n").encode()
            raw = client.raw_request("127.0.0.1", lb.port, head)  # unpinned: the worker answers 501
            check(raw.startswith(b"HTTP/1.1 501"), f"{m}: {raw[:60]!r}")
            pinned = head.replace(b"\r\n\r\n", f"\r\nStepflow-Instance-Id: {t}\r\n\r\n".encode())
            raw = client.raw_request("127.0.0.1", lb.port, pinned)
            check(raw.startswith(b"HTTP/1.1 503"), f"{m} pinned: {raw[:60]!r}")
        return tokens

    tokens = forged_traffic("a", ["FOOBAR", "get", "PROPFIND"])
    first = set(snapshot(lb))
    tokens += forged_traffic("b", ["BAZQUX", "post", "MKCOL"])
    second = set(snapshot(lb))
    check(second == first, f"new series after more made-up ids and methods: {sorted(second - first)[:5]}")

    text = lb.metrics_text()
    leaked = [t for t in tokens if t in text]
    check(not leaked, f"client values in /metrics: {leaked[:3]}")
    allowed = {
        # HTTP methods, and the fixed set of MCP method names (stepflow_lb_mcp_requests_total)
        "method": {"POST", "GET", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH", "OTHER", "other"} | MCP_METHODS,
        "backend": {w.address, "none"},
        "instance_id": {wid},
        "decision": {"pinned", "least-load", "none"},
        "reason": {"unknown-instance", "not-serving", "connect-failed", "queue-full", "queue-timeout",
                   "socket-failed", "stale-connection", "reset", "may-have-run", "worker-at-capacity",
                   "instance-gone", "invalid-seal", "expired", "lru", "idle", "export-failed", "rejected"},
        "class": {"none", "1xx", "2xx", "3xx", "4xx", "5xx"},
        "result": {"success", "error", "failure", "ok"},
        "operation": {"update", "list", "watch", "resolve"},
    }
    samples, _ = parse_exposition(text)
    for name, labels, _ in samples:
        for key, value in labels.items():
            if key == "status":
                check(re.fullmatch(r"[1-5][0-9][0-9]", value), f"{name} status={value!r}")
            elif key == "le":
                check(value == "+Inf" or float(value) > 0, f"{name} le={value!r}")
            else:
                check(key in allowed and value in allowed[key], f"{name} has {key}={value!r}")
    check(lb.metric("stepflow_lb_pinned_misses_total", reason="unknown-instance") == 36, "every forged pin counted")
    check(lb.metric("stepflow_lb_requests_total", method="OTHER", status="501") == 6, "odd methods counted as OTHER")
    check(lb.metric("stepflow_lb_mcp_requests_total", method="other") == 30, "made-up Mcp-Method values counted as other")


def promtool_check(text):
    p = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
    return p.returncode, (p.stdout + p.stderr).strip()


def without_family(text, family):
    keep = []
    for line in text.splitlines(keepends=True):
        words = line.split()
        name = (words[2] if len(words) > 2 and line.startswith("# ") else line.split("{")[0].split(" ")[0])
        if name == family or (name.startswith(family + "_") and name[len(family) + 1:] in ("bucket", "sum", "count")):
            continue
        keep.append(line)
    return "".join(keep)


@test
def promtool_checks_the_metrics_output():
    a, b = Worker("pa"), Worker("pb")
    lb = Balancer([a.address, b.address])
    lb.wait_healthy(2)
    mixed_run(lb)
    with urllib.request.urlopen(f"http://127.0.0.1:{lb.admin_port}/metrics", timeout=5) as r:
        content_type = r.headers.get("Content-Type", "")
        text = r.read().decode()
    check(content_type.startswith("text/plain") and "version=0.0.4" in content_type, content_type)

    # The checker is live: it rejects a broken exposition.
    rc, out = promtool_check("stepflow_lb_broken{label=\"x\" 1\n")
    check(rc != 0, f"promtool accepted a broken exposition: {out}")

    # The real output parses. promtool's style lint objects to one thing only: the unit `ms` in
    # the name GUIDE §4 keeps for existing dashboards (stepflow_lb_request_duration_ms).
    rc, out = promtool_check(text)
    problems = [line for line in out.splitlines() if line.strip()]
    check(rc in (0, 3), f"promtool check metrics failed ({rc}): {out}")
    unexpected = [p for p in problems
                  if not (p.startswith("stepflow_lb_request_duration_ms ") and "abbreviated units" in p)]
    check(not unexpected, f"promtool problems: {unexpected}")
    # Everything else is clean.
    rest = without_family(text, "stepflow_lb_request_duration_ms")
    check("stepflow_lb_request_duration_seconds_bucket" in rest and "stepflow_lb_request_duration_ms" not in rest,
          "only the compatible ms family was set aside")
    rc, out = promtool_check(rest)
    check(rc == 0 and out == "", f"promtool on the rest ({rc}): {out}")

    # With --compat-metrics off the balancer itself exports a lint-clean exposition.
    lean = Balancer([a.address, b.address], args=["--compat-metrics", "off"])
    lean.wait_healthy(2)
    mixed_run(lean)
    text = lean.metrics_text()
    check("stepflow_lb_request_duration_seconds_bucket" in text and "_duration_ms" not in text, "no ms histogram")
    rc, out = promtool_check(text)
    check(rc == 0 and out == "", f"promtool on --compat-metrics off ({rc}): {out}")


class Prometheus:
    """A real Prometheus server scraping one target every 250 ms, in its own temp dir."""

    def __init__(self, target):
        self.dir = tempfile.mkdtemp(prefix="stepflow-prom-")
        config = os.path.join(self.dir, "prometheus.yml")
        with open(config, "w") as f:
            f.write("global:\n  scrape_interval: 250ms\n  scrape_timeout: 200ms\n  evaluation_interval: 1s\n"
                    "scrape_configs:\n  - job_name: stepflow-lb\n    static_configs:\n"
                    f"      - targets: ['{target}']\n")
        self.proc = None
        self.log = os.path.join(self.dir, "prometheus.log")
        for _ in range(3):  # the free port may be taken between probe and bind: try another
            self.port = free_port()
            with open(self.log, "w") as log:
                self.proc = subprocess.Popen(
                    ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={self.dir}/data",
                     f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
                    stdout=log, stderr=subprocess.STDOUT, cwd=self.dir)
            harness._started.append(self.proc)
            try:
                wait_for(lambda: self.proc.poll() is not None or self._get("/-/ready")[0] == 200, 30,
                         "prometheus ready")
            except AssertionError:
                self.close()
                raise
            if self.proc.poll() is None:
                return
        raise RuntimeError("prometheus did not start:\n" + self.log_tail())

    def _get(self, path):
        return http_get(self.port, path)

    def query(self, promql):
        status, body = self._get("/api/v1/query?" + urllib.parse.urlencode({"query": promql}))
        return status, json.loads(body)

    def scalar(self, promql):
        """The value of a one-element instant vector, else None."""
        status, answer = self.query(promql)
        result = answer.get("data", {}).get("result", []) if status == 200 else []
        return float(result[0]["value"][1]) if len(result) == 1 else None

    def log_tail(self):
        try:
            with open(self.log) as f:
                return "".join(f.readlines()[-30:])
        except OSError:
            return ""

    def close(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


@test
def prometheus_scrapes_the_admin_port():
    check(shutil.which("prometheus"), "prometheus not installed (scripts/install-deps.sh installs it)")
    w = Worker("prom")
    lb = Balancer([w.address])
    for i in range(3):
        r = lb.post({"jsonrpc": "2.0", "id": i, "result": {}}, headers={"Stepflow-Instance-Id": f"no-such-{i}"})
        check(r.status == 503, f"unknown instance {i}: {r.status}")
    prom = Prometheus(f"127.0.0.1:{lb.admin_port}")
    try:
        up = f'up{{job="stepflow-lb",instance="127.0.0.1:{lb.admin_port}"}}'
        wait_for(lambda: prom.scalar(up) == 1, 60, "Prometheus to scrape the admin port (up == 1)")
        misses = 'stepflow_lb_pinned_misses_total{job="stepflow-lb",reason="unknown-instance"}'
        wait_for(lambda: prom.scalar(misses) == 3, 30, "the three pinned misses in Prometheus")
        check(prom.scalar('stepflow_lb_backend_pool_size{job="stepflow-lb"}') == 1, "pool size 1 in Prometheus")
        # Every dashboard query is valid PromQL for this Prometheus.
        _, exprs = dashboard_exprs()
        for title, expr in exprs:
            status, answer = prom.query(grafana_to_promql(expr))
            check(status == 200 and answer.get("status") == "success", f"panel {title!r}: {expr}: {answer}")
        check(prom.scalar('min(stepflow_lb_backend_pool_size{job=~".*"})') == 1, "the pool-size panel shows 1")
    except Exception:
        print(prom.log_tail())
        raise
    finally:
        prom.close()


# --------------------------------------------------------------------------- #
# Logs
# --------------------------------------------------------------------------- #

@test
def access_log_is_one_json_line_per_request():
    t0 = time.time()
    w = Worker("log")
    lb = Balancer([w.address], threads=1, args=["--log-level", "trace"])
    wid = w.instance_id
    lines_before = len(lb.logs())
    # 1. a unary call, query string in the target
    body = compact(execute_body("/echo", {"x": 1}))
    r = client.post_json("127.0.0.1", lb.port, body, path="/?token=secret")
    check(r.status == 200, r.status)
    wait_for(lambda: len(lb.logs("request")) == 1, 5, "first access line")
    # 2. an SSE stream of 20 events, read to its end: one line for it, nothing per event, at any level
    during_from = len(lb.logs())
    sse_body = compact(execute_body("/stream", {"events": 20, "interval_ms": 5}))
    sse = client.post_json("127.0.0.1", lb.port, sse_body)
    check(sse.status == 200 and sse.body.count(b"data:") == 21, f"stream: {sse.status}, {sse.body.count(b'data:')} events")
    wait_for(lambda: len(lb.logs("request")) == 2, 5, "the stream's access line")
    during = lb.logs()[during_from:]
    check([x["message"] for x in during].count("request") == 1 and len(during) <= 3,
          f"lines written while 21 events streamed: {[x['message'] for x in during]}")
    # 3. a pinned session: its stream and one callback POST
    session = lb.session(1)
    check(session.ok, session)
    # 4. a made-up instance: the balancer answers 503 itself, after reading the body
    miss_body = compact({"jsonrpc": "2.0", "id": 5, "result": {"padding": "x" * 100}})
    r = client.post_json("127.0.0.1", lb.port, miss_body, headers={"Stepflow-Instance-Id": "made-up"})
    check(r.status == 503, r.status)
    # 5. a malformed request
    raw = client.raw_request("127.0.0.1", lb.port, b"GET /bad HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n")
    check(raw.startswith(b"HTTP/1.1 400"), raw[:60])
    finish_marker(lb, "json")

    records = lb.logs()[lines_before:]
    check(all(isinstance(x.get("time"), str) and x.get("level") in LEVELS and isinstance(x.get("message"), str)
              for x in records), f"every line a JSON object with time, level, message: {records[:3]}")
    check(all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", x["time"]) for x in records), "UTC timestamps")
    access = [x for x in records if x["message"] == "request"]
    check(len(access) == 7, f"7 requests, {len(access)} access lines: {access}")
    t1 = time.time()
    for x in access:
        check(all(k in x for k in ACCESS_FIELDS), f"fields: {x}")
        # Stamped from the reading that ended the request (steady clock plus an offset to the
        # wall clock): still the wall clock's time, within this test's run.
        stamped = datetime.datetime.strptime(x["time"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(
            tzinfo=datetime.timezone.utc).timestamp()
        check(t0 - 1 <= stamped <= t1 + 1, f"access line time {x['time']} outside the test's run: {x}")
        check(x["level"] == "info" and isinstance(x["duration_ms"], (int, float)) and x["duration_ms"] >= 0, x)
    unary, stream, miss, bad, marker = access[0], access[1], access[4], access[5], access[6]
    # The callback's 202 and the end of its session stream race each other.
    callback = next((x for x in access[2:4] if x["decision"] == "pinned"), None)
    session_stream = next((x for x in access[2:4] if x["decision"] == "least-load"), None)
    check(callback and session_stream, f"session lines: {access[2:4]}")
    check(unary["path"] == "/" and unary["status"] == 200 and unary["decision"] == "least-load"
          and unary["instance"] == wid and unary["bytes_in"] == len(body), unary)
    check(stream["status"] == 200 and stream["bytes_in"] == len(sse_body) and stream["bytes_out"] == len(sse.body)
          and stream["duration_ms"] >= 90, f"one line for the 20-event stream: {stream}")
    check(session_stream["decision"] == "least-load" and callback["decision"] == "pinned"
          and callback["status"] == 202 and callback["instance"] == wid, (session_stream, callback))
    check(miss["status"] == 503 and miss["decision"] == "pinned" and miss["instance"] == ""
          and miss["bytes_in"] == len(miss_body) and miss["bytes_out"] == len(r.body), miss)
    check(bad["status"] == 400 and bad["method"] == "GET" and bad["path"] == "/bad" and bad["decision"] == "none", bad)
    check(marker["method"] == "GET" and marker["status"] == 404, marker)
    check(any(x["message"] == "request rejected" and x["level"] == "debug" for x in records),
          "--log-level trace lets debug records through")


@test
def access_log_off_writes_no_request_lines():
    w = Worker("nolog")
    lb = Balancer([w.address], threads=1, args=["--access-log", "off"])
    mixed_run(lb)
    lb.signal(signal.SIGTERM)
    check(lb.wait_exit(15) == 0, "exit status 0")
    wait_for(lambda: lb.logs("stopped"), 5, "last log line read")
    check(not lb.logs("request"), f"access lines with --access-log off: {lb.logs('request')[:2]}")
    check(lb.logs("listening") and lb.logs("shutting down: draining"), "other records still written")


def start_text_balancer(backends, args=(), env=None):
    """The binary with text logs (the harness's Balancer reads JSON). -> (proc, lines, proxy, admin)."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("STEPFLOW_")}
    full_env.update(env or {})
    cmd = [lb_binary(), "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--threads", "1",
           "--backends", ",".join(backends), "--health-interval", "200ms"] + list(args)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=full_env)
    harness._started.append(proc)
    lines = []
    threading.Thread(target=lambda: [lines.append(x.rstrip("\n")) for x in proc.stderr], daemon=True).start()
    listening = wait_for(lambda: [x for x in lines if " listening " in x], 15, "text 'listening' line")[0]
    fields = text_fields(listening)
    return proc, lines, int(fields["proxy"].rsplit(":", 1)[1]), int(fields["admin"].rsplit(":", 1)[1])


_TEXT_LINE = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z) (trace|debug|info|warn|error) (.*)$")


def text_fields(line):
    return {k: v.strip('"') for k, v in re.findall(r'(\w+)=("(?:[^"\\]|\\.)*"|\S*)', line)}


@test
def text_log_format():
    w = Worker("text")
    wid = w.instance_id
    proc, lines, port, admin = start_text_balancer([w.address], ["--log-format", "text"])
    wait_for(lambda: client.get("127.0.0.1", admin, "/ready").status == 200, 10, "ready")
    r = client.execute("127.0.0.1", port, "/echo", {"t": 1})
    check(r.status == 200, r.status)
    access = wait_for(lambda: [x for x in lines if " info request " in x], 5, "text access line")
    check(len(access) == 1, access)
    fields = text_fields(access[0])
    check(fields.get("method") == "POST" and fields.get("path") == "/" and fields.get("status") == "200"
          and fields.get("instance") == wid and fields.get("decision") == "least-load"
          and "duration_ms" in fields and "bytes_in" in fields and "bytes_out" in fields, access[0])
    proc.send_signal(signal.SIGTERM)
    check(proc.wait(timeout=15) == 0, "exit status 0")
    wait_for(lambda: any(" info stopped" in x for x in lines), 5, "last line read")
    bad = [x for x in lines if not _TEXT_LINE.match(x)]
    check(not bad, f"lines not in the text format: {bad[:3]}")
    # The environment chooses the format too (GUIDE §4: STEPFLOW_LOG_FORMAT).
    proc, lines, _, _ = start_text_balancer([w.address], env={"STEPFLOW_LOG_FORMAT": "text"})
    check(_TEXT_LINE.match(lines[0]) and not lines[0].startswith("{"), lines[0])
    proc.send_signal(signal.SIGTERM)
    check(proc.wait(timeout=15) == 0, "exit status 0")


# --------------------------------------------------------------------------- #
# Graceful shutdown
# --------------------------------------------------------------------------- #

def connection_refused(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return False
    except ConnectionRefusedError:
        return True


@test
def sigterm_lets_an_open_stream_finish_and_exits_0():
    w = Worker("drain")
    lb = Balancer([w.address])          # the replica being rolled
    other = Balancer([w.address])       # another replica: the orchestrator's callbacks go there
    # A session stream open through lb, waiting for its callback answer.
    reader = client.SseReader("127.0.0.1", lb.port, execute_body("/callbacks", {"count": 1}, id="drain-1"))
    t_stream = time.monotonic()
    callback = reader.next_event(timeout=10).json()
    check(callback.get("method") == "runs/submit", callback)
    # An idle keep-alive connection, and one whose request head has begun to arrive.
    idle = client.HttpConnection("127.0.0.1", lb.port, timeout=10)
    check(idle.request("POST", "/", compact(execute_body("/echo", {})), {"Content-Type": "application/json"}).status
          == 200, "keep-alive request")
    partial = socket.create_connection(("127.0.0.1", lb.port), timeout=10)
    partial.sendall(b"POST / HTTP/1.1\r\nHost: lb\r\n")
    wait_for(lambda: lb.metric("stepflow_lb_client_connections") == 3, 5, "three client connections open")

    t0 = time.monotonic()
    lb.signal(signal.SIGTERM)
    wait_for(lambda: lb.admin_get("/ready")[0] == 503, 2, "/ready 503 right after SIGTERM")
    check(json.loads(lb.admin_get("/health")[1])["status"] == "shutting-down", "/health says shutting-down")
    wait_for(lambda: connection_refused(lb.port), 2, "new connections refused")
    # The idle connection is closed at once (as nginx and HAProxy do); its client would retry elsewhere.
    idle.sock.settimeout(5)
    check(idle.sock.recv(1) == b"", "idle keep-alive connection closed")
    idle.close()
    # The request already begun is served, and its connection closed after the response.
    body = compact(execute_body("/echo", {"late": True}))
    partial.sendall(b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    raw = b""
    while True:
        chunk = partial.recv(65536)
        if not chunk:
            break
        raw += chunk
    partial.close()
    late = client.parse_response(raw)
    check(late.status == 200 and late.headers.get("connection") == "close", f"begun request: {raw[:200]!r}")
    check(lb.proc.poll() is None, "still draining while the stream is open")

    # The callback answer reaches the worker through the other replica; the stream completes.
    answer = client.post_json("127.0.0.1", other.port, {"jsonrpc": "2.0", "id": callback["id"], "result": {"ok": 1}},
                              headers={"Stepflow-Instance-Id": reader.instance_id})
    check(answer.status == 202, f"callback answer: {answer.status}")
    final = reader.next_event(timeout=10)
    check(final is not None and final.json().get("id") == "drain-1" and "result" in final.json(), f"final: {final}")
    check(reader.next_event(timeout=10) is None and not reader.ended_abnormally, f"clean end: {reader.error}")
    check(lb.wait_exit(10) == 0, "exit status 0")
    elapsed = time.monotonic() - t0
    check(elapsed < 15, f"exited {elapsed:.1f}s after SIGTERM")
    start = lb.logs("shutting down: draining")
    check(start and start[0]["drain_timeout_ms"] == 30000 and start[0]["signal"] == signal.SIGTERM,
          f"default drain timeout 30 s: {start}")
    check(lb.logs("drained: exiting") and not lb.logs("drain timeout: closing remaining connections"),
          "drained without the timeout")
    stream_body = compact(execute_body("/callbacks", {"count": 1}, id="drain-1"))
    stream_lines = [x for x in lb.logs("request") if x["bytes_in"] == len(stream_body)]
    check(len(stream_lines) == 1 and stream_lines[0]["status"] == 200
          and stream_lines[0]["instance"] == reader.instance_id
          and stream_lines[0]["duration_ms"] >= 1000 * (t0 - t_stream), f"the stream's access line: {stream_lines}")


def first_request(sock, name):
    """Sends one request on `sock` and reads until the balancer closes it: (response or None, raw)."""
    body = compact(execute_body("/echo", {"conn": name}))
    sock.sendall(b"POST / HTTP/1.1\r\nHost: lb\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                 % len(body) + body)
    raw = b""
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            raw += chunk
    except (ConnectionResetError, socket.timeout):
        pass
    sock.close()
    return (client.parse_response(raw) if raw else None), raw


@test
def sigterm_with_connections_only_in_the_accept_queue_serves_them():
    # SIGTERM while every connection still waits in the kernel's accept queue: the balancer is not
    # drained until each thread has accepted them (it used to see 0 open connections, stop its
    # admin loop and leave these requests unanswered until the drain timeout).
    w = Worker("queued-only")
    lb = Balancer([w.address], args=["--drain-timeout", "20s"])
    lb.signal(signal.SIGSTOP)
    socks = [socket.create_connection(("127.0.0.1", lb.port), timeout=10) for _ in range(2)]
    lb.signal(signal.SIGTERM)
    lb.signal(signal.SIGCONT)
    wait_for(lambda: lb.admin_get("/ready")[0] == 503, 5, "/ready 503 after SIGTERM")
    for i, sock in enumerate(socks):
        r, raw = first_request(sock, f"conn-{i}")
        check(r is not None and r.status == 200 and r.headers.get("connection") == "close",
              f"connection {i}: its first request served, then closed: {raw[:200]!r}")
    check(lb.wait_exit(10) == 0, "drained and exited 0")
    check(not lb.logs("drain timeout: closing remaining connections"), "without the drain timeout")


@test
def sigterm_serves_the_first_request_of_a_connection_opened_before_it():
    # A front (a Service, HAProxy) may open a connection just before SIGTERM and send the request
    # on it just after: that request must be served, since nothing tells the client it may retry.
    w = Worker("first")
    lb = Balancer([w.address])
    fresh = socket.create_connection(("127.0.0.1", lb.port), timeout=10)  # accepted, nothing sent
    wait_for(lambda: lb.metric("stepflow_lb_client_connections") is not None, 5, "metrics up")
    # One more the balancer has not even accepted: it waits in the kernel's accept queue.
    lb.signal(signal.SIGSTOP)
    queued = socket.create_connection(("127.0.0.1", lb.port), timeout=10)
    lb.signal(signal.SIGTERM)
    lb.signal(signal.SIGCONT)
    wait_for(lambda: lb.admin_get("/ready")[0] == 503, 2, "/ready 503 after SIGTERM")
    wait_for(lambda: connection_refused(lb.port), 2, "listener closed")
    for name, sock in (("fresh", fresh), ("queued", queued)):
        r, raw = first_request(sock, name)
        check(r is not None and r.status == 200 and r.headers.get("connection") == "close",
              f"{name} connection's first request served, then closed: {raw[:200]!r}")
    check(lb.wait_exit(10) == 0, "drained and exited 0")
    check(not lb.logs("drain timeout: closing remaining connections"), "without the drain timeout")


@test
def drain_timeout_cuts_a_held_stream_and_exits_0():
    w = Worker("cut")
    lb = Balancer([w.address], args=["--drain-timeout", "1s"])
    reader = client.SseReader("127.0.0.1", lb.port, EXEC_HOLD)
    check(reader.next_event(timeout=10) is not None, "held stream started")
    t0 = time.monotonic()
    lb.signal(signal.SIGTERM)
    wait_for(lambda: lb.admin_get("/ready")[0] == 503, 2, "/ready 503")
    check(reader.next_event(timeout=10) is None and reader.ended_abnormally,
          f"the stream was cut without its closing framing: {reader.error}")
    cut_after = time.monotonic() - t0
    check(0.9 <= cut_after < 5, f"cut {cut_after:.2f}s after SIGTERM with --drain-timeout 1s")
    check(lb.wait_exit(10) == 0, "exit status 0")
    check(lb.logs("drain timeout: closing remaining connections"), "timeout logged")
    wait_for(lambda: w.health()["cancelledStreams"] >= 1, 5, "the worker saw the stream cancelled")


@test
def second_signal_exits_at_once():
    w = Worker("twice")
    lb = Balancer([w.address])
    reader = client.SseReader("127.0.0.1", lb.port, EXEC_HOLD)
    check(reader.next_event(timeout=10) is not None, "held stream started")
    lb.signal(signal.SIGINT)
    wait_for(lambda: lb.admin_get("/ready")[0] == 503, 2, "/ready 503 after SIGINT")
    check(lb.proc.poll() is None, "draining, not exited, while a stream is open")
    t0 = time.monotonic()
    lb.signal(signal.SIGINT)
    check(lb.wait_exit(10) == 0, "exit status 0")
    check(time.monotonic() - t0 < 3, "exited at once")
    check(reader.next_event(timeout=10) is None and reader.ended_abnormally, "stream cut")
    check(lb.logs("second signal: exiting now"), "logged")


# --------------------------------------------------------------------------- #
# Docs and dashboard
# --------------------------------------------------------------------------- #

@test
def metrics_reference_and_dashboard_match_the_output():
    docs = documented_metrics()
    a, b = Worker("da"), Worker("db")
    lb = Balancer([a.address, b.address])
    lb.wait_healthy(2)
    mixed_run(lb)
    samples, types = parse_exposition(lb.metrics_text())
    labels_seen = {}
    for name, labels, _ in samples:
        labels_seen.setdefault(family_of(name, types), set()).update(k for k in labels if k != "le")
    # Every family the balancer exports is documented with its type and labels.
    for family, kind in types.items():
        check(family in docs, f"{family} is not in docs/metrics.md")
        check(docs[family][0] == kind, f"{family}: documented as {docs[family][0]}, exported as {kind}")
        if family in labels_seen:
            check(docs[family][1] == labels_seen[family],
                  f"{family}: documented labels {sorted(docs[family][1])}, exported {sorted(labels_seen[family])}")
    # The six compatible names of GUIDE §4 are there.
    for name in ("stepflow_lb_requests_total", "stepflow_lb_request_duration_ms", "stepflow_lb_active_connections",
                 "stepflow_lb_backend_health", "stepflow_lb_backend_pool_size",
                 "stepflow_lb_discovery_operations_total"):
        check(name in types, f"compatible name {name} missing")
    check(types["stepflow_lb_request_duration_ms"] == "histogram" and
          types["stepflow_lb_request_duration_seconds"] == "histogram", "duration histograms")

    # The dashboard: valid JSON, well-formed panels, only documented and exported metrics.
    dash, exprs = dashboard_exprs()
    check(dash.get("uid") and dash.get("title") and dash.get("panels"), "dashboard has uid, title, panels")
    ids = [p["id"] for p in dash["panels"]]
    check(len(ids) == len(set(ids)), "panel ids unique")
    for p in dash["panels"]:
        if p["type"] != "row":
            check(p.get("targets") and all(t.get("expr") for t in p["targets"]), f"panel {p['title']} has queries")
            check(p.get("gridPos", {}).get("w", 0) > 0, f"panel {p['title']} has a position")
    used = set()
    for title, expr in exprs:
        check(expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), f"{title}: {expr}")
        for name in metric_names_in(expr):
            used.add(family_of(name, types))
    for family in used:
        check(family in docs, f"the dashboard uses {family}, which docs/metrics.md does not list")
        check(family in types, f"the dashboard uses {family}, which /metrics does not export")
    for family in ("stepflow_lb_requests_total", "stepflow_lb_request_duration_seconds",
                   "stepflow_lb_instance_in_flight", "stepflow_lb_backend_pool_size",
                   "stepflow_lb_pinned_misses_total", "stepflow_lb_sse_streams_open", "stepflow_lb_backend_health",
                   "stepflow_lb_upstream_connect_errors_total", "stepflow_lb_upstream_retries_total",
                   "stepflow_lb_discovery_operations_total", "stepflow_lb_health_checks_total"):
        check(family in used, f"the dashboard has no panel on {family}")


if __name__ == "__main__":
    run_tests()
