"""Publishing: aiobus's ``Bus.publish`` against a plain loop and CherryPy's ``wspbus.Bus.publish``.

    python bench/bench_publish.py [--seconds S]

Each figure is the median of 3 timed runs, in nanoseconds per listener; ratios are against the
plain loop calling (or awaiting) the same listeners, measured in the same run. CherryPy is
optional (``pip install cherrypy``; ``nox -s bench`` installs it).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiobus import Bus, log_to_structlog


def make_listeners(count: int, is_async: bool) -> list[Callable[[], Any]]:
    listeners: list[Callable[[], Any]] = []
    for _ in range(count):
        if is_async:

            async def listener() -> None:
                pass

        else:

            def listener() -> None:  # type: ignore[misc]
                pass

        listeners.append(listener)
    return listeners


def timed(run: Callable[[int], Awaitable[None]], rounds: int) -> float:
    """Median seconds per round over 3 runs of ``rounds`` rounds."""
    results = []
    for _ in range(3):
        started = time.perf_counter()
        asyncio.run(run(rounds))
        results.append((time.perf_counter() - started) / rounds)
    return statistics.median(results)


def measure(count: int, is_async: bool, rounds: int) -> dict[str, float]:
    listeners = make_listeners(count, is_async)
    bus = Bus()
    bus.unsubscribe("log", log_to_structlog)
    for listener in listeners:
        bus.subscribe("x", listener)

    async def plain(n: int) -> None:
        for _ in range(n):
            results = []
            for listener in listeners:
                result = listener()
                if is_async:
                    result = await result
                results.append(result)

    async def aiobus_publish(n: int) -> None:
        for _ in range(n):
            await bus.publish("x")

    figures = {"plain loop": timed(plain, rounds), "aiobus": timed(aiobus_publish, rounds)}
    if not is_async:
        try:
            from cherrypy.process import wspbus
        except ImportError:
            pass
        else:
            cherry = wspbus.Bus()
            for listener in listeners:
                cherry.subscribe("x", listener)

            async def cherrypy_publish(n: int) -> None:
                for _ in range(n):
                    cherry.publish("x")

            figures["cherrypy"] = timed(cherrypy_publish, rounds)
    return {name: seconds / count * 1e9 for name, seconds in figures.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20000)
    args = parser.parse_args()
    out = sys.stdout
    out.write(f"{'listeners':<22} {'what':<12} {'ns/listener':>12} {'ratio to plain':>15}\n")
    for count in (1, 10):
        for is_async in (False, True):
            figures = measure(count, is_async, args.rounds)
            label = f"{count} {'async' if is_async else 'sync'}"
            for name, ns in figures.items():
                out.write(f"{label:<22} {name:<12} {ns:>12.0f} {ns / figures['plain loop']:>15.2f}\n")
    out.write("targets (issue 7): 10 async listeners within 1.5x the plain loop; ")
    out.write("1 listener at least 2x CherryPy's rate\n")


if __name__ == "__main__":
    main()
