"""The control socket's protocol, shared by the server (ControlSocket) and the client (``aiobus ctl``).

JSON lines over a Unix stream socket: one request per line, one reply per line, in order.
Every line carries ``"v": 1``. Nothing else is ever decoded from the socket (no pickle).

Request: ``{"v": 1, "cmd": "restart", "args": {"name": "web"}}`` (``args`` may be left out
when a command takes none; an ``id`` of any JSON value is echoed in the reply).
Reply: ``{"v": 1, "ok": true, "result": {...}}`` or ``{"v": 1, "ok": false, "error": CODE,
"message": "..."}``. After the reply to ``tail``, the server sends ``{"v": 1, "event": {...}}``
lines until the client closes the connection (or is cut for not reading).
"""

from __future__ import annotations

import enum
import logging
import signal
from dataclasses import dataclass, field
from typing import Any, Final

VERSION: Final = 1
#: The longest request line, in bytes (its newline aside).
MAX_REQUEST: Final = 64 * 1024

#: The log levels ``log-level`` and ``tail`` know, by name.
LEVELS: Final = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}


class ErrorCode(enum.StrEnum):
    """Why a request was not done: the ``error`` of a failed reply."""

    BAD_REQUEST = "bad_request"  # not JSON, not an object, a wrong version or field
    TOO_LARGE = "too_large"  # a line over MAX_REQUEST bytes
    UNKNOWN_COMMAND = "unknown_command"
    BAD_ARGUMENT = "bad_argument"  # an unknown, missing or malformed argument
    UNKNOWN_CHILD = "unknown_child"
    FAILED = "failed"  # the command was tried and did not succeed
    REFUSED = "refused"  # the peer's uid is not allowed, or too many clients


@dataclass(frozen=True)
class Command:
    """A command: its name, its required and optional arguments (all strings)."""

    name: str
    required: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()
    help: str = ""
    arguments: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "arguments", self.required + self.optional)


COMMANDS: Final = {
    command.name: command
    for command in (
        Command("status", help="bus state, pid and uptime, and a table of the children"),
        Command("start", ("name",), help="start a child; returns once it is running"),
        Command("stop", ("name",), help="stop a child; returns once it is stopped"),
        Command("restart", ("name",), help="stop a child, then start it; returns once it is running"),
        Command("signal", ("name", "signal"), help="send a signal to a child (a program's whole group)"),
        Command("graceful", help="publish graceful (programs get their reload_signal)"),
        Command("exit", help="exit the service; returns once the bus is EXITING"),
        Command("log-level", ("level",), help="change the level of the service's log"),
        Command(
            "tail",
            (),
            ("name", "level"),
            help="stream log events (all, or one child's; at the log's level, or --level) until Ctrl-C",
        ),
    )
}


class RequestError(Exception):
    """A request that cannot be done: its error code and a message naming the problem."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def error_reply(error: RequestError, request_id: Any = None) -> dict[str, Any]:
    reply: dict[str, Any] = {"v": VERSION, "ok": False, "error": str(error.code), "message": error.message}
    if request_id is not None:
        reply["id"] = request_id
    return reply


def ok_reply(result: dict[str, Any], request_id: Any = None) -> dict[str, Any]:
    reply: dict[str, Any] = {"v": VERSION, "ok": True, "result": result}
    if request_id is not None:
        reply["id"] = request_id
    return reply


@dataclass(frozen=True)
class Request:
    command: Command
    args: dict[str, str]
    id: Any = None


def parse_request(obj: object) -> Request:
    """Check a decoded request line.

    Raises:
        RequestError: what is wrong with it, by name.
    """
    if not isinstance(obj, dict):
        raise RequestError(ErrorCode.BAD_REQUEST, f"a request is a JSON object, not {type(obj).__name__}")
    unknown = sorted(set(obj) - {"v", "cmd", "args", "id"})
    if unknown:
        raise RequestError(ErrorCode.BAD_REQUEST, f"unknown field(s) {', '.join(map(repr, unknown))} in the request")
    if obj.get("v") != VERSION:
        raise RequestError(
            ErrorCode.BAD_REQUEST, f"unsupported protocol version {obj.get('v')!r}: this service speaks v {VERSION}"
        )
    name = obj.get("cmd")
    command = COMMANDS.get(name) if isinstance(name, str) else None
    if command is None:
        raise RequestError(
            ErrorCode.UNKNOWN_COMMAND, f"unknown command {name!r}; the commands are: {', '.join(COMMANDS)}"
        )
    args = obj.get("args", {})
    if not isinstance(args, dict):
        raise RequestError(ErrorCode.BAD_ARGUMENT, f"args must be a JSON object, not {type(args).__name__}")
    extra = sorted(set(args) - set(command.arguments))
    if extra:
        takes = ", ".join(command.arguments) or "no argument"
        raise RequestError(
            ErrorCode.BAD_ARGUMENT, f"{command.name} has no argument {', '.join(map(repr, extra))} (it takes {takes})"
        )
    for key in command.required:
        if key not in args:
            raise RequestError(ErrorCode.BAD_ARGUMENT, f"{command.name} needs the argument {key!r}")
    for key, value in args.items():
        if not isinstance(value, str) or not value:
            raise RequestError(ErrorCode.BAD_ARGUMENT, f"argument {key!r} must be a non-empty string, not {value!r}")
    return Request(command, dict(args), obj.get("id"))


def parse_signal(text: str) -> signal.Signals:
    """``HUP``, ``SIGHUP``, ``hup`` or ``1``: the signal.

    Raises:
        RequestError: no such signal.
    """
    name = text.upper()
    try:
        return (
            signal.Signals(int(name))
            if name.isdigit()
            else signal.Signals[name if name.startswith("SIG") else "SIG" + name]
        )
    except (KeyError, ValueError):
        raise RequestError(ErrorCode.BAD_ARGUMENT, f"unknown signal {text!r} (such as HUP, SIGUSR1 or 10)") from None


def parse_level(text: str) -> int:
    level = LEVELS.get(text.lower())
    if level is None:
        raise RequestError(ErrorCode.BAD_ARGUMENT, f"unknown level {text!r}; the levels are: {', '.join(LEVELS)}")
    return level


def level_name(level: int) -> str:
    for name, number in LEVELS.items():
        if number == level:
            return name
    return str(level)
