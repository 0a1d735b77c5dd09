"""Brokers on other hosts, over a Redis Stream, against bare XADD / XREADGROUP / XACK.

    python bench/bench_streams.py [--url URL] [--messages N] [--batch B ...] [--runs N]

Two phases, timed apart, for each kind:

- send: this process puts ``--messages`` small messages on a stream, one command each (bare:
  ``XADD`` of a small field; aiobus: ``RemoteBroker.send``, a JSON envelope);
- drain: consumer processes, started and connected beforehand, read them in a consumer group
  ``B`` at a time and acknowledge each batch (bare: ``XREADGROUP COUNT B`` then ``XACK`` of the
  batch; aiobus: ``StreamBroker`` with ``batch=B``, a function that takes each message), until
  the group has nothing pending and nothing left to read.

Messages per second for the whole trip is ``messages / (send + drain)``. The kinds alternate
within a run; each figure is the median of the runs. Targets from issue 14: aiobus at least 50%
of bare at the same batch size; 2 aiobus broker processes at least 1.6x one on the drain (2 bare
consumers against one show what the machine allows).
Needs a Redis server (the machine's, by default); keys go under a prefix of their own, deleted after.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
import uuid

import anyio
from _common import verdict, write_table

from aiobus import Bus
from aiobus.redis import RemoteBroker, StreamBroker, StreamLink, connect

NAME = "bench"
GROUP = "brokers"


# -- the consumer processes -----------------------------------------------------------------


async def bare_consumer(url: str, key: str, batch: int) -> None:
    async with connect(url) as client:
        sys.stdout.write("ready\n")
        sys.stdout.flush()
        await anyio.to_thread.run_sync(sys.stdin.readline)
        consumer = uuid.uuid4().hex
        while True:
            found = await client.xreadgroup(GROUP, consumer, {key: ">"}, count=batch, block=1000)
            entries = (found or {}).get(key, ())
            if entries:
                await client.xack(key, GROUP, [entry.identifier for entry in entries])


async def take_all(bus: Bus, link: StreamLink) -> None:
    async for _ in link:
        pass


async def aiobus_consumer(url: str, prefix: str, batch: int) -> None:
    async with Bus() as bus:
        StreamBroker(bus, url, NAME, take_all, prefix=prefix, group=GROUP, batch=batch).subscribe()
        sys.stdout.write("ready\n")
        sys.stdout.flush()
        await anyio.to_thread.run_sync(sys.stdin.readline)
        await bus.start()
        await bus.block()


def run_consumer(args: argparse.Namespace) -> None:
    if args.consumer == "bare":
        anyio.run(bare_consumer, args.url, f"{args.prefix}:{NAME}:requests", args.batch[0])
    else:
        anyio.run(aiobus_consumer, args.url, args.prefix, args.batch[0])


# -- measuring --------------------------------------------------------------------------------


async def drained(client: object, key: str, messages: int) -> None:
    """Wait until the group has read every entry and has none pending."""
    while True:
        for group in await client.xinfo_groups(key):  # type: ignore[attr-defined]
            if group["name"] == GROUP and group["pending"] == 0 and group["entries-read"] == messages:
                return
        await anyio.sleep(0.01)  # a look every 10 ms: little load on the server measured


def start_consumer(argv: list[str]) -> subprocess.Popen[str]:
    """A consumer process (quick to start: it prints "ready" once connected, then waits for "go")."""
    return subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


async def measure(kind: str, consumers: int, batch: int, args: argparse.Namespace) -> tuple[float, float]:
    """(send seconds, drain seconds) for ``consumers`` processes of ``kind``."""
    prefix = f"aiobus-bench:{uuid.uuid4().hex[:8]}"
    key = f"{prefix}:{NAME}:requests"
    argv = [sys.executable, __file__, "--consumer", kind, "--url", args.url, "--prefix", prefix]
    argv += ["--batch", str(batch)]
    async with connect(args.url) as client:
        await client.xgroup_create(key, GROUP, "0", mkstream=True)
        children = [start_consumer(argv) for _ in range(consumers)]
        try:
            for child in children:
                assert child.stdout is not None
                assert await anyio.to_thread.run_sync(child.stdout.readline) == "ready\n"
            start = time.perf_counter()
            if kind == "bare":
                for i in range(args.messages):
                    await client.xadd(key, {"m": f'["tick",{i},0.5]'})
            else:
                async with RemoteBroker(args.url, NAME, prefix=prefix, maxlen=args.messages * 2) as remote:
                    start = time.perf_counter()
                    for i in range(args.messages):
                        await remote.send(["tick", i, 0.5])
            sent = time.perf_counter() - start
            start = time.perf_counter()
            for child in children:
                assert child.stdin is not None
                child.stdin.write("go\n")
                child.stdin.flush()
            with anyio.fail_after(600):
                await drained(client, key, args.messages)
            return sent, time.perf_counter() - start
        finally:
            for child in children:
                child.terminate()
                await anyio.to_thread.run_sync(child.wait)
            keys = [found async for found in client.scan_iter(match=f"{prefix}*")]
            if keys:
                await client.delete(keys)


async def main(args: argparse.Namespace) -> None:
    started = time.perf_counter()
    cases = [("bare", 1), ("aiobus", 1), ("aiobus", 2), ("bare", 2)]  # 2 bare: what the machine allows
    out = sys.stdout.write
    out(f"Python {sys.version.split()[0]}, {os.cpu_count()} CPUs, Redis at {args.url.split('@')[-1]}, ")
    out(f"{args.messages} messages, median of {args.runs} runs\n\n")
    for batch in args.batch:
        sends: dict[tuple[str, int], list[float]] = {case: [] for case in cases}
        drains: dict[tuple[str, int], list[float]] = {case: [] for case in cases}
        for _ in range(args.runs):
            for kind, consumers in cases:
                sent, drain = await measure(kind, consumers, batch, args)
                sends[(kind, consumers)].append(sent)
                drains[(kind, consumers)].append(drain)

        def rate(values: list[float]) -> float:
            return float(args.messages / statistics.median(values))

        rows = []
        for case in cases:
            trip = [s + d for s, d in zip(sends[case], drains[case], strict=True)]
            label = f"{case[0]}, {case[1]} consumer{'s' if case[1] > 1 else ''}, batch {batch}"
            rows.append((label, round(rate(sends[case])), round(rate(drains[case])), round(rate(trip))))
        write_table(["", "send msg/s", "drain msg/s", "trip msg/s"], rows)
        trip_ratio = rows[1][3] / rows[0][3]
        drain_ratio = rows[1][2] / rows[0][2]
        scale = rows[2][2] / rows[1][2]
        out(f"aiobus / bare, whole trip: {trip_ratio:.2f} (target >= 0.50: {verdict(trip_ratio >= 0.5)})\n")
        out(f"aiobus / bare, drain:      {drain_ratio:.2f}\n")
        out(f"2 brokers / 1, drain:      {scale:.2f} (target >= 1.60: {verdict(scale >= 1.6)})\n")
        out(f"2 bare consumers / 1:      {rows[3][2] / rows[0][2]:.2f} (the same on bare commands)\n\n")
    out(f"total {time.perf_counter() - started:.1f} s\n")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=os.environ.get("AIOBUS_REDIS_URL", "redis://127.0.0.1:6379/0"))
    parser.add_argument("--messages", type=int, default=10_000, help="messages per measure")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 10], help="batch sizes (default 1 10)")
    parser.add_argument("--runs", type=int, default=3, help="runs of each (the median is shown)")
    parser.add_argument("--consumer", choices=("bare", "aiobus"), help=argparse.SUPPRESS)
    parser.add_argument("--prefix", help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.consumer:
        run_consumer(arguments)
    else:
        anyio.run(main, arguments)
