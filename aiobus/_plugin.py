"""Plugins: the one shape every plugin has (:class:`Plugin`), and :class:`SimplePlugin`, whose methods
named after channels are its listeners."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, Protocol, runtime_checkable

from ._bus import Bus
from ._channels import BUILTIN_CHANNELS


@runtime_checkable
class Plugin(Protocol):
    """What every plugin is: built with its bus (and its options), then attached and detached.

    :class:`SimplePlugin` and its subclasses, ``SignalHandler``, child brokers and
    programs (:class:`Child`), and :class:`DaemonReporter` all have this shape, and
    a plugin of your own needs nothing more.
    """

    def subscribe(self) -> None:
        """Attach to the bus: from now on it takes part in the bus's lifecycle."""

    def unsubscribe(self) -> None:
        """Detach from the bus: what :meth:`subscribe` attached is taken off."""


class SimplePlugin:
    """Subclass it and define methods named after channels (``start``, ``stop``, ``main``...).

    :meth:`subscribe` subscribes each such method to its channel, with the priority
    :func:`aiobus.priority` gave it (``@priority(Priority.START_BIND)``), if any.
    Channels beyond the seven built-in ones are declared in the class attribute
    ``channels``.
    """

    #: Channels other than the built-in ones that this plugin has methods for.
    channels: ClassVar[tuple[str, ...]] = ()

    def __init__(self, bus: Bus) -> None:
        self.bus = bus

    def _listeners(self) -> list[tuple[str, Callable[..., Any]]]:
        names = dict.fromkeys((*BUILTIN_CHANNELS, *self.channels))
        found = []
        for channel in names:
            method = getattr(self, channel, None)
            if method is not None:
                if not callable(method):
                    raise TypeError(f"{type(self).__name__}.{channel} is not callable")
                found.append((channel, method))
        return found

    def subscribe(self) -> None:
        """Subscribe every method named after a channel to that channel."""
        for channel, method in self._listeners():
            self.bus.subscribe(channel, method)

    def unsubscribe(self) -> None:
        """Unsubscribe every method that :meth:`subscribe` subscribed."""
        for channel, method in self._listeners():
            self.bus.unsubscribe(channel, method)
