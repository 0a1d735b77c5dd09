"""Output forwarding: a child's or a program's bytes, turned into log lines.

One splitter for everything aiobus reads of its children's output (a child broker's
descriptors 1 and 2, an external program's standard output and error): lines of at most
``limit`` bytes, the rest of a longer line cut and counted with one marker, bytes that are
not UTF-8 replaced. It works in linear time whatever the input (a 100 MB line without a
newline costs what reading it costs) and never raises on what it is fed.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

import anyio
from anyio.abc import ByteReceiveStream

#: How a cut line ends: the line's first ``limit`` bytes, then this with the number of bytes cut.
CUT_MARKER = "… [cut: {} bytes]"


class LineSplitter:
    """Splits a byte stream into text lines, each at most ``limit`` bytes, the rest cut with a marker.

    Args:
        limit: the longest line kept, in bytes (at least 1).
    """

    def __init__(self, limit: int) -> None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"a line limit is a number of bytes >= 1, not {limit!r}")
        self.limit = limit
        self.buffer = bytearray()
        self.cut = 0

    def feed(self, data: bytes) -> list[str]:
        """The lines ``data`` completes, in order (a partial last line waits for more)."""
        lines = []
        start = 0
        while (end := data.find(b"\n", start)) >= 0:
            self._keep(data, start, end)
            lines.append(self._take())
            start = end + 1
        self._keep(data, start, len(data))
        return lines

    def flush(self) -> str | None:
        """The last line, if it had no newline."""
        return self._take() if self.buffer or self.cut else None

    def _keep(self, data: bytes, start: int, end: int) -> None:
        room = max(0, self.limit - len(self.buffer))
        take = min(room, end - start)
        if take:
            self.buffer += data[start : start + take]
        self.cut += end - start - take

    def _take(self) -> str:
        if not self.cut and self.buffer.endswith(b"\r"):
            del self.buffer[-1:]
        text = self.buffer.decode("utf-8", errors="replace")
        if self.cut:
            text += CUT_MARKER.format(self.cut)
        self.buffer.clear()
        self.cut = 0
        return text


async def forward_lines(
    stream: ByteReceiveStream, limit: int, emit: Callable[[str], None], *, keep: deque[str] | None = None
) -> None:
    """Read ``stream`` to its end and call ``emit(line)`` for each line, the last one too.

    Lines are split by :class:`LineSplitter` (cut past ``limit`` bytes). ``keep``, if given,
    receives each line as well (a bounded deque keeps the last ones, say for an error
    message). A stream that breaks or is closed ends the reading like its end does.

    Cancelled: the lines read so far have been emitted; the partial last one is emitted too.
    """
    lines = LineSplitter(limit)
    try:
        async for chunk in stream:
            for line in lines.feed(chunk):
                if keep is not None:
                    keep.append(line)
                emit(line)
    except (anyio.BrokenResourceError, anyio.ClosedResourceError):
        pass
    finally:
        last = lines.flush()
        if last is not None:
            if keep is not None:
                keep.append(last)
            emit(last)
