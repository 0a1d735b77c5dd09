"""Benchmark a bridged publish, bus to bus through Redis, against a bare coredis round trip, in one run.

    python bench/bench_bridge.py [--redis URL] [--round-trips N] [--runs N] [--backend asyncio|trio]

Two processes, the parent and an echo child, and one Redis server (the URL's; a key prefix of this
run's own, so a shared server is fine):

- coredis: the parent publishes a short string on a channel; the child, subscribed with coredis,
  publishes it back on another; the parent's subscriber receives it;
- bridge: the parent's bus publishes ``ping(i, "tick")`` on a bridged channel; the child's bus,
  bridged with :class:`aiobus.redis.RedisBridge`, has a ``ping`` listener publishing ``pong`` with
  the same arguments; the parent's ``pong`` listener receives it.

Each round trip is timed from the publish to the reception: the subscriber returning the message, the
``pong`` listener being called (p50 and p99). Both kinds are set up side by side and measured in
alternating blocks of 100 round trips, so that drift of the machine hits them alike; each figure is
the median of the runs. Target from issue 14: bridge p50 and p99 within 1.3 times coredis's.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import time
import uuid
from typing import Any

import anyio
from coredis.retry import NoRetryPolicy

from aiobus import Bus
from aiobus.plugins import SignalHandler
from aiobus.redis import RedisBridge, connect

KINDS = ("coredis", "bridge")
WARM_UP = 200


# -- the echo child ---------------------------------------------------------------------------


async def coredis_child(url: str, prefix: str) -> None:
    async with (
        connect(url) as client,
        client.pubsub(channels=[f"{prefix}:ping"], ignore_subscribe_messages=True, retry_policy=NoRetryPolicy()) as ps,
    ):
        print("ready", flush=True)  # noqa: T201 - the parent waits for this line
        async for message in ps:
            await client.publish(f"{prefix}:pong", message["data"])


async def bridge_child(url: str, prefix: str) -> None:
    async with Bus() as bus:
        SignalHandler(bus).subscribe()
        RedisBridge(bus, url, node="child", prefix=prefix, incoming=["ping"], outgoing=["pong"]).subscribe()

        async def ping(*args: object) -> None:
            await bus.publish("pong", *args)

        bus.subscribe("ping", ping)
        await bus.start()
        print("ready", flush=True)  # noqa: T201 - the parent waits for this line
        await bus.block()


# -- the parent's side ------------------------------------------------------------------------


def spawn(kind: str, args: argparse.Namespace, prefix: str) -> subprocess.Popen[str]:
    argv = [sys.executable, __file__, "--child", kind, "--redis", args.redis, "--backend", args.backend, prefix]
    child = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    if child.stdout.readline().strip() != "ready":
        raise RuntimeError(f"the {kind} child did not start")
    return child


def end(child: subprocess.Popen[str]) -> None:
    child.send_signal(signal.SIGTERM)
    child.wait(timeout=60)


class Coredis:
    """The baseline: a bare coredis client and subscriber, and the coredis echo child."""

    def __init__(self, client: Any, pubsub: Any, prefix: str) -> None:
        self.client, self.pubsub, self.prefix = client, pubsub, prefix

    async def round_trip(self, i: int) -> float:
        start = time.perf_counter()
        await self.client.publish(f"{self.prefix}:ping", f"tick {i}")
        await self.pubsub.get_message()
        return time.perf_counter() - start


class Bridged:
    """Two buses bridged through Redis: ours, and the bridge echo child's. A round trip ends when our
    ``pong`` listener is called (as the baseline's ends when its subscriber returns the message)."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.arrived: anyio.Event | None = None
        self.at = 0.0
        bus.subscribe("pong", self.pong)

    def pong(self, *_: object) -> None:
        self.at = time.perf_counter()
        assert self.arrived is not None
        self.arrived.set()

    async def round_trip(self, i: int) -> float:
        self.arrived = anyio.Event()
        start = time.perf_counter()
        await self.bus.publish("ping", i, "tick")
        with anyio.fail_after(30):
            await self.arrived.wait()
        return self.at - start


async def measure(args: argparse.Namespace) -> dict[str, list[float]]:
    """Both kinds set up side by side, measured in alternating blocks of 100 round trips."""
    prefix = f"aiobus-bench:{uuid.uuid4().hex[:12]}"
    times: dict[str, list[float]] = {kind: [] for kind in KINDS}
    children = []
    async with (
        connect(args.redis) as client,
        client.pubsub(channels=[f"{prefix}:pong"], ignore_subscribe_messages=True, retry_policy=NoRetryPolicy()) as ps,
        Bus() as bus,
    ):
        RedisBridge(bus, args.redis, node="parent", prefix=prefix, outgoing=["ping"], incoming=["pong"]).subscribe()
        kinds: dict[str, Coredis | Bridged] = {"coredis": Coredis(client, ps, prefix), "bridge": Bridged(bus)}
        await bus.start()
        try:
            for kind in KINDS:
                children.append(await anyio.to_thread.run_sync(spawn, kind, args, prefix))
            for measured in kinds.values():
                for i in range(WARM_UP):
                    await measured.round_trip(i)
            for block in range(0, args.round_trips, 100):
                for kind, measured in kinds.items():
                    for i in range(block, min(block + 100, args.round_trips)):
                        times[kind].append(await measured.round_trip(i))
        finally:
            for child in children:
                await anyio.to_thread.run_sync(end, child)
    return times


def percentiles(times: list[float]) -> tuple[float, float]:
    ordered = sorted(times)
    return ordered[len(ordered) // 2] * 1e6, ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--redis", default=os.environ.get("AIOBUS_REDIS_URL", "redis://127.0.0.1:6379/0"))
    parser.add_argument("--round-trips", type=int, default=3_000, help="timed round trips per run")
    parser.add_argument("--runs", type=int, default=3, help="runs of each (the median is shown)")
    parser.add_argument("--backend", default="asyncio", choices=("asyncio", "trio"))
    parser.add_argument("--child", choices=KINDS, help=argparse.SUPPRESS)
    parser.add_argument("prefix", nargs="?", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child = coredis_child if args.child == "coredis" else bridge_child
        try:
            anyio.run(child, args.redis, args.prefix, backend=args.backend)
        except KeyboardInterrupt:
            pass
        return

    started = time.perf_counter()
    p50s: dict[str, list[float]] = {kind: [] for kind in KINDS}
    p99s: dict[str, list[float]] = {kind: [] for kind in KINDS}
    for _ in range(args.runs):
        for kind, times in anyio.run(measure, args, backend=args.backend).items():
            p50, p99 = percentiles(times)
            p50s[kind].append(p50)
            p99s[kind].append(p99)

    median = statistics.median
    out = sys.stdout.write
    out(f"Python {sys.version.split()[0]}, {os.cpu_count()} CPUs, backend {args.backend}, ")
    out(f"{args.round_trips} round trips through Redis (after {WARM_UP} unmeasured), median of {args.runs}\n\n")
    out(f"{'':44}{'rtt p50 us':>12}{'rtt p99 us':>12}\n")
    labels = {"coredis": "bare coredis publish -> subscriber, echoed", "bridge": "bus -> RedisBridge -> bus, echoed"}
    for kind in KINDS:
        out(f"{labels[kind]:44}{median(p50s[kind]):>12.1f}{median(p99s[kind]):>12.1f}\n")
    for name, figures in (("p50", p50s), ("p99", p99s)):
        ratio = median(figures["bridge"]) / median(figures["coredis"])
        out(f"\nbridge / coredis rtt {name}: {ratio:.2f} (target <= 1.30: {'met' if ratio <= 1.3 else 'MISSED'})")
    out(f"\ntotal {time.perf_counter() - started:.1f} s\n")


if __name__ == "__main__":
    main()
