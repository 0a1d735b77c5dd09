"""Re-executing the process in place, for ``Bus.restart()``."""

from __future__ import annotations

import os
import sys

# The directory the process started in: a relative script path in sys.orig_argv
# only means something from there, even after a daemon's chdir("/").
_STARTUP_CWD = os.getcwd()


def reexec_argv() -> list[str]:
    """The arguments that start this same program again.

    ``sys.orig_argv`` keeps the interpreter's own options and ``-m pkg``, which
    ``sys.argv`` loses; a frozen application is its own executable.
    """
    if getattr(sys, "frozen", False):
        return list(sys.argv)
    return list(sys.orig_argv)


def close_inherited_fds() -> None:
    """Mark every descriptor above 2 close-on-exec, so the new image starts clean."""
    try:
        fds = [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:  # not Linux: walk the possible range
        fds = list(range(3, os.sysconf("SC_OPEN_MAX")))
    for fd in fds:
        if fd > 2:
            try:
                os.set_inheritable(fd, False)
            except OSError:
                pass


def reexec() -> None:
    """Replace the process with a fresh run of the same program. Does not return."""
    sys.stdout.flush()
    sys.stderr.flush()
    close_inherited_fds()
    os.chdir(_STARTUP_CWD)
    os.execv(sys.executable, reexec_argv())
