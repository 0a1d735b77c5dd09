"""Supervision, written once for child brokers and external programs alike.

A :class:`Supervisor` starts its children in order when the bus starts, stops them
in reverse order when it stops, and when one ends decides what follows from the
child's restart policy, the group's strategy and the restart intensity:

- restart policy (per child): ``permanent`` (always restarted), ``transient``
  (restarted only after a failure), ``temporary`` (never restarted);
- strategy (per group): ``one_for_one`` (only that child is restarted),
  ``one_for_all`` (all are stopped, in reverse order, and started again in order),
  ``rest_for_one`` (that child and those after it);
- intensity: at most ``max_restarts`` restarts within ``within`` seconds, with an
  exponential backoff between them; past it the bus exits with code 70 and the
  reason is logged.

One task makes every decision, one exit at a time, so a restart never races a
stop (circus#529): from the bus's STOPPING on it restarts nothing, and the stop
ends that task before it stops the children.

Every exit is recorded (``last_exit``), logged and published on ``child_exit``:
failures, stops, children stopped for a strategy, and starts that failed
(``could not start: ...``). The exit of an incarnation that is no longer the
current one (it ended as a strategy restarted it anyway) decides nothing.
"""

from __future__ import annotations

import abc
import enum
import logging
import math
import time
import weakref
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from ._bus import Bus
from ._channels import ChannelFailures
from ._order import Priority
from ._plugin import SimplePlugin
from ._state import State

EX_SOFTWARE = 70
#: The channel on which each child's exit is published, as a :class:`ChildExit`.
CHILD_EXIT_CHANNEL = "child_exit"


class Restart(enum.StrEnum):
    """When a child that ended is started again."""

    PERMANENT = "permanent"
    TRANSIENT = "transient"
    TEMPORARY = "temporary"


class Strategy(enum.StrEnum):
    """Which children of a group are restarted when one ends."""

    ONE_FOR_ONE = "one_for_one"
    ONE_FOR_ALL = "one_for_all"
    REST_FOR_ONE = "rest_for_one"


class ChildState(enum.StrEnum):
    STOPPED = "stopped"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    RESTARTING = "restarting"  # ended, waiting out the backoff
    EXITED = "exited"  # ended, and its policy says not to restart it
    FAILED = "failed"  # given up: the restart intensity was exceeded


@dataclass(frozen=True)
class ChildExit:
    """How one incarnation of a child ended.

    Attributes:
        name: the child's name.
        pid: its process id, if it had one.
        exit_code: the exit code, or None if a signal ended it.
        signal: the name of the signal that ended it, or None.
        reason: what happened, in words ("exited", "killed after the grace period"...).
        expected: whether the supervisor asked for it (a stop): not a failure.
        lost: messages sent to this incarnation (accepted by ``ChildBroker.send``) that it
            did not acknowledge before it ended: they may be lost (some may have been
            processed, the acknowledgement not reaching the parent). Every message accepted
            and not counted here was acknowledged. Always 0 for an external program.
    """

    name: str
    pid: int | None
    exit_code: int | None
    signal: str | None
    reason: str
    expected: bool = False
    lost: int = 0

    @property
    def failed(self) -> bool:
        """Whether the child ended on its own, other than with exit code 0."""
        return not self.expected and not (self.exit_code == 0 and self.signal is None)


@dataclass(frozen=True)
class ChildInfo:
    """One line of the children listing."""

    name: str
    kind: str
    state: ChildState
    pid: int | None
    restarts: int
    uptime: float | None
    last_exit: ChildExit | None


class Child(abc.ABC):
    """Something a :class:`Supervisor` runs: a child broker, an external program.

    A subclass implements :meth:`spawn`, :meth:`wait` and :meth:`terminate`; the
    supervisor calls them one incarnation at a time.
    """

    kind = "child"
    #: The bus it runs along with (set by the subclass).
    bus: Bus
    #: The group it joins on :meth:`subscribe`; the bus's default group if None.
    supervisor: Supervisor | None = None

    def __init__(self, name: str, restart: Restart | str = Restart.PERMANENT) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError(f"a child needs a non-empty name, not {name!r}")
        self.name = name
        self.restart = Restart(restart)
        self._state = ChildState.STOPPED
        self.restarts = 0
        self.last_exit: ChildExit | None = None
        self.started_at: float | None = None

    # -- as a plugin ------------------------------------------------------------------

    def subscribe(self) -> None:
        """Join the supervisor's group (the bus's default one unless given another), once:
        from then on it starts and stops with the bus."""
        group = self._group()
        if self not in group._children:
            group.add(self)

    def unsubscribe(self) -> None:
        """Leave the supervisor's group; the child must not be running."""
        group = self._group()
        if self in group._children:
            group.remove(self)

    def _group(self) -> Supervisor:
        if self.supervisor is None:
            self.supervisor = default_supervisor(self.bus)
        return self.supervisor

    # -- its state ----------------------------------------------------------------------

    @property
    def state(self) -> ChildState:
        """Where the child is, as the supervisor sees it."""
        return self._state

    @state.setter
    def state(self, state: ChildState) -> None:
        self._state = state
        self.state_changed()

    def state_changed(self) -> None:  # noqa: B027 - an optional hook, not an abstract one
        """Called after each change of :attr:`state` (nothing, unless a subclass says so)."""

    @property
    @abc.abstractmethod
    def pid(self) -> int | None:
        """The running incarnation's process id, if any."""

    @abc.abstractmethod
    async def spawn(self) -> None:
        """Start an incarnation and return once it is ready.

        Raises:
            Exception: it could not start; nothing of it is left running.

        Cancelled: an implementation must leave nothing of the incarnation running.
        """

    @abc.abstractmethod
    async def wait(self) -> ChildExit:
        """Wait until the running incarnation has ended, and say how.

        The supervisor calls it once per incarnation, from one task.

        Cancelled: nothing changes for the child. No timeout.
        """

    @abc.abstractmethod
    async def terminate(self, budget: float | None = None) -> None:
        """End the running incarnation gracefully, then by force; return once it has ended.

        The exit that :meth:`wait` then reports has ``expected=True``, and its reason says
        what really happened (stopped by its stop signal, or killed, after how long, and why).
        Calling it when nothing runs does nothing. A call while another is under way (say,
        a forced shutdown overtaking a stop) shortens the time left to the new budget.

        Args:
            budget: seconds it may take in all. None: the child's own :attr:`stop_budget`
                (a grace period, then a kill). A shorter budget still asks the child to
                stop first, and kills what is left when the budget is spent.

        The supervisor shields it from cancellation.
        """

    @property
    def stop_budget(self) -> float:
        """The longest :meth:`terminate` takes with no budget of its own, in seconds (0 unless a
        subclass says so): its grace periods, before the kill."""
        return 0.0

    async def graceful(self) -> None:  # noqa: B027 - an optional hook, not an abstract one
        """Pass the bus's graceful on to the child (nothing, unless a subclass says so).

        Cancelled: the child may not have been told. No timeout.
        """

    def info(self) -> ChildInfo:
        uptime = None
        if self.state is ChildState.RUNNING and self.started_at is not None:
            uptime = time.monotonic() - self.started_at
        return ChildInfo(self.name, self.kind, self.state, self.pid, self.restarts, uptime, self.last_exit)


_Exit = tuple[Child, int, ChildExit]  # a child, the number of the incarnation that ended, how it ended


class Supervisor(SimplePlugin):
    """Runs a group of children along with the bus: started at its start, stopped at its stop.

    Args:
        bus: the bus.
        strategy: ``one_for_one``, ``one_for_all`` or ``rest_for_one``.
        max_restarts: restarts allowed within ``within`` seconds before giving up.
        within: the window of the restart intensity, in seconds.
        backoff: the delay before the first restart of a window, doubled for each
            further restart in it, up to ``max_backoff``.

    Children start at the bus's start (``Priority.START_CHILDREN``, 80: after ports are
    bound at 75 and privileges dropped at 77, before their users start at 85), one
    after another, each once it is ready; if one cannot start, the bus's start fails.
    They stop at the bus's stop (``Priority.STOP_CHILDREN``, 20: after their users
    stopped at 10, before most plugins close what the children may use).
    """

    def __init__(
        self,
        bus: Bus,
        *,
        strategy: Strategy | str = Strategy.ONE_FOR_ONE,
        max_restarts: int = 3,
        within: float = 5.0,
        backoff: float = 0.1,
        max_backoff: float = 5.0,
    ) -> None:
        super().__init__(bus)
        self.strategy = Strategy(strategy)
        if isinstance(max_restarts, bool) or not isinstance(max_restarts, int) or max_restarts < 0:
            raise ValueError(f"max_restarts must be an int >= 0, not {max_restarts!r}")
        for label, value in (("within", within), ("backoff", backoff), ("max_backoff", max_backoff)):
            if not isinstance(value, int | float) or not 0 <= value < math.inf:
                raise ValueError(f"{label} must be a finite number of seconds >= 0, not {value!r}")
        self.max_restarts = max_restarts
        self.within = float(within)
        self.backoff = float(backoff)
        self.max_backoff = float(max_backoff)
        self._children: list[Child] = []
        self._restart_times: deque[float] = deque()
        self._scope: anyio.CancelScope | None = None
        self._ended = anyio.Event()
        self._ended.set()
        self._exits: MemoryObjectSendStream[_Exit] | None = None
        self._incarnations: dict[int, int] = {}  # id(child) -> number of its current incarnation
        self._watches: dict[int, anyio.Event] = {}  # id(child) -> set once its exit is handed on

    # -- the group --------------------------------------------------------------------

    def add(self, child: Child) -> Child:
        """Add a child to the group (started after those already in it)."""
        if any(existing.name == child.name for existing in self._children):
            raise ValueError(f"there is already a child named {child.name!r}")
        self._children.append(child)
        return child

    def remove(self, child: Child) -> None:
        """Take a stopped child out of the group."""
        if child.state not in (ChildState.STOPPED, ChildState.EXITED, ChildState.FAILED):
            raise RuntimeError(f"child {child.name!r} is {child.state}: stop the bus first")
        self._children.remove(child)
        self._incarnations.pop(id(child), None)
        self._watches.pop(id(child), None)

    def children(self) -> list[ChildInfo]:
        """Each child's name, kind, state, pid, restarts, uptime and last exit, in start order."""
        return [child.info() for child in self._children]

    def __getitem__(self, name: str) -> Child:
        for child in self._children:
            if child.name == name:
                return child
        raise KeyError(name)

    # -- the bus's channels -----------------------------------------------------------

    async def start(self) -> None:
        """Start every child in order, each once the one before is ready.

        Raises:
            Exception: a child could not start (those already started are stopped).

        Cancelled: the children already started are stopped. Timeouts: each child's own
        start timeout.
        """
        if self._scope is not None:
            return
        self._restart_times.clear()
        send, receive = anyio.create_memory_object_stream[_Exit](math.inf)
        self._exits = send  # an exit before the supervisor runs waits there for it
        try:
            for child in self._children:
                await self._spawn(child)
        except BaseException:
            self._exits = None
            send.close()
            receive.close()
            with anyio.CancelScope(shield=True):
                await self._terminate(reversed(self._children))
            raise
        self._scope = anyio.CancelScope()
        self._ended = anyio.Event()
        self.bus.start_soon(self._supervise, self._scope, send, receive, name="aiobus supervisor")

    start.priority = Priority.START_CHILDREN  # type: ignore[attr-defined]

    async def stop(self) -> None:
        """Stop every child in reverse order; no restart happens from here on.

        Cancelled: the children not stopped yet may stay running until the bus's tasks
        end. Timeouts: each child's own stop timeouts.
        """
        if self._scope is not None:
            self._scope.cancel()
            await self._ended.wait()
            self._scope = None
        await self._terminate(reversed(self._children))

    stop.priority = Priority.STOP_CHILDREN  # type: ignore[attr-defined]

    async def graceful(self) -> None:
        """Pass graceful on to every running child.

        Cancelled: the children after the one being told are not. No timeout.
        """
        for child in self._children:
            if child.state is ChildState.RUNNING:
                await child.graceful()

    # -- running children -------------------------------------------------------------

    async def _spawn(self, child: Child) -> None:
        """Start an incarnation of ``child`` and watch it; a failure is recorded, then raised."""
        child.state = ChildState.STARTING
        try:
            await child.spawn()
        except Exception as error:
            child.state = ChildState.STOPPED
            with anyio.CancelScope(shield=True):
                failure = ChildExit(child.name, None, None, None, f"could not start: {error}")
                await self._record(child, failure, f"Child {child.name} could not start: {error}", logging.ERROR)
            raise
        except BaseException:
            child.state = ChildState.STOPPED
            raise
        child.state = ChildState.RUNNING
        child.started_at = time.monotonic()
        incarnation = self._incarnations[id(child)] = self._incarnations.get(id(child), 0) + 1
        watched = self._watches[id(child)] = anyio.Event()
        self.bus.log(f"Child {child.name} started", child=child.name, kind=child.kind, pid=child.pid)
        self.bus.start_soon(self._watch, child, incarnation, watched, name=f"aiobus watch {child.name}")

    async def _watch(self, child: Child, incarnation: int, watched: anyio.Event) -> None:
        """Wait for the incarnation to end and hand its exit to the supervisor (or record it, if none runs)."""
        try:
            exit = await child.wait()
            with anyio.CancelScope(shield=True):
                if self._exits is not None:
                    self._exits.send_nowait((child, incarnation, exit))  # an unbounded buffer: never blocks
                else:
                    await self._record(child, exit)
        finally:
            watched.set()

    async def _record(
        self, child: Child, exit: ChildExit, message: str | None = None, level: int | None = None
    ) -> None:
        """Keep ``exit`` as the child's last, log it and publish it on ``child_exit``."""
        child.last_exit = exit
        if level is None:
            level = logging.WARNING if exit.failed else logging.INFO
        self.bus.log(
            message or f"Child {child.name} ended: {exit.reason}",
            level,
            child=child.name,
            pid=exit.pid,
            exit_code=exit.exit_code,
            signal=exit.signal,
            reason=exit.reason,
            expected=exit.expected,
        )
        try:
            await self.bus.publish(CHILD_EXIT_CHANNEL, exit)
        except ChannelFailures:
            pass  # publish logged each failing listener; supervision goes on

    async def _stop_child(self, child: Child) -> None:
        """Terminate ``child`` and wait until its exit has been handed on."""
        child.state = ChildState.STOPPING
        await child.terminate()
        watched = self._watches.get(id(child))
        if watched is not None:
            await watched.wait()

    async def _terminate(self, children: Iterable[Child]) -> None:
        for child in children:
            if child.state in (ChildState.RUNNING, ChildState.STARTING, ChildState.STOPPING):
                await self._stop_child(child)
            if child.state is not ChildState.FAILED:
                child.state = ChildState.STOPPED

    async def _supervise(
        self, scope: anyio.CancelScope, send: MemoryObjectSendStream[_Exit], exits: MemoryObjectReceiveStream[_Exit]
    ) -> None:
        try:
            with scope:
                async for child, incarnation, exit in exits:
                    if exit.expected or incarnation != self._incarnations.get(id(child)) or self._stopping:
                        await self._record(child, exit)  # stopped by us, or already restarted: nothing to decide
                    else:
                        await self._handle_exit(child, exit)
        finally:
            self._exits = None
            send.close()
            with anyio.CancelScope(shield=True):
                while True:  # exits that came as the supervisor was stopped are recorded all the same
                    try:
                        child, _, exit = exits.receive_nowait()
                    except (anyio.WouldBlock, anyio.EndOfStream):
                        break
                    await self._record(child, exit)
            exits.close()
            self._ended.set()

    async def _handle_exit(self, child: Child, exit: ChildExit) -> None:
        await self._record(child, exit)
        if child.restart is Restart.TEMPORARY or (child.restart is Restart.TRANSIENT and not exit.failed):
            child.state = ChildState.EXITED
            return
        affected = self._affected(child)
        child.state = ChildState.RESTARTING
        for other in reversed(affected):
            if other is not child and other.state is ChildState.RUNNING:
                with anyio.CancelScope(shield=True):  # a stop meanwhile finds it stopped, not half so
                    await self._stop_child(other)
                other.state = ChildState.RESTARTING
        while True:
            delay = self._next_restart_delay()
            if delay is None:
                self._give_up(affected)
                return
            await anyio.sleep(delay)
            if self._stopping:
                return  # the bus is stopping: its stop stops whatever runs
            started: list[Child] = []
            try:
                for each in affected:
                    await self._spawn(each)
                    each.restarts += 1
                    started.append(each)
            except Exception:
                # _spawn recorded why; stop those of this attempt so that the next one starts them anew
                with anyio.CancelScope(shield=True):
                    await self._terminate(reversed(started))
                for each in affected:
                    each.state = ChildState.RESTARTING
                continue
            return

    @property
    def _stopping(self) -> bool:
        """Whether the bus's stop has begun (our stop listener may not have run yet)."""
        return self.bus.state in (State.STOPPING, State.EXITING)

    def _affected(self, child: Child) -> list[Child]:
        if self.strategy is Strategy.ONE_FOR_ALL:
            return [c for c in self._children if c.state is not ChildState.EXITED or c is child]
        if self.strategy is Strategy.REST_FOR_ONE:
            index = self._children.index(child)
            return [c for c in self._children[index:] if c.state is not ChildState.EXITED or c is child]
        return [child]

    def _next_restart_delay(self) -> float | None:
        """The backoff before the next restart, or None past the restart intensity."""
        now = time.monotonic()
        while self._restart_times and now - self._restart_times[0] > self.within:
            self._restart_times.popleft()
        if len(self._restart_times) >= self.max_restarts:
            return None
        self._restart_times.append(now)
        return min(self.max_backoff, self.backoff * 2.0 ** (len(self._restart_times) - 1))

    def _give_up(self, affected: list[Child]) -> None:
        reason = f"more than {self.max_restarts} restarts within {self.within:g} s"
        for child in affected:
            child.state = ChildState.FAILED
        self.bus.log(
            f"Restart intensity exceeded ({reason}): exiting",
            logging.ERROR,
            children=[child.name for child in affected],
            reason=reason,
        )
        self.bus.exit_code = EX_SOFTWARE
        self.bus.start_soon(self.bus.exit)


_DEFAULTS: weakref.WeakKeyDictionary[Bus, Supervisor] = weakref.WeakKeyDictionary()


def default_supervisor(bus: Bus) -> Supervisor:
    """The bus's own group (``one_for_one``, the default intensity), made and subscribed on first use.

    Children that are not given a supervisor of their own join it, so that one listing
    shows them all.
    """
    supervisor = _DEFAULTS.get(bus)
    if supervisor is None:
        supervisor = _DEFAULTS[bus] = Supervisor(bus)
        supervisor.subscribe()
    return supervisor
