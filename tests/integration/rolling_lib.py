"""Rolling updates under load: the driver shared by the CI test (tests/integration/test_rolling.py)
and the long runs (bench/soak/rolling.py).

Three parts, usable separately:

- `Load`: a client that keeps a steady stream of work going against one address until stopped:
  multi-callback sessions (components/execute of /callbacks, each runs/submit callback answered
  by a new POST carrying Stepflow-Instance-Id, as the orchestrator does) and SSE executions
  (/stream). It counts what it started, completed and failed, and which callbacks were
  misrouted: a callback is misrouted when it reaches a worker other than the one that started
  its session (the balancer names the instance it routed to in X-Stepflow-Routed-Instance, and
  each worker counts callbacks it never issued in its /health `misroutedCallbacks`).
- `WorkerFleet`: example workers as the pods of a Deployment behind the Kubernetes API-server
  stand-in (tests/k8s/fake_apiserver.py), each on its own loopback address and one common port.
  `rolling_update()` replaces every pod the way a Deployment with maxSurge 1 / maxUnavailable 0
  does: a new pod is started and becomes ready, then an old pod turns terminating-but-serving
  (ready=false, serving=true, terminating=true); after its grace period it leaves the slice and
  its process gets SIGTERM. The next new pod starts as soon as the previous old one began
  terminating, so several old pods can be terminating at once, as in a real rollout.
- `TcpFront` and `BalancerSet`: balancer replicas behind a round-robin TCP front that
  health-checks each replica's /ready on its admin port (as a Service's readiness does) and, like
  HAProxy's `option redispatch`, tries the next replica when a connect is refused.
  `BalancerSet.rolling_update()` replaces each replica in turn: a new one is started and ready,
  then the old one gets SIGTERM, leaves the front when its /ready answers 503, and drains.

Everything runs on loopback; every wait polls a condition until a deadline.
"""

import asyncio
import collections
import os
import random
import signal
import socket
import sys
import threading
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "k8s"))

import harness  # noqa: E402
from harness import wait_for  # noqa: E402
from fake_apiserver import endpoint  # noqa: E402

client = harness.client

WORKER_AT_CAPACITY = -32300


# --------------------------------------------------------------------------- #
# The load
# --------------------------------------------------------------------------- #

class Counts:
    """Thread-safe counters plus the first few failure descriptions."""

    KEYS = ("sessions_started", "sessions_completed", "sessions_failed", "sessions_refused",
            "callbacks_sent", "callbacks_completed", "callbacks_failed", "callbacks_misrouted",
            "streams_started", "streams_completed", "streams_failed", "streams_refused")

    def __init__(self):
        self._lock = threading.Lock()
        self.values = dict.fromkeys(self.KEYS, 0)
        self.failures = []
        self.per_instance = collections.Counter()  # sessions started per instance id
        self.spans = []  # (instance id, start, end) of every session and SSE execution that started

    def add(self, **deltas):
        with self._lock:
            for k, v in deltas.items():
                self.values[k] += v

    def fail(self, what):
        with self._lock:
            if len(self.failures) < 50:
                self.failures.append("%.3f %s" % (time.monotonic(), what))

    def started_on(self, instance_id, start, end, session=True):
        with self._lock:
            if session:
                self.per_instance[instance_id] += 1
            self.spans.append((instance_id, start, end))

    def open_at(self, instance_id, when):
        """Sessions and SSE executions of `instance_id` that were open at monotonic time `when`."""
        with self._lock:
            return sum(1 for i, s, e in self.spans if i == instance_id and s < when < e)

    def snapshot(self):
        with self._lock:
            return dict(self.values)

    def __getitem__(self, key):
        with self._lock:
            return self.values[key]

    def summary(self):
        v = self.snapshot()
        return ("sessions: %(sessions_started)d started, %(sessions_completed)d completed, "
                "%(sessions_failed)d failed (%(sessions_refused)d refused at capacity, not started)\n"
                "callbacks: %(callbacks_sent)d sent, %(callbacks_completed)d completed, "
                "%(callbacks_failed)d failed, %(callbacks_misrouted)d misrouted\n"
                "SSE executions: %(streams_started)d started, %(streams_completed)d completed, "
                "%(streams_failed)d failed (%(streams_refused)d refused at capacity)" % v)


def _at_capacity(status, body):
    if status != 503:
        return False
    try:
        import json
        return json.loads(body)["error"]["code"] == WORKER_AT_CAPACITY
    except Exception:
        return False


class Load:
    """Sessions and SSE executions in a steady stream against host:port until stop().

    sessions: threads each running one session after another; callbacks: runs/submit callbacks
    per session; answer_delay: (min, max) seconds the orchestrator takes before answering a
    callback, so a session stays open long enough to straddle a drain; streams: threads each
    running one /stream execution after another (stream_events events, interval_ms apart).
    A worker's at-capacity 503 (-32300) created nothing: it is counted as refused and the work
    is retried after a short pause, as the orchestrator does.
    """

    def __init__(self, host, port, sessions=6, callbacks=3, answer_delay=(0.0, 0.1), streams=2,
                 stream_events=4, interval_ms=50, timeout=60.0):
        self.host, self.port = host, port
        self.sessions, self.callbacks, self.answer_delay = sessions, callbacks, answer_delay
        self.streams, self.stream_events, self.interval_ms = streams, stream_events, interval_ms
        self.timeout = timeout
        self.counts = Counts()
        self._stop = threading.Event()
        self._threads = []

    def start(self):
        for i in range(self.sessions):
            self._spawn(self._session_loop, i)
        for i in range(self.streams):
            self._spawn(self._stream_loop, i)
        return self

    def _spawn(self, fn, i):
        t = threading.Thread(target=fn, args=(random.Random(i * 7919 + os.getpid()),), daemon=True)
        t.start()
        self._threads.append(t)

    def stop(self, timeout=None):
        """Starts no new work; waits for the work under way to finish."""
        self._stop.set()
        deadline = time.monotonic() + (timeout if timeout is not None else self.timeout + 10)
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        stuck = [t for t in self._threads if t.is_alive()]
        if stuck:
            raise AssertionError("%d load threads still running after stop" % len(stuck))
        return self.counts

    # -- sessions ------------------------------------------------------------
    def _session_loop(self, rnd):
        while not self._stop.is_set():
            self._one_session(rnd)

    def _one_session(self, rnd):
        c = self.counts
        lo, hi = self.answer_delay

        def answer(req):
            if hi > 0:
                time.sleep(rnd.uniform(lo, hi))
            step = (req.get("params") or {}).get("step")
            return {"runId": "run-%s" % uuid.uuid4().hex[:12], "step": step}

        start = time.monotonic()
        r = client.run_session(self.host, self.port, self.callbacks, answer=answer, timeout=self.timeout)
        if r.status is not None and not r.headers.get("content-type", "").startswith("text/event-stream") \
                and isinstance(r.final, dict) and (r.final.get("error") or {}).get("code") == WORKER_AT_CAPACITY:
            c.add(sessions_refused=1)
            self._stop.wait(0.05)
            return
        c.add(sessions_started=1)
        if r.instance_id:
            c.started_on(r.instance_id, start, time.monotonic())
        sent = len(r.callback_statuses)
        completed = failed = misrouted = 0
        for status, resp, req in zip(r.callback_statuses, r.callback_responses, r.callback_requests):
            routed = resp.headers.get("x-stepflow-routed-instance") if resp is not None else None
            # A 404 from the right worker is a late answer (its stream was gone): failed, not misrouted.
            wrong_worker = routed is not None and routed != r.instance_id
            if wrong_worker:
                misrouted += 1
                c.fail("misrouted callback of %s: routed to %s, status %s" % (r.instance_id, routed, status))
            if status == 202 and not wrong_worker:
                completed += 1
            else:
                failed += 1
        c.add(callbacks_sent=sent, callbacks_completed=completed, callbacks_failed=failed,
              callbacks_misrouted=misrouted)
        result = r.result if isinstance(r.result, dict) else {}
        good = (r.ok and failed == 0 and result.get("callbacks") == self.callbacks
                and result.get("instanceId") == r.instance_id and sent == self.callbacks)
        if good:
            c.add(sessions_completed=1)
        else:
            c.add(sessions_failed=1)
            c.fail("session on %s failed: %r" % (r.instance_id, r))

    # -- SSE executions ------------------------------------------------------
    def _stream_loop(self, rnd):
        while not self._stop.is_set():
            self._one_stream()

    def _one_stream(self):
        c = self.counts
        rid = "stream-" + uuid.uuid4().hex
        start = time.monotonic()
        body = {"jsonrpc": "2.0", "id": rid, "method": "components/execute",
                "params": {"component": "/stream",
                           "input": {"events": self.stream_events, "interval_ms": self.interval_ms}}}
        try:
            reader = client.SseReader(self.host, self.port, body, timeout=self.timeout)
        except Exception as e:
            c.add(streams_started=1, streams_failed=1)
            c.fail("stream did not start: %r" % (e,))
            return
        with reader:
            if not reader.is_sse:
                if _at_capacity(reader.status, reader.body):
                    c.add(streams_refused=1)
                    self._stop.wait(0.05)
                    return
                c.add(streams_started=1, streams_failed=1)
                c.fail("stream answered %s: %r" % (reader.status, reader.body[:200]))
                return
            c.add(streams_started=1)
            final = None
            progress = 0
            try:
                for ev in reader:
                    msg = ev.json()
                    if msg.get("method") == "progress":
                        progress += 1
                    elif msg.get("id") == rid:
                        final = msg
            except (TimeoutError, ValueError) as e:
                reader.error = reader.error or repr(e)
            c.started_on(reader.instance_id, start, time.monotonic(), session=False)
            result = (final or {}).get("result") or {}
            if (not reader.ended_abnormally and progress == self.stream_events
                    and result.get("events") == self.stream_events
                    and result.get("instanceId") == reader.instance_id):
                c.add(streams_completed=1)
            else:
                c.add(streams_failed=1)
                c.fail("stream on %s failed: progress %d, final %r, error %r"
                       % (reader.instance_id, progress, final, reader.error))


# --------------------------------------------------------------------------- #
# Worker pods behind the API-server stand-in
# --------------------------------------------------------------------------- #

class Pod:
    def __init__(self, name, ip, worker):
        self.name, self.ip, self.worker = name, ip, worker
        self.ready, self.serving, self.terminating = False, False, False
        self.final_health = None  # the worker's /health just before it was stopped
        self.instance_id = client.health(ip, worker.port)[1]["instanceId"]
        self.terminating_at = None

    @property
    def address(self):
        return "%s:%d" % (self.ip, self.worker.port)

    def endpoint(self):
        return endpoint(self.ip, self.name, ready=self.ready, serving=self.serving, terminating=self.terminating)

    def health(self):
        status, body = client.health(self.ip, self.worker.port, timeout=2)
        return body if status == 200 else None


class WorkerFleet:
    """The pods of one worker Deployment, all in one EndpointSlice of the Service `service`."""

    def __init__(self, api, service="workers", slice_name="workers-rollout", max_concurrency=4):
        self.api, self.service, self.slice_name = api, service, slice_name
        self.max_concurrency = max_concurrency
        self.port = None
        self.pods = []  # in the slice, in order
        self.stopped = []  # pods whose process was stopped
        self.events = []  # (monotonic time, what, pod name)
        self._lock = threading.Lock()
        self._next_ip = 0
        self._terminations = []

    def _log(self, what, pod):
        with self._lock:
            self.events.append((time.monotonic(), what, pod.name))

    def start_pod(self, name):
        """Starts a worker process (not yet in the slice); returns its Pod."""
        for _ in range(50):
            with self._lock:
                # 127.0.40.0/22: away from the addresses other tests give their pods
                ip = "127.0.%d.%d" % (40 + self._next_ip // 250, 2 + self._next_ip % 250)
                self._next_ip += 1
            try:
                w = harness.Worker(name, max_concurrency=self.max_concurrency,
                                   extra=["--host", ip, "--port", str(self.port or 0)])
                break
            except RuntimeError:
                continue  # that address:port is taken: try the next address
        else:
            raise RuntimeError("no free loopback address for a worker")
        self.port = self.port or w.port
        pod = Pod(name, ip, w)
        self._log("started", pod)
        return pod

    def publish(self):
        with self._lock:
            endpoints = [p.endpoint() for p in self.pods]
        self.api.put_slice(self.slice_name, endpoints, port=self.port, service=self.service)

    def add_ready(self, pod):
        """The pod passes its readiness probe: it joins the slice as ready."""
        wait_for(pod.health, 10, "readiness of " + pod.name)
        pod.ready, pod.serving, pod.terminating = True, True, False
        with self._lock:
            self.pods.append(pod)
        self.publish()
        self._log("ready", pod)

    def scale_up(self, count, prefix="workers-r1"):
        for i in range(count):
            self.add_ready(self.start_pod("%s-%d" % (prefix, i)))

    def terminate(self, pod, grace):
        """Terminating but serving now; after `grace` seconds out of the slice, then SIGTERM."""
        pod.ready, pod.serving, pod.terminating = False, True, True
        pod.terminating_at = time.monotonic()
        self.publish()
        self._log("terminating", pod)
        t = threading.Thread(target=self._finish_termination, args=(pod, grace), daemon=True)
        t.start()
        with self._lock:
            self._terminations.append(t)

    def _finish_termination(self, pod, grace):
        time.sleep(grace)  # the pod's grace period: it keeps serving what is pinned to it
        with self._lock:
            self.pods.remove(pod)
        self.publish()
        self._log("removed", pod)
        try:
            pod.final_health = pod.health()
        except Exception:
            pod.final_health = None
        pod.worker.stop()  # SIGTERM
        with self._lock:
            self.stopped.append(pod)
        self._log("stopped", pod)

    def wait_terminations(self, timeout=60):
        deadline = time.monotonic() + timeout
        with self._lock:
            threads = list(self._terminations)
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        if any(t.is_alive() for t in threads):
            raise AssertionError("pod terminations did not finish")

    def rolling_update(self, revision, grace, step_interval=0.0, ready_delay=0.0, before_terminate=None):
        """Replaces every pod, maxSurge 1 / maxUnavailable 0. ready_delay: how long a new pod
        takes to become ready after starting; step_interval: pause between steps (a slower
        rollout keeps the load running across more of them); before_terminate(pod): called
        just before an old pod turns terminating (a test waits there for work on it)."""
        with self._lock:
            old = list(self.pods)
        for i, pod in enumerate(old):
            new = self.start_pod("workers-r%d-%d" % (revision, i))
            if ready_delay:
                time.sleep(ready_delay)
            self.add_ready(new)
            if before_terminate:
                before_terminate(pod)
            self.terminate(pod, grace)
            if step_interval:
                time.sleep(step_interval)
        self.wait_terminations(grace + 60)

    def misrouted_seen_by_workers(self):
        """Callbacks the workers themselves did not hold (404 -32001), over every pod."""
        total = 0
        with self._lock:
            live = list(self.pods)
            stopped = list(self.stopped)
        for p in stopped:
            total += (p.final_health or {}).get("misroutedCallbacks", 0)
        for p in live:
            total += (p.health() or {}).get("misroutedCallbacks", 0)
        return total


# --------------------------------------------------------------------------- #
# A round-robin TCP front with readiness checks (what a Service does for balancer pods)
# --------------------------------------------------------------------------- #

class FrontTarget:
    def __init__(self, name, port, admin_port):
        self.name, self.port, self.admin_port = name, port, admin_port
        self.up = False
        self.connections = 0  # relayed connections opened to it
        self.refused = 0  # connects refused (redispatched to another target)


class TcpFront:
    """A TCP relay on 127.0.0.1 that spreads connections round-robin over the targets whose
    GET /ready (admin port) answered 200 at the last check. A connect that is refused goes to
    the next target (HAProxy: `retries` + `option redispatch`). Runs an asyncio loop in a thread.
    """

    def __init__(self, check_interval=0.1):
        self.check_interval = check_interval
        self.targets = []
        self._rr = 0
        self._lock = threading.Lock()
        self.accepted = 0
        self.failed = 0  # client connections closed because no target took them
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self._ready.wait(5)
        self.port = self._port

    def _run(self):
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0, backlog=1024))
        self._server = server
        self._port = server.sockets[0].getsockname()[1]
        self._checker = self._loop.create_task(self._check_loop())
        self._ready.set()
        self._loop.run_forever()

    def add(self, name, port, admin_port):
        t = FrontTarget(name, port, admin_port)
        with self._lock:
            self.targets.append(t)
        return t

    def remove(self, target):
        with self._lock:
            self.targets.remove(target)

    def up_names(self):
        with self._lock:
            return [t.name for t in self.targets if t.up]

    def close(self):
        async def stop():
            self._server.close()
            self._checker.cancel()
            try:
                await self._checker
            except asyncio.CancelledError:
                pass
            self._loop.stop()
        asyncio.run_coroutine_threadsafe(stop(), self._loop)
        self._thread.join(5)

    # -- readiness checks ------------------------------------------------------
    async def _check(self, target):
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", target.admin_port), 1.0)
        except (OSError, asyncio.TimeoutError):
            return False
        try:
            writer.write(b"GET /ready HTTP/1.1\r\nHost: front\r\nConnection: close\r\n\r\n")
            line = await asyncio.wait_for(reader.readline(), 1.0)
            return line.split(b" ")[1:2] == [b"200"]
        except (OSError, asyncio.TimeoutError, IndexError):
            return False
        finally:
            writer.close()

    async def _check_loop(self):
        while True:
            with self._lock:
                targets = list(self.targets)
            results = await asyncio.gather(*(self._check(t) for t in targets))
            for t, ok in zip(targets, results):
                t.up = ok  # rise 1, fall 1
            await asyncio.sleep(self.check_interval)

    # -- relaying --------------------------------------------------------------
    def _candidates(self):
        with self._lock:
            up = [t for t in self.targets if t.up]
            if not up:
                return []
            self._rr = (self._rr + 1) % len(up)
            return up[self._rr:] + up[:self._rr]

    async def _handle(self, creader, cwriter):
        self.accepted += 1
        upstream = None
        for target in self._candidates()[:3]:
            try:
                upstream = await asyncio.open_connection("127.0.0.1", target.port)
                target.connections += 1
                break
            except OSError:
                target.refused += 1
        if upstream is None:
            self.failed += 1
            cwriter.transport.abort()
            return
        ureader, uwriter = upstream
        for w in (cwriter, uwriter):
            w.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await asyncio.gather(self._pipe(creader, uwriter), self._pipe(ureader, cwriter))
        for w in (cwriter, uwriter):
            w.close()

    @staticmethod
    async def _pipe(reader, writer):
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    if writer.can_write_eof():
                        writer.write_eof()
                    return
                writer.write(data)
                await writer.drain()
        except (OSError, ConnectionError):
            # A reset on one side is passed on as a reset, so the peer sees a broken exchange.
            writer.transport.abort()


class BalancerSet:
    """Balancer replicas (harness.Balancer) behind a TcpFront, all started with `args`."""

    def __init__(self, front, args, replicas=2, threads=2, drain_timeout="30s"):
        self.front, self.args, self.threads = front, list(args), threads
        self.drain_timeout = drain_timeout
        self.live = []  # (Balancer, FrontTarget)
        self.retired = []  # dicts: name, exit code, drain seconds, front connections
        self._n = 0
        for _ in range(replicas):
            self.start_one()

    def start_one(self):
        self._n += 1
        name = "lb-%d" % self._n
        args = self.args + ["--drain-timeout", self.drain_timeout]
        slot = self.front.reserve() if hasattr(self.front, "reserve") else None
        if slot:  # a front with fixed server slots (HAProxy): listen where it looks
            args += ["--listen", "127.0.0.1:%d" % slot[0], "--admin-listen", "127.0.0.1:%d" % slot[1]]
        lb = harness.Balancer(args=args, threads=self.threads, wait_ready=True)
        lb.name = name
        target = self.front.add(name, lb.port, lb.admin_port)
        wait_for(lambda: target.up, 10, "front to see %s ready" % name)
        self.live.append((lb, target))
        return lb

    def wait_healthy(self, count, timeout=15):
        for lb, _ in self.live:
            lb.wait_healthy(count, timeout)

    def replace(self, index=0, drain_wait=60, busy_wait=10):
        """maxSurge 1: a new replica ready in the front first, then the old one gets SIGTERM
        once it has requests in flight (waited for up to busy_wait seconds, so the drain has
        something to finish)."""
        lb, target = self.live.pop(index)
        self.start_one()
        in_flight = 0
        if busy_wait:
            try:
                in_flight = wait_for(lambda: lb.in_flight_total(), busy_wait, "work on %s" % lb.name)
            except AssertionError:
                in_flight = 0
        t0 = time.monotonic()
        lb.signal(signal.SIGTERM)
        wait_for(lambda: not target.up, 10, "front to take %s out" % lb.name)
        out_after = time.monotonic() - t0
        code = lb.wait_exit(drain_wait)
        drained_after = time.monotonic() - t0
        self.front.remove(target)
        self.retired.append({"name": lb.name, "exit": code, "in_flight_at_sigterm": in_flight,
                             "out_of_front_s": round(out_after, 3),
                             "drained_s": round(drained_after, 3), "connections": target.connections,
                             "refused": target.refused,
                             "cut_at_drain_timeout": bool(lb.logs("drain timeout: closing remaining connections"))})
        return self.retired[-1]

    def rolling_update(self, step_interval=0.0):
        for _ in range(len(self.live)):
            self.replace(0)
            if step_interval:
                time.sleep(step_interval)

    def stop(self):
        for lb, target in self.live:
            lb.stop()
