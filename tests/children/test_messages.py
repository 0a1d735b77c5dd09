"""The child-broker protocol's log lines: what the parent makes of a child's JSON log events."""

from __future__ import annotations

import logging

from aiobus._children.messages import RESERVED_FIELDS, decode_log, encode_log


class TestLogLines:
    def test_an_event_keeps_its_message_level_and_fields(self) -> None:
        """A child's event arrives with its text, level and plain fields."""
        line = encode_log("warning", {"event": "order placed", "order": 7, "price": 1.5})
        assert decode_log(line.decode()) == ("order placed", logging.WARNING, {"order": 7, "price": 1.5})

    def test_fields_named_like_the_parents_are_renamed(self) -> None:
        """Every reserved name but event (the message itself), and any name starting with child., gets the prefix."""
        fields = {name: f"value of {name}" for name in RESERVED_FIELDS - {"event"}}
        fields["child.x"] = "x"
        text, level, decoded = decode_log(encode_log("info", {"event": "hi", **fields}).decode())
        assert (text, level) == ("hi", logging.INFO)
        assert decoded == {f"child.{name}": value for name, value in fields.items()}

    def test_a_level_field_of_the_childs_changes_nothing_of_the_level(self) -> None:
        """A field named level is the child's data: the record keeps the level it was logged at."""
        line = encode_log("warning", {"event": "x", "level": "debug"})
        assert decode_log(line.decode()) == ("x", logging.WARNING, {"child.level": "debug"})

    def test_values_json_does_not_know_travel_as_their_repr(self) -> None:
        """A value that is not JSON (a set, an object) arrives as its repr, and the line stays one line."""
        line = encode_log("info", {"event": "a\nb", "things": {1}})
        assert line.count(b"\n") == 1
        assert decode_log(line.decode()) == ("a\nb", logging.INFO, {"things": "{1}"})

    def test_a_line_that_is_not_a_json_event_is_logged_as_it_is(self) -> None:
        """Garbage, a cut line, a JSON list or an object without fields is kept as text at WARNING."""
        for line in ("not json", '{"event": "cut', "[1, 2]", '{"event": "x"}'):
            assert decode_log(line) == (line, logging.WARNING, {"malformed": True})

    def test_an_unknown_level_is_info(self) -> None:
        """A level name the parent does not know logs at INFO."""
        assert decode_log('{"event": "x", "level": "loud", "fields": {}}') == ("x", logging.INFO, {})
