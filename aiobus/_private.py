"""A private rendezvous between a parent and the children it starts: a link nobody else can reach.

Four locks, each enough against another local user:

1. The socket lives in a fresh directory made by :func:`tempfile.mkdtemp` (mode 0700,
   a random name, created with ``O_EXCL`` semantics: no symlink or pre-created file
   can take its place); nobody but its owner (and root) can even look inside.
2. The socket itself is mode 0600.
3. On Linux, the kernel's ``SO_PEERCRED`` tells each side the other's uid: only our own
   uid or root is accepted.
4. The child must present a 32-byte random token (:func:`secrets.token_bytes`) before
   anything else; the parent compares it in constant time.

The parent reads exactly the token's 32 bytes from a new peer and nothing more, so no
pickle is ever read from a peer before it has proved itself. A refused peer (another
uid, a wrong token, fewer than 32 bytes before it closes or before
``handshake_timeout``, or a peer gone before the parent's OK) is logged and closed,
and the listener goes on waiting for the right one. Peers are taken one at a time: a
silent peer holds the next one back for at most ``handshake_timeout`` seconds.
"""

from __future__ import annotations

import hmac
import logging
import os
import secrets
import shutil
import socket
import struct
import tempfile
from collections.abc import Callable
from types import TracebackType
from typing import Any, Unpack

import anyio
from anyio.abc import SocketAttribute, SocketListener, SocketStream

from ._link import Link, LinkOptions, check_link_options
from ._logging import log_to_structlog
from ._seconds import check_seconds

TOKEN_SIZE = 32
_OK = b"\x01"
_SOCKET_NAME = "link"
_UNIX_PATH_MAX = 100  # sun_path holds 108 bytes on Linux, 104 on the BSDs


def _peer(stream: SocketStream) -> tuple[int | None, int | None]:
    """The pid and uid of the process at the other end of a Unix socket (None where the OS won't say)."""
    if not hasattr(socket, "SO_PEERCRED"):
        return None, None
    sock = stream.extra(SocketAttribute.raw_socket)
    pid, uid, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    return pid, uid


def _trusted(uid: int | None) -> bool:
    return uid is None or uid in (os.getuid(), 0)


def _short_temp_dir() -> str:
    base = tempfile.gettempdir()
    # mkdtemp adds "/aiobus-" and 8 characters, then comes "/link".
    return base if len(os.fsencode(base)) + 24 <= _UNIX_PATH_MAX else "/tmp"


async def _receive_exactly(stream: SocketStream, size: int, into: bytearray | None = None) -> bytes:
    """Read exactly ``size`` bytes and not one more; EndOfStream if the peer closes first.

    ``into``, if given, keeps what was read so far, even when the read is interrupted.
    """
    data = bytearray() if into is None else into
    while len(data) < size:
        data += await stream.receive(size - len(data))
    return bytes(data)


class PrivateListener:
    """The parent's side of the rendezvous: ``async with PrivateListener() as listener:``.

    Inside the block, hand :attr:`address` and :attr:`token` to the child (say, as
    arguments of ``anyio.to_process.run_sync``), which calls :func:`connect_private`,
    and call :meth:`accept`. :meth:`accept` can be called again for the next child (or
    the next incarnation of one). Leaving the block closes the socket and removes the
    directory and everything in it.

    Args:
        log: called as ``log(msg, level, **fields)`` for each refused peer (a bus's
            ``bus.log`` fits); structlog's ``aiobus`` logger by default.
        handshake_timeout: seconds a new peer has to present its token.
    """

    def __init__(self, *, log: Callable[..., None] | None = None, handshake_timeout: float = 5.0) -> None:
        check_seconds("handshake_timeout", handshake_timeout, positive=True)
        self._log = log_to_structlog if log is None else log
        self.handshake_timeout = handshake_timeout
        #: The path of the socket, for :func:`connect_private`.
        self.address = ""
        #: The secret the child must present, for :func:`connect_private`.
        self.token = secrets.token_bytes(TOKEN_SIZE)
        self._directory: str | None = None
        self._listener: SocketListener | None = None

    async def __aenter__(self) -> PrivateListener:
        if self._directory is not None:
            raise RuntimeError("a PrivateListener can be entered only once")
        self._directory = tempfile.mkdtemp(prefix="aiobus-", dir=_short_temp_dir())
        try:
            self.address = os.path.join(self._directory, _SOCKET_NAME)
            self._listener = await anyio.create_unix_listener(self.address, mode=0o600)
        except BaseException:
            shutil.rmtree(self._directory, ignore_errors=True)
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        """Close the socket and remove the directory (shielded from cancellation)."""
        try:
            if self._listener is not None:
                with anyio.CancelScope(shield=True):
                    await self._listener.aclose()
        finally:
            if self._directory is not None:
                try:
                    shutil.rmtree(self._directory)
                except FileNotFoundError:
                    pass

    async def accept(self, timeout: float, **link_options: Unpack[LinkOptions]) -> Link:  # noqa: ASYNC109
        """Wait for a peer that presents the token, and return a link to it.

        Peers of another uid, with a wrong token, with fewer than 32 bytes (closed, or
        silent for ``handshake_timeout`` seconds), or gone before the OK are refused,
        logged (WARNING) and closed; the wait goes on. Nothing a refused peer sent is
        ever unpickled. The link returned is not entered yet: use it as
        ``async with link:``.

        Cancelled: no link is made; a peer in the middle of its handshake is closed.

        Args:
            timeout: seconds to wait, in all, for the right peer.
            link_options: passed to :class:`Link`.

        Raises:
            TimeoutError: no peer presented the token within ``timeout`` seconds.
        """
        check_link_options(**link_options)
        if self._listener is None:
            raise RuntimeError("use the listener as `async with PrivateListener() as listener:`")
        with anyio.move_on_after(timeout):
            while True:
                stream = await self._listener.accept()
                assert isinstance(stream, SocketStream)
                if await self._handshake(stream):
                    return Link(stream, **link_options)
        raise TimeoutError(f"no child presented the token at {self.address} within {timeout} s")

    async def _handshake(self, stream: SocketStream) -> bool:
        """Check the peer's uid and token; say OK and return True, or close it and return False."""
        try:
            pid, uid = _peer(stream)
            if not _trusted(uid):
                self._refuse("peer of another user refused", pid=pid, uid=uid)
                await stream.aclose()
                return False
            received = bytearray()
            ended = "handshake_timeout"
            with anyio.move_on_after(self.handshake_timeout):
                try:
                    await _receive_exactly(stream, TOKEN_SIZE, received)
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    ended = "closed"
            if not hmac.compare_digest(bytes(received), self.token):
                if len(received) == TOKEN_SIZE:
                    self._refuse("wrong token refused", pid=pid, uid=uid, received=len(received))
                else:
                    self._refuse("peer without a token refused", pid=pid, uid=uid, received=len(received), ended=ended)
                await stream.aclose()
                return False
            try:
                await stream.send(_OK)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                self._refuse("peer left during the handshake", pid=pid, uid=uid)
                await stream.aclose()
                return False
        except BaseException:
            await anyio.aclose_forcefully(stream)
            raise
        return True

    def _refuse(self, reason: str, **fields: Any) -> None:
        self._log(f"private link: {reason}", logging.WARNING, address=self.address, **fields)


async def connect_private(
    address: str,
    token: bytes,
    *,
    timeout: float = 10.0,  # noqa: ASYNC109
    **link_options: Unpack[LinkOptions],
) -> Link:
    """The child's side: connect to a :class:`PrivateListener`, present the token, return the link.

    The link returned is not entered yet: use it as ``async with link:``.

    Cancelled: no link is made and the socket is closed.

    Args:
        address: the listener's :attr:`~PrivateListener.address`.
        token: the listener's :attr:`~PrivateListener.token`.
        timeout: seconds for the connection and the handshake, in all.
        link_options: passed to :class:`Link`.

    Raises:
        TimeoutError: the handshake did not complete within ``timeout`` seconds.
        PermissionError: the listener refused the token, or runs as another user.
        OSError: the socket cannot be reached (FileNotFoundError once the listener is gone).
    """
    if not isinstance(token, bytes) or len(token) != TOKEN_SIZE:
        raise ValueError(f"token must be {TOKEN_SIZE} bytes, not {token!r}")
    check_link_options(**link_options)
    with anyio.move_on_after(timeout):
        stream = await anyio.connect_unix(address)
        try:
            _, uid = _peer(stream)
            if not _trusted(uid):
                raise PermissionError(f"the listener at {address} runs as uid {uid}, neither ours nor root")
            await stream.send(token)
            try:
                reply = await _receive_exactly(stream, len(_OK))
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                raise PermissionError(f"the listener at {address} refused the token") from None
            if reply != _OK:
                raise PermissionError(f"the listener at {address} answered {reply!r}, not OK")
        except BaseException:
            await anyio.aclose_forcefully(stream)
            raise
        return Link(stream, **link_options)
    raise TimeoutError(f"no handshake with the listener at {address} within {timeout} s")
