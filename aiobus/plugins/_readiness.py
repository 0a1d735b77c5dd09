"""Readiness checks of the Subprocess plugin: whether a program is ready.

A port that answers is not enough: something else may hold it (say, an old instance, or
another service on the same port), and the program told to listen there then dies with
"Address already in use" while the check passes. So :class:`PortReady`, given the
program's process group, passes only once the listening socket that answers belongs to a
process of that group: it reads the LISTEN sockets on the port from ``/proc/net/tcp`` and
``/proc/net/tcp6`` and looks for their inodes among the open descriptors
(``/proc/<pid>/fd``) of the group's processes. Where ``/proc`` cannot tell (no ``/proc``,
descriptors of another user's processes, a listener out of sight in another network
namespace), it settles for the program being still alive once the port has answered.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import struct
from dataclasses import dataclass, field
from typing import Literal

import anyio

from aiobus import check_seconds

LISTEN = "0A"  # the state of a listening socket in /proc/net/tcp
WILDCARDS = frozenset({ipaddress.ip_address("0.0.0.0"), ipaddress.ip_address("::")})

_Address = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class _Survey:
    """What /proc says of a port: who listens on it, seen from a program's process group."""

    owned: bool | None  # a process of the group listens on it; None: /proc cannot say
    holder: int | None = None  # a process outside the group that listens on it, if one was looked for and found


@dataclass(frozen=True)
class PortReady:
    """Readiness check: the program is ready once ``host:port`` accepts a TCP connection *and*
    the listening socket is the program's own (held by a process of its process group).

    While the port is held by another process the check keeps waiting (the program may
    still be binding). Where ``/proc`` cannot say who listens (no ``/proc``, descriptors that
    cannot be read), the check passes once the port answers and the program is still alive
    an ``interval`` later.

    Args:
        port: the TCP port, 1 to 65535; for the instances of a program, a template such as
            ``"{port}"``, filled in for each with its names (see ``Subprocess(instances=...)``).
        host: the address to connect to; a listener on it, on ``0.0.0.0`` or on ``::`` counts.
        interval: seconds between two attempts.
    """

    port: int | str
    host: str = "127.0.0.1"
    interval: float = 0.05

    def __post_init__(self) -> None:
        if isinstance(self.port, str) and "{" in self.port:
            pass  # a template: checked once filled in (for_instance)
        elif isinstance(self.port, bool) or not isinstance(self.port, int) or not 0 < self.port < 65536:
            raise ValueError(f"PortReady needs a TCP port from 1 to 65535, not {self.port!r}")
        if not isinstance(self.host, str) or not self.host:
            raise TypeError(f"PortReady needs a host name or address, not {self.host!r}")
        check_seconds("PortReady's interval", self.interval, positive=True)

    def for_instance(self, names: dict[str, object]) -> PortReady:
        """This check for one instance of a program: a template port filled in with its ``names``.

        Raises:
            ValueError: the template names something unknown, or is not a port once filled in.
        """
        if not isinstance(self.port, str):
            return self
        try:
            filled = self.port.format_map(names)
        except (KeyError, IndexError, ValueError) as error:
            raise ValueError(f"PortReady's port {self.port!r} cannot be filled in: {error!r}") from None
        try:
            port = int(filled)
        except ValueError:
            raise ValueError(f"PortReady's port {self.port!r} is {filled!r} once filled in: not a port") from None
        return PortReady(port, self.host, self.interval)

    @property
    def number(self) -> int:
        """The port (a template must have been filled in: :meth:`for_instance`)."""
        if isinstance(self.port, str):
            raise ValueError(f"PortReady's port {self.port!r} is a template for a program's instances")
        return self.port

    async def wait(self, pgid: int | None = None) -> None:
        """Return once the port answers and, given ``pgid``, is held by that process group.

        It tries forever (the caller bounds it). Cancelled, it stops trying and closes
        nothing of the program's.
        """
        while True:
            if await self._answers():
                if pgid is None:
                    return
                survey = await anyio.to_thread.run_sync(self._survey, pgid, False)
                if survey.owned:
                    return
                if survey.owned is None:  # /proc cannot say: the program must outlive the answer
                    await anyio.sleep(self.interval)
                    if _alive(pgid):
                        return
                    continue
            await anyio.sleep(self.interval)

    def held_elsewhere(self, pgid: int) -> str | None:
        """Who holds the port, in words, if a process outside the group ``pgid`` listens on it and none in it does."""
        survey = self._survey(pgid, True)
        if survey.owned is not False:
            return None
        if survey.holder is None:
            return f"port {self.port} is held by another process (its pid could not be read), not by the program"
        return f"port {self.port} is held by another process (pid {survey.holder}), not by the program"

    async def _answers(self) -> bool:
        try:
            stream = await anyio.connect_tcp(self.host, self.number)
        except OSError:
            return False
        await stream.aclose()
        return True

    def _survey(self, pgid: int, find_holder: bool) -> _Survey:
        """Look for the port's listening sockets among the descriptors of group ``pgid``
        (and, with ``find_holder``, of every other process)."""
        inodes = _listening(self.number, _addresses(self.host, self.number))
        if not inodes:
            return _Survey(owned=None)  # no /proc, or the listener is out of sight
        unreadable = False
        holder = None
        for pid, group in _processes():
            if group != pgid and (not find_holder or holder is not None):
                continue
            held = _socket_inodes(pid)
            if held is None:
                unreadable = unreadable or group == pgid
            elif held & inodes:
                if group == pgid:
                    return _Survey(owned=True)
                holder = pid
        return _Survey(owned=None if unreadable else False, holder=holder)


def _addresses(host: str, port: int) -> set[_Address]:
    """The addresses ``host`` stands for, plus the wildcards (a listener on them answers too)."""
    found: set[_Address] = set(WILDCARDS)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError:
        return found
    for info in infos:
        found.add(ipaddress.ip_address(str(info[4][0]).partition("%")[0]))
    return found


def _address(hexadecimal: str) -> _Address:
    """An address as /proc/net/tcp* writes it: 32-bit words in host byte order."""
    words = [int(hexadecimal[i : i + 8], 16) for i in range(0, len(hexadecimal), 8)]
    address = ipaddress.ip_address(struct.pack(f"={len(words)}I", *words))
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _listening(port: int, addresses: set[_Address]) -> set[int] | None:
    """The inodes of the sockets listening on ``port`` at one of ``addresses``; None without /proc/net."""
    found: set[int] = set()
    readable = False
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as file:
                rows = file.read().splitlines()[1:]
        except OSError:
            continue  # no /proc, or no IPv6
        readable = True
        for row in rows:
            fields = row.split()
            if len(fields) < 10 or fields[3] != LISTEN:
                continue
            local, _, local_port = fields[1].partition(":")
            if int(local_port, 16) == port and _address(local) in addresses:
                found.add(int(fields[9]))
    return found if readable else None


def _processes() -> list[tuple[int, int]]:
    """Each running process's pid and process group, from /proc (empty without it)."""
    found: list[tuple[int, int]] = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return found
    for entry in entries:
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as file:
                    found.append((int(entry), int(file.read().rsplit(b")", 1)[1].split()[2])))
            except (OSError, ValueError, IndexError):
                pass  # it ended meanwhile
    return found


def _socket_inodes(pid: int) -> set[int] | None:
    """The inodes of the sockets ``pid`` has open; None if its descriptors cannot be read."""
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except PermissionError:
        return None
    except OSError:
        return set()  # it ended meanwhile
    inodes = set()
    for name in names:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{name}")
        except PermissionError:
            return None  # the directory may be listed, its links not followed (a process not dumpable)
        except OSError:
            continue  # closed meanwhile
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's: it exists
    try:
        with open(f"/proc/{pid}/stat", "rb") as file:
            return file.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")
    except FileNotFoundError:
        return not os.path.exists("/proc/self")  # ended meanwhile, or no /proc at all
    except (OSError, IndexError):
        return True


@dataclass(frozen=True)
class LineReady:
    """Readiness check: the program is ready once a line of its output matches ``pattern``.

    Args:
        pattern: a regular expression, searched for in each line (``re.search``).
        stream: ``"stdout"``, ``"stderr"``, or None for both.
    """

    pattern: str | re.Pattern[str]
    stream: Literal["stdout", "stderr"] | None = None
    regex: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        try:
            regex = re.compile(self.pattern)
        except (re.error, TypeError) as error:
            raise ValueError(f"LineReady needs a valid regular expression, not {self.pattern!r}: {error}") from None
        if self.stream not in ("stdout", "stderr", None):
            raise ValueError(f"LineReady's stream must be 'stdout', 'stderr' or None, not {self.stream!r}")
        object.__setattr__(self, "regex", regex)
