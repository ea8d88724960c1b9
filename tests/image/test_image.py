#!/usr/bin/env python3
"""The container image, built and run the way a cluster runs it.

Builds the image with scripts/image.sh (docker if its daemon answers, else podman; the layers and
the locally made Debian base are cached, so a warm build takes seconds) under a unique tag, then:

- checks what the image holds: every file, listed from an exported container, is the binary, a
  library of its ldd closure, the loader, the CA bundle or one of four small /etc files; no
  shell, no package manager; under 40 MB; UID/GID 1000 in /etc/passwd and /etc/group;
- runs it as deploy/base/deployment.yaml does (read-only root file system, every capability
  dropped, no new privileges, UID 1000, the engine's default seccomp profile), on the host
  network against example workers started on the host, and checks /ready, a proxied request,
  a pinned SSE session whose callback is answered through the balancer, that the balancer is
  PID 1 with exactly those restrictions, that `stop` during a stream lets the stream finish and
  the process exit 0 within the drain timeout, and that nothing was written inside the container;
- resolves a name only /etc/hosts knows (Kubernetes hostAliases), with glibc alone.

Every container and tag it makes is removed at the end (the cached base and build layers stay).
Exits 77 (meson's "skipped") only when no engine can run a container here.

    python3 tests/image/test_image.py
"""

import atexit
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(ROOT, "tests", "integration"))

from harness import Balancer, Worker, check, client, run_tests, test, wait_for  # noqa: E402

SKIP = 77
MAX_IMAGE_BYTES = 40 * 1000 * 1000
DRAIN_SECONDS = 10
RUN_ID = uuid.uuid4().hex[:10]
TAG = f"localhost/stepflow-lb:test-{RUN_ID}"
# What the runtime stage may hold besides the shared libraries (checked against ldd below).
FIXED_FILES = {
    "usr/local/bin/stepflow-lb",
    "etc/ssl/certs/ca-certificates.crt",
    "usr/lib/ssl/cert.pem",  # symlink to the bundle: OpenSSL's default verify path
    "etc/passwd",
    "etc/group",
    "etc/nsswitch.conf",
}

engine = None
containers = []


def sh(*args, timeout=120, check_rc=True):
    proc = subprocess.run([engine, *args], capture_output=True, text=True, timeout=timeout)
    if check_rc and proc.returncode != 0:
        raise AssertionError(f"{engine} {' '.join(args)}: exit {proc.returncode}: {proc.stderr.strip()}")
    return proc.stdout


def pick_engine():
    """docker if its daemon answers, else podman if it is installed and works; else None."""
    for name in ("docker", "podman"):
        if shutil.which(name) is None:
            continue
        try:
            ok = subprocess.run([name, "info"], capture_output=True, timeout=30).returncode == 0
        except subprocess.TimeoutExpired:
            ok = False
        if ok:
            return name
    return None


def engine_flags():
    """podman here: runc (crun fails on hybrid cgroups) and ulimits below the host's hard ones."""
    if engine != "podman":
        return []
    flags = ["--runtime", "runc"] if shutil.which("runc") else []
    return flags + ["--ulimit", "nofile=4096:4096", "--ulimit", "nproc=4096:4096"]


def cleanup():
    for name in containers:
        no_wait = ["-t", "0"] if engine == "podman" else []  # docker rm has no -t
        subprocess.run([engine, "rm", "-f", *no_wait, name], capture_output=True, timeout=60)
    # Untags this run's image; the layers stay as the next build's cache.
    subprocess.run([engine, "rmi", TAG], capture_output=True, timeout=60)


def run_argv(name, extra=()):
    """The `run` that mirrors deploy/base/deployment.yaml's securityContext."""
    containers.append(name)
    return [engine, "run", "--name", name, *engine_flags(), "--network", "host",
            "--read-only", *(["--read-only-tmpfs=false"] if engine == "podman" else []),
            "--cap-drop", "ALL", "--security-opt", "no-new-privileges", "--user", "1000:1000",
            *extra, TAG]


def exported_files(name):
    """{path: TarInfo} of a created (never started) container's whole file system."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "fs.tar")
        sh("export", "-o", path, name)
        with tarfile.open(path) as tar:
            members = {m.name.lstrip("./"): m for m in tar.getmembers()}
            contents = {n: tar.extractfile(m).read() for n, m in members.items()
                        if m.isfile() and n.startswith("etc/") and m.size < 4096}
    return members, contents


def proc_status(pid):
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def ns_ids(pid, kind, host_ids):
    """Host UIDs/GIDs of `pid` as its user namespace sees them (rootless podman maps 1000 to a
    subordinate id such as 100999; a rootful engine maps identically)."""
    with open(f"/proc/{pid}/{kind}_map") as f:
        ranges = [tuple(map(int, line.split())) for line in f]
    return [next((inside + int(h) - outside for inside, outside, count in ranges
                  if outside <= int(h) < outside + count), None) for h in host_ids]


def mount_points(pid):
    with open(f"/proc/{pid}/mountinfo") as f:
        return {line.split()[4]: line.split()[5] for line in f}


def written_files(name, mounts):
    """Changes in the container's own layer that the engine did not make for its mounts."""
    # The engine creates its bind-mount targets (/etc/hosts, ...) in the container's layer, so
    # their parent directories show as changed; anything else is a write by the balancer.
    parents = {os.path.dirname(m) for m in mounts} | {"/"}
    out = sh("diff", "--format", "json", name) if engine == "podman" else sh("diff", name)
    if engine == "podman":
        doc = json.loads(out or "{}")
        entries = [("C", p) for p in doc.get("changed") or []] + \
                  [("A", p) for p in doc.get("added") or []] + [("D", p) for p in doc.get("deleted") or []]
    else:
        entries = [tuple(line.split(None, 1)) for line in out.splitlines() if line.strip()]
    return [f"{kind} {path}" for kind, path in entries
            if not (kind == "C" and path in parents) and path not in mounts
            and path != "/etc/mtab"]


@test
def image_holds_the_binary_its_libraries_and_nothing_else():
    size = int(sh("image", "inspect", "--format", "{{.Size}}", TAG).strip())
    print(f"info  image size {size / 1e6:.1f} MB")
    check(size < MAX_IMAGE_BYTES, f"image is {size / 1e6:.1f} MB, over {MAX_IMAGE_BYTES / 1e6:.0f} MB")
    config = json.loads(sh("image", "inspect", "--format", "{{json .Config}}", TAG))
    check(config.get("User") == "1000:1000", f"USER is {config.get('User')!r}")
    check(config.get("Entrypoint") == ["/usr/local/bin/stepflow-lb"], config.get("Entrypoint"))

    name = f"stepflow-lb-export-{RUN_ID}"
    containers.append(name)
    sh("create", "--name", name, *engine_flags(), TAG)
    members, contents = exported_files(name)
    files = {n for n, m in members.items() if not m.isdir()}
    libs = {n for n in files if n.startswith(("lib/", "lib64/", "usr/lib/")) and ".so" in n}
    check(FIXED_FILES <= files, f"missing: {sorted(FIXED_FILES - files)}")
    check(files - FIXED_FILES == libs, f"unexpected files: {sorted(files - FIXED_FILES - libs)}")
    for shell in ("bin/sh", "bin/bash", "usr/bin/sh", "usr/bin/apt-get", "usr/bin/dpkg"):
        check(shell not in files, f"the image holds {shell}")
    # The libraries are exactly what the binary loads: its ldd closure on the host, by soname
    # (the host builds the same binary from the same Debian packages).
    binary = os.environ.get("STEPFLOW_LB_BIN") or os.path.join(ROOT, "build", "stepflow-lb")
    host_ldd = subprocess.run(["ldd", binary], capture_output=True, text=True).stdout \
        if os.path.exists(binary) else ""
    sanitizer_runtimes = ("libasan", "libubsan", "liblsan", "libtsan")  # SANITIZE=1 builds only
    wanted = {os.path.basename(line.split()[0]) for line in host_ldd.splitlines()
              if line.strip() and not line.strip().startswith("linux-vdso")
              and not line.strip().startswith(sanitizer_runtimes)}
    if wanted:
        check({os.path.basename(n) for n in libs} == wanted,
              f"libraries {sorted(os.path.basename(n) for n in libs)} != ldd {sorted(wanted)}")
    check(members["usr/lib/ssl/cert.pem"].issym()
          and members["usr/lib/ssl/cert.pem"].linkname == "/etc/ssl/certs/ca-certificates.crt",
          "OpenSSL's default cert.pem points at the CA bundle")
    check(members["etc/ssl/certs/ca-certificates.crt"].size > 100_000, "CA bundle present")
    check(contents["etc/passwd"].decode().split(":")[2:4] == ["1000", "1000"], contents["etc/passwd"])
    check(contents["etc/group"].decode().split(":")[2] == "1000", contents["etc/group"])
    sh("rm", name)
    containers.remove(name)


@test
def locked_down_container_proxies_pins_drains_and_writes_nothing():
    workers = [Worker(f"img{i}") for i in range(2)]
    name = f"stepflow-lb-run-{RUN_ID}"
    lb = Balancer([w.address for w in workers], launcher=run_argv(name),
                  args=["--drain-timeout", f"{DRAIN_SECONDS}s"])
    lb.wait_healthy(2)
    status, body = lb.admin_get("/ready")
    check(status == 200, f"/ready {status}")

    # Proxied request and a pinned SSE session with a callback answered through the balancer.
    r = lb.execute("/echo", {"from": "container"})
    check(r.status == 200 and r.json()["result"]["output"] == {"from": "container"}, r)
    s = lb.session(2, timeout=30)
    check(s.ok, f"session failed: {s}")
    check(len(s.callback_statuses) == 2, f"callbacks answered: {s.callback_statuses}")
    check(s.result["instanceId"] == s.instance_id, "final result came from the pinned instance")
    check(sum(w.health()["misroutedCallbacks"] for w in workers) == 0, "no misrouted callback")

    # The process: PID 1 in its namespace, UID 1000, no capabilities, no new privileges,
    # seccomp filtering, read-only root.
    pid = int(sh("inspect", "--format", "{{.State.Pid}}", name).strip())
    st = proc_status(pid)
    check(os.readlink(f"/proc/{pid}/exe") == "/usr/local/bin/stepflow-lb", os.readlink(f"/proc/{pid}/exe"))
    check(st["NSpid"].split()[-1] == "1", f"NSpid {st['NSpid']}: the balancer is not PID 1")
    uids, gids = ns_ids(pid, "uid", st["Uid"].split()), ns_ids(pid, "gid", st["Gid"].split())
    check(uids == [1000] * 4 and gids == [1000] * 4, f"uids {uids}, gids {gids} in the container")
    for caps in ("CapEff", "CapPrm", "CapBnd"):
        check(int(st[caps], 16) == 0, f"{caps} {st[caps]}")
    check(st["NoNewPrivs"] == "1", f"NoNewPrivs {st['NoNewPrivs']}")
    check(st["Seccomp"] == "2", f"Seccomp {st['Seccomp']} (2: filtered)")
    check(mount_points(pid)["/"].split(",")[0] == "ro", f"root mounted {mount_points(pid)['/']}")
    check(not os.listdir(f"/proc/{pid}/root/dev/shm"), "nothing in /dev/shm")
    mounts = mount_points(pid)
    written = written_files(name, mounts)
    check(written == [], f"written inside the container: {written}")

    # Stop during a stream: it finishes, then the process exits 0 within the drain timeout.
    stream = client.SseReader("127.0.0.1", lb.port, {
        "jsonrpc": "2.0", "id": "drain", "method": "components/execute",
        "params": {"component": "/stream", "input": {"events": 5, "interval_ms": 200}}})
    check(stream.next_event(timeout=10) is not None, "stream started")
    start = time.monotonic()
    stopper = subprocess.Popen([engine, "stop", "-t", str(DRAIN_SECONDS * 2), name],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: lb.admin_get("/ready")[0] == 503, 10, "/ready 503 while draining")
    events = [e.json() for e in stream]
    check(not stream.ended_abnormally and events and events[-1].get("result", {}).get("events") == 5,
          f"the stream open at stop finished: {events[-1:] if events else events}, {stream.error}")
    code = lb.wait_exit(timeout=DRAIN_SECONDS * 3)
    elapsed = time.monotonic() - start
    stopper.wait(timeout=30)
    print(f"info  stopped in {elapsed:.2f}s")
    check(code == 0, f"exit status {code}; logs:\n{lb.log_text()}")
    check(elapsed < DRAIN_SECONDS, f"took {elapsed:.1f}s, drain timeout {DRAIN_SECONDS}s")
    check(int(sh("inspect", "--format", "{{.State.ExitCode}}", name).strip()) == 0, "engine saw exit 0")
    check(any(rec.get("message") == "drained: exiting" for rec in lb.logs()), "drained: exiting logged")
    # The stopped container's layer: a read-only root leaves nothing to find, checked anyway.
    written = written_files(name, mounts)
    check(written == [], f"written inside the container: {written}")


@test
def resolves_names_from_etc_hosts():
    # A name only /etc/hosts knows (Kubernetes hostAliases write there; here --add-host), in
    # DNS discovery: getaddrinfo works in an image without libnss_*.so files (glibc >= 2.34 has
    # its files and dns lookups built in) and consults /etc/hosts.
    w = Worker("img-dns")
    name = "stepflow-worker.test"  # .test: reserved, never in public DNS
    lb = Balancer(launcher=run_argv(f"stepflow-lb-dns-{RUN_ID}", ["--add-host", f"{name}:127.0.0.1"]),
                  wait_ready=False, args=["--upstream-service", f"{name}:{w.port}", "--dns-interval", "200ms"])
    lb.wait_healthy(1)
    check([b["address"] for b in lb.backends()] == [f"127.0.0.1:{w.port}"], lb.backends())
    r = lb.execute("/echo", {"via": name})
    check(r.status == 200, f"routed: {r.status}")
    lb.stop()
    check(lb.proc.returncode == 0, f"exit status {lb.proc.returncode}")


def main():
    global engine
    engine = pick_engine()
    if engine is None:
        print("SKIP  no container engine can run a container here: docker's daemon does not answer "
              "and podman is not installed or not working (scripts/install-deps.sh image installs it)")
        sys.exit(SKIP)
    atexit.register(cleanup)
    # meson's timeout sends SIGTERM: exit through atexit so the containers go too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    start = time.monotonic()
    build = subprocess.run([os.path.join(ROOT, "scripts", "image.sh"), TAG], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, timeout=1500,
                           env=dict(os.environ, STEPFLOW_LB_ENGINE=engine))
    if build.returncode != 0:
        print(build.stderr[-6000:])
        print("FAIL  scripts/image.sh")
        print("0 passed, 1 failed")
        sys.exit(1)
    print(f"info  {engine}: scripts/image.sh built {TAG} in {time.monotonic() - start:.1f}s")
    run_tests()


if __name__ == "__main__":
    main()
