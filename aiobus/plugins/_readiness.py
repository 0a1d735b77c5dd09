"""Readiness checks of the Subprocess plugin: whether a program is ready."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

import anyio


@dataclass(frozen=True)
class PortReady:
    """Readiness check: the program is ready once a TCP connection to ``host:port`` succeeds.

    Args:
        port: the TCP port, 1 to 65535.
        host: the address to connect to.
        interval: seconds between two attempts.
    """

    port: int
    host: str = "127.0.0.1"
    interval: float = 0.05

    def __post_init__(self) -> None:
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 0 < self.port < 65536:
            raise ValueError(f"PortReady needs a TCP port from 1 to 65535, not {self.port!r}")
        if not isinstance(self.host, str) or not self.host:
            raise TypeError(f"PortReady needs a host name or address, not {self.host!r}")
        if isinstance(self.interval, bool) or not isinstance(self.interval, int | float) or not self.interval > 0:
            raise ValueError(f"PortReady's interval must be a positive number of seconds, not {self.interval!r}")

    async def wait(self) -> None:
        """Return once a connection succeeds; it tries forever (the caller bounds it).

        Cancelled, it stops trying and closes nothing of the program's.
        """
        while True:
            try:
                stream = await anyio.connect_tcp(self.host, self.port)
            except OSError:
                await anyio.sleep(self.interval)
            else:
                await stream.aclose()
                return


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
