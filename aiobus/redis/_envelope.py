"""The envelope of a message on a Redis Stream, and the keys a broker's messages live under.

Each stream entry has one field, ``aiobus``, whose value is a JSON object::

    {"v": 1, "id": "<hex>", "origin": "<host>/<pid>/<hex>", "reply": "<key>", "t": <unix time>, "body": ...}

JSON, never pickle: whoever can write to the server could otherwise run code in every broker. An
entry without the field is foreign; one whose field is not such an object is malformed; one
longer than the reader's limit is oversized. Readers drop all three, and count and log them
(never their payload).
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from dataclasses import dataclass
from typing import Any

#: The version of the envelope written; readers drop any other.
VERSION = 1
#: The one field of an entry that aiobus wrote.
FIELD = "aiobus"
#: The field of the entry that opens a sender's reply stream (no message: readers skip it).
OPENED = "aiobus-opened"
#: The largest message (its whole envelope, JSON, in bytes) sent or accepted by default.
MAX_MESSAGE_SIZE = 2**20


class Dropped(ValueError):
    """An entry that is not a message of ours; ``reason`` is ``foreign``, ``malformed`` or ``oversized``."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass(frozen=True)
class Keys:
    """The keys of a broker named ``name`` under ``prefix``: its requests stream, and the reply
    streams of its senders (one each, named in each message)."""

    prefix: str
    name: str

    def __post_init__(self) -> None:
        for what, value, banned in (("prefix", self.prefix, " \n\r\t"), ("name", self.name, ": \n\r\t")):
            if not isinstance(value, str) or not value or any(c in value for c in banned):
                rule = "a non-empty str without spaces" + (" or ':'" if what == "name" else "")
                raise ValueError(f"a broker's {what} is {rule}, not {value!r}")

    @property
    def requests(self) -> str:
        return f"{self.prefix}:{self.name}:requests"

    @property
    def replies_prefix(self) -> str:
        return f"{self.prefix}:{self.name}:replies:"

    def replies(self, sender: str) -> str:
        return self.replies_prefix + sender


def new_origin() -> str:
    """A name for this sender or consumer that no other process shares: host, pid and a random part."""
    host = socket.gethostname().replace(":", "_").replace(" ", "_") or "host"
    return f"{host}/{os.getpid()}/{uuid.uuid4().hex[:8]}"


def encode(body: Any, origin: str, reply: str, limit: int, message_id: str | None = None) -> tuple[str, str]:
    """``(id, text)``: the envelope of ``body`` as JSON text, and the message's id.

    Raises:
        TypeError: ``body`` is not JSON-serializable (nothing was sent).
        ValueError: the envelope is longer than ``limit`` bytes.
    """
    message_id = message_id or uuid.uuid4().hex
    envelope = {"v": VERSION, "id": message_id, "origin": origin, "reply": reply, "t": time.time(), "body": body}
    try:
        text = json.dumps(envelope, separators=(",", ":"))  # ASCII: its length is its size in bytes
    except TypeError as error:
        raise TypeError(f"a message over Redis must be JSON-serializable (no pickle): {error}") from None
    except ValueError as error:  # a circular reference
        raise TypeError(f"a message over Redis must be JSON-serializable: {error}") from None
    if len(text) > limit:
        raise ValueError(f"the message is {len(text)} bytes as JSON, more than the limit of {limit}")
    return message_id, text


@dataclass(frozen=True)
class Envelope:
    """A message read from a stream."""

    id: str
    origin: str
    reply: str
    time: float
    body: Any


def decode(fields: dict[str, str], limit: int) -> Envelope:
    """The envelope of a stream entry's ``fields``.

    Raises:
        Dropped: the entry is foreign, malformed or oversized.
    """
    text = fields.get(FIELD)
    if text is None:
        raise Dropped("foreign", f"no {FIELD!r} field (fields: {sorted(fields)[:5]})")
    if len(text) > limit or (not text.isascii() and len(text.encode()) > limit):
        raise Dropped("oversized", f"{len(text)} characters, more than the limit of {limit} bytes")
    try:
        envelope = json.loads(text)
    except ValueError:
        raise Dropped("malformed", "not JSON") from None
    if not isinstance(envelope, dict):
        raise Dropped("malformed", f"a JSON {type(envelope).__name__}, not an object")
    if envelope.get("v") != VERSION:
        raise Dropped("foreign", f"envelope version {str(envelope.get('v'))[:20]!r}, not {VERSION}")
    try:
        parts = envelope["id"], envelope["origin"], envelope["reply"], envelope["t"], envelope["body"]
    except KeyError as missing:
        raise Dropped("malformed", f"no {missing} in the envelope") from None
    message_id, origin, reply, sent, body = parts
    if not (isinstance(message_id, str) and isinstance(origin, str) and isinstance(reply, str)):
        raise Dropped("malformed", "id, origin and reply must be strings")
    if not isinstance(sent, int | float) or isinstance(sent, bool):
        raise Dropped("malformed", "t must be a number")
    return Envelope(message_id[:100], origin[:200], reply, float(sent), body)
