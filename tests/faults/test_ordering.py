"""Property tests of subscribe and publish ordering, against a model written here.

Random sequences of subscribe (random channel, priority given or taken from the callback's
``priority`` attribute or the default 50: equal, negative, float, infinite), re-subscribe,
unsubscribe and publish, with sync, async, async-callable and partial listeners, some of
which raise, and some of which subscribe or unsubscribe while the publish runs.

The model (README, "Channels and listeners", and ``Bus.subscribe``): lower priority first;
equal priorities in subscription order; subscribing a callback again keeps one entry, with
the new priority and the place of its first subscription among equals; an unsubscribed
callback subscribed again is a new subscription. A publish calls every listener in that
order, returns their results in that order, or raises ChannelFailures whose exceptions
come in that order once all have run; a change made during a publish shows from the next.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from helpers import LogRecorder
from hypothesis import given, settings
from hypothesis import strategies as st

from aiobus import Bus, ChannelFailures

pytestmark = pytest.mark.faults

CHANNELS = ("start", "a", "b")  # a built-in channel and two of the user's
CALLBACKS = 4
EXAMPLES = 400

priorities = st.one_of(
    st.sampled_from([0, 1, 50]),  # many equal priorities (50 is also the default's)
    st.integers(-2, 2),
    st.sampled_from([50, 50.0, 0.0, -0.0, 1.5, -1.5, math.inf, -math.inf]),
    st.floats(allow_nan=False),
)


@dataclass(frozen=True)
class Spec:
    """How a callback behaves: its kind, its own ``priority`` attribute, whether it raises."""

    kind: str  # "sync", "async", "async object", "partial"
    attribute: float | None
    fails: bool


@dataclass(frozen=True)
class Subscribe:
    channel: str
    callback: int
    priority: float | None  # None: the attribute, else 50


@dataclass(frozen=True)
class Unsubscribe:
    channel: str
    callback: int


@dataclass(frozen=True)
class SetAttribute:
    """Change a callback's ``priority`` attribute: it counts at its next subscription only."""

    callback: int
    priority: float | None


@dataclass(frozen=True)
class Publish:
    channel: str
    with_arguments: bool
    # Changes a listener makes while the publish runs: after the `at`-th call (if reached).
    during: tuple[Subscribe | Unsubscribe, ...] = ()
    at: int = 1


Operation = Subscribe | Unsubscribe | SetAttribute | Publish

specs = st.builds(
    Spec, st.sampled_from(["sync", "async", "async object", "partial"]), st.none() | priorities, st.booleans()
)
subscribes = st.builds(Subscribe, st.sampled_from(CHANNELS), st.integers(0, CALLBACKS - 1), st.none() | priorities)
unsubscribes = st.builds(Unsubscribe, st.sampled_from(CHANNELS), st.integers(0, CALLBACKS - 1))
changes = st.one_of(subscribes, unsubscribes)
operations = st.one_of(
    subscribes,
    subscribes,  # twice as likely: channels fill up
    unsubscribes,
    st.builds(SetAttribute, st.integers(0, CALLBACKS - 1), st.none() | priorities),
    st.builds(Publish, st.sampled_from(CHANNELS), st.booleans()),
    st.builds(
        Publish,
        st.sampled_from(CHANNELS),
        st.booleans(),
        st.lists(changes, min_size=1, max_size=3).map(tuple),
        st.integers(1, 4),
    ),
)


@dataclass
class Model:
    """Each channel's listeners as (priority, first subscription's number) per callback."""

    channels: dict[str, dict[int, tuple[float, int]]] = field(default_factory=dict)
    counter: itertools.count[int] = field(default_factory=itertools.count)
    failures: dict[str, int] = field(default_factory=dict)

    def subscribe(self, channel: str, callback: int, priority: float) -> None:
        listeners = self.channels.setdefault(channel, {})
        number = listeners[callback][1] if callback in listeners else next(self.counter)
        listeners[callback] = (priority, number)

    def unsubscribe(self, channel: str, callback: int) -> None:
        self.channels.get(channel, {}).pop(callback, None)

    def order(self, channel: str) -> list[int]:
        listeners = self.channels.get(channel, {})
        return sorted(listeners, key=lambda callback: listeners[callback])


class Listeners:
    """The callbacks under test: each records its call and returns, or raises, a value of its own."""

    def __init__(self, bus: Bus, specs: list[Spec]) -> None:
        self.bus = bus
        self.specs = specs
        self.calls: list[tuple[int, tuple[Any, ...], dict[str, Any]]] = []
        self.during: tuple[Subscribe | Unsubscribe, ...] = ()
        self.at = 0
        self.publish_number = 0
        self.callbacks = [self._make(index, spec) for index, spec in enumerate(specs)]

    def _make(self, index: int, spec: Spec) -> Callable[..., Any]:
        callback: Any
        if spec.kind == "sync":

            def callback(*args: Any, **kwargs: Any) -> Any:
                return self._called(index, args, kwargs)

        elif spec.kind == "async":

            async def callback(*args: Any, **kwargs: Any) -> Any:
                await anyio.lowlevel.checkpoint()
                return self._called(index, args, kwargs)

        elif spec.kind == "async object":
            callback = AsyncCallable(self, index)
        else:
            callback = functools.partial(self._called_with_args, index)
        if spec.attribute is not None:
            callback.priority = spec.attribute
        return callback  # type: ignore[no-any-return]

    def _called_with_args(self, index: int, *args: Any, **kwargs: Any) -> Any:
        return self._called(index, args, kwargs)

    def _called(self, index: int, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        self.calls.append((index, args, kwargs))
        if len(self.calls) == self.at:
            for change in self.during:
                apply(self.bus, self, change)
        value = ("result", index, self.publish_number)
        if self.specs[index].fails:
            raise ValueError(value)
        return value

    def set_attribute(self, index: int, priority: float | None) -> None:
        callback = self.callbacks[index]
        if priority is None:
            if hasattr(callback, "priority"):
                del callback.priority
        else:
            callback.priority = priority  # type: ignore[attr-defined]


class AsyncCallable:
    """An object whose ``__call__`` is async: awaited like an async function."""

    def __init__(self, listeners: Listeners, index: int) -> None:
        self.listeners = listeners
        self.index = index

    async def __call__(self, *args: Any, **kwargs: Any) -> Any:
        await anyio.lowlevel.checkpoint()
        return self.listeners._called(self.index, args, kwargs)


def apply(bus: Bus, listeners: Listeners, change: Subscribe | Unsubscribe) -> None:
    callback = listeners.callbacks[change.callback]
    if isinstance(change, Subscribe):
        bus.subscribe(change.channel, callback, change.priority)
    else:
        bus.unsubscribe(change.channel, callback)


def model_apply(model: Model, listeners: Listeners, change: Subscribe | Unsubscribe) -> None:
    if isinstance(change, Subscribe):
        priority = change.priority
        if priority is None:
            priority = getattr(listeners.callbacks[change.callback], "priority", 50)
        model.subscribe(change.channel, change.callback, priority)
    else:
        model.unsubscribe(change.channel, change.callback)


async def check(callback_specs: list[Spec], ops: list[Operation]) -> int:
    """Run ``ops`` on a bus and on the model, comparing after each; return the publishes run."""
    bus = Bus()
    recorder = LogRecorder()
    bus.unsubscribe("log", bus.listeners["log"][0])  # keep the failures' log lines here, not on stdout
    bus.subscribe("log", recorder)
    listeners = Listeners(bus, callback_specs)
    model = Model()
    publishes = 0
    for op in ops:
        if isinstance(op, Subscribe | Unsubscribe):
            apply(bus, listeners, op)
            model_apply(model, listeners, op)
        elif isinstance(op, SetAttribute):
            listeners.set_attribute(op.callback, op.priority)
        else:
            publishes += 1
            expected = model.order(op.channel)
            listeners.calls, listeners.during, listeners.at = [], op.during, op.at
            listeners.publish_number = publishes
            recorder.records.clear()
            args: tuple[Any, ...] = ("x", 2) if op.with_arguments else ()
            kwargs: dict[str, Any] = {"key": "value"} if op.with_arguments else {}
            failing = [index for index in expected if callback_specs[index].fails]
            try:
                results = await bus.publish(op.channel, *args, **kwargs)
            except ChannelFailures as failures:
                assert failing, "only a failing listener makes publish raise"
                assert failures.channel == op.channel
                assert [error.args[0] for error in failures.exceptions] == [
                    ("result", index, publishes) for index in failing
                ]
            else:
                assert not failing
                assert results == [("result", index, publishes) for index in expected]
            assert [call[0] for call in listeners.calls] == expected  # every listener ran, in order
            assert all(call[1:] == (args, kwargs) for call in listeners.calls)
            logged = [record.fields["listener"] for record in recorder.records if "failed" in record.msg]
            assert len(logged) == len(failing)  # each failure logged, in order
            model.failures[op.channel] = model.failures.get(op.channel, 0) + len(failing)
            for change in op.during if len(expected) >= op.at else ():
                model_apply(model, listeners, change)  # from the next publish on
        for channel in CHANNELS:
            assert bus.listeners.get(channel, ()) == tuple(
                listeners.callbacks[index] for index in model.order(channel)
            ), channel
    counted = {channel: count for channel, count in model.failures.items() if count}
    assert {channel: n for channel, n in bus.statistics().failures.items() if channel in CHANNELS} == counted
    return publishes


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
@settings(max_examples=EXAMPLES)
@given(
    callback_specs=st.lists(specs, min_size=CALLBACKS, max_size=CALLBACKS),
    ops=st.lists(operations, min_size=4, max_size=40),
)
def test_publish_follows_the_model(backend: str, callback_specs: list[Spec], ops: list[Operation]) -> None:
    anyio.run(check, callback_specs, ops, backend=backend)


@settings(max_examples=EXAMPLES)
@given(first=priorities, second=priorities, resubscribed=priorities)
def test_resubscribing_keeps_the_first_place_among_equals(first: float, second: float, resubscribed: float) -> None:
    """Two callbacks; the first subscribed again: it moves with its new priority, and among
    equal priorities it stays ahead of the second, subscribed after it."""

    async def run() -> None:
        bus = Bus()
        bus.subscribe("x", one, first)
        bus.subscribe("x", two, second)
        bus.subscribe("x", one, resubscribed)
        expected = ["one", "two"] if resubscribed <= second else ["two", "one"]
        assert await bus.publish("x") == expected
        bus.unsubscribe("x", one)
        bus.subscribe("x", one, resubscribed)  # after an unsubscribe: a new subscription, the last
        assert await bus.publish("x") == (["one", "two"] if resubscribed < second else ["two", "one"])

    def one() -> str:
        return "one"

    def two() -> str:
        return "two"

    anyio.run(run)


@pytest.mark.parametrize("priority", [math.nan, -math.nan])
def test_nan_priority_is_refused(priority: float) -> None:
    """A NaN priority has no place in an order: refused at subscribe, as a non-number is."""

    class WithNaN:
        def __call__(self) -> None:
            pass

    bus = Bus()
    with pytest.raises(ValueError, match="nan"):
        bus.subscribe("x", lambda: None, priority)
    callback = WithNaN()
    callback.priority = priority  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="nan"):
        bus.subscribe("x", callback)
    assert "x" not in bus.channels
