"""Routing end to end: least-load spreading, pinned sessions, 503s, a worker killed mid-stream,
retries of new work, health transitions. Real binary, real example workers, loopback only."""

import concurrent.futures
import json
import signal

from harness import Balancer, Worker, check, client, run_tests, test, wait_for

EXEC_HOLD = {"jsonrpc": "2.0", "id": "hold", "method": "components/execute",
             "params": {"component": "/stream", "input": {"events": 1, "interval_ms": 0, "hold": True}}}


def routed(result):
    return result.headers.get("x-stepflow-routed-instance")


@test
def least_load_sends_new_work_to_the_idle_instance():
    workers = [Worker(f"ll{i}") for i in range(3)]
    lb = Balancer([w.address for w in workers])
    lb.wait_healthy(3)
    # Two long streams occupy two instances (ties are broken at random, so which two is open).
    held = [client.SseReader("127.0.0.1", lb.port, EXEC_HOLD) for _ in range(2)]
    for r in held:
        check(r.next_event(timeout=10) is not None, "held stream sent its first event")
    busy = {r.instance_id for r in held}
    check(len(busy) == 2, f"the two streams went to two instances: {busy}")
    idle = ({w.instance_id for w in workers} - busy).pop()
    for i in range(30):
        r = lb.execute("/echo", {"i": i})
        check(r.status == 200, f"echo {i}: {r.status}")
        check(routed(r) == idle, f"request {i} went to {routed(r)}, not the idle {idle}")
        check(r.headers.get("x-stepflow-routing-decision") == "least-load", "decision header")
    for r in held:
        r.close()
    wait_for(lambda: lb.in_flight_total() == 0, 10, "in-flight back to zero")


@test
def concurrent_uneven_work_spreads_over_every_instance():
    workers = [Worker(f"sp{i}", max_concurrency=8) for i in range(3)]
    lb = Balancer([w.address for w in workers])
    lb.wait_healthy(3)
    durations = [400, 50, 50, 50, 400, 50, 50, 400, 50, 50, 50, 50]
    with concurrent.futures.ThreadPoolExecutor(len(durations)) as pool:
        results = list(pool.map(lambda ms: lb.execute("/sleep", {"ms": ms}), durations))
    check(all(r.status == 200 for r in results), [r.status for r in results])
    per = {}
    for r in results:
        per[routed(r)] = per.get(routed(r), 0) + 1
    check(len(per) == 3, f"all three instances took work: {per}")
    check(max(per.values()) <= 6, f"no instance took more than half: {per}")


@test
def pinned_sessions_under_load_never_misroute():
    workers = [Worker(f"pin{i}", max_concurrency=40) for i in range(3)]
    lb = Balancer([w.address for w in workers], threads=2)
    lb.wait_healthy(3)
    with concurrent.futures.ThreadPoolExecutor(40) as pool:
        sessions = list(pool.map(lambda _: lb.session(4, timeout=60), range(80)))
    bad = [s for s in sessions if not s.ok]
    check(not bad, f"{len(bad)} sessions failed, e.g. {bad[:2]}")
    for s in sessions:
        check(s.result["instanceId"] == s.instance_id, "final result came from the pinned instance")
        check(s.headers.get("x-stepflow-routed-instance") == s.instance_id, "routed header names the instance")
    check(sum(len(s.callback_statuses) for s in sessions) == 320, "320 callbacks answered")
    misrouted = sum(w.health()["misroutedCallbacks"] for w in workers)
    check(misrouted == 0, f"{misrouted} misrouted callbacks")
    check(len({s.instance_id for s in sessions}) == 3, "sessions spread over all instances")
    check(lb.metric("stepflow_lb_routing_decisions_total", decision="pinned") >= 320, "pinned decisions counted")
    wait_for(lambda: lb.in_flight_total() == 0, 10, "in-flight back to zero")


@test
def unknown_instance_gets_503_with_jsonrpc_error():
    w = Worker("u0")
    lb = Balancer([w.address])
    body = {"jsonrpc": "2.0", "id": 42, "result": {"ok": True}}
    r = lb.post(body, headers={"Stepflow-Instance-Id": "no-such-instance"})
    check(r.status == 503, r.status)
    check(r.headers.get("retry-after") == "1", r.headers)
    err = r.json()
    check(err["id"] == 42, "JSON-RPC id echoed")
    check(err["error"]["code"] == -32000 and err["error"]["message"] == "Instance not available", err)
    check(err["error"]["data"]["instanceId"] == "no-such-instance", err)
    # a string id and a chunked body are echoed too
    r = lb.post({"jsonrpc": "2.0", "id": "abc", "method": "x"}, headers={"Stepflow-Instance-Id": "gone"}, chunked=True,
                chunk_size=5)
    check(r.status == 503 and r.json()["id"] == "abc", r)
    check(lb.metric("stepflow_lb_pinned_misses_total", reason="unknown-instance") == 2, "misses counted")
    check(lb.metric("stepflow_lb_requests_total", backend="none", status="503") == 2, "requests counted")


@test
def worker_killed_mid_stream():
    victim, other = Worker("kill-a"), Worker("kill-b")
    lb = Balancer([victim.address, other.address], args=["--max-failures", "2"])
    lb.wait_healthy(2)
    victim_id = victim.instance_id
    reader = client.SseReader("127.0.0.1", lb.port, EXEC_HOLD, headers={"Stepflow-Instance-Id": victim_id})
    check(reader.instance_id == victim_id, "stream pinned to the victim")
    check(reader.next_event(timeout=10) is not None, "first event arrived")
    wait_for(lambda: lb.backend(victim.address)["inFlight"] == 1, 5, "stream counted in flight")
    victim.kill()
    check(reader.next_event(timeout=10) is None and reader.ended_abnormally,
          f"client saw the stream break (error={reader.error})")
    wait_for(lambda: lb.backend(victim.address)["inFlight"] == 0, 5, "in-flight back to 0")
    wait_for(lambda: lb.backend(victim.address)["state"] == "unhealthy", 10, "victim unhealthy")
    for i in range(10):
        r = lb.execute("/echo", {"i": i})
        check(r.status == 200 and routed(r) != victim_id, f"new work avoided the dead instance: {routed(r)}")
    r = lb.post({"jsonrpc": "2.0", "id": 9, "result": {}}, headers={"Stepflow-Instance-Id": victim_id})
    check(r.status == 503 and r.json()["error"]["data"]["instanceId"] == victim_id, f"pinned to dead: {r.status}")
    # The same address comes back as a new instance; the old id stays unavailable.
    reborn = Worker("kill-a", port=victim.port)
    new_id = reborn.instance_id
    check(new_id != victim_id, "a restarted worker has a new instance id")
    wait_for(lambda: (lb.backend(victim.address) or {}).get("instanceId") == new_id, 10, "new instance learned")
    wait_for(lambda: lb.backend(victim.address)["state"] == "healthy", 10, "new instance healthy")
    r = lb.post({"jsonrpc": "2.0", "id": 10, "result": {}}, headers={"Stepflow-Instance-Id": victim_id})
    check(r.status == 503, "old instance id still unavailable after restart")
    s = lb.session(2, headers=None)
    check(s.ok, s)


@test
def no_healthy_instance_gets_503_with_cold_start_off():
    # The old behaviour, kept behind two flags: no holding for an empty fleet, and a /ready that
    # needs a routable instance (the default holds and stays ready: test_autoscaling.py).
    dead = Worker("dead")
    port = dead.port
    dead.kill()
    lb = Balancer([f"127.0.0.1:{port}"], args=["--cold-start-timeout", "0", "--ready-requires-instance"],
                  wait_ready=False)
    check(lb.admin_get("/ready")[0] == 503, "/ready is 503 without a healthy instance")
    r = lb.post({"jsonrpc": "2.0", "id": "n1", "method": "components/list"})
    check(r.status == 503, r.status)
    check(r.headers.get("retry-after") is not None, "Retry-After present")
    check(r.json()["id"] == "n1" and r.json()["error"]["code"] == -32000, r.body)


@test
def new_work_is_retried_on_another_instance_when_connect_fails():
    a, b = Worker("ra"), Worker("rb")
    # Health checks are slow and forgiving here, so the only defence is the connect retry.
    lb = Balancer([a.address, b.address], args=["--health-interval", "1h", "--max-failures", "1000"])
    lb.wait_healthy(2)
    b_id = b.instance_id
    a.kill()
    for i in range(20):
        r = lb.execute("/echo", {"i": i})
        check(r.status == 200 and routed(r) == b_id, f"request {i}: {r.status} via {routed(r)}")
    check(lb.metric("stepflow_lb_upstream_retries_total") >= 1, "retries counted")
    check(lb.metric("stepflow_lb_upstream_connect_errors_total") >= 1, "connect errors counted")


@test
def failing_health_checks_take_an_instance_out_and_back():
    a, b = Worker("ha"), Worker("hb")
    lb = Balancer([a.address, b.address], args=["--max-failures", "2"])
    lb.wait_healthy(2)
    a_id = a.instance_id
    client.set_health("127.0.0.1", a.port, False)
    wait_for(lambda: lb.backend(a.address)["state"] == "unhealthy", 10, "a unhealthy")
    check("503" in (lb.backend(a.address)["lastError"] or ""), lb.backend(a.address))
    for i in range(10):
        check(routed(lb.execute("/echo", {})) != a_id, "no new work to the unhealthy instance")
    client.set_health("127.0.0.1", a.port, True)
    wait_for(lambda: lb.backend(a.address)["state"] == "healthy", 10, "a healthy again")
    check(lb.backend(a.address)["instanceId"] == a_id, "same process, same instance")


@test
def upstream_instance_header_is_not_duplicated():
    w = Worker("hdr")
    lb = Balancer([w.address])
    reader = client.SseReader("127.0.0.1", lb.port, {"jsonrpc": "2.0", "id": 1, "method": "components/execute",
                                                      "params": {"component": "/stream", "input": {"events": 1}}})
    events = list(reader)
    check(len(events) == 2 and not reader.ended_abnormally, events)
    raw = client.raw_request("127.0.0.1", lb.port,
                             b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}")
    check(raw.lower().count(b"stepflow-instance-id:") == 1, raw[:400])


if __name__ == "__main__":
    run_tests()
