"""The worker process's entry: ``python -P .../_boot.py ANYIO CONTROL DATA BEATS LOGS``.

It imports nothing of aiobus (only structlog, early: see :func:`_import_structlog_quietly`): the
worker loads aiobus, and the parent's main module, with
the parent's ``sys.path`` (anyio's ``init``), as anyio's own workers do. Each argument is a
descriptor of a socket the parent passed (see :mod:`.messages`). Before anything else runs
they are made close-on-exec, so the worker's own subprocesses never hold them; then anyio's
worker loop runs with its requests and replies on the first socket, not on descriptors 0
and 1 (see :mod:`.workers`).
"""

from __future__ import annotations

import os
import socket
import sys
from typing import BinaryIO

_PR_SET_DUMPABLE = 4
_PR_SET_CHILD_SUBREAPER = 36
_CONSOLE_ONLY = ("rich", "better_exceptions", "colorama")


class _Replies:
    """Where anyio's worker writes its replies (``sys.stdout.buffer.write``): all of each, or nothing."""

    def __init__(self, sock: socket.socket) -> None:
        self.buffer = self
        self._sock = sock

    def write(self, data: bytes) -> int:
        self._sock.sendall(data)
        return len(data)


class _Requests:
    """Where anyio's worker reads its requests (``pickle.load(sys.stdin.buffer)``)."""

    def __init__(self, reader: BinaryIO) -> None:
        self.buffer = reader


def _harden() -> None:
    """Make this process non-dumpable (Linux): no process of another user, nor of the one it
    runs as, unless privileged, may ptrace it, list or open ``/proc/<pid>/fd``, or take a
    copy of its descriptors with ``pidfd_getfd``. (A subprocess it runs is dumpable again
    after its exec, and holds none of the sockets.) Make it a child subreaper: descendants
    whose parent dies are reparented to it, so that the child can end all it started."""
    if sys.platform == "linux":
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)
        libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)  # what the child starts stays below it


def _import_structlog_quietly() -> None:
    """Import structlog now, with rich and better-exceptions hidden from it: the child renders
    nothing on a console (its log events go to the parent as JSON), so structlog's console
    renderer must not load them (rich alone costs several MiB per child). They are hidden only
    while structlog imports: the child's own code may still import and use them."""
    hidden = [name for name in _CONSOLE_ONLY if name not in sys.modules]
    for name in hidden:
        sys.modules[name] = None  # type: ignore[assignment]  # makes "import rich" raise ImportError
    try:
        import structlog  # noqa: F401
    except ImportError:
        pass  # not on this path: the worker imports it from the parent's path later, as it is
    finally:
        for name in hidden:
            del sys.modules[name]


def main(args: list[str]) -> None:
    _harden()
    _import_structlog_quietly()
    fds = [int(arg) for arg in args]
    for fd in fds:
        os.set_inheritable(fd, False)
    protocol = socket.socket(fileno=fds[0])
    protocol.setblocking(True)
    sys.stdin = _Requests(protocol.makefile("rb"))
    sys.stdout = _Replies(protocol)

    from anyio.to_process import process_worker

    try:
        process_worker()
    except SystemExit as end:  # the child's exit code (run_child raises it once the child has ended)
        _end(end.code)
    _end(0)


def _end(code: object) -> None:
    """End the worker as the interpreter would, but for its teardown: threads not marked daemon
    are waited for, atexit handlers run, the standard streams are flushed, then ``os._exit``.
    Freeing each module's objects one by one costs more CPU than the rest of a child's stop (many
    children stopping together spent most of their stop there); like a child of ``multiprocessing``,
    a worker skips it, so what a child's code left unclosed is not flushed by a finalizer."""
    import atexit
    import threading

    shutdown = getattr(threading, "_shutdown", None)  # what the interpreter calls first at its exit
    if shutdown is not None:
        shutdown()
    atexit._run_exitfuncs()
    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code & 0xFF
    else:
        sys.stderr.write(f"{code}\n")  # as the interpreter does with SystemExit("message")
        status = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, OSError, ValueError):
            pass  # nowhere left to write to
    os._exit(status)


if __name__ == "__main__":
    main(sys.argv[1:])
