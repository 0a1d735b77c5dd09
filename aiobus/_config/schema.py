"""The keys of a service file, one declarative table per section.

Each :class:`Key` says what a key accepts (its :class:`Kind`), how its value becomes the
argument of the object the section builds (``convert``, then ``kwarg``), and what the
README's table says of it. The validator (``validate.py``) and the README's table of keys
(:func:`keys_table`) both read these tables, so they cannot disagree.

A key whose feature has not landed yet has ``pending`` set: the file is refused with
"not supported yet". Once the feature lands, its line gets a ``kwarg`` instead (and a
``convert`` if it needs one); nothing else changes.
"""

from __future__ import annotations

import difflib
import math
import re
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .._supervision import Restart, Strategy


@dataclass(frozen=True)
class Kind:
    """A TOML type, as messages and the README name it, and its check."""

    name: str
    accepts: Callable[[object], bool]


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


STRING = Kind("a string", lambda value: isinstance(value, str))
INTEGER = Kind("an integer", _is_int)
NUMBER = Kind("a number", _is_number)
BOOLEAN = Kind("a boolean", lambda value: isinstance(value, bool))
TABLE = Kind("a table", lambda value: isinstance(value, dict))
STRINGS = Kind("a list of strings", lambda value: isinstance(value, list) and all(isinstance(v, str) for v in value))
STRING_TABLE = Kind(
    "a table of strings", lambda value: isinstance(value, dict) and all(isinstance(v, str) for v in value.values())
)
STRING_OR_STRINGS = Kind("a string or a list of strings", lambda value: STRING.accepts(value) or STRINGS.accepts(value))
STRING_OR_INTEGER = Kind("a string or an integer", lambda value: isinstance(value, str) or _is_int(value))
ANYTHING = Kind("anything", lambda value: True)


@dataclass(frozen=True)
class Key:
    """A key of a section.

    Args:
        name: the key, as written in the file.
        kind: what it accepts.
        doc: what it means, for the README's table.
        default: the default, as the README shows it ("" for none).
        kwarg: the keyword argument (or command-line setting, for ``[service]``) it becomes;
            None when the loader handles the key itself.
        convert: turns a value of the right kind into the argument; raises ValueError with
            the problem (the message is shown after the key's name).
        required: the section needs it.
        pending: not supported yet: what it waits for.
        secret: its values are never shown in a message.
    """

    name: str
    kind: Kind
    doc: str
    default: str = ""
    kwarg: str | None = None
    convert: Callable[[Any], Any] | None = None
    required: bool = False
    pending: str | None = None
    secret: bool = False


@dataclass(frozen=True)
class Section:
    """A kind of table: ``[service]``, ``[programs.NAME]``..."""

    title: str
    doc: str
    keys: tuple[Key, ...]

    def key(self, name: str) -> Key | None:
        return next((key for key in self.keys if key.name == name), None)


def did_you_mean(word: str, choices: Sequence[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``choices``, or an empty string."""
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


# -- converters: a value of the right kind becomes the argument, or ValueError says why -------


def seconds(value: float) -> float:
    if not 0 <= value < math.inf:
        raise ValueError(f"expected a finite number of seconds >= 0, got {value!r}")
    return float(value)


def positive_seconds(value: float) -> float:
    if not 0 < value < math.inf:
        raise ValueError(f"expected a positive finite number of seconds, got {value!r}")
    return float(value)


def count(value: int) -> int:
    if value < 0:
        raise ValueError(f"expected an integer >= 0, got {value!r}")
    return value


def positive(value: int) -> int:
    if value < 1:
        raise ValueError(f"expected an integer >= 1, got {value!r}")
    return value


def port(value: int) -> int:
    if not 0 < value < 65536:
        raise ValueError(f"expected a TCP port from 1 to 65535, got {value!r}")
    return value


def port_or_template(value: int | str) -> int | str:
    """A port, or a template for a program's instances (such as ``"{port}"``)."""
    if isinstance(value, str):
        if "{" not in value:
            raise ValueError(f'expected a TCP port or a template such as "{{port}}", got {value!r}')
        return value
    return port(value)


def signal_number(value: str) -> int:
    """``"SIGTERM"``, ``"TERM"`` or ``"term"``: the signal's number."""
    bare = value.upper().removeprefix("SIG")
    names = [sig.name[3:] for sig in signal.Signals if sig.name.startswith("SIG") and not sig.name.startswith("SIG_")]
    if bare not in names:
        close = difflib.get_close_matches(bare, names, n=1, cutoff=0.6)
        raise ValueError(f"unknown signal {value!r}" + (f" (did you mean 'SIG{close[0]}'?)" if close else ""))
    return int(signal.Signals["SIG" + bare])


def choice(*choices: str) -> Callable[[str], str]:
    def convert(value: str) -> str:
        if value not in choices:
            listed = ", ".join(repr(c) for c in choices)
            raise ValueError(f"expected one of {listed}, got {value!r}{did_you_mean(value, choices)}")
        return value

    return convert


def umask(value: str | int) -> int:
    """``"027"`` (octal text) or ``0o027`` (a TOML octal integer)."""
    number = (
        value if isinstance(value, int) else int(value, 8) if value.isdigit() and set(value) <= set("01234567") else -1
    )
    if not 0 <= number <= 0o777:
        raise ValueError(f'expected an octal umask within 000..777, such as "027", got {value!r}')
    return number


def target(value: str) -> str:
    module, sep, attribute = value.partition(":")
    if not sep or not module or not attribute:
        raise ValueError(f"expected package.module:function, got {value!r}")
    return value


def non_empty(value: str) -> str:
    if not value:
        raise ValueError("expected a non-empty string")
    return value


SIGNIFICANT = "when it ends for good, the service exits: code 0 if it ended cleanly, 70 otherwise"
RESTARTS = tuple(restart.value for restart in Restart)
STRATEGIES = tuple(strategy.value for strategy in Strategy)
LEVELS = ("debug", "info", "warning", "error")

# -- the sections ------------------------------------------------------------------------------

TOP = Section(
    "top level",
    "The file's own keys.",
    (
        Key(
            "setup",
            STRING,
            "`package.module:function` called as `setup(bus)` or `setup(bus, children)` "
            "(sync or async) once the file's children are subscribed: for what only Python can say",
            convert=target,
        ),
        Key("service", TABLE, "the `[service]` table"),
        Key("groups", TABLE, "the `[groups.NAME]` tables"),
        Key("programs", TABLE, "the `[programs.NAME]` tables"),
        Key("brokers", TABLE, "the `[brokers.NAME]` tables"),
    ),
)

SERVICE = Section(
    "[service]",
    "The bus and the plugins every service wants (a command-line flag given wins over the file).",
    (
        Key("main_interval", NUMBER, "seconds between main ticks", "0.1", "main_interval", positive_seconds),
        Key(
            "stop_timeout",
            NUMBER,
            "seconds each shutdown step may take before it is cut short",
            "no limit",
            "stop_timeout",
            seconds,
        ),
        Key("pid_file", STRING, "write the pid there while running (`PIDFile`)", "", "pidfile", non_empty),
        Key("user", STRING_OR_INTEGER, "switch to this user (name or uid) at start (`DropPrivileges`)", "", "user"),
        Key("group", STRING_OR_INTEGER, "switch to this group (name or gid)", "the user's", "group"),
        Key("umask", STRING_OR_INTEGER, 'the umask set at start, `"027"` or `0o027`', "", "umask", umask),
        Key(
            "reload",
            BOOLEAN,
            "restart when a source file changes (`Autoreloader`, needs `aiobus[reload]`)",
            "false",
            "reload",
        ),
        Key(
            "log_format",
            STRING,
            '`"console"`, `"json"` or `"auto"` (console on a terminal)',
            '"auto"',
            "log_format",
            choice("auto", "console", "json"),
        ),
        Key(
            "log_level", STRING, '`"debug"`, `"info"`, `"warning"` or `"error"`', '"info"', "log_level", choice(*LEVELS)
        ),
        Key(
            "control_socket",
            STRING,
            "serve a control socket there, for `aiobus ctl --socket PATH` (`ControlSocket`)",
            "",
            "control",
            non_empty,
        ),
    ),
)

GROUP = Section(
    "[groups.NAME]",
    "A supervision group (`Supervisor`); children in no group join the bus's default group.",
    (
        Key("children", STRINGS, "the programs and brokers of the group, in start order", "", required=True),
        Key(
            "strategy",
            STRING,
            "`one_for_one`, `one_for_all` or `rest_for_one`",
            '"one_for_one"',
            "strategy",
            choice(*STRATEGIES),
        ),
        Key("max_restarts", INTEGER, "restarts allowed within `within` seconds", "3", "max_restarts", count),
        Key("within", NUMBER, "the window of `max_restarts`, in seconds", "5.0", "within", seconds),
        Key("backoff", NUMBER, "the first delay before a restart, doubled each time", "0.1", "backoff", seconds),
        Key("max_backoff", NUMBER, "the longest delay before a restart", "5.0", "max_backoff", seconds),
    ),
)

PROGRAM = Section(
    "[programs.NAME]",
    "An external program (`Subprocess`). Give `command` or `argv`.",
    (
        Key("command", STRING, "the command line, split as a shell would (`shlex`), without a shell", ""),
        Key("argv", STRINGS, "the program and its arguments; the program is looked up on `PATH`", ""),
        Key("env", STRING_TABLE, "variables set for the program (they win over `env_file`)", "", secret=True),
        Key(
            "env_file",
            STRING_OR_STRINGS,
            "environment files read for the program (later files win; they win over the inherited environment)",
            "",
        ),
        Key("cwd", STRING, "the program's working directory", "the service's", "cwd", non_empty),
        Key("restart", STRING, "`permanent`, `transient` or `temporary`", '"permanent"', "restart", choice(*RESTARTS)),
        Key(
            "stop_signal",
            STRING,
            'the signal that stops it, such as `"SIGINT"` or `"INT"`',
            '"SIGTERM"',
            "stop_signal",
            signal_number,
        ),
        Key("kill_after", NUMBER, "seconds from the stop signal to SIGKILL", "10", "kill_after", seconds),
        Key("ready", TABLE, 'a readiness check: `{ port = 8000 }` or `{ line = "regex" }`', "none"),
        Key("ready_timeout", NUMBER, "seconds the readiness check may take", "30", "ready_timeout", seconds),
        Key("max_line", INTEGER, "the longest line of output kept, in bytes", "65536", "max_line", positive),
        Key(
            "instances",
            INTEGER,
            "N copies, `NAME[0]`...: `{index}`, `{name}` and `{port}` (with `base_port`) are filled in their "
            "command, env, cwd and ready port",
            "one",
            "instances",
            positive,
        ),
        Key("base_port", INTEGER, "with `instances`: `{port}` is this plus the copy's index", "", convert=port),
        Key(
            "liveness",
            TABLE,
            'a liveness check while it runs, as `ready`: `{ port = 8000 }` or `{ line = "regex" }`',
            "none",
        ),
        Key("live_interval", NUMBER, "seconds between two liveness checks", "10", "live_interval", positive_seconds),
        Key(
            "live_failures",
            INTEGER,
            "failed liveness checks in a row before it is stopped and restarted by its policy",
            "3",
            "live_failures",
            positive,
        ),
        Key(
            "reload_signal",
            STRING,
            'sent to its process group on graceful, such as `"SIGHUP"`: a reload instead of a restart',
            "none",
            "reload_signal",
            signal_number,
        ),
        Key("significant", BOOLEAN, SIGNIFICANT, "false", "significant"),
    ),
)

READY = Section(
    "[programs.NAME.ready]",
    "A readiness check (`PortReady` or `LineReady`): give `port` or `line`. A `liveness` table takes the same keys.",
    (
        Key(
            "port",
            STRING_OR_INTEGER,
            'ready once this TCP port answers and belongs to the program (with instances, may be `"{port}"`)',
            "",
            "port",
            port_or_template,
        ),
        Key("host", STRING, "the address the port is checked on (with `port`)", '"127.0.0.1"', "host", non_empty),
        Key("interval", NUMBER, "seconds between two tries (with `port`)", "0.05", "interval", positive_seconds),
        Key("line", STRING, "ready once a line of output matches this regular expression", "", "pattern"),
        Key("stream", STRING, '`"stdout"` or `"stderr"` (with `line`)', "both", "stream", choice("stdout", "stderr")),
    ),
)

BROKER = Section(
    "[brokers.NAME]",
    "A child broker (`ChildBroker`): a Python function run in a child process with a bus of its own.",
    (
        Key("target", STRING, "`package.module:function`, an async `fn(bus, link)`", "", convert=target, required=True),
        Key("restart", STRING, "`permanent`, `transient` or `temporary`", '"permanent"', "restart", choice(*RESTARTS)),
        Key(
            "grace", NUMBER, "seconds the child has to end after its input ends, before SIGTERM", "5", "grace", seconds
        ),
        Key("term_grace", NUMBER, "seconds from SIGTERM to SIGKILL", "2", "term_grace", seconds),
        Key("start_timeout", NUMBER, "seconds the child has to be ready", "30", "start_timeout", seconds),
        Key("send_timeout", NUMBER, "seconds `send()` waits for a child that is down", "10", "send_timeout", seconds),
        Key(
            "hang_timeout",
            NUMBER,
            "seconds without a heartbeat before the child counts as hung",
            "300",
            "hang_timeout",
            positive_seconds,
        ),
        Key("main_interval", NUMBER, "the child's main interval", "the parent's", "main_interval", positive_seconds),
        Key(
            "workers",
            INTEGER,
            "a pool of N processes, `NAME[0]`..., each message to the least busy",
            "one process",
            "workers",
            positive,
        ),
        Key("significant", BOOLEAN, SIGNIFICANT, "false", "significant"),
    ),
)

SECTIONS = (TOP, SERVICE, GROUP, PROGRAM, READY, BROKER)


def keys_table() -> str:
    """The README's table of keys, in Markdown."""
    rows = ["| table | key | type | default | meaning |", "|---|---|---|---|---|"]
    for section in SECTIONS:
        title = f"`{section.title}`" if section.title.startswith("[") else section.title
        for key in section.keys:
            if key.kind is TABLE and section is TOP:
                continue  # the tables below
            kind = re.sub(r"\b(a|an) ", "", key.kind.name)
            default = f"`{key.default}`" if re.match(r"[-\d\"]|false|true", key.default) else key.default
            meaning = f"not supported yet: {key.pending}" if key.pending else key.doc
            if key.required:
                meaning += " (required)"
            rows.append(f"| {title} | `{key.name}` | {kind} | {default} | {meaning} |")
    return "\n".join(rows)
