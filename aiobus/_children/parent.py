"""Child brokers: an async function run in a child process with a bus of its own, linked to the parent.

The parent side. Each incarnation of a :class:`ChildBroker`:

1. opens a private listener (0700 directory, 0600 socket, a fresh token);
2. runs :func:`aiobus._worker.run_child` through ``anyio.to_process.run_sync``, with a
   capacity limiter of its own (a long-lived child never holds a token of anyio's
   default process limiter, nor of another child's);
3. accepts the child's control link, then its data link, and waits for the child's
   bus to be STARTED (its "ready");
4. then relays: the child's log events into the parent's log (with the child's name
   and pid bound), its heartbeats (each of its main ticks), and the user's messages both ways.

Stopping is graceful first: the data link is told that no message follows (the child
drains what was sent before), a stop goes on the control link, and after ``grace``
seconds the child gets SIGTERM, then after ``term_grace`` more SIGKILL.
"""

from __future__ import annotations

import logging
import math
import os
import signal
from collections import deque
from collections.abc import Callable
from typing import Any

import anyio
import anyio.to_process
from anyio.abc import Process

from .._bus import Bus
from .._link import (
    EndOfLink,
    Link,
    LinkOptions,
    Skipped,
    UndecodableFrame,
    UndeliveredMessages,
    check_link_options,
)
from .._private import PrivateListener
from .._supervision import Child, ChildExit, ChildState, Restart, Supervisor
from .child import EndOfInput, HeartbeatReader, ParentLink, Receiver, run_child

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
_LEVELS["critical"] = logging.CRITICAL
_LEVELS["exception"] = logging.ERROR


class _Inbox:
    """Messages from the child not read yet: bounded, so a parent that does not read slows the child."""

    def __init__(self, size: int) -> None:
        self.items: deque[Any] = deque()
        self.size = size
        self._changed = anyio.Event()

    def notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    async def wait(self) -> None:
        await self._changed.wait()

    async def put(self, item: Any) -> None:
        while len(self.items) >= self.size:
            await self.wait()
        self.items.append(item)
        self.notify()


#: Main ticks a child may miss before it counts as hung, unless told otherwise.
HEARTBEAT_MISSES = 20


class ChildUnavailable(RuntimeError):
    """A message could not be sent: the child is not running and did not come back in time."""


class ChildBroker(Child, Receiver):
    """Runs ``fn(bus, link)`` in a child process whose bus follows this one's.

    ``fn`` is an importable async function (module level: it is pickled by reference;
    the script that defines it needs an ``if __name__ == "__main__":`` guard, since the
    worker imports the parent's main module). In the child it gets a started
    :class:`~aiobus.Bus` and a link to the parent; ``async for msg in link`` ends when
    the parent stops the child, after the messages sent before. The child ends once
    ``fn`` has returned and the parent stopped it (or its bus exits on its own).

    Parent started: child started; parent graceful: child graceful; parent stop or
    exit: child exits. Use it like a plugin: ``ChildBroker(bus, "broker", fn).subscribe()``.

    Args:
        bus: the parent's bus.
        name: the child's name, in logs and in the children listing.
        fn: the child's async function.
        restart: ``permanent``, ``transient`` or ``temporary``.
        supervisor: the group it joins; the bus's default group if None.
        grace: seconds the child has to exit after the stop, before SIGTERM.
        term_grace: seconds after SIGTERM before SIGKILL.
        start_timeout: seconds for the child to be ready.
        send_timeout: how long :meth:`send` waits for a child that is down or restarting.
        heartbeat_misses: main ticks the child may miss before it counts as hung and is
            killed (its policy then applies): each of its main ticks is a heartbeat, and
            the parent checks every ``heartbeat_misses`` main intervals that one came.
            None disables hang detection.
        main_interval: the child bus's main interval; the parent's by default.
        max_frame_size: the largest message (pickled) on the link, both ways; a larger
            one is an error at ``send`` (FrameTooLarge) and nothing else is lost.
        high_water: bytes queued on the link before ``send`` waits (backpressure).

    ``fn`` may also be a class whose constructor takes ``(bus, link)`` and whose async
    ``run()`` method is the child's body.
    """

    kind = "broker"

    def __init__(
        self,
        bus: Bus,
        name: str,
        fn: Callable[[Bus, ParentLink], Any],
        *,
        restart: Restart | str = Restart.PERMANENT,
        supervisor: Supervisor | None = None,
        grace: float = 5.0,
        term_grace: float = 2.0,
        start_timeout: float = 30.0,
        send_timeout: float = 10.0,
        heartbeat_misses: int | None = HEARTBEAT_MISSES,
        main_interval: float | None = None,
        max_frame_size: int = 16 * 2**20,
        high_water: int = 2**20,
    ) -> None:
        self._inbox = _Inbox(1000)  # first: the base class sets the state, which wakes readers
        super().__init__(name, restart)
        if not callable(fn):
            raise TypeError(f"the child's function must be callable, not {fn!r}")
        for label, value in (("grace", grace), ("term_grace", term_grace), ("start_timeout", start_timeout)):
            if not isinstance(value, int | float) or not 0 <= value < math.inf:
                raise ValueError(f"{label} must be a finite number of seconds >= 0, not {value!r}")
        if heartbeat_misses is not None and (not isinstance(heartbeat_misses, int) or heartbeat_misses < 1):
            raise ValueError(f"heartbeat_misses must be None or an int >= 1, not {heartbeat_misses!r}")
        self.bus = bus
        self.fn = fn
        self.supervisor = supervisor
        self.grace = grace
        self.term_grace = term_grace
        self.start_timeout = start_timeout
        self.send_timeout = send_timeout
        self.heartbeat_misses = heartbeat_misses
        self.main_interval = bus.main_interval if main_interval is None else main_interval
        self.link_options = LinkOptions(max_frame_size=max_frame_size, high_water=high_water)
        check_link_options(**self.link_options)
        self._limiter = anyio.CapacityLimiter(1)
        self._pid: int | None = None
        self._process: Process | None = None
        self._data: Link | None = None
        self._changed = anyio.Event()  # set (and replaced) when an incarnation comes up or ends
        self._incarnation: _Incarnation | None = None

    # -- messages ---------------------------------------------------------------------

    async def send(self, obj: Any) -> None:
        """Send ``obj`` to the child.

        If the child is down or restarting, waits for the next incarnation up to
        ``send_timeout`` seconds. Returns once the message is queued on the link (it
        waits while the link is full): accepted by the current incarnation, and by no
        other. A message is never dropped silently: if that incarnation ends before its
        function acknowledged the message (asked for the next one, or returned: see
        :class:`~aiobus.ParentLink`), the message is counted in the exit's ``lost``
        (published on ``child_exit``, and said in its ``reason``); it may have been
        processed all the same, but it is never delivered twice.

        Raises:
            ChildUnavailable: no incarnation came up in time, or it went away first.
            aiobus.FrameTooLarge, aiobus.LinkError: ``obj`` cannot be sent (nothing was).

        Cancelled: the message was not queued. Timeout: ``send_timeout`` seconds for a
        child that is down, then ChildUnavailable.
        """
        with anyio.move_on_after(self.send_timeout):
            while self._data is None:
                await self._changed.wait()
        data, incarnation = self._data, self._incarnation
        if data is None or incarnation is None:
            raise ChildUnavailable(f"child {self.name!r} is not running (waited {self.send_timeout:g} s)")
        try:
            await data.send(obj)
        except (anyio.ClosedResourceError, anyio.BrokenResourceError) as error:
            raise ChildUnavailable(f"child {self.name!r} went away before the message was queued") from error
        incarnation.sent += 1

    async def receive(self) -> Any:
        """The next message from the child, from whichever incarnation sent it.

        Waits while the child runs, starts or restarts. Messages a child sent before it
        ended are still delivered.

        Raises:
            EndOfLink: nothing is left to read and the child is stopped, or will not be
                restarted.
            UndecodableFrame: the child's next message does not unpickle here (it is
                logged too); the call after returns the message after it.

        Cancelled: nothing is lost; the next message stays for the next call. No timeout
        of its own (wrap it in ``anyio.fail_after``).
        """
        inbox = self._inbox
        while not inbox.items:
            if self._data is None and self.state in (ChildState.STOPPED, ChildState.EXITED, ChildState.FAILED):
                raise EndOfLink(f"child {self.name!r} is {self.state}")
            await inbox.wait()  # woken by a message, a new incarnation or a change of state
        message = inbox.items.popleft()
        inbox.notify()
        if type(message) is Skipped:
            raise message.error
        return message

    def state_changed(self) -> None:
        self._inbox.notify()

    def _set_data(self, data: Link | None) -> None:
        self._data = data
        self._changed.set()
        self._changed = anyio.Event()
        self._inbox.notify()

    # -- the Child protocol -----------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self._pid

    async def spawn(self) -> None:
        incarnation = _Incarnation(self)
        self._incarnation = incarnation
        self.bus.start_soon(incarnation.run, name=f"aiobus child {self.name}")
        with anyio.move_on_after(self.start_timeout) as scope:
            await incarnation.ready.wait()
        if scope.cancelled_caught:
            incarnation.failure = TimeoutError(f"child {self.name!r} was not ready within {self.start_timeout:g} s")
        if incarnation.failure is not None:
            incarnation.kill()
            await incarnation.ended.wait()
            raise incarnation.failure

    async def wait(self) -> ChildExit:
        assert self._incarnation is not None
        await self._incarnation.ended.wait()
        assert self._incarnation.exit is not None
        return self._incarnation.exit

    @property
    def stop_budget(self) -> float:
        return self.grace + self.term_grace

    async def terminate(self, budget: float | None = None) -> None:
        incarnation = self._incarnation
        if incarnation is None or incarnation.ended.is_set():
            return
        await incarnation.stop()

    async def graceful(self) -> None:
        if self._incarnation is not None:
            await self._incarnation.send_control(("graceful",))


class _Incarnation:
    """One run of a child process, from its start to its end."""

    def __init__(self, child: ChildBroker) -> None:
        self.child = child
        self.bus = child.bus
        self.ready = anyio.Event()
        self.ended = anyio.Event()
        self.failure: BaseException | None = None
        self.exit: ChildExit | None = None
        self.stopping = False
        self.killed_by: str | None = None
        self.pid: int | None = None
        self.control: Link | None = None
        self.undelivered = 0
        self.sent = 0  # messages accepted by send() for this incarnation
        self.acknowledged = 0  # of those, how many the child said its function was done with
        self._process: Process | None = None
        self._popen: Any = None
        self._scope = anyio.CancelScope()
        self._worker_done = anyio.Event()
        self._result: tuple[int | None, str | None, str] = (None, None, "ended")

    async def run(self) -> None:
        try:
            with self._scope:
                async with anyio.create_task_group() as group:
                    async with PrivateListener(log=self.bus.log) as listener:
                        group.start_soon(self._run_worker, listener.address, listener.token)
                        control = await self._accept(listener, LinkOptions())
                        data = await self._accept(listener, self.child.link_options)
                        beats = await self._accept(listener, LinkOptions())
                    try:
                        async with control, data, beats:
                            await self._serve(control, data, beats)
                    except UndeliveredMessages as lost:
                        self.undelivered = lost.count
        except Exception as error:
            if not self.ready.is_set():
                self.failure = _leaf(error)
            else:
                self.bus.log(f"Child {self.child.name}: {error!r}", logging.ERROR)
        finally:
            self._finish()

    async def _accept(self, listener: PrivateListener, options: LinkOptions) -> Link:
        """The next link from the worker; fails at once if the worker ends before it connects."""
        link: Link | None = None
        error: BaseException | None = None
        async with anyio.create_task_group() as race:

            async def stop_when_worker_ends() -> None:
                await self._worker_done.wait()
                race.cancel_scope.cancel()

            race.start_soon(stop_when_worker_ends)
            try:
                link = await listener.accept(timeout=self.child.start_timeout, **options)
            except TimeoutError as timeout:
                error = timeout
            race.cancel_scope.cancel()
        if error is not None:
            raise error
        if link is None:
            raise RuntimeError(f"child {self.child.name!r} ended before it connected: {self._result[2]}")
        return link

    async def _serve(self, control: Link, data: Link, beats: Link) -> None:
        self.control = control
        while (message := await control.receive()) != ("ready",):  # logs come before, and the pid
            if message[0] == "hello":
                self.pid = self.child._pid = int(message[1])
                self._process = _find_worker(self.pid)
                self._popen = _popen_of(self._process)
            else:
                self._on_control(message)
        assert beats.raw_socket is not None  # a Unix socket, from the private listener
        heartbeats = HeartbeatReader(beats.raw_socket)
        if self.failure is not None:
            return  # spawn gave up on it (too late): no message may go to it
        self.child._set_data(data)
        self.ready.set()
        relayed = anyio.Event()
        try:
            async with anyio.create_task_group() as helpers:
                helpers.start_soon(self._relay, data, relayed)
                helpers.start_soon(self._watch_heartbeats, heartbeats)
                try:
                    async for message in control:
                        self._on_control(message)
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    pass
                self._take_heartbeats(heartbeats)  # the child's last word on what it is done with
                # The child is ending: no message goes to it any more (send waits for the
                # next incarnation); what it sent before is still on its way.
                self.child._set_data(None)
                with anyio.move_on_after(self.child.grace):
                    await relayed.wait()
                helpers.cancel_scope.cancel()
        finally:
            self.child._set_data(None)

    async def _relay(self, data: Link, done: anyio.Event) -> None:
        try:
            while True:
                try:
                    message: Any = await data.receive()
                except UndecodableFrame as error:
                    # That message only: logged, and raised in its turn by ChildBroker.receive.
                    self.bus.log(
                        f"Child {self.child.name}: {error}", logging.ERROR, child=self.child.name, child_pid=self.pid
                    )
                    message = Skipped(error)
                await self.child._inbox.put(message)
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass
        finally:
            done.set()

    def _on_control(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "tick":
            self.acknowledged = max(self.acknowledged, int(message[1]))
        elif kind == "log":
            event = dict(message[1])
            text = str(event.pop("event", ""))
            level = _LEVELS.get(str(event.pop("level", "info")).lower(), logging.INFO)
            event.pop("timestamp", None)
            self.bus.log(text, level, child=self.child.name, child_pid=self.pid, **event)

    async def _watch_heartbeats(self, heartbeats: HeartbeatReader) -> None:
        """Look at the child's heartbeats every ``heartbeat_misses`` main intervals (only
        then: cheap with many children); none since the last look means it hung."""
        misses = self.child.heartbeat_misses
        period = (misses or HEARTBEAT_MISSES) * self.child.main_interval  # without hang detection, still read
        while True:
            await anyio.sleep(period)
            if self._take_heartbeats(heartbeats) or misses is None or self.stopping:
                continue
            self.bus.log(f"Child {self.child.name} hung: no heartbeat for {period:.1f} s", logging.ERROR)
            self.killed_by = f"hung (no heartbeat for {period:.1f} s)"
            self._signal(signal.SIGKILL)
            return

    def _take_heartbeats(self, heartbeats: HeartbeatReader) -> bool:
        arrived, acknowledged = heartbeats.take()
        if acknowledged is not None:
            self.acknowledged = max(self.acknowledged, acknowledged)
        return arrived

    async def _run_worker(self, address: str, token: bytes) -> None:
        child = self.child
        try:
            await anyio.to_process.run_sync(
                run_child,
                address,
                token,
                child.fn,
                child.name,
                os.getpid(),
                child.main_interval,
                child.link_options,
                cancellable=True,
                limiter=child._limiter,
            )
            self._result = (0, None, "returned")
        except SystemExit as done:
            code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
            self._result = (code, None, "exited" if code == 0 else f"exited with code {code}")
            await self._reap_worker()
        except anyio.BrokenWorkerProcess:
            returncode = _returncode(self._process, self._popen)
            if returncode is not None and returncode < 0:
                name = signal.Signals(-returncode).name
                self._result = (None, name, f"killed by {name}")
            else:
                self._result = (returncode, None, "died")
        except Exception as error:
            self._result = (1, None, f"failed: {error!r}")
        finally:
            self._worker_done.set()

    async def _reap_worker(self) -> None:
        """Wait for the worker to end after its SystemExit, and close its pipes.

        anyio puts the worker back in its idle pool even though it is ending; until it is
        reaped, the next call (a restart, or a start after a stop) could be handed that
        dying worker. Once reaped, anyio sees its return code and drops it.
        """
        process = self._process
        if process is None:
            return
        with anyio.CancelScope(shield=True):
            with anyio.move_on_after(self.child.grace + self.child.term_grace):
                await process.wait()
            if process.returncode is None:  # stuck in its interpreter's shutdown
                self._signal(signal.SIGKILL)
            await process.aclose()

    async def send_control(self, message: tuple[Any, ...]) -> None:
        if self.control is not None:
            try:
                await self.control.send(message)
            except (anyio.ClosedResourceError, anyio.BrokenResourceError):
                pass

    async def stop(self) -> None:
        """The data link says no more, stop on control, then grace, SIGTERM, term_grace, SIGKILL."""
        self.stopping = True
        data = self.child._data
        if data is not None:
            try:
                await data.send(EndOfInput())
            except (anyio.ClosedResourceError, anyio.BrokenResourceError):
                pass
        await self.send_control(("stop",))
        with anyio.move_on_after(self.child.grace):
            await self.ended.wait()
            return
        self.bus.log(f"Child {self.child.name} still running after {self.child.grace:g} s: SIGTERM", logging.WARNING)
        self.killed_by = "terminated after the grace period"
        self._signal(signal.SIGTERM)
        with anyio.move_on_after(self.child.term_grace):
            await self.ended.wait()
            return
        self.bus.log(f"Child {self.child.name} still running after SIGTERM: SIGKILL", logging.WARNING)
        self.killed_by = "killed after the grace period"
        self.kill()
        await self.ended.wait()

    def kill(self) -> None:
        if not self._signal(signal.SIGKILL):
            self._scope.cancel()  # no pid yet: cancelling the call kills the worker

    def _signal(self, sig: signal.Signals) -> bool:
        if self.pid is None or self.ended.is_set():
            return False
        try:
            os.kill(self.pid, sig)
        except ProcessLookupError:
            pass
        return True

    def _finish(self) -> None:
        if not self.ready.is_set() and self.failure is None:
            self.failure = RuntimeError(f"child {self.child.name!r} ended before it was ready: {self._result[2]}")
        code, sig, reason = self._result
        if self.killed_by is not None and not self.stopping:
            reason = self.killed_by
        elif self.killed_by is not None:
            reason = f"{reason} ({self.killed_by})"
        lost = max(0, self.sent - self.acknowledged)
        if lost:
            # Written or not, these may have died with the child: never silently.
            reason = (
                f"{reason}; {lost} message(s) sent to it were not acknowledged "
                f"({self.undelivered} never written): they may be lost"
            )
        self.exit = ChildExit(self.child.name, self.pid, code, sig, reason, expected=self.stopping, lost=lost)
        self.child._pid = None
        self.child._set_data(None)
        self.ended.set()
        self.ready.set()


def _popen_of(process: Process | None) -> Any:
    """The ``subprocess.Popen`` under an anyio process on asyncio, if it can be found."""
    return getattr(getattr(process, "_transport", None), "_proc", None)


def _returncode(process: Process | None, popen: Any) -> int | None:
    """How the worker ended, even when asyncio lost it.

    When a worker dies, anyio kills it to be sure; on asyncio that ``kill`` first polls
    the ``subprocess.Popen`` underneath, which may reap the zombie before asyncio's
    child watcher does: the watcher then reports 255 ("Unknown child process"). The
    ``Popen`` (taken while the worker ran: asyncio lets go of it later) knows the truth.
    """
    if process is None:
        return None
    code = process.returncode
    if code == 255 and popen is not None and isinstance(popen.returncode, int):
        return int(popen.returncode)
    return code


def _leaf(error: BaseException) -> BaseException:
    """The first error inside (nested) exception groups."""
    while isinstance(error, BaseExceptionGroup) and error.exceptions:
        error = error.exceptions[0]
    return error


def _find_worker(pid: int) -> Process | None:
    """anyio's process object of the worker with this pid, to read how it ended.

    anyio keeps its workers in a private run variable; if that changes, the exit of a
    killed child is reported without its signal.
    """
    try:
        workers = anyio.to_process._process_pool_workers.get()
    except (AttributeError, LookupError):
        return None
    return next((process for process in workers if process.pid == pid), None)
