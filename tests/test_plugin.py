"""SimplePlugin: methods named after channels become listeners."""

from __future__ import annotations

from typing import ClassVar

import pytest

from aiobus import Bus, SimplePlugin, priority


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
