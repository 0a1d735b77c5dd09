"""The order in which the built-in plugins start and stop: one contract, written here.

Listeners of a channel run in increasing priority (50 by default), so the order of a
start or a stop is the order of these numbers. The rules they follow:

On ``start``:

1. First (0) what must see the whole start: the signal handler receives signals
   (a SIGTERM during a slow start is not lost) and the systemd notifier checks its
   settings. Daemonizing happens before the event loop, so before any of this.
2. The default (50): plain plugins, which later ones may rely on.
3. The PID file (70), written while the process may still write where root can.
4. Servers bind their ports (75), as root if a port needs it.
5. Privileges are dropped (77), once the ports are bound.
6. Children start (80), once ports are bound and privileges dropped: they inherit
   neither root nor a port they would race for.
7. What uses the children starts (85), once every child is up: a Monitor's first
   call finds them running.

On ``stop``, users of children first, then children, then the rest:

1. What uses the children stops (10): a Monitor's call never meets a child that is
   stopping or gone. The autoreloader stops there too, so that a file saved while
   the children stop does not turn a shutdown into a restart.
2. Children stop (20), in reverse start order, while everything they may use
   (sockets, files, other plugins at the default) is still there.
3. The rest (50 and later).

A plugin of your own that uses children takes :attr:`Priority.START_CHILD_USERS` and
:attr:`Priority.STOP_CHILD_USERS`; a server binding a privileged port takes
:attr:`Priority.START_BIND`. A listener gets its priority from :func:`priority`
(``@priority(Priority.START_BIND)``), which :meth:`Bus.subscribe` and
:class:`SimplePlugin` read.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final, Protocol, TypeVar, cast

from ._channels import DEFAULT_PRIORITY, check_priority

_F = TypeVar("_F", bound=Callable[..., Any])


class _Prioritized(Protocol):
    priority: float


def priority(value: float) -> Callable[[_F], _F]:
    """A decorator that gives a listener (a function, or a plugin's method) its priority.

    ``@priority(Priority.START_PIDFILE)`` sets the callback's ``priority`` attribute, which
    :meth:`Bus.subscribe` (when it is given no priority of its own) and
    :class:`SimplePlugin` read; the callback is returned unchanged, with its type.

    Raises:
        TypeError: ``value`` is not a number (a bool is not one).
        ValueError: ``value`` is NaN.
    """
    checked = check_priority(value)

    def give(callback: _F) -> _F:
        cast(_Prioritized, callback).priority = checked
        return callback

    return give


class Priority:
    """The start and stop priorities of the built-in plugins (lower runs first; see the module's rules)."""

    #: A listener without a priority of its own.
    DEFAULT: Final = DEFAULT_PRIORITY

    # -- start ------------------------------------------------------------------------
    #: SignalHandler begins receiving signals (if the bus was not entered at its subscribe).
    START_SIGNALS: Final = 0
    #: SystemdNotifier checks that the main interval suits the watchdog.
    START_SYSTEMD: Final = 0
    #: PIDFile writes and locks the file.
    START_PIDFILE: Final = 70
    #: The Autoreloader starts watching: early enough to see a file saved while children start.
    START_AUTORELOAD: Final = 70
    #: Servers bind their ports (a plugin of yours).
    START_BIND: Final = 75
    #: DropPrivileges switches user and group and sets the umask.
    START_DROP_PRIVILEGES: Final = 77
    #: Supervisors start their children (child brokers, programs), in order.
    START_CHILDREN: Final = 80
    #: Monitor, and whatever uses children, starts once they are up.
    START_CHILD_USERS: Final = 85

    # -- stop -------------------------------------------------------------------------
    #: Monitor, and whatever uses children, stops before they do.
    STOP_CHILD_USERS: Final = 10
    #: The Autoreloader stops watching before the children stop.
    STOP_AUTORELOAD: Final = 10
    #: Supervisors stop their children, in reverse order.
    STOP_CHILDREN: Final = 20

    # -- graceful ---------------------------------------------------------------------
    #: SystemdNotifier says RELOADING=1 before the other graceful listeners...
    GRACEFUL_SYSTEMD_RELOADING: Final = 0
    #: ...and READY=1 after them.
    GRACEFUL_SYSTEMD_READY: Final = 1000
