"""The launcher that :class:`aiobus.plugins.Subprocess` runs each program through.

It is a script, run as ``python -I _launcher.py STATUS_FD STOP_SIGNAL KILL_AFTER -- ARGV...``
in a session of its own, with standard input the read end of a pipe whose write end only
the supervising process holds (the *life pipe*), and standard output and error the pipes
the supervisor reads. It imports nothing but the standard library.

1. On Linux it makes itself a child subreaper (``PR_SET_CHILD_SUBREAPER``): every
   descendant of the program whose parent dies becomes the launcher's child.
2. It starts the program in a session and process group of its own, with standard input
   from ``/dev/null``, standard output and error inherited, and, on Linux, a parent-death
   signal (``PR_SET_PDEATHSIG``, SIGKILL) in case the launcher itself is killed. It writes
   ``pid N`` on STATUS_FD, or ``error ERRNO MESSAGE`` if the program could not be run, and
   closes it.
3. A byte on the life pipe asks for a stop: STOP_SIGNAL goes to the program's process group,
   and whatever is left KILL_AFTER seconds later is killed. The program ending on its own
   is handled the same way: what it left behind in its group gets STOP_SIGNAL, then SIGKILL.
4. End of file on the life pipe means the supervisor closed it or died, however it died
   (even by SIGKILL: the kernel closes its descriptors): the program's group and every
   orphan reparented to the launcher get SIGKILL at once. The supervisor that cuts a stop
   short writes the byte, then closes the pipe: STOP_SIGNAL first, SIGKILL right after it.
5. SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1 and SIGUSR2 sent to the launcher are passed on
   to the program's group.
6. It exits once no descendant is left (so its exit means the whole tree is gone), with the
   program's own exit status: the same code, or the same signal.

Why not ``PR_SET_PDEATHSIG`` alone: it reaches only the process that sets it, not its
children, and it fires when the *thread* that forked the process exits, which is not the
process dying when the event loop starts processes from a worker thread (trio does).
"""

from __future__ import annotations

import ctypes
import os
import resource
import select
import signal
import subprocess
import sys
import time
from typing import NoReturn

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)
KILL_POLL = 0.05  # seconds between two rounds of killing while waiting for the last processes


def _prctl(option: int, value: int) -> None:
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(option, value, 0, 0, 0)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except OSError:
        pass  # nothing left in the group


def _children() -> list[int]:
    """The launcher's children (the program, and the orphans reparented to it), read from /proc."""
    me = os.getpid()
    found: list[int] = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return found
    for entry in entries:
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as file:
                    stat = file.read()
                if int(stat.rsplit(b")", 1)[1].split()[1]) == me:
                    found.append(int(entry))
            except (OSError, ValueError, IndexError):
                pass  # it ended meanwhile
    return found


def _kill_all(pgid: int) -> None:
    _signal_group(pgid, signal.SIGKILL)
    for pid in _children():
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def _exit_like(status: int | None) -> NoReturn:
    """End the launcher the way the program ended."""
    if status is not None and os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # no core dump of the launcher's own
        if sig not in (signal.SIGKILL, signal.SIGSTOP):
            signal.signal(sig, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, [sig])
        os.kill(os.getpid(), sig)
        os._exit(128 + sig)
    os._exit(127 if status is None else os.waitstatus_to_exitcode(status))


def _die_with_launcher(launcher: int) -> None:
    """Run in the program's process before exec: SIGKILL when the launcher dies."""
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != launcher:
        os._exit(1)  # the launcher died before the signal was armed


def _start(argv: list[str], status_fd: int) -> int:
    me = os.getpid()
    try:
        program = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=(lambda: _die_with_launcher(me)) if sys.platform == "linux" else None,
        )
    except Exception as error:
        errno = getattr(error, "errno", None) or 0
        message = getattr(error, "strerror", None) or str(error)
        os.write(status_fd, f"error {errno} {message}\n".encode())
        os._exit(127)
    try:
        os.write(status_fd, f"pid {program.pid}\n".encode())
    except OSError:
        pass  # the supervisor is gone: the end of the life pipe will say so
    os.close(status_fd)
    return program.pid


def main(args: list[str]) -> NoReturn:
    status_fd, stop_signal, kill_after = int(args[0]), int(args[1]), float(args[2])
    argv = args[4:]
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    for sig in (signal.SIGCHLD, *FORWARDED):
        signal.signal(sig, lambda signum, frame: None)  # the wakeup fd says which one came
    _prctl(PR_SET_CHILD_SUBREAPER, 1)
    pgid = _start(argv, status_fd)

    status: int | None = None  # the program's wait status, once it has ended
    deadline: float | None = None  # when to kill what is left, once a stop has begun
    killing = False
    life_open = True

    def begin_stop() -> float:
        _signal_group(pgid, stop_signal)
        return time.monotonic() + kill_after

    while True:
        while True:  # reap whatever has ended
            try:
                pid, wait_status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                _exit_like(status)  # no descendant left
            if pid == 0:
                break
            if pid == pgid:
                status = wait_status
                if deadline is None:  # it ended on its own: stop what it left behind
                    deadline = begin_stop()
        if not killing and deadline is not None and time.monotonic() >= deadline:
            killing = True
        if killing:
            _kill_all(pgid)
            timeout: float | None = KILL_POLL
        else:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        ready, _, _ = select.select([wake_r, 0] if life_open else [wake_r], [], [], timeout)
        if 0 in ready:
            try:
                data = os.read(0, 512)
            except OSError:
                data = b""
            if not data:
                life_open = False
                killing = True  # the supervisor is gone, or gave up on us
            elif deadline is None:
                deadline = begin_stop()
        if wake_r in ready:
            try:
                signals = os.read(wake_r, 512)
            except BlockingIOError:
                signals = b""
            for signum in signals:
                if signum in FORWARDED:
                    _signal_group(pgid, signum)


if __name__ == "__main__":
    main(sys.argv[1:])
