"""check_seconds: one check of a number of seconds, used by every option that is one."""

from __future__ import annotations

import math
import re
from collections.abc import Callable

import child_functions
import pytest

from aiobus import Bus, ChildBroker, PrivateListener, Supervisor, check_seconds, daemonize
from aiobus._link import check_link_options
from aiobus.plugins import Autoreloader, Monitor, PortReady, Subprocess


class TestCheckSeconds:
    @pytest.mark.parametrize(("value", "expected"), [(0, 0.0), (3, 3.0), (0.25, 0.25), (1e9, 1e9)])
    def test_a_finite_number_at_least_zero_is_returned_as_a_float(self, value: float, expected: float) -> None:
        """0, ints and floats pass, and come back as floats."""
        result = check_seconds("grace", value)
        assert (expected, float) == (result, type(result))

    @pytest.mark.parametrize("value", [-1, -0.001, math.nan, math.inf, -math.inf, True, False, "1", None, [1]])
    def test_anything_else_is_a_value_error_naming_the_value(self, value: object) -> None:
        """Negatives, NaN, infinities, bools, strings and None are refused, with one message shape."""
        with pytest.raises(ValueError) as info:
            check_seconds("grace", value)
        assert f"grace must be a finite number of seconds >= 0, not {value!r}" == str(info.value)

    def test_positive_refuses_zero(self) -> None:
        """With positive=True, 0 is refused and the message says > 0."""
        assert check_seconds("interval", 0.5, positive=True) == 0.5
        with pytest.raises(ValueError, match=re.escape("interval must be a finite number of seconds > 0, not 0")):
            check_seconds("interval", 0, positive=True)

    def test_optional_accepts_none_and_says_so(self) -> None:
        """With optional=True, None is returned as it is, and the message of a refusal mentions None."""
        assert check_seconds("hang_timeout", None, optional=True) is None
        with pytest.raises(ValueError, match=re.escape("hang_timeout must be None or a finite number of seconds")):
            check_seconds("hang_timeout", -1, optional=True)


ECHO = child_functions.echo
#: Every option of aiobus that is a number of seconds: the name its error gives it, and a call that sets it.
OPTIONS: list[tuple[str, Callable[[float], object]]] = [
    ("main_interval", lambda v: Bus(main_interval=v)),
    ("stop_timeout", lambda v: Bus(stop_timeout=v)),
    ("within", lambda v: Supervisor(Bus(), within=v)),
    ("backoff", lambda v: Supervisor(Bus(), backoff=v)),
    ("max_backoff", lambda v: Supervisor(Bus(), max_backoff=v)),
    ("grace", lambda v: ChildBroker(Bus(), "x", ECHO, grace=v)),
    ("term_grace", lambda v: ChildBroker(Bus(), "x", ECHO, term_grace=v)),
    ("start_timeout", lambda v: ChildBroker(Bus(), "x", ECHO, start_timeout=v)),
    ("send_timeout", lambda v: ChildBroker(Bus(), "x", ECHO, send_timeout=v)),
    ("hang_timeout", lambda v: ChildBroker(Bus(), "x", ECHO, hang_timeout=v)),
    ("close_timeout", lambda v: check_link_options(close_timeout=v)),
    ("handshake_timeout", lambda v: PrivateListener(handshake_timeout=v)),
    ("ready_timeout", lambda v: daemonize(ready_timeout=v)),
    ("a Monitor's frequency", lambda v: Monitor(Bus(), lambda: None, v)),
    ("the Autoreloader's debounce", lambda v: Autoreloader(Bus(), debounce=v)),
    ("PortReady's interval", lambda v: PortReady(8080, interval=v)),
    ("kill_after", lambda v: Subprocess(Bus(), "p", ["true"], kill_after=v)),
    ("ready_timeout", lambda v: Subprocess(Bus(), "p", ["true"], ready_timeout=v)),
]


@pytest.mark.parametrize(("name", "make"), OPTIONS, ids=[f"{i}-{name}" for i, (name, _) in enumerate(OPTIONS)])
def test_every_option_in_seconds_refuses_a_negative_with_the_one_message(
    name: str, make: Callable[[float], object]
) -> None:
    """A negative number of seconds for any option is a ValueError in the one shape, naming the option."""
    with pytest.raises(ValueError) as info:
        make(-1)
    assert re.fullmatch(
        rf"{re.escape(name)} must be (None or )?a finite number of seconds (>= 0|> 0), not -1", str(info.value)
    )
