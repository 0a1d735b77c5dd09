"""Scale: N child brokers and N programs under one bus: time to start, the parent's idle CPU, memory per child.

    python bench/bench_scale.py [--children N] [--idle S] [--main-interval I] [--child-interval J] [--profile K]

This process is the parent. In one run, one after another:

1. baseline: 2N bare Python interpreters (``python -c``, each ready once it prints a line) are started
   two at a time (the floor on a 2-core machine), measured (RSS and PSS from /proc/<pid>/smaps_rollup),
   then killed;
2. baseline: a started ``Bus`` with no child idles for S seconds (5 by default): the parent's CPU;
3. a ``Bus`` (the default main interval, 0.1 s, unless --main-interval) with a pool of N child
   brokers (``ChildBroker(..., workers=N)``, 64 by default; each awaits its link until stopped) and
   N instances of a program (``Subprocess(..., instances=N)``, a sleeping Python): the time
   ``bus.start()`` takes (every child ready), then, after a second to settle, the CPU of the whole
   tree over S idle seconds (target: under 3% of a core), the memory of each kind of process, and
   the time ``bus.exit()`` takes to stop them all.
4. ``python -X importtime -c "import aiobus"``: the cumulative import time of aiobus (the best of 5).

CPU is ``resource.getrusage(RUSAGE_SELF)`` (this process only, every thread) over the wall time,
as a percentage of one core; the children's from /proc/<pid>/stat. A child broker's main ticks are its
heartbeats; its main interval is the parent's unless ``--child-interval``. With ``--profile K``
the idle window of step 3 runs under cProfile and the K costliest functions are printed.
"""

from __future__ import annotations

import argparse
import cProfile
import logging
import os
import pstats
import re
import resource
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import anyio
from _common import cpu_seconds, kill_all, memory_kib, parent_of, verdict, write_table

from aiobus import Bus, ChildBroker, ParentLink, log_to_structlog
from aiobus.plugins import Subprocess

SLEEPER = [sys.executable, "-c", "import time; time.sleep(1e9)"]


async def broker(bus: Bus, link: ParentLink) -> None:
    """A child broker that takes messages until the parent stops it."""
    async for _ in link:
        pass


def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def mean_memory(pids: Sequence[int]) -> tuple[float, float]:
    """Mean (RSS, PSS) in MiB over the processes."""
    figures = [memory_kib(pid) for pid in pids]
    return (sum(rss for rss, _ in figures) / len(figures) / 1024, sum(pss for _, pss in figures) / len(figures) / 1024)


@dataclass
class Bare:
    """Step 1: bare interpreters."""

    start: float = 0.0
    rss: float = 0.0
    pss: float = 0.0


def bare_interpreters(count: int) -> Bare:
    command = [sys.executable, "-c", "print(flush=True); import time; time.sleep(1e9)"]
    processes: list[subprocess.Popen[bytes]] = []
    try:
        started = time.perf_counter()
        for _ in range(0, count, 2):
            pair = [subprocess.Popen(command, stdout=subprocess.PIPE) for _ in range(2)]
            processes += pair
            for process in pair:
                assert process.stdout is not None
                process.stdout.readline()
        figures = Bare(start=time.perf_counter() - started)
        figures.rss, figures.pss = mean_memory([process.pid for process in processes])
        return figures
    finally:
        kill_all(process.pid for process in processes)
        for process in processes:
            process.wait()
            if process.stdout is not None:
                process.stdout.close()


async def bare_bus_idle(seconds: float, interval: float) -> float:
    """Step 2: the CPU share of a started bus with no child."""
    async with Bus(main_interval=interval) as bus:
        bus.unsubscribe("log", log_to_structlog)
        await bus.start()
        await anyio.sleep(1)
        cpu, wall = own_cpu(), time.perf_counter()
        await anyio.sleep(seconds)
        return (own_cpu() - cpu) / (time.perf_counter() - wall)


@dataclass
class Scale:
    """Step 3: the bus with its children."""

    start: float = 0.0
    parent_cpu: float = 0.0
    children_cpu: float = 0.0
    stop: float = 0.0
    parent_rss_before: float = 0.0
    parent_rss_after: float = 0.0
    memory: dict[str, tuple[float, float]] = field(default_factory=dict)
    log_lines: int = 0
    warnings: list[str] = field(default_factory=list)  # log lines at WARNING or above
    started: dict[str, float] = field(default_factory=dict)  # kind: when the last of that kind was started
    profile: pstats.Stats | None = None


async def with_children(
    count: int, seconds: float, interval: float, child_interval: float | None, profile: bool
) -> Scale:
    figures = Scale()
    lines = 0

    def count_lines(msg: str, level: int, **fields: object) -> None:
        nonlocal lines
        lines += 1
        if level >= logging.WARNING:
            figures.warnings.append(f"{logging.getLevelName(level)} {msg}")
        if msg.endswith(" started") and "kind" in fields:
            figures.started[str(fields["kind"])] = time.perf_counter()

    figures.parent_rss_before = memory_kib(os.getpid())[0] / 1024
    async with Bus(main_interval=interval) as bus:
        bus.unsubscribe("log", log_to_structlog)  # count the lines instead
        bus.subscribe("log", count_lines)
        pool = ChildBroker(bus, "broker", broker, main_interval=child_interval, workers=count)
        instances = Subprocess(bus, "program", SLEEPER, instances=count)
        pool.subscribe()
        instances.subscribe()
        brokers, programs = pool.members, instances.members
        started = time.perf_counter()
        await bus.start()
        figures.start = time.perf_counter() - started
        figures.started = {kind: at - started for kind, at in figures.started.items()}
        await anyio.sleep(1)

        broker_pids = [pid for pid in (child.pid for child in brokers) if pid is not None]
        program_pids = [pid for pid in (child.pid for child in programs) if pid is not None]
        launcher_pids = [pid for pid in map(parent_of, program_pids) if pid is not None]
        others = [*broker_pids, *program_pids, *launcher_pids]
        lines_before = lines
        profiler = cProfile.Profile() if profile else None
        cpu, others_cpu, wall = own_cpu(), sum(map(cpu_seconds, others)), time.perf_counter()
        if profiler is not None:
            profiler.enable()
        await anyio.sleep(seconds)
        if profiler is not None:
            profiler.disable()
        elapsed = time.perf_counter() - wall
        figures.parent_cpu = (own_cpu() - cpu) / elapsed
        figures.children_cpu = (sum(map(cpu_seconds, others)) - others_cpu) / elapsed
        figures.log_lines = lines - lines_before
        if profiler is not None:
            figures.profile = pstats.Stats(profiler)

        figures.parent_rss_after = memory_kib(os.getpid())[0] / 1024
        figures.memory = {
            "child broker": mean_memory(broker_pids),
            "program's launcher": mean_memory(launcher_pids),
            "program (a bare sleeping python)": mean_memory(program_pids),
        }
        stopping = time.perf_counter()
        await bus.exit()
        figures.stop = time.perf_counter() - stopping
        if len(broker_pids) != count or len(program_pids) != count:
            raise RuntimeError(f"{len(broker_pids)} brokers and {len(program_pids)} programs ran, not {count}")
    return figures


def import_time() -> float:
    """Seconds of ``import aiobus`` in a fresh interpreter (cumulative, from -X importtime), the best of 5."""
    best = float("inf")
    for _ in range(5):
        done = subprocess.run(
            [sys.executable, "-X", "importtime", "-c", "import aiobus"], capture_output=True, text=True, check=True
        )
        found = re.search(r"^import time:\s+\d+ \|\s+(\d+) \| aiobus$", done.stderr, re.MULTILINE)
        assert found is not None, done.stderr[-500:]
        best = min(best, int(found[1]) / 1e6)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--children", type=int, default=64, help="child brokers, and as many programs")
    parser.add_argument("--idle", type=float, default=5.0, help="seconds of each idle window")
    parser.add_argument("--main-interval", type=float, default=0.1, help="the parent bus's main interval")
    parser.add_argument("--child-interval", type=float, default=None, help="the brokers' main (heartbeat) interval")
    parser.add_argument("--profile", type=int, default=0, help="print the K costliest functions of the idle window")
    args = parser.parse_args()
    n = args.children

    imports = import_time()
    bare = bare_interpreters(2 * n)
    bare_cpu = anyio.run(bare_bus_idle, args.idle, args.main_interval)
    scale = anyio.run(with_children, n, args.idle, args.main_interval, args.child_interval, args.profile > 0)

    brokers = scale.started.get("broker", 0.0)
    rows: list[Sequence[object]] = [
        [f"start {2 * n} bare interpreters, two at a time (baseline)", f"{bare.start:.2f} s", 1.0],
        [
            f"bus.start() with a pool of {n} brokers + {n} program instances",
            f"{scale.start:.2f} s",
            scale.start / bare.start,
        ],
        ["  per child", f"{scale.start / (2 * n) * 1e3:.1f} ms", ""],
        ["  per broker (they start first)", f"{brokers / n * 1e3:.1f} ms", ""],
        ["  per program", f"{(scale.start - brokers) / n * 1e3:.1f} ms", ""],
        ["bus.exit() stopping them all", f"{scale.stop:.2f} s", ""],
        ["  per child", f"{scale.stop / (2 * n) * 1e3:.1f} ms", ""],
    ]
    write_table(["time", "figure", "ratio"], rows)
    sys.stdout.write("\n")
    rows = [
        ["bus with no child (baseline)", bare_cpu * 100, 1.0],
        [f"parent with {n} brokers + {n} programs", scale.parent_cpu * 100, scale.parent_cpu / bare_cpu],
        [f"  all {3 * n} child processes together", scale.children_cpu * 100, ""],
        ["  the whole tree", (scale.parent_cpu + scale.children_cpu) * 100, ""],
    ]
    title = f"idle CPU over {args.idle:g} s, main interval {args.main_interval:g} s"
    if args.child_interval is not None:
        title += f", brokers' {args.child_interval:g} s"
    write_table([title, "% of a core", "ratio"], rows)
    sys.stdout.write("\n")
    rows = [["bare interpreter (baseline)", bare.rss, bare.pss, 1.0]]
    for name, (rss, pss) in scale.memory.items():
        rows.append([name, rss, pss, pss / bare.pss])
    growth = (scale.parent_rss_after - scale.parent_rss_before) / (2 * n)
    rows.append([f"parent: RSS {scale.parent_rss_after:.1f} MiB, growth per child", growth, "", ""])
    write_table(["memory, mean per process", "RSS MiB", "PSS MiB", "PSS ratio"], rows)

    tree = scale.parent_cpu + scale.children_cpu
    broker_pss = scale.memory["child broker"][1]
    sys.stdout.write(
        f"\nimport aiobus: {imports * 1e3:.1f} ms (target under 40 ms: {verdict(imports < 0.040)})\n"
        f"target: all ready within 4 s and 3x the bare floor: {scale.start:.2f} s, "
        f"{scale.start / bare.start:.1f}x ({verdict(scale.start <= 4 and scale.start <= 3 * bare.start)})\n"
        f"target: stopping them all within 1 s: {scale.stop:.2f} s ({verdict(scale.stop <= 1)})\n"
        f"target: a broker's PSS at most 12 MiB: {broker_pss:.1f} MiB ({verdict(broker_pss <= 12)})\n"
        f"target: the whole tree's idle CPU under 3% of a core: {tree * 100:.2f}% ({verdict(tree < 0.03)}); "
        f"{scale.log_lines} log lines in the idle window\n"
    )
    for line in scale.warnings[:10]:
        sys.stdout.write(f"logged: {line}\n")
    if len(scale.warnings) > 10:
        sys.stdout.write(f"logged: ... {len(scale.warnings) - 10} more warnings or errors\n")
    if scale.profile is not None:
        scale.profile.sort_stats("tottime").print_stats(args.profile)


if __name__ == "__main__":
    main()
