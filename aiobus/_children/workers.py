"""The one adapter to anyio's process pool: the only code that touches its internals.

A child broker runs through ``anyio.to_process.run_sync``, as the design asks, but never
in a worker of anyio's shared pool. anyio's own workers have its request and reply pipes
on descriptors 0 and 1: whatever the child (or a subprocess inheriting its stdout) writes
there, or another process opening ``/proc/<pid>/fd/1``, would be unpickled by the parent;
an idle worker may also have been started before a privilege change, or used by anything
else. So the parent starts each child's worker itself (:func:`start_worker`):

- anyio's worker loop (``anyio.to_process.process_worker``) runs on a socket pair, not on
  0/1; a socket cannot be opened through ``/proc``, and the worker marks every inherited
  socket close-on-exec before it runs anything (see :mod:`._boot`);
- descriptor 0 is ``/dev/null``, 1 and 2 are pipes the parent reads: a child's output, and
  its subprocesses', become log lines;
- the worker leaves the parent's session (a terminal's Ctrl-C reaches the parent only);
- it inherits the parent's environment but for systemd's ``NOTIFY_SOCKET``,
  ``WATCHDOG_USEC`` and ``WATCHDOG_PID`` (:func:`aiobus.child_environment`);
- it loads the parent's main module the way anyio's own workers do (anyio's ``init``
  request), so functions of a ``__main__`` script unpickle there.

:func:`run_in_worker` then hands that worker to ``run_sync``: it is put on top of anyio's
idle pool at the last moment before anyio takes one, with nothing able to run in between,
and it is never in anyio's set of workers, so anyio neither reuses it nor kills it at
shutdown: the incarnation owns it. (The child also checks that it runs in the worker
started for it, and refuses any other.)

What this relies on, read off anyio 4.16 (``anyio/to_process.py``): the worker speaks
``READY\\n``, then ``RETURN``/``EXCEPTION <length>\\n<pickle>`` replies to pickled
``("init", sys.path, main_path)`` and ``("run", fn, args)`` requests; ``run_sync`` takes the
most recently idle worker from ``_process_pool_idle_workers`` right after entering its
limiter, and re-pools a worker only if it is in ``_process_pool_workers``.
"""

from __future__ import annotations

import os
import pickle
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, cast

import anyio
import anyio.to_process
from anyio.abc import ByteReceiveStream, ByteSendStream, Process, UNIXSocketStream
from anyio.streams.buffered import BufferedByteReceiveStream

from .._environ import child_environment
from .messages import Sockets

_MAX_REPLY_LINE = 50  # anyio's own bound on a reply's first line
#: The worker's entry, run by path with ``-P`` (imports nothing but the standard library and anyio
#: until anyio's ``init`` has given it the parent's ``sys.path``).
BOOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_boot.py")


class WorkerError(RuntimeError):
    """The worker could not be prepared (it died, or its ``init`` failed: the error is the cause)."""


class MainGuardMissing(RuntimeError):
    """A child broker is being made while a worker imports the parent's main module: the script
    starts its service when imported, for want of an ``if __name__ == "__main__":`` guard."""


def importing_main_in_a_worker() -> str | None:
    """The path of the parent's main module if this process is a worker importing it now, else None.

    anyio's ``init`` removes ``__main__`` from ``sys.modules`` and runs the parent's main
    module as ``__mp_main__``; only while that runs is the one there and not the other.
    """
    if "__main__" in sys.modules:
        return None
    module = sys.modules.get("__mp_main__")
    if module is None:
        return None
    return getattr(module, "__file__", None) or "?"


def _guard_missing(error: BaseException) -> MainGuardMissing | None:
    """The :class:`MainGuardMissing` inside ``error`` (exception groups, causes), if any."""
    seen: list[BaseException | None] = [error]
    while seen:
        found = seen.pop()
        if found is None:
            continue
        if isinstance(found, MainGuardMissing):
            return found
        if isinstance(found, BaseExceptionGroup):
            seen.extend(found.exceptions)
        seen.append(found.__cause__)
    return None


@dataclass(frozen=True)
class Ending:
    """How a worker process ended."""

    exit_code: int | None
    signal: str | None
    reason: str


@dataclass(eq=False)
class Worker:
    """A worker process of one incarnation, and the parent's ends of its sockets and pipes."""

    process: Process
    protocol: UNIXSocketStream
    sockets: dict[str, socket.socket]  # "control", "data", "beats", "logs": the parent's ends
    child_fds: Sockets  # the same sockets' descriptors in the worker
    _view: _PoolView | None = field(default=None, repr=False)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def stdout(self) -> ByteReceiveStream:
        assert self.process.stdout is not None
        return self.process.stdout

    @property
    def stderr(self) -> ByteReceiveStream:
        assert self.process.stderr is not None
        return self.process.stderr

    def signal(self, sig: signal.Signals) -> None:
        """Send ``sig`` to the worker unless it has been reaped (never reaps it: see :class:`_PoolView`)."""
        if self.process.returncode is None:
            try:
                os.kill(self.process.pid, sig)
            except ProcessLookupError:
                pass

    def kill_group(self) -> None:
        """SIGKILL what is left of the worker's process group (its subprocesses)."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except OSError:
            pass  # nothing left in it

    def ending(self) -> Ending:
        code = self.process.returncode
        if code is None:
            return Ending(None, None, "still running")
        if code < 0:
            name = _signal_name(-code)
            return Ending(None, name, f"killed by {name}")
        return Ending(code, None, "exited" if code == 0 else f"exited with code {code}")

    async def aclose(self) -> None:
        """Kill the worker if it runs, reap it, and close everything of it the parent holds (shielded)."""
        with anyio.CancelScope(shield=True):
            self.signal(signal.SIGKILL)
            await self.process.wait()
            self.kill_group()
            await self.protocol.aclose()
            for sock in self.sockets.values():
                sock.close()
            await self.process.aclose()


async def start_worker() -> Worker:
    """Start a worker process for one incarnation and have it load the parent's main module.

    Raises:
        WorkerError: the worker died before it was ready, or loading the main module failed.
        OSError: the interpreter could not be started.

    Cancelled: the worker is killed and reaped.
    """
    protocol_parent, protocol_child = socket.socketpair()
    pairs = {name: socket.socketpair() for name in ("control", "data", "beats", "logs")}
    child_ends = [protocol_child, *(child for _, child in pairs.values())]
    fds = [sock.fileno() for sock in child_ends]
    try:
        process = await anyio.open_process(
            [sys.executable, "-P", BOOT, *map(str, fds)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            pass_fds=fds,
            start_new_session=True,
            env=child_environment(),  # not systemd's NOTIFY_SOCKET nor WATCHDOG_*: they are the service's
        )
    except BaseException:
        protocol_parent.close()
        for parent, _ in pairs.values():
            parent.close()
        raise
    finally:
        for sock in child_ends:
            sock.close()
    worker = Worker(
        process,
        await UNIXSocketStream.from_socket(protocol_parent),
        {name: parent for name, (parent, _) in pairs.items()},
        Sockets(*fds[1:]),
    )
    try:
        await _init(worker.protocol)
    except BaseException:
        await worker.aclose()
        raise
    return worker


async def _init(protocol: UNIXSocketStream) -> None:
    """anyio's worker handshake: READY, then ``init`` (sys.path and the parent's main module)."""
    reader = BufferedByteReceiveStream(protocol)
    try:
        ready = await reader.receive_exactly(6)
        if ready != b"READY\n":
            raise WorkerError(f"the worker said {ready!r}, not READY")
        main_path = getattr(sys.modules["__main__"], "__file__", None)
        await protocol.send(pickle.dumps(("init", sys.path, main_path), pickle.HIGHEST_PROTOCOL))
        status, _, length = (await reader.receive_until(b"\n", _MAX_REPLY_LINE)).partition(b" ")
        payload = await reader.receive_exactly(int(length))
    except (anyio.EndOfStream, anyio.IncompleteRead, anyio.BrokenResourceError, anyio.DelimiterNotFound) as error:
        raise WorkerError("the worker process died before it was ready") from error
    if status == b"EXCEPTION":  # our own worker, on a socket only it holds: trusted
        failure = pickle.loads(payload)
        missing = _guard_missing(failure)
        if missing is not None:
            raise WorkerError(str(missing)) from None
        raise WorkerError(f"the worker could not load the main module {main_path!r}: {failure!r}") from failure


async def run_in_worker(worker: Worker, fn: Any, *args: Any) -> None:
    """Run ``fn(*args)`` in ``worker`` through ``anyio.to_process.run_sync``.

    Returns or raises as ``run_sync`` does; the worker is never put back in anyio's pool.

    Cancelled: anyio kills the worker (SIGKILL) and waits for it.
    """
    worker._view = view = _PoolView(worker)
    await anyio.to_process.run_sync(fn, *args, cancellable=True, limiter=cast(anyio.CapacityLimiter, view))


async def end_idle_workers() -> int:
    """End the idle worker processes of anyio's ``to_process`` pool in this event loop.

    For a privilege change: a worker started before it keeps the old identity (a root
    worker would run later ``to_process`` calls as root), and one the process can no
    longer signal cannot be ended by anyio at shutdown. Workers busy with a call are
    left alone.

    Returns:
        How many workers were ended (killed and reaped).

    Cancelled: the ending is shielded; it takes the time of a kill.
    """
    try:
        workers = anyio.to_process._process_pool_workers.get()
        idle = anyio.to_process._process_pool_idle_workers.get()
    except LookupError:  # no to_process call has run in this loop
        return 0
    ended = 0
    with anyio.CancelScope(shield=True):
        while idle:
            process, _ = idle.pop()
            workers.discard(process)
            if process.returncode is None:
                process.kill()
                ended += 1
            await process.aclose()
    return ended


class _PoolView(Process):
    """The worker as ``run_sync`` sees it, and the limiter that puts it in anyio's idle pool.

    Its ``stdin``/``stdout`` are the protocol socket. ``kill`` is a plain ``os.kill``:
    asyncio's ``Popen.kill`` polls the process first and may reap it before asyncio's
    child watcher does, which then reports exit code 255 instead of the truth.
    """

    def __init__(self, worker: Worker) -> None:
        self._worker = worker

    async def __aenter__(self) -> _PoolView:
        # Runs inside run_sync once its RunVars exist, right before it pops the most recently
        # idle worker, with no checkpoint in between: nothing else can take this one.
        if self.returncode is not None:  # anyio would drop it from a set it is not in
            raise anyio.BrokenWorkerProcess("the worker ended before the child could run in it")
        idle = anyio.to_process._process_pool_idle_workers.get()
        idle.append((self, anyio.current_time()))
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        return None

    async def aclose(self) -> None:
        await self._worker.process.wait()

    async def wait(self) -> int:
        return await self._worker.process.wait()

    def terminate(self) -> None:
        self._worker.signal(signal.SIGTERM)

    def kill(self) -> None:
        self._worker.signal(signal.SIGKILL)

    def send_signal(self, signal: int) -> None:
        self._worker.signal(signal)  # type: ignore[arg-type]

    @property
    def pid(self) -> int:
        return self._worker.process.pid

    @property
    def returncode(self) -> int | None:
        return self._worker.process.returncode

    @property
    def stdin(self) -> ByteSendStream:
        return self._worker.protocol

    @property
    def stdout(self) -> ByteReceiveStream:
        return self._worker.protocol

    @property
    def stderr(self) -> None:
        return None


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"
