"""What one client or one worker can pin in the balancer's memory and time (issue 15): request
bodies under back-pressure, a timeout for every phase, limits on buffers, interim responses and
connections, HTTP/2 early answers."""

import os
import socket
import time

from harness import Balancer, Worker, check, run_tests, test, wait_for

MB = 1024 * 1024


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def send_until_stalled(sock, total, stall=1.0):
    """Sends up to `total` bytes of body; stops once the peer has taken nothing for `stall`
    seconds. Returns the bytes sent."""
    block = b"x" * (256 * 1024)
    sent = 0
    sock.settimeout(stall)
    while sent < total:
        try:
            n = sock.send(block[: min(len(block), total - sent)])
        except socket.timeout:
            break
        sent += n
    return sent


@test
def http1_upload_to_a_worker_that_reads_nothing_is_held_back():
    # The worker never reads the body: the balancer must stop reading the client once the
    # worker's side holds its high-water mark, as HTTP/2 does, instead of buffering it all.
    w = Worker("noread")
    lb = Balancer([w.address], threads=1)
    total = int(os.environ.get("BOUNDS_UPLOAD_MB", "200")) * MB
    before = rss_kib(lb.proc.pid)
    sock = socket.create_connection(("127.0.0.1", lb.port))
    sock.sendall(b"POST /_noread?hold_ms=60000 HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % total)
    sent = send_until_stalled(sock, total)
    grown = rss_kib(lb.proc.pid) - before
    print(f"      sent {sent / MB:.1f} MiB of {total / MB:.0f} MiB before the client was held back; "
          f"balancer RSS grew {grown / 1024:.1f} MiB", flush=True)
    check(sent < total, "the client was held back before the whole body was taken")
    check(grown < 16 * 1024, f"balancer RSS grew {grown} KiB (limit 16 MiB)")
    sock.close()


if __name__ == "__main__":
    run_tests()
