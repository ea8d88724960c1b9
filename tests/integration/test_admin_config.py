"""The admin listener and start-up configuration: endpoints, metric names, clear errors for bad
flags (exit status 2, one message, no crash)."""

import json
import os
import subprocess

from harness import ROOT, Balancer, Worker, check, lb_binary, run_tests, test, wait_for


@test
def admin_endpoints_describe_the_fleet():
    a, b = Worker("ad-a"), Worker("ad-b")
    dead_port = Worker("ad-dead")
    port = dead_port.port
    dead_port.kill()
    lb = Balancer([a.address, b.address, f"127.0.0.1:{port}"])
    lb.wait_healthy(2)
    status, body = lb.admin_get("/health")
    health = json.loads(body)
    check(status == 200 and health["status"] == "ok", health)
    check(health["backends"]["total"] == 3 and health["backends"]["healthy"] == 2, health)
    check(lb.admin_get("/ready")[0] == 200, "/ready")
    backends = {x["address"]: x for x in lb.backends()}
    check(backends[a.address]["instanceId"] == a.instance_id, backends)
    for field in ("address", "instanceId", "state", "inFlight", "consecutiveFailures", "lastError", "pod"):
        check(field in backends[a.address], f"/debug/backends has {field}")
    dead = backends[f"127.0.0.1:{port}"]
    check(dead["state"] == "unreachable" and dead["instanceId"] is None and dead["lastError"], dead)
    check(lb.execute("/echo", {}).status == 200, "one request, so per-request series exist")
    text = lb.metrics_text()
    for name in ("stepflow_lb_requests_total", "stepflow_lb_request_duration_ms", "stepflow_lb_active_connections",
                 "stepflow_lb_backend_health", "stepflow_lb_backend_pool_size",
                 "stepflow_lb_discovery_operations_total"):
        check(f"# TYPE {name} " in text, f"metric {name} exported")
    check(lb.metric("stepflow_lb_backend_pool_size") == 2, "pool size counts healthy instances")
    check(lb.admin_get("/nope")[0] == 404, "unknown admin path is 404")


@test
def every_flag_has_help():
    out = subprocess.run([lb_binary(), "--help"], capture_output=True, text=True, timeout=10)
    check(out.returncode == 0, out.returncode)
    for flag in ("--listen", "--admin-listen", "--backends", "--threads", "--health-interval", "--health-timeout",
                 "--max-failures", "--instance-header", "--connect-timeout", "--upstream-header-timeout",
                 "--keepalive-idle-timeout", "--stream-idle-timeout", "--log-level", "--log-format", "--access-log"):
        check(flag in out.stdout, f"--help documents {flag}")
    for env in ("BIND_ADDRESS", "METRICS_ADDRESS", "HEALTH_CHECK_INTERVAL", "HEALTH_CHECK_TIMEOUT", "MAX_FAILURES",
                "STEPFLOW_LOG_LEVEL", "STEPFLOW_LOG_FORMAT", "UPSTREAM_SERVICE"):
        check(env in out.stdout, f"--help names {env}")


@test
def configuration_reference_lists_every_flag_and_variable():
    import re
    out = subprocess.run([lb_binary(), "--help"], capture_output=True, text=True, timeout=10).stdout
    flags = set(re.findall(r"^\s+(--[a-z0-9-]+)", out, re.M)) - {"--help"}
    envs = set(re.findall(r"\(Env:([A-Z0-9_]+)\)", out))
    with open(os.path.join(ROOT, "docs", "configuration.md")) as f:
        doc = f.read()
    check(len(flags) > 30, f"parsed the flags from --help: {sorted(flags)}")
    missing = sorted(f for f in flags if f"`{f}`" not in doc)
    check(not missing, f"flags missing from docs/configuration.md: {missing}")
    missing = sorted(e for e in envs if f"`{e}`" not in doc)
    check(not missing, f"variables missing from docs/configuration.md: {missing}")


@test
def bad_configuration_exits_2_with_one_clear_message():
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUBERNETES_")}
    cases = [
        (["--backends", "127.0.0.1:1", "--health-interval", "soon"], "--health-interval"),
        (["--backends", "127.0.0.1:1", "--health-interval", "0"], "--health-interval"),
        (["--backends", "nonsense"], "--backends"),
        (["--backends", "127.0.0.1:1", "--log-level", "loud"], "--log-level"),
        (["--backends", "127.0.0.1:1", "--max-failures", "0"], "--max-failures"),
        (["--backends", "127.0.0.1:1", "--listen", "nowhere"], "--listen"),
        (["--backends", "127.0.0.1:1", "--threads", "many"], "--threads"),
        (["--backends", "127.0.0.1:1", "--instance-header", "bad header"], "--instance-header"),
        (["--backends", "127.0.0.1:1", "--no-such-flag"], "no-such-flag"),
        ([], "no backends"),
        (["--backends", "no.such.host.invalid:80"], "resolve"),
        (["--backends", "127.0.0.1:1", "--cold-start-timeout", "soon"], "--cold-start-timeout"),
        (["--backends", "127.0.0.1:1", "--scaler-listen", "nowhere"], "--scaler-listen"),
        (["--backends", "127.0.0.1:1", "--peers", "127.0.0.1:9"], "--scaler-listen"),
        (["--backends", "127.0.0.1:1", "--scaler-listen", "127.0.0.1:0", "--peers", "x"], "--peers"),
    ]
    for args, needle in cases:
        out = subprocess.run([lb_binary(), "--admin-listen", "127.0.0.1:0", "--listen", "127.0.0.1:0"] + args
                             if "--listen" not in args else [lb_binary()] + args,
                             capture_output=True, text=True, timeout=20, env=env)
        check(out.returncode == 2, f"{args}: exit {out.returncode}, stderr {out.stderr!r}")
        check(needle in out.stderr, f"{args}: message names {needle!r}: {out.stderr!r}")


@test
def environment_variables_configure_like_flags():
    w = Worker("env")
    lb = Balancer(None, args=[], env={"STEPFLOW_LB_BACKENDS": w.address, "MAX_FAILURES": "7",
                                      "STEPFLOW_LB_INSTANCE_HEADER": "X-Pin"})
    lb.wait_healthy(1)
    r = lb.post({"jsonrpc": "2.0", "id": 1, "result": {}}, headers={"X-Pin": "nobody"})
    check(r.status == 503, "custom instance header pins")
    r = lb.execute("/echo", {})
    check(r.headers.get("x-pin") == w.instance_id, r.headers)


@test
def listen_on_ipv6_loopback():
    w = Worker("v6")
    lb = Balancer([w.address], args=["--listen", "[::1]:0"])
    import stepflow_client as c
    r = c.execute("::1", lb.port, "/echo", {"x": 1})
    check(r.status == 200, r.status)


if __name__ == "__main__":
    run_tests()
