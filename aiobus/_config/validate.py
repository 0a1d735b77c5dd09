"""Read a service file into a :class:`ServiceSpec`, collecting every problem on the way.

Nothing here starts anything: a file with problems gives the complete list of them (one
line each, naming the file, the table and key, or the line), and no spec.
"""

from __future__ import annotations

import functools
import os
import re
import shlex
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .envfile import read_env_file
from .schema import BROKER, GROUP, PROGRAM, READY, SERVICE, STRING_TABLE, TOP, Key, Section, did_you_mean

_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


class ConfigError(Exception):
    """A service file cannot run: ``problems`` are its lines, each naming the file."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass
class ChildSpec:
    """A program or a broker of the file: ``kwargs`` are its constructor's keywords."""

    kind: str  # "program" or "broker"
    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    argv: list[str] = field(default_factory=list)
    target: str = ""  # a broker's function
    ready: tuple[str, dict[str, Any]] | None = None  # ("port" or "line", the check's keywords)
    live: tuple[str, dict[str, Any]] | None = None  # the liveness check, the same way


@dataclass
class GroupSpec:
    name: str
    children: list[str]
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class ServiceSpec:
    """A valid service file: what :func:`aiobus._config.build.build` makes on a bus."""

    path: str
    settings: dict[str, Any] = field(default_factory=dict)  # the [service] keys, as command-line settings
    files: list[str] = field(default_factory=list)  # the file and the environment files it reads
    groups: list[GroupSpec] = field(default_factory=list)
    children: list[ChildSpec] = field(default_factory=list)
    setup: str | None = None


class _Checker:
    """Collects problems, each prefixed with the file's name."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.folder = os.path.dirname(os.path.abspath(path))
        self.problems: list[str] = []

    def problem(self, where: str, message: str, key: str = "") -> None:
        """Record ``message`` about ``where`` (a table, such as ``[programs.web]``) and its ``key``."""
        place = f"{where} {key}" if where and key else where or key
        self.problems.append(f"{self.path}: {place}: {message}" if place else f"{self.path}: {message}")

    def resolve(self, path: str) -> str:
        """A path of the file: relative ones are relative to the file's folder."""
        return os.path.join(self.folder, os.path.expanduser(path))

    def table(self, table: Mapping[str, Any], section: Section, where: str) -> dict[str, Any]:
        """Check ``table``'s keys against ``section``; return the converted values of the good ones."""
        names = [key.name for key in section.keys if key.pending is None]
        values: dict[str, Any] = {}
        for name, value in table.items():
            key = section.key(name)
            if key is None:
                self.problem(where, f"unknown key{did_you_mean(name, names)}", name)
            elif key.pending is not None:
                self.problem(where, f"not supported yet ({key.pending})", name)
            elif key.kind is STRING_TABLE and isinstance(value, dict) and not key.kind.accepts(value):
                for item, text in value.items():
                    if not isinstance(text, str):
                        self.problem(where, f"expected a string, got {_describe(text, key)}", f"{name}.{item}")
            elif not key.kind.accepts(value):
                self.problem(where, f"expected {key.kind.name}, got {_describe(value, key)}", name)
            else:
                try:
                    values[name] = key.convert(value) if key.convert is not None else value
                except ValueError as error:
                    self.problem(where, str(error), name)
        for key in section.keys:
            if key.required and key.name not in table:
                self.problem(where, f"missing required key {key.name!r}")
        return values

    def named_tables(self, data: Mapping[str, Any], kind: str) -> dict[str, Mapping[str, Any]]:
        """The ``[kind.NAME]`` tables."""
        tables: dict[str, Mapping[str, Any]] = {}
        for name, table in data.get(kind, {}).items():
            if not isinstance(table, dict):
                self.problem(f"[{kind}]", f"expected a table, got {_describe(table, None)}", name)
            elif not _NAME.fullmatch(name):
                self.problem(f"[{kind}.{name}]", "a name is letters, digits, '_', '.' and '-'")
            else:
                tables[name] = table
        return tables


def _describe(value: object, key: Key | None) -> str:
    kind = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list", dict: "a table"}
    described = kind.get(type(value), type(value).__name__)
    if (key is not None and key.secret) or isinstance(value, dict | list):
        return described
    text = repr(value)
    return f"{described}, {text[:40] + '…' if len(text) > 40 else text}"


def read_toml(path: str) -> tuple[dict[str, Any] | None, str | None]:
    """The file's data, or the problem reading it (one line)."""
    try:
        with open(path, "rb") as file:
            return tomllib.load(file), None
    except FileNotFoundError:
        return None, f"{path}: no such file"
    except tomllib.TOMLDecodeError as error:
        message = str(error)
        found = re.search(r"\s*\(at line (\d+), column (\d+)\)$", message)
        if found:
            return None, f"{path}:{found[1]}: invalid TOML: {message[: found.start()]} (column {found[2]})"
        return None, f"{path}: invalid TOML: {message}"
    except UnicodeDecodeError:
        return None, f"{path}: invalid TOML: not UTF-8 text"
    except OSError as error:
        return None, f"{path}: cannot read the file: {error.strerror}"


def load_service(path: str, environ: Mapping[str, str] | None = None) -> ServiceSpec:
    """Read and check a TOML service file (and the environment files it names).

    Args:
        path: the file; relative paths in it are relative to its folder.
        environ: the environment programs inherit and ``${NAME}`` reads (``os.environ``).

    Raises:
        ConfigError: with every problem found.
    """
    data, problem = read_toml(path)
    if data is None:
        raise ConfigError([problem or f"{path}: cannot be read"])
    return check_service(data, path, os.environ if environ is None else environ)


def check_service(data: Mapping[str, Any], path: str, environ: Mapping[str, str]) -> ServiceSpec:
    """Check parsed TOML data; see :func:`load_service`."""
    checker = _Checker(path)
    top = checker.table(data, TOP, "")
    spec = ServiceSpec(path, setup=top.get("setup"), files=[os.path.abspath(path)])
    service = checker.table(top.get("service", {}), SERVICE, "[service]")
    spec.settings = _kwargs(service, SERVICE)
    for setting in ("pidfile", "control"):
        if setting in spec.settings:
            spec.settings[setting] = checker.resolve(spec.settings[setting])
    for name, table in checker.named_tables(top, "programs").items():
        spec.children.append(_program(checker, name, table, environ, spec.files))
    for name, table in checker.named_tables(top, "brokers").items():
        values = checker.table(table, BROKER, f"[brokers.{name}]")
        target = values.pop("target", "")
        spec.children.append(ChildSpec("broker", name, _kwargs(values, BROKER), target=target))
    programs = {child.name for child in spec.children if child.kind == "program"}
    for child in spec.children:
        if child.kind == "broker" and child.name in programs:
            checker.problem(f"[brokers.{child.name}]", "a program has this name too: names must differ")
    names = [child.name for child in spec.children]
    member_of: dict[str, str] = {}
    for name, table in checker.named_tables(top, "groups").items():
        where = f"[groups.{name}]"
        values = checker.table(table, GROUP, where)
        members = values.pop("children", [])
        for member in members:
            if member not in names:
                checker.problem(
                    where, f"no program or broker named {member!r}{did_you_mean(member, names)}", "children"
                )
            elif member in member_of:
                checker.problem(where, f"{member!r} is in group {member_of[member]!r} already", "children")
            else:
                member_of[member] = name
        spec.groups.append(GroupSpec(name, members, _kwargs(values, GROUP)))
    if checker.problems:
        raise ConfigError(checker.problems)
    return spec


def _kwargs(values: Mapping[str, Any], section: Section) -> dict[str, Any]:
    """The values of the keys that map straight to a keyword argument."""
    keys = {key.name: key.kwarg for key in section.keys if key.kwarg is not None}
    return {keys[name]: value for name, value in values.items() if name in keys}


def _program(
    checker: _Checker, name: str, table: Mapping[str, Any], environ: Mapping[str, str], read: list[str]
) -> ChildSpec:
    where = f"[programs.{name}]"
    values = checker.table(table, PROGRAM, where)
    child = ChildSpec("program", name, _kwargs(values, PROGRAM))
    if "cwd" in child.kwargs:
        child.kwargs["cwd"] = checker.resolve(child.kwargs["cwd"])
    if "command" in table and "argv" in table:
        checker.problem(where, "give command or argv, not both")
    elif "command" in values:
        try:
            child.argv = shlex.split(values["command"])
        except ValueError as error:
            checker.problem(where, str(error).lower(), "command")
        else:
            if not child.argv:
                checker.problem(where, "expected a command line, got an empty one", "command")
    elif "argv" in values:
        child.argv = values["argv"]
        if not child.argv:
            checker.problem(where, "expected the program and its arguments, got an empty list", "argv")
    elif "command" not in table and "argv" not in table:
        checker.problem(where, "missing required key 'command' (or 'argv')")
    if "ready" in values:
        child.ready = _ready(checker, values["ready"], f"[programs.{name}.ready]")
    if "liveness" in values:
        child.live = _ready(checker, values["liveness"], f"[programs.{name}.liveness]")
    if "base_port" in values:
        if "instances" not in values:
            checker.problem(where, "goes with instances", "base_port")
        base = values["base_port"]
        child.kwargs["names"] = functools.partial(_port_names, base)
    if "env" in values or "env_file" in values:
        env = dict(environ)
        files = values.get("env_file", [])
        for file in [files] if isinstance(files, str) else files:
            env_path = os.path.join(os.path.dirname(checker.path), file)
            found, problems = read_env_file(env_path, environ)
            read.append(os.path.abspath(env_path))
            checker.problems += [f"{problem} (the env_file of {where})" for problem in problems]
            env.update(found)
        env.update(values.get("env", {}))
        child.kwargs["env"] = env
    return child


def _port_names(base: int, index: int) -> dict[str, object]:
    return {"port": base + index}


def _ready(checker: _Checker, table: Mapping[str, Any], where: str) -> tuple[str, dict[str, Any]] | None:
    values = checker.table(table, READY, where)
    if ("port" in table) == ("line" in table):
        checker.problem(where, "give port or line (one of them)")
        return None
    kind, others = ("port", ("line", "stream")) if "port" in table else ("line", ("port", "host", "interval"))
    for other in others:
        if other in table:
            checker.problem(where, f"goes with {'line' if kind == 'port' else 'port'}, not {kind}", other)
    if kind == "line" and "line" in values:
        try:
            re.compile(values["line"])
        except re.error as error:
            checker.problem(where, f"not a regular expression: {error}", "line")
    return kind, _kwargs(values, READY)
