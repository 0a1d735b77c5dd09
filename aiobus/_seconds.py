"""Durations: one check of "a finite, non-negative number of seconds", with one error message."""

from __future__ import annotations

import math
from typing import Literal, overload


@overload
def check_seconds(name: str, value: object, *, positive: bool = False, optional: Literal[False] = False) -> float: ...


@overload
def check_seconds(name: str, value: object, *, positive: bool = False, optional: Literal[True]) -> float | None: ...


def check_seconds(name: str, value: object, *, positive: bool = False, optional: bool = False) -> float | None:
    """``value`` as a float, if it is a finite number of seconds >= 0 (> 0 if ``positive``).

    A bool is not a number of seconds, nor is NaN or infinity. With ``optional``, None
    is accepted and returned as it is.

    Args:
        name: what the value is, to name it in the error (``"grace"``, ``"a Monitor's frequency"``).
        value: the value to check.
        positive: refuse 0 too.
        optional: accept None.

    Raises:
        ValueError: ``"<name> must be [None or ]a finite number of seconds >= 0 (or > 0), not <value>"``.
    """
    if value is None and optional:
        return None
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        if value > 0 or (value == 0 and not positive):
            return float(value)
    either = "None or " if optional else ""
    bound = "> 0" if positive else ">= 0"
    raise ValueError(f"{name} must be {either}a finite number of seconds {bound}, not {value!r}")
