"""Fidelity of the API server stand-in, checked once against the real client: kubectl.

If kubectl (with its client-go) lists, pages, watches and authenticates against
tests/k8s/fake_apiserver.py and reads back the very objects the stand-in holds, the wire format
the balancer is tested against is the real one. Skipped (exit 77, with a message) where kubectl
is not installed.
"""

import json
import os
import queue
import shutil
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "k8s"))

from harness import check, test, wait_for, run_tests, _started  # noqa: E402
from fake_apiserver import FakeApiServer, endpoint  # noqa: E402

KUBECTL = shutil.which("kubectl")
SELECTOR = "kubernetes.io/service-name=workers"


def kubectl(api, *args, token="token-1", timeout=30):
    cmd = [KUBECTL, "--kubeconfig=/dev/null", "--server", api.url, "--certificate-authority", api.ca_file,
           "--token", token, "-n", api.namespace, "--request-timeout=20s"] + list(args)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def setup():
    api = FakeApiServer().start()
    api.put_slice("workers-a", [endpoint("10.0.0.1", "p1"),
                                endpoint("10.0.0.2", "p2", ready=False, serving=True, terminating=True)], port=8080)
    api.put_slice("workers-b", [endpoint("fd00::5", "p5")], port=8080, address_type="IPv6")
    api.put_slice("other-a", [endpoint("10.9.0.1")], port=80, service="other")
    return api


@test
def kubectl_lists_slices_through_tls_and_token():
    api = setup()
    r = kubectl(api, "get", "endpointslices", "-l", SELECTOR, "-o", "json")
    check(r.returncode == 0, "kubectl get failed: " + r.stderr)
    items = json.loads(r.stdout)["items"]
    check([i["metadata"]["name"] for i in items] == ["workers-a", "workers-b"], "label selector honoured")
    check(items[0] == api.objects["endpointslices"][("ns", "workers-a")], "objects read back unchanged")
    bad = kubectl(api, "get", "endpointslices", token="wrong")
    check(bad.returncode != 0 and "Unauthorized" in bad.stderr, "a wrong token is refused: " + bad.stderr)


@test
def kubectl_follows_pages():
    api = setup()
    api.page_size = 1
    r = kubectl(api, "get", "endpointslices", "-o", "json", "--chunk-size=1")
    check(r.returncode == 0, "kubectl get failed: " + r.stderr)
    check(len(json.loads(r.stdout)["items"]) == 3, "every page read")
    check(api.count("list") >= 3, "continue tokens followed")


@test
def kubectl_watch_sees_events_in_order():
    api = setup()
    cmd = [KUBECTL, "--kubeconfig=/dev/null", "--server", api.url, "--certificate-authority", api.ca_file,
           "--token", "token-1", "-n", "ns", "get", "endpointslices", "-l", SELECTOR, "-o", "json", "--watch",
           "--output-watch-events"]
    api.split_events = True
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _started.append(proc)
    lines = queue.Queue()
    threading.Thread(target=lambda: [lines.put(l) for l in proc.stdout], daemon=True).start()
    events = []

    def read_events(n):
        deadline = time.monotonic() + 15
        while len(events) < n and time.monotonic() < deadline:
            try:
                events.append(json.loads(lines.get(timeout=0.2)))
            except queue.Empty:
                pass
        return len(events) >= n

    check(read_events(2), "initial ADDED events")
    api.wait_watching(10)
    api.put_slice("workers-a", [endpoint("10.0.0.3", "p3")], port=8080)
    api.delete_slice("workers-b")
    api.send_bookmarks()  # kubectl must swallow bookmarks silently
    check(read_events(4), "MODIFIED and DELETED events: %r" % events)
    proc.kill()
    types = [e["type"] for e in events]
    check(types == ["ADDED", "ADDED", "MODIFIED", "DELETED"], "event order: %r" % types)
    check(events[2]["object"]["endpoints"][0]["addresses"] == ["10.0.0.3"], "event object")


@test
def kubectl_reads_endpoints_and_watch_errors():
    api = setup()
    api.put_endpoints("workers", [{"addresses": [{"ip": "10.0.0.1", "targetRef": {"kind": "Pod", "name": "p1"}}],
                                   "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]}])
    r = kubectl(api, "get", "endpoints", "workers", "-o", "json")
    check(r.returncode == 0, "kubectl get endpoints failed: " + r.stderr)
    check(json.loads(r.stdout)["subsets"][0]["addresses"][0]["ip"] == "10.0.0.1", "Endpoints object")
    api.compact()
    path = "/apis/discovery.k8s.io/v1/namespaces/ns/endpointslices?watch=1&resourceVersion=1&timeoutSeconds=5"
    raw = kubectl(api, "get", "--raw", path)
    event = json.loads(raw.stdout.splitlines()[0])
    check(event["type"] == "ERROR" and event["object"]["code"] == 410, "expired watch: %r" % event)


if __name__ == "__main__":
    if not KUBECTL:
        print("SKIP  kubectl is not installed: the stand-in's fidelity check against the real client is skipped")
        print("0 passed, 0 failed")
        sys.exit(77)
    run_tests()
