"""Autoreloader: restart the process when one of its source files changes.

For development. CherryPy's Autoreloader polled the mtime of every module file
every second from a thread, and its re-exec lost ``python -m`` (cherrypy#1411).
This one waits for file-system notifications through watchfiles (an optional
dependency: ``pip install aiobus[reload]``) and restarts through
``Bus.restart()``, which re-executes ``sys.orig_argv``: scripts and ``python -m
pkg`` alike come back with the interpreter's original arguments.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import site
import sys
import sysconfig
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING, Any

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from aiobus import Bus, Priority, SimplePlugin, check_seconds, priority

if TYPE_CHECKING:
    from watchfiles import Change

#: Seconds between two scans of ``sys.modules`` for files imported since the last one.
RESCAN_INTERVAL = 1.0

_Changes = set[tuple["Change", str]]


def _import_watchfiles() -> ModuleType:
    try:
        import watchfiles
    except ImportError as error:
        raise ImportError("the Autoreloader needs watchfiles: pip install aiobus[reload]", name="watchfiles") from error
    return watchfiles


def _checked_path(path: str | os.PathLike[str]) -> str:
    if not isinstance(path, str | os.PathLike):
        raise TypeError(f"Autoreloader paths are str or os.PathLike, not {path!r}")
    full = os.path.abspath(os.fspath(path))
    if not os.path.exists(full):
        raise FileNotFoundError(2, "Autoreloader: no such file or directory to watch", full)
    return full


def _forms(directories: Iterable[str]) -> tuple[str, ...]:
    """Each directory as given and with symlinks resolved, ending with a separator."""
    found = set()
    for directory in directories:
        for form in (os.path.normpath(directory), os.path.realpath(directory)):
            found.add(form.rstrip(os.sep) + os.sep)
    return tuple(found)


@dataclass(eq=False)
class _Run:
    """One run of the watching task, from a start to a stop."""

    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    stop: anyio.Event = field(default_factory=anyio.Event)  # ends watchfiles' thread
    done: anyio.Event = field(default_factory=anyio.Event)
    task_id: int | None = None
    unready: int = 0  # watches not set up yet; "Autoreloader watching" is logged when none is left


class Autoreloader(SimplePlugin):
    """Calls ``bus.restart()`` when a file of an imported module, or one of ``paths``, changes.

    Watched: the ``__file__`` of every module in ``sys.modules`` that exists on disk
    (the ``__main__`` script or package included), except the standard library and,
    unless ``include_site_packages``, the site-packages directories (thousands of
    files that do not change while you develop; an editable install lives outside
    them and is watched). ``sys.modules`` is scanned again every
    :data:`RESCAN_INTERVAL` second while watching, so modules imported after
    ``start`` are picked up within about a second. The directories of those files
    are watched (not their subdirectories), and only changes to the files count.

    A file in ``paths`` counts like a module file; a directory counts for anything
    below it, recursively, except what watchfiles' default filter ignores
    (``__pycache__``, ``.git``, compiled and editor swap files).

    Changes are debounced: once one is seen, the reloader waits until no other has
    come for ``debounce`` seconds, then logs the changed files and restarts the bus
    once, however many writes (a ``git checkout``, an editor saving in steps) came.
    The restart runs stop and exit as usual, then ``bus.block()`` re-executes the
    process.

    Channels: ``start`` (``Priority.START_AUTORELOAD``, 70: before the children start
    at 80, so that a file saved while they start is seen) starts watching in a task of
    the bus, and logs ``Autoreloader watching`` once the watch is set up (within about
    a second); ``stop`` (``Priority.STOP_AUTORELOAD``, 10: before the children stop at
    20, so that a file saved while they stop does not turn a shutdown into a restart)
    stops watching and returns when the task has ended. A
    failure of the watch other than a vanished directory (which only makes it scan
    again) fails the task: the bus logs it and exits with code 70.

    Args:
        bus: the bus to restart.
        paths: more files or directories to watch; each must exist.
        debounce: seconds without a change before restarting, >= 0.
        include_site_packages: watch modules under site-packages too.

    Raises:
        ImportError: watchfiles is not installed (``pip install aiobus[reload]``).
        TypeError: ``paths`` is a single str or holds something that is not a path.
        FileNotFoundError: a path in ``paths`` does not exist.
        ValueError: ``debounce`` is not a finite number >= 0.
    """

    def __init__(
        self,
        bus: Bus,
        paths: Iterable[str | os.PathLike[str]] | None = None,
        *,
        debounce: float = 0.5,
        include_site_packages: bool = False,
    ) -> None:
        watchfiles = _import_watchfiles()
        if isinstance(paths, str | os.PathLike):
            raise TypeError(f"Autoreloader paths is an iterable of paths, not the single path {paths!r}")
        self.debounce = check_seconds("the Autoreloader's debounce", debounce)
        super().__init__(bus)
        self.paths = tuple(_checked_path(path) for path in paths or ())
        self.include_site_packages = include_site_packages
        self._awatch: Callable[..., Any] = watchfiles.awatch
        self._dir_filter: Callable[[Change, str], bool] = watchfiles.DefaultFilter()
        self._extra_files = frozenset(path for path in self.paths if not os.path.isdir(path))
        self._dirs = frozenset(path for path in self.paths if os.path.isdir(path))
        self._extra_dirs = _forms(self._dirs)
        paths_of = sysconfig.get_paths()
        user_site = site.getusersitepackages() if site.ENABLE_USER_SITE else None
        site_dirs: list[str] = getattr(site, "getsitepackages", list)()  # absent in some old virtualenvs
        self._site_dirs = _forms(
            path for path in (paths_of["purelib"], paths_of["platlib"], *site_dirs, user_site) if path
        )
        self._stdlib_dirs = _forms((paths_of["stdlib"], paths_of["platstdlib"]))
        self._files: frozenset[str] = frozenset()
        self._scanned_at = -math.inf
        self._run: _Run | None = None

    def files(self) -> frozenset[str]:
        """The files watched now: those of the imported modules (scanned anew) and those of ``paths``."""
        self._scan()
        return self._files

    # -- channels -------------------------------------------------------------------

    @priority(Priority.START_AUTORELOAD)
    async def start(self) -> None:
        """Start watching in a task of the bus; a no-op if it watches already.

        Cancelled: no watch is started. No timeout.
        """
        if self._run is None or self._run.scope.cancel_called:
            run = _Run()
            self._run = run
            self.bus.start_soon(self._task, run, name="autoreloader")

    @priority(Priority.STOP_AUTORELOAD)
    async def stop(self) -> None:
        """Stop watching and wait until the task has ended (watchfiles' thread within a tenth of a second).

        Cancelled itself (say by the bus's ``stop_timeout``), it stops waiting; the
        task is cancelled all the same.
        """
        run = self._run
        if run is None:
            return
        run.stop.set()
        run.scope.cancel()
        if run.task_id is not None and run.task_id != anyio.get_current_task().id:
            await run.done.wait()
        if self._run is run:
            self._run = None

    def unsubscribe(self) -> None:
        """Unsubscribe from the bus and stop watching, without waiting for the task to end."""
        super().unsubscribe()
        if self._run is not None:
            self._run.stop.set()
            self._run.scope.cancel()

    # -- what to watch ----------------------------------------------------------------

    def _skipped(self, path: str) -> bool:
        if path.startswith(self._site_dirs):
            return not self.include_site_packages
        return path.startswith(self._stdlib_dirs)

    def _scan(self) -> None:
        found = set(self._extra_files)
        for module in list(sys.modules.values()):
            try:
                file = getattr(module, "__file__", None)
            except Exception:  # a lazy module object may raise anything
                continue
            if isinstance(file, str):
                path = os.path.abspath(file)
                if not self._skipped(path) and os.path.isfile(path):
                    found.add(path)
        self._files = frozenset(found)
        self._scanned_at = time.monotonic()

    def _module_dirs(self) -> frozenset[str]:
        """The directories to watch for the files, after a scan if the last one is old."""
        if time.monotonic() - self._scanned_at >= RESCAN_INTERVAL:
            self._scan()
        return frozenset(os.path.dirname(path) for path in self._files)

    def _relevant(self, changes: _Changes) -> set[str]:
        self._module_dirs()  # rescans if due
        found = set()
        for change, path in changes:
            path = os.path.normpath(path)
            if path in self._files or (path.startswith(self._extra_dirs) and self._dir_filter(change, path)):
                found.add(path)
        return found

    # -- the task ---------------------------------------------------------------------

    async def _task(self, run: _Run) -> None:
        run.task_id = anyio.get_current_task().id
        try:
            with run.scope:
                send, receive = anyio.create_memory_object_stream[_Changes](math.inf)
                async with receive, anyio.create_task_group() as group:
                    run.unready = 2 if self._dirs else 1
                    async with send:
                        group.start_soon(self._watch, run, send.clone(), self._module_dirs, False)
                        if self._dirs:
                            group.start_soon(self._watch, run, send.clone(), lambda: self._dirs, True)
                    changed = await self._next_change(receive)
                    run.stop.set()  # ends watchfiles' threads (they look every 50 ms)
                    group.cancel_scope.cancel()
                if changed:
                    self.bus.log(f"Autoreloader: {len(changed)} file(s) changed; restarting", files=sorted(changed))
                    self.bus.start_soon(self.bus.restart, name="autoreloader restart")
        finally:
            run.stop.set()
            run.done.set()

    def _ready(self, run: _Run, first: bool, directories: frozenset[str]) -> None:
        """Log that a watch is set up: at INFO once all of a run's are, at DEBUG for a new one."""
        if first:
            run.unready -= 1
            if run.unready == 0:
                count = len(self._module_dirs()) + len(self._dirs)
                self.bus.log("Autoreloader watching", files=len(self._files), directories=count)
        else:
            self.bus.log("Autoreloader watching anew", logging.DEBUG, directories=sorted(directories))

    async def _next_change(self, receive: MemoryObjectReceiveStream[_Changes]) -> set[str]:
        """The relevant files changed, once quiet for ``debounce`` seconds; empty if the watches ended."""
        changed: set[str] = set()
        deadline = math.inf
        while True:
            with anyio.CancelScope(deadline=deadline):
                try:
                    batch = await receive.receive()
                except anyio.EndOfStream:
                    return changed
                relevant = self._relevant(batch)
                if relevant:
                    changed |= relevant
                    deadline = anyio.current_time() + self.debounce
                continue
            return changed  # quiet for debounce seconds

    async def _watch(
        self,
        run: _Run,
        send: MemoryObjectSendStream[_Changes],
        directories: Callable[[], frozenset[str]],
        recursive: bool,
    ) -> None:
        """Send each batch of changes in ``directories`` until ``run.stop``; follow new directories."""
        first = True
        async with send:
            while not run.stop.is_set():
                watched = directories()
                if not watched:  # nothing to watch yet: look again later
                    self._ready(run, first, watched)
                    first = False
                    with anyio.move_on_after(RESCAN_INTERVAL):
                        await run.stop.wait()
                    continue
                watch = self._awatch(
                    *watched,
                    watch_filter=None,
                    stop_event=run.stop,
                    rust_timeout=int(RESCAN_INTERVAL * 1000),
                    yield_on_timeout=True,
                    recursive=recursive,
                )
                try:
                    async with contextlib.aclosing(watch):
                        set_up = False
                        async for changes in watch:  # set up at once; yields within RESCAN_INTERVAL
                            if not set_up:
                                set_up = True
                                self._ready(run, first, watched)
                                first = False
                            if changes:
                                await send.send(changes)
                            if directories() != watched:
                                break  # a module imported from a new directory, or a directory gone
                except FileNotFoundError:  # a directory vanished before the watch was set up
                    self._scanned_at = -math.inf
                    self.bus.log("Autoreloader: a watched directory vanished; scanning again", logging.DEBUG)
                    await anyio.sleep(RESCAN_INTERVAL / 10)
