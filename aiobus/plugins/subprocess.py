"""Subprocess: run an external program along with the bus, supervised like a child broker.

A :class:`Subprocess` is a :class:`~aiobus.Child` of a :class:`~aiobus.Supervisor` (the
bus's default one unless given another): the same restart policies, strategies, intensity
and backoff as child brokers, its exits published on ``child_exit``, and one listing.

**No orphans.** ``anyio.open_process`` has no ``preexec_fn``, so each program starts
through a launcher script (``aiobus/plugins/_launcher.py``, run as ``python -I`` in a session of
its own). The launcher, a child subreaper, starts the program in a session and process
group of its own and holds the read end of a pipe whose write end only the supervising
process holds. When that process dies, even by SIGKILL, the kernel closes the pipe, and
the launcher kills the program's group and every orphaned descendant at once; if the
launcher itself is killed, the kernel kills the program (``PR_SET_PDEATHSIG``). The
launcher exits once every descendant is gone, with the program's own exit status, so the
exit seen here is the program's and means its whole tree has ended. (A ``fork()`` of the
supervising process without ``exec`` keeps the pipe open in the copy, as long as it lives.)

**Readiness.** With ``ready``, the start returns only once the check passes: a line of
output matches (:class:`LineReady`), or the port answers and the listening socket is held
by the program's process group (:class:`PortReady`: a port held by another process does
not count). A program that ends first fails the start with its last lines of output.

**Stopping.** A byte on the same pipe asks the launcher to send the stop signal to the
program's process group (``os.killpg``: grandchildren get it too) and, ``kill_after``
seconds later, SIGKILL to whatever is left of it and to any descendant that left the
group. A stop with a shorter budget (:meth:`Subprocess.terminate`) sends the stop signal
all the same, and closes the pipe once the budget is spent: SIGKILL to the whole tree at
once. So does a program whose incarnation is cancelled without a stop (the bus's tasks
ending first), right after the stop signal. The exit's reason says which of these
happened, and after how long. A program that ends on its own gets the same treatment for
what it leaves behind, as systemd does; its exit is reported once all of it has ended.
The supervisor makes all restart decisions in one task, which a stop ends before any child
is stopped: a program cannot be restarted while a stop is under way (circus#529).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import anyio
from anyio.abc import ByteReceiveStream, Process

from aiobus import Bus, Child, ChildExit, LineSplitter, Restart, Supervisor, check_seconds, child_environment

from ._liveness import wait_not_live
from ._readiness import LineReady, PortReady

__all__ = ["LineReady", "PortReady", "Subprocess"]

LAUNCHER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_launcher.py")  # beside this module
LAUNCH_TIMEOUT = 30.0  # seconds for the launcher to say whether the program could be run
OUTPUT_DRAIN = 5.0  # seconds to read what is left in the pipes once the program's tree has ended
STOP_MARGIN = 5.0  # seconds beyond kill_after, or after the life pipe is closed, before the launcher is killed
AT_ONCE = 1.0  # a program that ends within this many seconds of its start "exited at once"
KILL_AFTER = 10.0  # the default kill_after
TAIL = 10  # lines of output kept of each incarnation, for the error when it ends before it is ready
TAIL_WIDTH = 500  # characters of each of those lines in that error


@dataclass(eq=False)
class _Run:
    """One incarnation: the launcher's process, and what is known of the program in it."""

    process: Process
    started: float
    status_fd: int  # the read end of the launcher's status pipe, until _confirm closes it
    pid: int | None = None
    stopping: bool = False  # terminate() was called: the exit is expected
    stop_sent: float | None = None  # when the stop signal was asked for
    killed: float | None = None  # when the life pipe was closed (SIGKILL to the whole tree)
    why_killed: str = ""  # why it was closed
    tail: deque[str] = field(default_factory=lambda: deque(maxlen=TAIL))  # the last lines of output
    exit: ChildExit | None = None
    known: anyio.Event = field(default_factory=anyio.Event)  # the pid is known, or never will be
    line_seen: anyio.Event = field(default_factory=anyio.Event)
    live_lines: int = 0  # lines matching a LineReady liveness check
    unhealthy: str | None = None  # why the liveness check stopped it
    live_scope: anyio.CancelScope | None = None
    ended: anyio.Event = field(default_factory=anyio.Event)


def _check_check(label: str, check: object, instances: int | None) -> PortReady | LineReady | None:
    """A readiness or liveness check: None, a LineReady or a PortReady (a template port only with instances)."""
    if check is not None and not isinstance(check, PortReady | LineReady):
        raise TypeError(f"{label} must be None, a PortReady or a LineReady, not {check!r}")
    if isinstance(check, PortReady) and isinstance(check.port, str) and instances is None:
        raise ValueError(f"PortReady's port {check.port!r} is a template: give the program instances=N")
    return check


def _check_argv(argv: object) -> list[str]:
    if isinstance(argv, str | bytes) or not isinstance(argv, Sequence):
        raise TypeError(f"argv must be a list of arguments, the program first, not {argv!r}")
    items = []
    for arg in argv:
        item = os.fspath(arg) if isinstance(arg, os.PathLike) else arg
        if not isinstance(item, str):
            raise TypeError(f"each argument in argv must be a str or a path, not {arg!r}")
        if "\0" in item:
            raise ValueError(f"an argument in argv contains a NUL character: {item!r}")
        items.append(item)
    if not items:
        raise ValueError("argv must name a program to run: it is empty")
    return items


async def _read_some(fd: int) -> bytes:
    """Read what a non-blocking pipe has once it has something (b"" at its end)."""
    while True:
        await anyio.wait_readable(fd)
        try:
            return os.read(fd, 4096)
        except BlockingIOError:
            continue


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


class Subprocess(Child):
    """An external program run along with the bus: started at its start, stopped at its stop.

    Its output is read line by line, as it comes, into log events (``bus.log``) with the
    fields ``child`` (its name), ``child_pid`` and ``stream`` (``"stdout"`` or ``"stderr"``),
    as a child broker's output: both pipes are always read, a last line without a newline
    is kept, a line longer than ``max_line`` bytes is cut with a marker (``… [cut: N
    bytes]``), and bytes that are not UTF-8 are replaced.

    Call :meth:`subscribe` (before the bus starts) to add it to ``supervisor`` (or the
    bus's default supervisor), which starts it with the bus (priority 80), in the order
    children were added, and stops it at the bus's stop (priority 20), in reverse order.
    A start that cannot succeed (no such program, not executable, not ready in time)
    makes ``bus.start()`` fail with the error, logged and published on ``child_exit``.

    Args:
        bus: the bus.
        name: names the program in logs, exits and the children listing.
        argv: the program and its arguments; the program is looked up on ``PATH``.
        env: the program's whole environment. By default, this process's without systemd's
            ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID`` (they speak for the
            service): a program meant to notify systemd is given them here.
        cwd: the program's working directory (by default, this process's).
        restart: ``"permanent"``, ``"transient"`` or ``"temporary"``.
        stop_signal: sent to the program's process group to stop it.
        kill_after: seconds from the stop signal to SIGKILL of whatever is left of the
            program's tree (10 by default); also its :attr:`stop_budget`. Not to be confused
            with ``Bus(stop_timeout=...)``, a bound on each step of the bus's shutdown.
        stop_timeout: the old name of ``kill_after``, still accepted (not both).
        ready: None, :class:`PortReady` (the port answers, held by the program's process
            group) or :class:`LineReady` (a line of output matching): the program counts as
            started (and the next one in its group starts) only once the check passes. If it
            ends first, the start fails with a RuntimeError quoting its last lines of output.
        ready_timeout: seconds the check may take; past it the program is killed and its
            start fails with a TimeoutError (which names the process holding the port, if a
            PortReady's port is held by another).
        max_line: the longest line of output kept, in bytes.
        supervisor: the group to join (a Supervisor you subscribed); the bus's default one if None.
        instances: None: one program. A number N: N copies of it, each a child of its own
            named ``name[0]``... ``name[N-1]`` (see :attr:`members`), started together and
            stopped together, each restarted alone. In each copy's ``argv``, ``env`` values,
            ``cwd`` and a :class:`PortReady` port given as a template (``PortReady("{port}")``),
            ``{index}`` stands for its number and ``{name}`` for its own name; write ``{{``
            and ``}}`` for braces.
        names: for instances, more names to fill in: a function of the index returning them
            (say ``lambda index: {"port": 8000 + index}``).
        significant: when it ends for good (a normal exit of a transient or temporary
            program, or its restarts exhausted), the bus exits: code 0 if it ended cleanly,
            70 otherwise.
        reload_signal: sent to the program's process group on the bus's graceful (SIGHUP
            for nginx-like programs that reload on it); None: graceful leaves it alone.
        live: a liveness check while it runs (after it is ready): :class:`PortReady` (its
            port answers) or :class:`LineReady` (a matching line since the previous check).
            After ``live_failures`` failures in a row it gets its stop signal (SIGKILL
            ``kill_after`` s later), and its exit, a failure with ``unhealthy=True`` and the
            reason, goes to its restart policy.
        live_interval: seconds between two liveness checks, and the bound on each.
        live_failures: failed checks in a row that make it not live.

    Raises:
        TypeError, ValueError: an argument is of the wrong type or out of range, or a
            template names something not given.
    """

    kind = "program"

    def __init__(
        self,
        bus: Bus,
        name: str,
        argv: Sequence[str | os.PathLike[str]],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        restart: Restart | str = Restart.PERMANENT,
        stop_signal: int = signal.SIGTERM,
        kill_after: float | None = None,
        stop_timeout: float | None = None,
        ready: PortReady | LineReady | None = None,
        ready_timeout: float = 30.0,
        significant: bool = False,
        reload_signal: int | None = None,
        live: PortReady | LineReady | None = None,
        live_interval: float = 10.0,
        live_failures: int = 3,
        max_line: int = 65536,
        supervisor: Supervisor | None = None,
        instances: int | None = None,
        names: Callable[[int], Mapping[str, object]] | None = None,
    ) -> None:
        super().__init__(name, restart, significant=significant)
        self.bus = bus
        self.argv = _check_argv(argv)
        if env is not None and (
            not isinstance(env, Mapping) or not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items())
        ):
            raise TypeError(f"env must be a mapping of str to str, not {env!r}")
        self.env = None if env is None else dict(env)
        self.cwd = None if cwd is None else os.fspath(cwd)
        if isinstance(stop_signal, bool) or not isinstance(stop_signal, int):
            raise TypeError(f"stop_signal must be a signal number, not {stop_signal!r}")
        try:
            self.stop_signal = signal.Signals(stop_signal)
        except ValueError:
            raise ValueError(f"stop_signal must be a signal, not {stop_signal!r}") from None
        if kill_after is not None and stop_timeout is not None:
            raise TypeError("give kill_after or stop_timeout (its old name), not both")
        if stop_timeout is not None:
            self.kill_after = check_seconds("stop_timeout", stop_timeout)
        else:
            self.kill_after = check_seconds("kill_after", KILL_AFTER if kill_after is None else kill_after)
        self.ready = _check_check("ready", ready, instances)
        self.ready_timeout = check_seconds("ready_timeout", ready_timeout, positive=True)
        if isinstance(max_line, bool) or not isinstance(max_line, int) or max_line < 1:
            raise ValueError(f"max_line must be a number of bytes >= 1, not {max_line!r}")
        self.max_line = max_line
        self.supervisor = supervisor
        try:
            self.reload_signal = None if reload_signal is None else signal.Signals(reload_signal)
        except ValueError:
            raise ValueError(f"reload_signal must be None or a signal, not {reload_signal!r}") from None
        self.live = _check_check("live", live, instances)
        self.live_interval = check_seconds("live_interval", live_interval, positive=True)
        if isinstance(live_failures, bool) or not isinstance(live_failures, int) or live_failures < 1:
            raise ValueError(f"live_failures must be an int >= 1, not {live_failures!r}")
        self.live_failures = live_failures
        self._run: _Run | None = None
        self._instances: list[Subprocess] | None = None
        if instances is not None:
            if isinstance(instances, bool) or not isinstance(instances, int) or instances < 1:
                raise ValueError(f"instances must be None or an int >= 1, not {instances!r}")
            if names is not None and not callable(names):
                raise TypeError(f"names must be a function of the instance's index, not {names!r}")
            self._instances = [self._instance(index, names) for index in range(instances)]

    def _instance(self, index: int, names: Callable[[int], Mapping[str, object]] | None) -> Subprocess:
        """Copy number ``index``, its templates filled in."""
        name = f"{self.name}[{index}]"
        values: dict[str, object] = {"index": index, "name": name, **(names(index) if names is not None else {})}

        def fill(text: str) -> str:
            try:
                return text.format_map(values)
            except (KeyError, IndexError, ValueError) as error:
                raise ValueError(f"program {self.name!r}: {text!r} cannot be filled in: {error!r}") from None

        ready = self.ready.for_instance(values) if isinstance(self.ready, PortReady) else self.ready
        live = self.live.for_instance(values) if isinstance(self.live, PortReady) else self.live
        instance = Subprocess(
            self.bus,
            name,
            [fill(arg) for arg in self.argv],
            env=None if self.env is None else {key: fill(value) for key, value in self.env.items()},
            cwd=None if self.cwd is None else fill(self.cwd),
            restart=self.restart,
            stop_signal=self.stop_signal,
            kill_after=self.kill_after,
            ready=ready,
            ready_timeout=self.ready_timeout,
            max_line=self.max_line,
            supervisor=self.supervisor,
            significant=self.significant,
            reload_signal=self.reload_signal,
            live=live,
            live_interval=self.live_interval,
            live_failures=self.live_failures,
        )
        instance.batch = self
        return instance

    @property
    def members(self) -> tuple[Subprocess, ...]:
        """The instances (each a child of the supervisor), or ``(self,)`` for a single program."""
        return (self,) if self._instances is None else tuple(self._instances)

    def __repr__(self) -> str:
        return f"<Subprocess {self.name!r} {self.argv!r} {self.state}>"

    @property
    def pid(self) -> int | None:
        """The running program's process id (not the launcher's)."""
        run = self._run
        return None if run is None or run.ended.is_set() else run.pid

    # -- Child --------------------------------------------------------------------------

    async def spawn(self) -> None:
        """Start the program and return once it runs and, with ``ready``, is ready.

        Cancelled, or failing, it kills what it started and waits for it to end.

        Raises:
            OSError: the program could not be run (FileNotFoundError when it does not exist,
                PermissionError when it is not executable); the message names it.
            TimeoutError: the readiness check did not pass within ``ready_timeout``.
            RuntimeError: the program ended before it was ready.
        """
        if self._instances is not None:
            raise TypeError(f"program {self.name!r} has instances: they are the children, not it")
        if self._run is not None and not self._run.ended.is_set():
            raise RuntimeError(f"program {self.name!r} is already running")
        run = self._run = await self._launch()
        try:
            await self._confirm(run)
            if self.ready is not None:
                await self._wait_ready(run)
            if self.live is not None:
                self.bus.start_soon(self._stay_live, run, name=f"aiobus liveness {self.name}")
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self._kill(run, "its start failed")
                await run.ended.wait()
            raise

    async def wait(self) -> ChildExit:
        """Wait until the program and everything it started have ended, and say how.

        Cancelling the wait changes nothing for the program.
        """
        run = self._run
        if run is None:
            raise RuntimeError(f"program {self.name!r} was never started")
        await run.ended.wait()
        assert run.exit is not None
        return run.exit

    @property
    def stop_budget(self) -> float:
        """``kill_after``: the grace a stop with no budget of its own gives, from the stop signal to SIGKILL."""
        return self.kill_after

    async def terminate(self, budget: float | None = None) -> None:
        """Stop the program: ``stop_signal`` to its group, SIGKILL ``kill_after`` s later.

        With a ``budget`` (seconds in all) shorter than that, the stop signal still goes
        first, and once the budget is spent the whole tree gets SIGKILL at once. A call while
        another is under way shortens the time left to its own budget, and returns when the
        program has ended too.

        Returns once the program and its descendants have ended; the exit is reported with
        ``expected=True``, its reason saying how it ended and after how long. If cancelled,
        the program is killed at once (and waited for).
        """
        run = self._run
        if run is None or run.ended.is_set():
            return
        run.stopping = True
        try:
            await self._send_stop(run)  # once: a call while another is under way only adds its deadline
            with anyio.move_on_after(self.kill_after + STOP_MARGIN if budget is None else max(0.0, budget)):
                await run.ended.wait()
        finally:
            if not run.ended.is_set():
                with anyio.CancelScope(shield=True):
                    await self._kill(run, "the shutdown was cut short")
                    await run.ended.wait()

    def send_signal(self, sig: int) -> None:
        """Send ``sig`` to the program's whole process group.

        Raises:
            ProcessLookupError: the program is not running.
        """
        pid = self.pid
        if pid is None:
            raise ProcessLookupError(f"program {self.name!r} is not running")
        os.killpg(pid, sig)

    async def graceful(self) -> None:
        """Send ``reload_signal`` (if any) to the program's process group; the program runs on.

        Nothing to cancel: it never waits."""
        if self.reload_signal is not None and self.pid is not None:
            self.bus.log(
                f"Program {self.name}: {self.reload_signal.name} to its process group (graceful)",
                child=self.name,
                child_pid=self.pid,
                signal=self.reload_signal.name,
            )
            try:
                self.send_signal(self.reload_signal)
            except ProcessLookupError:
                pass  # it ended meanwhile: its exit says so

    async def _stay_live(self, run: _Run) -> None:
        """Check the incarnation's liveness until it ends; once it fails, stop it (stop signal, then
        SIGKILL after ``kill_after``). Cancelled when the incarnation ends."""
        assert self.live is not None
        with anyio.CancelScope() as scope:
            run.live_scope = scope
            if run.ended.is_set():
                return
            why = await wait_not_live(
                self.live, run.pid, self.live_interval, self.live_failures, lambda: run.live_lines
            )
            if run.stopping:
                return
            run.unhealthy = why
            self.bus.log(
                f"Program {self.name} is not live ({why}): stopping it with {self.stop_signal.name}",
                logging.WARNING,
                child=self.name,
                child_pid=run.pid,
                reason=why,
            )
            await self._send_stop(run)
            with anyio.move_on_after(self.kill_after):
                await run.ended.wait()
            if not run.ended.is_set():
                await self._kill(run, "it was not live")

    # -- one incarnation ----------------------------------------------------------------

    async def _launch(self) -> _Run:
        status_r, status_w = os.pipe()
        argv = [sys.executable, "-I", LAUNCHER, str(status_w), str(int(self.stop_signal)), repr(self.kill_after)]
        try:
            process = await anyio.open_process(
                [*argv, "--", *self.argv],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd=self.cwd,
                env=child_environment(self.env),
                start_new_session=True,
                pass_fds=(status_w,),
            )
        except OSError as error:
            os.close(status_r)
            raise type(error)(error.errno, f"program {self.name!r} could not be started: {error.strerror}") from error
        finally:
            os.close(status_w)
        run = _Run(process, anyio.current_time(), status_r)
        self.bus.start_soon(self._follow, run, name=f"aiobus program {self.name}")
        return run

    async def _confirm(self, run: _Run) -> None:
        """Read the launcher's word: the program's pid, or why it could not be run."""
        fd = run.status_fd
        data = b""
        try:
            os.set_blocking(fd, False)
            with anyio.move_on_after(LAUNCH_TIMEOUT) as timer:
                while chunk := await _read_some(fd):
                    data += chunk
        finally:
            os.close(fd)
            if data.startswith(b"pid ") and data.endswith(b"\n"):
                run.pid = int(data.split()[1])
            run.known.set()
        if run.pid is not None:
            return
        if timer.cancelled_caught:
            raise TimeoutError(f"program {self.name!r}: its launcher said nothing within {LAUNCH_TIMEOUT:g} s")
        await run.ended.wait()  # the launcher closed the pipe without a pid: it is ending
        if data.startswith(b"error "):
            _, errno, message = data.decode(errors="replace").strip().split(" ", 2)
            raise OSError(int(errno), f"program {self.name!r} could not run {self.argv[0]!r}: {message}")
        raise RuntimeError(f"program {self.name!r}: its launcher did not start it ({run.exit and run.exit.reason})")

    async def _wait_ready(self, run: _Run) -> None:
        ready = self.ready
        passed = False
        with anyio.move_on_after(self.ready_timeout):
            async with anyio.create_task_group() as group:

                async def check() -> None:
                    nonlocal passed
                    if isinstance(ready, PortReady):
                        await ready.wait(run.pid)
                    else:
                        await run.line_seen.wait()
                    passed = True
                    group.cancel_scope.cancel()

                async def watch_end() -> None:
                    await run.ended.wait()
                    group.cancel_scope.cancel()

                group.start_soon(check)
                group.start_soon(watch_end)
        if passed:
            return
        if run.ended.is_set():
            assert run.exit is not None
            raise RuntimeError(
                f"program {self.name!r} {run.exit.reason} before it was ready ({ready}){_last_output(run)}"
            )
        held = None
        if isinstance(ready, PortReady) and run.pid is not None:
            held = await anyio.to_thread.run_sync(ready.held_elsewhere, run.pid)
        because = f"; {held}" if held else ""
        raise TimeoutError(
            f"program {self.name!r} was not ready within {self.ready_timeout:g} s ({ready}){because}: killed"
        )

    async def _send_stop(self, run: _Run) -> None:
        """Ask the launcher to send the stop signal to the program's group (once)."""
        if run.stop_sent is not None:
            return
        run.stop_sent = anyio.current_time()
        if run.process.stdin is not None:
            try:
                await run.process.stdin.send(b"s")
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                pass  # the launcher is ending already

    async def _kill(self, run: _Run, why: str) -> None:
        """Kill the program's tree: the stop signal, then at once SIGKILL to all of it (the end
        of the life pipe); return once the launcher has ended."""
        process = run.process
        if run.killed is None:
            sent = run.stop_sent  # when the stop signal went, if it did: the program has had its grace
            await self._send_stop(run)
            run.killed, run.why_killed = (run.stop_sent if sent is None else anyio.current_time()), why
        if process.stdin is not None:
            await process.stdin.aclose()
        with anyio.move_on_after(STOP_MARGIN):
            await process.wait()
        if process.returncode is None:
            self.bus.log(f"Program {self.name}: its launcher does not end; killing it", logging.ERROR)
            process.kill()
            await process.wait()

    async def _follow(self, run: _Run) -> None:
        """Read the output and wait for the end of one incarnation.

        Cancelled (the bus's tasks ending while the program runs), shielded: the program gets
        its stop signal at once, then ends by a :meth:`terminate` under way (the supervisor's
        forced stop gives it a short budget) or by the launcher's ``kill_after``; if nothing
        ends it even then, it is killed.
        """
        process = run.process
        try:
            async with anyio.create_task_group() as group:
                group.start_soon(self._read, run, process.stdout, "stdout")
                group.start_soon(self._read, run, process.stderr, "stderr")
                await process.wait()
                run.known.set()
                group.cancel_scope.deadline = anyio.current_time() + OUTPUT_DRAIN
        finally:
            with anyio.CancelScope(shield=True):
                if process.returncode is None:  # cancelled: leave nothing behind, but ask first
                    await self._send_stop(run)
                    with anyio.move_on_after(self.kill_after + STOP_MARGIN):
                        await process.wait()
                    if process.returncode is None:
                        await self._kill(run, "the bus's tasks ended before it was stopped")
                await process.aclose()
            run.exit = self._exit_of(run, anyio.current_time())
            run.ended.set()
            if run.live_scope is not None:
                run.live_scope.cancel()

    async def _read(self, run: _Run, stream: ByteReceiveStream | None, name: str) -> None:
        if stream is None:
            return
        lines = LineSplitter(self.max_line)
        try:
            await run.known.wait()
            async for chunk in stream:
                for line in lines.feed(chunk):
                    self._emit(run, name, line)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass
        finally:
            last = lines.flush()
            if last is not None:
                self._emit(run, name, last)

    def _emit(self, run: _Run, stream: str, line: str) -> None:
        run.tail.append(line)
        self.bus.log(line, logging.INFO, child=self.name, child_pid=run.pid, stream=stream)
        ready = self.ready
        if isinstance(ready, LineReady) and ready.stream in (None, stream) and ready.regex.search(line):
            run.line_seen.set()
        live = self.live
        if isinstance(live, LineReady) and live.stream in (None, stream) and live.regex.search(line):
            run.live_lines += 1

    def _exit_of(self, run: _Run, now: float) -> ChildExit:
        code = run.process.returncode
        signame = _signal_name(-code) if code is not None and code < 0 else None
        exit_code = None if signame is not None else code
        how = f"was killed by {signame}" if signame else f"exited with code {exit_code}"
        if run.stop_sent is not None:
            stop = self.stop_signal.name
            cut = None if run.killed is None else run.killed - run.stop_sent
            if signame == "SIGKILL" and self.stop_signal != signal.SIGKILL:
                if cut is not None and cut < self.kill_after:
                    after = "right after" if cut == 0 else f"{cut:.1f} s after"
                    reason = f"killed with SIGKILL {after} {stop}: {run.why_killed}"
                else:
                    reason = f"killed with SIGKILL {self.kill_after:g} s after {stop} (kill_after)"
            elif signame == stop:
                reason = f"stopped with {signame}"
            else:
                reason = f"stopped with {stop}: it {how}"
        elif now - run.started < AT_ONCE:
            reason = f"{how} at once ({now - run.started:.2f} s after its start)"
        else:
            reason = how
        if run.unhealthy is not None:
            reason = f"not live ({run.unhealthy}): {reason}"
        unhealthy = run.unhealthy is not None
        return ChildExit(self.name, run.pid, exit_code, signame, reason, expected=run.stopping, unhealthy=unhealthy)


def _last_output(run: _Run) -> str:
    """The incarnation's last lines of output, for an error message."""
    if not run.tail:
        return " (it wrote no output)"
    cut = [line if len(line) <= TAIL_WIDTH else line[:TAIL_WIDTH] + "…" for line in run.tail]
    return "; its last output:\n" + "\n".join(f"    {line}" for line in cut)
