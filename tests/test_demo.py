"""The bank/broker demo, run as a user runs it."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path

import pytest
from processes import Spawner

DEMO = Path(__file__).resolve().parent.parent / "examples" / "bank_broker.py"

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="POSIX signals")


def orders(output: str) -> tuple[list[str], list[str]]:
    """The orders the Bank placed and those the Broker executed, each as 'SIDE SYMBOL QUANTITY'."""
    placed, executed = [], []
    for line in output.splitlines():
        if "Placing order: " in line:
            placed.append(line.split("Placing order: ", 1)[1].split("  ")[0].strip())
        elif " order placed for " in line:
            words = line.split("INFO  ", 1)[1].split()
            executed.append(f"{words[0]} {words[5]} {words[4]}")  # SIDE order placed for QTY SYMBOL
    return placed, executed


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_sigterm_stops_both_with_every_order_executed(spawn: Spawner, sig: int) -> None:
    """After Ctrl-C (to the whole group, as a terminal sends it) or SIGTERM, the demo exits 0,
    the Broker executed every order the Bank placed, and no process is left."""
    demo = spawn.run([sys.executable, str(DEMO), "--interval", "0.05"])
    demo.wait_for("order placed for", count=5)
    if sig == signal.SIGINT:
        os.killpg(demo.pid, signal.SIGINT)
    else:
        demo.send(sig)
    assert demo.wait() == 0, demo.output
    demo.assert_nothing_left()
    placed, executed = orders(demo.output)
    assert len(placed) >= 5
    assert executed == placed
    assert "Broker closed" in demo.output and "Bank closed" in demo.output
    bank = [line for line in demo.output.splitlines() if "Bus EXITING" in line]
    assert len(bank) == 2  # both buses logged their shutdown


def test_a_pool_of_three_brokers_executes_every_order_once(spawn: Spawner) -> None:
    """--brokers 3: SIGTERM stops it with exit 0; every order placed was executed exactly once, by
    the three brokers between them, whose lines name them (Broker0, Broker1, Broker2); nothing is left."""
    demo = spawn.run([sys.executable, str(DEMO), "--interval", "0.02", "--brokers", "3"])
    demo.wait_for("order placed for", count=30)
    demo.send(signal.SIGTERM)
    assert demo.wait() == 0, demo.output
    demo.assert_nothing_left()
    placed, executed = orders(demo.output)
    assert len(placed) >= 30
    assert sorted(executed) == sorted(placed)
    names = {line.split("]", 1)[1].split()[0] for line in demo.output.splitlines() if "order placed for" in line}
    assert names == {"Broker0", "Broker1", "Broker2"}
    assert demo.output.count("Broker closed") == 3


@pytest.mark.parametrize(
    "arguments", [["--interval", "nan"], ["--interval", "inf"], ["--duration", "-1"], ["--brokers", "0"]]
)
def test_bad_arguments_are_usage_errors(spawn: Spawner, arguments: list[str]) -> None:
    """A NaN or infinite interval, a negative duration, no brokers: a usage error (exit 2), no traceback."""
    demo = spawn.run([sys.executable, str(DEMO), *arguments])
    assert demo.wait() == 2, demo.output
    assert "Traceback" not in demo.output and "error: argument" in demo.output


def test_lines_read_as_in_the_article(spawn: Spawner) -> None:
    """Console lines read [time] Bank       INFO     Placing order: ... and [time] Broker     INFO     ...
    order placed for ..., the messages in one column."""
    demo = spawn.run([sys.executable, str(DEMO), "--interval", "0.05", "--duration", "1"])
    assert demo.wait() == 0, demo.output
    bank = next(line for line in demo.output.splitlines() if "Placing order" in line)
    broker = next(line for line in demo.output.splitlines() if "order placed for" in line)
    assert bank.startswith("[") and "] Bank       INFO     Placing order: " in bank
    assert "] Broker     INFO     " in broker
    assert bank.index("Placing order") == broker.index(broker.split("INFO", 1)[1].strip())


def test_json_and_duration(spawn: Spawner) -> None:
    """--json gives JSON lines; --duration stops the demo by itself with code 0."""
    demo = spawn.run([sys.executable, str(DEMO), "--interval", "0.05", "--duration", "1", "--json"])
    assert demo.wait() == 0, demo.output
    events = [json.loads(line) for line in demo.output.splitlines() if line.startswith("{")]
    assert any(event["event"].startswith("Placing order: ") and event["logger"] == "Bank" for event in events)
    assert any("order placed for" in event["event"] and event["child"] == "broker" for event in events)
    demo.assert_nothing_left()


def test_ctrl_c_typed_in_a_real_terminal_stops_the_demo_cleanly() -> None:
    """^C typed on the demo's own terminal (a pty it controls) stops it: exit 0, every order executed."""
    master, slave = os.openpty()
    # No echo: the terminal would echo ^C into the middle of whatever line the demo is writing.
    attrs = termios.tcgetattr(slave)
    attrs[3] &= ~(termios.ECHO | termios.ECHOCTL)
    termios.tcsetattr(slave, termios.TCSANOW, attrs)
    output = bytearray()
    seen = threading.Condition()

    def take_terminal() -> None:  # in the child, after setsid: the pty becomes its terminal
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    def read() -> None:
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the terminal's last user is gone
                break
            if not chunk:
                break
            with seen:
                output.extend(chunk)
                seen.notify_all()

    demo = subprocess.Popen(
        [sys.executable, str(DEMO), "--interval", "0.05"],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        start_new_session=True,
        preexec_fn=take_terminal,
    )
    os.close(slave)
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 60
        with seen:
            while output.count(b"order placed for") < 5:
                assert time.monotonic() < deadline, output.decode(errors="replace")
                seen.wait(1)
        os.write(master, b"\x03")  # the terminal's line discipline turns it into SIGINT
        assert demo.wait(timeout=60) == 0, output.decode(errors="replace")
    finally:
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGKILL)
            demo.wait()
        reader.join(10)
        os.close(master)
    text = output.decode(errors="replace").replace("\r\n", "\n")
    placed, executed = orders(text)
    assert len(placed) >= 5 and executed == placed
    left = subprocess.run(["pgrep", "-s", str(demo.pid)], capture_output=True, text=True).stdout.split()
    assert left == []


# -- over Redis: the bank and two brokers in processes of their own -----------------------

REDIS_URL = "redis://127.0.0.1:6379/0"


def redis_here() -> bool:
    from redis_servers import answers

    if answers("127.0.0.1", 6379):
        return True
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail("CI needs Redis on 127.0.0.1:6379", pytrace=False)
    return False


def remote_orders(output: str, marker: str) -> list[str]:
    """The order ids in the lines of ``output`` containing ``marker`` ("Placing order " or "Order ")."""
    found = []
    for line in output.splitlines():
        if marker in line and ("Placing order " in line or " order placed for " in line):
            found.append(line.split(marker, 1)[1].split(":", 1)[0])
    return found


def test_over_redis_a_broker_stopped_by_ctrl_c_loses_no_order(spawn: Spawner) -> None:
    """One bank and two brokers over Redis; SIGINT to one broker mid-run: it exits 0 and the others
    go on; then all stopped: every order placed was executed at least once (duplicates counted),
    every exit code is 0, nothing is left running."""
    if not redis_here():
        pytest.skip("no Redis on 127.0.0.1:6379")
    prefix = f"aiobus-test:demo-{os.getpid()}-{time.monotonic_ns()}"
    common = ["--redis", REDIS_URL, "--prefix", prefix]
    try:
        first = spawn.run([sys.executable, str(DEMO), *common, "--role", "broker"])
        second = spawn.run([sys.executable, str(DEMO), *common, "--role", "broker"])
        for broker in (first, second):
            broker.wait_for("Bus STARTED")
        bank = spawn.run([sys.executable, str(DEMO), *common, "--role", "bank", "--interval", "0.02"])
        first.wait_for("order placed for", count=5)
        second.wait_for("order placed for", count=5)
        first.send(signal.SIGINT)
        assert first.wait(60) == 0, first.output
        executed_before = second.output.count("order placed for")
        second.wait_for("order placed for", count=executed_before + 20)  # the other goes on
        bank.wait_for("confirmed by", count=bank.output.count("confirmed by") + 5)  # and the bank too
        bank.send(signal.SIGINT)
        assert bank.wait(60) == 0, bank.output
        placed = remote_orders(bank.output, "Placing order ")
        second.wait_for(f"Order {placed[-1]}:", timeout=60)  # the last order placed is executed
        second.send(signal.SIGINT)
        assert second.wait(60) == 0, second.output
        for child in (first, second, bank):
            child.assert_nothing_left()
        executed = remote_orders(first.output + "\n" + second.output, "Order ")
        assert len(placed) >= 30
        assert set(placed) <= set(executed)  # none lost
        duplicates = len(executed) - len(set(executed))
        counted = [line for line in first.output.splitlines() + second.output.splitlines() if "Broker closed" in line]
        assert 2 == len(counted)
        assert duplicates <= sum(int(line.split("duplicates=")[1].split()[0]) for line in counted)
        assert "Bank closed" in bank.output and "orders_placed=" in bank.output
    finally:
        keys = subprocess.run(["redis-cli", "--scan", "--pattern", f"{prefix}*"], capture_output=True, text=True)
        if keys.stdout.split():
            subprocess.run(["redis-cli", "DEL", *keys.stdout.split()], capture_output=True)


def test_over_redis_a_wrong_password_is_a_clear_error(spawn: Spawner) -> None:
    """A broker or a bank given a wrong password exits 1 at once, saying Redis refused it, without
    the password and without a traceback."""
    if not redis_here():
        pytest.skip("no Redis on 127.0.0.1:6379")
    url = "redis://nobody:not-the-password@127.0.0.1:6379/0"
    for role in ("broker", "bank"):
        demo = spawn.run([sys.executable, str(DEMO), "--redis", url, "--role", role])
        assert demo.wait(60) == 1, demo.output
        assert "cannot start: Redis at redis://nobody:***@127.0.0.1:6379/0 refused us" in demo.output
        assert "not-the-password" not in demo.output and "Traceback" not in demo.output


def test_redis_and_role_go_together(spawn: Spawner) -> None:
    """--role without --redis (or the reverse) is a usage error."""
    demo = spawn.run([sys.executable, str(DEMO), "--role", "bank"])
    assert demo.wait() == 2, demo.output
    assert "--redis and --role go together" in demo.output
