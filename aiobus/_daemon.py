"""Daemonizing: detach the process before any event loop runs, and tell the launcher how it went.

The original process does not exit at once as CherryPy's does: it waits for the daemon
to report, and exits 0 only once the daemon has started, non-zero with the daemon's
error otherwise. The report travels over a pipe, one JSON object a line:
``{"pid": n}`` when the daemon exists, then ``{"started": true}`` or ``{"failed": text}``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import select
import signal
import sys
import threading
import time
import warnings
from typing import Any

import anyio

from ._bus import Bus
from ._exitcodes import ExitCode
from ._seconds import check_seconds
from ._state import State

StrPath = str | os.PathLike[str]

#: The longest failure text the daemon sends (a pipe holds at least 64 KiB on Linux).
_MAX_REPORT = 16 * 1024
_PREFIX = "aiobus.daemonize"


class Daemon:
    """The daemon's side of :func:`daemonize`: tells the original process how the start went.

    The first report wins; later ones do nothing. If the daemon ends without
    reporting, the original process sees the pipe close and exits non-zero.
    """

    def __init__(self, report_fd: int) -> None:
        self._fd: int | None = report_fd
        #: The daemon's process id.
        self.pid = os.getpid()
        self._buses: dict[Bus, _BusReporter] = {}
        self._send({"pid": self.pid}, close=False)

    @property
    def reported(self) -> bool:
        """Whether :meth:`started` or :meth:`failed` has been called."""
        return self._fd is None

    def started(self) -> None:
        """Report that the daemon started: the original process exits 0."""
        self._send({"started": True})

    def failed(self, error: str) -> None:
        """Report that the daemon failed to start: the original prints ``error`` and exits 1."""
        self._send({"failed": str(error)[-_MAX_REPORT:]})

    def subscribe(self, bus: Bus) -> None:
        """Deprecated: ``DaemonReporter(bus, daemon).subscribe()``, which it does."""
        warnings.warn(
            "Daemon.subscribe(bus) is deprecated: use DaemonReporter(bus, daemon).subscribe()",
            DeprecationWarning,
            stacklevel=2,
        )
        DaemonReporter(bus, self).subscribe()

    def unsubscribe(self, bus: Bus) -> None:
        """Deprecated: ``DaemonReporter(bus, daemon).unsubscribe()``, which it does."""
        warnings.warn(
            "Daemon.unsubscribe(bus) is deprecated: use DaemonReporter(bus, daemon).unsubscribe()",
            DeprecationWarning,
            stacklevel=2,
        )
        DaemonReporter(bus, self).unsubscribe()

    def _attach(self, bus: Bus) -> None:
        if bus in self._buses:
            return
        reporter = _BusReporter(self, bus)
        self._buses[bus] = reporter
        bus.subscribe("log", reporter)
        bus.subscribe("state", reporter.state)
        reporter.check()

    def _detach(self, bus: Bus) -> None:
        reporter = self._buses.pop(bus, None)
        if reporter is not None:
            bus.unsubscribe("log", reporter)
            bus.unsubscribe("state", reporter.state)

    def _send(self, message: dict[str, Any], close: bool = True) -> None:
        fd = self._fd
        if fd is None:
            return
        if close:
            self._fd = None
        try:
            os.write(fd, json.dumps(message).encode() + b"\n")
        except OSError:
            pass  # the original process is gone: nobody is waiting for the report
        finally:
            if close:
                os.close(fd)


class DaemonReporter:
    """A plugin: the daemon reports started once ``bus`` is STARTED, failed if the bus exits before.

    It follows ``bus``'s ``state`` channel: "started" goes out once the bus is STARTED,
    after every start listener has run. A failure report carries the errors the bus
    logged (its ``log`` channel) before it reached EXITING (a failing start listener's
    message and traceback). Subscribe before ``bus.start()``; on a bus already STARTED
    it reports at once. Subscribing twice, even from two reporters of the same daemon
    and bus, reports once.

    Args:
        bus: the daemon's bus.
        daemon: what :func:`daemonize` returned.
    """

    def __init__(self, bus: Bus, daemon: Daemon) -> None:
        self.bus = bus
        self.daemon = daemon

    def subscribe(self) -> None:
        """Report from the bus from now on."""
        self.daemon._attach(self.bus)

    def unsubscribe(self) -> None:
        """Stop reporting from the bus."""
        self.daemon._detach(self.bus)


class _BusReporter:
    """Reports the bus's start (a ``state`` listener), or the errors that prevented it (kept
    by its ``log`` listener)."""

    def __init__(self, daemon: Daemon, bus: Bus) -> None:
        self.daemon = daemon
        self.bus = bus
        self.errors: list[str] = []

    def __call__(self, msg: str, level: int = logging.INFO, **fields: Any) -> None:
        if self.daemon.reported:
            return
        if level >= logging.ERROR:
            trace = fields.get("traceback")
            self.errors.append(f"{msg}\n{trace.rstrip()}" if isinstance(trace, str) else msg)

    def state(self, old: State, new: State) -> None:
        self.check()

    def check(self) -> None:
        if self.bus.state is State.STARTED:
            self.daemon.started()
        elif self.bus.state is State.EXITING:
            self.daemon.failed("\n".join(self.errors) or "the bus exited before it started")


def daemonize(
    *,
    stdin: StrPath = os.devnull,
    stdout: StrPath = os.devnull,
    stderr: StrPath = os.devnull,
    umask: int = 0o022,
    chdir: StrPath = "/",
    ready_timeout: float | None = 60.0,
) -> Daemon:
    """Detach the process as a daemon; call it before any event loop runs (before ``anyio.run``).

    Forking a process with a running event loop or other threads leaves them broken in
    the child, so it refuses both. The standard streams' files are opened first, in
    the calling process (relative paths are relative to its working directory, and an
    error is raised here). Then: a pipe, a fork, ``setsid`` in the child, a second fork
    (the daemon is no session leader, so it never gets a controlling terminal),
    ``chdir``, ``umask``, the files put on descriptors 0, 1 and 2, and every other
    descriptor inherited from the caller closed (but the daemon's report pipe): a
    process that waits for the end of a pipe shared with the caller is not kept
    waiting by the daemon. Files the daemon needs are opened after this call.

    The original process never returns: it waits for the daemon's report, then exits
    0 once the daemon reported that it started, or prints the daemon's error (or why
    there is none) on its standard error and exits 1: if the daemon reported a
    failure, ended without reporting, or did not report within ``ready_timeout``
    seconds (then it is sent SIGTERM). Ctrl-C while it waits exits 1 and leaves the
    daemon alone. The intermediate child exits at once.

    The daemon gets a :class:`Daemon` back and reports through it: ``daemon.started()``
    or ``daemon.failed(text)`` by hand, or ``DaemonReporter(bus, daemon).subscribe()`` inside
    the loop to report from the bus's own start. A bus restarted by ``bus.restart()`` re-executes
    the program, which daemonizes again (a new pid).

    Args:
        stdin: file read as standard input.
        stdout: file standard output is appended to (created with mode 0o640, less the caller's umask).
        stderr: the same for standard error; may be the same file as ``stdout``.
        umask: the daemon's file mode creation mask.
        chdir: the daemon's working directory.
        ready_timeout: seconds the original process waits for the report; None waits forever.

    Returns:
        In the daemon, its :class:`Daemon`. In the original process it does not return.

    Raises:
        RuntimeError: an event loop runs in this thread, or other threads are alive
            (only threads of the ``threading`` module are seen), or the platform has no fork.
        ValueError, TypeError: a bad argument.
        OSError: a stream's file or ``chdir`` cannot be used.
    """
    if not isinstance(umask, int) or isinstance(umask, bool) or not 0 <= umask <= 0o777:
        raise ValueError(f"umask must be an int from 0 to 0o777, not {umask!r}")
    check_seconds("ready_timeout", ready_timeout, positive=True, optional=True)
    directory = os.fspath(chdir)
    if not os.path.isdir(directory):
        raise NotADirectoryError(f"chdir: {directory!r} is not a directory")
    _refuse_unsafe()
    fds = _open_streams(stdin, stdout, stderr)
    try:
        read_fd, write_fd = os.pipe()
    except OSError:
        _close_all(fds)
        raise
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        middle = os.fork()
    except OSError:
        _close_all([*fds, read_fd, write_fd])
        raise
    if middle:
        _close_all([*fds, write_fd])
        _await_report(middle, read_fd, ready_timeout)  # never returns
    os.close(read_fd)
    try:
        os.setsid()
        if os.fork():
            os._exit(ExitCode.OK)
        os.chdir(directory)
        os.umask(umask)
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
        _close_inherited(keep=write_fd)
    except BaseException as exc:
        try:
            os.write(write_fd, json.dumps({"failed": f"daemonizing failed: {exc!r}"}).encode() + b"\n")
        finally:
            os._exit(ExitCode.FAILURE)
    return Daemon(write_fd)


def _refuse_unsafe() -> None:
    if not hasattr(os, "fork"):
        raise RuntimeError("daemonize() needs os.fork (a POSIX system)")
    try:
        anyio.get_current_task()
    except RuntimeError:
        pass  # no event loop in this thread: good
    else:
        raise RuntimeError("daemonize() must be called before the event loop starts (before anyio.run)")
    others = [thread.name for thread in threading.enumerate() if thread is not threading.current_thread()]
    if others:
        raise RuntimeError(f"daemonize() must be called before any thread starts; alive: {', '.join(others)}")


def _open_streams(stdin: StrPath, stdout: StrPath, stderr: StrPath) -> list[int]:
    """Open the standard streams' files (close-on-exec until they are dup2'ed onto 0-2)."""
    fds: list[int] = []
    try:
        fds.append(os.open(stdin, os.O_RDONLY | os.O_NOCTTY))
        for path in (stdout, stderr):
            fds.append(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOCTTY, 0o640))
    except BaseException:
        _close_all(fds)
        raise
    return fds


def _close_inherited(keep: int) -> None:
    """Close every descriptor above 2 but ``keep``: a caller waiting for the end of a pipe it
    shares with this process must not wait for the daemon too."""
    top = os.sysconf("SC_OPEN_MAX")
    os.closerange(3, keep)
    os.closerange(keep + 1, max(top, keep + 1))


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def _await_report(middle: int, read_fd: int, timeout: float | None) -> None:
    """The original process: wait for the daemon's report and exit with its outcome."""
    try:
        try:
            os.waitpid(middle, 0)  # the intermediate child exits at once
        except ChildProcessError:
            pass  # already reaped (SIGCHLD ignored)
        code, message = _read_report(read_fd, timeout)
    except BaseException as exc:  # Ctrl-C included: the original must never return
        code, message = ExitCode.FAILURE, f"{_PREFIX}: stopped waiting for the daemon: {exc!r}"
    if message:
        try:
            sys.stderr.write(message + "\n")
            sys.stderr.flush()
        except Exception:
            pass
    os._exit(code)


def _read_report(read_fd: int, timeout: float | None) -> tuple[int, str]:
    """Read the daemon's report lines until one settles the outcome: (exit code, message)."""
    deadline = math.inf if timeout is None else time.monotonic() + timeout
    poller = select.poll()
    poller.register(read_fd, select.POLLIN)
    pid: int | None = None
    pending = b""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return ExitCode.FAILURE, _timed_out(pid, timeout)
        if not poller.poll(None if remaining == math.inf else math.ceil(remaining * 1000)):
            continue
        chunk = os.read(read_fd, 65536)
        who = "the daemon" if pid is None else f"the daemon (pid {pid})"
        if not chunk:
            return ExitCode.FAILURE, f"{_PREFIX}: {who} exited before reporting that it started"
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            report = json.loads(line)
            if "pid" in report:
                pid = int(report["pid"])
            elif report.get("started"):
                return ExitCode.OK, ""
            elif "failed" in report:
                who = "the daemon" if pid is None else f"the daemon (pid {pid})"
                return ExitCode.FAILURE, f"{_PREFIX}: {who} failed to start:\n{report['failed']}"


def _timed_out(pid: int | None, timeout: float | None) -> str:
    message = f"{_PREFIX}: the daemon did not report within {timeout:g} s"
    if pid is not None:
        try:
            os.kill(pid, signal.SIGTERM)
        except OSError:
            pass
        else:
            message += f"; sent SIGTERM to it (pid {pid})"
    return message
