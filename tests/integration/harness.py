"""Process harness for integration tests: real example workers, the real stepflow-lb binary.

Everything listens on 127.0.0.1 with port 0 and reports the port it got, so tests never guess
free ports. Waiting is always "poll a condition until a deadline", never a bare sleep.

A test file defines functions decorated with @test and ends with `run_tests()`, which prints one
PASS/FAIL line per test and the closing line "N passed, M failed", and kills every process the
file started (by PID) however it ends.
"""

import atexit
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(ROOT, "tests", "worker"))

import stepflow_client as client  # noqa: E402

WORKER_SCRIPT = os.path.join(ROOT, "tests", "worker", "example_worker.py")
_started = []  # every Popen this process started, for cleanup


def lb_binary():
    path = os.environ.get("STEPFLOW_LB_BIN") or os.path.join(ROOT, "build", "stepflow-lb")
    if not os.path.exists(path):
        raise RuntimeError(f"stepflow-lb binary not found at {path}; build first or set STEPFLOW_LB_BIN")
    return path


def _kill_all():
    for p in _started:
        if p.poll() is None:
            try:
                p.kill()
                p.wait(timeout=5)
            except Exception:
                pass


atexit.register(_kill_all)


def wait_for(predicate, timeout=10.0, what="condition", interval=0.02):
    """Polls predicate() until it returns a truthy value or the deadline passes."""
    deadline = time.monotonic() + timeout
    last_error = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as e:  # a condition that cannot be evaluated yet is just not met
            last_error = e
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}" + (f" (last error: {last_error})" if last_error else ""))


def free_port():
    """A loopback port nothing listens on now (for a worker started later, or never)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def connections_to(port):
    """Established TCP connections whose remote end is loopback `port` (from /proc/net/tcp*)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    fields = line.split()
                    if fields[3] == "01" and int(fields[2].rsplit(":", 1)[1], 16) == port:
                        count += 1
        except FileNotFoundError:
            pass
    return count


def http_get(port, path, timeout=5):
    """(status, body) of GET http://127.0.0.1:port/path; error statuses are returned, not raised."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


class Worker:
    """An example worker process (tests/worker/example_worker.py)."""

    def __init__(self, name="w", max_concurrency=4, extra=None, port=0, host="127.0.0.1"):
        self.name = name
        self.host = host
        args = [sys.executable, WORKER_SCRIPT, "--host", host, "--port", str(port), "--name", name,
                "--max-concurrency", str(max_concurrency)] + (extra or [])
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        _started.append(self.proc)
        line = self.proc.stdout.readline()
        if not line.startswith("LISTENING "):
            raise RuntimeError(f"worker {name} did not start: {line!r}")
        self.port = int(line.split()[1])
        self.address = f"{host}:{self.port}"

    def health(self):
        status, body = client.health(self.host, self.port)
        return body

    @property
    def instance_id(self):
        return self.health()["instanceId"]

    def kill(self):
        self.proc.kill()
        self.proc.wait(timeout=10)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)


class Balancer:
    """The stepflow-lb binary, with its JSON log lines collected from stderr."""

    def __init__(self, backends=None, args=None, threads=2, env=None, wait_ready=True, launcher=None):
        # launcher: the argv that runs the binary instead of the built one, e.g. a container
        # engine's `run ... IMAGE` (tests/image/test_image.py).
        cmd = (launcher or [lb_binary()]) + ["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0",
               "--threads", str(threads), "--log-format", "json", "--health-interval", "200ms",
               "--health-timeout", "1s"]
        if backends:
            cmd += ["--backends", ",".join(backends)]
        cmd += args or []
        full_env = dict(os.environ)
        for k in list(full_env):
            if k.startswith("STEPFLOW_") or k in ("BIND_ADDRESS", "METRICS_ADDRESS", "UPSTREAM_SERVICE",
                                                  "HEALTH_CHECK_INTERVAL", "HEALTH_CHECK_TIMEOUT", "MAX_FAILURES",
                                                  "KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT"):
                del full_env[k]
        full_env.update(env or {})
        self.cmd = cmd
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=full_env)
        _started.append(self.proc)
        self.lines = []
        self._lock = threading.Lock()
        self._listening = queue.Queue()
        self._log_reader = threading.Thread(target=self._read_logs, daemon=True)
        self._log_reader.start()
        try:
            info = self._listening.get(timeout=15)
        except queue.Empty:
            raise RuntimeError("stepflow-lb did not report listening; logs:\n" + self.log_text())
        if info is None:
            raise RuntimeError("stepflow-lb exited at start-up; logs:\n" + self.log_text())
        self.port = int(info["proxy"].rsplit(":", 1)[1])
        self.admin_port = int(info["admin"].rsplit(":", 1)[1])
        self.tls_port = int(info["tls"].rsplit(":", 1)[1]) if info.get("tls") else None  # with --tls-listen
        if wait_ready:
            self.wait_ready()

    def _read_logs(self):
        for line in self.proc.stderr:
            line = line.rstrip("\n")
            try:
                record = json.loads(line)
            except ValueError:
                record = {"message": line, "level": "raw"}
            with self._lock:
                self.lines.append(record)
            if record.get("message") == "listening":
                self._listening.put(record)
        self._listening.put(None)

    def log_text(self):
        with self._lock:
            return "\n".join(json.dumps(r) for r in self.lines[-60:])

    def logs(self, message=None):
        with self._lock:
            return [r for r in self.lines if message is None or r.get("message") == message]

    # Admin API
    def admin_get(self, path):
        return http_get(self.admin_port, path)

    def backends(self):
        return json.loads(self.admin_get("/debug/backends")[1])["backends"]

    def backend(self, address):
        for b in self.backends():
            if b["address"] == address:
                return b
        return None

    def metrics_text(self):
        return self.admin_get("/metrics")[1].decode()

    def metric(self, name, **labels):
        """Sum of the samples of `name` whose labels include `labels`."""
        total, found = 0.0, False
        for line in self.metrics_text().splitlines():
            if line.startswith("#") or not line.startswith(name):
                continue
            head, _, value = line.rpartition(" ")
            metric_name = head.split("{", 1)[0]
            if metric_name != name:
                continue
            label_text = head[len(metric_name):].strip("{}")
            have = dict(kv.split("=", 1) for kv in label_text.split(",") if kv) if label_text else {}
            have = {k: v.strip('"') for k, v in have.items()}
            if all(have.get(k) == str(v) for k, v in labels.items()):
                total += float(value)
                found = True
        return total if found else None

    def ready(self):
        """(status, body) of /ready."""
        status, body = self.admin_get("/ready")
        try:
            return status, json.loads(body)
        except ValueError:
            return status, {}

    def wait_ready(self, timeout=15, instances=1):
        """/ready 200 and, by default, an instance taking new work: /ready itself is 200 with an
        empty fleet (docs/operations.md), and most tests want a fleet to talk to."""
        def ok():
            status, body = self.ready()
            return status == 200 and body.get("healthyInstances", 0) >= instances
        wait_for(ok, timeout, "balancer /ready with %d instance(s)" % instances)

    def wait_healthy(self, count, timeout=15):
        wait_for(lambda: sum(1 for b in self.backends() if b["state"] == "healthy") == count, timeout,
                 f"{count} healthy backends")

    def in_flight_total(self):
        return sum(b["inFlight"] for b in self.backends())

    # Data path shortcuts
    def post(self, body, headers=None, timeout=30, **kw):
        return client.post_json("127.0.0.1", self.port, body, headers=headers, timeout=timeout, **kw)

    def execute(self, component, input, headers=None, id=None, timeout=30):
        return client.execute("127.0.0.1", self.port, component, input, id=id, headers=headers, timeout=timeout)

    def session(self, count, **kw):
        return client.run_session("127.0.0.1", self.port, count, **kw)

    def signal(self, sig):
        self.proc.send_signal(sig)

    def wait_exit(self, timeout=30):
        status = self.proc.wait(timeout=timeout)
        self._log_reader.join(timeout=5)  # every line it wrote is read before the caller looks
        return status

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# --------------------------------------------------------------------------- #
# A tiny test runner with the closing line CI reads.
# --------------------------------------------------------------------------- #
_tests = []


def test(fn):
    _tests.append(fn)
    return fn


def check(cond, message):
    if not cond:
        raise AssertionError(message)


def run_tests():
    only = sys.argv[1:]
    passed = failed = 0
    failures = []  # repeated at the end: a CI log that keeps only the tail still names them
    for fn in _tests:
        if only and fn.__name__ not in only:
            continue
        start = time.monotonic()
        try:
            fn()
            passed += 1
            print(f"PASS  {fn.__name__} ({time.monotonic() - start:.2f}s)", flush=True)
        except Exception as e:
            failed += 1
            print(f"FAIL  {fn.__name__}", flush=True)
            traceback.print_exc(file=sys.stdout)
            failures.append(f"{fn.__name__}: {type(e).__name__}: {str(e)[:600]}")
        finally:
            _kill_all()
            _started.clear()
    for line in failures:
        print(f"FAILED  {line}", flush=True)
    print(f"{passed} passed, {failed} failed", flush=True)
    sys.exit(1 if failed else 0)
