"""A pool of brokers against a single broker, on CPU-bound messages.

    python bench/bench_pool.py [--messages N] [--work MS] [--workers W]

Each message costs the child ``--work`` milliseconds of CPU (2 by default) and is answered. The
baseline is a single ``ChildBroker``; then a pool of ``--workers`` (4 by default) gets the same
messages. Both run in this same process, one after the other; the figure is messages per second
from the first send to the last answer (the workers already started). Target: the pool at least
1.8x the single broker on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import anyio
from _common import verdict, write_table

from aiobus import Bus, ChildBroker, ParentLink, log_to_structlog


async def work(bus: Bus, link: ParentLink) -> None:
    """Burn the CPU time each message asks for, then answer it."""
    async for seconds in link:
        deadline = time.process_time() + seconds
        while time.process_time() < deadline:
            pass
        await link.send(os.getpid())


async def throughput(messages: int, seconds: float, workers: int | None) -> tuple[float, int]:
    """Messages per second through a broker (a pool of ``workers``, or a single one), and how many workers answered."""
    async with Bus() as bus:
        bus.unsubscribe("log", log_to_structlog)
        child = ChildBroker(bus, "worker", work, workers=workers)
        child.subscribe()
        await bus.start()
        answered: set[int] = set()
        started = time.perf_counter()
        async with anyio.create_task_group() as tasks:

            async def send_all() -> None:
                for _ in range(messages):
                    await child.send(seconds)

            tasks.start_soon(send_all)
            for _ in range(messages):
                answered.add(await child.receive())
        elapsed = time.perf_counter() - started
        await bus.exit()
    return messages / elapsed, len(answered)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--work", type=float, default=2.0, help="milliseconds of CPU per message")
    parser.add_argument("--workers", type=int, default=4)
    args = parser.parse_args()
    seconds = args.work / 1000
    single, _ = anyio.run(throughput, args.messages, seconds, None)
    pool, answered = anyio.run(throughput, args.messages, seconds, args.workers)
    write_table(
        [f"{args.messages} messages of {args.work:g} ms of CPU, {os.cpu_count()} CPUs", "messages/s", "ratio"],
        [
            ["a single broker (baseline)", single, 1.0],
            [f"a pool of {args.workers} ({answered} answered)", pool, pool / single],
        ],
    )
    sys.stdout.write(f"target: the pool at least 1.8x a single broker: {verdict(pool >= 1.8 * single)}\n\n")


if __name__ == "__main__":
    main()
