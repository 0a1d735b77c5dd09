"""Channels: who listens to what, in which order, and what a publish collected.

This module knows nothing of states or tasks; the bus builds on it.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Self

DEFAULT_PRIORITY = 50
#: The channels every bus has. ``log`` and ``state`` call their listeners synchronously,
#: as ``listener(msg, level, **fields)`` and ``listener(old, new)``; the others are published.
BUILTIN_CHANNELS = ("start", "stop", "graceful", "exit", "main", "log", "state")
#: The built-in channels whose listeners must be sync (an async one is refused at subscribe).
SYNC_CHANNELS = ("log", "state")


class ChannelFailures(ExceptionGroup[Exception]):
    """One or more listeners of a channel raised.

    Its ``exceptions`` are the listeners' own exceptions, in the order the listeners
    ran; ``channel`` names the channel.
    """

    channel: str

    def __new__(cls, channel: str, exceptions: Sequence[Exception]) -> Self:
        message = f"{len(exceptions)} listener(s) of channel {channel!r} failed"
        self = super().__new__(cls, message, exceptions)
        self.channel = channel
        return self

    def __init__(self, channel: str, exceptions: Sequence[Exception]) -> None:
        super().__init__(self.message, exceptions)

    def derive(self, excs: Sequence[Exception]) -> ChannelFailures:  # type: ignore[override]
        return ChannelFailures(self.channel, excs)

    def __reduce__(self) -> tuple[Any, ...]:
        return (ChannelFailures, (self.channel, list(self.exceptions)))


@dataclass(frozen=True, slots=True)
class Listener:
    """One subscription: a callback, its priority and its place in subscription order."""

    callback: Callable[..., Any]
    priority: float
    order: int
    is_async: bool

    @property
    def name(self) -> str:
        return callable_name(self.callback)


def callable_name(callback: object) -> str:
    """A readable name for a callback, for log lines."""
    if isinstance(callback, functools.partial):
        return f"partial({callable_name(callback.func)})"
    name = getattr(callback, "__qualname__", None)
    if name is None:
        name = type(callback).__qualname__
    return str(name)


def is_async_callable(callback: object) -> bool:
    """Whether calling ``callback`` returns a coroutine to await."""
    while isinstance(callback, functools.partial):
        callback = callback.func
    if inspect.iscoroutinefunction(callback):
        return True
    call = getattr(type(callback), "__call__", None)  # noqa: B004
    return not inspect.isroutine(callback) and inspect.iscoroutinefunction(call)


def resolve_priority(callback: object, priority: float | None) -> float:
    """The argument, else the callback's ``priority`` attribute, else 50.

    Raises:
        TypeError: the priority is not a number (a bool is not one).
        ValueError: the priority is NaN, which has no place in an order.
    """
    if priority is None:
        priority = getattr(callback, "priority", DEFAULT_PRIORITY)
    return check_priority(priority)


def check_priority(priority: object) -> float:
    """``priority`` itself, if it is a number a listener can be ordered by.

    Raises:
        TypeError: the priority is not a number (a bool is not one).
        ValueError: the priority is NaN, which has no place in an order.
    """
    if isinstance(priority, bool) or not isinstance(priority, int | float):
        raise TypeError(f"priority must be a number, not {priority!r}")
    if math.isnan(priority):
        raise ValueError(f"priority must be a number that can be ordered, not {priority!r}")
    return priority


class Channels:
    """The listeners of every channel, each kept as a tuple sorted in run order.

    A publish iterates the tuple it read, so subscribing or unsubscribing while a
    publish runs changes only the next publish.
    """

    def __init__(self, names: Iterable[str] = BUILTIN_CHANNELS) -> None:
        self._listeners: dict[str, tuple[Listener, ...]] = {name: () for name in names}
        #: The listeners of a channel in run order, or None for a channel never subscribed to.
        #: (The dict's own method: publish calls it every time.)
        self.get: Callable[[str], tuple[Listener, ...] | None] = self._listeners.get
        self._order = itertools.count()

    def as_mapping(self) -> Mapping[str, tuple[Callable[..., Any], ...]]:
        return {name: tuple(item.callback for item in items) for name, items in self._listeners.items()}

    def subscribe(self, channel: str, callback: Callable[..., Any], priority: float, is_async: bool) -> None:
        current = self._listeners.get(channel, ())
        order = next(self._order)
        kept = []
        for item in current:
            if item.callback == callback:
                order = item.order  # a second subscription keeps the first one's place
            else:
                kept.append(item)
        kept.append(Listener(callback, priority, order, is_async))
        kept.sort(key=lambda item: (item.priority, item.order))
        self._listeners[channel] = tuple(kept)

    def unsubscribe(self, channel: str, callback: Callable[..., Any]) -> None:
        current = self._listeners.get(channel)
        if current:
            self._listeners[channel] = tuple(item for item in current if item.callback != callback)
