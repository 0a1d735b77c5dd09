"""SystemdNotifier: tell systemd (``Type=notify`` or ``notify-reload``) where the bus is, and feed its watchdog.

The protocol is sd_notify(3): datagrams of ``KEY=VALUE`` lines sent to the AF_UNIX
socket named by ``NOTIFY_SOCKET``. No library of systemd is needed.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

import anyio

from aiobus import Bus, Priority, SimplePlugin, State, priority

#: The message (one datagram) sent as the bus enters each state.
STATE_MESSAGES = {
    State.STARTING: "STATUS=Starting",
    State.STARTED: "READY=1\nSTATUS=Running",
    State.STOPPING: "STOPPING=1\nSTATUS=Stopping",
    State.STOPPED: "STATUS=Stopped",
    State.EXITING: "STATUS=Exiting",
}
_MAX_ADDRESS = 107  # sun_path holds 108 bytes, one of them the terminating NUL


def parse_notify_socket(value: str) -> str:
    """The socket address for a ``NOTIFY_SOCKET`` value: an absolute path, or ``@name`` (abstract).

    Raises:
        ValueError: the value is neither, or too long for an AF_UNIX address.
    """
    if value.startswith("@"):
        address = "\0" + value[1:]
    elif value.startswith("/"):
        address = value
    else:
        raise ValueError(f"NOTIFY_SOCKET must be an absolute path or start with '@', not {value!r}")
    if len(address.encode()) > _MAX_ADDRESS:
        raise ValueError(f"NOTIFY_SOCKET is too long for an AF_UNIX address: {value!r}")
    return address


def _monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def watchdog_period(environ: Mapping[str, str]) -> float | None:
    """The watchdog period in seconds that systemd asks of this process, or None.

    None when ``WATCHDOG_USEC`` is unset, or when ``WATCHDOG_PID`` names another process.

    Raises:
        ValueError: either variable is not a positive integer.
    """
    usec = environ.get("WATCHDOG_USEC")
    if not usec:
        return None
    pid = environ.get("WATCHDOG_PID")
    if pid and _positive_int("WATCHDOG_PID", pid) != os.getpid():
        return None
    return _positive_int("WATCHDOG_USEC", usec) / 1e6


def _positive_int(name: str, value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number <= 0:
        raise ValueError(f"{name} must be a positive integer, not {value!r}")
    return number


class SystemdNotifier(SimplePlugin):
    """Send systemd the bus's states over ``NOTIFY_SOCKET``; do nothing when it is unset.

    Each state change sends one datagram with ``STATUS=`` (Starting, Running,
    Stopping, Stopped, Exiting); STARTED's also has ``READY=1``, STOPPING's
    ``STOPPING=1``. The states are seen on the ``state`` channel, on which the bus
    announces each change as it happens: ``READY=1`` therefore goes out once every
    start listener has run. ``graceful`` on a STARTED bus sends ``RELOADING=1`` with
    ``MONOTONIC_USEC=`` and ``STATUS=Reloading`` first (priority 0), and ``READY=1``
    once the graceful listeners have run (priority 1000), as ``Type=notify-reload``
    expects. A restart (``bus.restart()``, which re-executes the process with the
    same pid) sends ``RELOADING=1`` in place of ``STOPPING=1``; the new process
    sends ``READY=1`` once its bus has started.

    With ``WATCHDOG_USEC`` set (and ``WATCHDOG_PID`` unset or this process), main ticks
    send ``WATCHDOG=1``, often enough that at least two go out per period while the
    ticks keep time: a hung loop stops them and systemd acts. That needs
    ``bus.main_interval`` at most half the period, checked here and at start.

    Each message is a datagram on a non-blocking socket: a failure to send is logged
    (once until a send succeeds again) and never reaches the bus. The socket is
    opened at the first message and closed at exit. Subscribe before ``bus.start()``.

    Args:
        bus: the bus to report.
        environ: where to read ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID``;
            ``os.environ`` by default.

    Raises:
        ValueError: a malformed variable, or a main interval too long for the watchdog.
    """

    def __init__(self, bus: Bus, environ: Mapping[str, str] | None = None) -> None:
        super().__init__(bus)
        env = os.environ if environ is None else environ
        value = env.get("NOTIFY_SOCKET")
        #: The socket address messages go to (an abstract name starts with NUL), or None.
        self.address = parse_notify_socket(value) if value else None
        #: The watchdog period in seconds, or None when there is no watchdog to feed.
        self.watchdog = watchdog_period(env) if self.address else None
        self._check_interval()
        self._socket: socket.socket | None = None
        self._last_ping = -float("inf")
        self._failing = False
        self._reloading = False

    @property
    def enabled(self) -> bool:
        """Whether there is a systemd to notify (``NOTIFY_SOCKET`` is set)."""
        return self.address is not None

    def notify(self, message: str) -> bool:
        """Send one datagram of ``KEY=VALUE`` lines (say ``"STATUS=Loading data"``).

        Returns:
            Whether it was sent: False when disabled or when sending failed (logged).
        """
        if self.address is None:
            return False
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._socket.setblocking(False)
            self._socket.sendto(message.encode(), self.address)
        except OSError as exc:
            if not self._failing:
                self._failing = True  # warn once until a send succeeds again
                where = "@" + self.address[1:] if self.address.startswith("\0") else self.address
                self.bus.log(f"Could not notify systemd: {exc}", logging.WARNING, notify_socket=where, message=message)
            return False
        self._failing = False
        return True

    def _check_interval(self) -> None:
        if self.watchdog is not None and self.bus.main_interval > self.watchdog / 2:
            raise ValueError(
                f"main_interval {self.bus.main_interval:g} s is too long for the systemd watchdog: "
                f"WATCHDOG_USEC={round(self.watchdog * 1e6)} needs a main tick at least every {self.watchdog / 2:g} s"
            )

    def subscribe(self) -> None:
        """Subscribe the listeners (the graceful ones at priorities 0 and 1000)."""
        super().subscribe()
        self.bus.subscribe("graceful", self._reloaded, priority=Priority.GRACEFUL_SYSTEMD_READY)

    def unsubscribe(self) -> None:
        """Unsubscribe the listeners and close the socket."""
        super().unsubscribe()
        self.bus.unsubscribe("graceful", self._reloaded)
        self._close()

    def state(self, old: State, new: State) -> None:
        """Send the message of the state the bus has just entered (a listener of ``state``)."""
        if self.address is None:
            return
        if new is State.STOPPING and self.bus.restart_requested:
            self.notify(f"RELOADING=1\nMONOTONIC_USEC={_monotonic_usec()}\nSTATUS=Restarting")
            return
        self.notify(STATE_MESSAGES[new])

    @priority(Priority.START_SYSTEMD)
    def start(self) -> None:
        self._check_interval()

    @priority(Priority.GRACEFUL_SYSTEMD_RELOADING)
    def graceful(self) -> None:
        if self.address is not None and self.bus.state is State.STARTED:
            self._reloading = True
            self.notify(f"RELOADING=1\nMONOTONIC_USEC={_monotonic_usec()}\nSTATUS=Reloading")

    def _reloaded(self) -> None:
        if self._reloading and self.bus.state is State.STARTED:
            self.notify(STATE_MESSAGES[State.STARTED])
        self._reloading = False

    def main(self) -> None:
        if self.watchdog is None:
            return
        now = anyio.current_time()
        # Sending when half a period less 1.5 ticks has passed keeps the gaps under half a
        # period, with half a tick to spare for a late tick.
        if now - self._last_ping >= self.watchdog / 2 - 1.5 * self.bus.main_interval:
            self._last_ping = now
            self.notify("WATCHDOG=1")

    def exit(self) -> None:
        self._close()

    def _close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None
