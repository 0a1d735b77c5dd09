"""The ``state`` channel: each state change, told synchronously to sync listeners as ``listener(old, new)``."""

from __future__ import annotations

import logging

import pytest
from helpers import LogRecorder

from aiobus import Bus, SimplePlugin, State

LIFECYCLE = [
    (State.STOPPED, State.STARTING),
    (State.STARTING, State.STARTED),
    (State.STARTED, State.STOPPING),
    (State.STOPPING, State.STOPPED),
    (State.STOPPED, State.EXITING),
]


class TestStateChannel:
    async def test_each_change_is_told_as_old_and_new(self) -> None:
        """A start, then leaving the block, tells every change once, as (old, new) State values."""
        changes: list[tuple[State, State]] = []
        async with Bus() as bus:
            bus.subscribe("state", lambda old, new: changes.append((old, new)))
            await bus.start()
        assert changes == LIFECYCLE

    async def test_listener_runs_at_the_change_before_anything_else(self) -> None:
        """A listener sees bus.state already changed, before any listener of the transition's channel runs."""
        seen: list[tuple[str, State]] = []
        async with Bus() as bus:
            bus.subscribe("state", lambda old, new: seen.append(("state", bus.state)))
            bus.subscribe("start", lambda: seen.append(("start", bus.state)))
            await bus.start()
        assert seen[:3] == [("state", State.STARTING), ("start", State.STARTING), ("state", State.STARTED)]

    async def test_state_is_told_after_its_log_line(self, log_recorder: LogRecorder) -> None:
        """The change is logged first, then told on ``state``: a listener's own log lines follow it."""
        async with Bus() as bus:
            bus.subscribe("log", log_recorder)
            bus.subscribe("state", lambda old, new: bus.log(f"saw {new.name}"))
            await bus.start()
        messages = log_recorder.messages
        assert messages.index("Bus STARTED") + 1 == messages.index("saw STARTED")

    def test_async_listener_is_refused_at_subscribe(self) -> None:
        """An async callback cannot subscribe to ``state``: TypeError naming the channel."""

        async def listener(old: State, new: State) -> None:
            pass

        with pytest.raises(TypeError, match="state channel"):
            Bus().subscribe("state", listener)

    async def test_failing_listener_is_logged_and_the_transition_goes_on(self, log_recorder: LogRecorder) -> None:
        """A listener that raises is logged with its traceback and counted; the bus and the others go on."""
        changes: list[State] = []

        def broken(old: State, new: State) -> None:
            raise RuntimeError("listener bug")

        async with Bus() as bus:
            bus.subscribe("log", log_recorder)
            bus.subscribe("state", broken)
            bus.subscribe("state", lambda old, new: changes.append(new))
            await bus.start()
            assert bus.state is State.STARTED
        assert changes == [new for _, new in LIFECYCLE]
        failures = log_recorder.matching("of channel 'state' failed")
        assert len(failures) == len(LIFECYCLE)
        assert failures[0].level == logging.ERROR
        assert "RuntimeError: listener bug" in failures[0].fields["traceback"]
        assert bus.statistics().failures["state"] == len(LIFECYCLE)
        assert bus.exit_code == 0

    async def test_listener_returning_a_coroutine_is_a_logged_failure(self, log_recorder: LogRecorder) -> None:
        """A sync listener returning a coroutine is a failure (logged); the coroutine is closed, not left unawaited."""

        async def later() -> None:
            pass

        async with Bus() as bus:
            bus.subscribe("log", log_recorder)
            bus.subscribe("state", lambda old, new: later())
            await bus.start()
            assert bus.state is State.STARTED
        [first, *_] = log_recorder.matching("of channel 'state' failed")
        assert "must be sync" in first.fields["traceback"]

    async def test_forced_exit_is_told(self) -> None:
        """force_exit() tells the change to EXITING like any other."""
        changes: list[tuple[State, State]] = []
        async with Bus() as bus:
            await bus.start()
            bus.subscribe("state", lambda old, new: changes.append((old, new)))
            bus.force_exit(130)
        assert changes == [(State.STARTED, State.EXITING)]

    async def test_each_change_is_counted_in_the_statistics(self) -> None:
        """statistics() counts one ``state`` publish per change."""
        async with Bus() as bus:
            await bus.start()
            assert bus.statistics().publishes["state"] == 2

    async def test_simple_plugin_method_named_state_is_subscribed(self) -> None:
        """A SimplePlugin's ``state`` method listens on the built-in ``state`` channel."""

        class Follower(SimplePlugin):
            def __init__(self, bus: Bus) -> None:
                super().__init__(bus)
                self.seen: list[State] = []

            def state(self, old: State, new: State) -> None:
                self.seen.append(new)

        async with Bus() as bus:
            follower = Follower(bus)
            follower.subscribe()
            await bus.start()
        assert follower.seen == [new for _, new in LIFECYCLE]
