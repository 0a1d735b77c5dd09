"""Make what a checked service file declares: supervisors, programs and brokers on a bus."""

from __future__ import annotations

import inspect
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .._bus import Bus
from .._children.parent import ChildBroker
from .._supervision import Child, Supervisor, default_supervisor
from .validate import ConfigError, ServiceSpec


@dataclass
class Service:
    """A service file with its functions imported: ready to be built on a bus."""

    spec: ServiceSpec
    functions: dict[str, Callable[..., Any]] = field(default_factory=dict)  # the brokers'
    setup: Callable[..., Any] | None = None

    async def __call__(self, bus: Bus) -> None:
        """The setup the ``aiobus`` command runs: build, subscribe, then the file's ``setup``."""
        children = build(bus, self)
        if self.setup is not None:
            arity = len(inspect.signature(self.setup).parameters)
            result = self.setup(bus, children) if arity >= 2 else self.setup(bus)
            if inspect.isawaitable(result):
                await result


def import_functions(spec: ServiceSpec, *, broken_is_problem: bool = False) -> Service:
    """Import the brokers' targets and the setup.

    The current directory and the file's folder are importable.

    Raises:
        ConfigError: a target that is malformed, missing or not callable (and, with
            ``broken_is_problem``, a module that fails to import).
        Exception: what importing a target's module raised (without ``broken_is_problem``).
    """
    from .._cli import TargetError, load_target

    folder = os.path.dirname(os.path.abspath(spec.path))
    if folder not in sys.path:
        sys.path.insert(0, folder)
    service = Service(spec)
    problems: list[str] = []
    wanted = [(f"[brokers.{child.name}] target", child.target, child.name) for child in spec.children if child.target]
    if spec.setup is not None:
        wanted.append(("setup", spec.setup, ""))
    for where, target, name in wanted:
        try:
            function = load_target(target)
        except TargetError as error:
            problems.append(f"{spec.path}: {where}: {error}")
            continue
        except Exception as error:
            if not broken_is_problem:
                raise
            problems.append(f"{spec.path}: {where}: importing {target} failed: {type(error).__name__}: {error}")
            continue
        if name:
            service.functions[name] = function
        else:
            service.setup = function
    if problems:
        raise ConfigError(problems)
    return service


def build(bus: Bus, service: Service, *, subscribe: bool = True) -> dict[str, Child]:
    """Make the file's supervisors and children on ``bus`` and (unless told not to) subscribe them.

    Children in no group join the bus's default group, which starts first (in the order of
    the file: programs, then brokers); then each group in the order of the file, its
    children in the order of its ``children`` list.

    Returns:
        The children, by name.

    Raises:
        ConfigError: a value the objects refuse (each problem naming its table).
    """
    from ..plugins import LineReady, PortReady, Subprocess

    spec = service.spec
    grouped = {member: group.name for group in spec.groups for member in group.children}
    if subscribe and any(child.name not in grouped for child in spec.children):
        default_supervisor(bus)  # subscribed now: the default group starts before the file's groups
    supervisors: dict[str, Supervisor] = {}
    problems: list[str] = []
    for group in spec.groups:
        try:
            supervisors[group.name] = Supervisor(bus, **group.kwargs)
        except (TypeError, ValueError) as error:
            problems.append(f"{spec.path}: [groups.{group.name}]: {error}")
    order = [child for child in spec.children if child.name not in grouped]
    by_name = {child.name: child for child in spec.children}
    order += [by_name[member] for group in spec.groups for member in group.children]
    children: dict[str, Child] = {}
    for child_spec in order:
        supervisor = supervisors.get(grouped.get(child_spec.name, ""))
        kwargs = dict(child_spec.kwargs)
        try:
            child: Child
            if child_spec.kind == "program":
                for key, check_spec in (("ready", child_spec.ready), ("live", child_spec.live)):
                    if check_spec is not None:
                        check, options = check_spec
                        kwargs[key] = PortReady(**options) if check == "port" else LineReady(**options)
                child = Subprocess(bus, child_spec.name, child_spec.argv, supervisor=supervisor, **kwargs)
            else:
                fn = service.functions[child_spec.name]
                child = ChildBroker(bus, child_spec.name, fn, supervisor=supervisor, **kwargs)
        except (TypeError, ValueError) as error:
            problems.append(f"{spec.path}: [{child_spec.kind}s.{child_spec.name}]: {error}")
            continue
        children[child_spec.name] = child
    if problems:
        raise ConfigError(problems)
    if subscribe:
        for supervisor in supervisors.values():
            supervisor.subscribe()
        for child in children.values():
            child.subscribe()
    return children
