"""The helper that removes a PID file for a service that dropped its privileges after writing it.

Run by :class:`aiobus.plugins.PIDFile` (``privileged_removal=True``) before the drop, as
``python -I -S _pid_remover.py PATH PID DEV INO``, it keeps the identity the service had
at start (root, which may remove files from ``/run``) and runs no code of the service. It
imports nothing but the standard library.

1. It ignores SIGINT, SIGTERM and SIGHUP: the signals that end the service (a terminal's
   Ctrl-C, systemd's stop) must not end it before it has done its work.
2. It opens PATH (never following a symbolic link) and checks that it is the file the
   service wrote (device DEV, inode INO); otherwise it exits 3.
3. It waits for that file's lock (``flock``), which the service holds until its exit, or
   until it dies, however it dies: the kernel drops the lock with its last descriptor.
4. Holding the lock (so no PIDFile may replace the file meanwhile), it removes PATH if PATH
   is still that file and still holds PID, and exits 0; otherwise it leaves it and exits 3.
"""

from __future__ import annotations

import fcntl
import os
import signal
import sys

REMOVED = 0
LEFT = 3


def main(path: str, pid: str, dev: int, ino: int) -> int:
    for number in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(number, signal.SIG_IGN)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return LEFT
    info = os.fstat(fd)
    if (info.st_dev, info.st_ino) != (dev, ino):
        return LEFT
    fcntl.flock(fd, fcntl.LOCK_EX)  # until the service lets go of it
    try:
        named = os.lstat(path)
    except FileNotFoundError:
        return LEFT  # the service removed it itself
    if (named.st_dev, named.st_ino) != (dev, ino) or os.pread(fd, 64, 0).strip() != pid.encode():
        return LEFT
    os.unlink(path)
    return REMOVED


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])))
