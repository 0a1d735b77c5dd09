"""Where the ``log`` channel goes by default, and a helper for applications.

A library never writes to standard output: the default ``log`` listener sends each event
to structlog's ``aiobus`` logger once the application has configured structlog, and to the
standard library's ``logging.getLogger("aiobus")`` otherwise (so an application that set
nothing up sees warnings and errors on standard error, as Python shows them).

The library never calls ``structlog.configure()`` on its own: applications do, and
:func:`configure_logging` is there for those (and for the examples) that want a
sensible default. Writing a log line never raises: a line that cannot be written is
dropped.
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
    """The bus's default ``log`` listener: structlog if the application configured it, else ``logging``.

    Once ``structlog.is_configured()``, one structlog event on the ``aiobus`` logger: a
    ``traceback`` field (sent by ``bus.log(..., traceback=True)``) becomes the event's
    ``exception``, which structlog's renderers print as a traceback, and a field named
    ``event`` (structlog's own name for the message) is passed as ``event_``. Otherwise
    :func:`log_to_logging`: nothing reaches standard output.
    """
    if not structlog.is_configured():
        log_to_logging(msg, level, **fields)
        return
    if "traceback" in fields:
        fields["exception"] = fields.pop("traceback")
    if "event" in fields:
        fields["event_"] = fields.pop("event")
    structlog.get_logger("aiobus").log(_standard_level(level), msg, **fields)


def log_to_logging(msg: str, level: int = logging.INFO, **fields: Any) -> None:
    """One record on the standard library's ``aiobus`` logger, at ``level``.

    The record's message is ``msg`` followed by the fields as ``key=value`` (and a
    ``traceback`` field on the lines below), so that a bare handler shows them all; the
    fields are also the record's ``fields`` attribute, for handlers that want them apart.
    """
    logger = logging.getLogger("aiobus")
    if not logger.isEnabledFor(level):
        return
    traceback = fields.pop("traceback", None)
    text = msg + _fields_text(fields)
    if traceback:
        text += "\n" + str(traceback).rstrip()
    logger.log(level, "%s", text, extra={"fields": fields})


def _fields_text(fields: MutableMapping[str, Any]) -> str:
    extra = " ".join(f"{key}={value}" for key, value in fields.items())
    return "  " + extra if extra else ""


#: Keys the console line shows in its own columns, or leaves out: the name column already
#: says which child a line comes from, or is about (its ``child_pid`` stays, as a field).
_COLUMNS = ("timestamp", "level", "logger", "event", "exception", "child")
#: The ``timestamp`` of a JSON line: ISO 8601, UTC, always with microseconds (``isoformat`` drops
#: them when they are 0).
JSON_TIME_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"
#: The width of the console line's name column: longer names are cut, with an ellipsis.
NAME_WIDTH = 10
#: The width of its level column: the longest level name, CRITICAL.
LEVEL_WIDTH = 8


def render_line(logger: Any, method: str, event: MutableMapping[str, Any]) -> str:
    """A console line a person reads easily: ``[time] Name       LEVEL    message  key=value``.

    The name column is the event's ``logger`` field (bind one:
    ``structlog.get_logger().bind(logger="Bank")``), else the child the line comes from or
    is about, else ``aiobus``; it is :data:`NAME_WIDTH` characters wide (a longer name is
    cut, ending with ``…``) and the level column :data:`LEVEL_WIDTH`, so that the messages
    line up. A traceback follows on the next lines.
    """
    name = str(event.get("logger") or str(event.get("child") or "").capitalize() or "aiobus")
    if len(name) > NAME_WIDTH:
        name = name[: NAME_WIDTH - 1] + "…"
    level = str(event.get("level", method)).upper()
    line = f"[{event.get('timestamp', '')}] {name:<{NAME_WIDTH}} {level:<{LEVEL_WIDTH}} {event.get('event', '')}"
    line += _fields_text({key: value for key, value in event.items() if key not in _COLUMNS})
    if event.get("exception"):
        line += "\n" + str(event["exception"]).rstrip()
    return line


def write_line(stream: TextIO, line: str) -> None:
    """Write ``line`` and a newline to ``stream``, flushed; never raise.

    A line that cannot be written (the stream's reader is gone, as in ``service 2>&1 |
    head``; the stream is closed; the disk is full) is dropped.
    """
    try:
        stream.write(line + "\n")
        stream.flush()
    except (OSError, ValueError):
        pass


class LineLogger:
    """A structlog logger that writes each rendered line to a stream with :func:`write_line`.

    Like structlog's ``PrintLogger``, but a stream that fails (a reader gone, a closed
    file) never makes logging raise: the service goes on without its log lines.
    """

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def msg(self, message: str) -> None:
        write_line(self.stream, message)

    log = debug = info = warn = warning = error = err = critical = fatal = exception = failure = msg


def configure_logging(
    *,
    format: Literal["auto", "console", "json"] = "auto",
    level: int = logging.INFO,
    stream: TextIO | None = None,
) -> None:
    """Configure structlog for an application: console lines on a terminal, JSON lines otherwise.

    Console lines read ``[2026-11-25 10:15:07] Bank       INFO     Placing order: BUY DXBZ 20``
    (local time; see :func:`render_line`); JSON lines carry every field, and a ``timestamp``
    in UTC, ISO 8601 with microseconds (``2026-11-25T09:15:07.123456Z``). A stream that
    breaks (its reader gone) never makes the service fail: its lines are dropped.

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
    if format == "console":
        stamper = structlog.processors.TimeStamper(fmt="%Y-%m-%d %H:%M:%S", utc=False)
    else:
        stamper = structlog.processors.TimeStamper(fmt=JSON_TIME_FORMAT, utc=True)
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        stamper,
        structlog.processors.format_exc_info,
        render_line if format == "console" else structlog.processors.JSONRenderer(),
    ]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=lambda *args: LineLogger(out),
        cache_logger_on_first_use=False,
    )
