"""A slow log sink cannot stall traffic (issue 15 point 6): stderr is a pipe nobody reads, requests
keep flowing, the dropped-lines counter rises; once the pipe is read again, logging resumes."""

import http.client
import json
import subprocess
import threading

from harness import _started, check, http_get, lb_binary, run_tests, test, wait_for, Worker

BODY = b'{"jsonrpc":"2.0","id":1,"method":"components/execute","params":{"component":"/echo","input":1}}'
HEADERS = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}


def dropped(admin_port):
    for line in http_get(admin_port, "/metrics")[1].decode().splitlines():
        if line.startswith("stepflow_lb_log_lines_dropped_total "):
            return float(line.split()[1])
    return None


@test
def a_stderr_nobody_reads_does_not_stall_requests():
    w = Worker("log", max_concurrency=16)
    proc = subprocess.Popen([lb_binary(), "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--threads", "2",
                             "--log-format", "json", "--health-interval", "200ms", "--backends", w.address,
                             "--log-buffer-lines", "64"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _started.append(proc)
    # Read up to the "listening" line, then stop reading: the pipe (64 KiB) fills up.
    while True:
        line = proc.stderr.readline()
        check(line, "stepflow-lb exited before listening")
        record = json.loads(line)
        if record.get("message") == "listening":
            break
    port = int(record["proxy"].rsplit(":", 1)[1])
    admin = int(record["admin"].rsplit(":", 1)[1])
    wait_for(lambda: http_get(admin, "/ready")[0] == 200, 15, "balancer ready")
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    # Each request logs an access line (~250 bytes): 1500 of them are far more than the pipe
    # and the queue hold. Every one must still be answered promptly.
    for i in range(1500):
        conn.request("POST", "/", BODY, HEADERS)
        r = conn.getresponse()
        r.read()
        check(r.status == 200, f"request {i}: {r.status}")
    first = dropped(admin)
    check(first and first > 0, f"dropped lines counted: {first}")
    seen = []
    reader = threading.Thread(target=lambda: seen.extend(proc.stderr), daemon=True)
    reader.start()
    # Once the pipe is read again, a notice says what was lost and new records come through.
    def resumed():
        conn.request("POST", "/", BODY, HEADERS)
        conn.getresponse().read()
        records = [json.loads(line) for line in list(seen)]
        notice = [i for i, r in enumerate(records) if r.get("message") == "log lines dropped: the log sink was too slow"]
        return notice and any(r.get("message") == "request" for r in records[notice[0] + 1:])
    wait_for(resumed, 15, "logging resumed with a dropped-lines notice")
    conn.close()
    proc.terminate()
    proc.wait(timeout=10)
    check(proc.returncode == 0, f"exit status {proc.returncode}")


run_tests()
