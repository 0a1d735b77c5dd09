"""Plugins: every built-in plugin has the one shape, Plugin; SimplePlugin's methods named after channels become
listeners."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import child_functions
import pytest

from aiobus import (
    Bus,
    ChildBroker,
    DaemonReporter,
    Plugin,
    SimplePlugin,
    Supervisor,
    default_supervisor,
    priority,
)
from aiobus._daemon import Daemon
from aiobus.plugins import (
    Autoreloader,
    ControlSocket,
    DropPrivileges,
    Monitor,
    PIDFile,
    SignalHandler,
    Subprocess,
    SystemdNotifier,
)


class Recorder(SimplePlugin):
    channels: ClassVar[tuple[str, ...]] = ("orders",)

    def __init__(self, bus: Bus) -> None:
        super().__init__(bus)
        self.calls: list[str] = []

    @priority(70)
    async def start(self) -> None:
        self.calls.append("start")

    def stop(self) -> None:
        self.calls.append("stop")

    async def orders(self, order: str) -> str:
        self.calls.append(order)
        return "ok"


class TestSimplePlugin:
    async def test_subscribe_binds_methods_named_after_channels(self) -> None:
        """start, stop and the declared channel reach the plugin's methods."""
        async with Bus() as bus:
            plugin = Recorder(bus)
            plugin.subscribe()
            await bus.start()
            assert await bus.publish("orders", "BUY") == ["ok"]
            await bus.stop()
        assert plugin.calls == ["start", "BUY", "stop"]

    async def test_priority_attribute_of_a_method_is_used(self) -> None:
        """A method's priority attribute (70 here) orders it among the other listeners."""
        async with Bus() as bus:
            plugin = Recorder(bus)
            bus.subscribe("start", lambda: plugin.calls.append("default 50"))
            bus.subscribe("start", lambda: plugin.calls.append("80"), priority=80)
            plugin.subscribe()
            await bus.start()
        assert plugin.calls[:3] == ["default 50", "start", "80"]

    async def test_unsubscribe_detaches_every_method(self) -> None:
        """After unsubscribe no method of the plugin is called."""
        async with Bus() as bus:
            plugin = Recorder(bus)
            plugin.subscribe()
            plugin.unsubscribe()
            await bus.start()
            assert await bus.publish("orders", "SELL") == []
        assert plugin.calls == []

    def test_a_non_callable_channel_attribute_is_a_type_error(self) -> None:
        """An attribute named after a channel must be a method."""

        class Broken(SimplePlugin):
            main = 3

        with pytest.raises(TypeError, match="main"):
            Broken(Bus()).subscribe()


@pytest.fixture
def daemon() -> Iterator[Daemon]:
    """A daemon's reporting side, writing to a pipe nobody reads (no fork)."""
    read_fd, write_fd = os.pipe()
    yield Daemon(write_fd)
    os.close(read_fd)


#: Each built-in plugin, made as its documentation says: the annotation has mypy check that each is a Plugin.
BUILT_IN: dict[str, Callable[[Bus, Path, Daemon], Plugin]] = {
    "SimplePlugin": lambda bus, path, daemon: Recorder(bus),
    "Supervisor": lambda bus, path, daemon: Supervisor(bus),
    "SignalHandler": lambda bus, path, daemon: SignalHandler(bus),
    "PIDFile": lambda bus, path, daemon: PIDFile(bus, path / "service.pid"),
    "DropPrivileges": lambda bus, path, daemon: DropPrivileges(bus, umask=0o022),
    "SystemdNotifier": lambda bus, path, daemon: SystemdNotifier(bus, environ={}),
    "Monitor": lambda bus, path, daemon: Monitor(bus, lambda: None, 1.0),
    "Autoreloader": lambda bus, path, daemon: Autoreloader(bus, [path]),
    "Subprocess": lambda bus, path, daemon: Subprocess(bus, "program", [sys.executable, "-c", "pass"]),
    "ChildBroker": lambda bus, path, daemon: ChildBroker(bus, "broker", child_functions.echo),
    "DaemonReporter": lambda bus, path, daemon: DaemonReporter(bus, daemon),
    "ControlSocket": lambda bus, path, daemon: ControlSocket(bus, path / "ctl.sock"),
}


def attached(bus: Bus) -> tuple[dict[str, tuple[Callable[..., Any], ...]], list[str]]:
    """What plugins have attached to ``bus``: its listeners, and the children of its default group."""
    children = [info.name for info in default_supervisor(bus).children()]  # first: it subscribes the group
    return {channel: listeners for channel, listeners in bus.listeners.items() if listeners}, children


class TestPluginShape:
    @pytest.mark.parametrize("name", sorted(BUILT_IN))
    def test_each_built_in_plugin_is_a_plugin(self, name: str, tmp_path: Path, daemon: Daemon) -> None:
        """Every built-in plugin has subscribe() and unsubscribe(): it is a Plugin."""
        assert isinstance(BUILT_IN[name](Bus(), tmp_path, daemon), Plugin)

    @pytest.mark.parametrize("name", sorted(BUILT_IN))
    def test_subscribe_attaches_and_unsubscribe_detaches(self, name: str, tmp_path: Path, daemon: Daemon) -> None:
        """subscribe() attaches the plugin to its bus (listeners or a child of its group); unsubscribe() undoes it."""
        bus = Bus()
        plugin = BUILT_IN[name](bus, tmp_path, daemon)
        before = attached(bus)
        plugin.subscribe()
        assert attached(bus) != before
        plugin.unsubscribe()
        assert attached(bus) == before

    def test_an_object_without_unsubscribe_is_not_a_plugin(self) -> None:
        """The shape is both methods: an object with subscribe() alone is not a Plugin."""

        class HalfPlugin:
            def subscribe(self) -> None:
                pass

        assert not isinstance(HalfPlugin(), Plugin)
