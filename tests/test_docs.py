"""The README's example and the examples/ scripts run as documented."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest
from processes import Spawner

ROOT = Path(__file__).resolve().parent.parent


def readme_example() -> str:
    """The Python block under the README's "A short example" heading."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## A short example", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_readme_example_logs_start_ticks_and_a_clean_exit(spawn: Spawner) -> None:
    """Copied as it is, the README example starts, ticks, exits cleanly and ends with code 0."""
    child = spawn.script(readme_example())
    assert child.wait(timeout=60) == 0, child.output
    events = [event["event"] for event in child.events()]
    assert events[:2] == ["Bus STARTING", "Bus STARTED"]
    assert "tick" in events
    assert events[-3:] == ["Bus STOPPING", "Bus STOPPED", "Bus EXITING"]
    child.assert_nothing_left()


@pytest.mark.skipif(sys.platform != "linux", reason="POSIX signals")
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_hello_service_stops_cleanly_on_a_signal(spawn: Spawner, sig: int) -> None:
    """examples/hello_service.py exits with code 0 on Ctrl-C or SIGTERM."""
    child = spawn.run([sys.executable, str(ROOT / "examples" / "hello_service.py"), "--interval", "0.01"])
    child.wait_for("Main tick")
    child.send(sig)
    assert child.wait() == 0, child.output
    assert "Goodbye" in child.output
    child.assert_nothing_left()


def test_hello_service_stops_by_itself_after_its_duration(spawn: Spawner) -> None:
    """--duration ends the service with code 0."""
    child = spawn.run([sys.executable, str(ROOT / "examples" / "hello_service.py"), "--duration", "0.3"])
    assert child.wait() == 0, child.output
    assert "Bus EXITING" in child.output


@pytest.mark.parametrize("args", [["--duration", "-1"], ["--interval", "nan"]])
def test_hello_service_refuses_a_bad_number_of_seconds(spawn: Spawner, args: list[str]) -> None:
    """A negative, infinite or NaN number of seconds is an argparse error: exit code 2, no traceback."""
    child = spawn.run([sys.executable, str(ROOT / "examples" / "hello_service.py"), *args])
    assert child.wait() == 2, child.output
    assert f"argument {args[0]}: must be a positive, finite number of seconds" in child.output
    assert "Traceback" not in child.output


@pytest.mark.skipif(sys.platform != "linux", reason="POSIX signals")
def test_pid_service_stops_on_sigterm_with_code_0_and_its_pid_file_gone(spawn: Spawner, tmp_path: Path) -> None:
    """examples/pid_service.py writes its PID file, and SIGTERM ends it with code 0 and the file removed."""
    pidfile = tmp_path / "service.pid"
    child = spawn.run([sys.executable, str(ROOT / "examples" / "pid_service.py"), "--pidfile", str(pidfile)])
    child.wait_for("Service running")
    assert pidfile.read_text() == f"{child.pid}\n"
    second = spawn.run([sys.executable, str(ROOT / "examples" / "pid_service.py"), "--pidfile", str(pidfile)])
    assert second.wait() == 70, second.output
    assert f"locked by process {child.pid}" in second.output
    assert "Traceback" not in second.output and "ExceptionGroup" not in second.output
    child.send(signal.SIGTERM)
    assert child.wait() == 0, child.output
    assert not pidfile.exists()
    child.assert_nothing_left()


def readme_block(heading: str) -> str:
    """The first Python block after a README heading."""
    section = (ROOT / "README.md").read_text().split(heading, 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


@pytest.mark.skipif(sys.platform != "linux", reason="POSIX signals")
def test_readme_child_broker_example_runs(spawn: Spawner) -> None:
    """The README's child broker example sends an order to its child, gets the answer, and stops on SIGTERM."""
    child = spawn.script(readme_block("## Child brokers"), name="bank.py")
    child.wait_for("('done', 'BUY DXBZ 20')")
    executed = child.wait_for("BUY DXBZ 20 executed")  # logged in the child, relayed by the parent
    assert '"child": "broker"' in executed
    child.send(signal.SIGTERM)
    assert child.wait() == 0, child.output
    child.assert_nothing_left()


def test_readme_plugin_example_runs(spawn: Spawner) -> None:
    """The README's "Writing a plugin" example runs, logs its heartbeat, and ends with code 0."""
    child = spawn.script(
        "import aiobus\naiobus.configure_logging(format='json')\n" + readme_block("## Writing a plugin")
    )
    assert child.wait() == 0, child.output
    assert "still alive" in child.output
    child.assert_nothing_left()


def test_pid_service_with_a_missing_folder_is_one_line(spawn: Spawner, tmp_path: Path) -> None:
    """examples/pid_service.py given a PID file in a folder that does not exist: one line, exit code 1."""
    missing = tmp_path / "missing" / "service.pid"
    child = spawn.run([sys.executable, str(ROOT / "examples" / "pid_service.py"), "--pidfile", str(missing)])
    assert child.wait() == 1, child.output
    assert "Traceback" not in child.output
    assert child.lines[-1] == (
        f"pid_service: [Errno 2] the folder of PID file {missing} does not exist: '{missing.parent}'"
    )


README_PID_PATH = "/run/myservice/myservice.pid"


@pytest.mark.skipif(os.path.exists("/run/myservice"), reason="/run/myservice exists here")
def test_readme_pid_file_example_as_written_without_its_folder_is_one_line(spawn: Spawner) -> None:
    """The README's PID-file example, run as written where /run/myservice does not exist: one line, code 1."""
    child = spawn.script(readme_block("A service with a PID file"), name="myservice.py")
    assert child.wait(timeout=60) == 1, child.output
    assert "Traceback" not in child.output
    assert child.lines[-1] == (
        f"myservice: [Errno 2] the folder of PID file {README_PID_PATH} does not exist: '/run/myservice'"
    )


@pytest.mark.skipif(sys.platform != "linux", reason="POSIX signals")
def test_readme_pid_file_example_refuses_a_second_copy_in_one_line(spawn: Spawner, tmp_path: Path) -> None:
    """The README's PID-file example (its path moved to tmp_path): a second copy fails in one line, code 70."""
    code = readme_block("A service with a PID file")
    assert README_PID_PATH in code
    pidfile = tmp_path / "run" / "myservice.pid"
    pidfile.parent.mkdir()
    code = code.replace(README_PID_PATH, str(pidfile))
    first = spawn.script(code, name="first.py")
    first.wait_for("Bus STARTED")
    second = spawn.script(code, name="second.py")
    assert second.wait(timeout=60) == 70, second.output
    assert "Traceback" not in second.output and "ExceptionGroup" not in second.output
    [error] = [line for line in second.lines if "is locked by process" in line]
    assert f"PID file {pidfile} is locked by process {first.pid}, which is running" in error
    first.send(signal.SIGTERM)
    assert first.wait() == 0, first.output
    assert not pidfile.exists()
    first.assert_nothing_left()
