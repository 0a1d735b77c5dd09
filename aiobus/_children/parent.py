"""The parent's side of a child broker: :class:`ChildBroker`, and one run of it (:class:`_Incarnation`).

Each incarnation:

1. starts a worker process of its own (:func:`.workers.start_worker`) with the sockets of
   the protocol (:mod:`.messages`), and runs :func:`.child.run_child` in it through
   ``anyio.to_process.run_sync`` (:func:`.workers.run_in_worker`);
2. logs the worker's descriptors 1 and 2 line by line (:mod:`.output`), and its structlog
   events (JSON lines), with the child's name and pid;
3. waits for the child's :class:`~.messages.Ready` (its bus is STARTED), then relays the
   user's messages both ways, and reads the child's heartbeats now and then.

Stopping is graceful first and bounded in all: the data link gets its last message
(:class:`~.messages.EndOfInput`, queued without waiting), a :class:`~.messages.Stop` goes
on the control link, and after ``grace`` seconds the child gets SIGTERM, then after
``term_grace`` more SIGKILL, whatever the state of its links. What is left of the worker's
process group is killed, and the worker reaped, before the incarnation counts as ended.
"""

from __future__ import annotations

import logging
import math
import os
import pickle
import signal
import socket
from collections import deque
from collections.abc import Callable
from typing import Any

import anyio
from anyio.abc import ByteReceiveStream, ObjectReceiveStream, UNIXSocketStream

from .._bus import Bus
from .._link import EndOfLink, Link, LinkOptions, Skipped, UndecodableFrame, UndeliveredMessages, check_link_options
from .._seconds import check_seconds
from .._supervision import Child, ChildExit, ChildState, Restart, Supervisor
from .child import ParentLink, run_child
from .messages import (
    BEAT,
    MAX_LOG_LINE,
    ChildSpec,
    Done,
    EndOfInput,
    Graceful,
    Ready,
    Stop,
    decode_log,
    receive_control,
)
from .output import forward_lines
from .workers import MainGuardMissing, Worker, WorkerError, importing_main_in_a_worker, run_in_worker, start_worker

#: Seconds without a heartbeat before a child counts as hung, unless told otherwise: a
#: message may take minutes of blocking work.
HANG_TIMEOUT = 300.0
#: Heartbeats a child sends in each ``hang_timeout`` (the parent looks once in each).
BEATS_PER_CHECK = 4
#: The bytes of messages from a child that wait unread in the parent, unless told otherwise.
INBOX_BYTES = 16 * 2**20
#: What each message counts in the inbox besides its pickled size (the objects it unpickles to).
MESSAGE_OVERHEAD = 64
#: While a child stops or ends, its inbox takes in up to this many times its bound.
DRAIN_FACTOR = 4
#: Seconds to read what is left of a worker's output once it has ended.
OUTPUT_DRAIN = 5.0
#: Lines of a worker's stderr kept to explain a failure to start.
LAST_LINES = 10


class ChildUnavailable(RuntimeError):
    """A message could not be sent: the child is not running and did not come back in time."""


class _Inbox:
    """Messages from the child not read yet, bounded in bytes: a parent that does not read
    stops reading the link, so the child's ``send`` waits."""

    def __init__(self, size: int) -> None:
        self.items: deque[tuple[Any, int]] = deque()
        self.size = size
        self.bytes = 0
        self._changed = anyio.Event()

    def notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    async def wait(self) -> None:
        await self._changed.wait()

    @property
    def full(self) -> bool:
        """Whether the next message must wait (one message always fits in an empty inbox)."""
        return bool(self.items) and self.bytes >= self.size

    def put(self, item: Any, size: int) -> None:
        cost = size + MESSAGE_OVERHEAD
        self.items.append((item, cost))
        self.bytes += cost
        self.notify()

    def take(self) -> Any:
        item, cost = self.items.popleft()
        self.bytes -= cost
        self.notify()
        return item


class ChildBroker(Child, ObjectReceiveStream[Any]):
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
        significant: when it ends for good (a normal exit of a transient or temporary
            child, or its restarts exhausted), the bus exits: code 0 if it ended cleanly, 70
            otherwise.
        grace: seconds the child has to exit after the stop, before SIGTERM.
        term_grace: seconds after SIGTERM before SIGKILL.
        start_timeout: seconds for the child to be ready.
        send_timeout: how long :meth:`send` waits for a child that is down or restarting.
        hang_timeout: seconds without a heartbeat (the child sends four in each)
            before the child counts as hung and is killed (its policy then applies); the
            parent looks every ``hang_timeout`` seconds, so a hang is found after one to
            two of them. None disables hang detection. Work that blocks the child's event
            loop for longer belongs in ``anyio.to_thread.run_sync``.
        heartbeat_misses: the same as ``hang_timeout``, counted in the child's main
            intervals (the setting of earlier versions); it wins when given.
        main_interval: the child bus's main interval; the parent's by default.
        max_frame_size: the largest message (pickled) on the link, both ways; a larger
            one is an error at ``send`` (FrameTooLarge) and nothing else is lost.
        high_water: bytes queued on the link before ``send`` waits (backpressure).
        inbox_bytes: bytes of the child's messages (pickled, plus 64 each) that may wait
            unread in the parent; past it the parent stops reading the link, so the child's
            ``send`` waits. A single larger message still fits in an empty inbox.
        max_line: the longest line of the child's output (``print``, stderr, subprocesses)
            logged whole, in bytes; the rest of a longer one is cut with a marker.
        workers: None: one child process. A number: a pool of that many workers running
            ``fn``, each a child of its own named ``name[0]``, ``name[1]``... (see
            :meth:`scale`); they start together and stop together, each is restarted
            alone, and their messages share one inbox of ``inbox_bytes``.

    Raises:
        TypeError: ``fn`` is not callable, or cannot be pickled (defined inside a function,
            a lambda...): the worker could not find it.
        RuntimeError: it is made while a child's process imports the parent's main module,
            which so lacks the ``if __name__ == "__main__":`` guard (the parent's start then
            fails naming the guard).
        ValueError: a number is out of range.

    ``fn`` may also be a class whose constructor takes ``(bus, link)`` and whose async
    ``run()`` method is the child's body.

    A pool: :meth:`send` gives each message to the running worker with the fewest
    messages not yet done with (ties in turn), with the accounting of a single child (that
    worker's ``lost`` if it dies first); :meth:`receive` returns the messages of every
    worker, in the order they arrived. The pool is not a child itself: its
    :attr:`members` are, in the supervisor's listing; :meth:`subscribe` adds them.
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
        significant: bool = False,
        grace: float = 5.0,
        term_grace: float = 2.0,
        start_timeout: float = 30.0,
        send_timeout: float = 10.0,
        hang_timeout: float | None = HANG_TIMEOUT,
        heartbeat_misses: int | None = None,
        main_interval: float | None = None,
        max_frame_size: int = 16 * 2**20,
        high_water: int = 2**20,
        inbox_bytes: int = INBOX_BYTES,
        max_line: int = 65536,
        workers: int | None = None,
    ) -> None:
        self._inbox = _Inbox(inbox_bytes)  # first: the base class sets the state, which wakes readers
        super().__init__(name, restart, significant=significant)
        _check_main_guard()
        _check_function(fn)
        for label, value in (
            ("grace", grace),
            ("term_grace", term_grace),
            ("start_timeout", start_timeout),
            ("send_timeout", send_timeout),
        ):
            check_seconds(label, value)
        check_seconds("hang_timeout", hang_timeout, positive=True, optional=True)
        if heartbeat_misses is not None and (
            isinstance(heartbeat_misses, bool) or not isinstance(heartbeat_misses, int) or heartbeat_misses < 1
        ):
            raise ValueError(f"heartbeat_misses must be None or an int >= 1, not {heartbeat_misses!r}")
        for label, number in (("inbox_bytes", inbox_bytes), ("max_line", max_line)):
            if isinstance(number, bool) or not isinstance(number, int) or number < 1:
                raise ValueError(f"{label} must be a number of bytes >= 1, not {number!r}")
        self.bus = bus
        self.fn = fn
        self.supervisor = supervisor
        self.grace = grace
        self.term_grace = term_grace
        self.start_timeout = start_timeout
        self.send_timeout = send_timeout
        self.main_interval = bus.main_interval if main_interval is None else main_interval
        self.heartbeat_misses = heartbeat_misses
        self.hang_timeout = hang_timeout if heartbeat_misses is None else heartbeat_misses * self.main_interval
        self.max_line = max_line
        self.link_options = LinkOptions(max_frame_size=max_frame_size, high_water=high_water)
        check_link_options(**self.link_options)
        self._closed = False
        self._pid: int | None = None
        self._data: Link | None = None
        self._changed = anyio.Event()  # set (and replaced) when an incarnation comes up or ends
        self._incarnation: _Incarnation | None = None
        if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
            raise ValueError(f"workers must be None or an int >= 1, not {workers!r}")
        self._pool: list[ChildBroker] | None = None
        self._retiring: set[int] = set()  # id() of workers a shrinking pool is stopping
        self._turn = 0  # where the pool's next tie goes
        self._options: dict[str, Any] = {
            "restart": self.restart,
            "significant": significant,
            "grace": grace,
            "term_grace": term_grace,
            "start_timeout": start_timeout,
            "send_timeout": send_timeout,
            "hang_timeout": hang_timeout,
            "heartbeat_misses": heartbeat_misses,
            "main_interval": main_interval,
            "max_frame_size": max_frame_size,
            "high_water": high_water,
            "max_line": max_line,
        }
        if workers is not None:
            self._pool = [self._new_worker(index) for index in range(workers)]

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
            ChildUnavailable: no incarnation came up in time, or it went away (or began
                to stop) before the message was queued.
            aiobus.FrameTooLarge, aiobus.LinkError: ``obj`` cannot be sent (nothing was).

        Cancelled: the message was not queued. Timeout: ``send_timeout`` seconds for a
        child that is down, then ChildUnavailable.
        """
        if self._pool is not None:
            await self._send_to_pool(obj)
            return
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
            anyio.ClosedResourceError: :meth:`aclose` was called.

        Cancelled: nothing is lost; the next message stays for the next call. No timeout
        of its own (wrap it in ``anyio.fail_after``).
        """
        inbox = self._inbox
        while not inbox.items:
            if self._closed:
                raise anyio.ClosedResourceError
            if self._read_all():
                raise EndOfLink(f"child {self.name!r} is {self._pool_state()}")
            await inbox.wait()  # woken by a message, a new incarnation or a change of state
        if self._closed:
            raise anyio.ClosedResourceError
        message = inbox.take()
        if type(message) is Skipped:
            raise message.error
        return message

    async def aclose(self) -> None:
        """Read no more: later :meth:`receive` calls raise ClosedResourceError, and the
        messages waiting unread are let go (the child itself runs on until the bus stops it)."""
        self._closed = True
        while self._inbox.items:
            self._inbox.take()

    def state_changed(self) -> None:
        self._inbox.notify()

    def _read_all(self) -> bool:
        """Whether nothing more can come: no incarnation runs, and none will."""
        if self._pool is not None:
            return all(worker._read_all() for worker in self._pool)
        return self._data is None and self.state in (ChildState.STOPPED, ChildState.EXITED, ChildState.FAILED)

    def _pool_state(self) -> str:
        if self._pool is None:
            return str(self.state)
        return ", ".join(f"{worker.name} {worker.state}" for worker in self._pool)

    # -- a pool -------------------------------------------------------------------------

    @property
    def members(self) -> tuple[ChildBroker, ...]:
        """A pool's workers (each a child of the supervisor), or ``(self,)`` for a single child."""
        return (self,) if self._pool is None else tuple(self._pool)

    def _new_worker(self, index: int) -> ChildBroker:
        worker = ChildBroker(self.bus, f"{self.name}[{index}]", self.fn, supervisor=self.supervisor, **self._options)
        worker._inbox = self._inbox  # one inbox for the pool, bounded as a whole
        worker.batch = self
        return worker

    async def _send_to_pool(self, obj: Any) -> None:
        assert self._pool is not None
        with anyio.move_on_after(self.send_timeout):
            while not self._ready_workers():
                await self._inbox.wait()  # woken as a worker comes up or ends
        ready = self._ready_workers()
        if not ready:
            raise ChildUnavailable(f"no worker of pool {self.name!r} is running (waited {self.send_timeout:g} s)")
        count = len(self._pool)
        order = {id(worker): index for index, worker in enumerate(self._pool)}
        chosen = min(ready, key=lambda worker: (worker._unfinished(), (order[id(worker)] - self._turn) % count))
        self._turn = order[id(chosen)] + 1
        await chosen.send(obj)

    def _ready_workers(self) -> list[ChildBroker]:
        assert self._pool is not None
        return [worker for worker in self._pool if worker._data is not None and id(worker) not in self._retiring]

    def _unfinished(self) -> int:
        """Messages accepted for the running incarnation that its function is not done with yet."""
        incarnation = self._incarnation
        return 0 if incarnation is None else incarnation.unfinished()

    async def scale(self, workers: int) -> None:
        """Grow or shrink a pool to ``workers`` workers.

        New workers join the supervisor and, if it runs, start at once (together); the
        call returns once they are ready. Workers taken away (the last ones) get no new
        message, and stop gracefully: each finishes what it was sent (its input ends
        after it), within its stop budget; they then leave the supervisor.

        Raises:
            TypeError: this is a single child (made without ``workers``).
            ValueError: ``workers`` is not an int >= 1.
            Exception: a new worker could not start (it is taken away again).

        Cancelled: starts are undone (nothing of a new worker runs); stops complete.
        """
        if self._pool is None:
            raise TypeError(f"child {self.name!r} is not a pool: make it with workers=N to scale it")
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers must be an int >= 1, not {workers!r}")
        group = self._group()
        subscribed = any(worker in group._children for worker in self._pool)
        if workers < len(self._pool):
            leaving = self._pool[workers:]
            self._retiring.update(id(worker) for worker in leaving)
            try:
                async with anyio.create_task_group() as stops:
                    for worker in leaving:
                        stops.start_soon(group.stop_child, worker)
            finally:
                for worker in leaving:
                    if worker in group._children:
                        group.remove(worker)
                    self._pool.remove(worker)
                    self._retiring.discard(id(worker))
            return
        joining = [self._new_worker(index) for index in range(len(self._pool), workers)]
        self._pool.extend(joining)
        if not subscribed:
            return
        try:
            for worker in joining:
                group.add(worker)
            if group._scope is not None:  # the group runs: they start now
                await group._spawn_step(list[Child](joining))
        except BaseException:
            with anyio.CancelScope(shield=True):
                for worker in joining:
                    await group.stop_child(worker)
                    group.remove(worker)
                    self._pool.remove(worker)
            raise

    def _set_data(self, data: Link | None) -> None:
        self._data = data
        self._changed.set()
        self._changed = anyio.Event()
        self._inbox.notify()

    # -- the Child protocol -----------------------------------------------------------

    @property
    def pid(self) -> int | None:
        """The running worker's pid (a pool: None, see :attr:`members`)."""
        return self._pid

    @property
    def stop_budget(self) -> float:
        return self.grace + self.term_grace

    async def spawn(self) -> None:
        """Start an incarnation and return once its bus is STARTED.

        Raises:
            TimeoutError: not ready within ``start_timeout`` (it is killed).
            Exception: it could not start (the worker died, the main module failed to load,
                the child's start failed); nothing of it is left running.

        Cancelled: the incarnation is killed and reaped before the cancellation goes on.
        """
        if self._pool is not None:
            raise TypeError(f"pool {self.name!r} is not a child itself: its members are")
        incarnation = _Incarnation(self)
        self._incarnation = incarnation
        self.bus.start_soon(incarnation.run, name=f"aiobus child {self.name}")
        try:
            with anyio.move_on_after(self.start_timeout) as scope:
                await incarnation.ready.wait()
            if scope.cancelled_caught:
                incarnation.failure = TimeoutError(f"child {self.name!r} was not ready within {self.start_timeout:g} s")
            if incarnation.failure is not None:
                raise incarnation.failure
        except BaseException:
            with anyio.CancelScope(shield=True):
                incarnation.kill()
                await incarnation.ended.wait()
            raise

    async def wait(self) -> ChildExit:
        assert self._incarnation is not None
        await self._incarnation.ended.wait()
        assert self._incarnation.exit is not None
        return self._incarnation.exit

    async def terminate(self, budget: float | None = None) -> None:
        incarnation = self._incarnation
        if incarnation is None or incarnation.ended.is_set():
            return
        await incarnation.stop(budget)

    async def graceful(self) -> None:
        if self._incarnation is not None:
            await self._incarnation.send_control(Graceful())


def _check_main_guard() -> None:
    """Refuse to be made while a child's worker imports the parent's main module: that script
    runs its service on import, which would start a child again, and so on."""
    main = importing_main_in_a_worker()
    if main is not None:
        raise MainGuardMissing(
            f"the main module {main} starts its service when it is imported: a script that uses a ChildBroker "
            'needs the `if __name__ == "__main__":` guard around the code that runs it (the child\'s process '
            "imports the main module again, to find the child's function)"
        )


def _check_function(fn: object) -> None:
    if not callable(fn):
        raise TypeError(f"the child's function must be callable, not {fn!r}")
    try:
        pickle.dumps(fn)
    except Exception as error:
        raise TypeError(
            f"the child's function {fn!r} cannot be sent to a child process ({error}): "
            "define it at the top level of a module"
        ) from None


class _Incarnation:
    """One run of a child process, from its start to its end."""

    def __init__(self, child: ChildBroker) -> None:
        self.child = child
        self.bus = child.bus
        self.ready = anyio.Event()
        self.ended = anyio.Event()
        self.failure: BaseException | None = None
        self.exit: ChildExit | None = None
        self.worker: Worker | None = None
        self.control: Link | None = None
        self.data: Link | None = None
        self.stopping = False
        self.killed_by: str | None = None
        self.undelivered = 0
        self.sent = 0  # messages accepted by send() for this incarnation
        self.acknowledged = 0  # of those, how many the child said its function was done with
        self._scope = anyio.CancelScope()
        self._ran: BaseException | None = None  # how run_sync ended, if it raised
        self._run_done = anyio.Event()
        self._worker_gone = anyio.Event()  # the worker process has ended, or never was (set with ended at the latest)
        self._draining = False  # the child is stopping or ending: see _drain
        self._relayed_all = False  # the relay read the data link to its end
        self._last_lines: deque[str] = deque(maxlen=LAST_LINES)  # of its stderr, for a failure to start
        self._stop_limit = math.inf  # when a stop must be over (a budget shortens it)
        self._stop_changed = anyio.Event()
        self.beats: HeartbeatReader | None = None
        self._beaten = False  # a heartbeat arrived since the hang watch last looked

    @property
    def pid(self) -> int | None:
        return None if self.worker is None else self.worker.pid

    def unfinished(self) -> int:
        """Messages sent to this incarnation that its function is not done with (as of its last heartbeat)."""
        if self.beats is not None and self.sent > self.acknowledged:
            self._take_heartbeats(self.beats)
        return max(0, self.sent - self.acknowledged)

    async def run(self) -> None:
        try:
            with self._scope:
                self.worker = worker = await start_worker()
                self.child._pid = worker.pid
                await self._run_and_forward(worker)
        except Exception as error:
            if not self.ready.is_set():
                if self.failure is None:  # spawn's own (a start timeout) says more
                    self.failure = self._explained(_leaf(error))
            else:
                self.bus.log(f"Child {self.child.name}: {error!r}", logging.ERROR, child=self.child.name)
        finally:
            with anyio.CancelScope(shield=True):
                if self.worker is not None:
                    await self.worker.aclose()
            self._finish()

    async def _run_and_forward(self, worker: Worker) -> None:
        """Run the child, logging its output all along and draining it once the worker has ended."""
        failure: Exception | None = None
        async with anyio.create_task_group() as output:
            output.start_soon(self._forward, worker.stdout, "stdout")
            output.start_soon(self._forward, worker.stderr, "stderr")
            output.start_soon(self._forward_logs, worker.sockets["logs"])
            try:
                await self._run(worker)
            except Exception as error:
                failure = error
            # What the worker (and what is left of its group) wrote is read to its end, then the pipes close.
            worker.signal(signal.SIGKILL)
            with anyio.CancelScope(shield=True):
                await worker.process.wait()
            worker.kill_group()
            output.cancel_scope.deadline = anyio.current_time() + OUTPUT_DRAIN
        if failure is not None:
            raise failure

    def _explained(self, error: BaseException) -> BaseException:
        """``error``, with the last lines the worker wrote to descriptor 2, if any, in its message."""
        if not self._last_lines:
            return error
        lines = "\n  ".join(self._last_lines)
        explained = type(error)(f"{error}; its last lines on stderr:\n  {lines}") if _rebuildable(error) else error
        if explained is not error:
            explained.__cause__ = error.__cause__
        return explained

    async def _run(self, worker: Worker) -> None:
        """Run the child in ``worker`` and serve it until the worker has ended."""
        spec = ChildSpec(
            self.child.fn,
            self.child.name,
            os.getpid(),
            worker.pid,
            self.child.main_interval,
            self.child.link_options,
            worker.child_fds,
            None if self.child.hang_timeout is None else self.child.hang_timeout / BEATS_PER_CHECK,
        )
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(self._run_worker, worker, spec)
            try:
                async with (
                    Link(await UNIXSocketStream.from_socket(worker.sockets["control"]), name="control") as control,
                    Link(await UNIXSocketStream.from_socket(worker.sockets["data"]), **self.child.link_options) as data,
                ):
                    self.control, self.data = control, data
                    self.beats = HeartbeatReader(worker.sockets["beats"])
                    await self._serve(control, data, self.beats)
            except UndeliveredMessages as lost:
                self.undelivered = lost.count
            with anyio.move_on_after(self.child.grace + self.child.term_grace):
                await self._run_done.wait()  # the child said its last word: its interpreter is ending
            worker.signal(signal.SIGKILL)  # stuck in its interpreter's shutdown, if it runs still
        if self._ran is not None and not self.ready.is_set():
            raise self._ran

    async def _run_worker(self, worker: Worker, spec: ChildSpec) -> None:
        try:
            await run_in_worker(worker, run_child, spec)
        except SystemExit:
            pass  # the child's end: its exit code is the worker's
        except anyio.BrokenWorkerProcess:
            pass  # it died: how, its process says
        except Exception as error:
            # It never ran the child (not its own worker), or the child's start failed: the
            # worker would wait for anyio's next request.
            self._ran = error
            worker.signal(signal.SIGKILL)
        finally:
            await worker.process.wait()
            self._worker_gone.set()
            self._run_done.set()

    async def _serve(self, control: Link, data: Link, beats: HeartbeatReader) -> None:
        try:
            while not isinstance(message := await receive_control(control, self._dropped), Ready):
                self._on_control(message)
        except (anyio.EndOfStream, anyio.BrokenResourceError):
            await self._run_done.wait()  # the worker has ended: why, run_sync may say
            if self._ran is not None:
                raise self._ran from None
            ending = self.worker.ending().reason if self.worker is not None else "never started"
            raise WorkerError(f"child {self.child.name!r} ended before it was ready: {ending}") from None
        if self.failure is not None:
            return  # spawn gave up on it (too late): no message may go to it
        self.child._set_data(data)
        self.ready.set()
        relayed = anyio.Event()
        try:
            async with anyio.create_task_group() as helpers:
                helpers.start_soon(self._relay, data, relayed)
                helpers.start_soon(self._watch_heartbeats, beats)
                try:
                    while True:
                        self._on_control(await receive_control(control, self._dropped))
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    pass
                self._take_heartbeats(beats)  # the child's last word on what it is done with
                # The child is ending: no message goes to it any more (send waits for the
                # next incarnation); what it sent before is still on its way, taken in past
                # the inbox's bound (see _relay).
                self.child._set_data(None)
                self._drain()
                with anyio.move_on_after(self.child.grace):
                    await relayed.wait()
                helpers.cancel_scope.cancel()
            if not self._relayed_all:
                self.bus.log(
                    f"Child {self.child.name} ended with messages to the parent still unread: the parent did "
                    f"not read them ({self.child._inbox.bytes} bytes wait in its inbox); what the child held "
                    "back then is lost",
                    logging.WARNING,
                    child=self.child.name,
                    child_pid=self.pid,
                )
        finally:
            self.child._set_data(None)

    async def _relay(self, data: Link, done: anyio.Event) -> None:
        try:
            while True:
                try:
                    message: Any = await data.receive()
                except UndecodableFrame as error:
                    # That message only: logged, and raised in its turn by ChildBroker.receive.
                    self.bus.log(f"Child {self.child.name}: {error}", logging.ERROR, child=self.child.name)
                    message = Skipped(error)
                inbox = self.child._inbox
                while inbox.full and not (self._draining and inbox.bytes < inbox.size * DRAIN_FACTOR):
                    await inbox.wait()
                inbox.put(message, data.last_size)
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
            self._relayed_all = True  # up to the link's end: nothing the child sent is left unread
        finally:
            done.set()

    def _drain(self) -> None:
        """The child is stopping or ending: take in what it sends past the inbox's bound (up to
        DRAIN_FACTOR times it), so that a parent that reads nothing holds up neither the child's
        end nor its stop, and what it sent arrives."""
        self._draining = True
        self.child._inbox.notify()

    def _on_control(self, message: object) -> None:
        if isinstance(message, Done):
            self.acknowledged = max(self.acknowledged, message.acknowledged)
        else:
            self._dropped(f"an unexpected control message was dropped: {message!r}")

    def _dropped(self, text: str) -> None:
        self.bus.log(f"Child {self.child.name}: {text}", logging.WARNING, child=self.child.name, child_pid=self.pid)

    # -- what the child says besides messages -----------------------------------------

    async def _forward(self, stream: ByteReceiveStream, name: str) -> None:
        """Log each line the worker (or a subprocess of it) writes to descriptor 1 or 2."""

        def emit(line: str) -> None:
            self.bus.log(line, logging.INFO, child=self.child.name, child_pid=self.pid, stream=name)

        await forward_lines(stream, self.child.max_line, emit, keep=self._last_lines if name == "stderr" else None)

    async def _forward_logs(self, sock: socket.socket) -> None:
        """Log each structlog event of the child (a JSON line), its fields kept apart from ours."""

        def emit(line: str) -> None:
            text, level, fields = decode_log(line)
            self.bus.log(text, level, child=self.child.name, child_pid=self.pid, **fields)

        async with await UNIXSocketStream.from_socket(sock) as stream:
            await forward_lines(stream, MAX_LOG_LINE, emit)

    async def _watch_heartbeats(self, beats: HeartbeatReader) -> None:
        """Look at the child's heartbeats every ``hang_timeout`` seconds (only then: cheap
        with many children); none since the last look means its loop is blocked."""
        timeout = self.child.hang_timeout
        while True:
            await anyio.sleep(timeout if timeout is not None else 60.0)  # without hang detection, still read
            arrived = self._take_heartbeats(beats) or self._beaten
            self._beaten = False
            if arrived or timeout is None or self.stopping:
                continue
            self.bus.log(
                f"Child {self.child.name} hung: no heartbeat for {timeout:g} s (its event loop was blocked "
                f"all that time); killed. If a message takes longer on purpose, raise the ChildBroker's "
                f"hang_timeout (now {timeout:g} s), or run the blocking work with "
                f"`await anyio.to_thread.run_sync(...)` so that the child's loop keeps ticking",
                logging.ERROR,
                child=self.child.name,
                child_pid=self.pid,
            )
            self.killed_by = f"hung (no heartbeat for {timeout:g} s)"
            self._signal(signal.SIGKILL)
            return

    def _take_heartbeats(self, beats: HeartbeatReader) -> bool:
        arrived, acknowledged = beats.take()
        if acknowledged is not None:
            self.acknowledged = max(self.acknowledged, acknowledged)
        self._beaten = self._beaten or arrived
        return arrived

    # -- stopping ---------------------------------------------------------------------

    async def send_control(self, message: Stop | Graceful) -> None:
        if self.control is not None:
            try:
                await self.control.send(message)
            except (anyio.ClosedResourceError, anyio.BrokenResourceError):
                pass

    async def stop(self, budget: float | None = None) -> None:
        """End this incarnation: the child is told, then SIGTERM after ``grace``, SIGKILL after
        ``term_grace`` more; a budget shorter than both shrinks them in proportion.

        Never waits on the links: the end of input is queued without waiting, the stop
        message within the grace period. A second call while one runs shortens the time left.
        Cancelled: the child is killed at once, and waited for, so that no stop is left half done.
        """
        now = anyio.current_time()
        if budget is not None:
            self._stop_limit = min(self._stop_limit, now + budget)
            self._stop_changed.set()
        if self.stopping:
            await self.ended.wait()
            return
        self.stopping = True
        try:
            await self._stop(now)
        except BaseException:
            with anyio.CancelScope(shield=True):
                if not self._exited:
                    self.killed_by = (
                        f"SIGKILL {anyio.current_time() - now:.1f} s after the stop: the stop was cancelled"
                    )
                    self.kill()
                await self.ended.wait()
            raise

    async def _stop(self, start: float) -> None:
        self.child._set_data(None)  # sends wait for a next incarnation (or time out)
        self._drain()
        if self.data is not None:
            try:
                self.data.finish(EndOfInput())
            except (anyio.ClosedResourceError, anyio.BrokenResourceError):
                pass
        grace, term_grace = self.child.grace, self.child.term_grace
        with anyio.move_on_after(self._share(start, grace)):
            await self.send_control(Stop())
        escalation = (
            (signal.SIGTERM, grace, "", "after the stop"),
            (signal.SIGKILL, grace + term_grace, " after SIGTERM", "after the stop, SIGTERM having failed"),
        )
        for sig, due, still, after in escalation:
            if await self._ended_by(start, due):
                return
            waited = anyio.current_time() - start
            cut = self._cut_short(start)
            running = f" after {waited:.1f} s" if not still else still
            self.bus.log(
                f"Child {self.child.name} still running{running}{cut}: {sig.name}",
                logging.WARNING,
                child=self.child.name,
                child_pid=self.pid,
            )
            self.killed_by = f"{sig.name} {waited:.1f} s {after}{cut}"
            if sig is signal.SIGKILL:
                self.kill()
            else:
                self._signal(sig)
        await self._worker_gone.wait()

    def _share(self, start: float, seconds: float) -> float:
        """``seconds`` of the stop's own timetable, shrunk to fit a budget if one was given."""
        own = self.child.grace + self.child.term_grace
        allowed = self._stop_limit - start
        if allowed >= own or own == 0:
            return seconds
        return seconds * max(0.0, allowed) / own

    def _cut_short(self, start: float) -> str:
        own = self.child.grace + self.child.term_grace
        return "" if self._stop_limit - start >= own else ": the shutdown was cut short"

    @property
    def _exited(self) -> bool:
        """Whether the worker process has ended (its output may still be read)."""
        return self._worker_gone.is_set()

    async def _ended_by(self, start: float, due: float) -> bool:
        """Wait until the worker process has ended (True) or ``due`` seconds of the stop's
        timetable have passed (False); a budget given meanwhile shrinks the timetable."""
        while not self._exited:
            self._stop_changed = anyio.Event()
            when = start + self._share(start, due)
            with anyio.move_on_at(when):
                async with anyio.create_task_group() as race:

                    async def end_race(event: anyio.Event) -> None:
                        await event.wait()
                        race.cancel_scope.cancel()

                    race.start_soon(end_race, self._worker_gone)
                    race.start_soon(end_race, self._stop_changed)
            if anyio.current_time() >= start + self._share(start, due) and not self._exited:
                return False
        return True

    def kill(self) -> None:
        if not self._signal(signal.SIGKILL):
            self._scope.cancel()  # no worker yet: cancelling the start is enough

    def _signal(self, sig: signal.Signals) -> bool:
        if self.worker is None or self._exited:
            return False
        self.worker.signal(sig)
        return True

    def _finish(self) -> None:
        if not self.ready.is_set() and self.failure is None:
            how = "" if self.worker is None else f": {self.worker.ending().reason}"
            self.failure = RuntimeError(f"child {self.child.name!r} ended before it was ready{how}")
        ending = self.worker.ending() if self.worker is not None else None
        code = None if ending is None else ending.exit_code
        sig = None if ending is None else ending.signal
        reason = "never started" if ending is None else ending.reason
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
        self._worker_gone.set()
        self.ended.set()
        self.ready.set()


class HeartbeatReader:
    """The parent's side of the child's :class:`~.child.Heartbeat`: what arrived since the last look."""

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


def _rebuildable(error: BaseException) -> bool:
    """Whether ``type(error)(message)`` makes an error of the same kind (the plain ones do)."""
    return type(error) in (RuntimeError, TimeoutError, WorkerError, OSError, ValueError, TypeError)


def _leaf(error: BaseException) -> BaseException:
    """The first error inside (nested) exception groups."""
    while isinstance(error, BaseExceptionGroup) and error.exceptions:
        error = error.exceptions[0]
    return error
