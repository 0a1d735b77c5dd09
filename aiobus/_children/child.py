"""The child's side of a child broker: what runs inside its worker process.

:func:`run_child` is the function handed to ``anyio.to_process.run_sync``. In the worker
the parent started for it (see :mod:`.workers`) it:

1. refuses to run in any other worker; kills itself as soon as the parent dies (a thread
   waits on a pidfd of the parent);
2. points ``sys.stdout`` and ``sys.stderr`` at descriptors 1 and 2, pipes the parent reads
   line by line: ``print``, ``sys.stderr``, C code and subprocesses all reach the parent's log;
3. sends every structlog event (the child's bus logs through structlog) as a JSON line on
   the logs socket, waiting rather than dropping when the parent reads slowly;
4. runs a :class:`~aiobus.Bus`, starts it, says :class:`~.messages.Ready`, and awaits the
   user's function ``fn(bus, link)`` (or, for a class, ``fn(bus, link).run()``); a task
   writes a heartbeat four times per ``hang_timeout`` (a blocked loop writes none), and the
   link one each time the function is about to wait for a message (a pool's parent sees at
   once which workers are free); the bus's main ticker sleeps unless the function listens;
5. on the parent's :class:`~.messages.Stop`, the data link ends (after the messages already
   sent) and the bus exits once ``fn`` has returned; the worker then ends with the bus's
   exit code, after a last :class:`~.messages.Done`.
"""

from __future__ import annotations

import io
import logging
import os
import select
import signal
import socket
import sys
import threading
from collections.abc import Callable, MutableMapping
from typing import Any, NoReturn

import anyio
import structlog
from anyio.abc import ObjectReceiveStream, UNIXSocketStream

from .._bus import Bus
from .._exitcodes import ExitCode
from .._link import EndOfLink, Link, UndecodableFrame
from .._state import State
from .messages import BEAT, ChildSpec, Done, EndOfInput, Graceful, Ready, Stop, encode_log, receive_control


class ParentLink(ObjectReceiveStream[Any]):
    """The child's link to its parent: ``await link.send(obj)``, ``await link.receive()``,
    ``async for msg in link`` (an anyio ``ObjectReceiveStream``).

    The iteration ends cleanly once the parent stops the child, after every message it
    sent before; :meth:`receive` then raises :class:`~aiobus.EndOfLink`.

    Acknowledgement: a message counts as done with once the child's function asks for
    the next one (calls :meth:`receive` again: in ``async for msg in link``, once the
    loop's body has finished with it), or returns. The heartbeats tell the parent how
    many are done with; the others count as ``lost`` in the incarnation's exit if the
    child dies. A function that hands messages on to other tasks acknowledges each one
    as it asks for the next, whatever those tasks have done with it.
    """

    def __init__(self, link: Link, on_idle: Callable[[], None] | None = None) -> None:
        self._link = link
        self._ended = False
        self._closed = False
        self._on_idle = on_idle  # tells the parent what it is done with, as it is about to wait
        self._reported = 0
        #: How many messages from the parent this child has taken (returned by :meth:`receive`).
        self.received = 0
        #: How many of those it is done with (it asked for the next one, or its function returned).
        self.acknowledged = 0

    async def send(self, obj: Any) -> None:
        """Send ``obj`` to the parent (see :meth:`aiobus.Link.send`).

        Cancelled (only while the link is full): ``obj`` was not queued. No timeout of its own.
        """
        await self._link.send(obj)

    async def drain(self) -> None:
        """Wait until everything sent so far has been handed to the OS (see :meth:`aiobus.Link.drain`).

        Useful before work that blocks the event loop: what was sent reaches the parent meanwhile.
        """
        await self._link.drain()

    async def receive(self) -> Any:
        """The next message from the parent; the messages taken before count as done with.

        Raises:
            EndOfLink: the parent stopped the child (or went away); nothing follows.
            UndecodableFrame: the parent's next message does not unpickle here; it counts
                as taken, and the call after returns the message after it.
            anyio.ClosedResourceError: :meth:`aclose` was called.

        Cancelled: nothing is lost. No timeout of its own.
        """
        self.acknowledged = self.received
        if self._closed:
            raise anyio.ClosedResourceError
        if self._ended:
            raise EndOfLink
        if self._on_idle is not None and not self._link.ready and self._reported != self.acknowledged:
            self._reported = self.acknowledged
            self._on_idle()  # about to wait: the parent (a pool) sees at once that this one is free
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

    async def aclose(self) -> None:
        """Take no more messages: later :meth:`receive` calls raise ClosedResourceError.

        The messages taken so far count as done with; the link itself stays the child's
        until it ends (sending still works)."""
        self.acknowledged = self.received
        self._closed = True


def run_child(spec: ChildSpec) -> NoReturn:
    """The worker's entry point: run the child, then end the worker with its exit code.

    It raises SystemExit, which anyio's worker reports to the parent and then obeys: the
    worker process ends instead of idling.

    Raises:
        RuntimeError: this is not the worker the parent started for the child (it is left
            as it was: nothing of the child ran).
    """
    if os.getpid() != spec.worker_pid:
        raise RuntimeError(f"child {spec.name!r} must run in worker {spec.worker_pid}, not in {os.getpid()}")
    _die_with_parent(spec.parent_pid)
    _take_standard_streams()
    try:
        code = anyio.run(_child_main, spec)
    finally:
        _kill_descendants()
    raise SystemExit(code)


def _die_with_parent(parent_pid: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    if os.getppid() != parent_pid:  # the parent died already
        os._exit(ExitCode.FAILURE)
    # Not PR_SET_PDEATHSIG: it fires when the parent's *thread* that forked ends, and
    # trio starts processes from worker threads that end when idle.
    threading.Thread(target=_watch_parent, args=(parent_pid,), name="aiobus parent watch", daemon=True).start()


def _watch_parent(parent_pid: int) -> None:
    """Kill this process, and its subprocesses in its process group, as soon as the parent has
    died, even if its event loop is blocked."""
    try:
        fd = os.pidfd_open(parent_pid)
    except (AttributeError, OSError):  # not Linux 5.3+, or the parent is gone already
        idle = threading.Event()
        while os.getppid() == parent_pid:
            idle.wait(0.1)
    else:
        select.select([fd], [], [])  # readable once the parent has exited
    os.killpg(os.getpgid(0), signal.SIGKILL)  # the worker leads a group of its own


def _kill_descendants() -> None:
    """SIGKILL every process descended from this one that is still running: the worker is a
    child subreaper (see ``_boot``), so even those that left its process group, or whose parent
    died, are below it. After the child's end, nothing it started outlives it."""
    me = os.getpid()
    while True:
        parents: dict[int, int] = {}
        for entry in os.listdir("/proc") if os.path.isdir("/proc") else ():
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat", "rb") as file:
                        parents[int(entry)] = int(file.read().rsplit(b")", 1)[1].split()[1])
                except (OSError, ValueError, IndexError):
                    continue  # it ended meanwhile
        below: set[int] = set()
        frontier = {me}
        while frontier:
            frontier = {pid for pid, parent in parents.items() if parent in frontier} - below
            below |= frontier
        if not below:
            return
        for pid in below:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        for _ in below:  # reap our own children; the others' parents (killed too) reparent them to us
            try:
                os.waitpid(-1, 0)
            except ChildProcessError:
                break


def _take_standard_streams() -> None:
    """``sys.stdout`` and ``sys.stderr`` write to descriptors 1 and 2 (the parent reads them),
    a line at a time; anyio's worker had pointed them at ``/dev/null``."""
    for fd, name in ((1, "stdout"), (2, "stderr")):
        raw = io.FileIO(fd, "w", closefd=False)
        stream = io.TextIOWrapper(raw, encoding="utf-8", errors="backslashreplace", line_buffering=True)
        setattr(sys, name, stream)


async def _child_main(spec: ChildSpec) -> int:
    fds = spec.sockets
    control = Link(await UNIXSocketStream.from_socket(fds.control), name="control")
    data = Link(await UNIXSocketStream.from_socket(fds.data), **spec.link_options)
    beats = socket.socket(fileno=fds.beats)
    logs = socket.socket(fileno=fds.logs)
    _send_logs_to(logs)
    with beats, logs:
        async with control, data:
            async with Bus(main_interval=spec.main_interval) as bus:
                stop_requested = anyio.Event()
                link = ParentLink(data)
                heartbeat = Heartbeat(beats, link)
                link._on_idle = heartbeat
                if spec.beat_interval is not None:
                    bus.start_soon(_beat, heartbeat, spec.beat_interval, name="aiobus heartbeat")
                bus.start_soon(_read_control, control, bus, stop_requested, spec.parent_pid)
                bus.start_soon(_exit_on_sigterm, bus)
                await bus.start()
                await control.send(Ready())
                await control.drain()  # written before the function runs: it may block the loop at once
                code = await _run_user(spec.fn, bus, link, stop_requested)
                await bus.exit()
            await control.send(Done(link.acknowledged))
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
            return ExitCode.FAILURE  # the message it was working on, if any, stays unacknowledged
        link.acknowledged = link.received  # it returned: done with every message it took
        await stop_requested.wait()
    return ExitCode.OK


class Heartbeat:
    """Called to write a heartbeat to the parent (by a task now and then, and by the link as it waits).

    Heartbeats go over a connection of their own, as fixed-size records written without
    waiting; the parent reads them only when it checks on the child, so an idle child
    costs its parent next to nothing. Each carries the count of messages the child is
    done with, so the parent knows which of those it sent may die with the child.
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


async def _beat(heartbeat: Heartbeat, interval: float) -> None:
    """A heartbeat every ``interval`` seconds: a loop blocked for longer misses some."""
    while True:
        await anyio.sleep(interval)
        heartbeat()


async def _cancel_when_exiting(bus: Bus, scope: anyio.CancelScope) -> None:
    await bus.wait(State.EXITING)
    scope.cancel()


async def _read_control(control: Link, bus: Bus, stop_requested: anyio.Event, parent_pid: int) -> None:
    def log(text: str) -> None:
        bus.log(f"From the parent: {text}", logging.WARNING)

    try:
        while True:
            message = await receive_control(control, log)
            if isinstance(message, Stop):
                stop_requested.set()
            elif isinstance(message, Graceful):
                await bus.graceful()
            else:
                log(f"an unexpected control message was dropped: {message!r}")
    except (anyio.EndOfStream, anyio.BrokenResourceError):
        pass
    if await anyio.to_thread.run_sync(_parent_died, parent_pid, 1.0):
        os.killpg(os.getpgid(0), signal.SIGKILL)  # as the watch thread would: the group goes with it
    stop_requested.set()  # the parent is gone, or said nothing more: nobody will say stop
    await bus.exit()


def _parent_died(parent_pid: int, seconds: float) -> bool:
    """Whether the parent has died, or does within ``seconds`` (its sockets close before it is
    gone): the end of the control link alone does not tell."""
    try:
        fd = os.pidfd_open(parent_pid)
    except ProcessLookupError:
        return True
    except (AttributeError, OSError):
        return os.getppid() != parent_pid
    try:
        readable, _, _ = select.select([fd], [], [], seconds)
        return bool(readable)
    finally:
        os.close(fd)


async def _exit_on_sigterm(bus: Bus) -> None:
    with anyio.open_signal_receiver(signal.SIGTERM) as signals:
        async for _ in signals:
            bus.log("Child got SIGTERM: exiting", logging.WARNING)
            await bus.exit()


def _send_logs_to(sock: socket.socket) -> None:
    """Send every structlog event to the parent as a JSON line on ``sock``.

    Writes wait while the parent has not read (nothing is dropped); a lock keeps lines
    from threads whole. Once the parent is gone, events are dropped.
    """
    sock.setblocking(True)
    lock = threading.Lock()

    def to_parent(logger: Any, method: str, event: MutableMapping[str, Any]) -> str:
        line = encode_log(method, event)
        with lock:
            try:
                sock.sendall(line)
            except OSError:
                pass  # the parent is gone: so is its log
        raise structlog.DropEvent

    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.format_exc_info,
            to_parent,
        ],
        cache_logger_on_first_use=False,
    )
