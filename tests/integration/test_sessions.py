"""Health-check modes and sessions learned from response headers (issue 13).

Backends are tests/worker/session_server.py processes: plain HTTP servers without a Stepflow
/health that mint Mcp-Session-Id ids the way MCP Streamable HTTP servers do. The balancer is the
real binary; several replicas share a sealing key behind a round-robin TCP relay.
"""

import http.client
import json
import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

from harness import Balancer, HERE, ROOT, _started, check, run_tests, test, wait_for
from session_lib import RoundRobinRelay, key_file, new_key, write_atomically

SERVER = os.path.join(ROOT, "tests", "worker", "session_server.py")
H = "Mcp-Session-Id"


class SessionServer:
    def __init__(self, name):
        self.name = name
        self.proc = subprocess.Popen([sys.executable, SERVER, "--name", name], stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True)
        _started.append(self.proc)
        self.port = int(self.proc.stdout.readline().split()[1])
        self.address = f"127.0.0.1:{self.port}"

    def stats(self):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        conn.request("GET", "/stats")
        return json.loads(conn.getresponse().read())

    def kill(self):
        self.proc.kill()
        self.proc.wait(timeout=10)


def request(port, method, session=None, body=b"{}", extra=None):
    """(status, headers dict lower-cased, parsed JSON body) of one request on a fresh connection."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    headers = {"Content-Type": "application/json", **(extra or {})}
    if session:
        headers[H] = session
    conn.request(method, "/mcp", body=body if method == "POST" else None, headers=headers)
    r = conn.getresponse()
    data = r.read()
    conn.close()
    return r.status, {k.lower(): v for k, v in r.getheaders()}, json.loads(data) if data else None


def start_session(port):
    status, headers, body = request(port, "POST")
    check(status == 200 and H.lower() in headers, f"initialize: {status} {headers}")
    return headers[H.lower()], body["server"]


def servers_and_balancer(n=3, args=None, **kw):
    servers = [SessionServer(chr(ord("a") + i)) for i in range(n)]
    lb = Balancer([s.address for s in servers], args=["--health-check", "http", "--health-path", "/stats",
                                                        "--session-header", H] + (args or []), **kw)
    return servers, lb


def run_sessions(ports, count=20, calls=5):
    """`count` concurrent sessions, each `calls` requests spread over `ports` (balancer replicas),
    ending with a DELETE. Returns (sessions, requests, split): split counts sessions served by
    more than one server."""
    def one(i):
        sid, first = start_session(ports[i % len(ports)])
        served = {first}
        for k in range(calls):
            status, _, body = request(ports[(i + k + 1) % len(ports)], "POST", sid)
            check(status == 200, f"session call: {status} {body}")
            served.add(body["server"])
        status, _, body = request(ports[(i + calls + 1) % len(ports)], "DELETE", sid)
        check(status == 200 and body.get("ended"), f"DELETE: {status} {body}")
        served.add(body["server"])
        return len(served) > 1

    with ThreadPoolExecutor(count) as pool:
        split = sum(pool.map(one, range(count)))
    return count, count * (calls + 2), split


# --------------------------------------------------------------------------- health-check modes

@test
def stepflow_mode_names_the_flag_for_a_plain_backend():
    s = SessionServer("a")
    lb = Balancer([s.address], args=["--health-path", "/stats", "--cold-start-timeout", "0"], wait_ready=False)
    refused = lambda: lb.logs("worker's instanceId refused: instance not routable")
    wait_for(refused, 10, "the configuration error")
    reason = refused()[0]["reason"]
    check("--health-check http" in reason and "instanceId" in reason, reason)
    status, body = lb.admin_get("/ready")
    ready = json.loads(body)
    # Ready (it can answer), but /ready says why no instance takes work.
    check(status == 200 and "--health-check" in ready["notRoutable"][0]["reason"], ready)
    b = lb.backend(s.address)
    check(b["routable"] is False and "--health-check" in b["reason"], b)
    status, _, _ = request(lb.port, "POST")
    check(status == 503, f"not routable yet: {status}")


@test
def stepflow_mode_names_the_flag_for_nginx_style_ok():
    s = SessionServer("a")  # /stats answers {"requests":..}; the root of an nginx says {"status":"ok"}
    lb = Balancer([s.address], args=["--health-path", "/ok"], wait_ready=False)
    logged = lambda: lb.logs("backend is not routable: configuration error")
    wait_for(logged, 10, "the configuration error")
    check("--health-check http" in logged()[0]["reason"], logged()[0])


@test
def http_tcp_and_off_modes_route_plain_backends():
    for mode in ("http", "tcp", "off"):
        servers = [SessionServer("a"), SessionServer("b")]
        args = ["--health-check", mode]
        if mode == "http":
            args += ["--health-path", "/stats"]
        lb = Balancer([s.address for s in servers], args=args)
        lb.wait_healthy(2)
        # Sequential requests tie on load and ties break at random: up to 64 tries, so a fair
        # coin fails this only with probability 2^-63 (8 tries failed about once in 128 runs).
        seen = set()
        for _ in range(64):
            status, headers, body = request(lb.port, "POST")
            check(status == 200, f"{mode}: {status}")
            seen.add(body["server"])
            if seen == {"a", "b"}:
                break
        check(seen == {"a", "b"}, f"{mode}: least load used both servers: {seen}")
        ids = {b["instanceId"] for b in lb.backends()}
        check(ids == {s.address for s in servers}, f"{mode}: ids derived from the address: {ids}")
        lb.stop()
        for s in servers:
            s.kill()


@test
def http_mode_takes_an_instance_out_when_its_path_fails():
    s = SessionServer("a")
    lb = Balancer([s.address], args=["--health-check", "http"], wait_ready=False)  # /health answers 404
    wait_for(lambda: (lb.backend(s.address) or {}).get("reason") == "health check answered 404", 10, "404 reason")
    status, body = lb.admin_get("/ready")
    check(status == 200 and json.loads(body)["notRoutable"][0]["reason"] == "health check answered 404", body)


# --------------------------------------------------------------------------- learned sessions

@test
def learned_sessions_stay_on_their_instance():
    servers, lb = servers_and_balancer()
    lb.wait_healthy(3)
    sessions, requests, split = run_sessions([lb.port])
    check(split == 0, f"{split} of {sessions} sessions split")
    used = sum(1 for s in servers if any(s.stats()["session_ids"]))
    check(used >= 2, f"sessions spread by least load over {used} servers")
    check(lb.metric("stepflow_lb_sessions_learned_total") == 20, lb.metric("stepflow_lb_sessions_learned_total"))
    check(lb.metric("stepflow_lb_sessions_ended_total") == 20, "DELETEs ended every session")
    check(lb.metric("stepflow_lb_sessions") == 0, "the table is empty after the DELETEs")
    check("Mcp-Session-Id" not in lb.metrics_text().replace("--session-header", ""), "ids never in metrics")


@test
def learned_sessions_cross_http_versions():
    servers, lb = servers_and_balancer()
    lb.wait_healthy(3)
    sid, first = start_session(lb.port)
    for _ in range(3):
        out = subprocess.run(["curl", "-s", "--http2-prior-knowledge", "-X", "POST", "-d", "{}", "-H", f"{H}: {sid}",
                              f"http://127.0.0.1:{lb.port}/mcp"], capture_output=True, text=True, timeout=10).stdout
        check(json.loads(out)["server"] == first, f"h2 request went to its session's server: {out}")


@test
def a_session_whose_instance_is_ill_gets_503_and_survives_while_others_go_on():
    """Issue 21: an instance still discovered but unhealthy keeps its sessions; they get a
    retryable 503 (Retry-After, the id echoed), and work again once it recovers. 404 is only for
    an instance gone from discovery or restarted as a different one."""
    servers, lb = servers_and_balancer(args=["--max-failures", "1"])
    lb.wait_healthy(3)
    sessions = [start_session(lb.port) for _ in range(9)]
    victim = next(s for s in servers if any(first == s.name for _, first in sessions))
    # Ill: its health checks fail (stopped, not killed), while it is still discovered.
    os.kill(victim.proc.pid, signal.SIGSTOP)
    try:
        wait_for(lambda: lb.backend(victim.address)["state"] == "unhealthy", 10, "victim unhealthy")
        for sid, first in sessions:
            status, headers, body = request(lb.port, "POST", sid, body=b'{"jsonrpc":"2.0","id":7,"method":"tools/call"}')
            if first == victim.name:
                check(status == 503 and "retry-after" in headers and body["id"] == 7, f"{status} {headers} {body}")
            else:
                check(status == 200 and body["server"] == first, f"{status} {body}")
    finally:
        os.kill(victim.proc.pid, signal.SIGCONT)
    wait_for(lambda: lb.backend(victim.address)["state"] == "healthy", 10, "victim healthy again")
    for sid, first in sessions:
        status, _, body = request(lb.port, "POST", sid, body=b'{"jsonrpc":"2.0","id":8,"method":"tools/call"}')
        check(status == 200 and body["server"] == first, f"the session survived: {status} {body}")
    check(lb.metric("stepflow_lb_session_not_found_total", reason="instance-gone") in (None, 0.0), "none forgotten")


@test
def the_table_is_bounded_and_counts_evictions():
    servers, lb = servers_and_balancer(n=1, args=["--max-sessions", "2"])
    lb.wait_healthy(1)
    ids = [start_session(lb.port)[0] for _ in range(3)]
    check(lb.metric("stepflow_lb_sessions") == 2, "bounded")
    check(lb.metric("stepflow_lb_sessions_evicted_total", reason="lru") == 1, "one eviction")
    status, _, _ = request(lb.port, "POST", ids[2])
    check(status == 200, "the newest is kept")


@test
def a_full_table_evicts_and_reports_its_bytes():
    servers, lb = servers_and_balancer(n=1, args=["--max-sessions", "3"])
    lb.wait_healthy(1)
    empty = lb.metric("stepflow_lb_session_table_bytes")
    ids = [start_session(lb.port)[0] for _ in range(3)]
    full = lb.metric("stepflow_lb_session_table_bytes")
    check(full > empty, f"the gauge grows with the sessions: {empty} -> {full}")
    more = [start_session(lb.port)[0] for _ in range(5)]  # never refused: the oldest make room
    check(lb.metric("stepflow_lb_sessions") == 3, "bounded")
    check(lb.metric("stepflow_lb_sessions_evicted_total", reason="lru") == 5, "each new one evicted the oldest")
    for sid in more[-3:]:
        status, _, _ = request(lb.port, "DELETE", sid)
        check(status == 200, "ended")
    check(lb.metric("stepflow_lb_sessions") == 0, "DELETE emptied the table")
    check(lb.metric("stepflow_lb_session_table_bytes") < full, "the ids' memory was given back")
    del ids


@test
def idle_sessions_expire():
    servers, lb = servers_and_balancer(n=1, args=["--session-idle-timeout", "300ms"])
    lb.wait_healthy(1)
    start_session(lb.port)
    check(lb.metric("stepflow_lb_sessions") == 1, "remembered")
    # Another session's traffic, after the first went idle, sheds it.
    def shed():
        start_session(lb.port)
        return lb.metric("stepflow_lb_sessions_evicted_total", reason="idle") >= 1
    wait_for(shed, 10, "idle expiry", interval=0.2)


@test
def mcp_method_header_is_counted_by_known_name():
    servers, lb = servers_and_balancer(n=1)
    lb.wait_healthy(1)
    request(lb.port, "POST", extra={"Mcp-Method": "tools/call"})
    request(lb.port, "POST", extra={"Mcp-Method": "made/up-" + os.urandom(4).hex()})
    check(lb.metric("stepflow_lb_mcp_requests_total", method="tools/call") == 1, "tools/call")
    check(lb.metric("stepflow_lb_mcp_requests_total", method="other") == 1, "unknown names are other")
    check("made/up" not in lb.metrics_text(), "no series from client input")


# --------------------------------------------------------------------------- sealed sessions

@test
def sealed_sessions_across_two_replicas_and_a_restart():
    key = key_file("k1")
    servers = [SessionServer(c) for c in "abc"]
    args = ["--health-check", "http", "--health-path", "/stats", "--session-header", H, "--session-key-file", key]
    replicas = [Balancer([s.address for s in servers], args=args) for _ in range(2)]
    for lb in replicas:
        lb.wait_healthy(3)
    relay = RoundRobinRelay([lb.port for lb in replicas])
    sessions, requests, split = run_sessions([relay.port])
    check(split == 0, f"two replicas: {split} of {sessions} sessions split ({requests} requests)")
    print(f"  two replicas: {sessions} sessions, {requests} requests, {split} split", flush=True)

    sid, first = start_session(replicas[0].port)
    check(sid.startswith("sf2.") and len(sid) < 256 and sid.isascii() and sid.isprintable(), sid)
    backend_ids = set(next(s for s in servers if s.name == first).stats()["session_ids"])
    replicas[0].stop()
    replicas[0] = Balancer([s.address for s in servers], args=args)
    replicas[0].wait_healthy(3)
    status, _, body = request(replicas[0].port, "POST", sid)
    check(status == 200 and body["server"] == first, f"a restarted replica routes the sealed id: {status} {body}")
    seen = set(next(s for s in servers if s.name == first).stats()["session_ids"])
    check(sid not in seen and len(seen - backend_ids) == 1, "the backend sees its own id, never the sealed one")
    relay.close()


@test
def forged_and_foreign_ids_get_404_without_reaching_a_backend():
    key, other = key_file("k2"), key_file("k3")
    servers, lb = servers_and_balancer(args=["--session-key-file", key])
    lb.wait_healthy(3)
    sid, _ = start_session(lb.port)
    before = sum(s.stats()["requests"] for s in servers)
    servers_other, lb_other = servers_and_balancer(n=1, args=["--session-key-file", other])
    foreign, _ = start_session(lb_other.port)
    flipped = sid[:-2] + ("A" if sid[-2] != "A" else "B") + sid[-1]
    for bad in (flipped, sid[:40], "sf1.", "not-sealed-at-all", foreign, sid + "AAAA"):
        status, headers, body = request(lb.port, "POST", bad, body=b'{"jsonrpc":"2.0","id":"x","method":"ping"}')
        check(status == 404 and body["error"]["code"] == -32001 and body["id"] == "x", f"{bad!r}: {status} {body}")
    after = sum(s.stats()["requests"] for s in servers)
    check(after == before, f"no forged id reached a backend ({before} -> {after})")
    check(lb.metric("stepflow_lb_session_not_found_total", reason="invalid-seal") == 6, "counted")


@test
def key_rotation_accepts_the_previous_key():
    old, new = key_file("old"), key_file("new")
    servers, lb = servers_and_balancer(n=2, args=["--session-key-file", old])
    lb.wait_healthy(2)
    sid, first = start_session(lb.port)
    lb.stop()
    lb = Balancer([s.address for s in servers], args=["--health-check", "http", "--health-path", "/stats",
                                                      "--session-header", H, "--session-key-file", new,
                                                      "--session-key-file-previous", old])
    lb.wait_healthy(2)
    status, headers, body = request(lb.port, "POST", sid)
    check(status == 200 and body["server"] == first, f"old id still routes: {status} {body}")
    lb.stop()
    lb = Balancer([s.address for s in servers], args=["--health-check", "http", "--health-path", "/stats",
                                                      "--session-header", H, "--session-key-file", new])
    lb.wait_healthy(2)
    status, _, _ = request(lb.port, "POST", sid)
    check(status == 404, f"after the rotation ends the old key is refused: {status}")


@test
def a_bad_key_file_is_a_clear_start_up_error():
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"stepflow-lb-test-{os.getpid()}-short.key")
    with open(path, "w") as f:
        f.write("too-short\n")
    out = subprocess.run([os.environ.get("STEPFLOW_LB_BIN") or os.path.join(ROOT, "build", "stepflow-lb"),
                          "--backends", "127.0.0.1:1", "--session-header", H, "--session-key-file", path],
                         capture_output=True, text=True, timeout=10)
    check(out.returncode == 2 and "--session-key-file" in out.stderr and "32 bytes" in out.stderr, out.stderr)


def start_with_key_file(path):
    return subprocess.run([os.environ.get("STEPFLOW_LB_BIN") or os.path.join(ROOT, "build", "stepflow-lb"),
                           "--backends", "127.0.0.1:1", "--session-header", H, "--session-key-file", path],
                          capture_output=True, text=True, timeout=10)


@test
def key_files_that_are_not_exactly_a_key_are_refused_at_start_up():
    # The usual mistakes: a 32-character passphrase, `openssl rand -hex 16` without a newline (both
    # once taken as 32 raw bytes), a truncated raw key, an empty file, a directory without keys.
    cases = {
        "passphrase": (b"correct-horse-battery-staple-123", "base64 decoding to 24 bytes"),
        "hex16": (b"00112233445566778899aabbccddeeff", "32 hex digits"),
        "raw31": (bytes(range(0x80, 0x80 + 31)), "not text"),
        "empty": (b"", "no key"),
        "second-line": ((new_key() + "\nnope\n").encode(), "line 2"),
    }
    base = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"stepflow-lb-test-{os.getpid()}-")
    for name, (content, reason) in cases.items():
        path = base + name + ".key"
        with open(path, "wb") as f:
            f.write(content)
        out = start_with_key_file(path)
        check(out.returncode == 2 and path in out.stderr and reason in out.stderr, f"{name}: {out.stderr}")
    empty_dir = base + "no-keys"
    os.makedirs(empty_dir, exist_ok=True)
    out = start_with_key_file(empty_dir)
    check(out.returncode == 2 and empty_dir in out.stderr and "no key file" in out.stderr, out.stderr)
    raw = base + "raw32.key"
    with open(raw, "wb") as f:
        f.write(bytes(range(0x80, 0xa0)))  # 32 bytes that are not text: a raw key
    servers, lb = servers_and_balancer(n=1, args=["--session-key-file", raw])
    lb.wait_healthy(1)
    check(start_session(lb.port)[0].startswith("sf2."), "a raw 32-byte key seals")


@test
def a_key_file_change_is_picked_up_and_a_broken_one_keeps_the_keys_in_use():
    path = key_file("reload")
    servers, lb = servers_and_balancer(n=1, args=["--session-key-file", path])
    lb.wait_healthy(1)
    sid, _ = start_session(lb.port)
    write_atomically(path, "not a key\n")
    wait_for(lambda: lb.metric("stepflow_lb_session_key_reloads_total", result="error") == 1, 10, "the bad file seen")
    status, _, _ = request(lb.port, "POST", sid)
    check(status == 200, f"the keys in use stay: {status}")
    write_atomically(path, new_key() + "\n")  # a new key only: ids sealed before are now foreign
    wait_for(lambda: lb.metric("stepflow_lb_session_key_reloads_total", result="ok") == 1, 10, "the new key loaded")
    status, _, _ = request(lb.port, "POST", sid)
    check(status == 404, f"an id under a dropped key gets 404: {status}")


@test
def ids_sealed_under_an_older_key_are_resealed_on_their_next_response():
    old, new = new_key(), new_key()
    path = key_file("reseal")
    write_atomically(path, old + "\n")
    servers, lb = servers_and_balancer(n=1, args=["--session-key-file", path])
    lb.wait_healthy(1)
    sid, _ = start_session(lb.port)
    write_atomically(path, new + "\n" + old + "\n")
    wait_for(lambda: lb.metric("stepflow_lb_session_key_reloads_total", result="ok") == 1, 10, "reloaded")
    status, headers, _ = request(lb.port, "POST", sid)
    resealed = headers.get(H.lower(), "")
    check(status == 200 and resealed.startswith("sf2.") and resealed != sid, f"re-sealed: {status} {headers}")
    check(lb.metric("stepflow_lb_sessions_resealed_total") == 1, "counted")
    status, headers, _ = request(lb.port, "POST", resealed)
    check(status == 200 and headers.get(H.lower()) == resealed, "an id under the current key is handed back as is")
    write_atomically(path, new + "\n")
    wait_for(lambda: lb.metric("stepflow_lb_session_key_reloads_total", result="ok") == 2, 10, "old key dropped")
    check(request(lb.port, "POST", resealed)[0] == 200, "the re-sealed id outlives the old key")
    check(request(lb.port, "POST", sid)[0] == 404, "the original does not")


@test
def session_max_age_ends_sealed_ids():
    servers, lb = servers_and_balancer(n=1, args=["--session-key-file", key_file("age"), "--session-max-age", "1s"])
    lb.wait_healthy(1)
    sid, _ = start_session(lb.port)
    check(request(lb.port, "POST", sid)[0] == 200, "a young id routes")
    # Issue times are whole seconds: within a few seconds the id is past 1 s.
    wait_for(lambda: request(lb.port, "POST", sid)[0] == 404, 10, "the id expired", interval=0.25)
    check(lb.metric("stepflow_lb_session_not_found_total", reason="expired") >= 1, "counted as expired")
    check(request(lb.port, "POST", start_session(lb.port)[0])[0] == 200, "a new session starts and routes")


run_tests()
