"""The ``aiobus`` command's side of service files: ``run --config/--procfile`` and ``check``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from .._bus import Bus
from .._exitcodes import ExitCode
from .build import Service, build, import_functions
from .validate import ConfigError, ServiceSpec, load_service


def add_file_arguments(commands: Any, run: argparse.ArgumentParser) -> None:
    """Add ``--config`` and ``--procfile`` to ``run``, and the ``check`` command."""
    files = run.add_mutually_exclusive_group()
    files.add_argument(
        "--config", metavar="FILE", help="run the service declared in a TOML file (aiobus.toml); see README"
    )
    files.add_argument("--procfile", metavar="FILE", help="run one program per line of a Procfile (NAME: COMMAND)")
    check = commands.add_parser(
        "check",
        help="check a service file (--config or --procfile) and report every problem in it",
        description=(
            "Read a service file and the environment files it names, import its targets, and report every "
            "problem, one line each, naming the file and the table and key or the line. Starts nothing."
        ),
        epilog="Exit codes: 0 when the file is valid (a summary on stdout); 2 when it is not (the problems on stderr).",
    )
    required = check.add_mutually_exclusive_group(required=True)
    required.add_argument("--config", metavar="FILE", help="a TOML service file")
    required.add_argument("--procfile", metavar="FILE", help="a Procfile")


def file_arguments(
    parser: argparse.ArgumentParser, args: argparse.Namespace, argv: Sequence[str]
) -> tuple[argparse.Namespace, ServiceSpec]:
    """Load the file that ``args`` names: the run's settings (the file's ``[service]`` under the flags
    given in ``argv``) and the file's spec. ``aiobus check`` ends here, with its exit code.

    Raises:
        SystemExit: after ``check``, or with code 2 and a line per problem if the file has any.
    """
    defaults = vars(parser.parse_args(["run", "--config", "-"]))
    if args.command == "check":
        raise SystemExit(check_command(args, defaults))
    try:
        spec = _load(args)
        if args.target is not None and spec.setup is not None:
            raise ConfigError([f"{spec.path}: setup: give TARGET or the file's setup, not both"])
    except ConfigError as error:
        _exit(error.problems)
    if args.target is not None:
        spec.setup = args.target
    return _merge(args, defaults, spec, argv), spec


def load_for_run(spec: ServiceSpec) -> Service:
    """Import the file's functions and make its objects once on a throwaway bus, so that every
    problem is found before anything starts.

    Raises:
        SystemExit: with code 2 and a line per problem.
        Exception: what importing a target's module raised (a bug in it, not in the file).
    """
    try:
        service = import_functions(spec)
        build(Bus(), service, subscribe=False)
    except ConfigError as error:
        _exit(error.problems)
    return service


def check_command(args: argparse.Namespace, defaults: dict[str, Any]) -> int:
    """``aiobus check``: every problem of the file on stderr (code 2), or a summary on stdout (code 0)."""
    from .._cli import make_plugins

    try:
        spec = _load(args)
    except ConfigError as error:
        return _report(error.problems)
    problems: list[str] = []
    try:
        make_plugins(Bus(), _merge(argparse.Namespace(**{**defaults, **vars(args)}), defaults, spec))
    except ImportError as error:
        problems.append(f"{spec.path}: [service] reload: {error}")
    except (ValueError, TypeError, OSError) as error:
        problems.append(f"{spec.path}: [service]: {error}")
    try:
        build(Bus(), import_functions(spec, broken_is_problem=True), subscribe=False)
    except ConfigError as error:
        problems += error.problems
    if problems:
        return _report(problems)
    programs = sum(child.kind == "program" for child in spec.children)
    counts = [(programs, "program"), (len(spec.children) - programs, "broker"), (len(spec.groups), "group")]
    sys.stdout.write(f"{spec.path}: OK: {', '.join(f'{n} {noun}' + ('' if n == 1 else 's') for n, noun in counts)}\n")
    return ExitCode.OK


def _load(args: argparse.Namespace) -> ServiceSpec:
    if args.procfile is not None:
        from .procfile import load_procfile

        return load_procfile(args.procfile)
    return load_service(args.config)


def _merge(
    args: argparse.Namespace, defaults: dict[str, Any], spec: ServiceSpec, argv: Sequence[str] = ()
) -> argparse.Namespace:
    """``args`` with the file's ``[service]`` settings wherever no flag was given: a flag counts as given
    if it is in ``argv`` (``--log-level`` for ``log_level``) or its value is not its default."""
    merged = argparse.Namespace(**vars(args))
    for name, value in spec.settings.items():
        flag = "--" + name.replace("_", "-")
        given = any(arg == flag or arg.startswith(flag + "=") for arg in argv)
        if not given and getattr(args, name, None) == defaults.get(name):
            setattr(merged, name, value)
    merged.target = spec.setup or spec.path
    merged.watch = spec.files  # with reload: a change to the file (or an env file) restarts the service
    return merged


def _report(problems: list[str]) -> int:
    sys.stderr.write("".join(f"aiobus: error: {problem}\n" for problem in problems))
    return ExitCode.USAGE


def _exit(problems: list[str]) -> NoReturn:
    raise SystemExit(_report(problems))
