"""Supervision: restart policies, group strategies, intensity and backoff, exits and the children listing.

The children are real programs (small Python scripts run by the Subprocess plugin).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import child_functions
import pytest
from helpers import LogRecorder
from processes import alive

from aiobus import Bus, ChildBroker, State, log_to_structlog
from aiobus._supervision import (
    CHILD_EXIT_CHANNEL,
    ChildExit,
    ChildState,
    Restart,
    Strategy,
    Supervisor,
    default_supervisor,
)
from aiobus.plugins.subprocess import LineReady, Subprocess

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="real programs, process groups and /proc (Linux)")

WAIT = 20  # seconds: a generous bound on waits that normally take a fraction of a second

# argv: NAME MODE DIR. Each run appends its pid to DIR/NAME.runs and "start NAME" to DIR/events,
# prints "ready", then behaves as MODE says; SIGTERM appends "stop NAME" and exits with 0.
PROGRAM = """
import os, signal, sys, time, pathlib
name, mode, where = sys.argv[1], sys.argv[2], pathlib.Path(sys.argv[3])
def note(path, text):
    with open(where / path, "a") as file:
        file.write(text + "\\n")
note(f"{name}.runs", str(os.getpid()))
runs = len((where / f"{name}.runs").read_text().split())
note("events", f"start {name}")
def stop(*_):
    note("events", f"stop {name}")
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
while mode == "mute-later" and runs > 1:
    time.sleep(3600)
print(f"ready {os.getpid()}", flush=True)
if mode == "crash" or (mode == "crash-first" and runs == 1):
    sys.exit(3)
if mode == "exit0-first" and runs == 1:
    sys.exit(0)
while True:
    time.sleep(3600)
"""


@pytest.fixture
def where(tmp_path: Path) -> Iterator[Path]:
    """The programs' directory; its path is in each program's argv, and none may be left running at the end."""
    (tmp_path / "program.py").write_text(PROGRAM)
    yield tmp_path
    found = subprocess.run(["pgrep", "-f", re.escape(str(tmp_path))], capture_output=True, text=True)
    left = alive([int(pid) for pid in found.stdout.split()])
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, f"the test left processes running: {left}"


class Watcher:
    """Records the bus's log and child exits, and waits for conditions on them."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.log = LogRecorder()
        self.exits: list[tuple[float, ChildExit]] = []
        self.started_at: dict[str, list[float]] = {}
        self.changed = anyio.Event()
        bus.unsubscribe("log", log_to_structlog)
        bus.subscribe("log", self._on_log)
        bus.subscribe(CHILD_EXIT_CHANNEL, self._on_exit)

    def _on_log(self, msg: str, level: int, **fields: Any) -> None:
        self.log(msg, level, **fields)
        if msg == f"Child {fields.get('child')} started":
            self.started_at.setdefault(fields["child"], []).append(time.monotonic())
        self.changed.set()

    def _on_exit(self, exit: ChildExit) -> None:
        self.exits.append((time.monotonic(), exit))
        self.changed.set()

    async def until(self, condition: Callable[[], bool]) -> None:
        """Wait until ``condition()`` holds, checking each time something is logged or published."""
        with anyio.fail_after(WAIT):
            while not condition():
                self.changed = anyio.Event()
                await self.changed.wait()

    def started(self, name: str) -> int:
        return len(self.log.matching(f"Child {name} started"))


@asynccontextmanager
async def group(
    where: Path, *children: tuple[str, str, str], **options: Any
) -> AsyncIterator[tuple[Bus, Supervisor, Watcher]]:
    """A started bus with a supervisor of (name, mode, restart policy) programs, each started once ready."""
    async with Bus() as bus:
        watcher = Watcher(bus)
        supervisor = Supervisor(bus, **options)
        supervisor.subscribe()
        for name, mode, restart in children:
            argv = [sys.executable, str(where / "program.py"), name, mode, str(where)]
            supervisor.add(Subprocess(bus, name, argv, restart=restart, ready=LineReady("^ready"), stop_timeout=5))
        await bus.start()
        yield bus, supervisor, watcher


def pids(supervisor: Supervisor) -> dict[str, int | None]:
    return {info.name: info.pid for info in supervisor.children()}


class TestPolicies:
    @pytest.mark.parametrize(
        ("mode", "restart", "restarted"),
        [
            ("exit0-first", Restart.PERMANENT, True),
            ("crash-first", Restart.PERMANENT, True),
            ("crash-first", Restart.TRANSIENT, True),
            ("exit0-first", Restart.TRANSIENT, False),
            ("crash-first", Restart.TEMPORARY, False),
            ("exit0-first", Restart.TEMPORARY, False),
        ],
    )
    async def test_policy_decides_whether_an_ended_child_is_restarted(
        self, where: Path, mode: str, restart: Restart, restarted: bool
    ) -> None:
        """permanent: always restarted; transient: only after a failure; temporary: never."""
        async with group(where, ("only", mode, restart)) as (_, supervisor, watcher):
            child = supervisor["only"]
            if restarted:
                await watcher.until(lambda: child.state is ChildState.RUNNING and child.restarts == 1)
                assert watcher.started("only") == 2
            else:
                await watcher.until(lambda: child.state is ChildState.EXITED)
                assert watcher.started("only") == 1
        assert len((where / "only.runs").read_text().split()) == (2 if restarted else 1)


class TestStrategies:
    @pytest.mark.parametrize(
        ("strategy", "changed"),
        [
            (Strategy.ONE_FOR_ONE, {"b"}),
            (Strategy.ONE_FOR_ALL, {"a", "b", "c"}),
            (Strategy.REST_FOR_ONE, {"b", "c"}),
        ],
    )
    async def test_strategy_decides_which_children_restart_after_a_kill(
        self, where: Path, strategy: Strategy, changed: set[str]
    ) -> None:
        """After a SIGKILL of the middle child, only the children the strategy names get new pids."""
        three = [(name, "sleep", "permanent") for name in "abc"]
        async with group(where, *three, strategy=strategy) as (_, supervisor, watcher):
            before = pids(supervisor)
            os.kill(supervisor["b"].pid or 0, signal.SIGKILL)
            await watcher.until(lambda: all(supervisor[n].restarts == 1 for n in changed))
            await watcher.until(lambda: all(info.state is ChildState.RUNNING for info in supervisor.children()))
            after = pids(supervisor)
        assert {name for name in "abc" if before[name] != after[name]} == changed
        assert all(supervisor[name].restarts == 0 for name in set("abc") - changed)
        assert not alive([pid for pid in before.values() if pid])

    async def test_children_start_in_order_and_stop_in_reverse(self, where: Path) -> None:
        """Each child starts once the one before it is ready; a stop ends them last first."""
        async with group(where, *[(name, "sleep", "permanent") for name in "abc"]) as (bus, _, _):
            await bus.stop()
        events = (where / "events").read_text().split("\n")
        assert events == ["start a", "start b", "start c", "stop c", "stop b", "stop a", ""]


class TestIntensity:
    async def test_restart_delays_double_then_the_bus_exits_70(self, where: Path) -> None:
        """Restarts come after a doubling backoff; past max_restarts within the window the bus exits with 70."""
        options: dict[str, Any] = {"max_restarts": 3, "within": 60, "backoff": 0.2}
        async with group(where, ("crasher", "crash", "permanent"), **options) as (bus, supervisor, watcher):
            await bus.wait(State.EXITING, timeout=WAIT)
        assert bus.exit_code == 70
        assert supervisor["crasher"].state is ChildState.FAILED
        [gave_up] = watcher.log.matching("Restart intensity exceeded")
        assert gave_up.fields["reason"] == "more than 3 restarts within 60 s"
        assert gave_up.fields["children"] == ["crasher"]
        ended = [when for when, _ in watcher.exits]
        started = watcher.started_at["crasher"]
        assert (len(ended), len(started)) == (4, 4)
        gaps = [start - end for end, start in zip(ended, started[1:], strict=False)]  # each exit to the next start
        assert [gap >= delay for gap, delay in zip(gaps, [0.2, 0.4, 0.8], strict=True)] == [True] * 3, gaps

    async def test_a_failed_restart_attempt_stops_what_it_started(self, where: Path) -> None:
        """When a restart attempt fails halfway, what it started is stopped before the next attempt."""
        async with Bus() as bus:
            watcher = Watcher(bus)
            supervisor = Supervisor(bus, strategy="one_for_all", max_restarts=2, within=60, backoff=0.05)
            supervisor.subscribe()
            for name, mode in (("a", "sleep"), ("b", "mute-later")):
                argv = [sys.executable, str(where / "program.py"), name, mode, str(where)]
                supervisor.add(Subprocess(bus, name, argv, ready=LineReady("^ready"), ready_timeout=2))
            await bus.start()
            os.kill(supervisor["a"].pid or 0, signal.SIGKILL)
            await bus.wait(State.EXITING, timeout=WAIT)
        assert bus.exit_code == 70
        a_runs = [int(pid) for pid in (where / "a.runs").read_text().split()]
        assert len(a_runs) == 3 and len((where / "b.runs").read_text().split()) == 3
        stopped = [e for _, e in watcher.exits if e.name == "a"][1:]  # after the kill: stopped by each failed attempt
        assert [(e.expected, e.reason.startswith("stopped with SIGTERM")) for e in stopped] == [(True, True)] * 2
        assert not watcher.log.matching("already running")
        assert not alive(a_runs)


class TestExitsAndListing:
    async def test_each_exit_is_published_with_name_pid_code_and_reason(self, where: Path) -> None:
        """An exit with a code is published with the child's name, pid and code, and a reason that says so."""
        async with group(where, ("once", "crash-first", "transient")) as (_, supervisor, watcher):
            await watcher.until(lambda: supervisor["once"].restarts == 1)
        first_pid = int((where / "once.runs").read_text().split()[0])
        exit = watcher.exits[0][1]
        assert (exit.name, exit.pid, exit.exit_code, exit.signal, exit.expected) == ("once", first_pid, 3, None, False)
        assert "exited with code 3" in exit.reason

    async def test_a_kill_is_published_with_the_signal(self, where: Path) -> None:
        """A child killed by a signal is published with the signal's name and no exit code."""
        async with group(where, ("victim", "sleep", "permanent")) as (_, supervisor, watcher):
            pid = supervisor["victim"].pid
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
            await watcher.until(lambda: bool(watcher.exits))
        exit = watcher.exits[0][1]
        assert (exit.pid, exit.exit_code, exit.signal) == (pid, None, "SIGKILL")
        assert exit.reason.startswith("was killed by SIGKILL")

    async def test_stops_are_published_as_expected_exits(self, where: Path) -> None:
        """A stop publishes each child's exit too, marked expected."""
        async with group(where, ("a", "sleep", "permanent"), ("b", "sleep", "permanent")) as (bus, _, watcher):
            await bus.stop()
        assert [(e.name, e.expected, e.exit_code) for _, e in watcher.exits] == [("b", True, 0), ("a", True, 0)]

    async def test_listing_shows_state_pid_restarts_uptime_and_last_exit(self, where: Path) -> None:
        """children() lists each program with its kind, state, own pid, restarts, uptime and last exit."""
        async with group(where, ("web", "crash-first", "permanent")) as (_, supervisor, watcher):
            await watcher.until(lambda: supervisor["web"].restarts == 1)
            [info] = supervisor.children()
            printed = [int(r.msg.split()[1]) for r in watcher.log.records if r.msg.startswith("ready ")]
        assert (info.name, info.kind, info.state, info.restarts) == ("web", "program", ChildState.RUNNING, 1)
        assert info.pid == printed[-1] == int((where / "web.runs").read_text().split()[-1])
        assert info.uptime is not None and info.uptime >= 0
        assert info.last_exit is not None and info.last_exit.exit_code == 3
        [stopped] = supervisor.children()
        assert (stopped.state, stopped.pid, stopped.uptime) == (ChildState.STOPPED, None, None)
        assert stopped.last_exit is not None and stopped.last_exit.expected

    async def test_a_failing_exit_listener_does_not_stop_supervision(self, where: Path) -> None:
        """A child_exit listener that raises is logged, and the child is restarted all the same."""
        async with group(where, ("c", "crash-first", "permanent")) as (bus, supervisor, watcher):

            def broken(exit: ChildExit) -> None:
                raise RuntimeError("listener bug")

            bus.subscribe(CHILD_EXIT_CHANNEL, broken)
            await watcher.until(lambda: supervisor["c"].restarts == 1 and supervisor["c"].pid is not None)
            assert bus.state is State.STARTED
        assert watcher.log.matching("of channel 'child_exit' failed")

    async def test_programs_and_brokers_share_one_listing(self, where: Path) -> None:
        """The default supervisor lists external programs and child brokers side by side."""
        async with Bus() as bus:
            Watcher(bus)
            argv = [sys.executable, str(where / "program.py"), "prog", "sleep", str(where)]
            Subprocess(bus, "prog", argv, ready=LineReady("^ready")).subscribe()
            ChildBroker(bus, "broker", child_functions.echo).subscribe()
            await bus.start()
            listing = default_supervisor(bus).children()
        assert [(i.name, i.kind, i.state) for i in listing] == [
            ("prog", "program", ChildState.RUNNING),
            ("broker", "broker", ChildState.RUNNING),
        ]
        assert all(isinstance(i.pid, int) for i in listing)


class TestGroup:
    def test_bad_intensity_is_a_value_error_naming_it(self) -> None:
        """max_restarts and the durations are checked at construction."""
        with pytest.raises(ValueError, match="max_restarts"):
            Supervisor(Bus(), max_restarts=-1)
        with pytest.raises(ValueError, match="within"):
            Supervisor(Bus(), within=float("nan"))

    def test_unknown_strategy_is_a_value_error(self) -> None:
        """A strategy is one of the three names."""
        with pytest.raises(ValueError, match="one_for_some"):
            Supervisor(Bus(), strategy="one_for_some")

    def test_two_children_cannot_share_a_name(self) -> None:
        """Names identify children in the listing and in exits: a second one is refused."""
        bus = Bus()
        supervisor = Supervisor(bus)
        supervisor.add(Subprocess(bus, "x", ["true"]))
        with pytest.raises(ValueError, match="'x'"):
            supervisor.add(Subprocess(bus, "x", ["true"]))

    def test_default_supervisor_is_made_once_per_bus(self) -> None:
        """default_supervisor() gives the same group for a bus, another for another bus."""
        bus = Bus()
        assert default_supervisor(bus) is default_supervisor(bus)
        assert default_supervisor(bus) is not default_supervisor(Bus())

    async def test_a_running_child_cannot_be_removed(self, where: Path) -> None:
        """remove() refuses a child that runs: stop the bus first."""
        async with group(where, ("r", "sleep", "permanent")) as (_, supervisor, _):
            with pytest.raises(RuntimeError, match="stop the bus first"):
                supervisor.remove(supervisor["r"])
