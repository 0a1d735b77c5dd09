"""The main tick at 10 ms: lateness, drift and CPU of ``Bus(main_interval=0.01)`` against a naive sleep loop.

    python bench/bench_tick.py [--seconds S] [--interval I] [--backends asyncio,trio]

Each contender runs alone for S seconds (10 by default), one after another, on each backend:

- naive loop (the baseline): ``while True: await anyio.sleep(interval)``, a tick after each sleep;
- aiobus: a started ``Bus(main_interval=interval)`` whose ``main`` listener records each tick.

Tick k is due at ``origin + k * interval``, where the origin is the moment the contender was asked
to begin (just before the naive loop's first sleep; just before ``await bus.start()``). A tick's
lateness is the time its listener ran minus its due time. For the bus, k counts the skipped schedule
points too (from ``bus.statistics().ticks_skipped``): a skipped point is not a late tick. The drift
is the last tick's lateness minus the first's: how far the schedule slid over the run (target:
under one interval). CPU is the process's CPU time (``time.process_time``) over the wall time of
the run, as a percentage of one core.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import anyio
from _common import median, percentile, verdict, write_table

from aiobus import Bus, log_to_structlog


class Record:
    """Tick times against their schedule, and the CPU used meanwhile."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.origin = 0.0
        self.lateness: list[float] = []
        self.skipped = 0
        self.cpu = 0.0
        self.wall = 0.0

    def begin(self) -> None:
        self._cpu0 = time.process_time()
        self.origin = time.monotonic()

    def tick(self, due: int) -> None:
        self.lateness.append(time.monotonic() - (self.origin + due * self.interval))

    def end(self) -> None:
        self.wall = time.monotonic() - self.origin
        self.cpu = time.process_time() - self._cpu0


async def naive(record: Record, seconds: float) -> None:
    with anyio.move_on_after(seconds):
        record.begin()
        due = 0
        while True:
            await anyio.sleep(record.interval)
            due += 1
            record.tick(due)
    record.end()


async def aiobus_ticker(record: Record, seconds: float) -> None:
    async with Bus(main_interval=record.interval) as bus:
        bus.unsubscribe("log", log_to_structlog)
        ticks = 0

        @bus.subscribe("main")
        def tick() -> None:
            nonlocal ticks
            ticks += 1
            record.tick(ticks + bus.statistics().ticks_skipped)

        record.begin()
        await bus.start()
        await anyio.sleep(seconds - (time.monotonic() - record.origin))
        record.end()
        record.skipped = bus.statistics().ticks_skipped


Contender = Callable[[Record, float], Coroutine[Any, Any, None]]


def run(contender: Contender, backend: str, interval: float, seconds: float) -> Record:
    record = Record(interval)
    anyio.run(contender, record, seconds, backend=backend)
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="how long each contender ticks")
    parser.add_argument("--interval", type=float, default=0.01, help="the tick interval in seconds")
    parser.add_argument("--backends", default="asyncio,trio", help="comma-separated anyio backends")
    args = parser.parse_args()
    backends = [name for name in args.backends.split(",") if name]
    ms = 1e3
    headers = ["backend / what", "ticks", "skipped", "mean late ms", "p99 late ms", "max late ms", "drift ms"]
    headers += ["drift ms/s", "drift ratio", "CPU %core", "CPU ratio"]
    rows: list[Sequence[object]] = []
    verdicts: list[str] = []
    for backend in backends:
        if backend == "trio":
            try:
                import trio  # noqa: F401
            except ImportError:
                rows.append(["trio: skipped (not installed)"] + [""] * (len(headers) - 1))
                continue
        records = {
            "naive sleep loop (baseline)": run(naive, backend, args.interval, args.seconds),
            "aiobus main tick": run(aiobus_ticker, backend, args.interval, args.seconds),
        }
        base = records["naive sleep loop (baseline)"]
        base_drift = base.lateness[-1] - base.lateness[0]
        base_cpu = base.cpu / base.wall
        for name, record in records.items():
            late = record.lateness
            drift = late[-1] - late[0]
            cpu = record.cpu / record.wall
            rows.append(
                [
                    f"{backend}: {name}",
                    len(late),
                    record.skipped,
                    sum(late) / len(late) * ms,
                    percentile(late, 0.99) * ms,
                    max(late) * ms,
                    drift * ms,
                    drift * ms / record.wall,
                    f"{drift / base_drift:.3f}" if base_drift else "-",
                    cpu * 100,
                    cpu / base_cpu if base_cpu else "-",
                ]
            )
        bus = records["aiobus main tick"]
        drift = bus.lateness[-1] - bus.lateness[0]
        verdicts.append(
            f"target ({backend}): drift under one interval over {args.seconds:g} s: {drift * ms:.2f} ms "
            f"< {args.interval * ms:g} ms ({verdict(abs(drift) < args.interval)}); median lateness "
            f"{median(bus.lateness) * ms:.2f} ms"
        )
    write_table(headers, rows)
    for line in verdicts:
        sys.stdout.write(line + "\n")


if __name__ == "__main__":
    main()
