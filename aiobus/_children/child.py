"""The child's side of a child broker: what runs inside the ``anyio.to_process`` worker.

:func:`run_child` is the function handed to ``anyio.to_process.run_sync``. In the
worker (a fresh interpreter) it:

1. kills itself as soon as the parent dies (a thread waits on a pidfd of the
   parent), and leaves the parent's process group, so that a terminal Ctrl-C
   reaches the parent only: the parent drives the shutdown;
2. connects three times to the parent's private listener, presenting the token: a
   control link (logs, stop and graceful), a data link (the user's messages) and a
   connection for heartbeats;
3. forwards everything the child logs (structlog, ``print``, ``sys.stderr``) over the
   control link, so nothing is lost in the worker's ``/dev/null``;
4. runs a :class:`~aiobus.Bus`, starts it, reports ready, and awaits the user's
   function ``fn(bus, link)`` (or, for a class, ``fn(bus, link).run()``); each
   main tick writes a heartbeat;
5. on the parent's stop, the data link ends (after the messages already sent) and the
   bus exits once ``fn`` has returned; the worker then ends with the bus's exit code.
"""

from __future__ import annotations

import io
import logging
import os
import select
import signal
import socket
import struct
import sys
import threading
from collections.abc import Callable, MutableMapping
from typing import Any, NoReturn

import anyio
import structlog

from .._bus import Bus
from .._link import EndOfLink, Link, LinkOptions, UndecodableFrame
from .._private import connect_private
from .._state import State

EXIT_FAILED = 1


class EndOfInput:
    """Sent by the parent on the data link when it stops the child: no message follows."""


class Receiver:
    """``async for msg in x`` over ``await x.receive()``, ending at the end of the stream."""

    async def receive(self) -> Any:
        raise NotImplementedError

    def __aiter__(self) -> Receiver:
        return self

    async def __anext__(self) -> Any:
        try:
            return await self.receive()
        except anyio.EndOfStream:
            raise StopAsyncIteration from None


class ParentLink(Receiver):
    """The child's link to its parent: ``await link.send(obj)``, ``await link.receive()``,
    ``async for msg in link``.

    The iteration ends cleanly once the parent stops the child, after every message it
    sent before; :meth:`receive` then raises :class:`~aiobus.EndOfLink`.

    Acknowledgement: a message counts as done with once the child's function asks for
    the next one (calls :meth:`receive` again: in ``async for msg in link``, once the
    loop's body has finished with it), or returns. The heartbeats tell the parent how
    many are done with; the others count as ``lost`` in the incarnation's exit if the
    child dies. A function that hands messages on to other tasks acknowledges each one
    as it asks for the next, whatever those tasks have done with it.
    """

    def __init__(self, link: Link) -> None:
        self._link = link
        self._ended = False
        #: How many messages from the parent this child has taken (returned by :meth:`receive`).
        self.received = 0
        #: How many of those it is done with (it asked for the next one, or its function returned).
        self.acknowledged = 0

    async def send(self, obj: Any) -> None:
        """Send ``obj`` to the parent (see :meth:`aiobus.Link.send`).

        Cancelled (only while the link is full): ``obj`` was not queued. No timeout of its own.
        """
        await self._link.send(obj)

    async def receive(self) -> Any:
        """The next message from the parent; the messages taken before count as done with.

        Raises:
            EndOfLink: the parent stopped the child (or went away); nothing follows.
            UndecodableFrame: the parent's next message does not unpickle here; it counts
                as taken, and the call after returns the message after it.

        Cancelled: nothing is lost. No timeout of its own.
        """
        self.acknowledged = self.received
        if self._ended:
            raise EndOfLink
        try:
            message = await self._link.receive()
        except UndecodableFrame:
            self.received += 1
            raise
        if isinstance(message, EndOfInput):
            self._ended = True
            raise EndOfLink
        self.received += 1
        return message


def run_child(
    address: str,
    token: bytes,
    fn: Callable[[Bus, ParentLink], Any],
    name: str,
    parent_pid: int,
    main_interval: float,
    link_options: LinkOptions,
) -> NoReturn:
    """The worker's entry point: run the child, then end the worker with its exit code.

    It raises SystemExit, which anyio's worker reports to the parent and then obeys: the
    worker process ends instead of idling in anyio's pool.
    """
    _die_with_parent(parent_pid)
    code = anyio.run(_child_main, address, token, fn, name, main_interval, link_options)
    raise SystemExit(code)


def _die_with_parent(parent_pid: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    try:
        os.setpgid(0, 0)
    except OSError:
        pass
    if os.getppid() != parent_pid:  # the parent died already
        os._exit(EXIT_FAILED)
    # Not PR_SET_PDEATHSIG: it fires when the parent's *thread* that forked ends, and
    # trio starts processes from worker threads that end when idle.
    threading.Thread(target=_watch_parent, args=(parent_pid,), name="aiobus parent watch", daemon=True).start()


def _watch_parent(parent_pid: int) -> None:
    """Kill this process as soon as the parent has died, even if its event loop is blocked."""
    try:
        fd = os.pidfd_open(parent_pid)
    except (AttributeError, OSError):  # not Linux 5.3+, or the parent is gone already
        idle = threading.Event()
        while os.getppid() == parent_pid:
            idle.wait(0.1)
    else:
        select.select([fd], [], [])  # readable once the parent has exited
    os.kill(os.getpid(), signal.SIGKILL)


async def _child_main(
    address: str,
    token: bytes,
    fn: Callable[[Bus, ParentLink], Any],
    name: str,
    main_interval: float,
    link_options: LinkOptions,
) -> int:
    control = await connect_private(address, token)
    data = await connect_private(address, token, **link_options)
    beats = await connect_private(address, token)
    async with control, data, beats:
        _forward_output(control, name)
        control.send_nowait(("hello", os.getpid()))
        async with Bus(main_interval=main_interval) as bus:
            bus.start_soon(_forward_fd2, control)
            stop_requested = anyio.Event()
            link = ParentLink(data)
            if beats.raw_socket is not None:
                bus.subscribe("main", Heartbeat(beats.raw_socket, link))
            bus.start_soon(_read_control, control, bus, stop_requested)
            bus.start_soon(_exit_on_sigterm, bus)
            await bus.start()
            await control.send(("ready",))
            code = await _run_user(fn, bus, link, stop_requested)
            await bus.exit()
        await control.send(("tick", link.acknowledged))
        await control.drain()
        return code or bus.exit_code


async def _run_user(
    fn: Callable[[Bus, ParentLink], Any], bus: Bus, link: ParentLink, stop_requested: anyio.Event
) -> int:
    """Await the user's function, then wait for the parent's stop; cut short if the bus exits."""
    with anyio.CancelScope() as scope:
        bus.start_soon(_cancel_when_exiting, bus, scope)
        try:
            if isinstance(fn, type):  # a class: built with (bus, link), then its run() awaited
                await fn(bus, link).run()
            else:
                await fn(bus, link)
        except Exception:
            structlog.get_logger("aiobus").exception("The child's function failed")
            return EXIT_FAILED  # the message it was working on, if any, stays unacknowledged
        link.acknowledged = link.received  # it returned: done with every message it took
        await stop_requested.wait()
    return 0


#: A heartbeat on the wire: the count of messages the child is done with.
BEAT = struct.Struct("<Q")


class Heartbeat:
    """The child's main listener: each main tick writes a heartbeat to the parent.

    Heartbeats go over a connection of their own, as fixed-size records written without
    waiting; the parent reads them only when it checks on the child (see
    :class:`HeartbeatReader`), so an idle child costs its parent next to nothing. Each
    carries the count of messages the child is done with, so the parent knows which of
    those it sent may die with the child.
    """

    def __init__(self, sock: socket.socket, link: ParentLink) -> None:
        self._sock = sock
        self._link = link
        self._partial = b""  # the unsent end of a record begun: records stay whole on the wire

    def __call__(self) -> None:
        data = self._partial + BEAT.pack(self._link.acknowledged)
        try:
            sent = self._sock.send(data, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            sent = 0  # the parent has not read for a while: this beat is dropped
        except OSError:
            sent = len(data)  # the parent is gone
        rest = data[sent:]
        self._partial = rest[: len(rest) % BEAT.size]


class HeartbeatReader:
    """The parent's side of :class:`Heartbeat`: what arrived since the last look."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buffer = bytearray()

    def take(self) -> tuple[bool, int | None]:
        """Read without waiting: whether any heartbeat arrived, and the latest count."""
        arrived = False
        while True:
            try:
                chunk = self._sock.recv(65536, socket.MSG_DONTWAIT)
            except OSError:  # nothing more for now (BlockingIOError), or the child is gone
                break
            if not chunk:
                break  # the child closed it: it is ending
            arrived = True
            self._buffer += chunk
        whole = len(self._buffer) - len(self._buffer) % BEAT.size
        latest = BEAT.unpack_from(self._buffer, whole - BEAT.size)[0] if whole else None
        del self._buffer[:whole]
        return arrived, latest


async def _cancel_when_exiting(bus: Bus, scope: anyio.CancelScope) -> None:
    await bus.wait(State.EXITING)
    scope.cancel()


async def _read_control(control: Link, bus: Bus, stop_requested: anyio.Event) -> None:
    try:
        async for message in control:
            if message == ("stop",):
                stop_requested.set()
            elif message == ("graceful",):
                await bus.graceful()
    except anyio.EndOfStream:
        pass
    stop_requested.set()  # the parent is gone: nobody will say stop
    await bus.exit()


async def _exit_on_sigterm(bus: Bus) -> None:
    with anyio.open_signal_receiver(signal.SIGTERM) as signals:
        async for _ in signals:
            bus.log("Child got SIGTERM: exiting", logging.WARNING)
            await bus.exit()


def _send_quietly(link: Link, message: Any) -> None:
    try:
        link.send_nowait(message)
    except (anyio.WouldBlock, anyio.ClosedResourceError, anyio.BrokenResourceError):
        pass  # a heartbeat or a log line that cannot go now is not worth blocking for


# -- output -------------------------------------------------------------------------------


class _ForwardingWriter(io.TextIOBase):
    """A text stream whose lines go to the parent as log events."""

    def __init__(self, link: Link, stream: str) -> None:
        self._link = link
        self._stream = stream
        self._pending = ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self._pending += text
        *lines, self._pending = self._pending.split("\n")
        for line in lines:
            _send_quietly(self._link, ("log", {"event": line, "level": "info", "stream": self._stream}))
        return len(text)

    def flush(self) -> None:
        if self._pending:
            line, self._pending = self._pending, ""
            _send_quietly(self._link, ("log", {"event": line, "level": "info", "stream": self._stream}))


def _forward_output(control: Link, name: str) -> None:
    """Send structlog events, ``print`` and ``sys.stderr`` lines to the parent."""

    def to_parent(logger: Any, method: str, event: MutableMapping[str, Any]) -> str:
        event.setdefault("level", method)
        _send_quietly(control, ("log", _plain(event)))
        raise structlog.DropEvent

    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.format_exc_info,
            to_parent,
        ],
        cache_logger_on_first_use=False,
    )
    sys.stdout = _ForwardingWriter(control, "stdout")
    sys.stderr = _ForwardingWriter(control, "stderr")


async def _forward_fd2(control: Link) -> None:
    """What is written to descriptor 2 (C code, faulthandler) goes to the parent as log lines.

    anyio's worker leaves descriptor 2 on a pipe nobody reads: a chatty C library
    would block there, and its lines would be lost.
    """
    read_fd, write_fd = os.pipe()
    os.dup2(write_fd, 2)
    os.close(write_fd)
    os.set_blocking(read_fd, False)
    writer = _ForwardingWriter(control, "stderr")
    try:
        while True:
            await anyio.wait_readable(read_fd)
            try:
                chunk = os.read(read_fd, 65536)
            except BlockingIOError:
                continue
            if not chunk:
                return
            writer.write(chunk.decode(errors="replace"))
    finally:
        writer.flush()
        os.close(read_fd)


def _plain(event: MutableMapping[str, Any]) -> dict[str, Any]:
    """The event with every value the parent may not be able to unpickle turned into text."""
    plain: dict[str, Any] = {}
    for key, value in event.items():
        plain[key] = value if isinstance(value, str | int | float | bool | type(None)) else repr(value)
    return plain
