"""Subscribing and publishing: order, priorities, results, failures and snapshots."""

from __future__ import annotations

import functools
import logging
import math
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from helpers import LogRecorder

from aiobus import Bus, ChannelFailures, priority


class TestSubscribe:
    def test_builtin_channels_exist_from_the_start(self) -> None:
        """The seven built-in channels exist before anything subscribes."""
        bus = Bus()
        assert set(bus.listeners) == {"start", "stop", "graceful", "exit", "main", "log", "state"}

    def test_channels_lists_the_builtin_ones_then_the_subscribed_ones(self) -> None:
        """bus.channels names the seven built-in channels, then each channel created by a subscription."""
        bus = Bus()
        builtin = ["start", "stop", "graceful", "exit", "main", "log", "state"]
        assert list(bus.channels) == builtin
        bus.subscribe("orders", print)
        assert list(bus.channels) == [*builtin, "orders"]

    def test_other_channels_are_created_by_their_first_subscription(self) -> None:
        """A new channel name appears once something subscribes to it."""
        bus = Bus()
        assert "orders" not in bus.listeners
        bus.subscribe("orders", print)
        assert bus.listeners["orders"] == (print,)

    async def test_lower_priority_runs_first(self) -> None:
        """Listeners run in ascending priority."""
        bus = Bus()
        bus.subscribe("x", lambda: "late", priority=80)
        bus.subscribe("x", lambda: "early", priority=10)
        bus.subscribe("x", lambda: "middle")
        assert await bus.publish("x") == ["early", "middle", "late"]

    async def test_equal_priorities_run_in_subscription_order(self) -> None:
        """Listeners of equal priority run in the order they subscribed."""
        bus = Bus()
        for index in range(20):
            bus.subscribe("x", functools.partial(lambda i: i, index), priority=50)
        assert await bus.publish("x") == list(range(20))

    async def test_priority_given_by_the_decorator_is_used_without_an_argument(self) -> None:
        """The priority ``@priority(n)`` gave a callback is its priority when none is passed."""
        bus = Bus()

        @priority(5)
        def first() -> str:
            return "first"

        bus.subscribe("x", lambda: "default")
        bus.subscribe("x", first)
        assert await bus.publish("x") == ["first", "default"]

    def test_the_priority_decorator_returns_the_callback_itself(self) -> None:
        """``@priority(n)`` hands back the very callback it decorates, with its priority attribute set."""

        def callback() -> None:
            pass

        assert priority(7.5)(callback) is callback
        assert vars(callback)["priority"] == 7.5

    @pytest.mark.parametrize(("value", "error"), [(True, TypeError), ("5", TypeError), (math.nan, ValueError)])
    def test_the_priority_decorator_refuses_what_cannot_be_ordered(self, value: object, error: type) -> None:
        """A bool, a str or NaN is refused when the decorator is made, not later at subscribe."""
        with pytest.raises(error, match="priority must be a number"):
            priority(value)  # type: ignore[arg-type]

    async def test_priority_argument_beats_the_attribute(self) -> None:
        """An explicit priority wins over the callback's attribute."""
        bus = Bus()

        @priority(5)
        def late() -> str:
            return "late"

        bus.subscribe("x", late, priority=90)
        bus.subscribe("x", lambda: "default")
        assert await bus.publish("x") == ["default", "late"]

    async def test_subscribing_twice_keeps_one_entry_with_the_new_priority(self) -> None:
        """A second subscription of the same callback replaces the first one's priority."""
        bus = Bus()

        def twice() -> str:
            return "twice"

        bus.subscribe("x", twice, priority=10)
        bus.subscribe("x", lambda: "other", priority=50)
        bus.subscribe("x", twice, priority=90)
        assert await bus.publish("x") == ["other", "twice"]
        assert bus.listeners["x"].count(twice) == 1

    async def test_decorator_form_subscribes_and_returns_the_function(self) -> None:
        """Without a callback, subscribe returns a decorator that leaves the name usable."""
        bus = Bus()

        @bus.subscribe("x", priority=1)
        async def handler(value: int) -> int:
            return value * 2

        assert await handler(2) == 4
        assert await bus.publish("x", 21) == [42]

    def test_subscribe_returns_the_callback(self) -> None:
        """subscribe(channel, callback) returns the callback itself."""
        bus = Bus()
        assert bus.subscribe("x", print) is print

    def test_non_callable_is_a_type_error_at_subscribe(self) -> None:
        """A listener that cannot be called is refused when subscribing."""
        bus = Bus()
        with pytest.raises(TypeError, match="callable"):
            bus.subscribe("x", 42)  # type: ignore[call-overload]

    def test_non_numeric_priority_is_a_type_error(self) -> None:
        """A priority must be a number."""
        bus = Bus()
        with pytest.raises(TypeError, match="priority"):
            bus.subscribe("x", print, priority="high")  # type: ignore[call-overload]

    async def test_unsubscribe_removes_the_listener(self) -> None:
        """After unsubscribe a listener is not called any more."""
        bus = Bus()
        bus.subscribe("x", lambda: "kept")

        def gone() -> str:
            return "gone"

        bus.subscribe("x", gone)
        bus.unsubscribe("x", gone)
        assert await bus.publish("x") == ["kept"]

    def test_unsubscribe_of_absent_channel_or_callback_is_a_no_op(self) -> None:
        """Unsubscribing what is not there does nothing."""
        bus = Bus()
        bus.unsubscribe("nowhere", print)
        bus.unsubscribe("main", print)
        assert bus.listeners["main"] == ()

    async def test_async_callable_object_is_awaited(self) -> None:
        """An object whose ``__call__`` is async is awaited like an async function."""

        class Handler:
            async def __call__(self) -> str:
                await anyio.lowlevel.checkpoint()
                return "awaited"

        bus = Bus()
        bus.subscribe("x", Handler())
        bus.subscribe("x", functools.partial(Handler()))
        assert await bus.publish("x") == ["awaited", "awaited"]


class TestPublish:
    async def test_unknown_channel_returns_an_empty_list(self) -> None:
        """Publishing on a channel nobody created returns []."""
        assert await Bus().publish("nobody") == []

    async def test_arguments_reach_every_listener(self) -> None:
        """Positional and keyword arguments are passed to each listener."""
        bus = Bus()
        bus.subscribe("x", lambda a, b=0: a + b)

        async def coro(a: int, b: int = 0) -> int:
            return a * b

        bus.subscribe("x", coro)
        assert await bus.publish("x", 3, b=4) == [7, 12]

    async def test_async_listeners_run_one_after_another_in_the_publishing_task(self) -> None:
        """Async listeners are awaited in turn, in the caller's task, never overlapping."""
        bus = Bus()
        events: list[str] = []
        caller = anyio.get_current_task().id

        def make(name: str) -> Any:
            async def listener() -> None:
                assert anyio.get_current_task().id == caller
                events.append(f"{name} in")
                await anyio.sleep(0.01)
                events.append(f"{name} out")

            return listener

        for name in "abc":
            bus.subscribe("x", make(name))
        await bus.publish("x")
        assert events == ["a in", "a out", "b in", "b out", "c in", "c out"]

    async def test_failing_listener_does_not_stop_the_others(self, log_recorder: LogRecorder) -> None:
        """All listeners run; the failures come together in ChannelFailures afterwards."""
        bus = Bus()
        bus.subscribe("log", log_recorder)
        ran: list[str] = []
        first, second = ValueError("one"), RuntimeError("two")

        def fail_one() -> None:
            raise first

        async def fail_two() -> None:
            raise second

        bus.subscribe("x", fail_one, priority=1)
        bus.subscribe("x", lambda: ran.append("middle"), priority=2)
        bus.subscribe("x", fail_two, priority=3)
        bus.subscribe("x", lambda: ran.append("last"), priority=4)
        with pytest.raises(ChannelFailures) as caught:
            await bus.publish("x")
        assert ran == ["middle", "last"]
        assert caught.value.channel == "x"
        assert list(caught.value.exceptions) == [first, second]

    async def test_each_failure_is_logged_with_its_traceback(self, log_recorder: LogRecorder) -> None:
        """A failing listener is logged at ERROR with the traceback of its exception."""
        bus = Bus()
        bus.subscribe("log", log_recorder)

        def broken() -> None:
            raise ValueError("boom")

        bus.subscribe("x", broken)
        with pytest.raises(ChannelFailures):
            await bus.publish("x")
        [record] = log_recorder.matching("broken")
        assert record.level == logging.ERROR
        assert "ValueError: boom" in record.fields["traceback"]
        assert record.fields["channel"] == "x"

    @pytest.mark.parametrize("error", [KeyboardInterrupt, SystemExit])
    async def test_keyboard_interrupt_and_system_exit_propagate_at_once(self, error: type[BaseException]) -> None:
        """KeyboardInterrupt and SystemExit stop the publish: later listeners do not run."""
        bus = Bus()
        ran: list[str] = []

        def interrupt() -> None:
            raise error

        bus.subscribe("x", interrupt, priority=1)
        bus.subscribe("x", lambda: ran.append("later"), priority=2)
        with pytest.raises(error):
            await bus.publish("x")
        assert ran == []

    async def test_cancellation_propagates_at_once(self, log_recorder: LogRecorder) -> None:
        """A cancelled publish stops at the listener it was in; later listeners do not run."""
        bus = Bus()
        bus.subscribe("log", log_recorder)
        ran: list[str] = []

        async def slow() -> None:
            await anyio.sleep(30)

        bus.subscribe("x", slow, priority=1)
        bus.subscribe("x", lambda: ran.append("later"), priority=2)
        with anyio.move_on_after(0.05) as scope:
            await bus.publish("x")
        assert scope.cancelled_caught
        assert ran == []
        assert log_recorder.matching("slow")[0].level == logging.WARNING

    async def test_subscribing_during_a_publish_affects_only_the_next_one(self) -> None:
        """A publish works on the listeners it started with."""
        bus = Bus()

        def added() -> str:
            return "added"

        def adder() -> str:
            bus.subscribe("x", added)
            bus.unsubscribe("x", remover)
            return "adder"

        def remover() -> str:
            return "remover"

        bus.subscribe("x", adder, priority=1)
        bus.subscribe("x", remover, priority=2)
        assert await bus.publish("x") == ["adder", "remover"]
        assert await bus.publish("x") == ["adder", "added"]

    async def test_statistics_count_publishes_and_failures(self) -> None:
        """statistics() counts publishes and failed listeners per channel."""
        bus = Bus()

        def broken() -> None:
            raise ValueError

        bus.subscribe("x", broken)
        bus.subscribe("x", broken, priority=1)
        bus.subscribe("y", lambda: None)
        for _ in range(3):
            await bus.publish("y")
        with pytest.raises(ChannelFailures):
            await bus.publish("x")
        stats = bus.statistics()
        assert stats.publishes["y"] == 3
        assert stats.publishes["x"] == 1
        assert stats.failures["x"] == 1
        assert "y" not in stats.failures


class TestNamesInLogs:
    async def test_failures_of_partials_and_callable_objects_are_named(self, log_recorder: LogRecorder) -> None:
        """A failing partial or callable object is named readably in the log."""

        def broken(x: int) -> None:
            raise ValueError(x)

        class Broken:
            def __call__(self) -> None:
                raise ValueError("object")

        bus = Bus()
        bus.subscribe("log", log_recorder)
        bus.subscribe("x", functools.partial(broken, 1))
        bus.subscribe("x", Broken())
        with pytest.raises(ChannelFailures):
            await bus.publish("x")
        names = [record.fields["listener"] for record in log_recorder.records if "listener" in record.fields]
        assert names == [
            "partial(TestNamesInLogs.test_failures_of_partials_and_callable_objects_are_named.<locals>.broken)",
            "TestNamesInLogs.test_failures_of_partials_and_callable_objects_are_named.<locals>.Broken",
        ]

    def test_channel_must_be_a_string(self) -> None:
        """A channel named by something else than a str is a TypeError."""
        with pytest.raises(TypeError, match="channel"):
            Bus().subscribe(42, print)  # type: ignore[call-overload]

    def test_log_listener_returning_an_awaitable_is_reported(self, capsys: pytest.CaptureFixture[str]) -> None:
        """A sync log listener that returns a coroutine is reported on stderr; nothing is left unawaited."""

        async def later() -> None:
            pass

        bus = Bus()
        bus.subscribe("log", lambda msg, level, **fields: later())
        bus.log("hello")
        assert "must be sync" in capsys.readouterr().err


def test_state_repr_names_the_state() -> None:
    """A State shows as State.NAME."""
    from aiobus import State

    assert repr(State.STARTED) == "State.STARTED"
