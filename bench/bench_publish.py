"""Publishing: aiobus's ``Bus.publish`` against a plain loop and CherryPy's ``wspbus.Bus.publish``.

    python bench/bench_publish.py [--rounds N] [--trials T]

Each figure is the median of T trials of N publishes, in nanoseconds per listener; the contenders
take turns in one event loop, and ratios are against the plain loop calling (or awaiting) the same
listeners, measured in the same run. CherryPy is
optional (``pip install cherrypy``; ``nox -s bench`` installs it).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
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


def timed(runs: Mapping[str, Callable[[int], Awaitable[None]]], rounds: int, trials: int) -> dict[str, float]:
    """Median seconds per round of each run, over ``trials`` trials taken in turn.

    The runs take turns in one event loop, so a noisy neighbour slows them alike.
    """

    async def all_trials() -> dict[str, list[float]]:
        results: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(trials):
            for name, run in runs.items():
                started = time.perf_counter()
                await run(rounds)
                results[name].append((time.perf_counter() - started) / rounds)
        return results

    return {name: statistics.median(values) for name, values in asyncio.run(all_trials()).items()}


def measure(count: int, is_async: bool, rounds: int, trials: int) -> dict[str, float]:
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

    runs = {"plain loop": plain, "aiobus": aiobus_publish}
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

            runs["cherrypy"] = cherrypy_publish
    figures = timed(runs, rounds, trials)
    return {name: seconds / count * 1e9 for name, seconds in figures.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2000, help="publishes per trial")
    parser.add_argument("--trials", type=int, default=25, help="trials of each contender, taken in turn")
    args = parser.parse_args()
    out = sys.stdout
    out.write(f"{'listeners':<22} {'what':<12} {'ns/listener':>12} {'ratio to plain':>15}\n")
    table: dict[str, dict[str, float]] = {}
    for count in (1, 10):
        for is_async in (False, True):
            figures = measure(count, is_async, args.rounds, args.trials)
            label = f"{count} {'async' if is_async else 'sync'}"
            table[label] = figures
            for name, ns in figures.items():
                out.write(f"{label:<22} {name:<12} {ns:>12.0f} {ns / figures['plain loop']:>15.2f}\n")
    ratio = table["10 async"]["aiobus"] / table["10 async"]["plain loop"]
    verdict = "met" if ratio <= 1.5 else "NOT met"
    out.write(f"target: 10 async listeners within 1.5x the plain loop: {ratio:.2f}x ({verdict})\n")
    if "cherrypy" in table["1 sync"]:
        speedup = table["1 sync"]["cherrypy"] / table["1 sync"]["aiobus"]
        verdict = "met" if speedup >= 2 else "NOT met"
        out.write(f"target: 1 listener at least 2x CherryPy's rate: {speedup:.2f}x ({verdict})\n")


if __name__ == "__main__":
    main()
