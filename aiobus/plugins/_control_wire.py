"""The control socket's wire: request lines in, JSON lines out, and who the peer is.

Plain non-blocking sockets driven by anyio's ``wait_readable`` and ``wait_writable``, so that
they work on asyncio and trio alike. Nothing read is ever unpickled: lines are handed on as
bytes, for ``json.loads``.
"""

from __future__ import annotations

import json
import socket
import struct
from typing import Any, Final

import anyio

from ._control_protocol import MAX_REQUEST

#: Seconds a client has to take a reply (or a tail event) before its connection is cut.
SEND_TIMEOUT: Final = 10.0
#: What :meth:`LineReader.next` returns for a line over MAX_REQUEST bytes.
TOO_LARGE: Final = object()
_PEERCRED = struct.Struct("3i")  # pid, uid, gid


def peer(conn: socket.socket) -> tuple[int, int]:
    """The pid and uid of the process at the other end of a Unix socket, as the kernel saw them at connect()."""
    pid, uid, _ = _PEERCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
    return pid, uid


class LineReader:
    """Request lines of a connection; a line over MAX_REQUEST bytes is skipped whole and reported once."""

    def __init__(self, conn: socket.socket) -> None:
        self.conn = conn
        self.buffer = bytearray()
        self.skipping = False

    async def next(self) -> bytes | object | None:
        """The next line (without its newline), ``TOO_LARGE``, or None at the end (a half line is dropped)."""
        while True:
            end = self.buffer.find(b"\n")
            if end >= 0:
                line = bytes(self.buffer[:end])
                del self.buffer[: end + 1]
                if self.skipping:
                    self.skipping = False
                    continue
                return TOO_LARGE if len(line) > MAX_REQUEST else line
            if len(self.buffer) > MAX_REQUEST:
                self.buffer.clear()
                if not self.skipping:
                    self.skipping = True
                    return TOO_LARGE
            await anyio.wait_readable(self.conn)
            try:
                chunk = self.conn.recv(65536)
            except (BlockingIOError, InterruptedError):
                continue
            except ConnectionError:
                return None
            if not chunk:
                return None
            self.buffer += chunk


async def send(conn: socket.socket, obj: dict[str, Any]) -> None:
    """Send one JSON line.

    Raises:
        TimeoutError: the client took none of it for SEND_TIMEOUT seconds.
        OSError: the client went away.
    """
    try:
        text = json.dumps(obj, default=str, ensure_ascii=False)
    except (ValueError, TypeError, RecursionError):  # a log field that refers to itself, say
        text = json.dumps(plain(obj), ensure_ascii=False)
    data = memoryview(text.encode("utf-8", "replace") + b"\n")
    while data:
        try:
            sent = conn.send(data)
        except (BlockingIOError, InterruptedError):
            with anyio.fail_after(SEND_TIMEOUT):
                await anyio.wait_writable(conn)
            continue
        data = data[sent:]


def plain(value: Any, depth: int = 0) -> Any:
    """``value`` with what JSON cannot say (cycles, odd keys, depth past 20) turned into text."""
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    if depth < 20 and isinstance(value, dict):
        return {str(key): plain(item, depth + 1) for key, item in value.items()}
    if depth < 20 and isinstance(value, list | tuple):
        return [plain(item, depth + 1) for item in value]
    return str(value)[:1000]
