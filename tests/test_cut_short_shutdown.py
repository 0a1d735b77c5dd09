"""A shutdown cut short tells the truth: ``aiobus run --stop-timeout 1`` with programs and a broker
whose stop budgets are longer, sent SIGTERM (and a forced second Ctrl-C)."""

from __future__ import annotations

import signal
import sys
import textwrap
from pathlib import Path

import pytest
from processes import Child, Spawner

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="/proc (Linux)")

WAIT = 60  # seconds: a generous bound on waits that normally take a second or two

#: A program that notes each SIGTERM in a file of its own, then carries on (it must be killed).
STUBBORN = """
import pathlib, signal, sys, time
mark = pathlib.Path(sys.argv[1])
signal.signal(signal.SIGTERM, lambda *_: mark.write_text("SIGTERM"))
print("stubborn up", flush=True)
while True:
    time.sleep(0.05)
"""

SERVICE = """
import sys
from aiobus import ChildBroker
from aiobus.plugins import LineReady, Subprocess


async def broker(bus, link):
    async for _ in link:
        pass


def setup(bus):
    for name in ("redis", "nats", "web"):
        Subprocess(
            bus, name, [sys.executable, "stubborn.py", f"{name}.mark"], kill_after=5, ready=LineReady("stubborn up")
        ).subscribe()
    ChildBroker(bus, "broker", broker, grace=5, term_grace=2).subscribe()
"""


def start(spawn: Spawner) -> Child:
    (spawn.directory / "stubborn.py").write_text(textwrap.dedent(STUBBORN))
    (spawn.directory / "svc.py").write_text(textwrap.dedent(SERVICE))
    service = spawn.run(
        [sys.executable, "-m", "aiobus", "run", "svc:setup", "--stop-timeout", "1", "--log-format", "json"]
    )
    service.wait_for('"Bus STARTED"', WAIT, count=2)  # the broker's bus, then ours
    return service


def ended(service: Child) -> dict[str, str]:
    """Each child's logged end: its name and reason."""
    return {
        event["child"]: event["reason"]
        for event in service.events()
        if str(event.get("event", "")).startswith(f"Child {event.get('child')} ended")
    }


class TestCutShortShutdown:
    def test_a_short_stop_timeout_is_warned_about_at_start(self, spawn: Spawner) -> None:
        """The start warns that the bus's stop_timeout is shorter than the children's stop budgets."""
        service = start(spawn)
        warnings = [event for event in service.events() if event.get("level") == "warning"]
        assert any("stop_timeout" in str(event.get("event")) for event in warnings), service.output
        service.send(signal.SIGTERM)
        service.wait(WAIT)
        service.assert_nothing_left()

    def test_every_program_gets_its_stop_signal_and_every_fate_is_logged(self, spawn: Spawner) -> None:
        """SIGTERM: each program got SIGTERM before its kill, each end is logged with its real reason."""
        service = start(spawn)
        service.send(signal.SIGTERM)
        code = service.wait(WAIT)
        for name in ("redis", "nats", "web"):
            assert (Path(spawn.directory) / f"{name}.mark").read_text() == "SIGTERM", service.output
        reasons = ended(service)
        assert set(reasons) == {"redis", "nats", "web", "broker"}, service.output
        for name in ("redis", "nats", "web"):
            assert "after SIGTERM" in reasons[name] and "SIGKILL" in reasons[name], reasons
            assert "10 s" not in reasons[name] and "5 s after" not in reasons[name], reasons  # not the full kill_after
        assert reasons["broker"] == "exited", reasons  # it stops well within the time it got
        started = {event["child"]: event["child_pid"] for event in service.events() if "kind" in event}
        [killed] = [event["killed"] for event in service.events() if "killed" in event]
        assert {name: started[name] for name in ("web", "nats", "redis")} == killed, service.output
        assert code in (0, 70), service.output
        service.assert_nothing_left()

    def test_a_second_ctrl_c_still_asks_every_child_to_stop(self, spawn: Spawner) -> None:
        """Two SIGINTs: exit code 130, each program got SIGTERM first and each end is logged, nothing is left."""
        service = start(spawn)
        service.send(signal.SIGINT)
        service.wait_for("Caught SIGINT", WAIT)
        service.send(signal.SIGINT)
        assert service.wait(WAIT) == 130, service.output
        for name in ("redis", "nats", "web"):
            assert (Path(spawn.directory) / f"{name}.mark").read_text() == "SIGTERM", service.output
        assert {"redis", "nats", "web", "broker"} <= set(ended(service)), service.output
        service.assert_nothing_left()
