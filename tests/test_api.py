"""The public API: what ``aiobus`` exports."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import aiobus
import aiobus.plugins


def test_all_lists_exactly_the_public_names() -> None:
    """``__all__`` names every public name of the package, and each exists."""
    public = {name for name in dir(aiobus) if not name.startswith("_") and name not in ("plugins", "redis")}
    public -= {"TYPE_CHECKING", "lazy_exports"}
    assert sorted(public) == sorted(aiobus.__all__)
    for name in aiobus.__all__:
        assert getattr(aiobus, name) is not None


def test_the_lazy_exports_match_what_type_checkers_see() -> None:
    """Each name of ``__all__`` is imported lazily from the module that the TYPE_CHECKING block names."""
    tree = ast.parse(Path(aiobus.__file__).read_text())
    checked = {
        (f".{node.module}", alias.name)
        for block in tree.body
        if isinstance(block, ast.If) and isinstance(block.test, ast.Name) and block.test.id == "TYPE_CHECKING"
        for node in block.body
        if isinstance(node, ast.ImportFrom) and node.module is not None
        for alias in node.names
    }
    lazy = {(module, name) for module, names in aiobus._EXPORTS.items() for name in names}
    assert checked == lazy
    assert sorted(name for _, name in lazy) == sorted(aiobus.__all__)


def test_an_unknown_name_is_an_attribute_error() -> None:
    """Asking aiobus for a name it does not export raises AttributeError naming it."""
    with pytest.raises(AttributeError, match="'Buss'"):
        aiobus.Buss  # noqa: B018


def test_contract_names_are_importable() -> None:
    """The names the rest of the project relies on import from the top level."""
    from aiobus import Bus, ChannelFailures, SimplePlugin, State

    assert issubclass(ChannelFailures, ExceptionGroup)
    assert all(isinstance(cls, type) for cls in (Bus, SimplePlugin))
    assert [state.name for state in State] == ["STOPPED", "STARTING", "STARTED", "STOPPING", "EXITING"]


def test_channel_failures_is_an_exception_group() -> None:
    """ChannelFailures is an ExceptionGroup that names its channel and keeps the errors unwrapped."""
    errors = [ValueError("a"), KeyError("b")]
    failures = aiobus.ChannelFailures("start", errors)
    assert isinstance(failures, ExceptionGroup)
    assert failures.channel == "start"
    assert list(failures.exceptions) == errors
    assert "start" in str(failures)


def test_channel_failures_split_keeps_the_channel() -> None:
    """Splitting a ChannelFailures (as except* does) keeps its class and channel."""
    failures = aiobus.ChannelFailures("stop", [ValueError("a"), KeyError("b")])
    values, rest = failures.split(ValueError)
    assert isinstance(values, aiobus.ChannelFailures) and values.channel == "stop"
    assert isinstance(rest, aiobus.ChannelFailures) and rest.channel == "stop"
    assert [type(e) for e in values.exceptions] == [ValueError]


def test_channel_failures_pickles() -> None:
    """A ChannelFailures survives pickling with its channel and errors."""
    import pickle

    failures = aiobus.ChannelFailures("exit", [ValueError("a")])
    copy = pickle.loads(pickle.dumps(failures))
    assert copy.channel == "exit"
    assert [str(e) for e in copy.exceptions] == ["a"]


def test_plugins_all_lists_exactly_the_plugins() -> None:
    """aiobus.plugins exports every plugin by name, and nothing else."""
    public = {
        name
        for name, value in vars(aiobus.plugins).items()
        if not name.startswith("_") and isinstance(value, type) and value.__module__.startswith("aiobus.plugins.")
    }
    assert sorted(public) == sorted(aiobus.plugins.__all__)


def test_priority_names_plain_numbers_a_listener_can_take() -> None:
    """aiobus.Priority's constants are ints, accepted as priorities by subscribe."""
    constants = {name: value for name, value in vars(aiobus.Priority).items() if name.isupper()}
    assert constants and all(type(value) is int for value in constants.values())
    bus = aiobus.Bus()
    bus.subscribe("start", print, priority=aiobus.Priority.START_BIND)
    assert bus.listeners["start"] == (print,)


def test_exit_codes_are_the_documented_numbers() -> None:
    """ExitCode holds the numbers the README documents: 0 clean, 1 failed, 2 usage, 3 not running, 70, 130."""
    codes = aiobus.ExitCode
    assert (codes.OK, codes.FAILURE, codes.USAGE, codes.NOT_RUNNING, codes.SOFTWARE, codes.FORCED) == (
        0,
        1,
        2,
        3,
        70,
        130,
    )
