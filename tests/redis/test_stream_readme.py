"""The README's example of brokers over Redis runs as documented (against a server of the test's own)."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest
from processes import Spawner
from redis_servers import RedisServer

README = Path(__file__).resolve().parent.parent.parent / "README.md"

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="POSIX signals")


def example() -> str:
    """The Python block under the heading "Brokers on other hosts, over Redis"."""
    section = README.read_text().split("## Brokers on other hosts, over Redis", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


class TestReadmeExample:
    def test_a_broker_and_a_bank_as_written(self, spawn: Spawner, own_redis: RedisServer) -> None:
        """`remote.py broker` serves; `remote.py bank` prints the reply; Ctrl-C ends the broker with 0."""
        code = example()
        assert '"redis://127.0.0.1:6379/0"' in code
        code = code.replace('"redis://127.0.0.1:6379/0"', repr(own_redis.url))
        broker = spawn.script(code, "broker", name="remote.py")
        broker.wait_for("Bus STARTED", timeout=60)
        bank = spawn.run([sys.executable, str(spawn.directory / "remote.py"), "bank"])
        assert bank.wait(60) == 0, bank.output
        assert "{'done': ['BUY', 'DXBZ', 20]}" in bank.output
        broker.send(signal.SIGINT)
        assert broker.wait(60) == 0, broker.output
        broker.assert_nothing_left()
