"""Where the ``log`` channel goes by default (structlog), and a helper for applications.

The library never calls ``structlog.configure()`` on its own: applications do, and
:func:`configure_logging` is there for those (and for the examples) that want a
sensible default.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any, Literal, TextIO

import structlog

_STANDARD_LEVELS = (logging.CRITICAL, logging.ERROR, logging.WARNING, logging.INFO, logging.DEBUG)


def _standard_level(level: int) -> int:
    """The standard level at or below ``level`` (structlog knows only those)."""
    for standard in _STANDARD_LEVELS:
        if level >= standard:
            return standard
    return logging.DEBUG


def log_to_structlog(msg: str, level: int = logging.INFO, **fields: Any) -> None:
    """The bus's default ``log`` listener: one structlog event on the ``aiobus`` logger.

    A ``traceback`` field (sent by ``bus.log(..., traceback=True)``) becomes the
    event's ``exception``, which structlog's renderers print as a traceback. A field named
    ``event`` (structlog's own name for the message) is passed as ``event_``.
    """
    if "traceback" in fields:
        fields["exception"] = fields.pop("traceback")
    if "event" in fields:
        fields["event_"] = fields.pop("event")
    structlog.get_logger("aiobus").log(_standard_level(level), msg, **fields)


#: Keys the console line shows in its own columns, or leaves out: the name column already
#: says which child a relayed line comes from.
_COLUMNS = ("timestamp", "level", "logger", "event", "exception", "child", "child_pid")


def render_line(logger: Any, method: str, event: MutableMapping[str, Any]) -> str:
    """A console line a person reads easily: ``[time] Name    LEVEL message key=value``.

    The name column is the event's ``logger`` field (bind one:
    ``structlog.get_logger().bind(logger="Bank")``), else the child it was relayed from,
    else ``aiobus``. A traceback follows on the next lines.
    """
    name = str(event.get("logger") or str(event.get("child") or "").capitalize() or "aiobus")
    level = str(event.get("level", method)).upper()
    line = f"[{event.get('timestamp', '')}] {name:<7} {level:<5} {event.get('event', '')}"
    extra = " ".join(f"{key}={value}" for key, value in event.items() if key not in _COLUMNS)
    if extra:
        line += "  " + extra
    if event.get("exception"):
        line += "\n" + str(event["exception"]).rstrip()
    return line


def configure_logging(
    *,
    format: Literal["auto", "console", "json"] = "auto",
    level: int = logging.INFO,
    stream: TextIO | None = None,
) -> None:
    """Configure structlog for an application: console lines on a terminal, JSON lines otherwise.

    Console lines read ``[2026-11-25 10:15:07] Bank    INFO  Placing order: BUY DXBZ 20``
    (see :func:`render_line`); JSON lines carry every field.

    Args:
        format: ``"console"``, ``"json"``, or ``"auto"`` (console when ``stream`` is a terminal).
        level: the lowest level printed.
        stream: where lines go; standard error by default.
    """
    out = sys.stderr if stream is None else stream
    if format == "auto":
        format = "console" if out.isatty() else "json"
    if format not in ("console", "json"):
        raise ValueError(f"format must be 'auto', 'console' or 'json', not {format!r}")
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="%Y-%m-%d %H:%M:%S", utc=False),
        structlog.processors.format_exc_info,
        render_line if format == "console" else structlog.processors.JSONRenderer(),
    ]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=False,
    )
