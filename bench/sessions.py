#!/usr/bin/env python3
"""HTTP/1.1 req/s with session affinity (--session-header) on versus off, beside HAProxy and nginx.

    python3 bench/sessions.py [--rounds 5] [--duration 8] [--connections 64]

The two nginx backends answer every POST with `Mcp-Session-Id: sess-<i>` (as an MCP server repeats
its session id), and every request carries a session id, so the balancer does its per-request
session work on every request. Rows, all in the same rounds (interleaved):

- `stepflow-lb off`: no --session-header (the header is just forwarded; least load);
- `stepflow-lb learned`: --session-header Mcp-Session-Id: a table lookup per request and a
  remember per response;
- `stepflow-lb sealed`: the same with --session-key-file: the client holds a sealed id, unsealed per
  request (AES-256-GCM), and the backend's id is swapped in;
- `haproxy stick`: HAProxy's own answer (stick-table learned from the response header);
- `nginx hash`: nginx open source cannot learn from a response; it hashes the request header.

Ratios are to `haproxy stick` in the same round; the balancer runs on one core and one thread.
"""
import argparse
import http.client
import os

import benchlib as B
import rps

HEADER = "Mcp-Session-Id"
HAPROXY_STICK = (f"  stick-table type string len 80 size 1m expire 1h\n"
                 f"  stick store-response res.hdr({HEADER})\n"
                 f"  stick match req.hdr({HEADER})\n")


def first_session(port):
    """POSTs without a session and returns the id the client is given (sealed by the balancer)."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    c.request("POST", "/", body=B.RPC_BODY, headers={"Content-Type": "application/json"})
    r = c.getresponse()
    r.read()
    c.close()
    return r.getheader(HEADER)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--duration", type=int, default=8, help="seconds per run")
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--retries", type=int, default=1, help="repeats of a run disturbed by other processes")
    args = ap.parse_args()

    backends = [B.free_port(), B.free_port()]
    B.start_nginx_backends(backends, session_header=HEADER)
    key = os.path.join(B.tmpdir(), "session.key")
    with open(key, "wb") as f:
        f.write(os.urandom(32))
    starters = {
        "stepflow-lb off": lambda port: B.start_stepflow_lb(port, backends),
        "stepflow-lb learned": lambda port: B.start_stepflow_lb(port, backends, ["--session-header", HEADER]),
        "stepflow-lb sealed": lambda port: B.start_stepflow_lb(
            port, backends, ["--session-header", HEADER, "--session-key-file", key]),
        "haproxy stick": lambda port: B.start_haproxy(port, backends, backend_extra=HAPROXY_STICK),
        "nginx hash": lambda port: B.start_nginx_proxy(port, backends, balance=f"hash $http_{HEADER.lower().replace('-', '_')} consistent"),
    }
    procs, scripts = {}, {}
    for i, (kind, start) in enumerate(starters.items()):
        port = B.free_port()
        procs[kind] = (port, start(port))
        B.wait_http_ok(port, "/", method_body=B.RPC_BODY)
        # The id every request carries: the one this proxy hands out (sealed, for the sealed row).
        session = first_session(port) if kind.endswith("sealed") else "sess-1"
        scripts[kind] = rps.wrk_script({HEADER: session}, name=f"session-{i}")
        rps.run_wrk(port, 2, args.connections, script=scripts[kind])  # warm-up, and the learning
        B.log(f"{kind} ready on :{port} with session {session[:24]}...")

    rounds = []
    for r in range(args.rounds):
        rnd = {}
        for kind in starters:
            port, proc = procs[kind]
            rnd[kind] = B.quietest(lambda: rps.run_wrk(port, args.duration, args.connections, pid=proc.pid,
                                                       script=scripts[kind]), args.retries)
            B.log(f"round {r + 1} {kind}: {rnd[kind]}")
        rounds.append(rnd)

    rows = []
    for kind in starters:
        row = B.throughput_row([{**rnd, "haproxy": rnd["haproxy stick"]} for rnd in rounds], kind,
                               kind != "haproxy stick", sum(rnd[kind]["errors"] for rnd in rounds))
        rows.append(row)
    text = (f"### HTTP/1.1 keep-alive POST carrying a session id, {args.connections} connections, {args.rounds} "
            f"rounds x {args.duration} s (median (min..max); ratios to `haproxy stick` per round)\n\n"
            + B.table(B.THROUGHPUT_HEAD, rows) + B.noise_note(rounds))
    print(text)
    B.save("sessions", {"args": vars(args), "versions": B.versions(), "rounds": rounds}, text)


if __name__ == "__main__":
    main()
