"""DropPrivileges: at start, switch to another user and group, and set the umask.

It runs at start priority 77 (``Priority.START_DROP_PRIVILEGES``), after the servers
have bound their ports (75, ``Priority.START_BIND``) and before the children start (80), so
that a service started as root can listen on port 80 and then run as ``nobody``.
"""

from __future__ import annotations

import errno
import grp
import logging
import os
import pwd
from dataclasses import dataclass
from typing import Any

from aiobus import Bus, Priority, SimplePlugin, end_idle_workers, priority

_CAP_SETGID = 6
_CAP_SETUID = 7


@dataclass(frozen=True)
class _Identity:
    """Who the process runs as: its real, effective and saved ids, groups and umask."""

    uids: tuple[int, int, int]
    gids: tuple[int, int, int]
    groups: tuple[int, ...]
    umask: int

    @classmethod
    def now(cls) -> _Identity:
        return cls(os.getresuid(), os.getresgid(), tuple(sorted(set(os.getgroups()))), _current_umask())

    def fields(self) -> dict[str, Any]:
        return {"uid": self.uids[1], "gid": self.gids[1], "groups": list(self.groups), "umask": f"{self.umask:03o}"}

    def describe(self) -> str:
        return f"uid={self.uids[1]} gid={self.gids[1]} groups={list(self.groups)} umask={self.umask:03o}"


def _proc_status(key: str) -> str | None:
    """A field of /proc/self/status (Linux), or None where there is no such file or field.

    Read as bytes: after a drop, a codec imported lazily may be out of the new user's reach.
    """
    try:
        with open("/proc/self/status", "rb") as status:
            for line in status:
                name, _, value = line.partition(b":")
                if name == key.encode():
                    return value.strip().decode()
    except OSError:
        pass
    return None


def _current_umask() -> int:
    """The umask, read without changing it where the system allows (Linux 4.7+)."""
    value = _proc_status("Umask")
    if value is not None:
        return int(value, 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _has_capability(bit: int) -> bool:
    """Whether the process may use a capability: from /proc on Linux, else being root."""
    value = _proc_status("CapEff")
    if value is None:
        return os.geteuid() == 0
    return bool(int(value, 16) >> bit & 1)


def _resolve_user(user: int | str) -> tuple[int, str | None, int | None]:
    """A user name or number -> (uid, its name or None, its primary group or None)."""
    if isinstance(user, str):
        try:
            entry = pwd.getpwnam(user)
        except KeyError:
            if not user.isdigit():
                raise ValueError(f"unknown user {user!r}") from None
            user = int(user)
        else:
            return entry.pw_uid, entry.pw_name, entry.pw_gid
    uid = _check_id(user, "uid")
    try:
        entry = pwd.getpwuid(uid)
    except KeyError:
        return uid, None, None
    return uid, entry.pw_name, entry.pw_gid


def _resolve_group(group: int | str) -> int:
    """A group name or number -> gid."""
    if isinstance(group, str):
        try:
            return grp.getgrnam(group).gr_gid
        except KeyError:
            if not group.isdigit():
                raise ValueError(f"unknown group {group!r}") from None
            group = int(group)
    return _check_id(group, "gid")


def _check_id(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be a name (str) or a number (int), not {value!r}")
    if value < 0:
        raise ValueError(f"{what} must be >= 0, not {value}")
    return value


class DropPrivileges(SimplePlugin):
    """At start (priority 77), switch the process to ``uid`` and ``gid`` and set its umask.

    The steps, in order: the group (real, effective and saved), the supplementary
    groups (the user's, as ``initgroups`` gives them, or just ``gid`` for a user or
    group without a name), the user (real, effective and saved: there is no way
    back), then the umask. The identity is logged before and after.

    Before changing anything, it checks that the process may make every change it
    needs (changing groups needs CAP_SETGID, changing the user CAP_SETUID, which
    root has): if not, the start fails with :class:`PermissionError` and nothing has
    changed. Steps that change nothing (already that user, say) need no privilege,
    and neither does the umask. If a step fails anyway, the group steps already made
    are undone before the error is raised.

    Nothing is restored at stop or exit: privileges dropped cannot be taken back.
    Import what the service needs before the drop: a module imported later must be
    readable by the new user (not so for a Python installed under ``/root``).

    Args:
        bus: the bus.
        uid: a user name or number; None keeps the user.
        gid: a group name or number; None keeps the group, unless ``uid`` is given:
            then it is that user's primary group.
        umask: the new umask (``0o022``, say); None keeps it.

    Raises:
        ValueError: at construction, an unknown user or group name, a negative id, a
            umask outside 0..0o777, or a ``uid`` without a user entry and no ``gid``.
        TypeError: at construction, an argument of the wrong type.
    """

    def __init__(
        self, bus: Bus, uid: int | str | None = None, gid: int | str | None = None, umask: int | None = None
    ) -> None:
        super().__init__(bus)
        self.uid: int | None = None
        self.gid: int | None = None
        self.user: str | None = None
        primary: int | None = None
        if uid is not None:
            self.uid, self.user, primary = _resolve_user(uid)
        if gid is not None:
            self.gid = _resolve_group(gid)
        elif self.uid is not None:
            if primary is None:
                raise ValueError(f"uid {self.uid} has no user entry, hence no primary group: give gid too")
            self.gid = primary
        if umask is not None:
            if isinstance(umask, bool) or not isinstance(umask, int):
                raise TypeError(f"umask must be an int such as 0o022, not {umask!r}")
            if not 0 <= umask <= 0o777:
                raise ValueError(f"umask must be within 0..0o777, not {umask:#o}")
        self.umask = umask

    def _target_groups(self) -> tuple[int, ...] | None:
        if self.gid is None:
            return None
        if self.user is not None:
            return tuple(sorted(set(os.getgrouplist(self.user, self.gid))))
        return (self.gid,)

    @priority(Priority.START_DROP_PRIVILEGES)
    async def start(self) -> None:
        """Drop to the user and group given, then set the umask.

        Idle worker processes of anyio's ``to_process`` pool are ended first (when an id
        changes): they would keep the old identity, and could not be ended at shutdown.

        Raises:
            PermissionError: the process may not make a change asked for; nothing changed.
            OSError: a step failed; the group steps made are undone.

        Cancelled: before the change, nothing changed; the change itself does not wait.
        """
        before = _Identity.now()
        self.bus.log(f"Privileges before the drop: {before.describe()}", **before.fields())
        uid, gid, groups = self.uid, self.gid, self._target_groups()
        change_gid = gid is not None and before.gids != (gid,) * 3
        change_groups = groups is not None and before.groups != groups
        change_uid = uid is not None and before.uids != (uid,) * 3
        self._check_allowed(before, change_gid or change_groups, change_uid)
        if change_gid or change_groups or change_uid:
            ended = await end_idle_workers()
            if ended:
                self.bus.log(f"Ended {ended} idle to_process worker(s) started as the old user", ended=ended)
        try:
            if gid is not None and change_gid:
                os.setgid(gid)
            if gid is not None and change_groups:
                if self.user is not None:
                    os.initgroups(self.user, gid)
                else:
                    os.setgroups([gid])
            if uid is not None and change_uid:
                os.setuid(uid)
        except OSError:
            if change_gid or change_groups:
                self._undo_groups(before)
            raise
        if change_uid and os.getresuid() != (uid,) * 3:
            raise PermissionError(errno.EPERM, f"the user is {os.getresuid()} after setuid({uid})")
        if self.umask is not None:
            os.umask(self.umask)
        after = _Identity.now()
        self.bus.log(f"Privileges after the drop: {after.describe()}", **after.fields())

    def _check_allowed(self, before: _Identity, change_groups: bool, change_uid: bool) -> None:
        """Raise PermissionError, before any change, if a change needed is not allowed."""
        missing = []
        if change_groups and not _has_capability(_CAP_SETGID):
            missing.append(f"the group to gid {self.gid} (needs root or CAP_SETGID)")
        if change_uid and not _has_capability(_CAP_SETUID):
            name = f" ({self.user})" if self.user else ""
            missing.append(f"the user to uid {self.uid}{name} (needs root or CAP_SETUID)")
        if missing:
            raise PermissionError(
                errno.EPERM,
                f"cannot change {' nor '.join(missing)}: running as uid {before.uids[1]}, gid {before.gids[1]};"
                " nothing was changed",
            )

    def _undo_groups(self, before: _Identity) -> None:
        try:
            os.setgroups(list(before.groups))
            os.setresgid(*before.gids)
        except OSError:
            self.bus.log("Could not restore the groups after a failed drop", logging.ERROR, traceback=True)
