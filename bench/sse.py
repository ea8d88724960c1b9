#!/usr/bin/env python3
"""Server-Sent Events through stepflow-lb, HAProxy and nginx: memory, added latency, no holding.

    python3 bench/sse.py [--rounds 5] [--streams 2000,9000]   # --streams 2000,20000: the scale figure

Backends: bench/sse_server.py (two ports, one process) on the load core; this script is the
client and pins itself to the load core too; each proxy runs on the other core, freshly started
for every (round, proxy) so memory figures start from the same point. Per run:

  latency  50 streams through the proxy and 50 direct to the backends, side by side, each
           receiving 100 events 50 ms apart (random phase per stream pair). Every event carries
           its CLOCK_MONOTONIC send time; added latency = percentile(through proxy) -
           percentile(direct), for p50 and p99. A run during which other processes used more
           than 0.3 cores is repeated (twice at most) and the least disturbed one is kept.
  held     10 streams whose head comes at once and whose events come 300 ms apart: the head and
           every event must arrive within 50 ms (HAProxy without http-no-delay holds ~200 ms).
  memory   after a 50-stream warm-up, open streams that receive one event and then stay open;
           RSS growth of the proxy (all its processes) divided by open streams, at 2,000 and
           9,000 streams.
"""
import argparse
import asyncio
import os
import random
import resource
import sys
import time

import benchlib as B

REQUEST = ("POST {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
           "Accept: application/json, text/event-stream\r\nContent-Length: {n}\r\n\r\n{body}")
RPC = '{"jsonrpc":"2.0","id":7,"method":"components/execute","params":{}}'


class Dechunker:
    """Incremental HTTP/1.1 chunked-body decoder."""

    def __init__(self):
        self.raw = b""
        self.left = 0   # payload bytes left in the current chunk
        self.skip = 0   # CRLF bytes after a chunk's payload
        self.done = False

    def feed(self, data):
        self.raw += data
        out = bytearray()
        while self.raw and not self.done:
            if self.skip:
                n = min(self.skip, len(self.raw))
                self.raw, self.skip = self.raw[n:], self.skip - n
            elif self.left:
                n = min(self.left, len(self.raw))
                out += self.raw[:n]
                self.raw, self.left = self.raw[n:], self.left - n
                if not self.left:
                    self.skip = 2
            else:
                i = self.raw.find(b"\r\n")
                if i < 0:
                    break
                size = int(self.raw[:i].split(b";")[0], 16)
                self.raw = self.raw[i + 2:]
                self.left = size
                self.done = size == 0
        return bytes(out)


class Stream:
    """One SSE request; records per-event latency (µs) and the response head's delay."""

    def __init__(self, port, query):
        self.port, self.query = port, query
        self.latencies = []
        self.head_delay_us = None
        self.first = asyncio.get_running_loop().create_future()
        self.writer = None

    async def run(self):
        try:
            reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
            sent = time.monotonic_ns()
            self.writer.write(REQUEST.format(target="/?" + self.query, n=len(RPC), body=RPC).encode())
            head = await reader.readuntil(b"\r\n\r\n")
            self.head_delay_us = (time.monotonic_ns() - sent) / 1e3
            status = head.split(b" ", 2)[1]
            if status != b"200":
                raise RuntimeError(f"status {status.decode()}")
            chunked = b"transfer-encoding: chunked" in head.lower()
            dechunk, pending = Dechunker(), b""
            while True:
                data = await reader.read(65536)
                now = time.monotonic_ns()
                if not data:
                    break
                pending += dechunk.feed(data) if chunked else data
                *events, pending = pending.split(b"\n\n")
                for ev in events:
                    if ev.startswith(b'data: {"t":'):
                        t = int(ev[11:ev.index(b",")])
                        self.latencies.append((now - t) / 1e3)
                        if not self.first.done():
                            self.first.set_result(True)
                if chunked and dechunk.done:
                    break
        except Exception as e:  # noqa: BLE001 - reported to whoever waits for the first event
            if not self.first.done():
                self.first.set_exception(e)
        finally:
            if self.writer:
                self.writer.close()

    def close(self):
        if self.writer:
            self.writer.close()


async def open_streams(port, query, count, parallel=200):
    """Opens `count` streams and returns once each has received its first event."""
    streams, tasks = [], []
    gate = asyncio.Semaphore(parallel)

    async def one():
        async with gate:
            s = Stream(port, query)
            streams.append(s)
            tasks.append(asyncio.create_task(s.run()))
            await asyncio.wait_for(s.first, 30)

    await asyncio.gather(*(one() for _ in range(count)))
    return streams, tasks


async def close_streams(streams, tasks):
    for s in streams:
        s.close()
    await asyncio.wait(tasks, timeout=10) if tasks else None


def pct(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p))]


async def latency(port, backends):
    # Random phases spread the events evenly in time instead of in bursts of 100.
    phase = [random.randrange(1, 50) for _ in range(50)]
    via = [Stream(port, f"n=100&every=50&first={phase[i]}") for i in range(50)]
    direct = [Stream(backends[i % 2], f"n=100&every=50&first={phase[i]}") for i in range(50)]
    mixed = [s for pair in zip(via, direct) for s in pair]
    B.wait_quiet()
    with B.Foreign() as foreign:
        await asyncio.wait_for(asyncio.gather(*(s.run() for s in mixed)), 60)
    lv = [x for s in via for x in s.latencies]
    ld = [x for s in direct for x in s.latencies]
    if len(lv) < 5000 or len(ld) < 5000:
        B.log(f"  warning: only {len(lv)} events through the proxy and {len(ld)} direct (of 5000 each)")
    res = {"foreign_cores": round(foreign.cores, 2), "events": len(lv),
           "via_pcts_us": {p: round(pct(lv, p / 100)) for p in (50, 90, 95, 99, 99.9, 100)},
           "direct_pcts_us": {p: round(pct(ld, p / 100)) for p in (50, 90, 95, 99, 99.9, 100)}}
    for p, key in ((0.5, "p50"), (0.99, "p99")):
        res[f"via_{key}_us"], res[f"direct_{key}_us"] = pct(lv, p), pct(ld, p)
        res[f"added_{key}_us"] = pct(lv, p) - pct(ld, p)
    return res


async def quietest_latency(port, backends, retries):
    best = None
    for attempt in range(1 + retries):
        res = await latency(port, backends)
        if best is None or res["foreign_cores"] < best["foreign_cores"]:
            best = res
        if res["foreign_cores"] <= B.NOISY:
            break
        if attempt < retries:
            B.log(f"  disturbed latency run (others used {res['foreign_cores']:.2f} cores): repeating")
    return best


async def measure(kind, port, backends, counts):
    res = {}
    # latency: through the proxy and direct, side by side (repeated while others disturb it)
    res.update(await quietest_latency(port, backends, retries=2))

    # held back? head at once, then sparse events
    held = [Stream(port, "n=4&every=300&first=300") for _ in range(10)]
    await asyncio.wait_for(asyncio.gather(*(s.run() for s in held)), 30)
    res["held_head_max_ms"] = max(s.head_delay_us for s in held) / 1e3
    res["held_event_max_ms"] = max(x for s in held for x in s.latencies) / 1e3
    res["held_events"] = sum(len(s.latencies) for s in held)

    # memory per open stream
    s, t = await open_streams(port, "n=0", 50)
    await close_streams(s, t)
    await asyncio.sleep(0.5)
    rss0 = B.rss_bytes(PROCS[kind].pid)
    streams, tasks = [], []
    for count in counts:
        more_s, more_t = await open_streams(port, "n=0", count - len(streams))
        streams += more_s
        tasks += more_t
        await asyncio.sleep(1.0)
        res[f"rss_per_stream_{count}"] = (B.rss_bytes(PROCS[kind].pid) - rss0) / count
    res["rss0"] = rss0
    await close_streams(streams, tasks)
    return res


PROCS = {}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--streams", default="2000,9000", help="open-stream counts for the memory figure")
    ap.add_argument("--proxies", default=",".join(B.PROXIES))
    args = ap.parse_args()
    kinds = args.proxies.split(",")
    counts = [int(c) for c in args.streams.split(",")]

    # Enough descriptors for us and our children (each stream is one at the client, two in the
    # proxy, one at the backend); root may raise the hard limit too.
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max(20000, 3 * max(counts) + 4096)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(want, hard)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))
    os.sched_setaffinity(0, {int(B.LOAD_CPU)})

    backends = [B.free_port(), B.free_port()]
    server = B.start([sys.executable, os.path.join(B.BENCH, "sse_server.py")] + [str(p) for p in backends],
                     cpu=B.LOAD_CPU, name="sse-server")
    for p in backends:
        B.wait_port(p, proc=server)

    rounds = []
    for r in range(args.rounds):
        rnd = {}
        for kind in kinds:
            port = B.free_port()
            PROCS[kind] = B.start_proxy(kind, port, backends, sse=True)
            B.wait_http_ok(port, "/?n=1", method_body=RPC.encode())
            rnd[kind] = asyncio.run(measure(kind, port, backends, counts))
            B.stop(PROCS[kind])
            B.log(f"round {r + 1} {kind}: {rnd[kind]}")
        rounds.append(rnd)

    def ratio(kind, key):
        return B.med_range(B.ratios(rounds, kind, key), "{:.2f}") if kind != "haproxy" and "haproxy" in kinds else ""

    def col(kind, key, scale=1.0):
        return [rnd[kind][key] * scale for rnd in rounds]

    mem_rows, lat_rows = [], []
    for kind in kinds:
        row = [kind]
        for c in counts:
            row += [B.med_range(col(kind, f"rss_per_stream_{c}", 1 / 1024), "{:.1f}"), ratio(kind, f"rss_per_stream_{c}")]
        mem_rows.append(row)
        held_ok = all(rnd[kind]["held_event_max_ms"] < 50 and rnd[kind]["held_head_max_ms"] < 50
                      and rnd[kind]["held_events"] == 40 for rnd in rounds)
        lat_rows.append([kind,
                         B.med_range(col(kind, "added_p50_us"), "{:.0f}"), ratio(kind, "added_p50_us"),
                         B.med_range(col(kind, "added_p99_us"), "{:.0f}"), ratio(kind, "added_p99_us"),
                         B.med_range(col(kind, "direct_p50_us"), "{:.0f}") + " / " +
                         B.med_range(col(kind, "direct_p99_us"), "{:.0f}"),
                         ("yes" if held_ok else "NO") + ", max " +
                         B.med_range([max(rnd[kind]["held_head_max_ms"], rnd[kind]["held_event_max_ms"])
                                      for rnd in rounds], "{:.1f}") + " ms"])
    mem_head = ["proxy"]
    for c in counts:
        mem_head += [f"KiB/stream @{c}", "x HAProxy"]
    text = (f"### SSE memory: RSS growth per open stream ({args.rounds} rounds, median (min..max))\n\n"
            + B.table(mem_head, mem_rows) +
            f"\n\n### SSE added latency per event vs direct streams in the same run "
            f"(50+50 streams x 100 events, µs)\n\n"
            + B.table(["proxy", "added p50", "x HAProxy", "added p99", "x HAProxy", "direct p50 / p99",
                       "not held back (head+events < 50 ms)"], lat_rows) + B.noise_note(rounds))
    print(text)
    B.save("sse", {"args": vars(args), "versions": B.versions(), "rounds": rounds}, text)


if __name__ == "__main__":
    main()
