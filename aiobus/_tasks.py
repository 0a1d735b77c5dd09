"""The tasks a bus owns: started in its task group, each in a cancel scope of its own."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any

import anyio
from anyio.abc import TaskGroup


class TaskKeeper:
    """Runs tasks in one task group and can end them all without ending the group's host.

    Cancelling the task group's own scope would cancel the code inside ``async with``
    too, so each task gets its own cancel scope instead. A task that raises an
    Exception is handed to ``on_failure`` (the group is not torn down).
    """

    def __init__(self, on_failure: Callable[[str], None]) -> None:
        self._on_failure = on_failure
        self._group: TaskGroup | None = None
        self._scopes: set[anyio.CancelScope] = set()
        self._ended = anyio.Event()
        self._ended.set()
        self._ending = False

    @property
    def entered(self) -> bool:
        return self._group is not None

    async def __aenter__(self) -> None:
        group = anyio.create_task_group()
        await group.__aenter__()
        self._group = group

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        """End the tasks, then close the group; an error of the host passes through unwrapped."""
        assert self._group is not None
        try:
            with anyio.CancelScope(shield=True):
                await self.end_all()
        finally:
            # The tasks never raise (see _run), so the only error is the host's own:
            # let it through as itself, but show anyio a cancellation.
            if exc is not None and not isinstance(exc, anyio.get_cancelled_exc_class()):
                exc_type, exc, tb = None, None, None
            await self._group.__aexit__(exc_type, exc, tb)

    def start_soon(self, fn: Callable[..., Awaitable[Any]], *args: Any, name: str | None = None) -> None:
        if self._group is None:
            raise RuntimeError("the bus has no task group: use it as `async with Bus() as bus:`")
        if self._ended.is_set():
            self._ended = anyio.Event()
        scope = anyio.CancelScope()
        if self._ending:
            scope.cancel()  # started while the tasks are being ended: end it too
        self._scopes.add(scope)
        self._group.start_soon(self._run, scope, fn, args, name=name)

    async def _run(self, scope: anyio.CancelScope, fn: Callable[..., Awaitable[Any]], args: Any) -> None:
        try:
            with scope:
                await fn(*args)
        except Exception:
            self._on_failure(getattr(fn, "__qualname__", repr(fn)))
        finally:
            self._scopes.discard(scope)
            if not self._scopes:
                self._ended.set()

    async def end_all(self) -> None:
        """Cancel every task and wait until all have ended."""
        self._ending = True
        try:
            while self._scopes:
                for scope in list(self._scopes):
                    scope.cancel()
                await self._ended.wait()
        finally:
            self._ending = False
