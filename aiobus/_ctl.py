"""``aiobus ctl``: steer a running service through its control socket (``aiobus run --control PATH``).

A plain blocking client: one connection, one request (a JSON line), one reply; ``tail``
then reads events until Ctrl-C. Tables for people, one JSON document (JSON lines for
``tail``) with ``--json``.

Exit codes: 0 done; 1 refused or failed (the reason on stderr, one line); 2 a bad command
line; 3 nothing listens at the socket (the service is not running), as LSB's ``status``
says. Never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import struct
import sys
import time
from collections.abc import Callable
from typing import Any, Final, TextIO

from ._exitcodes import ExitCode
from ._seconds import check_seconds
from .plugins._control_protocol import COMMANDS, LEVELS, MAX_REQUEST, VERSION, RequestError, parse_signal

#: Seconds a reply may take by default (a restart waits for the child to be ready).
TIMEOUT: Final = 60.0
#: The longest reply or event line read, in bytes.
MAX_LINE: Final = 16 * 2**20

EPILOG = (
    "Exit codes: 0 done; 1 refused or failed; 2 a bad command line; 3 nothing listens at the socket "
    "(the service is not running)."
)


class CtlError(Exception):
    """The command did not succeed: a message for stderr, and the exit code."""

    def __init__(self, message: str, code: int = ExitCode.FAILURE) -> None:
        super().__init__(message)
        self.code = code


def _timeout(text: str) -> float:
    try:
        return check_seconds("--timeout", float(text), positive=True)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive finite number of seconds, not {text!r}") from None


def _signal_arg(text: str) -> str:
    try:
        parse_signal(text)
    except RequestError as error:
        raise argparse.ArgumentTypeError(error.message) from None
    return text


def add_ctl_parser(commands: Any, parser_class: type[argparse.ArgumentParser]) -> None:
    """Add ``ctl`` and its commands to the ``aiobus`` command's subparsers."""
    common = parser_class(add_help=False)
    common.add_argument("--socket", metavar="PATH", default=argparse.SUPPRESS, help="the service's control socket")
    common.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="print JSON (JSON lines for tail)"
    )
    common.add_argument(
        "--timeout",
        metavar="SECONDS",
        type=_timeout,
        default=argparse.SUPPRESS,
        help=f"seconds to wait for the reply (default: {TIMEOUT:g})",
    )
    ctl = commands.add_parser(
        "ctl",
        parents=[common],
        help="steer a running service through its control socket (aiobus run --control PATH)",
        description="Steer a running service through its control socket: "
        + "; ".join(f"{command.name}: {command.help}" for command in COMMANDS.values()),
        epilog=EPILOG,
    )
    actions = ctl.add_subparsers(dest="ctl_command", metavar="COMMAND", required=True, parser_class=parser_class)
    for command in COMMANDS.values():
        sub = actions.add_parser(
            command.name, parents=[common], help=command.help, description=command.help, epilog=EPILOG
        )
        if command.name == "signal":
            sub.add_argument("name", metavar="NAME", help="the child")
            sub.add_argument("signal", metavar="SIG", type=_signal_arg, help="a signal: HUP, SIGUSR1, 10...")
        elif command.name == "log-level":
            sub.add_argument("level", metavar="LEVEL", choices=tuple(LEVELS), help=", ".join(LEVELS))
        elif command.name == "tail":
            sub.add_argument("name", metavar="NAME", nargs="?", help="only this child's events")
            sub.add_argument(
                "--level", choices=tuple(LEVELS), help="the lowest level streamed (default: the service's log level)"
            )
        else:
            for arg in command.required:
                sub.add_argument(arg, metavar=arg.upper(), help="the child (or pool)")


def run_ctl(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Run the ``ctl`` command of ``args``; return the exit code (nothing raised, Ctrl-C included)."""
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    path = getattr(args, "socket", None)
    if not path:
        err.write("aiobus ctl: error: --socket PATH is required (see --help)\n")
        return ExitCode.USAGE
    as_json = getattr(args, "json", False)
    command = COMMANDS[args.ctl_command]
    request_args = {key: getattr(args, key) for key in command.arguments if getattr(args, key, None) is not None}
    request = {"v": VERSION, "cmd": command.name, "args": request_args}
    try:
        with _connect(path, getattr(args, "timeout", TIMEOUT)) as conn:
            reader = conn.makefile("rb")
            conn.sendall(json.dumps(request).encode() + b"\n")
            reply = _read(reader, path)
            if reply is None:
                raise CtlError(f"the service at {path} closed the connection without a reply")
            if as_json and (command.name != "tail" or not reply.get("ok")):
                out.write(json.dumps(reply.get("result") if reply.get("ok") else reply, indent=2) + "\n")
            if not reply.get("ok"):
                raise CtlError(str(reply.get("message") or reply.get("error") or reply))
            if command.name == "tail":
                conn.settimeout(None)
                return _tail(reader, path, out, err, as_json)
            if not as_json:
                out.write(printable(FORMATS[command.name](reply["result"])))
            out.flush()
            return ExitCode.OK
    except CtlError as error:
        err.write(printable(f"aiobus ctl: {error}") + "\n")
        return error.code
    except KeyboardInterrupt:
        err.write("aiobus ctl: interrupted\n")
        return ExitCode.FORCED
    except BrokenPipeError:  # the reader of our output went away (`aiobus ctl tail | head`)
        _quiet(out)
        return ExitCode.OK if command.name == "tail" else ExitCode.FAILURE


def _quiet(out: TextIO) -> None:
    """Point ``out``'s descriptor at /dev/null, so that flushing it at exit raises nothing more."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, out.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


def _connect(path: str, timeout: float) -> socket.socket:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.settimeout(timeout)
    try:
        conn.connect(path)
    except (FileNotFoundError, ConnectionRefusedError):
        conn.close()
        raise CtlError(f"nothing is listening at {path}: the service is not running", ExitCode.NOT_RUNNING) from None
    except TimeoutError:
        conn.close()
        raise CtlError(f"the service at {path} did not accept the connection within {timeout:g} s") from None
    except OSError as error:
        conn.close()
        raise CtlError(f"cannot connect to {path}: {error.strerror or error}") from None
    _, uid, _ = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    me = os.geteuid()
    if me != 0 and uid not in (0, me):
        conn.close()
        raise CtlError(f"the socket at {path} is served by uid {uid}, neither this user ({me}) nor root: not trusted")
    return conn


def _read(reader: Any, path: str) -> dict[str, Any] | None:
    """One line from the service, decoded; None at the end of the connection."""
    try:
        line = reader.readline(MAX_LINE)
    except TimeoutError:
        raise CtlError(f"no reply from the service at {path} in time (see --timeout)") from None
    except OSError as error:
        raise CtlError(f"the connection to {path} failed: {error.strerror or error}") from None
    if not line:
        return None
    try:
        obj = json.loads(line)
    except ValueError:
        raise CtlError(f"the service at {path} sent a line that is not JSON: {line[:80]!r}") from None
    if not isinstance(obj, dict) or obj.get("v") != VERSION:
        raise CtlError(f"the service at {path} does not speak version {VERSION} of the protocol: {line[:80]!r}")
    return obj


def _tail(reader: Any, path: str, out: TextIO, err: TextIO, as_json: bool) -> int:
    """Print events until Ctrl-C (0) or the end of the stream (1)."""
    try:
        while True:
            message = _read(reader, path)
            if message is None:
                raise CtlError(f"the stream ended: the service at {path} exited, or cut this client")
            event = message.get("event")
            if not isinstance(event, dict):
                continue
            out.write(json.dumps(event) + "\n" if as_json else printable(_event_line(event)))
            out.flush()
    except KeyboardInterrupt:
        return ExitCode.OK


# -- output for people ----------------------------------------------------------------

_CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """``text`` with control characters (terminal escapes among them) shown as ``\\x1b``: what the
    service sends may come from its programs' output, and is not to steer the terminal."""
    return _CONTROLS.sub(lambda match: f"\\x{ord(match.group()):02x}", text)


def duration(seconds: float | None) -> str:
    """``45s``, ``3m 05s``, ``2h 03m``, ``4d 02h``; ``-`` for None."""
    if seconds is None:
        return "-"
    whole = int(seconds)
    if whole < 60:
        return f"{whole}s"
    minutes, secs = divmod(whole, 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h {minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d {hours:02d}h"


def table(rows: list[list[str]]) -> str:
    """Columns aligned on the widest cell, two spaces apart; the last column not padded."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() + "\n" for row in rows
    )


def _last_exit(last: dict[str, Any] | None) -> str:
    return "-" if not last else str(last.get("reason") or "-")


def _status(result: dict[str, Any]) -> str:
    head = f"Bus {result['state']}, pid {result['pid']}, up {duration(result.get('uptime'))}\n"
    children = result.get("children") or []
    if not children:
        return head + "No children.\n"
    rows = [["NAME", "KIND", "STATE", "PID", "UPTIME", "RESTARTS", "LAST EXIT"]]
    for child in children:
        rows.append(
            [
                str(child["name"]),
                str(child["kind"]),
                str(child["state"]),
                "-" if child.get("pid") is None else str(child["pid"]),
                duration(child.get("uptime")),
                str(child.get("restarts", 0)),
                _last_exit(child.get("last_exit")),
            ]
        )
    return head + "\n" + table(rows)


def _child_line(result: dict[str, Any]) -> str:
    """``web: running, pid 4301``: a line for the child, or for each member of the pool."""
    lines = []
    for child in result["children"] if "children" in result else [result["child"]]:
        pid = "" if child.get("pid") is None else f", pid {child['pid']}"
        lines.append(f"{child['name']}: {child['state']}{pid}\n")
    return "".join(lines)


def _pids(pid: Any) -> str:
    return ", ".join(map(str, pid)) if isinstance(pid, list) else str(pid)


def _event_line(event: dict[str, Any]) -> str:
    fields = event.get("fields") if isinstance(event.get("fields"), dict) else {}
    assert isinstance(fields, dict)
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(event.get("time") or 0)))
    name = str(fields.get("child") or "aiobus")
    extra = " ".join(f"{k}={v}" for k, v in fields.items() if k not in ("child", "traceback"))
    line = f"[{stamp}] {name:<7} {str(event.get('level', '')).upper():<7} {event.get('message', '')}"
    if extra:
        line += "  " + extra
    if fields.get("traceback"):
        line += "\n" + str(fields["traceback"]).rstrip()
    return line + "\n"


FORMATS: Final[dict[str, Callable[[dict[str, Any]], str]]] = {
    "status": _status,
    "start": _child_line,
    "stop": _child_line,
    "restart": _child_line,
    "signal": lambda result: f"{result['signal']} sent to {result['name']} (pid {_pids(result['pid'])})\n",
    "graceful": lambda result: "Graceful published.\n",
    "exit": lambda result: f"The service is {result['state']}.\n",
    "log-level": lambda result: f"Log level: {result['level']} (was {result['previous']}).\n",
    "tail": lambda result: "",
}

assert set(FORMATS) == set(COMMANDS)
assert MAX_REQUEST < MAX_LINE
