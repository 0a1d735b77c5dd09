"""1,000 start/stop cycles of a bus with plugins and a child broker: afterwards no task, thread,
file descriptor, child process or temporary file is left.

Everything is counted before and after: the asyncio tasks (inside the event loop, before the
bus is entered and after it is left), and the threads, open descriptors, child processes
(descendants, zombies included) and temporary files of this process, outside the event
loop, before ``anyio.run`` and after it returned.
"""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import child_functions
import pytest
from processes import descendants

from aiobus import Bus, ChildBroker, ChildState, State
from aiobus.plugins import Monitor, PIDFile, SignalHandler, SystemdNotifier

pytestmark = [
    pytest.mark.faults,
    pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="/proc (Linux)"),
]

CYCLES = 1000


def open_descriptors() -> dict[int, str]:
    """This process's open descriptors and what each points to (the listing's own is left out)."""
    found = {}
    with os.scandir("/proc/self/fd") as listing:
        for entry in listing:
            try:
                found[int(entry.name)] = os.readlink(entry.path)
            except FileNotFoundError:  # the listing's own descriptor, closed since
                continue
    return found


@dataclass(frozen=True)
class Snapshot:
    """What this process holds at one moment, outside any task."""

    threads: frozenset[threading.Thread]
    descriptors: frozenset[tuple[int, str]]
    processes: frozenset[int]
    temporary: frozenset[str]

    @classmethod
    def take(cls, temp_dir: Path) -> Snapshot:
        return cls(
            threads=frozenset(threading.enumerate()),
            descriptors=frozenset(open_descriptors().items()),
            processes=frozenset(descendants()),
            temporary=frozenset(os.listdir(temp_dir)),
        )

    def left_since(self, before: Snapshot) -> dict[str, Any]:
        left = {
            "threads": self.threads - before.threads,
            "descriptors": self.descriptors - before.descriptors,
            "processes": self.processes - before.processes,
            "temporary files": self.temporary - before.temporary,
        }
        return {kind: things for kind, things in left.items() if things}


def settled(before: Snapshot, temp_dir: Path, seconds: float = 30) -> dict[str, Any]:
    """What is left since ``before``, once what is ending (threads, reaping) had time to end.

    Threads that wait for a child's exit, and worker processes being reaped, end on their
    own shortly after the bus: nothing tells the test when, so it looks again until the
    count is back to the baseline or ``seconds`` have passed.
    """
    deadline = time.monotonic() + seconds
    while (left := Snapshot.take(temp_dir).left_since(before)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


@pytest.fixture
def temp_dir() -> Iterator[Path]:
    """A fresh, short temporary folder that tempfile (hence every PrivateListener) uses for the test."""
    path = Path(tempfile.mkdtemp(prefix="cyc-", dir="/tmp"))
    # A socket path must fit in sun_path: aiobus falls back to /tmp for a long folder.
    assert len(os.fsencode(path)) + 24 <= 100
    saved, tempfile.tempdir = tempfile.tempdir, str(path)
    try:
        yield path
    finally:
        tempfile.tempdir = saved
        path.rmdir()  # fails if anything was left in it


def state_of(bus: Bus) -> State:
    """The bus's state, read anew (mypy would keep what an earlier assert narrowed it to)."""
    return bus.state


class Warnings:
    """A log listener that keeps every warning and error."""

    def __init__(self) -> None:
        self.records: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, msg: str, level: int, **fields: Any) -> None:
        if level >= logging.WARNING:
            self.records.append((msg, fields))


@pytest.fixture
def progress(request: pytest.FixtureRequest) -> Callable[[str], None]:
    """Show a line on the terminal now, even while pytest captures the test's output."""
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")

    def show(line: str) -> None:
        if reporter is None or capture is None:
            return
        with capture.global_and_fixture_disabled():
            reporter.write_line(line)
            reporter.flush()  # a terminal shows it at once; a pipe or a file too

    return show


async def cycles(
    count: int, folder: Path, temp_dir: Path, tasks: Callable[[], set[Any]], progress: Callable[[str], None]
) -> dict[str, int]:
    """Run ``count`` start/stop cycles, a message to the child and back in each, then exit.

    Every tenth of the way, ``progress`` is told how many cycles are done.
    """
    tasks_before = tasks()
    assert tempfile.gettempdir() == str(temp_dir)  # where each child's private rendezvous is made
    warnings = Warnings()
    ticks = 0
    ticked = anyio.Event()

    def tick() -> None:
        nonlocal ticks
        ticks += 1
        ticked.set()

    pidfile = folder / "cycles.pid"
    async with Bus(main_interval=0.05, stop_timeout=30) as bus:
        bus.unsubscribe("log", bus.listeners["log"][0])  # 1,000 cycles of lines: keep only the warnings
        bus.subscribe("log", warnings)
        SignalHandler(bus).subscribe()
        PIDFile(bus, pidfile).subscribe()
        Monitor(bus, tick, 0.01, name="tick").subscribe()
        SystemdNotifier(bus, environ={}).subscribe()
        broker = ChildBroker(bus, "echo", child_functions.echo, grace=10)
        broker.subscribe()
        pids = set()
        tasks_after_first = 0
        for cycle in range(count):
            await bus.start()
            assert bus.state is State.STARTED and broker.state is ChildState.RUNNING
            assert pidfile.read_text().strip() == str(os.getpid())
            with anyio.fail_after(30):
                await broker.send(("cycle", cycle))
                assert await broker.receive() == ("echo", ("cycle", cycle))
                await ticked.wait()  # the Monitor starts after the child: it runs in every cycle
            ticked = anyio.Event()
            pids.add(broker.pid)
            await bus.stop()
            assert state_of(bus) is State.STOPPED and broker.pid is None
            assert bus.exit_code == 0, warnings.records
            if cycle == 0:
                tasks_after_first = len(tasks())
            else:  # the bus keeps what it kept after the first cycle, nothing more
                assert len(tasks()) == tasks_after_first, (cycle, tasks())
            if (cycle + 1) % max(1, count // 10) == 0:
                progress(f"  start/stop cycles: {cycle + 1} of {count} done")
        await bus.exit()
    assert not pidfile.exists()
    assert bus.exit_code == 0 and not warnings.records, warnings.records
    await anyio.lowlevel.checkpoint()
    assert tasks() - tasks_before == set()
    assert len(pids) == count  # a fresh child process in each cycle
    assert ticks > 0
    return {"children": len(pids), "monitor ticks": ticks}


#: A task anyio starts once per event loop, at the first worker process, to kill the workers at the end
#: (on trio it is named after its function, ``..._shutdown_process_pool``).
ANYIO_POOL_TASK = "AnyIO process pool shutdown task"


def asyncio_tasks() -> set[Any]:
    return {task for task in asyncio.all_tasks() if task.get_name() != ANYIO_POOL_TASK} - {asyncio.current_task()}


def trio_tasks() -> set[Any]:
    import trio

    def walk(task: trio.lowlevel.Task) -> Iterator[trio.lowlevel.Task]:
        yield task
        for nursery in task.child_nurseries:
            for child in nursery.child_tasks:
                yield from walk(child)

    root = trio.lowlevel.current_root_task()
    assert root is not None
    found = set(walk(root)) - {trio.lowlevel.current_task()}
    return {task for task in found if not task.name.endswith("._shutdown_process_pool")}


@pytest.mark.parametrize(("backend", "count"), [("asyncio", CYCLES), ("trio", 20)])
def test_start_stop_cycles_leave_nothing(
    tmp_path: Path, temp_dir: Path, progress: Callable[[str], None], backend: str, count: int
) -> None:
    """A bus with SignalHandler, PIDFile, Monitor, SystemdNotifier and a child broker, started
    and stopped ``count`` times, leaves no task, thread, descriptor, process or temporary file.

    On trio (a shorter run: each cycle spawns a worker process) the tasks counted are the
    run's whole task tree.
    """
    before = Snapshot.take(temp_dir)
    tasks = asyncio_tasks if backend == "asyncio" else trio_tasks
    result = anyio.run(cycles, count, tmp_path, temp_dir, tasks, progress, backend=backend)
    assert result["children"] == count
    left = settled(before, temp_dir)
    assert not left, f"left after {count} cycles: {left}"
    assert os.listdir(tmp_path) == []
