"""Children steered at run time, in real services run by ``aiobus run``: significant children, liveness checks."""

from __future__ import annotations

import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from helpers import LogRecorder
from operating import WAIT, children, ctl, exit_service, start_service
from processes import Spawner

from aiobus import Bus, ChildState, Supervisor, log_to_structlog
from aiobus.plugins import LineReady, Subprocess

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="Unix sockets and signals")

SIGNIFICANT = """
from aiobus import Supervisor


def ends_cleanly(bus):
    program(bus, "job", "import time; time.sleep(0.5)", ready=None, restart="transient", significant=True)
    program(bus, "web", RELOADABLE)


def ends_badly(bus):
    program(bus, "job", "raise SystemExit(3)", ready=None, restart="temporary", significant=True)
    program(bus, "web", RELOADABLE)


def broker_ends(bus):
    ChildBroker(bus, "worker", ends_by_itself, restart="temporary", significant=True).subscribe()
    program(bus, "web", RELOADABLE)


def not_significant(bus):
    program(bus, "job", "import time; time.sleep(0.5)", ready=None, restart="transient")
    program(bus, "web", RELOADABLE)
"""

# A program listening on PORT; its first incarnation closes its listening socket once a
# marker file is written (it stays alive, its port stops answering), the next keeps it open.
LIVENESS = """
PORT = {port}
SERVES = '''
import os, socket, time
listener = socket.socket()
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind(("127.0.0.1", {port}))
listener.listen()
first = not os.path.exists("incarnation")
open("incarnation", "a").write("x")
print("listening", flush=True)
if first:
    time.sleep(1)
    listener.close()
    print("stopped answering", flush=True)
while True:
    time.sleep(1)
'''


def liveness(bus):
    Subprocess(
        bus,
        "web",
        [sys.executable, "-c", SERVES],
        ready=PortReady(PORT),
        live=PortReady(PORT),
        live_interval=1.0,
        live_failures=2,
    ).subscribe()
"""


@pytest.fixture
def sock(tmp_path: Path) -> Path:
    return tmp_path / "run" / "ctl.sock"


class TestSignificant:
    def test_a_significant_child_ending_cleanly_ends_the_service_with_code_0(self, spawn: Spawner, sock: Path) -> None:
        """A significant transient program that exits 0: the service exits with code 0, the reason logged."""
        service = start_service(spawn, "ends_cleanly", sock, extra=SIGNIFICANT)
        assert 0 == service.wait(WAIT), service.output
        assert "Significant child job ended for good (exited" in service.output
        service.assert_nothing_left()

    def test_a_significant_child_failing_ends_the_service_with_code_70(self, spawn: Spawner, sock: Path) -> None:
        """A significant temporary program that exits 3: the service exits with code 70."""
        service = start_service(spawn, "ends_badly", sock, extra=SIGNIFICANT)
        assert 70 == service.wait(WAIT), service.output
        assert "Significant child job ended for good (exited with code 3" in service.output
        service.assert_nothing_left()

    def test_a_significant_broker_ending_ends_the_service(self, spawn: Spawner, sock: Path) -> None:
        """A significant temporary broker whose bus exits by itself: the service exits with code 0."""
        service = start_service(spawn, "broker_ends", sock, extra=SIGNIFICANT)
        assert 0 == service.wait(WAIT), service.output
        assert "Significant child worker ended for good" in service.output
        service.assert_nothing_left()

    def test_a_child_not_significant_ending_leaves_the_service_running(self, spawn: Spawner, sock: Path) -> None:
        """The same transient program, not significant: it is exited, the service runs on."""
        service = start_service(spawn, "not_significant", sock, extra=SIGNIFICANT)
        service.wait_for("Child job ended", timeout=WAIT)
        job = children(sock)["job"]
        assert "exited" == job["state"]
        assert 0 == exit_service(service, sock)

    def test_a_child_stopped_by_the_operator_is_not_an_end_for_good(self, spawn: Spawner, sock: Path) -> None:
        """stop on a significant child: the service runs on."""
        service = start_service(spawn, "broker_ends", sock, extra=SIGNIFICANT.replace("ends_by_itself", "idle"))
        assert 0 == ctl(sock, "stop", "worker").code
        assert "stopped" == children(sock)["worker"]["state"]
        assert 0 == exit_service(service, sock)


class TestLiveness:
    def test_a_program_whose_port_stops_answering_is_restarted(self, spawn: Spawner, sock: Path) -> None:
        """Its port stops answering: after 2 failed checks in a row it is stopped, restarted, and its exit says why."""
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        service = start_service(spawn, "liveness", sock, extra=LIVENESS.format(port=port))
        service.wait_for("is not live", timeout=WAIT)
        service.wait_for('"Child web started"', timeout=WAIT, count=2)
        web = children(sock)["web"]
        assert ("running", 1) == (web["state"], web["restarts"])
        reason = web["last_exit"]["reason"]
        assert reason.startswith(f"not live (liveness check failed 2 times in a row: port {port} did not answer")
        assert web["last_exit"]["failed"]
        assert 0 == exit_service(service, sock)


class TestArguments:
    def test_liveness_and_reload_arguments_are_checked(self) -> None:
        """Subprocess refuses a bad live, live_interval, live_failures, reload_signal or significant."""
        bus = Bus()
        argv = [sys.executable, "-c", "pass"]
        with pytest.raises(TypeError, match="live must be"):
            Subprocess(bus, "p", argv, live="port")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="live_interval"):
            Subprocess(bus, "p", argv, live=LineReady("x"), live_interval=0)
        with pytest.raises(ValueError, match="live_failures"):
            Subprocess(bus, "p", argv, live_failures=0)
        with pytest.raises(ValueError, match="reload_signal"):
            Subprocess(bus, "p", argv, reload_signal=12345)
        with pytest.raises(TypeError, match="significant"):
            Subprocess(bus, "p", argv, significant="yes")  # type: ignore[arg-type]


# argv: MODE. Prints "ready" and sleeps; mode "mute-later": a second run (a file "runs" in its
# directory says which) prints "muted" instead.
PROGRAM = """
import os, sys, time
runs = os.path.exists("runs")
open("runs", "a").write("x")
print("muted" if sys.argv[1] == "mute-later" and runs else "ready", flush=True)
while True:
    time.sleep(3600)
"""


@asynccontextmanager
async def steered(tmp_path: Path, *children: tuple[str, str], **options: Any) -> AsyncIterator[tuple[Bus, Supervisor]]:
    """A started bus with a supervisor of (name, mode) permanent programs, each in a folder of its own."""
    async with Bus() as bus:
        bus.unsubscribe("log", log_to_structlog)
        supervisor = Supervisor(bus, **options)
        supervisor.subscribe()
        for name, mode in children:
            folder = tmp_path / name
            folder.mkdir()
            argv = [sys.executable, "-c", PROGRAM, mode]
            supervisor.add(Subprocess(bus, name, argv, cwd=folder, ready=LineReady("^ready"), kill_after=5))
        await bus.start()
        yield bus, supervisor


async def wait_until(bus: Bus, condition: Callable[[], bool]) -> None:
    """Check ``condition`` each time the bus logs something, until it holds (WAIT s at most)."""
    changed = anyio.Event()

    def logged(msg: str, level: int, **fields: Any) -> None:
        changed.set()

    bus.subscribe("log", logged)
    try:
        with anyio.fail_after(WAIT):
            while not condition():
                await changed.wait()
                changed = anyio.Event()
    finally:
        bus.unsubscribe("log", logged)


class TestSupervisorSteering:
    async def test_unknown_names_are_refused_and_a_stopped_bus_starts_nothing(self, tmp_path: Path) -> None:
        """KeyError for a name no child has; once the bus has stopped, start_child starts nothing."""
        async with steered(tmp_path, ("a", "sleep")) as (bus, supervisor):
            with pytest.raises(KeyError):
                await supervisor.restart_child("nope")
            await bus.stop()
            info = await supervisor.start_child("a")
            assert (ChildState.STOPPED, None) == (info.state, info.pid)

    async def test_restart_child_restarts_only_that_child_whatever_the_strategy(self, tmp_path: Path) -> None:
        """one_for_all: restart_child("b") gives b a new pid, a and c keep theirs; intensity untouched."""
        async with steered(tmp_path, ("a", "sleep"), ("b", "sleep"), ("c", "sleep"), strategy="one_for_all") as (
            _,
            supervisor,
        ):
            before = {info.name: info.pid for info in supervisor.children()}
            info = await supervisor.restart_child("b")
            after = {info.name: info.pid for info in supervisor.children()}
            assert (ChildState.RUNNING, 1) == (info.state, info.restarts)
        assert before["b"] != after["b"]
        assert (before["a"], before["c"]) == (after["a"], after["c"])

    async def test_a_stopped_child_is_left_alone_by_the_strategy(self, tmp_path: Path) -> None:
        """one_for_all: b stopped by stop_child stays stopped when a is killed and restarted."""
        async with steered(tmp_path, ("a", "sleep"), ("b", "sleep"), strategy="one_for_all") as (bus, supervisor):
            stopped = await supervisor.stop_child("b")
            assert (ChildState.STOPPED, None) == (stopped.state, stopped.pid)
            assert supervisor["b"].last_exit is not None and supervisor["b"].last_exit.expected
            os.kill(supervisor["a"].pid or 0, signal.SIGKILL)
            await wait_until(bus, lambda: supervisor["a"].restarts == 1 and supervisor["a"].state is ChildState.RUNNING)
            assert ChildState.STOPPED == supervisor["b"].state
            started = await supervisor.start_child("b")
            assert ChildState.RUNNING == started.state

    async def test_the_bus_stop_cancels_a_start_under_way(self, tmp_path: Path) -> None:
        """A restart_child waiting for a program that never gets ready: the bus's exit makes it fail at once."""
        async with steered(tmp_path, ("a", "mute-later")) as (bus, supervisor):
            muted = LogRecorder()
            bus.subscribe("log", muted)
            failure: list[BaseException] = []

            async def restart() -> None:
                try:
                    await supervisor.restart_child("a")
                except RuntimeError as error:
                    failure.append(error)

            async with anyio.create_task_group() as tasks:
                tasks.start_soon(restart)
                await wait_until(
                    bus, lambda: supervisor["a"].state is ChildState.STARTING and bool(muted.matching("muted"))
                )
                await bus.exit()
            assert ["the bus's stop began while child 'a' was starting"] == [str(error) for error in failure]
            assert ChildState.STOPPED == supervisor["a"].state
