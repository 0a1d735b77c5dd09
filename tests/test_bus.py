"""The bus's lifecycle: states, transitions, shutdown, waiting and the tasks it owns."""

from __future__ import annotations

import asyncio
import logging
import math
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from helpers import LogRecorder, wait_for_ticks

from aiobus import Bus, ChannelFailures, State, StateError


class TestConstruction:
    @pytest.mark.parametrize("interval", [0, -1, math.inf, math.nan, "1"])
    def test_bad_main_interval_is_a_value_error(self, interval: object) -> None:
        """main_interval must be a positive, finite number of seconds."""
        with pytest.raises(ValueError, match="main_interval"):
            Bus(main_interval=interval)  # type: ignore[arg-type]

    @pytest.mark.parametrize("timeout", [-1, math.nan, "1"])
    def test_bad_stop_timeout_is_a_value_error(self, timeout: object) -> None:
        """stop_timeout must be None or a number of seconds >= 0."""
        with pytest.raises(ValueError, match="stop_timeout"):
            Bus(stop_timeout=timeout)  # type: ignore[arg-type]

    def test_a_new_bus_is_stopped_with_exit_code_zero(self) -> None:
        """A new bus is STOPPED and would exit with 0."""
        bus = Bus()
        assert bus.state is State.STOPPED
        assert bus.exit_code == 0

    async def test_start_outside_async_with_is_a_clear_error(self) -> None:
        """start() needs the task group that ``async with`` opens."""
        with pytest.raises(RuntimeError, match="async with"):
            await Bus().start()

    async def test_a_bus_is_entered_only_once(self) -> None:
        """Entering a bus a second time is refused."""
        bus = Bus()
        async with bus:
            pass
        with pytest.raises(RuntimeError, match="once"):
            async with bus:
                pass


class TestLifecycle:
    async def test_start_publishes_start_then_is_started(self) -> None:
        """start() goes STARTING, publishes start, then STARTED."""
        seen: list[State] = []
        async with Bus() as bus:
            bus.subscribe("start", lambda: seen.append(bus.state))
            await bus.start()
            assert seen == [State.STARTING]
            assert bus.state is State.STARTED

    async def test_stop_publishes_stop_then_is_stopped(self) -> None:
        """stop() goes STOPPING, publishes stop, then STOPPED."""
        seen: list[State] = []
        async with Bus() as bus:
            bus.subscribe("stop", lambda: seen.append(bus.state))
            await bus.start()
            await bus.stop()
            assert seen == [State.STOPPING]
            assert bus.state is State.STOPPED

    async def test_stop_on_a_stopped_bus_is_a_no_op(self) -> None:
        """Stopping a stopped bus publishes nothing."""
        calls: list[str] = []
        async with Bus() as bus:
            bus.subscribe("stop", lambda: calls.append("stop"))
            await bus.stop()
            assert calls == []
            assert bus.state is State.STOPPED

    async def test_a_stopped_bus_starts_again(self) -> None:
        """start, stop, start: the bus is STARTED again and the ticker runs again."""
        async with Bus(main_interval=0.01) as bus:
            await bus.start()
            await bus.stop()
            await bus.start()
            await wait_for_ticks(bus, bus.statistics().ticks + 1)
            assert bus.state is State.STARTED

    async def test_graceful_publishes_graceful_and_keeps_the_state(self) -> None:
        """graceful() publishes graceful; the state does not change."""
        calls: list[State] = []
        async with Bus() as bus:
            bus.subscribe("graceful", lambda: calls.append(bus.state))
            await bus.start()
            await bus.graceful()
            assert calls == [State.STARTED]
            assert bus.state is State.STARTED

    async def test_graceful_failure_is_raised(self) -> None:
        """A failing graceful listener reaches the caller as ChannelFailures."""

        def broken() -> None:
            raise ValueError("reload failed")

        async with Bus() as bus:
            bus.subscribe("graceful", broken)
            with pytest.raises(ChannelFailures):
                await bus.graceful()

    async def test_exit_stops_then_publishes_exit(self) -> None:
        """exit() on a started bus publishes stop, then exit, and ends EXITING."""
        calls: list[tuple[str, State]] = []
        async with Bus() as bus:
            bus.subscribe("stop", lambda: calls.append(("stop", bus.state)))
            bus.subscribe("exit", lambda: calls.append(("exit", bus.state)))
            await bus.start()
            await bus.exit()
            assert calls == [("stop", State.STOPPING), ("exit", State.EXITING)]
            assert bus.state is State.EXITING
            assert bus.exit_code == 0

    async def test_exit_twice_publishes_once(self) -> None:
        """A second exit() does nothing again."""
        calls: list[str] = []
        async with Bus() as bus:
            bus.subscribe("exit", lambda: calls.append("exit"))
            bus.subscribe("stop", lambda: calls.append("stop"))
            await bus.start()
            await bus.exit()
            await bus.exit()
        assert calls == ["stop", "exit"]

    async def test_concurrent_exit_waits_for_the_first(self) -> None:
        """A concurrent exit() returns only once the first has finished, and publishes nothing."""
        calls: list[str] = []
        released = anyio.Event()
        finished: list[State] = []

        async def slow_exit() -> None:
            calls.append("exit")
            await released.wait()

        async def second_exit(bus: Bus) -> None:
            await bus.exit()
            finished.append(bus.state)

        async with Bus() as bus:
            bus.subscribe("exit", slow_exit)
            await bus.start()
            async with anyio.create_task_group() as tg:
                tg.start_soon(bus.exit)
                await bus.wait(State.EXITING, timeout=5)
                tg.start_soon(second_exit, bus)
                await anyio.sleep(0.05)
                assert finished == []
                released.set()
            assert finished == [State.EXITING]
        assert calls == ["exit"]

    async def test_leaving_the_block_runs_exit(self) -> None:
        """Leaving ``async with`` exits the bus if nothing did."""
        calls: list[str] = []
        async with Bus() as bus:
            bus.subscribe("stop", lambda: calls.append("stop"))
            bus.subscribe("exit", lambda: calls.append("exit"))
            await bus.start()
        assert calls == ["stop", "exit"]
        assert bus.state is State.EXITING

    async def test_leaving_on_an_error_still_exits(self) -> None:
        """An error in the body still runs exit, and then propagates."""
        calls: list[str] = []
        with pytest.raises(LookupError):
            async with Bus() as bus:
                bus.subscribe("exit", lambda: calls.append("exit"))
                await bus.start()
                raise LookupError("body failed")
        assert calls == ["exit"]

    async def test_leaving_when_cancelled_still_exits(self) -> None:
        """Cancelling the body does not skip the exit listeners."""
        calls: list[str] = []

        async def careful_exit() -> None:
            await anyio.sleep(0.01)
            calls.append("exit")

        with anyio.move_on_after(0.05):
            async with Bus() as bus:
                bus.subscribe("exit", careful_exit)
                await bus.start()
                await anyio.sleep(30)
        assert calls == ["exit"]

    async def test_leaving_leaves_no_task_running(self, no_task_leak: None) -> None:
        """No task of the bus or its plugins outlives the ``async with`` block."""

        async def forever() -> None:
            await anyio.sleep_forever()

        async with Bus(main_interval=0.01) as bus:
            bus.start_soon(forever)
            bus.start_soon(forever)
            await bus.start()
            await anyio.sleep(0.03)
            assert len(asyncio.all_tasks()) >= 4  # this test, two plugin tasks, the ticker

    async def test_start_on_an_exiting_bus_names_the_state(self) -> None:
        """A transition the state does not allow raises an error naming the state."""
        async with Bus() as bus:
            await bus.exit()
            with pytest.raises(StateError, match="EXITING") as caught:
                await bus.start()
            assert caught.value.state is State.EXITING
            with pytest.raises(StateError, match="EXITING"):
                await bus.graceful()

    async def test_start_on_a_started_bus_does_nothing(self) -> None:
        """A second start() publishes nothing."""
        calls: list[str] = []
        async with Bus() as bus:
            bus.subscribe("start", lambda: calls.append("start"))
            await bus.start()
            await bus.start()
        assert calls == ["start"]

    async def test_every_state_change_is_logged_as_a_structured_event(self, log_recorder: LogRecorder) -> None:
        """Each state change is logged with the new and previous state as fields."""
        async with Bus() as bus:
            bus.subscribe("log", log_recorder)
            await bus.start()
        changes = [(r.fields["previous"], r.fields["state"]) for r in log_recorder.records if "state" in r.fields]
        assert changes == [
            ("STOPPED", "STARTING"),
            ("STARTING", "STARTED"),
            ("STARTED", "STOPPING"),
            ("STOPPING", "STOPPED"),
            ("STOPPED", "EXITING"),
        ]


class TestFailures:
    async def test_failing_start_listener_stops_and_exits_then_raises(self, log_recorder: LogRecorder) -> None:
        """A start failure is logged, stop and exit run, the bus ends EXITING and the caller gets the failure."""
        calls: list[str] = []
        error = OSError("port in use")

        def bind() -> None:
            raise error

        async with Bus() as bus:
            bus.subscribe("log", log_recorder)
            bus.subscribe("start", bind)
            bus.subscribe("start", lambda: calls.append("start later"), priority=60)
            bus.subscribe("stop", lambda: calls.append("stop"))
            bus.subscribe("exit", lambda: calls.append("exit"))
            with pytest.raises(ChannelFailures) as caught:
                await bus.start()
            assert list(caught.value.exceptions) == [error]
            assert bus.state is State.EXITING
            assert bus.exit_code == 70
        assert calls == ["start later", "stop", "exit"]
        assert log_recorder.matching("Start failed")

    async def test_failing_stop_and_exit_listeners_set_exit_code_70(self, log_recorder: LogRecorder) -> None:
        """exit() never raises a listener's error: it logs it, sets exit_code 70 and reaches EXITING."""
        calls: list[str] = []

        def broken() -> None:
            raise RuntimeError("cleanup failed")

        async with Bus() as bus:
            bus.subscribe("log", log_recorder)
            bus.subscribe("stop", broken)
            bus.subscribe("exit", broken)
            bus.subscribe("exit", lambda: calls.append("exit"), priority=90)
            await bus.start()
            await bus.exit()
            assert bus.state is State.EXITING
            assert bus.exit_code == 70
        assert calls == ["exit"]
        assert len(log_recorder.matching("broken")) == 2

    async def test_stop_failure_is_logged_not_raised(self) -> None:
        """A failing stop listener leaves the bus STOPPED with exit_code 70."""

        def broken() -> None:
            raise RuntimeError("cleanup failed")

        async with Bus() as bus:
            bus.subscribe("stop", broken)
            await bus.start()
            await bus.stop()
            assert bus.state is State.STOPPED
            assert bus.exit_code == 70

    async def test_stop_timeout_cuts_off_a_hung_stop_listener(self, log_recorder: LogRecorder) -> None:
        """With stop_timeout, a stop listener that hangs is cancelled and the exit listeners still run."""
        calls: list[str] = []

        async def hang() -> None:
            await anyio.sleep_forever()

        async with Bus(stop_timeout=0.1) as bus:
            bus.subscribe("log", log_recorder)
            bus.subscribe("stop", hang)
            bus.subscribe("exit", lambda: calls.append("exit"))
            await bus.start()
            with anyio.fail_after(10):
                await bus.exit()
            assert bus.exit_code == 70
        assert calls == ["exit"]
        assert log_recorder.matching("hang")  # the listener that was cut off is named
        assert log_recorder.matching("'stop' cut off")

    async def test_stop_and_exit_channels_each_get_their_own_deadline(self, log_recorder: LogRecorder) -> None:
        """A hung exit listener is cut off too, after a hung stop listener was."""

        async def hang() -> None:
            await anyio.sleep_forever()

        async with Bus(stop_timeout=0.1) as bus:
            bus.subscribe("log", log_recorder)
            bus.subscribe("stop", hang)
            bus.subscribe("exit", hang)
            await bus.start()
            with anyio.fail_after(10):
                await bus.exit()
            assert bus.state is State.EXITING
        assert log_recorder.matching("'stop' cut off")
        assert log_recorder.matching("'exit' cut off")

    async def test_failing_plugin_task_exits_the_bus_with_70(self, log_recorder: LogRecorder) -> None:
        """A task started with start_soon that raises is logged and makes the bus exit with 70."""

        async def crash() -> None:
            raise RuntimeError("plugin task crashed")

        async with Bus() as bus:
            bus.subscribe("log", log_recorder)
            await bus.start()
            bus.start_soon(crash)
            await bus.wait(State.EXITING, timeout=5)
            await bus.block()
        assert bus.exit_code == 70
        assert "plugin task crashed" in log_recorder.matching("crash")[0].fields["traceback"]

    async def test_force_exit_cuts_a_shutdown_short(self) -> None:
        """force_exit() cancels what remains of a shutdown and sets the exit code."""
        calls: list[str] = []

        async def hang() -> None:
            await anyio.sleep_forever()

        async with Bus() as bus:
            bus.subscribe("stop", hang)
            bus.subscribe("exit", lambda: calls.append("exit"))
            await bus.start()
            bus.start_soon(bus.exit)
            await bus.wait(State.STOPPING, timeout=5)
            bus.force_exit(130)
            await bus.wait(State.EXITING, timeout=5)
            await bus.block()
        assert bus.exit_code == 130
        assert calls == []


class TestListenersCallingTheBus:
    async def test_main_listener_may_exit_the_bus(self) -> None:
        """A main listener awaiting bus.exit() (as in CherryPy's broker) completes the exit."""
        async with Bus(main_interval=0.01) as bus:

            @bus.subscribe("main")
            async def quit_on_third_tick() -> None:
                if bus.statistics().ticks == 3:
                    await bus.exit()

            await bus.start()
            with anyio.fail_after(10):
                await bus.block()
            assert bus.state is State.EXITING
            assert bus.statistics().ticks == 3

    async def test_stop_listener_asking_for_exit_gets_it_after_the_stop(self) -> None:
        """A stop listener calling exit() has it queued: no deadlock, and the exit follows."""
        calls: list[str] = []
        async with Bus() as bus:

            @bus.subscribe("stop")
            async def stop_then_exit() -> None:
                calls.append("stop")
                await bus.exit()

            bus.subscribe("exit", lambda: calls.append("exit"))
            await bus.start()
            with anyio.fail_after(10):
                await bus.stop()
                await bus.block()
        assert calls == ["stop", "exit"]

    async def test_exit_listener_calling_exit_returns_at_once(self) -> None:
        """An exit listener calling exit() again does not wait for itself."""
        calls: list[str] = []
        async with Bus() as bus:

            @bus.subscribe("exit")
            async def again() -> None:
                await bus.exit()
                calls.append("returned")

            with anyio.fail_after(10):
                await bus.exit()
        assert calls == ["returned"]


class TestWaiting:
    async def test_wait_returns_at_once_when_already_there(self) -> None:
        """wait() for the current state returns it at once."""
        async with Bus() as bus:
            assert await bus.wait(State.STOPPED, State.STARTED, timeout=1) is State.STOPPED

    async def test_wait_wakes_on_the_state_change(self) -> None:
        """wait() returns once another task brings the bus to the state."""
        async with Bus() as bus:
            bus.start_soon(bus.start)
            assert await bus.wait(State.STARTED, timeout=5) is State.STARTED

    async def test_wait_times_out(self) -> None:
        """wait() raises TimeoutError when the state is not reached in time."""
        async with Bus() as bus:
            with pytest.raises(TimeoutError):
                await bus.wait(State.STARTED, timeout=0.05)

    async def test_wait_needs_a_state(self) -> None:
        """wait() with no state is a ValueError."""
        async with Bus() as bus:
            with pytest.raises(ValueError):
                await bus.wait()

    async def test_block_returns_once_exit_has_completed(self) -> None:
        """block() waits for exit to complete, including its listeners."""
        calls: list[str] = []

        async def slow_exit() -> None:
            await anyio.sleep(0.05)
            calls.append("exit")

        async with Bus() as bus:
            bus.subscribe("exit", slow_exit)
            await bus.start()
            bus.start_soon(bus.exit)
            with anyio.fail_after(10):
                await bus.block()
            assert calls == ["exit"]

    async def test_block_ends_the_bus_tasks(self) -> None:
        """After block() returns, the tasks the bus owned have ended."""
        ended: list[str] = []

        async def plugin_task() -> None:
            try:
                await anyio.sleep_forever()
            finally:
                ended.append("plugin")

        async with Bus() as bus:
            bus.start_soon(plugin_task)
            await bus.start()
            bus.start_soon(bus.exit)
            with anyio.fail_after(10):
                await bus.block()
            assert ended == ["plugin"]


class TestStatistics:
    async def test_statistics_is_a_frozen_snapshot(self) -> None:
        """statistics() returns a frozen dataclass with the state and the counters."""
        import dataclasses

        async with Bus() as bus:
            await bus.start()
            stats = bus.statistics()
            assert stats.state is State.STARTED
            assert stats.publishes["start"] == 1
            with pytest.raises(dataclasses.FrozenInstanceError):
                stats.ticks = 5  # type: ignore[misc]
            with pytest.raises(TypeError):
                stats.publishes["start"] = 2  # type: ignore[index]


def test_log_levels_are_standard_numbers() -> None:
    """bus.log defaults to INFO."""
    seen: list[int] = []
    bus = Bus()
    bus.subscribe("log", lambda msg, level, **fields: seen.append(level))
    bus.log("hello")
    assert seen == [logging.INFO]


class TestRaces:
    """Transitions that meet: each case once hung or published twice."""

    @pytest.mark.parametrize("call", ["exit", "stop", "graceful"])
    async def test_main_listener_calling_the_bus_while_another_task_exits(self, call: str) -> None:
        """A main tick that calls a transition while an exit waits for that tick does not deadlock."""
        in_tick = anyio.Event()
        calls: list[str] = []
        async with Bus(main_interval=0.01) as bus:

            @bus.subscribe("main")
            async def health_check() -> None:
                if not in_tick.is_set():
                    in_tick.set()
                    await anyio.sleep(0.05)  # the exit below starts meanwhile
                    await getattr(bus, call)()

            bus.subscribe("exit", lambda: calls.append("exit"))
            await bus.start()
            await in_tick.wait()
            with anyio.fail_after(10):
                await bus.exit()
                await bus.block()
        assert calls == ["exit"]

    async def test_slow_tick_at_the_stop_deadline_still_lets_stop_listeners_run(self) -> None:
        """With stop_timeout, a main tick that outlasts it is cut off and the stop listeners still run."""
        in_tick = anyio.Event()
        calls: list[str] = []
        async with Bus(main_interval=0.01, stop_timeout=0.1) as bus:

            @bus.subscribe("main")
            async def slow_tick() -> None:
                in_tick.set()
                await anyio.sleep(30)

            bus.subscribe("stop", lambda: calls.append("stop"))
            bus.subscribe("exit", lambda: calls.append("exit"))
            await bus.start()
            await in_tick.wait()
            with anyio.fail_after(10):
                await bus.exit()
            assert bus.exit_code == 70
        assert calls == ["stop", "exit"]

    async def test_start_listener_asking_to_exit_then_another_failing_exits_once(self) -> None:
        """A start listener that calls exit() and a failing one after it give a single exit."""
        calls: list[str] = []
        async with Bus() as bus:

            @bus.subscribe("start", priority=1)
            async def wants_out() -> None:
                await bus.exit()

            @bus.subscribe("start", priority=2)
            def broken() -> None:
                raise RuntimeError("boom")

            bus.subscribe("exit", lambda: calls.append("exit"))
            with pytest.raises(ChannelFailures):
                await bus.start()
            with anyio.fail_after(10):
                await bus.block()
        assert calls == ["exit"]

    async def test_exit_during_a_failing_start_exits_once(self) -> None:
        """An exit() from another task, waiting while a start fails, publishes exit once."""
        calls: list[str] = []
        entered = anyio.Event()

        async def failing_start() -> None:
            entered.set()
            with anyio.CancelScope(shield=True):  # the exit cannot cut this one short
                await anyio.sleep(0.05)
            raise RuntimeError("boom")

        async def start_quietly(bus: Bus) -> None:
            with pytest.raises(ChannelFailures):
                await bus.start()

        async with Bus() as bus:
            bus.subscribe("start", failing_start)
            bus.subscribe("exit", lambda: calls.append("exit"))
            async with anyio.create_task_group() as tg:
                tg.start_soon(start_quietly, bus)
                await entered.wait()
                tg.start_soon(bus.exit)
        assert calls == ["exit"]

    async def test_exit_cancels_a_hung_start(self) -> None:
        """exit() while a start listener hangs cancels it and shuts down: stop and exit listeners run."""
        calls: list[str] = []
        entered = anyio.Event()

        async def hung_start() -> None:
            entered.set()
            await anyio.sleep_forever()

        async with Bus() as bus:
            bus.subscribe("start", hung_start)
            bus.subscribe("stop", lambda: calls.append("stop"))
            bus.subscribe("exit", lambda: calls.append("exit"))
            bus.start_soon(bus.start)
            await entered.wait()
            with anyio.fail_after(10):
                await bus.exit()
            assert bus.state is State.EXITING
        assert calls == ["stop", "exit"]

    async def test_exit_cancels_a_hung_graceful(self, log_recorder: LogRecorder) -> None:
        """exit() while a graceful listener hangs cancels it and shuts down."""
        entered = anyio.Event()

        async def hung_reload() -> None:
            entered.set()
            await anyio.sleep_forever()

        async with Bus() as bus:
            bus.subscribe("log", log_recorder)
            bus.subscribe("graceful", hung_reload)
            await bus.start()
            bus.start_soon(bus.graceful)
            await entered.wait()
            with anyio.fail_after(10):
                await bus.exit()
            assert bus.state is State.EXITING
        assert log_recorder.matching("Graceful interrupted: the bus is exiting")

    async def test_a_cancelled_stop_still_completes(self) -> None:
        """stop() is shielded: cancelling its caller does not leave the bus STOPPING."""
        calls: list[str] = []

        async def slow_stop() -> None:
            await anyio.sleep(0.1)
            calls.append("stop")

        async with Bus() as bus:
            bus.subscribe("stop", slow_stop)
            await bus.start()
            with anyio.move_on_after(0.01):
                await bus.stop()
            assert bus.state is State.STOPPED
            assert calls == ["stop"]

    async def test_exit_listener_asking_to_start_is_not_a_failure(self, log_recorder: LogRecorder) -> None:
        """A queued start that the exit made impossible is dropped with a warning, exit code 0."""
        async with Bus() as bus:
            bus.subscribe("log", log_recorder)

            @bus.subscribe("exit")
            async def restart_it() -> None:
                await bus.start()

            await bus.start()
            await bus.exit()
            await bus.block()
        assert bus.exit_code == 0
        assert log_recorder.matching("Queued start dropped")

    async def test_force_exit_stops_the_main_ticker(self) -> None:
        """After force_exit on a started bus no main tick is published."""
        async with Bus(main_interval=0.01) as bus:
            await bus.start()
            await wait_for_ticks(bus, 2)
            bus.force_exit(130)
            ticks = bus.statistics().ticks
            await anyio.sleep(0.05)
            assert bus.statistics().ticks == ticks
            assert bus.state is State.EXITING

    async def test_wait_sees_a_state_that_passes_without_a_checkpoint(self) -> None:
        """wait(STARTING) returns even when the start listeners are all sync."""
        async with Bus() as bus:
            bus.subscribe("start", lambda: None)
            async with anyio.create_task_group() as tg:

                async def waiter() -> None:
                    assert await bus.wait(State.STARTING, timeout=5) is State.STARTING

                tg.start_soon(waiter)
                await anyio.lowlevel.checkpoint()
                await bus.start()

    async def test_sync_listener_returning_a_coroutine_is_awaited(self) -> None:
        """A sync wrapper that returns a coroutine has that coroutine awaited."""
        bus = Bus()

        async def body() -> int:
            return 1

        def wrapper() -> Any:
            return body()

        bus.subscribe("x", wrapper)
        assert await bus.publish("x") == [1]
