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

A stop tells the truth about every child, even when it is cut short. Stopping the
children one after another takes the sum of their stop budgets; when the stop step's
deadline (the bus's ``stop_timeout``) leaves less than that, they are stopped together,
each within the time left. If the stop is cancelled all the same (its deadline reached,
or ``force_exit``), every child not yet ended is told to stop within
:data:`FORCED_BUDGET` (its stop signal, then a kill), and the stop waits until each
exit has been recorded. A child still running when the bus's tasks end (its
supervisor's stop never ran) is ended and recorded the same way by its watcher.
"""

from __future__ import annotations

import abc
import enum
import functools
import logging
import math
import os
import time
import weakref
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from ._bus import Bus
from ._channels import ChannelFailures
from ._exitcodes import ExitCode
from ._order import Priority, priority
from ._plugin import SimplePlugin
from ._seconds import check_seconds
from ._state import State

#: The channel on which each child's exit is published, as a :class:`ChildExit`.
CHILD_EXIT_CHANNEL = "child_exit"
#: Seconds a child gets to end once its stop is cut short (the stop's deadline reached, a
#: forced shutdown, or the bus's tasks ending while it runs): its stop signal, then a kill.
FORCED_BUDGET = 1.0
#: Seconds kept back from the time left before the stop's deadline when children are stopped
#: together: what recording their exits takes.
DEADLINE_MARGIN = 0.1
#: Seconds a cut-short stop waits, beyond FORCED_BUDGET, for the children to end and their exits
#: to be recorded; past it, the children still missing are logged as such.
FORCED_WAIT = 5.0


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
        unhealthy: its liveness check failed and it was stopped for that: a failure, whatever
            its exit code.
    """

    name: str
    pid: int | None
    exit_code: int | None
    signal: str | None
    reason: str
    expected: bool = False
    lost: int = 0
    unhealthy: bool = False

    @property
    def failed(self) -> bool:
        """Whether the child ended on its own, other than with exit code 0, or failed its liveness check."""
        return self.unhealthy or (not self.expected and not (self.exit_code == 0 and self.signal is None))


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
    #: Children of a group next to each other with the same ``batch`` (not None: say, the
    #: workers of one pool) start together and stop together, as one step of the order.
    batch: object | None = None

    def __init__(self, name: str, restart: Restart | str = Restart.PERMANENT, *, significant: bool = False) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError(f"a child needs a non-empty name, not {name!r}")
        if not isinstance(significant, bool):
            raise TypeError(f"significant must be True or False, not {significant!r}")
        self.name = name
        self.restart = Restart(restart)
        #: When it ends for good (its policy says not to restart it, or its restarts are
        #: exhausted), the bus exits: code 0 if it ended cleanly, 70 otherwise.
        self.significant = significant
        self._state = ChildState.STOPPED
        self.restarts = 0
        self.last_exit: ChildExit | None = None
        self.started_at: float | None = None

    # -- as a plugin ------------------------------------------------------------------

    @property
    def members(self) -> tuple[Child, ...]:
        """The children that run for this one: ``(self,)``, or a pool's workers (each a child of
        its own, which the supervisor runs instead of the pool)."""
        return (self,)

    def subscribe(self) -> None:
        """Join the supervisor's group (the bus's default one unless given another), once:
        from then on it starts and stops with the bus. A pool: each of its members joins."""
        members = self.members
        if members != (self,):
            for member in members:
                member.subscribe()
            self.supervisor = members[0].supervisor
            return
        group = self._group()
        if self not in group._children:
            group.add(self)

    def unsubscribe(self) -> None:
        """Leave the supervisor's group (a pool: each of its members leaves); nothing may be running."""
        members = self.members
        if members != (self,):
            for member in members:
                member.unsubscribe()
            return
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

    def send_signal(self, sig: int) -> None:
        """Send ``sig`` to the running incarnation (a subclass may send it to a whole process group).

        Raises:
            ProcessLookupError: nothing runs.
        """
        pid = self.pid
        if pid is None:
            raise ProcessLookupError(f"child {self.name!r} is not running")
        os.kill(pid, sig)

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
        ordered: False: the children have no order between them, and start and stop
            all together.
        concurrency: how many children of one step start at once (the number of CPUs
            by default).

    Children start at the bus's start (``Priority.START_CHILDREN``, 80: after ports are
    bound at 75 and privileges dropped at 77, before their users start at 85), one
    after another, each once it is ready; if one cannot start, the bus's start fails.
    They stop at the bus's stop (``Priority.STOP_CHILDREN``, 20: after their users
    stopped at 10, before most plugins close what the children may use). The workers
    of a pool (children next to each other with the same :attr:`Child.batch`) are one
    step of that order: they start together (``concurrency`` at a time) and stop together.
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
        ordered: bool = True,
        concurrency: int | None = None,
    ) -> None:
        super().__init__(bus)
        self.strategy = Strategy(strategy)
        if isinstance(max_restarts, bool) or not isinstance(max_restarts, int) or max_restarts < 0:
            raise ValueError(f"max_restarts must be an int >= 0, not {max_restarts!r}")
        if concurrency is None:
            concurrency = os.cpu_count() or 1
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
            raise ValueError(f"concurrency must be None or an int >= 1, not {concurrency!r}")
        self.max_restarts = max_restarts
        self.ordered = bool(ordered)
        self.concurrency = concurrency
        self.within = check_seconds("within", within)
        self.backoff = check_seconds("backoff", backoff)
        self.max_backoff = check_seconds("max_backoff", max_backoff)
        self._children: list[Child] = []
        self._restart_times: deque[float] = deque()
        self._scope: anyio.CancelScope | None = None
        self._ended = anyio.Event()
        self._ended.set()
        self._exits: MemoryObjectSendStream[_Exit] | None = None
        self._incarnations: dict[int, int] = {}  # id(child) -> number of its current incarnation
        self._watches: dict[int, anyio.Event] = {}  # id(child) -> set once its exit is handed on
        self._forcing = False  # a cut-short stop is ending the children: the stop in order goes no further
        self._steered: dict[anyio.CancelScope, anyio.Event] = {}  # start/restart_child spawns under way

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

    @priority(Priority.START_CHILDREN)
    async def start(self) -> None:
        """Start every child in order, each once the one before is ready.

        First, if the bus's ``stop_timeout`` is shorter than what stopping the children one
        after another may take (the sum of their stop budgets), a warning says so, naming
        them and their budgets: their stop will be cut short.

        Raises:
            Exception: a child could not start (those already started are stopped).

        Cancelled: the children already started are stopped. Timeouts: each child's own
        start timeout.
        """
        if self._scope is not None:
            return
        self._check_budgets()
        self._forcing = False
        self._restart_times.clear()
        send, receive = anyio.create_memory_object_stream[_Exit](math.inf)
        self._exits = send  # an exit before the supervisor runs waits there for it
        try:
            for step in self._steps(self._children):
                await self._spawn_step(step)
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

    @priority(Priority.STOP_CHILDREN)
    async def stop(self) -> None:
        """Stop every child; no restart happens from here on.

        In reverse start order, each within its own stop budget, when the time left before
        the stop step's deadline (``anyio.current_effective_deadline()``: the bus's
        ``stop_timeout``) allows for the sum of their budgets. Otherwise all together, each
        within the time left less :data:`DEADLINE_MARGIN`, with a warning saying so.

        Cancelled (the deadline reached all the same, or ``force_exit``): from then on
        shielded, every child not yet ended gets ``terminate(FORCED_BUDGET)`` (its stop
        signal, then a kill), all together, and the stop waits until each exit has been
        recorded (logged and published on ``child_exit``), at most ``FORCED_BUDGET +
        FORCED_WAIT`` seconds; then the cancellation goes on.
        """
        try:
            async with anyio.create_task_group() as group:
                try:
                    await self._halt_supervision()
                    children = [child for child in reversed(self._children) if self._running(child)]
                    left = max(0.0, anyio.current_effective_deadline() - anyio.current_time())
                    needed = self._needed(children)
                    done = anyio.Event()
                    if left < needed:
                        budget = max(0.0, left - DEADLINE_MARGIN)
                        self.bus.log(
                            f"Stopping children {_names(children)} together, each within {budget:.2f} s: "
                            f"{left:.2f} s are left before the stop's deadline, and stopping them one after "
                            f"another may take {needed:g} s",
                            logging.WARNING,
                            children=[child.name for child in children],
                            budget=budget,
                            needed=needed,
                        )
                        group.start_soon(self._stop_together, children, budget, done)
                    else:
                        group.start_soon(self._stop_in_order, children, done)
                    await done.wait()
                except anyio.get_cancelled_exc_class():
                    with anyio.CancelScope(shield=True):
                        await self._stop_forced()
                    raise
        finally:
            for child in self._children:
                if child.state is not ChildState.FAILED and not self._running(child):
                    child.state = ChildState.STOPPED

    async def graceful(self) -> None:
        """Pass graceful on to every running child.

        Cancelled: the children after the one being told are not. No timeout.
        """
        for child in self._children:
            if child.state is ChildState.RUNNING:
                await child.graceful()

    def _check_budgets(self) -> None:
        """Warn if the bus's stop_timeout is shorter than stopping the children one after another may take."""
        timeout = self.bus.stop_timeout
        budgets = {child.name: child.stop_budget for child in self._children}
        needed = self._needed(self._children)
        if timeout is None or timeout >= needed:
            return
        each = ", ".join(f"{name} {budget:g} s" for name, budget in budgets.items())
        self.bus.log(
            f"The bus's stop_timeout ({timeout:g} s) is shorter than the stop budgets of children {each} "
            f"({needed:g} s in their order): their stop will be cut short, and a child still "
            f"running at the deadline killed",
            logging.WARNING,
            children=list(budgets),
            budgets=budgets,
            budget=needed,
            stop_timeout=timeout,
        )

    # -- one child at run time ---------------------------------------------------------

    async def start_child(self, child: Child | str) -> ChildInfo:
        """Start a child now, if the group runs and the child does not; return once it runs (ready).

        A child given by name is looked up; a :class:`Child` not in the group joins it first.
        Its policy and the group's strategy apply from then on. While the group does not run
        (or the bus's stop has begun), it is only added.

        Raises:
            KeyError: no child of the group has that name.
            RuntimeError: the bus's stop began while it was starting (nothing of it runs).
            Exception: it could not start (recorded and logged; nothing of it runs).

        Cancelled: nothing of it is left running. Timeout: the child's own start timeout.
        """
        if isinstance(child, Child) and child not in self._children:
            self.add(child)
        child = self._resolve(child)
        if self._scope is not None and not self._stopping and not self._running(child):
            await self._steered_spawn(child)
        return child.info()

    async def stop_child(self, child: Child | str, budget: float | None = None) -> ChildInfo:
        """Stop a child (within its own stop budget unless given one) and wait until its exit is
        handed on; it stays in the group, stopped: neither its policy nor a strategy restarts it
        until :meth:`start_child` or the bus's next start. Its exit is an expected one.

        Raises:
            KeyError: no child of the group has that name.

        Shielded: once begun, the stop completes. Timeout: the budget, then a kill.
        """
        child = self._resolve(child)
        with anyio.CancelScope(shield=True):
            if self._running(child):
                await self._stop_child(child, budget)
            if child.state is not ChildState.FAILED:
                child.state = ChildState.STOPPED  # an exit of its own still waiting for a decision is void
        return child.info()

    async def restart_child(self, child: Child | str) -> ChildInfo:
        """Stop a child (if it runs), then start it again; return once it runs (ready).

        Only that child, whatever the strategy; it counts in its ``restarts``, not in the
        restart intensity.

        Raises, cancelled, timeout: as :meth:`stop_child`, then :meth:`start_child`.
        """
        child = self._resolve(child)
        running = self._running(child)
        await self.stop_child(child)
        if self._scope is not None and not self._stopping:
            await self._steered_spawn(child)
            if running:
                child.restarts += 1
        return child.info()

    def _resolve(self, child: Child | str) -> Child:
        return self[child] if isinstance(child, str) else child

    async def _steered_spawn(self, child: Child) -> None:
        """Spawn ``child`` for start_child or restart_child; the bus's stop cancels it (RuntimeError)."""
        scope, done = anyio.CancelScope(), anyio.Event()
        self._steered[scope] = done
        try:
            with scope:
                await self._spawn(child)
        finally:
            del self._steered[scope]
            done.set()
        if scope.cancelled_caught:
            raise RuntimeError(f"the bus's stop began while child {child.name!r} was starting")

    # -- running children -------------------------------------------------------------

    def _steps(self, children: Iterable[Child]) -> list[list[Child]]:
        """``children`` in steps of the order: one child each, but a pool's workers (next to each
        other, the same batch) together, and all of them together if the group is not ordered."""
        steps: list[list[Child]] = []
        for child in children:
            if steps and (not self.ordered or (child.batch is not None and steps[-1][-1].batch is child.batch)):
                steps[-1].append(child)
            else:
                steps.append([child])
        return steps

    def _needed(self, children: Iterable[Child]) -> float:
        """How long stopping ``children`` in their order may take: the longest budget of each step, summed."""
        return sum(max(child.stop_budget for child in step) for step in self._steps(children))

    async def _spawn_step(self, step: list[Child]) -> None:
        """Start the children of one step, ``concurrency`` at a time; if one cannot start, those
        still starting are cancelled (nothing of them is left) and its error is raised."""
        if len(step) == 1:
            await self._spawn(step[0])
            return
        limiter = anyio.CapacityLimiter(self.concurrency)
        failures: list[Exception] = []

        async def spawn(child: Child) -> None:
            async with limiter:
                try:
                    await self._spawn(child)
                except Exception as error:
                    failures.append(error)
                    group.cancel_scope.cancel()

        async with anyio.create_task_group() as group:
            for child in step:
                group.start_soon(spawn, child)
        if failures:
            raise failures[0]

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
        self.bus.log(f"Child {child.name} started", child=child.name, child_pid=child.pid, kind=child.kind)
        self.bus.start_soon(self._watch, child, incarnation, watched, name=f"aiobus watch {child.name}")

    async def _watch(self, child: Child, incarnation: int, watched: anyio.Event) -> None:
        """Wait for the incarnation to end and hand its exit to the supervisor (or record it, if none runs).

        Cancelled (the bus's tasks are ending while the child runs: its supervisor's stop
        never ran, or was cut short): shielded, the child gets ``terminate(FORCED_BUDGET)``
        and its exit is handed on all the same; then the cancellation goes on.
        """
        try:
            try:
                exit = await child.wait()
            except anyio.get_cancelled_exc_class():
                with anyio.CancelScope(shield=True):
                    exit = await self._end_abandoned(child)
                    await self._hand_on(child, incarnation, exit)
                raise
            with anyio.CancelScope(shield=True):
                await self._hand_on(child, incarnation, exit)
        finally:
            watched.set()

    async def _end_abandoned(self, child: Child) -> ChildExit:
        """End a child whose watcher is cancelled, and say how it ended (the caller shields it)."""
        self.bus.log(
            f"Child {child.name} still running as the bus's tasks end: "
            f"asking it to stop within {FORCED_BUDGET:g} s, then killing it",
            logging.WARNING,
            child=child.name,
            budget=FORCED_BUDGET,
        )
        child.state = ChildState.STOPPING
        await child.terminate(FORCED_BUDGET)
        exit = await child.wait()
        if child.state is not ChildState.FAILED:
            child.state = ChildState.STOPPED
        return exit

    async def _hand_on(self, child: Child, incarnation: int, exit: ChildExit) -> None:
        """Give ``exit`` to the supervisor's loop, or record it here if the loop has ended."""
        if self._exits is not None:
            self._exits.send_nowait((child, incarnation, exit))  # an unbounded buffer: never blocks
        else:
            await self._record(child, exit)

    async def _record(
        self, child: Child, exit: ChildExit, message: str | None = None, level: int | None = None
    ) -> None:
        """Keep ``exit`` as the child's last, log it and publish it on ``child_exit``.

        Shielded: once begun, a record is completed whatever is cancelled meanwhile.
        """
        child.last_exit = exit
        if level is None:
            level = logging.WARNING if exit.failed else logging.INFO
        self.bus.log(
            message or f"Child {child.name} ended: {exit.reason}",
            level,
            child=child.name,
            child_pid=exit.pid,
            exit_code=exit.exit_code,
            signal=exit.signal,
            reason=exit.reason,
            expected=exit.expected,
        )
        with anyio.CancelScope(shield=True):
            try:
                await self.bus.publish(CHILD_EXIT_CHANNEL, exit)
            except ChannelFailures:
                pass  # publish logged each failing listener; supervision goes on

    def _running(self, child: Child) -> bool:
        """Whether an incarnation of ``child`` may be running (its exit not handed on yet)."""
        if child.state not in (ChildState.RUNNING, ChildState.STARTING, ChildState.STOPPING):
            return False
        watched = self._watches.get(id(child))
        return watched is None or not watched.is_set()

    async def _stop_child(self, child: Child, budget: float | None = None, *, shield: bool = True) -> None:
        """Terminate ``child`` within ``budget`` (its own if None) and wait until its exit has been handed on.

        The terminate call is shielded unless ``shield`` is False; the wait is not.
        """
        child.state = ChildState.STOPPING
        with anyio.CancelScope(shield=shield):
            await child.terminate(budget)
        watched = self._watches.get(id(child))
        if watched is not None:
            await watched.wait()

    async def _terminate(self, children: Iterable[Child]) -> None:
        """Stop ``children`` in their order (a step's together), each within its own budget; none once a
        forced stop began."""
        for step in self._steps(children):
            if self._forcing:
                return
            async with anyio.create_task_group() as group:
                for child in step:
                    if child.state in (ChildState.RUNNING, ChildState.STARTING, ChildState.STOPPING):
                        group.start_soon(self._stop_child, child)
            for child in step:
                if child.state is not ChildState.FAILED:
                    child.state = ChildState.STOPPED

    async def _halt_supervision(self) -> None:
        """End the supervisor's loop (no restart from here on): from then on, exits are recorded by their watchers.

        The starts of start_child and restart_child under way are cancelled first, and waited for."""
        steered = list(self._steered.items())
        for scope, _ in steered:
            scope.cancel()
        for _, done in steered:
            await done.wait()
        if self._scope is not None:
            self._scope.cancel()
            await self._ended.wait()
            self._scope = None

    async def _stop_in_order(self, children: list[Child], done: anyio.Event) -> None:
        try:
            await self._terminate(children)
        finally:
            done.set()

    async def _stop_together(self, children: list[Child], budget: float, done: anyio.Event) -> None:
        try:
            async with anyio.create_task_group() as group:
                for child in children:
                    group.start_soon(self._stop_child, child, budget)
            self._report_killed(children)
        finally:
            done.set()

    async def _stop_forced(self) -> None:
        """End every child still running within FORCED_BUDGET, all together, and wait for their exits to be
        recorded, at most FORCED_BUDGET + FORCED_WAIT seconds (the caller shields it); then log one line
        naming those it had to kill."""
        self._forcing = True
        pending = [child for child in reversed(self._children) if self._running(child)]
        if pending:
            self.bus.log(
                f"Stop cut short: children {_names(pending)} asked to stop within {FORCED_BUDGET:g} s, then killed",
                logging.WARNING,
                children=[child.name for child in pending],
                budget=FORCED_BUDGET,
            )
        with anyio.move_on_after(FORCED_BUDGET + FORCED_WAIT):
            await self._ended.wait()  # the loop's last exits recorded: from here on, each watcher records its own
            self._scope = None
            async with anyio.create_task_group() as group:
                for child in pending:
                    group.start_soon(functools.partial(self._stop_child, child, FORCED_BUDGET, shield=False))
        self._report_killed(pending)
        missing = [child.name for child in pending if self._running(child)]
        if missing:
            self.bus.log(
                f"Children {', '.join(missing)} not known to have ended {FORCED_BUDGET + FORCED_WAIT:g} s "
                f"after the stop was cut short",
                logging.ERROR,
                children=missing,
            )

    def _report_killed(self, children: list[Child]) -> None:
        """After a stop cut short: one line naming the children it had to kill, with their pids (if any)."""
        ended = [child.last_exit for child in children if not self._running(child) and child.last_exit is not None]
        killed = {exit.name: exit.pid for exit in ended if exit.signal == "SIGKILL"}
        if killed:
            said = ", ".join(f"{name} (pid {pid})" for name, pid in killed.items())
            self.bus.log(f"Children killed as the stop was cut short: {said}", logging.WARNING, killed=killed)

    async def _supervise(
        self, scope: anyio.CancelScope, send: MemoryObjectSendStream[_Exit], exits: MemoryObjectReceiveStream[_Exit]
    ) -> None:
        try:
            with scope:
                async for child, incarnation, exit in exits:
                    if exit.expected or incarnation != self._incarnations.get(id(child)) or self._stopping:
                        await self._record(child, exit)  # stopped by us, or already restarted: nothing to decide
                    elif child.state is ChildState.STOPPED:
                        await self._record(child, exit)  # stop_child got there first: no decision
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
            if child.significant:
                self._end_with(child, exit)
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
            # a pool may have shrunk; a child stopped or started by stop_child or start_child meanwhile is left be
            affected = [each for each in affected if each in self._children and each.state is ChildState.RESTARTING]
            if not affected:
                return
            try:
                for step in self._steps(affected):
                    await self._spawn_step(step)
                    for each in step:
                        each.restarts += 1
            except Exception:
                # _spawn recorded why; stop those of this attempt so that the next one starts them anew
                with anyio.CancelScope(shield=True):
                    await self._terminate(reversed([each for each in affected if self._running(each)]))
                for each in affected:
                    each.state = ChildState.RESTARTING
                continue
            return

    @property
    def _stopping(self) -> bool:
        """Whether the bus's stop has begun (our stop listener may not have run yet)."""
        return self.bus.state in (State.STOPPING, State.EXITING)

    def _affected(self, child: Child) -> list[Child]:
        """The children a strategy restarts along with ``child``: not those that exited for good, nor
        those an operator stopped (``stop_child``)."""
        settled = (ChildState.EXITED, ChildState.STOPPED)
        if self.strategy is Strategy.ONE_FOR_ALL:
            return [c for c in self._children if c.state not in settled or c is child]
        if self.strategy is Strategy.REST_FOR_ONE:
            index = self._children.index(child)
            return [c for c in self._children[index:] if c.state not in settled or c is child]
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

    def _end_with(self, child: Child, exit: ChildExit) -> None:
        """A significant child ended for good: the bus exits, code 0 if it ended cleanly, 70 otherwise."""
        code = ExitCode.SOFTWARE if exit.failed else ExitCode.OK
        self.bus.log(
            f"Significant child {child.name} ended for good ({exit.reason}): exiting with code {code}",
            logging.WARNING if code else logging.INFO,
            child=child.name,
            reason=exit.reason,
            exit_code=code,
        )
        if code:
            self.bus.exit_code = code
        self.bus.start_soon(self.bus.exit)

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
        self.bus.exit_code = ExitCode.SOFTWARE
        self.bus.start_soon(self.bus.exit)


def _names(children: Iterable[Child]) -> str:
    return ", ".join(child.name for child in children)


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
