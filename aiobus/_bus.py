"""The bus: states, transitions, publishing and the main ticker."""

from __future__ import annotations

import inspect
import logging
import math
import sys
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from traceback import format_exception
from types import MappingProxyType, TracebackType
from typing import Any, TypeVar, overload

import anyio

from ._channels import (
    BUILTIN_CHANNELS,
    SYNC_CHANNELS,
    ChannelFailures,
    Channels,
    is_async_callable,
    resolve_priority,
)
from ._exitcodes import ExitCode
from ._logging import log_to_structlog, write_line
from ._reexec import reexec
from ._seconds import check_seconds
from ._state import State, StateError
from ._tasks import TaskKeeper
from ._ticker import Ticker

_C = TypeVar("_C", bound=Callable[..., Any])


@dataclass(frozen=True)
class BusStatistics:
    """A snapshot of a bus's counters, from :meth:`Bus.statistics`."""

    state: State
    ticks: int
    ticks_skipped: int
    publishes: Mapping[str, int]
    failures: Mapping[str, int]


@dataclass(eq=False)
class _Waiter:
    states: frozenset[State]
    event: anyio.Event = field(default_factory=anyio.Event)
    reached: State | None = None


class Bus:
    """An async process bus: a lifecycle published on channels that plugins subscribe to.

    Use it as ``async with Bus() as bus:``. Entering opens the task group that owns
    every task of the bus and its plugins; leaving runs :meth:`exit` if it has not
    run and waits for those tasks, so that no task outlives the block.

    Each change of :attr:`state` is logged and announced on the ``state`` channel, whose
    (sync) listeners are called as ``listener(old, new)`` at the moment of the change:
    plugins that follow the lifecycle listen there rather than read ``log`` lines.

    Transitions (start, stop, graceful, exit) run one at a time. A listener that asks
    for a transition of its own bus while one is running (say, a stop listener that
    calls ``exit()``) has it queued: it runs once the current one is done, and the
    call returns at once. That holds for calls made in the listener's own task (and
    for a main listener while a stop waits for it), not from tasks it spawns.

    Args:
        main_interval: seconds between two ``main`` ticks while STARTED. While the
            ``main`` channel has no listener the ticker sleeps, with no wake-up, and
            publishes nothing; it goes on at the next point of its schedule once one
            subscribes.
        stop_timeout: if set, a deadline in seconds for each step of a shutdown (the
            tick in progress, the stop channel, the exit channel); whatever still runs
            at a deadline is cancelled and logged, and the shutdown goes on.
    """

    def __init__(self, *, main_interval: float = 0.1, stop_timeout: float | None = None) -> None:
        self.main_interval = check_seconds("main_interval", main_interval, positive=True)
        self.stop_timeout = check_seconds("stop_timeout", stop_timeout, optional=True)
        #: The code the process should end with: 0, or 70 (:attr:`ExitCode.SOFTWARE`) after a failure.
        self.exit_code = ExitCode.OK
        self._state = State.STOPPED
        self._waiters: list[_Waiter] = []
        self._channels = Channels(BUILTIN_CHANNELS)
        # Plain dicts: a Counter's += costs twice as much, and publish is the hot path.
        self._publishes: dict[str, int] = {}
        self._failures: dict[str, int] = {}
        self._ticks = 0
        self._ticks_skipped = 0
        self._ticker: Ticker | None = None
        self._tasks = TaskKeeper(self._task_failed)
        self._lock = anyio.Lock()
        self._lock_owner: int | None = None
        self._interruptible: anyio.CancelScope | None = None
        self._exit_started = False
        self._exited = anyio.Event()
        self._shutdown_scope: anyio.CancelScope | None = None
        self._restart_requested = False
        self.subscribe("log", log_to_structlog)

    # -- the tasks it owns -------------------------------------------------------------

    async def __aenter__(self) -> Bus:
        if self._tasks.entered or self._exit_started:
            raise RuntimeError("a Bus can be entered only once")
        await self._tasks.__aenter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Run :meth:`exit` (shielded from cancellation), then end the bus's tasks.

        An error raised in the block propagates as itself, not wrapped in a group.
        """
        try:
            with anyio.CancelScope(shield=True):
                await self.exit()
        finally:
            await self._tasks.__aexit__(exc_type, exc, tb)

    def start_soon(self, fn: Callable[..., Awaitable[Any]], *args: Any, name: str | None = None) -> None:
        """Run ``fn(*args)`` as a task of the bus, for plugins.

        The task is cancelled when the bus's tasks end (:meth:`block` after exit, or
        leaving ``async with``). If it raises, the error is logged, ``exit_code``
        becomes 70 and the bus exits: a service does not go on without a part of it.

        Raises:
            RuntimeError: the bus was not entered with ``async with``.
        """
        self._tasks.start_soon(fn, *args, name=name)

    def _task_failed(self, name: str) -> None:
        self.log(f"Task {name} of the bus failed; exiting", logging.ERROR, traceback=True, task=name)
        self.exit_code = ExitCode.SOFTWARE
        if not self._exit_started:
            self.start_soon(self.exit)

    # -- subscribing and publishing --------------------------------------------------

    @overload
    def subscribe(self, channel: str, callback: None = None, priority: float | None = None) -> Callable[[_C], _C]: ...
    @overload
    def subscribe(self, channel: str, callback: _C, priority: float | None = None) -> _C: ...

    def subscribe(
        self, channel: str, callback: _C | None = None, priority: float | None = None
    ) -> _C | Callable[[_C], _C]:
        """Add ``callback`` to ``channel``; without a callback, return a decorator that does.

        The priority is the argument, else the callback's ``priority`` attribute (as
        :func:`aiobus.priority` sets it), else 50; lower runs first and equal priorities
        run in subscription order.
        Subscribing the same callback again keeps one entry with the new priority.

        Returns:
            The callback itself, so decorated names stay usable.

        The ``log`` and ``state`` channels call their listeners synchronously, from
        :meth:`log` and from each state change: only sync callbacks may subscribe to them.

        Raises:
            TypeError: the callback is not callable, or is async on the ``log`` or ``state``
                channel, or the priority is not a number.
            ValueError: the priority is NaN.
        """
        if callback is None:

            def decorator(fn: _C) -> _C:
                return self.subscribe(channel, fn, priority)

            return decorator
        if not isinstance(channel, str):
            raise TypeError(f"a channel is named by a str, not {channel!r}")
        if not callable(callback):
            raise TypeError(f"a listener must be callable, not {callback!r}")
        is_async = is_async_callable(callback)
        if channel in SYNC_CHANNELS and is_async:
            raise TypeError(
                f"the {channel} channel calls its listeners synchronously: an async listener cannot subscribe"
            )
        self._channels.subscribe(channel, callback, resolve_priority(callback, priority), is_async)
        if channel == "main" and self._ticker is not None:
            self._ticker.wake()
        return callback

    def unsubscribe(self, channel: str, callback: Callable[..., Any]) -> None:
        """Remove ``callback`` from ``channel``; an absent channel or callback is a no-op."""
        self._channels.unsubscribe(channel, callback)

    @property
    def channels(self) -> tuple[str, ...]:
        """The names of the channels that exist: the seven built-in ones, then those subscribed to."""
        return tuple(self._channels.as_mapping())

    @property
    def listeners(self) -> Mapping[str, tuple[Callable[..., Any], ...]]:
        """Each channel's callbacks in run order (a copy)."""
        return self._channels.as_mapping()

    async def publish(self, channel: str, *args: Any, **kwargs: Any) -> list[Any]:
        """Call the listeners of ``channel`` in order and return their results in that order.

        Async listeners (and sync ones that return an awaitable) are awaited one after
        another, in the caller's task. A listener raising an Exception is logged with
        its traceback (an OSError: one line with its message, the traceback at DEBUG
        level) and does not stop the others.

        Raises:
            ChannelFailures: after all listeners ran, if any raised.

        Cancellation, KeyboardInterrupt and SystemExit propagate at once; a cancelled
        listener is logged.
        """
        listeners = self._channels.get(channel)
        if listeners is None:
            return []
        publishes = self._publishes
        publishes[channel] = publishes.get(channel, 0) + 1
        results: list[Any] = []
        failures: list[Exception] | None = None
        bare = not (args or kwargs)  # most publishes carry nothing: a plain call is faster
        for listener in listeners:
            try:
                result = listener.callback() if bare else listener.callback(*args, **kwargs)
                if listener.is_async or (result is not None and inspect.isawaitable(result)):
                    result = await result
            except Exception as exc:
                if failures is None:
                    failures = []
                failures.append(exc)
                self._listener_failed(listener.name, channel, exc)
            except anyio.get_cancelled_exc_class():
                self.log(
                    f"Listener {listener.name} of channel {channel!r} was cancelled",
                    logging.WARNING,
                    channel=channel,
                    listener=listener.name,
                )
                raise
            else:
                results.append(result)
        if failures:
            self._failures[channel] = self._failures.get(channel, 0) + len(failures)
            raise ChannelFailures(channel, failures)
        return results

    def _listener_failed(self, name: str, channel: str, exc: Exception) -> None:
        """Log a listener's failure (from its ``except`` block).

        An OSError (a missing file or program, a refused permission, a PID file or a port
        in use) says what is wrong in its message: one line, its traceback at DEBUG level.
        Any other error, a bug perhaps, is logged with its traceback.
        """
        fields: dict[str, Any] = {"channel": channel, "listener": name}
        if isinstance(exc, OSError):
            error = f"{type(exc).__name__}: {exc}"
            self.log(f"Listener {name} of channel {channel!r} failed: {error}", logging.ERROR, **fields)
            self.log(f"{name} raised {type(exc).__name__}", logging.DEBUG, traceback=True, **fields)
        else:
            self.log(f"Listener {name} of channel {channel!r} failed", logging.ERROR, traceback=True, **fields)

    def log(self, msg: str, level: int = logging.INFO, traceback: bool = False, **fields: Any) -> None:
        """Send ``msg`` to every ``log`` listener now, as ``listener(msg, level, **fields)``.

        Works from sync and async code alike. With ``traceback=True`` the exception
        being handled goes along as the ``traceback`` field (formatted text). A failing
        log listener is reported on standard error (if it can be written) and the others
        still run: logging never raises.
        """
        if traceback:
            exc = sys.exception()
            if exc is not None:
                fields["traceback"] = "".join(format_exception(exc))
        self._publishes["log"] = self._publishes.get("log", 0) + 1
        for listener in self._channels.get("log") or ():
            try:
                result = listener.callback(msg, level, **fields)
                if inspect.isawaitable(result):
                    if inspect.iscoroutine(result):
                        result.close()
                    raise TypeError("a log listener returned an awaitable: log listeners must be sync")
            except Exception as exc:
                self._failures["log"] = self._failures.get("log", 0) + 1
                report = f"aiobus: log listener {listener.name} failed on {msg!r}:\n" + "".join(format_exception(exc))
                write_line(sys.stderr, report.rstrip("\n"))

    # -- state ------------------------------------------------------------------------

    @property
    def state(self) -> State:
        """The current state."""
        return self._state

    def _set_state(self, state: State) -> None:
        """Enter ``state``: wake its waiters, log it, and call the ``state`` listeners.

        The listeners are called here, synchronously, as ``listener(old, new)``: each sees
        the change before anything else runs. One that raises is logged with its traceback
        (and counted); the transition goes on regardless.
        """
        if self._state is State.EXITING or self._state is state:
            return  # EXITING is final: a start that outlived a forced exit does not undo it
        previous, self._state = self._state, state
        for waiter in self._waiters:
            if state in waiter.states and waiter.reached is None:
                waiter.reached = state
                waiter.event.set()
        self.log(f"Bus {state.name}", state=state.name, previous=previous.name)
        self._publishes["state"] = self._publishes.get("state", 0) + 1
        for listener in self._channels.get("state") or ():
            try:
                result = listener.callback(previous, state)
                if inspect.isawaitable(result):
                    if inspect.iscoroutine(result):
                        result.close()
                    raise TypeError("a state listener returned an awaitable: state listeners must be sync")
            except Exception:
                self._failures["state"] = self._failures.get("state", 0) + 1
                self.log(
                    f"Listener {listener.name} of channel 'state' failed",
                    logging.ERROR,
                    traceback=True,
                    channel="state",
                    listener=listener.name,
                )

    async def wait(self, *states: State, timeout: float | None = None) -> State:  # noqa: ASYNC109
        """Wait until the state is one of ``states``, and return the state reached.

        Returns at once if it already is. Every state change is seen, even one that
        passes without a checkpoint. Cancelling the wait changes nothing on the bus.

        Raises:
            TimeoutError: none of the states was reached within ``timeout`` seconds.
            ValueError: no state was given.
        """
        if not states:
            raise ValueError("wait() needs at least one state")
        if self._state in states:
            return self._state
        waiter = _Waiter(frozenset(states))
        self._waiters.append(waiter)
        try:
            with anyio.fail_after(timeout):
                await waiter.event.wait()
        finally:
            self._waiters.remove(waiter)
        assert waiter.reached is not None
        return waiter.reached

    def statistics(self) -> BusStatistics:
        """The bus's counters: state, main ticks published and skipped, publishes and failures per channel."""
        return BusStatistics(
            state=self._state,
            ticks=self._ticks,
            ticks_skipped=self._ticks_skipped,
            publishes=MappingProxyType(dict(self._publishes)),
            failures=MappingProxyType(dict(self._failures)),
        )

    # -- transitions ------------------------------------------------------------------

    def _must_not_wait(self) -> bool:
        """Whether waiting for the transition in progress would deadlock the caller.

        True for a listener of that transition (it runs in the task holding the lock)
        and for a main listener while a stop waits for the tick in progress.
        """
        if self._lock_owner is None:
            return False
        me = anyio.get_current_task().id
        ticker = self._ticker
        return me == self._lock_owner or (ticker is not None and ticker.running and me == ticker.task_id)

    def _queue(self, transition: Callable[[], Awaitable[None]]) -> None:
        """Run a transition that a listener asked for once the current one is done."""

        async def queued() -> None:
            try:
                await transition()
            except StateError as error:  # e.g. an exit listener asking to start
                self.log(f"Queued {error.action} dropped: {error}", logging.WARNING)

        self.start_soon(queued, name=f"queued {transition.__name__}")

    async def _acquire(self) -> None:
        await self._lock.acquire()
        self._lock_owner = anyio.get_current_task().id

    def _release(self) -> None:
        self._lock_owner = None
        self._lock.release()

    async def start(self) -> None:
        """STARTING, publish ``start``, STARTED; then the main ticker runs.

        On a started bus it does nothing. If a start listener fails, the failure is
        logged, the bus runs stop and exit so that plugins clean up (``exit_code``
        70), ends EXITING, and the failure is raised. If :meth:`exit` is called while
        the start listeners run, the one running is cancelled and start returns,
        leaving the shutdown to exit.

        Cancelled during a start listener, the bus stays STARTING; :meth:`exit` (or
        leaving ``async with``) still runs the stop and exit listeners.

        Raises:
            ChannelFailures: a start listener failed.
            StateError: the bus is neither STOPPED nor STARTED.
            RuntimeError: the bus was not entered with ``async with``.
        """
        if not self._tasks.entered:
            raise RuntimeError("start() needs the bus's task group: use it as `async with Bus() as bus:`")
        if self._must_not_wait():
            self._queue(self.start)
            return
        await self._acquire()
        try:
            if self._state is State.STARTED:
                return
            if self._state is not State.STOPPED:
                raise StateError("start", self._state)
            self._set_state(State.STARTING)
            try:
                interrupted = await self._publish_interruptible("start")
            except ChannelFailures:
                self.log("Start failed: stopping and exiting", logging.ERROR)
                self.exit_code = ExitCode.SOFTWARE
                self._exit_started = True
                with anyio.CancelScope(shield=True) as self._shutdown_scope:
                    await self._exit_locked()
                raise
            if interrupted:
                self.log("Start interrupted: the bus is exiting", logging.WARNING)
                return
            self._set_state(State.STARTED)
            if self.state is State.STARTED:  # not if a forced exit came first
                self._ticker = Ticker(self.main_interval, self._tick, self._count_skipped, self._main_listened)
                self.start_soon(self._ticker.run, name="aiobus main ticker")
        finally:
            self._release()

    async def stop(self) -> None:
        """STOPPING, end the main ticker, publish ``stop``, STOPPED.

        On a stopped (or exiting) bus it does nothing. The tick in progress, if any,
        finishes first (unless ``stop`` was called from it). A failing stop listener is
        logged and sets ``exit_code`` to 70; the bus still reaches STOPPED. The stop is
        shielded from the caller's cancellation; with ``stop_timeout``, whatever still
        runs at the deadline is cancelled and logged.
        """
        if self._must_not_wait():
            self._queue(self.stop)
            return
        with anyio.CancelScope(shield=True):
            await self._acquire()
            try:
                await self._stop_locked()
            finally:
                self._release()

    async def graceful(self) -> None:
        """Publish ``graceful`` (plugins reload); the state does not change.

        An :meth:`exit` called meanwhile cancels the graceful listener running.

        Raises:
            ChannelFailures: a graceful listener failed (after all of them ran).
            StateError: the bus is EXITING.
        """
        if self._must_not_wait():
            self._queue(self.graceful)
            return
        await self._acquire()
        try:
            if self._state is State.EXITING:
                raise StateError("graceful", self._state)
            if await self._publish_interruptible("graceful"):
                self.log("Graceful interrupted: the bus is exiting", logging.WARNING)
        finally:
            self._release()

    async def exit(self) -> None:
        """Stop if not stopped, then EXITING and publish ``exit``. Runs once.

        A second or concurrent call waits for the first and publishes nothing again;
        an exit listener calling it returns at once. A start or graceful in progress
        is cancelled to make way. It never raises a listener's error: failures are
        logged and set ``exit_code`` to 70. The shutdown is shielded from the caller's
        cancellation; only :meth:`force_exit` cuts it short, and ``stop_timeout``
        bounds each of its steps.
        """
        if self._exit_started:
            if not self._must_not_wait():
                await self._exited.wait()
            return
        if self._must_not_wait():
            self._queue(self.exit)
            return
        self._exit_started = True
        if self._interruptible is not None:
            self._interruptible.cancel()
        with anyio.CancelScope(shield=True) as self._shutdown_scope:
            await self._acquire()
            try:
                await self._exit_locked()
            finally:
                self._release()
        self._finish_exit()

    async def _exit_locked(self) -> None:
        if self._exited.is_set():
            return
        try:
            await self._stop_locked()
            self._set_state(State.EXITING)
            await self._publish_bounded("exit")
        finally:
            self._finish_exit()

    def _finish_exit(self) -> None:
        self._set_state(State.EXITING)  # already so, unless the shutdown was cut short
        self._exited.set()

    def force_exit(self, exit_code: int) -> None:
        """Cut short a shutdown in progress: what remains of stop and exit is cancelled.

        The bus ends EXITING at once, with ``exit_code``. Meant for a second Ctrl-C.
        """
        self.exit_code = exit_code
        self.log("Shutdown forced", logging.WARNING, exit_code=exit_code)
        for scope in (self._shutdown_scope, self._interruptible):
            if scope is not None:
                scope.cancel()
        if self._ticker is not None:
            self._ticker.cancel()
        if not self._exit_started:
            self._exit_started = True
            self._finish_exit()

    @property
    def restart_requested(self) -> bool:
        """Whether :meth:`restart` was called: :meth:`block` will re-execute the process."""
        return self._restart_requested

    async def restart(self) -> None:
        """Exit, and have :meth:`block` re-execute the process once the bus's tasks have ended.

        Cancelled: the shutdown is shielded as in :meth:`exit`, and :meth:`block` still
        re-executes. No timeout of its own: ``stop_timeout`` bounds each step.
        """
        self._restart_requested = True
        await self.exit()

    async def block(self) -> None:
        """Wait until exit has completed and the bus's tasks have ended; then re-exec if asked.

        The re-exec (after :meth:`restart`) runs ``sys.orig_argv`` again with every
        descriptor above 2 closed. It joins no threads. Cancelling the wait changes
        nothing on the bus.
        """
        await self._exited.wait()
        await self._tasks.end_all()
        if self._restart_requested:
            self.log("Re-executing the process", argv=sys.orig_argv)
            reexec()

    # -- shutdown steps (the lock is held) --------------------------------------------

    @property
    def _step_timeout(self) -> float:
        return math.inf if self.stop_timeout is None else self.stop_timeout

    async def _publish_interruptible(self, channel: str) -> bool:
        """Publish a channel that an exit may cut short; True if it was."""
        scope = anyio.CancelScope()
        self._interruptible = scope
        try:
            with scope:
                await self.publish(channel)
        finally:
            self._interruptible = None
        return scope.cancelled_caught

    async def _stop_locked(self) -> None:
        if self._state not in (State.STARTING, State.STARTED, State.STOPPING):
            return
        if self._state is not State.STOPPING:
            self._set_state(State.STOPPING)
        await self._halt_ticker()
        await self._publish_bounded("stop")
        self._set_state(State.STOPPED)

    async def _halt_ticker(self) -> None:
        ticker = self._ticker
        if ticker is None:
            return
        ticker.stop()
        if ticker.task_id == anyio.get_current_task().id:
            return  # stop was called from a main listener: the ticker ends after it
        with anyio.move_on_after(self._step_timeout) as scope:
            await ticker.wait_done()
        if scope.cancelled_caught:
            self.exit_code = ExitCode.SOFTWARE
            self.log("The main tick in progress was cut off at the stop deadline", logging.ERROR)
            ticker.cancel()
            await ticker.wait_done()

    async def _publish_bounded(self, channel: str) -> None:
        """Publish a shutdown channel within ``stop_timeout``; failures set exit_code, never raise."""
        with anyio.move_on_after(self._step_timeout) as scope:
            try:
                await self.publish(channel)
            except ChannelFailures:
                self.exit_code = ExitCode.SOFTWARE
        if scope.cancelled_caught:
            self.exit_code = ExitCode.SOFTWARE
            self.log(
                f"Channel {channel!r} cut off at its {self._step_timeout:g} s deadline",
                logging.ERROR,
                channel=channel,
                timeout=self._step_timeout,
            )

    # -- the main ticker --------------------------------------------------------------

    def _main_listened(self) -> bool:
        return bool(self._channels.get("main"))

    def _count_skipped(self, count: int) -> None:
        self._ticks_skipped += count

    async def _tick(self) -> None:
        self._ticks += 1
        try:
            await self.publish("main")
        except ChannelFailures:
            pass  # each failure is logged and counted by publish
