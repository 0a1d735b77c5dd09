"""How long a child broker takes to be ready, against a bare cold ``anyio.to_process`` call.

    python bench/bench_children.py [--runs N]

Each run uses a fresh event loop, so each call starts a fresh worker process. The
child is ready once its own bus is STARTED and both of its links are connected.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import anyio
import anyio.to_process

from aiobus import Bus, ChildBroker, ParentLink


async def idle(bus: Bus, link: ParentLink) -> None:
    """A child that does nothing until it is stopped."""


async def cold_call() -> float:
    started = time.perf_counter()
    await anyio.to_process.run_sync(os.getpid)
    return time.perf_counter() - started


async def child_ready() -> float:
    async with Bus() as bus:
        bus.unsubscribe("log", __import__("aiobus").log_to_structlog)
        ChildBroker(bus, "idle", idle).subscribe()
        started = time.perf_counter()
        await bus.start()
        return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    cold = [anyio.run(cold_call) for _ in range(args.runs)]
    ready = [anyio.run(child_ready) for _ in range(args.runs)]
    cold_ms, ready_ms = statistics.median(cold) * 1e3, statistics.median(ready) * 1e3
    sys.stdout.write(f"{'what':<44} {'median ms':>10} {'ratio':>7}\n")
    sys.stdout.write(f"{'bare to_process cold call (baseline)':<44} {cold_ms:>10.1f} {1:>7.2f}\n")
    sys.stdout.write(f"{'child broker ready (target <= 1.3)':<44} {ready_ms:>10.1f} {ready_ms / cold_ms:>7.2f}\n")


if __name__ == "__main__":
    main()
