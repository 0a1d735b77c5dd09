"""The protocol between a child broker's parent and its worker: what travels, and how.

The parent makes five socket pairs and starts the worker with one end of each; nothing
else holds them (a socket cannot be opened through ``/proc/<pid>/fd``, and the worker
marks them close-on-exec before anything runs, so its own subprocesses do not inherit
them). Descriptors 0, 1 and 2 of the worker carry no protocol: 0 is ``/dev/null``, 1 and
2 are pipes whose lines the parent logs (``stream="stdout"``/``"stderr"``).

========  ==========================================  =========================================
socket    parent to child                             child to parent
========  ==========================================  =========================================
anyio     ``anyio.to_process``'s own requests         its replies (see :mod:`.workers`)
control   :class:`Stop`, :class:`Graceful` (a Link)   :class:`Ready`, :class:`Done` (a Link)
data      the user's messages, then                   the user's messages (a Link)
          :class:`EndOfInput` (a Link)
beats     nothing                                     :data:`BEAT` records, one per main tick
logs      nothing                                     one JSON object per line, per log event
                                                      (see :func:`encode_log`)
========  ==========================================  =========================================

The control and data links are pickle (:class:`~aiobus.Link`), read only from the worker
the parent started itself. Log events are JSON, never pickle, written without dropping
anything: a child that logs faster than its parent reads waits.
"""

from __future__ import annotations

import json
import logging
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .._link import Link, LinkOptions, UndecodableFrame


@dataclass(frozen=True)
class Ready:
    """Child to parent: its bus is STARTED; messages may come."""


@dataclass(frozen=True)
class Done:
    """Child to parent, its last word: how many messages its function is done with."""

    acknowledged: int


@dataclass(frozen=True)
class Stop:
    """Parent to child: stop once the function has returned (its input ends with :class:`EndOfInput`)."""


@dataclass(frozen=True)
class Graceful:
    """Parent to child: the parent's bus published graceful; the child's bus does too."""


@dataclass(frozen=True)
class EndOfInput:
    """Parent to child, on the data link: no message follows."""


ControlMessage = Ready | Done | Stop | Graceful


async def receive_control(control: Link, log: Callable[[str], None]) -> object:
    """The next message on a control link; one that does not unpickle is passed to ``log``
    and dropped, never fatal (what is not one of the classes above is the caller's to drop).

    Raises:
        anyio.EndOfStream, anyio.BrokenResourceError: as :meth:`Link.receive`.
    """
    while True:
        try:
            return await control.receive()
        except UndecodableFrame as error:
            log(f"a control message that does not unpickle was dropped: {error}")


#: A heartbeat on the wire: the count of messages the child is done with.
BEAT = struct.Struct("<Q")


@dataclass(frozen=True)
class Sockets:
    """The worker's descriptors of the sockets listed above (anyio's is the bootstrap's business)."""

    control: int
    data: int
    beats: int
    logs: int


@dataclass(frozen=True)
class ChildSpec:
    """Everything the worker needs to run the child: the argument of :func:`~.child.run_child`."""

    fn: Callable[..., Any]
    name: str
    parent_pid: int
    worker_pid: int  # the worker the parent started for it: any other refuses to run it
    main_interval: float
    link_options: LinkOptions
    sockets: Sockets
    beat_interval: float | None = None  # seconds between two heartbeats; None: none (no hang detection)


# -- log events ---------------------------------------------------------------------------

#: The longest log line the parent reads; the rest of a longer one is cut (and then logged as text).
MAX_LOG_LINE = 1 << 20

#: Field names a child's log event cannot keep in the parent's log: the parent's own
#: (``child``, ``child_pid``), ``bus.log``'s parameters, and structlog's reserved keys.
RESERVED_FIELDS = frozenset({"child", "child_pid", "msg", "level", "traceback", "event", "timestamp"})
#: What a reserved field of a child's event is renamed with, in front of its name.
CHILD_PREFIX = "child."

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
_LEVELS.update(warn=logging.WARNING, critical=logging.CRITICAL, exception=logging.ERROR, fatal=logging.CRITICAL)


def encode_log(method: str, event: Mapping[str, Any]) -> bytes:
    """One log event as a JSON line: ``{"event": text, "level": method, "fields": {...}}``.

    The event's own fields travel apart from its text and level, so none can pass for them;
    values JSON does not know are written as their repr.
    """
    fields = dict(event)
    text = fields.pop("event", "")
    line = {"event": text if isinstance(text, str) else repr(text), "level": method, "fields": fields}
    return json.dumps(line, default=repr, ensure_ascii=False).encode() + b"\n"


def decode_log(line: str) -> tuple[str, int, dict[str, Any]]:
    """A child's log line as the parent logs it: message, level and fields.

    Fields named as the parent's own (:data:`RESERVED_FIELDS`), or already starting with
    ``child.``, get the ``child.`` prefix: a child's ``child_pid`` field arrives as
    ``child.child_pid``, its ``msg`` as ``child.msg``, a field of its own called ``level`` as
    ``child.level``; no field of a child can take the place of one of the parent's. A line
    that is not such a JSON object (cut, or garbled) is logged as it is, at WARNING, with
    ``malformed=True``.
    """
    try:
        event = json.loads(line)
    except ValueError:
        event = None
    if not isinstance(event, dict) or not isinstance(event.get("fields"), dict):
        return line, logging.WARNING, {"malformed": True}
    text = str(event.get("event", ""))
    level = _LEVELS.get(str(event.get("level", "info")).lower(), logging.INFO)
    fields = {}
    for key, value in event["fields"].items():
        if key in RESERVED_FIELDS or key.startswith(CHILD_PREFIX):
            key = CHILD_PREFIX + key
        fields[key] = value
    return text, level, fields
