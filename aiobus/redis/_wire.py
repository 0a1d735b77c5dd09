"""What the bridge and the fleet put on Redis: key and channel names, and JSON documents, never pickle.

Every document carries ``"v": 1`` and the deployment's ``prefix``: one from another version or
another deployment sharing the server is *foreign*, and dropped as such.

- an envelope, on ``{prefix}:channel:{name}``: ``v``, ``prefix``, ``channel``, ``origin`` (the
  node that published), ``seq`` (1, 2... per origin and channel), ``time`` (seconds since the
  epoch at the publish), ``args`` (a list) and ``kwargs`` (an object);
- a presence record, the value of the key ``{prefix}:bus:{group}:{node}`` (with a time to live):
  ``v``, ``prefix``, ``node``, ``group``, ``host``, ``pid``, ``state``, ``time``;
- a fleet request, on ``{prefix}:fleet:{group}``: ``v``, ``prefix``, ``id``, ``op``, ``reply`` (the
  channel to answer on, ``{prefix}:reply:{id}``) and ``nodes`` (null for all, or a list);
- a fleet answer, on the reply channel: ``v``, ``prefix``, ``id``, ``node``, ``state``.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any, Final

VERSION: Final = 1
#: The fleet operations a bus acts on (``status`` only answers).
OPS: Final = ("status", "graceful", "stop", "exit")

_NAME = re.compile(r"[A-Za-z0-9_.\-]+")
_PREFIX = re.compile(r"[A-Za-z0-9_.\-:]+")
_NODE = re.compile(r"[!-~]{1,200}")  # printable ASCII, no space


class Dropped(Exception):
    """A document that is not delivered: ``reason`` is one of ``malformed``, ``too_large``,
    ``foreign`` or ``unknown_channel``; the message says why, without the payload."""

    def __init__(self, reason: str, why: str) -> None:
        super().__init__(why)
        self.reason = reason


def check_name(what: str, value: object, pattern: re.Pattern[str] = _NAME) -> str:
    """``value`` if it may be part of a key or channel name (letters, digits, ``_.-``; ``:`` too in
    a prefix; any printable ASCII but a space in a node name); ValueError or TypeError otherwise."""
    if not isinstance(value, str):
        raise TypeError(f"{what} is a str, not {type(value).__name__}")
    if not pattern.fullmatch(value):
        raise ValueError(
            f"{what} {value!r} may hold only letters, digits and {'_.-:' if pattern is _PREFIX else '_.-'}"
        )
    return value


def check_prefix(value: object) -> str:
    return check_name("a key prefix", value, _PREFIX)


def check_node(value: object) -> str:
    if not isinstance(value, str) or not _NODE.fullmatch(value):
        raise ValueError(f"a node name is 1 to 200 printable ASCII characters without spaces, not {value!r}")
    return value


def channel_key(prefix: str, channel: str) -> str:
    return f"{prefix}:channel:{channel}"


def presence_key(prefix: str, group: str, node: str) -> str:
    return f"{prefix}:bus:{group}:{node}"


def presence_pattern(prefix: str, group: str) -> str:
    """The SCAN pattern of a group's presence keys (prefix and group hold no glob character)."""
    return f"{prefix}:bus:{group}:*"


def fleet_channel(prefix: str, group: str) -> str:
    return f"{prefix}:fleet:{group}"


def reply_channel(prefix: str, request_id: str) -> str:
    return f"{prefix}:reply:{request_id}"


def dumps(document: dict[str, Any]) -> str:
    """Compact JSON; NaN and infinities refused (ValueError), as the other side would refuse them."""
    return json.dumps(document, separators=(",", ":"), allow_nan=False)


def loads(data: object, prefix: str, max_size: int) -> dict[str, Any]:
    """The JSON object in ``data`` (a str; bytes arrive when they are not UTF-8) of version 1 and our
    deployment.

    Raises:
        Dropped: too large, not UTF-8 JSON, not an object (``malformed``), another version or prefix
            (``foreign``).
    """
    if isinstance(data, bytes):
        size = len(data)
        text = None
    elif isinstance(data, str):
        size = len(data) if data.isascii() else len(data.encode("utf-8", "surrogatepass"))
        text = data
    else:
        raise Dropped("malformed", f"not text but {type(data).__name__}")
    if size > max_size:
        raise Dropped("too_large", f"{size} bytes, over the {max_size} allowed")
    if text is None:
        raise Dropped("malformed", "not UTF-8")
    try:
        document = json.loads(text, parse_constant=_no_constant)
    except (ValueError, RecursionError):
        raise Dropped("malformed", "not JSON") from None
    if not isinstance(document, dict):
        raise Dropped("malformed", f"JSON {type(document).__name__}, not an object")
    if document.get("v") != VERSION or document.get("prefix") != prefix:
        raise Dropped("foreign", f"version {document.get('v')!r} of prefix {str(document.get('prefix'))[:100]!r}")
    return document


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


@dataclass(frozen=True)
class Envelope:
    """A message carried between buses: what was published on ``channel`` (``args`` and ``kwargs``),
    by which node, with which sequence number (per origin and channel), at what time (epoch seconds)."""

    channel: str
    origin: str
    seq: int
    time: float
    args: tuple[Any, ...]
    kwargs: dict[str, Any]

    def encode(self, prefix: str) -> str:
        """The envelope as JSON.

        Raises:
            TypeError, ValueError: an argument JSON cannot carry (a set, an object, NaN...).
        """
        return dumps(
            {
                "v": VERSION,
                "prefix": prefix,
                "channel": self.channel,
                "origin": self.origin,
                "seq": self.seq,
                "time": self.time,
                "args": list(self.args),
                "kwargs": self.kwargs,
            }
        )

    @classmethod
    def decode(cls, data: object, prefix: str, max_size: int, channels: frozenset[str], arrived_on: str) -> Envelope:
        """The envelope in ``data``, which arrived on bus channel ``arrived_on``.

        Raises:
            Dropped: see :func:`loads`; also ``unknown_channel`` (a channel not in ``channels``) and
                ``malformed`` (a missing or mistyped field, a channel other than ``arrived_on``).
        """
        document = loads(data, prefix, max_size)
        channel = document.get("channel")
        if not isinstance(channel, str):
            raise Dropped("malformed", "no channel")
        if channel not in channels:
            raise Dropped("unknown_channel", f"channel {channel[:100]!r} is not bridged in")
        if channel != arrived_on:
            raise Dropped("malformed", f"channel {channel!r} arrived on {arrived_on!r}")
        origin, seq, when = document.get("origin"), document.get("seq"), document.get("time")
        args, kwargs = document.get("args"), document.get("kwargs")
        if not isinstance(origin, str) or not _NODE.fullmatch(origin):
            raise Dropped("malformed", "no valid origin")
        if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
            raise Dropped("malformed", "no valid seq")
        if not isinstance(when, int | float) or isinstance(when, bool) or not math.isfinite(when):
            raise Dropped("malformed", "no valid time")
        if not isinstance(args, list) or not isinstance(kwargs, dict):
            raise Dropped("malformed", "args is not a list or kwargs not an object")
        if "channel" in kwargs:  # Bus.publish's own first parameter
            raise Dropped("malformed", "a keyword argument named 'channel'")
        return cls(channel, origin, seq, float(when), tuple(args), kwargs)


_ID = re.compile(r"[0-9a-f]{32}")


@dataclass(frozen=True)
class FleetRequest:
    """An operation asked of a group of buses: ``op`` (one of :data:`OPS`), answered on
    ``{prefix}:reply:{id}``; ``nodes`` names the buses meant (None: all of the group)."""

    id: str
    op: str
    nodes: tuple[str, ...] | None = None

    def encode(self, prefix: str) -> str:
        nodes = None if self.nodes is None else list(self.nodes)
        reply = reply_channel(prefix, self.id)
        return dumps({"v": VERSION, "prefix": prefix, "id": self.id, "op": self.op, "reply": reply, "nodes": nodes})

    @classmethod
    def decode(cls, data: object, prefix: str, max_size: int) -> FleetRequest:
        """The request in ``data``.

        Raises:
            Dropped: see :func:`loads`; ``malformed`` for an unknown op, a bad id, a reply channel
                other than ours for that id, or nodes that are not a list of names.
        """
        document = loads(data, prefix, max_size)
        request_id, op, nodes = document.get("id"), document.get("op"), document.get("nodes")
        if not isinstance(request_id, str) or not _ID.fullmatch(request_id):
            raise Dropped("malformed", "a fleet request without a valid id")
        if op not in OPS:
            raise Dropped("malformed", f"an unknown fleet op {str(op)[:40]!r}")
        if document.get("reply") != reply_channel(prefix, request_id):
            raise Dropped("malformed", "a fleet request with another reply channel")
        if nodes is not None and (not isinstance(nodes, list) or not all(isinstance(n, str) for n in nodes)):
            raise Dropped("malformed", "fleet request nodes are not a list of names")
        return cls(request_id, str(op), None if nodes is None else tuple(nodes))


def encode_answer(prefix: str, request_id: str, node: str, state: str) -> str:
    return dumps({"v": VERSION, "prefix": prefix, "id": request_id, "node": node, "state": state})


def decode_answer(data: object, prefix: str, request_id: str) -> tuple[str, str]:
    """(node, state) from an answer to request ``request_id``.

    Raises:
        Dropped: see :func:`loads`; ``malformed`` for another id or a missing node or state.
    """
    document = loads(data, prefix, 64 * 1024)
    node, state = document.get("node"), document.get("state")
    if document.get("id") != request_id or not isinstance(state, str):
        raise Dropped("malformed", "an answer without this request's id or a state")
    if not isinstance(node, str) or not _NODE.fullmatch(node):
        raise Dropped("malformed", "an answer without a valid node")
    return node, state[:40]
