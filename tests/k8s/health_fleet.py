#!/usr/bin/env python3
"""Many pods in one process, for scale tests and benchmarks: listens on N loopback addresses
(127.77.S.K, one per pod, all on one port as pods of a Deployment are) and answers each
GET /health with an instance id derived from the address it was reached on, and any other
request with a small JSON-RPC result. One asyncio loop; loopback only.

    python3 health_fleet.py --count 5000 [--port 0] [--procs 1]   # prints "port P" once every address listens
"""

import argparse
import asyncio
import ctypes
import os
import signal
import resource
import socket
import sys


def address(i):
    """The i-th pod's address: 100 per /24, starting at 127.77.0.1."""
    return "127.77.%d.%d" % (i // 100, i % 100 + 1)


def instance_id(ip):
    return "fleet-" + ip


class Pod(asyncio.Protocol):
    """One connection: answers each request in turn; a health check's connection is closed after
    its answer (the balancer opens a fresh one per check), so checks never pile up here."""

    def connection_made(self, transport):
        self.transport = transport
        self.ip = transport.get_extra_info("sockname")[0]
        self.buf = b""

    def data_received(self, data):
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buf) > 65536:
                    self.transport.close()
                return
            head = self.buf[:end]
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            if len(self.buf) < end + 4 + length:
                return
            self.buf = self.buf[end + 4 + length:]
            health = head.startswith(b"GET /health")
            iid = instance_id(self.ip).encode()
            if health:
                body = b'{"status":"healthy","instanceId":"%s","inFlight":0}' % iid
            else:
                body = b'{"jsonrpc":"2.0","id":"probe","result":{"instanceId":"%s"}}' % iid
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n%s"
                                 % (len(body), b"Connection: close\r\n" if health else b"", body))
            if health:
                self.transport.close()
                return


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--count", type=int, required=True)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--procs", type=int, default=1)
    args = ap.parse_args()
    parent = os.getpid()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = args.count * 3 + 1024
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(want, hard), max(want, hard)))
    port = args.port
    socks = []
    for i in range(args.count):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((address(i), port))
        port = sock.getsockname()[1]
        sock.listen(128)
        socks.append(sock)
    # --procs processes share the listeners (each accepts on all of them): checks of thousands of
    # pods are more than one Python loop answers in time on a busy machine.
    for _ in range(args.procs - 1):
        if os.fork() == 0:
            ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: go with the parent
            break
    asyncio.run(serve(socks, port if os.getpid() == parent else None))


async def serve(socks, port):
    loop = asyncio.get_running_loop()
    servers = [await loop.create_server(Pod, sock=sock) for sock in socks]
    if port is not None:
        print("port %d" % port, flush=True)
    await asyncio.Event().wait()
    del servers


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(0)
