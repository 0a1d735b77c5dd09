"""Operating real services as an operator does: ``aiobus run ... --control PATH`` and ``aiobus ctl`` as commands.

Importable as ``operating`` (pytest puts tests/ on the path).
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from processes import Child, Spawner

WAIT = 60  # seconds: a generous bound on what normally takes a second or two

# Written to <tmp>/svc.py; the service runs in <tmp>, so "svc" is importable (by child brokers too).
SERVICE = '''
import logging
import os
import signal
import sys

from aiobus import ChildBroker
from aiobus.plugins import LineReady, PortReady, Subprocess

# A program that says it is up, then sleeps; SIGHUP makes it say "reloaded".
RELOADABLE = """
import signal, time
signal.signal(signal.SIGHUP, lambda *args: print("reloaded", flush=True))
print("up", flush=True)
while True:
    time.sleep(1)
"""

# A program that says it is up, then a numbered line every 50 ms.
CHATTY = """
import time
print("up", flush=True)
n = 0
while True:
    n += 1
    print(f"chat {n}", flush=True)
    time.sleep(0.05)
"""

# A program that writes 50,000 lines as fast as it can, then sleeps.
FLOOD = """
import sys, time
print("up", flush=True)
for n in range(50000):
    sys.stdout.write(f"flood {n} {'x' * 100}\\\\n")
sys.stdout.flush()
while True:
    time.sleep(1)
"""


def program(bus, name, code, **options):
    options.setdefault("ready", LineReady("^up$"))
    Subprocess(bus, name, [sys.executable, "-c", code], **options).subscribe()


async def idle(bus, link):
    async for _ in link:
        pass


async def ends_by_itself(bus, link):
    bus.start_soon(bus.exit)


def web_and_worker(bus):
    program(bus, "web", RELOADABLE, reload_signal=signal.SIGHUP)
    ChildBroker(bus, "worker", idle).subscribe()
    bus.subscribe("main", lambda: bus.log("svc debug tick", logging.DEBUG))


def chatty(bus):
    program(bus, "chatty", CHATTY)
    program(bus, "quiet", RELOADABLE)


def flood(bus):
    program(bus, "flood", FLOOD)


def one_program(bus):
    program(bus, "web", RELOADABLE)
'''


@dataclass
class Result:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


def start_service(
    spawn: Spawner, target: str, socket_path: Path, *flags: str, extra: str = "", quiet: bool = False
) -> Child:
    """Write the service module, run ``aiobus run svc:TARGET --control PATH`` and wait until it is STARTED
    (``quiet``: it does not log that, so ask its socket)."""
    (spawn.directory / "svc.py").write_text(textwrap.dedent(SERVICE) + textwrap.dedent(extra))
    child = spawn.run(
        [
            sys.executable,
            "-m",
            "aiobus",
            "run",
            f"svc:{target}",
            "--control",
            str(socket_path),
            "--log-format",
            "json",
            *flags,
        ]
    )
    if quiet:
        wait_started(socket_path)
    else:
        child.wait_for_own_event("Bus STARTED", timeout=WAIT)  # not a child broker's relayed one
    return child


def wait_started(socket_path: Path) -> None:
    """Ask the socket for the bus's state every 0.1 s until it is STARTED (WAIT s at most)."""
    deadline = time.monotonic() + WAIT
    while True:
        try:
            if request(socket_path, {"v": 1, "cmd": "status"})["result"]["state"] == "STARTED":
                return
        except OSError:
            pass  # not listening yet
        assert time.monotonic() < deadline, f"{socket_path} did not say STARTED within {WAIT} s"
        time.sleep(0.1)


def ctl(socket_path: Path, *args: str, timeout: float = WAIT) -> Result:
    """Run ``aiobus ctl --socket PATH ARGS`` as a command; return its exit code and output."""
    done = subprocess.run(
        [sys.executable, "-m", "aiobus", "ctl", "--socket", str(socket_path), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert "Traceback" not in done.stderr + done.stdout, done.stderr
    return Result(done.returncode, done.stdout, done.stderr)


def request(socket_path: Path, obj: Any) -> dict[str, Any]:
    """Send one request over a raw connection and return the reply."""
    with connect(socket_path) as conn:
        conn.sendall(json.dumps(obj).encode() + b"\n")
        return read_reply(conn)


def connect(socket_path: Path) -> socket.socket:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.settimeout(WAIT)
    try:
        conn.connect(str(socket_path))
    except BaseException:
        conn.close()
        raise
    return conn


def read_reply(conn: socket.socket) -> dict[str, Any]:
    """Read one JSON line from ``conn`` (byte by byte: nothing after it is taken)."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = conn.recv(1)
        assert chunk, f"the connection ended after {data!r}"
        data += chunk
    reply = json.loads(data)
    assert isinstance(reply, dict)
    return reply


def children(socket_path: Path) -> dict[str, dict[str, Any]]:
    """The children of ``ctl status --json``, by name."""
    status = ctl(socket_path, "status", "--json")
    assert status.code == 0, status.err
    return {child["name"]: child for child in status.json()["children"]}


def exit_service(child: Child, socket_path: Path) -> int:
    """``ctl exit``, then the service's exit code; nothing of it left running."""
    result = ctl(socket_path, "exit")
    assert result.code == 0, result.err
    code = child.wait(WAIT)
    child.assert_nothing_left()
    return code
