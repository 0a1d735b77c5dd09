"""The bus: states, transitions, publishing, the main ticker, and the tasks it owns."""

from __future__ import annotations

import logging
import math
import sys
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from traceback import format_exception
from types import MappingProxyType, TracebackType
from typing import Any, TypeVar, overload

import anyio
from anyio.abc import TaskGroup

from ._channels import BUILTIN_CHANNELS, ChannelFailures, Channels, is_async_callable, resolve_priority
from ._logging import log_to_structlog
from ._reexec import reexec
from ._state import State, StateError
from ._ticker import Ticker

EX_SOFTWARE = 70
_C = TypeVar("_C", bound=Callable[..., Any])


@dataclass(frozen=True)
class BusStatistics:
    """A snapshot of a bus's counters, from :meth:`Bus.statistics`."""

    state: State
    ticks: int
    ticks_skipped: int
    publishes: Mapping[str, int]
    failures: Mapping[str, int]


class Bus:
    """An async process bus: a lifecycle published on channels that plugins subscribe to.

    Use it as ``async with Bus() as bus:``. Entering opens the task group that owns
    every task of the bus and its plugins; leaving runs :meth:`exit` if it has not
    run and waits for those tasks, so that no task outlives the block.

    Args:
        main_interval: seconds between two ``main`` ticks while STARTED.
        stop_timeout: if set, the deadline in seconds of the stop channel and, apart,
            of the exit channel; listeners still running then are cancelled.
    """

    def __init__(self, *, main_interval: float = 0.1, stop_timeout: float | None = None) -> None:
        if not isinstance(main_interval, int | float) or not 0 < main_interval < math.inf:
            raise ValueError(f"main_interval must be a positive number of seconds, not {main_interval!r}")
        if stop_timeout is not None and (not isinstance(stop_timeout, int | float) or not stop_timeout >= 0):
            raise ValueError(f"stop_timeout must be None or seconds >= 0, not {stop_timeout!r}")
        self.main_interval = float(main_interval)
        self.stop_timeout = stop_timeout
        #: The code the process should end with: 0, or 70 (EX_SOFTWARE) after a failure.
        self.exit_code = 0
        self._state = State.STOPPED
        self._state_changed = anyio.Event()
        self._channels = Channels(BUILTIN_CHANNELS)
        self._publishes: Counter[str] = Counter()
        self._failures: Counter[str] = Counter()
        self._ticks = 0
        self._ticks_skipped = 0
        self._ticker: Ticker | None = None
        self._lock = anyio.Lock()
        self._lock_owner: int | None = None
        self._exit_started = False
        self._exited = anyio.Event()
        self._shutdown_scope: anyio.CancelScope | None = None
        self._restart_requested = False
        self._task_group: TaskGroup | None = None
        self._task_scopes: set[anyio.CancelScope] = set()
        self._tasks_ended = anyio.Event()
        self._tasks_ended.set()
        self.subscribe("log", log_to_structlog)

    # -- the task group ---------------------------------------------------------------

    async def __aenter__(self) -> Bus:
        if self._task_group is not None or self._exit_started:
            raise RuntimeError("a Bus can be entered only once")
        task_group = anyio.create_task_group()
        await task_group.__aenter__()
        self._task_group = task_group
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        """Run :meth:`exit` (shielded from cancellation), then end the bus's tasks.

        An error raised in the block propagates as itself, not wrapped in a group.
        """
        assert self._task_group is not None
        try:
            with anyio.CancelScope(shield=True):
                await self.exit()
                await self._end_tasks()
        finally:
            # The bus's tasks never raise (see _run_task), so the only error is the
            # block's own: let it through unwrapped, but show anyio a cancellation.
            if exc is not None and not isinstance(exc, anyio.get_cancelled_exc_class()):
                exc_type, exc, tb = None, None, None
            await self._task_group.__aexit__(exc_type, exc, tb)
        return None

    def start_soon(self, fn: Callable[..., Awaitable[Any]], *args: Any, name: str | None = None) -> None:
        """Run ``fn(*args)`` as a task of the bus, for plugins.

        The task is cancelled when the bus's tasks end (:meth:`block` after exit, or
        leaving ``async with``). If it raises, the error is logged, ``exit_code``
        becomes 70 and the bus exits: a service does not go on without a part of it.

        Raises:
            RuntimeError: the bus was not entered with ``async with``.
        """
        if self._task_group is None:
            raise RuntimeError("the bus has no task group: use it as `async with Bus() as bus:`")
        if self._tasks_ended.is_set():
            self._tasks_ended = anyio.Event()
        scope = anyio.CancelScope()
        self._task_scopes.add(scope)
        self._task_group.start_soon(self._run_task, scope, fn, args, name=name)

    async def _run_task(self, scope: anyio.CancelScope, fn: Callable[..., Awaitable[Any]], args: Any) -> None:
        try:
            with scope:
                await fn(*args)
        except Exception:
            name = getattr(fn, "__qualname__", repr(fn))
            self.log(f"Task {name} of the bus failed; exiting", logging.ERROR, traceback=True, task=name)
            self.exit_code = EX_SOFTWARE
            if not self._exit_started:
                self.start_soon(self.exit)
        finally:
            self._task_scopes.discard(scope)
            if not self._task_scopes:
                self._tasks_ended.set()

    async def _end_tasks(self) -> None:
        """Cancel the bus's tasks and wait until they have ended."""
        while self._task_scopes:
            for scope in list(self._task_scopes):
                scope.cancel()
            await self._tasks_ended.wait()

    # -- subscribing and publishing --------------------------------------------------

    @overload
    def subscribe(self, channel: str, callback: None = None, priority: float | None = None) -> Callable[[_C], _C]: ...
    @overload
    def subscribe(self, channel: str, callback: _C, priority: float | None = None) -> _C: ...

    def subscribe(
        self, channel: str, callback: _C | None = None, priority: float | None = None
    ) -> _C | Callable[[_C], _C]:
        """Add ``callback`` to ``channel``; without a callback, return a decorator that does.

        The priority is the argument, else the callback's ``priority`` attribute, else
        50; lower runs first and equal priorities run in subscription order.
        Subscribing the same callback again keeps one entry with the new priority.

        Returns:
            The callback itself, so decorated names stay usable.

        Raises:
            TypeError: the callback is not callable, or is async on the ``log`` channel.
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
        if channel == "log" and is_async:
            raise TypeError("the log channel calls its listeners synchronously: an async listener cannot subscribe")
        self._channels.subscribe(channel, callback, resolve_priority(callback, priority), is_async)
        return callback

    def unsubscribe(self, channel: str, callback: Callable[..., Any]) -> None:
        """Remove ``callback`` from ``channel``; an absent channel or callback is a no-op."""
        self._channels.unsubscribe(channel, callback)

    @property
    def listeners(self) -> Mapping[str, tuple[Callable[..., Any], ...]]:
        """Each channel's callbacks in run order (a copy)."""
        return self._channels.as_mapping()

    async def publish(self, channel: str, *args: Any, **kwargs: Any) -> list[Any]:
        """Call the listeners of ``channel`` in order and return their results in that order.

        Async listeners are awaited one after another. A listener raising an Exception
        is logged and does not stop the others.

        Raises:
            ChannelFailures: after all listeners ran, if any raised.

        Cancellation and KeyboardInterrupt or SystemExit from a listener propagate at
        once; the listener that was interrupted is logged.
        """
        listeners = self._channels.get(channel)
        if listeners is None:
            return []
        self._publishes[channel] += 1
        results: list[Any] = []
        failures: list[Exception] = []
        for listener in listeners:
            try:
                result = listener.callback(*args, **kwargs)
                if listener.is_async:
                    result = await result
            except Exception as exc:
                failures.append(exc)
                self.log(
                    f"Listener {listener.name} of channel {channel!r} failed",
                    logging.ERROR,
                    traceback=True,
                    channel=channel,
                    listener=listener.name,
                )
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
            self._failures[channel] += len(failures)
            raise ChannelFailures(channel, failures)
        return results

    def log(self, msg: str, level: int = logging.INFO, traceback: bool = False, **fields: Any) -> None:
        """Send ``msg`` to every ``log`` listener now, as ``listener(msg, level, **fields)``.

        Works from sync and async code alike. With ``traceback=True`` the exception
        being handled goes along as the ``traceback`` field (formatted text). A failing
        log listener is reported on standard error and the others still run.
        """
        if traceback:
            exc = sys.exception()
            if exc is not None:
                fields["traceback"] = "".join(format_exception(exc))
        self._publishes["log"] += 1
        for listener in self._channels.get("log") or ():
            try:
                listener.callback(msg, level, **fields)
            except Exception as exc:
                self._failures["log"] += 1
                sys.stderr.write(
                    f"aiobus: log listener {listener.name} failed on {msg!r}:\n" + "".join(format_exception(exc))
                )

    # -- state ------------------------------------------------------------------------

    @property
    def state(self) -> State:
        """The current state."""
        return self._state

    def _set_state(self, state: State) -> None:
        if self._state is State.EXITING:
            return  # final: a start that outlived a forced exit does not undo it
        previous, self._state = self._state, state
        self._state_changed.set()
        self._state_changed = anyio.Event()
        self.log(f"Bus {state.name}", state=state.name, previous=previous.name)

    async def wait(self, *states: State, timeout: float | None = None) -> State:  # noqa: ASYNC109
        """Wait until the state is one of ``states``, and return it.

        Returns at once if it already is. Cancelling the wait changes nothing.

        Raises:
            TimeoutError: the state was not reached within ``timeout`` seconds.
            ValueError: no state was given.
        """
        if not states:
            raise ValueError("wait() needs at least one state")
        with anyio.fail_after(timeout):
            while self._state not in states:
                await self._state_changed.wait()
        return self._state

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

    def _reentrant(self) -> bool:
        """Whether the calling task is the one running a transition (a listener calling back)."""
        return self._lock_owner is not None and self._lock_owner == anyio.get_current_task().id

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
        70), ends EXITING, and the failure is raised. A listener calling ``start`` of
        its own bus has the call queued until the current transition is done.

        Cancelled during a start listener, the bus stays STARTING; :meth:`exit` (or
        leaving ``async with``) still cleans up.

        Raises:
            ChannelFailures: a start listener failed.
            StateError: the bus is not STOPPED or STARTED.
            RuntimeError: the bus was not entered with ``async with``.
        """
        if self._task_group is None:
            raise RuntimeError("start() needs the bus's task group: use it as `async with Bus() as bus:`")
        if self._reentrant():
            self.start_soon(self.start)
            return
        await self._acquire()
        try:
            if self._state is State.STARTED:
                return
            if self._state is not State.STOPPED:
                raise StateError("start", self._state)
            self._set_state(State.STARTING)
            try:
                await self.publish("start")
            except ChannelFailures:
                self.log("Start failed: stopping and exiting", logging.ERROR)
                self.exit_code = EX_SOFTWARE
                self._exit_started = True
                with anyio.CancelScope(shield=True) as self._shutdown_scope:
                    await self._exit_locked()
                raise
            self._set_state(State.STARTED)
            if self.state is State.STARTED:  # not if a forced exit came first
                self._ticker = Ticker(self.main_interval, self._tick, self._count_skipped)
                self.start_soon(self._ticker.run)
        finally:
            self._release()

    async def stop(self) -> None:
        """STOPPING, end the main ticker, publish ``stop``, STOPPED.

        On a stopped (or exiting) bus it does nothing. A failing stop listener is
        logged and sets ``exit_code`` to 70; the bus still reaches STOPPED. The tick in
        progress, if any, finishes first (unless ``stop`` was called from it). With
        ``stop_timeout``, whatever still runs at the deadline is cancelled and logged.
        A listener calling ``stop`` of its own bus has the call queued.
        """
        if self._reentrant():
            self.start_soon(self.stop)
            return
        await self._acquire()
        try:
            await self._stop_locked()
        finally:
            self._release()

    async def graceful(self) -> None:
        """Publish ``graceful`` (plugins reload); the state does not change.

        Raises:
            ChannelFailures: a graceful listener failed (after all of them ran).
            StateError: the bus is EXITING.
        """
        if self._reentrant():
            self.start_soon(self.graceful)
            return
        await self._acquire()
        try:
            if self._state is State.EXITING:
                raise StateError("graceful", self._state)
            await self.publish("graceful")
        finally:
            self._release()

    async def exit(self) -> None:
        """Stop if not stopped, then EXITING and publish ``exit``. Runs once.

        A second or concurrent call waits for the first and publishes nothing again;
        an exit listener calling it returns at once. It never raises a listener's
        error: failures are logged and set ``exit_code`` to 70. The shutdown is
        shielded from the caller's cancellation; only :meth:`force_exit` cuts it short,
        and ``stop_timeout`` bounds the stop and exit channels each.
        """
        if self._exit_started:
            if not self._reentrant():
                await self._exited.wait()
            return
        self._exit_started = True
        if self._reentrant():  # a start, stop or graceful listener asked to exit
            self.start_soon(self._exit_after_transition)
            return
        await self._exit_after_transition()

    async def _exit_after_transition(self) -> None:
        with anyio.CancelScope(shield=True) as self._shutdown_scope:
            await self._acquire()
            try:
                await self._exit_locked()
            finally:
                self._release()
        self._finish_exit()

    async def _exit_locked(self) -> None:
        try:
            await self._stop_locked()
            self._set_state(State.EXITING)
            await self._publish_bounded("exit")
        finally:
            self._finish_exit()

    def _finish_exit(self) -> None:
        if self._state is not State.EXITING:  # forced: the shutdown was cut short
            self._set_state(State.EXITING)
        self._exited.set()

    def force_exit(self, exit_code: int) -> None:
        """Cut short a shutdown in progress: what remains of stop and exit is cancelled.

        The bus ends EXITING at once with ``exit_code``. Meant for a second Ctrl-C.
        """
        self.exit_code = exit_code
        self.log("Shutdown forced", logging.WARNING, exit_code=exit_code)
        if self._shutdown_scope is not None:
            self._shutdown_scope.cancel()
        elif not self._exit_started:
            self._exit_started = True
            self._finish_exit()

    async def restart(self) -> None:
        """Exit, and have :meth:`block` re-execute the process once the bus's tasks have ended."""
        self._restart_requested = True
        await self.exit()

    async def block(self) -> None:
        """Wait until exit has completed and the bus's tasks have ended; then re-exec if asked.

        The re-exec (after :meth:`restart`) runs ``sys.orig_argv`` again with every
        descriptor above 2 closed. It joins no threads. Cancelling the wait changes
        nothing on the bus.
        """
        await self._exited.wait()
        await self._end_tasks()
        if self._restart_requested:
            self.log("Re-executing the process", argv=sys.orig_argv)
            reexec()

    async def _stop_locked(self) -> None:
        if self._state not in (State.STARTING, State.STARTED):
            return
        self._set_state(State.STOPPING)
        await self._publish_bounded("stop", before=self._halt_ticker)
        self._set_state(State.STOPPED)

    async def _halt_ticker(self) -> None:
        ticker, self._ticker = self._ticker, None
        if ticker is None:
            return
        ticker.stop()
        if ticker.task_id == anyio.get_current_task().id:
            return  # stop was called from a main listener: the ticker ends after it
        try:
            await ticker.wait_done()
        except anyio.get_cancelled_exc_class():
            ticker.cancel()
            raise

    async def _publish_bounded(self, channel: str, before: Callable[[], Awaitable[None]] | None = None) -> None:
        """Publish a shutdown channel within ``stop_timeout``; failures set exit_code, never raise."""
        timeout = math.inf if self.stop_timeout is None else self.stop_timeout
        with anyio.move_on_after(timeout) as scope:
            try:
                if before is not None:
                    await before()
                await self.publish(channel)
            except ChannelFailures:
                self.exit_code = EX_SOFTWARE
        if scope.cancelled_caught:
            self.exit_code = EX_SOFTWARE
            self.log(
                f"Channel {channel!r} cut off at its {timeout:g} s deadline",
                logging.ERROR,
                channel=channel,
                timeout=timeout,
            )

    def _count_skipped(self, count: int) -> None:
        self._ticks_skipped += count

    async def _tick(self) -> None:
        self._ticks += 1
        try:
            await self.publish("main")
        except ChannelFailures:
            pass  # each failure is logged and counted by publish
