"""The README's bridge example runs as written, with ``aiobus run``, and hears another bus."""

from __future__ import annotations

import signal
import sys
import uuid
from pathlib import Path

import anyio
from processes import Spawner

from aiobus import Bus
from aiobus.redis import RedisBridge

ROOT = Path(__file__).resolve().parent.parent.parent


def readme_bridge_example() -> str:
    section = (ROOT / "README.md").read_text().split("## Buses across hosts, over Redis", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


class TestReadmeExample:
    async def test_the_example_logs_a_price_published_by_another_bus(self, shared_redis: str, spawn: Spawner) -> None:
        """``aiobus run prices:setup``, the URL in the environment, logs the price and its origin; SIGTERM: code 0."""
        (spawn.directory / "prices.py").write_text(readme_bridge_example())
        child = spawn.run(
            [sys.executable, "-m", "aiobus", "run", "prices:setup", "--log-format", "json"],
            env={"AIOBUS_REDIS_URL": shared_redis},
        )
        await anyio.to_thread.run_sync(child.wait_for, "Bus STARTED")
        node = f"readme-test-{uuid.uuid4().hex[:8]}"
        async with Bus() as bus:
            RedisBridge(bus, shared_redis, node=node, outgoing=["price"], group="readme-tests").subscribe()
            await bus.start()
            await bus.publish("price", "DXBZ", 20.5)
            await anyio.to_thread.run_sync(child.wait_for, f"DXBZ at 20.5 (from {node})")
        child.send(signal.SIGTERM)
        assert 0 == await anyio.to_thread.run_sync(child.wait), child.output
        child.assert_nothing_left()
