#!/usr/bin/env python3
"""Offline checks of the Kubernetes manifests in deploy/ and of the Dockerfiles.

Renders every kustomization under deploy/ (the base, the example worker and
every overlay) with `kubectl kustomize`, which needs no cluster, parses the
output with PyYAML (Debian: python3-yaml) and checks the invariants the
deployment promises: non-root, read-only root filesystem, no privilege
escalation, RBAC of exactly get/list/watch on endpointslices and endpoints,
probes on the balancer's admin paths, container ports equal to the binary's
defaults, image pull policies per GUIDE §4, and the rest listed below.

With a built binary (build/stepflow-lb, or the path in $STEPFLOW_LB_BIN) it
also checks that the flags the manifests pass exist in `--help` and that the
probe paths are served: it starts the binary on loopback ports with a static
backend nothing listens on, expects /health 200 and /ready 200 or 503, and
stops it with SIGTERM.

Prints one line per check and ends with `N passed, M failed`; exits 1 on any
failure, 77 (meson's "skipped") when kubectl is not installed.

    python3 tests/deploy/test_manifests.py
"""

from __future__ import annotations

import http.client
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SKIP = 77

try:
    import yaml  # PyYAML
except ImportError:  # pragma: no cover - depends on the machine
    # A pyenv/venv python may lack the module that Debian's python3-yaml puts
    # into the system interpreter: use that interpreter if it has it.
    system_python = "/usr/bin/python3"
    if (
        not os.environ.get("STEPFLOW_TEST_REEXEC")
        and os.path.realpath(sys.executable) != os.path.realpath(system_python)
        and os.access(system_python, os.X_OK)
        and subprocess.run([system_python, "-c", "import yaml"],
                           capture_output=True).returncode == 0
    ):
        env = dict(os.environ, STEPFLOW_TEST_REEXEC="1")
        os.execve(system_python, [system_python, *sys.argv], env)
    print("FAIL: PyYAML is not installed (Debian package python3-yaml; "
          "scripts/install-deps.sh installs it)")
    print("0 passed, 1 failed")
    sys.exit(1)

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"

# --- the contract these manifests are checked against ----------------------

LB_NAME = "stepflow-lb"                       # Deployment/Service/SA/Role name
LB_LABEL = ("app.kubernetes.io/name", LB_NAME)
DATA_PORT = 8080                              # --listen / BIND_ADDRESS default
ADMIN_PORT = 9090                             # --admin-listen / METRICS_ADDRESS default
ADMIN_PATHS = {"/health", "/ready", "/metrics", "/debug/backends"}
DEFAULT_DRAIN_SECONDS = 30.0                  # --drain-timeout default
RUNTIME_UID = 1000                            # user `stepflow` in the image
EXPECTED_RBAC = {
    ("discovery.k8s.io", "endpointslices"): {"get", "list", "watch"},
    ("", "endpoints"): {"get", "list", "watch"},
}
# Kustomizations that must contain the balancer, and what image each pins.
EXPECTED_LB_IMAGE = {
    "deploy/base": ("stepflow-lb:local", "Never"),
    "deploy/overlays/kind": ("stepflow-lb:local", "Never"),
    "deploy/overlays/production": ("ghcr.io/stepflow/stepflow-lb:0.1.0", "IfNotPresent"),
}
REQUIRED_OVERLAYS = ["deploy/overlays/kind", "deploy/overlays/production"]

# --- reporting ---------------------------------------------------------------

passed = 0
failed = 0


def check(name: str, ok: bool, detail: str = "") -> bool:
    global passed, failed
    if ok:
        passed += 1
        print(f"PASS  {name}")
    else:
        failed += 1
        print(f"FAIL  {name}" + (f" -- {detail}" if detail else ""))
    return ok


def info(msg: str) -> None:
    print(f"info  {msg}")


# --- helpers -----------------------------------------------------------------

def parse_duration(text: str) -> float:
    """`250ms`, `10s`, `2m` or bare seconds, as the binary accepts them."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m)?\s*", str(text))
    if not m:
        raise ValueError(f"not a duration: {text!r}")
    value = float(m.group(1))
    return {"ms": value / 1000.0, "s": value, "m": value * 60.0, None: value}[m.group(2)]


def port_of_address(addr: str) -> int:
    return int(str(addr).rsplit(":", 1)[1])


def kustomize_dirs() -> list[str]:
    """Every kustomization under deploy/ that renders on its own."""
    dirs = []
    for kfile in sorted(DEPLOY.rglob("kustomization.yaml")):
        doc = yaml.safe_load(kfile.read_text()) or {}
        if doc.get("kind") == "Component":
            continue  # rendered through the overlays that include it
        dirs.append(str(kfile.parent.relative_to(REPO)))
    return dirs


def render(rel: str) -> list[dict] | None:
    proc = subprocess.run(["kubectl", "kustomize", str(REPO / rel)],
                          capture_output=True, text=True, timeout=120)
    if not check(f"[{rel}] kubectl kustomize renders", proc.returncode == 0,
                 proc.stderr.strip()):
        return None
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
    check(f"[{rel}] renders at least one object", bool(docs))
    return docs


def find(docs, kind, name=None):
    return [d for d in docs if d.get("kind") == kind
            and (name is None or d["metadata"].get("name") == name)]


def env_list(container) -> list[dict]:
    return container.get("env") or []


def env_value(container, name):
    for e in env_list(container):
        if e.get("name") == name:
            return e.get("value")
    return None


def arg_value(container, flag):
    """Value of `--flag v` or `--flag=v` in command+args, else None."""
    argv = (container.get("command") or []) + (container.get("args") or [])
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def resolve_container_port(container, port):
    """A probe/targetPort (number or name) as a number, or None."""
    if isinstance(port, int):
        return port
    if isinstance(port, str) and port.isdigit():
        return int(port)
    for p in container.get("ports") or []:
        if p.get("name") == port:
            return p.get("containerPort")
    return None


def selector_matches(selector: dict, labels: dict) -> bool:
    match = selector.get("matchLabels", selector) if selector else {}
    return bool(match) and all(labels.get(k) == v for k, v in match.items())


def image_has_registry(image: str) -> bool:
    first = image.split("/", 1)[0]
    return "/" in image and ("." in first or ":" in first or first == "localhost")


def effective(container, pod_sc, key):
    sc = container.get("securityContext") or {}
    return sc[key] if key in sc else pod_sc.get(key)


# --- checks ------------------------------------------------------------------

def check_pod_templates(rel, docs):
    """Lockdown and image policy, for every container of every workload."""
    for d in docs:
        if d.get("kind") not in {"Deployment", "StatefulSet", "DaemonSet", "Job"}:
            continue
        spec = d["spec"]["template"]["spec"]
        pod_sc = spec.get("securityContext") or {}
        wl = f"[{rel}] {d['kind']}/{d['metadata']['name']}"
        for flag in ("hostNetwork", "hostPID", "hostIPC"):
            check(f"{wl}: no {flag}", not spec.get(flag))
        for c in (spec.get("initContainers") or []) + spec["containers"]:
            who = f"{wl} container {c['name']}"
            sc = c.get("securityContext") or {}
            check(f"{who}: runAsNonRoot", effective(c, pod_sc, "runAsNonRoot") is True)
            uid = effective(c, pod_sc, "runAsUser")
            check(f"{who}: runAsUser {RUNTIME_UID}", uid == RUNTIME_UID, f"runAsUser={uid}")
            check(f"{who}: readOnlyRootFilesystem", sc.get("readOnlyRootFilesystem") is True)
            check(f"{who}: allowPrivilegeEscalation false",
                  sc.get("allowPrivilegeEscalation") is False)
            check(f"{who}: not privileged", sc.get("privileged") is not True)
            caps = sc.get("capabilities") or {}
            check(f"{who}: drops ALL capabilities, adds none",
                  "ALL" in (caps.get("drop") or []) and not caps.get("add"), str(caps))
            seccomp = (sc.get("seccompProfile") or pod_sc.get("seccompProfile") or {}).get("type")
            check(f"{who}: seccomp RuntimeDefault", seccomp == "RuntimeDefault", str(seccomp))
            if c["name"] == LB_NAME:
                check_image_test_runs(who, sc, pod_sc)
            image = c.get("image", "")
            policy = c.get("imagePullPolicy")
            tagged = ":" in image.rsplit("/", 1)[-1] or "@" in image
            check(f"{who}: image {image} has an explicit tag",
                  tagged and not image.endswith(":latest"))
            want = "IfNotPresent" if image_has_registry(image) else "Never"
            check(f"{who}: imagePullPolicy {want} for "
                  f"{'a registry' if want == 'IfNotPresent' else 'a locally built'} image",
                  policy == want, f"imagePullPolicy={policy}")


def check_balancer(rel, docs):
    deps = [d for d in find(docs, "Deployment")
            if d["spec"]["template"]["metadata"].get("labels", {}).get(LB_LABEL[0]) == LB_LABEL[1]]
    if not check(f"[{rel}] exactly one balancer Deployment", len(deps) == 1, f"found {len(deps)}"):
        return
    dep = deps[0]
    name = f"[{rel}] Deployment/{dep['metadata']['name']}"
    ns = dep["metadata"].get("namespace")
    spec = dep["spec"]
    pod = spec["template"]["spec"]
    pod_labels = spec["template"]["metadata"].get("labels", {})
    containers = [c for c in pod["containers"] if c["name"] == LB_NAME]
    if not check(f"{name}: has container {LB_NAME}", len(containers) == 1):
        return
    c = containers[0]

    # Replicas and rollout.
    check(f"{name}: 2 replicas", spec.get("replicas") == 2, str(spec.get("replicas")))
    strat = spec.get("strategy") or {}
    ru = strat.get("rollingUpdate") or {}
    check(f"{name}: RollingUpdate maxUnavailable 0, maxSurge 1",
          strat.get("type") == "RollingUpdate" and ru.get("maxUnavailable") == 0
          and ru.get("maxSurge") == 1, str(strat))
    check(f"{name}: selector matches pod labels",
          selector_matches(spec.get("selector"), pod_labels))

    # Image for this overlay.
    want_image, want_policy = EXPECTED_LB_IMAGE.get(rel, (None, None))
    if want_image:
        check(f"{name}: image {want_image} ({want_policy})",
              c.get("image") == want_image and c.get("imagePullPolicy") == want_policy,
              f"{c.get('image')} ({c.get('imagePullPolicy')})")

    # Ports equal the binary's defaults (or whatever env/flags set).
    listen = arg_value(c, "--listen") or env_value(c, "BIND_ADDRESS") or f"0.0.0.0:{DATA_PORT}"
    admin = arg_value(c, "--admin-listen") or env_value(c, "METRICS_ADDRESS") or f"0.0.0.0:{ADMIN_PORT}"
    check(f"{name}: listens on the default ports {DATA_PORT}/{ADMIN_PORT}",
          port_of_address(listen) == DATA_PORT and port_of_address(admin) == ADMIN_PORT,
          f"listen={listen} admin={admin}")
    ports = sorted(p.get("containerPort") for p in c.get("ports") or [])
    want_ports = [DATA_PORT, ADMIN_PORT]
    scaler = env_value(c, "STEPFLOW_LB_SCALER_LISTEN")  # components/keda: the external scaler's port
    if scaler:
        want_ports = sorted(want_ports + [port_of_address(scaler)])
    check(f"{name}: container ports are exactly {want_ports}", ports == want_ports, str(ports))

    # Probes on admin paths that exist, on the admin port.
    for kind, want_path in (("livenessProbe", "/health"), ("readinessProbe", "/ready"),
                            ("startupProbe", None)):
        probe = c.get(kind)
        if probe is None and want_path is None:
            continue
        get = (probe or {}).get("httpGet") or {}
        port = resolve_container_port(c, get.get("port"))
        path = get.get("path")
        ok = (path == want_path) if want_path else (path in ADMIN_PATHS)
        check(f"{name}: {kind} GET {want_path or path} on admin port {ADMIN_PORT}",
              ok and port == ADMIN_PORT, f"path={path} port={get.get('port')}->{port}")

    # Graceful shutdown: the kubelet must not SIGKILL a draining pod.
    drain_text = arg_value(c, "--drain-timeout") or env_value(c, "STEPFLOW_LB_DRAIN_TIMEOUT")
    drain = parse_duration(drain_text) if drain_text else DEFAULT_DRAIN_SECONDS
    pre_stop = 0.0
    cmd = ((((c.get("lifecycle") or {}).get("preStop") or {}).get("exec") or {}).get("command")) or []
    if len(cmd) == 2 and cmd[0].endswith("sleep"):
        pre_stop = parse_duration(cmd[1])
    # The image holds only the balancer: an exec hook can run nothing else (no shell, no sleep).
    for hook in ("preStop", "postStart"):
        exe = ((((c.get("lifecycle") or {}).get(hook) or {}).get("exec") or {}).get("command")) or []
        check(f"{name}: {hook} execs nothing the image lacks (it holds only the balancer)",
              not exe or exe[0] == "/usr/local/bin/stepflow-lb", str(exe))
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        exe = (((c.get(probe) or {}).get("exec") or {}).get("command")) or []
        check(f"{name}: {probe} execs nothing the image lacks", not exe, str(exe))
    sleep_action = (((c.get("lifecycle") or {}).get("preStop") or {}).get("sleep") or {})
    pre_stop += float(sleep_action.get("seconds", 0))
    grace = pod.get("terminationGracePeriodSeconds", 30)
    check(f"{name}: terminationGracePeriodSeconds ({grace}) > preStop ({pre_stop:g}s) "
          f"+ drain timeout ({drain:g}s)", grace > pre_stop + drain)

    # Resources.
    res = c.get("resources") or {}
    check(f"{name}: cpu and memory requests and limits set",
          all(k in (res.get(level) or {}) for level in ("requests", "limits")
              for k in ("cpu", "memory")), str(res))

    # Downward API and OpenTelemetry attributes.
    refs = {e["name"]: ((e.get("valueFrom") or {}).get("fieldRef") or {}).get("fieldPath")
            for e in env_list(c)}
    check(f"{name}: POD_NAME from metadata.name", refs.get("POD_NAME") == "metadata.name")
    check(f"{name}: POD_NAMESPACE from metadata.namespace",
          refs.get("POD_NAMESPACE") == "metadata.namespace")
    names = [e["name"] for e in env_list(c)]
    otel = env_value(c, "OTEL_RESOURCE_ATTRIBUTES")
    if check(f"{name}: OTEL_RESOURCE_ATTRIBUTES set", bool(otel)):
        used = re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", otel)
        pos = names.index("OTEL_RESOURCE_ATTRIBUTES")
        check(f"{name}: OTEL_RESOURCE_ATTRIBUTES names the pod and namespace, "
              f"defined before it (for $(VAR) expansion)",
              {"POD_NAME", "POD_NAMESPACE"} <= set(used)
              and all(v in names[:pos] for v in used), f"uses {used}, env order {names}")

    # Service `stepflow-lb` would otherwise inject STEPFLOW_LB_PORT=tcp://... and friends into the
    # balancer's own STEPFLOW_LB_* variable namespace.
    check(f"{name}: enableServiceLinks false (no STEPFLOW_LB_* docker-link variables)",
          pod.get("enableServiceLinks") is False)
    check(f"{name}: STEPFLOW_LB_SERVICE names the worker Service",
          bool(env_value(c, "STEPFLOW_LB_SERVICE")))
    worker_svc = find(docs, "Service", env_value(c, "STEPFLOW_LB_SERVICE"))
    if worker_svc:
        port_name = arg_value(c, "--port-name") or "http"
        check(f"{name}: worker Service {worker_svc[0]['metadata']['name']} has port "
              f"named {port_name}",
              any(p.get("name") == port_name for p in worker_svc[0]["spec"]["ports"]))

    # Service account and RBAC.
    sa_name = pod.get("serviceAccountName")
    check(f"{name}: runs as ServiceAccount {LB_NAME}", sa_name == LB_NAME, str(sa_name))
    check(f"{name}: service-account token mounted (the watch needs it)",
          pod.get("automountServiceAccountToken") is not False)
    check(f"[{rel}] ServiceAccount/{sa_name} exists", bool(find(docs, "ServiceAccount", sa_name)))
    check_rbac(rel, docs, sa_name, ns)

    check_service(rel, docs, c, pod_labels)
    check_pdb(rel, docs, pod_labels, spec.get("replicas", 1))
    check_network_policies(rel, docs, c, pod_labels)

    # Everything namespaced lands in the balancer's namespace.
    cluster_scoped = {"Namespace", "ClusterRole", "ClusterRoleBinding"}
    stray = [f"{d['kind']}/{d['metadata']['name']}" for d in docs
             if d["kind"] not in cluster_scoped and d["metadata"].get("namespace") != ns]
    check(f"[{rel}] every namespaced object is in namespace {ns}", ns and not stray, str(stray))


def balancer_flags(docs) -> set[str]:
    flags = set()
    for d in find(docs, "Deployment", LB_NAME):
        for c in d["spec"]["template"]["spec"]["containers"]:
            if c["name"] == LB_NAME:
                for a in (c.get("command") or []) + (c.get("args") or []):
                    if a.startswith("--"):
                        flags.add(a.split("=", 1)[0])
    return flags


def check_rbac(rel, docs, sa_name, ns):
    check(f"[{rel}] no ClusterRole or ClusterRoleBinding",
          not find(docs, "ClusterRole") and not find(docs, "ClusterRoleBinding"))
    roles = find(docs, "Role")
    if not check(f"[{rel}] exactly one Role", len(roles) == 1, f"found {len(roles)}"):
        return
    role = roles[0]
    got: dict = {}
    extras = []
    for rule in role.get("rules") or []:
        if rule.get("resourceNames") or rule.get("nonResourceURLs"):
            extras.append(rule)
        for group in rule.get("apiGroups") or []:
            for res in rule.get("resources") or []:
                got.setdefault((group, res), set()).update(rule.get("verbs") or [])
    check(f"[{rel}] Role/{role['metadata']['name']}: exactly get/list/watch on "
          f"endpointslices (discovery.k8s.io) and endpoints (core), nothing else",
          got == EXPECTED_RBAC and not extras,
          f"got {sorted((g, r, sorted(v)) for (g, r), v in got.items())}")
    bindings = find(docs, "RoleBinding")
    ok = len(bindings) == 1 and bindings[0]["roleRef"].get("kind") == "Role" \
        and bindings[0]["roleRef"].get("name") == role["metadata"]["name"] \
        and bindings[0].get("subjects") == [
            {"kind": "ServiceAccount", "name": sa_name, "namespace": ns}]
    check(f"[{rel}] one RoleBinding: the Role to ServiceAccount {ns}/{sa_name} only", ok,
          str([(b["roleRef"], b.get("subjects")) for b in bindings]))


def check_service(rel, docs, c, pod_labels):
    svcs = find(docs, "Service", LB_NAME)
    if not check(f"[{rel}] Service/{LB_NAME} exists", len(svcs) == 1):
        return
    svc = svcs[0]
    name = f"[{rel}] Service/{LB_NAME}"
    check(f"{name}: selects the balancer pods",
          selector_matches(svc["spec"].get("selector") or {}, pod_labels))
    by_name = {p.get("name"): p for p in svc["spec"].get("ports") or []}
    for pname, port in (("http", DATA_PORT), ("metrics", ADMIN_PORT)):
        p = by_name.get(pname) or {}
        target = resolve_container_port(c, p.get("targetPort", p.get("port")))
        check(f"{name}: port {pname} {port} -> container {port}",
              p.get("port") == port and target == port, str(p))
    ann = svc["metadata"].get("annotations") or {}
    check(f"{name}: Prometheus scrape annotations (true, {ADMIN_PORT}, /metrics)",
          ann.get("prometheus.io/scrape") == "true"
          and ann.get("prometheus.io/port") == str(ADMIN_PORT)
          and ann.get("prometheus.io/path", "/metrics") == "/metrics", str(ann))


def check_pdb(rel, docs, pod_labels, replicas):
    pdbs = [p for p in find(docs, "PodDisruptionBudget")
            if selector_matches(p["spec"].get("selector"), pod_labels)]
    if not check(f"[{rel}] a PodDisruptionBudget covers the balancer", len(pdbs) == 1):
        return
    spec = pdbs[0]["spec"]
    if "minAvailable" in spec:
        ok = isinstance(spec["minAvailable"], int) and 1 <= spec["minAvailable"] < replicas
    else:
        ok = isinstance(spec.get("maxUnavailable"), int) and 1 <= spec["maxUnavailable"] < replicas
    check(f"[{rel}] PodDisruptionBudget keeps one pod and still allows a drain", ok, str(spec))


def check_network_policies(rel, docs, c, pod_labels):
    for np in find(docs, "NetworkPolicy"):
        name = f"[{rel}] NetworkPolicy/{np['metadata']['name']}"
        if not selector_matches(np["spec"].get("podSelector"), pod_labels):
            continue
        ports = [p.get("port") for rule in np["spec"].get("ingress") or []
                 for p in rule.get("ports") or []]
        resolved = {resolve_container_port(c, p) for p in ports}
        check(f"{name}: ingress ports resolve to the balancer's {DATA_PORT}/{ADMIN_PORT}",
              resolved == {DATA_PORT, ADMIN_PORT}, f"{ports} -> {resolved}")
        egress_ports = {p.get("port") for rule in np["spec"].get("egress") or []
                        for p in rule.get("ports") or []}
        check(f"{name}: egress allows the API server (443/6443)",
              {443, 6443} <= egress_ports, str(egress_ports))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_status(port: int, path: str) -> int | None:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        conn.request("GET", path)
        status = conn.getresponse().status
        conn.close()
        return status
    except OSError:
        return None


def find_binary() -> Path | None:
    env = os.environ.get("STEPFLOW_LB_BIN")
    if env:
        return Path(env)
    for cand in (REPO / "build" / "stepflow-lb",):
        if cand.is_file() and os.access(cand, os.X_OK):
            return cand
    return None


def check_against_binary(lb_flags: set[str]):
    """With a built binary: the flags the manifests pass exist, and the probe
    paths are served on the admin port. Loopback only, bounded in time."""
    binary = find_binary()
    if binary is None:
        info("no built binary (build/stepflow-lb or $STEPFLOW_LB_BIN): flags and "
             "probe paths checked against the documented contract only")
        return
    proc = subprocess.run([str(binary), "--help"], capture_output=True, text=True, timeout=10)
    helptext = proc.stdout + proc.stderr
    for flag in sorted(lb_flags):
        check(f"[binary] {binary.name} --help lists {flag} (used in deploy/)", flag in helptext)
    admin = free_port()
    argv = [str(binary), "--listen", f"127.0.0.1:{free_port()}",
            "--admin-listen", f"127.0.0.1:{admin}",
            "--backends", f"127.0.0.1:{free_port()}",  # nothing listens there
            "--drain-timeout", "1s"]
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("KUBERNETES_", "STEPFLOW_", "HEALTH_CHECK_"))
           and k not in {"BIND_ADDRESS", "METRICS_ADDRESS", "UPSTREAM_SERVICE", "MAX_FAILURES"}}
    child = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True, env=env)
    try:
        health = None
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and child.poll() is None:
            health = http_status(admin, "/health")
            if health is not None:
                break
            time.sleep(0.1)
        check("[binary] liveness path /health answers 200 on the admin port", health == 200,
              f"status={health} exit={child.poll()}")
        ready = http_status(admin, "/ready")
        # No healthy worker behind it, so 503 is the expected answer; 404 is not.
        check("[binary] readiness path /ready is served on the admin port (200 or 503)",
              ready in (200, 503), f"status={ready}")
    finally:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
            try:
                child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        err = child.stderr.read() if child.stderr else ""
        if failed and err:
            info("binary stderr: " + err.strip().replace("\n", "\n      ")[:2000])


def check_image_test_runs(who, sc, pod_sc):
    """The balancer's securityContext is what tests/image/test_image.py runs the image with."""
    runner = (REPO / "tests" / "image" / "test_image.py").read_text()
    uid = sc.get("runAsUser", pod_sc.get("runAsUser"))
    gid = sc.get("runAsGroup", pod_sc.get("runAsGroup"))
    flags = {
        "readOnlyRootFilesystem -> --read-only": '"--read-only"',
        "drop ALL -> --cap-drop ALL": '"--cap-drop", "ALL"',
        "allowPrivilegeEscalation false -> no-new-privileges": '"--security-opt", "no-new-privileges"',
        f"runAsUser {uid} / runAsGroup {gid} -> --user {uid}:{gid}": f'"--user", "{uid}:{gid}"',
    }
    for what, flag in flags.items():
        check(f"{who}: the image test runs the image so ({what})", flag in runner)


def check_dockerfiles():
    df = REPO / "Dockerfile"
    if not check("[Dockerfile] exists", df.is_file()):
        return
    text = df.read_text()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    froms = [ln for ln in lines if ln.upper().startswith("FROM ")]
    base = re.search(r"^ARG\s+BASE=(\S+)", text, re.M)
    check("[Dockerfile] builder stage on debian:bookworm (ARG BASE, which scripts/image.sh may "
          "point at a locally made bookworm)",
          bool(froms) and base is not None and base.group(1) == "debian:bookworm"
          and re.match(r"FROM\s+\$\{?BASE\}?\s+AS\s+\w+", froms[0], re.I) is not None,
          str(froms))
    check("[Dockerfile] runtime (last) stage is FROM scratch (no shell, no package manager)",
          bool(froms) and froms[-1].split()[1] == "scratch", str(froms))
    check("[Dockerfile] builder runs scripts/install-deps.sh then scripts/build.sh",
          0 <= text.find("scripts/install-deps.sh", text.find("RUN")) < text.find("scripts/build.sh build"))
    runtime = text[text.rfind("FROM "):]
    check("[Dockerfile] runtime stage is the tree scripts/image-rootfs.sh assembled (with the "
          f"passwd entry for UID {RUNTIME_UID})",
          "scripts/image-rootfs.sh" in text and re.search(r"^COPY --from=\w+ /rootfs/ /$", runtime, re.M)
          is not None and re.search(rf"stepflow:x:{RUNTIME_UID}:{RUNTIME_UID}:",
                                    (REPO / "scripts" / "image-rootfs.sh").read_text()) is not None)
    users = re.findall(r"^USER\s+(\S+)", runtime, re.M)
    check(f"[Dockerfile] runs as USER {RUNTIME_UID} (stepflow)",
          bool(users) and users[-1].split(":")[0] in {str(RUNTIME_UID), "stepflow"}, str(users))
    exposed = {int(p.split("/")[0]) for m in re.findall(r"^EXPOSE\s+(.+)$", runtime, re.M)
               for p in m.split()}
    check(f"[Dockerfile] exposes {DATA_PORT} and {ADMIN_PORT}",
          exposed == {DATA_PORT, ADMIN_PORT}, str(exposed))
    check("[Dockerfile] entrypoint is /usr/local/bin/stepflow-lb",
          re.search(r'^ENTRYPOINT\s+\["/usr/local/bin/stepflow-lb"\]', runtime, re.M) is not None)
    check("[Dockerfile] runtime stage runs nothing (RUN needs a shell it does not have)",
          not re.search(r"^RUN\b", runtime, re.M))
    wdf = DEPLOY / "worker" / "Dockerfile"
    if check("[deploy/worker/Dockerfile] exists", wdf.is_file()):
        wtext = wdf.read_text()
        check("[deploy/worker/Dockerfile] copies tests/worker/example_worker.py",
              "tests/worker/example_worker.py" in wtext)
        check(f"[deploy/worker/Dockerfile] runs as USER {RUNTIME_UID}",
              re.search(rf"^USER\s+{RUNTIME_UID}\b", wtext, re.M) is not None)


def check_kind_files():
    cluster = DEPLOY / "kind" / "cluster.yaml"
    if check("[deploy/kind] cluster.yaml exists", cluster.is_file()):
        doc = yaml.safe_load(cluster.read_text())
        check("[deploy/kind] cluster.yaml is a kind Cluster config",
              doc.get("kind") == "Cluster"
              and doc.get("apiVersion") == "kind.x-k8s.io/v1alpha4", str(doc)[:80])
    for script in ("apply.sh", "teardown.sh"):
        path = DEPLOY / "kind" / script
        ok = path.is_file() and os.access(path, os.X_OK)
        check(f"[deploy/kind] {script} exists and is executable", ok)
        if ok:
            proc = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
            check(f"[deploy/kind] {script} parses (bash -n)", proc.returncode == 0, proc.stderr)


def render_with_component(component: str) -> list[dict] | None:
    """Renders base + the example worker + `component` through a throw-away overlay (components
    render only inside an overlay; nothing is written into the repository)."""
    with tempfile.TemporaryDirectory() as tmp:
        rel = lambda p: os.path.relpath(DEPLOY / p, tmp)  # noqa: E731
        Path(tmp, "kustomization.yaml").write_text(yaml.safe_dump({
            "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
            "namespace": "stepflow", "resources": [rel("base"), rel("worker")],
            "components": [rel(component)]}))
        proc = subprocess.run(["kubectl", "kustomize", "--load-restrictor", "LoadRestrictionsNone", tmp],
                              capture_output=True, text=True, timeout=120)
    if not check(f"[deploy/{component}] renders inside an overlay", proc.returncode == 0, proc.stderr.strip()):
        return None
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def check_autoscaling_components():
    """components/keda and components/hpa-demand (docs/autoscaling.md)."""
    rel = "deploy/components/keda"
    docs = render_with_component("components/keda")
    if docs is not None:
        check_balancer(rel, docs)
        sos = find(docs, "ScaledObject", "stepflow-worker")
        if check(f"[{rel}] has the ScaledObject stepflow-worker", len(sos) == 1):
            so = sos[0]["spec"]
            check(f"[{rel}] ScaledObject scales to zero (minReplicaCount 0)", so.get("minReplicaCount") == 0,
                  str(so.get("minReplicaCount")))
            target = so["scaleTargetRef"]["name"]
            check(f"[{rel}] ScaledObject targets a Deployment that exists", bool(find(docs, "Deployment", target)),
                  target)
            trig = (so.get("triggers") or [{}])[0]
            meta = trig.get("metadata") or {}
            check(f"[{rel}] trigger is external-push with a targetDemand", trig.get("type") == "external-push"
                  and str(meta.get("targetDemand", "")).isdigit(), str(trig))
            svc = find(docs, "Service", LB_NAME)[0]
            host, _, port = str(meta.get("scalerAddress", "")).rpartition(":")
            sport = next((p for p in svc["spec"]["ports"] if str(p.get("port")) == port), None)
            check(f"[{rel}] scalerAddress names the balancer Service's scaler port", host.split(".")[0] == LB_NAME
                  and sport is not None and sport.get("name") == "scaler", f"{meta.get('scalerAddress')}")
            dep = find(docs, "Deployment", LB_NAME)[0]
            c = next(x for x in dep["spec"]["template"]["spec"]["containers"] if x["name"] == LB_NAME)
            listen = env_value(c, "STEPFLOW_LB_SCALER_LISTEN") or ""
            check(f"[{rel}] the Service's scaler port reaches --scaler-listen",
                  sport is not None and resolve_container_port(c, sport.get("targetPort")) == port_of_address(listen),
                  f"{sport} -> {listen}")
            peer = env_value(c, "STEPFLOW_LB_PEER_SERVICE")
            metrics_port = next((p for p in svc["spec"]["ports"] if p.get("name") == "metrics"), None)
            check(f"[{rel}] peers found through the balancer's own Service, whose `metrics` port is the admin port",
                  peer == LB_NAME and metrics_port is not None
                  and resolve_container_port(c, metrics_port.get("targetPort")) == ADMIN_PORT,
                  f"peer={peer} metrics={metrics_port}")
    rel = "deploy/components/hpa-demand"
    docs = render_with_component("components/hpa-demand")
    if docs is not None:
        hpas = find(docs, "HorizontalPodAutoscaler", "stepflow-worker")
        if check(f"[{rel}] has the HorizontalPodAutoscaler stepflow-worker", len(hpas) == 1):
            spec = hpas[0]["spec"]
            check(f"[{rel}] HPA targets a Deployment that exists",
                  bool(find(docs, "Deployment", spec["scaleTargetRef"]["name"])))
            ext = [m["external"] for m in spec.get("metrics", []) if m.get("type") == "External"]
            name = ext[0]["metric"]["name"] if ext else None
            check(f"[{rel}] HPA reads the external metric stepflow_lb_demand per replica",
                  name == "stepflow_lb_demand" and ext[0]["target"]["type"] == "AverageValue", str(ext))
            rules = yaml.safe_load((DEPLOY / "components/hpa-demand/prometheus-adapter-rules.yaml").read_text())
            served = [r["name"]["as"] for r in rules["rules"]["external"]]
            check(f"[{rel}] the prometheus-adapter rule serves the metric the HPA reads", name in served, str(served))
            query = rules["rules"]["external"][0]["metricsQuery"]
            check(f"[{rel}] the rule sums over balancer replicas", query.startswith("sum("), query)


def main() -> int:
    if shutil.which("kubectl") is None:
        print("SKIP: kubectl is not installed; the manifest checks need "
              "`kubectl kustomize` (no cluster needed)")
        return SKIP

    dirs = kustomize_dirs()
    lb_flags: set[str] = set()
    for rel in REQUIRED_OVERLAYS:
        check(f"[{rel}] overlay exists", rel in dirs)
    for rel in dirs:
        docs = render(rel)
        if docs is None:
            continue
        check_pod_templates(rel, docs)
        if rel in EXPECTED_LB_IMAGE or rel.startswith("deploy/overlays/"):
            check_balancer(rel, docs)
            lb_flags |= balancer_flags(docs)
        if rel == "deploy/overlays/kind":
            check(f"[{rel}] includes the example worker Deployment and Service",
                  bool(find(docs, "Deployment", "stepflow-worker"))
                  and bool(find(docs, "Service", "stepflow-worker")))
            check(f"[{rel}] creates its Namespace",
                  bool(find(docs, "Namespace", "stepflow")))
        if rel == "deploy/overlays/production":
            check(f"[{rel}] includes the NetworkPolicy sample",
                  bool(find(docs, "NetworkPolicy")))
            check(f"[{rel}] has no example worker",
                  not find(docs, "Deployment", "stepflow-worker"))
    check_autoscaling_components()
    check_against_binary(lb_flags)
    check_dockerfiles()
    check_kind_files()

    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
