#!/usr/bin/env python3
"""A small, fast SSE worker for the benchmarks (asyncio, one process, any number of ports).

    python3 bench/sse_server.py PORT [PORT ...]

GET /health answers {"status":"healthy","instanceId":"sse-<port>"}. Any other request (the body
is read and ignored) is answered 200 text/event-stream, chunked, with events
`data: {"t":<CLOCK_MONOTONIC ns at send>,"seq":<k>}`, shaped by the query string:

    n=<events>       how many events (0: one event, then hold the stream open until the client
                     goes away)
    every=<ms>       spacing of the events
    first=<ms>       delay before the first event (the response head goes out at once)

After the last event the stream ends with a JSON-RPC result event and the chunked terminator.
"""
import asyncio
import json
import sys
import time
from urllib.parse import parse_qs, urlsplit

SSE_HEAD = ("HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
            "Stepflow-Instance-Id: {id}\r\nTransfer-Encoding: chunked\r\n\r\n")


def chunk(payload: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(payload), payload)


def event(seq: int) -> bytes:
    return chunk(b'data: {"t":%d,"seq":%d}\n\n' % (time.monotonic_ns(), seq))


async def read_request(reader):
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    method, target, _ = lines[0].split(" ", 2)
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value)
    if length:
        await reader.readexactly(length)
    return method, target


async def serve(reader, writer, instance_id):
    try:
        while True:
            method, target = await read_request(reader)
            url = urlsplit(target)
            if url.path == "/health":
                body = json.dumps({"status": "healthy", "instanceId": instance_id}).encode()
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                             % (len(body), body))
                await writer.drain()
                continue
            q = {k: int(v[0]) for k, v in parse_qs(url.query).items()}
            n, every, first = q.get("n", 0), q.get("every", 100), q.get("first", 0)
            writer.write(SSE_HEAD.format(id=instance_id).encode())
            if first:
                await writer.drain()
                await asyncio.sleep(first / 1e3)
            writer.write(event(0))
            if n == 0:  # hold: nothing more until the client closes
                await reader.read()
                break
            for seq in range(1, n):
                await asyncio.sleep(every / 1e3)
                writer.write(event(seq))
            writer.write(chunk(b'data: {"jsonrpc":"2.0","id":1,"result":{"done":true}}\n\n') + b"0\r\n\r\n")
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError, ValueError):
        pass
    finally:
        writer.close()


async def main(ports):
    servers = []
    for port in ports:
        iid = f"sse-{port}"
        servers.append(await asyncio.start_server(lambda r, w, iid=iid: serve(r, w, iid),
                                                  "127.0.0.1", port, backlog=4096))
    await asyncio.gather(*(s.serve_forever() for s in servers))


if __name__ == "__main__":
    asyncio.run(main([int(p) for p in sys.argv[1:]]))
