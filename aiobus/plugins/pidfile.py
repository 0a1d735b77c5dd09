"""PIDFile: write the process id to a file at start, locked while running, removed at exit.

Unlike CherryPy's PIDFile, it never overwrites the file of a running process: the
file is locked (``flock``) for as long as the process runs, and that lock, not the
pid written in the file, says whether its owner is alive (a pid can be reused by
an unrelated process after a crash).
"""

from __future__ import annotations

import contextlib
import enum
import errno
import fcntl
import logging
import os
import stat
import subprocess
import sys
import tempfile
import warnings
from typing import Any

import anyio

from aiobus import Bus, Priority, SimplePlugin, child_environment, priority

from . import _pid_remover

_MODE = 0o644
# How long a start waits for a file that is locked but names no live pid: the
# holder is then between locking and writing, and names itself within moments.
_SETTLE_SECONDS = 2.0
_SETTLE_STEP = 0.01
_LOCK_UNSUPPORTED = (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL)
_REMOVER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_pid_remover.py")  # beside this module
_REMOVER_WAIT = 10.0  # seconds exit waits for the remover (it needs only to start and unlink)


class _Lock(enum.Enum):
    TAKEN = "taken"  # we hold the lock of the file at the path
    HELD = "held"  # another process holds it
    CHANGED = "changed"  # the file was replaced or removed meanwhile: look again


class PIDFileFolderWarning(UserWarning):
    """The folder of a PID file lets other users write to it: they can block the start."""


class PIDFileLockedError(FileExistsError):
    """The PID file is locked by another running process.

    Attributes:
        path: the PID file.
        pid: the pid the file names, or None if it names none.
    """

    def __init__(self, path: str, pid: int | None, *, locked: bool = True) -> None:
        if locked:
            who = f"process {pid}, which is running" if pid is not None else "another process (the file names no pid)"
            message = f"PID file {path} is locked by {who}: is the service already running?"
        else:
            message = (
                f"PID file {path} names process {pid}, which is running: is the service already running? "
                "(if that process is not this service, remove the file)"
            )
        super().__init__(errno.EEXIST, message)
        self.path = path
        self.pid = pid


def _read_pid(fd: int) -> int | None:
    """The pid written in an open file, or None if it holds none.

    Bytes only, no codec: after a privilege drop, a codec imported lazily may be out
    of the new user's reach.
    """
    try:
        data = os.pread(fd, 64, 0).strip()
    except OSError:
        return None
    if not data.isdigit():
        return None
    pid = int(data)
    return pid if pid > 0 else None


def _is_alive(pid: int) -> bool:
    """Whether some process has this pid (which may not be the one that wrote it)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _same_file(fd: int, path: str) -> bool:
    """Whether ``path`` still names the file open as ``fd``."""
    try:
        named = os.lstat(path)
    except FileNotFoundError:
        return False
    opened = os.fstat(fd)
    return (named.st_dev, named.st_ino) == (opened.st_dev, opened.st_ino)


class PIDFile(SimplePlugin):
    """Writes the process id to ``path`` at start (priority 70) and removes it at exit.

    At start, if the file exists and another process holds its lock, the start fails
    with :class:`PIDFileLockedError` naming the pid in the file. If nobody holds it,
    the file is stale (its process died without removing it): it is replaced, with a
    warning, even if the pid it names is running: after a crash or a reboot that pid
    may belong to an unrelated process, and only the lock tells the owner is alive.
    The new file is written whole to a temporary file in the same folder, locked,
    then renamed into place (or linked, if there was no file), so that a reader
    never sees it empty or half written. Its mode is 0644 whatever the umask.
    The lock is held until exit.

    At exit the file is removed only if it still holds this process's pid, and the
    lock is released.

    Security: the last component of ``path`` is never followed if it is a symbolic
    link, and an existing file must be a regular file owned by this user or by root,
    or the start fails. Give a folder that only the service's user (or root) may
    write to, such as ``/run/<service>/``: in a folder others may write to, even a
    sticky one such as ``/tmp``, another user can create the file first and so block
    the start (or, without the sticky bit, replace it). Such a folder is warned about
    at construction (:class:`PIDFileFolderWarning`).

    With :class:`DropPrivileges`, which runs after it (77), the process may no longer
    remove the file at exit (``/run`` is root's). Rather than opening the folder to the
    new user (who could then replace the file, and so could any other service of that
    user), pass ``privileged_removal=True``: a process started as root then starts, with
    the file, a small helper (``_pid_remover.py``) that keeps root's identity, runs no
    code of the service, and removes the file once the service lets go of its lock (at
    exit, or at its death however it dies) if the file is still the one it wrote.
    ``aiobus run`` does so with ``--user`` or ``--group``. Without it, a file that cannot
    be removed is warned about at exit and left: it is stale (unlocked), and the next
    start replaces it. Either way, after a restart (a re-exec as the new user) the file
    can be written again only if the new user may write to the folder.

    If ``flock`` is not supported where the file is (some network file systems), a
    warning is logged and whether the pid in the file is alive decides instead.

    Args:
        bus: the bus.
        path: the PID file. A relative path is made absolute now, against the current
            folder, so that a later ``chdir`` (daemonizing) does not move it.
        privileged_removal: as root, leave the removal at exit to a helper that keeps
            root's identity, for a service that drops its privileges after the start.

    Warns:
        PIDFileFolderWarning: at construction, users other than the folder's owner may
            write to the folder of ``path`` (it is group- or world-writable).

    Raises:
        FileNotFoundError: at construction, the folder of ``path`` does not exist.
        NotADirectoryError: at construction, the folder of ``path`` is not a folder.
        IsADirectoryError: at construction, ``path`` is a folder.
    """

    def __init__(self, bus: Bus, path: str | os.PathLike[str], *, privileged_removal: bool = False) -> None:
        super().__init__(bus)
        self.privileged_removal = privileged_removal
        self.path = os.path.abspath(os.fspath(path))
        folder = os.path.dirname(self.path)
        if not os.path.exists(folder):
            raise FileNotFoundError(errno.ENOENT, f"the folder of PID file {self.path} does not exist", folder)
        if not os.path.isdir(folder):
            raise NotADirectoryError(errno.ENOTDIR, f"the folder of PID file {self.path} is not a folder", folder)
        if os.path.isdir(self.path) and not os.path.islink(self.path):
            raise IsADirectoryError(errno.EISDIR, "a PID file cannot be a folder", self.path)
        self._folder = folder
        self._check_folder()
        self._fd: int | None = None
        self._pid: int | None = None
        self._remover: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        """The pid this plugin wrote, while it holds the file; else None."""
        return self._pid if self._fd is not None else None

    # -- start ---------------------------------------------------------------------

    @priority(Priority.START_PIDFILE)
    async def start(self) -> None:
        """Write and lock the PID file.

        Waits (2 seconds at most) only while another process holds the lock on a file
        that does not name it yet: that process is between locking and writing.
        Cancelling that wait leaves no file and no lock behind.

        Raises:
            PIDFileLockedError: another running process holds the file.
            PermissionError: the file is a symbolic link, or belongs to another user.
            OSError: the file cannot be written.
        """
        if self._fd is not None:
            return  # started again after a stop: the file is still ours
        pid = os.getpid()
        waited = 0.0
        while True:
            fd = self._open_existing()
            if fd is None:
                if self._create(pid):
                    return
                continue  # another process created it meanwhile: look at theirs
            try:
                outcome, named = self._try_lock(fd)
                if outcome is _Lock.TAKEN and self._replace(fd, pid, named):
                    return
            finally:
                os.close(fd)  # on success, the old file's lock: the new file holds its own
            if outcome is _Lock.HELD:
                if (named is not None and _is_alive(named)) or waited >= _SETTLE_SECONDS:
                    raise PIDFileLockedError(self.path, named)
                await anyio.sleep(_SETTLE_STEP)
                waited += _SETTLE_STEP

    def _check_folder(self) -> None:
        """Warn if users other than the folder's owner may write to it."""
        mode = os.stat(self._folder).st_mode
        if not mode & (stat.S_IWGRP | stat.S_IWOTH):
            return
        who = "everyone" if mode & stat.S_IWOTH else "its group"
        harm = "create the file first" if mode & stat.S_ISVTX else "create, replace or remove the file"
        warnings.warn(
            f"the folder of PID file {self.path} is writable by {who}: another user can {harm} and block "
            "the start; use a folder only the service's user (or root) may write to, such as /run/<service>/",
            PIDFileFolderWarning,
            stacklevel=3,
        )

    def _open_existing(self) -> int | None:
        """Open the file at ``path`` for locking, checked to be safe; None if there is none."""
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            fd = os.open(self.path, flags)
        except FileNotFoundError:
            return None
        except OSError as error:
            if error.errno == errno.ELOOP:
                raise PermissionError(
                    errno.EPERM, "PID file is a symbolic link: refusing to follow it", self.path
                ) from None
            raise
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise PermissionError(errno.EPERM, "PID file is not a regular file", self.path)
            if info.st_uid not in (os.geteuid(), 0):
                raise PermissionError(
                    errno.EPERM, f"PID file belongs to uid {info.st_uid}, neither this user nor root", self.path
                )
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _try_lock(self, fd: int) -> tuple[_Lock, int | None]:
        """Try to lock an existing file; return the outcome and the pid the file names."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not _same_file(fd, self.path):
                return _Lock.CHANGED, None
            return _Lock.HELD, _read_pid(fd)
        except OSError as error:
            if error.errno not in _LOCK_UNSUPPORTED:
                raise
            named = _read_pid(fd)
            self.bus.log(
                f"PID file {self.path} cannot be locked here ({error.strerror}): checking its pid instead",
                logging.WARNING,
                path=self.path,
            )
            if named is not None and named != os.getpid() and _is_alive(named):
                raise PIDFileLockedError(self.path, named, locked=False) from error
        if not _same_file(fd, self.path):
            return _Lock.CHANGED, None  # its holder removed or replaced it before we locked it
        return _Lock.TAKEN, _read_pid(fd)

    def _write_temp(self, pid: int) -> tuple[int, str]:
        """A new, locked file in the PID file's folder holding ``pid``: (fd, its name)."""
        name = os.path.basename(self.path)
        fd, temp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=self._folder)
        try:
            os.set_inheritable(fd, False)
            os.fchmod(fd, _MODE)
            os.write(fd, b"%d\n" % pid)
            os.fsync(fd)
            with contextlib.suppress(OSError):  # unsupported here: the check falls back to the pid
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BaseException:
            os.close(fd)
            os.unlink(temp)
            raise
        return fd, temp

    def _create(self, pid: int) -> bool:
        """Create the file where there is none; False if another process created one first."""
        fd, temp = self._write_temp(pid)
        try:
            os.link(temp, self.path)  # unlike rename, never replaces a file created meanwhile
        except FileExistsError:
            os.close(fd)
            return False
        except BaseException:
            os.close(fd)
            raise
        finally:
            os.unlink(temp)
        self._held(fd, pid)
        return True

    def _replace(self, old_fd: int, pid: int, stale: int | None) -> bool:
        """Replace a stale file whose lock we hold; False if it changed meanwhile."""
        fd, temp = self._write_temp(pid)
        try:
            if not _same_file(old_fd, self.path):  # only another user's hand could do that now
                os.close(fd)
                os.unlink(temp)
                return False
            os.rename(temp, self.path)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)
            raise
        if stale is None:
            self._warn(f"Replaced PID file {self.path}, which named no pid")
        elif stale != pid:
            state = "does not hold its lock" if _is_alive(stale) else "is not running"
            self._warn(f"Replaced stale PID file {self.path}: pid {stale} {state}", stale_pid=stale)
        self._held(fd, pid)
        return True

    def _held(self, fd: int, pid: int) -> None:
        self._fd, self._pid = fd, pid
        self.bus.log(f"PID file {self.path} written", path=self.path, pid=pid)
        if self.privileged_removal and os.geteuid() == 0:
            self._start_remover(fd, pid)

    def _start_remover(self, fd: int, pid: int) -> None:
        """Start the helper that removes the file, as root, once this process lets go of its lock."""
        info = os.fstat(fd)
        try:
            self._remover = subprocess.Popen(
                [sys.executable, "-I", "-S", _REMOVER, self.path, str(pid), str(info.st_dev), str(info.st_ino)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                env=child_environment(),
            )
        except BaseException:
            self._fd = self._pid = None
            try:
                os.unlink(self.path)
            finally:
                os.close(fd)
            raise

    # -- exit ----------------------------------------------------------------------

    async def exit(self) -> None:
        """Remove the file if it still holds our pid, and release the lock. Never raises.

        With a remover (``privileged_removal``), release the lock and wait for the remover
        to end, at most 10 seconds (a warning then). Cancelled meanwhile, the remover
        finishes on its own.
        """
        fd, pid, remover = self._fd, self._pid, self._remover
        if fd is None:
            return
        self._fd = self._pid = self._remover = None
        if remover is not None:
            os.close(fd)  # the remover's turn
            await self._wait_remover(remover, pid)
            return
        try:
            self._remove_if_ours(pid)
        finally:
            os.close(fd)

    async def _wait_remover(self, remover: subprocess.Popen[bytes], pid: int | None) -> None:
        try:
            code = await anyio.to_thread.run_sync(remover.wait, _REMOVER_WAIT)
        except subprocess.TimeoutExpired:
            self._warn(f"PID file {self.path}: its remover (pid {remover.pid}) did not end within {_REMOVER_WAIT:g} s")
            return
        if code == _pid_remover.REMOVED:
            self.bus.log(f"PID file {self.path} removed", path=self.path, pid=pid)
        elif code == _pid_remover.LEFT:
            self._warn(f"PID file {self.path} is no longer ours (pid {pid}): left in place")
        else:
            self._warn(f"PID file {self.path}: its remover failed (exit status {code}); the file may be left")

    def _remove_if_ours(self, pid: int | None) -> None:
        try:
            check = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as error:
            self._warn(f"PID file {self.path} could not be read at exit ({error.strerror}): left as it is")
            return
        try:
            found = _read_pid(check)
        finally:
            os.close(check)
        if found != pid:
            self._warn(f"PID file {self.path} now names pid {found}, not ours ({pid}): left in place", found=found)
            return
        try:
            os.unlink(self.path)
        except OSError as error:
            self._warn(f"PID file {self.path} could not be removed ({error.strerror})")
            return
        self.bus.log(f"PID file {self.path} removed", path=self.path, pid=pid)

    def _warn(self, msg: str, **fields: Any) -> None:
        self.bus.log(msg, logging.WARNING, path=self.path, **fields)
