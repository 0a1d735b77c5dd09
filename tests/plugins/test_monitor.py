"""Monitor: a callback called every few seconds while the bus is started."""

from __future__ import annotations

import asyncio
import functools
import math
import signal
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from helpers import LogRecorder
from processes import Spawner

from aiobus import Bus, Priority, State, Supervisor
from aiobus._channels import resolve_priority
from aiobus.plugins import Monitor

WAIT = 10  # seconds: a generous bound on waits that normally take a fraction of a second


class Calls:
    """A monitor callback (sync or async) that records each call and signals when there are enough."""

    def __init__(self, bus: Bus, wanted: int = 3, error: Exception | None = None) -> None:
        self.bus = bus
        self.wanted = wanted
        self.error = error
        self.states: list[State] = []
        self.tasks: list[object] = []  # the task objects themselves: an id may be reused
        self.enough = anyio.Event()

    def record(self) -> None:
        self.states.append(self.bus.state)
        self.tasks.append(asyncio.current_task())
        if len(self.states) >= self.wanted:
            self.enough.set()
        if self.error is not None:
            raise self.error

    async def arecord(self) -> None:
        await anyio.lowlevel.checkpoint()
        self.record()

    async def wait(self, wanted: int | None = None) -> None:
        if wanted is not None:
            self.wanted = wanted
            if len(self.states) >= wanted:
                return
            self.enough = anyio.Event()
        with anyio.fail_after(WAIT):
            await self.enough.wait()


class TestConstruction:
    @pytest.mark.parametrize("frequency", [0, -1, -0.5, math.nan, math.inf, "1", None, True])
    def test_bad_frequency_is_a_value_error_naming_it(self, frequency: object) -> None:
        """A frequency that is not a positive finite number is refused, and the message names it."""
        with pytest.raises(ValueError, match="frequency") as info:
            Monitor(Bus(), lambda: None, frequency)  # type: ignore[arg-type]
        assert repr(frequency) in str(info.value)

    def test_non_callable_callback_is_a_type_error(self) -> None:
        """A callback that cannot be called is refused at construction."""
        with pytest.raises(TypeError, match="callable"):
            Monitor(Bus(), "not a function", 1)  # type: ignore[arg-type]

    def test_non_str_name_is_a_type_error(self) -> None:
        """A name that is not a str is refused at construction."""
        with pytest.raises(TypeError, match="name"):
            Monitor(Bus(), lambda: None, 1, name=42)  # type: ignore[arg-type]

    def test_name_defaults_to_the_callback_name(self) -> None:
        """Without a name, the monitor is named after its callback (through partials)."""

        def check_disk(path: str) -> None:
            pass

        assert Monitor(Bus(), functools.partial(check_disk, "/"), 1).name.endswith("check_disk")
        assert Monitor(Bus(), lambda: None, 1, name="disk").name == "disk"

    def test_subscribe_starts_after_the_children_and_stops_before_them(self) -> None:
        """subscribe() puts start after the children's (and the defaults), and stop before them."""
        bus = Bus()
        monitor = Monitor(bus, lambda: None, 1)
        supervisor = Supervisor(bus)
        bus.subscribe("start", lambda: None)
        bus.subscribe("stop", lambda: None)
        monitor.subscribe()
        supervisor.subscribe()
        assert bus.listeners["start"][-2:] == (supervisor.start, monitor.start)
        assert bus.listeners["stop"][:2] == (monitor.stop, supervisor.stop)
        assert (resolve_priority(monitor.start, None), resolve_priority(monitor.stop, None)) == (
            Priority.START_CHILD_USERS,
            Priority.STOP_CHILD_USERS,
        )


class TestRunning:
    @pytest.mark.parametrize("kind", ["sync", "async"])
    async def test_calls_the_callback_repeatedly_while_started(self, kind: str) -> None:
        """A sync or an async callback is called again and again while the bus is started."""
        async with Bus() as bus:
            calls = Calls(bus, wanted=3)
            callback: Callable[[], Any] = calls.record if kind == "sync" else calls.arecord
            Monitor(bus, callback, 0.01).subscribe()
            await bus.start()
            await calls.wait()
        assert calls.states[:3] == [State.STARTED] * 3
        assert all(task is calls.tasks[0] for task in calls.tasks)

    async def test_no_call_before_start_nor_after_stop(self) -> None:
        """Subscribing does not run the monitor, and no call comes once stop has returned."""
        async with Bus() as bus:
            calls = Calls(bus, wanted=2)
            monitor = Monitor(bus, calls.record, 0.01)
            monitor.subscribe()
            await anyio.sleep(0.2)  # 20 periods: time for a wrong call to show
            assert calls.states == []
            assert not monitor.statistics().running
            await bus.start()
            await calls.wait()
            await bus.stop()
            after_stop = len(calls.states)
            assert not monitor.statistics().running
            await anyio.sleep(0.2)
            assert len(calls.states) == after_stop
        assert set(calls.states) == {State.STARTED}

    async def test_first_call_comes_one_period_after_start(self) -> None:
        """The monitor waits ``frequency`` seconds before its first call."""
        async with Bus() as bus:
            calls = Calls(bus, wanted=1)
            Monitor(bus, calls.record, 0.2).subscribe()
            await bus.start()
            started = anyio.current_time()
            await calls.wait()
            assert anyio.current_time() - started >= 0.19

    async def test_runs_again_after_stop_and_start(self) -> None:
        """A stopped bus started again runs the monitor again, in a new task."""
        async with Bus() as bus:
            calls = Calls(bus, wanted=1)
            Monitor(bus, calls.record, 0.01).subscribe()
            await bus.start()
            await calls.wait()
            await bus.stop()
            first_task = calls.tasks[-1]
            await bus.start()
            await calls.wait(len(calls.states) + 1)
            assert calls.tasks[-1] is not first_task

    async def test_statistics_count_runs_and_failures(self) -> None:
        """statistics() counts the calls that ended and those that raised."""
        async with Bus() as bus:
            bus.unsubscribe("log", bus.listeners["log"][0])
            calls = Calls(bus, wanted=3, error=RuntimeError("boom"))
            monitor = Monitor(bus, calls.record, 0.01)
            monitor.subscribe()
            await bus.start()
            await calls.wait()
            await bus.stop()
            stats = monitor.statistics()
        assert stats.runs == stats.failures == len(calls.states) >= 3
        assert not stats.running

    async def test_an_overrunning_call_skips_schedule_points_instead_of_bursting(self) -> None:
        """A call four periods long makes the monitor drop the points it overran."""
        async with Bus() as bus:
            calls = Calls(bus, wanted=2)

            async def slow_then_fast() -> None:
                if not calls.states:
                    await anyio.sleep(0.22)
                calls.record()

            monitor = Monitor(bus, slow_then_fast, 0.05)
            monitor.subscribe()
            await bus.start()
            await calls.wait()
            assert monitor.statistics().skipped >= 3


class TestStopping:
    async def test_stop_does_not_wait_out_a_long_period(self) -> None:
        """With an hourly monitor, stop returns at once instead of after the hour."""
        async with Bus(stop_timeout=WAIT) as bus:  # a stop is shielded: only its own deadline bounds it
            monitor = Monitor(bus, lambda: None, 3600)
            monitor.subscribe()
            await bus.start()
            assert monitor.statistics().running
            await bus.stop()
            assert bus.exit_code == 0  # 70 had the stop been cut off at its deadline
            assert not monitor.statistics().running

    async def test_stop_cancels_an_async_call_in_progress(self) -> None:
        """An async callback still running at stop is cancelled, and stop returns once it has ended."""
        entered = anyio.Event()
        ended: list[str] = []

        async def stuck() -> None:
            entered.set()
            try:
                await anyio.sleep_forever()
            finally:
                ended.append("cancelled")

        async with Bus(stop_timeout=WAIT) as bus:
            Monitor(bus, stuck, 0.01).subscribe()
            await bus.start()
            with anyio.fail_after(WAIT):
                await entered.wait()
            await bus.stop()
            assert bus.exit_code == 0
            assert ended == ["cancelled"]

    async def test_callback_may_exit_the_bus(self) -> None:
        """A callback that exits the bus does not deadlock waiting for its own monitor."""
        async with Bus() as bus:
            Monitor(bus, bus.exit, 0.01).subscribe()
            await bus.start()
            with anyio.fail_after(WAIT):
                await bus.block()
        assert bus.state is State.EXITING
        assert bus.exit_code == 0

    async def test_unsubscribe_stops_the_monitor(self) -> None:
        """After unsubscribe the monitor's task is cancelled and it is not started again."""
        async with Bus() as bus:
            calls = Calls(bus, wanted=1)
            monitor = Monitor(bus, calls.record, 0.01)
            monitor.subscribe()
            await bus.start()
            await calls.wait()
            monitor.unsubscribe()
            assert not monitor.statistics().running
            await bus.stop()
            await bus.start()
            assert not monitor.statistics().running


class TestGraceful:
    async def test_graceful_restarts_a_running_monitor(self) -> None:
        """After graceful the calls come from a new task, and none from the old one."""
        async with Bus() as bus:
            calls = Calls(bus, wanted=2)
            Monitor(bus, calls.record, 0.01).subscribe()
            await bus.start()
            await calls.wait()
            old_task = calls.tasks[-1]
            await bus.graceful()
            before = len(calls.tasks)
            await calls.wait(before + 2)
        assert all(task is not old_task for task in calls.tasks[before:])

    async def test_graceful_leaves_a_stopped_monitor_stopped(self) -> None:
        """graceful on a stopped bus does not start the monitor."""
        async with Bus() as bus:
            monitor = Monitor(bus, lambda: None, 0.01)
            monitor.subscribe()
            await bus.graceful()
            assert not monitor.statistics().running
            await bus.start()
            await bus.stop()
            await bus.graceful()
            assert not monitor.statistics().running


class TestFailures:
    @pytest.mark.parametrize("kind", ["sync", "async"])
    async def test_failing_callback_is_logged_and_the_monitor_goes_on(self, kind: str) -> None:
        """Each failure is logged at ERROR with its traceback and the monitor's name, and calls go on."""
        recorder = LogRecorder()
        async with Bus() as bus:
            bus.unsubscribe("log", bus.listeners["log"][0])
            bus.subscribe("log", recorder)
            calls = Calls(bus, wanted=3, error=ValueError("disk full"))
            callback: Callable[[], Any] = calls.record if kind == "sync" else calls.arecord
            Monitor(bus, callback, 0.01, name="disk").subscribe()
            await bus.start()
            await calls.wait()
            await bus.stop()
            assert bus.exit_code == 0
        failures = recorder.matching("Monitor disk failed")
        assert len(failures) == len(calls.states) >= 3
        assert all(record.level == 40 for record in failures)
        assert all(record.fields["monitor"] == "disk" for record in failures)
        assert "ValueError: disk full" in failures[0].fields["traceback"]


SERVICE = textwrap.dedent(
    """
    import signal, sys
    from pathlib import Path

    import anyio

    from aiobus import Bus, configure_logging
    from aiobus.plugins import Monitor


    async def main() -> int:
        configure_logging(format="json")
        out = Path(sys.argv[1])
        frequency = float(sys.argv[2])
        with anyio.open_signal_receiver(signal.SIGTERM) as signals:
            async with Bus() as bus:

                runs = 0

                def write_line() -> None:
                    nonlocal runs
                    runs += 1
                    with out.open("a") as file:
                        file.write("run\\n")
                    bus.log(f"monitor run {runs}")

                async def exit_on_sigterm() -> None:
                    async for _ in signals:
                        await bus.exit()

                bus.start_soon(exit_on_sigterm)
                Monitor(bus, write_line, frequency).subscribe()
                await bus.start()
                await bus.block()
        return bus.exit_code


    raise SystemExit(anyio.run(main))
    """
)


@pytest.mark.skipif(sys.platform == "win32", reason="sends SIGTERM")
class TestInAService:
    def test_monitor_runs_in_a_service_until_sigterm(self, spawn: Spawner, tmp_path: Path) -> None:
        """A service's monitor writes a line per run; SIGTERM stops it cleanly, with no run after STOPPED."""
        out = tmp_path / "runs.txt"
        child = spawn.script(SERVICE, str(out), "0.05")
        child.wait_for("Bus STARTED")
        child.wait_for("monitor run 3")
        child.send(signal.SIGTERM)
        assert child.wait() == 0
        child.assert_nothing_left()
        events = [event["event"] for event in child.events()]
        runs = [event for event in events if event.startswith("monitor run ")]
        assert runs == [f"monitor run {n}" for n in range(1, len(runs) + 1)]
        assert out.read_text().splitlines() == ["run"] * len(runs)
        assert not any(event.startswith("monitor run ") for event in events[events.index("Bus STOPPED") :])

    def test_sigterm_does_not_wait_for_an_hourly_monitor(self, spawn: Spawner, tmp_path: Path) -> None:
        """A service with a monitor due in an hour ends at once on SIGTERM, with exit code 0."""
        child = spawn.script(SERVICE, str(tmp_path / "runs.txt"), "3600")
        child.wait_for("Bus STARTED")
        child.send(signal.SIGTERM)
        assert child.wait(timeout=30) == 0
        child.assert_nothing_left()
        assert not (tmp_path / "runs.txt").exists()
