#!/usr/bin/env python3
"""Many pods in one process, for scale tests and benchmarks: listens on N loopback addresses
(127.77.S.K, one per pod, all on one port as pods of a Deployment are) and answers each
GET /health with an instance id derived from the address it was reached on, and any other
request with a small JSON-RPC result. One asyncio loop; loopback only.

    python3 health_fleet.py --count 5000 [--port 0]   # prints "port P" once every address listens
"""

import argparse
import asyncio
import resource
import socket
import sys


def address(i):
    """The i-th pod's address: 100 per /24, starting at 127.77.0.1."""
    return "127.77.%d.%d" % (i // 100, i % 100 + 1)


def instance_id(ip):
    return "fleet-" + ip


async def handle(reader, writer):
    ip = writer.get_extra_info("sockname")[0]
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            if length:
                await reader.readexactly(length)
            health = head.startswith(b"GET /health")
            if health:
                body = b'{"status":"healthy","instanceId":"%s","inFlight":0}' % instance_id(ip).encode()
            else:
                body = b'{"jsonrpc":"2.0","id":"probe","result":{"instanceId":"%s"}}' % instance_id(ip).encode()
            # A health check comes on a fresh connection each time: close it after the answer, so
            # thousands of checks never pile up open connections here.
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n%s"
                         % (len(body), b"Connection: close\r\n" if health else b"", body))
            await writer.drain()
            if health:
                break
    except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError, ValueError):
        pass
    finally:
        writer.close()


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--count", type=int, required=True)
    ap.add_argument("--port", type=int, default=0)
    args = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = args.count * 3 + 1024
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(want, hard), max(want, hard)))
    port = args.port
    servers = []
    for i in range(args.count):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((address(i), port))
        port = sock.getsockname()[1]
        sock.listen(64)
        servers.append(await asyncio.start_server(handle, sock=sock))
    print("port %d" % port, flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        sys.exit(0)
