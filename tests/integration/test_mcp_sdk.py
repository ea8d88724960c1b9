"""MCP sessions through the balancer with the official TypeScript SDK (issue 13).

Servers and clients are tests/mcp/server.mjs and tests/mcp/client.mjs, built on
@modelcontextprotocol/sdk (pinned by tests/mcp/package-lock.json, installed by
scripts/install-deps.sh test). Each server is stateful: it mints Mcp-Session-Id on initialize and
answers 404 for ids it does not hold. A client session initializes, calls the tool `whoami`,
receives a notification on its standalone GET SSE stream and ends with DELETE; every answer and
notification names the server, so a session routed to two servers is seen as split.
"""

import http.client
import json
import os
import queue
import shutil
import subprocess
import threading
import urllib.request

from harness import Balancer, ROOT, _started, check, run_tests, test, wait_for
from session_lib import RoundRobinRelay, SecretVolume, key_file, new_key, write_atomically

MCP_DIR = os.path.join(ROOT, "tests", "mcp")
H = "Mcp-Session-Id"
LEARNED = ["--health-check", "http", "--session-header", H]


def node():
    path = shutil.which("node")
    sdk = os.path.join(MCP_DIR, "node_modules", "@modelcontextprotocol", "sdk", "package.json")
    if path is None or not os.path.exists(sdk):
        raise AssertionError("node or the MCP SDK is missing: run scripts/install-deps.sh test "
                             "(installs nodejs and runs npm ci in tests/mcp)")
    return path


def _read_lines(proc, lines):
    for line in proc.stdout:
        lines.put(line.rstrip("\n"))
    lines.put(None)


class McpServer:
    """One tests/mcp/server.mjs process on a loopback port of its own."""

    def __init__(self, name):
        self.name = name
        self.proc = subprocess.Popen([node(), os.path.join(MCP_DIR, "server.mjs"), name], cwd=MCP_DIR,
                                     stdout=subprocess.PIPE, text=True)
        _started.append(self.proc)
        lines = queue.Queue()
        threading.Thread(target=_read_lines, args=(self.proc, lines), daemon=True).start()
        first = lines.get(timeout=20)
        if not first or not first.startswith("listening "):
            raise RuntimeError(f"MCP server {name} did not start: {first!r}")
        self.port = int(first.split()[1])
        self.address = f"127.0.0.1:{self.port}"

    def stats(self):
        with urllib.request.urlopen(f"http://{self.address}/stats", timeout=5) as r:
            return json.loads(r.read())

    def kill(self):
        self.proc.kill()
        self.proc.wait()


class Clients:
    """tests/mcp/client.mjs: SESSIONS concurrent SDK sessions against one URL. With hold=True
    every session stops after its first call until release()."""

    def __init__(self, port, sessions=20, calls=5, hold=False, notification_wait_ms=15000, holds=1):
        argv = [node(), os.path.join(MCP_DIR, "client.mjs"), f"http://127.0.0.1:{port}/mcp", str(sessions), str(calls)]
        self.proc = subprocess.Popen(argv + (["hold"] if hold else []), cwd=MCP_DIR, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True,
                                     env=dict(os.environ, MCP_NOTIFICATION_WAIT_MS=str(notification_wait_ms),
                                              MCP_HOLDS=str(holds)))
        _started.append(self.proc)
        self.lines = queue.Queue()
        threading.Thread(target=_read_lines, args=(self.proc, self.lines), daemon=True).start()
        if hold:
            self.wait_ready()

    def wait_ready(self):
        line = self.lines.get(timeout=60)
        if line != "ready":
            raise AssertionError(f"clients did not reach the hold point: {line!r}")

    def release(self):
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def release_to_next_hold(self):
        self.release()
        self.wait_ready()

    def result(self, timeout=120):
        line = self.lines.get(timeout=timeout)
        if line is None:
            raise AssertionError("the SDK client exited without a summary")
        summary = json.loads(line)
        print("      SDK clients: " + json.dumps({k: v for k, v in summary.items() if k != "sessions"}), flush=True)
        return summary


def servers_and_balancer(args, n=3):
    servers = [McpServer(c) for c in "abcdef"[:n]]
    lb = Balancer([s.address for s in servers], args=args)
    lb.wait_healthy(n)
    return servers, lb


def check_clean(summary, sessions):
    check(summary["failed"] == 0, f"no session failed: {summary['errors'][:3]}")
    check(summary["split"] == 0, f"no session split over two servers: {summary['split']}")
    check(summary["completed"] == sessions and summary["deleted"] == sessions,
          f"all {sessions} completed and ended with DELETE: {summary['completed']} / {summary['deleted']}")
    check(summary["notifications"] >= sessions, f"every GET stream carried a notification: {summary['notifications']}")


@test
def twenty_sdk_sessions_through_one_balancer():
    servers, lb = servers_and_balancer(LEARNED)
    summary = Clients(lb.port, sessions=20, calls=5).result()
    check_clean(summary, 20)
    check(len(summary["instances"]) == 3, f"least load spread the sessions: {summary['instances']}")
    stats = [s.stats() for s in servers]
    check(sum(s["sessionsOpened"] for s in stats) == 20 and sum(s["unknownSession"] for s in stats) == 0,
          f"each server held exactly its own sessions: {stats}")
    check(lb.metric("stepflow_lb_sessions_learned_total") == 20, "20 sessions learned")
    check(lb.metric("stepflow_lb_sessions_ended_total") == 20, "20 sessions ended by DELETE")
    check(lb.metric("stepflow_lb_sessions") == 0, "the table is empty again")


@test
def two_replicas_with_a_shared_key_behind_a_round_robin_front():
    servers = [McpServer(c) for c in "abc"]
    key = key_file("mcp")
    args = LEARNED + ["--session-key-file", key]
    replicas = [Balancer([s.address for s in servers], args=args) for _ in range(2)]
    for lb in replicas:
        lb.wait_healthy(3)
    relay = RoundRobinRelay([lb.port for lb in replicas])
    summary = Clients(relay.port, sessions=20, calls=5).result()
    check_clean(summary, 20)
    per_replica = [lb.metric("stepflow_lb_requests_total") or 0 for lb in replicas]
    learned = [lb.metric("stepflow_lb_sessions_learned_total") or 0 for lb in replicas]
    check(all(n > 0 for n in per_replica), f"both replicas carried requests: {per_replica}")
    check(sum(learned) == 20, f"each initialize sealed once, on either replica: {learned}")
    check(all(s["sessionId"].startswith("sf2.") for s in summary["sessions"]), "the clients saw sealed ids")
    stats = [s.stats() for s in servers]
    check(sum(s["unknownSession"] for s in stats) == 0, f"no server saw an id it does not hold: {stats}")
    print(f"      two replicas: {summary['started']} sessions, {sum(s['requests'] for s in stats)} requests at the "
          f"servers, {summary['calls']} tool calls, {summary['notifications']} notifications, "
          f"requests per replica {per_replica}, {summary['failed']} failed, {summary['split']} split", flush=True)
    relay.close()


@test
def without_the_shared_key_the_same_front_splits_sessions():
    # The control for the test above: each replica only knows the sessions it saw start, so
    # requests that the front sends to the other replica reach a server that never minted the id.
    servers = [McpServer(c) for c in "abc"]
    replicas = [Balancer([s.address for s in servers], args=LEARNED) for _ in range(2)]
    for lb in replicas:
        lb.wait_healthy(3)
    relay = RoundRobinRelay([lb.port for lb in replicas])
    summary = Clients(relay.port, sessions=20, calls=5, notification_wait_ms=2000).result()
    unknown = sum(s.stats()["unknownSession"] for s in servers)
    check(unknown > 0 and summary["failed"] > 0,
          f"without sealing, ids reach servers that never minted them ({unknown}) and sessions fail "
          f"({summary['failed']} of 20)")
    relay.close()


@test
def a_restarted_balancer_keeps_routing_sealed_sessions():
    servers = [McpServer(c) for c in "abc"]
    key = key_file("restart")
    args = LEARNED + ["--session-key-file", key]
    lb = Balancer([s.address for s in servers], args=args)
    lb.wait_healthy(3)
    relay = RoundRobinRelay([lb.port])
    clients = Clients(relay.port, sessions=10, calls=5, hold=True)
    lb.proc.kill()  # a crash: nothing of the old process's state survives
    lb.proc.wait()
    lb = Balancer([s.address for s in servers], args=args)
    lb.wait_healthy(3)
    relay.ports[:] = [lb.port]
    clients.release()
    summary = clients.result()
    check_clean(summary, 10)
    check(lb.metric("stepflow_lb_routing_decisions_total", decision="pinned") >= 10,
          "the new process routed the sessions it never saw start")
    relay.close()


@test
def forged_ids_get_404_and_reach_no_server():
    servers, lb = servers_and_balancer(LEARNED + ["--session-key-file", key_file("forged")])
    summary = Clients(lb.port, sessions=1, calls=1).result()
    sid = summary["sessions"][0]["sessionId"]
    before = sum(s.stats()["requests"] for s in servers)
    flipped = sid[:-2] + ("A" if sid[-2] != "A" else "B") + sid[-1]
    body = b'{"jsonrpc":"2.0","id":"t","method":"tools/call","params":{"name":"whoami","arguments":{}}}'
    for bad in (flipped, sid[:40], "sf1.", "made-up-id", sid + "AAAA"):
        conn = http.client.HTTPConnection("127.0.0.1", lb.port, timeout=10)
        conn.request("POST", "/mcp", body, {"Content-Type": "application/json", H: bad,
                                            "Accept": "application/json, text/event-stream"})
        r = conn.getresponse()
        answer = json.loads(r.read())
        conn.close()
        check(r.status == 404 and answer["error"]["code"] == -32001 and answer["id"] == "t", f"{bad!r}: {r.status} {answer}")
    after = sum(s.stats()["requests"] for s in servers)
    check(after == before, f"no forged id reached a server ({before} -> {after})")


@test
def a_killed_server_still_listed_answers_its_sessions_503_while_the_others_go_on():
    # Static discovery keeps listing the address, so its sessions are kept and answered a
    # retryable 503 (issue 21: 404 only once the instance leaves discovery or restarts as another).
    servers, lb = servers_and_balancer(LEARNED)
    clients = Clients(lb.port, sessions=12, calls=5, hold=True)
    held = {s.name: s.stats()["sessions"] for s in servers}
    victim = max(servers, key=lambda s: held[s.name])
    check(held[victim.name] > 0, f"the victim holds sessions: {held}")
    victim.kill()
    wait_for(lambda: not next(b for b in lb.backends() if b["address"] == victim.address)["routable"], 10,
             "the killed server is out of the fleet")
    clients.release()
    summary = clients.result()
    lost = [s for s in summary["sessions"] if s["error"]]
    check(len(lost) == held[victim.name], f"exactly the victim's {held[victim.name]} sessions failed: {len(lost)}")
    check(all(s["instance"] == victim.name and "503" in s["error"] for s in lost),
          f"each got 503: {[s['error'] for s in lost]}")
    check(summary["completed"] == 12 - len(lost) and summary["split"] == 0, "the others completed, none split")
    check(lb.metric("stepflow_lb_session_not_found_total", reason="instance-gone") in (None, 0.0), "none forgotten")


def post_with_session(port, sid):
    body = b'{"jsonrpc":"2.0","id":"t","method":"tools/call","params":{"name":"whoami","arguments":{}}}'
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("POST", "/mcp", body, {"Content-Type": "application/json", H: sid,
                                        "Accept": "application/json, text/event-stream"})
    r = conn.getresponse()
    r.read()
    conn.close()
    return r.status


@test
def key_rotation_in_three_phases_drops_no_session():
    # docs/sessions.md: (1) add the new key as accepted-only, (2) make it current, (3) drop the old,
    # each phase reaching the replicas one at a time, while SDK sessions run through a round-robin
    # front. Replica A reads a Secret-style directory (..data swapped), replica B a file replaced by
    # rename; neither restarts.
    servers = [McpServer(c) for c in "abc"]
    old, new = new_key(), new_key()
    volume = SecretVolume("rotation-a", {"keys": old + "\n"})
    file_b = key_file("rotation-b")
    write_atomically(file_b, old + "\n")
    paths = [volume.path, file_b]
    replicas = [Balancer([s.address for s in servers], args=LEARNED + ["--session-key-file", p]) for p in paths]
    for lb in replicas:
        lb.wait_healthy(3)
    relay = RoundRobinRelay([lb.port for lb in replicas])
    sessions = 20
    # A hold before each step below: every session makes one call between two steps.
    clients = Clients(relay.port, sessions=sessions, calls=6, hold=True, holds=6)
    reloads = [0, 0]

    def roll(i, keys):
        # One replica takes the new key set; the next step waits until it has.
        if i == 0:
            volume.update({"keys": "\n".join(keys) + "\n"})
        else:
            write_atomically(file_b, "\n".join(keys) + "\n")
        reloads[i] += 1
        wait_for(lambda: replicas[i].metric("stepflow_lb_session_key_reloads_total", result="ok") == reloads[i], 10,
                 f"replica {i} reloaded its keys")

    for phase, keys in ((1, [old, new]), (2, [new, old]), (3, [new])):
        for i in range(2):
            roll(i, keys)
            # Sessions make a call between the two replicas' updates: the fleet is mixed.
            if phase < 3 or i == 0:
                clients.release_to_next_hold()
    clients.release()
    summary = clients.result()
    check_clean(summary, sessions)
    ids = summary["sessions"]
    resealed = [lb.metric("stepflow_lb_sessions_resealed_total") or 0 for lb in replicas]
    check(sum(resealed) >= sessions, f"ids opened with the old key were re-sealed: {resealed}")
    check(all(s["finalSessionId"] != s["sessionId"] for s in ids), "every client ended with a re-sealed id")
    # The old key is gone everywhere: the ids the sessions started with are refused now.
    refused = [post_with_session(replicas[n % 2].port, s["sessionId"]) for n, s in enumerate(ids[:4])]
    check(refused == [404] * 4, f"ids sealed under the dropped key get 404: {refused}")
    errors = [lb.metric("stepflow_lb_session_key_reloads_total", result="error") for lb in replicas]
    check(errors == [0, 0], f"no reload failed: {errors}")
    print(f"      key rotation: {summary['started']} sessions, {summary['calls']} tool calls, "
          f"{summary['notifications']} notifications, re-sealed {resealed}, {summary['failed']} failed, "
          f"{summary['split']} split", flush=True)
    relay.close()


if __name__ == "__main__":
    run_tests()
