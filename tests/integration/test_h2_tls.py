"""HTTP/2 and TLS end to end, with real clients: curl (h2c prior knowledge, h2 and HTTP/1.1 over
TLS via ALPN, many multiplexed transfers on one connection), h2load, Python's ssl, openssl for a
test CA generated per run, and tests/integration/h2raw.py where a test needs frames no polite
client sends (illegal fields, excess streams, resets, floods).

Note on curl 7.88.1 (Debian 12): its --parallel multiplexing over *h2c prior knowledge* fails
every transfer after the first with exit 16 before sending anything, whatever the server (seen
against a stand-in server too). Multiplexing is therefore driven with curl over TLS (ALPN h2)
and with h2raw over h2c.
"""

import atexit
import hashlib
import http.client
import json
import os
import re
import select
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import tempfile
import threading
import time

import h2raw
from h2raw import H2Client
from harness import Balancer, Worker, check, lb_binary, run_tests, test, wait_for

import example_worker  # noqa: E402  (harness puts tests/worker on the path)

KiB, MiB = 1024, 1024 * 1024

_tmp = tempfile.mkdtemp(prefix="stepflow-h2tls-")
atexit.register(shutil.rmtree, _tmp, True)


def path(name):
    return os.path.join(_tmp, name)


# --------------------------------------------------------------------------- #
# A throw-away PKI made with the openssl CLI
# --------------------------------------------------------------------------- #

def openssl(*args):
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=30)


class Pki:
    """A CA and the certificates it issues, in the run's temp folder (EC P-256: quick to make)."""

    def __init__(self, name):
        self.name = name
        self.ca_cert, self.ca_key = path(f"{name}-ca.crt"), path(f"{name}-ca.key")
        openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                "-keyout", self.ca_key, "-out", self.ca_cert, "-days", "2", "-subj", f"/CN={name} test CA")

    def issue(self, stem, cn, serial, cert_path=None, key_path=None):
        """A server certificate for localhost and 127.0.0.1. Written to temporary names first
        and renamed into place, so a reader never sees half a file."""
        cert_path, key_path = cert_path or path(f"{stem}.crt"), key_path or path(f"{stem}.key")
        tmp_key, tmp_csr, tmp_crt, ext = (path(f"{stem}.{s}.tmp") for s in ("key", "csr", "crt", "ext"))
        with open(ext, "w") as f:
            f.write("subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n"
                    "keyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n")
        openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                "-keyout", tmp_key, "-out", tmp_csr, "-subj", f"/CN={cn}")
        openssl("x509", "-req", "-in", tmp_csr, "-CA", self.ca_cert, "-CAkey", self.ca_key,
                "-set_serial", str(serial), "-days", "2", "-extfile", ext, "-out", tmp_crt)
        os.replace(tmp_key, key_path)
        os.replace(tmp_crt, cert_path)
        return cert_path, key_path

    def client_context(self, alpn=None):
        ctx = ssl.create_default_context(cafile=self.ca_cert)
        if alpn is not None:
            ctx.set_alpn_protocols(alpn)
        return ctx


_pki = {}


def pki(name="main"):
    if name not in _pki:
        _pki[name] = Pki(name)
    return _pki[name]


def tls_balancer(backends, extra=None, threads=2, stem="lb"):
    ca = pki()
    cert, key = ca.issue(stem, "stepflow-lb test", 1001)
    lb = Balancer(backends, threads=threads,
                  args=["--tls-listen", "127.0.0.1:0", "--tls-cert", cert, "--tls-key", key] + (extra or []))
    check(lb.tls_port, "the listening line names the TLS listener")
    return lb, cert, key


# --------------------------------------------------------------------------- #
# Request bodies, curl, SSE
# --------------------------------------------------------------------------- #

def rpc(component, input=None, id=1):
    return json.dumps({"jsonrpc": "2.0", "id": id, "method": "components/execute",
                       "params": {"component": component, "input": input or {}}}).encode()


def body_file(name, data):
    with open(path(name), "wb") as f:
        f.write(data)
    return path(name)


def sse_events(raw):
    return [json.loads(line[6:]) for line in raw.decode().split("\n") if line.startswith("data: ")]


def read(name):
    with open(path(name), "rb") as f:
        return f.read()


def headers_of(name):
    """The last response head curl wrote with -D, as a lower-case dict."""
    text = read(name).decode("latin-1").replace("\r\n", "\n").strip().split("\n\n")[-1]
    out = {}
    for line in text.split("\n")[1:]:
        k, _, v = line.partition(":")
        out[k.strip().lower()] = v.strip()
    return out


W_FORMAT = "%{num_connects} %{http_code} %{response_code} %{http_version} %{time_total} %{exitcode}"


def curl_parallel(transfers, parallel_max=50, timeout=60):
    """Runs curl --parallel with one --next-separated transfer per (tag, args, url). Returns
    {tag: {"connects", "code", "version", "time", "exit"}} from each transfer's -w line."""
    cmd = ["curl", "--parallel", "--parallel-max", str(parallel_max)]
    for i, (tag, args, url) in enumerate(transfers):
        if i:
            cmd.append("--next")
        cmd += ["-s", "-S", *args, "-w", f"{tag} {W_FORMAT}\\n", url]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    out = {}
    for line in proc.stdout.splitlines():
        parts = line.split()
        if len(parts) == 7:
            tag, connects, code, response_code, version, total, exitcode = parts
            out[tag] = {"connects": int(connects), "code": int(code), "response_code": int(response_code),
                        "version": version, "time": float(total), "exit": int(exitcode)}
    check(len(out) == len(transfers), f"a -w line per transfer ({len(out)}/{len(transfers)}): {proc.stderr[-500:]}")
    return out


def tls_curl_args():
    return ["--http2", "--cacert", pki().ca_cert]


def post_args(body_path, extra_headers=()):
    args = ["-H", "Content-Type: application/json", "--data-binary", "@" + body_path]
    for h in extra_headers:
        args += ["-H", h]
    return args


# --------------------------------------------------------------------------- #
# Raw HTTP/2 helpers
# --------------------------------------------------------------------------- #

def request_fields(method="POST", path_="/", extra=(), content_length=None):
    fields = [(":method", method), (":scheme", "http"), (":authority", "lb.test"), (":path", path_),
              ("content-type", "application/json")]
    if content_length is not None:
        fields.append(("content-length", str(content_length)))
    return fields + list(extra)


def h2_settled(c):
    """Waits until both SETTINGS are acknowledged both ways: a PING sent after our ACK comes back
    only once the balancer has processed that ACK (frames are handled in order)."""
    c.wait(lambda: c.server_settings and c.settings_acked, what="SETTINGS exchange")
    c.send_frame(h2raw.PING, 0, 0, b"settled!")
    c.wait(lambda: any(f.type == h2raw.PING and f.flags & h2raw.ACK for f in c.frames), what="PING ack")


def worker_counter(workers, key):
    return sum(w.health()[key] for w in workers)


# --------------------------------------------------------------------------- #
# Tests
# --------------------------------------------------------------------------- #

@test
def curl_h2c_prior_knowledge_h2_over_tls_and_http11_over_tls():
    w = Worker("ver")
    lb, _, _ = tls_balancer([w.address])
    echo = body_file("ver.json", rpc("/echo", {"v": 1}))
    cases = [
        ("h2c prior knowledge", ["--http2-prior-knowledge"], f"http://127.0.0.1:{lb.port}/", "2", "http"),
        ("plain HTTP/1.1", [], f"http://127.0.0.1:{lb.port}/", "1.1", "http"),
        ("h2 via ALPN", ["--http2", "--cacert", pki().ca_cert], f"https://127.0.0.1:{lb.tls_port}/", "2", "https"),
        ("HTTP/1.1 via ALPN", ["--http1.1", "--cacert", pki().ca_cert], f"https://localhost:{lb.tls_port}/", "1.1",
         "https"),
    ]
    for name, args, url, version, proto in cases:
        proc = subprocess.run(["curl", "-s", "-S", *args, *post_args(echo), "-D", path("ver.h"), "-o", path("ver.b"),
                               "-w", "%{http_version} %{http_code}", "--resolve", f"localhost:{lb.tls_port}:127.0.0.1",
                               url], capture_output=True, text=True, timeout=30)
        check(proc.stdout == f"{version} 200", f"{name}: curl said {proc.stdout!r} {proc.stderr!r}")
        res = json.loads(read("ver.b"))["result"]
        check(res["output"] == {"v": 1} and res["instanceId"] == w.instance_id, f"{name}: {res}")
        check(headers_of("ver.h").get("x-seen-forwarded-proto") == proto, f"{name}: X-Forwarded-Proto {proto}")


@test
def one_tls_connection_multiplexes_pinned_unpinned_and_sse_transfers():
    workers = [Worker(f"mx{i}", max_concurrency=64) for i in range(3)]
    lb, _, _ = tls_balancer([w.address for w in workers])
    lb.wait_healthy(3)
    ids = [w.instance_id for w in workers]
    url = f"https://127.0.0.1:{lb.tls_port}/"
    transfers, expect = [], {}
    for i in range(45):
        tag = f"t{i}"
        kind = ("pinned", "unpinned", "sse")[i % 3]
        headers = ()
        if kind == "pinned":
            target = ids[i % 3]
            headers = (f"Stepflow-Instance-Id: {target}",)
            body = rpc("/echo", {"i": i}, id=i)
            expect[tag] = (kind, target)
        elif kind == "unpinned":
            body = rpc("/sleep", {"ms": 300}, id=i)
            expect[tag] = (kind, None)
        else:
            body = rpc("/stream", {"events": 5, "interval_ms": 20}, id=i)
            expect[tag] = (kind, None)
        transfers.append((tag, tls_curl_args() + post_args(body_file(f"{tag}.json", body), headers)
                          + ["-o", path(f"{tag}.out"), "-D", path(f"{tag}.hdr")], url))
    start = time.monotonic()
    results = curl_parallel(transfers, parallel_max=50)
    elapsed = time.monotonic() - start
    check(sum(r["connects"] for r in results.values()) == 1, f"one connection for all: {results}")
    bad = {t: r for t, r in results.items() if (r["code"], r["response_code"], r["version"], r["exit"]) != (200, 200, "2", 0)}
    check(not bad, f"every transfer 200 over HTTP/2: {bad}")
    # 15 sleeps of 300 ms one after another would take 4.5 s: they ran side by side.
    check(elapsed < 3.0, f"transfers ran concurrently ({elapsed:.2f}s)")
    for tag, (kind, target) in expect.items():
        hdr, out = headers_of(f"{tag}.hdr"), read(f"{tag}.out")
        if kind == "pinned":
            check(hdr.get("x-stepflow-routed-instance") == target, f"{tag} routed to {hdr.get('x-stepflow-routed-instance')}")
            check(hdr.get("x-stepflow-routing-decision") == "pinned", hdr)
            check(json.loads(out)["result"]["instanceId"] == target, out)
        elif kind == "unpinned":
            check(hdr.get("x-stepflow-routing-decision") == "least-load", hdr)
            check(json.loads(out)["result"]["sleptMs"] == 300, out)
        else:
            check(hdr.get("content-type", "").startswith("text/event-stream"), hdr)
            events = sse_events(out)
            check([e["params"]["i"] for e in events[:-1]] == [1, 2, 3, 4, 5], f"{tag}: progress events {events}")
            check(events[-1]["result"]["events"] == 5, f"{tag}: final result {events[-1]}")
    wait_for(lambda: lb.in_flight_total() == 0, 5, "in-flight back to 0")


@test
def one_h2c_connection_multiplexes_pinned_unpinned_and_sse_streams():
    workers = [Worker(f"hc{i}", max_concurrency=64) for i in range(2)]
    lb = Balancer([w.address for w in workers])
    lb.wait_healthy(2)
    ids = [w.instance_id for w in workers]
    c = H2Client("127.0.0.1", lb.port)
    kinds = {}
    for i in range(30):
        kind = ("pinned", "unpinned", "sse")[i % 3]
        if kind == "pinned":
            sid = c.request(rpc("/echo", {"i": i}, id=i), headers=[("stepflow-instance-id", ids[i % 2])])
            kinds[sid] = (kind, ids[i % 2])
        elif kind == "unpinned":
            kinds[c.request(rpc("/sleep", {"ms": 100}, id=i))] = (kind, None)
        else:
            kinds[c.request(rpc("/stream", {"events": 4, "interval_ms": 20}, id=i))] = (kind, None)
    c.wait(lambda: all(c.streams[s].closed for s in kinds), timeout=20, what="all 30 streams")
    check(c.goaway is None, c.goaway)
    for sid, (kind, target) in kinds.items():
        s = c.streams[sid]
        check(s.status == 200 and s.reset_code is None, f"stream {sid}: {s.status} {s.reset_code}")
        if kind == "pinned":
            check(json.loads(bytes(s.data))["result"]["instanceId"] == target, f"stream {sid} pinned to {target}")
        elif kind == "sse":
            events = sse_events(bytes(s.data))
            check(len(events) == 5 and events[-1]["result"]["events"] == 4, f"stream {sid}: {events}")
    c.close()
    check(lb.metric("stepflow_lb_routing_decisions_total", decision="pinned") == 10, "10 pinned decisions")


@test
def request_bodies_in_several_data_frames_with_and_without_content_length():
    # A body goes to the worker as its DATA frames arrive: straight into the worker connection
    # when nothing waits ahead of it, chunk-framed when the client gave no content-length.
    w = Worker("pieces", max_concurrency=16)
    lb = Balancer([w.address])
    lb.wait_healthy(1)
    c = H2Client("127.0.0.1", lb.port)
    sids = {}
    for i, with_length in enumerate((True, False, True, False)):
        body = rpc("/echo", {"i": i, "pad": "x" * (3000 * i)}, id=i)
        sid = c.new_stream_id()
        c.send_headers(sid, request_fields(content_length=len(body) if with_length else None))
        cuts = [0, 1, len(body) // 3, len(body) - 1, len(body)]
        for a, b in zip(cuts, cuts[1:]):
            c.send_data(sid, body[a:b], end_stream=b == len(body))
            time.sleep(0.02)
        sids[sid] = (i, with_length)
    c.wait(lambda: all(c.streams[s].closed for s in sids), what="every stream")
    for sid, (i, with_length) in sids.items():
        s = c.streams[sid]
        out = json.loads(bytes(s.data)) if s.status == 200 else None
        check(out is not None and out["result"]["output"] == {"i": i, "pad": "x" * (3000 * i)},
              f"stream {sid} (content-length: {with_length}): {s.status} {bytes(s.data)[:200]}")
    c.close()
    wait_for(lambda: lb.in_flight_total() == 0, 5, "in-flight back to 0")


@test
def stream_reset_mid_sse_cancels_only_that_request():
    w = Worker("rst", max_concurrency=16)
    lb, _, _ = tls_balancer([w.address])
    lb.wait_healthy(1)
    c = H2Client("127.0.0.1", lb.port)
    before = w.health()["cancelledStreams"]
    held = c.request(rpc("/stream", {"events": 1, "hold": True}))
    other = c.request(rpc("/stream", {"events": 6, "interval_ms": 150}))
    c.wait(lambda: len(c.streams[held].data) > 0, what="first event of the held stream")
    wait_for(lambda: lb.in_flight_total() == 2, 5, "two requests in flight")
    c.send_rst(held, h2raw.CANCEL)
    deadline = time.monotonic() + 10
    while w.health()["cancelledStreams"] != before + 1:  # keep reading the other stream meanwhile
        check(time.monotonic() < deadline, "the worker saw the cancel")
        c.poll(0.05)
    c.wait(lambda: c.streams[other].closed, what="the other stream")
    events = sse_events(bytes(c.streams[other].data))
    check(c.streams[other].reset_code is None and len(events) == 7 and events[-1]["result"]["events"] == 6,
          f"other stream unaffected: {events}")
    wait_for(lambda: lb.in_flight_total() == 0, 5, "in-flight back to 0")
    after = c.request(rpc("/echo", {"after": True}))  # the connection is still good
    c.wait(lambda: c.streams[after].closed, what="a new stream")
    check(c.streams[after].status == 200 and c.goaway is None, "new stream after the reset")
    c.close()

    # The same with curl: one transfer cut by --max-time while another keeps the connection open.
    before = w.health()["cancelledStreams"]
    url = f"https://127.0.0.1:{lb.tls_port}/"
    results = curl_parallel([
        ("held", tls_curl_args() + post_args(body_file("held.json", rpc("/stream", {"events": 1, "hold": True})))
         + ["--max-time", "1", "-o", path("held.out")], url),
        ("long", tls_curl_args() + post_args(body_file("long.json", rpc("/stream", {"events": 4, "interval_ms": 500})))
         + ["-o", path("long.out")], url),
    ])
    check(results["held"]["exit"] == 28 and results["held"]["code"] == 200, f"held transfer timed out: {results}")
    check(results["long"]["exit"] == 0 and results["long"]["code"] == 200, results)
    check(results["held"]["connects"] + results["long"]["connects"] == 1, "both on one connection")
    check(sse_events(read("long.out"))[-1]["result"]["events"] == 4, "the long transfer got every event")
    wait_for(lambda: w.health()["cancelledStreams"] == before + 1, 10, "the worker saw curl's reset")
    wait_for(lambda: lb.in_flight_total() == 0, 5, "in-flight back to 0")


@test
def slow_reader_on_one_stream_does_not_hold_up_the_others():
    w = Worker("slow", max_concurrency=16)
    lb, _, _ = tls_balancer([w.address])
    lb.wait_healthy(1)
    url = f"https://127.0.0.1:{lb.tls_port}/"
    # About 4 s at the limited rate: a wide margin over the fast transfers even on a loaded machine.
    size = 4 * MiB
    transfers = [("slow", tls_curl_args() + post_args(body_file("slow.json", rpc("/blob", {"bytes": size, "seed": 7})))
                  + ["--limit-rate", "1000k", "-o", path("slow.bin")], url)]
    for i in range(4):
        transfers.append((f"echo{i}", tls_curl_args() + post_args(body_file(f"e{i}.json", rpc("/echo", {"i": i})))
                          + ["-o", path(f"e{i}.out")], url))
    transfers.append(("sse", tls_curl_args() + post_args(body_file("s.json", rpc("/stream", {"events": 3})))
                      + ["-o", path("s.out")], url))
    transfers.append(("blob", tls_curl_args() + post_args(body_file("b.json", rpc("/blob", {"bytes": 256 * KiB, "seed": 8})))
                      + ["-o", path("b.bin")], url))
    results = curl_parallel(transfers)
    check(all(r["code"] == 200 and r["exit"] == 0 for r in results.values()), results)
    check(sum(r["connects"] for r in results.values()) == 1, "one connection")
    slow = results.pop("slow")
    check(slow["time"] > 2.0, f"the slow transfer was rate-limited ({slow['time']}s)")
    late = {t: r["time"] for t, r in results.items() if r["time"] >= slow["time"]}
    check(not late, f"every fast transfer finished before the slow one ({slow['time']}s): {late}")
    check(hashlib.sha256(read("slow.bin")).hexdigest() == example_worker.blob_sha256(size, 7), "slow blob intact")
    check(hashlib.sha256(read("b.bin")).hexdigest() == example_worker.blob_sha256(256 * KiB, 8), "fast blob intact")

    # Flow control proper: a stream whose window the client keeps shut gets no more than that
    # window, while a 4 MiB response on another stream of the same connection goes through.
    c = H2Client("127.0.0.1", lb.port)
    stalled = c.new_stream_id()
    c.stalled.add(stalled)
    c.send_headers(stalled, request_fields(content_length=len(rpc("/blob", {"bytes": 2 * MiB, "seed": 9}))))
    c.send_data(stalled, rpc("/blob", {"bytes": 2 * MiB, "seed": 9}), end_stream=True)
    fast = c.request(rpc("/blob", {"bytes": 4 * MiB, "seed": 10}))
    c.wait(lambda: c.streams[fast].closed, timeout=20, what="the fast 4 MiB stream")
    check(hashlib.sha256(c.streams[fast].data).hexdigest() == example_worker.blob_sha256(4 * MiB, 10), "fast intact")
    s = c.streams[stalled]
    check(not s.closed and len(s.data) <= 65535, f"stalled stream got only its window ({len(s.data)} bytes)")
    c.stalled.discard(stalled)
    c.send_window_update(stalled, 4 * MiB)
    c.wait(lambda: s.closed, timeout=20, what="the stalled stream, once opened")
    check(s.status == 200 and hashlib.sha256(s.data).hexdigest() == example_worker.blob_sha256(2 * MiB, 9),
          "stalled blob intact")
    c.close()
    wait_for(lambda: lb.in_flight_total() == 0, 5, "in-flight back to 0")


def h2load(args, timeout=60):
    proc = subprocess.run(["h2load", *args], capture_output=True, text=True, timeout=timeout)
    text = proc.stdout
    codes = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", text)
    done = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored",
                     text)
    rate = re.search(r"finished in [\d.]+m?s, ([\d.]+) req/s", text)
    check(codes and done and rate, f"h2load output: {text[-800:]} {proc.stderr[-300:]}")
    return {"2xx": int(codes.group(1)), "non2xx": sum(int(codes.group(i)) for i in (2, 3, 4)),
            "succeeded": int(done.group(4)), "failed": int(done.group(5)), "errored": int(done.group(6)),
            "rps": float(rate.group(1))}


@test
def h2load_thousand_requests_all_2xx():
    workers = [Worker(f"hl{i}", max_concurrency=100) for i in range(2)]
    lb, _, _ = tls_balancer([w.address for w in workers])
    lb.wait_healthy(2)
    body = body_file("h2load.json", rpc("/echo", {"load": True}))
    common = ["-d", body, "-H", "content-type: application/json"]
    h2 = h2load(["-n", "1000", "-c", "4", "-m", "20", *common, f"http://127.0.0.1:{lb.port}/"])
    check(h2["2xx"] == 1000 and h2["non2xx"] == 0 and h2["errored"] == 0, f"h2c: {h2}")
    tls = h2load(["-n", "400", "-c", "2", "-m", "10", *common, f"https://127.0.0.1:{lb.tls_port}/"])
    check(tls["2xx"] == 400 and tls["errored"] == 0, f"h2 over TLS: {tls}")
    # Same backends, same number of requests in flight (80) over HTTP/1.1, for comparison.
    h1 = h2load(["--h1", "-n", "1000", "-c", "80", "-m", "1", *common, f"http://127.0.0.1:{lb.port}/"])
    check(h1["2xx"] == 1000, f"HTTP/1.1: {h1}")
    print(f"      h2load through the balancer: h2c {h2['rps']:.0f} req/s (-c 4 -m 20), "
          f"HTTP/1.1 {h1['rps']:.0f} req/s (-c 80), h2 over TLS {tls['rps']:.0f} req/s (-c 2 -m 10)", flush=True)
    wait_for(lambda: lb.in_flight_total() == 0, 5, "in-flight back to 0")


@test
def streams_beyond_the_limit_are_refused_not_fatal():
    w = Worker("lim", max_concurrency=16)
    lb = Balancer([w.address], args=["--h2-max-concurrent-streams", "3"])
    lb.wait_healthy(1)
    hold = rpc("/stream", {"events": 1, "hold": True})

    # After the SETTINGS exchange: the client knows the limit and breaks it anyway.
    c = H2Client("127.0.0.1", lb.port)
    h2_settled(c)
    check(c.server_settings.get(h2raw.MAX_CONCURRENT_STREAMS) == 3, f"advertised limit: {c.server_settings}")
    held = [c.request(hold) for _ in range(3)]
    c.wait(lambda: all(len(c.streams[s].data) for s in held), what="three held streams")
    executions = w.health()["executions"]
    extra = [c.request(rpc("/echo")) for _ in range(2)]
    c.wait(lambda: all(c.streams[s].closed for s in extra), what="the excess streams' fate")
    for s in extra:
        check(c.streams[s].reset_code == h2raw.REFUSED_STREAM, f"stream {s}: {c.streams[s].reset_code}")
    c.poll(0.2)
    check(c.goaway is None and not c.eof, f"the connection lives on: {c.goaway}")
    check(not any(c.streams[s].closed for s in held), "held streams untouched")
    check(w.health()["executions"] == executions, "refused streams never reached the worker")
    c.send_rst(held[0])
    wait_for(lambda: lb.in_flight_total() == 2, 5, "a slot freed")
    again = c.request(rpc("/echo"))
    c.wait(lambda: c.streams[again].closed, what="a stream within the limit")
    check(c.streams[again].status == 200, "a stream within the limit is served")
    c.close()

    # Before the client has acknowledged the limit (RFC 9113 §5.1.2 allows the race): the same.
    c = H2Client("127.0.0.1", lb.port)
    streams = [c.request(hold) for _ in range(5)]  # sent before reading the balancer's SETTINGS
    c.wait(lambda: sum(1 for s in streams if len(c.streams[s].data)) == 3
           and sum(1 for s in streams if c.streams[s].reset_code == h2raw.REFUSED_STREAM) == 2,
           what="three served, two refused")
    check(c.goaway is None, c.goaway)
    c.close()
    wait_for(lambda: lb.in_flight_total() == 0, 5, "in-flight back to 0")


@test
def malformed_requests_are_stream_errors_that_never_reach_a_worker():
    w = Worker("bad")
    lb = Balancer([w.address], args=["--h2-max-header-list-size", "4096"])
    lb.wait_healthy(1)
    body = rpc("/echo", {"x": 1})
    base = [(":method", "POST"), (":scheme", "http"), (":authority", "lb.test"), (":path", "/")]
    head_cases = [
        ("upper-case field name", base + [("X-Upper", "1")]),
        ("connection", base + [("connection", "keep-alive")]),
        ("keep-alive", base + [("keep-alive", "timeout=5")]),
        ("proxy-connection", base + [("proxy-connection", "keep-alive")]),
        ("transfer-encoding", base + [("transfer-encoding", "chunked")]),
        ("upgrade", base + [("upgrade", "websocket")]),
        ("te other than trailers", base + [("te", "gzip")]),
        ("pseudo-header after a regular field", base[:3] + [("x-a", "1"), (":path", "/")]),
        ("unknown pseudo-header", base + [(":foo", "bar")]),
        ("missing :path", base[:3]),
        ("two :path fields", base + [(":path", "/again")]),
        ("field name with a space", base + [("x a", "1")]),
    ]
    upstream_before = lb.metric("stepflow_lb_upstream_responses_total") or 0
    rejected_before = lb.metric("stepflow_lb_rejected_requests_total") or 0
    executions = w.health()["executions"]
    c = H2Client("127.0.0.1", lb.port)
    sids = {}
    for name, fields in head_cases:
        sid = c.new_stream_id()
        c.send_headers(sid, fields, end_stream=True)
        sids[name] = sid
    for name, cl in (("content-length above the DATA", len(body) + 50), ("content-length below the DATA", 10)):
        sid = c.new_stream_id()
        c.send_headers(sid, base + [("content-type", "application/json"), ("content-length", str(cl))])
        c.send_data(sid, body, end_stream=True)
        sids[name] = sid
    c.wait(lambda: all(c.streams[s].closed for s in sids.values()), what="every malformed stream's end")
    for name, sid in sids.items():
        s = c.streams[sid]
        check(s.reset_code == h2raw.PROTOCOL_ERROR and s.status is None,
              f"{name}: RST_STREAM {h2raw.ERROR_NAMES.get(s.reset_code, s.reset_code)}, status {s.status}")
    # A header list over --h2-max-header-list-size is answered 431 by the balancer.
    big = c.request(body, headers=[("x-big", "a" * 5000)])
    c.wait(lambda: c.streams[big].closed, what="oversized header list")
    check(c.streams[big].status == 431, f"431 for the oversized list, got {c.streams[big].status}")
    # What nghttp2 accepts but the HTTP/1.1 rules the worker is spoken to with do not: a
    # content-length of more than 18 digits is answered 400 by the balancer.
    long_cl = c.new_stream_id()
    c.send_headers(long_cl, base + [("content-length", "1" + "0" * 18)])
    c.wait(lambda: c.streams[long_cl].status is not None, what="19-digit content-length")
    check(c.streams[long_cl].status == 400, f"400 for a 19-digit content-length, got {c.streams[long_cl].status}")
    check(c.goaway is None, f"stream errors, not a connection error: {c.goaway}")
    check((lb.metric("stepflow_lb_upstream_responses_total") or 0) == upstream_before, "no worker answered any")
    check(w.health()["executions"] == executions, "the worker ran none of them")
    check(lb.metric("stepflow_lb_rejected_requests_total") - rejected_before == len(head_cases) + 2,
          "malformed heads, the oversized list and the long content-length counted as rejected")
    check(not lb.metric("stepflow_lb_requests_total", status="0"), "no request logged without a status")
    # The connection still serves well-formed requests (te: trailers is allowed).
    ok = c.request(body, headers=[("te", "trailers")])
    c.wait(lambda: c.streams[ok].closed, what="a valid request")
    check(c.streams[ok].status == 200 and json.loads(bytes(c.streams[ok].data))["result"]["output"] == {"x": 1},
          "valid request served on the same connection")
    c.close()


@test
def rapid_reset_and_continuation_floods_end_the_connection():
    w = Worker("flood")
    lb = Balancer([w.address])
    lb.wait_healthy(1)
    executions = w.health()["executions"]
    # Rapid reset (CVE-2023-44487): streams opened and reset at once. Pinned to an unknown
    # instance and left waiting for a body, so they are answered locally, never upstream.
    c = H2Client("127.0.0.1", lb.port)
    frames = bytearray()
    # The library allows a burst of 1000 resets and refills 33 a second; 4000 exceed that even
    # when a slow (sanitizer) build takes seconds to read them.
    for i in range(4000):
        sid = 2 * i + 1
        frames += c._frame(h2raw.HEADERS, h2raw.END_HEADERS, sid, h2raw.encode_headers(
            request_fields(extra=[("stepflow-instance-id", "nobody")])))
        frames += c._frame(h2raw.RST_STREAM, 0, sid, (h2raw.CANCEL).to_bytes(4, "big"))
    try:
        c.sock.sendall(bytes(frames))
    except OSError:
        pass  # the balancer may close before taking it all
    check(c.wait_closed(10), "connection closed")
    check(c.goaway and c.goaway[1] != h2raw.NO_ERROR, f"GOAWAY with an error: {c.goaway}")
    c.close()
    # CONTINUATION flood: a header block that goes on and on. The balancer allows 8
    # CONTINUATION frames; the 9th ends the connection. Nothing more is sent, so the GOAWAY is
    # not lost to a reset caused by unread bytes.
    c = H2Client("127.0.0.1", lb.port)
    flood = c._frame(h2raw.HEADERS, 0, 1, h2raw.encode_headers(request_fields()))
    for i in range(9):
        flood += c._frame(h2raw.CONTINUATION, 0, 1, h2raw.encode_headers([(f"x-c{i}", "v")]))
    c.sock.sendall(flood)
    check(c.wait_closed(10), "connection closed")
    check(c.goaway and c.goaway[1] == h2raw.ENHANCE_YOUR_CALM, f"GOAWAY ENHANCE_YOUR_CALM: {c.goaway}")
    c.close()
    # Neither touched the worker, and a well-behaved connection is still served.
    c = H2Client("127.0.0.1", lb.port)
    ok = c.request(rpc("/echo"))
    c.wait(lambda: c.streams[ok].closed, what="a normal request")
    check(c.streams[ok].status == 200, "normal request served")
    check(w.health()["executions"] == executions + 1, "only the normal request reached the worker")
    c.close()


def handshake(port, ctx, server_hostname="127.0.0.1"):
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        return ctx.wrap_socket(s, server_hostname=server_hostname)
    except Exception:
        s.close()
        raise


@test
def tls_alpn_versions_ciphers_and_bad_certificates():
    w = Worker("alpn")
    lb, cert, key = tls_balancer([w.address])
    ca = pki()
    for offer, chosen in ((["h2", "http/1.1"], "h2"), (["http/1.1", "h2"], "h2"), (["http/1.1"], "http/1.1"),
                          (["foo", "http/1.1"], "http/1.1"), (None, None)):
        t = handshake(lb.tls_port, ca.client_context(offer))
        check(t.selected_alpn_protocol() == chosen, f"ALPN {offer} -> {t.selected_alpn_protocol()}")
        if chosen != "h2":
            t.sendall(b"GET /health HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
            check(t.recv(64).startswith(b"HTTP/1.1 200"), f"HTTP/1.1 served for ALPN {offer}")
        t.close()
    try:
        handshake(lb.tls_port, ca.client_context(["foo"])).close()
        raise AssertionError("a client offering only 'foo' completed the handshake")
    except ssl.SSLError as e:
        check("no application protocol" in str(e).lower(), f"no_application_protocol alert: {e}")
    # TLS 1.2 gets a forward-secret AEAD suite; a CBC-only client is refused.
    ctx = ca.client_context()
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    t = handshake(lb.tls_port, ctx)
    suite = t.cipher()[0]
    check(t.version() == "TLSv1.2" and suite.startswith("ECDHE-") and ("GCM" in suite or "CHACHA" in suite),
          f"TLS 1.2 suite {t.cipher()}")
    t.close()
    check(handshake(lb.tls_port, ca.client_context()).version() == "TLSv1.3", "TLS 1.3 by default")
    ctx = ca.client_context()
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers("ECDHE-ECDSA-AES128-SHA")
    try:
        handshake(lb.tls_port, ctx).close()
        raise AssertionError("a CBC-only TLS 1.2 client was accepted")
    except ssl.SSLError:
        pass
    # Start-up errors: exit 2 and a message naming the file.
    other_cert, other_key = ca.issue("other", "other", 4242)
    base = [lb_binary(), "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--backends", w.address,
            "--tls-listen", "127.0.0.1:0"]
    missing = path("no-such-dir/cert.pem")
    for args, needle in (([*base, "--tls-cert", missing, "--tls-key", key], missing),
                         ([*base, "--tls-cert", cert, "--tls-key", path("nope.key")], path("nope.key")),
                         ([*base, "--tls-cert", cert, "--tls-key", other_key], other_key),
                         ([*base, "--tls-cert", key, "--tls-key", key], key),
                         ([*base[:-2]] + ["--tls-cert", cert, "--tls-key", key], "--tls-listen"),
                         ([*base], "--tls-cert")):
        proc = subprocess.run(args, capture_output=True, text=True, timeout=10)
        check(proc.returncode == 2, f"exit 2 for {args[-4:]}: {proc.returncode} {proc.stderr}")
        check(needle in proc.stderr, f"message names {needle!r}: {proc.stderr}")


def peer_serial(port, ca):
    t = handshake(port, ca.client_context(["http/1.1"]))
    try:
        cert = t.getpeercert()
        return cert["serialNumber"], dict(x[0] for x in cert["subject"])["commonName"]
    finally:
        t.close()


@test
def sighup_reloads_the_certificate_without_dropping_connections():
    w = Worker("hup")
    ca = pki()
    cert, key = ca.issue("hup", "before-reload", 1001)
    lb = Balancer([w.address], args=["--tls-listen", "127.0.0.1:0", "--tls-cert", cert, "--tls-key", key])
    check(peer_serial(lb.tls_port, ca) == ("03E9", "before-reload"), "the first certificate")
    # Connections opened before the reload: HTTP/1.1 keep-alive and HTTP/2.
    h1 = http.client.HTTPSConnection("127.0.0.1", lb.tls_port, context=ca.client_context(["http/1.1"]), timeout=10)
    h1.request("POST", "/", rpc("/echo", {"n": 1}), {"Content-Type": "application/json"})
    r = h1.getresponse()
    check(r.status == 200 and r.read(), "HTTP/1.1 over TLS before the reload")
    h2 = H2Client("127.0.0.1", lb.tls_port, ssl_context=ca.client_context(["h2"]))
    s = h2.request(rpc("/echo", {"n": 1}))
    h2.wait(lambda: h2.streams[s].closed, what="h2 before")
    held = h2.request(rpc("/stream", {"events": 1, "hold": True}))
    h2.wait(lambda: len(h2.streams[held].data) > 0, what="an SSE stream open across the reload")

    ca.issue("hup", "after-reload", 2002, cert_path=cert, key_path=key)  # new key and certificate
    lb.signal(signal.SIGHUP)
    wait_for(lambda: lb.logs("TLS certificate reloaded"), 10, "reload logged")
    check(peer_serial(lb.tls_port, ca) == ("07D2", "after-reload"), "new connections see the new certificate")

    h1.request("POST", "/", rpc("/echo", {"n": 2}), {"Content-Type": "application/json"})
    r = h1.getresponse()
    check(r.status == 200 and json.loads(r.read())["result"]["output"] == {"n": 2}, "old HTTP/1.1 connection still works")
    check(h1.sock.getpeercert()["serialNumber"] == "03E9", "and still speaks with the old certificate")
    s = h2.request(rpc("/echo", {"n": 2}))
    h2.wait(lambda: h2.streams[s].closed, what="h2 after")
    check(h2.streams[s].status == 200 and not h2.streams[held].closed and h2.goaway is None,
          "old HTTP/2 connection still works, its SSE stream still open")
    h2.send_rst(held)
    h2.close()
    h1.close()

    # A reload that fails keeps the certificate in use.
    with open(cert, "w") as f:
        f.write("-----BEGIN CERTIFICATE-----\nnot a certificate\n-----END CERTIFICATE-----\n")
    lb.signal(signal.SIGHUP)
    wait_for(lambda: lb.logs("TLS certificate reload failed: keeping the previous one"), 10, "failed reload logged")
    check(peer_serial(lb.tls_port, ca) == ("07D2", "after-reload"), "the previous certificate is kept")
    check(lb.proc.poll() is None, "still running")


class TlsSniffingFront:
    """A stand-in for a worker behind TLS: terminates TLS and relays to a plain worker. A
    connection that does not start with a TLS record is counted in `plain` and closed: with
    --upstream-tls, health probes and live traffic must both speak TLS."""

    def __init__(self, target_port, cert, key):
        self.target_port = target_port
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(cert, key)
        self.ctx.set_alpn_protocols(["http/1.1"])
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.tls_ok = self.tls_failed = self.plain = 0
        self.lock = threading.Lock()
        self.running = True
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while self.running:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        try:
            conn.settimeout(10)
            first = conn.recv(1, socket.MSG_PEEK)
            if first == b"\x16":
                try:
                    conn = self.ctx.wrap_socket(conn, server_side=True)
                except (ssl.SSLError, OSError):
                    with self.lock:
                        self.tls_failed += 1
                    conn.close()
                    return
                with self.lock:
                    self.tls_ok += 1
            else:
                with self.lock:
                    self.plain += 1
                return
            with socket.create_connection(("127.0.0.1", self.target_port), timeout=10) as upstream:
                conn.settimeout(None)
                upstream.settimeout(None)
                self._pump(conn, upstream)
        except OSError:
            pass
        finally:
            conn.close()

    @staticmethod
    def _pump(client, upstream):
        """Copies bytes both ways until either side closes."""
        peer = {client: upstream, upstream: client}
        while True:
            ready = [client] if isinstance(client, ssl.SSLSocket) and client.pending() else []
            if not ready:
                ready, _, _ = select.select([client, upstream], [], [], 30)
            if not ready:
                return
            for s in ready:
                data = s.recv(65536)
                if not data:
                    return
                peer[s].sendall(data)

    def close(self):
        self.running = False
        self.listener.close()


@test
def upstream_tls_verifies_workers():
    w = Worker("utls", max_concurrency=16)
    ca = pki()
    cert, key = ca.issue("worker", "worker.test", 3003)
    front = TlsSniffingFront(w.port, cert, key)
    try:
        echo = rpc("/echo", {"tls": True})
        lb = Balancer([f"127.0.0.1:{front.port}"], args=["--upstream-tls", "on", "--upstream-ca", ca.ca_cert])
        lb.wait_healthy(1)
        for _ in range(3):
            r = lb.post(echo)
            check(r.status == 200 and r.json()["result"]["instanceId"] == w.instance_id, f"{r.status} {r.body[:200]}")
        reader_body = json.loads(rpc("/stream", {"events": 3}))
        r = lb.post(reader_body)
        check(r.status == 200 and len(sse_events(r.body)) == 4, "SSE through an upstream TLS connection")
        check(front.tls_ok >= 1 and front.plain == 0,
              f"probes and requests went over TLS ({front.tls_ok} TLS, {front.plain} clear connections)")
        lb.stop()

        # --upstream-sni names the certificate's DNS name instead of the address.
        lb = Balancer([f"127.0.0.1:{front.port}"], args=["--upstream-tls", "on", "--upstream-ca", ca.ca_cert,
                                                        "--upstream-sni", "localhost"])
        lb.wait_healthy(1)
        check(lb.post(echo).status == 200, "verified by DNS name")
        lb.stop()

        # A CA that did not sign the worker's certificate, or a name it does not carry: the health
        # probe's handshake fails, so the worker never becomes an instance and nothing is sent.
        wrong_ca = pki("wrong")
        address = f"127.0.0.1:{front.port}"
        for args in (["--upstream-ca", wrong_ca.ca_cert], ["--upstream-ca", ca.ca_cert, "--upstream-sni", "elsewhere.test"]):
            failed_before = front.tls_failed
            lb = Balancer([address], args=["--upstream-tls", "on", "--cold-start-timeout", "0", *args], wait_ready=False)
            wait_for(lambda: (lb.backend(address) or {}).get("lastError"), 10, "the probe's failure is reported")
            check(lb.backend(address)["state"] == "unreachable", lb.backend(address))
            check("TLS" in lb.backend(address)["lastError"], lb.backend(address)["lastError"])
            r = lb.post(echo)
            check(r.status == 503 and r.json()["error"]["code"] == -32000, f"{args}: {r.status} {r.body[:200]}")
            wait_for(lambda: front.tls_failed > failed_before, 5, "the worker side saw the handshake fail")
            lb.stop()

        # --upstream-insecure skips verification (for a lab, not for production).
        lb = Balancer([f"127.0.0.1:{front.port}"], args=["--upstream-tls", "on", "--upstream-ca", wrong_ca.ca_cert,
                                                        "--upstream-insecure", "on"])
        lb.wait_healthy(1)
        check(lb.post(echo).status == 200, "unverified TLS works with --upstream-insecure")
    finally:
        front.close()


@test
def stalled_h2_client_is_dropped_after_the_send_timeout():
    w = Worker("h2stuck")
    lb = Balancer([w.address], threads=1, args=["--client-send-timeout", "500ms"])
    # Windows wide open, then no reading at all: what the balancer sends piles up in front of us.
    c = H2Client("127.0.0.1", lb.port, initial_window=2**31 - 1, auto_window=False)
    c.send_frame(h2raw.WINDOW_UPDATE, 0, 0, struct.pack(">I", 2**31 - 1 - 65535))
    c.request(body=rpc("/blob", {"bytes": 32 * 1024 * 1024, "chunked": True, "seed": 5}))
    wait_for(lambda: lb.in_flight_total() == 1, 5, "response in flight")
    wait_for(lambda: lb.in_flight_total() == 0, 10, "exchange ended by the send timeout")
    check(c.wait_closed(10), "the balancer closed the connection")
    c.close()


@test
def a_stream_id_lower_than_one_opened_is_a_connection_error():
    # RFC 9113 §5.1.1: stream ids only grow; a HEADERS opening a lower one is PROTOCOL_ERROR.
    w = Worker("order")
    lb = Balancer([w.address])
    c = H2Client("127.0.0.1", lb.port)
    c.send_headers(5, request_fields(method="GET", path_="/health"), end_stream=True)
    c.wait(lambda: c.streams[5].closed, what="stream 5 answered")
    c.send_headers(3, request_fields(method="GET", path_="/health"), end_stream=True)
    check(c.wait_closed(10), "connection closed")
    check(c.goaway and c.goaway[1] == h2raw.PROTOCOL_ERROR, f"GOAWAY PROTOCOL_ERROR: {c.goaway}")
    check(c.streams[3].status is None, "the lower stream was not answered")
    c.close()


@test
def tls_connections_end_with_close_notify():
    w = Worker("notify")
    lb, _, _ = tls_balancer([w.address])
    ctx = pki().client_context(alpn=["http/1.1"])
    s = socket.create_connection(("127.0.0.1", lb.tls_port), timeout=10)
    tls = ctx.wrap_socket(s, server_hostname="127.0.0.1", suppress_ragged_eofs=False)
    tls.sendall(b"GET /health HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    data = bytearray()
    while True:
        try:
            chunk = tls.recv(65536)
        except ssl.SSLEOFError as e:
            raise AssertionError(f"the balancer closed without close_notify ({e}) after {bytes(data[:60])!r}")
        if not chunk:
            break  # a clean TLS close: close_notify received
        data += chunk
    check(data.startswith(b"HTTP/1.1 "), bytes(data[:100]))
    tls.close()


if __name__ == "__main__":
    run_tests()
