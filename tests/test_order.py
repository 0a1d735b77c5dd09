"""The order of the built-in plugins at start and stop: the contract of ``aiobus.Priority``, and a real service
whose Monitor uses a child while SIGTERM shuts it down."""

from __future__ import annotations

import re
import signal
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import free_port
from processes import Spawner

from aiobus import Bus, Priority, Supervisor
from aiobus.plugins import Autoreloader, DropPrivileges, Monitor, PIDFile, SignalHandler, SystemdNotifier


class TestContract:
    def test_start_order_is_pidfile_bind_privileges_children_then_their_users(self) -> None:
        """On start: PID file, ports bound, privileges dropped, children, then what uses them; defaults before all."""
        order = [
            Priority.START_SIGNALS,
            Priority.DEFAULT,
            Priority.START_PIDFILE,
            Priority.START_BIND,
            Priority.START_DROP_PRIVILEGES,
            Priority.START_CHILDREN,
            Priority.START_CHILD_USERS,
        ]
        assert order == sorted(order) and len(set(order)) == len(order)
        assert (Priority.START_BIND, Priority.START_DROP_PRIVILEGES, Priority.START_CHILDREN) == (75, 77, 80)

    def test_stop_order_is_users_of_children_then_children_then_the_rest(self) -> None:
        """On stop: what uses children (and the autoreloader), then the children, then the defaults."""
        assert Priority.STOP_CHILD_USERS < Priority.STOP_CHILDREN < Priority.DEFAULT
        assert Priority.STOP_AUTORELOAD < Priority.STOP_CHILDREN

    def test_built_in_plugins_subscribe_in_the_contract_order(self, tmp_path: Path) -> None:
        """Subscribed in any order, the built-in plugins start and stop in the order the contract states."""
        bus = Bus()
        monitor = Monitor(bus, lambda: None, 1)
        supervisor = Supervisor(bus)
        reloader = Autoreloader(bus, [tmp_path])
        privileges = DropPrivileges(bus, umask=0o022)
        pidfile = PIDFile(bus, tmp_path / "service.pid")
        notifier = SystemdNotifier(bus, environ={})

        def default() -> None:
            pass

        for plugin in (monitor, supervisor, reloader, privileges, pidfile, notifier):
            plugin.subscribe()
        bus.subscribe("start", default)
        bus.subscribe("stop", default)
        SignalHandler(bus).subscribe()
        start = bus.listeners["start"]
        assert start.index(notifier.start) < start.index(default) < start.index(pidfile.start)
        assert start.index(reloader.start) < start.index(privileges.start)
        assert start[start.index(privileges.start) :] == (privileges.start, supervisor.start, monitor.start)
        assert set(bus.listeners["stop"][:2]) == {monitor.stop, reloader.stop}
        assert bus.listeners["stop"][2:] == (supervisor.stop, default)

    def test_the_readme_table_gives_every_priority_with_its_number(self) -> None:
        """The README's table of the order of plugins names every Priority with the number it has."""
        readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
        table = readme.split("### The order of plugins", 1)[1].split("\n\n", 2)[2].split("\n\n", 1)[0]
        documented: dict[str, int] = {}
        for row in table.splitlines()[2:]:
            _, number_cell, name_cell = row.split("|")[1:4]
            numbers = [int(number) for number in re.findall(r"\d+", number_cell)]
            names = re.findall(r"`(\w+)`", name_cell)
            if len(numbers) == 1:  # one number for all the names of the row
                numbers *= len(names)
            documented.update(zip(names, numbers, strict=True))
        actual = {name: value for name, value in vars(Priority).items() if name.isupper()}
        assert actual == documented


# A service: SignalHandler, one child that takes a second to stop (so that a user still running then
# would meet it stopping), and a Monitor calling on the child every 0.05 s; the child's users give up
# on a child that is away after 0.3 s, and say so loudly.
BROKER_SERVICE = """
import anyio
from aiobus import Bus, ChildBroker, ParentLink, configure_logging
from aiobus.plugins import Monitor, SignalHandler


async def slow_echo(bus: Bus, link: ParentLink) -> None:
    async for message in link:
        await link.send(message)
    await anyio.sleep(1)  # takes its time to stop


async def main() -> int:
    configure_logging(format="json")
    async with Bus() as bus:
        SignalHandler(bus).subscribe()
        broker = ChildBroker(bus, "echo", slow_echo, send_timeout=0.3)
        broker.subscribe()
        sent = 0

        async def use_child() -> None:
            nonlocal sent
            sent += 1
            await broker.send(sent)
            bus.log(f"used the child: {await broker.receive()}")

        Monitor(bus, use_child, 0.05, name="child user").subscribe()
        await bus.start()
        await bus.block()
    return bus.exit_code


if __name__ == "__main__":
    raise SystemExit(anyio.run(main))
"""

# The same with an external program: a TCP server that stops listening at SIGTERM, a second before it exits.
PROGRAM = """
import signal, socket, sys, time
server = socket.create_server(("127.0.0.1", int(sys.argv[1])))
def stop(*_):
    server.close()
    time.sleep(1)
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
while True:
    try:
        connection, _ = server.accept()
    except OSError:
        continue
    connection.sendall(b"pong")
    connection.close()
"""

PROGRAM_SERVICE = """
import sys
import anyio
from aiobus import Bus, configure_logging
from aiobus.plugins import Monitor, PortReady, SignalHandler, Subprocess


async def main() -> int:
    configure_logging(format="json")
    program, port = sys.argv[1], int(sys.argv[2])
    async with Bus() as bus:
        SignalHandler(bus).subscribe()
        argv = [sys.executable, program, str(port)]
        Subprocess(bus, "pong", argv, ready=PortReady(port), stop_timeout=5).subscribe()

        async def use_child() -> None:
            async with await anyio.connect_tcp("127.0.0.1", port) as stream:
                bus.log(f"used the child: {(await stream.receive()).decode()}")

        Monitor(bus, use_child, 0.05, name="child user").subscribe()
        await bus.start()
        await bus.block()
    return bus.exit_code


raise SystemExit(anyio.run(main))
"""


@pytest.mark.skipif(sys.platform != "linux", reason="real processes and signals (Linux)")
class TestServiceShutdown:
    @pytest.mark.parametrize("kind", ["broker", "program"])
    def test_sigterm_stops_the_monitor_before_the_child_it_uses(
        self, spawn: Spawner, tmp_path: Path, kind: str
    ) -> None:
        """SIGTERM: exit code 0, nothing failing logged (no ChildUnavailable), the child used only before it stopped."""
        if kind == "broker":
            child = spawn.script(BROKER_SERVICE)
        else:
            (tmp_path / "pong.py").write_text(textwrap.dedent(PROGRAM))
            child = spawn.script(PROGRAM_SERVICE, str(tmp_path / "pong.py"), str(free_port()))
        child.wait_for("used the child", count=5)
        child.send(signal.SIGTERM)
        assert child.wait() == 0, child.output
        child.assert_nothing_left()
        output = child.output
        for sign in ("ChildUnavailable", "Traceback", "Error", '"level": "error"', '"level": "warning"'):
            assert sign not in output, output
        events = [event["event"] for event in child.events()]
        [stopped] = [index for index, event in enumerate(events) if event.startswith("Child ") and " ended" in event]
        last_use = max(index for index, event in enumerate(events) if event.startswith("used the child"))
        assert events.index("Bus STOPPING") < stopped
        assert last_use < stopped
