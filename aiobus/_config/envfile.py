"""Environment files: ``KEY=VALUE`` lines, as a service's programs read them.

The syntax, a common subset of what docker compose, systemd and python-dotenv accept:

- one ``KEY=VALUE`` per line; a key is letters, digits and ``_``, not starting with a digit;
  an ``export `` prefix is allowed (so that a shell can ``source`` the file too);
- blank lines, and lines whose first character other than blanks is ``#``, are skipped;
- a value without quotes is stripped of its blanks, and a ``#`` after a blank starts a comment;
- ``'single quotes'`` keep everything between them as it is;
- ``"double quotes"`` understand ``\\"``, ``\\\\``, ``\\$``, ``\\n`` and ``\\t``;
- ``${NAME}`` (outside single quotes) is replaced by a key defined above it in the file, else by
  the service's environment; ``${NAME:-default}`` gives a default when neither has it. A name
  defined nowhere, with no default, is an error: a missing secret should not become an empty one.

Values are never shown in a message (they hold secrets): errors name the file, the line and
the problem only.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_ESCAPES = {'"': '"', "\\": "\\", "$": "$", "n": "\n", "t": "\t"}


@dataclass(frozen=True)
class EnvProblem:
    """A line of an environment file that does not parse."""

    path: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.message}"


class _LineError(Exception):
    pass


def parse_env(text: str, path: str, environ: Mapping[str, str]) -> tuple[dict[str, str], list[EnvProblem]]:
    """Parse the text of an environment file.

    Args:
        text: the file's text.
        path: the file's name, for the problems.
        environ: the service's environment, for ``${NAME}``.

    Returns:
        The variables (in the file's order; a key given twice keeps its last value) and the
        problems, one per line that does not parse (empty if all do).
    """
    values: dict[str, str] = {}
    problems: list[EnvProblem] = []
    for number, line in enumerate(text.splitlines(), start=1):
        try:
            parsed = _parse_line(line, values, environ)
        except _LineError as error:
            problems.append(EnvProblem(path, number, str(error)))
            continue
        if parsed is not None:
            values[parsed[0]] = parsed[1]
    return values, problems


def read_env_file(path: str, environ: Mapping[str, str]) -> tuple[dict[str, str], list[EnvProblem]]:
    """:func:`parse_env` on a file; a file that cannot be read is a problem at its line 0."""
    try:
        with open(path, encoding="utf-8") as file:
            text = file.read()
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else type(error).__name__
        if isinstance(error, UnicodeDecodeError):
            reason = "not UTF-8 text"
        return {}, [EnvProblem(path, 0, f"cannot read the environment file: {reason}")]
    return parse_env(text, path, environ)


def _parse_line(line: str, defined: Mapping[str, str], environ: Mapping[str, str]) -> tuple[str, str] | None:
    stripped = line.strip()
    if not stripped or stripped.startswith("#"):
        return None
    if stripped.startswith("export") and stripped[6:7] in (" ", "\t"):
        stripped = stripped[6:].lstrip()
    key, sep, rest = stripped.partition("=")
    key = key.rstrip()
    if not sep:
        raise _LineError("expected KEY=VALUE (no '=' on the line)")
    if not _KEY.fullmatch(key):
        raise _LineError("expected KEY=VALUE, where KEY is letters, digits and '_', not starting with a digit")
    rest = rest.lstrip()
    if rest.startswith("'"):
        end = rest.find("'", 1)
        if end < 0:
            raise _LineError(f"{key}: the single quote is not closed on this line")
        value, after = rest[1:end], rest[end + 1 :]
    elif rest.startswith('"'):
        value, after = _double_quoted(key, rest, defined, environ)
    else:
        comment = re.search(r"\s#", rest)
        value = (rest[: comment.start()] if comment else rest).strip()
        value, after = _expand(key, value, defined, environ), ""
    after = after.strip()
    if after and not after.startswith("#"):
        raise _LineError(f"{key}: unexpected text after the closing quote")
    return key, value


def _double_quoted(key: str, rest: str, defined: Mapping[str, str], environ: Mapping[str, str]) -> tuple[str, str]:
    """The value of a double-quoted ``rest`` (escapes and ``${NAME}`` done) and what follows it."""
    parts: list[str] = []
    chunk: list[str] = []
    index = 1
    while index < len(rest):
        char = rest[index]
        if char == "\\" and index + 1 < len(rest) and rest[index + 1] in _ESCAPES:
            parts.append(_expand(key, "".join(chunk), defined, environ))
            parts.append(_ESCAPES[rest[index + 1]])
            chunk = []
            index += 2
            continue
        if char == '"':
            parts.append(_expand(key, "".join(chunk), defined, environ))
            return "".join(parts), rest[index + 1 :]
        chunk.append(char)
        index += 1
    raise _LineError(f"{key}: the double quote is not closed on this line")


_REFERENCE = re.compile(r"\$\{([^}]*)\}")


def _expand(key: str, text: str, defined: Mapping[str, str], environ: Mapping[str, str]) -> str:
    def replace(match: re.Match[str]) -> str:
        name, colon, default = match.group(1).partition(":-")
        if not _KEY.fullmatch(name):
            raise _LineError(f"{key}: ${{{match.group(1)}}} is not a variable name")
        if name in defined:
            return defined[name]
        if name in environ:
            return environ[name]
        if colon:
            return default
        raise _LineError(f"{key}: ${{{name}}} is not set (neither above in the file nor in the environment)")

    if "${" in text and "}" not in text[text.index("${") :]:
        raise _LineError(f"{key}: '${{' without a closing '}}'")
    return _REFERENCE.sub(replace, text)
