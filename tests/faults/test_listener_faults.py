"""Listener faults in a running service: a start listener that raises, stop and exit listeners
and main ticks that hang (with and without ``stop_timeout``), a graceful listener that hangs.

Each fault is injected into a bus that has real plugins (PIDFile, Monitor, a child broker); the
checks are what a user sees: what ``start()`` raises, which listeners still ran, what is logged,
the exit code, and, for a real service sent a real SIGTERM, that nothing is left behind.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest
from helpers import LogRecorder, wait_for_ticks
from processes import Child, Spawner

from aiobus import Bus, ChannelFailures, State
from aiobus.plugins import Monitor, PIDFile

pytestmark = [
    pytest.mark.faults,
    pytest.mark.skipif(sys.platform != "linux", reason="POSIX signals and /proc (Linux)"),
]

TESTS_DIR = str(Path(__file__).resolve().parent.parent)

# A service with the usual plugins and a child broker; argv[1] names the fault injected,
# argv[2] is the PID file. Its log is JSON lines on stdout.
SERVICE = """
import os, sys
sys.path.insert(0, os.environ["TESTS_DIR"])

import anyio
import child_functions
from aiobus import Bus, ChannelFailures, ChildBroker, configure_logging
from aiobus.plugins import Monitor, PIDFile, SignalHandler



async def main(fault: str, pidfile: str) -> int:
    # (Arguments, not module globals: the child's worker imports this module again.)
    priority = {"stop-hangs-first": 10, "stop-hangs": 50, "exit-hangs": 90}.get(fault, 50)
    stop_timeout = None if fault == "tick-hangs-no-timeout" else 1.0
    async with Bus(main_interval=0.05, stop_timeout=stop_timeout) as bus:
        SignalHandler(bus).subscribe()
        PIDFile(bus, pidfile).subscribe()
        Monitor(bus, lambda: None, 0.05, name="heartbeat").subscribe()
        ChildBroker(bus, "echo", child_functions.echo, grace=5).subscribe()
        bus.subscribe("stop", lambda: bus.log("late stop listener ran"), priority=60)
        bus.subscribe("exit", lambda: bus.log("late exit listener ran"), priority=95)

        if fault == "start-raises":
            @bus.subscribe("start", priority=75)
            def refusing_start() -> None:
                raise OSError("port 8080 is in use")

        if fault.startswith("stop-hangs"):
            @bus.subscribe("stop", priority=priority)
            async def hung_stop_listener() -> None:
                bus.log("stop listener hanging")
                await anyio.sleep_forever()

        if fault == "exit-hangs":
            @bus.subscribe("exit", priority=priority)
            async def hung_exit_listener() -> None:
                bus.log("exit listener hanging")
                await anyio.sleep_forever()

        if fault.startswith("tick-hangs"):
            hanging = False

            @bus.subscribe("main")
            async def hung_tick() -> None:
                nonlocal hanging
                if hanging or bus.statistics().ticks < 3:
                    return
                hanging = True
                bus.log("main tick hanging")
                await anyio.sleep_forever()

        if fault == "graceful-hangs":
            @bus.subscribe("graceful")
            async def hung_graceful() -> None:
                bus.log("graceful listener hanging")
                await anyio.sleep_forever()

        try:
            await bus.start()
        except ChannelFailures as failures:
            bus.log("start raised", errors=[repr(error) for error in failures.exceptions], state=bus.state.name)
            return bus.exit_code
        bus.log("service started")
        await bus.block()
    return bus.exit_code


if __name__ == "__main__":
    configure_logging(format="json")
    raise SystemExit(anyio.run(main, sys.argv[1], sys.argv[2]))
"""


def run_service(spawn: Spawner, fault: str, pidfile: Path) -> Child:
    return spawn.script(SERVICE, fault, str(pidfile), env={"TESTS_DIR": TESTS_DIR})


def events(child: Child) -> list[str]:
    return [str(event.get("event")) for event in child.events()]


def event(child: Child, text: str) -> dict[str, Any]:
    """The first JSON log event whose message contains ``text``."""
    for found in child.events():
        if text in str(found.get("event")):
            return found
    raise AssertionError(f"no {text!r} in the log:\n{child.output}")


def child_pids(child: Child) -> list[int]:
    return [int(found["child_pid"]) for found in child.events() if str(found.get("event")) == "Child echo started"]


def sigterm_when_started(child: Child) -> None:
    child.wait_for('"service started"')
    child.send(signal.SIGTERM)


class TestStartListenerRaises:
    async def test_start_raises_and_every_plugin_is_stopped_and_exited(
        self, tmp_path: Path, log_recorder: LogRecorder
    ) -> None:
        """start() raises the listener's error; stop and exit ran for every plugin; exit code 70."""
        error = OSError("port 8080 is in use")
        calls: list[str] = []
        pidfile = tmp_path / "service.pid"
        async with Bus(main_interval=0.05) as bus:
            bus.subscribe("log", log_recorder)
            monitor = Monitor(bus, lambda: None, 0.01, name="heartbeat")
            monitor.subscribe()
            PIDFile(bus, pidfile).subscribe()

            @bus.subscribe("start", priority=90)  # after every built-in plugin (the Monitor starts at 85)
            def refusing_start() -> None:
                assert pidfile.exists() and monitor.statistics().running  # the others did start
                raise error

            bus.subscribe("start", lambda: calls.append("start after the failure"), priority=95)
            bus.subscribe("stop", lambda: calls.append("stop"))
            bus.subscribe("exit", lambda: calls.append("exit"))
            with pytest.raises(ChannelFailures) as caught:
                await bus.start()
            assert list(caught.value.exceptions) == [error]
            assert bus.state is State.EXITING and bus.exit_code == 70
            assert not monitor.statistics().running  # the Monitor got its stop
            assert not pidfile.exists()  # the PIDFile got its exit
        assert calls == ["start after the failure", "stop", "exit"]
        [failed] = log_recorder.matching("refusing_start of channel")
        assert failed.fields["listener"].endswith("refusing_start") and failed.msg.endswith(": port 8080 is in use")
        assert log_recorder.matching("Start failed: stopping and exiting")

    def test_a_service_whose_start_fails_ends_with_70_and_leaves_nothing(self, spawn: Spawner, tmp_path: Path) -> None:
        """The process is not killed: the code after start() runs; the child is stopped; exit code 70."""
        pidfile = tmp_path / "service.pid"
        child = run_service(spawn, "start-raises", pidfile)
        assert child.wait(timeout=60) == 70, child.output
        child.assert_nothing_left()
        raised = event(child, "start raised")
        assert raised["errors"] == ["OSError('port 8080 is in use')"] and raised["state"] == "EXITING"
        logged = events(child)
        assert logged.index("Start failed: stopping and exiting") < logged.index("late stop listener ran")
        assert logged.index("late stop listener ran") < logged.index("late exit listener ran")
        # The supervisor's start (priority 80) came after the failing listener and still ran.
        assert child_pids(child) and "Child echo ended: exited" in logged
        assert not pidfile.exists()


class TestHungStopListener:
    async def test_the_shutdown_completes_and_names_the_listener(
        self, tmp_path: Path, log_recorder: LogRecorder
    ) -> None:
        """A stop listener hanging for good is cut off at stop_timeout; the exit listeners still run."""
        calls: list[str] = []
        pidfile = tmp_path / "service.pid"
        async with Bus(main_interval=0.05, stop_timeout=0.5) as bus:
            bus.subscribe("log", log_recorder)
            monitor = Monitor(bus, lambda: None, 0.01)
            monitor.subscribe()
            PIDFile(bus, pidfile).subscribe()

            @bus.subscribe("stop", priority=40)  # after the Monitor's stop (30)
            async def hung_stop_listener() -> None:
                calls.append("hung stop")
                await anyio.sleep_forever()

            bus.subscribe("stop", lambda: calls.append("later stop"), priority=60)
            bus.subscribe("exit", lambda: calls.append("exit"))
            await bus.start()
            with anyio.fail_after(10):  # 0.5 s expected
                await bus.exit()
            assert bus.state is State.EXITING and bus.exit_code == 70
            assert not monitor.statistics().running
            assert not pidfile.exists()
        # The deadline is the stop channel's (README, "The shutdown sequence", step 4): the
        # listener after the hung one in the same channel is cut off with it; exit still runs.
        assert calls == ["hung stop", "exit"]
        [cancelled] = log_recorder.matching("was cancelled")
        assert cancelled.fields["listener"].endswith("hung_stop_listener") and cancelled.fields["channel"] == "stop"
        [cut] = log_recorder.matching("cut off")
        assert cut.fields == {"channel": "stop", "timeout": 0.5}
        assert log_recorder.messages.index(cancelled.msg) < log_recorder.messages.index("Bus STOPPED")

    @pytest.mark.parametrize("fault", ["stop-hangs", "stop-hangs-first"])
    def test_sigterm_ends_the_service_with_70_and_leaves_nothing(
        self, spawn: Spawner, tmp_path: Path, fault: str
    ) -> None:
        """SIGTERM: the hung stop listener is cut off after 1 s, the exit listeners run, exit code 70.

        Hung at priority 50 the children were already stopped (priority 20) and drained;
        hung at 10, before the supervisor, they are killed when the bus's tasks end.
        """
        pidfile = tmp_path / "service.pid"
        child = run_service(spawn, fault, pidfile)
        sigterm_when_started(child)
        assert child.wait(timeout=30) == 70, child.output
        child.assert_nothing_left()
        cancelled = event(child, "was cancelled")
        assert cancelled["listener"].endswith("hung_stop_listener") and cancelled["channel"] == "stop"
        logged = events(child)
        assert "Channel 'stop' cut off at its 1 s deadline" in logged
        assert "late stop listener ran" not in logged
        assert "late exit listener ran" in logged and not pidfile.exists()
        if fault == "stop-hangs":
            assert "echo child drained" in logged and "Child echo ended: exited" in logged
        assert len(child_pids(child)) == 1  # the child was started once, and is gone (above)


class TestHungExitListener:
    async def test_the_exit_completes_and_names_the_listener(self, tmp_path: Path, log_recorder: LogRecorder) -> None:
        """An exit listener hanging for good is cut off at stop_timeout; those before it ran."""
        calls: list[str] = []
        pidfile = tmp_path / "service.pid"
        async with Bus(stop_timeout=0.5) as bus:
            bus.subscribe("log", log_recorder)
            PIDFile(bus, pidfile).subscribe()
            bus.subscribe("stop", lambda: calls.append("stop"))

            @bus.subscribe("exit", priority=60)  # after the PIDFile's exit (50)
            async def hung_exit_listener() -> None:
                calls.append("hung exit")
                await anyio.sleep_forever()

            await bus.start()
            with anyio.fail_after(10):
                await bus.exit()
            assert bus.state is State.EXITING and bus.exit_code == 70
            assert not pidfile.exists()
        assert calls == ["stop", "hung exit"]
        [cancelled] = log_recorder.matching("was cancelled")
        assert cancelled.fields["listener"].endswith("hung_exit_listener") and cancelled.fields["channel"] == "exit"
        assert log_recorder.matching("Channel 'exit' cut off at its 0.5 s deadline")

    def test_sigterm_ends_the_service_with_70_and_leaves_nothing(self, spawn: Spawner, tmp_path: Path) -> None:
        pidfile = tmp_path / "service.pid"
        child = run_service(spawn, "exit-hangs", pidfile)
        sigterm_when_started(child)
        assert child.wait(timeout=30) == 70, child.output
        child.assert_nothing_left()
        logged = events(child)
        assert event(child, "was cancelled")["listener"].endswith("hung_exit_listener")
        assert "Channel 'exit' cut off at its 1 s deadline" in logged
        assert "late stop listener ran" in logged and "Child echo ended: exited" in logged
        assert "late exit listener ran" not in logged  # after the hung one, in the same channel
        assert not pidfile.exists()  # the PIDFile's exit came before the hang


class TestHungMainTick:
    async def test_stop_cuts_the_tick_off_and_the_bus_starts_again(self, log_recorder: LogRecorder) -> None:
        """A main tick that hangs during stop is cut off at stop_timeout; a new start ticks again."""
        calls: list[str] = []
        hang = True
        in_tick = anyio.Event()
        async with Bus(main_interval=0.01, stop_timeout=0.5) as bus:
            bus.subscribe("log", log_recorder)

            @bus.subscribe("main")
            async def hung_tick() -> None:
                if hang:
                    in_tick.set()
                    await anyio.sleep_forever()

            bus.subscribe("stop", lambda: calls.append("stop"))
            await bus.start()
            await in_tick.wait()
            with anyio.fail_after(10):
                await bus.stop()
            assert bus.state is State.STOPPED and bus.exit_code == 70
            assert calls == ["stop"]
            assert log_recorder.matching("The main tick in progress was cut off")
            assert log_recorder.matching("was cancelled")[0].fields["listener"].endswith("hung_tick")
            hang = False
            ticks = bus.statistics().ticks
            await bus.start()
            await wait_for_ticks(bus, ticks + 3)

    @pytest.mark.parametrize("fault", ["tick-hangs", "tick-hangs-no-timeout"])
    def test_sigterm_during_a_hung_tick(self, spawn: Spawner, tmp_path: Path, fault: str) -> None:
        """With stop_timeout the tick is cut off and the service ends with 70, its cleanup done;
        without, the shutdown waits for the tick and a second Ctrl-C forces it (130)."""
        pidfile = tmp_path / "service.pid"
        child = run_service(spawn, fault, pidfile)
        child.wait_for('"main tick hanging"')
        child.send(signal.SIGTERM)
        if fault == "tick-hangs":
            assert child.wait(timeout=30) == 70, child.output
            logged = events(child)
            assert "The main tick in progress was cut off at the stop deadline" in logged
            assert "late stop listener ran" in logged and "late exit listener ran" in logged
            assert "Child echo ended: exited" in logged and not pidfile.exists()
        else:
            child.wait_for('"Bus STOPPING"')
            child.send(signal.SIGINT)
            assert child.wait(timeout=30) == 130, child.output
            assert "Caught a second SIGINT: forcing the shutdown" in events(child)
        child.assert_nothing_left()


class TestHungGracefulListener:
    async def test_exit_cancels_it(self, log_recorder: LogRecorder) -> None:
        """exit() cuts a hung graceful short, names the listener, and the shutdown is clean."""
        calls: list[str] = []
        in_graceful = anyio.Event()
        async with Bus() as bus:
            bus.subscribe("log", log_recorder)

            @bus.subscribe("graceful")
            async def hung_graceful() -> None:
                in_graceful.set()
                await anyio.sleep_forever()

            bus.subscribe("stop", lambda: calls.append("stop"))
            bus.subscribe("exit", lambda: calls.append("exit"))
            await bus.start()
            async with anyio.create_task_group() as group:
                group.start_soon(bus.graceful)
                await in_graceful.wait()
                with anyio.fail_after(10):
                    await bus.exit()
            assert bus.state is State.EXITING and bus.exit_code == 0
        assert calls == ["stop", "exit"]
        assert log_recorder.matching("was cancelled")[0].fields["listener"].endswith("hung_graceful")
        assert log_recorder.matching("Graceful interrupted: the bus is exiting")

    def test_sigterm_during_a_hung_graceful_exits_cleanly(self, spawn: Spawner, tmp_path: Path) -> None:
        """SIGUSR1 starts a graceful that hangs; SIGTERM still ends the service, with code 0."""
        pidfile = tmp_path / "service.pid"
        child = run_service(spawn, "graceful-hangs", pidfile)
        child.wait_for('"service started"')
        child.send(signal.SIGUSR1)
        child.wait_for('"graceful listener hanging"')
        child.send(signal.SIGTERM)
        assert child.wait(timeout=30) == 0, child.output
        child.assert_nothing_left()
        logged = events(child)
        assert event(child, "was cancelled")["listener"].endswith("hung_graceful")
        assert "Graceful interrupted: the bus is exiting" in logged
        assert "late stop listener ran" in logged and "late exit listener ran" in logged
        assert not pidfile.exists()
