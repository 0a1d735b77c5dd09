"""The log channel, its default route (structlog or logging, never stdout), and the helper for applications."""

from __future__ import annotations

import io
import json
import logging
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import structlog
from helpers import LogRecorder

from aiobus import Bus, configure_logging, log_to_structlog
from aiobus._logging import LEVEL_WIDTH, NAME_WIDTH, render_line

#: Generous bound for a Python process to start, run a bus and end, on a shared machine.
WAIT = 60.0


class TestLogChannel:
    def test_log_calls_listeners_with_msg_level_and_fields(self, log_recorder: LogRecorder) -> None:
        """bus.log calls each log listener synchronously as listener(msg, level, **fields)."""
        bus = Bus()
        bus.subscribe("log", log_recorder)
        bus.log("hello", logging.WARNING, user="ann")
        [record] = log_recorder.records
        assert (record.msg, record.level, record.fields) == ("hello", logging.WARNING, {"user": "ann"})

    async def test_log_works_from_async_code(self, log_recorder: LogRecorder) -> None:
        """bus.log is a plain call in async code as well."""
        bus = Bus()
        bus.subscribe("log", log_recorder)

        @bus.subscribe("x")
        async def handler() -> None:
            bus.log("from a coroutine")

        await bus.publish("x")
        assert log_recorder.messages == ["from a coroutine"]

    def test_async_log_listener_is_a_type_error(self) -> None:
        """The log channel takes sync listeners only."""
        bus = Bus()

        async def async_listener(msg: str, level: int) -> None:
            pass

        with pytest.raises(TypeError, match="log"):
            bus.subscribe("log", async_listener)

    def test_traceback_true_sends_the_current_traceback(self, log_recorder: LogRecorder) -> None:
        """With traceback=True, the traceback of the exception being handled goes along."""
        bus = Bus()
        bus.subscribe("log", log_recorder)
        try:
            raise KeyError("missing")
        except KeyError:
            bus.log("lookup failed", logging.ERROR, traceback=True)
        [record] = log_recorder.records
        assert "Traceback" in record.fields["traceback"]
        assert "KeyError: 'missing'" in record.fields["traceback"]

    def test_traceback_true_without_an_exception_adds_nothing(self, log_recorder: LogRecorder) -> None:
        """Outside an except block there is no traceback to send."""
        bus = Bus()
        bus.subscribe("log", log_recorder)
        bus.log("all fine", traceback=True)
        assert log_recorder.records[0].fields == {}

    async def test_failing_log_listener_goes_to_stderr_and_the_bus_goes_on(
        self, log_recorder: LogRecorder, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A broken log listener is reported on stderr; the other listeners and start() still work."""
        bus = Bus()

        def broken(msg: str, level: int, **fields: object) -> None:
            raise RuntimeError("log sink down")

        bus.subscribe("log", broken, priority=1)
        bus.subscribe("log", log_recorder, priority=2)
        async with bus:
            await bus.start()
            assert bus.state.name == "STARTED"
        err = capsys.readouterr().err
        assert "log sink down" in err
        assert "broken" in err
        assert "Bus STARTED" in log_recorder.messages
        assert bus.statistics().failures["log"] >= 5


class TestStructlogRoute:
    def test_log_reaches_structlog_by_default(self) -> None:
        """Without any subscription, bus.log becomes a structlog event once structlog is configured."""
        bus = Bus()
        with structlog.testing.capture_logs() as events:
            bus.log("hello", logging.WARNING, user="ann")
        assert events == [{"event": "hello", "log_level": "warning", "user": "ann"}]

    def test_state_changes_reach_structlog(self) -> None:
        """State changes are structured events on the default route."""
        with structlog.testing.capture_logs() as events:
            import anyio

            async def cycle() -> None:
                async with Bus() as bus:
                    await bus.start()

            anyio.run(cycle)
        states = [event["state"] for event in events if "state" in event]
        assert states == ["STARTING", "STARTED", "STOPPING", "STOPPED", "EXITING"]

    def test_traceback_becomes_the_events_exception(self) -> None:
        """The traceback field is passed as structlog's exception key."""
        with structlog.testing.capture_logs() as events:
            log_to_structlog("oops", logging.ERROR, traceback="Traceback ...")
        assert events == [{"event": "oops", "log_level": "error", "exception": "Traceback ..."}]

    def test_a_field_named_event_is_passed_as_event_(self) -> None:
        """A field called event (structlog's name for the message) does not break the call: it becomes event_."""
        with structlog.testing.capture_logs() as events:
            log_to_structlog("order", logging.INFO, event="filled")
        assert events == [{"event": "order", "log_level": "info", "event_": "filled"}]

    def test_non_standard_levels_map_down(self) -> None:
        """A level between the standard ones is logged at the standard level below it."""
        with structlog.testing.capture_logs() as events:
            log_to_structlog("note", 25)
            log_to_structlog("trace", 5)
        assert [event["log_level"] for event in events] == ["info", "debug"]

    def test_unsubscribing_the_default_route_silences_structlog(self) -> None:
        """An application can take the default listener off."""
        bus = Bus()
        bus.unsubscribe("log", log_to_structlog)
        with structlog.testing.capture_logs() as events:
            bus.log("quiet")
        assert events == []


class TestLoggingRoute:
    """Without structlog configured, the default listener uses the standard library's ``aiobus`` logger."""

    @pytest.fixture(autouse=True)
    def unconfigured(self) -> Iterator[None]:
        structlog.reset_defaults()
        yield
        structlog.reset_defaults()

    def test_log_reaches_the_aiobus_logger_with_its_fields(self, caplog: pytest.LogCaptureFixture) -> None:
        """bus.log becomes a record of logging's aiobus logger: the fields in its message and its fields attribute."""
        with caplog.at_level(logging.DEBUG, logger="aiobus"):
            Bus().log("hello", logging.WARNING, user="ann")
        [record] = caplog.records
        assert ("aiobus", logging.WARNING, "hello  user=ann", {"user": "ann"}) == (
            record.name,
            record.levelno,
            record.getMessage(),
            getattr(record, "fields", None),
        )

    def test_a_traceback_follows_the_message(self, caplog: pytest.LogCaptureFixture) -> None:
        """A traceback field is printed on the lines below the message, not as a field."""
        with caplog.at_level(logging.DEBUG, logger="aiobus"):
            log_to_structlog("oops", logging.ERROR, traceback="Traceback ...\nKeyError\n", key="k")
        assert ["oops  key=k\nTraceback ...\nKeyError"] == [record.getMessage() for record in caplog.records]


UNCONFIGURED = """
import logging
import anyio
from aiobus import Bus, ChildBroker, ParentLink


async def broker(bus: Bus, link: ParentLink) -> None:
    bus.log("the child's info")
    bus.log("the child's warning", logging.WARNING)
    print("the child's print")
    async for _ in link:
        pass


async def main() -> int:
    async with Bus(main_interval=0.05) as bus:
        ChildBroker(bus, "broker", broker).subscribe()
        await bus.start()
        bus.log("an info of the parent")
        bus.log("a warning of the parent", logging.WARNING, user="ann")
    return bus.exit_code


if __name__ == "__main__":
    raise SystemExit(anyio.run(main))
"""


def test_a_program_that_configured_nothing_writes_nothing_to_stdout(tmp_path: Path) -> None:
    """A bus with a child broker in a program without any logging set up: stdout stays empty, and
    warnings (the parent's and the child's) reach stderr as Python shows them, info lines do not."""
    script = tmp_path / "unconfigured.py"
    script.write_text(UNCONFIGURED)
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=WAIT, cwd=tmp_path, check=False
    )
    assert (0, "") == (done.returncode, done.stdout), done.stderr
    lines = done.stderr.splitlines()
    assert "a warning of the parent  user=ann" in lines
    assert any(line.startswith("the child's warning  child=broker child_pid=") for line in lines), lines
    assert not [line for line in lines if "info" in line or "Bus STARTING" in line or "print" in line]


BROKEN_PIPE = """
import sys
from pathlib import Path
import anyio
from aiobus import Bus, configure_logging
from aiobus.plugins import SignalHandler

STREAM, TICKS = sys.argv[1], Path(sys.argv[2])


async def main() -> int:
    async with Bus(main_interval=0.02) as bus:
        SignalHandler(bus).subscribe()

        @bus.subscribe("main")
        def tick() -> None:
            bus.log("tick " + "x" * 500, ticks=bus.statistics().ticks)  # fills the pipe soon
            TICKS.write_text(str(bus.statistics().ticks))

        await bus.start()
        await bus.block()
    return bus.exit_code


if __name__ == "__main__":
    configure_logging(format="console", stream=getattr(sys, STREAM))
    raise SystemExit(anyio.run(main))
"""


def ticks_in(path: Path) -> int:
    try:
        return int(path.read_text() or 0)
    except (FileNotFoundError, ValueError):  # not written yet, or being written
        return 0


@pytest.mark.skipif(sys.platform != "linux", reason="POSIX signals")
@pytest.mark.parametrize(("stream", "sig"), [("stderr", signal.SIGTERM), ("stdout", signal.SIGINT)])
def test_a_log_stream_whose_reader_is_gone_does_not_stop_the_service(
    tmp_path: Path, stream: str, sig: signal.Signals
) -> None:
    """``service 2>&1 | head -3``: once the reader has closed the pipe, the service keeps running and logging, and
    its shutdown on a signal ends with code 0 (the lines it could not write are dropped)."""
    script, ticks = tmp_path / "service.py", tmp_path / "ticks"
    script.write_text(BROKEN_PIPE)
    service = subprocess.Popen(
        [sys.executable, str(script), stream, str(ticks)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=tmp_path,
    )
    try:
        assert service.stdout is not None
        head = [service.stdout.readline() for _ in range(3)]
        service.stdout.close()
        assert all(line.endswith(b"\n") for line in head), head
        closed_at = ticks_in(ticks)
        deadline = time.monotonic() + WAIT
        while ticks_in(ticks) < closed_at + 50 and service.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)  # 50 ticks (25 KB of lines) logged to the closed pipe
        assert service.poll() is None
        service.send_signal(sig)
        assert service.wait(WAIT) == 0
    finally:
        if service.poll() is None:
            service.kill()
            service.wait()


class TestConfigureLogging:
    @pytest.fixture(autouse=True)
    def restore_structlog(self) -> object:
        yield
        structlog.reset_defaults()

    def test_json_lines_when_not_a_terminal(self) -> None:
        """format='auto' writes JSON lines to a stream that is not a terminal."""
        out = io.StringIO()
        configure_logging(stream=out)
        Bus().log("hello", user="ann")
        line = json.loads(out.getvalue())
        assert line["event"] == "hello"
        assert line["user"] == "ann"
        assert line["level"] == "info"
        assert "timestamp" in line

    def test_console_format(self) -> None:
        """format='console' writes human-readable lines."""
        out = io.StringIO()
        configure_logging(format="console", stream=out)
        Bus().log("hello", user="ann")
        text = out.getvalue()
        assert "hello" in text and "user=ann" in text and not text.startswith("{")

    def test_level_filters(self) -> None:
        """Events below the configured level are dropped."""
        out = io.StringIO()
        configure_logging(format="json", level=logging.WARNING, stream=out)
        bus = Bus()
        bus.log("dropped")
        bus.log("kept", logging.ERROR)
        assert [json.loads(line)["event"] for line in out.getvalue().splitlines()] == ["kept"]

    def test_bad_format_is_a_value_error(self) -> None:
        """An unknown format is refused."""
        with pytest.raises(ValueError, match="format"):
            configure_logging(format="xml", stream=sys.stderr)  # type: ignore[arg-type]

    def test_json_timestamps_are_utc_with_microseconds(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """A JSON line's timestamp is ISO 8601 in UTC with microseconds, whatever the local time zone."""
        monkeypatch.setenv("TZ", "AIO-5")  # POSIX: five hours east of UTC
        time.tzset()
        try:
            out = io.StringIO()
            configure_logging(format="json", stream=out)
            Bus().log("hello")
            now = datetime.now(UTC)
        finally:
            monkeypatch.undo()
            time.tzset()
        stamp = json.loads(out.getvalue())["timestamp"]
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", stamp), stamp
        assert abs(datetime.fromisoformat(stamp) - now) < timedelta(hours=1), (stamp, now)

    def test_a_closed_stream_drops_the_lines_without_raising(self) -> None:
        """Logging to a stream that was closed raises nothing: the lines are dropped."""
        out = io.StringIO()
        configure_logging(format="console", stream=out)
        out.close()
        bus = Bus()
        bus.log("dropped")
        assert "log" not in bus.statistics().failures

    def test_library_does_not_configure_structlog(self) -> None:
        """Creating and using a bus leaves structlog's configuration alone."""
        before = structlog.get_config()
        Bus().log("hello")
        assert structlog.get_config() == before


class TestConsoleLine:
    def test_messages_line_up_whatever_the_name_and_level(self) -> None:
        """Short and long names, INFO, WARNING and CRITICAL: every message starts at the same column."""
        events: list[dict[str, Any]] = [
            {"event": "MSG", "level": "info", "timestamp": "2026-12-01 10:00:00"},
            {"event": "MSG", "level": "warning", "timestamp": "2026-12-01 10:00:00", "logger": "Bank"},
            {"event": "MSG", "level": "critical", "timestamp": "2026-12-01 10:00:00", "child": "a-very-long-child"},
            {"event": "MSG", "level": "error", "timestamp": "2026-12-01 10:00:00", "child": "redis", "child_pid": 7},
        ]
        lines = [render_line(None, "info", event) for event in events]
        assert [len("[2026-12-01 10:00:00] ") + NAME_WIDTH + 1 + LEVEL_WIDTH + 1] * 4 == [
            line.index("MSG") for line in lines
        ]
        assert [line.split("] ", 1)[1].split()[:2] for line in lines] == [
            ["aiobus", "INFO"],
            ["Bank", "WARNING"],
            ["A-very-lo…", "CRITICAL"],
            ["Redis", "ERROR"],
        ]


def test_console_line_shows_the_traceback_below() -> None:
    """An event with an exception prints its traceback on the lines after the message."""
    line = render_line(None, "error", {"event": "failed", "level": "error", "exception": "Traceback...\nValueError"})
    assert line.endswith("failed\nTraceback...\nValueError")
    assert line.startswith("[] aiobus     ERROR    failed")
