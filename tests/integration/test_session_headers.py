"""One session header or none, and sealed mode names no instance (issue 22, point 2).

The worker is tests/integration/raw_worker.py: it mints a backend session id on a request without
one and keeps every request head, so a test can see exactly which session ids reached it.
"""

import json
import subprocess

import h2raw
from harness import Balancer, check, run_tests, test
from raw_worker import RawWorker, ok, raw_request
from session_lib import key_file

H = "Mcp-Session-Id"
BODY = b'{"jsonrpc":"2.0","id":41,"method":"tools/list"}'


def minting_worker():
    """Answers a request naming no session with a new backend id; names itself as a Stepflow
    worker would (Stepflow-Instance-Id), which sealed MCP mode must not pass on."""
    count = [0]

    def respond(lines, body):
        names = {line.split(":", 1)[0].lower() for line in lines[1:]}
        extra = b"Stepflow-Instance-Id: raw-1\r\n"
        if "mcp-session-id" not in names:
            count[0] += 1
            extra += f"Mcp-Session-Id: backend-{count[0]}\r\n".encode()
        return ok(body=b'{"jsonrpc":"2.0","id":41,"result":{}}', extra=extra)
    return RawWorker(respond)


def session_ids_seen(w):
    return [v for _, fields, _ in w.received() for n, v in fields if n.lower() in ("mcp-session-id", "x-session")]


def check_ambiguous(what, status, body):
    check(status == 400, f"{what}: status {status}")
    error = json.loads(body)
    check(error["id"] == 41 and error["error"]["code"] == -32600
          and error["error"]["data"]["reason"] == "ambiguous-session", f"{what}: {error}")


@test
def two_session_headers_are_400_learned_and_sealed_http1_and_http2():
    for mode, extra in (("learned", []), ("sealed", ["--session-key-file", key_file("dup")])):
        w = minting_worker()
        lb = Balancer([w.address], args=["--health-check", "tcp", "--session-header", H,
                                          "--session-header", "X-Session"] + extra)
        lb.wait_healthy(1)
        status, headers, _ = raw_request(lb.port, fields=[("Content-Type", "application/json")], body=BODY)
        sid = dict(headers)[H.lower()]
        check(status == 200 and sid, f"{mode}: initialize {status} {headers}")
        reached = len(w.received())
        rejected = lb.metric("stepflow_lb_rejected_requests_total") or 0
        cases = {
            "the same name twice": [(H, sid), (H, "client-made-up")],
            "the same name in two cases": [(H, sid), ("MCP-SESSION-ID", "client-made-up")],
            "two configured names": [(H, sid), ("X-Session", "client-made-up")],
            "a made-up id first": [(H, "client-made-up"), (H, sid)],
        }
        for case, fields in cases.items():
            status, _, body = raw_request(lb.port, fields=[("Content-Type", "application/json")] + fields, body=BODY)
            check_ambiguous(f"{mode} h1 {case}", status, body)
        c = h2raw.H2Client("127.0.0.1", lb.port)
        sids = {case: c.request(BODY, headers=[(n.lower(), v) for n, v in fields]) for case, fields in cases.items()}
        c.wait(lambda: all(c.streams[s].closed for s in sids.values()), what="every h2 answer")
        for case, s in sids.items():
            check_ambiguous(f"{mode} h2 {case}", c.streams[s].status, bytes(c.streams[s].data))
        c.close()
        check(len(w.received()) == reached, f"{mode}: none of them reached the worker")
        check(lb.metric("stepflow_lb_rejected_requests_total") - rejected == 2 * len(cases), f"{mode}: counted")
        # One header still routes (sealed: the worker sees its own id, never the client's).
        status, _, _ = raw_request(lb.port, fields=[("Content-Type", "application/json"), (H, sid)], body=BODY)
        check(status == 200, f"{mode}: one session header: {status}")
        seen = session_ids_seen(w)
        check("client-made-up" not in seen, f"{mode}: a client-made id reached the worker: {seen}")
        if mode == "sealed":
            check(sid not in seen and seen == ["backend-1"], f"sealed: the worker sees only its own id: {seen}")
        lb.stop()
        w.close()


def instance_headers(headers):
    return {n: v for n, v in headers if n in ("stepflow-instance-id", "x-stepflow-routed-instance")}


def curl_h2_headers(port, session):
    out = subprocess.run(["curl", "-s", "--http2-prior-knowledge", "-D", "-", "-o", "/dev/null",
                          "-H", "Content-Type: application/json", "-H", f"{H}: {session}",
                          "--data-binary", BODY.decode(), f"http://127.0.0.1:{port}/"],
                         capture_output=True, text=True, timeout=30).stdout
    lines = [line.rstrip("\r") for line in out.split("\n")]
    check(lines[0].startswith("HTTP/2 200"), f"curl: {out}")
    return [(n.strip().lower(), v.strip()) for n, _, v in (line.partition(":") for line in lines[1:] if line)]


@test
def sealed_mode_names_no_instance_unless_told():
    cases = [
        # (health mode, extra flags, instance header expected, routed-instance expected)
        ("tcp", [], False, False),
        ("tcp", ["--expose-instance", "on"], True, True),
        ("stepflow", [], True, False),  # Stepflow workers: the orchestrator pins callbacks with it
        ("stepflow", ["--expose-instance", "on"], True, True),
    ]
    for health, extra, want_instance, want_routed in cases:
        w = minting_worker()
        lb = Balancer([w.address], args=["--health-check", health, "--session-header", H,
                                          "--session-key-file", key_file("expose")] + extra)
        lb.wait_healthy(1)
        what = f"--health-check {health} {' '.join(extra)}"
        status, headers, _ = raw_request(lb.port, fields=[("Content-Type", "application/json")], body=BODY)
        sid = dict(headers)[H.lower()]
        later = raw_request(lb.port, fields=[("Content-Type", "application/json"), (H, sid)], body=BODY)
        h2 = curl_h2_headers(lb.port, sid)
        for name, hs in (("initialize", headers), ("pinned h1", later[1]), ("pinned h2", h2)):
            seen = instance_headers(hs)
            check(("stepflow-instance-id" in seen) == want_instance, f"{what} {name}: {seen}")
            check(("x-stepflow-routed-instance" in seen) == want_routed, f"{what} {name}: {seen}")
            check(dict(hs).get("x-stepflow-routing-decision") in ("least-load", "pinned"), f"{what} {name}: {hs}")
        lb.stop()
        w.close()
    # Learned (unsealed) mode is unchanged: both headers, as before.
    w = minting_worker()
    lb = Balancer([w.address], args=["--health-check", "tcp", "--session-header", H])
    lb.wait_healthy(1)
    _, headers, _ = raw_request(lb.port, fields=[("Content-Type", "application/json")], body=BODY)
    check(len(instance_headers(headers)) == 2, f"learned mode: {headers}")
    lb.stop()
    w.close()


run_tests()
