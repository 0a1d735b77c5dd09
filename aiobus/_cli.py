"""The ``aiobus`` command: run a service's ``setup(bus)`` on a bus, with what every service wants from flags.

``aiobus run package.module:setup`` imports ``setup`` (the current directory comes
first on ``sys.path``, as with ``python -m``; as root, one that everyone may write to
is refused), enters a :class:`~aiobus.Bus`, subscribes a
:class:`~aiobus.plugins.SignalHandler`, a :class:`~aiobus.plugins.SystemdNotifier`
when ``NOTIFY_SOCKET`` is set, and the plugins the flags ask for, calls
``setup(bus)`` (awaited if it returns an awaitable) so that it subscribes the
service's plugins and children, starts the bus, blocks until it exits, and ends the
process with the bus's exit code.

Exit codes: the bus's (0 after a clean shutdown, 70 after a failure, 130 after a
forced shutdown); 2 for a bad command line or target, with one line on stderr.

``aiobus ctl --socket PATH COMMAND`` steers a service run with ``--control PATH``: see
``_ctl`` (its exit codes are its own: 0, 1, 2 and 3).

``aiobus fleet --redis URL OP`` asks the buses bridged through Redis for their state or to
graceful, stop or exit: see ``aiobus.redis.fleet`` (exit codes 0, 1, 2 and 3); imported only
then, so that the rest of the command works without the redis extra.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import logging
import os
import stat
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import anyio
import structlog

from ._bus import Bus
from ._channels import ChannelFailures
from ._ctl import add_ctl_parser, run_ctl
from ._exitcodes import ExitCode
from ._logging import configure_logging
from ._plugin import Plugin
from ._seconds import check_seconds
from ._state import State

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are a single line (no usage block) and exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(ExitCode.USAGE, f"{self.prog}: error: {message} (see --help)\n")


class TargetError(Exception):
    """The target is malformed, cannot be found, or is not callable."""


def _seconds(text: str, *, zero: bool) -> float:
    try:
        value: object = float(text)
    except ValueError:
        value = text
    try:
        return check_seconds("the value", value, positive=not zero)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _positive_seconds(text: str) -> float:
    return _seconds(text, zero=False)


def _seconds_or_zero(text: str) -> float:
    return _seconds(text, zero=True)


def _umask(text: str) -> int:
    try:
        value = int(text, 8)
    except ValueError:
        value = -1
    if not 0 <= value <= 0o777:
        raise argparse.ArgumentTypeError(f"must be octal within 000..777, such as 022, not {text!r}")
    return value


def _id(text: str) -> int | str:
    return int(text) if text.isdigit() else text


def build_parser() -> argparse.ArgumentParser:
    """The ``aiobus`` command's argument parser."""
    parser = _Parser(
        prog="aiobus",
        description="Run a service on an aiobus Bus: signals, PID file, privileges, autoreload and logging from flags.",
        epilog="Exit codes: the bus's (0 clean, 70 failure, 130 forced); 2 for a bad command line or target.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    run = commands.add_parser(
        "run",
        help="run package.module:setup, where setup(bus) (sync or async) subscribes the service",
        description=(
            "Import TARGET (package.module:setup), enter a Bus, subscribe a SignalHandler (SIGTERM and SIGINT "
            "exit, SIGHUP restarts without a terminal, SIGUSR1 is graceful), a SystemdNotifier when NOTIFY_SOCKET "
            "is set (READY=1 once started, STOPPING=1 at the stop), and the plugins the flags ask for, call "
            "setup(bus) (awaited if async) so that it subscribes the service's plugins and children, start the "
            "bus, and exit with the bus's exit code. The current directory comes first on sys.path, so any "
            "module there shadows those of the same name: run from a directory only trusted users may write "
            "to (as root, one that everyone may write to is refused)."
        ),
        epilog="Exit codes: the bus's (0 clean, 70 failure, 130 forced); 2 for a bad command line or target.",
    )
    run.add_argument(
        "target",
        metavar="TARGET",
        nargs="?",
        help="the setup function, as package.module:function (the current directory comes first on sys.path)",
    )
    run.add_argument(
        "--pidfile",
        metavar="PATH",
        help=(
            "write the pid to PATH while running (PIDFile plugin; with --user or --group, a helper that keeps "
            "the starting identity removes it at exit)"
        ),
    )
    run.add_argument("--user", metavar="USER", type=_id, help="switch to this user (name or uid) at start")
    run.add_argument("--group", metavar="GROUP", type=_id, help="switch to this group (default: the user's)")
    run.add_argument("--umask", metavar="OCTAL", type=_umask, help="set the umask at start, such as 022")
    run.add_argument(
        "--reload",
        action="store_true",
        help="restart the process when a source file changes (Autoreloader; needs aiobus[reload])",
    )
    run.add_argument(
        "--log-format",
        choices=("auto", "console", "json"),
        default="auto",
        help="log lines for people or JSON lines (default: console on a terminal, json otherwise)",
    )
    run.add_argument("--log-level", choices=tuple(_LEVELS), default="info", help="the lowest level logged")
    run.add_argument(
        "--main-interval",
        metavar="SECONDS",
        type=_positive_seconds,
        default=0.1,
        help="seconds between main ticks (default: 0.1)",
    )
    run.add_argument(
        "--stop-timeout",
        metavar="SECONDS",
        type=_seconds_or_zero,
        default=None,
        help="seconds each shutdown step may take before it is cut short (default: no limit)",
    )
    run.add_argument(
        "--control",
        metavar="PATH",
        help="serve a control socket at PATH (0600) for `aiobus ctl --socket PATH` (ControlSocket plugin)",
    )
    from ._config.commands import add_file_arguments

    add_file_arguments(commands, run)
    add_ctl_parser(commands, _Parser)
    _add_fleet_parser(commands)
    return parser


def _add_fleet_parser(commands: Any) -> None:
    """``aiobus fleet``: operations on the buses bridged through Redis (run by ``aiobus.redis.fleet``)."""
    epilog = (
        "Exit codes: 0 every bus present answered; 1 some did not (named); 2 a bad command line; "
        "3 Redis could not be reached or refused us."
    )
    fleet = commands.add_parser(
        "fleet",
        help="status, graceful, stop or exit of the buses bridged through Redis (needs aiobus[redis])",
        description=(
            "Ask every bus of a group (each with a RedisBridge) for its state, or to publish graceful, stop or "
            "exit; print who answered by the deadline and who did not. The URL comes from --redis or the "
            "environment variable AIOBUS_REDIS_URL (better for a password: a command line is visible to "
            "other users); its password is never printed."
        ),
        epilog=epilog,
    )
    fleet.add_argument(
        "op", metavar="OP", choices=("status", "graceful", "stop", "exit"), help="status, graceful, stop or exit"
    )
    fleet.add_argument("--redis", metavar="URL", help="redis://[user:password@]host:port/db, rediss:// for TLS")
    fleet.add_argument("--prefix", default="aiobus", help="the deployment's key prefix (default: aiobus)")
    fleet.add_argument("--group", default="default", help="the group of buses (default: default)")
    fleet.add_argument(
        "--deadline",
        metavar="SECONDS",
        type=_positive_seconds,
        default=5.0,
        help="seconds to wait for the answers (default: 5)",
    )
    fleet.add_argument("--node", action="append", metavar="NODE", help="only this bus (may be repeated)")
    fleet.add_argument("--json", action="store_true", help="print one JSON document")


def load_target(target: str) -> Callable[..., Any]:
    """Import ``module:attribute`` (the attribute may be dotted) and return it.

    Raises:
        TargetError: malformed, a missing module or attribute, or not callable.
        Exception: whatever importing the module raised, other than the module missing.
    """
    module_name, sep, attribute = target.partition(":")
    if not sep or not module_name or not attribute:
        raise TargetError(f"target {target!r} must be module:function, such as myservice.app:setup")
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name is None or not (module_name + ".").startswith(error.name + "."):
            raise  # a module that the target's module imports is missing: an error in the service
        raise TargetError(f"no module named {error.name!r} (target {target!r})") from None
    for part in attribute.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise TargetError(f"{module_name!r} has no attribute {attribute!r} (target {target!r})") from None
    if not callable(obj):
        raise TargetError(f"target {target!r} is not callable: it is {type(obj).__name__} {obj!r:.60}")
    return obj  # type: ignore[no-any-return]


def make_plugins(bus: Bus, args: argparse.Namespace) -> list[Plugin]:
    """The plugins the flags and the environment ask for (not subscribed): SystemdNotifier (when
    ``NOTIFY_SOCKET`` is set), PIDFile, DropPrivileges, Autoreloader, ControlSocket.

    Raises:
        ValueError, TypeError, OSError, ImportError: a flag's value (or ``NOTIFY_SOCKET``) is
            refused by its plugin.
    """
    from .plugins import Autoreloader, DropPrivileges, PIDFile, SystemdNotifier

    plugins: list[Plugin] = []
    if os.environ.get("NOTIFY_SOCKET"):
        plugins.append(SystemdNotifier(bus))
    if args.pidfile is not None:
        dropping = args.user is not None or args.group is not None
        plugins.append(PIDFile(bus, args.pidfile, privileged_removal=dropping))  # removed as root after a drop
    if args.user is not None or args.group is not None or args.umask is not None:
        plugins.append(DropPrivileges(bus, uid=args.user, gid=args.group, umask=args.umask))
    if args.reload:
        plugins.append(Autoreloader(bus, getattr(args, "watch", None)))  # a service file's files too
    if getattr(args, "control", None) is not None:
        from .plugins.control import ControlSocket

        def set_level(level: int) -> None:
            configure_logging(format=args.log_format, level=level)

        plugins.append(ControlSocket(bus, args.control, set_level=set_level, level=_LEVELS[args.log_level]))
    return plugins


async def serve(setup: Callable[..., Any], args: argparse.Namespace) -> int:
    """Run ``setup`` on a bus with the plugins of ``args`` until the bus exits; return its exit code.

    A failure of ``setup`` is logged with its traceback and the code is 70. Cancelled,
    the bus exits (shielded) and the cancellation propagates.
    """
    from .plugins import SignalHandler

    async with Bus(main_interval=args.main_interval, stop_timeout=args.stop_timeout) as bus:
        SignalHandler(bus).subscribe()
        for plugin in make_plugins(bus, args):
            plugin.subscribe()
        try:
            result = setup(bus)
            if inspect.isawaitable(result):
                await result
        except Exception:
            bus.log(f"setup {args.target} failed", logging.ERROR, traceback=True, target=args.target)
            bus.exit_code = ExitCode.SOFTWARE
            await bus.exit()
        if bus.state is State.STOPPED:
            try:
                await bus.start()
            except ChannelFailures:
                pass  # logged by the bus, which has exited with code 70
        await bus.block()
    return bus.exit_code


def _fail(message: str) -> NoReturn:
    sys.stderr.write(f"aiobus: error: {message}\n")
    raise SystemExit(ExitCode.USAGE)


def _check_current_directory() -> None:
    """As root, refuse a current directory that everyone may write to: it comes first on sys.path."""
    cwd = os.getcwd()
    if os.geteuid() == 0 and os.stat(cwd).st_mode & stat.S_IWOTH:
        _fail(
            f"the current directory {cwd} is writable by everyone and comes first on sys.path: as root, "
            "run from a directory only trusted users may write to"
        )


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """The ``aiobus`` console script (and ``python -m aiobus``): always ends with SystemExit."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "ctl":
        raise SystemExit(run_ctl(args))
    if args.command == "fleet":
        try:
            from .redis.fleet import run_fleet
        except ImportError as error:
            _fail(f"fleet: {error}")
        raise SystemExit(run_fleet(args))
    _check_current_directory()
    spec = None
    if args.command == "check" or args.config is not None or args.procfile is not None:
        from ._config.commands import file_arguments

        args, spec = file_arguments(parser, args, sys.argv[1:] if argv is None else argv)
    elif args.target is None:
        parser.error("run needs TARGET, --config FILE or --procfile FILE")
    try:
        make_plugins(Bus(main_interval=args.main_interval), args)  # check the flags' values before anything runs
    except ImportError as error:
        _fail(f"--reload: {error}")
    except (ValueError, TypeError, OSError) as error:
        _fail(str(error))
    configure_logging(format=args.log_format, level=_LEVELS[args.log_level])
    try:
        try:
            setup = load_target(args.target) if spec is None else _file_setup(spec)
        except TargetError as error:
            _fail(str(error))
        except Exception:
            structlog.get_logger("aiobus").exception(f"importing {args.target} failed", target=args.target)
            raise SystemExit(ExitCode.SOFTWARE) from None
        raise SystemExit(anyio.run(serve, setup, args))
    except KeyboardInterrupt:
        raise SystemExit(ExitCode.FORCED) from None


def _file_setup(spec: Any) -> Callable[..., Any]:
    """The setup of a service file (``--config``, ``--procfile``): its objects, then its own setup."""
    from ._config.commands import load_for_run

    return load_for_run(spec)
