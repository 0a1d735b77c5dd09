"""The log channel, its default route to structlog, and the helper for applications."""

from __future__ import annotations

import io
import json
import logging
import sys

import pytest
import structlog
from helpers import LogRecorder

from aiobus import Bus, configure_logging, log_to_structlog


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
        """Without any subscription, bus.log becomes a structlog event."""
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

    def test_library_does_not_configure_structlog(self) -> None:
        """Creating and using a bus leaves structlog's configuration alone."""
        before = structlog.get_config()
        Bus().log("hello")
        assert structlog.get_config() == before


def test_console_line_shows_the_traceback_below() -> None:
    """An event with an exception prints its traceback on the lines after the message."""
    from aiobus._logging import render_line

    line = render_line(None, "error", {"event": "failed", "level": "error", "exception": "Traceback...\nValueError"})
    assert line.endswith("failed\nTraceback...\nValueError")
    assert "] aiobus  ERROR failed" in line
