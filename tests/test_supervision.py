"""Supervision: restart policies, group strategies, intensity and backoff, exits and the children listing.

The children are real programs (small Python scripts run by the Subprocess plugin).
"""

from __future__ import annotations

import logging
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
import anyio.abc
import child_functions
import pytest
from helpers import LogRecorder
from processes import alive

from aiobus import Bus, ChildBroker, State, log_to_structlog
from aiobus._supervision import (
    CHILD_EXIT_CHANNEL,
    FORCED_BUDGET,
    Child,
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


# argv: MARKER. Notes each SIGTERM in MARKER, and lingers on (only SIGKILL ends it); prints "ready" once trapping.
TRAPPER = """
import signal, sys, time
def note(*_):
    with open(sys.argv[1], "a") as file:
        file.write("SIGTERM\\n")
signal.signal(signal.SIGTERM, note)
print("ready", flush=True)
while True:
    time.sleep(3600)
"""


class Trapper(Child):
    """A real program that notes each SIGTERM in ``DIR/NAME.term`` and only ends when killed.

    Its terminate(budget) is the protocol's: SIGTERM, then SIGKILL once min(budget, grace) has
    passed; a call while another is under way shortens the time left; the exit's reason says which.
    """

    kind = "program"

    def __init__(self, bus: Bus, name: str, where: Path, grace: float = 5.0) -> None:
        super().__init__(name)
        self.bus = bus
        self.marker = where / f"{name}.term"
        self.grace = grace
        #: The budget of each terminate call, in order.
        self.budgets: list[float | None] = []
        self._process: anyio.abc.Process | None = None
        self._stopping: anyio.CancelScope | None = None
        self._asked_at: float | None = None
        self._killed_after: float | None = None

    @property
    def pid(self) -> int | None:
        process = self._process
        return None if process is None or process.returncode is not None else process.pid

    @property
    def stop_budget(self) -> float:
        return self.grace

    async def spawn(self) -> None:
        self._stopping = self._asked_at = self._killed_after = None
        process = await anyio.open_process(
            [sys.executable, "-c", TRAPPER, str(self.marker)], stdin=subprocess.DEVNULL, stderr=None
        )
        try:
            assert process.stdout is not None
            seen = b""
            with anyio.fail_after(WAIT):
                while b"ready" not in seen:
                    seen += await process.stdout.receive()
        except BaseException:
            process.kill()
            with anyio.CancelScope(shield=True):
                await process.aclose()
            raise
        self._process = process

    async def wait(self) -> ChildExit:
        process = self._process
        assert process is not None
        code = await process.wait()
        with anyio.CancelScope(shield=True):
            await process.aclose()
        sig = signal.Signals(-code).name if code < 0 else None
        if self._killed_after is not None:
            reason = f"killed with SIGKILL {self._killed_after:.2f} s after SIGTERM (budgets {self.budgets})"
        elif self._asked_at is not None:
            reason = "ended after SIGTERM"
        else:
            reason = f"ended on its own with {sig or code}"
        asked = self._asked_at is not None
        return ChildExit(self.name, process.pid, None if sig else code, sig, reason, expected=asked)

    async def terminate(self, budget: float | None = None) -> None:
        process = self._process
        if process is None or process.returncode is not None:
            return
        self.budgets.append(budget)
        deadline = anyio.current_time() + (self.grace if budget is None else min(budget, self.grace))
        if self._stopping is not None:  # a call under way: shorten it
            self._stopping.deadline = min(self._stopping.deadline, deadline)
            await process.wait()
            return
        self._asked_at = anyio.current_time()
        process.send_signal(signal.SIGTERM)
        self.bus.log(f"Sent SIGTERM to {self.name}")
        with anyio.CancelScope(deadline=deadline) as self._stopping:
            await process.wait()
        if process.returncode is None:
            self._killed_after = anyio.current_time() - self._asked_at
            process.kill()
            await process.wait()


@asynccontextmanager
async def trappers(where: Path, names: str, **bus_options: Any) -> AsyncIterator[tuple[Bus, Watcher, list[Trapper]]]:
    """A started bus whose supervisor runs a Trapper (5 s grace) per name; the pids are checked gone at the end."""
    async with Bus(**bus_options) as bus:
        watcher = Watcher(bus)
        supervisor = Supervisor(bus)
        supervisor.subscribe()
        children = [Trapper(bus, name, where) for name in names]
        for child in children:
            supervisor.add(child)
        await bus.start()
        pids = [child.pid or 0 for child in children]
        yield bus, watcher, children
    assert not alive(pids)


class TestCutShortStops:
    """A stop cut short by stop_timeout or force_exit still asks every child to stop, and records every exit."""

    def assert_truths(self, where: Path, watcher: Watcher, children: list[Trapper]) -> None:
        """Every child got SIGTERM, ended, and had its exit recorded on child_exit and logged."""
        names = sorted(child.name for child in children)
        assert [(child.marker.read_text()) for child in children] == ["SIGTERM\n"] * len(children)
        assert sorted(exit.name for _, exit in watcher.exits) == names
        assert all(exit.expected and exit.signal == "SIGKILL" for _, exit in watcher.exits)
        assert sorted(r.fields["child"] for r in watcher.log.matching(" ended: killed with SIGKILL")) == names
        assert all(child.state is ChildState.STOPPED and child.last_exit is not None for child in children)

    async def test_start_warns_when_stop_timeout_is_shorter_than_the_budgets(self, where: Path) -> None:
        """At start, a stop_timeout shorter than the children's budgets one after another is a warning naming them."""
        async with trappers(where, "ab", stop_timeout=6) as (bus, watcher, _):
            [warning] = watcher.log.matching("stop_timeout")
            await bus.exit()
        assert warning.level == logging.WARNING
        assert (warning.fields["children"], warning.fields["budget"], warning.fields["stop_timeout"]) == (
            ["a", "b"],
            10.0,
            6,
        )
        assert "a 5 s, b 5 s" in warning.msg

    async def test_no_warning_when_the_budgets_fit(self, where: Path) -> None:
        """No warning when stop_timeout leaves room for every budget, or is not set."""
        async with trappers(where, "a", stop_timeout=30) as (_, watcher, _):
            pass
        async with trappers(where, "b") as (_, other, _):
            pass
        assert not watcher.log.matching("stop_timeout") and not other.log.matching("stop_timeout")

    async def test_stop_timeout_shorter_than_the_budgets_stops_children_together(self, where: Path) -> None:
        """stop_timeout=1 and 5 s budgets: all get SIGTERM at once, are killed within the second, and are recorded."""
        async with trappers(where, "abc", stop_timeout=1) as (bus, watcher, children):
            began = time.monotonic()
            await bus.exit()
            took = time.monotonic() - began
        assert took < WAIT / 2
        [together] = watcher.log.matching("together")
        assert together.level == logging.WARNING and together.fields["children"] == ["c", "b", "a"]
        [killed] = watcher.log.matching("Children killed as the stop was cut short")
        assert killed.fields["killed"] == {exit.name: exit.pid for _, exit in watcher.exits}
        assert all(len(child.budgets) >= 1 and (child.budgets[0] or 0) < 1 for child in children)
        self.assert_truths(where, watcher, children)

    async def test_force_exit_during_the_stop_still_asks_and_records_every_child(self, where: Path) -> None:
        """A force_exit while the last child stops: the others get SIGTERM too, all are killed within FORCED_BUDGET."""
        async with trappers(where, "abc") as (bus, watcher, children):
            async with anyio.create_task_group() as group:
                group.start_soon(bus.exit)
                await watcher.log.wait_for("Sent SIGTERM to c", WAIT)
                began = time.monotonic()
                bus.force_exit(130)
            took = time.monotonic() - began
        assert bus.exit_code == 130
        assert took < WAIT / 2  # in order, the last two would have taken 10 s more
        [forced] = watcher.log.matching("Stop cut short")
        assert forced.fields["children"] == ["c", "b", "a"]
        assert [child.budgets for child in children] == [[FORCED_BUDGET], [FORCED_BUDGET], [None, FORCED_BUDGET]]
        self.assert_truths(where, watcher, children)

    async def test_a_forced_stop_names_the_children_it_killed_with_their_pids(self, where: Path) -> None:
        """After a force_exit, one warning lists every child that had to be killed, with its pid."""
        async with trappers(where, "ab") as (bus, watcher, children):
            pids = {child.name: child.pid for child in children}
            async with anyio.create_task_group() as group:
                group.start_soon(bus.exit)
                await watcher.log.wait_for("Sent SIGTERM to b", WAIT)
                bus.force_exit(130)
        [summary] = watcher.log.matching("Children killed as the stop was cut short")
        assert (logging.WARNING, {"b": pids["b"], "a": pids["a"]}) == (summary.level, summary.fields["killed"])
        assert summary.msg.endswith(f": b (pid {pids['b']}), a (pid {pids['a']})")

    async def test_children_whose_stop_never_ran_are_asked_and_recorded_as_the_tasks_end(self, where: Path) -> None:
        """A stop listener hanging before the children's turn: as the bus's tasks end, each child still gets
        SIGTERM, is killed within FORCED_BUDGET, and its exit is recorded."""

        async def hangs() -> None:
            await anyio.sleep_forever()

        async with trappers(where, "ab", stop_timeout=0.5) as (bus, watcher, children):
            bus.subscribe("stop", hangs, priority=10)
            began = time.monotonic()
        took = time.monotonic() - began
        assert bus.exit_code == 70
        assert took < WAIT / 2
        assert sorted(r.fields["child"] for r in watcher.log.matching("still running as the bus's tasks end")) == [
            "a",
            "b",
        ]
        assert [child.budgets for child in children] == [[FORCED_BUDGET], [FORCED_BUDGET]]
        self.assert_truths(where, watcher, children)
